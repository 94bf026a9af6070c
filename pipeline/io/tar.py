"""Reading WebDataset tar shards safely, and writing them byte-for-byte reproducibly.

Web-scale shards contain hostile member names, links, device entries, sparse files, corrupt
headers, impossible sizes and truncated data. The reader parses each 512-byte header itself (see
pipeline.io.tar_headers), never extracts anything to disk, never follows a link, never reads or
seeks past the end of the shard, and never raises on the shard's bytes: every member it cannot use
is yielded with a reason, and every stretch that is not tar structure is recorded as a TarBreak
after which it resynchronises on the next valid header, as GNU tar does. Stdlib tarfile, reading a
stream, would instead end silently at the first bad header and crawl through absurd sizes.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from pipeline.io.tar_headers import (
    BLOCK, LONGLINK, LONGNAME, META_TYPES, PAX_GLOBAL, ZERO_BLOCK, Header, decode_name, meta_value, parse_header,
    parse_pax, pax_number,
)

# webdataset's rule: the key is the path up to the first dot of the basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


@dataclass
class TarMember:
    """One tar member as the ingest stage sees it."""

    name: str
    key: str
    ext: str  # lower-cased, "" when the name has no extension
    offset: int  # where the member's data starts in the shard (for range reads)
    size: int
    data: bytes | None  # None when the member was not read (unsafe, oversize, truncated)
    problem: str | None = None  # a drop reason: unsafe_member, oversize_member, truncated
    detail: str | None = None  # human-readable explanation naming the member


class TarShardError(Exception):
    """The shard's tar structure is broken somewhere; raised by iter_tar_members after the last member."""


@dataclass(frozen=True)
class TarBreak:
    """A place where the shard stopped being tar structure, and where reading resumed (None: it
    did not: nothing valid followed)."""

    offset: int
    resumed: int | None
    message: str  # names the byte offsets, for the shard's error text

    def __str__(self) -> str:
        return self.message


def split_key(name: str) -> tuple[str, str]:
    """Split a member name into (key, extension) the way webdataset groups samples."""
    match = _KEY_EXT.match(name)
    if match is None:
        return name, ""
    return match.group(1), match.group(2).lower()


