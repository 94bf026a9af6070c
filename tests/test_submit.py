"""The job entry point under `ray job submit`, against a real local cluster started with `ray start`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import WITHOUT_MODEL

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster():
    port, dashboard = free_port(), free_port()
    # the agents' default ports are taken when another Ray runs on the machine (this session's own):
    # the head's job agent then never comes up and every submit is refused
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
    # the job's `python` is the first on the head's PATH: this environment's, as on a cluster image
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats", *agent_ports],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: str) -> None:
    """Kill the processes of the cluster under `temp_dir` only (`ray stop` would also kill the test
    session's own embedded Ray, and the session with it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


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
