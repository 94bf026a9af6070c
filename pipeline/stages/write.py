"""Stage 6, write: reshard the kept samples into balanced WebDataset shards, bytes untouched.

The plan (which kept sample goes to which output shard) depends only on each partition's kept
count, which the metadata stage recorded, so the driver never reads a sample: output shard j is a
few slices of partitions' kept rows. Output shards are independent work items and a rerun redoes
only the missing ones. Each worker reads the metadata of its slices' partitions, fetches a
sample's members by the byte ranges ingest recorded, checks the image against its recorded
sha256, writes a tar with fixed headers, re-lists it, and returns what it really wrote. With
write.blur_faces an image with a face is the one exception: it is published blurred and
re-encoded (pipeline.faces.blur_faces), checked against the digest the faces stage recorded.
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
from pipeline.io.datacomp import SUBSET_DTYPE, save_subset, uids_to_subset
from pipeline.io.embeddings import vectors
from pipeline.io.parquet import read_table
from pipeline.io.shards import fetch_members
from pipeline.io.tar import TarWriter
from pipeline.ray_adapter import map_items, run_remote

NAME = "write"
PLAN_COLUMNS = [
    "uid", "partition", "row", "kept", "sha256", "image_ext", "image_format",
    "image_offset", "image_size", "text_offset", "text_size", "text_sha256", "json_offset", "json_size", "json_sha256",
    "face_bboxes", "faces_blurred", "blurred_sha256",
]
# The extension an image is published under, from the format its bytes decoded as (a .jpg member
# holding a PNG is written as .png, so that readers choosing a decoder by extension get it right).
FORMAT_EXTENSIONS = {"JPEG": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",), "GIF": ("gif",),
                     "BMP": ("bmp",), "TIFF": ("tiff", "tif")}


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


def plan_slices(kept: dict[int, int], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """Kept samples in pool order (partition, row), cut into balanced output shards.

    `kept` is each partition's number of kept samples. Output shard j (the list at index j) is a
    run of consecutive kept samples, given as `(partition, first, stop)` slices of those
    partitions' kept rows in row order; partitions without kept samples appear in no slice.
    """
    counts = [(partition, count) for partition, count in sorted(kept.items()) if count]
    plan = []
    at, first = 0, 0  # the partition (index into counts) and its first kept row not yet planned
    for size in balanced_sizes(sum(count for _, count in counts), shard_size):
        slices = []
        while size:
            partition, count = counts[at]
            stop = min(count, first + size)
            slices.append((partition, first, stop))
            size -= stop - first
            at, first = (at + 1, 0) if stop == count else (at, stop)
        plan.append(slices)
    return plan


def kept_counts(ctx) -> dict[int, int]:
    """Kept samples per partition, from the metadata stage's record (that stage ran before this one)."""
    record = ctx.manifest.stage("metadata")
    stats = record.counts.get("partitions", {}) if record is not None else {}
    missing = [p.name for p in ctx.partitions if str(p.index) not in stats]
    if missing:
        raise WriteError(f"the metadata stage recorded no kept count for {len(missing)} partitions ({missing[0]}, ...)")
    return {p.index: stats[str(p.index)]["kept"] for p in ctx.partitions}


def shard_samples(item: dict) -> list[dict]:
    """One output shard's samples in pool order: its slices of its partitions' kept rows, each a
    dict of PLAN_COLUMNS (less `kept`) and the `source` shard URL."""
    samples: list[dict] = []
    for partition, first, stop in item["slices"]:
        table = read_table(item["metadata"][partition], PLAN_COLUMNS)
        kept = table.filter(table.column("kept")).sort_by("row")
        if kept.num_rows < stop:
            raise WriteError(f"{item['metadata'][partition]}: {kept.num_rows} kept samples, the write plan "
                             f"expects at least {stop}")
        rows = kept.slice(first, stop - first).drop_columns(["kept"]).to_pylist()
        for row in rows:
            row["source"] = item["sources"][partition]
        samples.extend(rows)
    return samples


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


def published_ext(sample: dict) -> str:
    """The image member's extension in the output: its own, unless its bytes are another format."""
    names = FORMAT_EXTENSIONS.get(sample.get("image_format") or "")
    return sample["image_ext"] if names is None or sample["image_ext"] in names else names[0]


