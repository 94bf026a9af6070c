"""The same job on a real two-node Ray cluster (two `ray start` nodes on this machine) and on one
embedded Ray: byte-identical output, and the work really spread over both nodes.

Each node has one CPU, so the two ingest actors (one CPU each, both created before the first call,
and each given a partition before any second one is handed out) cannot share a node and must both
work. The cluster is started and stopped here, not by `ray stop` (that would end every Ray on the
machine): only the processes of its two nodes are killed (tests.helpers.stop_ray_processes).
"""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import WITHOUT_MODEL, free_port, ray_bin, ray_cluster_env, ray_processes, ray_start, stop_ray_processes

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ray_bin() / "python")
# Small output shards: several shards and write tasks; a predicate, so that select runs too.
OVERRIDES = [*WITHOUT_MODEL, "write.shard_size=40", "select.where=caption_words >= 4"]
# On the cluster, dedup's and select's records go through Ray Data shuffles of many buckets, spread
# over both nodes; the embedded run decides each step in one task. The bytes must not differ.
SHUFFLED = "ray.rows_per_bucket=50"
SECOND = "second_node"  # the custom resource that tells the joined node from the head


@dataclass
class Cluster:
    address: str  # the head's GCS, what `ray.address` names
    dashboard: str  # the head's dashboard, where Ray's state API answers
    env: dict
    temp_dirs: tuple[str, str]


# Runs in a subprocess with the cluster's environment (token auth off, as the cluster has it; this
# test session may hold an embedded Ray of its own, with its own auth). argv: dashboard URL, then
# "nodes" (wait for two alive nodes) or "work" (the nodes, jobs, actors and tasks, as JSON).
STATE_QUERY = r"""
import json, sys, time
from ray.util import state

url, what = sys.argv[1], sys.argv[2]
def rows(listed):
    return [row if isinstance(row, dict) else row.__dict__ for row in listed]
deadline = time.monotonic() + 60
while True:
    try:
        nodes = [n for n in rows(state.list_nodes(address=url, detail=True)) if n["state"] == "ALIVE"]
    except Exception:  # the dashboard still starting
        if what != "nodes" or time.monotonic() > deadline:
            raise
        nodes = []
    if len(nodes) >= 2 or what != "nodes" or time.monotonic() > deadline:
        break
    time.sleep(0.5)
found = {"nodes": [{"node_id": n["node_id"], "resources": n["resources_total"]} for n in nodes]}
if what == "work":
    keep = lambda row, keys: {key: row.get(key) for key in keys}
    found["jobs"] = [keep(j, ("job_id", "type", "entrypoint", "status"))
                     for j in rows(state.list_jobs(address=url, limit=1000, raise_on_missing_output=False))]
    found["actors"] = [keep(a, ("actor_id", "class_name", "node_id", "job_id", "state"))
                       for a in rows(state.list_actors(address=url, limit=10000, detail=True,
                                                       raise_on_missing_output=False))]
    found["tasks"] = [keep(t, ("task_id", "name", "type", "node_id", "job_id", "state"))
                      for t in rows(state.list_tasks(address=url, limit=10000, detail=True,
                                                     raise_on_missing_output=False))]
print(json.dumps(found))
"""


def state_query(cluster: Cluster, what: str) -> dict:
    done = subprocess.run([PYTHON, "-c", STATE_QUERY, cluster.dashboard, what], env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_nodes():
    """A head and a second node joined to it, one CPU each; both stopped (only their processes) after the test."""
    env = ray_cluster_env()
    # Task events (where each task ran) reach the GCS every 100 ms instead of every second, so that a
    # worker killed right after its last call (the pools' actors are) has reported where it ran.
    env["RAY_task_events_report_interval_ms"] = "100"
    temp_dirs = (tempfile.mkdtemp(prefix="rayh-", dir="/tmp"), tempfile.mkdtemp(prefix="rayw-", dir="/tmp"))
    port, dashboard = free_port(), free_port()
    try:
        ray_start(["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--ray-client-server-port={free_port()}"], temp_dirs[0], env)
        ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=1", "--num-gpus=0",
                   f"--resources={json.dumps({SECOND: 1})}"], temp_dirs[1], env)
        cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, temp_dirs)
        # The driver sizes its pools by the CPUs it sees when a stage starts: both nodes must be in.
        nodes = state_query(cluster, "nodes")["nodes"]
        assert len(nodes) == 2, f"the second node did not join: {nodes}"
        yield cluster
    finally:
        seen = {pid for temp_dir in temp_dirs for pid in ray_processes(temp_dir)}  # workers included
        for temp_dir in temp_dirs:
            stop_ray_processes(temp_dir)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        left = [pid for pid in seen if _alive(pid)]
        assert not left, f"processes of the test cluster outlived it: {left}"


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) not in ("Z", "X")
    except (OSError, IndexError):
        return False


