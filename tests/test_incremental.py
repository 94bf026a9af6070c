"""Scheduled incremental runs: day 2 processes only new shards, deduplicates them against what day 1
published, and tops up day 1's DBP clusters; day 3 with nothing new is a valid empty run."""

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.runner import run_pipeline
from tests.helpers import make_tar, read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")
TINY = {"model": "curate-vit-tiny-64"}
CAPTION = "a photo of a shape on a background, seen again on a later day"


def _settings(**dedup):
    return dict(
        embed=TINY,
        dedup={"exact": True, "phash": True, "phash_radius": 4, "semantic": False, **dedup},
        cluster={"k": 4},
        select={"dbp": {"enabled": True, "target": 0.5, "k": 6}},
    )


def _copies_of(day1_out, pool, n, kind, offset=0):
    """Members for new samples that copy n of day 1's kept samples (exact bytes or re-encoded)."""
    meta = read_metadata(day1_out).to_pandas()
    kept = meta[meta.kept].sort_values("uid").iloc[offset : offset + n]
    members, sources = [], {}
    for i, row in enumerate(kept.itertuples()):
        with open(pool / row.shard, "rb") as shard:
            shard.seek(row.image_offset)
            data = shard.read(row.image_size)
        if kind == "near":
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=93)
            data = buffer.getvalue()
        key = f"{kind}{i:04d}"
        uid = f"{i:04x}{kind[0]:0>4}".encode().hex()[:32].ljust(32, "0")
        members += [(f"{key}.jpg", data), (f"{key}.txt", CAPTION.encode()),
                    (f"{key}.json", json.dumps({"uid": uid, "url": f"http://later.invalid/{key}"}).encode())]
        sources[uid] = row.uid
    return members, sources


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("incremental")
    pool = root / "pool"
    synthesize(str(pool), samples=400, seed=31, shard_size=200)
    day1 = root / "day1"
    run_pipeline(run_config(pool, day1, **_settings()))
    # day 2: a fresh synthetic shard plus a shard of copies of day-1 samples
    fresh = root / "fresh"
    synthesize(str(fresh), samples=200, seed=32, shard_size=200)
    shutil.copy(fresh / "00000000.tar", pool / "00000100.tar")
    exact, exact_sources = _copies_of(day1, pool, 5, "exact")
    near, near_sources = _copies_of(day1, pool, 5, "near", offset=5)
    first_kept = read_metadata(day1).to_pandas().query("kept").sort_values("uid").iloc[20]
    with open(pool / first_kept.shard, "rb") as shard:
        shard.seek(first_kept.image_offset)
        same_uid_image = shard.read(first_kept.image_size)
    same_uid = [("reuid.jpg", same_uid_image[:-2] + b"\xff\xd9"),  # other bytes, same uid
                ("reuid.txt", CAPTION.encode()), ("reuid.json", json.dumps({"uid": first_kept.uid}).encode())]
    (pool / "00000101.tar").write_bytes(make_tar(exact + near + same_uid))
    day2 = root / "day2"
    summary = run_pipeline(run_config(pool, day2, reference=str(day1), **_settings()))
    return pool, day1, day2, summary, exact_sources, near_sources, first_kept.uid


def test_day_two_processes_only_new_shards(days):
    pool, day1, day2, summary, *_ = days
    manifest = json.loads((day2 / "manifest.json").read_text())
    assert sorted(s["name"] for s in manifest["input"]["shards"]) == ["00000100.tar", "00000101.tar"]
    assert manifest["reference"] == str(day1)
    assert summary.samples == 200 + 11
    meta = read_metadata(day2).to_pandas()
    assert set(meta.shard) == {"00000100.tar", "00000101.tar"}


def test_new_samples_are_deduplicated_against_what_day_one_published(days):
    _, day1, day2, _, exact_sources, near_sources, reused_uid = days
    meta = read_metadata(day2).to_pandas().set_index("uid")
    published = set(read_metadata(day1).to_pandas().query("kept").uid)
    for uid, source in exact_sources.items():
        assert meta.loc[uid, "drop_reason"] == "exact_duplicate" and meta.loc[uid, "duplicate_of"] == source
    for uid, source in near_sources.items():
        assert meta.loc[uid, "drop_reason"] == "near_duplicate" and meta.loc[uid, "duplicate_of"] == source
    reused = read_metadata(day2).to_pandas().query("key == 'reuid'").iloc[0]
    assert reused.drop_reason == "duplicate_uid" and reused.duplicate_of == reused_uid
    # every duplicate points either at day 1's published samples or at a day-2 sample
    dups = meta[meta.drop_reason.isin(["exact_duplicate", "near_duplicate"])]
    assert set(dups.duplicate_of) <= published | set(meta.index)
    # the day-2 output holds no uid day 1 already published
    assert not (set(meta[meta.kept].index) & published)


def test_dbp_tops_up_day_one_clusters(days):
    _, day1, day2, summary, *_ = days
    first = pq.read_table(day1 / "clusters" / "dbp.parquet").to_pandas()
    second = pq.read_table(day2 / "clusters" / "dbp.parquet").to_pandas()
    assert np.array_equal(np.load(day1 / "clusters" / "dbp_centroids.npy"), np.load(day2 / "clusters" / "dbp_centroids.npy"))
    assert (second.published_earlier.values == first.kept.values).all()
    assert (second.quota >= second.published_earlier).all()
    assert (second.kept == second.quota).all()  # each cluster's quota = published + new kept
    day1_meta, day2_meta = read_metadata(day1).to_pandas(), read_metadata(day2).to_pandas()
    entered = day1_meta.dbp_cluster.notna().sum() + day2_meta.dbp_cluster.notna().sum()
    assert second.quota.sum() == int(np.floor(0.5 * entered))  # the target over the combined pool
    assert day2_meta.kept.sum() == second.quota.sum() - first.kept.sum() == summary.kept


def test_day_three_with_nothing_new_is_an_empty_run(days):
    pool, _, day2, _, *_ = days
    day3 = day2.parent / "day3"
    summary = run_pipeline(run_config(pool, day3, reference=str(day2), **_settings()))
    assert summary.samples == 0 and summary.kept == 0
    assert json.loads((day3 / "shards" / "sizes.json").read_text()) == {}
    assert json.loads((day3 / "manifest.json").read_text())["counts"]["input"] == 0


def test_semantic_dedup_against_the_reference(tmp_path):
    """Re-encoded copies of published samples, with pHash off, are caught by SemDeDup in the
    reference's clusters (random weights: only near-identical images are within eps=1e-4)."""
    from pipeline.synth import synthesize

    pool = tmp_path / "pool"
    synthesize(str(pool), samples=200, seed=41, shard_size=200)
    day1 = tmp_path / "day1"
    settings = _settings(phash=False, semantic=True, semantic_eps=1e-4)
    run_pipeline(run_config(pool, day1, **settings))
    near, sources = _copies_of(day1, pool, 6, "near")
    (pool / "00000100.tar").write_bytes(make_tar(near))
    day2 = tmp_path / "day2"
    run_pipeline(run_config(pool, day2, reference=str(day1), **settings))
    meta = read_metadata(day2).to_pandas().set_index("uid")
    assert np.array_equal(np.load(day1 / "clusters" / "dedup_centroids.npy"), np.load(day2 / "clusters" / "dedup_centroids.npy"))
    caught = [u for u in sources if meta.loc[u, "drop_reason"] == "semantic_duplicate"]
    assert len(caught) >= 5
    assert all(meta.loc[u, "duplicate_of"] == sources[u] for u in caught)
