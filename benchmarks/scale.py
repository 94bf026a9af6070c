"""Scale: how the pipeline's time and memory grow with the pool size N.

    python benchmarks/scale.py [--sizes 100000,400000,1600000] [--work /tmp/curate-scale] [--baseline-tree PATH]
    python benchmarks/scale.py --sizes 2000,8000 --shard-size 1000      # a quick check

For each N it writes (once; cached under --work) a pool of small JPEGs with DataComp-style
metadata (benchmarks/scale_pool.py; generation is timed apart and is no part of the figures), then
runs the quickstart recipe without a model as a subprocess, `python -m pipeline.cli run`, on an
embedded Ray with 2 CPUs: basic filter (image size and language rules off: the images are 24-48
px, the captions random English words), exact + pHash dedup, semantic dedup on the provided
embeddings (cluster stage), the top clip-score fraction, DBP, a select.where predicate, write. Both
k-means train on at most --train-points samples (200,000), so that what grows with N is what the
curve shows; training on the default 1,000,000 costs its own fixed memory once N passes that.

A sampler thread polls every 0.2 s, with psutil, the driver and all its descendants (the embedded
Ray's gcs, raylet and workers are its children) and attributes each poll to the stage running then,
from the driver's log lines as they stream ("<stage>: first run" ... "<stage>: N in, N out, Xs").
Per stage: wall seconds, the peak RSS of the largest single process, the peak of the sum of RSS
over all processes. RSS counts the shared pages a process has mapped, the Ray object store's
included, so a block in the store counts once in each process that maps it: the sum overstates
the machine's memory, and the largest process includes what it reads through the store. "start"
is the time before the first stage (imports, checks, Ray start), "end" the gaps between stages and
what follows the last one (invariant check, summary, Ray shutdown).

Derived figures, the project's targets: the largest process's peak growth from the second-largest
N to the largest (target < 10%), and the time at each larger N against linear extrapolation from the
smallest (target <= 1.2 x linear), per stage and in all.

--baseline-tree PATH (another checkout, e.g. `git worktree add /tmp/base OLD`) runs every pool a
second time with PYTHONPATH=PATH, back to back with the current tree (before, then after, per N),
and prints both tables and the ratio after/before per stage. A failed run exits 1 with its log tail.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_pool import ensure_pool  # noqa: E402

STAGES = ("ingest", "embed", "cluster", "dedup", "select", "metadata", "write", "report")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d curate \w+ (\w+): (.*)$")
DONE = re.compile(r"^\d+ in, \d+ out, [\d.]+s$")
MiB = 2**20

JOB = """\
# Written by benchmarks/scale.py: the quickstart recipe on provided embeddings, no model.
input: {pool}/shards
output: {work}/runs/unused   # each run sets output= on its command line
ray: {{address: local, num_cpus: {cpus}}}
embed:
  provided: {{metadata: {pool}/metadata, embeddings: l14, clip_score: clip_l14_similarity_score}}
basic_filter: {{enabled: true, languages: [], min_image_side: 0}}
cluster: {{samples_per_cluster: {per_cluster}, max_train_points: {train_points}}}
dedup: {{exact: true, phash: true, phash_radius: 4, semantic: true, semantic_eps: 0.05}}
select:
  clip: {{fraction: 0.7}}
  dbp: {{enabled: true, target: 0.6, k: {dbp_k}, max_train_points: {train_points}}}
  where: "caption_words >= 4"
