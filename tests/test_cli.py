import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.runner import run_pipeline
from tests.helpers import run_config


@pytest.fixture(scope="module")
def run_dir(synth_pool, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("cli") / "run"
    run_pipeline(run_config(synth_pool, out))
    return out


def test_query_prints_a_table(run_dir, capsys):
    assert main(["query", str(run_dir), "select count(*) as total, count(*) filter (where kept) as kept from samples"]) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "600" in printed


def test_query_csv_joins_duplicates_to_the_sample_they_point_at(run_dir, capsys):
    sql = ("select d.uid, k.sha256 = d.sha256 as same_bytes from samples d join samples k on d.duplicate_of = k.uid "
           "where d.drop_reason = 'exact_duplicate'")
    assert main(["query", str(run_dir), sql, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "uid,same_bytes" and len(lines) > 1
    assert all(line.endswith(",true") for line in lines[1:])  # every exact duplicate has its target's bytes


def test_bad_sql_is_an_error_not_a_traceback(run_dir, capsys):
    assert main(["query", str(run_dir), "select nope from samples"]) == 2
    assert "query failed" in capsys.readouterr().err


def test_catalog_file_opens_in_plain_duckdb(run_dir):
    import duckdb

    con = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    assert con.execute("select count(*) from samples").fetchone()[0] == 600


def test_bad_override_exits_with_the_key_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "pipeline/curate.py", "--config", "jobs/quickstart.yaml", f"output={tmp_path}", "embed.batch_size=lots"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "embed.batch_size" in result.stderr
