"""Stage 5, select: CLIP / DFN score filters, density-based pruning (DBP), then a SQL predicate.

Each step sees only the survivors of the steps before it, in the fixed order of algorithms.md
section 7. The score cuts and the DBP quotas are global decisions made in one Ray task over small
columns (scores, clusters, distances); DBP's k-means assignment of the survivors' embeddings runs
per partition in parallel.
"""

from __future__ import annotations

import io
import logging

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.algorithms.dbp import cluster_complexity, cluster_quotas, quota_bounds, select_in_clusters
from pipeline.algorithms.kmeans import assign_to_centroids, train_sample, train_spherical_kmeans
from pipeline.algorithms.score_cut import keep_count, threshold_keep, top_fraction_keep
from pipeline.io import fs
from pipeline.io.assemble import build_metadata
from pipeline.io.datacomp import read_subset
from pipeline.io.decisions import Decisions
from pipeline.io.embeddings import read_vectors
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import cluster_gpus, map_items, run_remote
from pipeline.schema import METADATA_SCHEMA

log = logging.getLogger("curate")
NAME = "select"
DBP_CENTROIDS = "dbp_centroids.npy"
DBP_ASSIGNMENT = "select_dbp"


class SelectError(ValueError):
    pass


def config_fingerprint(config) -> dict:
    return {"select": config.select.model_dump(mode="json")}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME), paths.stage_dir(DBP_ASSIGNMENT), paths.url("clusters", DBP_CENTROIDS),
            paths.url("clusters", "dbp.parquet")]


def check_where(where: str) -> None:
    """Fail at start, not after hours of work, when the predicate does not bind to the columns."""
    con = duckdb.connect()
    con.register("samples", METADATA_SCHEMA.empty_table())
    try:
        con.execute(f"select uid from samples where ({where})").fetchall()
    except duckdb.Error as exc:
        raise SelectError(f"select.where {where!r} is not a valid predicate over the metadata columns: {exc}") from exc


# -- score filters ----------------------------------------------------------------------------

def _scores(embed_urls: dict[int, str], column: str) -> np.ndarray:
    parts = [read_table(embed_urls[p], [column]).column(column) for p in sorted(embed_urls)]
    return np.concatenate([c.cast(pa.float64()).fill_null(np.nan).to_numpy() for c in parts]) if parts else np.empty(0)


def apply_score_filter(decisions: Decisions, scores: np.ndarray, rule, reason: str) -> None:
    rows = decisions.survivors()
    values = scores[rows]
    if rule.threshold is not None:
        keep = threshold_keep(values, rule.threshold)
        details = [f"{reason} {v:.4f} below the threshold {rule.threshold}" for v in values[~keep]]
    else:
        keep = top_fraction_keep(values, decisions.uid[rows], rule.fraction)
        cut = keep_count(len(rows), rule.fraction)
        details = [f"{reason} {v:.4f} outside the top {rule.fraction:g} of {len(rows)} ({cut} kept)" for v in values[~keep]]
    decisions.drop(rows[~keep], reason, details)


def score_filters(config, verdict_urls: dict[int, str], embed_urls: dict[int, str], out_urls: dict[int, str]) -> dict:
    """The given subset (if any), then the CLIP and DFN score cuts."""
    decisions = Decisions.load(verdict_urls)
    samples_in = len(decisions.survivors())
    if config.select.subset:
        wanted = read_subset(config.select.subset)
        rows = decisions.survivors()
        outside = rows[[u not in wanted for u in decisions.uid[rows]]]
        decisions.drop(outside, "not_in_subset", [f"uid not in {config.select.subset}"] * len(outside))
    if config.select.clip.enabled:
        apply_score_filter(decisions, _scores(embed_urls, "clip_score"), config.select.clip, "clip_score")
    if config.select.dfn.enabled:
        apply_score_filter(decisions, _scores(embed_urls, "dfn_score"), config.select.dfn, "dfn_score")
    decisions.write(out_urls)
    return {"samples_in": samples_in, "samples_out": len(decisions.survivors())}


