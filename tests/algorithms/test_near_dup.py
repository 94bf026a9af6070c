"""pHash near-duplicates: candidate keys, verification, union-find, keep the smallest uid."""

from __future__ import annotations

import time
from itertools import combinations

import numpy as np
import pytest

from pipeline.algorithms import near_dup as nd
from pipeline.algorithms.near_dup import connected_components, hamming_distance, index_plan, near_duplicates
from tests.algorithms.reference import band_candidate_pairs, band_mask, identical_hash_pairs, key_candidate_pairs


def _planted(n: int, radius: int, rng: np.random.Generator) -> np.ndarray:
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    k = n // 4
    src, dst = rng.integers(0, n, k), rng.integers(0, n, k)
    flips = rng.integers(0, radius + 3, k)  # within, at and just beyond the radius
    for s, d, f in zip(src, dst, flips):
        m = 0
        for b in rng.choice(64, int(f), replace=False):
            m |= 1 << int(b)
        h[d] = h[s] ^ np.uint64(m)
    h[rng.integers(0, n, 5)] = h[0]  # a few identical hashes
    return h


def _brute_pairs(h: np.ndarray, radius: int) -> set[tuple[int, int]]:
    out = set()
    for i in range(len(h)):
        j = np.flatnonzero(np.bitwise_count(h[i] ^ h[i + 1 :]) <= radius) + i + 1
        out.update((i, int(x)) for x in j)
    return out


def _reference(h, uids, radius):
    """All-pairs graph, components by a plain Python union-find, smallest uid kept."""
    parent = list(range(len(h)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in _brute_pairs(h, radius):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(h)):
        groups.setdefault(find(i), []).append(i)
    dropped = np.zeros(len(h), bool)
    dup = np.full(len(h), -1)
    for members in groups.values():
        keep = min(members, key=lambda i: (uids[i], i))
        for i in members:
            if i != keep:
                dropped[i], dup[i] = True, keep
    return dropped, dup


@pytest.mark.parametrize("radius", [0, 1, 3, 4, 6, 8, 10])
def test_near_duplicates_match_all_pairs_reference(radius):
    rng = np.random.default_rng(radius)
    n = 1500
    h = _planted(n, radius, rng)
    uids = np.array([f"{i:032x}" for i in rng.permutation(n)])
    exp = _reference(h, uids, radius)
    assert exp[0].sum() > 0
    for plan in (None, tuple(band_mask(b, radius) for b in range(radius + 1))):
        got = near_duplicates(h, uids, radius, plan=plan)
        np.testing.assert_array_equal(got[0], exp[0])
        np.testing.assert_array_equal(got[1], exp[1])
    got = near_duplicates(h, uids, radius, n_threads=2)
    np.testing.assert_array_equal(got[1], exp[1])


@pytest.mark.parametrize("radius", [2, 5, 8])
def test_band_pairs_union_equals_brute_force(radius):
    rng = np.random.default_rng(10 + radius)
    h = _planted(800, radius, rng)
    first_row = {}
    for i, v in enumerate(h.tolist()):
        first_row.setdefault(v, i)
    reps = sorted(first_row.values())
    # distinct hashes compare through their first row; equal hashes link to it
    rep = [first_row[v] for v in h.tolist()]
    want = {(min(rep[i], rep[j]), max(rep[i], rep[j])) for i, j in _brute_pairs(h, radius) if h[i] != h[j]}
    want |= {(rep[i], i) for i in range(len(h)) if rep[i] != i}
    for plan in (None, index_plan(radius, len(reps))):
        n_bands = radius + 1 if plan is None else len(plan)
        got = set()
        for b in range(n_bands):
            pairs = band_candidate_pairs(h, b, radius, plan=plan)
            assert (pairs[:, 0] < pairs[:, 1]).all()
            assert (hamming_distance(h[pairs[:, 0]], h[pairs[:, 1]]) <= radius).all()
            got |= set(map(tuple, pairs.tolist()))
        assert got == want


def test_spec_bands_partition_the_64_bits():
    for r in (0, 1, 4, 8, 12):
        masks = [band_mask(b, r) for b in range(r + 1)]
        assert sum(masks) == 2**64 - 1  # disjoint and complete
        widths = [bin(m).count("1") for m in masks]
        assert max(widths) - min(widths) <= 1


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 5, 6, 7, 8])
def test_index_plan_guarantees_an_untouched_key(radius):
    plan = index_plan(radius, 10**6)
    # exhaustive over which blocks differ: the plan's keys are unions of the m blocks of some
    # split; find the split from the keys' bit runs and check every set of <= r dirty blocks
    bounds = sorted({b for k in plan for b in _run_edges(k)} | {0, 64})
    blocks = list(zip(bounds[:-1], bounds[1:]))
    block_masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in blocks]
    keys = [{i for i, bm in enumerate(block_masks) if k & bm} for k in plan]
    for k, bits in zip(plan, keys):
        assert sum(block_masks[i] for i in bits) == k  # keys are whole blocks
    for dirty in combinations(range(len(blocks)), min(radius, len(blocks))):
        assert any(not (key & set(dirty)) for key in keys), dirty
    # and on random bit patterns of weight <= radius
    rng = np.random.default_rng(radius)
    for _ in range(2000):
        flip = 0
        for b in rng.choice(64, radius, replace=False):
            flip |= 1 << int(b)
        assert any(k & flip == 0 for k in plan)


