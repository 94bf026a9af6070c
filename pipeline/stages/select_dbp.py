"""Density-based pruning as a decision step of select (docs/algorithms.md section 6).

map: k-means trains on a seeded sample of the survivors' image embeddings (gathered from the
partitions holding the sampled rows: at most dbp.max_train_points vectors), every partition
assigns its survivors to the centroids (kept per partition: resumable) and sums per cluster its
members and their exact distances; aggregate: the driver adds those K-sized sums and solves the
quotas (K clusters, never N samples); shuffle: survivors' (cluster, distance, uid) records meet
by cluster, where each cluster keeps its hardest members up to its quota. A cluster is one
group, so a task holds the records of whole clusters (about 60 bytes a member). With
select.dbp.dims the embeddings are reduced first (pipeline.stages.reduction).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa

from pipeline.algorithms.dbp import cluster_quotas, cluster_sums, complexity_from_sums, quota_bounds, select_in_clusters
from pipeline.algorithms.kmeans import assign_to_centroids, train_spherical_kmeans
from pipeline.algorithms.score_cut import keep_count
from pipeline.io import fs
from pipeline.io.decisions import survivor_rows, updates
from pipeline.io.embeddings import read_vectors
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import gpus_per_worker, map_items, run_remote
from pipeline.stages import training_sample
from pipeline.stages.reduction import Space, projection_url, stored_width
from pipeline.stages.training_sample import stacked, vectors_table
from pipeline.stages.steps import Step, StepRun, integer_buckets, shuffle_decide, with_partition

log = logging.getLogger("curate")
DBP_CENTROIDS = "dbp_centroids.npy"
DBP_ASSIGNMENT = "select_dbp"


class DbpError(ValueError):
    pass


def outputs(paths) -> list[str]:
    return [paths.stage_dir(DBP_ASSIGNMENT), paths.url("clusters", DBP_CENTROIDS),
            projection_url(paths.url("clusters", DBP_CENTROIDS)), paths.url("clusters", "dbp.parquet")]


def space(dbp, paths) -> Space:
    """The space DBP's concept clustering works in."""
    return Space.of("select.dbp", dbp, paths.url("clusters", DBP_CENTROIDS))


def dbp_target(dbp, entering: int) -> int:
    """The number of samples DBP keeps: a count, or a fraction of the samples entering it."""
    target = dbp.target if isinstance(dbp.target, int) else keep_count(entering, dbp.target)
    return min(target, entering)


def _load_centroids(url: str) -> np.ndarray:
    return np.load(io.BytesIO(fs.read_bytes(url)), allow_pickle=False)


# -- map: training sample, assignment, per-cluster sums -----------------------------------------

def sample_embeddings(item: dict) -> pa.Table:
    """The image embeddings of this partition's sampled survivors (picks: positions among them)."""
    rows = survivor_rows(read_table(item["verdict"], ["drop_reason"]))
    present, matrix = read_vectors(item["embed"])
    chosen = rows[np.asarray(item["picks"], dtype=np.int64)]
    if not present[chosen].all():
        raise DbpError(f"partition {item['partition']}: a sample reaching DBP has no image embedding")
    return vectors_table(item["space"].for_sample(matrix[(np.cumsum(present) - 1)[chosen]]))


def train_centroids(dbp, k: int, centroids_url: str, *samples: pa.Table) -> int:
    """Spherical k-means on the gathered sample (partition order); saves the centroids."""
    sample = Space.of("select.dbp", dbp, centroids_url).fit(stacked(samples))
    import faiss

    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    centroids = train_spherical_kmeans(sample, k, niter=dbp.niter, seed=dbp.seed, max_train_points=dbp.max_train_points,
                                       use_gpu=use_gpu)
    buffer = io.BytesIO()
    np.save(buffer, centroids, allow_pickle=False)
    fs.write_bytes_atomic(centroids_url, buffer.getvalue())
    return len(centroids)


def assign_dbp_partition(item: dict) -> dict:
    """dbp_cluster and dbp_dist_to_centroid for one partition's survivors (null for the others)."""
    verdict = read_table(item["verdict"], ["uid", "drop_reason"])
    rows = survivor_rows(verdict)
    present, matrix = read_vectors(item["embed"])
    centroids = _load_centroids(item["centroids"])
    n = verdict.num_rows
    cluster = np.full(n, -1, np.int32)
    dist = np.full(n, np.nan, np.float32)
    if len(rows):
        if not present[rows].all():
            raise DbpError(f"partition {item['partition']}: a sample reaching DBP has no image embedding")
        cluster[rows], dist[rows] = assign_to_centroids(item["space"].apply(matrix[(np.cumsum(present) - 1)[rows]]),
                                                        centroids)
    missing = cluster < 0
    write_table_atomic(pa.table({
        "uid": verdict.column("uid"),
        "dbp_cluster": pa.array(cluster, pa.int32(), mask=missing),
        "dbp_dist_to_centroid": pa.array(dist, pa.float32(), mask=missing),
    }), item["out"])
    return {"partition": item["partition"], "samples": int(len(rows))}


