"""SemDeDup within one cluster: hand-computed cases, blocked == dense (with and without the
angular pruning), invariants."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from pipeline.algorithms.semdedup import (
    _CPU_COL_CHUNK,
    _angular_band,
    _block_chunks,
    _reference_direction,
    canonical_dot,
    semdedup_cluster,
    semdedup_cluster_dense,
    semdedup_cluster_with_similarity,
    semdedup_max_similarity,
    semdedup_order,
)


def _uids(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    perm = rng.permutation(n) if rng is not None else np.arange(n)
    return np.array([f"{int(i) * 7919 % (1 << 64):032x}" for i in perm])


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _cluster(n: int, d: int, rng: np.random.Generator, *, dup_frac: float = 0.3):
    """A cluster around a centroid with planted near and exact duplicates and tied dists."""
    c = _unit(rng.standard_normal(d))
    x = c + 0.8 * rng.standard_normal((n, d)) / np.sqrt(d)
    k = int(n * dup_frac)
    if n > 1 and k:
        src = rng.integers(0, n, k)
        dst = rng.integers(0, n, k)
        noise = rng.choice([0.0, 1e-4, 3e-3, 0.02, 0.08], k)[:, None]
        x[dst] = x[src] + noise * rng.standard_normal((k, d)) / np.sqrt(d)
    x = _unit(x)
    dist = np.round((1.0 - x.astype(np.float64) @ c), 2).astype(np.float32)  # many ties
    return x, dist, _uids(n, rng)


def _assert_same(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def _assert_pruned_same(got, dense):
    """Pruned output vs the dense reference: dropped and duplicate_of identical; the similarity
    identical on dropped rows and NaN on kept ones."""
    dropped, dup, sim = got
    np.testing.assert_array_equal(dropped, dense[0])
    np.testing.assert_array_equal(dup, dense[1])
    assert sim.dtype == np.float32
    np.testing.assert_array_equal(sim[dropped], dense[2][dropped])
    assert np.isnan(sim[~dropped]).all()


def _spread_cluster(n: int, d: int, rng: np.random.Generator, lo: float = 0.3, hi: float = 1.1,
                    dup_frac: float = 0.2):
    """Members at angles uniform in [lo, hi] from a unit centroid (directions uniform), with
    planted near and exact duplicates; dist_to_centroid as the cluster stage computes it."""
    c = _unit(rng.standard_normal(d)).astype(np.float64)
    theta = rng.uniform(lo, hi, n)
    u = rng.standard_normal((n, d))
    u -= np.outer(u @ c, c)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = np.cos(theta)[:, None] * c + np.sin(theta)[:, None] * u
    k = int(n * dup_frac)
    src, dst = rng.integers(0, n, k), rng.integers(0, n, k)
    noise = rng.choice([0.0, 1e-4, 3e-3, 0.02, 0.08], k)[:, None]
    x[dst] = x[src] + noise * rng.standard_normal((k, d)) / np.sqrt(d)
    x = _unit(x)
    dist = (1.0 - canonical_dot(x, np.broadcast_to(c.astype(np.float32), x.shape))).astype(np.float32)
    return x, dist, _uids(n, rng), c.astype(np.float32)


def _band_work(x, dist, uids, eps, block, centroid=None):
    """Fraction of the lower triangle's pairs the pruned blocked path multiplies."""
    order = semdedup_order(dist, uids)
    xs = np.ascontiguousarray(x[order])
    band = _angular_band(xs, _reference_direction(xs, centroid), 1.0 - eps)
    n = len(x)
    done = 0
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for j0, j1 in _block_chunks(band, i0, i1, _CPU_COL_CHUNK):
            done += (i1 - i0) * (j1 - j0) if j0 < i0 else (i1 - i0) * (i1 - i0 - 1) // 2
    return done / (n * (n - 1) / 2)