def unsafe_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member must never be read or written, or None when it is a plain safe file."""
    name = info.name
    if info.issym():
        return f"symbolic link to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device entry"
    if info.isfifo():
        return "fifo entry"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "parent-directory traversal"
    if not (info.isfile() or info.isdir()):
        return f"unsupported member type {info.type!r}"
    return None


_SCAN_BYTES = 128 * BLOCK  # read at a time while looking for the next valid header
_SKIP_BYTES = 1 << 20  # read at a time while skipping a member's data


def stream_size(fileobj: BinaryIO) -> int | None:
    """Bytes from the current position to the end, where the file object can seek; else None."""
    try:
        if not fileobj.seekable():
            return None
        here = fileobj.tell()
        fileobj.seek(0, io.SEEK_END)
        end = fileobj.tell()
        fileobj.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return end - here


class _Source:
    """The shard as a forward-only stream: exact reads (short only at the end), the position, and
    bytes pushed back after a look-ahead. Every operation consumes the stream, so the reader's work
    is bounded by the shard's size."""

    def __init__(self, fileobj: BinaryIO, size: int | None):
        self._file = fileobj
        self.size = size
        self.pos = 0
        self._back = b""
        self._back_at = 0

    def read(self, n: int) -> bytes:
        parts = []
        if self._back_at < len(self._back):
            part = self._back[self._back_at : self._back_at + n]
            self._back_at += len(part)
            parts.append(part)
            n -= len(part)
        while n > 0:
            chunk = self._file.read(n)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Give back the last len(data) bytes read."""
        self._back = data + self._back[self._back_at :]
        self._back_at = 0
        self.pos -= len(data)

    def skip(self, n: int) -> None:
        """Move on n bytes, or to the end of the stream if it comes first (reads: the caller may
        be hashing every byte)."""
        while n > 0 and (chunk := self.read(min(n, _SKIP_BYTES))):
            n -= len(chunk)


@dataclass
class _Pending:
    """What long-name and pax headers said about the member that follows them."""

    at: int | None = None  # where the first of them starts
    name: bytes | None = None
    linkname: bytes | None = None
    pax: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def _padding(size: int) -> int:
    return -size % BLOCK


class TarReader:
    """The members of one tar shard, in order, reading the data of safe regular files.

    Never raises on the shard's bytes (errors of the file object itself do propagate) and always
    ends: every step consumes the stream. `size`, the shard's length, lets a member whose data
    would run past the end be yielded at once as "truncated" (or "oversize_member") and the rest
    be searched for valid headers; without it (and without a seekable file object) such a member
    is read to the end. Once iteration is over, `breaks` lists where the structure broke and
    `blocks_examined` how many 512-byte blocks were looked at as possible headers.
    """

    def __init__(self, fileobj: BinaryIO, max_member_bytes: int, size: int | None = None):
        self._src = _Source(fileobj, stream_size(fileobj) if size is None else size)
        self.max_member_bytes = max_member_bytes
        self.breaks: list[TarBreak] = []
        self.blocks_examined = 0

    def __iter__(self) -> Iterator[TarMember]:
        src = self._src
        pending = _Pending()
        global_pax: dict[str, bytes] = {}
        while True:
            at = src.pos
            block = src.read(BLOCK)
            self.blocks_examined += 1
            if len(block) < BLOCK:  # the end of the file
                self._end(at, block, pending)
                return
            if block == ZERO_BLOCK:
                after = src.read(BLOCK)
                if after.count(0) == len(after):  # two zero blocks (or one, then the end): the end marker
                    self._end(at, b"", pending)
                    return
                src.unread(after)  # a lone zero block is padding, not the end
                continue
            header = parse_header(block)
            if header is None:
                self._resync(at, f"corrupt tar header at byte {at}")
                pending = _Pending()
            elif header.type in META_TYPES:
                if not self._read_meta(at, header, pending, global_pax):
                    return
            else:
                yield from self._member(at, header, pending, global_pax)
                pending = _Pending()

    def _end(self, at: int, rest: bytes, pending: _Pending) -> None:
        """Record what the end of the shard cut short, if anything."""
        if self._src.pos == 0:
            self._break(0, None, "the shard is empty (0 bytes)")
        elif rest.count(0) != len(rest):
            self._break(at, None, f"the shard ends inside a tar header at byte {at} ({len(rest)} of {BLOCK} bytes)")
        elif pending.at is not None:
            self._break(pending.at, None, f"the extended header at byte {pending.at} has no member after it")

    def _break(self, offset: int, resumed: int | None, message: str) -> None:
        self.breaks.append(TarBreak(offset, resumed, message))

    def _resync(self, broke_at: int, what: str, report_if_none: bool = True) -> None:
        """Scan on block by block (512-byte aligned) to the next valid header, as GNU tar does,
        and record the stretch skipped; the stream is left at that header, or at the end."""
        src = self._src
        while chunk := src.read(_SCAN_BYTES):
            for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
                self.blocks_examined += 1
                if parse_header(chunk[i : i + BLOCK]) is not None:
                    src.unread(chunk[i:])
                    self._break(broke_at, src.pos,
                                f"{what}, resynchronised at byte {src.pos} ({src.pos - broke_at} bytes skipped)")
                    return
        if report_if_none:
            self._break(broke_at, None, f"{what}, no valid header after it "
                                        f"({src.pos - broke_at} bytes skipped to the end of the shard)")

    def _read_meta(self, at: int, header: Header, pending: _Pending, global_pax: dict[str, bytes]) -> bool:
        """Take in a long-name or pax header; False when the shard ends inside it."""
        data = self._src.read(header.size)
        if len(data) < header.size:
            self._break(at, None, f"the shard ends inside the extended header at byte {at}")
            return False
        self._src.skip(_padding(header.size))
        if pending.at is None and header.type != PAX_GLOBAL:  # a global header belongs to no one member
            pending.at = at
        if header.type == LONGNAME:
            pending.name = meta_value(data)
        elif header.type == LONGLINK:
            pending.linkname = meta_value(data)
        else:
            records, complete = parse_pax(data)
            (global_pax if header.type == PAX_GLOBAL else pending.pax).update(records)
            if not complete:
                pending.problem = f"its pax header at byte {at} is malformed"
        return True

    def _member(self, at: int, header: Header, pending: _Pending, global_pax: dict[str, bytes]) -> Iterator[TarMember]:
        """Yield the member whose header is at `at` (not a plain directory) and move past its data."""
        src = self._src
        info, stored, problem = _describe(header, pending, global_pax)
        extended = header.sparse_extended
        while extended and len(block := src.read(BLOCK)) == BLOCK:  # old GNU sparse extension blocks
            extended = block[504] != 0
        name = info.name
        key, ext = split_key(name)
        member = TarMember(name, key, ext, src.pos, stored, None)
        beyond = src.size is not None and member.offset + stored > src.size
        if problem is not None:
            member.problem, member.detail = "unsafe_member", f"member {name!r}: {problem}"
        elif info.isdir():
            src.skip(stored + _padding(stored))
            return
        elif stored > self.max_member_bytes:
            member.problem = "oversize_member"
            member.detail = f"member {name!r} has {stored} bytes, over the {self.max_member_bytes}-byte limit"
        elif beyond:
            member.problem = "truncated"
            member.detail = (f"member {name!r} is cut short by the end of the shard: it claims {stored} bytes "
                             f"from byte {member.offset}, the shard has {src.size}")
        if member.problem is None:
            member.data = src.read(stored)
            if len(member.data) < stored:
                member.problem, member.data = "truncated", None
                member.detail = (f"member {name!r} is cut short by the end of the shard at byte {src.pos} "
                                 f"(it claims {stored} bytes from byte {member.offset})")
            src.skip(_padding(stored))
            yield member
        elif beyond:  # never seek through data that is not there: look for headers in what is
            yield member
            self._resync(at, f"member {name!r} at byte {at} claims {stored} bytes, more than the shard's {src.size}",
                         report_if_none=False)
        else:
            yield member
            src.skip(stored + _padding(stored))


def _describe(header: Header, pending: _Pending,
              global_pax: dict[str, bytes]) -> tuple[tarfile.TarInfo, int, str | None]:
    """The member a header describes, with what long-name and pax headers before it said: its
    TarInfo (name decoded), the bytes it stores in the shard, and why it is unsafe (or None)."""
    pax = {key: value for key, value in {**global_pax, **pending.pax}.items() if value}  # empty: not set
    problem = pending.problem
    sparse = header.type == b"S" or any(key.startswith("GNU.sparse.") for key in pax)
    raw_name = pax.get("path") or pending.name or header.name
    if sparse:
        raw_name = pax.get("GNU.sparse.name") or raw_name  # the name the sample is known by
    stored = header.size  # on disk; never a sparse file's expanded size (GNU.sparse.size / realsize)
    if "size" in pax:
        stored = pax_number(pax["size"])
        if stored is None:
            problem = problem or f"its pax size {pax['size'][:40]!r} is not a byte count"
            stored = header.size
    name, name_ok = decode_name(raw_name)
    info = tarfile.TarInfo(name)
    info.type = header.type
    info.linkname = decode_name(pax.get("linkpath") or pending.linkname or header.linkname)[0]
    if info.type == tarfile.AREGTYPE and name.endswith("/"):
        info.type = tarfile.DIRTYPE  # old V7 tar marks a directory by its trailing slash only
    if info.isdir():
        info.name = name.rstrip("/")
    if not (info.type in tarfile.REGULAR_TYPES or info.type not in tarfile.SUPPORTED_TYPES):
        stored = 0  # like tarfile: links, devices and directories carry no data whatever their size field says
    if problem is None and sparse:
        problem = "GNU sparse member"
    if problem is None and not name_ok:
        problem = "name is not valid UTF-8 (undecodable bytes escaped)"
    return info, stored, problem or unsafe_reason(info)


def iter_tar_members(fileobj: BinaryIO, max_member_bytes: int, size: int | None = None) -> Iterator[TarMember]:
    """Yield every member of a tar shard (see TarReader); once all are yielded, raise TarShardError
    naming each break, if there were any. Callers that must keep going use TarReader and its
    `breaks` instead."""
    reader = TarReader(fileobj, max_member_bytes, size)
    yield from reader
    if reader.breaks:
        raise TarShardError("; ".join(str(b) for b in reader.breaks))


class TarWriter:
    """Write a tar whose bytes depend only on the members given (no clock, user or host)."""

    def __init__(self, fileobj: BinaryIO):
        self._archive = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._archive.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._archive.close()

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
