"""Every reason a sample can be dropped, in the order the steps run.

A sample's `drop_reason` is the first step in this order that dropped it (docs/algorithms.md
section 7); later steps only see the survivors of earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DropReason:
    name: str
    step: str
    meaning: str


DROP_REASONS: tuple[DropReason, ...] = (
    # ingest: input that cannot be used as a sample at all
    DropReason("download_failed", "ingest", "listed in the shard's img2dataset Parquet but never downloaded"),
    DropReason("unsafe_member", "ingest", "a member is a link, a device, a GNU sparse file, an absolute path, climbs out "
               "with '..', has a name that is not UTF-8 or an extended header that does not parse"),
    DropReason("truncated", "ingest", "a member is cut short by the end of the shard, or a listed sample is lost where "
               "the shard's tar structure broke"),
    DropReason("oversize_member", "ingest", "a member is larger than ingest.max_member_bytes"),
    DropReason("duplicate_key", "ingest", "a member repeats the key (and extension) of an earlier sample in the same "
               "shard: the later sample, which WebDataset readers would merge into the first or skip"),
    DropReason("missing_image", "ingest", "no image member"),
    DropReason("image_too_large", "ingest", "image header declares more than ingest.max_image_pixels (never decoded)"),
    DropReason("corrupt_image", "ingest", "the image does not decode"),
    DropReason("missing_caption", "ingest", "no .txt member"),
    DropReason("undecodable_caption", "ingest", "the caption is not valid UTF-8"),
    # basic filter (DataComp "basic")
    DropReason("caption_too_short", "basic_filter", "too few words or characters"),
    DropReason("not_english", "basic_filter", "caption language not in basic_filter.languages"),
    DropReason("image_too_small", "basic_filter", "min(width, height) below basic_filter.min_image_side"),
    DropReason("extreme_aspect", "basic_filter", "max/min side above basic_filter.max_aspect_ratio"),
    # deduplication
    DropReason("duplicate_uid", "dedup", "another sample earlier in the pool has the same uid"),
    DropReason("exact_duplicate", "dedup", "image bytes identical to the kept sample in duplicate_of"),
    DropReason("near_duplicate", "dedup", "pHash within dedup.phash_radius of duplicate_of (transitively)"),
    DropReason("semantic_duplicate", "dedup", "SemDeDup: image embedding within dedup.semantic_eps of an earlier member of its cluster"),
    # selection
    DropReason("not_in_subset", "select", "uid not in the select.subset file"),
    DropReason("clip_score", "select", "CLIP score below the select.clip cut"),
    DropReason("dfn_score", "select", "DFN score below the select.dfn cut"),
    DropReason("dbp_pruned", "select", "beyond its concept cluster's DBP quota"),
    DropReason("sql_filter", "select", "select.where is not true for the sample"),
)
DEDUP_REASONS: frozenset[str] = frozenset(r.name for r in DROP_REASONS if r.step == "dedup")

REASON_NAMES: tuple[str, ...] = tuple(r.name for r in DROP_REASONS)
INGEST_REASONS: frozenset[str] = frozenset(r.name for r in DROP_REASONS if r.step == "ingest")


def reason_rank(name: str) -> int:
    return REASON_NAMES.index(name)
