"""gs:// against a real GCS-compatible server on loopback (gcp-storage-emulator),
through the same fsspec code path as s3:// (gcsfs, the `gcs` extra)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import WITHOUT_MODEL, free_port, start_loopback_server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "curate-gcs-test"


@pytest.fixture(scope="module")
def gcs_env(tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("gcs-data")
    command = [sys.executable, "-m", "gcp_storage_emulator", "--data-dir", str(data), "start", "--host", "127.0.0.1",
               "--port", str(port), "--default-bucket", BUCKET, "--quiet"]
    server = start_loopback_server(command, port, "the GCS emulator")
    env = {
        **os.environ,
        # gcsfs sends every request to the emulator when this is set; anonymous access (no credentials)
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "FSSPEC_GCS_TOKEN": "anon",
        # the emulator speaks GCS's JSON API only, not the gRPC one gcsfs's zonal-bucket support probes
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GS_TOKEN": "anon",
        "RAY_AUTH_MODE": "disabled",
    }
    try:
        yield env
    finally:
        server.kill()
        server.wait()


def _gcs(env):
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(token="anon", endpoint_url=env["STORAGE_EMULATOR_HOST"])


def test_gs_input_then_query_a_run_on_gs(gcs_env, synth_pool, tmp_path):
    """A job reads its pool from gs://, and `curate query` reads a run that lies on gs://.

    The run is written locally and uploaded: the emulator does not implement GCS's object move
    (`moveTo`, HTTP 501), with which gcsfs ends every atomic write, so writing a run to gs:// is left
    to real GCS."""
    fs = _gcs(gcs_env)
    for shard in sorted(synth_pool.glob("*.tar")):
        fs.put_file(str(shard), f"{BUCKET}/pool/{shard.name}")
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "pipeline/curate.py", "--config", "jobs/quickstart.yaml",
         f"input=gs://{BUCKET}/pool", f"output={out}", "ray.address=local", *WITHOUT_MODEL],
        cwd=ROOT, env=gcs_env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "input samples 600 = kept" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    kept = manifest["counts"]["kept"]
    assert 0 < kept < 600
    assert [s["url"] for s in manifest["input"]["shards"]] == [
        f"gs://{BUCKET}/pool/{shard.name}" for shard in sorted(synth_pool.glob("*.tar"))
    ]

    fs.put(str(out) + "/", f"{BUCKET}/runs/r1", recursive=True)
    query = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "query", f"gs://{BUCKET}/runs/r1",
         "select count(*) as n, count(*) filter (where kept) as kept from samples", "--format", "csv"],
        cwd=ROOT, env=gcs_env, capture_output=True, text=True, timeout=120,
    )
    assert query.returncode == 0, query.stderr
    assert query.stdout.splitlines() == ["n,kept", f"600,{kept}"]
