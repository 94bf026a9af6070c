"""Arrow schemas of the Parquet files a run writes, with a description of every column.

`schemas/metadata.schema.json` is generated from here (`curate schema`) and checked in; a test keeps
the two equal, so the documented contract and the written files cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    stage: str
    description: str

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=True)


_IDENTITY = [
    Column("uid", pa.string(), "ingest", "128-bit id, 32 hex chars: the json's `uid`, else derived (see uid_source). Unique among kept samples."),
    Column("shard", pa.string(), "ingest", "input shard, relative to the pool's directory (.tar, or gzip: .tar.gz, .tgz)"),
    Column("key", pa.string(), "ingest", "the sample's key inside its shard (member name up to the first dot); "
           "a key repeated in the shard gives one row per repeat, dropped as duplicate_key"),
    Column("partition", pa.int32(), "ingest", "index of the input shard in this run (sorted shard URLs)"),
    Column("row", pa.int32(), "ingest", "position of the sample in its partition (first appearance in the tar)"),
]

_DECISION = [
    Column("kept", pa.bool_(), "select", "true when the sample is in the output shards"),
    Column("drop_reason", pa.string(), "all", "first step that dropped the sample (pipeline.reasons); null when kept"),
    Column("drop_detail", pa.string(), "all", "human-readable detail naming the member or the rule"),
    Column("duplicate_of", pa.string(), "dedup", "uid of the sample this one duplicates (dedup drops only); following duplicate_of always ends at a sample that survived dedup"),
    Column("phash_distance", pa.int32(), "dedup", "near_duplicate: pHash Hamming distance to duplicate_of"),
    Column("duplicate_similarity", pa.float32(), "dedup", "semantic_duplicate: cosine of the image embeddings with duplicate_of"),
    Column("dbp_cluster", pa.int32(), "select", "DBP concept cluster (samples that reached DBP)"),
    Column("dbp_dist_to_centroid", pa.float32(), "select", "1 - cos(image embedding, its DBP centroid)"),
]

_SCORES = [
    Column("clip_score", pa.float32(), "embed", "cosine of the embedder's image and text embeddings"),
    Column("dfn_score", pa.float32(), "embed", "cosine of the DFN scorer's image and text embeddings"),
    Column("cluster", pa.int32(), "cluster", "nearest centroid of the dedup clustering"),
    Column("dist_to_centroid", pa.float32(), "cluster", "1 - cos(image embedding, its centroid)"),
]

_FACES = [
    Column("face_count", pa.int32(), "faces", "faces found in the image (faces.enabled); null where the image was not "
           "examined (no image to embed, or face detection off)"),
    Column("face_bboxes", pa.list_(pa.list_(pa.float64())), "faces", "one [x0, y0, x1, y1] per face, normalised to "
           "the image's width and height (DataComp's face_bboxes); [] when none"),
    Column("faces_blurred", pa.bool_(), "faces", "write.blur_faces: the image is published re-encoded with its face "
           "boxes blurred (only images with a face); false for the others"),
    Column("blurred_sha256", pa.string(), "faces", "sha256 of the published, blurred image bytes, hex (sha256 stays "
           "that of the ingested bytes)"),
]

_INGEST = [
    Column("uid_source", pa.string(), "ingest", "where the uid came from: json | url_caption | shard_key"),
    Column("url", pa.string(), "ingest", "source URL from the sample's json"),
    Column("caption", pa.string(), "ingest", "the .txt caption, UTF-8 decoded"),
    Column("caption_words", pa.int32(), "ingest", "len(caption.split())"),
    Column("caption_chars", pa.int32(), "ingest", "len(caption) in code points"),
    Column("language", pa.string(), "ingest", "fastText lid.176 top-1 language of the caption"),
    Column("language_score", pa.float32(), "ingest", "its probability"),
    Column("width", pa.int32(), "ingest", "image width from the image header"),
    Column("height", pa.int32(), "ingest", "image height from the image header"),
    Column("original_width", pa.int32(), "ingest", "json original_width (the size before img2dataset resized)"),
    Column("original_height", pa.int32(), "ingest", "json original_height"),
    Column("image_format", pa.string(), "ingest", "format found by decoding (JPEG, PNG, WEBP, ...)"),
    Column("image_ext", pa.string(), "ingest", "extension of the image member (jpg, png, ...)"),
    Column("sha256", pa.string(), "ingest", "sha256 of the image bytes, hex"),
    Column("phash", pa.uint64(), "ingest", "64-bit DCT perceptual hash of the image (imagehash.phash bits)"),
    Column("image_offset", pa.int64(), "ingest", "byte offset of the image data in the shard (in the uncompressed tar of a gzip shard)"),
    Column("image_size", pa.int64(), "ingest", "byte size of the image member"),
    Column("text_offset", pa.int64(), "ingest", "byte offset of the .txt data"),
    Column("text_size", pa.int64(), "ingest", "byte size of the .txt member"),
    Column("text_sha256", pa.string(), "ingest", "sha256 of the .txt bytes, hex (the write stage checks it)"),
    Column("json_offset", pa.int64(), "ingest", "byte offset of the .json data"),
    Column("json_size", pa.int64(), "ingest", "byte size of the .json member"),
    Column("json_sha256", pa.string(), "ingest", "sha256 of the .json bytes, hex (the write stage checks it)"),
    Column("json_error", pa.string(), "ingest", "why the .json could not be used, if it could not (not a drop)"),
]

INGEST_COLUMNS: list[Column] = _IDENTITY + [_DECISION[1], _DECISION[2]] + _INGEST
METADATA_COLUMNS: list[Column] = _IDENTITY + _DECISION + _SCORES + _FACES + _INGEST

INGEST_SCHEMA = pa.schema([c.field() for c in INGEST_COLUMNS])
METADATA_SCHEMA = pa.schema([c.field() for c in METADATA_COLUMNS])

# What a decision stage writes per partition: the cumulative verdict for every row, in row order.
DECISION_SCHEMA = pa.schema([c.field() for c in _IDENTITY[:1]] + [c.field() for c in _DECISION[1:]])
# Numeric verdict columns beyond reason/detail/duplicate_of (null where they do not apply).
DECISION_VALUES = {c.name: c.type for c in _DECISION[4:]}


def metadata_schema_document() -> dict:
    return {
        "title": "Curate sample metadata",
        "description": "One row per input sample in OUTPUT/metadata/part-*.parquet. "
        "input samples = kept + dropped (each with a drop_reason).",
        "columns": [
            {"name": c.name, "type": str(c.type), "stage": c.stage, "description": c.description}
            for c in METADATA_COLUMNS
        ],
    }


def metadata_schema_json() -> str:
    return json.dumps(metadata_schema_document(), indent=2) + "\n"
