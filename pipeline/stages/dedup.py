"""Stage 4, dedup: duplicate uids, exact duplicates, perceptual (pHash) and semantic (SemDeDup).

A duplicate can sit in any shard, so each step is a global one (pipeline.stages.steps): every
partition emits small keyed records of its survivors (uid; sha256; pHash index-table keys; cluster
and embedding), Ray Data shuffles them by key so that every group of possible duplicates meets in
one task, and each partition then applies the drops routed back to it. No process holds the pool:
a shuffle task holds about ray.rows_per_bucket records. Each step sees only the survivors of the
steps before it (docs/algorithms.md section 7); samples an earlier run published (the reference
chain) take part in every step and are never dropped.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa

from pipeline.algorithms.exact_dup import exact_duplicates
from pipeline.algorithms.near_dup import _compress, connected_components, hamming_distance, index_plan, near_duplicates
from pipeline.algorithms.semdedup import semdedup_cluster_with_similarity
from pipeline.io.datacomp import uid_halves
from pipeline.io.decisions import updates
from pipeline.io.embeddings import read_vectors
from pipeline.io.parquet import read_table
from pipeline.io.reference import ReferencePart, published_with_embeddings
from pipeline.ray_adapter import gpus_per_worker, run_remote
from pipeline.ray_shuffle import group_map, map_to_refs, shuffle_map
from pipeline.stages import cluster
from pipeline.stages.reduction import stored_width
from pipeline.stages.steps import (Step, StepRun, integer_buckets, run_steps, shuffle_decide, string_buckets,
                                   with_partition, write_partition_updates, updates_writer)

log = logging.getLogger("curate")
NAME = "dedup"
PUBLISHED = -1  # the partition number of records from the reference chain's published samples


def config_fingerprint(config) -> dict:
    return {"dedup": config.dedup.model_dump(mode="json")}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME)]


# -- what every step's map reads ----------------------------------------------------------------

def _survivors(item: dict, columns: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A partition's surviving rows and `columns` of them: uid from its verdict, the rest from ingest;
    for a reference part, its published (kept) samples, with row -1."""
    if item["partition"] == PUBLISHED:
        table = read_table(item["metadata"], list(dict.fromkeys(["kept", "uid", *columns])))
        table = table.filter(table.column("kept"))
        return np.full(table.num_rows, -1, np.int64), {c: _values(table.column(c)) for c in ["uid", *columns]}
    verdict = read_table(item["verdict"], ["uid", "drop_reason"])
    rows = np.flatnonzero(verdict.column("drop_reason").is_null().to_numpy(zero_copy_only=False))
    found = {"uid": _values(verdict.column("uid"))[rows]}
    if columns:
        ingest = read_table(item["ingest"], columns)
        found.update({c: _values(ingest.column(c))[rows] for c in columns})
    return rows.astype(np.int64), found


def _values(column) -> np.ndarray:
    if pa.types.is_integer(column.type):  # pHash: uint64, whose nulls would turn the column to float
        return column.fill_null(0).to_numpy()
    return column.to_numpy(zero_copy_only=False).astype(object)


def _items(run: StepRun, reference) -> list[dict]:
    items = run.partition_items(ingest="")
    for item in items:
        item["ingest"] = run.ctx.read("ingest", item["partition"])
    if reference is not None:
        items += [{"partition": PUBLISHED, "metadata": part.metadata} for part in reference.parts()]
    return items


# -- duplicate uids -----------------------------------------------------------------------------

def emit_uids(item: dict, buckets: int, **_) -> pa.Table:
    rows, found = _survivors(item, [])
    uid = found["uid"].astype(str)
    return pa.table({"bucket": string_buckets(uid, buckets), "uid": uid,
                     "partition": np.full(len(rows), item["partition"], np.int64), "row": rows})


