"""Spherical k-means training determinism and exact, batch-independent assignment."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.algorithms.kmeans import assign_to_centroids, train_sample, train_spherical_kmeans


def _data(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    x = centers[rng.integers(0, k, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(autouse=True)
def _restore_faiss_threads():
    import faiss

    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def test_same_seed_same_centroids_across_runs_and_thread_counts():
    import faiss

    x = _data(6000, 48, 20, 0)
    runs = []
    for threads in (1, 2, 1, 2):
        faiss.omp_set_num_threads(threads)
        runs.append(train_spherical_kmeans(x, 20, niter=12, seed=5, max_train_points=5000))
    for c in runs[1:]:
        np.testing.assert_array_equal(c, runs[0])
    # pinning the training threads gives the same bits too
    pinned = train_spherical_kmeans(x, 20, niter=12, seed=5, max_train_points=5000, train_threads=1)
    np.testing.assert_array_equal(pinned, runs[0])
    other = train_spherical_kmeans(x, 20, niter=12, seed=6, max_train_points=5000)
    assert not np.array_equal(other, runs[0])


def test_centroids_are_unit_norm_and_shaped():
    x = _data(3000, 32, 8, 1)
    c = train_spherical_kmeans(x, 8, niter=10, seed=0, max_train_points=10_000)
    assert c.shape == (8, 32) and c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-6)


def test_training_sample_is_seeded_and_bounded():
    a = train_sample(10_000, 1000, 3)
    assert len(a) == 1000 and len(np.unique(a)) == 1000 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, train_sample(10_000, 1000, 3))
    assert not np.array_equal(a, train_sample(10_000, 1000, 4))
    np.testing.assert_array_equal(train_sample(50, 1000, 3), np.arange(50))


def test_k_larger_than_the_sample_is_an_error():
    x = _data(100, 8, 4, 2)
    with pytest.raises(ValueError, match="exceeds the training sample"):
        train_spherical_kmeans(x, 60, niter=5, seed=0, max_train_points=50)
    train_spherical_kmeans(x, 50, niter=5, seed=0, max_train_points=50)  # k == sample is fine


def test_assignment_matches_numpy_and_reports_cosine_distance():
    x = _data(5000, 40, 12, 3)
    c = train_spherical_kmeans(x, 12, niter=10, seed=1, max_train_points=5000)
    cluster, dist = assign_to_centroids(x, c)
    assert cluster.dtype == np.int32 and dist.dtype == np.float32
    sim = x.astype(np.float64) @ c.astype(np.float64).T
    top2 = np.sort(sim, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(cluster[clear], sim.argmax(axis=1)[clear])
    np.testing.assert_allclose(dist, 1.0 - sim[np.arange(len(x)), cluster], atol=1e-6)
    # the chosen centroid is never worse than numpy's pick
    assert (sim[np.arange(len(x)), cluster] >= sim.max(axis=1) - 1e-6).all()


def test_assignment_does_not_depend_on_batching_and_breaks_ties_low():
    import faiss

    x = _data(700, 24, 6, 4)
    c = train_spherical_kmeans(x, 6, niter=8, seed=0, max_train_points=700)
    full = assign_to_centroids(x, c)
    singles = [assign_to_centroids(x[i : i + 1], c) for i in range(0, 700, 7)]
    np.testing.assert_array_equal(full[0][::7], np.concatenate([s[0] for s in singles]))
    np.testing.assert_array_equal(full[1][::7], np.concatenate([s[1] for s in singles]))
    faiss.omp_set_num_threads(1)
    one_thread = assign_to_centroids(x, c)
    np.testing.assert_array_equal(one_thread[0], full[0])
    np.testing.assert_array_equal(one_thread[1], full[1])
    # duplicated centroids: exact ties go to the lowest index
    doubled = np.concatenate([c, c])
    again = assign_to_centroids(x, doubled)
    np.testing.assert_array_equal(again[0], full[0])
    np.testing.assert_array_equal(again[1], full[1])
    empty = assign_to_centroids(np.zeros((0, 24), np.float32), c)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
