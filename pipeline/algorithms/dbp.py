"""Density-based pruning by concept complexity (docs/algorithms.md section 6).

Three pieces, each usable on its own by a stage:
- :func:`cluster_complexity`: per-cluster size, d_intra, d_inter from centroids and
  assignments (k numbers each: cheap to gather on one node). For a partitioned pool,
  :func:`cluster_sums` per partition, added up, then :func:`complexity_from_sums` give the same
  numbers: the sums are exact, so no partitioning changes a bit of d_intra;
- :func:`cluster_quotas`: how many members each cluster keeps (the quadratic program of the
  reference, solved in closed form, then rounded to integers summing exactly to the target);
- :func:`select_in_clusters`: which members, hardest (farthest from the centroid) first;
  it can run per cluster or per partition holding whole clusters.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "cluster_complexity",
    "cluster_sums",
    "complexity_from_sums",
    "cluster_quotas",
    "complexity_softmax",
    "quota_bounds",
    "select_in_clusters",
]


def cluster_complexity(
    centroids: npt.ArrayLike,
    cluster_of: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    n_neighbors: int = 20,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(sizes int64[k], d_intra float64[k], d_inter float64[k])``.

    d_intra_j: mean ``dist_to_centroid`` of cluster j's members (NaN when empty).
    d_inter_j: mean of ``1 - cos(c_j, c_m)`` over the l = min(n_neighbors, k - 1) nearest
    OTHER centroids (faiss IndexFlatIP on L2-normalised centroids, self excluded); NaN when
    l = 0 or cluster j is empty. Every centroid, empty cluster or not, counts as a neighbour
    (the reference searches all k centroids).
    """
    labels = np.asarray(cluster_of)
    dist = np.asarray(dist_to_centroid, dtype=np.float64)
    k = np.asarray(centroids).shape[0] if np.asarray(centroids).ndim == 2 else -1
    if k < 0:
        raise ValueError("centroids must be a 2-D array [k, d]")
    sizes, sums = cluster_sums(labels, dist, k)
    return complexity_from_sums(centroids, sizes, sums, n_neighbors)


_SUM_SCALE = 1126  # sums are integers times 2**-1126: below the least float64 bit of any mantissa


def cluster_sums(cluster_of: npt.ArrayLike, dist_to_centroid: npt.ArrayLike, k: int) -> tuple[npt.NDArray[np.int64], list[int]]:
    """``(sizes int64[k], sums)``: members per cluster and the exact sum of their distances, as
    Python ints in units of 2**-1126. Sums of parts add up to the sum of the whole, bit for bit,
    whatever the partitioning (a float sum would depend on the order of the additions)."""
    labels = np.asarray(cluster_of)
    dist = np.asarray(dist_to_centroid, dtype=np.float64)
    if labels.shape != dist.shape or labels.ndim != 1:
        raise ValueError("cluster_of and dist_to_centroid must be 1-D of equal length")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"cluster_of must lie in [0, {k})")
    if labels.size and not np.all(np.isfinite(dist)):
        raise ValueError("dist_to_centroid must be finite")
    labels = labels.astype(np.int64)
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    sums = [0] * k
    if labels.size == 0:
        return sizes, sums
    mantissa, exponent = np.frexp(dist)
    whole = (mantissa * 2.0**53).astype(np.int64)  # dist = whole * 2**(exponent - 53), exactly
    high, low = whole >> 27, whole & ((1 << 27) - 1)  # halves whose sums stay exact in float64
    exponents, slot = np.unique(exponent, return_inverse=True)
    key = labels * len(exponents) + slot.reshape(-1)
    size = k * len(exponents)
    high_sum = np.bincount(key, weights=high.astype(np.float64), minlength=size)
    low_sum = np.bincount(key, weights=low.astype(np.float64), minlength=size)
    for index in np.flatnonzero((high_sum != 0) | (low_sum != 0)):
        label, e = divmod(int(index), len(exponents))
        value = (int(high_sum[index]) << 27) + int(low_sum[index])
        sums[label] += value << (int(exponents[e]) - 53 + _SUM_SCALE)
    return sizes, sums