# -- DBP --------------------------------------------------------------------------------------

def dbp_target(dbp, entering: int) -> int:
    """The number of samples DBP keeps: a count, or a fraction of the samples entering it."""
    target = dbp.target if isinstance(dbp.target, int) else keep_count(entering, dbp.target)
    return min(target, entering)


def _survivor_rows(verdict_url: str) -> np.ndarray:
    return np.flatnonzero(read_table(verdict_url, ["drop_reason"]).column("drop_reason").is_null().to_numpy(zero_copy_only=False))


def train_dbp(config, verdict_urls: dict[int, str], embed_urls: dict[int, str], centroids_url: str) -> dict:
    """k-means on a seeded sample of the survivors' image embeddings; saves the centroids."""
    dbp = config.select.dbp
    survivors = {p: _survivor_rows(verdict_urls[p]) for p in sorted(verdict_urls)}
    total = sum(len(rows) for rows in survivors.values())
    if total == 0:
        return {"k": 0, "entering": 0}
    chosen = train_sample(total, dbp.max_train_points, dbp.seed)
    sample, start = [], 0
    for partition, rows in survivors.items():
        picks = chosen[(chosen >= start) & (chosen < start + len(rows))] - start
        start += len(rows)
        if len(picks):
            present, matrix = read_vectors(embed_urls[partition])
            sample.append(matrix[(np.cumsum(present) - 1)[rows[picks]]])
    sample = np.concatenate(sample)
    k = min(dbp.k, len(sample), dbp_target(dbp, total))
    if k < dbp.k:
        log.info("select.dbp: k=%d (capped from %d by the %d samples entering DBP and the target)", k, dbp.k, total)
    import faiss

    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    centroids = train_spherical_kmeans(sample, k, niter=dbp.niter, seed=dbp.seed, max_train_points=dbp.max_train_points, use_gpu=use_gpu)
    buffer = io.BytesIO()
    np.save(buffer, centroids, allow_pickle=False)
    fs.write_bytes_atomic(centroids_url, buffer.getvalue())
    return {"k": k, "entering": total}


def assign_dbp_partition(item: dict) -> dict:
    """dbp_cluster and dbp_dist_to_centroid for one partition's survivors (null for the others)."""
    verdict = read_table(item["verdict"], ["uid", "drop_reason"])
    rows = np.flatnonzero(verdict.column("drop_reason").is_null().to_numpy(zero_copy_only=False))
    present, matrix = read_vectors(item["embed"])
    centroids = np.load(io.BytesIO(fs.read_bytes(item["centroids"])), allow_pickle=False)
    n = verdict.num_rows
    cluster = np.full(n, -1, np.int32)
    dist = np.full(n, np.nan, np.float32)
    if len(rows):
        if not present[rows].all():
            raise SelectError(f"partition {item['partition']}: a sample reaching DBP has no image embedding")
        cluster[rows], dist[rows] = assign_to_centroids(matrix[(np.cumsum(present) - 1)[rows]], centroids)
    missing = cluster < 0
    table = pa.table({
        "uid": verdict.column("uid"),
        "dbp_cluster": pa.array(cluster, pa.int32(), mask=missing),
        "dbp_dist_to_centroid": pa.array(dist, pa.float32(), mask=missing),
    })
    write_table_atomic(table, item["out"])
    return {"partition": item["partition"], "samples": int(len(rows))}


