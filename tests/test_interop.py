"""The tools users already run, for real: img2dataset's output goes in, open_clip's trainer reads what comes out.

img2dataset downloads a synthetic pool from a loopback HTTP server (some URLs answer 404, some
images do not decode) and the pipeline curates its shards as they are. open_clip's trainer then
trains a few steps on a run's `shards/*.tar` + `shards/sizes.json`, once on a plain run and once on
a run that adds the teacher embeddings to every sample.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runner import run_pipeline
from pipeline.synth import synthesize
from tests.helpers import read_metadata, run_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # console scripts installed beside this interpreter
MODEL = {"model": "curate-dfn-rn16-64", "pretrained": "curate-dfn-rn16-64.safetensors"}
GONE = 6  # URLs the server answers with 404
BATCH = 16

# Keep the peers offline: albumentations (imported by img2dataset) asks PyPI for a newer version
# at import unless told not to; open_clip must not reach for the Hugging Face hub.
OFFLINE = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _env() -> dict:
    return {**os.environ, **OFFLINE}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def http_server(directory: Path):
    """`python -m http.server` on a free loopback port, serving `directory`; yields its base URL."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server on port {port} did not start (exit {server.poll()})")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_tool(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


# --- img2dataset in ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """img2dataset's webdataset output for a url list of 40 served images and 6 missing ones.

    Returns (pool dir, the url list as rows, img2dataset's per-shard parquet concatenated).
    """
    root = tmp_path_factory.mktemp("img2dataset")
    # a few undecodable images (img2dataset: failed_to_resize) and small ones (it upscales them)
    synthesize(str(root / "source"), samples=40, seed=21, shard_size=40,
               defect_rates={"corrupt_image": 0.08, "small_image": 0.08})
    truth = pq.read_table(root / "source" / "truth" / "truth.parquet").to_pylist()
    site = root / "site"
    site.mkdir()
    with tarfile.open(root / "source" / "00000000.tar") as archive:
        for member in archive.getmembers():
            if member.name.endswith(".jpg"):
                (site / member.name).write_bytes(archive.extractfile(member).read())

    with http_server(site) as base:
        rows = [{"url": f"{base}/{t['key']}.jpg", "caption": t["caption"], "uid": t["uid"]} for t in truth]
        for i in range(GONE):
            rows.insert(7 * i + 4, {"url": f"{base}/gone/{i}.jpg", "caption": f"a photo of lost picture number {i}",
                                    "uid": f"{0xdead0000 + i:032x}"})
        pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
        run_tool([
            str(BIN / "img2dataset"), "--url_list", "urls.parquet", "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["uid"]',
            "--output_format", "webdataset", "--output_folder", "pool", "--number_sample_per_shard", "32",
            "--processes_count", "1", "--thread_count", "8", "--image_size", "256", "--resize_mode", "keep_ratio",
            "--enable_wandb", "False", "--disallowed_header_directives", "[]",
        ], cwd=root)
    pool = root / "pool"
    listing = pd.concat([pq.read_table(p).to_pandas().assign(shard=f"{p.stem}.tar") for p in sorted(pool.glob("*.parquet"))],
                        ignore_index=True)
    return pool, rows, listing


@pytest.fixture(scope="module")
def curated_download(downloaded, ray_local, tmp_path_factory):
    pool, _, _ = downloaded
    out = tmp_path_factory.mktemp("curated_download") / "out"
    summary = run_pipeline(run_config(pool, out, write={"shard_size": 16}))
    return out, summary


def test_img2dataset_writes_what_the_pool_layout_expects(downloaded):
    pool, rows, listing = downloaded
    assert len(sorted(pool.glob("*.tar"))) == math.ceil(len(rows) / 32)
    assert len(listing) == len(rows) and set(listing.uid) == {r["uid"] for r in rows}
    failed = listing[listing.status != "success"]
    gone = {f"{0xdead0000 + i:032x}" for i in range(GONE)}
    assert gone <= set(failed.uid)
    assert (failed.status == "failed_to_resize").any()  # the corrupt JPEGs
    for shard in pool.glob("*.tar"):  # a failed download has no members
        with tarfile.open(shard) as archive:
            keys = {name.split(".", 1)[0] for name in archive.getnames()}
        assert not keys & set(failed.key)


def test_img2dataset_output_is_curated_as_it_is(downloaded, curated_download):
    pool, rows, listing = downloaded
    out, summary = curated_download
    meta = read_metadata(out).to_pandas()

    # one row per url of the list, under the uid img2dataset carried through (--save_additional_columns)
    assert len(meta) == len(rows) == summary.samples
    assert sorted(meta.uid) == sorted(r["uid"] for r in rows)
    assert (meta.kept == meta.drop_reason.isna()).all()
    by_uid = meta.set_index("uid")

    failed = listing[listing.status != "success"]
    for row in failed.itertuples():
        sample = by_uid.loc[row.uid]
        assert sample.drop_reason == "download_failed", row
        assert (sample.shard, sample.key) == (row.shard, row.key)
        assert row.error_message in sample.drop_detail
    assert summary.dropped["download_failed"] == len(failed)

    succeeded = listing[listing.status == "success"]
    assert len(succeeded) > 0
    for row in succeeded.itertuples():
        sample = by_uid.loc[row.uid]
        assert (sample.shard, sample.key) == (row.shard, row.key)
        assert sample.kept or sample.drop_reason not in (None, "download_failed")

    # img2dataset upscaled the small images to 256 px; the basic filter judges their original size
    small = succeeded[succeeded[["original_width", "original_height"]].min(axis=1) < 200]
    assert len(small) > 0
    for row in small.itertuples():
        sample = by_uid.loc[row.uid]
        assert min(sample.width, sample.height) >= 200
        assert sample.drop_reason == "image_too_small"

    # kept samples are in the output shards, with the bytes img2dataset wrote
    downloaded_images = {}
    for shard in pool.glob("*.tar"):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    downloaded_images[member.name[:-4]] = archive.extractfile(member).read()
    written = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    written[member.name[:-4]] = archive.extractfile(member).read()
    kept = meta[meta.kept]
    assert len(kept) == summary.kept > 0
    assert sorted(written) == sorted(kept.uid)
    for sample in kept.itertuples():
        assert written[sample.uid] == downloaded_images[sample.key]
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(kept)


# --- open_clip training out -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curated_with_embeddings(ray_local, tmp_path_factory):
    """A small synthetic pool curated by the shipped model, with its embeddings written into the shards."""
    root = tmp_path_factory.mktemp("teacher")
    synthesize(str(root / "pool"), samples=32, seed=5, shard_size=16)
    out = root / "out"
    summary = run_pipeline(run_config(root / "pool", out, embed=MODEL, write={"shard_size": 16, "embeddings": True}))
    return out, summary


def shard_pattern(out: Path) -> str:
    """`OUTPUT/shards/{00000000..LAST}.tar`, the README's --train-data for a run's output."""
    shards = sorted((out / "shards").glob("*.tar"))
    assert sorted(json.loads((out / "shards" / "sizes.json").read_text())) == [p.name for p in shards]
    return str(out / "shards" / f"{{00000000..{len(shards) - 1:08d}}}.tar")


def test_teacher_embeddings_are_in_the_shards_and_equal_the_runs_embeddings(curated_with_embeddings):
    import webdataset as wds

    out, summary = curated_with_embeddings
    meta = read_metadata(out).to_pandas()
    kept = set(meta[meta.kept].uid)
    assert len(kept) == summary.kept > 0
    embeddings = pa.concat_tables([pq.read_table(p) for p in sorted((out / "embeddings").glob("part-*.parquet"))])
    dim = json.loads((ROOT / "pipeline" / "model_configs" / "curate-dfn-rn16-64.json").read_text())["embed_dim"]
    assert embeddings.schema.field("image_embedding").type.list_size == dim
    by_uid = {r["uid"]: r for r in embeddings.select(["uid", "image_embedding", "text_embedding"]).to_pylist()}

    # members as written, read with numpy
    seen = set()
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                uid, ext = member.name.split(".", 1)
                if ext not in ("image_embedding.npy", "text_embedding.npy"):
                    continue
                vector = np.load(io.BytesIO(archive.extractfile(member).read()), allow_pickle=False)
                assert vector.shape == (dim,) and np.issubdtype(vector.dtype, np.floating)
                assert abs(float(np.linalg.norm(vector.astype(np.float32))) - 1) < 1e-2
                expected = np.asarray(by_uid[uid][ext.removesuffix(".npy")], dtype=vector.dtype)
                np.testing.assert_array_equal(vector, expected)
                seen.add((uid, ext))
    assert seen == {(uid, ext) for uid in kept for ext in ("image_embedding.npy", "text_embedding.npy")}

    # webdataset, as open_clip's trainer and a distillation loader use it, still sees image + caption
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(kept)
    for sample in samples:
        assert sample["jpg"].size[0] > 0 and isinstance(sample["txt"], str) and sample["txt"]
        assert sample["image_embedding.npy"].shape == (dim,) and sample["text_embedding.npy"].shape == (dim,)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["curated_download", "curated_with_embeddings"])
def test_open_clip_trains_on_the_output_shards(run, request, tmp_path):
    import torch

    out, summary = request.getfixturevalue(run)
    assert summary.kept > 0
    # no --train-num-samples: the trainer takes the epoch size from shards/sizes.json
    run_tool([
        sys.executable, "-m", "open_clip_train.main", "--train-data", shard_pattern(out),
        "--dataset-type", "webdataset", "--model", "ViT-S-32-alt", "--force-image-size", "64",
        "--batch-size", str(BATCH), "--epochs", "1", "--workers", "1", "--device", "cpu", "--precision", "fp32",
        "--lr", "1e-4", "--warmup", "2", "--report-to", "", "--log-every-n-steps", "1",
        "--logs", str(tmp_path / "logs"), "--name", "smoke", "--seed", "0",
    ], cwd=tmp_path)
    experiment = tmp_path / "logs" / "smoke"
    log_text = (experiment / "out.log").read_text()
    steps = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+) ", log_text)
    assert len(steps) == math.ceil(summary.kept / BATCH) > 0, log_text[-2000:]
    assert int(steps[-1][0]) == int(steps[-1][1]) == len(steps) * BATCH
    losses = [float(v) for v in re.findall(r"Contrastive_loss: ([\d.]+)", log_text)]
    assert len(losses) == len(steps) and all(math.isfinite(v) for v in losses)

    checkpoint = experiment / "checkpoints" / "epoch_1.pt"
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        assert saved["epoch"] == 1 and saved["name"] == "smoke"
        weights = saved["state_dict"]
        assert len(weights) > 100
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    finally:
        checkpoint.unlink(missing_ok=True)  # ~0.5 GB with the optimizer state: do not leave it in tmp
