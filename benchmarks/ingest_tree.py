"""Ingest's speed on one shard against an earlier tree of the project, both measured in this run.

    python benchmarks/ingest_tree.py --baseline REV [--samples 1000] [--repeats 5]

Synthesizes one shard, then in a fresh process per tree runs `ingest_shard` over it `repeats`
times (best of), on the tar and, where this tree reads it, on the same tar gzip-compressed. The
baseline tree is checked out with `git worktree` into a temporary folder. Prints seconds,
samples/s and the ratio this tree / baseline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import io, json, sys, time
from pipeline.config import CurateConfig
from pipeline.stages.ingest import LanguageIdentifier, ingest_shard
path, repeats = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
config = CurateConfig.model_validate({"input": "unused-pool", "output": "unused-run"})
langid = LanguageIdentifier()
best = float("inf")
for _ in range(repeats):
    started = time.perf_counter()
    table, _ = ingest_shard(io.BytesIO(data), shard="s.tar", partition=0, config=config, langid=langid)
    best = min(best, time.perf_counter() - started)
print(json.dumps({"seconds": best, "rows": table.num_rows}))
"""


def measure(tree: Path, shard: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(shard), str(repeats)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision of the baseline tree")
    parser.add_argument("--samples", type=int, default=1000, help="samples in the shard (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, the best counts (default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize(str(tmp / "pool"), samples=args.samples, seed=0, shard_size=args.samples)
        shard = sorted((tmp / "pool").glob("*.tar"))[0]
        packed = tmp / "shard.tar.gz"
        packed.write_bytes(gzip.compress(shard.read_bytes(), compresslevel=6, mtime=0))
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.baseline], check=True)
        try:
            before = measure(base, shard, args.repeats)
            after = measure(ROOT, shard, args.repeats)
            after_gz = measure(ROOT, packed, args.repeats)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    print(f"one shard of {args.samples} samples, best of {args.repeats}")
    print(f"{'':<28} {'seconds':>8} {'samples/s':>10}")
    for name, r in ((f"baseline {args.baseline[:10]}", before), ("this tree, tar", after), ("this tree, tar.gz", after_gz)):
        print(f"{name:<28} {r['seconds']:>8.3f} {r['rows'] / r['seconds']:>10.0f}")
    print(f"ratio this tree / baseline (tar): {after['seconds'] / before['seconds']:.2f}")
    print(f"ratio tar.gz / tar (this tree):   {after_gz['seconds'] / after['seconds']:.2f}")


if __name__ == "__main__":
    main()
