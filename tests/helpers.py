"""Small builders for hand-made test input (real tar files, real images)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

from PIL import Image


def jpeg_bytes(width: int = 256, height: int = 256, colour=(200, 40, 40), quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 16):  # some structure so pHash and decoding have work to do
        image.paste((x % 255, 255 - x % 255, 90), (x, 0, min(x + 8, width), height // 2))
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries a few bytes of (invalid) data:
    decoding it would fail, so a test can tell that it was never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 16) + chunk(b"IEND", b"")


def make_tar(members: list) -> bytes:
    """members: (name, bytes) for regular files, or a ready tarfile.TarInfo (links, devices)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def device(name: str, kind=tarfile.CHRTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info


# Overrides that turn jobs/quickstart.yaml into the same job without its model: every stage that
# reads or writes shards still runs, in half the time. For tests of how a job runs, not of the recipe.
WITHOUT_MODEL = ["embed.model=null", "dfn.model=null", "dedup.semantic=false", "select.dfn.threshold=null",
                 "select.dbp.enabled=false"]


def run_config(input_url, output_url, **sections):
    from pipeline.config import CurateConfig

    return CurateConfig.model_validate({"input": str(input_url), "output": str(output_url), **sections})


def read_metadata(run_dir):
    import pyarrow.parquet as pq
    from pathlib import Path

    parts = sorted(Path(run_dir, "metadata").glob("part-*.parquet"))
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in parts])


def shard_members(run_dir) -> list[str]:
    from pathlib import Path

    names = []
    for shard in sorted(Path(run_dir, "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            names.extend(archive.getnames())
    return names


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_loopback_server(command: list[str], port: int, what: str, timeout_s: float = 30.0):
    """Start a test server (a subprocess listening on 127.0.0.1:port) and wait until it accepts
    connections; returns the process (the caller kills it). Raises RuntimeError naming `what`."""
    import socket
    import subprocess
    import time

    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}")
