"""What the content digest costs ingest: one shard ingested with and without sha256 over its bytes.

    python benchmarks/ingest_digest.py [--samples 1000] [--repeats 3]

Prints the best of `repeats` for each and the ratio digest / baseline, both measured in this run.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from pipeline.config import CurateConfig
from pipeline.stages.ingest import DigestingReader, LanguageIdentifier, ingest_shard
from pipeline.synth import synthesize


def best_of(repeats: int, ingest) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        ingest()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="samples in the shard (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, the best counts (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, samples=args.samples, seed=0, shard_size=args.samples)
        shard = sorted(Path(tmp).glob("*.tar"))[0]
        data = shard.read_bytes()
    config = CurateConfig.model_validate({"input": "unused-pool", "output": "unused-run"})
    langid = LanguageIdentifier()

    def plain():
        ingest_shard(io.BytesIO(data), shard=shard.name, partition=0, config=config, langid=langid)

    def digested():
        stream = DigestingReader(io.BytesIO(data))
        ingest_shard(stream, shard=shard.name, partition=0, config=config, langid=langid)
        stream.finish()

    plain()  # warm-up: the language model's first calls, the page cache
    baseline = best_of(args.repeats, plain)
    with_digest = best_of(args.repeats, digested)
    mib = len(data) / 2**20
    print(f"shard: {args.samples} samples, {mib:.1f} MiB")
    print(f"ingest without digest: {baseline:.3f} s ({args.samples / baseline:.0f} samples/s)")
    print(f"ingest with sha256:    {with_digest:.3f} s ({args.samples / with_digest:.0f} samples/s)")
    print(f"ratio with/without: {with_digest / baseline:.3f}")


if __name__ == "__main__":
    main()