def start_job(pool: Path, out: Path, address: str, env: dict, *extra: str) -> subprocess.Popen:
    """The job in its own driver process (this session may hold an embedded Ray of its own), in its
    own process group, so that whatever it leaves (an embedded Ray, should it be killed) ends with
    it. Its stdout and stderr go to OUT.log beside the output folder (no pipe to fill unread)."""
    command = [PYTHON, "pipeline/curate.py", "--config", "jobs/quickstart.yaml", f"input={pool}", f"output={out}",
               *OVERRIDES, f"ray.address={address}", *extra]
    with open(out.parent / f"{out.name}.log", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish_job(driver: subprocess.Popen, out: Path, timeout_s: float = 600) -> tuple[int, str]:
    """Wait for a driver (start_job); its exit code and output. Its process group is killed either way."""
    try:
        driver.wait(timeout=timeout_s)
    finally:
        kill_group(driver)
    return driver.returncode, (out.parent / f"{out.name}.log").read_text()


def kill_group(driver: subprocess.Popen) -> None:
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait()


@pytest.fixture
def embedded_run(synth_pool, tmp_path):
    """The job on a fresh embedded single-node Ray (2 CPUs), started before the cluster (it runs
    while the cluster starts): its output folder and its driver."""
    out = tmp_path / "embedded"
    driver = start_job(synth_pool, out, "local", ray_cluster_env(), "ray.num_cpus=2")
    try:
        yield out, driver
    finally:
        kill_group(driver)


@pytest.mark.slow
def test_two_node_cluster_and_one_embedded_node_give_byte_identical_output_with_work_on_both_nodes(
        embedded_run, two_nodes, synth_pool, tmp_path):
    """Both runs' shards (every file under shards/) and metadata Parquet files are compared byte for
    byte, and their manifests' counts must be equal.

    Where the work ran comes from Ray's state API on the head's dashboard (Ray's own record, not the
    pipeline's), asked after the run: the GCS actor table places the two ingest actors of the
    cluster run's driver job one on each node, and that job's task events show calls of both of
    those actors finished, one node each. (Where an actor was placed alone would not show that it
    worked there; the calls do.) The joined node is told from the head by its custom resource. The
    task events are polled for a while, since workers report them asynchronously. Plain tasks
    (metadata, write) are not required on both nodes: the driver reuses a worker it already leased
    for the next task, so on a loaded machine they may all run on one node before a worker on the
    other has started.
    """
    cluster = two_nodes
    on_cluster = tmp_path / "cluster"
    code, log = finish_job(start_job(synth_pool, on_cluster, cluster.address, cluster.env, SHUFFLED), on_cluster)
    assert code == 0, log[-3000:]
    port = cluster.address.rsplit(":", 1)[1]
    assert f":{port}, 2.0 CPUs" in log, log[-3000:]  # the cluster's GCS, both nodes' CPUs
    embedded, driver = embedded_run
    code, log = finish_job(driver, embedded)
    assert code == 0, log[-3000:]
    assert "ray: " in log and ", 2.0 CPUs" in log and f":{port}, " not in log, log[-3000:]  # its own Ray

    # -- the same output, byte for byte
    sizes = json.loads((on_cluster / "shards" / "sizes.json").read_text())
    assert len(sizes) >= 5, sizes  # several output shards, so several write tasks
    for folder, pattern in [("shards", "**/*"), ("metadata", "**/*.parquet")]:
        names = sorted(str(p.relative_to(on_cluster / folder)) for p in (on_cluster / folder).glob(pattern) if p.is_file())
        assert names == sorted(str(p.relative_to(embedded / folder)) for p in (embedded / folder).glob(pattern)
                               if p.is_file()) and names, folder
        _, mismatch, errors = filecmp.cmpfiles(on_cluster / folder, embedded / folder, names, shallow=False)
        assert not mismatch and not errors, (folder, mismatch, errors)
    counts = [json.loads((out / "manifest.json").read_text())["counts"] for out in (on_cluster, embedded)]
    assert counts[0] == counts[1] and counts[0]["input"] == 600 and counts[0]["kept"] == sum(sizes.values())

    # -- the work ran on both nodes
    deadline = time.monotonic() + 30
    while True:
        found = state_query(cluster, "work")
        nodes = {n["node_id"]: ("second" if SECOND in n["resources"] else "head") for n in found["nodes"]}
        drivers = [j for j in found["jobs"] if j["type"] == "DRIVER" and "curate.py" in (j["entrypoint"] or "")]
        assert len(drivers) == 1, found["jobs"]
        job_id = drivers[0]["job_id"]
        ingest_actors = [a for a in found["actors"] if a["job_id"] == job_id and a["class_name"] == "IngestWorkerHost"]
        tasks = [t for t in found["tasks"] if t["job_id"] == job_id]
        calls = [t for t in tasks if t["name"] == "IngestWorkerHost.call" and t["state"] == "FINISHED"]
        if {t["node_id"] for t in calls} == set(nodes) or time.monotonic() > deadline:
            break
        time.sleep(1)
    where = lambda rows: sorted(str(nodes.get(row["node_id"], row["node_id"])) for row in rows)
    ran = Counter((t["name"], t["state"], str(nodes.get(t["node_id"], t["node_id"]))) for t in tasks)
    assert sorted(nodes.values()) == ["head", "second"], found["nodes"]
    assert where(ingest_actors) == ["head", "second"], ingest_actors
    assert sorted(set(where(calls))) == ["head", "second"], f"the job's tasks (name, state, node): {ran}"
    assert len(calls) == 4, ran  # one per input shard
