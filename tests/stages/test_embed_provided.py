"""Embeddings and scores from DataComp-style metadata instead of a model pass.

A run that computes embeddings is exported into DataComp's layout (metadata .parquet + .npz
row-aligned beside it, rows in another order and split unlike the shards); a second run takes them
from there and must reach the same decisions and scores, with no model loaded.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.io.embeddings import vectors
from pipeline.runner import run_pipeline
from pipeline.stages.embed import EmbedError
from tests.helpers import read_metadata, run_config

pytestmark = pytest.mark.usefixtures("ray_local")
TINY = {"model": "curate-vit-tiny-64"}
RECIPE = {
    "cluster": {"samples_per_cluster": 100},
    "dedup": {"semantic": True, "semantic_eps": 0.05},
    "select": {"clip": {"fraction": 0.8}, "dfn": {"threshold": -1.0}, "dbp": {"enabled": True, "target": 0.7, "k": 5}},
}


def _export_datacomp(run_dir, metadata_dir, files=2, seed=0):
    """The run's embeddings in DataComp's layout: NAME.parquet + NAME.npz, shuffled, split in `files`."""
    parts = sorted((run_dir / "embeddings").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    table = table.filter(table.column("image_embedding").is_valid())
    rng = np.random.default_rng(seed)
    order = rng.permutation(table.num_rows)
    metadata_dir.mkdir()
    for number, rows in enumerate(np.array_split(order, files)):
        chunk = table.take(rows)
        present, image = vectors(chunk.column("image_embedding"))
        assert present.all()
        text_present, text = vectors(chunk.column("text_embedding"))
        text_full = np.zeros_like(image)
        text_full[text_present] = text
        clip = chunk.column("clip_score").to_numpy(zero_copy_only=False)
        pq.write_table(pa.table({
            "uid": chunk.column("uid"),
            "url": pa.array([f"http://example.invalid/{u}.jpg" for u in chunk.column("uid").to_pylist()]),
            "text": pa.nulls(chunk.num_rows, pa.string()),
            "original_width": pa.array(np.full(chunk.num_rows, 64)),
            "original_height": pa.array(np.full(chunk.num_rows, 64)),
            "clip_b32_similarity_score": pa.array(np.nan_to_num(clip) * 0.5, pa.float64()),
            "clip_l14_similarity_score": pa.array(clip, pa.float64()),
            "my_dfn": chunk.column("dfn_score"),
            "sha256": pa.nulls(chunk.num_rows, pa.string()),
        }), metadata_dir / f"{number:08d}.parquet")
        np.savez(metadata_dir / f"{number:08d}.npz", l14_img=image.astype(np.float16), l14_txt=text_full.astype(np.float16),
                 b32_img=rng.normal(size=(chunk.num_rows, 4)).astype(np.float16),
                 b32_txt=rng.normal(size=(chunk.num_rows, 4)).astype(np.float16))
    return table.num_rows


@pytest.fixture(scope="module")
def computed(synth_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("provided")
    run_dir = root / "computed"
    run_pipeline(run_config(synth_pool, run_dir, embed=TINY, dfn=TINY, **RECIPE))
    rows = _export_datacomp(run_dir, root / "metadata")
    return root, run_dir, rows


def _by_uid(table, columns):
    return {row["uid"]: tuple(row[c] for c in columns) for row in table.select(["uid", *columns]).to_pylist()}


def test_a_run_on_provided_embeddings_reaches_the_computed_run_s_decisions(computed, synth_pool):
    root, run_dir, exported = computed
    provided = {"provided": {"metadata": str(root / "metadata"), "embeddings": "l14", "dfn_score": "my_dfn"}}
    run_pipeline(run_config(synth_pool, root / "from_metadata", embed=provided, **RECIPE))
    counts = json.loads((root / "from_metadata" / "manifest.json").read_text())["stages"]["embed"]["counts"]
    assert counts["models"] == {"embed": "DataComp metadata l14"}
    assert counts["embedded"] == exported
    want, got = read_metadata(run_dir), read_metadata(root / "from_metadata")
    columns = ["drop_reason", "duplicate_of", "clip_score", "dfn_score", "cluster", "dbp_cluster"]
    assert _by_uid(got, columns) == _by_uid(want, columns)
    assert got.num_rows == want.num_rows == 600
    assert 0 < sum(r is None for r in got.column("drop_reason").to_pylist()) < 600
    semantic = [r for r in got.column("drop_reason").to_pylist() if r == "semantic_duplicate"]
    assert semantic, "the recipe should find semantic duplicates in the synthetic pool"


def test_the_chosen_columns_and_arrays_are_the_ones_used(computed, synth_pool):
    root, run_dir, _ = computed
    provided = {"provided": {"metadata": str(root / "metadata"), "embeddings": "b32", "clip_score": "clip_b32_similarity_score"}}
    out = root / "b32"
    run_pipeline(run_config(synth_pool, out, embed=provided))
    got, want = read_metadata(out), read_metadata(run_dir)
    want_clip = {u: c for u, (c,) in _by_uid(want, ["clip_score"]).items()}
    for uid, (clip,) in _by_uid(got, ["clip_score"]).items():
        if want_clip[uid] is not None:
            assert clip == pytest.approx(want_clip[uid] * 0.5, abs=1e-6)
    embedded = [v for v in pq.read_table(next((out / "embeddings").glob("part-*.parquet"))).column("image_embedding").to_pylist() if v]
    assert {len(v) for v in embedded} == {4}
    assert np.allclose(np.linalg.norm(np.asarray(embedded, np.float32), axis=1), 1, atol=2e-3)  # normalised


def test_a_sample_missing_from_the_metadata_fails_naming_shard_and_uid(computed, synth_pool, tmp_path):
    root, _, _ = computed
    partial = tmp_path / "metadata"
    partial.mkdir()
    for suffix in (".parquet", ".npz"):
        source = root / "metadata" / f"00000000{suffix}"
        (partial / source.name).write_bytes(source.read_bytes())
    provided = {"provided": {"metadata": str(partial)}}
    with pytest.raises(EmbedError, match=r"shard .*0000000\d\.tar: \d+ sample\(s\) have no row in the metadata .* first uid [0-9a-f]{32}"):
        run_pipeline(run_config(synth_pool, tmp_path / "out", embed=provided))


def test_provided_and_a_model_cannot_both_be_set(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: pool\noutput: out\nembed:\n  model: ViT-B-32\n  provided:\n    metadata: meta\n")
    with pytest.raises(ConfigError, match="embed.model and embed.provided"):
        load_config(str(path))
    path.write_text("input: pool\noutput: out\nembed:\n  provided:\n    metadata: meta\nselect:\n  dfn:\n    threshold: 0.3\n")
    with pytest.raises(ConfigError, match="embed.provided.dfn_score"):
        load_config(str(path))
