"""DBP: complexity, quotas (closed-form QP + exact rounding), selection inside clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.algorithms.dbp import (
    cluster_complexity,
    cluster_quotas,
    complexity_softmax,
    quota_bounds,
    select_in_clusters,
)


def _reference_continuous(sizes, c, target, tau, lb):
    """Independent solve: bisection on lambda with exact rational-free float64 steps."""
    p = complexity_softmax(c, tau)
    n = np.asarray(sizes, float)
    lo, hi = -target - 1.0, float(n.max()) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(p * target + mid, lb, n).sum() < target:
            lo = mid
        else:
            hi = mid
    return np.clip(p * target + 0.5 * (lo + hi), lb, n)


def test_hand_computed_quotas():
    # p = softmax([0.2, 0.4, 0.6]) = [.2693, .3289, .4018]; x = 12p = [3.23, 3.95, 4.82]
    # floors [3, 3, 4] sum to 10; the two largest remainders (.95, .82) get +1
    q = cluster_quotas([10, 10, 10], [0.1, 0.2, 0.3], [1, 1, 1], 12, 0.5)
    assert q.tolist() == [3, 4, 5]
    assert q.dtype == np.int64


def test_capping_redistributes_to_the_others():
    # cluster 0 is by far the most complex but holds 2 members: it keeps 2, the rest is split
    q = cluster_quotas([2, 100, 100], [5.0, 0.1, 0.1], [1.0, 1.0, 1.0], 60, 0.5)
    assert q.tolist() == [2, 29, 29]


def test_temperature_to_zero_fills_the_most_complex_then_water_fills():
    # most complex (index 1) takes 10 = its size; 10 left over clusters 0, 2, 3 at level 10/3
    # (all above lb = 1), floors 3+3+3 = 9, the tie in remainders goes to the lowest index
    q = cluster_quotas([5, 10, 10, 10], [0.1, 0.5, 0.2, 0.3], [1, 1, 1, 1], 20, 1e-12)
    assert q.tolist() == [4, 10, 3, 3]
    q = cluster_quotas([5, 10, 10, 10], [0.1, 0.5, 0.2, 0.3], [1, 1, 1, 1], 8, 1e-300)
    assert q.tolist() == [1, 5, 1, 1]  # the others sit at their lower bound 1


@pytest.mark.parametrize("tau", [1e12, 1e300, math.inf])
def test_temperature_to_infinity_is_as_equal_as_the_bounds_allow(tau):
    q = cluster_quotas([2, 50, 50, 50], [0.9, 0.1, 0.5, 0.3], [1, 1, 1, 1], 62, tau)
    assert q.tolist() == [2, 20, 20, 20]
    q = cluster_quotas([10, 10, 10], [0.9, 0.1, 0.5], [1, 1, 1], 4, tau)
    assert q.tolist() == [2, 1, 1]  # 4/3 each; remainder ties go to the lowest index


def test_sizes_zero_and_one():
    q = cluster_quotas([0, 1, 5, 5], [np.nan, 0.2, 0.3, 0.1], [np.nan, 1, 1, 1], 4, 0.5)
    assert q[0] == 0 and q[1] <= 1 and q.sum() == 4
    assert (q[2:] >= 1).all()  # lb = min(1, n - 1) = 1 for the size-5 clusters, 0 for size 1
    assert quota_bounds([0, 1, 2, 7], 10).tolist() == [0, 0, 1, 1]


def test_nan_complexity_takes_the_mean_of_the_defined():
    p = complexity_softmax([0.1, np.nan, 0.3], 0.5)
    np.testing.assert_allclose(p, complexity_softmax([0.1, 0.2, 0.3], 0.5))
    np.testing.assert_allclose(complexity_softmax([np.nan, np.nan], 0.5), [0.5, 0.5])


def test_target_at_or_above_the_pool_keeps_everything():
    sizes = np.array([3, 0, 7])
    for t in (10, 11, 1000):
        assert cluster_quotas(sizes, [0.1, 0.2, 0.3], [1, 1, 1], t, 0.5).tolist() == [3, 0, 7]


def test_infeasible_target_raises():
    with pytest.raises(ValueError, match="lower bounds"):
        cluster_quotas([5, 5, 5], [0.1, 0.2, 0.3], [1, 1, 1], 2, 0.5)
    # exactly the sum of the bounds is feasible
    assert cluster_quotas([5, 5, 5], [0.1, 0.2, 0.3], [1, 1, 1], 3, 0.5).tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        cluster_quotas([5, 5], [0.1, 0.2], [1, 1], 4, 0.0)
    with pytest.raises(ValueError):
        cluster_quotas([5, 5], [0.1, 0.2], [1, 1], -1, 0.5)


def test_balance_ratio_raises_the_floor():
    sizes = np.full(10, 100)
    c = np.linspace(0.1, 1.0, 10)
    # m = floor(200 / 10 * 0.5) = 10: with tau -> 0 the most complex takes its 100 and every
    # other cluster is held at >= 10 (the remaining 100 spread evenly: 11.1 each)
    q = cluster_quotas(sizes, c, np.ones(10), 200, 1e-9, balance_ratio=0.5)
    assert q.sum() == 200 and q[-1] == 100 and (q >= 10).all()
    assert q[:-1].tolist() == [12, 11, 11, 11, 11, 11, 11, 11, 11]
    plain = cluster_quotas(sizes, c, np.ones(10), 200, 1e-9)
    assert plain[:-1].tolist() == [12, 11, 11, 11, 11, 11, 11, 11, 11]  # same water level here
    q = cluster_quotas(sizes, c, np.ones(10), 200, 0.05, balance_ratio=1.0)
    assert (q >= 20).all() and q.sum() == 200
    with pytest.raises(ValueError):
        cluster_quotas(sizes, c, np.ones(10), 200, 0.5, balance_ratio=0.0)


def test_random_cases_sum_exactly_and_stay_within_one_of_the_qp_solution():
    rng = np.random.default_rng(0)
    for trial in range(60):
        k = int(rng.integers(1, 40))
        sizes = rng.integers(0, 200, k)
        if sizes.sum() < 2:
            continue
        d_intra = rng.uniform(0.05, 0.5, k)
        d_inter = rng.uniform(0.2, 1.0, k)
        d_intra[rng.random(k) < 0.1] = np.nan
        tau = float(rng.choice([1e-3, 0.05, 0.5, 5.0]))
        r = None if trial % 2 else float(rng.choice([0.25, 0.5, 1.0]))
        target = int(rng.integers(0, sizes.sum()))
        lb = quota_bounds(sizes, target, balance_ratio=r)
        if lb.sum() > target:
            with pytest.raises(ValueError):
                cluster_quotas(sizes, d_intra, d_inter, target, tau, balance_ratio=r)
            continue
        q = cluster_quotas(sizes, d_intra, d_inter, target, tau, balance_ratio=r)
        assert q.sum() == target
        assert (q >= lb).all() and (q <= sizes).all()
        x = _reference_continuous(sizes, d_intra * d_inter, target, tau, lb)
        assert np.abs(q - x).max() < 1 + 1e-9


def test_monotone_in_complexity_when_no_cap_binds():
    rng = np.random.default_rng(1)
    c = rng.uniform(0.1, 1.0, 30)
    q = cluster_quotas(np.full(30, 10_000), c, np.ones(30), 3000, 0.2)
    assert q.sum() == 3000 and (q < 10_000).all() and (q > 1).all()
    assert (np.diff(q[np.argsort(c, kind="stable")]) >= 0).all()


def test_cluster_complexity_hand_computed():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    cluster_of = np.array([0, 0, 1, 3, 3, 3])
    dist = np.array([0.1, 0.3, 0.2, 0.0, 0.3, 0.6])
    sizes, d_intra, d_inter = cluster_complexity(centroids, cluster_of, dist, n_neighbors=1)
    assert sizes.tolist() == [2, 1, 0, 3]
    np.testing.assert_allclose(d_intra[[0, 1, 3]], [0.2, 0.2, 0.3])
    assert np.isnan(d_intra[2]) and np.isnan(d_inter[2])  # empty cluster
    # nearest other centroid: 0 -> 3 (cos .6), 1 -> 3 (cos .8), 3 -> 1 (cos .8)
    np.testing.assert_allclose(d_inter[[0, 1, 3]], [0.4, 0.2, 0.2], atol=1e-6)
    # l capped at k - 1 = 3: mean over all others
    _, _, d_all = cluster_complexity(centroids, cluster_of, dist, n_neighbors=20)
    np.testing.assert_allclose(d_all[0], np.mean([1 - 0.0, 1 - (-1.0), 1 - 0.6]), atol=1e-6)
    # a single cluster has no other centroid
    _, _, d_one = cluster_complexity(centroids[:1], np.zeros(2, int), np.array([0.1, 0.2]))
    assert np.isnan(d_one).all()


def test_cluster_complexity_excludes_self_with_duplicate_centroids():
    c = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    _, _, d_inter = cluster_complexity(c, np.array([0, 1, 2]), np.zeros(3), n_neighbors=1)
    np.testing.assert_allclose(d_inter, [0.0, 0.0, 1.0], atol=1e-6)


def test_select_in_clusters_keeps_the_hardest_with_uid_ties():
    cluster_of = np.array([0, 0, 0, 0, 1, 1, 2])
    dist = np.array([0.1, 0.5, 0.5, 0.3, 0.2, 0.4, 0.9])
    uids = np.array(["d", "c", "a", "b", "x", "y", "z"])
    keep = select_in_clusters(cluster_of, dist, uids, np.array([2, 5, 0]))
    # cluster 0: 0.5 (uid a) and 0.5 (uid c) beat 0.3; cluster 1 keeps both; cluster 2 none
    assert keep.tolist() == [False, True, True, False, True, True, False]
    keep = select_in_clusters(cluster_of, dist, uids, np.array([1, 1, 1]))
    assert keep.tolist() == [False, False, True, False, False, True, True]
    with pytest.raises(ValueError):
        select_in_clusters(cluster_of, dist, uids, np.array([1, -1, 0]))


def test_end_to_end_quota_selection_counts():
    rng = np.random.default_rng(4)
    k, n = 12, 3000
    cluster_of = rng.integers(0, k, n)
    dist = rng.uniform(0, 0.6, n)
    uids = np.array([f"{i:032x}" for i in rng.permutation(n)])
    centroids = rng.standard_normal((k, 16)).astype(np.float32)
    sizes, d_intra, d_inter = cluster_complexity(centroids, cluster_of, dist)
    q = cluster_quotas(sizes, d_intra, d_inter, 900, 0.5)
    keep = select_in_clusters(cluster_of, dist, uids, q)
    assert keep.sum() == 900
    np.testing.assert_array_equal(np.bincount(cluster_of[keep], minlength=k), q)


def test_minimum_floors_raise_the_lower_bounds_and_keep_the_sum():
    from pipeline.algorithms.dbp import cluster_quotas

    sizes = np.array([10, 10, 10])
    d_intra = np.array([0.1, 0.2, 0.3])
    d_inter = np.array([0.5, 0.5, 0.5])
    free = cluster_quotas(sizes, d_intra, d_inter, 12, 0.05)
    assert free[0] < 6  # the least complex cluster gets little on its own
    floored = cluster_quotas(sizes, d_intra, d_inter, 12, 0.05, minimum=[6, 0, 0])
    assert floored.sum() == 12 and floored[0] >= 6
    assert np.all(floored <= sizes)
    # floors above the size are capped at it; floors above the target are an error
    assert cluster_quotas(sizes, d_intra, d_inter, 25, 0.5, minimum=[20, 0, 0])[0] == 10
    with pytest.raises(ValueError, match="below the sum"):
        cluster_quotas(sizes, d_intra, d_inter, 12, 0.5, minimum=[10, 10, 0])


def test_cluster_sums_of_parts_add_up_to_the_sum_of_the_whole_exactly():
    """Per-partition sums, added in any order, give bit-identical d_intra: the sums are exact."""
    from fractions import Fraction

    from pipeline.algorithms.dbp import cluster_sums, complexity_from_sums

    rng = np.random.default_rng(3)
    k, n = 7, 5000
    labels = rng.integers(0, k, n)
    dist = np.concatenate([rng.uniform(0, 1, n - 3), [1e-300, -1e-9, 2.0]])  # tiny, negative, large
    rng.shuffle(dist)
    sizes, whole = cluster_sums(labels, dist, k)
    for j in range(k):
        assert Fraction(whole[j], 2**1126) == sum(Fraction(float(d)) for d in dist[labels == j])
    cuts = np.sort(rng.choice(n, 9, replace=False))
    parts = [cluster_sums(l, d, k) for l, d in zip(np.split(labels, cuts), np.split(dist, cuts))]
    added = [sum(column) for column in zip(*[p[1] for p in reversed(parts)])]
    assert added == whole
    assert np.array_equal(np.sum([p[0] for p in parts], axis=0), sizes)
    centroids = rng.normal(size=(k, 8)).astype(np.float32)
    a = complexity_from_sums(centroids, sizes, whole, n_neighbors=3)
    b = cluster_complexity(centroids, labels, dist, n_neighbors=3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y, equal_nan=True)
    exact_mean = [float(sum(Fraction(float(d)) for d in dist[labels == j]) / int(sizes[j])) for j in range(k)]
    assert a[1].tolist() == exact_mean  # correctly rounded means
