"""Every reason a sample can be dropped, in the order the steps run.

A sample's `drop_reason` is the first step in this order that dropped it (docs/algorithms.md
section 7); later steps only see the survivors of earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DropReason:
    """A reason, the step that gives it, and what a sample dropped for it still has: whether its
    image bytes were read and safely decoded at ingest (`image_read`: a thumbnail may decode them),
    whether that image can be embedded (`image_usable`), and whether its caption can
    (`caption_usable`). Every set of reasons the stages treat alike is derived from these."""

    name: str
    step: str
    meaning: str
    image_read: bool = True
    image_usable: bool = True
    caption_usable: bool = True


DROP_REASONS: tuple[DropReason, ...] = (
    # ingest: input that cannot be used as a sample at all
    DropReason("download_failed", "ingest", "listed in the shard's img2dataset Parquet but never downloaded",
               image_read=False, image_usable=False),
    DropReason("unsafe_member", "ingest", "a member is a link, a device, a GNU sparse file, an absolute path, climbs out "
               "with '..', has a name that is not UTF-8 or an extended header that does not parse",
               image_read=False, image_usable=False),
    DropReason("truncated", "ingest", "a member is cut short by the end of the shard, or a listed sample is lost where "
               "the shard's tar structure broke",
               image_read=False, image_usable=False),
    DropReason("oversize_member", "ingest", "a member is larger than ingest.max_member_bytes",
               image_read=False, image_usable=False),
    DropReason("duplicate_key", "ingest", "a member repeats the key (and extension) of an earlier sample in the same "
               "shard: the later sample, which WebDataset readers would merge into the first or skip", image_usable=False),
    DropReason("missing_image", "ingest", "no image member", image_read=False, image_usable=False),
    DropReason("image_too_large", "ingest", "image header declares more than ingest.max_image_pixels (never decoded)",
               image_read=False, image_usable=False),
    DropReason("corrupt_image", "ingest", "the image does not decode", image_usable=False),
    DropReason("missing_caption", "ingest", "no .txt member", caption_usable=False),
    DropReason("undecodable_caption", "ingest", "the caption is not valid UTF-8", caption_usable=False),
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
    DropReason("has_faces", "select", "select.faces drop: the faces stage found a face in the image (PASS-style)"),
    DropReason("clip_score", "select", "CLIP score below the select.clip cut"),
    DropReason("dfn_score", "select", "DFN score below the select.dfn cut"),
    DropReason("dbp_pruned", "select", "beyond its concept cluster's DBP quota"),
    DropReason("sql_filter", "select", "select.where is not true for the sample"),
)
REASON_NAMES: tuple[str, ...] = tuple(r.name for r in DROP_REASONS)
DEDUP_REASONS: frozenset[str] = frozenset(r.name for r in DROP_REASONS if r.step == "dedup")
# Ingest's reasons in precedence order: a sample with several problems gets the first.
INGEST_ORDER: tuple[str, ...] = tuple(r.name for r in DROP_REASONS if r.step == "ingest")
# Rows whose image bytes must never be decoded, not even for a report thumbnail.
NOT_DECODED: frozenset[str] = frozenset(r.name for r in DROP_REASONS if not r.image_read)
# Rows without an image to embed: not embedded at all.
NOT_EMBEDDED: frozenset[str] = frozenset(r.name for r in DROP_REASONS if not r.image_usable)
# Rows with an image to embed but no caption: an image embedding, no text embedding, no scores.
NO_TEXT: frozenset[str] = frozenset(r.name for r in DROP_REASONS if r.image_usable and not r.caption_usable)
