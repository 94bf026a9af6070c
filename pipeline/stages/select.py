"""Stage 5, select: a DataComp subset, images with faces (select.faces), CLIP / DFN score filters,
density-based pruning (DBP), then a SQL predicate.

Each step sees only the survivors of the steps before it, in the fixed order of docs/algorithms.md
section 7, and runs as a decision step (pipeline.stages.steps): a threshold, the subset and the
predicate are decided per partition; a fraction cut finds its global boundary by radix selection
over per-partition histograms (the driver adds 65,536-bin histograms, never holds the scores);
DBP aggregates per-cluster statistics and selects inside clusters shuffled by cluster
(pipeline.stages.select_dbp).
"""

from __future__ import annotations

import json
import logging

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.algorithms.score_cut import Boundary, RadixCut, keep_at_or_above, keep_count, partition_histogram, partition_members, threshold_keep
from pipeline.io.assemble import build_metadata
from pipeline.io.datacomp import read_subset
from pipeline.io.decisions import survivor_rows, updates
from pipeline.io.parquet import read_table
from pipeline.schema import METADATA_SCHEMA
from pipeline.stages import select_dbp
from pipeline.ray_adapter import map_items
from pipeline.stages.steps import Step, StepRun, run_steps

log = logging.getLogger("curate")
NAME = "select"


class SelectError(ValueError):
    pass


def config_fingerprint(config) -> dict:
    # DBP's reduction options at their defaults change nothing: left out, so earlier runs resume
    unreduced = {"dbp": {"dims", "reduce"}} if config.select.dbp.dims is None else None
    return {"select": config.select.model_dump(mode="json", exclude=unreduced)}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME), *select_dbp.outputs(paths)]


def check_where(where: str) -> None:
    """Fail at start, not after hours of work, when the predicate does not bind to the columns or
    needs the whole pool: it is evaluated per partition, so a subquery (over `samples` or
    anything else) is refused, as DuckDB refuses aggregates and window functions in WHERE."""
    con = duckdb.connect()
    con.register("samples", METADATA_SCHEMA.empty_table())
    query = f"select uid from samples where ({where})"
    try:
        con.execute(query).fetchall()
    except duckdb.Error as exc:
        raise SelectError(f"select.where {where!r} is not a valid predicate over the metadata columns: {exc}") from exc
    tree = json.loads(con.execute("select json_serialize_sql(?)", [query]).fetchone()[0])
    if _has_subquery(tree):
        raise SelectError(f"select.where {where!r} holds a subquery: the predicate is evaluated one partition at a "
                          "time, so it may use only the sample's own columns (filter on aggregates afterwards with "
                          "`curate query`, or turn them into a threshold)")


