"""Train (or fine-tune) a data-filtering network with open_clip's own trainer.

`train_dfn(train, model, out, ...)` runs `open_clip_train.main` on WebDataset shards and writes
the final weights to `out`, a checkpoint the embed stage loads by path as embedder or DFN scorer
(`embed.model: ARCH`, `embed.pretrained: OUT`):

- `out` ending in `.safetensors`: the model's state dict alone, float16 by default (half the size;
  the embed stage loads it into a float32 model and computes in fp32 or the device's autocast type);
- any other name (`.pt`): open_clip's training checkpoint as the trainer wrote it (epoch, state
  dict, optimizer state), which `--pretrained` of a later fine-tune or open_clip itself also read.

The trainer runs in a child process, `python -m pipeline.train_dfn OPEN_CLIP_ARGS...`, which
registers the project's model configs (`pipeline/model_configs`) and hands the arguments to
`open_clip_train.main.main`. A child process rather than a call in this one because the trainer
reconfigures the root logger, seeds the global random generators, changes torch backend flags and
calls `exit()` on some errors; and because its CPU threads (`OMP_NUM_THREADS`) must be fixed before
torch starts. Its output goes to `LOGS/train.log`; a failure raises `TrainDFNError` with the tail.

`train` is what the pipeline's `input` accepts: a directory of `.tar` shards, a glob, a brace
pattern, or a list of them, on any fsspec URL (URLs webdataset cannot open itself are streamed
through fsspec by a `pipe:` command). The trainer needs the number of samples of an epoch: each
shard's count is read from `sizes.json` beside it when that names it (a curated run's
`shards/sizes.json` does), and otherwise counted from the tar headers the way open_clip groups
members (a sample = consecutive members sharing a key, with a `txt` and an image).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

from pipeline.config import IMAGE_EXTENSIONS

log = logging.getLogger("curate")

# URL schemes webdataset's gopen opens by itself; other fsspec URLs are streamed through `pipe:`.
_WDS_SCHEMES = ("http://", "https://", "gs://", "pipe:", "file://")
# webdataset's key rule (base_plus_ext): the path up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TRAIN_LINE = re.compile(r"Train Epoch: \d+|Start epoch")
_LOG_PREFIX = re.compile(r"^[\d,:-]+ \| [A-Z]+ \| ")  # open_clip_train's "date | LEVEL | "

# Defaults for a small model trained from scratch on a CPU (the shipped model's recipe, see
# pipeline/assets/README.md); a fine-tune (`pretrained` given) defaults to the lower FINETUNE_LR.
DEFAULTS = {
    "epochs": 6,
    "batch_size": 128,
    "lr": 2e-3,
    "wd": 0.1,
    "warmup": 50,
}
FINETUNE_LR = 1e-4


class TrainDFNError(RuntimeError):
    """The trainer failed or wrote no checkpoint; the message ends with its log tail."""


# --- shards and sample counts ----------------------------------------------------------------------


def resolve_train_shards(train: str | list[str]) -> list[str]:
    """Sorted shard URLs of a directory, glob, brace pattern or list (as the pipeline's `input`)."""
    from pipeline.io.fs import resolve_shards

    return resolve_shards(train)


def count_samples(shard: str) -> int:
    """Samples open_clip's trainer takes from one shard: runs of consecutive members with one key
    that hold a `txt` and an image (open_clip's `group_by_keys_nothrow` + `filter_no_caption_or_no_image`)."""
    from pipeline.io.fs import open_input

    count = 0
    key, suffixes = None, set()

    def valid() -> bool:
        return "txt" in suffixes and any(ext in suffixes for ext in IMAGE_EXTENSIONS)

    with open_input(shard) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
        for info in archive:
            if not info.isfile():
                continue
            match = _KEY_EXT.match(info.name)
            if match is None:
                continue
            prefix, suffix = match.group(1), match.group(2).lower()
            if key is None or prefix != key or suffix in suffixes:
                count += key is not None and valid()
                key, suffixes = prefix, set()
            suffixes.add(suffix)
    count += key is not None and valid()
    return int(count)


def shard_sizes(shards: list[str]) -> dict[str, int]:
    """shard URL -> trainable samples: from `sizes.json` beside the shard when it names it, else counted."""
    from pipeline.io import fs

    sizes: dict[str, int] = {}
    by_dir: dict[str, list[str]] = collections.defaultdict(list)
    for shard in shards:
        by_dir[posixpath.dirname(shard)].append(shard)
    for folder, members in by_dir.items():
        listed = {}
        sizes_url = posixpath.join(folder, "sizes.json")
        if fs.exists(sizes_url):
            try:
                listed = json.loads(fs.read_bytes(sizes_url))
            except (ValueError, OSError):
                listed = {}
        for shard in members:
            name = posixpath.basename(shard)
            sizes[shard] = int(listed[name]) if name in listed else count_samples(shard)
    return sizes


def trainer_url(shard: str) -> str:
    """The shard as webdataset should open it: local paths and its own schemes as they are, other
    fsspec URLs (s3://, ...) streamed by a `pipe:` command through this module."""
    if "://" not in shard or shard.startswith(_WDS_SCHEMES):
        return shard.removeprefix("file://")
    return f"pipe:{shlex.quote(sys.executable)} -m pipeline.train_dfn --cat {shlex.quote(shard)}"


# --- the trainer -------------------------------------------------------------------------------------


def _resolve_pretrained(pretrained: str | None) -> str | None:
    """What `--pretrained` gets: a local path made absolute, a bare name of a shipped file
    (pipeline/assets) that path, an fsspec URL a local copy; anything else (a tag) as it is."""
    if not pretrained:
        return None
    from pipeline import models

    if "://" in pretrained:
        return models.local_checkpoint(pretrained)
    path = os.path.abspath(os.path.expanduser(pretrained))
    if os.path.exists(path):
        return path
    if os.path.basename(pretrained) == pretrained and (models.ASSET_DIR / pretrained).is_file():
        return str(models.ASSET_DIR / pretrained)
    return pretrained


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def trainer_args(
    shards: list[str],
    n_samples: int,
    model: str,
    logs: str,
    *,
    pretrained: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    wd: float,
    warmup: int,
    image_size: int | None,
    workers: int,
    device: str,
    precision: str,
    seed: int,
    log_every: int,
    extra: list[str],
) -> list[str]:
    """The argument list of `open_clip_train.main` for one run."""
    args = [
        "--train-data", "::".join(trainer_url(s) for s in shards),
        "--train-num-samples", str(n_samples),
        "--dataset-type", "webdataset",
        "--model", model,
        "--epochs", str(epochs),
        "--batch-size", str(batch_size),
        "--lr", repr(float(lr)),
        "--wd", repr(float(wd)),
        "--warmup", str(warmup),
        "--workers", str(workers),
        "--device", device,
        "--precision", precision,
        "--seed", str(seed),
        "--logs", logs,
        "--name", "run",
        "--report-to", "",
        "--save-frequency", "0",  # only the final epoch is written
        "--log-every-n-steps", str(log_every),
    ]
    if pretrained:
        args += ["--pretrained", pretrained]
    if image_size:
        args += ["--force-image-size", str(image_size)]
    return args + list(extra)


def _child_env(threads: int | None, device: str) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    if device == "cpu":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the dataloader worker shares the cores
    env.setdefault("WANDB_DISABLED", "true")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_trainer(args: list[str], env: dict[str, str], log_path: str, timeout: float | None) -> None:
    """Run the trainer in a child process, its output to `log_path` (progress lines also to our log)."""
    command = [sys.executable, "-m", "pipeline.train_dfn", *args]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with open(log_path, "w", encoding="utf-8") as log_file:
        log_file.write("$ " + shlex.join(command) + "\n")
        log_file.flush()
        # its own process group, so that stopping it also stops its dataloader workers and pipes
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   errors="replace", start_new_session=True)
        stopped = threading.Event()

        def kill() -> None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def stop() -> None:
            stopped.set()
            kill()

        timer = threading.Timer(timeout, stop) if timeout else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log_file.write(line)
                line = line.rstrip("\n")
                tail.append(line)
                if _TRAIN_LINE.search(line):
                    log.info("train-dfn: %s", _LOG_PREFIX.sub("", line))
            code = process.wait()
        except BaseException:
            kill()
            process.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
    if stopped.is_set():
        raise TrainDFNError(f"open_clip's trainer ran longer than {timeout:g} s and was stopped (log: {log_path}); "
                            "last lines:\n" + "\n".join(tail))
    if code != 0:
        raise TrainDFNError(f"open_clip's trainer exited with status {code} (log: {log_path}); last lines:\n"
                            + "\n".join(tail))


