"""Stage 3, cluster: spherical k-means of image embeddings, the fine clusters SemDeDup works in.

Training runs once, on a seeded sample of the embeddings of samples that survived ingest and the
basic filter, as a Ray task (GPU when the cluster has one); assignment of every embedded sample
runs per partition in parallel. Centroids are saved so a later run can assign to them instead of
training (`cluster.centroids`, or a reference run's). With cluster.dims the embeddings are reduced
first (pipeline.stages.reduction); SemDeDup then compares in the same reduced space.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa

from pipeline.algorithms.kmeans import assign_to_centroids, train_spherical_kmeans
from pipeline.io import fs
from pipeline.io.embeddings import read_vectors
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import gpus_per_worker, map_items, run_remote
from pipeline.stages import training_sample
from pipeline.stages.reduction import Space, projection_url, stored_width
from pipeline.stages.training_sample import stacked, vectors_table

log = logging.getLogger("curate")
NAME = "cluster"
CENTROIDS = "dedup_centroids.npy"
CLUSTER_SCHEMA = pa.schema([("uid", pa.string()), ("cluster", pa.int32()), ("dist_to_centroid", pa.float32())])


def config_fingerprint(config) -> dict:
    # the reduction's options at their defaults change nothing: left out, so earlier runs resume
    unreduced = {"dims", "reduce"} if config.cluster.dims is None else set()
    return {"cluster": config.cluster.model_dump(mode="json", exclude=unreduced)}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME), paths.url("clusters", CENTROIDS), projection_url(paths.url("clusters", CENTROIDS)),
            paths.url("clusters", "dedup.parquet")]


def space(config, paths) -> Space:
    """The space the dedup clustering and SemDeDup work in."""
    return Space.of("cluster", config.cluster, paths.url("clusters", CENTROIDS))


def save_centroids(centroids: np.ndarray, url: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, centroids.astype(np.float32), allow_pickle=False)
    fs.write_bytes_atomic(url, buffer.getvalue())


def load_centroids(url: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(fs.read_bytes(url)), allow_pickle=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"centroids {url} not found") from exc


def eligible_rows(item: dict) -> np.ndarray:
    """Rows of a partition that survived ingest and have an image embedding (what k-means may train on)."""
    reasons = read_table(item["ingest"], ["drop_reason"]).column("drop_reason")
    embedded = read_table(item["embed"], ["image_embedding"]).column("image_embedding").is_valid()
    ok = np.asarray(reasons.is_null().to_numpy(zero_copy_only=False)) & np.asarray(embedded.to_numpy(zero_copy_only=False))
    return np.flatnonzero(ok)


def count_eligible(item: dict) -> dict:
    return {"partition": item["partition"], "count": int(len(eligible_rows(item)))}


def sample_vectors(item: dict) -> pa.Table:
    """The embeddings of this partition's sampled rows (picks: positions among its eligible rows)."""
    rows = eligible_rows(item)[np.asarray(item["picks"], dtype=np.int64)]
    present, matrix = read_vectors(item["embed"])
    return vectors_table(item["space"].for_sample(matrix[(np.cumsum(present) - 1)[rows]]))


def train(config, centroids_url: str, eligible: int, *samples: pa.Table) -> dict:
    """Train and save the centroids on the gathered sample; returns k and the training sample size.

    k follows the `eligible` samples that will be clustered, not the training sample: capped at
    max_train_points, the sample would leave k fixed and let clusters, and SemDeDup's cost per
    cluster, grow with the pool."""
    settings = config.cluster
    sample = stacked(samples)
    if len(sample) == 0:
        raise ValueError("no embedded samples survived ingest and the basic filter: nothing to cluster")
    sample = Space.of("cluster", settings, centroids_url).fit(sample)
    k = settings.k or max(1, round(eligible / settings.samples_per_cluster))
    if k > len(sample):
        log.warning("cluster.k=%d exceeds the %d training samples; using k=%d", k, len(sample), len(sample))
        k = len(sample)
    import faiss

    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    centroids = train_spherical_kmeans(
        sample, k, niter=settings.niter, seed=settings.seed, max_train_points=settings.max_train_points, use_gpu=use_gpu
    )
    save_centroids(centroids, centroids_url)
    return {"k": k, "trained_on": len(sample)}


