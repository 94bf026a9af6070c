"""Decision steps: how dedup and select make global decisions without holding the pool.

A stage is a list of steps, each seeing the survivors of the ones before it. A step is
**map -> shuffle or aggregate -> apply**:
- its global part (`decide`) maps every partition to small keyed records or partial aggregates,
  lets Ray Data shuffle the records by key (or reduces the aggregates on the driver, which holds
  O(partitions + clusters)), and writes per partition an update table of the rows it drops;
- its per-partition part (`local`, optional) computes drops that need only the partition and the
  parameters the global part returned (a score boundary, a predicate);
- apply: per partition, the previous verdict plus the updates make the step's verdict file.
Each apply partition is a resumable unit, recorded in the stage's manifest record under
`counts.steps.<step>`; the global part reruns whole when it did not finish (its map reads columns
that are cheap to read again, and what is costly to compute, such as DBP's assignment, is kept
per partition). The last step writes the stage's own verdict files.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.io import fs
from pipeline.io.decisions import apply_updates, no_updates, read_updates, read_verdict, survivor_rows, write_updates, write_verdict
from pipeline.io.parquet import read_table
from pipeline.ray_adapter import map_items, run_remote
from pipeline.ray_shuffle import fetch, map_to_refs, shuffle_map
from pipeline.run import PROGRESS_EVERY_S, RunContext

log = logging.getLogger("curate")


@dataclass(frozen=True)
class Step:
    name: str
    decide: Callable[["StepRun"], dict] | None = None  # global part; returns JSON parameters for apply
    local: Callable[[pa.Table, dict], pa.Table] | None = None  # (verdict, apply item) -> updates
    values: Callable[[dict], dict[str, np.ndarray]] | None = None  # apply item -> whole columns to set


@dataclass
class StepRun:
    """What a step's global part works with: the verdict files entering it and their survivors."""

    ctx: RunContext
    stage: str
    step: str
    inputs: dict[int, str]  # partition -> verdict file entering the step
    survivors: dict[int, int]  # partition -> samples alive in it
    rows: dict[int, int]  # partition -> rows (samples, dropped or not)
    state: dict = field(default_factory=dict)  # this step's record in the manifest (for resumable parts)

    @property
    def config(self):
        return self.ctx.config

    @property
    def entering(self) -> int:
        return sum(self.survivors.values())

    def updates_url(self, partition: int) -> str:
        return self.ctx.paths.url("stages", self.stage, self.step, "updates", f"part-{partition:06d}.parquet")

    @property
    def updates_template(self) -> str:
        """updates_url as a format string with `{partition}`, for workers."""
        return self.updates_url(0).replace("part-000000.parquet", "part-{partition:06d}.parquet")

    def url(self, *parts: str) -> str:
        """A file of this step's own (kept until the stage's outputs are cleared)."""
        return self.ctx.paths.url("stages", self.stage, self.step, *parts)

    def buckets(self, records: int) -> int:
        """How many shuffle buckets `records` keyed records need so a task holds about
        ray.rows_per_bucket of them."""
        return max(1, math.ceil(records / self.ctx.config.ray.rows_per_bucket))

    @property
    def shuffle_batch_bytes(self) -> int:
        """What a shuffle map task gathers before it partitions (ray.shuffle_map_mib)."""
        return self.ctx.config.ray.shuffle_map_mib * 2**20

    @property
    def cpus(self) -> float:
        return _cpus(self.ctx)

    @property
    def timeout_s(self) -> float | None:
        """The wall-clock bound of one work item (ray.item_timeout_s)."""
        return self.ctx.item_timeout_s

    def save(self, now: bool = False) -> None:
        """Record the step's state in the manifest: at most every 2 s, or at once (`now`)."""
        self.ctx.manifest.set_stage(self.ctx.stage_name, self.ctx.record, throttle_s=0.0 if now else 2.0)

    def partition_items(self, **extra) -> list[dict]:
        return [{"partition": i, "verdict": url, **extra} for i, url in sorted(self.inputs.items())]