def _assigned(table: pa.Table, cluster: str = "dbp_cluster", dist: str = "dbp_dist_to_centroid"):
    valid = table.column(cluster).is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid)
    labels = table.column(cluster).fill_null(0).to_numpy().astype(np.int64)[rows]
    dists = table.column(dist).cast(pa.float64()).fill_null(0.0).to_numpy()[rows]
    return rows, labels, dists


def cluster_aggregate(item: dict) -> dict:
    """Members and exact distance sums per cluster of one partition's assignment (or of the
    samples of a reference part that entered DBP, with how many of them it published)."""
    columns = ["dbp_cluster", "dbp_dist_to_centroid"] + (["kept"] if item.get("reference") else [])
    table = read_table(item["assignment"], columns)
    rows, labels, dists = _assigned(table)
    sizes, sums = cluster_sums(labels, dists, item["k"])
    published = np.zeros(item["k"], np.int64)
    if item.get("reference"):
        kept = table.column("kept").to_numpy(zero_copy_only=False)[rows]
        published = np.bincount(labels[kept], minlength=item["k"]).astype(np.int64)
    return {"partition": item["partition"], "sizes": sizes, "sums": sums, "published": published}


def _added(fn, items: list[dict], k: int, timeout_s: float | None) -> dict:
    """Per-cluster aggregates of many partitions, added up as they arrive (the driver holds K of each)."""
    total = {"sizes": np.zeros(k, np.int64), "sums": [0] * k, "published": np.zeros(k, np.int64)}
    for result in map_items(fn, items, num_cpus=1, timeout_s=timeout_s):
        total["sizes"] += result["sizes"]
        total["published"] += result["published"]
        total["sums"] = [a + b for a, b in zip(total["sums"], result["sums"])]
    return total


# -- shuffle: the hardest members of each cluster -------------------------------------------------

def emit_members(item: dict, buckets: int, **_) -> pa.Table:
    verdict = read_table(item["verdict"], ["uid", "drop_reason"])
    alive = survivor_rows(verdict)
    rows, labels, dists = _assigned(read_table(item["assignment"], ["dbp_cluster", "dbp_dist_to_centroid"]))
    if not np.array_equal(alive, rows):
        raise DbpError(f"partition {item['partition']}: DBP cluster assignments do not match the samples entering DBP")
    return pa.table({"bucket": integer_buckets(labels, buckets), "cluster": labels, "dist": dists,
                     "uid": verdict.column("uid").to_numpy(zero_copy_only=False)[rows].astype(str),
                     "partition": np.full(len(rows), item["partition"], np.int64), "row": rows.astype(np.int64)})


def decide_members(records: pa.Table, left: list[int], quotas: list[int], new_sizes: list[int]) -> pa.Table:
    """In each cluster keep the `left[c]` members farthest from the centroid (ties: uid); prune the rest."""
    cluster = records.column("cluster").to_numpy()
    keep = select_in_clusters(cluster, records.column("dist").to_numpy(),
                              records.column("uid").to_numpy(zero_copy_only=False).astype(str), np.asarray(left, np.int64))
    pruned = np.flatnonzero(~keep)
    details = [f"cluster {c} keeps its {left[c]} hardest new of {new_sizes[c]} samples" for c in cluster[pruned]]
    rows = records.column("row").to_numpy()[pruned]
    return with_partition(updates(rows, "dbp_pruned", details), records.column("partition").to_numpy()[pruned])


def assignment_values(item: dict) -> dict[str, np.ndarray] | None:
    """Every sample that reached DBP records its concept cluster and distance, kept or pruned."""
    pattern = item["params"].get("assignment")
    if not pattern:
        return None
    table = read_table(pattern.format(partition=item["partition"]), ["dbp_cluster", "dbp_dist_to_centroid"])
    return {name: table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy() for name in table.column_names}


# -- the step ---------------------------------------------------------------------------------------

def dbp_step() -> Step:
    return Step("dbp", decide=decide, values=assignment_values)


