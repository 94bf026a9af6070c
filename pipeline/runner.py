"""Run the stages in order, skip what is already done, and prove nothing was lost.

The stages and what each reads are declared in pipeline.stages; each stage's module has its
`config_fingerprint(config)`, `outputs(paths)` and `run(ctx)`. A stage is skipped when the manifest records it complete under the same fingerprint (its config,
plus the fingerprints of the stages it reads); otherwise its outputs are cleared and it runs, or,
with an unchanged fingerprint, resumes from the partitions it had finished. The input shards are
compared by content: ingest re-runs the partitions whose files' bytes changed, and the fingerprint
it hands on includes those bytes' digests. Each stage that runs logs why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.config import CurateConfig, UserError, one_line, storage_error
from pipeline.io import fs
from pipeline.io.catalog import connect as connect_catalog
from pipeline.io.lease import OutputLease, hold_output
from pipeline.io.manifest import Manifest, StageRecord, package_versions
from pipeline.io.reference import Reference, resolve as resolve_reference
from pipeline.ray_adapter import connect as connect_ray
from pipeline.reasons import REASON_NAMES
from pipeline.run import Partition, RunContext, RunPaths, discover_partitions, fingerprint
from pipeline.stages import Stage, ingest, planned, select

log = logging.getLogger("curate")


class InvariantError(RuntimeError):
    """The output does not account for every input sample exactly once."""


@dataclass
class RunSummary:
    output: str
    samples: int
    kept: int
    dropped: dict[str, int]
    stages: dict[str, dict]
    shards: int
    shard_errors: list[dict] = field(default_factory=list)  # input shards not read to their end


@dataclass(frozen=True)
class Step:
    """A declared stage as this config runs it: with the stages it reads (its fingerprint's upstream)."""

    stage: Stage
    upstream: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.stage.name


def plan(config: CurateConfig) -> list[Step]:
    """The stages this config runs, in order (from their declarations in pipeline.stages)."""
    return [Step(stage, reads) for stage, reads in planned(config)]


@dataclass
class Checked:
    """What the checks before Ray found: the reference chain, the shards it saw, the shards to process."""

    reference: Reference | None
    seen: set[str]
    partitions: list[Partition]


def run_pipeline(config: CurateConfig) -> RunSummary:
    """Check what needs no cluster first, so that a mistake fails in seconds, then run on Ray."""
    checked = check_before_ray(config)
    with hold_output(config.output, config.output_lease_s) as lease:
        started_ray = connect_ray(config.ray.address, config.ray.num_cpus)
        try:
            return _run(config, checked, lease)
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def check_before_ray(config: CurateConfig) -> Checked:
    """Everything that would otherwise fail after Ray's start or hours of work, cheapest first.

    Raises UserError naming the key to fix: a select.where that does not bind, a reference that is no
    finished run, an input without shards, unreadable storage (credentials), missing model weights.
    """
    if config.select.where:
        try:
            select.check_where(config.select.where)
        except select.SelectError as exc:
            raise UserError(one_line(str(exc))) from exc
    with _reading("reference", config.reference):
        reference = resolve_reference(config.reference, config.output)  # latest:ROOT finds its run here
    seen = reference.seen_shards() if reference else set()
    with _reading("input", config.input):
        partitions = discover_partitions(config, seen)
    provided = config.embed.provided
    if provided is not None:
        with _reading("embed.provided.metadata", provided.metadata):
            if not fs.resolve_files(provided.metadata, ".parquet", what="embed.provided.metadata"):
                raise UserError(f"embed.provided.metadata {provided.metadata!r} matches no .parquet files")
    with _reading("output", config.output):
        fs.exists(RunPaths(config.output).manifest)
    if config.embed.model is not None or config.dfn.model is not None:
        from pipeline.models import WeightsUnavailableError, preflight

        try:
            preflight(config)
        except WeightsUnavailableError as exc:
            raise UserError(str(exc)) from exc
    return Checked(reference, seen, partitions)


@contextlib.contextmanager
def _reading(key: str, url):
    """Turn a failure to read `url`, the value of `key` (missing, no credentials, unreachable), into a UserError."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:  # fs.resolve_* messages name the key and the path
        raise UserError(str(exc)) from exc
    except Exception as exc:
        error = storage_error(key, url, exc)
        if error is None:
            raise
        raise error from exc


def _run(config: CurateConfig, checked: Checked, lease: OutputLease) -> RunSummary:
    paths = RunPaths(config.output)
    reference, seen, partitions = checked.reference, checked.seen, checked.partitions
    log.info("input: %d shards from %s%s; output: %s", len(partitions), config.input,
             f" ({len(seen)} already processed by {reference.url})" if reference else "", paths.root)
    # What atomic writes of a killed run left unfinished (the lease says no other run is writing here).
    left = fs.remove_temporaries(paths.root)
    if left:
        log.info("output: removed %d temporary file(s) an interrupted run left", left)
    manifest = Manifest.load(paths.manifest)
    manifest.data.update(
        curate_version=__version__,
        config=config.model_dump(mode="json"),
        packages=package_versions(),
        input={"shards": [{"partition": p.index, "url": p.url, "name": p.name} for p in partitions]},
        reference=reference.url if reference else None,  # the run topped up, as Reference.load follows it
    )
    manifest.data.setdefault("stages", {})
    manifest.data.pop("counts", None)  # final counts mark a finished run (Reference.load, latest:); set again at the end
    if not partitions:
        return _nothing_new(paths, manifest)
    fingerprints: dict[str, str] = {}  # what each stage hands on to the stages that read it
    reran: set[str] = set()
    for step in plan(config):
        lease.check()  # a run whose output another run took over writes nothing more
        inputs = _stage_inputs(step, config, fingerprints, partitions, reference)
        fp = fingerprint({"stage": step.name, **inputs})
        record = manifest.stage(step.name)
        changed: list[int] = []
        if step.name == "ingest" and record is not None and record.fingerprint == fp:
            changed = ingest.changed_partitions(partitions, record)  # the shards compared by content
        if record is not None and record.complete and record.fingerprint == fp and not changed:
            record.skipped = True
            manifest.set_stage(step.name, record)
            fingerprints[step.name] = _handed_on(step, fp, record, partitions)
            log.info("%s: complete in an earlier run, skipped", step.name)
            continue
        if record is None or record.fingerprint != fp:
            log.info("%s: %s", step.name, _rerun_reason(record, inputs, partitions, reran))
            for url in step.stage.outputs(paths):
                fs.remove_tree(url)
            record = StageRecord(fingerprint=fp)
        elif changed:
            names = [partitions[i].name for i in changed]
            kept = len(record.partitions_done) - len(changed)
            log.info("%s: re-running: input changed (%s)%s", step.name, _counted(names, "shard"),
                     f"; {_counted([], 'unchanged partition', 'kept', kept)}" if kept else "")
            record.complete = False
            record.partitions_done = [i for i in record.partitions_done if i not in changed]
            for i in changed:
                record.counts.get("partitions", {}).pop(str(i), None)
        else:
            steps = record.counts.get("steps", {})
            if steps:  # a stage of global steps resumes step by step (pipeline.stages.steps)
                log.info("%s: resuming, %d of its steps already finished", step.name,
                         sum(1 for state in steps.values() if state.get("complete")))
            else:
                log.info("%s: resuming, %d partitions already done", step.name, len(record.partitions_done))
        record.inputs = inputs
        record.skipped = False
        record.counts.setdefault("partitions_total", len(partitions))
        ctx = RunContext(config, paths, partitions, manifest, record, step.name, time.perf_counter(), reference,
                         reads=step.upstream, resources=step.stage.resources)
        manifest.set_stage(step.name, record)
        step.stage.run(ctx)
        record.seconds += time.perf_counter() - ctx.started
        record.complete = True
        manifest.set_stage(step.name, record)
        reran.add(step.name)
        fingerprints[step.name] = _handed_on(step, fp, record, partitions)
        log.info("%s: %d in, %d out, %.1fs", step.name, record.samples_in, record.samples_out, record.seconds)
    lease.check()
    summary = check_invariant(paths, manifest)
    manifest.data["counts"] = {"input": summary.samples, "kept": summary.kept, "dropped": summary.dropped}
    manifest.save()
    return summary


def _stage_inputs(step: Step, config: CurateConfig, fingerprints: dict[str, str], partitions: list[Partition],
                  reference: Reference | None) -> dict:
    """What a stage's fingerprint is computed from, as JSON values (the form the manifest keeps).

    For ingest, `input` names the shards (their URLs, fingerprinted); their bytes are compared per
    partition (ingest.changed_partitions), and reach the later stages through ingest's fingerprint.
    """
    inputs = {
        "config": step.stage.config_fingerprint(config),
        "upstream": {name: fingerprints[name] for name in step.upstream},
    }
    if step.name == "ingest":
        inputs["input"] = {"shards": len(partitions), "urls": fingerprint({"urls": [p.url for p in partitions]})}
    if reference is not None:
        inputs["reference"] = [(url, m["counts"]) for url, m in reference.runs]
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def _handed_on(step: Step, fp: str, record: StageRecord, partitions: list[Partition]) -> str:
    """The fingerprint the stages reading this one see: ingest's adds the content of its input."""
    if step.name != "ingest":
        return fp
    return fingerprint({"ingest": fp, "content": ingest.content_digests(partitions, record)})


def _rerun_reason(record: StageRecord | None, inputs: dict, partitions: list[Partition], reran: set[str]) -> str:
    """Why a stage runs again from scratch, from what its earlier record was computed from."""
    if record is None:
        return "first run"
    old = record.inputs
    if not old:
        return "re-running: the earlier run did not record what its fingerprint was computed from"
    reasons = []
    keys = _changed_keys(old.get("config"), inputs["config"])
    if keys:
        reasons.append(f"config changed ({_listed(keys)})")
    if old.get("input") != inputs.get("input"):
        reasons.append(_input_change(record, partitions))
    moved = [name for name, fp in inputs["upstream"].items() if old.get("upstream", {}).get(name) != fp]
    now, before = [name for name in moved if name in reran], [name for name in moved if name not in reran]
    if now:
        reasons.append(f"upstream {', '.join(now)} re-ran")
    if before:  # e.g. an earlier run re-ran them, then stopped before this stage
        reasons.append(f"upstream {', '.join(before)} changed since it last ran")
    if old.get("reference") != inputs.get("reference"):
        reasons.append("the reference runs changed")
    return "re-running: " + ("; ".join(reasons) or "its fingerprint changed")


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON values (a key only in one of them too)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for key in sorted(set(old) | set(new)):
            keys += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".") or "config"]