def apply_dbp(config, verdict_urls: dict[int, str], assignment_urls: dict[int, str], centroids_url: str,
              table_url: str, reference=None) -> dict:
    """Quotas per concept cluster and the hardest members up to them; with a reference, a top-up.

    A top-up treats the reference chain's samples that entered DBP as part of the pool (for the
    cluster statistics and a fractional target) and its kept samples as already spent: a
    cluster's quota is at least what it published, and only new samples fill the rest."""
    dbp = config.select.dbp
    decisions = Decisions.load(verdict_urls)
    tables = [read_table(assignment_urls[p]) for p in sorted(assignment_urls)]
    cluster = np.concatenate([t.column("dbp_cluster").fill_null(-1).to_numpy() for t in tables]).astype(np.int64)
    dist = np.concatenate([t.column("dbp_dist_to_centroid").cast(pa.float64()).fill_null(np.nan).to_numpy() for t in tables])
    rows = decisions.survivors()
    if not np.array_equal(rows, np.flatnonzero(cluster >= 0)):
        raise SelectError("DBP cluster assignments do not match the samples entering DBP")
    centroids = np.load(io.BytesIO(fs.read_bytes(centroids_url)), allow_pickle=False)
    k = len(centroids)
    ref_cluster, ref_dist, published = np.empty(0, np.int64), np.empty(0), np.zeros(k, np.int64)
    if reference is not None:
        earlier = reference.rows(["dbp_cluster", "dbp_dist_to_centroid", "kept"])
        entered = earlier.filter(earlier.column("dbp_cluster").is_valid())
        ref_cluster = entered.column("dbp_cluster").to_numpy().astype(np.int64)
        ref_dist = entered.column("dbp_dist_to_centroid").cast(pa.float64()).to_numpy()
        ref_kept = entered.column("kept").to_numpy(zero_copy_only=False)
        published = np.bincount(ref_cluster[ref_kept], minlength=k).astype(np.int64)
    all_cluster = np.concatenate([ref_cluster, cluster[rows]])
    sizes, d_intra, d_inter = cluster_complexity(centroids, all_cluster, np.concatenate([ref_dist, dist[rows]]),
                                                 n_neighbors=dbp.n_neighbors)
    new_sizes = np.bincount(cluster[rows], minlength=k).astype(np.int64)
    room = published + new_sizes  # pruned earlier samples cannot come back
    target = dbp_target(dbp, len(all_cluster))
    floor = np.maximum(quota_bounds(room, target, balance_ratio=dbp.balance_ratio), np.minimum(published, room))
    if target < floor.sum():
        log.info("select.dbp: target %d is below what the reference published plus the per-cluster minimum (%d)", target, floor.sum())
        target = int(floor.sum())
    quotas = cluster_quotas(room, d_intra, d_inter, target, dbp.temperature, balance_ratio=dbp.balance_ratio, minimum=published)
    keep = select_in_clusters(cluster[rows], dist[rows], decisions.uid[rows], quotas - published)
    decisions.set_values("dbp_cluster", rows, cluster[rows])
    decisions.set_values("dbp_dist_to_centroid", rows, dist[rows])
    pruned = rows[~keep]
    details = [f"cluster {c} keeps its {quotas[c] - published[c]} hardest new of {new_sizes[c]} samples" for c in cluster[pruned]]
    decisions.drop(pruned, "dbp_pruned", details)
    decisions.write(verdict_urls)
    complexity = d_intra * d_inter
    kept = np.bincount(cluster[rows][keep], minlength=k)
    table = {
        "clustering": pa.array(["dbp"] * k),
        "cluster": pa.array(np.arange(k), pa.int32()),
        "size": pa.array(sizes, pa.int64()),
        "d_intra": pa.array(d_intra, pa.float64(), mask=np.isnan(d_intra)),
        "d_inter": pa.array(d_inter, pa.float64(), mask=np.isnan(d_inter)),
        "complexity": pa.array(complexity, pa.float64(), mask=np.isnan(complexity)),
        "quota": pa.array(quotas, pa.int64()),
        "kept": pa.array(kept + published, pa.int64()),
    }
    if reference is not None:
        table["published_earlier"] = pa.array(published, pa.int64())
    write_table_atomic(pa.table(table), table_url)
    return {"entering": int(len(rows)), "target": int(target), "kept": int(keep.sum()), "k": int(k),
            "published_earlier": int(published.sum())}