def _log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(collections.deque(handle, maxlen=lines))
    except OSError:
        return ""


def save_weights(checkpoint: str, out: str, half: bool = True) -> None:
    """An open_clip training checkpoint's model weights alone, as safetensors (float16 when `half`)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    weights = {}
    for name, tensor in state.items():
        name = name.removeprefix("module.")
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        weights[name] = tensor.contiguous()
    tmp = f"{out}.tmp-{os.getpid()}"
    save_file(weights, tmp, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its file readable by the owner only
    os.replace(tmp, out)


def train_dfn(
    train: str | list[str],
    model: str,
    out: str,
    *,
    pretrained: str | None = None,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float | None = None,
    wd: float = DEFAULTS["wd"],
    warmup: int = DEFAULTS["warmup"],
    image_size: int | None = None,
    samples: int | None = None,
    workers: int = 1,
    device: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    half: bool = True,
    logs: str | None = None,
    log_every: int = 10,
    extra_args: list[str] | tuple[str, ...] = (),
    timeout: float | None = None,
) -> str:
    """Train `model` (an open_clip architecture, e.g. one of pipeline/model_configs) on the shards
    `train` with open_clip's trainer and write the final weights to `out`; returns `out`.

    pretrained: a checkpoint (path, fsspec URL, or the bare name of a file in pipeline/assets) or an
    open_clip tag to fine-tune from (`--pretrained`); None trains from scratch. lr: peak learning
    rate of the cosine schedule (default 2e-3 from scratch, 1e-4 when fine-tuning). samples:
    samples per epoch (default: all the shards hold; more repeats samples, fewer ends the epoch
    early). image_size: `--force-image-size` (default: the config's).
    workers: dataloader processes (at most one per shard). device: cpu, cuda or auto. precision:
    open_clip's (default fp32 on CPU, amp on GPU). threads: torch's CPU threads in the trainer
    (default: all cores the trainer may use). half: float16 weights when `out` is .safetensors.
    logs: keep the trainer's folder there (default: a temporary folder, removed after success).
    extra_args: further `open_clip_train.main` arguments, appended as they are.
    """
    started = time.perf_counter()
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    shards = resolve_train_shards(train)
    sizes = shard_sizes(shards)
    available = sum(sizes.values())
    if available == 0:
        raise TrainDFNError(f"the shards of {train!r} hold no sample with both a caption and an image")
    if available < batch_size:  # open_clip drops partial batches: its epoch would never end
        raise TrainDFNError(f"the shards hold {available} samples, fewer than one batch of {batch_size}: "
                            "lower --batch-size")
    n_samples = int(samples) if samples else available
    pretrained = _resolve_pretrained(pretrained)
    if lr is None:
        lr = FINETUNE_LR if pretrained else DEFAULTS["lr"]
    workers = max(0, min(int(workers), len(shards)))  # open_clip: at least one shard per worker
    device = _resolve_device(device)
    precision = precision or ("fp32" if device == "cpu" else "amp")
    if threads is None and device == "cpu":
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    keep_logs = logs is not None
    logs = os.path.abspath(logs) if keep_logs else tempfile.mkdtemp(prefix="curate-train-dfn-")
    os.makedirs(logs, exist_ok=True)
    run_dir = os.path.join(logs, "run")
    if os.path.exists(run_dir):
        raise TrainDFNError(f"{run_dir} exists (an earlier run's logs): choose another --logs folder")
    args = trainer_args(
        shards, n_samples, model, logs, pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr, wd=wd,
        warmup=warmup, image_size=image_size, workers=workers, device=device, precision=precision, seed=seed,
        log_every=log_every, extra=list(extra_args),
    )
    log.info("train-dfn: %s on %d shard(s), %d samples per epoch (%d in the shards), %d epoch(s) of batch %d, %s %s%s",
             model, len(shards), n_samples, available, epochs, batch_size, device, precision,
             f", from {pretrained}" if pretrained else "")
    log_path = os.path.join(logs, "train.log")
    _run_trainer(args, _child_env(threads, device), log_path, timeout)

    checkpoint = os.path.join(run_dir, "checkpoints", f"epoch_{epochs}.pt")
    if not os.path.isfile(checkpoint):
        raise TrainDFNError(f"open_clip's trainer wrote no {checkpoint} (log: {log_path}); last lines:\n"
                            + _log_tail(os.path.join(run_dir, "out.log")) + _log_tail(log_path))
    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if out.endswith(".safetensors"):
        save_weights(checkpoint, out, half=half)
    else:
        tmp = f"{out}.tmp-{os.getpid()}"
        shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, out)
    if not keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    log.info("train-dfn: wrote %s (%.1f MB) in %.0f s", out, os.path.getsize(out) / 1e6, time.perf_counter() - started)
    return out


# --- measuring a trained model on a synthetic pool ------------------------------------------------------


def roc_auc(positive, negative) -> float:
    """P(score of a random positive > score of a random negative), ties counted one half."""
    import numpy as np

    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("ROC AUC needs at least one positive and one negative")
    scores = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties get their mean rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def concept_structure(embeddings, concepts) -> dict:
    """How image embeddings group by concept: leave-one-out 1-nearest-neighbour concept accuracy
    (cosine), what a random neighbour would give (`nn_chance`) and the most frequent concept's
    share (`majority`), and the mean cosine of same-concept pairs minus different-concept pairs."""
    import numpy as np

    x = np.asarray(embeddings, np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.asarray(concepts)
    n = len(labels)
    if n < 3:
        raise ValueError("the concept measures need at least 3 samples")
    sims = x @ x.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(n, dtype=bool)
    np.fill_diagonal(sims, -np.inf)
    nn_accuracy = float((labels[sims.argmax(axis=1)] == labels).mean())
    np.fill_diagonal(sims, 0.0)
    same_pairs, diff_pairs = same & off, ~same
    _, counts = np.unique(labels, return_counts=True)
    same_cosine = float(sims[same_pairs].mean()) if same_pairs.any() else float("nan")
    different_cosine = float(sims[diff_pairs].mean()) if diff_pairs.any() else float("nan")
    return {
        "samples": int(n),
        "concepts": int(len(counts)),
        "nn_accuracy": nn_accuracy,
        "nn_chance": float(((counts * (counts - 1)).sum()) / (n * (n - 1))),
        "majority": float(counts.max() / n),
        "same_concept_cosine": same_cosine,
        "different_concept_cosine": different_cosine,
        "cosine_margin": same_cosine - different_cosine,
    }


def embed_pool(pool: str, model: str, pretrained: str | None, *, batch_size: int = 64,
               threads: int | None = None):
    """Embed a local pool with the embed stage's own core (ingest_shard, chunk_items, prepare_chunk,
    EmbedWorker) without Ray, `model` / `pretrained` as both embedder and DFN scorer.

    Returns a pandas DataFrame: uid, drop_reason, image_embedding, clip_score, dfn_score."""
    import numpy as np
    import pandas as pd

    from pipeline import models
    from pipeline.config import CurateConfig
    from pipeline.stages import embed
    from pipeline.stages.ingest import LanguageIdentifier, ingest_shard

    shards = resolve_train_shards(pool)
    config = CurateConfig.model_validate({"input": pool, "output": os.path.join(tempfile.gettempdir(), "unused"),
                                          "embed": {"model": model, "pretrained": pretrained},
                                          "dfn": {"model": model, "pretrained": pretrained}})
    specs = models.preflight(config)
    worker = embed.EmbedWorker({role: vars(spec) for role, spec in specs.items()}, "cpu", "fp32",
                               threads or (os.cpu_count() or 1), config.embed.jpeg_draft_factor)
    langid = LanguageIdentifier()
    frames = []
    for partition, shard in enumerate(shards):
        with open(shard, "rb") as stream:
            table, _ = ingest_shard(stream, shard=os.path.basename(shard), partition=partition, config=config,
                                    langid=langid)
        items = embed.chunk_items(table, partition, shard, batch_size)
        results = [worker(embed.prepare_chunk(item, worker.prepare_spec())) for item in items]
        dim = results[0]["image_embedding"].shape[1] if results else models.embed_dim(specs["embed"])
        out = embed.assemble(table.column("uid"), results, dim)
        frames.append(pd.DataFrame({
            "uid": out.column("uid").to_pylist(),
            "drop_reason": table.column("drop_reason").to_pylist(),
            "image_embedding": [None if v is None else np.asarray(v, np.float32)
                                for v in out.column("image_embedding").to_pylist()],
            "clip_score": out.column("clip_score").to_pylist(),
            "dfn_score": out.column("dfn_score").to_pylist(),
        }))
    return pd.concat(frames, ignore_index=True)


def evaluate_model(pool: str, model: str, pretrained: str | None, *, threads: int | None = None) -> dict:
    """A model's measures on a synthetic pool (its truth in POOL/truth/truth.parquet), the model as
    both embedder and DFN scorer:

    - `auc_mismatched`: ROC AUC of the DFN score (computed by the embed stage) separating clean
      samples (correct English caption, no defect) from `mismatched_caption` samples;
    - `concept`: `concept_structure` of the image embeddings of the clean samples.
    """
    import numpy as np
    import pandas as pd

    from pipeline.synth import TRUTH_DIR, TRUTH_FILE

    truth = pd.read_parquet(os.path.join(pool, TRUTH_DIR, TRUTH_FILE), columns=["uid", "concept", "defects"])
    scored = embed_pool(pool, model, pretrained, threads=threads).merge(truth, on="uid", how="inner")
    clean = scored[scored["defects"].map(len) == 0]
    mismatched = scored[scored["defects"].map(lambda d: "mismatched_caption" in list(d))]
    result = {
        "pool": pool,
        "model": model,
        "pretrained": pretrained,
        "clean": int(len(clean)),
        "mismatched": int(len(mismatched)),
        "auc_mismatched": (roc_auc(clean["dfn_score"].dropna(), mismatched["dfn_score"].dropna())
                           if len(mismatched) else None),
        "dfn_score_clean_mean": float(clean["dfn_score"].mean()),
        "dfn_score_mismatched_mean": float(mismatched["dfn_score"].mean()) if len(mismatched) else None,
    }
    with_image = clean[clean["image_embedding"].notna()]
    result["concept"] = concept_structure(np.stack(with_image["image_embedding"].to_list()),
                                          with_image["concept"].to_numpy())
    return result


# --- command line ---------------------------------------------------------------------------------


def add_train_dfn_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """`curate train-dfn`: register the subcommand on the `curate` parser's subparsers (`parents`: the
    options every subcommand shares)."""
    parser = subparsers.add_parser(
        "train-dfn",
        parents=list(parents),
        help="train or fine-tune an open_clip model (a DFN scorer / embedder) on WebDataset shards",
        description="Train (or, with --pretrained, fine-tune) an open_clip model with open_clip's trainer "
                    "(open_clip_train) and write a checkpoint the embed stage loads by path.",
    )
    parser.add_argument("--train", required=True, nargs="+", metavar="SHARDS",
                        help="directory, glob or brace pattern of .tar shards (any fsspec URL), or several")
    parser.add_argument("--model", required=True,
                        help="open_clip architecture (open_clip.list_models(), with pipeline/model_configs), "
                             "e.g. curate-dfn-rn16-64")
    parser.add_argument("--out", required=True,
                        help="where to write the weights: .safetensors (weights only) or .pt (training checkpoint)")
    parser.add_argument("--pretrained", default=None,
                        help="checkpoint path or open_clip tag to fine-tune from (default: none, train from scratch)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="passes over the shards (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="samples per training step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate (default: {DEFAULTS['lr']:g} from scratch, "
                             f"{FINETUNE_LR:g} fine-tuning)")
    parser.add_argument("--wd", type=float, default=DEFAULTS["wd"], help="weight decay (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="warmup steps (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="force this input size (default: the config's)")
    parser.add_argument("--samples", type=int, default=None, help="samples per epoch (default: all in the shards)")
    parser.add_argument("--workers", type=int, default=1, help="dataloader processes (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--precision", default=None, help="open_clip precision (default: fp32 on CPU, amp on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the trainer (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="open_clip_train's --seed (default: %(default)s)")
    parser.add_argument("--fp32", action="store_true",
                        help="keep float32 weights in a .safetensors output (default: off, float16)")
    parser.add_argument("--logs", default=None,
                        help="keep the trainer's logs and checkpoints in this folder (default: a temporary folder, removed "
                             "after success)")
    parser.add_argument("--trainer-args", default="",
                        help="more open_clip_train arguments, one shell-quoted string, e.g. \"--grad-clip-norm 1\" "
                             "(default: none)")
    parser.set_defaults(func=cmd_train_dfn)
    return parser


def cmd_train_dfn(args) -> int:
    try:
        started = time.perf_counter()
        out = train_dfn(
            args.train if len(args.train) > 1 else args.train[0], args.model, args.out, pretrained=args.pretrained,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, wd=args.wd, warmup=args.warmup,
            image_size=args.image_size, samples=args.samples, workers=args.workers, device=args.device,
            precision=args.precision, threads=args.threads, seed=args.seed, half=not args.fp32, logs=args.logs,
            extra_args=shlex.split(args.trainer_args),
        )
    except (TrainDFNError, FileNotFoundError, ValueError) as exc:
        print(f"curate: train-dfn: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s; "
          f"use it with model: {args.model} / pretrained: {out}")
    return 0


def _cat(url: str) -> None:
    """Stream one file to stdout (the `pipe:` command for URLs webdataset cannot open)."""
    from pipeline.io.fs import open_input

    with open_input(url) as handle:
        shutil.copyfileobj(handle, sys.stdout.buffer, 8 * 2**20)


def _trainer_main(argv: list[str]) -> int:
    """The child process: the project's model configs registered, then open_clip's trainer."""
    import pipeline.models  # noqa: F401  (registers pipeline/model_configs with open_clip)
    from open_clip_train.main import main

    result = main(argv)
    return 1 if result == -1 else 0


def _evaluate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train_dfn --evaluate",
                                     description="Measure a model on a synthetic pool (see evaluate_model).")
    parser.add_argument("--pool", required=True, help="a pool written by `curate synth` (with truth/)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(evaluate_model(args.pool, args.model, args.pretrained, threads=args.threads), indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cat"]:
        _cat(sys.argv[2])
        sys.exit(0)
    if sys.argv[1:2] == ["--evaluate"]:
        sys.exit(_evaluate_main(sys.argv[2:]))
    sys.exit(_trainer_main(sys.argv[1:]))