def _has_subquery(node) -> bool:
    if isinstance(node, dict):
        return node.get("class") == "SUBQUERY" or any(_has_subquery(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_subquery(v) for v in node)
    return False


# -- the subset ---------------------------------------------------------------------------------

def subset_local(verdict: pa.Table, item: dict) -> pa.Table:
    """Drop survivors whose uid is not in the subset file (read by each partition's task)."""
    subset = item["config"].select.subset
    wanted = read_subset(subset)
    rows = survivor_rows(verdict)
    uids = verdict.column("uid").to_numpy(zero_copy_only=False)[rows]
    outside = rows[np.array([u not in wanted for u in uids], dtype=bool)]
    return updates(outside, "not_in_subset", [f"uid not in {subset}"] * len(outside))


# -- faces (PASS-style) -------------------------------------------------------------------------

def faces_local(verdict: pa.Table, item: dict) -> pa.Table:
    """Drop survivors in whose image the faces stage found a face; the count is the detail."""
    counts = read_table(item["params"]["faces"].format(partition=item["partition"]), ["face_count"])
    values = counts.column("face_count").fill_null(0).to_numpy()
    rows = survivor_rows(verdict)
    found = rows[values[rows] > 0]
    return updates(found, "has_faces", [f"{values[r]} face(s) found" for r in found])


def faces_step() -> Step:
    return Step("faces", decide=lambda run: {"faces": run.ctx.read_pattern("faces")}, local=faces_local)


# -- score filters ------------------------------------------------------------------------------

def _survivor_scores(verdict_url: str, scores_url: str, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    verdict = read_table(verdict_url, ["uid", "drop_reason"])
    rows = survivor_rows(verdict)
    scores = read_table(scores_url, [column]).column(column).cast(pa.float64()).fill_null(np.nan).to_numpy()
    return rows, scores[rows], verdict.column("uid").to_numpy(zero_copy_only=False)[rows].astype(str)


def score_histogram(item: dict) -> dict:
    _, scores, _ = _survivor_scores(item["verdict"], item["scores"], item["column"])
    return {"partition": item["partition"], "histogram": partition_histogram(scores, *item["prefix"])}


def score_members(item: dict) -> dict:
    _, scores, uids = _survivor_scores(item["verdict"], item["scores"], item["column"])
    keys, members = partition_members(scores, uids, *item["prefix"])
    return {"partition": item["partition"], "keys": keys, "uids": members}


def score_local(verdict: pa.Table, item: dict) -> pa.Table:
    params = item["params"]
    reason, column = params["reason"], params["column"]
    rows = survivor_rows(verdict)
    scores = read_table(params["scores"].format(partition=item["partition"]), [column]).column(column)
    values = scores.cast(pa.float64()).fill_null(np.nan).to_numpy()[rows]
    if params["threshold"] is not None:
        keep = threshold_keep(values, params["threshold"])
        details = [f"{reason} {v:.4f} below the threshold {params['threshold']}" for v in values[~keep]]
    else:
        boundary = Boundary(*params["boundary"]) if params["boundary"] is not None else None
        uids = verdict.column("uid").to_numpy(zero_copy_only=False)[rows].astype(str)
        keep = keep_at_or_above(values, uids, boundary)
        fraction, entering, cut = params["fraction"], params["entering"], params["cut"]
        details = [f"{reason} {v:.4f} outside the top {fraction:g} of {entering} ({cut} kept)" for v in values[~keep]]
    return updates(rows[~keep], reason, details)


def score_step(rule, reason: str, column: str) -> Step:
    """A score cut: by threshold per partition; by fraction, the global boundary first."""

    def decide(run: StepRun) -> dict:
        scores = run.ctx.read_pattern("embed")
        params = {"reason": reason, "column": column, "scores": scores, "threshold": rule.threshold,
                  "fraction": rule.fraction, "boundary": None, "entering": run.entering, "cut": 0}
        if rule.threshold is not None:
            return params
        items = [{"partition": i, "verdict": url, "scores": scores.format(partition=i), "column": column}
                 for i, url in sorted(run.inputs.items()) if run.survivors[i]]
        cut = RadixCut(run.entering, rule.fraction)
        while cut.histogram_wanted:
            hist = np.zeros(1 << 16, dtype=np.int64)
            for result in map_items(score_histogram, [{**item, "prefix": cut.prefix} for item in items], num_cpus=run.cpus,
                                    timeout_s=run.timeout_s):
                hist += result["histogram"]
            cut.add_histogram(hist)
        if not cut.empty:
            members = sorted(map_items(score_members, [{**item, "prefix": cut.prefix} for item in items], num_cpus=run.cpus,
                                       timeout_s=run.timeout_s),
                             key=lambda r: r["partition"])
            boundary = cut.boundary([m["keys"] for m in members], [m["uids"] for m in members])
            params["boundary"] = [boundary.score, boundary.uid]
        params["cut"] = keep_count(run.entering, rule.fraction)
        return params

    return Step(reason, decide=decide, local=score_local)


# -- SQL predicate ------------------------------------------------------------------------------

def where_local(verdict: pa.Table, item: dict) -> pa.Table:
    """Drop survivors for which select.where is not true, evaluated by DuckDB over this
    partition's metadata (its ingest fields, verdict so far, scores and clusters)."""
    params, partition = item["params"], item["partition"]
    where = params["where"]
    extras = [read_table(url.format(partition=partition)) for url in params["extras"]]
    table = build_metadata(read_table(params["ingest"].format(partition=partition)), verdict, extras)
    samples = table.filter(table.column("kept"))
    con = duckdb.connect()
    con.register("samples", samples)
    try:
        passing = {row[0] for row in con.execute(f"select uid from samples where ({where})").fetchall()}
    except duckdb.Error as exc:
        raise SelectError(f"select.where {where!r} failed: {exc}") from exc
    rows = survivor_rows(verdict)
    uids = verdict.column("uid").to_numpy(zero_copy_only=False)[rows]
    rejected = rows[np.array([u not in passing for u in uids], dtype=bool)]
    return updates(rejected, "sql_filter", [f"select.where is not true: {where}"] * len(rejected))


def where_step(extra_stages: list[str]) -> Step:
    def decide(run: StepRun) -> dict:
        return {"where": run.config.select.where, "ingest": run.ctx.read_pattern("ingest"),
                "extras": [run.ctx.read_pattern(stage) for stage in extra_stages]}

    return Step("where", decide=decide, local=where_local)


def run(ctx) -> None:
    extra_stages = [stage for stage in ("embed", "cluster", "faces") if ctx.reading(stage)]
    rules = ctx.config.select
    steps = []
    if rules.subset:
        steps.append(Step("subset", local=subset_local))
    if rules.faces == "drop":
        steps.append(faces_step())
    if rules.clip.enabled:
        steps.append(score_step(rules.clip, "clip_score", "clip_score"))
    if rules.dfn.enabled:
        steps.append(score_step(rules.dfn, "dfn_score", "dfn_score"))
    if rules.dbp.enabled:
        steps.append(select_dbp.dbp_step())
    if rules.where:
        steps.append(where_step(extra_stages))
    inputs = {p.index: ctx.read("dedup", p.index) for p in ctx.partitions}
    result = run_steps(ctx, NAME, steps, inputs)
    ctx.record.samples_in, ctx.record.samples_out = result["samples_in"], result["samples_out"]
    states = ctx.record.counts["steps"]
    if "dbp" in states and states["dbp"]["params"].get("counts"):
        ctx.record.counts["dbp"] = states["dbp"]["params"]["counts"]
    if "where" in states:
        ctx.record.counts["sql_filter"] = {"dropped": sum(s["dropped"].get("sql_filter", 0)
                                                          for s in states["where"]["applied"].values())}
