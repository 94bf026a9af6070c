"""`curate synth --datacomp-metadata`: DataComp-style metadata beside a synthetic pool, computed with
the quickstart's model, which `jobs/datacomp_metadata.yaml` then curates through the real pipeline
with the overrides its comments document for the demo pool."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.io.catalog import connect
from pipeline.io.embeddings import vectors
from pipeline.runner import run_pipeline
from pipeline.synth import datacomp
from tests.helpers import read_metadata

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "datacomp_metadata.yaml"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("datacomp") / "pool"
    assert main(["synth", "--out", str(out), "--samples", "200", "--shard-size", "100", "--seed", "3",
                 "--datacomp-metadata"]) == 0
    return out


def _metadata(pool):
    files = sorted((pool / "metadata").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    arrays = {}
    for f in files:
        with np.load(f.with_suffix(".npz")) as npz:
            assert sorted(npz.files) == ["b32_img", "b32_txt", "l14_img", "l14_txt"]
            for name in npz.files:
                arrays.setdefault(name, []).append(npz[name])
    return table, {name: np.concatenate(parts) for name, parts in arrays.items()}


def test_the_synth_model_is_the_quickstart_s():
    embed = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())["embed"]
    assert (datacomp.MODEL, datacomp.PRETRAINED) == (embed["model"], embed["pretrained"])


def test_metadata_has_datacomp_s_layout_and_real_scores(pool):
    assert sorted(p.name for p in (pool / "metadata").iterdir()) == [
        "00000000.npz", "00000000.parquet", "00000001.npz", "00000001.parquet"]
    table, arrays = _metadata(pool)
    assert set(datacomp_columns := ["uid", "url", "text", "original_width", "original_height",
                                    "clip_b32_similarity_score", "clip_l14_similarity_score", "sha256"]) <= set(table.column_names)
    assert all(len(v) == table.num_rows for v in arrays.values())
    truth = pq.read_table(pool / "truth" / "truth.parquet").to_pylist()
    by_uid = {t["uid"]: t for t in truth}
    rows = table.select(datacomp_columns).to_pylist()
    uids = [r["uid"] for r in rows]
    assert len(set(uids)) == len(uids) and set(uids) <= set(by_uid)
    # every sample with a decodable image has a row; corrupt images have none
    no_row = {u for u in by_uid if u not in set(uids)}
    assert no_row and all("corrupt_image" in by_uid[u]["defects"] for u in no_row)
    assert all(r["sha256"] == by_uid[r["uid"]]["sha256"] for r in rows)

    # one model under both names; unit vectors; the score is their cosine
    assert np.array_equal(arrays["b32_img"], arrays["l14_img"]) and np.array_equal(arrays["b32_txt"], arrays["l14_txt"])
    image, text = arrays["l14_img"].astype(np.float32), arrays["l14_txt"].astype(np.float32)
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=2e-3)
    score = table.column("clip_l14_similarity_score").to_numpy(zero_copy_only=False)
    assert np.array_equal(score, table.column("clip_b32_similarity_score").to_numpy(zero_copy_only=False), equal_nan=True)
    has_text = table.column("text").is_valid().to_numpy(zero_copy_only=False)
    assert not has_text.all() and np.isnan(score[~has_text]).all() and not text[~has_text].any()
    assert np.allclose(np.sum(image[has_text] * text[has_text], axis=1), score[has_text], atol=5e-3)

    # the scores mean something: captions naming another picture score far below correct ones,
    # and exact copies of an image have its embedding
    defects = [by_uid[u]["defects"] for u in uids]
    clean = score[[not d for d in defects]]
    mismatched = score[["mismatched_caption" in d for d in defects]]
    assert len(mismatched) >= 3 and mismatched.max() < np.median(clean) and clean.mean() - mismatched.mean() > 0.5
    row_of = {u: i for i, u in enumerate(uids)}
    copies = [(row_of[u], row_of[by_uid[u]["source_uid"]]) for u in uids
              if "exact_duplicate" in by_uid[u]["defects"] and by_uid[u]["source_uid"] in row_of]
    assert copies and all(np.array_equal(image[a], image[b]) for a, b in copies)


def _documented_demo_overrides() -> list[str]:
    """The KEY=VALUE overrides of the `curate run` command the job file's comments give for the demo pool."""
    lines = JOB.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "curate run --config jobs/datacomp_metadata.yaml" in line)
    command = ""
    for line in lines[start:]:
        command += " " + line.lstrip("#").strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            break
    return re.findall(r"\S+=\S+", command)


@pytest.mark.slow
def test_the_datacomp_job_runs_on_the_synthetic_metadata(pool, tmp_path, ray_local):
    overrides = _documented_demo_overrides()
    assert overrides, "the job file documents how to run it on the demo pool"
    run = tmp_path / "run"
    config = load_config(str(JOB), [f"input={pool}", f"embed.provided.metadata={pool / 'metadata'}",
                                    f"output={run}", *overrides])
    summary = run_pipeline(config)  # checks input = kept + dropped by reason, and the shards
    assert summary.samples == 200 and summary.kept > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["embed"]["counts"]["models"] == {"embed": "DataComp metadata l14"}
    assert {"clip_score", "dbp_pruned"} <= set(summary.dropped)

    table, arrays = _metadata(pool)
    row_of = {u: i for i, u in enumerate(table.column("uid").to_pylist())}
    given = table.column("clip_l14_similarity_score").to_numpy(zero_copy_only=False)
    metadata = read_metadata(run).select(["uid", "clip_score"]).to_pylist()
    scored = [m for m in metadata if m["clip_score"] is not None]
    assert scored and all(m["uid"] in row_of for m in scored)
    assert np.allclose([m["clip_score"] for m in scored], [given[row_of[m["uid"]]] for m in scored], atol=1e-6)
    embeddings = pa.concat_tables([pq.read_table(p) for p in sorted((run / "embeddings").glob("*.parquet"))])
    present, image = vectors(embeddings.column("image_embedding"))
    embedded = np.asarray(embeddings.column("uid").to_pylist(), dtype=object)[present]
    assert np.array_equal(image, arrays["l14_img"][[row_of[u] for u in embedded]].astype(image.dtype))
    # the duplicates view works on this run too: every chain ends at a sample with no duplicate_of
    con = connect(str(run))
    assert con.execute("select count(*) from duplicates d join samples s on s.uid = d.survivor_uid "
                       "where s.duplicate_of is not null").fetchone()[0] == 0


def test_an_eval_set_gets_no_datacomp_metadata(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "heldout"), "--eval-set", "--datacomp-metadata"]) == 2
    assert "--datacomp-metadata" in capsys.readouterr().err
    assert not (tmp_path / "heldout").exists()