def decide_uids(records: pa.Table, offsets: dict) -> pa.Table:
    """Keep the first survivor of each uid in pool order (uids are the join key); a uid an earlier
    run published is taken, and every new sample carrying it goes."""
    uid = records.column("uid").to_numpy(zero_copy_only=False).astype(str)
    partition = records.column("partition").to_numpy()
    row = records.column("row").to_numpy()
    order = np.lexsort((row, partition, uid))  # published (partition -1) first within a uid
    uid, partition, row = uid[order], partition[order], row[order]
    head = np.r_[True, uid[1:] != uid[:-1]]
    first = np.flatnonzero(head)[np.cumsum(head) - 1]
    later = ~head & (partition != PUBLISHED)
    owner_published = partition[first] == PUBLISHED
    details = [
        f"uid {u} already published by the reference run" if published else
        f"uid {u} already used by the sample at row {offsets[str(p)] + r} of the pool"
        for u, published, p, r in zip(uid[later], owner_published[later], partition[first][later], row[first][later])
    ]
    return with_partition(updates(row[later], "duplicate_uid", details, duplicate_of=uid[later]), partition[later])


def uid_step(reference) -> Step:
    def decide(run: StepRun) -> dict:
        offsets, start = {}, 0
        for i in sorted(run.rows):
            offsets[str(i)], start = start, start + run.rows[i]
        dropped = shuffle_decide(run, emit_uids, _items(run, reference), decide_uids, {"offsets": offsets},
                                 records=run.entering + _published(reference))
        return {"dropped": dropped}

    return Step("uid", decide=decide)


def _published(reference) -> int:
    return sum(int(m["counts"]["kept"]) for _, m in reference.runs) if reference is not None else 0


# -- exact duplicates ---------------------------------------------------------------------------

def emit_sha256(item: dict, buckets: int, **_) -> pa.Table:
    rows, found = _survivors(item, ["sha256"])
    sha = np.array([s.lower() if isinstance(s, str) else "" for s in found["sha256"]], dtype=object)
    present = sha != ""  # a missing digest never matches anything
    sha, uid, rows = sha[present].astype(str), found["uid"][present].astype(str), rows[present]
    return pa.table({"bucket": string_buckets(sha, buckets), "sha256": sha, "uid": uid,
                     "partition": np.full(len(rows), item["partition"], np.int64), "row": rows})


def decide_sha256(records: pa.Table) -> pa.Table:
    """Same image bytes: keep the smallest uid; against an earlier run, its published sample wins
    (the smallest published uid of those bytes)."""
    sha = records.column("sha256").to_numpy(zero_copy_only=False).astype(str)
    uid = records.column("uid").to_numpy(zero_copy_only=False).astype(str)
    partition = records.column("partition").to_numpy()
    row = records.column("row").to_numpy()
    published = partition == PUBLISHED
    parts = []
    earlier: dict[str, str] = {}
    for s, u in sorted(zip(sha[published], uid[published]), reverse=True):
        earlier[s] = u  # sorted descending: the smallest uid of each digest is written last
    new = np.flatnonzero(~published)
    hit = np.array([sha[r] in earlier for r in new], dtype=bool)
    if hit.any():
        rows = new[hit]
        targets = [earlier[sha[r]] for r in rows]
        details = [f"same image bytes (sha256 {sha[r][:16]}...) as {t}, published earlier" for r, t in zip(rows, targets)]
        parts.append(with_partition(updates(row[rows], "exact_duplicate", details, duplicate_of=targets), partition[rows]))
    rest = new[~hit]
    dropped, duplicate_of = exact_duplicates(sha[rest], uid[rest])
    rows, keepers = rest[dropped], rest[duplicate_of[dropped]]
    details = [f"same image bytes (sha256 {sha[r][:16]}...) as {uid[k]}" for r, k in zip(rows, keepers)]
    parts.append(with_partition(updates(row[rows], "exact_duplicate", details, duplicate_of=uid[keepers]), partition[rows]))
    return pa.concat_tables(parts)


def exact_step(reference) -> Step:
    def decide(run: StepRun) -> dict:
        return {"dropped": shuffle_decide(run, emit_sha256, _items(run, reference), decide_sha256, {},
                                          records=run.entering + _published(reference))}

    return Step("exact", decide=decide)


