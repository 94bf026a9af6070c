"""The whole pipeline against a real S3-compatible server on loopback (moto in server mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, start_loopback_server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "curate-test"


@pytest.fixture(scope="module")
def s3_env():
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = start_loopback_server(command, port, "moto server")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "RAY_AUTH_MODE": "disabled",
    }
    try:
        yield env
    finally:
        server.kill()
        server.wait()


def _s3(env):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["AWS_ENDPOINT_URL"])


def test_s3_input_and_output_then_duckdb_queries_it(s3_env, synth_pool):
    fs = _s3(s3_env)
    fs.mkdir(BUCKET)
    for shard in sorted(synth_pool.glob("*.tar")):
        fs.put_file(str(shard), f"{BUCKET}/pool/{shard.name}")
    run = subprocess.run(
        [sys.executable, "pipeline/curate.py", "--config", "jobs/quickstart.yaml",
         f"input=s3://{BUCKET}/pool", f"output=s3://{BUCKET}/runs/r1", "ray.address=local"],
        cwd=ROOT, env=s3_env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "input samples 600 = kept" in run.stdout

    manifest = json.loads(fs.cat_file(f"{BUCKET}/runs/r1/manifest.json"))
    kept = manifest["counts"]["kept"]
    sizes = json.loads(fs.cat_file(f"{BUCKET}/runs/r1/shards/sizes.json"))
    assert sum(sizes.values()) == kept > 0
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/runs/r1/shards") if p.endswith(".tar")) == sorted(sizes)
    assert not [p for p in fs.find(f"{BUCKET}/runs/r1") if ".tmp-" in p]
    assert manifest["input"]["shards"][0]["url"].startswith(f"s3://{BUCKET}/pool/")

    # DuckDB straight over the Parquet on S3, through fsspec (DuckDB's httpfs cannot be installed here)
    import duckdb

    con = duckdb.connect()
    con.register_filesystem(fs)
    total, kept_rows = con.execute(
        f"select count(*), count(*) filter (where kept) from read_parquet('s3://{BUCKET}/runs/r1/metadata/*.parquet')"
    ).fetchone()
    assert (total, kept_rows) == (600, kept)

    query = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "query", f"s3://{BUCKET}/runs/r1",
         "select count(*) as n from samples where not kept", "--format", "csv"],
        cwd=ROOT, env=s3_env, capture_output=True, text=True, timeout=120,
    )
    assert query.returncode == 0, query.stderr
    assert query.stdout.splitlines() == ["n", str(600 - kept)]
