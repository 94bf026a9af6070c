"""Reduced dimensions for SemDeDup and DBP: agreement with the full dimension, and what they save.

    python benchmarks/reduced_dims.py [--samples 3000] [--scale 100000] [--dims 16,32,64] [--run DIR]

The embeddings: a synthetic pool (``pipeline.synth.synthesize``, seed 11, shards of 500) run
through the pipeline with the shipped model (curate-dfn-rn16-64, 128-d embeddings) and exact and
pHash dedup; its survivors (kept, with an image embedding) are the rows. ``--run`` reuses such a
run's output instead of making one.

Each case (a reduction and a d, and the full dimension as the baseline) runs in its own
subprocess with one BLAS/OpenMP thread (what a 1-CPU Ray task gets) and does what the stages do,
with the real functions, on those rows:
- reduce: truncation, or PCA fitted on the rows (all of them: the k-means training sample while
  there are at most max_train_points) and applied to every row; "pca-centred" is the same with the
  sample mean subtracted first, for comparison (the pipeline's pca is uncentred);
- SemDeDup: spherical k-means with k = rows / 200, 20 iterations, seed 0 (the quickstart's
  samples_per_cluster), assignment, then SemDeDup in each cluster at eps 0.005 (the quickstart's);
- DBP: k-means with k = 20, assignment, cluster complexity, quotas for a target of 0.6 of the
  rows at temperature 0.5, and the hardest members of each cluster (the quickstart's DBP).
  DBP runs on the same rows as SemDeDup here (in a run it gets SemDeDup's survivors).

Agreement: Jaccard index of each case's keep set (and of SemDeDup's drop set, much smaller) with
the full dimension's. Cost: CPU time of each step and the growth of the process's peak RSS
during it over its RSS before (the kernel's peak mark reset first), on the pool's rows and on
``--scale`` rows made from them (each row repeated with Gaussian noise of norm 0.45, renormalised:
copies at cosine about 0.9, so they are not duplicates of each other at eps 0.005), where the
embeddings' share of memory shows. Times are the best of ``--repeats`` runs of each case, memory
is from the first. Ratios are against the full dimension measured in the same run.
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

MODEL = {"model": "curate-dfn-rn16-64", "pretrained": "curate-dfn-rn16-64.safetensors"}
PER_CLUSTER = 200
EPS = 0.005
BLOCK = 4096
DBP_K = 20
DBP_TARGET = 0.6
TEMPERATURE = 0.5
NITER = 20
STEPS = ("reduce", "semdedup k-means", "semdedup compare", "dbp k-means", "dbp select")


# -- the rows -------------------------------------------------------------------------------------

def embedded_run(samples: int, tmp: Path) -> Path:
    """A pipeline run of a fresh synthetic pool with the shipped model (ingest, embed, exact + pHash dedup)."""
    from pipeline.runner import run_pipeline
    from pipeline.synth import synthesize
    from tests.helpers import run_config

    pool, out = tmp / "pool", tmp / "run"
    synthesize(str(pool), samples, seed=11, shard_size=500)
    run_pipeline(run_config(pool, out, embed=MODEL, ray={"num_cpus": 2}))
    return out


def survivors(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uids, float32 image embeddings) of a run's kept samples, in partition order."""
    from pipeline.io.embeddings import read_vectors
    from tests.helpers import read_metadata

    meta = read_metadata(run).select(["uid", "kept"]).to_pandas()
    parts = [read_vectors(str(p)) for p in sorted((run / "embeddings").glob("part-*.parquet"))]
    present = np.concatenate([p for p, _ in parts])
    matrix = np.concatenate([m for _, m in parts])
    keep = meta.kept.to_numpy()
    rows = keep[present]
    return meta.uid.to_numpy().astype(str)[present][rows], matrix[rows]


