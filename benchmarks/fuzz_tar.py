"""Mutation fuzzing of the tar shard reader (pipeline.io.tar.TarReader) for a given time.

    python benchmarks/fuzz_tar.py [--seconds 60] [--seed 0] [--bound 1.0]

Each input is a small random shard (tests.tar_mutations.random_shard) put through the mutations of
tests/io/test_tar_hostile.py (byte flips, huge sizes, cuts, inserted garbage) and, on top, forged
blocks whose checksum is valid: random names (invalid UTF-8, '..', absolute), types, octal,
base-256 and negative sizes, pax headers with hostile records (huge or non-numeric sizes, GNU
sparse keys, malformed lengths), copies of real headers elsewhere. Half the inputs are read as an
unseekable stream (size unknown). Prints the inputs tried, exceptions, hangs (inputs that ran past
`--bound` seconds, interrupted by a timer) and invariant violations (a problem-free member whose
data are not the bytes at its offset, a name that Arrow could not hold, work beyond the bound of
blocks examined), with the seed of the first few of each to reproduce them.
"""

from __future__ import annotations

import argparse
import io
import random
import signal
import time
import traceback
from collections import Counter

from pipeline.io.tar import TarReader
from tests.tar_mutations import BLOCK, Unseekable, base256, header, mutate, pax, random_shard

NAMES = [b"a.jpg", b"../../x.txt", b"/etc/passwd", b"caf\xe9\xff.txt", b"d/", b"", b"\x00x", b"k.TXT", b"a" * 100]
TYPES = [b"0", b"\x00", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"L", b"K", b"x", b"X", b"g", b"V", b"M", b"N",
         b"D", b"Z"]


class Hang(Exception):
    """Raised by the timer when one input runs past the bound."""


def forged_size(rng: random.Random) -> int | bytes:
    return rng.choice([
        rng.randint(0, 5000), rng.randint(0, 8**11 - 1), base256(rng.choice([2**62, 2**40, 10**18])),
        b"\xff" + rng.randbytes(11),  # base-256 negative
        rng.randbytes(12), b"1e20" + bytes(8),
    ])


def forged_block(rng: random.Random) -> bytes:
    """A header block with a valid checksum and hostile fields."""
    extra = {482: b"\x01"} if rng.random() < 0.3 else None
    magic = rng.choice([b"ustar\x0000", b"ustar  \x00", bytes(8)])
    return header(rng.choice(NAMES), forged_size(rng), rng.choice(TYPES), linkname=rng.choice(NAMES),
                  prefix=rng.choice([b"", b"p" * 155, b"caf\xe9"]), magic=magic, extra=extra, signed=rng.random() < 0.2)


def forged_pax(rng: random.Random) -> bytes:
    records = {}
    for _ in range(rng.randint(1, 4)):
        key = rng.choice([b"path", b"size", b"linkpath", b"GNU.sparse.name", b"GNU.sparse.realsize", b"GNU.sparse.size",
                          b"GNU.sparse.major", b"comment", b"hdrcharset"])
        records[key] = rng.choice([b"1" + b"0" * 20, b"1e20", b"-5", b"", b"12", rng.choice(NAMES), b"9" * 5000])
    block = pax(records, rng.choice([b"x", b"g", b"X"]))
    if rng.random() < 0.3:  # break a record's length
        block = bytearray(block)
        block[BLOCK + rng.randrange(4)] = ord(rng.choice("0123456789 x"))
    return bytes(block)


def hostile(rng: random.Random, shard: bytes, listing) -> bytes:
    data, _ = mutate(rng, shard, listing)
    data = bytearray(data)
    for _ in range(rng.randint(0, 3)):
        at = rng.randrange(0, len(data) + 1, BLOCK) if len(data) >= BLOCK else 0
        choice = rng.random()
        if choice < 0.4:
            data[at:at] = forged_block(rng) + rng.randbytes(rng.choice([0, 100, 512, 1500]))
        elif choice < 0.7:
            data[at:at] = forged_pax(rng)
        elif choice < 0.85 and listing:
            start = rng.choice(listing).offset - BLOCK
            data[at:at] = shard[start : start + BLOCK]  # a copy of a real header, elsewhere
        else:
            data[at : at + BLOCK] = forged_block(rng)
    return bytes(data)


def check(data: bytes, seekable: bool, seen: Counter) -> str | None:
    """Read one input, counting what it held in `seen`; the invariant it broke, if any."""
    reader = TarReader(io.BytesIO(data) if seekable else Unseekable(data), 1 << 20)
    for m in reader:
        seen[m.problem or "read"] += 1
        m.name.encode("utf-8")
        (m.detail or "").encode("utf-8")
        if m.problem is None and m.data != data[m.offset : m.offset + m.size]:
            return f"member {m.name!r}: data are not the bytes at its offset"
        if m.problem is None and m.offset % BLOCK:
            return f"member {m.name!r}: offset {m.offset} is not block-aligned"
    seen["breaks"] += len(reader.breaks)
    if reader.blocks_examined > 2 * (len(data) // BLOCK + 2):
        return f"{reader.blocks_examined} blocks examined for {len(data)} bytes"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound", type=float, default=1.0, help="seconds one input may take before it counts as a hang")
    args = parser.parse_args()

    def on_timer(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, on_timer)
    bases = [random_shard(random.Random(f"{args.seed}-base-{i}")) for i in range(50)]
    counts: Counter = Counter()
    seen: Counter = Counter()
    first: dict[str, list[str]] = {"exception": [], "hang": [], "invariant": []}
    slowest, slowest_case = 0.0, 0
    started = time.perf_counter()
    case = 0
    while time.perf_counter() - started < args.seconds:
        rng = random.Random(f"{args.seed}-{case}")
        shard, listing = bases[case % len(bases)]
        data = hostile(rng, shard, listing)
        seekable = case % 2 == 0
        began = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.bound)
        try:
            broke = check(data, seekable, seen)
            kind = "invariant" if broke else None
        except Hang:
            kind, broke = "hang", f"over {args.bound} s"
        except Exception as exc:  # what the fuzzing is for: none may escape
            kind, broke = "exception", "".join(traceback.format_exception_only(exc)).strip()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if time.perf_counter() - began > slowest:
            slowest, slowest_case = time.perf_counter() - began, case
        counts["inputs"] += 1
        counts["bytes"] += len(data)
        if kind:
            counts[kind + "s"] += 1
            if len(first[kind]) < 5:
                first[kind].append(f"case {case} (seed {args.seed}, {'seekable' if seekable else 'unseekable'}): {broke}")
        case += 1
    elapsed = time.perf_counter() - started
    print(f"inputs tried: {counts['inputs']} ({counts['bytes'] / 1e6:.1f} MB) in {elapsed:.1f} s, "
          f"slowest input {slowest * 1000:.1f} ms (case {slowest_case})")
    print(f"exceptions: {counts['exceptions']}  hangs (> {args.bound} s): {counts['hangs']}  "
          f"invariant violations: {counts['invariants']}")
    print("members: " + ", ".join(f"{k} {v}" for k, v in seen.most_common() if k != "breaks")
          + f"; breaks (resynchronisations, cut headers): {seen['breaks']}")
    for kind, examples in first.items():
        for example in examples:
            print(f"  {kind}: {example}")


if __name__ == "__main__":
    main()