write: {{shard_size: 10000}}
"""


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "cpu")
    return f"{os.cpu_count()} x {cpu}, {psutil.virtual_memory().total / 2**30:.0f} GiB"


class Sampler(threading.Thread):
    """Polls the process tree under `pid`; per stage the peak of the largest RSS and of the sum."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.stage = "start"
        self.peaks: dict[str, dict] = {}
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes = []
            for proc in procs:
                try:
                    sizes.append((proc.memory_info().rss, proc))
                except psutil.Error:
                    pass
            if sizes:
                peak = self.peaks.setdefault(self.stage, {"max": 0, "who": "", "sum": 0, "procs": 0})
                largest, proc = max(sizes, key=lambda s: s[0])
                if largest > peak["max"]:
                    peak["max"], peak["who"] = largest, "driver" if proc is self.root else _name(proc)
                peak["sum"] = max(peak["sum"], sum(s[0] for s in sizes))
                peak["procs"] = max(peak["procs"], len(sizes))
            self.finished.wait(self.interval)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def run_job(tree: Path, job: Path, output: Path, log_path: Path) -> dict:
    """One run of `tree`'s pipeline as a subprocess; its stages' wall seconds and memory peaks."""
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(job), f"output={output}"]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    # cwd=tree: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    seconds: dict[str, float] = {}
    since, tail = started, collections.deque(maxlen=60)
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                match = LOG_LINE.match(line.rstrip("\n"))
                if not match or match.group(1) not in STAGES:
                    continue
                stage, now = match.group(1), time.perf_counter()
                if DONE.match(match.group(2)):  # "<stage>: N in, N out, Xs"
                    seconds[stage] = now - since
                    sampler.stage, since = "end", now
                elif sampler.stage != stage:  # "<stage>: first run" (or any first line of a stage)
                    seconds[sampler.stage] = seconds.get(sampler.stage, 0.0) + now - since
                    sampler.stage, since = stage, now
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: end the run and the Ray it started (its own session)
            os.killpg(proc.pid, 15)
            proc.wait()
        sampler.finished.set()
        sampler.join()
    total = time.perf_counter() - started
    seconds[sampler.stage] = seconds.get(sampler.stage, 0.0) + time.perf_counter() - since
    if rc != 0 or "report" not in seconds:
        print(f"\nrun failed (exit code {rc}): {' '.join(command)}\n(cwd {tree}; log {log_path}); its last lines:")
        print("".join(tail), end="")
        sys.exit(1)
    return {"seconds": seconds, "total": total, "peaks": sampler.peaks, "load": load,
            "command": f"PYTHONPATH={tree} {' '.join(command)}"}


def rows(result: dict) -> list[tuple[str, float, dict]]:
    """(stage, seconds, peaks) in run order, then 'all'."""
    order = ["start", *[s for s in STAGES if s in result["seconds"]], "end"]
    out = [(name, result["seconds"].get(name, 0.0), result["peaks"].get(name, {})) for name in order]
    peaks = [p for _, _, p in out if p]
    top = max(peaks, key=lambda p: p["max"])
    total = {"max": top["max"], "who": top["who"], "sum": max(p["sum"] for p in peaks),
             "procs": max(p["procs"] for p in peaks)}
    return [*out, ("all", result["total"], total)]


def print_table(label: str, n: int, result: dict) -> None:
    print(f"\n{label}, N = {n:,}: {result['total']:.1f} s, load average before {result['load']:.2f}")
    print(f"{'stage':<9} {'seconds':>8} {'us/sample':>9} {'largest MiB':>11} {'(process)':<22} {'sum MiB':>8} {'procs':>5}")
    for name, seconds, peak in rows(result):
        print(f"{name:<9} {seconds:>8.2f} {seconds / n * 1e6:>9.1f} {peak.get('max', 0) / MiB:>11.0f} "
              f"{peak.get('who', '')[:22]:<22} {peak.get('sum', 0) / MiB:>8.0f} {peak.get('procs', 0):>5}")


def print_scaling(label: str, sizes: list[int], results: dict[int, dict]) -> None:
    first, (second_last, last) = sizes[0], sizes[-2:]
    table = {n: {name: (seconds, peak) for name, seconds, peak in rows(results[n])} for n in sizes}
    print(f"\n{label}: time / (time at N = {first:,} x N / {first:,}) at each larger N (target <= 1.2); "
          f"largest process's peak growth from N = {second_last:,} to {last:,} (target < 10%)")
    print(f"{'stage':<9}" + "".join(f" {'N = ' + format(n, ','):>13}" for n in sizes[1:]) + f" {'peak growth':>12}")
    for name, (base, _) in table[first].items():
        ratios = [table[n].get(name, (0.0, {}))[0] / (base * n / first) if base else float("nan") for n in sizes[1:]]
        before, after = (table[n].get(name, (0.0, {}))[1].get("max", 0) for n in (second_last, last))
        growth = f"{after / before * 100 - 100:+.1f}%" if before and after else "-"
        print(f"{name:<9}" + "".join(f" {r:>13.2f}" for r in ratios) + f" {growth:>12}")


