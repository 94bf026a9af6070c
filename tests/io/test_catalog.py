import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.catalog import connect, write_catalog
from pipeline.schema import METADATA_SCHEMA


def _small_run(run_dir):
    """A run's metadata/ with two rows: a kept sample and an exact duplicate of it."""
    rows = [
        {"uid": "a" * 32, "shard": "00000000.tar", "key": "k0", "partition": 0, "row": 0, "kept": True},
        {"uid": "b" * 32, "shard": "00000000.tar", "key": "k1", "partition": 0, "row": 1, "kept": False,
         "drop_reason": "exact_duplicate", "duplicate_of": "a" * 32},
    ]
    (run_dir / "metadata").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), run_dir / "metadata" / "part-00000.parquet")


def test_catalog_of_a_run_whose_path_holds_an_apostrophe(tmp_path):
    run_dir = tmp_path / "o'brien's run"
    _small_run(run_dir)
    views = write_catalog(str(run_dir), str(run_dir / "catalog.duckdb"))
    assert views == ["samples", "duplicates"]
    con = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    assert con.execute("select count(*), count(*) filter (where kept) from samples").fetchone() == (2, 1)
    assert con.execute("select uid, survivor_uid from duplicates").fetchall() == [("b" * 32, "a" * 32)]
    con.close()
    assert connect(str(run_dir)).execute("select key from samples where kept").fetchall() == [("k0",)]
