"""Crash safety: a driver killed with SIGKILL mid-stage, or a Ray worker killed mid-task, loses nothing.

After the kill the same command is run again; the output must be byte-identical to an uninterrupted
run, every sample accounted for exactly once.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.runner import run_pipeline
from tests.helpers import (
    WITHOUT_MODEL, assert_same_output, curate_command, faults_pool, kill_driver_when, partly_done, quickstart_config,
    resume_lines, run_job, stage_record,
)

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 3  # many small output shards, so the write stage outlasts the manifest's 2 s save throttle
# The quickstart job without its model (the model stages: tests/test_faults_models.py).
# A SQL predicate keeps a select stage in the job without a model, so that it can be interrupted too.
OVERRIDES = [f"write.shard_size={SHARD_SIZE}", *WITHOUT_MODEL, "select.where=caption_words >= 4"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return faults_pool(tmp_path_factory, "faults", shard_size=150)


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory, ray_local):
    """The uninterrupted run, on this session's Ray (the output does not depend on the cluster)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    run_pipeline(quickstart_config(pool, out, OVERRIDES))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ingest", "dedup", "select", "write"])
def test_driver_killed_mid_stage_then_rerun_gives_identical_output(pool, reference, tmp_path, stage):
    out = tmp_path / "out"

    def interrupted():
        record = stage_record(out, stage)
        return bool(record) and not record["complete"] and partly_done(record)

    kill_driver_when(pool, out, OVERRIDES, interrupted, f"{stage} partly done")
    assert not stage_record(out, stage)["complete"]
    result = run_job(pool, out, OVERRIDES)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = resume_lines(result)
    assert any(f"{stage}: resuming" in line for line in steps), "\n".join(steps)
    assert_same_output(reference, out)


def _descendants(root: int) -> set[int]:
    """The processes below `root` (this test session's embedded Ray: its raylet and workers)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _kill_one_worker(class_name, stop):
    """Kill -9 the first Ray worker of this session whose title names `class_name`, once."""
    while not stop.is_set():
        for pid in sorted(_descendants(os.getpid())):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and class_name in title:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.02)


@pytest.mark.slow
def test_worker_killed_mid_task_is_retried_and_the_run_completes(pool, reference, tmp_path, ray_local):
    stop = threading.Event()
    killed = []
    killer = threading.Thread(target=lambda: killed.append(_kill_one_worker("IngestWorker", stop)), daemon=True)
    killer.start()
    out = tmp_path / "out"
    try:
        config = quickstart_config(pool, out, OVERRIDES)
        summary = run_pipeline(config)  # the reference's job, on this session's Ray
    finally:
        stop.set()
        killer.join(5)
    assert killed and killed[0], "no ingest worker was killed"
    assert summary.samples == 1200
    assert_same_output(reference, out)


def test_an_input_whose_read_never_returns_fails_the_run_naming_the_shard(tmp_path):
    """A FIFO named like a shard blocks whoever opens it until a writer comes: the ingest worker is
    killed after ray.item_timeout_s, once more in a fresh worker, then the run fails in one line."""
    fifo = tmp_path / "x.tar"
    os.mkfifo(fifo)
    try:
        result = subprocess.run(curate_command(fifo, tmp_path / "out", OVERRIDES) + ["ray.item_timeout_s=2", "ray.num_cpus=2"],
                                cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                                text=True, timeout=300)
    finally:
        _unblock(fifo)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"curate: IngestWorker on partition 0 ({fifo}) ran longer than 2 s (ray.item_timeout_s) "
                           "twice, the second time in a fresh worker"), result.stderr
    assert f"IngestWorker on partition 0 ({fifo}) ran longer than 2 s; retrying it once in a fresh worker" \
        in result.stderr


def _unblock(fifo: Path) -> None:
    """Let any reader still waiting on `fifo` through (it sees an empty file), then remove it."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # ENXIO: nobody is reading it
    fifo.unlink()
