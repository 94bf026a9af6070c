"""Progress inside a partition: stage cores report through a plain callback (no Ray needed), the
driver logs totals, rate and ETA while a partition runs; Ray's own chatter stays out of the log."""

import hashlib
import io
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline import ray_adapter, ray_progress
from pipeline.config import CurateConfig, load_config
from pipeline.runner import run_pipeline
from pipeline.stages.ingest import DigestingReader, LanguageIdentifier, ingest_shard
from pipeline.synth import synthesize
from tests.helpers import WITHOUT_MODEL, jpeg_bytes, make_tar

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("ray_local")
def test_a_single_partition_run_logs_progress_before_its_partition_is_done(tmp_path, caplog, monkeypatch):
    import pipeline.run

    monkeypatch.setattr(pipeline.run, "PROGRESS_EVERY_S", 0.2)  # the interval, not what a line says
    synthesize(str(tmp_path / "pool"), samples=300, seed=8, shard_size=300)
    config = load_config(str(ROOT / "jobs" / "quickstart.yaml"),
                         [f"input={tmp_path / 'pool'}", f"output={tmp_path / 'run'}", *WITHOUT_MODEL])
    with caplog.at_level(logging.INFO, logger="curate"):
        summary = run_pipeline(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "curate"]
    line = re.compile(r"^ingest: ([\d.,]+)/([\d.,]+) MB \((\d+)%\), ([\d,]+) samples, 0/1 partitions, ")
    during = [m for m in map(line.match, lines) if m and int(m.group(4).replace(",", "")) > 0]
    assert during, "\n".join(lines)  # samples counted while the only partition was still running
    assert all(int(m.group(4).replace(",", "")) <= summary.samples for m in during)
    assert float(during[0].group(2)) == pytest.approx((tmp_path / "pool" / "00000000.tar").stat().st_size / 1e6, abs=0.06)


def test_the_ingest_core_reports_through_a_plain_callback_without_ray(tmp_path):
    caption = b"a photo of a red circle on a white background"
    shard = make_tar([(f"{i:04d}.{ext}", data) for i in range(5) for ext, data in (("jpg", jpeg_bytes()), ("txt", caption))])
    counts: Counter = Counter()
    stream = DigestingReader(io.BytesIO(shard), lambda **c: counts.update(c))
    table, _ = ingest_shard(stream, shard="s.tar", partition=0, config=CurateConfig(input="x", output="y"),
                            langid=LanguageIdentifier(), progress=lambda **c: counts.update(c))
    assert stream.finish() == hashlib.sha256(shard).hexdigest()
    assert counts == {"samples": table.num_rows, "bytes": len(shard)} and table.num_rows == 5
    plain, _ = ingest_shard(io.BytesIO(shard), shard="s.tar", partition=0, config=CurateConfig(input="x", output="y"),
                            langid=LanguageIdentifier())
    assert plain.equals(table)


def test_a_progress_line_gives_done_total_rate_and_eta():
    progress = ray_progress.Progress("embed", 1890, every_s=10, partitions=4, partitions_done=2)
    assert progress.line({"counts": {}, "first": {}, "seconds": 0.0}) == \
        "embed: 0/1,890 samples (0%), 2/4 partitions, waiting for the first results"
    # the rate counts from the first report on: 712 samples in 23 s
    assert progress.line({"counts": {"samples": 812}, "first": {"samples": 100}, "seconds": 23.0}) == \
        "embed: 812/1,890 samples (43%), 2/4 partitions, 31 samples/s, ETA 35s"
    ingest = ray_progress.Progress("ingest", 120_000_000, every_s=10, measure="bytes")
    assert ingest.line({"counts": {"bytes": 45_000_000, "samples": 410}, "first": {"bytes": 5_000_000, "samples": 40},
                        "seconds": 10.0}) == "ingest: 45.0/120.0 MB (38%), 410 samples, 37 samples/s, ETA 19s"


@pytest.fixture
def curate_level():
    """Set the "curate" logger's level (DEBUG is what `curate -v` gives) for one test."""
    curate = logging.getLogger("curate")
    before = curate.level
    yield curate.setLevel
    curate.setLevel(before)


@pytest.mark.parametrize("logger, level", [
    ("ray._private.authentication.authentication_token_setup", logging.WARNING),
    ("ray.data._internal.progress", logging.WARNING),
])
def test_ray_notices_are_held_back_unless_asked_for(logger, level, monkeypatch, curate_level):
    record = logging.LogRecord(logger, level, __file__, 1, "a notice", None, None)
    monkeypatch.delenv(ray_adapter.RAY_LOGS_ENV, raising=False)
    curate_level(logging.INFO)
    assert not logging.getLogger(logger).filter(record)
    monkeypatch.setenv(ray_adapter.RAY_LOGS_ENV, "1")
    assert logging.getLogger(logger).filter(record)
    monkeypatch.delenv(ray_adapter.RAY_LOGS_ENV)
    curate_level(logging.DEBUG)  # curate -v
    assert logging.getLogger(logger).filter(record)
    error = logging.LogRecord(logger, logging.ERROR, __file__, 1, "a failure", None, None)
    curate_level(logging.INFO)
    assert logging.getLogger(logger).filter(error)


def test_ray_data_info_lines_stay_in_its_log_file_off_the_terminal(monkeypatch, curate_level):
    monkeypatch.delenv(ray_adapter.RAY_LOGS_ENV, raising=False)
    curate_level(logging.INFO)
    console = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    files = [h for h in logging.getLogger("ray.data").handlers if h.name == "file"]
    assert console and files
    name = "ray.data._internal.execution.streaming_executor"
    info = logging.LogRecord(name, logging.INFO, __file__, 1, "Dataset execution finished", None, None)
    warning = logging.LogRecord(name, logging.WARNING, __file__, 1, "a task failed", None, None)
    assert not any(h.filter(info) for h in console) and all(h.filter(warning) for h in console)
    assert all(h.filter(info) for h in files)
