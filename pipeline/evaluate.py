"""Does curation help? Train the same small CLIP on each curated subset and on a random subset of the
same pool, at equal size and equal steps, and measure every model on held-out data.

`evaluate(pool, arms, out, classes=..., pairs=...)` runs the loop:

1. **Arms.** An arm is a curated selection from `pool`: a run directory (its `datacomp_subset.npy`,
   else the `kept` rows of its metadata) or a DataComp subset file (`.npy`, sorted `u8,u8` uids).
   The baseline arm `random` is the pool's *trainable* samples: those the ingest stage finds no
   problem with (an image that decodes and a UTF-8 caption: what open_clip's trainer can read at
   all; of a uid that repeats, its first row). Defects that a reader does not reject (mismatched
   or foreign captions, duplicates, small images) stay in it: that is what curation removes. An
   arm's uids that are not trainable samples of the pool (a DataComp subset lists uids a download
   may lack) are left out of it with a warning; eval.json records both counts.
2. **Equal size.** Every arm, the baseline included, is cut to the same `size` (default: the
   smallest arm) per seed: its uids sorted, permuted by `numpy.random.default_rng(seed)`, the first
   `size` taken, in that order. Same seed, same subset; another seed, another subset.
3. **Materialise.** The cut's samples are copied, bytes untouched, from the pool's shards by the
   byte ranges ingest records (`pipeline.io.shards.fetch_members`) into WebDataset shards named by
   uid, with `sizes.json`. A run directory and a subset file naming the same uids give the same
   shards: both are always materialised from the pool.
4. **Train.** `pipeline.train_dfn.train_dfn` (open_clip's own trainer, in a child process) trains
   `model` from scratch for exactly `steps` steps of `batch_size` (one epoch of `steps *
   batch_size` samples; a smaller subset is repeated), with the same hyperparameters and seed for
   every arm. open_clip's sample shuffle buffer seeds itself from the clock, so a rerun is the
   same experiment, not the same bytes: the spread over seeds is the measure of that noise.
5. **Measure** each checkpoint on held-out data, never part of any pool:
   - zero-shot top-1 / top-5 accuracy on labelled images, the classifier built from prompt
     templates over the class names by open_clip's `build_zero_shot_classifier` (what
     open_clip_train's ImageNet zero-shot eval does);
   - image-to-text and text-to-image recall@1 / @5 on image-caption pairs (a query counts as
     found at k when fewer than k other candidates score at least as high as its partner).

   Labelled images are an image folder (one folder per class; `classes.json` maps folder to class
   name, else the folder name with `_` as spaces) or WebDataset shards whose samples carry their
   class (`.cls`: a name, or an index into `classnames.txt` beside the shards; or `class` in the
   `.json`). Pairs are WebDataset shards (image + `.txt`). `curate synth --eval-set` writes both.

Output, under `out`: `eval.json` (layout in `build_result`), and per arm and seed
`arms/ARM/seed-S/`: `uids.txt` (the cut, in training order), `subset.npy` (DataComp format),
`model.safetensors`, `train.json` (what it was trained with: a rerun with the same settings reuses
the checkpoint), `logs/train.log`, `metrics.json`. The materialised shards are removed after
training unless `keep_shards`. Each run-directory arm gets a copy in `RUN/eval/eval.json` and its
`report.html` re-rendered with the Evaluation section.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from pipeline.config import IMAGE_EXTENSIONS

log = logging.getLogger("curate")

RANDOM_ARM = "random"
MODEL = "curate-dfn-rn16-64"
# Defaults sized so that one curated arm and the random baseline at 3 seeds on a 20k pool take
# about 15 minutes on 2 CPU cores (EVAL.md); the learning rate and weight decay are the shipped
# model's (pipeline/assets/README.md).
DEFAULTS = {
    "steps": 240,
    "batch_size": 128,
    "lr": 2e-3,
    "wd": 0.1,
    "warmup": 24,
    "seeds": 3,
    "shard_size": 1000,
    "workers": 1,
}
# Prompts for the synthetic pools' captions ("a photo of a red circle that sits on a white background");
# open_clip averages the normalised text embeddings of every template per class.
TEMPLATES = (
    "a photo of a {}.",
    "an image of a {}.",
    "a simple picture showing a {}.",
    "an illustration of a {}.",
    "a flat graphic of a {}.",
)
METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
INDEX_COLUMNS = ["uid", "drop_reason", "partition", "sha256", "image_ext", "image_offset", "image_size",
                 "text_offset", "text_size", "json_offset", "json_size"]


class EvalError(RuntimeError):
    """An arm, the pool or the held-out data cannot be used as given; the message says why."""


# --- arms ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Arm:
    name: str
    kind: str  # run | subset | random
    source: str
    uids: list[str]  # sorted, unique


def run_uids(run_dir: str) -> list[str]:
    """The kept uids of a run: its DataComp subset file, else the `kept` rows of its metadata."""
    from pipeline.io import fs
    from pipeline.io.datacomp import read_subset

    subset = fs.join(run_dir, "datacomp_subset.npy")
    if fs.exists(subset):
        return sorted(read_subset(subset))
    parts = fs.list_files(fs.join(run_dir, "metadata"), ".parquet")
    if not parts:
        raise EvalError(f"{run_dir} is not a run directory (no datacomp_subset.npy, no metadata/*.parquet)")
    from pipeline.io.parquet import read_table

    uids = set()
    for part in parts:
        table = read_table(part, ["uid", "kept"])
        uids.update(u for u, kept in zip(table.column("uid").to_pylist(), table.column("kept").to_pylist()) if kept)
    return sorted(uids)


def load_arm(spec: str) -> Arm:
    """`[NAME=]PATH`: a run directory or a DataComp subset `.npy`; NAME defaults to PATH's last part."""
    from pipeline.io import fs
    from pipeline.io.datacomp import read_subset

    name, _, path = spec.partition("=")
    if not path or "/" in name or ":" in name:  # no NAME= prefix: the whole spec is the path
        name, path = "", spec
    path = path.rstrip("/")
    name = name or os.path.splitext(os.path.basename(path))[0]
    if not name or name == RANDOM_ARM or "/" in name:
        raise EvalError(f"arm {spec!r}: choose another name (NAME=PATH); {RANDOM_ARM!r} is the baseline's")
    if path.endswith(".npy"):
        if not fs.exists(path):
            raise EvalError(f"arm {name}: subset file {path} not found")
        return Arm(name, "subset", path, sorted(read_subset(path)))
    if fs.exists(fs.join(path, "datacomp_subset.npy")) or fs.exists(fs.join(path, "metadata")):
        return Arm(name, "run", path, run_uids(path))
    raise EvalError(f"arm {name}: {path} is neither a run directory nor a DataComp subset file (.npy)")


