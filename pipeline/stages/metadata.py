"""Assemble the user-facing metadata: one row per input sample with every field and the verdict.

Per partition, the ingest fields are joined with the final verdict of the decision stages and
with the scores and clusters of the stages that ran (pipeline.io.assemble).
"""

from __future__ import annotations

import pyarrow.compute as pc

from pipeline.io.assemble import build_metadata
from pipeline.io.catalog import write_catalog
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import map_items

NAME = "metadata"


def config_fingerprint(config) -> dict:
    return {}


def outputs(paths) -> list[str]:
    return [paths.metadata_dir]


def finalize_partition(item: dict) -> dict:
    ingest = read_table(item["ingest"])
    verdict = read_table(item["verdict"])
    extras = [read_table(url) for url in item["extras"].split("\n") if url]
    table = build_metadata(ingest, verdict, extras)
    write_table_atomic(table, item["out"])
    kept = pc.sum(table.column("kept")).as_py() or 0
    return {"partition": item["partition"], "samples": table.num_rows, "kept": kept}


def run(ctx, verdict_stage: str, extra_stages: list[str]) -> None:
    todo = ctx.todo([p.index for p in ctx.partitions])
    items = [
        {
            "partition": i,
            "ingest": ctx.paths.stage_part("ingest", i),
            "verdict": ctx.paths.stage_part(verdict_stage, i),
            "extras": "\n".join(ctx.paths.stage_part(stage, i) for stage in extra_stages),
            "out": ctx.paths.metadata_part(i),
        }
        for i in todo
    ]
    for result in map_items(finalize_partition, items, num_cpus=0.5):
        ctx.partition_done(result["partition"], {"samples": result["samples"], "kept": result["kept"]})
    stats = ctx.record.counts.get("partitions", {}).values()
    ctx.record.samples_in = sum(s["samples"] for s in stats)
    ctx.record.samples_out = sum(s["kept"] for s in stats)
    write_catalog(ctx.paths.root, ctx.paths.catalog)