def test_hand_computed_cluster():
    # visiting order by dist desc: rows 2, 0, 3, 1
    x = _unit([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.01, 0.0], [0.0, 1.0, 0.02]])
    dist = np.array([0.3, 0.1, 0.5, 0.2], dtype=np.float32)
    uids = np.array(["a", "b", "c", "d"])
    assert semdedup_order(dist, uids).tolist() == [2, 0, 3, 1]
    dropped, dup, m = semdedup_cluster_with_similarity(x, dist, uids, eps=0.01, block_size=2, prune=False)
    # row 0 vs earlier row 2: cos = 1/sqrt(1.0001) > 0.99 -> dropped, points at row 2
    # row 3 vs rows 2, 0: ~0 -> kept; row 1 vs row 3: 1/sqrt(1.0004) > 0.99 -> dropped -> 3
    assert dropped.tolist() == [True, True, False, False]
    assert dup.tolist() == [2, 3, -1, -1]
    assert np.isnan(m[2])  # first in the order
    assert m[0] == pytest.approx(1 / math.sqrt(1.0001), abs=1e-6)
    assert m[3] == pytest.approx(0.01 / math.sqrt(1.0001 * 1.0004), abs=1e-7)  # vs row 2
    # pruned: the same decisions; the similarity only where it exceeds 1 - eps
    pdropped, pdup, pm = semdedup_cluster_with_similarity(x, dist, uids, eps=0.01, block_size=2)
    assert pdropped.tolist() == dropped.tolist() and pdup.tolist() == dup.tolist()
    np.testing.assert_array_equal(pm[dropped], m[dropped])
    assert np.isnan(pm[~dropped]).all()
    # a tighter eps keeps everyone
    assert not semdedup_cluster(x, dist, uids, 1e-6, 2)[0].any()
    assert not semdedup_cluster(x, dist, uids, 1e-6, 2, prune=False)[0].any()


def test_no_transitive_rescue():
    # a, then b ~ a, then c ~ b but not ~ a: c is dropped even though b was dropped
    a = np.array([1.0, 0.0])
    b = np.array([math.cos(0.1), math.sin(0.1)])
    c = np.array([math.cos(0.2), math.sin(0.2)])
    x = _unit([a, b, c])
    dist = np.array([0.3, 0.2, 0.1], dtype=np.float32)
    eps = 1 - math.cos(0.15)  # cos(a,b) = cos(b,c) = cos 0.1 > 1-eps > cos(a,c) = cos 0.2
    dropped, dup = semdedup_cluster(x, dist, ["u1", "u2", "u3"], eps, 16)
    assert dropped.tolist() == [False, True, True]
    assert dup.tolist() == [-1, 0, 1]


def test_uid_breaks_dist_ties_and_argmax_ties_pick_earliest():
    v = _unit([0.6, 0.8, 0.0])
    x = np.stack([v, v, v, _unit([0.0, 0.0, 1.0])])
    dist = np.full(4, 0.25, dtype=np.float32)
    uids = np.array(["c", "a", "b", "0"])  # visiting order: rows 3, 1, 2, 0
    dropped, dup = semdedup_cluster(x, dist, uids, 0.01, 1)
    assert dropped.tolist() == [True, False, True, False]
    # rows 2 and 0 tie between the identical earlier rows; the earliest visited (row 1) wins
    assert dup.tolist() == [1, -1, 1, -1]
    dense = semdedup_cluster_dense(x, dist, uids, 0.01)
    _assert_same(semdedup_cluster_with_similarity(x, dist, uids, 0.01, 1, prune=False), dense)
    _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, 0.01, 1), dense)


def test_threshold_is_strict():
    # cos = 0.5 exactly in float32 and float64: M > 1 - eps is false at eps = 0.5
    x = np.array([[1.0, 0.0], [0.5, math.sqrt(0.75)]], dtype=np.float32)
    assert float(canonical_dot(x[:1], x[1:])[0]) == 0.5
    dist = np.array([0.2, 0.1], dtype=np.float32)
    assert not semdedup_cluster(x, dist, ["a", "b"], 0.5, 4)[0].any()
    assert semdedup_cluster(x, dist, ["a", "b"], 0.5 + 2**-30, 4)[0].tolist() == [False, True]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_argmax_is_decided_by_the_canonical_sum_not_float32_rounding(backend):
    # in float32 both earlier rows score exactly 1.0 against b (1 + 2**-30 rounds to 1), so a
    # float32 argmax would take the earliest (row 0); the canonical sum ranks row 1 higher
    x = np.array([[1.0, 0.0], [1.0, 2.0**-30], [1.0, 1.0]], dtype=np.float32)
    assert np.float32(x[1] @ x[2]) == np.float32(x[0] @ x[2]) == 1.0
    dist = np.array([0.3, 0.2, 0.1], dtype=np.float32)
    for prune in (False, True):
        dropped, dup, m = semdedup_cluster_with_similarity(
            x, dist, ["a", "b", "c"], 0.5, 2, backend=backend, prune=prune
        )
        assert dropped.tolist() == [False, True, True]
        assert dup.tolist() == [-1, 0, 1]
        _assert_same((dropped, dup, m), semdedup_cluster_dense(x, dist, ["a", "b", "c"], 0.5))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_clusters(n):
    x = np.ones((n, 8), dtype=np.float32) / np.sqrt(8)
    dropped, dup, m = semdedup_cluster_with_similarity(x, np.zeros(n), _uids(n), 0.1, 4)
    assert dropped.tolist() == [False] * n and dup.tolist() == [-1] * n
    assert np.isnan(m).all() and m.dtype == np.float32
    _assert_same((dropped, dup, m), semdedup_cluster_dense(x, np.zeros(n), _uids(n), 0.1))


