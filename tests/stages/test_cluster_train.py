"""The dedup clustering's k follows the samples to cluster, not the capped training sample."""

import numpy as np

from pipeline.stages import cluster
from pipeline.stages.training_sample import vectors_table
from tests.helpers import run_config


def _sample(n: int, dim: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_k_is_one_per_samples_per_cluster_of_the_eligible_samples(tmp_path):
    config = run_config(tmp_path / "in", tmp_path / "out", cluster={"samples_per_cluster": 100, "max_train_points": 400})
    url = str(tmp_path / "centroids.npy")
    # 2,000 samples to cluster, 400 of them sampled for training: 20 clusters, not 4
    result = cluster.train(config, url, 2000, vectors_table(_sample(400)))
    assert result == {"k": 20, "trained_on": 400}
    assert cluster.load_centroids(url).shape == (20, 8)


def test_k_is_capped_at_the_training_sample(tmp_path):
    config = run_config(tmp_path / "in", tmp_path / "out", cluster={"samples_per_cluster": 10})
    result = cluster.train(config, str(tmp_path / "c.npy"), 100_000, vectors_table(_sample(50)))
    assert result == {"k": 50, "trained_on": 50}