def _run_edges(mask: int) -> list[int]:
    edges, prev = [], 0
    for b in range(65):
        cur = (mask >> b) & 1 if b < 64 else 0
        if cur != prev:
            edges.append(b)
        prev = cur
    return edges


def test_index_plan_is_cheaper_than_plain_bands_for_large_n():
    assert len(index_plan(8, 10**6)) < 200
    widths = [bin(k).count("1") for k in index_plan(8, 10**6)]
    assert min(widths) >= 16  # vs 7-bit bands: ~n^2 / 2^7 candidate pairs per band
    assert len(index_plan(4, 100)) <= 5  # few hashes: plain bands (r+1 tables) are cheapest


def test_identical_hashes_are_linked_through_one_row_not_quadratically():
    h = np.full(200_000, 12345, dtype=np.uint64)
    h[::1000] = np.arange(200, dtype=np.uint64) << np.uint64(40)
    same = np.flatnonzero(h == np.uint64(12345))
    assert len(same) == 199_800
    pairs = identical_hash_pairs(h)
    assert len(pairs) == len(same) - 1  # one link per later copy, not ~n^2 / 2
    assert (pairs[:, 0] == same[0]).all()
    t = time.perf_counter()
    dropped, dup = near_duplicates(h, np.array([f"{i:032x}" for i in range(len(h))]), 4)
    assert time.perf_counter() - t < 10
    assert not dropped[same[0]] and dropped[same[1:]].all()  # smallest uid = first row
    assert (dup[same[1:]] == same[0]).all()


def test_key_candidate_pairs_only_matching_key():
    h = np.array([0b0000, 0b0001, 0b1_0000_0000, 0b1_0000_0001], dtype=np.uint64)
    low = 0xFF
    pairs = key_candidate_pairs(h, low, 1)
    # rows agreeing on the low byte: (0, 2) and (1, 3) -- distance 1 each
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (1, 3)]
    assert sorted(map(tuple, key_candidate_pairs(h, low, 0).tolist())) == []


def test_connected_components_small_graphs():
    assert connected_components(0, np.empty((0, 2))).tolist() == []
    assert connected_components(4, np.empty((0, 2))).tolist() == [0, 1, 2, 3]
    chain = np.array([[4, 3], [3, 2], [2, 1], [1, 0]])
    assert connected_components(6, chain).tolist() == [0, 0, 0, 0, 0, 5]
    lab = connected_components(7, np.array([[5, 6], [1, 6], [2, 3], [3, 2], [4, 4]]))
    assert lab.tolist() == [0, 1, 2, 2, 4, 1, 1]
    with pytest.raises(ValueError):
        connected_components(3, np.array([[0, 3]]))