@pytest.mark.parametrize("n", [2, 3, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_blocked_equals_dense(n, backend):
    rng = np.random.default_rng(n)
    x, dist, uids = _cluster(n, 24, rng)
    block = 32  # n covers 1 below, at and above one block, and several blocks
    for eps in (0.0005, 0.01, 0.05, 0.3):
        dense = semdedup_cluster_dense(x, dist, uids, eps)
        blocked = semdedup_cluster_with_similarity(x, dist, uids, eps, block, backend=backend, prune=False)
        _assert_same(blocked, dense)
        pruned = semdedup_cluster_with_similarity(x, dist, uids, eps, block, backend=backend)
        _assert_pruned_same(pruned, dense)
        _assert_same(semdedup_cluster(x, dist, uids, eps, 7, backend=backend), dense[:2])
        _assert_same(semdedup_cluster(x, dist, uids, eps, 7, backend=backend, prune=False), dense[:2])
    if n > 30:
        assert dense[0].any()  # the planted duplicates are found


def test_blocked_equals_dense_exact_copies_and_high_dim():
    rng = np.random.default_rng(5)
    x, dist, uids = _cluster(300, 128, rng)
    x[50:90] = x[10]  # a group of 41 identical embeddings
    x[200] = x[10]
    for eps in (1e-6, 0.02):
        dense = semdedup_cluster_dense(x, dist, uids, eps)
        for block in (1, 16, 64, 1000):
            _assert_same(semdedup_cluster_with_similarity(x, dist, uids, eps, block, prune=False), dense)
            _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, eps, block), dense)
        got = semdedup_cluster_with_similarity(x, dist, uids, eps, 64, backend="torch", prune=False)
        _assert_same(got, dense)
        got = semdedup_cluster_with_similarity(x, dist, uids, eps, 64, backend="torch")
        _assert_pruned_same(got, dense)
    dropped, dup, _ = dense
    group = np.flatnonzero((x.view(np.uint32) == x[10].view(np.uint32)).all(axis=1))
    assert len(group) >= 42
    order = semdedup_order(dist, uids)
    pos = np.empty(len(x), int)
    pos[order] = np.arange(len(x))
    first = group[np.argmin(pos[group])]
    later = group[group != first]
    # every later copy is dropped (cos with the first copy is |v|^2 ~ 1), pointing earlier
    assert dropped[later].all()
    assert (pos[dup[later]] < pos[later]).all()


def test_matches_a_naive_float64_reference_away_from_the_threshold():
    rng = np.random.default_rng(11)
    x, dist, uids = _cluster(150, 32, rng)
    order = np.lexsort((uids, -dist.astype(np.float64)))
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    eps = 0.02
    exp_drop = np.zeros(150, bool)
    exp_dup = np.full(150, -1)
    margins = []
    for pos in range(1, 150):
        b = order[pos]
        earlier = order[:pos]
        j = int(np.argmax(sim[earlier, b]))
        m = sim[earlier[j], b]
        margins.append(abs(m - (1 - eps)))
        if m > 1 - eps:
            exp_drop[b], exp_dup[b] = True, earlier[j]
    assert min(margins) > 1e-6  # the comparison is not decided by rounding here
    dropped, dup = semdedup_cluster(x, dist, uids, eps, 16)
    np.testing.assert_array_equal(dropped, exp_drop)
    np.testing.assert_array_equal(dup, exp_dup)
    assert 5 < dropped.sum() < 140


