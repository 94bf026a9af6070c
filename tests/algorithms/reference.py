"""Reference implementations the tests compare the production algorithms against.

Each is the plain, whole-pool (or pair-list) form of a rule that pipeline.algorithms computes in a
distributed or streaming way: the in-memory top-fraction cut and its driver-side radix loop
(pipeline.algorithms.score_cut, used by the select stage through RadixCut), and the explicit
candidate-pair lists of the pHash index (pipeline.algorithms.near_dup, whose near_duplicates links
straight into a union-find). Nothing in the pipeline imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from pipeline.algorithms.near_dup import _as_hashes, _block_bounds, _blocks_mask, _check_radius, _compress
from pipeline.algorithms.score_cut import (
    _DIGIT_BITS, Boundary, RadixCut, _order_key, _uids, keep_count, partition_histogram, partition_members,
)

# -- score cuts (docs/algorithms.md section 2) ----------------------------------------------------

Partition = tuple[npt.ArrayLike, npt.ArrayLike]
Partitions = Sequence[Partition] | Callable[[], Iterable[Partition]]


def _rank_order(scores: npt.ArrayLike, uids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError("scores must be 1-D")
    u = _uids(uids, len(s))
    key = _order_key(s)
    return np.lexsort((u, ~key)).astype(np.int64)  # key descending, uid ascending


def top_fraction_keep(scores: npt.ArrayLike, uids: npt.ArrayLike, fraction: float) -> npt.NDArray[np.bool_]:
    """Keep the first floor(fraction * N) rows of (score descending, uid ascending), NaN scores
    ranked last (so they are kept only if the cut reaches past every real score)."""
    order = _rank_order(scores, uids)
    keep = np.zeros(len(order), dtype=bool)
    keep[order[: keep_count(len(order), fraction)]] = True
    return keep


def _iterate(partitions: Partitions) -> Iterable[Partition]:
    return partitions() if callable(partitions) else partitions


def top_fraction_threshold(partitions: Partitions, fraction: float) -> Boundary | None:
    """Boundary of the global ``top_fraction_keep`` over many partitions.

    ``partitions``: a sequence of ``(scores, uids)`` pairs, or a zero-argument callable that
    returns a fresh iterable of them (so a stage can stream them from storage; it is read a few
    times). Radix selection on a 64-bit order key, 16 bits per pass (:class:`RadixCut`): each pass
    keeps one 65,536-bin histogram; once the target bin is small its members' keys and uids are
    gathered and sorted. Typically two or three passes; memory O(65,536 + one bin).
    """
    total = sum(len(np.asarray(s)) for s, _u in _iterate(partitions))
    cut = RadixCut(total, fraction)
    while cut.histogram_wanted:
        hist = np.zeros(1 << _DIGIT_BITS, dtype=np.int64)
        for s, _u in _iterate(partitions):
            hist += partition_histogram(s, *cut.prefix)
        cut.add_histogram(hist)
    if cut.empty:
        return None
    gathered = [partition_members(s, u, *cut.prefix) for s, u in _iterate(partitions)]
    return cut.boundary([g[0] for g in gathered], [g[1] for g in gathered])


# -- pHash candidate pairs (docs/algorithms.md section 5.3) ------------------------------------


def band_mask(band: int, radius: int) -> int:
    """Bit mask of band ``band`` among the basic scheme's radius+1 contiguous bands of the 64 bits."""
    r = _check_radius(radius)
    if not 0 <= band <= r:
        raise ValueError(f"band must be in [0, {r}]")
    return _blocks_mask(_block_bounds(r + 1), [band])


