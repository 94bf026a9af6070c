"""Judging 512-byte tar header blocks and pax records one at a time, trusting no field.

The shard reader (pipeline.io.tar) must tell a valid header from any other block on its own, so
that it can resynchronise after corruption the way GNU tar does; stdlib tarfile only parses
headers as part of walking an archive. These are small pure functions over bytes.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Headers that describe the member after them: GNU long name and long link name, pax local
# ('x', and Solaris' 'X') and global ('g') extended headers.
LONGNAME, LONGLINK, PAX_GLOBAL = b"L", b"K", b"g"
PAX_LOCAL = (b"x", b"X")
META_TYPES = (LONGNAME, LONGLINK, PAX_GLOBAL, *PAX_LOCAL)
# A long name or pax header is read into memory; one claiming more than this is not believed.
MAX_META_BYTES = 1 << 20
_HIGH_BYTES = bytes(range(128, 256))
_POSIX_MAGIC = b"ustar\x00"  # GNU headers ("ustar  \0") keep other fields where ustar has its prefix


@dataclass(frozen=True)
class Header:
    """What the reader uses of one valid header block; names stay bytes until decoded."""

    name: bytes  # with the ustar prefix joined on
    linkname: bytes
    type: bytes
    size: int  # the size field: the bytes stored after the header (for old GNU sparse, after its extension blocks)
    sparse_extended: bool  # old GNU sparse ('S'): extension blocks follow the header


def _cut(field: bytes) -> bytes:
    """A NUL-terminated field's value."""
    return field.split(b"\x00", 1)[0]


def checksum_ok(block: bytes) -> bool:
    """The header checksum holds, as the unsigned or the signed byte sum (tarfile accepts both)."""
    try:
        recorded = tarfile.nti(block[148:156])
    except (tarfile.TarError, ValueError):
        return False
    # The checksum field itself counts as eight spaces.
    unsigned = 256 + sum(block) - sum(block[148:156])
    if recorded == unsigned:
        return True
    high = (BLOCK - 8) - len(block[:148].translate(None, _HIGH_BYTES)) - len(block[156:].translate(None, _HIGH_BYTES))
    return recorded == unsigned - 256 * high


def parse_header(block: bytes) -> Header | None:
    """The header in `block`, or None when it is not one.

    Not a header: a short or all-zero block, a bad checksum, a size field that does not read or is
    negative, or a long-name / pax header claiming more than MAX_META_BYTES.
    """
    if len(block) != BLOCK or block == ZERO_BLOCK or not checksum_ok(block):
        return None
    try:
        size = tarfile.nti(block[124:136])  # octal, or base-256 (GNU) for large values
    except (tarfile.TarError, ValueError):
        return None
    kind = block[156:157]
    if size < 0 or (kind in META_TYPES and size > MAX_META_BYTES):
        return None
    name = _cut(block[0:100])
    if block[257:263] == _POSIX_MAGIC:
        prefix = _cut(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    sparse_extended = kind == b"S" and block[482] != 0
    return Header(name, _cut(block[157:257]), kind, size, sparse_extended)


def meta_value(data: bytes) -> bytes:
    """The name a GNU long-name ('L') or long-link ('K') header carries."""
    return _cut(data)


def parse_pax(data: bytes) -> tuple[dict[str, bytes], bool]:
    """The records of a pax extended header ("%d key=value\\n" each), and whether all of it parsed.

    Records before a malformed one are returned; NUL padding after the last record is allowed.
    """
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            return records, data.count(0, pos) == len(data) - pos
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            return records, False
        end = pos + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A:
            return records, False
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            return records, False
        records[key.decode("utf-8", "backslashreplace")] = value
        pos = end
    return records, True


def pax_number(value: bytes) -> int | None:
    """A pax numeric record (decimal digits only), or None when it is not one."""
    if not value.isdigit() or len(value) > 40:
        return None
    return int(value)


def decode_name(raw: bytes) -> tuple[str, bool]:
    """A member name as text, and whether it was valid UTF-8.

    Invalid bytes are escaped (backslashreplace), never raised on and never left as surrogates,
    which Arrow strings cannot hold.
    """
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), False
