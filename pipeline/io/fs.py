"""fsspec helpers: every input and output path of a run is a URL (local path, s3://, gs://, ...)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import Iterator

import braceexpand
import fsspec
from fsspec.core import url_to_fs

_GLOB_CHARS = set("*?[")


def has_protocol(url: str) -> bool:
    return "://" in url


def to_fs(url: str):
    """(filesystem, path-without-protocol) for a URL."""
    return url_to_fs(url)


def _with_protocol_like(original: str, fs, path: str) -> str:
    """Give `path` back the form the user wrote: plain local paths stay plain."""
    return fs.unstrip_protocol(path) if has_protocol(original) else path


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def resolve_shards(spec: str | list[str]) -> list[str]:
    """Expand a pool spec (directory, glob, brace pattern, or a list of them) into sorted shard URLs
    (.tar, and gzip-compressed .tar.gz / .tgz)."""
    from pipeline.io.compression import SHARD_SUFFIXES

    found = resolve_files(spec, SHARD_SUFFIXES, what="input")
    if not found:
        raise FileNotFoundError(f"input {spec!r} matches no .tar, .tar.gz or .tgz shards")
    return found


def resolve_files(spec: str | list[str], suffix: str | tuple[str, ...], what: str = "path") -> list[str]:
    """Sorted URLs of the files ending in `suffix` (one, or a tuple of them) that a directory, glob,
    brace pattern or list of them names."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    found: set[str] = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            fs, path = to_fs(expanded)
            if _GLOB_CHARS & set(path):
                matches = _glob_files(fs, path)
            elif fs.isdir(path):
                matches = _glob_files(fs, posixpath.join(path.rstrip("/"), "*"))
            elif fs.exists(path):
                matches = [path]
            else:
                raise FileNotFoundError(f"{what} {expanded!r} does not exist")
            found.update(_with_protocol_like(expanded, fs, m) for m in matches if m.endswith(suffix))
    # local paths are made absolute so the manifest's URLs work from any directory
    return sorted(u if has_protocol(u) else os.path.abspath(u) for u in found)


def _glob_files(fs, pattern: str) -> list[str]:
    """The files a glob matches: a directory named like a shard (`x.tar/`) is none."""
    return [path for path, info in fs.glob(pattern, detail=True).items() if info["type"] == "file"]


def shard_names(urls: list[str]) -> list[str]:
    """Names of shards relative to their common directory ('00000000.tar', or 'a/00000000.tar')."""
    paths = [to_fs(u)[1] for u in urls]
    dirs = [posixpath.dirname(p) for p in paths]
    common = posixpath.commonpath(dirs) if len(set(dirs)) > 1 else dirs[0]
    return [posixpath.relpath(p, common) if common else p for p in paths]


def exists(url: str) -> bool:
    fs, path = to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = to_fs(url)
    fs.makedirs(path, exist_ok=True)


def remove_tree(url: str) -> None:
    fs, path = to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted URLs of the files directly inside a directory URL (none when it does not exist)."""
    fs, path = to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(
        _with_protocol_like(url, fs, p)
        for p in fs.ls(path, detail=False)
        if p.endswith(suffix) and ".tmp-" not in posixpath.basename(p)
    )


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator:
    """Write to a temporary name beside `url` and rename it into place only after a clean close.

    Readers therefore never see a partial file under the final name, and a crash leaves at most a
    `.tmp-*` file that globs for `*.parquet` / `*.tar` do not match.
    """
    fs, path = to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def remove_temporaries(url: str) -> int:
    """Remove the `.tmp-*` files under a directory URL (what atomic writes cut short by a killed
    process leave behind); returns how many. Only for a directory no other process is writing to."""
    fsys, path = to_fs(url)
    if not fsys.exists(path):
        return 0
    stale = [p for p in fsys.find(path) if ".tmp-" in posixpath.basename(p)]
    for p in stale:
        fsys.rm(p)
    return len(stale)


def write_bytes_atomic(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as handle:
        handle.write(data)


def open_input(url: str, block_size: int = 8 * 2**20):
    """Open a file for streaming or ranged reads with a read-ahead block of `block_size` bytes."""
    fsys, path = to_fs(url)
    return fsys.open(path, "rb", block_size=block_size)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as handle:
        return handle.read()


def put_file_atomic(local_path: str, url: str) -> None:
    """Move a finished local file to `url` (upload for remote filesystems) atomically."""
    fs, path = to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.put_file(local_path, tmp)
    fs.mv(tmp, path)