def cluster_sizes(item: dict) -> dict:
    """Members per cluster in one partition's assignment."""
    cluster = read_table(item["out"], ["cluster"]).column("cluster")
    valid = cluster.drop_null().to_numpy().astype(np.int64)
    return {"partition": item["partition"], "sizes": np.bincount(valid, minlength=item["k"])}


def assign_partition(item: dict) -> dict:
    uids = read_table(item["ingest"], ["uid"]).column("uid")
    present, matrix = read_vectors(item["embed"])
    centroids = load_centroids(item["centroids"])
    cluster = np.full(len(present), -1, np.int32)
    dist = np.full(len(present), np.nan, np.float32)
    if len(matrix):
        cluster[present], dist[present] = assign_to_centroids(item["space"].apply(matrix), centroids)
    table = pa.table(
        {
            "uid": uids,
            "cluster": pa.array(cluster, pa.int32(), mask=~present),
            "dist_to_centroid": pa.array(dist, pa.float32(), mask=~present),
        },
        schema=CLUSTER_SCHEMA,
    )
    write_table_atomic(table, item["out"])
    return {"partition": item["partition"], "samples": int(present.sum())}


def run(ctx) -> None:
    indices = [p.index for p in ctx.partitions]
    ingest_urls = {i: ctx.read("ingest", i) for i in indices}
    embed_urls = {i: ctx.read("embed", i) for i in indices}
    centroids_url = ctx.paths.url("clusters", CENTROIDS)
    settings = ctx.config.cluster
    reduced = space(ctx.config, ctx.paths)
    stored = stored_width(embed_urls[indices[0]])
    reduced.check(stored, "the stored image embeddings")
    # An incremental run assigns to its reference's centroids, so clusters mean the same every day.
    given = settings.centroids or (ctx.reference.artifact("clusters", CENTROIDS) if ctx.reference else None)
    if given is not None:
        if not fs.exists(centroids_url):
            centroids = load_centroids(given)
            reduced.check_centroids(centroids, stored, given)
            reduced.copy_from(given)
            save_centroids(centroids, centroids_url)
        ctx.record.counts["centroids_from"] = given
    elif "trained_on" not in ctx.record.counts:
        # The record, not the file, says whether training is done: centroids a killed run saved
        # before recording them are trained again (seeded: the same), so their counts are not lost.
        sources = [{"partition": i, "ingest": ingest_urls[i], "embed": embed_urls[i], "space": reduced}
                   for i in indices]
        counts = {r["partition"]: r["count"] for r in map_items(count_eligible, sources, num_cpus=1, timeout_s=ctx.item_timeout_s)}
        samples, _ = training_sample.gather(sources, counts, settings.max_train_points, settings.seed, sample_vectors)
        gpus = gpus_per_worker(ctx.resources)
        ctx.record.counts.update(run_remote(train, ctx.config, centroids_url, sum(counts.values()), *samples, num_gpus=gpus))
        ctx.manifest.set_stage(ctx.stage_name, ctx.record)  # at once: a resume does not train again
    items = [
        {"partition": i, "ingest": ingest_urls[i], "embed": embed_urls[i], "centroids": centroids_url,
         "out": ctx.paths.stage_part(NAME, i), "space": reduced}
        for i in ctx.todo(indices)
    ]
    for result in map_items(assign_partition, items, num_cpus=1, timeout_s=ctx.item_timeout_s):
        ctx.partition_done(result["partition"], {"samples": result["samples"]})
    stats = ctx.record.counts.get("partitions", {}).values()
    k = len(load_centroids(centroids_url))
    sizes = np.zeros(k, np.int64)  # added up as partitions report: the driver holds K counts, not P x K
    for result in map_items(cluster_sizes, [{"partition": i, "out": ctx.paths.stage_part(NAME, i), "k": k}
                                            for i in indices], num_cpus=1, timeout_s=ctx.item_timeout_s):
        sizes += result["sizes"]
    write_table_atomic(
        pa.table({"clustering": pa.array(["dedup"] * len(sizes)), "cluster": pa.array(np.arange(len(sizes)), pa.int32()),
                  "size": pa.array(sizes, pa.int64())}),
        ctx.paths.url("clusters", "dedup.parquet"),
    )
    ctx.record.samples_in = ctx.record.samples_out = int(sum(s["samples"] for s in stats))
    ctx.record.counts["k"] = int(len(sizes))
    if reduced.reduces:
        ctx.record.counts["dims"] = {"dims": reduced.dims, "reduce": reduced.method, "stored": stored}