def scaled(x: np.ndarray, uids: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows made from x: each row repeated, with Gaussian noise of norm about 0.45, renormalised."""
    rng = np.random.default_rng(seed)
    picks = np.arange(n) % len(x)
    noisy = x[picks] + rng.normal(scale=0.45 / np.sqrt(x.shape[1]), size=(n, x.shape[1])).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    names = np.char.add(np.char.add(uids[picks], "-"), (np.arange(n) // len(x)).astype(str))
    return noisy.astype(np.float32), names


# -- one case, in a subprocess ----------------------------------------------------------------------

def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


class _Meter:
    """CPU time (the best of the repeats; one thread, so steadier than wall time on a shared
    machine) and peak-RSS growth (the first time: later repeats reuse memory the allocator kept)
    of each step, from a reset of the kernel's peak mark."""

    def __init__(self):
        self.steps: dict[str, dict] = {}

    def __call__(self, name: str, fn):
        base = _status_mib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        started = time.process_time()
        result = fn()
        cpu = time.process_time() - started
        growth = max(0.0, _status_mib("VmHWM") - base)
        if name in self.steps:
            self.steps[name]["cpu"] = min(self.steps[name]["cpu"], cpu)
        else:
            self.steps[name] = {"cpu": cpu, "mib": growth}
        return result


def child(data: str, method: str, dims: int, out: str, repeats: int) -> None:
    """One case, `repeats` times: reduce, SemDeDup, DBP; prints the per-step figures, saves the keep masks."""
    from pipeline.algorithms.kmeans import train_spherical_kmeans

    with np.load(data) as z:
        full, uids = z["x"], z["uids"]
    meter = _Meter()
    train_spherical_kmeans(full[:64], 2, niter=1)  # warm: faiss's first call loads its kernels
    for _ in range(repeats):
        dropped, kept = _once(full, uids, method, dims, meter)
    np.savez(out, semdedup_kept=~dropped, dbp_kept=kept)
    print(json.dumps({"steps": meter.steps, "dropped": int(dropped.sum()), "dbp_kept": int(kept.sum())}))


def _once(full, uids, method: str, dims: int, meter: _Meter) -> tuple[np.ndarray, np.ndarray]:
    """The steps of one case, each measured: SemDeDup's drop mask and DBP's keep mask."""
    from pipeline.algorithms import reduce as reduction
    from pipeline.algorithms.dbp import cluster_complexity, cluster_quotas, select_in_clusters
    from pipeline.algorithms.kmeans import assign_to_centroids, train_spherical_kmeans
    from pipeline.algorithms.score_cut import keep_count
    from pipeline.algorithms.semdedup import semdedup_cluster_with_similarity

    n = len(full)

    def reduce():
        if method == "full":
            return full
        if method == "truncate":
            return reduction.truncate(full, dims)
        projection = reduction.fit_pca(full, dims, centre=method == "pca-centred")
        return reduction.project(full, projection)

    x = meter("reduce", reduce)

    def kmeans(k):
        centroids = train_spherical_kmeans(x, k, niter=NITER, seed=0)
        return assign_to_centroids(x, centroids), centroids

    (cluster, dist), _ = meter("semdedup k-means", lambda: kmeans(max(1, round(n / PER_CLUSTER))))

    def compare():
        dropped = np.zeros(n, bool)
        order = np.argsort(cluster, kind="stable")
        bounds = np.flatnonzero(np.r_[True, cluster[order][1:] != cluster[order][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows = order[a:b]
            dropped[rows] = semdedup_cluster_with_similarity(x[rows], dist[rows], uids[rows], EPS, BLOCK)[0]
        return dropped

    dropped = meter("semdedup compare", compare)
    (labels, ldist), centroids = meter("dbp k-means", lambda: kmeans(min(DBP_K, n)))

    def select():
        sizes, d_intra, d_inter = cluster_complexity(centroids, labels, ldist)
        quotas = cluster_quotas(sizes, d_intra, d_inter, keep_count(n, DBP_TARGET), TEMPERATURE)
        return select_in_clusters(labels, ldist, uids, quotas)

    kept = meter("dbp select", select)
    return dropped, kept


def run_case(data: Path, method: str, dims: int, tmp: Path, repeats: int) -> dict:
    out = tmp / f"{data.stem}-{method}-{dims}.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--child", str(data), method, str(dims), str(out), str(repeats)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"case {method} {dims} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        result.update(semdedup_kept=z["semdedup_kept"], dbp_kept=z["dbp_kept"])
    return result


# -- tables -----------------------------------------------------------------------------------------

def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def cases(dims: list[int], width: int) -> list[tuple[str, int]]:
    found = [("full", width)]
    for d in dims:
        if d < width:
            found += [("truncate", d), ("pca", d), ("pca-centred", d)]
    return found


def agreement_table(results: dict, rows: int) -> None:
    base = results[("full", max(d for _, d in results))]
    print(f"\nAgreement with the full dimension ({rows} rows)")
    print(f"| reduce | d | SemDeDup dropped | SemDeDup keep J | SemDeDup drop J | DBP keep J |")
    print("|---|---:|---:|---:|---:|---:|")
    for (method, d), r in results.items():
        drop_j = jaccard(~r["semdedup_kept"], ~base["semdedup_kept"])
        print(f"| {method} | {d} | {r['dropped']} | {jaccard(r['semdedup_kept'], base['semdedup_kept']):.4f} | "
              f"{drop_j:.4f} | {jaccard(r['dbp_kept'], base['dbp_kept']):.4f} |")


def cost_table(results: dict, rows: int) -> None:
    """CPU seconds per step and in all, and the peak-RSS growth of the reduction and of the largest
    later step (k-means, SemDeDup, DBP), with ratios to the full dimension."""
    def figures(steps):
        total = sum(s["cpu"] for s in steps.values())
        return total, max(steps[name]["mib"] for name in STEPS[1:])

    base_total, base_peak = figures(results[("full", max(d for _, d in results))]["steps"])
    print(f"\nCost ({rows} rows; CPU seconds per step and in all; MiB: peak-RSS growth of the reduction, and "
          f"the largest of the later steps; ratios to the full dimension)")
    print("| reduce | d | " + " | ".join(f"{name} s" for name in STEPS) + " | total s | ratio | reduce MiB | "
          "steps MiB | ratio |")
    print("|---|---:|" + "---:|" * (len(STEPS) + 5))
    for (method, d), r in results.items():
        steps = r["steps"]
        total, peak = figures(steps)
        cells = " | ".join(f"{steps[name]['cpu']:.3f}" for name in STEPS)
        print(f"| {method} | {d} | {cells} | {total:.2f} | {total / base_total:.2f} | {steps['reduce']['mib']:.1f} | "
              f"{peak:.1f} | {peak / base_peak if base_peak else float('nan'):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000, help="pool size (default: 3000)")
    parser.add_argument("--scale", type=int, default=100_000, help="rows of the cost table made from the pool's "
                        "(default: 100000; 0: none)")
    parser.add_argument("--dims", default="16,32,64", help="reduced dimensions (default: 16,32,64)")
    parser.add_argument("--run", type=Path, default=None, help="an embedded run's output to reuse (default: make one)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case; times are the best (default: 3)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data, method, dims, out, repeats = args.child
        child(data, method, int(dims), out, int(repeats))
        return
    dims = [int(d) for d in args.dims.split(",")]
    with tempfile.TemporaryDirectory(prefix="curate-dims-") as name:
        tmp = Path(name)
        run = args.run
        if run is None:
            started = time.perf_counter()
            run = embedded_run(args.samples, tmp)
            print(f"embedded a {args.samples}-sample pool in {time.perf_counter() - started:.0f} s")
        uids, x = survivors(run)
        print(f"rows: {len(x)} survivors of exact and pHash dedup with an image embedding, {x.shape[1]}-d "
              f"(the shipped model's embedding dimension); load average {os.getloadavg()[0]:.2f}")
        sets = [("pool", x, uids)]
        if args.scale:
            sets.append(("scaled", *scaled(x, uids, args.scale)))
        for label, matrix, names in sets:
            data = tmp / f"{label}.npz"
            np.savez(data, x=matrix, uids=names)
            results = {case: run_case(data, *case, tmp, args.repeats) for case in cases(dims, matrix.shape[1])}
            if label == "pool":
                agreement_table(results, len(matrix))
            cost_table(results, len(matrix))
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
