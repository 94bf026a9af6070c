"""Reduced dimensions in a run: cluster.dims / select.dbp.dims (truncate or pca) and embed.store_dims.

The embedder is the small random-weight model (64-d embeddings): these tests are about the
bookkeeping of the reduction (the same space everywhere, resumes, errors), not the quality of
what a reduced run keeps (benchmarks/reduced_dims.py measures that).
"""

import glob

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.algorithms.kmeans import assign_to_centroids
from pipeline.algorithms.reduce import project, truncate
from pipeline.config import ConfigError, UserError, load_config
from pipeline.io.embeddings import read_vectors
from pipeline.runner import run_pipeline
from pipeline.stages.reduction import ReductionError, Space
from tests.helpers import read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")
TINY = {"model": "curate-vit-tiny-64"}
FULL = 64
COLUMNS = ["uid", "kept", "drop_reason", "duplicate_of", "cluster", "dist_to_centroid", "dbp_cluster", "dbp_dist_to_centroid"]


def _settings(cluster=None, dbp=None, embed=None):
    return dict(
        embed={**TINY, **(embed or {})},
        dedup={"semantic": True, "semantic_eps": 0.001},
        cluster={"k": 6, **(cluster or {})},
        select={"dbp": {"enabled": True, "target": 0.5, "k": 8, **(dbp or {})}},
    )


def _columns(out):
    return read_metadata(out).select(COLUMNS).sort_by("uid")


def _embeddings(out):
    """(present, matrix) of every partition's stored image embeddings, in partition order."""
    parts = [read_vectors(url) for url in sorted(glob.glob(str(out / "embeddings" / "part-*.parquet")))]
    return np.concatenate([p for p, _ in parts]), np.concatenate([m for _, m in parts])


@pytest.fixture(scope="module")
def full(synth_pool, tmp_path_factory):
    """One full-dimension run; its output is rerun by the tests with reduced settings."""
    out = tmp_path_factory.mktemp("dims") / "run"
    run_pipeline(run_config(synth_pool, out, **_settings()))
    return out, _columns(out)


def test_dims_equal_to_the_full_width_give_exactly_the_full_run(synth_pool, full):
    out, columns = full
    summary = run_pipeline(run_config(synth_pool, out, **_settings({"dims": FULL}, {"dims": FULL})))
    assert summary.stages["embed"]["skipped"] and not summary.stages["cluster"]["skipped"]
    assert _columns(out).equals(columns)
    assert (columns.column("drop_reason").to_numpy(zero_copy_only=False) == "semantic_duplicate").sum() > 0


def test_truncated_runs_rerun_what_reads_the_clusters_and_apply_the_same_space(synth_pool, full, tmp_path):
    out, _ = full
    summary = run_pipeline(run_config(synth_pool, out, **_settings({"dims": 16})))
    stages = summary.stages
    assert stages["embed"]["skipped"] and not stages["cluster"]["skipped"] and not stages["dedup"]["skipped"]
    assert not stages["select"]["skipped"]  # it reads the clusters' metadata
    centroids = np.load(out / "clusters" / "dedup_centroids.npy")
    assert centroids.shape == (6, 16)
    assert not (out / "clusters" / "dedup_centroids.pca.npy").exists()
    present, matrix = _embeddings(out)
    cluster, dist = assign_to_centroids(truncate(matrix, 16), centroids)
    meta = read_metadata(out).to_pandas()
    assert np.array_equal(meta.cluster.to_numpy()[present], cluster)
    assert np.array_equal(meta.dist_to_centroid.to_numpy()[present].astype(np.float32), dist)
    # SemDeDup compares in the clusters' space: the recorded similarity is the truncated cosine
    sem = meta[meta.drop_reason == "semantic_duplicate"]
    if len(sem):
        by_uid = dict(zip(meta.uid[present], truncate(matrix, 16)))
        cos = [float(np.dot(by_uid[a], by_uid[b])) for a, b in zip(sem.uid, sem.duplicate_of)]
        np.testing.assert_allclose(cos, sem.duplicate_similarity, atol=1e-5)
    # DBP alone changed: select re-runs, the dedup clustering does not
    again = run_pipeline(run_config(synth_pool, out, **_settings({"dims": 16}, {"dims": 24})))
    assert again.stages["cluster"]["skipped"] and again.stages["dedup"]["skipped"] and not again.stages["select"]["skipped"]
    assert np.load(out / "clusters" / "dbp_centroids.npy").shape[1] == 24


