"""Dedup against the synthetic pool's ground truth, and the bookkeeping every duplicate carries."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.reasons import DEDUP_REASONS
from pipeline.runner import run_pipeline
from tests.helpers import read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def dup_pool(tmp_path_factory):
    """800 samples, a tenth of them exact and a tenth near copies, so rates are measurable."""
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("dedup") / "pool"
    synthesize(str(out), samples=800, seed=21, shard_size=200,
               defect_rates={"exact_duplicate": 0.1, "near_duplicate": 0.1})
    return out


@pytest.fixture(scope="module")
def dedup_run(dup_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup") / "out"
    run_pipeline(run_config(dup_pool, out, dedup={"exact": True, "phash": True, "phash_radius": 4}))
    truth = pq.read_table(dup_pool / "truth" / "truth.parquet").to_pandas()
    meta = read_metadata(out).to_pandas().merge(
        truth[["shard", "key", "defects", "source_uid"]], on=["shard", "key"], suffixes=("", "_truth")
    )
    # A family is a clean source with its exact and near copies (truth: source_uid).
    meta["family"] = [u if pd.isna(s) else s for s, u in zip(meta.source_uid, meta.uid)]
    return out, meta


def _has(defect):
    return lambda defects: defect in list(defects)


def test_exact_duplicates_found_with_precision_and_recall_one(dedup_run):
    """Truth is the bytes: groups of equal sha256 among the samples reaching exact dedup (the
    injected copies, and also e.g. two near copies that happened to re-encode identically)."""
    _, meta = dedup_run
    copies = meta[meta.defects.map(_has("exact_duplicate"))]
    assert len(copies) >= 50
    reaching = meta[meta.drop_reason.isna() | meta.drop_reason.isin(DEDUP_REASONS - {"duplicate_uid"})]
    groups = [g for _, g in reaching.groupby("sha256") if len(g) > 1]
    assert set(copies.uid) <= set(pd.concat(groups).uid)  # every injected copy is in a group
    for group in groups:
        survivors = group[group.drop_reason != "exact_duplicate"]
        assert len(survivors) == 1  # recall: all but one dropped; precision: that one kept
        kept = survivors.uid.iloc[0]
        assert kept == min(group.uid)  # the documented rule: the smallest uid stays
        assert set(group[group.drop_reason == "exact_duplicate"].duplicate_of) == {kept}
    assert (meta.drop_reason == "exact_duplicate").sum() == sum(len(g) - 1 for g in groups)


def test_near_duplicates_match_the_truth(dedup_run):
    """Bounds: synthesis measured 96.8% of near copies within radius 4 of their source when hashed
    from draft-decoded images (crop copies are the hard case), and no distinct clean pair of a
    tight concept within radius 4 in 12,521 pairs. With ~80 near copies in this pool, recall >= 0.9
    allows twice the measured miss rate; precision >= 0.95 allows four false links."""
    _, meta = dedup_run
    reaching = meta[meta.drop_reason.isna() | (meta.drop_reason == "near_duplicate")]
    # a component is named by its kept member: itself, or the uid its drop points at
    rep = {u: (d if r == "near_duplicate" else u) for u, r, d in zip(reaching.uid, reaching.drop_reason, reaching.duplicate_of)}
    families = reaching.groupby("family").uid.apply(list)
    near = reaching[reaching.defects.map(_has("near_duplicate"))]
    pairs = [(c, [x for x in families[f] if x != c]) for c, f in zip(near.uid, near.family)]
    pairs = [(c, others) for c, others in pairs if others]  # a relative also reached pHash dedup
    linked = [c for c, others in pairs if any(rep[c] == rep[x] for x in others)]
    assert len(pairs) >= 50
    assert len(linked) / len(pairs) >= 0.9
    by_uid = meta.set_index("uid")
    dropped = meta[meta.drop_reason == "near_duplicate"]
    same_family = dropped.family.values == by_uid.loc[dropped.duplicate_of, "family"].values
    assert same_family.mean() >= 0.95
    assert (dropped.phash_distance >= 0).all() and dropped.phash_distance.notna().all()


def test_every_duplicate_chain_ends_at_a_sample_that_survived_dedup(dedup_run):
    _, meta = dedup_run
    by_uid = meta[meta.drop_reason != "duplicate_uid"].set_index("uid")
    duplicates = meta[meta.drop_reason.isin(DEDUP_REASONS - {"duplicate_uid"})]
    assert len(duplicates) > 0
    for uid in duplicates.uid:
        seen = set()
        while by_uid.loc[uid, "drop_reason"] in DEDUP_REASONS:
            assert uid not in seen, "duplicate_of forms a cycle"
            seen.add(uid)
            uid = by_uid.loc[uid, "duplicate_of"]
        assert by_uid.loc[uid, "drop_reason"] not in DEDUP_REASONS
    assert meta[~meta.drop_reason.isin(DEDUP_REASONS)].duplicate_of.isna().all()


def test_dedup_kinds_and_radius_are_config(dup_pool, tmp_path, dedup_run):
    _, meta = dedup_run
    out = tmp_path / "off"
    summary = run_pipeline(run_config(dup_pool, out, dedup={"exact": False, "phash": False}))
    assert "exact_duplicate" not in summary.dropped and "near_duplicate" not in summary.dropped
    wide = run_pipeline(run_config(dup_pool, tmp_path / "wide", dedup={"phash_radius": 10}))
    assert wide.dropped["near_duplicate"] >= (meta.drop_reason == "near_duplicate").sum()


def test_semantic_dedup_drops_point_inside_their_cluster(synth_pool, tmp_path):
    out = tmp_path / "sem"
    run_pipeline(run_config(
        synth_pool, out, embed={"model": "curate-vit-tiny-64"},
        dedup={"semantic": True, "semantic_eps": 0.001}, cluster={"k": 6},
    ))
    meta = read_metadata(out).to_pandas().set_index("uid")
    semantic = meta[meta.drop_reason == "semantic_duplicate"]
    assert len(semantic) > 0
    assert (semantic.cluster.values == meta.loc[semantic.duplicate_of, "cluster"].values).all()
    assert (semantic.duplicate_similarity > 1 - 0.001).all()
    # SemDeDup keeps the members farthest from the centroid: a sample is never dropped in favour
    # of one nearer to the centroid
    assert (semantic.dist_to_centroid.values <= meta.loc[semantic.duplicate_of, "dist_to_centroid"].values).all()
    clusters = pq.read_table(out / "clusters" / "dedup.parquet").to_pandas()
    assert len(clusters) == 6 and clusters["size"].sum() == meta.cluster.notna().sum()
    assert (out / "clusters" / "dedup_centroids.npy").exists()
    centroids = np.load(out / "clusters" / "dedup_centroids.npy")
    assert centroids.shape[0] == 6 and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
