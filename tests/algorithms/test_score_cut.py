"""Score cuts: threshold, global top fraction, and the same cut over partitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.algorithms import score_cut
from pipeline.algorithms.score_cut import Boundary, keep_at_or_above, keep_count, threshold_keep
from tests.algorithms.reference import top_fraction_keep, top_fraction_threshold


def _full_sort_keep(scores, uids, fraction):
    """Reference: Python sort on (NaN last, -score, uid)."""
    idx = sorted(
        range(len(scores)),
        key=lambda i: (math.isnan(scores[i]), 0.0 if math.isnan(scores[i]) else -scores[i], uids[i]),
    )
    keep = np.zeros(len(scores), bool)
    keep[idx[: keep_count(len(scores), fraction)]] = True
    return keep


def test_threshold_keeps_at_or_above_and_never_nan():
    s = np.array([0.24, 0.25, 0.3, np.nan, -1.0], dtype=np.float32)
    assert threshold_keep(s, 0.25).tolist() == [False, True, True, False, False]
    assert threshold_keep(s, -np.inf).tolist() == [True, True, True, False, True]


def test_keep_count_reads_the_fraction_as_written():
    assert keep_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert keep_count(12_800, 0.15) == 1920
    assert keep_count(7, 0.5) == 3
    assert keep_count(0, 0.5) == 0 and keep_count(10, 0.0) == 0 and keep_count(10, 1.0) == 10
    with pytest.raises(ValueError):
        keep_count(10, 1.5)


def test_top_fraction_hand_case_ties_and_nan():
    s = np.array([0.5, 0.9, np.nan, 0.5, 0.7, 0.5])
    u = np.array(["f", "a", "b", "c", "d", "e"])
    # order: 0.9 a, 0.7 d, 0.5 c, 0.5 e, 0.5 f, nan b
    assert top_fraction_keep(s, u, 0.5).tolist() == [False, True, False, True, True, False]
    assert top_fraction_keep(s, u, 0.7).tolist() == [False, True, False, True, True, True]
    assert top_fraction_keep(s, u, 1.0).all()  # the cut reaches the NaN only at 100%


def test_top_fraction_equals_full_sort_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 400))
        s = np.round(rng.normal(0.3, 0.05, n), int(rng.integers(1, 4)))  # many ties
        s[rng.random(n) < 0.05] = np.nan
        s[rng.random(n) < 0.05] = -0.0
        s[rng.random(n) < 0.05] = 0.0
        u = np.array([f"{int(v):032x}" for v in rng.permutation(n)])
        f = float(rng.choice([0.0, 0.1, 0.15, 0.29, 0.5, 0.9, 1.0]))
        np.testing.assert_array_equal(top_fraction_keep(s, u, f), _full_sort_keep(s.tolist(), u.tolist(), f))


def _partitioned(scores, uids, rng, parts):
    cuts = np.sort(rng.integers(0, len(scores) + 1, parts - 1))
    bounds = np.r_[0, cuts, len(scores)]
    perm = rng.permutation(len(scores))  # partitions are arbitrary subsets, in any order
    return [(scores[perm[a:b]], uids[perm[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])], perm, bounds


@pytest.mark.parametrize("collect_cap", [1 << 20, 3])
def test_partitioned_cut_equals_single_sort(monkeypatch, collect_cap):
    monkeypatch.setattr(score_cut, "_COLLECT_CAP", collect_cap)  # 3 forces every radix pass
    rng = np.random.default_rng(1)
    for trial in range(25):
        n = int(rng.integers(1, 3000))
        s = rng.normal(0.3, 0.05, n).astype(np.float32).astype(np.float64)
        if trial % 3 == 0:
            s = np.round(s, 2)  # heavy ties broken by uid
        s[rng.random(n) < 0.1] = np.nan
        u = np.array([f"{int(v):032x}" for v in rng.permutation(n)])
        f = float(rng.choice([0.0, 0.01, 0.15, 0.5, 0.95, 1.0]))
        want = top_fraction_keep(s, u, f)
        parts, perm, bounds = _partitioned(s, u, rng, int(rng.integers(1, 8)))
        boundary = top_fraction_threshold(parts, f)
        got = np.zeros(n, bool)
        for (ps, pu), a, b in zip(parts, bounds[:-1], bounds[1:]):
            got[perm[a:b]] = keep_at_or_above(ps, pu, boundary)
        np.testing.assert_array_equal(got, want)
        assert got.sum() == keep_count(n, f)
        # the callable form streams the partitions again on every pass
        again = top_fraction_threshold(lambda parts=parts: iter(parts), f)
        assert _same_boundary(again, boundary)


def _same_boundary(a, b) -> bool:
    if a is None or b is None:
        return a is b
    same_score = a.score == b.score or (math.isnan(a.score) and math.isnan(b.score))
    return same_score and a.uid == b.uid


def test_boundary_values_and_empty_cut():
    s = np.array([0.1, 0.4, 0.4, 0.2])
    u = np.array(["a", "c", "b", "d"])
    assert top_fraction_threshold([(s, u)], 0.5) == Boundary(score=0.4, uid="c")
    assert top_fraction_threshold([(s, u)], 0.2) is None
    assert not keep_at_or_above(s, u, None).any()
    b = top_fraction_threshold([(np.array([np.nan, np.nan]), np.array(["x", "y"]))], 0.5)
    assert math.isnan(b.score) and b.uid == "x"
    assert keep_at_or_above(np.array([np.nan, np.nan, -np.inf]), np.array(["x", "y", "z"]), b).tolist() == [
        True,
        False,
        True,
    ]
    assert top_fraction_threshold([], 0.5) is None


def test_radix_cut_over_partitions_equals_the_global_sort_with_heavy_ties():
    """Few distinct scores (ties broken by uid across partitions), NaNs, an empty partition and a
    partition of one: the boundary applied per partition keeps exactly the global top-k."""
    from pipeline.algorithms.score_cut import RadixCut, keep_at_or_above, partition_histogram, partition_members

    rng = np.random.default_rng(8)
    n = 3000
    scores = rng.choice([0.1, 0.25, 0.25000001, np.nan, -0.0, 0.0], n)
    uids = np.array([f"{v:032x}" for v in rng.permutation(n)])
    bounds = [0, 0, 1, 1700, 2999, n]  # an empty partition, partitions of one
    parts = [(scores[a:b], uids[a:b]) for a, b in zip(bounds, bounds[1:])]
    for fraction in (0.0001, 0.3, 0.5, 0.83, 1.0):
        cut = RadixCut(n, fraction)
        while cut.histogram_wanted:
            cut.add_histogram(sum(partition_histogram(s, *cut.prefix) for s, _ in parts))
        gathered = [partition_members(s, u, *cut.prefix) for s, u in parts]
        boundary = cut.boundary([g[0] for g in gathered], [g[1] for g in gathered]) if not cut.empty else None
        kept = np.concatenate([keep_at_or_above(s, u, boundary) for s, u in parts])
        assert np.array_equal(kept, top_fraction_keep(scores, uids, fraction)), fraction