def test_invariants_and_eps_monotonicity():
    rng = np.random.default_rng(3)
    x, dist, uids = _cluster(400, 48, rng)
    m, arg = semdedup_max_similarity(x, dist, uids, 64)
    order = semdedup_order(dist, uids)
    pos = np.empty(400, int)
    pos[order] = np.arange(400)
    first = order[0]
    assert np.isnan(m[first]) and arg[first] == -1
    others = np.arange(400) != first
    assert (pos[arg[others]] < pos[others]).all()  # argmax is visited earlier
    np.testing.assert_allclose(
        np.einsum("ij,ij->i", x[others].astype(np.float64), x[arg[others]].astype(np.float64)),
        m[others],
        atol=1e-12,
    )
    prev = np.zeros(400, bool)
    for eps in (0.0, 1e-3, 1e-2, 0.1, 0.5):
        dropped, dup, ms = semdedup_cluster_with_similarity(x, dist, uids, eps, 64, prune=False)
        np.testing.assert_array_equal(ms, m.astype(np.float32))
        assert (dropped >= prev).all()  # larger eps drops a superset
        prev = dropped
        assert (ms[dropped].astype(np.float64) >= (1 - eps) - 1e-7).all()
        np.testing.assert_array_equal(dup[dropped], arg[dropped])
        assert (dup[~dropped] == -1).all()


def test_memory_is_bounded_by_the_block():
    rng = np.random.default_rng(0)
    n, d, block = 3000, 64, 128
    x, dist, uids = _cluster(n, d, rng, dup_frac=0.05)
    tracemalloc.start()
    semdedup_cluster(x, dist, uids, 0.01, block)
    semdedup_cluster(x, dist, uids, 0.01, block, prune=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense_matrix = n * n * 4
    assert peak < dense_matrix / 4, (peak, dense_matrix)


def test_canonical_dot_is_order_and_batch_independent():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((50, 300)).astype(np.float32)
    b = rng.standard_normal((50, 300)).astype(np.float32)
    full = canonical_dot(a, b)
    np.testing.assert_array_equal(full, canonical_dot(b, a))  # symmetric
    one_by_one = np.array([canonical_dot(a[i : i + 1], b[i : i + 1])[0] for i in range(50)])
    np.testing.assert_array_equal(full, one_by_one)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = np.array([math.fsum((a64[i] * b64[i]).tolist()) for i in range(50)])
    np.testing.assert_allclose(full, exact, rtol=0, atol=1e-12)


def test_input_validation():
    x = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError):
        semdedup_cluster(x, np.zeros(2), ["a", "b", "c"], 0.1, 4)
    with pytest.raises(ValueError):
        semdedup_cluster(x, np.zeros(3), ["a", "b"], 0.1, 4)
    with pytest.raises(ValueError):
        semdedup_cluster(x, np.zeros(3), ["a", "b", "c"], 0.1, 0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        semdedup_cluster(bad, np.zeros(3), ["a", "b", "c"], 0.1, 4)
    with pytest.raises(ValueError):
        semdedup_cluster(x, np.zeros(3), ["a", "b", "c"], 0.1, 4, centroid=np.ones(3))
    with pytest.raises(ValueError):
        semdedup_cluster(x, np.zeros(3), ["a", "b", "c"], 0.1, 4, centroid=[np.inf, 0.0])
    with pytest.raises(ValueError):
        semdedup_cluster(x, np.zeros(3), ["a", "b", "c"], np.nan, 4)


def test_torch_reduced_precision_matmul_still_equals_dense():
    import torch

    from pipeline.algorithms.semdedup import _torch_fp32_matmul_is_ieee

    rng = np.random.default_rng(9)
    x, dist, uids = _cluster(300, 64, rng)
    dense = semdedup_cluster_dense(x, dist, uids, 0.02)
    assert _torch_fp32_matmul_is_ieee(torch.device("cpu"))
    before = torch.get_float32_matmul_precision()
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    before_mkldnn = getattr(mkldnn, "fp32_precision", None)
    try:
        torch.set_float32_matmul_precision("medium")
        if before_mkldnn is not None:
            mkldnn.fp32_precision = "bf16"  # where supported, fp32 matmuls now run in bf16
        assert not _torch_fp32_matmul_is_ieee(torch.device("cpu"))
        got = semdedup_cluster_with_similarity(x, dist, uids, 0.02, 64, backend="torch", prune=False)
        got_pruned = semdedup_cluster_with_similarity(x, dist, uids, 0.02, 64, backend="torch")
    finally:
        torch.set_float32_matmul_precision(before)
        if before_mkldnn is not None:
            mkldnn.fp32_precision = before_mkldnn
    _assert_same(got, dense)
    _assert_pruned_same(got_pruned, dense)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_cuda_equals_dense():
    rng = np.random.default_rng(2)
    x, dist, uids = _cluster(700, 64, rng)
    for eps in (0.001, 0.05):
        dense = semdedup_cluster_dense(x, dist, uids, eps)
        _assert_same(semdedup_cluster_with_similarity(x, dist, uids, eps, 128, device="cuda", prune=False), dense)
        _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, eps, 128, device="cuda"), dense)


