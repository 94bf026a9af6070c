"""Assemble the user-facing metadata: one row per input sample with every field and the verdict.

Per partition, the ingest fields are joined with the final verdict of the decision stages and
with the scores and clusters of the stages that ran (pipeline.io.assemble). Each partition's
stats record its kept count and the digest of its kept uids, so that the write plan and the
runner's invariant check need only these, never the uids of the whole pool in one process.
"""

from __future__ import annotations

import pyarrow.compute as pc

from pipeline.io.assemble import build_metadata
from pipeline.io.catalog import write_catalog
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import map_items
from pipeline.stages.write import uid_digest

NAME = "metadata"


def config_fingerprint(config) -> dict:
    return {}


def outputs(paths) -> list[str]:
    return [paths.metadata_dir]


def finalize_partition(item: dict) -> dict:
    """Write one partition's metadata; returns its sample and kept counts and its kept-uid digest
    (write.uid_digest, as a decimal string: JSON has no 128-bit integers)."""
    ingest = read_table(item["ingest"])
    verdict = read_table(item["verdict"])
    extras = [read_table(url) for url in item["extras"]]
    table = build_metadata(ingest, verdict, extras)
    write_table_atomic(table, item["out"])
    kept = pc.sum(table.column("kept")).as_py() or 0
    digest = uid_digest(table.filter(table.column("kept")).column("uid").to_pylist())
    return {"partition": item["partition"], "samples": table.num_rows, "kept": kept, "digest": str(digest)}


def run(ctx) -> None:
    verdict_stage = "select" if ctx.reading("select") else "dedup"
    extra_stages = [stage for stage in ("embed", "cluster", "faces") if ctx.reading(stage)]
    todo = ctx.todo([p.index for p in ctx.partitions])
    items = [
        {
            "partition": i,
            "ingest": ctx.read("ingest", i),
            "verdict": ctx.read(verdict_stage, i),
            "extras": [ctx.read(stage, i) for stage in extra_stages],
            "out": ctx.paths.metadata_part(i),
        }
        for i in todo
    ]
    for result in map_items(finalize_partition, items, num_cpus=0.5, timeout_s=ctx.item_timeout_s):
        ctx.partition_done(result["partition"],
                           {"samples": result["samples"], "kept": result["kept"], "digest": result["digest"]})
    stats = ctx.record.counts.get("partitions", {}).values()
    ctx.record.samples_in = sum(s["samples"] for s in stats)
    ctx.record.samples_out = sum(s["kept"] for s in stats)
    write_catalog(ctx.paths.root, ctx.paths.catalog)
