"""What SemDeDup and DBP do to a synthetic pool, measured against its ground truth, with the
project's trained model (pipeline/assets) as embedder: the properties the papers rely on."""

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.runner import run_pipeline
from tests.helpers import read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")
ROOT = Path(__file__).resolve().parents[2]
MODEL = {"model": "curate-dfn-rn16-64", "pretrained": str(ROOT / "pipeline/assets/curate-dfn-rn16-64.safetensors")}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """1,500 samples, a tenth of them exact and a tenth near copies of clean ones."""
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("quality") / "pool"
    synthesize(str(out), samples=1500, seed=77, shard_size=500,
               defect_rates={"exact_duplicate": 0.1, "near_duplicate": 0.1})
    return out


def _joined(out, pool):
    truth = pq.read_table(pool / "truth" / "truth.parquet").to_pandas()
    meta = read_metadata(out).to_pandas().merge(
        truth[["shard", "key", "concept_id", "spread", "source_uid"]], on=["shard", "key"])
    meta["family"] = [u if pd.isna(s) else s for s, u in zip(meta.source_uid, meta.uid)]
    return meta


def test_semdedup_alone_finds_the_copies(pool, tmp_path):
    """Exact and pHash dedup off, so the copies are SemDeDup's to find. Measured with this model on
    a held-out pool: 99.1% of copy pairs have cosine > 0.995 (eps = 0.005), while pairs of
    different concepts exceed it at a rate of 2e-6. Bounds: >= 90% of copy families end with at
    most one member; >= 98% of the drops point at a sample of the same concept."""
    out = tmp_path / "out"
    run_pipeline(run_config(pool, out, embed=MODEL, cluster={"samples_per_cluster": 150},
                            dedup={"exact": False, "phash": False, "semantic": True, "semantic_eps": 0.005}))
    meta = _joined(out, pool)
    reaching = meta[meta.drop_reason.isna() | (meta.drop_reason == "semantic_duplicate")]
    families = reaching.groupby("family")
    copied = [g for _, g in families if len(g) > 1]
    assert len(copied) >= 100
    # at most one member survives (none, when all of them duplicate an earlier sample of the concept)
    collapsed = sum((g.drop_reason != "semantic_duplicate").sum() <= 1 for g in copied)
    assert collapsed / len(copied) >= 0.9
    drops = meta[meta.drop_reason == "semantic_duplicate"]
    concept_of = meta.set_index("uid").concept_id
    same_concept = (drops.concept_id.values == concept_of.loc[drops.duplicate_of].values).mean()
    assert same_concept >= 0.98
    assert (drops.duplicate_similarity > 0.995).all()


def test_dbp_prunes_tight_repetitive_concepts_harder_than_varied_ones(pool, tmp_path):
    """Measured on a held-out pool at target 0.5, k=20: 71% of the tight concepts' samples pruned,
    9% of the varied ones'. Bound: tight share exceeds varied share by at least 0.25."""
    out = tmp_path / "out"
    summary = run_pipeline(run_config(pool, out, embed=MODEL,
                                      select={"dbp": {"enabled": True, "target": 0.5, "k": 20}}))
    meta = _joined(out, pool)
    entered = meta[meta.dbp_cluster.notna()]
    assert summary.kept == len(entered) // 2  # the target, exactly
    share = lambda rows: (rows.drop_reason == "dbp_pruned").mean()
    tight, varied = entered[entered.spread < 0.1], entered[entered.spread >= 0.9]
    assert len(tight) >= 100 and len(varied) >= 50
    assert share(tight) - share(varied) >= 0.25
