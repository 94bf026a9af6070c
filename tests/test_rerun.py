"""Reruns decide by content: an unchanged pool skips every stage, whatever its files' times say;
one changed byte re-runs what it affects, and the log says why each stage runs again."""

import hashlib
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.run import file_identity, recorded_identity, unchanged_without_reading
from pipeline.runner import run_pipeline
from pipeline.synth import synthesize
from tests.helpers import WITHOUT_MODEL, read_metadata

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "dedup", "metadata", "write", "report"]  # no select: its rules need the model


def _run(pool, out, caplog, *overrides):
    """Run the quickstart job without its model; returns (summary, the curate log lines)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="curate"):
        summary = run_pipeline(load_config(str(ROOT / "jobs" / "quickstart.yaml"),
                                           [f"input={pool}", f"output={out}", *WITHOUT_MODEL, *overrides]))
    return summary, [r.getMessage() for r in caplog.records if r.name == "curate"]


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _assert_all_skipped(summary, out, lines):
    assert list(summary.stages) == STAGES
    assert all(s["skipped"] for s in summary.stages.values())
    assert all(_manifest(out)["stages"][name]["skipped"] for name in STAGES)
    for name in STAGES:
        assert f"{name}: complete in an earlier run, skipped" in lines


def _settle(path: Path) -> None:
    """Wait out the window in which a just-written file's stamp is not trusted (pipeline.run)."""
    time.sleep(file_identity(str(path))["racy_s"])


@pytest.fixture
def pool(tmp_path):
    synthesize(str(tmp_path / "pool"), samples=200, seed=3, shard_size=100)
    _settle(tmp_path / "pool" / "00000000.tar")
    return tmp_path / "pool"


@pytest.mark.usefixtures("ray_local")
def test_an_unchanged_pool_skips_every_stage_even_with_new_time_stamps(pool, tmp_path, caplog):
    out = tmp_path / "run"
    _, lines = _run(pool, out, caplog)
    assert [f"{name}: first run" for name in STAGES] == [line for line in lines if line.endswith(": first run")]
    seen = _manifest(out)["stages"]["ingest"]["counts"]["partitions"]["0"]["input"]
    tar, listing = (pool / "00000000.tar").read_bytes(), (pool / "00000000.parquet").read_bytes()
    assert seen["tar"]["sha256"] == hashlib.sha256(tar).hexdigest() and seen["tar"]["size"] == len(tar)
    assert seen["listing"]["sha256"] == hashlib.sha256(listing).hexdigest()

    summary, lines = _run(pool, out, caplog)
    _assert_all_skipped(summary, out, lines)
    assert not any("hashing" in line for line in lines)

    # New times, same bytes (`touch`, a copy without -p): the shard is hashed again, found the same.
    shard = pool / "00000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 5_000_000_000))
    _settle(shard)
    summary, lines = _run(pool, out, caplog)
    _assert_all_skipped(summary, out, lines)
    assert any(line.startswith("input: 1 file(s) have a new time stamp") for line in lines)
    recorded = _manifest(out)["stages"]["ingest"]["counts"]["partitions"]["1"]["input"]["tar"]
    assert recorded["stamp"] == file_identity(str(shard))["stamp"]  # remembered: no hashing next time

    summary, lines = _run(pool, out, caplog)
    _assert_all_skipped(summary, out, lines)
    assert not any("hashing" in line for line in lines)

    summary, lines = _run(pool, out, caplog, "write.shard_size=50")
    assert "write: re-running: config changed (write.shard_size)" in lines
    assert "report: re-running: upstream write re-ran" in lines
    assert {name for name, s in summary.stages.items() if s["skipped"]} == {"ingest", "dedup", "metadata"}

    (pool / "00000002.tar").write_bytes((pool / "00000001.tar").read_bytes())  # one more shard
    summary, lines = _run(pool, out, caplog, "write.shard_size=50")
    assert "ingest: re-running: input changed (1 shard added: 00000002.tar)" in lines
    assert summary.samples == 300 and not any(s["skipped"] for s in summary.stages.values())


def _change_one_caption_byte(shard: Path) -> str:
    """Replace one letter of the first caption in place (same size, then the old modification
    time put back, so that only the content tells); returns the new caption."""
    with tarfile.open(shard) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".txt"))
        caption = archive.extractfile(member).read()
    position = member.offset_data + caption.index(b"a")
    stat = shard.stat()
    with open(shard, "r+b") as handle:
        handle.seek(position)
        handle.write(b"o")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns
    return caption.replace(b"a", b"o", 1).decode()


@pytest.mark.usefixtures("ray_local")
def test_one_changed_byte_re_runs_its_shard_and_the_stages_after_with_the_reason(pool, tmp_path, caplog):
    out = tmp_path / "run"
    first, _ = _run(pool, out, caplog)
    kept_partition = (out / "stages" / "ingest" / "part-000000.parquet").stat().st_mtime_ns
    caption = _change_one_caption_byte(pool / "00000001.tar")

    summary, lines = _run(pool, out, caplog)
    assert "ingest: re-running: input changed (1 shard: 00000001.tar); 1 unchanged partition kept" in lines
    assert "dedup: re-running: upstream ingest re-ran" in lines
    assert "write: re-running: upstream metadata re-ran" in lines
    assert not any(s["skipped"] for s in summary.stages.values())
    assert (out / "stages" / "ingest" / "part-000000.parquet").stat().st_mtime_ns == kept_partition
    assert caption in set(read_metadata(out).column("caption").to_pylist())
    assert summary.samples == first.samples == 200


def test_a_stamp_is_trusted_only_once_the_file_had_settled_when_it_was_read(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"x" * 100)
    identity = file_identity(str(path))
    racy = recorded_identity(identity, "digest", read_started=identity["settled_at"] + identity["racy_s"] / 2)
    settled = recorded_identity(identity, "digest", read_started=identity["settled_at"] + identity["racy_s"] * 2)
    assert racy["stamp"] is None and settled["stamp"] == identity["stamp"]
    assert unchanged_without_reading(racy, str(path)) is None  # hash it again to know
    assert unchanged_without_reading(settled, str(path)) is True
    path.write_bytes(b"y" * 101)
    assert unchanged_without_reading(settled, str(path)) is False  # another size: changed, no hashing
    assert unchanged_without_reading(None, str(path)) is False  # a listing that appeared
    path.unlink()
    assert unchanged_without_reading(None, str(path)) is True  # still absent


def test_synth_twice_leaves_every_file_and_its_time_alone(tmp_path):
    out = tmp_path / "pool"
    synthesize(str(out), samples=120, seed=4, shard_size=50)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    for p in before:  # make a rewrite visible even on a filesystem with coarse times
        os.utime(p, ns=(0, before[p][1] - 10_000_000_000))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before}
    synthesize(str(out), samples=120, seed=4, shard_size=50)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
    synthesize(str(out), samples=120, seed=5, shard_size=50)  # another pool does rewrite
    assert all(p.stat().st_mtime_ns != before[p][1] for p in out.glob("*.tar"))
