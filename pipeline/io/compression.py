"""Shards compressed with gzip (`.tar.gz`, `.tgz`, or a gzip file under any name), read as streams.

A shard is gzip when its first two bytes are gzip's magic number, whatever its name says, so a
`.tar` that is really gzip is read too. Byte offsets in the metadata are offsets in the
uncompressed tar: the stages after ingest decompress again and read forward to them.
"""

from __future__ import annotations

import gzip
import zlib
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what an input directory's listing takes as shards


def shard_stem(url: str) -> str:
    """The shard's URL without its suffix (`a/00000.tar.gz` -> `a/00000`)."""
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


class _Prefixed:
    """A forward-only stream that gives back bytes already read from it, then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head = head
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            if len(data) < size:
                data += self._rest.read(size - len(data))
            return data
        return self._rest.read(size)

    def seekable(self) -> bool:
        return False


class GzipStream:
    """The uncompressed bytes of a gzip stream; a corrupt or cut-short stream ends where it breaks,
    and `error` says where and why, instead of an exception in the middle of the tar reader."""

    def __init__(self, fileobj: BinaryIO):
        self._gzip = gzip.GzipFile(fileobj=fileobj, mode="rb")
        self.delivered = 0
        self.error: str | None = None

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            data = self._gzip.read(size)
        except (OSError, EOFError, zlib.error) as exc:
            self.error = (f"the gzip stream breaks after {self.delivered} uncompressed bytes: "
                          f"{type(exc).__name__}: {exc}")
            return b""
        self.delivered += len(data)
        return data

    def seekable(self) -> bool:
        return False


def open_tar_stream(fileobj: BinaryIO) -> tuple[BinaryIO, GzipStream | None]:
    """The tar stream inside `fileobj`, read forward from where it is; the GzipStream when the
    bytes are gzip (its `error` is set once the stream is read), else None."""
    head = fileobj.read(len(GZIP_MAGIC))
    rest = _Prefixed(head, fileobj)
    if head != GZIP_MAGIC:
        return rest, None
    stream = GzipStream(rest)
    return stream, stream


def open_member_stream(handle):
    """A seekable view of a shard's tar bytes for range reads: the file itself, or, for gzip, a
    decompressing reader (seeks forward decompress; readers go in offset order)."""
    head = handle.read(len(GZIP_MAGIC))
    handle.seek(0)
    if head != GZIP_MAGIC:
        return handle
    return gzip.GzipFile(fileobj=handle, mode="rb")
