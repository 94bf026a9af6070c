"""The job entry point under `ray job submit`, against a real local cluster started with `ray start`."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import WITHOUT_MODEL, free_port, ray_bin, ray_cluster_env, ray_start, stop_ray_processes

ROOT = Path(__file__).resolve().parents[1]
BIN = ray_bin()


@pytest.fixture
def ray_cluster():
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
    env = ray_cluster_env()
    try:
        ray_start(["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}"],
                  temp_dir, env)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still registering (it refuses, job not created)."""
    deadline = time.monotonic() + 120
    while True:
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", *args],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        if "No available agent to submit job" not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(3)


def test_ray_job_submit_runs_the_job_file_on_the_cluster(ray_cluster, synth_pool, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "submitted"
    # the job file without its model: what is tested here is the way onto the cluster, not the recipe
    job = submit(address, env, ["python", "pipeline/curate.py", "--config", "jobs/quickstart.yaml",
                                f"input={synth_pool}", f"output={out}", *WITHOUT_MODEL])
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "input samples 600 = kept" in log  # the driver's summary, printed on the cluster
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 600
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == manifest["counts"]["kept"] > 0


def test_entry_point_names_the_interpreter_that_lacks_the_dependencies():
    # `-S` leaves out site-packages: the state of a cluster `python` that is not Curate's environment
    job = subprocess.run([sys.executable, "-S", "pipeline/curate.py", "--config", "jobs/quickstart.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert job.returncode == 2  # the user's setup, not a failure of the run
    assert job.stderr.count("\n") == 1 and job.stderr.startswith(f"curate: {sys.executable} cannot import")
    assert "ray job submit -- /path/to/venv/bin/python pipeline/curate.py" in job.stderr
