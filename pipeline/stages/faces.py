"""Stage faces: the faces in every image that can be embedded (docs/algorithms.md section 9).

One task per partition fetches the images by the byte ranges ingest recorded, decodes them (a JPEG
at reduced scale, no smaller than `faces.max_side`), runs the detector (pipeline.faces) and writes
`OUTPUT/stages/faces/part-N.parquet`: uid, face_count, face_bboxes, and with write.blur_faces,
faces_blurred and blurred_sha256 of the image as it will be published. The blur is computed here
so that the metadata, written before the shards, already holds the published digest; the write
stage blurs again and checks that it got those bytes.

With faces.source provided no detector runs: the boxes are the face_bboxes of embed.provided's
DataComp metadata, which that stage copies beside the embeddings it takes (only images blurred
under write.blur_faces are then fetched).

What the boxes are used for is decided elsewhere: select.faces drops (has_faces), write.blur_faces
blurs, and the metadata has them either way.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa

from pipeline.faces import FaceDetector, blur_faces, sha256

from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.io.shards import fetch_members
from pipeline.reasons import NOT_EMBEDDED
from pipeline.schema import METADATA_SCHEMA

NAME = "faces"
INGEST_COLUMNS = ["uid", "drop_reason", "image_offset", "image_size"]
FACE_COLUMNS = ["face_count", "face_bboxes", "faces_blurred", "blurred_sha256"]
CHUNK = 256  # images fetched at a time: bounds what a task holds


class FacesError(RuntimeError):
    pass


def config_fingerprint(config) -> dict:
    return {"faces": config.faces.model_dump(mode="json"), "blur": config.write.blur_faces}


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME)]


def faces_schema() -> pa.Schema:
    return pa.schema([pa.field("uid", pa.string())] + [METADATA_SCHEMA.field(name) for name in FACE_COLUMNS])


def detect_partition(item: dict, progress=None) -> dict:
    """One partition's faces (detected, or taken from embed.provided's file), with the blurred
    images' digests under write.blur_faces; writes its faces file and returns its counts."""
    table = read_table(item["ingest"], INGEST_COLUMNS)
    columns = table.to_pydict()
    n = table.num_rows
    rows = [i for i, reason in enumerate(columns["drop_reason"]) if reason not in NOT_EMBEDDED]
    boxes: list[list | None] = [None] * n
    digests: list[str | None] = [None] * n
    if item["provided"] is not None:
        given = read_table(item["provided"], ["uid", "face_bboxes"])
        if not given.column("uid").equals(table.column("uid")):
            raise FacesError(f"{item['provided']}: not aligned with the ingest rows of {item['ingest']}")
        provided = given.column("face_bboxes").to_pylist()
        for row in rows:
            boxes[row] = provided[row] if provided[row] is not None else []
        wanted = [row for row in rows if boxes[row]] if item["blur"] else []
    else:
        wanted = rows
    for picked, images in _images(item, columns, wanted):
        for row, data in zip(picked, images):
            if item["provided"] is None:
                boxes[row] = _detector(item["faces"]).detect_bytes(data)
            if item["blur"] and boxes[row]:
                digests[row] = sha256(blur_faces(data, boxes[row])[0])
        if progress is not None and item["provided"] is None:
            progress(samples=len(picked))
    counts = [None if b is None else len(b) for b in boxes]
    blurred = [None if b is None else bool(b) for b in boxes] if item["blur"] else [None] * n
    out = pa.Table.from_arrays(
        [table.column("uid"), pa.array(counts, pa.int32()), pa.array(boxes, METADATA_SCHEMA.field("face_bboxes").type),
         pa.array(blurred, pa.bool_()), pa.array(digests, pa.string())],
        schema=faces_schema(),
    )
    write_table_atomic(out, item["out"])
    examined = [c for c in counts if c is not None]
    return {"partition": item["partition"], "samples": n, "examined": len(examined),
            "with_faces": int(np.count_nonzero(examined)), "faces": int(sum(examined))}


def _images(item: dict, columns: dict, rows: list[int]):
    """(rows, their image bytes), CHUNK rows at a time, fetched by the ranges ingest recorded."""
    for start in range(0, len(rows), CHUNK):
        picked = rows[start:start + CHUNK]
        samples = [{"uid": columns["uid"][i], "image_offset": columns["image_offset"][i],
                    "image_size": columns["image_size"][i]} for i in picked]
        fetched = fetch_members(item["source"], samples, kinds=("image",), block_size=item["block_size"])
        yield picked, [members["image"] for members in fetched]


@functools.lru_cache(maxsize=2)
def _detector_for(faces_json: str):
    from pipeline.config import FacesConfig

    return FaceDetector.from_config(FacesConfig.model_validate_json(faces_json))


def _detector(faces: dict):
    return _detector_for(json.dumps(faces, sort_keys=True))


def run(ctx) -> None:
    from pipeline.ray_adapter import map_items
    from pipeline.stages import faces_provided

    items = [
        {
            "partition": i,
            "ingest": ctx.read("ingest", i),
            "source": ctx.partitions[i].url,
            "out": ctx.paths.stage_part(NAME, i),
            "faces": ctx.config.faces.model_dump(mode="json"),
            "blur": ctx.config.write.blur_faces,
            "block_size": ctx.config.write.read_block_bytes,
            "provided": ctx.read("embed", i) if faces_provided(ctx.config) else None,
        }
        for i in ctx.todo([p.index for p in ctx.partitions])
    ]
    progress = ctx.progress(0 if faces_provided(ctx.config) else sum(_examinable(ctx, i["partition"]) for i in items))
    for result in map_items(detect_partition, items, num_cpus=ctx.resources.cpus, progress=progress,
                            timeout_s=ctx.item_timeout_s):
        ctx.partition_done(result.pop("partition"), result)
    stats = ctx.record.counts.get("partitions", {}).values()
    ctx.record.samples_in = sum(s["samples"] for s in stats)
    ctx.record.samples_out = ctx.record.samples_in
    ctx.record.counts.update(examined=sum(s["examined"] for s in stats), with_faces=sum(s["with_faces"] for s in stats),
                             faces=sum(s["faces"] for s in stats))


def _examinable(ctx, partition: int) -> int:
    """Images the partition's task will examine, from ingest's counts in the manifest."""
    record = ctx.manifest.stage("ingest")
    stats = (record.counts.get("partitions", {}) if record is not None else {}).get(str(partition))
    if stats is None:
        return 0
    return stats["samples"] - sum(n for reason, n in stats["reasons"].items() if reason in NOT_EMBEDDED)