def _input_change(record: StageRecord, partitions: list[Partition]) -> str:
    """Which shards came and went, against the URLs ingest's earlier partitions read."""
    before = {s["input"]["url"] for s in record.counts.get("partitions", {}).values() if s.get("input")}
    now = {p.url: p.name for p in partitions}
    added = [name for url, name in now.items() if url not in before]
    removed = sorted(posixpath.basename(url) for url in before if url not in now)
    parts = [_counted(names, "shard", what) for names, what in ((added, "added"), (removed, "removed")) if names]
    return f"input changed ({'; '.join(parts) or 'another list of shards'})"


def _counted(names: list[str], noun: str, what: str = "", count: int | None = None) -> str:
    """`2 shards added: a.tar, b.tar` (the first few names), or `3 shards` for a bare count."""
    count = len(names) if count is None else count
    words = f"{count} {noun}{'' if count == 1 else 's'}" + (f" {what}" if what else "")
    return words + (f": {_listed(names)}" if names else "")


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _nothing_new(paths: RunPaths, manifest: Manifest) -> RunSummary:
    """An incremental run whose reference chain already saw every shard: an empty, valid run."""
    log.info("no new shards since %s: nothing to do", manifest.data["reference"])
    fs.write_bytes_atomic(paths.url("shards", "sizes.json"), b"{}\n")
    manifest.data["stages"] = {}
    manifest.data["counts"] = {"input": 0, "kept": 0, "dropped": {}}
    manifest.data["shard_errors"] = []
    manifest.save()
    return RunSummary(paths.root, 0, 0, {}, {}, 0)


