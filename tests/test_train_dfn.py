"""`curate train-dfn` and the shipped DFN model.

Training runs open_clip's own trainer in a child process for a few steps on a tiny synthetic pool;
the checkpoint must then load through the embed stage's path (models.resolve_spec -> EmbedWorker,
fed by ingest_shard / chunk_items / prepare_chunk) and give finite, L2-normalised embeddings.

The shipped model (pipeline/assets/curate-dfn-rn16-64.safetensors, trained on a clean pool of seed
1000) is measured on a held-out pool of another seed (800 samples, seed 1, mismatched captions at
20 %, the other defects at their default rates), scored by the embed stage itself. The bounds, and
what was measured (the shipped model and a second training by the same command; seed 1, and in
brackets the range over seeds 1..5, see pipeline/assets/README.md):

- ROC AUC of dfn_score, clean samples against mismatched captions >= 0.97: measured 0.9995
  [0.9991 .. 1.0]; the same architecture with random weights gives 0.59. The issue asks for 0.95.
- Leave-one-out 1-nearest-neighbour concept accuracy of the clean samples' image embeddings
  >= 0.65: measured 0.79 / 0.80 [0.70 .. 0.81]. A random neighbour gives 0.05 [0.05 .. 0.07], the
  most frequent concept's share is 0.17 [0.17 .. 0.21], an embedding that knew colour and
  background but nothing of shape 0.52 [0.45 .. 0.57], and random weights 0.59 (a random conv net
  already groups by colour): the bound sits above all of these and 0.14 below the measurement.
- Mean cosine of same-concept pairs minus different-concept pairs >= 0.6: measured 0.96 / 0.94
  [0.89 .. 0.96]; random weights 0.0003 (every image embeds alike).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import models
from pipeline.synth import DEFECTS, synthesize
from pipeline.train_dfn import (
    TrainDFNError,
    concept_structure,
    count_samples,
    embed_pool,
    evaluate_model,
    roc_auc,
    save_weights,
    shard_sizes,
    train_dfn,
    trainer_url,
)
from tests.helpers import jpeg_bytes, make_tar

MODEL = "curate-dfn-rn16-64"
ASSET = Path(models.__file__).parent / "assets" / f"{MODEL}.safetensors"
CLEAN = {name: 0.0 for name in DEFECTS}
QUICK = {"epochs": 1, "batch_size": 8, "workers": 1, "device": "cpu", "threads": 2, "warmup": 1, "timeout": 240}

AUC_MIN = 0.97
NN_ACCURACY_MIN = 0.65
COSINE_MARGIN_MIN = 0.6


def state_dict(path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path)).items()}
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {k.removeprefix("module."): v.float() for k, v in checkpoint["state_dict"].items()}


def random_init() -> dict[str, torch.Tensor]:
    """The weights a run of the trainer starts from with seed 0 (and models' random weights)."""
    spec = models.resolve_spec(MODEL, None)
    return {k: v.float() for k, v in models.load_model(spec).model.state_dict().items()}


def max_change(a: dict, b: dict) -> float:
    """Largest change of a parameter (batch-norm statistics follow the data, not the optimiser)."""
    return max(float((a[k] - b[k]).abs().max()) for k in a if "running_" not in k and "num_batches" not in k)


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("dfn_tiny_pool")
    synthesize(str(out), samples=48, seed=3, shard_size=24, defect_rates=CLEAN, workers=1)
    return out


# --- shards and counts ----------------------------------------------------------------------------------


def test_samples_are_counted_the_way_open_clip_groups_tar_members(tmp_path):
    image = jpeg_bytes(32, 32)
    members = [
        ("a.jpg", image), ("a.txt", b"a red circle"), ("a.json", b"{}"),  # a sample
        ("b.jpg", image), ("b.json", b"{}"),  # no caption: open_clip skips it
        ("c.png", image), ("c.txt", b"x"),  # a sample
        ("d.txt", b"caption only"),  # no image
        ("sub/e.webp", image), ("sub/e.TXT", b"upper-case extension"),  # a sample
    ]
    (tmp_path / "00000000.tar").write_bytes(make_tar(members))
    (tmp_path / "00000001.tar").write_bytes(make_tar(members[:3]))
    assert count_samples(str(tmp_path / "00000000.tar")) == 3
    shards = [str(tmp_path / "00000000.tar"), str(tmp_path / "00000001.tar")]
    assert shard_sizes(shards) == {shards[0]: 3, shards[1]: 1}
    (tmp_path / "sizes.json").write_text(json.dumps({"00000000.tar": 7}))  # names one shard: the other is counted
    assert shard_sizes(shards) == {shards[0]: 7, shards[1]: 1}


def test_urls_webdataset_cannot_open_are_streamed_through_fsspec():
    assert trainer_url("/data/pool/00000000.tar") == "/data/pool/00000000.tar"
    assert trainer_url("file:///data/00000000.tar") == "/data/00000000.tar"
    assert trainer_url("https://host/00000000.tar") == "https://host/00000000.tar"
    piped = trainer_url("s3://bucket/pool/00000000.tar")
    assert piped.startswith("pipe:") and piped.endswith("-m pipeline.train_dfn --cat s3://bucket/pool/00000000.tar")


def test_measures():
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.5], [0.5]) == 0.5
    assert roc_auc([0.1, 0.9], [0.5, 0.5]) == 0.5
    x = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]], np.float32)
    measured = concept_structure(x, np.array(["a", "a", "b", "b"]))
    assert measured["nn_accuracy"] == 1.0 and measured["nn_chance"] == pytest.approx(1 / 3)
    assert measured["cosine_margin"] > 0.8