# ----------------------------------------------------------------------------- angular pruning


@pytest.mark.parametrize(("backend", "n"), [("numpy", 2500), ("torch", 1000)])
def test_pruned_equals_dense_where_pruning_removes_most_work(backend, n):
    rng = np.random.default_rng(21)
    x, dist, uids, c = _spread_cluster(n, 32, rng, 0.2, 1.2)
    for eps in (0.0005, 0.01, 0.03):
        # most of the triangle is skipped (uniform angles over 1 rad, band ~ arccos(1 - eps));
        # blocks of 64 rows span a wider angle range in a smaller cluster
        assert _band_work(x, dist, uids, eps, 64, c) < (0.45 if n > 2000 else 0.55)
        dense = semdedup_cluster_dense(x, dist, uids, eps)
        assert dense[0].sum() > n // 25
        for centroid in (c, None):  # the given centroid, or the members' mean direction
            got = semdedup_cluster_with_similarity(x, dist, uids, eps, 64, backend=backend, centroid=centroid)
            _assert_pruned_same(got, dense)
        _assert_same(semdedup_cluster(x, dist, uids, eps, 100, backend=backend, centroid=c), dense[:2])
    assert _band_work(x, dist, uids, 0.0005, 64, c) < 0.15


def test_pruned_equals_dense_for_large_eps_where_the_band_covers_everything():
    rng = np.random.default_rng(22)
    x, dist, uids, c = _spread_cluster(700, 24, rng, 0.3, 1.1)
    for eps in (0.1, 0.3, 0.6, 0.99, 1.0, 1.5, 3.0):
        dense = semdedup_cluster_dense(x, dist, uids, eps)
        _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, eps, 32, centroid=c), dense)
        _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, eps, 32), dense)
    assert _band_work(x, dist, uids, 0.1, 32, c) < 0.9  # still prunes at 0.1 (delta ~ 0.45 rad)
    assert _band_work(x, dist, uids, 0.3, 32, c) == 1.0  # delta ~ 0.8 rad: every pair
    xs = x[semdedup_order(dist, uids)]
    ref = _reference_direction(xs, c)
    for eps in (1.0, 1.5):  # T <= 0: any pair may exceed it, no band
        assert _angular_band(xs, ref, 1.0 - eps) is None


@pytest.mark.parametrize("eps", [0.002, 0.01, 0.1])
def test_planted_duplicates_at_the_band_edge(eps):
    # pairs on one meridian through the centroid: their angle is exactly the difference of
    # their angles to the centroid, so the bound is tight and cos(a, b) ~ 1 - eps
    rng = np.random.default_rng(int(eps * 1e4))
    d = 48
    c = _unit(rng.standard_normal(d)).astype(np.float64)
    delta = math.acos(1 - eps)
    rows = []
    for k in range(-40, 41):
        u = rng.standard_normal(d)
        u -= (u @ c) * c
        u /= np.linalg.norm(u)
        t_a = rng.uniform(0.4, 0.9)
        t_b = t_a - delta * (1 + k * 2e-7)  # straddles the threshold by a few float32 ulps
        rows += [math.cos(t_a) * c + math.sin(t_a) * u, math.cos(t_b) * c + math.sin(t_b) * u]
    bg = rng.standard_normal((300, d))
    bg -= np.outer(bg @ c, c)
    bg /= np.linalg.norm(bg, axis=1, keepdims=True)
    tb = rng.uniform(0.2, 1.2, 300)
    rows += list(np.cos(tb)[:, None] * c + np.sin(tb)[:, None] * bg)
    x = _unit(np.array(rows))
    dist = (1.0 - x.astype(np.float64) @ c).astype(np.float32)
    uids = _uids(len(x), rng)
    dense = semdedup_cluster_dense(x, dist, uids, eps)
    pair_b = np.arange(1, 162, 2)
    assert 0 < dense[0][pair_b].sum() < len(pair_b)  # some planted pairs drop, some stay
    for block in (1, 8, 64):
        _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, eps, block, centroid=c), dense)
    _assert_pruned_same(semdedup_cluster_with_similarity(x, dist, uids, eps, 16), dense)