def blurred_members(source: str, sample: dict, members: dict) -> dict:
    """write.blur_faces: the image with its faces blurred (the bytes whose digest the faces stage
    recorded) and its json telling so; other samples' members as they are."""
    if not sample.get("faces_blurred"):
        return members
    from pipeline.faces import blur_faces, sha256

    image, image_format = blur_faces(members["image"], sample["face_bboxes"])
    digest = sha256(image)
    if digest != sample["blurred_sha256"]:
        raise WriteError(f"shard {source}: sample {sample['uid']}: the blurred image is not the one the faces stage "
                         f"recorded (sha256 {digest}, recorded {sample['blurred_sha256']}); was Pillow changed between "
                         "the stages?")
    try:
        fields = json.loads(members["json"]) if members["json"] is not None else {}
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        fields = {}  # ingest recorded why in json_error; the published json then holds only what follows
    fields.update(face_bboxes=sample["face_bboxes"], faces_blurred=True, original_sha256=sample["sha256"], sha256=digest)
    text = json.dumps(fields, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8")
    return {**members, "image": image, "json": text, "format": image_format}


def _check_unchanged(source: str, sample: dict, members: dict) -> None:
    """Every member written must be the bytes ingest read (the pool may have changed since)."""
    for kind, recorded in (("image", sample["sha256"]), ("text", sample.get("text_sha256")),
                           ("json", sample.get("json_sha256"))):
        data = members[kind]
        if data is not None and (recorded is None or hashlib.sha256(data).hexdigest() != recorded):
            raise WriteError(f"shard {source}: sample {sample['uid']}: {kind} bytes differ from those ingested")


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
                    _check_unchanged(source, sample, members)
                    members = blurred_members(source, sample, members)
                    ext = published_ext({**sample, "image_format": members["format"]}) if "format" in members else published_ext(sample)
                    writer.add(f"{sample['uid']}.{ext}", members["image"])
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
    spec = {"shard": item["shard"], "samples": shard_samples(item)}
    count, digest = write_shard(spec, item["out"], item["read_block_bytes"], item["embeddings"], progress)
    return {"partition": item["shard"], "count": count, "digest": str(digest)}


def write_kept_subset(url: str, metadata_urls: list[str]) -> int:
    """Write the DataComp subset file of the kept uids, read one metadata file at a time.

    Runs as one remote task, which holds every kept uid (16 bytes each, as SUBSET_DTYPE pairs):
    the file is one sorted array. The driver holds none of them.
    """
    parts = [np.empty(0, dtype=SUBSET_DTYPE)]
    for metadata_url in metadata_urls:
        table = read_table(metadata_url, ["uid", "kept"])
        parts.append(uids_to_subset(table.filter(table.column("kept")).column("uid").to_pylist()))
    return save_subset(url, np.concatenate(parts))


def run(ctx) -> None:
    plan = plan_slices(kept_counts(ctx), ctx.config.write.shard_size)
    ctx.record.counts["partitions_total"] = len(plan)
    sources = {p.index: p.url for p in ctx.partitions}
    items = []
    for shard in ctx.todo(list(range(len(plan)))):
        partitions = [partition for partition, _, _ in plan[shard]]
        embeddings = {p: ctx.read("embed", p) for p in partitions} if ctx.config.write.embeddings else {}
        items.append({
            "shard": shard,
            "slices": plan[shard],
            "metadata": {p: ctx.read("metadata", p) for p in partitions},
            "sources": {p: sources[p] for p in partitions},
            "embeddings": embeddings,
            "out": ctx.paths.shard(shard),
            "read_block_bytes": ctx.config.write.read_block_bytes,
        })
    progress = ctx.progress(sum(stop - first for item in items for _, first, stop in item["slices"]))
    for result in map_items(write_shard_item, items, num_cpus=1, progress=progress, timeout_s=ctx.item_timeout_s):
        ctx.partition_done(result["partition"], {"count": result["count"], "digest": result["digest"]})
    stats = ctx.record.counts.get("partitions", {})
    sizes = {os.path.basename(ctx.paths.shard(shard)): stats[str(shard)]["count"] for shard in range(len(plan))}
    fs.write_bytes_atomic(ctx.paths.url("shards", "sizes.json"), (json.dumps(sizes, indent=1) + "\n").encode())
    ctx.record.samples_in = sum(stop - first for slices in plan for _, first, stop in slices)
    ctx.record.samples_out = sum(sizes.values())
    ctx.record.counts["shards"] = len(plan)
    ctx.record.counts["digest"] = str(sum(int(stats[str(shard)]["digest"]) for shard in range(len(plan))) % (1 << 128))
    _remove_stale_shards(ctx, len(plan))
    if ctx.config.write.subset_file:
        metadata_urls = [ctx.paths.metadata_part(p.index) for p in ctx.partitions]
        run_remote(write_kept_subset, ctx.paths.url("datacomp_subset.npy"), metadata_urls)


def _remove_stale_shards(ctx, count: int) -> None:
    """Shards numbered beyond the plan (left by an earlier run with more kept samples) go."""
    keep = {os.path.basename(ctx.paths.shard(i)) for i in range(count)}
    for url in fs.list_files(ctx.paths.shards_dir, ".tar"):
        if os.path.basename(url) not in keep:
            fsys, path = fs.to_fs(url)
            fsys.rm(path)