def run_steps(ctx: RunContext, stage: str, steps: list[Step], inputs: dict[int, str]) -> dict:
    """Run `steps` in order over the verdict files `inputs`; returns samples in and out and the
    drops by reason. Resumes a step from the partitions its record says are applied."""
    record = ctx.record
    states = record.counts.setdefault("steps", {})
    counts = _counts(inputs, _cpus(ctx), ctx.item_timeout_s)
    rows = {i: c["rows"] for i, c in counts.items()}
    survivors = {i: c["survivors"] for i, c in counts.items()}
    samples_in = sum(survivors.values())
    dropped: dict[str, int] = {}
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        outputs = {i: ctx.paths.stage_part(stage, i) if last else
                   ctx.paths.url("stages", stage, step.name, f"part-{i:06d}.parquet") for i in inputs}
        state = states.setdefault(step.name, {})
        run = StepRun(ctx, stage, step.name, inputs, survivors, rows, state)
        if state.get("complete"):
            log.info("%s.%s: finished before the interruption, kept", stage, step.name)
        else:
            if state.get("applied"):
                log.info("%s.%s: resuming, %d of %d partitions already applied", stage, step.name,
                         len(state["applied"]), len(inputs))
            _run_step(run, step, outputs)
        applied = state["applied"]
        survivors = {i: applied[str(i)]["survivors"] for i in inputs}
        for stats in applied.values():
            for reason, count in stats["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + count
        inputs = outputs
    return {"samples_in": samples_in, "samples_out": sum(survivors.values()), "dropped": dropped}


def _run_step(run: StepRun, step: Step, outputs: dict[int, str]) -> None:
    state, name = run.state, f"{run.stage}.{run.step}"
    started = time.perf_counter()
    if "params" not in state:
        fs.remove_tree(run.url("updates"))  # what an interrupted attempt wrote
        state["params"] = step.decide(run) if step.decide else {}
        state["decided_s"] = round(time.perf_counter() - started, 3)
        run.save(now=True)  # a global decision can take long: never redo it for want of a save
        if step.decide:
            log.info("%s: decided over %d samples in %.1fs", name, run.entering, state["decided_s"])
    applied = state.setdefault("applied", {})
    todo = [i for i in sorted(run.inputs) if str(i) not in applied]
    items = [{"partition": i, "verdict": run.inputs[i], "out": outputs[i], "params": state["params"],
              "updates": run.updates_url(i) if step.decide else None} for i in todo]
    progress = _Progress(f"{name} apply", len(run.inputs), len(run.inputs) - len(todo))
    worker_kwargs = {"local": step.local, "values": step.values, "config": run.config}
    for result in map_items(apply_partition, items, worker_kwargs=worker_kwargs, num_cpus=run.cpus,
                            timeout_s=run.timeout_s):
        applied[str(result["partition"])] = {"survivors": result["survivors"], "dropped": result["dropped"]}
        run.save()
        progress.step()
    state["complete"] = True
    run.save()


def apply_partition(item: dict, local=None, values=None, config=None) -> dict:
    """One partition's verdict after a step: the global part's updates, then the local part's."""
    verdict = read_verdict(item["verdict"])
    update = read_updates(item["updates"]) if item["updates"] else no_updates()
    columns = values({**item, "config": config}) if values else None
    verdict, dropped = apply_updates(verdict, update, columns)
    if local is not None:
        verdict, more = apply_updates(verdict, local(verdict, {**item, "config": config}))
        for reason, count in more.items():
            dropped[reason] = dropped.get(reason, 0) + count
    write_verdict(verdict, item["out"])
    return {"partition": item["partition"], "survivors": int(len(survivor_rows(verdict))), "dropped": dropped}


def _counts(inputs: dict[int, str], cpus: float, timeout_s: float | None) -> dict[int, dict]:
    items = [{"partition": i, "url": url} for i, url in inputs.items()]
    return {r["partition"]: r for r in map_items(_count_survivors, items, num_cpus=cpus, timeout_s=timeout_s)}


def _cpus(ctx: RunContext) -> float:
    """CPUs per worker, as the stage declares (pipeline.stages)."""
    return ctx.resources.cpus if ctx.resources is not None else 1.0


def _count_survivors(item: dict) -> dict:
    reason = read_table(item["url"], ["drop_reason"]).column("drop_reason")
    return {"partition": item["partition"], "rows": len(reason), "survivors": int(reason.null_count)}


# -- the global part's building blocks ----------------------------------------------------------

def shuffle_decide(run: StepRun, emit: Callable[..., pa.Table], items: list[dict], decide: Callable[..., pa.Table],
                   kwargs: dict, records: int) -> int:
    """Map `items` with `emit(item, buckets=B, **kwargs)` to keyed records (an Arrow table with a
    `bucket` column), shuffle them by bucket, run `decide(records, **kwargs)` on each bucket (it
    returns updates with a `partition` column) and write each partition's updates. With one
    bucket the records go to a single task, with no shuffle. Returns the number of updates."""
    buckets = run.buckets(records)
    refs = [ref for _, ref, _ in map_to_refs(emit, items, kwargs={"buckets": buckets, **kwargs})]
    template = run.updates_template
    if buckets == 1:
        return run_remote(_decide_all, decide, kwargs, template, *refs)
    decided = shuffle_map(refs, "bucket", functools.partial(decide, **kwargs), partitions=buckets,
                          map_batch_bytes=run.shuffle_batch_bytes)
    written = shuffle_map(decided, "partition", updates_writer(template), partitions=min(len(run.inputs), buckets),
                          map_batch_bytes=run.shuffle_batch_bytes)
    return int(sum(t.column("updates").to_numpy().sum() for t in fetch(written) if t.num_rows))


def _decide_all(decide: Callable, kwargs: dict, template: str, *tables: pa.Table) -> int:
    records = pa.concat_tables(tables) if tables else None
    if records is None or records.num_rows == 0:
        return 0
    return write_partition_updates(decide(records, **kwargs), template)


def write_partition_updates(table: pa.Table, template: str) -> int:
    """Write updates that carry a `partition` column, one file per partition named by `template`."""
    if table.num_rows == 0:
        return 0
    partition = table.column("partition").to_numpy()
    for p in np.unique(partition):
        write_updates(table.filter(pa.array(partition == p)), template.format(partition=int(p)))
    return table.num_rows


def updates_writer(template: str) -> Callable[[pa.Table], pa.Table]:
    """A Ray Data group function writing one partition's updates, returning how many."""
    return functools.partial(_write_group, template=template)


def _write_group(table: pa.Table, template: str) -> pa.Table:
    count = write_partition_updates(table, template)
    return pa.table({"partition": table.column("partition").slice(0, 1), "updates": pa.array([count], pa.int64())})


def with_partition(update: pa.Table, partition) -> pa.Table:
    """Updates tagged with their partition, for the shuffle that routes them home."""
    return update.append_column("partition", pa.array(np.asarray(partition, dtype=np.int64)))


def string_buckets(values: np.ndarray, buckets: int) -> np.ndarray:
    """A bucket per hex string (sha256, uid), from its first 12 characters: they are uniform."""
    if buckets == 1 or len(values) == 0:
        return np.zeros(len(values), np.int64)
    codes = np.asarray(values, dtype="U12").view(np.uint32).reshape(len(values), 12).astype(np.uint64)
    mixed = (codes * (np.uint64(0x9E3779B97F4A7C15) >> np.arange(12, dtype=np.uint64))).sum(axis=1)
    return (mixed % np.uint64(buckets)).astype(np.int64)


def integer_buckets(values: np.ndarray, buckets: int) -> np.ndarray:
    if buckets == 1 or len(values) == 0:
        return np.zeros(len(values), np.int64)
    mixed = np.asarray(values).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(17)) % np.uint64(buckets)).astype(np.int64)


class _Progress:
    """Partitions done, rate and ETA of one phase, logged at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, what: str, total: int, done: int):
        self.what, self.total, self.done, self.fresh = what, total, done, 0
        self.started = self.logged = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        self.fresh += 1
        now = time.perf_counter()
        if self.done >= self.total or now - self.logged < PROGRESS_EVERY_S:
            return
        self.logged = now
        rate = self.fresh / (now - self.started)
        log.info("%s: %d/%d partitions (%.1f/s), ETA %.0fs", self.what, self.done, self.total, rate,
                 (self.total - self.done) / rate)