def test_connected_components_random_against_python_union_find():
    rng = np.random.default_rng(0)
    n = 5000
    pairs = rng.integers(0, n, (4000, 2))
    lab = connected_components(n, pairs)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    assert lab.tolist() == [find(i) for i in range(n)]


def test_connected_components_is_fast_for_millions_of_pairs():
    rng = np.random.default_rng(0)
    n = 1_000_000
    pairs = rng.integers(0, n, (2_000_000, 2))
    t = time.perf_counter()
    lab = connected_components(n, pairs)
    assert time.perf_counter() - t < 20
    assert (lab <= np.arange(n)).all()
    assert (lab[pairs[:, 0]] == lab[pairs[:, 1]]).all()


def test_int64_view_and_validation():
    h = np.array([1, 3, -1], dtype=np.int64)  # -1 is all ones
    dropped, dup = near_duplicates(h, ["b", "a", "c"], 1)
    assert dropped.tolist() == [True, False, False] and dup.tolist() == [1, -1, -1]
    with pytest.raises(ValueError):
        near_duplicates(h, ["a", "b"], 1)
    with pytest.raises(ValueError):
        index_plan(64, 10)
    with pytest.raises(ValueError):
        band_candidate_pairs(h, 3, 2)
    assert nd.hamming_distance(np.uint64(0), np.uint64(2**64 - 1)) == 64


# ----------------------------------------------------------------------------- scaling plans


def _clustered(n: int, centres: int, max_flips: int, rng: np.random.Generator) -> np.ndarray:
    """Hashes drawn around a few centres, each with 0 .. max_flips random bits flipped (many
    near-identical hashes, as templated or blank images give), plus some exact repeats."""
    c = rng.integers(0, 2**64, centres, dtype=np.uint64)
    h = c[rng.integers(0, centres, n)]
    flips = rng.integers(0, max_flips + 1, n)
    for j in range(max_flips):
        bit = rng.integers(0, 64, n).astype(np.uint64)
        h ^= np.where(flips > j, np.uint64(1) << bit, np.uint64(0))
    return h


def _check_against_reference(h, radius, rng, **kwargs):
    uids = np.array([f"{i:032x}" for i in rng.permutation(len(h))])
    exp = _reference(h, uids, radius)
    got = near_duplicates(h, uids, radius, **kwargs)
    np.testing.assert_array_equal(got[0], exp[0])
    np.testing.assert_array_equal(got[1], exp[1])
    return exp


@pytest.mark.parametrize("radius", [2, 4, 6, 8])
def test_clustered_hashes_match_all_pairs_reference(radius):
    # key groups far larger than the plain-scan limit: component-aware linking, cross pairs
    rng = np.random.default_rng(100 + radius)
    h = np.concatenate([_clustered(1500, 6, 4, rng), _planted(500, radius, rng)])
    exp = _check_against_reference(h, radius, rng)
    assert 0 < exp[0].sum() < len(h)
    narrow = tuple(band_mask(b, radius) for b in range(radius + 1))  # huge groups
    _check_against_reference(h, radius, rng, plan=narrow)
    _check_against_reference(h, radius, rng, n_threads=2)


@pytest.mark.parametrize("radius", [3, 5, 8])
def test_large_group_paths_on_random_and_mixed_groups(radius, monkeypatch):
    # a tiny plain-scan limit sends every group through the large-group path: chaining
    # passes, then per group either all pairs (unrelated hashes) or only cross pairs
    monkeypatch.setattr(nd, "_SMALL_GROUP", 2)
    monkeypatch.setattr(nd, "_CROSS_CHUNK", 64)  # many enumeration chunks
    rng = np.random.default_rng(200 + radius)
    h = np.concatenate([_planted(1200, radius, rng), _clustered(400, 3, 3, rng)])
    plan = tuple(band_mask(b, radius) for b in range(radius + 1))
    _check_against_reference(h, radius, rng, plan=plan)
    _check_against_reference(h, radius, rng)