def cut(uids: list[str], size: int, seed: int) -> list[str]:
    """`size` of the uids, chosen and ordered by a seeded permutation of the sorted uids."""
    ordered = sorted(uids)
    if size > len(ordered):
        raise EvalError(f"cannot cut {size} samples from {len(ordered)}")
    order = np.random.default_rng(seed).permutation(len(ordered))[:size]
    return [ordered[i] for i in order]


def uid_digest(uids: list[str]) -> str:
    """sha256 of the uids in order (what a checkpoint was trained on)."""
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()


# --- the pool --------------------------------------------------------------------------------------


def index_pool(pool: str | list[str], cache_dir: str | None = None):
    """Every sample of the pool: uid, ingest's verdict and where its members lie (ingest_shard with
    the basic filter off), plus `source` (the shard URL) and `trainable`. Cached in `cache_dir`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.config import CurateConfig
    from pipeline.io import fs
    from pipeline.stages.ingest import LanguageIdentifier, ingest_shard

    shards = fs.resolve_shards(pool)
    identity = []
    for url in shards:
        filesystem, path = fs.to_fs(url)
        identity.append({"url": url, "bytes": filesystem.size(path)})
    cache = os.path.join(cache_dir, "pool_index.parquet") if cache_dir else None
    if cache and os.path.isfile(cache):
        table = pq.read_table(cache)
        if json.loads((table.schema.metadata or {}).get(b"shards", b"null")) == identity:
            return table
    config = CurateConfig.model_validate({"input": pool, "output": cache_dir or "unused",
                                          "basic_filter": {"enabled": False}})
    langid = LanguageIdentifier()
    tables = []
    for partition, (url, name) in enumerate(zip(shards, fs.shard_names(shards))):  # names as a run's ingest has them
        with fs.open_input(url) as stream:
            table, _ = ingest_shard(stream, shard=name, partition=partition, config=config, langid=langid)
        table = table.select(INDEX_COLUMNS)
        tables.append(table.append_column("source", pa.array([url] * table.num_rows, pa.string())))
    table = pa.concat_tables(tables)
    uids = table.column("uid").to_pylist()
    seen, first = set(), []
    for uid in uids:
        first.append(uid not in seen)
        seen.add(uid)
    trainable = pc.and_(pc.is_null(table.column("drop_reason")), pa.array(first))
    table = table.append_column("trainable", trainable)
    table = table.replace_schema_metadata({b"shards": json.dumps(identity).encode()})
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        pq.write_table(table, f"{cache}.tmp")
        os.replace(f"{cache}.tmp", cache)
    log.info("eval: indexed the pool: %d samples in %d shards, %d trainable", table.num_rows, len(shards),
             sum(trainable.to_pylist()))
    return table


def trainable_uids(index) -> list[str]:
    return sorted(index.filter(index.column("trainable")).column("uid").to_pylist())


def materialise(index, uids: list[str], out_dir: str, shard_size: int = DEFAULTS["shard_size"]) -> dict[str, int]:
    """Copy the samples `uids` (in this order) from the pool's shards into WebDataset shards in
    `out_dir` (`{uid}.jpg/.txt/.json`, original bytes) and write `sizes.json`; returns it."""
    from pipeline.io.shards import fetch_members
    from pipeline.io.tar import TarWriter

    rows = {}
    for row in index.filter(index.column("trainable")).select(INDEX_COLUMNS + ["source"]).to_pylist():
        rows[row["uid"]] = row
    missing = [u for u in uids if u not in rows]
    if missing:
        raise EvalError(f"{len(missing)} of the {len(uids)} uids are not trainable samples of the pool "
                        f"(e.g. {missing[0]}): was the arm curated from another pool?")
    os.makedirs(out_dir, exist_ok=True)
    sizes = {}
    n_shards = max(1, -(-len(uids) // shard_size))
    for number, part in enumerate(np.array_split(np.arange(len(uids)), n_shards)):
        samples = [rows[uids[i]] for i in part]
        fetched: dict[str, dict] = {}
        by_source: dict[str, list[dict]] = {}
        for sample in samples:
            by_source.setdefault(sample["source"], []).append(sample)
        for source, group in by_source.items():
            for sample, members in zip(group, fetch_members(source, group)):
                if hashlib.sha256(members["image"]).hexdigest() != sample["sha256"]:
                    raise EvalError(f"{source}: the image of {sample['uid']} changed since the pool was indexed")
                fetched[sample["uid"]] = members
        name = f"{number:08d}.tar"
        path = os.path.join(out_dir, name)
        with open(f"{path}.tmp", "wb") as handle, TarWriter(handle) as tar:
            for sample in samples:
                members, uid = fetched[sample["uid"]], sample["uid"]
                tar.add(f"{uid}.{sample['image_ext']}", members["image"])
                tar.add(f"{uid}.txt", members["text"])
                if members["json"] is not None:
                    tar.add(f"{uid}.json", members["json"])
        os.replace(f"{path}.tmp", path)
        sizes[name] = len(samples)
    with open(os.path.join(out_dir, "sizes.json"), "w", encoding="utf-8") as handle:
        json.dump(sizes, handle, indent=1)
    return sizes


# --- held-out data -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Labelled:
    images: list[bytes]
    labels: np.ndarray  # index into classnames
    classnames: list[str]
    source: str


@dataclasses.dataclass
class Pairs:
    images: list[bytes]
    captions: list[str]
    source: str


def _samples_of_shards(spec: str | list[str]) -> list[dict[str, bytes]]:
    """The samples of WebDataset shards as {ext: bytes}, grouped by key in order of first appearance."""
    from pipeline.io import fs
    from pipeline.io.tar import iter_tar_members

    samples: list[dict[str, bytes]] = []
    for url in fs.resolve_shards(spec):
        by_key: dict[str, dict[str, bytes]] = {}
        with fs.open_input(url) as stream:
            for member in iter_tar_members(stream, 64 * 2**20):
                if member.data is not None:
                    by_key.setdefault(member.key, {}).setdefault(member.ext, member.data)
        samples.extend(by_key.values())
    return samples


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


def read_image_folder(path: str) -> Labelled:
    """An image folder: one sub-folder per class; `classes.json` maps folder names to class names
    (else a folder's name with `_` read as spaces); labels follow the sorted folder names."""
    folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    names_file = os.path.join(path, "classes.json")
    names = {}
    if os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as handle:
            names = json.load(handle)
    images, labels = [], []
    for label, folder in enumerate(folders):
        for file in sorted(os.listdir(os.path.join(path, folder))):
            if file.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                with open(os.path.join(path, folder, file), "rb") as handle:
                    images.append(handle.read())
                labels.append(label)
    classnames = [names.get(folder, folder.replace("_", " ")) for folder in folders]
    return Labelled(images, np.asarray(labels, np.int64), classnames, path)


def read_labelled_shards(spec: str | list[str]) -> Labelled:
    """WebDataset shards whose samples carry a class: `.cls` (a class name, or an index into
    `classnames.txt` beside the shards) or `class` in the `.json`. Class names in classnames.txt
    order when it exists, else sorted."""
    from pipeline.io import fs

    shards = fs.resolve_shards(spec)
    listed_url = fs.join(os.path.dirname(shards[0]) if shards else "", "classnames.txt")
    listed = fs.read_bytes(listed_url).decode("utf-8").splitlines() if shards and fs.exists(listed_url) else []
    images, names = [], []
    for sample in _samples_of_shards(shards):
        image = _image_of(sample)
        name = None
        if "cls" in sample:
            text = sample["cls"].decode("utf-8").strip()
            name = listed[int(text)] if text.isdigit() and listed else text
        elif "json" in sample:
            name = json.loads(sample["json"]).get("class")
        if image is None or not name:
            continue
        images.append(image)
        names.append(str(name))
    classnames = listed or sorted(set(names))
    position = {name: i for i, name in enumerate(classnames)}
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise EvalError(f"{spec}: class {unknown[0]!r} is not in classnames.txt")
    return Labelled(images, np.asarray([position[n] for n in names], np.int64), classnames, str(spec))


def read_labelled(spec: str) -> Labelled:
    """An image folder (a local directory of class folders) or WebDataset shards with a class field."""
    if os.path.isdir(spec) and not any(name.endswith(".tar") for name in os.listdir(spec)):
        labelled = read_image_folder(spec)
    else:
        labelled = read_labelled_shards(spec)
    if len(labelled.images) == 0 or len(labelled.classnames) < 2:
        raise EvalError(f"{spec}: no labelled images in two or more classes")
    return labelled


def read_pairs(spec: str | list[str]) -> Pairs:
    """Image-caption pairs from WebDataset shards (an image and a `.txt` per sample)."""
    images, captions = [], []
    for sample in _samples_of_shards(spec):
        image = _image_of(sample)
        if image is not None and "txt" in sample:
            images.append(image)
            captions.append(sample["txt"].decode("utf-8"))
    if len(images) < 2:
        raise EvalError(f"{spec}: fewer than two image-caption pairs")
    return Pairs(images, captions, str(spec))


# --- metrics -------------------------------------------------------------------------------------------


def zero_shot_classifier(model, tokenizer, classnames: list[str], templates) -> "torch.Tensor":  # noqa: F821
    """[embed_dim, classes]: open_clip's build_zero_shot_classifier (per class, the mean of the
    normalised text embeddings of every template, normalised)."""
    import open_clip

    return open_clip.build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=list(classnames),
                                                templates=list(templates), num_classes_per_batch=32, device="cpu")


