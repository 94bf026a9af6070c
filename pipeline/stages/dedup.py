"""Stage 4, dedup: duplicate uids, then exact duplicates (same image sha256).

Runs over the whole pool at once (a duplicate can sit in any shard), as one Ray task that reads
only the small columns it needs; each step sees only the survivors of the steps before it.
"""

from __future__ import annotations

import numpy as np

from pipeline.algorithms.exact_dup import exact_duplicates
from pipeline.io.decisions import Decisions
from pipeline.io.parquet import read_tables
from pipeline.ray_adapter import run_remote

NAME = "dedup"
UPSTREAM = ("ingest",)


def config_fingerprint(config) -> dict:
    return {"dedup": config.dedup.model_dump(mode="json")}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME)]


def drop_duplicate_uids(decisions: Decisions) -> None:
    """Keep the first survivor of each uid (pool order); uids must be unique to join on them."""
    rows = decisions.survivors()
    uids = decisions.uid[rows]
    _, first = np.unique(uids, return_index=True)
    later = np.setdiff1d(np.arange(len(rows)), first)
    if len(later):
        owner = dict(zip(uids[first], rows[first]))
        details = [f"uid {u} already used by the sample at row {owner[u]} of the pool" for u in uids[later]]
        decisions.drop(rows[later], "duplicate_uid", details, duplicate_of=uids[later])


def drop_exact_duplicates(decisions: Decisions, sha256: np.ndarray) -> None:
    rows = decisions.survivors()
    dropped, duplicate_of = exact_duplicates(sha256[rows], decisions.uid[rows])
    dup_rows = rows[dropped]
    kept_uids = decisions.uid[rows[duplicate_of[dropped]]]
    details = [f"same image bytes (sha256 {sha256[r][:16]}...) as {k}" for r, k in zip(dup_rows, kept_uids)]
    decisions.drop(dup_rows, "exact_duplicate", details, duplicate_of=kept_uids)


def dedup_pool(config, ingest_urls: dict[int, str], out_urls: dict[int, str]) -> dict:
    """Plain function over the ingest outputs; returns per-reason counts of this stage's drops."""
    decisions = Decisions.load(ingest_urls)
    samples_in = len(decisions.survivors())
    drop_duplicate_uids(decisions)
    if config.dedup.exact:
        tables = read_tables([ingest_urls[p] for p in sorted(ingest_urls)], ["sha256"])
        sha256 = np.concatenate([t.column("sha256").to_numpy(zero_copy_only=False).astype(object) for t in tables])
        drop_exact_duplicates(decisions, sha256)
    decisions.write(out_urls)
    return {
        "samples_in": samples_in,
        "samples_out": len(decisions.survivors()),
        "dropped": dict(decisions.dropped_by_step),
    }


def run(ctx) -> None:
    indices = [p.index for p in ctx.partitions]
    ingest_urls = {i: ctx.paths.stage_part("ingest", i) for i in indices}
    out_urls = {i: ctx.paths.stage_part(NAME, i) for i in indices}
    result = run_remote(dedup_pool, ctx.config, ingest_urls, out_urls)
    ctx.record.samples_in = result["samples_in"]
    ctx.record.samples_out = result["samples_out"]
    ctx.record.counts = {"dropped": result["dropped"]}