def test_pca_is_fitted_once_saved_beside_the_centroids_and_applied_at_assignment(synth_pool, full, tmp_path):
    out, _ = full
    settings = _settings({"dims": 12, "reduce": "pca"}, {"dims": 10, "reduce": "pca"})
    run_pipeline(run_config(synth_pool, out, **settings))
    present, matrix = _embeddings(out)
    meta = read_metadata(out).to_pandas()
    for name, column, dims in (("dedup", "cluster", 12), ("dbp", "dbp_cluster", 10)):
        projection = np.load(out / "clusters" / f"{name}_centroids.pca.npy")
        centroids = np.load(out / "clusters" / f"{name}_centroids.npy")
        assert projection.shape == (dims, FULL) and centroids.shape[1] == dims
        np.testing.assert_allclose(projection @ projection.T, np.eye(dims), atol=1e-7)
        rows = present & meta[column].notna().to_numpy()
        cluster, _ = assign_to_centroids(project(matrix[rows[present]], projection), centroids)
        assert np.array_equal(meta[column].to_numpy()[rows].astype(np.int32), cluster)
    # the same input and config again, from scratch: the same bytes
    second = tmp_path / "second"
    run_pipeline(run_config(synth_pool, second, **settings))
    for name in ("dedup_centroids.pca.npy", "dedup_centroids.npy", "dbp_centroids.pca.npy", "dbp_centroids.npy"):
        assert (second / "clusters" / name).read_bytes() == (out / "clusters" / name).read_bytes()
    for part in sorted((out / "metadata").glob("part-*.parquet")):
        assert (second / "metadata" / part.name).read_bytes() == part.read_bytes()


def test_a_top_up_applies_the_reference_runs_projection(synth_pool, full, tmp_path):
    from pipeline.synth import synthesize

    reference, _ = full
    settings = _settings({"dims": 12, "reduce": "pca"}, {"dims": 10, "reduce": "pca"})
    run_pipeline(run_config(synth_pool, reference, **settings))
    day2 = tmp_path / "day2"
    synthesize(str(day2), samples=150, seed=8, shard_size=150)
    pool = [str(synth_pool), str(day2)]  # the reference saw the first: only day 2's shard is new
    out = tmp_path / "topup"
    with pytest.raises(UserError, match="trained in a PCA space"):
        run_pipeline(run_config(synth_pool, tmp_path / "bad", reference=str(reference), input=pool, **_settings({"dims": 12})))
    summary = run_pipeline(run_config(synth_pool, out, reference=str(reference), input=pool, **settings))
    assert summary.samples == 150
    for name in ("dedup_centroids.pca.npy", "dbp_centroids.pca.npy"):
        assert (out / "clusters" / name).read_bytes() == (reference / "clusters" / name).read_bytes()
    present, matrix = _embeddings(out)
    meta = read_metadata(out).to_pandas()
    projection = np.load(reference / "clusters" / "dedup_centroids.pca.npy")
    cluster, _ = assign_to_centroids(project(matrix, projection), np.load(reference / "clusters" / "dedup_centroids.npy"))
    assert np.array_equal(meta.cluster.to_numpy()[present].astype(np.int32), cluster)


