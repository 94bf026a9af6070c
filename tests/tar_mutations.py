"""Hand-made tar blocks and seeded shard mutations, for the hostile-input tests of the tar reader
and for benchmarks/fuzz_tar.py and benchmarks/fuzz_tar_atheris.py."""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import dataclass, replace

BLOCK = 512
END = bytes(2 * BLOCK)


class Unseekable(io.RawIOBase):
    """A stream that cannot tell its size, as a network stream or ingest's DigestingReader."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def header(name: bytes, size: int | bytes = 0, kind: bytes = b"0", *, linkname: bytes = b"", prefix: bytes = b"",
           magic: bytes = b"ustar\x0000", extra: dict[int, bytes] | None = None, signed: bool = False) -> bytes:
    """One header block with a valid checksum. `size` is a number (octal field) or the raw 12-byte
    field (base-256); `extra` puts bytes at given offsets; `signed` writes the signed-sum checksum."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\x00"
    block[124:136] = size if isinstance(size, bytes) else b"%011o\x00" % size
    block[136:148] = b"00000000000\x00"
    block[156:157] = kind
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = magic
    block[345 : 345 + len(prefix)] = prefix
    for at, value in (extra or {}).items():
        block[at : at + len(value)] = value
    return with_checksum(block, signed)


def with_checksum(block: bytes | bytearray, signed: bool = False) -> bytes:
    block = bytearray(block)
    block[148:156] = b" " * 8
    total = sum((b - 256 if b > 127 else b) for b in block) if signed else sum(block)
    block[148:156] = b"%06o\x00 " % (total & 0o777777)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes, kind: bytes = b"0", **fields) -> bytes:
    """A header and its data, padded to whole blocks."""
    return header(name, len(data), kind, **fields) + padded(data)


def pax(records: dict[bytes, bytes], kind: bytes = b"x") -> bytes:
    """A pax extended header ('x' local, 'g' global) holding `records`."""
    body = b""
    for key, value in records.items():
        text = b" " + key + b"=" + value + b"\n"
        length = len(text) + 1
        while len(text) + len(str(length)) != length:  # the length counts its own digits
            length = len(text) + len(str(length))
        body += b"%d" % length + text
    return member(b"././@PaxHeader", body, kind)


def base256(value: int) -> bytes:
    """A 12-byte GNU base-256 numeric field."""
    return b"\x80" + value.to_bytes(11, "big")


@dataclass(frozen=True)
class Expected:
    """A member as tarfile (mode "r:") lists it in the unmutated shard."""

    name: str
    start: int  # its first header (long-name or pax header included)
    offset: int  # its data
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def random_shard(rng: random.Random) -> tuple[bytes, list[Expected]]:
    """A small shard in a random tar format, with long, nested and non-ASCII names, and tarfile's listing of it."""
    fmt = rng.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
    buffer = io.BytesIO()
    contents = {}
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for i in range(rng.randint(1, 9)):
            shape = rng.random()
            if shape < 0.15 and fmt != tarfile.USTAR_FORMAT:
                name = f"{'long' * rng.randint(26, 60)}{i}.txt"
            elif shape < 0.3:
                name = f"{'d' * rng.randint(1, 120)}/{i:06d}.json"
            elif shape < 0.4:
                name = f"caf\u00e9-{i}/\u00fc{i}.txt"
            else:
                name = f"{i:06d}.{rng.choice(['jpg', 'txt', 'json'])}"
            size = rng.choice([0, rng.randint(1, 600), rng.randint(600, 3000)])
            data = rng.randbytes(size) if rng.random() < 0.7 else (b"caption words " * 300)[:size]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            contents[name] = data
    shard = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(shard), mode="r:") as archive:
        listing = [Expected(i.name, i.offset, i.offset_data, contents[i.name]) for i in archive.getmembers()]
    return shard, listing


def mutate(rng: random.Random, shard: bytes, listing: list[Expected]) -> tuple[bytes, list[Expected]]:
    """1-3 random mutations of `shard`, and the members that none of them touched and that a
    resynchronising reader must therefore still find, at their (possibly shifted) offsets.

    Mutations: byte flips in a member's headers or anywhere, a huge size (base-256 2^62 or octal
    8 GiB) with a valid checksum, a cut at any byte, garbage or a lone zero block inserted
    (block-aligned, or not: members after an unaligned insertion are no longer expected).
    """
    data = bytearray(shard)
    live = list(listing)
    zero_inserted = False  # a second one could make an end-of-archive marker, which ends the reading

    def touch(lo: int, hi: int) -> None:  # members whose headers or data meet [lo, hi) are not expected
        live[:] = [m for m in live if m.end <= lo or m.start >= hi]

    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.3 and live:
            target = rng.choice(live)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(target.start, target.offset)
                data[at] ^= rng.randint(1, 255)
            touch(target.start, target.offset)
        elif kind < 0.45 and data:
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                data[at] ^= rng.randint(1, 255)
                touch(at, at + 1)
        elif kind < 0.55 and live:
            target = rng.choice(live)
            at = target.offset - BLOCK
            field = base256(2**62) if rng.random() < 0.5 else b"77777777777\x00"
            data[at : at + BLOCK] = with_checksum(data[at : at + 124] + field + data[at + 136 : at + BLOCK])
            touch(target.start, target.end)
        elif kind < 0.7:
            cut = rng.randrange(len(data) + 1)
            del data[cut:]
            live[:] = [m for m in live if m.end <= cut]
        else:
            aligned = rng.random() < 0.6
            at = rng.randrange(0, len(data) + 1, BLOCK if aligned else 1)
            if aligned and not zero_inserted and rng.random() < 0.2:
                garbage, zero_inserted = bytes(BLOCK), True  # a lone zero block
            else:
                garbage = rng.randbytes(rng.randint(1, 4) * BLOCK if aligned else rng.randint(1, 1500))
            data[at:at] = garbage
            touch(at, at)
            shift = len(garbage)
            if aligned and shift % BLOCK == 0:
                live[:] = [replace(m, start=m.start + shift, offset=m.offset + shift) if m.start >= at else m for m in live]
            else:
                live[:] = [m for m in live if m.end <= at]
    return bytes(data), live
