"""Small builders for hand-made test input (real tar files, real images)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

from PIL import Image


def jpeg_bytes(width: int = 256, height: int = 256, colour=(200, 40, 40), quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 16):  # some structure so pHash and decoding have work to do
        image.paste((x % 255, 255 - x % 255, 90), (x, 0, min(x + 8, width), height // 2))
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries a few bytes of (invalid) data:
    decoding it would fail, so a test can tell that it was never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 16) + chunk(b"IEND", b"")


def make_tar(members: list) -> bytes:
    """members: (name, bytes) for regular files, or a ready tarfile.TarInfo (links, devices)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def device(name: str, kind=tarfile.CHRTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info


# Overrides that turn jobs/quickstart.yaml into the same job without its model: every stage that
# reads or writes shards still runs, in half the time. For tests of how a job runs, not of the recipe.
WITHOUT_MODEL = ["embed.model=null", "dfn.model=null", "dedup.semantic=false", "select.dfn.threshold=null",
                 "select.dbp.enabled=false"]


def run_config(input_url, output_url, **sections):
    from pipeline.config import CurateConfig

    return CurateConfig.model_validate({"input": str(input_url), "output": str(output_url), **sections})


def read_metadata(run_dir):
    import pyarrow.parquet as pq
    from pathlib import Path

    parts = sorted(Path(run_dir, "metadata").glob("part-*.parquet"))
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in parts])


