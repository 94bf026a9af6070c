"""The cluster shuffle of semantic dedup: `group_map` with Ray Data's sort shuffle against its hash
shuffle (the baseline, Ray's default), by number of input blocks.

    python benchmarks/shuffle.py [--rows-per-block 500] [--dim 512] [--clusters 64]

Each input block stands for one partition's dedup survivors: `rows-per-block` embeddings of `dim`
floats with a cluster id. The grouping function only counts its rows, so the figures are the
shuffle's own cost. `group_map` uses the sort shuffle up to `SORT_SHUFFLE_MAX_BLOCKS` blocks; this
measures both at every size, after one warm-up pass of each, on an embedded Ray with every core.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import ray

from pipeline import ray_shuffle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-block", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--blocks", default="4,16,32,64,128")
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows, dim, clusters = args.rows_per_block, args.dim, args.clusters
    shipped = ray_shuffle.SORT_SHUFFLE_MAX_BLOCKS

    def emit(item: dict) -> dict:
        rng = np.random.default_rng(item["seed"])
        return {"cluster": rng.integers(0, clusters, rows), "embedding": rng.normal(size=(rows, dim)).astype(np.float32)}

    def count(batch: dict) -> dict:
        return {"cluster": batch["cluster"][:1], "rows": np.array([len(batch["cluster"])])}

    def timed(blocks: int, max_sort_blocks: int) -> float:
        ray_shuffle.SORT_SHUFFLE_MAX_BLOCKS = max_sort_blocks
        start = time.perf_counter()
        out = list(ray_shuffle.group_map([{"seed": s} for s in range(blocks)], emit, "cluster", count,
                                         num_partitions=200, map_batch_bytes=64 * 2**20))
        seconds = time.perf_counter() - start
        assert sum(int(b["rows"].sum()) for b in out) == blocks * rows
        return seconds

    for max_sort_blocks in (10**9, 0):  # warm-up of each shuffle: worker processes and imports
        timed(4, max_sort_blocks)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {rows} rows x {dim} floats per block, "
          f"{clusters} clusters; group_map sorts up to {shipped} blocks as shipped")
    print(f"{'blocks':>6} {'rows':>8} {'MB':>6} {'hash s':>7} {'sort s':>7} {'hash/sort':>9}")
    for blocks in [int(b) for b in args.blocks.split(",")]:
        hash_s, sort_s = timed(blocks, 0), timed(blocks, 10**9)
        megabytes = blocks * rows * dim * 4 / 1e6
        print(f"{blocks:>6} {blocks * rows:>8} {megabytes:>6.0f} {hash_s:>7.2f} {sort_s:>7.2f} {hash_s / sort_s:>9.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
