"""Stage 4, dedup: duplicate uids, exact duplicates, perceptual (pHash) and semantic (SemDeDup).

A duplicate can sit in any shard, so the hash-based steps run over the whole pool in one Ray task
that reads only the small columns they need. SemDeDup then runs per cluster in parallel: Ray Data
shuffles the survivors' embeddings by cluster, so no process holds more than its clusters. Each
step sees only the survivors of the steps before it (algorithms.md section 7).
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.algorithms.exact_dup import exact_duplicates
from pipeline.algorithms.near_dup import hamming_distance, near_duplicates
from pipeline.algorithms.semdedup import semdedup_cluster_with_similarity
from pipeline.io.decisions import Decisions
from pipeline.io.embeddings import read_vectors
from pipeline.io.parquet import read_table, read_tables
from pipeline.io.reference import ReferencePart, published_with_embeddings
from pipeline.ray_adapter import cluster_gpus, group_map, run_remote

log = logging.getLogger("curate")
NAME = "dedup"


def config_fingerprint(config) -> dict:
    return {"dedup": config.dedup.model_dump(mode="json")}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME)]


def drop_duplicate_uids(decisions: Decisions, published: set[str] = frozenset()) -> None:
    """Keep the first survivor of each uid (pool order); uids must be unique to join on them.
    A uid an earlier run (the reference chain) already published is taken too."""
    rows = decisions.survivors()
    uids = decisions.uid[rows]
    taken = np.array([u in published for u in uids], dtype=bool)
    if taken.any():
        decisions.drop(rows[taken], "duplicate_uid", [f"uid {u} already published by the reference run" for u in uids[taken]],
                       duplicate_of=uids[taken])
        rows, uids = rows[~taken], uids[~taken]
    _, first = np.unique(uids, return_index=True)
    later = np.setdiff1d(np.arange(len(rows)), first)
    if len(later):
        owner = dict(zip(uids[first], rows[first]))
        details = [f"uid {u} already used by the sample at row {owner[u]} of the pool" for u in uids[later]]
        decisions.drop(rows[later], "duplicate_uid", details, duplicate_of=uids[later])


def drop_exact_duplicates(decisions: Decisions, sha256: np.ndarray, published: dict[str, str] | None = None) -> None:
    """Same image bytes: keep the smallest uid; against an earlier run, its published sample wins."""
    rows = decisions.survivors()
    if published:
        hit = np.array([sha256[r] in published for r in rows], dtype=bool)
        targets = [published[sha256[r]] for r in rows[hit]]
        details = [f"same image bytes (sha256 {sha256[r][:16]}...) as {t}, published earlier" for r, t in zip(rows[hit], targets)]
        decisions.drop(rows[hit], "exact_duplicate", details, duplicate_of=targets)
        rows = rows[~hit]
    dropped, duplicate_of = exact_duplicates(sha256[rows], decisions.uid[rows])
    dup_rows = rows[dropped]
    kept_uids = decisions.uid[rows[duplicate_of[dropped]]]
    details = [f"same image bytes (sha256 {sha256[r][:16]}...) as {k}" for r, k in zip(dup_rows, kept_uids)]
    decisions.drop(dup_rows, "exact_duplicate", details, duplicate_of=kept_uids)


def drop_near_duplicates(
    decisions: Decisions, phash: np.ndarray, radius: int, threads: int,
    published_hashes: np.ndarray | None = None, published_uids: np.ndarray | None = None,
) -> None:
    """pHash components within `radius`; each keeps its smallest uid, or a published sample when
    the component reaches one (published samples sort first: their uids get a '0' prefix)."""
    rows = decisions.survivors()
    extra = 0 if published_hashes is None else len(published_hashes)
    hashes = phash[rows].astype(np.uint64)
    names = np.array(["1" + u for u in decisions.uid[rows]], dtype=object)
    uids = decisions.uid[rows]
    if extra:
        hashes = np.concatenate([published_hashes.astype(np.uint64), hashes])
        names = np.concatenate([np.array(["0" + u for u in published_uids], dtype=object), names])
        uids = np.concatenate([np.asarray(published_uids, dtype=object), uids])
    dropped, duplicate_of = near_duplicates(hashes, names.astype(str), radius, n_threads=threads)
    ours = np.flatnonzero(dropped[extra:]) + extra  # published samples are never dropped here
    targets = duplicate_of[ours]
    distance = hamming_distance(hashes[ours], hashes[targets])
    kept_uids = uids[targets]
    details = [
        f"pHash {int(d)} bits from {k}{', published earlier' if t < extra else ''} (linked within radius {radius})"
        for d, k, t in zip(distance, kept_uids, targets)
    ]
    decisions.drop(rows[ours - extra], "near_duplicate", details, duplicate_of=kept_uids, phash_distance=distance)


def hash_dedup(config, ingest_urls: dict[int, str], out_urls: dict[int, str], reference=None) -> dict:
    """Duplicate uids, exact and perceptual duplicates over the whole pool (and against what the
    reference chain published); writes the verdicts."""
    decisions = Decisions.load(ingest_urls)
    samples_in = len(decisions.survivors())
    published = reference.kept(["uid", "sha256", "phash"]) if reference is not None else None
    drop_duplicate_uids(decisions, set(published.column("uid").to_pylist()) if published is not None else set())
    columns = ["sha256", "phash"]
    tables = read_tables([ingest_urls[p] for p in sorted(ingest_urls)], columns)
    if config.dedup.exact:
        sha256 = np.concatenate([t.column("sha256").to_numpy(zero_copy_only=False).astype(object) for t in tables])
        earlier = None
        if published is not None:
            earlier = {}
            for sha, uid in zip(published.column("sha256").to_pylist(), published.column("uid").to_pylist()):
                if sha not in earlier or uid < earlier[sha]:
                    earlier[sha] = uid
        drop_exact_duplicates(decisions, sha256, earlier)
    if config.dedup.phash:
        phash = np.concatenate([t.column("phash").fill_null(0).to_numpy() for t in tables]).astype(np.uint64)
        if published is not None and published.num_rows:
            drop_near_duplicates(decisions, phash, config.dedup.phash_radius, 2,
                                 published.column("phash").to_numpy().astype(np.uint64),
                                 published.column("uid").to_numpy(zero_copy_only=False).astype(object))
        else:
            drop_near_duplicates(decisions, phash, config.dedup.phash_radius, threads=2)
    decisions.write(out_urls)
    return {"samples_in": samples_in, "samples_out": len(decisions.survivors()), "dropped": dict(decisions.dropped_by_step)}


def survivors_by_cluster(item: dict) -> dict:
    """One partition's dedup survivors (or a reference part's published samples) with their
    cluster, distance to its centroid and image embedding."""
    if item["kind"] == "reference":
        part = ReferencePart(item["run"], item["metadata"], item["embeddings"] or None)
        table, matrix = published_with_embeddings(part, ["uid", "cluster", "dist_to_centroid"])
        if table.column("cluster").null_count:
            raise ValueError(f"reference run {item['run']} has no dedup clusters: run it with dedup.semantic")
        return {
            "cluster": table.column("cluster").to_numpy().astype(np.int64),
            "uid": table.column("uid").to_numpy(zero_copy_only=False).astype(str),
            "dist": table.column("dist_to_centroid").to_numpy().astype(np.float32),
            "embedding": matrix,
            "published": np.ones(table.num_rows, dtype=bool),
        }
    verdict = read_table(item["verdict"], ["uid", "drop_reason"])
    clusters = read_table(item["cluster"], ["cluster", "dist_to_centroid"])
    present, matrix = read_vectors(item["embed"])
    alive = verdict.column("drop_reason").is_null().to_numpy(zero_copy_only=False)
    clustered = clusters.column("cluster").is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(alive & clustered & present)
    position = np.cumsum(present) - 1
    return {
        "cluster": clusters.column("cluster").to_numpy(zero_copy_only=False)[rows].astype(np.int64),
        "uid": verdict.column("uid").to_numpy(zero_copy_only=False)[rows].astype(str),
        "dist": clusters.column("dist_to_centroid").to_numpy(zero_copy_only=False)[rows].astype(np.float32),
        "embedding": matrix[position[rows]] if len(rows) else np.empty((0, matrix.shape[1] if matrix.ndim == 2 else 1), np.float32),
        "published": np.zeros(len(rows), dtype=bool),
    }


def semdedup_group(batch: dict, eps: float, block_size: int, device: str) -> dict:
    """SemDeDup on one cluster; returns only its dropped members.

    Published members of an earlier run are visited first (their distances are shifted past any
    real one, keeping their own order), so a new sample is dropped when it duplicates a published
    one or an earlier new one, and a published sample is never dropped here."""
    embeddings = np.asarray(np.stack(batch["embedding"]) if batch["embedding"].dtype == object else batch["embedding"], np.float32)
    published = np.asarray(batch["published"], dtype=bool)
    dist = np.asarray(batch["dist"], np.float32) + np.where(published, 4.0, 0.0).astype(np.float32)
    dropped, duplicate_of, similarity = semdedup_cluster_with_similarity(
        embeddings, dist, batch["uid"], eps, block_size, device=device
    )
    dropped &= ~published
    uids = np.asarray(batch["uid"])
    return {
        "uid": uids[dropped],
        "duplicate_of": uids[duplicate_of[dropped]],
        "similarity": similarity[dropped].astype(np.float32),
        "cluster": np.asarray(batch["cluster"])[dropped],
    }


def apply_semantic(config, verdict_urls: dict[int, str], dropped: dict) -> dict:
    decisions = Decisions.load(verdict_urls)
    index = {uid: row for row, uid in zip(decisions.survivors(), decisions.uid[decisions.survivors()])}
    order = np.argsort(dropped["uid"], kind="stable")  # deterministic whatever order groups finished in
    rows = np.array([index[u] for u in dropped["uid"][order]], dtype=np.int64)
    eps = config.dedup.semantic_eps
    details = [
        f"cosine {s:.4f} > {1 - eps:.4f} with {d} in cluster {c}"
        for s, d, c in zip(dropped["similarity"][order], dropped["duplicate_of"][order], dropped["cluster"][order])
    ]
    decisions.drop(rows, "semantic_duplicate", details, duplicate_of=dropped["duplicate_of"][order],
                   duplicate_similarity=dropped["similarity"][order])
    decisions.write(verdict_urls)
    return {"samples_out": len(decisions.survivors()), "dropped": int(len(rows))}


def run(ctx) -> None:
    indices = [p.index for p in ctx.partitions]
    ingest_urls = {i: ctx.paths.stage_part("ingest", i) for i in indices}
    out_urls = {i: ctx.paths.stage_part(NAME, i) for i in indices}
    result = run_remote(hash_dedup, ctx.config, ingest_urls, out_urls, ctx.reference, num_cpus=1)
    ctx.record.samples_in = result["samples_in"]
    ctx.record.samples_out = result["samples_out"]
    ctx.record.counts["dropped"] = result["dropped"]
    settings = ctx.config.dedup
    if not settings.semantic:
        return
    items = [
        {"kind": "new", "verdict": out_urls[i], "cluster": ctx.paths.stage_part("cluster", i),
         "embed": ctx.paths.stage_part("embed", i), "run": "", "metadata": "", "embeddings": ""}
        for i in indices
    ]
    if ctx.reference is not None:
        items += [
            {"kind": "reference", "verdict": "", "cluster": "", "embed": "", "run": part.run,
             "metadata": part.metadata, "embeddings": part.embeddings}
            for part in ctx.reference.parts()
        ]
    device = "cuda" if cluster_gpus() >= 1 else "cpu"
    kwargs = {"eps": settings.semantic_eps, "block_size": settings.block_size, "device": device}
    pieces = list(group_map(
        items, survivors_by_cluster, "cluster", lambda batch: semdedup_group(batch, **kwargs),
        num_cpus=1, num_gpus=0.5 if device == "cuda" else 0,
    ))
    columns = ("uid", "duplicate_of", "similarity", "cluster")
    dropped = {name: np.concatenate([p[name] for p in pieces]) if pieces else np.empty(0) for name in columns}
    semantic = run_remote(apply_semantic, ctx.config, out_urls, dropped)
    ctx.record.samples_out = semantic["samples_out"]
    ctx.record.counts["dropped"]["semantic_duplicate"] = semantic["dropped"]
