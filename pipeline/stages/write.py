"""Stage 6, write: reshard the kept samples into balanced WebDataset shards, bytes untouched.

The plan (which kept sample goes to which output shard) depends only on the metadata, so output
shards are independent work items and a rerun redoes only the missing ones. Each worker fetches a
sample's members by the byte ranges ingest recorded, checks the image against its recorded
sha256, writes a tar with fixed headers, re-lists it, and returns what it really wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import uuid

import numpy as np

from pipeline.io import fs
from pipeline.io.datacomp import write_subset
from pipeline.io.embeddings import vectors
from pipeline.io.parquet import read_table
from pipeline.io.shards import fetch_members
from pipeline.io.tar import TarWriter
from pipeline.ray_adapter import map_items

NAME = "write"
PLAN_COLUMNS = [
    "uid", "partition", "row", "kept", "sha256", "image_ext",
    "image_offset", "image_size", "text_offset", "text_size", "json_offset", "json_size",
]


class WriteError(RuntimeError):
    pass


def config_fingerprint(config) -> dict:
    return {"write": config.write.model_dump(mode="json", exclude={"read_block_bytes"})}


def outputs(paths) -> list[str]:
    return [paths.shards_dir, paths.url("datacomp_subset.npy")]


def uid_digest(uids) -> int:
    """Order-independent fingerprint of a multiset of uids (sum of 128-bit hashes mod 2^128)."""
    total = 0
    for uid in uids:
        total += int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=16).digest(), "big")
    return total % (1 << 128)


def balanced_sizes(count: int, shard_size: int) -> list[int]:
    """Split `count` into ceil(count / shard_size) shards whose sizes differ by at most one."""
    if count == 0:
        return []
    shards = math.ceil(count / shard_size)
    base, extra = divmod(count, shards)
    return [base + (1 if j < extra else 0) for j in range(shards)]


def plan_shards(metadata_urls: list[str], partition_urls: dict[int, str], shard_size: int) -> list[dict]:
    """Kept samples in pool order (partition, row), cut into balanced output shards."""
    rows: list[dict] = []
    for url in metadata_urls:
        table = read_table(url, PLAN_COLUMNS)
        kept = table.filter(table.column("kept"))
        rows.extend(kept.drop_columns(["kept"]).to_pylist())
    rows.sort(key=lambda r: (r["partition"], r["row"]))
    plan, start = [], 0
    for index, size in enumerate(balanced_sizes(len(rows), shard_size)):
        samples = rows[start : start + size]
        start += size
        for sample in samples:
            sample["source"] = partition_urls[sample["partition"]]
        plan.append({"shard": index, "samples": samples})
    return plan


def _npy(vector: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vector, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def teacher_embeddings(spec: dict, embedding_urls: dict[int, str]) -> dict[str, tuple[bytes, bytes | None]]:
    """uid -> (.npy of the image embedding, .npy of the text embedding or None)."""
    wanted: dict[int, list[dict]] = {}
    for sample in spec["samples"]:
        wanted.setdefault(sample["partition"], []).append(sample)
    members = {}
    for partition, samples in wanted.items():
        table = read_table(embedding_urls[partition], ["image_embedding", "text_embedding"])
        image_present, images = vectors(table.column("image_embedding"))
        text_present, texts = vectors(table.column("text_embedding"))
        image_at, text_at = np.cumsum(image_present) - 1, np.cumsum(text_present) - 1
        for sample in samples:
            row = sample["row"]
            if not image_present[row]:
                raise WriteError(f"sample {sample['uid']} has no image embedding to write")
            text = _npy(texts[text_at[row]]) if text_present[row] else None
            members[sample["uid"]] = (_npy(images[image_at[row]]), text)
    return members


def write_shard(spec: dict, out_url: str, read_block_bytes: int, embedding_urls: dict[int, str] | None = None,
                progress=None) -> tuple[int, int]:
    """Write one output shard; returns (samples written, uid digest) as read back from the tar.

    `progress`, when given, is called with `samples=1` after each sample is written.
    """
    teacher = teacher_embeddings(spec, embedding_urls) if embedding_urls else {}
    by_source: dict[str, list[dict]] = {}
    for sample in spec["samples"]:
        by_source.setdefault(sample["source"], []).append(sample)
    local_dir = os.path.dirname(out_url) if not fs.has_protocol(out_url) else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    # Not tempfile's files: those are created 0600, and os.replace would keep that mode on the shard.
    # A plain exclusive open gives the mode any file gets (0666 less the umask).
    tmp_path = os.path.join(local_dir or tempfile.gettempdir(), f".tmp-{uuid.uuid4().hex}.tar")
    try:
        with open(tmp_path, "xb") as handle, TarWriter(handle) as writer:
            for source, samples in by_source.items():
                fetched = fetch_members(source, samples, block_size=read_block_bytes)
                for sample, members in zip(samples, fetched):  # pool order within the shard
                    if hashlib.sha256(members["image"]).hexdigest() != sample["sha256"]:
                        raise WriteError(f"shard {source}: sample {sample['uid']}: image bytes differ from those ingested")
                    writer.add(f"{sample['uid']}.{sample['image_ext']}", members["image"])
                    writer.add(f"{sample['uid']}.txt", members["text"])
                    if members["json"] is not None:
                        writer.add(f"{sample['uid']}.json", members["json"])
                    if sample["uid"] in teacher:
                        image_npy, text_npy = teacher[sample["uid"]]
                        writer.add(f"{sample['uid']}.image_embedding.npy", image_npy)
                        if text_npy is not None:
                            writer.add(f"{sample['uid']}.text_embedding.npy", text_npy)
                    if progress is not None:
                        progress(samples=1)
        with tarfile.open(tmp_path, "r:") as check:
            written = {m.name.split(".", 1)[0] for m in check.getmembers()}
        expected = [s["uid"] for s in spec["samples"]]
        if written != set(expected) or len(expected) != len(written):
            raise WriteError(f"output shard {out_url}: wrote {len(written)} samples, planned {len(expected)}")
        if local_dir:
            os.replace(tmp_path, out_url)
        else:
            fs.put_file_atomic(tmp_path, out_url)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return len(written), uid_digest(written)


def write_shard_item(item: dict, progress=None) -> dict:
    spec = item["spec"]
    count, digest = write_shard(spec, item["out"], item["read_block_bytes"], item["embeddings"], progress)
    return {"partition": spec["shard"], "count": count, "digest": str(digest)}


def run(ctx) -> None:
    metadata_urls = [ctx.paths.metadata_part(p.index) for p in ctx.partitions]
    partition_urls = {p.index: p.url for p in ctx.partitions}
    plan = plan_shards(metadata_urls, partition_urls, ctx.config.write.shard_size)
    ctx.record.counts["partitions_total"] = len(plan)
    todo = set(ctx.todo([spec["shard"] for spec in plan]))
    embedding_urls = {p.index: ctx.paths.stage_part("embed", p.index) for p in ctx.partitions} if ctx.config.write.embeddings else {}
    items = [
        {"spec": spec, "out": ctx.paths.shard(spec["shard"]), "embeddings": embedding_urls,
         "read_block_bytes": ctx.config.write.read_block_bytes}
        for spec in plan
        if spec["shard"] in todo
    ]
    progress = ctx.progress(sum(len(spec["samples"]) for spec in plan if spec["shard"] in todo))
    for result in map_items(write_shard_item, items, num_cpus=1, progress=progress):
        ctx.partition_done(result["partition"], {"count": result["count"], "digest": result["digest"]})
    stats = ctx.record.counts.get("partitions", {})
    sizes = {os.path.basename(ctx.paths.shard(spec["shard"])): stats[str(spec["shard"])]["count"] for spec in plan}
    fs.write_bytes_atomic(ctx.paths.url("shards", "sizes.json"), (json.dumps(sizes, indent=1) + "\n").encode())
    ctx.record.samples_in = sum(len(spec["samples"]) for spec in plan)
    ctx.record.samples_out = sum(sizes.values())
    ctx.record.counts["shards"] = len(plan)
    ctx.record.counts["digest"] = str(sum(int(stats[str(s["shard"])]["digest"]) for s in plan) % (1 << 128))
    _remove_stale_shards(ctx, len(plan))
    if ctx.config.write.subset_file:
        kept_uids = [sample["uid"] for spec in plan for sample in spec["samples"]]
        write_subset(ctx.paths.url("datacomp_subset.npy"), kept_uids)


def _remove_stale_shards(ctx, count: int) -> None:
    """Shards numbered beyond the plan (left by an earlier run with more kept samples) go."""
    keep = {os.path.basename(ctx.paths.shard(i)) for i in range(count)}
    for url in fs.list_files(ctx.paths.shards_dir, ".tar"):
        if os.path.basename(url) not in keep:
            fsys, path = fs.to_fs(url)
            fsys.rm(path)
