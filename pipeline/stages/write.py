"""Stage 6, write: reshard the kept samples into balanced WebDataset shards, bytes untouched.

The plan (which kept sample goes to which output shard) depends only on the metadata, so output
shards are independent work items and a rerun redoes only the missing ones. Each worker fetches a
sample's members by the byte ranges ingest recorded, checks the image against its recorded
sha256, writes a tar with fixed headers, re-lists it, and returns what it really wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
import tempfile

from pipeline.io import fs
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
    return [paths.shards_dir]


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


def write_shard(spec: dict, out_url: str, read_block_bytes: int) -> tuple[int, int]:
    """Write one output shard; returns (samples written, uid digest) as read back from the tar."""
    by_source: dict[str, list[dict]] = {}
    for sample in spec["samples"]:
        by_source.setdefault(sample["source"], []).append(sample)
    local_dir = os.path.dirname(out_url) if not fs.has_protocol(out_url) else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=local_dir, prefix=".tmp-", suffix=".tar", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        with open(tmp_path, "wb") as handle, TarWriter(handle) as writer:
            for source, samples in by_source.items():
                fetched = fetch_members(source, samples, block_size=read_block_bytes)
                for sample, members in zip(samples, fetched):  # pool order within the shard
                    if hashlib.sha256(members["image"]).hexdigest() != sample["sha256"]:
                        raise WriteError(f"shard {source}: sample {sample['uid']}: image bytes differ from those ingested")
                    writer.add(f"{sample['uid']}.{sample['image_ext']}", members["image"])
                    writer.add(f"{sample['uid']}.txt", members["text"])
                    if members["json"] is not None:
                        writer.add(f"{sample['uid']}.json", members["json"])
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


def write_shard_item(item: dict) -> dict:
    spec = json.loads(item["spec"])  # nested plans travel as JSON, not as Arrow structs
    count, digest = write_shard(spec, item["out"], item["read_block_bytes"])
    return {"partition": spec["shard"], "count": count, "digest": str(digest)}


def run(ctx) -> None:
    metadata_urls = [ctx.paths.metadata_part(p.index) for p in ctx.partitions]
    partition_urls = {p.index: p.url for p in ctx.partitions}
    plan = plan_shards(metadata_urls, partition_urls, ctx.config.write.shard_size)
    ctx.record.counts["partitions_total"] = len(plan)
    todo = set(ctx.todo([spec["shard"] for spec in plan]))
    items = [
        {"spec": json.dumps(spec), "out": ctx.paths.shard(spec["shard"]), "read_block_bytes": ctx.config.write.read_block_bytes}
        for spec in plan
        if spec["shard"] in todo
    ]
    for result in map_items(write_shard_item, items, num_cpus=1):
        ctx.partition_done(result["partition"], {"count": result["count"], "digest": result["digest"]})
    stats = ctx.record.counts["partitions"]
    sizes = {os.path.basename(ctx.paths.shard(spec["shard"])): stats[str(spec["shard"])]["count"] for spec in plan}
    fs.write_bytes_atomic(ctx.paths.url("shards", "sizes.json"), (json.dumps(sizes, indent=1) + "\n").encode())
    ctx.record.samples_in = sum(len(spec["samples"]) for spec in plan)
    ctx.record.samples_out = sum(sizes.values())
    ctx.record.counts["shards"] = len(plan)
    ctx.record.counts["digest"] = str(sum(int(stats[str(s["shard"])]["digest"]) for s in plan) % (1 << 128))
    _remove_stale_shards(ctx, len(plan))


def _remove_stale_shards(ctx, count: int) -> None:
    """Shards numbered beyond the plan (left by an earlier run with more kept samples) go."""
    keep = {os.path.basename(ctx.paths.shard(i)) for i in range(count)}
    for url in fs.list_files(ctx.paths.shards_dir, ".tar"):
        if os.path.basename(url) not in keep:
            fsys, path = fs.to_fs(url)
            fsys.rm(path)
