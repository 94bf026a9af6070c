"""Fetch sample members from source shards by the byte ranges ingest recorded.

Later stages read a sample without rescanning its shard: one open per source shard, members read
in offset order through a read-ahead buffer (on S3, a few large ranged GETs).
"""

from __future__ import annotations

from pipeline.io import fs
from pipeline.io.compression import open_member_stream

KINDS = ("image", "text", "json")


class MemberReadError(RuntimeError):
    pass


def fetch_members(source: str, samples: list[dict], *, kinds=KINDS, block_size: int = 8 * 2**20) -> list[dict]:
    """For each sample (with `<kind>_offset` / `<kind>_size` fields) return {kind: bytes or None},
    in the order given. Members are read in offset order, so a gzip shard is decompressed once,
    forward."""
    reads = sorted(
        (sample[f"{kind}_offset"], i, kind, sample[f"{kind}_size"])
        for i, sample in enumerate(samples) for kind in kinds if sample.get(f"{kind}_offset") is not None
    )
    fetched = [dict.fromkeys(kinds) for _ in samples]
    with fs.open_input(source, block_size) as handle:
        stream = open_member_stream(handle)
        for offset, i, kind, size in reads:
            stream.seek(offset)
            data = stream.read(size)
            if len(data) != size:
                raise MemberReadError(
                    f"shard {source}: sample {samples[i].get('uid')}: {kind} member is cut short "
                    "(the shard changed since ingest?)"
                )
            fetched[i][kind] = data
    return fetched