# -- perceptual duplicates ----------------------------------------------------------------------
#
# The pHash index (algorithms.near_dup) has tables whose keys are subsets of the 64 bits, chosen so
# that every pair within the radius agrees on some table's key. Spread over the cluster, every
# (table, key) group of survivors is one shuffle group: a bucket links what agrees on a key within
# the radius (components within the bucket, as star edges to any member), and one task joins the
# edges into components across buckets (union-find over the edges only, never over the pool: it
# holds about 60 bytes per sample that has a near duplicate) and keeps each component's smallest
# uid, a published sample before any new one. With one bucket the records go to one task that
# links them all at once, the same components.

def emit_phash(item: dict, buckets: int, plan: list[int], **_) -> pa.Table:
    """One record per survivor, or with several buckets one per survivor and index table."""
    rows, found = _survivors(item, ["phash"])
    phash = np.asarray(found["phash"]).astype(np.uint64)
    halves = uid_halves(found["uid"].astype(str), f"partition {item['partition']}")  # order as the uid strings
    gid = _gids(item["partition"], rows, item.get("index", 0))
    tables = range(len(plan)) if buckets > 1 else [0]
    parts = []
    for t in tables:
        key = _compress(phash, plan[t])[0].astype(np.uint64) if buckets > 1 else np.zeros(len(rows), np.uint64)
        parts.append(pa.table({
            "bucket": integer_buckets(key * np.uint64(len(plan)) + np.uint64(t), buckets),
            "table": np.full(len(rows), t, np.int64), "phash": phash, "gid": gid,
            "hi": halves[:, 0], "lo": halves[:, 1]}))
    return pa.concat_tables(parts)


def _gids(partition: int, rows: np.ndarray, index: int) -> np.ndarray:
    """A sample's id in the links: partition << 32 | row, and -1 - (part << 32 | position) for the
    published samples of reference part `index`."""
    if partition == PUBLISHED:
        return -1 - ((np.int64(index) << np.int64(32)) | np.arange(len(rows), dtype=np.int64))
    return (np.int64(partition) << np.int64(32)) | rows