# --- training through open_clip's trainer ----------------------------------------------------------------


def test_a_few_training_steps_give_a_checkpoint_the_embed_stage_loads(tiny_pool, tmp_path):
    checkpoint = train_dfn(str(tiny_pool), MODEL, str(tmp_path / "tiny.pt"), samples=16, **QUICK)  # 2 steps
    weights = tmp_path / "tiny.safetensors"
    save_weights(checkpoint, str(weights))
    trained = state_dict(checkpoint)
    assert max_change(trained, random_init()) > 1e-4  # the trainer's steps changed the model it started from
    assert max_change(trained, state_dict(weights)) < 2e-3  # float16 copy of the same weights

    by_checkpoint = embed_pool(str(tiny_pool), MODEL, checkpoint, threads=2)
    by_weights = embed_pool(str(tiny_pool), MODEL, str(weights), threads=2)
    assert len(by_checkpoint) == 48 and by_checkpoint["drop_reason"].isna().all()
    image = np.stack(by_checkpoint["image_embedding"].to_list())
    assert image.shape == (48, 128) and np.isfinite(image).all()
    assert np.allclose(np.linalg.norm(image, axis=1), 1.0, atol=2e-3)
    scores = by_checkpoint["dfn_score"].to_numpy(np.float64)
    assert np.isfinite(scores).all() and (np.abs(scores) <= 1.0 + 1e-5).all()
    assert np.array_equal(scores, by_checkpoint["clip_score"].to_numpy(np.float64))  # one model in both roles
    assert np.abs(scores - by_weights["dfn_score"].to_numpy(np.float64)).max() < 1e-2


def test_fine_tuning_starts_from_the_given_checkpoint(tiny_pool, tmp_path):
    out = train_dfn(str(tiny_pool), MODEL, str(tmp_path / "tuned.safetensors"), pretrained=ASSET.name, samples=8,
                    lr=1e-6, **QUICK)  # 1 step
    tuned, shipped = state_dict(out), state_dict(ASSET)
    assert tuned.keys() == shipped.keys()
    assert max_change(tuned, shipped) < 1e-3
    assert max_change(tuned, random_init()) > 0.1


