"""Fetch sample members from source shards by the byte ranges ingest recorded.

Later stages read a sample without rescanning its shard: one open per source shard, members read
in offset order through a read-ahead buffer (on S3, a few large ranged GETs).
"""

from __future__ import annotations

from pipeline.io import fs

KINDS = ("image", "text", "json")


class MemberReadError(RuntimeError):
    pass


def fetch_members(source: str, samples: list[dict], *, kinds=KINDS, block_size: int = 8 * 2**20) -> list[dict]:
    """For each sample (with `<kind>_offset` / `<kind>_size` fields) return {kind: bytes or None},
    in the order given."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].get("image_offset") or 0)
    fetched: list[dict | None] = [None] * len(samples)
    with fs.open_input(source, block_size) as handle:
        for i in order:
            sample, members = samples[i], {}
            for kind in kinds:
                offset, size = sample.get(f"{kind}_offset"), sample.get(f"{kind}_size")
                if offset is None:
                    members[kind] = None
                    continue
                handle.seek(offset)
                data = handle.read(size)
                if len(data) != size:
                    raise MemberReadError(
                        f"shard {source}: sample {sample.get('uid')}: {kind} member is cut short "
                        "(the shard changed since ingest?)"
                    )
                members[kind] = data
            fetched[i] = members
    return fetched
