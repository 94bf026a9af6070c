"""The catalog's `duplicates` view follows duplicate_of to the end of the chain.

A dedup drop can point at a sample that is itself a duplicate, or that a select step dropped
later; the view must name the sample the chain ends at and whether it was kept. Checked against
chains followed here in Python, on a real quickstart run and on hand-made metadata with the cases
a small run does not produce (duplicate uids, a chain that leaves the run).
"""

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.io.catalog import connect
from pipeline.reasons import DEDUP_REASONS, DROP_REASONS
from pipeline.runner import run_pipeline
from pipeline.synth import synthesize
from tests.helpers import read_metadata

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["uid", "drop_reason", "duplicate_of", "survivor_uid", "survivor_kept", "survivor_drop_reason", "hops",
           "shard", "key"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_local):
    """The quickstart recipe (semantic dedup and DBP with the shipped model) on 400 samples."""
    root = tmp_path_factory.mktemp("duplicates")
    synthesize(str(root / "pool"), samples=400, seed=0, shard_size=200)
    config = load_config(str(ROOT / "jobs" / "quickstart.yaml"),
                         [f"input={root / 'pool'}", f"output={root / 'run'}", "write.shard_size=250"])
    run_pipeline(config)
    return root / "run"


def follow(rows: list[dict]) -> dict[tuple[str, str], tuple[str, int]]:
    """(shard, key) of each row with a duplicate_of -> (survivor uid, hops), followed one link at a time
    through the rows that reached dedup and were not duplicate_uid drops (those share their uid)."""
    not_links = {r.name for r in DROP_REASONS if r.step in ("ingest", "basic_filter")} | {"duplicate_uid"}
    links = {r["uid"]: r for r in rows if r["drop_reason"] not in not_links}
    chains = {}
    for row in rows:
        if row["duplicate_of"] is None:
            continue
        reached, hops = row["duplicate_of"], 1
        while reached in links and links[reached]["duplicate_of"] is not None:
            reached, hops = links[reached]["duplicate_of"], hops + 1
            assert hops < 1000, "a cycle"
        chains[(row["shard"], row["key"])] = (reached, hops)
    return chains


@pytest.mark.slow
def test_every_duplicate_reaches_its_survivor_and_says_whether_it_was_kept(run_dir):
    rows = read_metadata(run_dir).to_pylist()
    view = connect(str(run_dir)).sql(f"select {', '.join(COLUMNS)} from duplicates").to_arrow_table().to_pylist()
    dropped = [r for r in rows if r["drop_reason"] in DEDUP_REASONS]
    assert dropped, "the recipe drops duplicates in this pool"
    assert sorted((r["shard"], r["key"]) for r in view) == sorted((r["shard"], r["key"]) for r in dropped)

    expected = follow(rows)
    select_reasons = {r.name for r in DROP_REASONS if r.step == "select"}
    survivors = {r["uid"]: r for r in rows if r["drop_reason"] is None or r["drop_reason"] in select_reasons}
    for r in view:
        assert (r["survivor_uid"], r["hops"]) == expected[(r["shard"], r["key"])]
        assert r["hops"] >= 1
        survivor = survivors[r["survivor_uid"]]  # the end of every chain is in this run and survived dedup
        assert survivor["duplicate_of"] is None
        assert r["survivor_kept"] == survivor["kept"]
        assert r["survivor_drop_reason"] == survivor["drop_reason"]
    kept_uids = {r["uid"] for r in rows if r["kept"]}
    assert all(r["survivor_uid"] in kept_uids for r in view if r["survivor_kept"])
    # what the view is for: on this pool chains go past the first link, and some end at a sample
    # that a select step dropped, so `duplicate_of` alone would name the wrong "kept" sample
    assert max(r["hops"] for r in view) >= 3
    assert any(not r["survivor_kept"] for r in view)
    assert any(r["survivor_kept"] for r in view)


@pytest.mark.slow
def test_the_catalog_file_holds_the_view(run_dir):
    con = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    in_file = con.execute("select count(*), sum(hops) from duplicates").fetchone()
    assert in_file == connect(str(run_dir)).execute("select count(*), sum(hops) from duplicates").fetchone()
    assert in_file[0] > 0


def _metadata(run_dir: Path, rows: list[tuple]) -> None:
    names = ["uid", "shard", "key", "kept", "drop_reason", "duplicate_of"]
    table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)},
                     schema=pa.schema([(n, pa.bool_() if n == "kept" else pa.string()) for n in names]))
    (run_dir / "metadata").mkdir(parents=True)
    pq.write_table(table, run_dir / "metadata" / "part-000000.parquet")


def test_duplicate_uids_and_chains_that_leave_the_run(tmp_path):
    _metadata(tmp_path, [
        # uid, shard, key, kept, drop_reason, duplicate_of
        ("a", "s", "1", True, None, None),
        ("b", "s", "2", False, "dbp_pruned", None),
        ("c", "s", "3", False, "semantic_duplicate", "b"),
        ("d", "s", "4", False, "exact_duplicate", "c"),    # d -> c -> b: b was dropped by DBP
        ("a", "s", "5", False, "duplicate_uid", "a"),      # the same uid as the kept row 1
        ("c", "s", "6", False, "duplicate_uid", "c"),      # the same uid as row 3, a duplicate itself
        ("e", "s", "7", False, "corrupt_image", None),
        ("e", "s", "8", False, "near_duplicate", "a"),     # shares its uid with a row dropped before dedup
        ("f", "s", "9", False, "exact_duplicate", "p"),    # p: published by a reference run, not here
    ])
    got = {key: (survivor, kept, reason, hops) for key, survivor, kept, reason, hops in connect(str(tmp_path)).execute(
        "select key, survivor_uid, survivor_kept, survivor_drop_reason, hops from duplicates").fetchall()}
    assert got == {
        "3": ("b", False, "dbp_pruned", 1),
        "4": ("b", False, "dbp_pruned", 2),
        "5": ("a", True, None, 1),
        "6": ("b", False, "dbp_pruned", 2),
        "8": ("a", True, None, 1),
        "9": ("p", None, None, 1),
    }