def _order_names(gid: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Names whose string order is (published first, uid), as near_duplicates keeps the smallest."""
    flag = np.where(gid < 0, "0", "1")
    return np.char.add(flag, np.char.add(np.char.zfill(np.char.mod("%x", hi), 16), np.char.zfill(np.char.mod("%x", lo), 16)))


def _drops_to(gid, phash, names, targets, radius: int) -> pa.Table:
    """Updates for the new samples among `gid` linked to `targets` (indices of their keepers)."""
    ours = np.flatnonzero(gid >= 0)
    ours = ours[targets[ours] != ours]
    keeper = targets[ours]
    distance = hamming_distance(phash[ours], phash[keeper])
    kept = [n[1:] for n in names[keeper]]
    details = [f"pHash {int(d)} bits from {k}{', published earlier' if gid[t] < 0 else ''} (linked within radius {radius})"
               for d, k, t in zip(distance, kept, keeper)]
    return with_partition(
        updates(gid[ours] & np.int64(0xFFFFFFFF), "near_duplicate", details, duplicate_of=kept, phash_distance=distance),
        gid[ours] >> np.int64(32))


def decide_phash_all(records: pa.Table, radius: int, plan: list[int]) -> pa.Table:
    """Every survivor in one task: the components of the whole within-radius graph."""
    gid, phash = records.column("gid").to_numpy(), records.column("phash").to_numpy().astype(np.uint64)
    names = _order_names(gid, records.column("hi").to_numpy(), records.column("lo").to_numpy())
    dropped, duplicate_of = near_duplicates(phash, names, radius, plan=tuple(plan), n_threads=2)
    targets = np.where(dropped, duplicate_of, np.arange(len(gid)))
    return _drops_to(gid, phash, names, targets, radius)


def link_bucket(records: pa.Table, radius: int, plan: list[int]) -> pa.Table:
    """Star edges (member -> one member of its component) of what agrees on a table's key within
    the radius, for each index table in this bucket."""
    table = records.column("table").to_numpy()
    edges = []
    for t in np.unique(table):
        part = records.filter(pa.array(table == t))
        if part.num_rows < 2:
            continue
        gid, phash = part.column("gid").to_numpy(), part.column("phash").to_numpy().astype(np.uint64)
        dropped, duplicate_of = near_duplicates(phash, gid.astype(str), radius, plan=(plan[int(t)],))
        a, b = np.flatnonzero(dropped), duplicate_of[dropped]
        edges.append(pa.table({
            "a": gid[a], "b": gid[b], "a_phash": phash[a], "b_phash": phash[b],
            "a_hi": part.column("hi").to_numpy()[a], "a_lo": part.column("lo").to_numpy()[a],
            "b_hi": part.column("hi").to_numpy()[b], "b_lo": part.column("lo").to_numpy()[b]}))
    if not edges:
        return pa.table({name: pa.array([], kind) for name, kind in _EDGE_TYPES.items()})
    return pa.concat_tables(edges).cast(pa.schema(list(_EDGE_TYPES.items())))


_EDGE_TYPES = {"a": pa.int64(), "b": pa.int64(), "a_phash": pa.uint64(), "b_phash": pa.uint64(),
               "a_hi": pa.uint64(), "a_lo": pa.uint64(), "b_hi": pa.uint64(), "b_lo": pa.uint64()}


def join_links(radius: int, template: str, *edge_tables: pa.Table) -> int:
    """Components over every bucket's edges; each new member not its component's keeper is dropped."""
    edges = pa.concat_tables(edge_tables) if edge_tables else None
    if edges is None or edges.num_rows == 0:
        return 0
    col = lambda name: edges.column(name).to_numpy()
    gid_all = np.concatenate([col("a"), col("b")])
    nodes, first, inverse = np.unique(gid_all, return_index=True, return_inverse=True)
    phash = np.concatenate([col("a_phash"), col("b_phash")])[first].astype(np.uint64)
    names = _order_names(nodes, np.concatenate([col("a_hi"), col("b_hi")])[first],
                         np.concatenate([col("a_lo"), col("b_lo")])[first])
    labels = connected_components(len(nodes), inverse.reshape(2, -1).T)
    order = np.lexsort((names, labels))
    head = np.r_[True, labels[order][1:] != labels[order][:-1]]
    targets = np.empty(len(nodes), np.int64)
    targets[order] = order[np.flatnonzero(head)[np.cumsum(head) - 1]]
    return write_partition_updates(_drops_to(nodes, phash, names, targets, radius), template)


def phash_step(reference) -> Step:
    def decide(run: StepRun) -> dict:
        radius = run.config.dedup.phash_radius
        samples = run.entering + _published(reference)
        plan = [int(mask) for mask in index_plan(radius, samples)]
        items = _items(run, reference)
        for index, item in enumerate(i for i in items if i["partition"] == PUBLISHED):
            item["index"] = index
        buckets = run.buckets(samples * len(plan))
        kwargs = {"radius": radius, "plan": plan}
        if buckets == 1:
            return {"dropped": shuffle_decide(run, emit_phash, items, decide_phash_all, kwargs, records=samples)}
        refs = [ref for _, ref, _ in map_to_refs(emit_phash, items, kwargs={"buckets": buckets, "plan": plan})]
        edges = shuffle_map(refs, "bucket", functools.partial(link_bucket, radius=radius, plan=plan), partitions=buckets,
                            map_batch_bytes=run.shuffle_batch_bytes)
        return {"dropped": run_remote(join_links, radius, run.updates_template, *edges), "buckets": buckets}

    return Step("phash", decide=decide)


# -- semantic duplicates ------------------------------------------------------------------------

def survivors_by_cluster(item: dict) -> dict:
    """One partition's survivors (or a reference part's published samples) with their cluster,
    distance to its centroid, image embedding (in the dedup clustering's space) and where they lie
    (partition, row)."""
    space = item["space"]
    if item["kind"] == "reference":
        part = ReferencePart(item["run"], item["metadata"], item["embeddings"] or None)
        table, matrix = published_with_embeddings(part, ["uid", "cluster", "dist_to_centroid"])
        if table.column("cluster").null_count:
            raise ValueError(f"reference run {item['run']} has no dedup clusters: run it with dedup.semantic")
        n = table.num_rows
        return {
            "cluster": table.column("cluster").to_numpy().astype(np.int64),
            "uid": table.column("uid").to_numpy(zero_copy_only=False).astype(str),
            "dist": table.column("dist_to_centroid").to_numpy().astype(np.float32),
            "embedding": space.apply(matrix, f"the embeddings of reference run {item['run']}"),
            "published": np.ones(n, dtype=bool),
            "partition": np.full(n, PUBLISHED, np.int64), "row": np.full(n, -1, np.int64),
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
        "embedding": space.apply(matrix[position[rows]]),
        "published": np.zeros(len(rows), dtype=bool),
        "partition": np.full(len(rows), item["partition"], np.int64), "row": rows.astype(np.int64),
    }


def semdedup_group(batch: dict, eps: float, block_size: int, device: str) -> pa.Table:
    """SemDeDup on one cluster; returns the updates dropping its duplicates, with their partition.

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
    similarity = similarity[dropped].astype(np.float32)
    targets = uids[duplicate_of[dropped]]
    cluster = np.asarray(batch["cluster"])[dropped]
    details = [f"cosine {s:.4f} > {1 - eps:.4f} with {d} in cluster {c}" for s, d, c in zip(similarity, targets, cluster)]
    update = updates(np.asarray(batch["row"])[dropped], "semantic_duplicate", details, duplicate_of=targets,
                     duplicate_similarity=similarity)
    return with_partition(update, np.asarray(batch["partition"])[dropped])


def semantic_step(reference) -> Step:
    def decide(run: StepRun) -> dict:
        settings = run.config.dedup
        space = cluster.space(run.config, run.ctx.paths)  # SemDeDup compares where the clusters were found
        items = [{"kind": "new", "partition": i, "verdict": url, "cluster": run.ctx.read("cluster", i),
                  "embed": run.ctx.read("embed", i), "run": "", "metadata": "", "embeddings": "", "space": space}
                 for i, url in sorted(run.inputs.items())]
        if reference is not None:
            parts = reference.parts()
            items += [{"kind": "reference", "partition": PUBLISHED, "verdict": "", "cluster": "", "embed": "",
                       "run": part.run, "metadata": part.metadata, "embeddings": part.embeddings or "", "space": space}
                      for part in parts]
            for part in {part.run: part for part in parts if part.embeddings}.values():
                space.check(stored_width(part.embeddings), f"the embeddings of reference run {part.run}")
        gpus = gpus_per_worker(run.ctx.resources)
        device = "cuda" if gpus else "cpu"
        kwargs = {"eps": settings.semantic_eps, "block_size": settings.block_size, "device": device}
        # a reduce task holds whole clusters, about rows_per_bucket survivors of them at a time
        written = group_map(items, survivors_by_cluster, "cluster", functools.partial(semdedup_group, **kwargs), num_cpus=1,
                            num_gpus=gpus, num_partitions=run.buckets(run.entering), map_batch_bytes=run.shuffle_batch_bytes,
                            then=("partition", updates_writer(run.updates_template)))
        return {"dropped": int(sum(int(np.sum(batch["updates"])) for batch in written))}

    return Step("semantic", decide=decide)


def run(ctx) -> None:
    steps = [uid_step(ctx.reference)]
    settings = ctx.config.dedup
    if settings.exact:
        steps.append(exact_step(ctx.reference))
    if settings.phash:
        steps.append(phash_step(ctx.reference))
    if settings.semantic:
        steps.append(semantic_step(ctx.reference))
    inputs = {p.index: ctx.read("ingest", p.index) for p in ctx.partitions}
    result = run_steps(ctx, NAME, steps, inputs)
    ctx.record.samples_in = result["samples_in"]
    ctx.record.samples_out = result["samples_out"]
    ctx.record.counts["dropped"] = result["dropped"]
