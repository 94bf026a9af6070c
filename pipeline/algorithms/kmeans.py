"""Spherical k-means for SemDeDup and DBP (docs/algorithms.md section 3).

Training runs faiss ``Kmeans(d, k, niter, spherical=True, seed)`` on a seeded sample of at
most ``max_train_points`` rows (faiss is told not to subsample again, so that sample is the
one knob). Assignment is an exact inner-product search (faiss IndexFlatIP) and can run in
parallel over any split of the rows: it depends only on the row and the centroids.

Determinism: the sample comes from ``numpy.random.default_rng(seed)`` and faiss is seeded,
so the same input and seed give bitwise-identical centroids; faiss's k-means reduces each
centroid in point order whatever the thread count (tests check 1 vs 2 OpenMP threads give the
same bits). ``train_threads`` can still pin the thread count for training. Assignment is made
batch- and thread-independent explicitly (see :func:`assign_to_centroids`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

__all__ = ["assign_to_centroids", "train_sample", "train_spherical_kmeans"]

_ASSIGN_CHUNK = 65536
_SHORTLIST = 4


@contextmanager
def _faiss_threads(n: int | None) -> Iterator[None]:
    import faiss

    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def train_sample(n: int, max_train_points: int, seed: int) -> npt.NDArray[np.int64]:
    """Sorted row indices of the training sample: all rows when n <= max_train_points, else
    a seeded uniform sample without replacement."""
    if max_train_points < 1:
        raise ValueError("max_train_points must be >= 1")
    if n <= max_train_points:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_train_points, replace=False)).astype(np.int64)


def train_spherical_kmeans(
    x: npt.ArrayLike,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_train_points: int = 1_000_000,
    use_gpu: bool = False,
    train_threads: int | None = None,
) -> npt.NDArray[np.float32]:
    """Centroids float32[k, d], L2-normalised.

    ``x``: L2-normalised float32 embeddings [n, d]. Raises ValueError when k exceeds the
    training sample (faiss needs at least one point per centroid); callers that want "as many
    clusters as possible" cap k themselves. ``train_threads``: OpenMP threads for faiss during
    training (None: leave faiss's setting alone).
    """
    import faiss

    xa = np.asarray(x, dtype=np.float32)
    if xa.ndim != 2:
        raise ValueError("x must be a 2-D array [n, d]")
    n, d = xa.shape
    k = int(k)
    if k < 1:
        raise ValueError("k must be >= 1")
    rows = train_sample(n, int(max_train_points), int(seed))
    if k > len(rows):
        raise ValueError(
            f"k={k} exceeds the training sample ({len(rows)} rows of {n}); lower k or raise max_train_points"
        )
    sample = np.ascontiguousarray(xa[rows])
    if not np.all(np.isfinite(sample)):
        raise ValueError("x must be finite")
    km = faiss.Kmeans(
        d,
        k,
        niter=int(niter),
        spherical=True,
        seed=int(seed),
        gpu=bool(use_gpu),
        verbose=False,
        max_points_per_centroid=int(np.ceil(len(rows) / k)) + 1,
        min_points_per_centroid=1,
    )
    with _faiss_threads(train_threads):
        km.train(sample)
    c = np.asarray(km.centroids, dtype=np.float32).reshape(k, d)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return np.ascontiguousarray(c / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def assign_to_centroids(
    x: npt.ArrayLike, centroids: npt.ArrayLike
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """``(cluster int32[n], dist_to_centroid float32[n] = 1 - cos)``: nearest centroid by
    inner product (exact search, faiss IndexFlatIP).

    A row's result depends only on the row and the centroids, not on how rows are batched or
    threaded: faiss's float32 scores (whose last bits vary with the BLAS kernel a batch shape
    selects) only shortlist centroids; the winner and its distance come from the canonical
    float64 dot product (``semdedup.canonical_dot``), ties to the lowest centroid index."""
    import faiss

    c = np.ascontiguousarray(np.asarray(centroids, dtype=np.float32))
    xa = np.asarray(x, dtype=np.float32)
    if c.ndim != 2 or xa.ndim != 2 or xa.shape[1] != c.shape[1]:
        raise ValueError("x [n, d] and centroids [k, d] must share d")
    n = xa.shape[0]
    k, d = c.shape
    cluster = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    if n == 0:
        return cluster, dist
    if k == 0:
        raise ValueError("no centroids")
    index = faiss.IndexFlatIP(d)
    index.add(c)
    shortlist = min(k, _SHORTLIST)
    c_sq = np.einsum("ij,ij->i", c, c, dtype=np.float64).max()
    for s in range(0, n, _ASSIGN_CHUNK):
        chunk = np.ascontiguousarray(xa[s : s + _ASSIGN_CHUNK])
        if not np.all(np.isfinite(chunk)):
            raise ValueError("x must be finite")
        m = len(chunk)
        sims, ids = index.search(chunk, shortlist)
        x_sq = np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64)
        window = _score_window(d, x_sq, c_sq)
        best_id, best_sim = _refine_shortlist(chunk, c, sims, ids, window)
        cluster[s : s + m] = best_id
        dist[s : s + m] = (1.0 - best_sim).astype(np.float32)
    return cluster, dist


def _score_window(d: int, x_sq: np.ndarray, c_sq: float) -> np.ndarray:
    """Twice the worst-case gap between a float32 dot product (any summation order) and the
    canonical one, per row, plus float32 slack."""
    u32, u64 = 2.0**-24, 2.0**-53
    gamma = (d + 2) * u32 / (1 - (d + 2) * u32) + (d + 2) * u64 / (1 - (d + 2) * u64)
    bound = gamma * np.sqrt(x_sq * c_sq) * (1 + 1e-9) + d * 2.0**-140
    return 2.0 * bound + 8 * 2.0**-23 * np.maximum(1.0, np.sqrt(x_sq * c_sq))


def _refine_shortlist(
    x: np.ndarray, c: np.ndarray, sims: np.ndarray, ids: np.ndarray, window: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.algorithms.semdedup import canonical_dot

    m, width = ids.shape
    k = c.shape[0]
    top = sims[:, :1].astype(np.float64)
    in_window = sims.astype(np.float64) >= top - window[:, None]
    # the shortlist is complete when its last entry is already outside the window
    complete = (~in_window[:, -1]) | (width == k)
    rows, cols = np.nonzero(in_window & complete[:, None])
    cand_ids = ids[rows, cols].astype(np.int64)
    # rows whose window reaches past the shortlist: every centroid is a candidate
    wide = np.flatnonzero(~complete)
    rows = np.concatenate([rows, np.repeat(wide, k)])
    cand_ids = np.concatenate([cand_ids, np.tile(np.arange(k), len(wide))])
    vals = canonical_dot(x[rows], c[cand_ids])
    order = np.lexsort((cand_ids, -vals, rows))
    rows, cand_ids, vals = rows[order], cand_ids[order], vals[order]
    head = np.r_[True, rows[1:] != rows[:-1]]
    best_id = np.empty(m, dtype=np.int64)
    best_sim = np.empty(m, dtype=np.float64)
    best_id[rows[head]] = cand_ids[head]
    best_sim[rows[head]] = vals[head]
    return best_id, best_sim
