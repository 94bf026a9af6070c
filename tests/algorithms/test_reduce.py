"""Reduced dimensions: Matryoshka truncation and PCA, each renormalised, row by row."""

import numpy as np
import pytest

from pipeline.algorithms.reduce import fit_pca, project, reduce, truncate, unit_rows


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_truncation_keeps_the_first_d_coordinates_renormalised():
    x = _unit(50, 16)
    y = truncate(x, 5)
    assert y.shape == (50, 5) and y.dtype == np.float32
    expected = x[:, :5] / np.linalg.norm(x[:, :5].astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-6)
    # same direction as the prefix: a positive multiple of it
    assert (np.einsum("ij,ij->i", y, x[:, :5]) > 0).all()


def test_truncation_to_the_full_width_changes_nothing():
    x = _unit(20, 8).astype(np.float16).astype(np.float32)  # stored embeddings: not exactly unit length
    assert truncate(x, 8) is x or np.array_equal(truncate(x, 8), x)
    assert np.array_equal(reduce(x, None), x) and np.array_equal(reduce(x, 8), x)


def test_truncation_of_a_hand_made_row():
    y = truncate(np.array([[3.0, 4.0, 12.0]], np.float32), 2)
    np.testing.assert_array_equal(y, np.array([[0.6, 0.8]], np.float32))


def test_a_zero_prefix_stays_zero_instead_of_nan():
    y = truncate(np.array([[0.0, 0.0, 1.0]], np.float32), 2)
    assert np.array_equal(y, np.zeros((1, 2), np.float32))


def test_truncating_more_than_the_width_is_refused():
    with pytest.raises(ValueError, match="cannot keep 9 of 8"):
        truncate(_unit(3, 8), 9)


def test_a_row_reduces_the_same_in_any_batch():
    x = _unit(3000, 64, seed=1)
    projection = fit_pca(x, 12)
    for reduced in (lambda rows: truncate(rows, 12), lambda rows: project(rows, projection)):
        whole = reduced(x)
        assert np.array_equal(np.concatenate([reduced(x[:7]), reduced(x[7:1001]), reduced(x[1001:])]), whole)
        assert np.array_equal(reduced(x[[2999, 5, 17]]), whole[[2999, 5, 17]])


@pytest.mark.parametrize("centre", [False, True])
def test_pca_finds_the_directions_of_largest_spread_and_is_deterministic(centre):
    rng = np.random.default_rng(2)
    scales = np.array([10.0, 5.0, 2.0] + [0.1] * 7)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    x = (rng.normal(size=(4000, 10)) * scales) @ basis.T + (0.5 * basis[:, 9] if centre else 0.0)
    components = fit_pca(x, 3, centre=centre)
    assert components.shape == (3, 10) and components.dtype == np.float64
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-7)  # on the 2**-26 grid
    # each component is one of the planted axes (up to sign), in order of spread
    np.testing.assert_allclose(np.abs(components @ basis[:, :3]), np.eye(3), atol=0.02)
    assert np.array_equal(fit_pca(x, 3, centre=centre), components)
    # signs are fixed: each component's largest-magnitude coordinate is positive
    assert (components[np.arange(3), np.argmax(np.abs(components), axis=1)] > 0).all()


def test_uncentred_pca_takes_the_direction_every_row_shares():
    rng = np.random.default_rng(5)
    x = np.array([0.0, 0.0, 3.0]) + rng.normal(size=(2000, 3)) * [1.0, 0.5, 0.1]
    assert np.argmax(np.abs(fit_pca(x, 1)[0])) == 2  # the common offset: cosines go through the origin
    assert np.argmax(np.abs(fit_pca(x, 1, centre=True)[0])) == 0  # about the mean: the widest spread


def test_projection_is_projected_and_renormalised():
    x = _unit(500, 12, seed=3)
    projection = fit_pca(x, 4)
    y = project(x, projection)
    expected = x.astype(np.float64) @ projection.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(reduce(x, 4, "pca", projection), y)


def test_the_projection_is_exact_whatever_order_its_sums_take():
    x = _unit(2000, 96, seed=6).astype(np.float16).astype(np.float32)  # stored embeddings
    projection = fit_pca(x, 8)
    assert np.array_equal(np.round(projection * 2.0**26) / 2.0**26, projection)
    y = project(x, projection)
    x64 = x.astype(np.float64)
    reversed_order = x64[:, ::-1] @ np.ascontiguousarray(projection[:, ::-1].T)
    one_by_one = np.zeros((len(x), 8))
    for i in range(96):
        one_by_one += x64[:, i : i + 1] * projection[:, i]
    assert np.array_equal(unit_rows(reversed_order), y) and np.array_equal(unit_rows(one_by_one), y)


def test_a_projection_off_its_grid_is_refused():
    with pytest.raises(ValueError, match="grid"):
        project(_unit(3, 4), np.full((1, 4), 0.1))


def test_unit_rows_matches_numpy():
    x = np.random.default_rng(4).normal(size=(100, 33))
    np.testing.assert_allclose(unit_rows(x), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)


def test_pca_needs_its_projection_and_a_known_method():
    with pytest.raises(ValueError, match="projection"):
        reduce(_unit(3, 4), 2, "pca")
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce(_unit(3, 4), 2, "svd")
