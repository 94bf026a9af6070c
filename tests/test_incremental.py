"""Scheduled incremental runs: day 2 processes only new shards, deduplicates them against what day 1
published, and tops up day 1's DBP clusters; day 3 with nothing new is a valid empty run. With
`reference=latest:ROOT` a run finds its reference itself: the latest successful run under ROOT, so a
failed or missing day is skipped."""

import io
import json
import shutil

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.io.reference import Reference, latest_run, published_runs, resolve
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


# -- reference=latest:ROOT ------------------------------------------------------------------------------


def test_latest_skips_a_failed_and_a_missing_day(tmp_path):
    """Day 1 (the first day: nothing under the root yet) runs in full; day 2 failed (its manifest has no
    final counts) and day 3 never ran (an empty folder); day 4 tops up day 1, processing every shard
    day 1 did not see, and its manifest names day 1 so that the chain stays followable."""
    from pipeline.synth import synthesize

    pool, runs = tmp_path / "pool", tmp_path / "runs"
    synthesize(str(pool), samples=100, seed=51, shard_size=100)
    latest = f"latest:{runs}"
    day1 = runs / "2026-03-01"
    first = run_pipeline(run_config(pool, day1, reference=latest))
    assert json.loads((day1 / "manifest.json").read_text())["reference"] is None
    assert first.samples == 100

    # day 2 got as far as writing its manifest, then failed
    synthesize(str(tmp_path / "fresh"), samples=100, seed=52, shard_size=100)
    shutil.copy(tmp_path / "fresh" / "00000000.tar", pool / "00000100.tar")
    failed = json.loads((day1 / "manifest.json").read_text())
    del failed["counts"]
    failed["updated_at"] = "2999-01-01T00:00:00Z"  # later than any real run
    (runs / "2026-03-02").mkdir()
    (runs / "2026-03-02" / "manifest.json").write_text(json.dumps(failed))
    (runs / "2026-03-03").mkdir()  # never ran

    day4 = runs / "2026-03-04"
    summary = run_pipeline(run_config(pool, day4, reference=latest))
    manifest = json.loads((day4 / "manifest.json").read_text())
    assert manifest["reference"] == str(day1)
    assert manifest["config"]["reference"] == latest
    assert [s["name"] for s in manifest["input"]["shards"]] == ["00000100.tar"]
    assert summary.samples == 100
    assert [url for url, _ in Reference.load(manifest["reference"]).runs] == [str(day1)]

    # the same day again: its own output is no candidate, so it finds day 1 again and every stage is skipped
    again = run_pipeline(run_config(pool, day4, reference=latest))
    manifest = json.loads((day4 / "manifest.json").read_text())
    assert manifest["reference"] == str(day1)
    assert all(stage["skipped"] for stage in manifest["stages"].values())
    assert (again.samples, again.kept) == (summary.samples, summary.kept)
    # the next day builds on day 4, whose chain holds day 1
    chosen = latest_run(str(runs), str(runs / "2026-03-05"))
    assert chosen.url == str(day4)
    assert [url for url, _ in Reference.load(chosen.url).runs] == [str(day4), str(day1)]