def zero_shot_accuracy(image_features, classifier, labels, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy of `image_features @ classifier` (open_clip_train's `accuracy`: torch.topk)."""
    import torch

    features = torch.as_tensor(np.asarray(image_features, np.float32))
    logits = features @ torch.as_tensor(np.asarray(classifier, np.float32))
    target = torch.as_tensor(np.asarray(labels))
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    return {f"zeroshot_top{k}": float((top[:, :k] == target[:, None]).any(dim=1).float().mean()) for k in ks}


def retrieval_recall(image_features, text_features, ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways for pairs (image i, text i): a query is found at k when fewer than k
    other candidates score at least its partner's cosine (ties count against it)."""
    images = np.asarray(image_features, np.float64)
    texts = np.asarray(text_features, np.float64)
    scores = images @ texts.T
    result = {}
    for name, s in (("i2t", scores), ("t2i", scores.T)):
        partner = np.diag(s)[:, None]
        ahead = (s >= partner).sum(axis=1) - 1  # the partner itself is not ahead of itself
        for k in ks:
            result[f"{name}_r{k}"] = float((ahead < k).mean())
    return result


class HeldOut:
    """The held-out data, decoded and preprocessed once, measured on any checkpoint of one architecture."""

    def __init__(self, labelled: Labelled, pairs: Pairs, templates=TEMPLATES):
        self.labelled, self.pairs, self.templates = labelled, pairs, tuple(templates)
        self._tensors: dict[str, tuple] = {}

    def describe(self) -> dict:
        return {
            "classification": {"source": self.labelled.source, "images": len(self.labelled.images),
                               "classes": len(self.labelled.classnames)},
            "pairs": {"source": self.pairs.source, "pairs": len(self.pairs.images)},
            "templates": list(self.templates),
        }

    def _inputs(self, loaded):
        import torch
        from PIL import Image

        key = json.dumps(loaded.preprocess_cfg, sort_keys=True, default=str)
        if key not in self._tensors:
            def batch(blobs):
                return torch.stack([loaded.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])

            self._tensors[key] = (batch(self.labelled.images), batch(self.pairs.images),
                                  loaded.tokenizer(self.pairs.captions))
        return self._tensors[key]

    def measure(self, model_name: str, checkpoint: str | None, threads: int | None = None) -> dict[str, float]:
        import torch

        from pipeline import models

        if threads:
            torch.set_num_threads(threads)
        logging.disable(logging.INFO)  # open_clip logs every step of loading a model to the root logger
        try:
            loaded = models.load_model(models.resolve_spec(model_name, checkpoint, "eval"))
        finally:
            logging.disable(logging.NOTSET)
        class_images, pair_images, pair_tokens = self._inputs(loaded)
        model = loaded.model

        def encode(fn, tensor):
            return torch.cat([fn(tensor[i : i + 256], normalize=True) for i in range(0, len(tensor), 256)]).float()

        with torch.no_grad():
            classifier = zero_shot_classifier(model, loaded.tokenizer, self.labelled.classnames, self.templates)
            metrics = zero_shot_accuracy(encode(model.encode_image, class_images).numpy(), classifier.numpy(),
                                         self.labelled.labels)
            metrics.update(retrieval_recall(encode(model.encode_image, pair_images).numpy(),
                                            encode(model.encode_text, pair_tokens).numpy()))
        return metrics


# --- the loop ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    model: str = MODEL
    steps: int = DEFAULTS["steps"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    wd: float = DEFAULTS["wd"]
    warmup: int = DEFAULTS["warmup"]
    shard_size: int = DEFAULTS["shard_size"]
    workers: int = DEFAULTS["workers"]
    threads: int | None = None
    device: str = "auto"

    def training(self) -> dict:
        """What a checkpoint depends on (threads, workers and device only change the speed)."""
        return {k: getattr(self, k) for k in ("model", "steps", "batch_size", "lr", "wd", "warmup")}


def train_arm(index, uids: list[str], seed: int, folder: str, settings: Settings, keep_shards: bool = False) -> dict:
    """Materialise `uids`, train on them with open_clip's trainer; reuse a checkpoint trained on
    the same uids with the same settings. Returns the checkpoint path and timings."""
    from pipeline.io.datacomp import write_subset
    from pipeline.train_dfn import train_dfn

    os.makedirs(folder, exist_ok=True)
    checkpoint = os.path.join(folder, "model.safetensors")
    record_path = os.path.join(folder, "train.json")
    record = {**settings.training(), "seed": seed, "samples": len(uids), "uids_sha256": uid_digest(uids)}
    if os.path.isfile(checkpoint) and os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            done = json.load(handle)
        if {k: done.get(k) for k in record} == record:
            log.info("eval: %s: reusing the checkpoint trained on the same samples with the same settings", folder)
            return {"checkpoint": checkpoint, **{k: done.get(k) for k in ("materialise_seconds", "train_seconds")},
                    "reused": True}
    for stale in (checkpoint, record_path):
        if os.path.exists(stale):
            os.remove(stale)
    with open(os.path.join(folder, "uids.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(uids) + "\n")
    write_subset(os.path.join(folder, "subset.npy"), uids)
    shards = os.path.join(folder, "shards")
    logs = os.path.join(folder, "logs")
    for old in (shards, logs):
        shutil.rmtree(old, ignore_errors=True)
    started = time.perf_counter()
    materialise(index, uids, shards, settings.shard_size)
    materialised = time.perf_counter() - started
    train_dfn(shards, settings.model, checkpoint, epochs=1, samples=settings.steps * settings.batch_size,
              batch_size=settings.batch_size, lr=settings.lr, wd=settings.wd, warmup=settings.warmup,
              workers=settings.workers, device=settings.device, threads=settings.threads, seed=seed, logs=logs,
              log_every=max(1, settings.steps // 5))
    trained = time.perf_counter() - started - materialised
    shutil.rmtree(os.path.join(logs, "run", "checkpoints"), ignore_errors=True)  # the weights are in model.safetensors
    if not keep_shards:
        shutil.rmtree(shards, ignore_errors=True)
    record.update(materialise_seconds=round(materialised, 1), train_seconds=round(trained, 1))
    with open(record_path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    return {"checkpoint": checkpoint, "materialise_seconds": record["materialise_seconds"],
            "train_seconds": record["train_seconds"], "reused": False}


def summarise(seeds: list[dict]) -> tuple[dict, dict]:
    """Mean and standard deviation (ddof 1; null for one seed) of each metric over the seeds."""
    mean, std = {}, {}
    for metric in METRICS:
        values = np.array([s["metrics"][metric] for s in seeds], np.float64)
        mean[metric] = float(values.mean())
        std[metric] = float(values.std(ddof=1)) if len(values) > 1 else None
    return mean, std


def evaluate(
    pool: str | list[str],
    arms: list[Arm],
    out: str,
    *,
    classes: str,
    pairs: str,
    size: int | None = None,
    seeds: list[int] | None = None,
    settings: Settings | None = None,
    templates=TEMPLATES,
    keep_shards: bool = False,
    publish: bool = True,
) -> dict:
    """The loop of the module docstring; writes `out/eval.json` and returns its content."""
    started = time.perf_counter()
    settings = settings or Settings()
    seeds = list(range(DEFAULTS["seeds"])) if seeds is None else list(seeds)
    if not arms:
        raise EvalError("give at least one curated arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise EvalError(f"arm names repeat: {names}")
    os.makedirs(out, exist_ok=True)
    heldout = HeldOut(read_labelled(classes), read_pairs(pairs), templates)
    index = index_pool(pool, out)
    pool_uids = trainable_uids(index)
    baseline = Arm(RANDOM_ARM, "random", pool if isinstance(pool, str) else ",".join(pool), pool_uids)
    selected = {arm.name: len(arm.uids) for arm in arms}
    usable = set(pool_uids)
    arms = [dataclasses.replace(arm, uids=[u for u in arm.uids if u in usable]) for arm in arms]
    for arm in arms:
        if not arm.uids:
            raise EvalError(f"arm {arm.name} ({arm.source}): none of its {selected[arm.name]} uids is a trainable "
                            "sample of the pool: was it curated from another pool?")
        if len(arm.uids) < selected[arm.name]:
            log.warning("eval: arm %s: %d of its %d uids are not trainable samples of the pool (absent, or without "
                        "a readable image and caption); it is evaluated on the other %d", arm.name,
                        selected[arm.name] - len(arm.uids), selected[arm.name], len(arm.uids))
    every = [*arms, baseline]
    selected[RANDOM_ARM] = len(pool_uids)
    size = size or min(len(a.uids) for a in arms)
    too_small = [f"{a.name} ({len(a.uids)})" for a in every if len(a.uids) < size]
    if too_small:
        raise EvalError(f"subset size {size} is larger than arm {', '.join(too_small)}")
    if size < settings.batch_size:
        raise EvalError(f"subset size {size} is smaller than one batch of {settings.batch_size}")
    log.info("eval: %d arm(s) + random, %d samples each, %d seed(s), %d steps of %d", len(arms), size, len(seeds),
             settings.steps, settings.batch_size)
    results = []
    for arm in every:
        runs = []
        for seed in seeds:
            folder = os.path.join(out, "arms", arm.name, f"seed-{seed}")
            uids = cut(arm.uids, size, seed)
            trained = train_arm(index, uids, seed, folder, settings, keep_shards)
            measured_at = time.perf_counter()
            metrics = heldout.measure(settings.model, trained["checkpoint"], settings.threads)
            entry = {"seed": seed, "metrics": metrics, "uids_sha256": uid_digest(uids),
                     "materialise_seconds": trained["materialise_seconds"], "train_seconds": trained["train_seconds"],
                     "eval_seconds": round(time.perf_counter() - measured_at, 1),
                     "reused_checkpoint": trained["reused"]}
            with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as handle:
                json.dump(entry, handle, indent=1)
            log.info("eval: %s seed %d: %s", arm.name, seed, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            runs.append(entry)
        mean, std = summarise(runs)
        results.append({"name": arm.name, "kind": arm.kind, "source": arm.source, "selected": selected[arm.name],
                        "trainable": len(arm.uids), "seeds": runs, "mean": mean, "std": std})
    result = build_result(pool, index, size, seeds, settings, heldout, results, time.perf_counter() - started)
    _write_json(os.path.join(out, "eval.json"), result)
    if publish:
        publish_to_runs(result, arms)
    return result


def build_result(pool, index, size, seeds, settings, heldout, arms, seconds) -> dict:
    """eval.json:

    - `pool`, `pool_samples`, `pool_trainable`: the pool and how many of its samples the random
      baseline draws from;
    - `subset_size`, `steps`, `batch_size`, `samples_seen` (steps x batch size), `seeds`;
    - `config`: every training setting; `heldout`: the held-out data and prompt templates;
    - `metrics`: the metric names (`zeroshot_top1`, `zeroshot_top5`, `i2t_r1`, `i2t_r5`, `t2i_r1`,
      `t2i_r5`, all fractions in [0, 1]);
    - `arms`: per arm `name`, `kind` (run | subset | random), `source`, `selected` (uids the arm
      selects), `trainable` (those among them that are trainable samples of the pool, what the
      cut draws from; for `random`, all of the pool's), `seeds` (per seed: `seed`, `metrics`, `uids_sha256`, timings),
      `mean` and `std` (ddof 1, null for one seed) per metric;
    - `seconds`: wall time of the whole evaluation.
    """
    from pipeline import __version__

    return {
        "curate_version": __version__,
        "pool": pool,
        "pool_samples": index.num_rows,
        "pool_trainable": int(sum(index.column("trainable").to_pylist())),
        "subset_size": size,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "samples_seen": settings.steps * settings.batch_size,
        "seeds": list(seeds),
        "config": dataclasses.asdict(settings),
        "heldout": heldout.describe(),
        "metrics": list(METRICS),
        "arms": arms,
        "seconds": round(seconds, 1),
    }


def _write_json(path: str, data: dict) -> None:
    from pipeline.io import fs

    fs.write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def publish_to_runs(result: dict, arms: list[Arm]) -> list[str]:
    """Copy eval.json into each run-directory arm (RUN/eval/eval.json) and re-render its report."""
    from pipeline.io import fs
    from pipeline.stages.report import build_report

    written = []
    for arm in arms:
        if arm.kind != "run":
            continue
        _write_json(fs.join(arm.source, "eval", "eval.json"), {**result, "run_arm": arm.name})
        report = fs.join(arm.source, "report.html")
        fs.write_bytes_atomic(report, build_report(arm.source).encode("utf-8"))
        written.append(report)
    return written


def format_table(result: dict) -> str:
    """The per-arm mean ± std of every metric, as a text table."""
    header = ["arm", "kind", *result["metrics"]]
    rows = []
    for arm in result["arms"]:
        cells = []
        for metric in result["metrics"]:
            mean, std = arm["mean"][metric], arm["std"][metric]
            cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
        rows.append([arm["name"], arm["kind"], *cells])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (f"{result['subset_size']:,} samples per arm, {result['steps']} steps of {result['batch_size']}, "
            f"seeds {', '.join(map(str, result['seeds']))}; mean ± std over seeds\n" + "\n".join(lines))


# --- command line --------------------------------------------------------------------------------------


def add_eval_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """`curate eval`: register the subcommand on the `curate` parser's subparsers (`parents`: the options
    every subcommand shares)."""
    parser = subparsers.add_parser(
        "eval",
        parents=list(parents),
        help="train the same small CLIP on curated subsets and on a random subset of equal size; compare",
        description="Train one open_clip model per arm and seed (open_clip's trainer, equal subset size and steps) "
                    "on each curated arm and on a uniformly random subset of the pool's trainable samples, then "
                    "measure zero-shot accuracy and retrieval recall on held-out data. Writes OUT/eval.json.",
    )
    parser.add_argument("--pool", required=True, nargs="+", metavar="SHARDS",
                        help="the pool the arms were curated from (directory, glob or brace pattern of .tar shards)")
    parser.add_argument("--arm", required=True, action="append", metavar="[NAME=]PATH",
                        help="a run directory or a DataComp subset file (.npy); repeat for more arms")
    parser.add_argument("--out", required=True, help="working and output directory (eval.json, checkpoints)")
    parser.add_argument("--heldout", default=None,
                        help="a folder written by `curate synth --eval-set` (its classes/ and pairs/); "
                             "default: none, give --classes and --pairs")
    parser.add_argument("--classes", default=None,
                        help="labelled images: an image folder (one folder per class) or shards with a class field "
                             "(default: HELDOUT/classes)")
    parser.add_argument("--pairs", default=None,
                        help="image-caption pairs: WebDataset shards (default: HELDOUT/pairs)")
    parser.add_argument("--templates", default=None,
                        help="a text file of zero-shot prompt templates, one per line with {} for the class name "
                             "(default: the built-in templates)")
    parser.add_argument("--size", type=int, default=None, help="samples per arm (default: the smallest arm's size)")
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="samples per training step (default: %(default)s)")
    parser.add_argument("--model", default=MODEL,
                        help="open_clip architecture, trained from scratch (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default: %(default)s)")
    parser.add_argument("--wd", type=float, default=DEFAULTS["wd"], help="weight decay (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="warmup steps (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULTS["workers"],
                        help="dataloader processes of the trainer (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--keep-shards", action="store_true",
                        help="keep each arm's materialised training shards (default: off, removed after training)")
    parser.add_argument("--no-report", action="store_true",
                        help="do not copy the results into the run directories and their reports (default: off)")
    parser.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args) -> int:
    from pipeline.train_dfn import TrainDFNError

    if args.heldout:
        classes = args.classes or os.path.join(args.heldout, "classes")
        pairs = args.pairs or os.path.join(args.heldout, "pairs")
    else:
        classes, pairs = args.classes, args.pairs
    if not classes or not pairs:
        print("curate: eval: give --heldout, or both --classes and --pairs", file=sys.stderr)
        return 2
    templates = TEMPLATES
    if args.templates:
        with open(args.templates, encoding="utf-8") as handle:
            templates = tuple(line.strip() for line in handle if "{}" in line)
    settings = Settings(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, wd=args.wd,
                        warmup=args.warmup, workers=args.workers, threads=args.threads, device=args.device)
    try:
        arms = [load_arm(spec) for spec in args.arm]
        result = evaluate(args.pool if len(args.pool) > 1 else args.pool[0], arms, args.out, classes=classes,
                          pairs=pairs, size=args.size, seeds=list(range(args.seeds)), settings=settings,
                          templates=templates, keep_shards=args.keep_shards, publish=not args.no_report)
    except (EvalError, TrainDFNError, FileNotFoundError, ValueError) as exc:
        print(f"curate: eval: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    print(f"wrote {os.path.join(args.out, 'eval.json')} in {result['seconds']:.0f} s")
    return 0