def test_pruned_is_exact_when_inputs_break_the_assumptions():
    """Distances inconsistent with the embeddings, another clustering's centroid, vectors that
    are not unit norm, zero rows: the bound is computed from the embeddings themselves, so the
    result stays exact; only the amount of skipped work changes (down to none: full triangle)."""
    rng = np.random.default_rng(23)
    x, dist, uids, c = _spread_cluster(900, 32, rng, 0.2, 1.2)
    eps = 0.02
    cases = {
        "shuffled dist": (x, rng.permutation(dist), c),
        "dist to another centroid": (x, (1.0 - x @ _unit(rng.standard_normal(32))).astype(np.float32), c),
        "wrong centroid passed": (x, dist, _unit(rng.standard_normal(32))),
        "scaled centroid": (x, dist, 7.5 * c),
        "zero centroid": (x, dist, np.zeros(32, np.float32)),
    }
    scaled = (x * rng.uniform(0.5, 1.3, (len(x), 1))).astype(np.float32)
    cases["norms in [0.5, 1.3]"] = (scaled, dist, c)
    with_zeros = x.copy()
    with_zeros[rng.integers(0, len(x), 20)] = 0.0
    cases["zero rows"] = (with_zeros, dist, c)
    for name, (xx, dd, cc) in cases.items():
        for e in (eps, 0.3):
            dense = semdedup_cluster_dense(xx, dd, uids, e)
            got = semdedup_cluster_with_similarity(xx, dd, uids, e, 64, centroid=cc)
            _assert_pruned_same(got, dense)
        assert dense[0].any(), name
    assert _band_work(x, rng.permutation(dist), uids, eps, 64, c) > 0.9  # falls back to ~everything
    xs = x[semdedup_order(dist, uids)]
    assert _reference_direction(xs, np.zeros(32)) is None  # no direction: no band
    # norms up to 1.3 make the bound looser (N^2 ~ 1.69): less is pruned, still exact
    assert _band_work(scaled, dist, uids, eps, 64, c) > _band_work(x, dist, uids, eps, 64, c)


def test_pruned_similarity_is_exact_above_the_threshold_and_rethresholds_for_smaller_eps():
    rng = np.random.default_rng(24)
    x, dist, uids, c = _spread_cluster(1200, 32, rng)
    m, arg = semdedup_max_similarity(x, dist, uids, 64)  # eps-independent: never pruned
    dropped, dup, sim = semdedup_cluster_with_similarity(x, dist, uids, 0.05, 64, centroid=c)
    np.testing.assert_array_equal(sim[dropped], m[dropped].astype(np.float32))
    assert np.isnan(sim[~dropped]).all()
    full = semdedup_cluster_with_similarity(x, dist, uids, 0.05, 64, prune=False)
    np.testing.assert_array_equal(full[2], m.astype(np.float32))
    for smaller in (0.001, 0.01, 0.05):
        re = sim.astype(np.float64) > 1 - smaller  # NaN: kept at any eps' <= eps
        np.testing.assert_array_equal(re, semdedup_cluster(x, dist, uids, smaller, 64)[0])


def test_band_is_short_for_consistent_inputs():
    # ordered by the angle to the centroid the band is a short run just before each block
    rng = np.random.default_rng(25)
    x, dist, uids, c = _spread_cluster(3000, 16, rng, 0.3, 1.1, dup_frac=0.0)
    order = semdedup_order(dist, uids)
    xs = x[order]
    band = _angular_band(xs, _reference_direction(xs, c), 1.0 - 0.01)
    assert band is not None
    assert 0.1415 < band.reach < 0.1416  # arccos(0.99) = 0.14154..., plus a ~1e-6 margin
    assert np.all(np.diff(band.theta) <= 1e-6)  # visiting order = angle descending
    chunks = _block_chunks(band, 2048, 2112, 256)
    assert chunks[-1] == (2048, 2112)
    lo = chunks[0][0]
    assert all(a < b for a, b in chunks)
    assert 2048 - lo < 0.25 * 2048  # ~ 0.14 / 0.8 of the members, not all earlier ones
    assert band.theta[lo] < band.theta[2048] + band.reach <= band.theta[lo - 1]