def shard_members(run_dir) -> list[str]:
    from pathlib import Path

    names = []
    for shard in sorted(Path(run_dir, "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            names.extend(archive.getnames())
    return names


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_loopback_server(command: list[str], port: int, what: str, timeout_s: float = 30.0):
    """Start a test server (a subprocess listening on 127.0.0.1:port) and wait until it accepts
    connections; returns the process (the caller kills it). Raises RuntimeError naming `what`."""
    import socket
    import subprocess
    import time

    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}")


# --- real Ray clusters started with `ray start` ---------------------------------------------------
#
# `ray stop` ends every Ray process on the machine (this test session's embedded Ray, other people's
# clusters): a test cluster is stopped by killing its own processes only. Each node is started with
# its own `--temp-dir` and an environment variable naming it (RAY_NODE_MARK), which every process
# the node starts inherits: its GCS, raylet, agents, workers, and the Ray client server and jobs,
# whose command lines do not name the temp dir and whose parent is init once `ray start` exits.
# Every port a node opens is a free one: with another Ray on the machine the default agent ports
# clash, and the node's job and runtime-env agents then never come up.

RAY_NODE_MARK = "CURATE_TEST_RAY_NODE"


def ray_bin():
    """This environment's bin directory (its `ray`, and the `python` a cluster's jobs run)."""
    import sys
    from pathlib import Path

    return Path(sys.executable).parent


def ray_cluster_env() -> dict:
    """The environment for `ray start` and for the drivers of a test cluster.

    This environment's bin first on PATH (the `python` of `ray job submit -- python ...`); token auth
    off on both sides (an embedded `ray.init` writes ~/.ray/auth_token, and a later `ray start` would
    turn token auth on); the repository first on PYTHONPATH, so that the workers the raylets start
    import this checkout's `pipeline`, not an installed one; no RAY_ADDRESS inherited."""
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{ray_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([root, *paths])}
    env.pop("RAY_ADDRESS", None)
    env.pop(RAY_NODE_MARK, None)
    return env


def ray_node_ports() -> list[str]:
    """`ray start` flags giving every per-node server of one node its own free port."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def ray_start(args: list[str], temp_dir: str, env: dict, timeout_s: float = 180) -> None:
    """`ray start ARGS` under its own temp dir, with its own free per-node ports (ray_node_ports),
    its processes marked with the temp dir (stop_ray_processes). A failed start is cleared and tried
    once more (a loaded machine can miss Ray's start-up deadlines; a free port can be taken since);
    a second failure raises AssertionError with Ray's output."""
    import subprocess

    failures = []
    for _ in range(2):
        command = [str(ray_bin() / "ray"), "start", *args, *ray_node_ports(), f"--temp-dir={temp_dir}",
                   "--disable-usage-stats"]
        try:
            start = subprocess.run(command, env={**env, RAY_NODE_MARK: temp_dir}, capture_output=True, text=True,
                                   timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            failures.append(f"timed out after {timeout_s}s: {exc.stdout or ''}{exc.stderr or ''}")
        else:
            if start.returncode == 0:
                return
            failures.append(f"exit {start.returncode}: {start.stdout}{start.stderr}")
        stop_ray_processes(temp_dir)
    raise AssertionError(f"ray start {' '.join(args)} failed twice:\n" + "\n---\n".join(failures))


def stop_ray_processes(temp_dir: str, timeout_s: float = 60) -> None:
    """Kill the processes of the Ray node started under `temp_dir` (ray_start) only, and wait until they are gone."""
    import os
    import signal
    import time

    def send(pids, sig):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = ray_processes(temp_dir)
        if not pids:
            return
        # stopped first, so that none of them starts another process between the look and the kill
        send(pids, signal.SIGSTOP)
        send(ray_processes(temp_dir), signal.SIGKILL)
        time.sleep(0.5)
    raise RuntimeError(f"processes of the Ray node under {temp_dir} outlived SIGKILL: {ray_processes(temp_dir)}")


def ray_processes(temp_dir: str) -> list[int]:
    """The live processes of the Ray node started under `temp_dir`: those whose environment carries
    its mark or whose command line names the temp dir, and their descendants."""
    import os
    from pathlib import Path

    mark = f"{RAY_NODE_MARK}={temp_dir}".encode()
    parents, matched = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X"):  # dead already, waiting for its parent to reap it
                continue
            parents[int(proc.name)] = int(parent)
            if temp_dir.encode() in (proc / "cmdline").read_bytes() or mark in (proc / "environ").read_bytes().split(b"\0"):
                matched.add(int(proc.name))
        except (OSError, ValueError):
            continue
    found, frontier = set(matched), set(matched)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)


# --- a driver killed with SIGKILL mid-stage (tests/test_faults*.py) -------------------------------
#
# The driver is `pipeline/curate.py` on an embedded Ray, in a session of its own, so that one
# SIGKILL of its process group ends the driver and the Ray it started, as a lost machine would.


def curate_command(input_url, output_url, overrides: list[str]) -> list[str]:
    """The command line of a job on an embedded Ray (the one a rerun repeats)."""
    import sys

    return [sys.executable, "pipeline/curate.py", "--config", "jobs/quickstart.yaml",
            f"input={input_url}", f"output={output_url}", *overrides, "ray.address=local"]


def run_job(input_url, output_url, overrides: list[str], timeout_s: float = 600):
    """Run the job to its end; returns the CompletedProcess (its stderr holds the log)."""
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(curate_command(input_url, output_url, overrides), cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=timeout_s)


def stage_record(output_dir, stage: str) -> dict | None:
    """A stage's record in the run's manifest.json as it is on disk now (None: not there yet)."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(output_dir, "manifest.json").read_text())["stages"].get(stage)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def kill_driver_when(input_url, output_url, overrides: list[str], ready, what: str, timeout_s: float = 300) -> None:
    """Start the job, SIGKILL its driver (and the embedded Ray it started) as soon as `ready()` is
    true; fails when the run ends first or `ready` is not reached in `timeout_s`."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    import pytest

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(curate_command(input_url, output_url, overrides), cwd=Path(__file__).resolve().parents[1],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if ready():
                break
            assert driver.poll() is None, f"the run finished before it could be interrupted ({what})"
            time.sleep(0.01)
        else:
            pytest.fail(f"{what}: not reached in {timeout_s}s")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        # the embedded Ray the driver started is orphaned by SIGKILL: clear its process group
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def partly_done(record: dict) -> bool:
    """Some of a stage's work is recorded in its manifest record: partitions done, or in a stage of
    global steps (dedup, select) a step decided or some of its partitions applied."""
    steps = record["counts"].get("steps", {})
    return bool(record["partitions_done"]) or any("params" in step for step in steps.values())


def resume_lines(result) -> list[str]:
    """The pipeline's own log lines of a finished job (what each stage did)."""
    return [line for line in result.stderr.splitlines() if " curate " in line]


def assert_same_output(reference, out) -> None:
    """Byte-identical output: metadata, shards, and the embeddings/ and clusters/ artifacts and the
    DataComp subset file where the reference run wrote them; the same counts in the manifest."""
    import filecmp
    import json
    from pathlib import Path

    reference, out = Path(reference), Path(out)
    for folder in ("metadata", "shards", "embeddings", "clusters"):
        if not (reference / folder).exists():
            continue
        names = sorted(p.name for p in (reference / folder).iterdir())
        assert names == sorted(p.name for p in (out / folder).iterdir()), folder
        _, mismatch, errors = filecmp.cmpfiles(reference / folder, out / folder, names, shallow=False)
        assert not mismatch and not errors, (folder, mismatch, errors)
    if (reference / "datacomp_subset.npy").exists():
        assert filecmp.cmp(reference / "datacomp_subset.npy", out / "datacomp_subset.npy", shallow=False)
    assert not list(out.rglob("*.tmp-*")), "a temporary file was left behind"
    expected, got = (json.loads((run / "manifest.json").read_text()) for run in (reference, out))
    assert got["counts"] == expected["counts"]
    for name, record in expected["stages"].items():
        if name == "report":  # its page shows each stage's time: its size varies
            continue
        want, have = _recorded_counts(record, reference), _recorded_counts(got["stages"][name], out)
        assert have == want, f"stage {name}'s record differs: {_differing(want, have)}"


# What a stage's record holds that is not a count of its work: how long it took.
_TIMINGS = {"decided_s"}


def _recorded_counts(record: dict, run_dir) -> dict:
    """A stage's counts and sample totals, without timings, with the run's own path as `RUN`, and
    lists of partitions (recorded as they finish, in any order) sorted."""
    import json

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _TIMINGS}
        if isinstance(value, list):
            if all(isinstance(v, int) for v in value):
                return sorted(value)
            return [strip(v) for v in value]
        return value.replace(str(run_dir), "RUN") if isinstance(value, str) else value

    counts = {"samples_in": record["samples_in"], "samples_out": record["samples_out"], "counts": record["counts"]}
    return json.loads(json.dumps(strip(counts)))


def _differing(want, have, key: str = "") -> list[str]:
    """The dotted keys whose values differ, each with both values (the expected one first)."""
    if isinstance(want, dict) and isinstance(have, dict):
        return [d for k in sorted(set(want) | set(have)) for d in _differing(want.get(k), have.get(k), f"{key}.{k}")]
    return [] if want == have else [f"{key.lstrip('.')}: {want!r:.80} != {have!r:.80}"]


def faults_pool(tmp_path_factory, name: str, shard_size: int):
    """The 1,200-sample pool the kill -9 tests interrupt runs over (seed 11)."""
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp(name) / "pool"
    synthesize(str(out), samples=1200, seed=11, shard_size=shard_size)
    return out


def quickstart_config(input_url, output_url, overrides: list[str]):
    """The quickstart job with `overrides`, as curate_command runs it."""
    from pathlib import Path

    from pipeline.config import load_config

    job = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"
    return load_config(str(job), [f"input={input_url}", f"output={output_url}", *overrides])
