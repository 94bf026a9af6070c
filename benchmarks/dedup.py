"""Dedup benchmarks.

    python benchmarks/dedup.py [--quick]

1. SemDeDup on one cluster, d = 512, with planted near and exact duplicates. Three paths:
   "pruned" is what the dedup stage runs (``semdedup_cluster_with_similarity`` with its
   defaults: blocked, with the angular band around the members' mean direction); "blocked" is
   the same with ``prune=False`` (the full lower triangle); "dense" is the reference
   (``semdedup_cluster_dense``: full n x n matrix). Two kinds of cluster:
   - "spread" (the main case): members at angles to the centroid drawn from a Beta(2, 2)
     distribution stretched over 0.3 ... 1.1 rad (cosine to the centroid 0.45 ... 0.96, mean
     angle 0.7 rad, sd 0.18 rad), directions uniform. CLIP image embeddings sit at cosine ~0.5
     to ~0.95 from their k-means centroid, bell-shaped; a bell over the whole range is the
     conservative choice (a denser middle means wider bands than a uniform spread).
   - "narrow": the isotropic Gaussian blob ``c + 0.9 g / sqrt(d)``, where every member sits at
     0.73 +- 0.03 rad: the band spans the whole cluster, so this measures the pruning's
     overhead when it cannot skip anything.
   Each case runs in its own subprocess;
   memory is the growth of the process's peak RSS during the call over its RSS just before
   (the kernel's peak mark, VmHWM, is reset first; ``ru_maxrss`` where that is not possible),
   so it counts every allocation (numpy, BLAS, torch) and nothing from other cases. The outputs of
   the two paths are compared element for element. "cpu s" is the case's user + system CPU
   time (all threads); "load" is the 1-minute load average when it started (on a shared
   machine wall times are only comparable at low load; CPU times are steadier). Outputs are
   checked against the dense reference: ``dropped`` and ``duplicate_of`` element for element,
   the similarity equal on dropped rows (and NaN on kept rows for the pruned path, exact
   everywhere for the blocked one).
2. pHash near-duplicates (``near_duplicates``, as the dedup stage calls it) for 10^5 and 10^6
   rows at radii 4, 6, 8, with the growth ratio of the time (10x more rows), on two
   distributions: uniform random hashes with 1% planted near copies, and hashes clustered
   around 3,000 centres (0-3 bits flipped each: many near-identical hashes, as templated or
   blank images give).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

D = 512
EPS = 0.01
BLOCK = 1024
SEED = 0
THREADS = 1  # BLAS / OpenMP threads per case (--threads); 1 is what a 1-CPU Ray task gets


def make_cluster(n: int, d: int = D, seed: int = SEED, kind: str = "spread"):
    """One cluster: a centroid plus spread ("spread": Beta(2, 2) angles over 0.3 ... 1.1 rad;
    "narrow": isotropic Gaussian), 10% rows replaced by near copies of others (noise 0 / 0.005
    / 0.02 / 0.05 relative), distances to the centroid, hex uids."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(d)
    c /= np.linalg.norm(c)
    if kind == "spread":
        theta = 0.3 + 0.8 * rng.beta(2.0, 2.0, n)
        u = rng.standard_normal((n, d))
        u -= np.outer(u @ c, c)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        x = np.cos(theta)[:, None] * c + np.sin(theta)[:, None] * u
    else:
        x = c + 0.9 * rng.standard_normal((n, d)) / np.sqrt(d)
    k = n // 10
    src, dst = rng.integers(0, n, k), rng.integers(0, n, k)
    noise = rng.choice([0.0, 0.005, 0.02, 0.05], k)[:, None]
    x[dst] = x[src] + noise * rng.standard_normal((k, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    dist = (1.0 - x @ c.astype(np.float32)).astype(np.float32)
    uids = np.array([f"{int(i):032x}" for i in rng.permutation(n)])
    return x, dist, uids


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(kind: str, n: int, data: str, out: str) -> None:
    """Run one SemDeDup case and print a JSON line (executed in a fresh subprocess).

    Memory: the process's resident set right before the call is the baseline; the peak-RSS
    mark is reset to it (or, where that is not possible, ru_maxrss is used as is), and the
    reported growth is the peak during the call minus the baseline."""
    import torch  # imported before the baseline: the dense path uses it

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from pipeline.algorithms import semdedup

    with np.load(data) as z:
        x, dist, uids = z["x"], z["dist"], z["uids"]
    semdedup.semdedup_cluster_with_similarity(x[:64], dist[:64], uids[:64], EPS, 32)  # warm
    base = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    if not reset:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    if kind == "dense":
        dropped, dup, sim = semdedup.semdedup_cluster_dense(x, dist, uids, EPS)
    elif kind == "blocked":
        dropped, dup, sim = semdedup.semdedup_cluster_with_similarity(x, dist, uids, EPS, BLOCK, prune=False)
    else:  # "pruned": the call the dedup stage makes
        dropped, dup, sim = semdedup.semdedup_cluster_with_similarity(x, dist, uids, EPS, BLOCK)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    np.savez(out, dropped=dropped, dup=dup, sim=sim)
    print(json.dumps({"wall": wall, "cpu": cpu, "growth_mib": peak - base, "dropped": int(dropped.sum())}))


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_case(kind: str, n: int, tmp: Path, cluster: str = "spread") -> dict | None:
    out = tmp / f"{kind}_{cluster}_{n}.npz"
    data = tmp / f"data_{cluster}_{n}.npz"
    if not data.exists():
        x, dist, uids = make_cluster(n, kind=cluster)
        np.savez(data, x=x, dist=dist, uids=uids)
    load = os.getloadavg()[0]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(THREADS)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n), str(data), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode != 0:
        print(f"  {kind} n={n} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return None
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["file"] = out
    res["load"] = load
    return res


_HEADER = ("cluster", "n", "path", "wall s", "cpu s", "peak RSS +MiB", "dropped", "load")
_WIDTHS = (7, 7, 7, 7, 7, 13, 7, 5)


def _row(cells: tuple, note: str = "") -> str:
    text = " ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS, strict=True))
    return f"{text}  {note}".rstrip()


def _cells(cluster: str, n: int, path: str, r: dict) -> tuple:
    return (
        cluster,
        n,
        path,
        f"{r['wall']:.2f}",
        f"{r['cpu']:.2f}",
        f"{r['growth_mib']:.0f}",
        r["dropped"],
        f"{r['load']:.1f}",
    )


def _same_as_dense(got: dict, dense: dict, pruned: bool) -> bool:
    a, b = np.load(got["file"]), np.load(dense["file"])
    if not (np.array_equal(a["dropped"], b["dropped"]) and np.array_equal(a["dup"], b["dup"])):
        return False
    if not pruned:
        return np.array_equal(a["sim"], b["sim"], equal_nan=True)
    d = a["dropped"]
    return np.array_equal(a["sim"][d], b["sim"][d]) and bool(np.isnan(a["sim"][~d]).all())


def _same_decisions(a: dict, b: dict) -> bool:
    p, q = np.load(a["file"]), np.load(b["file"])
    return np.array_equal(p["dropped"], q["dropped"]) and np.array_equal(p["dup"], q["dup"])


def bench_semdedup(sizes: list[int], tmp: Path, cluster: str = "spread") -> None:
    print(
        f"\nSemDeDup, one {cluster!r} cluster, d={D}, eps={EPS}, block_size={BLOCK}, "
        f"10% planted duplicates, {THREADS} BLAS thread(s)"
    )
    print(_row(_HEADER, "note"))
    for n in sizes:
        pruned = run_case("pruned", n, tmp, cluster)
        if pruned:
            print(_row(_cells(cluster, n, "pruned", pruned)))
        blocked = run_case("blocked", n, tmp, cluster)
        if blocked:
            note = ""
            if pruned:
                note = (
                    f"blocked/pruned wall {blocked['wall'] / pruned['wall']:.1f}x, "
                    f"cpu {blocked['cpu'] / pruned['cpu']:.1f}x; "
                    f"same decisions: {'yes' if _same_decisions(pruned, blocked) else 'NO'}"
                )
            print(_row(_cells(cluster, n, "blocked", blocked), note))
        need = n * n * 4 * 1.15
        avail = _mem_available_bytes()
        if need > 0.8 * avail:
            note = (
                f"skipped: the n x n float32 matrix needs {need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available"
            )
            print(_row((cluster, n, "dense", "-", "-", "-", "-", ""), note))
            continue
        dense = run_case("dense", n, tmp, cluster)
        if not dense:
            continue
        notes = []
        for name, r in (("pruned", pruned), ("blocked", blocked)):
            if r:
                same = _same_as_dense(r, dense, pruned=name == "pruned")
                notes.append(
                    f"dense/{name} wall {dense['wall'] / r['wall']:.1f}x, cpu {dense['cpu'] / r['cpu']:.1f}x, "
                    f"memory {dense['growth_mib'] / max(r['growth_mib'], 1):.0f}x, "
                    f"equal: {'yes' if same else 'NO'}"
                )
        print(_row(_cells(cluster, n, "dense", dense), "; ".join(notes)))


def phash_data(n: int, kind: str) -> np.ndarray:
    """64-bit hashes. "random": uniform, then 1% of rows replaced by near copies of others
    (~4 random bits flipped). "clustered": drawn around 3,000 centres, each row a random
    centre with 0-3 random bits flipped (uniformly many), as templated, blank or lightly
    edited images give; the clusters grow with n."""
    rng = np.random.default_rng(1)
    if kind == "random":
        h = rng.integers(0, 2**64, n, dtype=np.uint64)
        k = n // 100
        flips = rng.integers(0, 2**64, k, dtype=np.uint64) & rng.integers(0, 2**64, k, dtype=np.uint64)
        flips &= rng.integers(0, 2**64, k, dtype=np.uint64) & rng.integers(0, 2**64, k, dtype=np.uint64)
        h[rng.integers(0, n, k)] = h[rng.integers(0, n, k)] ^ flips  # ~4 bits flipped
        return h
    centres = rng.integers(0, 2**64, 3000, dtype=np.uint64)
    h = centres[rng.integers(0, len(centres), n)]
    nflip = rng.integers(0, 4, n)
    for j in range(3):
        bit = rng.integers(0, 64, n).astype(np.uint64)
        h ^= np.where(nflip > j, np.uint64(1) << bit, np.uint64(0))
    return h


def _best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_phash(sizes: list[int], radii: list[int], kinds: tuple[str, ...] = ("random", "clustered")) -> None:
    """Time of ``near_duplicates`` (best of 3 runs; plan construction, cached per process, is
    not timed) at each size, with 1 and 2 threads, and the growth of the 1-thread time."""
    import torch

    from pipeline.algorithms.near_dup import index_plan, near_duplicates

    torch.set_num_threads(1)
    for kind in kinds:
        print(f"\npHash near-duplicates, {kind} 64-bit hashes (time: best of 3)")
        print(
            f"{'n':>9} {'distinct':>9} {'radius':>6} {'tables':>6} {'key bits':>8} "
            f"{'1 thread s':>10} {'2 threads s':>11} {'dropped':>8}"
        )
        times: dict[tuple[int, int], float] = {}
        for n in sizes:
            h = phash_data(n, kind)
            distinct = len(np.unique(h))
            uids = np.array([f"{i:032x}" for i in range(n)])
            for r in radii:
                plan = index_plan(r, distinct)  # what near_duplicates uses; built untimed
                bits = sorted({bin(k).count("1") for k in plan})
                t1, (dropped, _) = _best_of(3, lambda: near_duplicates(h, uids, r))
                t2, _ = _best_of(3, lambda: near_duplicates(h, uids, r, n_threads=2))
                times[(n, r)] = t1
                width = f"{bits[0]}" if len(bits) == 1 else f"{bits[0]}-{bits[-1]}"
                print(
                    f"{n:>9} {distinct:>9} {r:>6} {len(plan):>6} {width:>8} "
                    f"{t1:>10.3f} {t2:>11.3f} {int(dropped.sum()):>8}"
                )
        if len(sizes) >= 2:
            a, b = sizes[0], sizes[-1]
            ratios = ", ".join(f"r={r}: {times[(b, r)] / times[(a, r)]:.1f}x" for r in radii)
            print(f"time growth {a} -> {b} rows ({kind}, 1 thread): {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per SemDeDup case (default 1)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "N", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2], args.child[3])
        return
    global THREADS
    THREADS = max(1, args.threads)
    print(f"cpus: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            bench_semdedup([2_000, 5_000], Path(tmp))
            bench_semdedup([5_000], Path(tmp), "narrow")
            bench_phash([10_000, 100_000], [4, 8])
        else:
            bench_semdedup([10_000, 20_000, 50_000, 100_000], Path(tmp))
            bench_semdedup([20_000], Path(tmp), "narrow")
            bench_phash([100_000, 1_000_000], [4, 6, 8])
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