INVARIANT_MEMORY = "256MB"  # DuckDB's limit while the invariant check counts; it spills past it


def check_invariant(paths: RunPaths, manifest: Manifest) -> RunSummary:
    """input samples = kept + dropped by reason; each kept uid exactly once in the output shards.

    Counts come from DuckDB over the metadata (it streams); the kept uids are compared through the
    digests the metadata and write stages recorded per partition and shard, so the driver reads no
    uid. Whether a kept uid repeats is a group-by over the kept uids, which DuckDB holds within
    INVARIANT_MEMORY and spills past it to a local temporary directory: the driver's memory stays
    bounded whatever the pool's size.
    """
    stages = manifest.data["stages"]
    ingested = stages["ingest"]["samples_in"]
    with tempfile.TemporaryDirectory(prefix="curate-invariant-") as spill:
        con = connect_catalog(paths.root)
        con.execute("set temp_directory = '{}'".format(spill.replace("'", "''")))
        con.execute(f"set memory_limit = '{INVARIANT_MEMORY}'")
        total, kept, unexplained, contradictory = con.execute(
            """select count(*), count(*) filter (where kept),
                      count(*) filter (where not kept and drop_reason is null),
                      count(*) filter (where kept is null or (kept and drop_reason is not null))
               from samples"""
        ).fetchone()
        repeated = con.execute(
            "select coalesce(sum(n - 1), 0) from (select count(*) as n from samples where kept group by uid having n > 1)"
        ).fetchone()[0]
        dropped = dict(con.execute("select drop_reason, count(*) from samples where not kept group by 1").fetchall())
        con.close()
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
    if repeated:
        problems.append(f"{int(repeated)} kept uids are not unique")
    written = stages["write"]["samples_out"]
    sizes = fs.read_bytes(paths.url("shards", "sizes.json")) if kept else b"{}"
    partitions = stages["metadata"]["counts"].get("partitions", {})
    recorded = sum(s["kept"] for s in partitions.values())
    if written != kept or sum(json.loads(sizes).values()) != kept:
        problems.append(f"{kept} kept samples but {written} written ({sum(json.loads(sizes).values())} in sizes.json)")
    elif recorded != kept:
        problems.append(f"the metadata stage recorded {recorded} kept samples, the metadata files hold {kept}")
    elif str(sum(int(s["digest"]) for s in partitions.values()) % (1 << 128)) != stages["write"]["counts"].get(
            "digest", "0"):
        problems.append("the uids in the output shards differ from the kept uids in the metadata")
    if problems:
        raise InvariantError("output does not account for the input: " + "; ".join(problems))
    ordered = {name: dropped[name] for name in REASON_NAMES if name in dropped}
    stage_table = {
        name: {k: stages[name][k] for k in ("seconds", "samples_in", "samples_out", "skipped")} for name in stages
    }
    return RunSummary(paths.root, total, kept, ordered, stage_table, stages["write"]["counts"].get("shards", 0),
                      manifest.data.get("shard_errors", []))


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
    if summary.shard_errors:
        first = summary.shard_errors[0]
        lines.append(f"shard errors: {len(summary.shard_errors)} input shard(s) could not be read to their end "
                     f"(first: {first['shard']} at byte {first['offset']}); where and why each broke: "
                     "manifest.json shard_errors, or the shard_errors view")
    else:
        lines.append("shard errors: none (every input shard read to its end)")
    lines.append(f"output: {summary.output}/shards ({summary.shards} shards), metadata: {summary.output}/metadata")
    if "report" in summary.stages:  # a run with no new shards writes no report
        lines.append(f"report: {summary.output}/report.html")
    lines.append(f"query:  {_curate_command()} query {shlex.quote(summary.output)} "
                 "\"select drop_reason, count(*) as n from samples group by 1 order by n desc\"")
    return "\n".join(lines)


def _curate_command() -> str:
    """How to call the console script so the printed query runs when pasted: `curate` when the
    shell finds this environment's script, else its path (relative inside the working directory),
    e.g. `.venv/bin/curate` for a user who never activated the environment."""
    script = Path(sys.executable).parent / "curate"
    found = shutil.which("curate")
    if found and (not script.exists() or os.path.samefile(found, script)):
        return "curate"
    if not script.exists():  # not installed as a package: the module runs the same command
        return f"{shlex.quote(sys.executable)} -m pipeline.cli"
    absolute = script.absolute()
    try:
        return shlex.quote(str(absolute.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(absolute))