# -- SQL predicate ----------------------------------------------------------------------------

def apply_where(config, verdict_urls: dict[int, str], ingest_urls: dict[int, str], extra_urls: dict[int, list[str]]) -> dict:
    """Drop survivors for which select.where is not true, evaluated by DuckDB over their metadata."""
    where = config.select.where
    decisions = Decisions.load(verdict_urls)
    survivors = decisions.survivors()
    tables = []
    for partition in sorted(verdict_urls):
        table = build_metadata(
            read_table(ingest_urls[partition]), read_table(verdict_urls[partition]),
            [read_table(url) for url in extra_urls[partition]],
        )
        tables.append(table.filter(table.column("kept")))
    samples = pa.concat_tables(tables) if tables else METADATA_SCHEMA.empty_table()
    con = duckdb.connect()
    con.register("samples", samples)
    try:
        passing = {row[0] for row in con.execute(f"select uid from samples where ({where})").fetchall()}
    except duckdb.Error as exc:
        raise SelectError(f"select.where {where!r} failed: {exc}") from exc
    rejected = np.array([r for r in survivors if decisions.uid[r] not in passing], dtype=np.int64)
    decisions.drop(rejected, "sql_filter", [f"select.where is not true: {where}"] * len(rejected))
    decisions.write(verdict_urls)
    return {"dropped": int(len(rejected))}


def run(ctx, extra_stages: list[str]) -> None:
    indices = [p.index for p in ctx.partitions]
    paths = ctx.paths
    dedup_urls = {i: paths.stage_part("dedup", i) for i in indices}
    embed_urls = {i: paths.stage_part("embed", i) for i in indices}
    out_urls = {i: paths.stage_part(NAME, i) for i in indices}
    settings = ctx.config.select
    result = run_remote(score_filters, ctx.config, dedup_urls, embed_urls, out_urls)
    ctx.record.samples_in, ctx.record.samples_out = result["samples_in"], result["samples_out"]
    if settings.dbp.enabled:
        centroids_url = paths.url("clusters", DBP_CENTROIDS)
        earlier = ctx.reference.artifact("clusters", DBP_CENTROIDS) if ctx.reference else None
        if earlier is not None:  # a top-up assigns to the reference's concept clusters
            fs.write_bytes_atomic(centroids_url, fs.read_bytes(earlier))
            trained = {"entering": run_remote(_survivor_count, out_urls)}
        else:
            gpus = 1 if cluster_gpus() >= 1 else 0
            trained = run_remote(train_dbp, ctx.config, out_urls, embed_urls, centroids_url, num_gpus=gpus)
        if trained["entering"]:
            assignment_urls = {i: paths.stage_part(DBP_ASSIGNMENT, i) for i in indices}
            items = [{"partition": i, "verdict": out_urls[i], "embed": embed_urls[i], "centroids": centroids_url,
                      "out": assignment_urls[i]} for i in indices]
            for _ in map_items(assign_dbp_partition, items, num_cpus=1):
                pass
            ctx.record.counts["dbp"] = run_remote(
                apply_dbp, ctx.config, out_urls, assignment_urls, centroids_url, paths.url("clusters", "dbp.parquet"),
                ctx.reference,
            )
    if settings.where:
        extra_urls = {i: [paths.stage_part(stage, i) for stage in extra_stages] for i in indices}
        ingest_urls = {i: paths.stage_part("ingest", i) for i in indices}
        ctx.record.counts["sql_filter"] = run_remote(apply_where, ctx.config, out_urls, ingest_urls, extra_urls)
    decisions = run_remote(_survivor_count, out_urls)
    ctx.record.samples_out = decisions


def _survivor_count(verdict_urls: dict[int, str]) -> int:
    return int(sum(len(_survivor_rows(url)) for url in verdict_urls.values()))
