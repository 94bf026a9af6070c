"""Reading WebDataset tar shards safely, and writing them byte-for-byte reproducibly.

Web-scale shards contain hostile member names, links, device entries and truncated data. The reader
never extracts anything to disk, never follows a link, and reports every such member with a reason
instead of raising, so the caller can account for the sample it belonged to.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

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
    """The shard's tar structure is broken; members before the break were already yielded."""


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


def iter_tar_members(fileobj: BinaryIO, max_member_bytes: int) -> Iterator[TarMember]:
    """Yield every member of a tar stream in order, reading the data of safe regular files.

    A member cut short by the end of the stream is yielded with problem "truncated" and iteration
    stops. A broken header raises TarShardError after all earlier members were yielded.
    """
    try:
        archive = tarfile.open(fileobj=fileobj, mode="r|")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TarShardError(f"not a readable tar stream: {exc}") from exc
    with archive:
        members = iter(archive)
        while True:
            try:
                info = next(members)
            except StopIteration:
                return
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise TarShardError(f"broken tar header after {archive.offset} bytes: {exc}") from exc
            key, ext = split_key(info.name)
            member = TarMember(info.name, key, ext, info.offset_data, info.size, None)
            reason = unsafe_reason(info)
            if reason is not None:
                member.problem, member.detail = "unsafe_member", f"member {info.name!r}: {reason}"
                yield member
                continue
            if info.isdir():
                continue
            if info.size > max_member_bytes:
                member.problem = "oversize_member"
                member.detail = f"member {info.name!r} has {info.size} bytes, over the {max_member_bytes}-byte limit"
                yield member
                continue
            try:
                data = archive.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                data = None
                exc_text = str(exc)
            else:
                exc_text = ""
            if data is None or len(data) != info.size:
                member.problem = "truncated"
                member.detail = f"member {info.name!r} is cut short by the end of the shard ({exc_text or 'short read'})"
                yield member
                return
            member.data = data
            yield member


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
