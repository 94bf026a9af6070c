"""Run the stages in order, skip what is already done, and prove nothing was lost.

Each stage module exposes NAME, `config_fingerprint(config)`, `outputs(paths)` and `run(ctx)`.
A stage is skipped when the manifest records it complete under the same fingerprint (its config,
plus the fingerprints of the stages it reads); otherwise its outputs are cleared and it runs, or,
with an unchanged fingerprint, resumes from the partitions it had finished.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from pipeline import __version__
from pipeline.config import CurateConfig
from pipeline.io import fs
from pipeline.io.catalog import connect as connect_catalog
from pipeline.io.manifest import Manifest, StageRecord, package_versions
from pipeline.io.reference import Reference
from pipeline.io.parquet import read_table
from pipeline.ray_adapter import connect as connect_ray
from pipeline.reasons import REASON_NAMES
from pipeline.run import RunContext, RunPaths, discover_partitions, fingerprint, input_signature
from pipeline.stages import dedup, ingest, metadata, report, select, write

log = logging.getLogger("curate")


class InvariantError(RuntimeError):
    """The output does not account for every input sample exactly once."""


@dataclass
class Step:
    module: object
    upstream: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.module.NAME


@dataclass
class RunSummary:
    output: str
    samples: int
    kept: int
    dropped: dict[str, int]
    stages: dict[str, dict]
    shards: int


def plan(config: CurateConfig) -> list[Step]:
    """The stages this config runs, in order."""
    steps = [Step(ingest, ())]
    extras: list[str] = []
    dedup_inputs: tuple[str, ...] = ("ingest",)
    if config.embed.enabled:
        from pipeline.stages import embed

        steps.append(Step(embed, ("ingest",)))
        extras.append("embed")
    if config.dedup.semantic:
        from pipeline.stages import cluster

        steps.append(Step(cluster, ("ingest", "embed")))
        extras.append("cluster")
        dedup_inputs = ("ingest", "embed", "cluster")
    steps.append(Step(dedup, dedup_inputs))
    verdict = "dedup"
    rules = config.select
    if rules.subset or rules.clip.enabled or rules.dfn.enabled or rules.dbp.enabled or rules.where:
        steps.append(Step(select, ("dedup", *extras), {"extra_stages": extras}))
        verdict = "select"
    steps.append(Step(metadata, (verdict, *extras), {"verdict_stage": verdict, "extra_stages": extras}))
    steps.append(Step(write, ("metadata",)))
    steps.append(Step(report, ("metadata", "write")))
    return steps


def run_pipeline(config: CurateConfig) -> RunSummary:
    started_ray = connect_ray(config.ray.address, config.ray.num_cpus)
    try:
        return _run(config)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _run(config: CurateConfig) -> RunSummary:
    if config.select.where:
        select.check_where(config.select.where)
    if config.embed.model is not None or config.dfn.model is not None:
        from pipeline.models import preflight

        preflight(config)  # weights missing: fail before any stage runs
    paths = RunPaths(config.output)
    reference = Reference.load(config.reference) if config.reference else None
    seen = reference.seen_shards() if reference else set()
    partitions = discover_partitions(config, seen)
    log.info("input: %d shards from %s%s; output: %s", len(partitions), config.input,
             f" ({len(seen)} already processed by {config.reference})" if reference else "", paths.root)
    manifest = Manifest.load(paths.manifest)
    manifest.data.update(
        curate_version=__version__,
        config=config.model_dump(mode="json"),
        packages=package_versions(),
        input={"shards": [{"partition": p.index, "url": p.url, "name": p.name} for p in partitions]},
        reference=config.reference,
    )
    manifest.data.setdefault("stages", {})
    if not partitions:
        return _nothing_new(paths, manifest)
    signature = input_signature(partitions)
    fingerprints: dict[str, str] = {}
    for step in plan(config):
        payload = {
            "stage": step.name,
            "config": step.module.config_fingerprint(config),
            "upstream": [fingerprints[u] for u in step.upstream],
        }
        if step.name == "ingest":
            payload["input"] = signature
        if reference is not None:
            payload["reference"] = [(url, m["counts"]) for url, m in reference.runs]
        fingerprints[step.name] = fp = fingerprint(payload)
        record = manifest.stage(step.name)
        if record is not None and record.complete and record.fingerprint == fp:
            record.skipped = True
            manifest.set_stage(step.name, record)
            log.info("%s: complete in an earlier run, skipped", step.name)
            continue
        if record is None or record.fingerprint != fp:
            for url in step.module.outputs(paths):
                fs.remove_tree(url)
            record = StageRecord(fingerprint=fp)
        else:
            log.info("%s: resuming, %d partitions already done", step.name, len(record.partitions_done))
        record.skipped = False
        record.counts.setdefault("partitions_total", len(partitions))
        ctx = RunContext(config, paths, partitions, manifest, record, step.name, time.perf_counter(), reference)
        manifest.set_stage(step.name, record)
        step.module.run(ctx, **step.kwargs)
        record.seconds += time.perf_counter() - ctx.started
        record.complete = True
        manifest.set_stage(step.name, record)
        log.info("%s: %d in, %d out, %.1fs", step.name, record.samples_in, record.samples_out, record.seconds)
    summary = check_invariant(paths, manifest)
    manifest.data["counts"] = {"input": summary.samples, "kept": summary.kept, "dropped": summary.dropped}
    manifest.save()
    return summary


def _nothing_new(paths: RunPaths, manifest: Manifest) -> RunSummary:
    """An incremental run whose reference chain already saw every shard: an empty, valid run."""
    log.info("no new shards since %s: nothing to do", manifest.data["reference"])
    fs.write_bytes_atomic(paths.url("shards", "sizes.json"), b"{}\n")
    manifest.data["stages"] = {}
    manifest.data["counts"] = {"input": 0, "kept": 0, "dropped": {}}
    manifest.save()
    return RunSummary(paths.root, 0, 0, {}, {}, 0)


def check_invariant(paths: RunPaths, manifest: Manifest) -> RunSummary:
    """input samples = kept + dropped by reason; each kept uid exactly once in the output shards."""
    from pipeline.stages.write import uid_digest

    stages = manifest.data["stages"]
    ingested = stages["ingest"]["samples_in"]
    con = connect_catalog(paths.root)
    total, kept, unexplained, contradictory, kept_uids = con.execute(
        """select count(*), count(*) filter (where kept),
                  count(*) filter (where not kept and drop_reason is null),
                  count(*) filter (where kept is null or (kept and drop_reason is not null)),
                  count(distinct uid) filter (where kept)
           from samples"""
    ).fetchone()
    dropped = dict(con.execute("select drop_reason, count(*) from samples where not kept group by 1").fetchall())
    problems = []
    if total != ingested:
        problems.append(f"metadata has {total} rows but ingest read {ingested} samples")
    if unexplained or contradictory:
        problems.append(f"{unexplained} dropped rows without a reason, {contradictory} rows with a contradictory verdict")
    unknown = set(dropped) - set(REASON_NAMES)
    if unknown:
        problems.append(f"unknown drop reasons {sorted(unknown)}")
    if total != kept + sum(dropped.values()):
        problems.append(f"{total} rows != {kept} kept + {sum(dropped.values())} dropped")
    if kept_uids != kept:
        problems.append(f"{kept - kept_uids} kept uids are not unique")
    written = stages["write"]["samples_out"]
    sizes = fs.read_bytes(paths.url("shards", "sizes.json")) if kept else b"{}"
    if written != kept or sum(json.loads(sizes).values()) != kept:
        problems.append(f"{kept} kept samples but {written} written ({sum(json.loads(sizes).values())} in sizes.json)")
    else:
        kept_digest = 0
        for url in fs.list_files(paths.metadata_dir, ".parquet"):
            table = read_table(url, ["uid", "kept"])
            kept_digest += uid_digest(table.filter(table.column("kept")).column("uid").to_pylist())
        if str(kept_digest % (1 << 128)) != stages["write"]["counts"].get("digest", "0"):
            problems.append("the uids in the output shards differ from the kept uids in the metadata")
    if problems:
        raise InvariantError("output does not account for the input: " + "; ".join(problems))
    ordered = {name: dropped[name] for name in REASON_NAMES if name in dropped}
    stage_table = {
        name: {k: stages[name][k] for k in ("seconds", "samples_in", "samples_out", "skipped")} for name in stages
    }
    return RunSummary(paths.root, total, kept, ordered, stage_table, stages["write"]["counts"].get("shards", 0))


def format_summary(summary: RunSummary) -> str:
    lines = [f"{'stage':<10} {'seconds':>9} {'in':>10} {'out':>10} {'per s':>9}"]
    for name, s in summary.stages.items():
        rate = s["samples_in"] / s["seconds"] if s["seconds"] else 0.0
        note = "  (skipped: done earlier)" if s.get("skipped") else ""
        lines.append(f"{name:<10} {s['seconds']:>9.1f} {s['samples_in']:>10} {s['samples_out']:>10} {rate:>9.0f}{note}")
    lines.append("")
    lines.append(f"input samples {summary.samples} = kept {summary.kept} + dropped {summary.samples - summary.kept}")
    for reason, count in summary.dropped.items():
        lines.append(f"  {reason:<22} {count:>8}")
    lines.append(f"output: {summary.output}/shards ({summary.shards} shards), metadata: {summary.output}/metadata")
    lines.append(f"query:  curate query {summary.output} \"select drop_reason, count(*) from samples group by 1\"")
    return "\n".join(lines)