def decide(run: StepRun) -> dict:
    """Quotas per concept cluster and the hardest members up to them; with a reference, a top-up.

    A top-up assigns to the reference's centroids, treats the reference chain's samples that
    entered DBP as part of the pool (for the cluster statistics and a fractional target) and its
    kept samples as already spent: a cluster's quota is at least what it published, and only new
    samples fill the rest."""
    dbp, paths, reference = run.config.select.dbp, run.ctx.paths, run.ctx.reference
    entering = run.entering
    if entering == 0:
        return {"assignment": None, "counts": None}
    centroids_url = paths.url("clusters", DBP_CENTROIDS)
    reduced = space(dbp, paths)
    stored = stored_width(run.ctx.read("embed", min(run.inputs)))
    reduced.check(stored, "the stored image embeddings")
    earlier = reference.artifact("clusters", DBP_CENTROIDS) if reference else None
    if not run.state.get("trained"):
        if earlier is not None:
            reduced.check_centroids(_load_centroids(earlier), stored, earlier)
            reduced.copy_from(earlier)
            fs.write_bytes_atomic(centroids_url, fs.read_bytes(earlier))
        else:
            _train(run, centroids_url, reduced)
        run.state["trained"] = True
        run.save()
    k = len(_load_centroids(centroids_url))
    pattern = paths.stage_part_pattern(DBP_ASSIGNMENT)
    assigned = run.state.setdefault("assigned", [])
    items = [{"partition": i, "verdict": url, "embed": run.ctx.read("embed", i), "centroids": centroids_url,
              "out": pattern.format(partition=i), "space": reduced}
             for i, url in sorted(run.inputs.items()) if i not in assigned]
    for result in map_items(assign_dbp_partition, items, num_cpus=1, timeout_s=run.timeout_s):
        assigned.append(result["partition"])
        run.save()
    new = _added(cluster_aggregate, [{"partition": i, "assignment": pattern.format(partition=i), "k": k}
                                     for i in sorted(run.inputs)], k, run.timeout_s)
    earlier = _added(cluster_aggregate, [{"partition": -1 - j, "assignment": part.metadata, "k": k, "reference": True}
                                         for j, part in enumerate(reference.parts())] if reference else [], k,
                     run.timeout_s)
    new_sizes = new["sizes"]
    sizes_all = new_sizes + earlier["sizes"]
    sums_all = [a + b for a, b in zip(new["sums"], earlier["sums"])]
    published = earlier["published"]
    sizes, d_intra, d_inter = complexity_from_sums(_load_centroids(centroids_url), sizes_all, sums_all,
                                                   n_neighbors=dbp.n_neighbors)
    room = published + new_sizes  # pruned earlier samples cannot come back
    target = dbp_target(dbp, int(sizes_all.sum()))
    floor = np.maximum(quota_bounds(room, target, balance_ratio=dbp.balance_ratio), np.minimum(published, room))
    if target < floor.sum():
        log.info("select.dbp: target %d is below what the reference published plus the per-cluster minimum (%d)", target, floor.sum())
        target = int(floor.sum())
    quotas = cluster_quotas(room, d_intra, d_inter, target, dbp.temperature, balance_ratio=dbp.balance_ratio, minimum=published)
    left = quotas - published
    items = [{"partition": i, "verdict": url, "assignment": pattern.format(partition=i)}
             for i, url in sorted(run.inputs.items())]
    kwargs = {"left": left.tolist(), "quotas": quotas.tolist(), "new_sizes": new_sizes.tolist()}
    shuffle_decide(run, emit_members, items, decide_members, kwargs, records=entering)
    kept_new = np.minimum(left, new_sizes)
    _write_cluster_table(paths.url("clusters", "dbp.parquet"), sizes, d_intra, d_inter, quotas, kept_new + published,
                         published if reference is not None else None)
    counts = {"entering": int(entering), "target": int(target), "kept": int(kept_new.sum()), "k": int(k),
              "published_earlier": int(published.sum())}
    if reduced.reduces:
        counts["dims"] = {"dims": reduced.dims, "reduce": reduced.method, "stored": stored}
    return {"assignment": pattern, "counts": counts}


def _train(run: StepRun, centroids_url: str, reduced: Space) -> None:
    """k-means on a seeded sample of the survivors, fetched from the partitions that hold it."""
    dbp = run.config.select.dbp
    items = [{"partition": i, "verdict": url, "embed": run.ctx.read("embed", i), "space": reduced}
             for i, url in sorted(run.inputs.items())]
    refs, sampled = training_sample.gather(items, run.survivors, dbp.max_train_points, dbp.seed, sample_embeddings)
    k = min(dbp.k, sampled, dbp_target(dbp, run.entering))
    if k < dbp.k:
        log.info("select.dbp: k=%d (capped from %d by the %d samples entering DBP and the target)", k, dbp.k, run.entering)
    gpus = gpus_per_worker(run.ctx.resources)
    run_remote(train_centroids, dbp, k, centroids_url, *refs, num_gpus=gpus)


def _write_cluster_table(url, sizes, d_intra, d_inter, quotas, kept, published) -> None:
    k = len(sizes)
    complexity = d_intra * d_inter
    table = {
        "clustering": pa.array(["dbp"] * k),
        "cluster": pa.array(np.arange(k), pa.int32()),
        "size": pa.array(sizes, pa.int64()),
        "d_intra": pa.array(d_intra, pa.float64(), mask=np.isnan(d_intra)),
        "d_inter": pa.array(d_inter, pa.float64(), mask=np.isnan(d_inter)),
        "complexity": pa.array(complexity, pa.float64(), mask=np.isnan(complexity)),
        "quota": pa.array(quotas, pa.int64()),
        "kept": pa.array(kept, pa.int64()),
    }
    if published is not None:
        table["published_earlier"] = pa.array(published, pa.int64())
    write_table_atomic(pa.table(table), url)
