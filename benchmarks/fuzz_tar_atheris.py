"""Coverage-guided fuzzing (atheris, libFuzzer) of the tar shard reader and of ingest's per-shard function.

atheris is not one of the project's dependencies (the lock is strict); install it beside them:

    pip install --target /tmp/atheris-lib atheris==3.0.0     # cp311 manylinux wheel, bundles libFuzzer

then, from the repository root, one target at a time (extra arguments go to libFuzzer):

    PYTHONPATH=.:/tmp/atheris-lib python benchmarks/fuzz_tar_atheris.py --target reader \
        --corpus /tmp/fuzz/reader -- -max_total_time=300 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    PYTHONPATH=.:/tmp/atheris-lib python benchmarks/fuzz_tar_atheris.py --target ingest \
        --corpus /tmp/fuzz/ingest -- -max_total_time=300 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1

A crashing, hanging (past `-timeout`) or out-of-memory input is written as crash-*, timeout-* or
oom-* under `--artifacts` (default: the current directory); run the script with that file as the
only libFuzzer argument to replay it (`... --target reader -- crash-123abc`).

Targets (the project's modules, and stdlib tarfile whose numeric parsing the reader uses, are
instrumented for coverage):

- `reader`: pipeline.io.tar.TarReader over the input, as a seekable stream (size known, 1 MiB
  member limit) and as an unseekable one (size unknown, 4 KiB limit). Nothing may raise: the reader
  has no error type of its own for the shard's bytes. At most 2 * (blocks + 2) blocks may be
  examined as possible headers; a member read has exactly the bytes at its (block-aligned) offset;
  names and details are strings Arrow can hold; every break lies inside the shard and resumes after
  where it broke.
- `ingest`: pipeline.stages.ingest.ingest_shard over the input as an in-memory shard (the default
  config, but a 64 KiB member limit), with the lid.176 language model. Nothing may raise, and
  nothing may go silent: every sample key the reader yields has exactly one row, a sample with a
  refused member (unsafe, truncated, oversize) is dropped with that reason, a row kept has its image
  and caption, and the shard's error is set exactly when the reader recorded a break.

The seed corpus (written into `--corpus` when it has no file yet): small shards in GNU, pax and
ustar format (tests.tar_mutations.random_shard), shards of real samples written with the project's
TarWriter and one from pipeline.synth, the hand-made hostile cases of tests/io/test_tar_hostile.py
(huge and non-numeric sizes, pax and long-name headers, GNU sparse, links, devices, non-UTF-8 names,
cuts), seeded mutations of them, samples whose json breaks parsers (deep nesting, a lone surrogate,
a 4400-digit integer) and PNG headers past the pixel limits. A custom mutator runs libFuzzer's own mutations and then, half
the time, gives valid checksums to the block-aligned blocks that look like headers, so that the
fuzzer can explore header fields behind the checksum; a dictionary holds tar's magic strings and
pax keywords.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import struct
import sys
import tempfile
import zlib
from collections import Counter

import atheris

# Not instrumented: only the project's code and tarfile are.
import numpy  # noqa: F401
import pyarrow  # noqa: F401
from PIL import Image

with atheris.instrument_imports(include=["pipeline", "tarfile"]):
    import tarfile  # noqa: F401

    from pipeline.config import CurateConfig
    from pipeline.io.compression import GZIP_MAGIC
    from pipeline.io import tar_headers  # noqa: F401
    from pipeline.io.tar import TarReader, TarWriter
    from pipeline.stages.ingest import LanguageIdentifier, ingest_shard

from tests.tar_mutations import (
    BLOCK, END, Unseekable, base256, header, member, mutate, pax, random_shard, with_checksum,
)

INGEST_REASONS = ("unsafe_member", "truncated", "oversize_member")
DICTIONARY = [
    b"ustar\x0000", b"ustar  \x00", b"././@LongLink", b"././@PaxHeader", b"path=", b"size=", b"linkpath=",
    b"GNU.sparse.name=", b"GNU.sparse.size=", b"GNU.sparse.realsize=", b"GNU.sparse.major=", b"hdrcharset=",
    b".jpg", b".txt", b".json", b".png", b".webp", b"../", b"\x80\x00\x00\x00", b"\xff\xff\xff\xff", b"77777777777\x00",
    b'{"url": "', b'"uid": "', b'"original_width": ', b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"WEBP",
]


# --- seeds ---------------------------------------------------------------------------------------

def _jpeg(width: int, height: int, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 7).save(buffer, "PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 16) + chunk(b"IEND", b"")


def _written(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with TarWriter(buffer) as tar:
        for name, data in members:
            tar.add(name, data)
    return buffer.getvalue()


def _synth_shard() -> bytes:
    from pipeline.synth.pool import synthesize

    with tempfile.TemporaryDirectory() as folder:
        synthesize(folder, samples=2, seed=0, shard_size=2, workers=1, non_adjacent_fraction=0.5)
        with open(os.path.join(folder, "00000000.tar"), "rb") as f:
            return f.read()


def seeds() -> list[bytes]:
    caption = b"a red square drawn on a plain white background"
    meta = json.dumps({"uid": "0123456789abcdef0123456789abcdef", "url": "http://x/1.jpg",
                       "original_width": 640, "original_height": 480}).encode()
    written = [
        _written([("k1.jpg", _jpeg(16, 16, (200, 40, 40))), ("k1.txt", caption), ("k1.json", meta),
                  ("k2.png", _png(8, 300)), ("k2.txt", "un carré rouge sur fond blanc".encode()),
                  ("k3.jpg", b"\xff\xd8\xff not a jpeg"), ("k3.json", b'{"url": 5, "uid": "xyz"'),
                  ("k4.txt", b"\xff\xfe caption")]),
        _written([("d/s1.jpg", _jpeg(24, 12, (0, 90, 200))), ("d/s1.json", b"[1, 2]"), ("d/s1.txt", b"  "),
                  ("d/s2.webp", b"RIFF\x00\x00\x00\x00WEBP"), ("d/s2.txt", caption)]),
        # json that breaks parsers (tests/stages/test_ingest.py), and an image header past the pixel limit
        _written([("j1.jpg", _jpeg(8, 8, (1, 2, 3))), ("j1.txt", caption), ("j1.json", b'{"a": ' * 1200 + b"1" + b"}" * 1200),
                  ("j2.json", b'{"url": "http://x/\\ud800.jpg", "original_width": 1e400, "original_height": 2.5}'),
                  ("j3.json", b'{"uid": "0123456789abcdef0123456789abcdeF", "n": ' + b"7" * 4400 + b"}"),
                  ("j4.png", _png_header(10_000, 10_000)), ("j4.txt", caption), ("j5.png", _png_header(20_000, 20_000))]),
    ]
    hostile = [
        header(b"huge.jpg", base256(2**62)) + b"\xab" * 2048 + member(b"b.txt", b"after") + END,
        header(b"huge.jpg", b"77777777777\x00") + b"\xab" * 1024 + member(b"b.txt", b"after") + END,
        header(b"t.jpg", 5000) + b"\x01" * 1000,
        pax({b"size": b"1e20"}) + member(b"p.jpg", b"P" * 100) + member(b"q.txt", b"Q") + END,
        pax({b"size": b"1" + b"0" * 20}) + member(b"p.jpg", b"P" * 100) + END,
        member(b"caf\xe9-\xff.jpg", b"data") + member(b"ok.txt", b"fine") + END,
        pax({b"path": b"caf\xe9.jpg"}) + member(b"named-by-pax.jpg", b"data") + END,
        member(b"././@LongLink", b"caf\xe9-\xff.jpg\x00", b"L") + member(b"cut", b"data") + END,
        header(b"s.txt", 1500, b"S", magic=b"ustar  \x00",
               extra={386: b"00000000000\x00" + b"%011o\x00" % 1500, 482: b"\x01", 483: b"%011o\x00" % 10**9})
        + bytes(BLOCK) + b"S" * 1500 + bytes(36) + member(b"s2.txt", b"caption") + END,
        pax({b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0", b"GNU.sparse.name": b"s.txt",
             b"GNU.sparse.realsize": b"999999"})
        + member(b"./GNUSparseFile.0/s.txt", b"512\n0\n700\n".ljust(512, b"\x00") + b"s" * 700) + END,
        header(b"././@LongLink", 300, b"L") + b"x" * 100,
        pax({b"comment": b"made by git archive"}, b"g") + member(b"name.txt", b"prefixed", prefix=b"some/dir")
        + bytes(BLOCK) + member(b"after.txt", b"still read") + END,
        header(b"\xc3\xa9t\xc3\xa9.txt", 2, signed=True) + b"ok".ljust(BLOCK, b"\x00") + END,
        member(b"././@PaxHeader", b"99 path=x.jpg\n", b"x") + member(b"x.jpg", b"X") + END,
        header(b"././@LongLink", base256(2**40), b"L") + member(b"a.txt", b"A") + END,
        header(b"s.jpg", 0, b"2", linkname=b"/etc/passwd") + header(b"d.jpg", 0, b"3") + member(b"../x.txt", b"e")
        + member(b"v.txt", b"", b"V") + member(b"/abs.txt", b"a") + member(b"dir/", b"", b"5") + END,
        b"<html>not a tar</html>" * 40,
        b"",
    ]
    rng = random.Random(20261202)
    shards = [random_shard(rng) for _ in range(6)]
    mutated = [mutate(rng, *shards[i % len(shards)])[0] for i in range(12)]
    return [s for s, _ in shards] + written + [_synth_shard()] + hostile + mutated


# --- the custom mutator --------------------------------------------------------------------------

def _fix_checksums(data: bytes, rng: random.Random) -> bytes:
    """Valid checksums for the aligned blocks that look like headers (a tar magic, or a chance)."""
    out = bytearray(data)
    for at in range(0, len(out) - BLOCK + 1, BLOCK):
        block = out[at : at + BLOCK]
        if block.count(0) == BLOCK:
            continue
        if block[257:262] == b"ustar" or rng.random() < 0.03:
            out[at : at + BLOCK] = with_checksum(block, signed=rng.random() < 0.1)
    return bytes(out)


def mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    data = atheris.Mutate(data, max_size)
    if rng.random() < 0.5:
        data = _fix_checksums(data, rng)
    return data


# --- the targets ---------------------------------------------------------------------------------

def _bound(data: bytes) -> int:
    return 2 * (len(data) // BLOCK + 2)


def check_reader(data: bytes, stream, limit: int) -> TarReader:
    reader = TarReader(stream, limit)
    for m in reader:
        m.name.encode("utf-8"), m.key.encode("utf-8"), m.ext.encode("utf-8"), (m.detail or "").encode("utf-8")
        assert (m.problem is None) == (m.detail is None), (m.name, m.problem, m.detail)
        if m.problem is None:
            assert m.offset % BLOCK == 0 and m.offset + m.size <= len(data), (m.name, m.offset, m.size)
            assert m.data == data[m.offset : m.offset + m.size], f"member {m.name!r}: data are not the bytes at its offset"
        else:
            assert m.problem in INGEST_REASONS and m.data is None, (m.name, m.problem)
    assert reader.blocks_examined <= _bound(data), f"{reader.blocks_examined} blocks examined for {len(data)} bytes"
    for b in reader.breaks:
        assert 0 <= b.offset <= len(data) and (b.resumed is None or b.offset < b.resumed <= len(data)), b
        b.message.encode("utf-8")
    return reader


def test_reader(data: bytes) -> None:
    check_reader(data, io.BytesIO(data), 1 << 20)
    check_reader(data, Unseekable(data), 4096)


_INGEST: dict = {}


def test_ingest(data: bytes) -> None:
    config, langid = _INGEST["config"], _INGEST["langid"]
    table, report = ingest_shard(io.BytesIO(data), shard="00000000.tar", partition=0, config=config, langid=langid)
    rows = table.to_pylist()
    assert report.samples == len(rows) and sum(report.reasons.values()) == sum(r["drop_reason"] is not None for r in rows)
    keys: dict[str, list[str]] = {}
    rows_per_key: Counter = Counter()
    if data[:2] != GZIP_MAGIC:  # gzip bytes are decompressed first: the plain reader would see other members
        listed = TarReader(io.BytesIO(data), config.ingest.max_member_bytes)  # what ingest was given, member by member
        repeats: Counter = Counter()
        cut = False
        for m in listed:
            keys.setdefault(m.key, [])
            repeats[m.key, m.ext] += 1
            cut = cut or m.problem == "truncated"
            if m.problem is not None:
                keys[m.key].append(m.problem)
        # one row per key, and one more for each repeat of a key's member of the same extension
        for (key, _), n in repeats.items():
            rows_per_key[key] = max(rows_per_key[key], n)
        assert Counter(r["key"] for r in rows) == rows_per_key, "a sample key has no row, or a wrong number of rows"
        assert list(dict.fromkeys(r["key"] for r in rows)) == list(keys), "rows are not in order of first appearance"
        assert (report.shard_error is not None) == (bool(listed.breaks) or cut), (report.shard_error, listed.breaks)
    for r in rows:
        problems = keys.get(r["key"], [])
        if problems and rows_per_key[r["key"]] == 1:  # a repeated key spreads its members over its rows
            assert r["drop_reason"] in problems, (r["key"], r["drop_reason"], problems)
        if r["drop_reason"] is None:
            assert r["sha256"] and r["caption"] and r["caption"].strip() and r["phash"] is not None, r["key"]
        else:
            assert r["drop_detail"], (r["key"], r["drop_reason"])
        assert len(r["uid"]) == 32, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["reader", "ingest"], required=True)
    parser.add_argument("--corpus", help="corpus folder (seeded when it holds no file); omit to replay files")
    parser.add_argument("--artifacts", default="./", help="prefix of crash-/timeout-/oom- files (a folder ends in /)")
    parser.add_argument("libfuzzer", nargs="*", help="after --: libFuzzer flags, or files to replay")
    args = parser.parse_args()

    argv = [sys.argv[0], f"-artifact_prefix={args.artifacts}"]
    with tempfile.NamedTemporaryFile("w", suffix=".dict", delete=False) as f:
        for token in DICTIONARY:
            f.write('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n')
    argv.append(f"-dict={f.name}")
    argv += args.libfuzzer
    if args.corpus:
        os.makedirs(args.corpus, exist_ok=True)
        if not os.listdir(args.corpus):
            for i, seed in enumerate(seeds()):
                with open(os.path.join(args.corpus, f"seed-{i:03d}"), "wb") as out:
                    out.write(seed)
        argv.append(args.corpus)

    if args.target == "ingest":
        _INGEST["config"] = CurateConfig.model_validate(
            {"input": "pool", "output": "out", "ingest": {"max_member_bytes": 1 << 16}})
        _INGEST["langid"] = LanguageIdentifier()
        test_one = test_ingest
    else:
        test_one = test_reader
    atheris.Setup(argv, test_one, custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
