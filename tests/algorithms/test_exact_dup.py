"""Exact duplicates by sha256: smallest uid kept, others point at its row."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.algorithms.exact_dup import exact_duplicates


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_groups_keep_the_smallest_uid():
    sha = [_sha(b"x"), _sha(b"y"), _sha(b"x"), _sha(b"z"), _sha(b"x"), _sha(b"y")]
    uids = ["u5", "u2", "u1", "u9", "u3", "u0"]
    dropped, dup = exact_duplicates(sha, uids)
    # x: rows 0, 2, 4 -> uid u1 (row 2) kept; y: rows 1, 5 -> uid u0 (row 5) kept
    assert dropped.tolist() == [True, True, False, False, True, False]
    assert dup.tolist() == [2, 5, -1, -1, 2, -1]
    assert dup.dtype == np.int64


def test_missing_digests_never_match_and_case_is_ignored():
    s = _sha(b"a")
    sha = np.array([s, None, "", s.upper(), None, np.nan], dtype=object)
    dropped, dup = exact_duplicates(sha, ["b", "c", "d", "a", "e", "f"])
    assert dropped.tolist() == [True, False, False, False, False, False]
    assert dup.tolist() == [3, -1, -1, -1, -1, -1]


def test_empty_and_all_distinct():
    d, p = exact_duplicates([], [])
    assert d.tolist() == [] and p.tolist() == []
    d, p = exact_duplicates([_sha(bytes([i])) for i in range(50)], [str(i) for i in range(50)])
    assert not d.any() and (p == -1).all()


def test_random_against_dict_reference():
    rng = np.random.default_rng(0)
    n = 5000
    sha = np.array([_sha(bytes([int(v) % 256, int(v) // 256])) for v in rng.integers(0, 1500, n)])
    uids = np.array([f"{i:032x}" for i in rng.permutation(n)])
    dropped, dup = exact_duplicates(sha, uids)
    best: dict[str, int] = {}
    for i, s in enumerate(sha):
        if s not in best or uids[i] < uids[best[s]]:
            best[s] = i
    exp_dup = np.array([-1 if best[s] == i else best[s] for i, s in enumerate(sha)])
    np.testing.assert_array_equal(dup, exp_dup)
    np.testing.assert_array_equal(dropped, exp_dup >= 0)


def test_length_mismatch():
    with pytest.raises(ValueError):
        exact_duplicates([_sha(b"a")], ["a", "b"])