def _published(root, name, finished, reference=None, counts=True):
    """A run folder whose manifest holds what reference discovery reads."""
    folder = root / name
    folder.mkdir(parents=True)
    manifest = {"stages": {}, "input": {"shards": []}, "reference": reference, "updated_at": finished}
    if counts:
        manifest["counts"] = {"input": 0, "kept": 0, "dropped": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_published_runs_are_ordered_by_finish_time_then_name(tmp_path):
    root = tmp_path / "runs"
    b = _published(root, "b", "2026-03-02T02:00:00Z")
    a = _published(root, "a", "2026-03-02T02:00:00Z")  # same second: the name decides
    c = _published(root, "c", "2026-03-01T05:00:00Z")
    _published(root, "d", "2026-03-03T02:00:00Z", counts=False)  # failed
    (root / "e").mkdir()  # no manifest
    (root / "f").mkdir()
    (root / "f" / "manifest.json").write_text("{not json")  # not a run that finished
    (root / "notes.txt").write_text("a file beside the runs")
    assert [run.url for run in published_runs(str(root))] == [c, a, b]
    assert latest_run(str(root), str(root / "next")).url == b


def test_latest_leaves_out_the_runs_own_output_and_the_runs_built_on_it(tmp_path):
    root = tmp_path / "runs"
    day1 = _published(root, "day1", "2026-03-01T03:00:00Z")
    day2 = _published(root, "day2", "2026-03-02T03:00:00Z", reference=day1)
    _published(root, "day3", "2026-03-03T03:00:00Z", reference=day2)
    assert latest_run(str(root), str(root / "day4")).url == str(root / "day3")
    assert latest_run(str(root), str(root / "day3")).url == day2  # a rerun of day 3 tops up what it did before
    assert latest_run(str(root), str(root / "day2")).url == day1  # day 3 builds on day 2: no candidate either


def test_latest_takes_the_end_of_the_chain_when_an_old_day_was_rerun_later(tmp_path):
    """Day 1 rerun after day 2 finished refreshes day 1's manifest time; day 2, which builds on it, is
    still the run to top up (taking day 1 would leave day 2's samples out of the chain)."""
    root = tmp_path / "runs"
    day1 = _published(root, "day1", "2026-03-05T03:00:00Z")
    day2 = _published(root, "day2", "2026-03-02T03:00:00Z", reference=day1)
    assert latest_run(str(root), str(root / "day3")).url == day2


def test_latest_with_no_successful_run_processes_the_whole_input(tmp_path, caplog):
    root = tmp_path / "runs"
    assert resolve(f"latest:{root}", str(root / "day1")) is None  # no root yet: the first day
    _published(root, "day1", "2026-03-01T03:00:00Z", counts=False)
    with caplog.at_level(logging.WARNING, logger="curate"):
        assert resolve(f"latest:{root}", str(root / "day2")) is None
    assert f"no successful run under {root} yet; this run processes its whole input" in caplog.text


def test_latest_needs_a_root_that_is_not_the_output(tmp_path):
    base = {"input": str(tmp_path / "pool"), "output": str(tmp_path / "runs" / "day1")}
    with pytest.raises(ConfigError, match="latest: needs the folder the runs are published under"):
        load_config(None, [], base={**base, "reference": "latest:"})
    with pytest.raises(ConfigError, match="the output must be one of those folders, not ROOT itself"):
        load_config(None, [f"reference=latest:{tmp_path / 'runs' / 'day1'}"], base=base)
    assert load_config(None, [f"reference=latest:{tmp_path / 'runs'}"], base=base).reference == f"latest:{tmp_path / 'runs'}"


def test_latest_finds_the_run_on_an_object_store(monkeypatch):
    """The same discovery through fsspec against a real S3-compatible server (moto on loopback)."""
    import sys

    import s3fs

    from pipeline.io import fs
    from tests.helpers import free_port, start_loopback_server

    port = free_port()
    server = start_loopback_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   port, "moto server")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir("curate-runs")
        root = "s3://curate-runs/runs"

        def publish(name, finished, reference=None, counts=True):
            manifest = {"stages": {}, "input": {"shards": []}, "reference": reference, "updated_at": finished}
            if counts:
                manifest["counts"] = {"input": 0, "kept": 0, "dropped": {}}
            fs.write_bytes_atomic(f"{root}/{name}/manifest.json", json.dumps(manifest).encode())

        publish("2026-03-01", "2026-03-01T03:00:00Z")
        publish("2026-03-02", "2026-03-02T03:00:00Z", counts=False)  # failed
        fs.write_bytes_atomic(f"{root}/2026-03-03/shards/sizes.json", b"{}\n")  # stopped before its manifest
        assert [run.url for run in published_runs(root)] == [f"{root}/2026-03-01"]
        assert latest_run(root, f"{root}/2026-03-04").url == f"{root}/2026-03-01"
        assert latest_run(root, f"{root}/2026-03-01/") is None  # its own output, spelt with a slash
        assert latest_run("s3://curate-runs/nothing-yet", f"{root}/2026-03-04") is None
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.kill()
        server.wait()
