"""CLIP / DFN score cuts (docs/algorithms.md section 2).

Two modes: an absolute threshold, and the top fraction of the pool under the total order
(score descending, uid ascending, NaN scores last). The fraction cut is global; for a pool
split into partitions, :class:`RadixCut` finds the boundary element of that order with a few
passes of radix selection over per-partition 65,536-bin histograms (nothing concatenated; the
select stage runs each pass as tasks), and :func:`keep_at_or_above` applies it to any partition
independently. The whole-pool form of the rule, for tests, is tests/algorithms/reference.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

__all__ = [
    "Boundary",
    "RadixCut",
    "keep_at_or_above",
    "keep_count",
    "partition_histogram",
    "partition_members",
    "threshold_keep",
]

_DIGIT_BITS = 16
_COLLECT_CAP = 1 << 20  # gather a bin's members outright once it holds at most this many


def threshold_keep(scores: npt.ArrayLike, t: float) -> npt.NDArray[np.bool_]:
    """Keep ``score >= t``; a NaN score is never kept."""
    s = np.asarray(scores, dtype=np.float64)
    return s >= float(t)


def keep_count(n: int, fraction: float) -> int:
    """floor(fraction * n), with ``fraction`` read as the decimal it prints as (0.29 is 29/100,
    not the binary double just below it), so floor(0.29 * 100) is 29."""
    f = float(fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError("fraction must be in [0, 1]")
    return math.floor(Fraction(repr(f)) * int(n))


def _order_key(scores: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """uint64 key increasing with the score (float64 total order, -0.0 == 0.0); NaN -> 0,
    below every real score (-inf included)."""
    s = np.asarray(scores, dtype=np.float64) + 0.0  # folds -0.0 into +0.0
    bits = s.view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    key = np.where(neg, ~bits, bits | np.uint64(1 << 63))
    key[np.isnan(s)] = 0
    return key


def _uids(uids: npt.ArrayLike, n: int) -> np.ndarray:
    u = np.asarray(uids)
    if u.shape != (n,):
        raise ValueError("uids must have one value per score")
    return u if u.dtype.kind == "U" else u.astype(str)


@dataclass(frozen=True)
class Boundary:
    """Last kept element of the global order: keep (score, uid) at or above it."""

    score: float  # NaN when the cut reaches into the NaN scores
    uid: str


def keep_at_or_above(
    scores: npt.ArrayLike, uids: npt.ArrayLike, boundary: Boundary | None
) -> npt.NDArray[np.bool_]:
    """Rows ranked at or before ``boundary`` in the (score desc, uid asc, NaN last) order.
    ``None`` (an empty cut) keeps nothing. With unique uids the union over partitions is
    exactly the global top-K."""
    s = np.asarray(scores, dtype=np.float64)
    u = _uids(uids, len(s))
    if boundary is None:
        return np.zeros(len(s), dtype=bool)
    key = _order_key(s)
    bkey = _order_key(np.array([boundary.score]))[0]
    return (key > bkey) | ((key == bkey) & (u <= boundary.uid))


class RadixCut:
    """The state of an exact top-k selection whose passes run wherever the data is.

    Each pass asks for the histogram of one 16-bit digit of the order key among the elements
    sharing the prefix found so far (:func:`partition_histogram` per partition, summed); once the
    bin holding the boundary is small (or the whole key is fixed) its members are gathered
    (:func:`partition_members`) and :meth:`boundary` finds the k-th element among them.
    """

    def __init__(self, total: int, fraction: float):
        self.k = keep_count(total, fraction)
        self.bits = 0
        self.value = np.uint64(0)
        self.rank = self.k  # 1-based rank of the boundary among elements sharing the prefix
        self.histogram_wanted = self.k > 0

    @property
    def empty(self) -> bool:
        return self.k == 0

    @property
    def prefix(self) -> tuple[int, int]:
        """(prefix value, prefix bits), as plain ints for the per-partition functions."""
        return int(self.value), self.bits

    def add_histogram(self, hist: np.ndarray) -> None:
        shift = 64 - self.bits - _DIGIT_BITS
        above = np.cumsum(hist[::-1])  # above[i]: elements in the top i+1 bins (descending)
        i = int(np.searchsorted(above, self.rank))  # first descending bin reaching the rank
        digit_value = (1 << _DIGIT_BITS) - 1 - i
        self.rank -= int(above[i - 1]) if i > 0 else 0
        self.value = self.value | (np.uint64(digit_value) << np.uint64(shift))
        self.bits += _DIGIT_BITS
        if hist[digit_value] <= _COLLECT_CAP or self.bits == 64:
            self.histogram_wanted = False

    def boundary(self, keys: list[np.ndarray], uids: list[np.ndarray]) -> Boundary:
        ck = np.concatenate(keys).astype(np.uint64)
        cu = np.concatenate(uids)
        order = np.lexsort((cu, ~ck))
        last = order[self.rank - 1]
        return Boundary(score=_key_to_score(ck[last]), uid=str(cu[last]))


def partition_histogram(scores: npt.ArrayLike, prefix: int, bits: int) -> np.ndarray:
    """Counts of the next 16-bit digit of the order key among scores sharing the prefix."""
    key = _order_key(scores)
    sel = _match_prefix(key, np.uint64(prefix), bits)
    shift = 64 - bits - _DIGIT_BITS
    digit = ((key[sel] >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64)
    return np.bincount(digit, minlength=1 << _DIGIT_BITS).astype(np.int64)


def partition_members(scores: npt.ArrayLike, uids: npt.ArrayLike, prefix: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Order keys and uids of the scores sharing the prefix (the boundary's bin)."""
    key = _order_key(scores)
    sel = _match_prefix(key, np.uint64(prefix), bits)
    return key[sel], _uids(uids, len(key))[sel]


def _match_prefix(key: np.ndarray, prefix: np.uint64, bits: int) -> np.ndarray:
    if bits == 0:
        return np.ones(len(key), dtype=bool)
    shift = np.uint64(64 - bits)
    return (key >> shift) == (prefix >> shift)


def _key_to_score(key: np.uint64) -> float:
    k = np.uint64(key)
    if k == 0:
        return float("nan")
    bits = k & np.uint64((1 << 63) - 1) if k >> np.uint64(63) else ~k
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])