def test_trainer_errors_surface_with_its_log_tail(tiny_pool, tmp_path):
    logs = tmp_path / "logs"  # kept after a failure, for the full log
    with pytest.raises(TrainDFNError, match=r"(?s)exited with status 1.*Model config for 'no-such-model' not found"):
        train_dfn(str(tiny_pool), "no-such-model", str(tmp_path / "x.pt"), logs=str(logs), **QUICK)
    assert not (tmp_path / "x.pt").exists()
    assert "Traceback" in (logs / "train.log").read_text()
    with pytest.raises(TrainDFNError, match="fewer than one batch"):
        train_dfn(str(tiny_pool), MODEL, str(tmp_path / "x.pt"), **{**QUICK, "batch_size": 64})
    with pytest.raises(FileNotFoundError):
        train_dfn(str(tmp_path / "nowhere"), MODEL, str(tmp_path / "x.pt"), **QUICK)


def test_the_curate_command_has_train_dfn():
    from pipeline.cli import build_parser
    from pipeline.train_dfn import cmd_train_dfn

    args = build_parser().parse_args(["train-dfn", "--train", "pool/{00000000..00000009}.tar", "--model", MODEL,
                                      "--out", "m.safetensors", "--pretrained", "a.pt", "--epochs", "2"])
    assert args.func is cmd_train_dfn and args.train == ["pool/{00000000..00000009}.tar"]
    assert (args.model, args.out, args.pretrained, args.epochs, args.lr) == (MODEL, "m.safetensors", "a.pt", 2, None)


def test_the_command_trains_from_shards_on_s3(tiny_pool, tmp_path, monkeypatch, capsys):
    """`curate train-dfn --train s3://...`: counted through fsspec, streamed to the trainer by `pipe:`."""
    import socket
    import subprocess
    import sys
    import time

    from pipeline.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(name, value)
        deadline = time.time() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.time() < deadline, "moto server did not start"
            time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("dfn-pool")
        for shard in sorted(tiny_pool.glob("*.tar")):
            fs.put_file(str(shard), f"dfn-pool/train/{shard.name}")
        out = tmp_path / "from_s3.safetensors"
        code = main(["train-dfn", "--train", "s3://dfn-pool/train", "--model", MODEL, "--out", str(out),
                     "--epochs", "1", "--batch-size", "8", "--samples", "16", "--warmup", "1", "--device", "cpu",
                     "--threads", "2"])
        assert code == 0, capsys.readouterr().err
        assert f"wrote {out}" in capsys.readouterr().out
        assert max_change(state_dict(out), random_init()) > 1e-4
    finally:
        server.kill()
        server.wait()


# --- the shipped model ------------------------------------------------------------------------------------


def test_the_shipped_model_is_small_registered_and_found_by_its_bare_name(tmp_path, monkeypatch):
    assert MODEL in models.PROJECT_MODELS
    assert ASSET.stat().st_size < 20e6
    assert models.embed_dim(models.resolve_spec(MODEL, str(ASSET))) == 128
    assert f"--model {MODEL}" in (ASSET.parent / "README.md").read_text()  # how to reproduce it
    monkeypatch.chdir(tmp_path)
    assert models.resolve_spec(MODEL, ASSET.name).pretrained == str(ASSET)
    (tmp_path / ASSET.name).write_bytes(b"")  # a file of that name in the working directory wins
    assert models.resolve_spec(MODEL, ASSET.name).pretrained == str(tmp_path / ASSET.name)
    assert models.resolve_spec(MODEL, "elsewhere/" + ASSET.name).pretrained == str(tmp_path / "elsewhere" / ASSET.name)


def test_the_shipped_model_separates_mismatched_captions_and_groups_concepts(tmp_path):
    pool = tmp_path / "held_out"
    # seed 1 (the model saw seed 1000); mismatched captions at 20 %, the other defects at their defaults
    synthesize(str(pool), samples=800, seed=1, shard_size=400, defect_rates={"mismatched_caption": 0.2})
    measured = evaluate_model(str(pool), MODEL, str(ASSET), threads=2)
    assert measured["mismatched"] >= 100 and measured["clean"] >= 300
    assert measured["auc_mismatched"] >= AUC_MIN, measured
    concept = measured["concept"]
    assert concept["nn_accuracy"] >= NN_ACCURACY_MIN, concept
    assert concept["cosine_margin"] >= COSINE_MARGIN_MIN, concept