def test_store_dims_keeps_the_first_dimensions_and_scores_from_the_full_embedding(synth_pool, full, tmp_path):
    reference, _ = full
    out = tmp_path / "stored"
    run_pipeline(run_config(synth_pool, out, **_settings({"dims": 16}, {"dims": 8}, {"store_dims": 16})))
    part = sorted((out / "embeddings").glob("part-*.parquet"))[0]
    schema = pq.read_schema(part)
    assert schema.field("image_embedding").type.list_size == 16 and schema.field("text_embedding").type.list_size == 16
    present, stored = _embeddings(out)
    full_present, whole = _embeddings(reference)
    assert np.array_equal(present, full_present)
    np.testing.assert_allclose(stored, truncate(whole, 16), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)
    scores = pq.read_table(part, columns=["clip_score"]).column("clip_score")
    full_scores = pq.read_table(reference / "embeddings" / part.name, columns=["clip_score"]).column("clip_score")
    assert scores.equals(full_scores)
    assert np.load(out / "clusters" / "dedup_centroids.npy").shape[1] == 16


def test_asking_for_more_dimensions_than_stored_or_embedded_fails_before_any_work(synth_pool, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {synth_pool}\noutput: {tmp_path / 'a'}\nembed: {{model: curate-vit-tiny-64, store_dims: 16}}\n")
    with pytest.raises(ConfigError, match=r"cluster.dims=32 exceeds embed.store_dims=16"):
        load_config(str(job), ["cluster.dims=32"])
    with pytest.raises(ConfigError, match=r"select.dbp.dims=20 exceeds embed.store_dims=16"):
        load_config(str(job), ["select.dbp.dims=20"])
    with pytest.raises(ConfigError, match=r"override cluster.reduce=pca: cluster: reduce pca needs dims"):
        load_config(str(job), ["cluster.reduce=pca"])
    for options, name in (({"cluster": {"dims": 65}}, "cluster.dims=65"), ({"embed": {"store_dims": 100}}, "embed.store_dims=100"),
                          ({"dbp": {"dims": 128}}, "select.dbp.dims=128")):
        with pytest.raises(UserError, match=f"{name} exceeds the 64-d embeddings of embed.model curate-vit-tiny-64"):
            run_pipeline(run_config(synth_pool, tmp_path / name, **_settings(**options)))
        assert not (tmp_path / name / "embeddings").exists()


def test_a_consumer_cannot_ask_for_more_dimensions_than_the_embeddings_hold(tmp_path):
    space = Space("cluster", 32, "truncate", str(tmp_path / "dedup_centroids.npy"))
    space.check(32, "the stored image embeddings")
    with pytest.raises(ReductionError, match=r"cluster.dims=32: the stored image embeddings hold 16 dimensions"):
        space.check(16, "the stored image embeddings")
    with pytest.raises(ReductionError, match="cluster.dims=32"):
        space.apply(np.ones((3, 16), np.float32) / 4)
    centroids = np.ones((4, 16), np.float32)
    with pytest.raises(ReductionError, match="are 16-d, but cluster.dims=32 gives 32-d"):
        space.check_centroids(centroids, 64, str(tmp_path / "given.npy"))


def test_fingerprints_leave_out_the_reduction_at_its_defaults(tmp_path):
    from pipeline.stages import cluster, embed, select

    plain = run_config(tmp_path / "in", tmp_path / "o", **_settings())
    assert "dims" not in cluster.config_fingerprint(plain)["cluster"]
    assert "dims" not in select.config_fingerprint(plain)["select"]["dbp"]
    assert "store_dims" not in embed.config_fingerprint(plain)["embed"]
    reduced = run_config(tmp_path / "in", tmp_path / "o", **_settings({"dims": 8}, {"dims": 8}, {"store_dims": 32}))
    assert cluster.config_fingerprint(reduced)["cluster"]["dims"] == 8
    assert select.config_fingerprint(reduced)["select"]["dbp"]["dims"] == 8
    assert embed.config_fingerprint(reduced)["embed"]["store_dims"] == 32