@pytest.mark.parametrize("radius", [1, 4, 7])
def test_wide_hashed_keys_and_numpy_fallback(radius, monkeypatch):
    # plans for far more hashes than given: keys wider than 16 bits, grouped by their 24-bit
    # hash (unrelated values may share a group; verification drops them)
    rng = np.random.default_rng(300 + radius)
    h = _planted(2000, radius, rng)
    for n in (10**6, 10**8):
        _check_against_reference(h, radius, rng, plan=index_plan(radius, n))
    monkeypatch.setattr(nd, "_torch_sort_buffers", lambda n: None)  # numpy radix passes
    for n in (10**3, 10**7):
        _check_against_reference(h, radius, rng, plan=index_plan(radius, n))


def test_hashed_keys_group_every_pair_that_agrees_on_the_mask():
    rng = np.random.default_rng(7)
    values = np.unique(rng.integers(0, 2**64, 5000, dtype=np.uint64))
    ws = nd._Workspace(values)
    for mask in (0xFFFF, 0xF0F0F0F0F0, (1 << 40) - 1, 0xFFFFFFFFFFFFFFFF):
        order, sk = nd._table_order(ws, mask)
        assert sorted(order.tolist()) == list(range(len(values)))
        # rows with equal masked bits get equal keys
        masked = values & np.uint64(mask)
        key_of = np.empty(len(values), dtype=np.int64)
        key_of[order] = sk
        _, first = np.unique(masked, return_inverse=True)
        for g in np.unique(first):
            assert len(set(key_of[first == g].tolist())) == 1


def test_radius_zero_links_equal_hashes_only():
    rng = np.random.default_rng(8)
    h = _planted(1000, 1, rng)
    _check_against_reference(h, 0, rng)


@pytest.mark.parametrize("radius", [2, 4, 6, 8])
def test_index_plan_widens_keys_as_n_grows(radius):
    # the key width follows log2 n, so the expected partners per row (n / 2**bits, on random
    # hashes) stay bounded instead of growing linearly with n
    widths = []
    for n in (10**4, 10**5, 10**6, 10**7, 10**8):
        plan = index_plan(radius, n)
        w = min(bin(k).count("1") for k in plan)
        widths.append(w)
        assert n * 2.0**-min(w, 24) < 20, (n, w)
    assert widths == sorted(widths)
    assert widths[-1] >= 24 and widths[0] < 24


@pytest.mark.parametrize("bits", [6, 9, 11, 13])
def test_group_scans_agree(bits):
    # the two in-group scans (whole sorted order / gathered members) find the same pairs
    rng = np.random.default_rng(bits)
    values = np.unique(_planted(3000, 6, rng))
    ws = nd._Workspace(values)
    order, sk = nd._table_order(ws, (1 << bits) - 1)
    eq = sk[1:] == sk[:-1]
    p = np.flatnonzero(eq)
    a1, b1, _ = nd._scan_sorted(order, eq, p, values, 6)
    member = np.zeros(len(sk), dtype=bool)
    member[p] = member[p + 1] = True
    cpos = np.flatnonzero(member)
    a2, b2, _ = nd._scan_groups(sk[cpos], order[cpos], values[order[cpos]], 6)
    pairs = lambda a, b: set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))  # noqa: E731
    want = {(i, j) for i, j in _brute_pairs(values, 6) if (values[i] ^ values[j]) & np.uint64((1 << bits) - 1) == 0}
    assert pairs(a1, b1) == pairs(a2, b2) == want


def test_mid_density_tables_match_reference():
    # 10-11 bit bands over ~1500 hashes: groups cover a good share of the rows (the whole-
    # sorted-order scan)
    rng = np.random.default_rng(55)
    h = _planted(1500, 5, rng)
    _check_against_reference(h, 5, rng, plan=tuple(band_mask(b, 5) for b in range(6)))