def complexity_from_sums(
    centroids: npt.ArrayLike, sizes: npt.ArrayLike, sums: list[int], n_neighbors: int = 20,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """cluster_complexity from per-cluster sizes and exact distance sums (:func:`cluster_sums`):
    d_intra is the correctly rounded mean."""
    import faiss
    from fractions import Fraction

    c = np.ascontiguousarray(np.asarray(centroids, dtype=np.float32))
    if c.ndim != 2:
        raise ValueError("centroids must be a 2-D array [k, d]")
    k, d = c.shape
    sizes = np.asarray(sizes, dtype=np.int64)
    d_intra = np.array([float(Fraction(int(s), int(n) << _SUM_SCALE)) if n > 0 else np.nan
                        for s, n in zip(sums, sizes)], dtype=np.float64)

    d_inter = np.full(k, np.nan)
    n_l = min(int(n_neighbors), k - 1)
    if n_l >= 1:
        norms = np.linalg.norm(c, axis=1, keepdims=True)
        cn = np.ascontiguousarray(c / np.where(norms > 0, norms, 1.0), dtype=np.float32)
        index = faiss.IndexFlatIP(d)
        index.add(cn)
        sims, ids = index.search(cn, n_l + 1)
        # drop self; when identical centroids push self out of the first l+1, drop the last
        is_self = ids == np.arange(k)[:, None]
        no_self = ~is_self.any(axis=1)
        is_self[no_self, -1] = True
        first_self = np.argmax(is_self, axis=1)
        drop = np.zeros_like(is_self)
        drop[np.arange(k), first_self] = True
        others = sims[~drop].reshape(k, n_l).astype(np.float64)
        d_inter = np.mean(1.0 - others, axis=1)
    d_inter = np.where(sizes > 0, d_inter, np.nan)
    return sizes, d_intra, d_inter


def quota_bounds(
    sizes: npt.ArrayLike, target: int, *, balance_ratio: float | None = None
) -> npt.NDArray[np.int64]:
    """Lower bounds ``lb_j = min(m, n_j - 1)``, never below 0; m = 1, or
    ``floor(target / k * balance_ratio)`` when a ratio is set (k = number of clusters)."""
    n = np.asarray(sizes, dtype=np.int64)
    k = len(n)
    if balance_ratio is None:
        m = 1
    else:
        r = float(balance_ratio)
        if not (0.0 < r <= 1.0):
            raise ValueError("balance_ratio must be in (0, 1]")
        m = math.floor(int(target) / k * r) if k else 0
    return np.clip(np.minimum(m, n - 1), 0, None).astype(np.int64)


def cluster_quotas(
    sizes: npt.ArrayLike,
    d_intra: npt.ArrayLike,
    d_inter: npt.ArrayLike,
    target: int,
    temperature: float,
    *,
    balance_ratio: float | None = None,
    minimum: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """Integer quota per cluster, summing exactly to ``target``.

    ``minimum``: per-cluster floors that raise the lower bounds (capped at the cluster size),
    e.g. the members an earlier run already published, which a top-up cannot take back.

    C = d_inter * d_intra (NaN -> mean of the defined C; all NaN -> equal); p = softmax(C / T);
    continuous x = clip(p * target + lambda, lb, n) with lambda exact for sum(x) = target;
    then largest-remainder rounding within [lb, n] (ties: lower cluster index first), so each
    quota differs from x by less than 1.

    ``target >= sum(sizes)``: every cluster keeps all its members. ``target < sum(lb)``:
    ValueError (the bounds cannot be met; lower the balance ratio or raise the target).
    ``temperature`` must be > 0 (``inf`` allowed: equal shares).
    """
    n = np.asarray(sizes, dtype=np.int64)
    if n.ndim != 1:
        raise ValueError("sizes must be 1-D")
    if np.any(n < 0):
        raise ValueError("sizes must be >= 0")
    k = len(n)
    c_intra = np.asarray(d_intra, dtype=np.float64)
    c_inter = np.asarray(d_inter, dtype=np.float64)
    if c_intra.shape != (k,) or c_inter.shape != (k,):
        raise ValueError("d_intra and d_inter must have one value per cluster")
    target = _as_int(target, "target")
    if target < 0:
        raise ValueError("target must be >= 0")
    tau = float(temperature)
    if not tau > 0:  # also rejects NaN
        raise ValueError("temperature must be > 0")
    total = int(n.sum())
    if target >= total:
        return n.copy()

    lb = quota_bounds(n, target, balance_ratio=balance_ratio)
    if minimum is not None:
        floor = np.asarray(minimum, dtype=np.int64)
        if floor.shape != (k,) or np.any(floor < 0):
            raise ValueError("minimum must hold one non-negative count per cluster")
        lb = np.maximum(lb, np.minimum(floor, n))
    if int(lb.sum()) > target:
        raise ValueError(
            f"DBP target {target} is below the sum of the per-cluster lower bounds "
            f"({int(lb.sum())}: min(m, n_j - 1) over {k} clusters); raise the target, "
            "lower balance_ratio, or use fewer clusters"
        )
    p = complexity_softmax(c_intra * c_inter, tau)
    x = _continuous_quotas(p * target, lb.astype(np.float64), n.astype(np.float64), target)
    return _round_within_bounds(x, lb, n, target)


def complexity_softmax(complexity: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float64]:
    """softmax(C / temperature) with NaN C replaced by the mean of the defined ones; safe for
    tiny temperatures (-> one-hot on the maxima, shared on ties) and huge ones (-> uniform)."""
    c = np.asarray(complexity, dtype=np.float64).copy()
    if c.size == 0:
        return c
    defined = np.isfinite(c)
    c[~defined] = c[defined].mean() if defined.any() else 0.0
    z = c - c.max()  # <= 0, no overflow
    with np.errstate(over="ignore", invalid="ignore"):
        z = z / temperature if np.isfinite(temperature) else np.zeros_like(z)
    z[np.isnan(z)] = 0.0  # 0 / tiny stays 0; only 0 * inf-like cases could make NaN
    e = np.exp(z)
    return e / e.sum()


def _as_int(v: object, name: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    raise TypeError(f"{name} must be an integer count, got {v!r}")


def _continuous_quotas(base: np.ndarray, lb: np.ndarray, ub: np.ndarray, target: int) -> np.ndarray:
    """x = clip(base + lam, lb, ub) with sum(x) = target, lam found from the sorted breakpoints.

    f(lam) = sum clip(base + lam, lb, ub) is piecewise linear and non-decreasing, with kinks at
    lb_j - base_j and ub_j - base_j; between two consecutive kinks its slope is the number of
    clusters strictly inside their bounds, so lam is solved exactly on the right segment."""
    if len(base) == 0:
        return base.copy()

    def f(lam: float) -> float:
        return float(np.clip(base + lam, lb, ub).sum())

    knots = np.unique(np.concatenate([lb - base, ub - base]))
    values = np.array([f(t) for t in knots]) if len(knots) <= 64 else None
    if values is None:
        lo_i, hi_i = 0, len(knots) - 1  # binary search: f(knots[lo_i]) <= target
        if f(knots[hi_i]) <= target:
            lo_i = hi_i
        else:
            while hi_i - lo_i > 1:
                mid = (lo_i + hi_i) // 2
                if f(knots[mid]) <= target:
                    lo_i = mid
                else:
                    hi_i = mid
    else:
        below = np.flatnonzero(values <= target)
        lo_i = int(below[-1]) if below.size else 0
    lam0 = float(knots[lo_i])
    f0 = f(lam0)
    if lo_i + 1 < len(knots):
        mid = 0.5 * (lam0 + float(knots[lo_i + 1]))
        free = (base + mid > lb) & (base + mid < ub)
        slope = int(free.sum())
    else:
        slope = 0
    lam = lam0 + (target - f0) / slope if slope else lam0
    return np.clip(base + lam, lb, ub)


def _round_within_bounds(x: np.ndarray, lb: np.ndarray, ub: np.ndarray, target: int) -> np.ndarray:
    """Largest-remainder rounding: floor, then +1 to the largest remainders (ties: lowest
    index) until the sum is exactly ``target``; never leaves [lb, ub]."""
    q = np.clip(np.floor(x), lb, ub).astype(np.int64)
    rem = x - q
    short = target - int(q.sum())
    idx = np.arange(len(x))
    if short > 0:
        room = np.flatnonzero(q < ub)
        order = room[np.lexsort((idx[room], -rem[room]))]
        if len(order) < short:
            raise AssertionError("no room to reach the DBP target")
        q[order[:short]] += 1
    elif short < 0:  # only from float error in lambda: take back from the smallest remainders
        room = np.flatnonzero(q > lb)
        order = room[np.lexsort((-idx[room], rem[room]))]
        q[order[:-short]] -= 1
    return q


def select_in_clusters(
    cluster_of: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    uids: npt.ArrayLike,
    quotas: npt.ArrayLike,
) -> npt.NDArray[np.bool_]:
    """Keep mask: in each cluster j the ``quotas[j]`` members with the largest
    ``dist_to_centroid`` (ties: uid ascending, as strings). Quotas above a cluster's size
    keep the whole cluster."""
    labels = np.asarray(cluster_of).astype(np.int64)
    dist = np.asarray(dist_to_centroid, dtype=np.float64)
    u = np.asarray(uids)
    if u.dtype.kind != "U":
        u = u.astype(str)
    q = np.asarray(quotas, dtype=np.int64)
    n = len(labels)
    if dist.shape != (n,) or u.shape != (n,):
        raise ValueError("cluster_of, dist_to_centroid and uids must have equal length")
    if np.any(q < 0):
        raise ValueError("quotas must be >= 0")
    if n and (labels.min() < 0 or labels.max() >= len(q)):
        raise ValueError("cluster_of out of range of quotas")
    if n and not np.all(np.isfinite(dist)):
        raise ValueError("dist_to_centroid must be finite")
    order = np.lexsort((u, -dist + 0.0, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(n) - starts
    keep = np.zeros(n, dtype=bool)
    keep[order] = rank < q[sorted_labels]
    return keep