def _distinct(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values, first row of each, sort order of rows by hash)."""
    order = np.argsort(h, kind="stable")
    hs = h[order]
    first = np.empty(len(hs), dtype=bool)
    if len(hs):
        first[0] = True
        np.not_equal(hs[1:], hs[:-1], out=first[1:])
    return hs[first], order[first], order


def identical_hash_pairs(hashes: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Pairs (first row with that hash, row) for every row whose hash appeared on an earlier
    row: links equal hashes through one representative, O(n log n)."""
    h = _as_hashes(hashes)
    if len(h) == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    first = np.r_[True, hs[1:] != hs[:-1]]
    group = np.cumsum(first) - 1
    rep = order[first][group]
    later = ~first
    return np.stack([rep[later], order[later]], axis=1).astype(np.int64)


def _sort_order(key: np.ndarray) -> np.ndarray:
    if key.dtype == np.uint16:
        return np.argsort(key, kind="stable")  # radix sort
    if key.dtype == np.uint32:  # two stable 16-bit radix passes beat a comparison sort
        o1 = np.argsort((key & np.uint32(0xFFFF)).astype(np.uint16), kind="stable")
        o2 = np.argsort((key[o1] >> np.uint32(16)).astype(np.uint16), kind="stable")
        return o1[o2]
    return np.argsort(key, kind="stable")


def _pairs_in_groups(values: np.ndarray, rows: np.ndarray, mask: int, radius: int) -> npt.NDArray[np.int64]:
    """Pairs of ``rows`` whose ``values`` agree on ``mask`` and are within ``radius``: sort by
    key, then compare each position with the next 1, 2, ... positions while keys still match
    (each in-group pair visited once, no pair list materialised)."""
    if len(values) < 2:
        return np.empty((0, 2), dtype=np.int64)
    key, _ = _compress(values, mask)
    order = _sort_order(key)
    sk = key[order]
    sv = values[order]
    n = len(sk)
    active = np.flatnonzero(sk[1:] == sk[:-1])
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    off = 1
    while active.size:
        other = active + off
        hit = np.bitwise_count(sv[active] ^ sv[other]) <= radius
        if hit.any():
            out_a.append(active[hit])
            out_b.append(other[hit])
        off += 1
        active = active[active + off < n]
        active = active[sk[active] == sk[active + off]]
    if not out_a:
        return np.empty((0, 2), dtype=np.int64)
    a = rows[order[np.concatenate(out_a)]]
    b = rows[order[np.concatenate(out_b)]]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)


def key_candidate_pairs(
    hashes: npt.ArrayLike, key_mask: int, radius: int, *, link_identical: bool = True
) -> npt.NDArray[np.int64]:
    """int64[m, 2] row pairs (i < j) that agree on every bit of ``key_mask`` and lie within
    Hamming distance ``radius``. Distinct hash values are compared through their first row;
    with ``link_identical`` the (first row, row) links of equal hashes are appended."""
    r = _check_radius(radius)
    h = _as_hashes(hashes)
    values, reps, _ = _distinct(h)
    pairs = _pairs_in_groups(values, reps, int(key_mask), r)
    if link_identical:
        same = identical_hash_pairs(h)
        if len(same):
            pairs = np.concatenate([pairs, np.sort(same, axis=1)])
    return pairs


def band_candidate_pairs(
    hashes: npt.ArrayLike,
    band: int,
    radius: int,
    *,
    plan: tuple[int, ...] | None = None,
    link_identical: bool = True,
) -> npt.NDArray[np.int64]:
    """Candidate pairs of one band: one parallel task per band.

    Without ``plan``: the basic scheme, band ``band`` of radius+1 contiguous bands. With
    ``plan`` (from :func:`index_plan`): its ``band``-th key. Either way the returned pairs are
    verified (distance <= radius) and the union over all bands contains every such pair
    (equal hashes through their first row, see ``link_identical``)."""
    r = _check_radius(radius)
    if plan is None:
        mask = band_mask(band, r)
    else:
        if not 0 <= band < len(plan):
            raise ValueError(f"band must be in [0, {len(plan)})")
        mask = int(plan[band])
    return key_candidate_pairs(hashes, mask, r, link_identical=link_identical)
