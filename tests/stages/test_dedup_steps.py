"""The decide functions of dedup's global steps, without Ray: what one bucket's task computes, and
that buckets joined afterwards give the links of the whole pool."""

import numpy as np
import pyarrow as pa

from pipeline.algorithms.near_dup import index_plan
from pipeline.io.datacomp import uid_halves
from pipeline.stages import dedup
from pipeline.stages.steps import integer_buckets, string_buckets


def _phash_pool(seed=4, n=4000):
    """Random hashes with chains and clusters of near copies, some published by an earlier run."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n // 2, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    copies = base[rng.integers(0, len(base), n - len(base))]
    flips = np.zeros(len(copies), np.uint64)
    for _ in range(3):
        flips ^= np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
    hashes = np.concatenate([base, copies ^ flips])
    uids = np.array([f"{v:032x}" for v in rng.choice(2**40, n, replace=False)])
    partition = np.where(rng.random(n) < 0.1, dedup.PUBLISHED, rng.integers(0, 5, n))
    row = np.arange(n, dtype=np.int64)
    gid = np.where(partition == dedup.PUBLISHED, -1 - row, (partition.astype(np.int64) << 32) | row)
    halves = uid_halves(uids, "test")
    return hashes, uids, gid, halves


def _records(hashes, gid, halves, plan, buckets):
    parts = []
    for t, mask in enumerate(plan if buckets > 1 else [0]):
        key = dedup._compress(hashes, mask)[0].astype(np.uint64) if buckets > 1 else np.zeros(len(hashes), np.uint64)
        parts.append(pa.table({"bucket": integer_buckets(key * np.uint64(len(plan)) + np.uint64(t), buckets),
                               "table": np.full(len(hashes), t, np.int64), "phash": hashes, "gid": gid,
                               "hi": halves[:, 0], "lo": halves[:, 1]}))
    return pa.concat_tables(parts)


def _drops(table):
    return sorted(zip(table.column("partition").to_pylist(), table.column("row").to_pylist(),
                      table.column("duplicate_of").to_pylist(), table.column("phash_distance").to_pylist(),
                      table.column("drop_detail").to_pylist()))


def test_phash_links_joined_across_buckets_equal_one_task_over_everything(tmp_path):
    hashes, uids, gid, halves = _phash_pool()
    radius = 4
    plan = [int(m) for m in index_plan(radius, len(hashes))]
    whole = dedup.decide_phash_all(_records(hashes, gid, halves, plan, 1), radius, plan)
    assert whole.num_rows > 500
    records = _records(hashes, gid, halves, plan, 37)
    bucket = records.column("bucket").to_numpy()
    edges = [dedup.link_bucket(records.filter(pa.array(bucket == b)), radius, plan) for b in np.unique(bucket)]
    template = str(tmp_path / "part-{partition:06d}.parquet")
    written = dedup.join_links(radius, template, *edges)
    assert written == whole.num_rows
    import pyarrow.parquet as pq

    joined = pa.concat_tables([dedup.with_partition(pq.read_table(template.format(partition=p)), np.full(
        pq.read_table(template.format(partition=p)).num_rows, p)) for p in range(5)
        if (tmp_path / f"part-{p:06d}.parquet").exists()])
    assert _drops(joined) == _drops(whole)
    # published samples are never dropped, and a component reaching one keeps it
    assert dedup.PUBLISHED not in set(whole.column("partition").to_pylist())
    published = {u for u, g in zip(uids, gid) if g < 0}
    assert any(k in published for k in whole.column("duplicate_of").to_pylist())


def test_exact_duplicates_keep_the_smallest_uid_or_the_published_one():
    sha = np.array(["aa", "aa", "aa", "bb", "bb", "cc"])
    uid = np.array(["3" * 32, "1" * 32, "2" * 32, "9" * 32, "8" * 32, "5" * 32])
    partition = np.array([0, 1, 2, 0, dedup.PUBLISHED, 1])
    records = pa.table({"bucket": string_buckets(sha, 1), "sha256": sha, "uid": uid, "partition": partition,
                        "row": np.arange(6)})
    drops = dedup.decide_sha256(records)
    got = dict(zip(drops.column("row").to_pylist(), drops.column("duplicate_of").to_pylist()))
    assert got == {0: "1" * 32, 2: "1" * 32, 3: "8" * 32}
    assert "published earlier" in drops.filter(pa.array(np.array(drops.column("row").to_pylist()) == 3)).column(
        "drop_detail")[0].as_py()


def test_duplicate_uids_keep_the_first_in_pool_order_unless_published():
    uid = np.array(["a" * 32, "a" * 32, "b" * 32, "b" * 32, "b" * 32])
    partition = np.array([2, 0, dedup.PUBLISHED, 1, 0])
    row = np.array([0, 5, -1, 0, 3])
    records = pa.table({"bucket": np.zeros(5, np.int64), "uid": uid, "partition": partition, "row": row})
    drops = dedup.decide_uids(records, offsets={"0": 0, "1": 10, "2": 20})
    got = sorted(zip(drops.column("partition").to_pylist(), drops.column("row").to_pylist(),
                     drops.column("drop_detail").to_pylist()))
    assert got == [(0, 3, f"uid {'b' * 32} already published by the reference run"),
                   (1, 0, f"uid {'b' * 32} already published by the reference run"),
                   (2, 0, f"uid {'a' * 32} already used by the sample at row 5 of the pool")]
