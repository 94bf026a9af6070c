"""Stage 3, cluster: spherical k-means of image embeddings, the fine clusters SemDeDup works in.

Training runs once, on a seeded sample of the embeddings of samples that survived ingest and the
basic filter, as a Ray task (GPU when the cluster has one); assignment of every embedded sample
runs per partition in parallel. Centroids are saved so a later run can assign to them instead of
training (`cluster.centroids`, or a reference run's).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa

from pipeline.algorithms.kmeans import assign_to_centroids, train_sample, train_spherical_kmeans
from pipeline.io import fs
from pipeline.io.embeddings import read_vectors
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import gpus_per_worker, map_items, run_remote

log = logging.getLogger("curate")
NAME = "cluster"
CENTROIDS = "dedup_centroids.npy"
CLUSTER_SCHEMA = pa.schema([("uid", pa.string()), ("cluster", pa.int32()), ("dist_to_centroid", pa.float32())])


def config_fingerprint(config) -> dict:
    return {"cluster": config.cluster.model_dump(mode="json")}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME), paths.url("clusters", CENTROIDS), paths.url("clusters", "dedup.parquet")]


def save_centroids(centroids: np.ndarray, url: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, centroids.astype(np.float32), allow_pickle=False)
    fs.write_bytes_atomic(url, buffer.getvalue())


def load_centroids(url: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(fs.read_bytes(url)), allow_pickle=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"centroids {url} not found") from exc


def training_vectors(ingest_urls: dict[int, str], embed_urls: dict[int, str], max_train_points: int, seed: int) -> np.ndarray:
    """The seeded training sample (at most max_train_points) of embeddings of ingest+basic survivors."""
    counts, eligible = [], {}
    for partition in sorted(ingest_urls):
        reasons = read_table(ingest_urls[partition], ["drop_reason"]).column("drop_reason")
        embedded = read_table(embed_urls[partition], ["image_embedding"]).column("image_embedding").is_valid()
        ok = np.asarray(reasons.is_null().to_numpy(zero_copy_only=False)) & np.asarray(embedded.to_numpy(zero_copy_only=False))
        eligible[partition] = np.flatnonzero(ok)
        counts.append(len(eligible[partition]))
    total = sum(counts)
    chosen = train_sample(total, max_train_points, seed) if total else np.empty(0, np.int64)
    parts, start = [], 0
    for partition, count in zip(sorted(ingest_urls), counts):
        picks = chosen[(chosen >= start) & (chosen < start + count)] - start
        start += count
        if len(picks) == 0:
            continue
        present, matrix = read_vectors(embed_urls[partition])
        position = np.cumsum(present) - 1  # row -> index among present rows
        parts.append(matrix[position[eligible[partition][picks]]])
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def train(config, ingest_urls, embed_urls, centroids_url: str) -> dict:
    """Train and save the centroids; returns k and the training sample size."""
    settings = config.cluster
    sample = training_vectors(ingest_urls, embed_urls, settings.max_train_points, settings.seed)
    if len(sample) == 0:
        raise ValueError("no embedded samples survived ingest and the basic filter: nothing to cluster")
    k = settings.k or max(1, round(len(sample) / settings.samples_per_cluster))
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


def assign_partition(item: dict) -> dict:
    uids = read_table(item["ingest"], ["uid"]).column("uid")
    present, matrix = read_vectors(item["embed"])
    centroids = load_centroids(item["centroids"])
    cluster = np.full(len(present), -1, np.int32)
    dist = np.full(len(present), np.nan, np.float32)
    if len(matrix):
        cluster[present], dist[present] = assign_to_centroids(matrix, centroids)
    table = pa.table(
        {
            "uid": uids,
            "cluster": pa.array(cluster, pa.int32(), mask=~present),
            "dist_to_centroid": pa.array(dist, pa.float32(), mask=~present),
        },
        schema=CLUSTER_SCHEMA,
    )
    write_table_atomic(table, item["out"])
    sizes = np.bincount(cluster[present], minlength=len(centroids))
    return {"partition": item["partition"], "samples": int(present.sum()), "sizes": sizes.tolist()}


def run(ctx) -> None:
    indices = [p.index for p in ctx.partitions]
    ingest_urls = {i: ctx.read("ingest", i) for i in indices}
    embed_urls = {i: ctx.read("embed", i) for i in indices}
    centroids_url = ctx.paths.url("clusters", CENTROIDS)
    settings = ctx.config.cluster
    # An incremental run assigns to its reference's centroids, so clusters mean the same every day.
    given = settings.centroids or (ctx.reference.artifact("clusters", CENTROIDS) if ctx.reference else None)
    if given is not None:
        if not fs.exists(centroids_url):
            save_centroids(load_centroids(given), centroids_url)
        ctx.record.counts["centroids_from"] = given
    elif not fs.exists(centroids_url):
        gpus = gpus_per_worker(ctx.resources)
        ctx.record.counts.update(run_remote(train, ctx.config, ingest_urls, embed_urls, centroids_url, num_gpus=gpus))
    items = [
        {"partition": i, "ingest": ingest_urls[i], "embed": embed_urls[i], "centroids": centroids_url,
         "out": ctx.paths.stage_part(NAME, i)}
        for i in ctx.todo(indices)
    ]
    for result in map_items(assign_partition, items, num_cpus=1):
        ctx.partition_done(result["partition"], {"samples": result["samples"], "sizes": result["sizes"]})
    stats = ctx.record.counts.get("partitions", {}).values()
    sizes = np.sum([np.asarray(s["sizes"]) for s in stats], axis=0) if stats else np.zeros(0)
    write_table_atomic(
        pa.table({"clustering": pa.array(["dedup"] * len(sizes)), "cluster": pa.array(np.arange(len(sizes)), pa.int32()),
                  "size": pa.array(sizes, pa.int64())}),
        ctx.paths.url("clusters", "dedup.parquet"),
    )
    ctx.record.samples_in = ctx.record.samples_out = int(sum(s["samples"] for s in stats))
    ctx.record.counts["k"] = int(len(sizes))