def _ratio(after: float, before: float) -> str:
    return f"{after / before:6.2f}" if before else "     -"


def print_ratio(sizes: list[int], before: dict[int, dict], after: dict[int, dict]) -> None:
    print("\nafter / before, per stage (time, largest process's peak RSS, sum of RSS):")
    for n in sizes:
        old = {name: (s, p) for name, s, p in rows(before[n])}
        print(f"N = {n:,}")
        for name, seconds, peak in rows(after[n]):
            if name not in old:
                print(f"  {name:<9} (not in the baseline run)")
                continue
            then, was = old[name]
            print(f"  {name:<9} time {_ratio(seconds, then)}  largest {_ratio(peak.get('max', 0), was.get('max', 0))}"
                  f"  sum {_ratio(peak.get('sum', 0), was.get('sum', 0))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,400000,1600000", help="pool sizes N (default: %(default)s)")
    parser.add_argument("--work", default="/tmp/curate-scale", help="pools, job files, runs, logs (default: %(default)s)")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout, run the same pools before the current tree")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per input shard (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension of the metadata (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="ray.num_cpus of the embedded Ray (default: %(default)s)")
    parser.add_argument("--samples-per-cluster", type=int, default=9000, help="cluster.samples_per_cluster (default: %(default)s)")
    parser.add_argument("--dbp-k", type=int, default=100, help="select.dbp.k (default: %(default)s)")
    parser.add_argument("--train-points", type=int, default=200_000,
                        help="cluster and dbp max_train_points: k-means samples at most this many (default: %(default)s)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's output (default: removed when it passes)")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.work).resolve()
    trees = [("after", ROOT)]
    if args.baseline_tree:
        if not (args.baseline_tree / "pipeline" / "cli.py").exists():
            parser.error(f"--baseline-tree {args.baseline_tree}: no pipeline/cli.py there")
        trees.insert(0, ("before", args.baseline_tree.resolve()))
    print(f"hardware: {hardware()}; embedded Ray with {args.cpus} CPUs; python {sys.version.split()[0]}")
    print(f"trees: {', '.join(f'{label} = {tree}' for label, tree in trees)}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    jobs = {}
    for n in sizes:
        pool = work / "pools" / str(n)
        made, seconds = ensure_pool(pool, n, shard_size=args.shard_size, dim=args.dim)
        how = "cached" if seconds is None else f"written in {seconds:.1f} s ({n / seconds:,.0f} samples/s)"
        print(f"pool N = {n:,}: {made['shards']} shards, {made['bytes'] / MiB:,.0f} MiB, {made['roles']}; {how}", flush=True)
        jobs[n] = work / "jobs" / f"scale-{n}.yaml"
        jobs[n].parent.mkdir(parents=True, exist_ok=True)
        jobs[n].write_text(JOB.format(pool=pool, work=work, cpus=args.cpus, per_cluster=args.samples_per_cluster,
                                      dbp_k=args.dbp_k, train_points=args.train_points))
    print("the job (per N):\n  " + JOB.format(pool="POOL", work=args.work, cpus=args.cpus,
                                               per_cluster=args.samples_per_cluster, dbp_k=args.dbp_k,
                                               train_points=args.train_points)
          .replace("\n", "\n  ").rstrip())

    results: dict[str, dict[int, dict]] = {label: {} for label, _ in trees}
    for n in sizes:
        for label, tree in trees:
            output = work / "runs" / f"{label}-{n}"
            (work / "logs").mkdir(parents=True, exist_ok=True)
            result = run_job(tree, jobs[n], output, work / "logs" / f"{label}-{n}.log")
            results[label][n] = result
            print(f"run {label} N = {n:,}: {result['total']:.1f} s: (cd {tree}; {result['command']})", flush=True)
            if not args.keep_runs:
                shutil.rmtree(output, ignore_errors=True)

    print("\nRSS counts the shared object-store pages each process has mapped (see the docstring).")
    for label, tree in trees:
        for n in sizes:
            print_table(f"{label} ({tree})", n, results[label][n])
        if len(sizes) > 1:
            print_scaling(label, sizes, results[label])
    if args.baseline_tree:
        print_ratio(sizes, results["before"], results["after"])
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
