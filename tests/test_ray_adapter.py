"""group_map: every row reaches its key's one group, whichever shuffle Ray Data runs; map_items and
map_prepared: a work item that runs past its wall-clock bound is retried once in a fresh worker, then
fails naming its shard."""

import functools
import os
import logging

import numpy as np
import pytest

from pipeline import ray_adapter, ray_shuffle
from tests import hanging_workers

pytestmark = pytest.mark.usefixtures("ray_local")


def _rows(item: dict) -> dict:
    rng = np.random.default_rng(item["seed"])
    n = 50
    return {
        "cluster": rng.integers(0, 7, n),
        "row": item["seed"] * 1000 + np.arange(n),
        "embedding": rng.normal(size=(n, 4)).astype(np.float32),
    }


def _summary(batch: dict) -> dict:
    clusters = np.unique(batch["cluster"])
    assert len(clusters) == 1, "a group holds one key"
    return {
        "cluster": clusters,
        "rows": np.array([",".join(map(str, sorted(batch["row"].tolist())))]),
        "embedding_sum": np.array([float(np.asarray(batch["embedding"], np.float64).sum())]),
    }


def _groups(items: list[dict], map_batch_bytes: int = 2**26) -> dict:
    out = {}
    for batch in ray_shuffle.group_map(items, _rows, "cluster", _summary, num_cpus=0.5, num_partitions=3,
                                       map_batch_bytes=map_batch_bytes):
        for cluster, rows, total in zip(batch["cluster"], batch["rows"], batch["embedding_sum"]):
            assert int(cluster) not in out, "a key reaches one group only"
            out[int(cluster)] = (rows, round(total, 4))
    return out


def test_sort_and_hash_shuffles_give_the_same_groups(monkeypatch):
    items = [{"seed": s} for s in range(6)]
    expected = {}
    for item in items:
        rows = _rows(item)
        for cluster, row, vector in zip(rows["cluster"], rows["row"], rows["embedding"]):
            rows_of, total = expected.get(int(cluster), ([], 0.0))
            expected[int(cluster)] = (rows_of + [int(row)], total + float(vector.astype(np.float64).sum()))
    expected = {c: (",".join(map(str, sorted(r))), round(t, 4)) for c, (r, t) in expected.items()}

    small = _groups(items)  # 6 blocks: the sort shuffle
    monkeypatch.setattr(ray_shuffle, "SORT_SHUFFLE_MAX_BLOCKS", 0)
    large = _groups(items)  # the hash shuffle, as on a pool of many partitions
    batched = _groups(items, map_batch_bytes=1)  # the hash shuffle, one input block per map task
    assert small == expected
    assert large == expected
    assert batched == expected


# -- the wall-clock bound of one work item ----------------------------------------------------------
#
# The workers (tests/hanging_workers.py) hang on the attempts a test asks for and leave a marker file
# per attempt. The bound counts a fresh worker's start (seconds on a loaded 2-core machine), so it is
# long enough for an attempt that does not hang to finish.

BOUND_S = 10
ITEMS = [{"partition": 0, "url": "/pool/00000000.tar"}, {"partition": 1, "url": "/pool/00000001.tar"}]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _retried(name: str) -> str:
    return f"{name} on partition 0 (/pool/00000000.tar) ran longer than {BOUND_S} s; retrying it once in a fresh worker"


def _failed(name: str) -> str:
    return (f"{name} on partition 0 (/pool/00000000.tar) ran longer than {BOUND_S} s (ray.item_timeout_s) twice, "
            "the second time in a fresh worker")


@pytest.mark.parametrize("worker", [hanging_workers.task, hanging_workers.Worker], ids=["task", "actor"])
def test_an_item_that_hangs_once_is_retried_in_a_fresh_worker(worker, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="curate"):
        results = list(ray_adapter.map_items(worker, ITEMS, worker_kwargs={"markers": str(tmp_path), "hangs": "once"},
                                             num_cpus=0.5, timeout_s=BOUND_S))
    assert sorted((r["partition"], r["attempt"]) for r in results) == [(0, 1), (1, 0)]
    assert (hanging_workers.attempts(tmp_path, 0), hanging_workers.attempts(tmp_path, 1)) == (2, 1)
    assert _warnings(caplog) == [_retried(worker.__name__)]


@pytest.mark.parametrize("worker", [hanging_workers.task, hanging_workers.Worker], ids=["task", "actor"])
def test_an_item_that_always_hangs_fails_the_stage_naming_its_shard_after_two_attempts(worker, tmp_path):
    with pytest.raises(ray_adapter.ItemTimeoutError) as failed:
        list(ray_adapter.map_items(worker, ITEMS[:1], worker_kwargs={"markers": str(tmp_path), "hangs": "always"},
                                   num_cpus=0.5, timeout_s=BOUND_S))
    assert str(failed.value).startswith(_failed(worker.__name__))
    assert hanging_workers.attempts(tmp_path, 0) == 2


def _prepared(tmp_path, items: list[dict], prepare_hangs: str, model_hangs: str) -> list:
    prepare = functools.partial(hanging_workers.prepare, markers=str(tmp_path), hangs=prepare_hangs)
    prepare.__name__ = "prepare"
    return list(ray_adapter.map_prepared(prepare, hanging_workers.Model, items,
                                         worker_kwargs={"markers": str(tmp_path), "hangs": model_hangs},
                                         actor_cpus=0.5, prepare_cpus=0.5, timeout_s=BOUND_S))


def test_map_prepared_retries_a_model_call_that_hangs_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="curate"):
        results = _prepared(tmp_path, ITEMS, "never", "once")
    assert sorted((r["partition"], r["prepared"], r["attempt"]) for r in results) == [(0, 0, 1), (1, 0, 0)]
    attempts = [hanging_workers.attempts(tmp_path, name) for name in ("p0", "m0", "m1")]
    assert attempts == [1, 2, 1]
    assert _warnings(caplog) == [_retried("Model")]


def test_map_prepared_retries_a_prepare_call_that_hangs_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="curate"):
        results = _prepared(tmp_path, ITEMS, "once", "never")
    assert sorted((r["partition"], r["prepared"], r["attempt"]) for r in results) == [(0, 1, 0), (1, 0, 0)]
    assert [hanging_workers.attempts(tmp_path, name) for name in ("p0", "p1")] == [2, 1]
    assert _warnings(caplog) == [_retried("prepare")]


def test_map_prepared_fails_naming_the_shard_when_a_model_call_always_hangs(tmp_path):
    with pytest.raises(ray_adapter.ItemTimeoutError) as failed:
        _prepared(tmp_path, ITEMS[:1], "never", "always")
    assert str(failed.value).startswith(_failed("Model"))
    assert hanging_workers.attempts(tmp_path, "m0") == 2


@pytest.mark.slow
def test_the_agents_of_an_embedded_ray_end_with_a_driver_killed_by_sigkill():
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipeline.ray_reaper import processes_of

    code = ("import time, ray; from pipeline.ray_adapter import connect; connect('local', 1); "
            "from ray._private import ray_constants; "
            "print(ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, "
            "flush=True); time.sleep(600)")
    root = Path(__file__).resolve().parents[1]
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              cwd=root, start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        raylet = int(driver.stdout.readline())
        deadline = time.time() + 60
        while len(processes_of(raylet)) < 2 and time.time() < deadline:  # the agents are up
            time.sleep(0.2)
        assert len(processes_of(raylet)) >= 2
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 60
        while processes_of(raylet) and time.time() < deadline:
            time.sleep(0.2)
        assert processes_of(raylet) == []
    finally:
        for pid in processes_of(raylet) if "raylet" in locals() else []:
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
