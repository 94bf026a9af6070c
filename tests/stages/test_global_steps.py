"""The global steps of dedup and select, distributed, against the same rules applied to the whole
pool at once.

A ragged pool (an empty shard, shards of one sample, uneven others) runs twice: with the default
bucket size every step's records meet in one task; with `ray.rows_per_bucket=5` they go through
Ray Data shuffles of many buckets, the pHash links are joined across buckets and DBP selects in
clusters spread over buckets. Both must give byte-identical metadata and shards, and the
decisions must equal those of the pure algorithms run over the concatenated pool.
"""

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.algorithms.dbp import cluster_complexity, cluster_quotas, select_in_clusters
from pipeline.algorithms.exact_dup import exact_duplicates
from pipeline.algorithms.near_dup import near_duplicates
from tests.algorithms.reference import top_fraction_keep
from pipeline.runner import run_pipeline
from tests.helpers import read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")
SIZES = [0, 1, 90, 1, 60]  # samples per shard; the rest go to the last one


def _samples(tar_path: Path) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    groups: dict[str, list] = {}
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            if member.isfile():
                groups.setdefault(member.name.split(".", 1)[0], []).append((member, archive.extractfile(member).read()))
    return list(groups.values())


def _write_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for members in samples:
            for info, data in members:
                archive.addfile(info, __import__("io").BytesIO(data))


@pytest.fixture(scope="module")
def ragged_pool(tmp_path_factory):
    """300 synthetic samples (with exact and near copies, and 3 samples repeated under other keys)
    in shards of 0, 1, 90, 1, 60 and 151 samples, and DataComp-style embeddings for them (so no
    model runs in the jobs)."""
    from pipeline.synth import synthesize
    from pipeline.synth.datacomp import write_datacomp_metadata

    root = tmp_path_factory.mktemp("global")
    synthesize(str(root / "synth"), samples=300, seed=5, shard_size=300,
               defect_rates={"exact_duplicate": 0.08, "near_duplicate": 0.1})
    samples = [s for tar in sorted((root / "synth").glob("*.tar")) for s in _samples(tar)]
    for index, members in enumerate(samples[-3:]):  # the same uid (json) under another key, in another shard
        renamed = []
        for info, data in members:
            copy = tarfile.TarInfo(f"again{index}.{info.name.split('.', 1)[1]}")
            copy.size = len(data)
            renamed.append((copy, data))
        samples.insert(5, renamed)
    pool = root / "pool"
    pool.mkdir()
    start = 0
    for index, size in enumerate(SIZES + [len(samples)]):
        _write_shard(pool / f"{index:08d}.tar", samples[start : start + size])
        start += size
    write_datacomp_metadata(str(pool), threads=2)
    return pool


def _settings(pool, **ray):
    return {
        "embed": {"provided": {"metadata": str(pool / "metadata")}},
        "cluster": {"k": 6},
        "dedup": {"exact": True, "phash": True, "phash_radius": 6, "semantic": True, "semantic_eps": 0.02},
        "select": {"clip": {"fraction": 0.8}, "dbp": {"enabled": True, "target": 0.7, "k": 5},
                   "where": "sha256 >= '3'"},
        "write": {"shard_size": 40},
        "ray": ray,
    }


@pytest.fixture(scope="module")
def runs(ragged_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("global-runs")
    one, many = root / "one-bucket", root / "many-buckets"
    run_pipeline(run_config(ragged_pool, one, **_settings(ragged_pool)))
    run_pipeline(run_config(ragged_pool, many, **_settings(ragged_pool, rows_per_bucket=5)))
    return one, many


def _files(run: Path, folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / folder).iterdir()) if p.is_file()}


def test_shuffled_steps_give_the_same_bytes_as_one_task(runs):
    one, many = runs
    assert _files(one, "metadata") == _files(many, "metadata")
    assert _files(one, "shards") == _files(many, "shards")
    assert _files(one, "embeddings") == _files(many, "embeddings")  # embed.provided's uid join
    meta = read_metadata(one).to_pandas()
    reasons = set(meta.drop_reason.dropna())
    # every global step had something to decide, so the comparison says something
    assert {"duplicate_uid", "exact_duplicate", "near_duplicate", "clip_score", "dbp_pruned", "sql_filter"} <= reasons


def test_many_buckets_really_were_shuffled(runs):
    import json

    _, many = runs
    steps = json.loads((many / "manifest.json").read_text())["stages"]["dedup"]["counts"]["steps"]
    assert steps["phash"]["params"]["buckets"] > 10  # links joined across buckets


