"""The seeded training sample of a k-means, gathered from the partitions that hold it.

Used by the dedup clustering and by DBP: the driver holds each partition's count of candidate rows
and the sampled positions (at most max_train_points), each partition returns the vectors of its
picks as an Arrow table that stays in the object store, and the training task stacks them in
partition order. No process lists the pool's rows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.algorithms.kmeans import train_sample
from pipeline.ray_shuffle import map_to_refs


def gather(items: list[dict], counts: dict[int, int], max_train_points: int, seed: int,
           sample: Callable[[dict], pa.Table]) -> tuple[list, int]:
    """References to `sample(item with picks)` tables in partition order, and the sample size.
    `counts[partition]` is how many candidate rows the partition of each item has; `picks` are
    positions among them."""
    total = sum(counts.values())
    chosen = train_sample(total, max_train_points, seed) if total else np.empty(0, np.int64)
    picked, start = [], 0
    for item in sorted(items, key=lambda i: i["partition"]):
        count = counts[item["partition"]]
        picks = chosen[(chosen >= start) & (chosen < start + count)] - start
        start += count
        if len(picks):
            picked.append({**item, "picks": picks.tolist()})
    refs = sorted(((item["partition"], ref) for item, ref, _ in map_to_refs(sample, picked)), key=lambda r: r[0])
    return [ref for _, ref in refs], len(chosen)


def vectors_table(vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    return pa.table({"vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1] if vectors.ndim == 2 else 0)})


def stacked(tables: tuple[pa.Table, ...]) -> np.ndarray:
    """The gathered tables' vectors as one float32 matrix (empty when there are none)."""
    if not tables:
        return np.empty((0, 0), np.float32)
    column = pa.concat_tables(tables).column("vector").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
