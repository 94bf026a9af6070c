"""Selection: score cuts, DBP to an exact target, the SQL predicate, and their fixed order.

Scores and clusters here come from a small random-weight model: these tests are about the
bookkeeping and the exactness of the rules, not about what a good model would keep.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import UserError
from pipeline.runner import run_pipeline
from tests.helpers import read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")
TINY = {"model": "curate-vit-tiny-64"}


@pytest.fixture(scope="module")
def base(synth_pool, tmp_path_factory):
    """One embedded run; each test reruns it with its own select settings, which redoes only
    select, metadata and write (ingest, embed and dedup are skipped as unchanged)."""
    out = tmp_path_factory.mktemp("select") / "run"
    run_pipeline(run_config(synth_pool, out, embed=TINY, dfn=TINY))
    return lambda select: (out, run_pipeline(run_config(synth_pool, out, embed=TINY, dfn=TINY, select=select)))


@pytest.fixture(scope="module")
def resharded_pool(tmp_path_factory):
    """The same samples (same uids and bytes) in 2 shards instead of 4."""
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("select") / "pool"
    synthesize(str(out), samples=600, seed=7, shard_size=300)
    return out


def _entering(meta, step_reasons):
    """Samples that reached a step: kept, or dropped by it or by a later step."""
    return meta[meta.drop_reason.isna() | meta.drop_reason.isin(step_reasons)]


def test_fraction_cut_is_a_global_sort_independent_of_partitioning(base, resharded_pool, tmp_path):
    kept = {}
    for name in ("four", "two"):
        if name == "four":
            out, summary = base({"clip": {"fraction": 0.3}})
        else:
            out = tmp_path / name
            summary = run_pipeline(run_config(resharded_pool, out, embed=TINY, dfn=TINY, select={"clip": {"fraction": 0.3}}))
        meta = read_metadata(out).to_pandas()
        entering = _entering(meta, {"clip_score"})
        # the rule itself: sort everything that reached the cut by score desc, uid asc; keep floor(f*N)
        order = entering.sort_values(["clip_score", "uid"], ascending=[False, True])
        expected = set(order.uid.iloc[: int(np.floor(0.3 * len(entering)))])
        assert set(meta[meta.kept].uid) == expected
        kept[name] = expected
    assert kept["four"] == kept["two"]


def test_threshold_cut_keeps_scores_at_or_above(base):
    out, summary = base({"dfn": {"threshold": 0.0}})
    assert summary.stages["embed"]["skipped"] and summary.stages["dedup"]["skipped"]
    meta = read_metadata(out).to_pandas()
    entering = _entering(meta, {"dfn_score"})
    kept = set(entering[entering.dfn_score >= 0.0].uid)
    assert set(meta[meta.kept].uid) == kept and 0 < len(kept) < len(entering)
    assert (meta[meta.drop_reason == "dfn_score"].dfn_score < 0.0).all()


@pytest.mark.parametrize("target", [150, 0.4])
def test_dbp_keeps_exactly_the_target_hardest_first(base, target):
    out, summary = base({"dbp": {"enabled": True, "target": target, "k": 8}})
    meta = read_metadata(out).to_pandas()
    entering = _entering(meta, {"dbp_pruned"})
    expected = target if isinstance(target, int) else int(np.floor(target * len(entering)))
    assert summary.kept == expected == meta.kept.sum()
    clusters = pq.read_table(out / "clusters" / "dbp.parquet").to_pandas()
    assert clusters.quota.sum() == expected and (clusters.kept == clusters.quota).all()
    assert (clusters["size"] == entering.groupby("dbp_cluster").size().reindex(clusters.cluster, fill_value=0).values).all()
    assert entering.dbp_cluster.notna().all()
    for cluster, members in entering.groupby("dbp_cluster"):
        kept, pruned = members[members.kept], members[~members.kept]
        if len(kept) and len(pruned):  # kept samples are the farthest from the centroid
            assert kept.dbp_dist_to_centroid.min() >= pruned.dbp_dist_to_centroid.max()
    assert meta[~meta.uid.isin(entering.uid)].dbp_cluster.isna().all()


def test_sql_predicate_is_the_last_step(base):
    where = "caption_words >= 9 and width > 250"
    out, _ = base({"clip": {"fraction": 0.8}, "where": where})
    meta = read_metadata(out).to_pandas()
    entering = _entering(meta, {"sql_filter"})
    passing = entering[(entering.caption_words >= 9) & (entering.width > 250)]
    assert set(meta[meta.kept].uid) == set(passing.uid)
    assert (meta.drop_reason == "sql_filter").sum() == len(entering) - len(passing) > 0
    # a sample failing the clip cut and the predicate is reported with the earlier step
    failed_both = meta[(meta.drop_reason == "clip_score") & ((meta.caption_words < 9) | (meta.width <= 250))]
    assert len(failed_both) > 0


def test_a_bad_predicate_fails_before_any_work(synth_pool, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no_such_column"):
        run_pipeline(run_config(synth_pool, out, select={"where": "no_such_column > 3"}))
    assert not out.exists()


@pytest.mark.parametrize("where", [
    "clip_score > (select avg(clip_score) from samples)",
    "uid in (select uid from samples order by clip_score desc limit 10)",
    "avg(clip_score) > 0.2",
    "row_number() over (order by clip_score) < 10",
])
def test_a_predicate_over_the_whole_pool_is_refused_before_any_work(synth_pool, tmp_path, where):
    """select.where runs one partition at a time: a subquery, an aggregate or a window would
    silently mean something else there, so each is refused at start, naming the key."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match="select.where"):
        run_pipeline(run_config(synth_pool, out, select={"where": where}))
    assert not out.exists()


def test_steps_without_their_inputs_are_rejected_at_load():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="select.dbp: requires image embeddings"):
        load_config(None, ["input=a", "output=b", "select.dbp.enabled=true"])
    with pytest.raises(ConfigError, match="select.dfn needs a DFN scorer"):
        load_config(None, ["input=a", "output=b", "embed.model=x", "select.dfn.fraction=0.5"])
    with pytest.raises(ConfigError, match="threshold or fraction, not both"):
        load_config(None, ["input=a", "output=b", "embed.model=x", "select.clip.fraction=0.5", "select.clip.threshold=0.2"])