def _concatenated(run: Path, stage: str) -> pa.Table:
    parts = sorted((run / "stages" / stage).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def test_dedup_decisions_equal_the_rules_over_the_whole_pool(runs):
    """uid, exact and pHash dedup recomputed with the pure algorithms over the concatenated pool."""
    one, _ = runs
    table = _concatenated(one, "ingest")
    phash = table.column("phash").fill_null(0).to_numpy().astype(np.uint64)  # not via pandas: floats
    ingest = table.to_pandas()
    meta = read_metadata(one).to_pandas()
    alive = ingest.drop_reason.isna().to_numpy()
    uid = ingest.uid.to_numpy().astype(str)
    expected = {}
    first = {}
    for row in np.flatnonzero(alive):
        if uid[row] in first:
            expected[row] = ("duplicate_uid", uid[row])
        else:
            first[uid[row]] = row
    alive[list(expected)] = False
    rows = np.flatnonzero(alive)
    sha = np.array([s if isinstance(s, str) else "" for s in ingest.sha256], dtype=object)
    dropped, dup = exact_duplicates(sha[rows], uid[rows])
    for r, d in zip(rows[dropped], dup[dropped]):
        expected[r] = ("exact_duplicate", uid[rows[d]])
    alive[rows[dropped]] = False
    rows = np.flatnonzero(alive)
    dropped, dup = near_duplicates(phash[rows], np.char.add("1", uid[rows]), 6)
    for r, d in zip(rows[dropped], dup[dropped]):
        expected[r] = ("near_duplicate", uid[rows[d]])
    got = {r: (reason, of) for r, (reason, of) in enumerate(zip(meta.drop_reason, meta.duplicate_of))
           if reason in ("duplicate_uid", "exact_duplicate", "near_duplicate")}
    assert len(expected) > 20
    assert got == expected


def test_select_decisions_equal_the_rules_over_the_whole_pool(runs):
    """The clip fraction cut and DBP recomputed over the concatenated survivors of each step."""
    one, _ = runs
    meta = read_metadata(one).to_pandas()
    entering = meta[meta.drop_reason.isna() | meta.drop_reason.isin(["clip_score", "dbp_pruned", "sql_filter"])]
    keep = top_fraction_keep(entering.clip_score.fillna(np.nan).to_numpy(np.float64), entering.uid.to_numpy(str), 0.8)
    assert set(entering.uid[~keep]) == set(meta.uid[meta.drop_reason == "clip_score"])
    reached = meta[meta.dbp_cluster.notna()]
    assert set(reached.uid) == set(entering.uid[keep])
    centroids = np.load(one / "clusters" / "dbp_centroids.npy")
    cluster = reached.dbp_cluster.to_numpy(np.int64)
    dist = reached.dbp_dist_to_centroid.to_numpy(np.float64)
    sizes, d_intra, d_inter = cluster_complexity(centroids, cluster, dist, n_neighbors=20)
    quotas = cluster_quotas(sizes, d_intra, d_inter, int(np.floor(0.7 * len(reached))), 0.5)
    kept = select_in_clusters(cluster, dist, reached.uid.to_numpy(str), quotas)
    assert set(reached.uid[~kept]) == set(meta.uid[meta.drop_reason == "dbp_pruned"])
    table = pq.read_table(one / "clusters" / "dbp.parquet").to_pandas()
    assert table["quota"].tolist() == quotas.tolist()


def test_a_top_up_gives_the_same_bytes_through_shuffles(ragged_pool, tmp_path):
    """A reference run's published samples take part in every step, in one task or in many: a
    day-2 shard with copies of day-1 samples (same bytes under another key, and same uid) and
    fresh samples gives byte-identical output either way, and the copies are dropped against
    what day 1 published."""
    import json
    import shutil

    from pipeline.synth import synthesize
    from pipeline.synth.datacomp import write_datacomp_metadata

    pool = tmp_path / "pool"
    shutil.copytree(ragged_pool, pool)
    day1 = tmp_path / "day1"
    run_pipeline(run_config(pool, day1, **_settings(pool)))
    published = read_metadata(day1).to_pandas().query("kept")
    copies = []
    for index, members in enumerate(_samples(pool / "00000005.tar")[:30]):
        uid = json.loads(dict((i.name.rsplit(".", 1)[1], d) for i, d in members)["json"])["uid"]
        if uid not in set(published.uid):
            continue
        for info, data in members:
            ext = info.name.rsplit(".", 1)[1]
            if index % 2 and ext == "json":
                continue  # no json: a uid of its own, the same image bytes as a published sample
            copy = tarfile.TarInfo(f"copy{index:04d}.{ext}")
            copy.size = len(data)
            copies.append([(copy, data)])
    synthesize(str(tmp_path / "fresh"), samples=60, seed=9, shard_size=60,
               defect_rates={"exact_duplicate": 0.1, "near_duplicate": 0.1})
    fresh = [s for tar in sorted((tmp_path / "fresh").glob("*.tar")) for s in _samples(tar)]
    _write_shard(pool / "00000100.tar", copies + fresh)
    write_datacomp_metadata(str(pool), threads=2)
    outputs = {}
    for name, ray in (("one", {}), ("many", {"rows_per_bucket": 5})):
        outputs[name] = tmp_path / name
        run_pipeline(run_config(pool, outputs[name], reference=str(day1), **_settings(pool, **ray)))
    assert _files(outputs["one"], "metadata") == _files(outputs["many"], "metadata")
    assert _files(outputs["one"], "shards") == _files(outputs["many"], "shards")
    assert _files(outputs["one"], "embeddings") == _files(outputs["many"], "embeddings")
    meta = read_metadata(outputs["one"]).to_pandas()
    against = meta[meta.drop_detail.fillna("").str.contains("published")]
    assert {"duplicate_uid", "exact_duplicate"} <= set(against.drop_reason)
    assert set(against.duplicate_of) <= set(published.uid)
