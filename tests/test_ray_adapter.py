"""group_map: every row reaches its key's one group, whichever shuffle Ray Data runs."""

import numpy as np
import pytest

from pipeline import ray_shuffle

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
