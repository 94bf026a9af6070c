"""Embeddings and scores from DataComp-style metadata instead of a model pass.

A run that computes embeddings is exported into DataComp's layout (metadata .parquet + .npz
row-aligned beside it, rows in another order and split unlike the shards); a second run takes them
from there and must reach the same decisions and scores, with no model loaded. The uid join that
finds each sample's metadata row gives the same bytes in one task as through a shuffle of many
buckets, and names the same uid when it fails.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.io.embeddings import vectors
from pipeline.runner import run_pipeline
from pipeline.stages.embed import NO_TEXT, NOT_EMBEDDED, EmbedError
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


def _expected_embeddings(ingest_part, metadata_dir):
    """A partition's embeddings as the metadata gives them: every ingest row in order, l14 vectors
    as stored, clip_score from clip_l14_similarity_score, nulls where not embedded or without text."""
    rows = {}
    for path in sorted(metadata_dir.glob("*.parquet")):
        table = pq.read_table(path, columns=["uid", "clip_l14_similarity_score"]).to_pylist()
        arrays = np.load(path.with_suffix(".npz"))
        for i, row in enumerate(table):
            rows[row["uid"]] = (arrays["l14_img"][i], arrays["l14_txt"][i], row["clip_l14_similarity_score"])
    image, text, clip = [], [], []
    for row in pq.read_table(ingest_part, columns=["uid", "drop_reason"]).to_pylist():
        embedded = row["drop_reason"] not in NOT_EMBEDDED
        with_text = embedded and row["drop_reason"] not in NO_TEXT
        found = rows[row["uid"]] if embedded else None
        image.append(found[0].tolist() if embedded else None)
        text.append(found[1].tolist() if with_text else None)
        clip.append(float(np.float32(found[2])) if with_text else None)
    return image, text, clip


def test_one_bucket_and_many_give_the_same_bytes_and_the_metadata_s_values(computed, synth_pool, tmp_path):
    root, _, _ = computed
    provided = {"provided": {"metadata": str(root / "metadata")}}
    one, many = tmp_path / "one", tmp_path / "many"
    run_pipeline(run_config(synth_pool, one, embed=provided))
    run_pipeline(run_config(synth_pool, many, embed=provided, ray={"rows_per_bucket": 7}))
    parts = sorted(p.name for p in (one / "embeddings").glob("part-*.parquet"))
    assert len(parts) == 4
    assert {p: (one / "embeddings" / p).read_bytes() for p in parts} == \
        {p: (many / "embeddings" / p).read_bytes() for p in sorted(q.name for q in (many / "embeddings").iterdir())}
    embedded = 0
    for name in parts:
        got = pq.read_table(one / "embeddings" / name)
        image, text, clip = _expected_embeddings(one / "stages" / "ingest" / name, root / "metadata")
        assert got.column("uid").to_pylist() == pq.read_table(one / "stages" / "ingest" / name).column("uid").to_pylist()
        assert got.column("image_embedding").to_pylist() == image
        assert got.column("text_embedding").to_pylist() == text
        assert got.column("clip_score").to_pylist() == clip
        assert got.column("dfn_score").null_count == got.num_rows
        embedded += sum(v is not None for v in image)
    assert 0 < embedded < 600  # some rows ingest dropped, the rest embedded
    assert not (one / "stages" / "embed").exists() and not (many / "stages" / "embed").exists()  # the join's files


def _metadata_copy(root, folder, names):
    folder.mkdir()
    for name in names:
        for suffix in (".parquet", ".npz"):
            (folder / f"{name}{suffix}").write_bytes((root / "metadata" / f"00000000{suffix}").read_bytes())


def _failure(synth_pool, out, metadata, **ray):
    with pytest.raises((EmbedError, ValueError)) as failure:
        run_pipeline(run_config(synth_pool, out, embed={"provided": {"metadata": str(metadata)}}, ray=ray))
    return failure.value


def test_a_sample_missing_from_the_metadata_fails_naming_shard_and_uid(computed, synth_pool, tmp_path):
    root, _, _ = computed
    partial = tmp_path / "metadata"
    _metadata_copy(root, partial, ["00000000"])
    one = _failure(synth_pool, tmp_path / "one", partial)
    assert isinstance(one, EmbedError)
    # the first partition with samples the metadata lacks, its count and first such uid in row order
    known = set(pq.read_table(partial / "00000000.parquet", columns=["uid"]).column("uid").to_pylist())
    for index, shard in enumerate(sorted(synth_pool.glob("*.tar"))):
        ingest = pq.read_table(tmp_path / "one" / "stages" / "ingest" / f"part-{index:06d}.parquet").to_pylist()
        lacking = [r["uid"] for r in ingest if r["drop_reason"] not in NOT_EMBEDDED and r["uid"] not in known]
        if lacking:
            break
    assert str(one) == (f"shard {shard}: {len(lacking)} sample(s) have no row in the metadata {partial}, first uid "
                        f"{lacking[0]}; embed.provided needs a row for every sample it embeds")
    assert str(_failure(synth_pool, tmp_path / "many", partial, rows_per_bucket=7)) == str(one)


def test_a_uid_in_two_metadata_rows_fails_naming_the_smallest(computed, synth_pool, tmp_path):
    root, _, _ = computed
    twice = tmp_path / "metadata"
    _metadata_copy(root, twice, ["00000000", "00000001"])  # every uid of the file in two rows
    smallest = min(pq.read_table(twice / "00000000.parquet", columns=["uid"]).column("uid").to_pylist())
    want = f"DataComp metadata: uid {smallest} appears in more than one row of 2 file(s)"
    for out, ray in (("one", {}), ("many", {"rows_per_bucket": 7})):
        failure = _failure(synth_pool, tmp_path / out, twice, **ray)
        assert type(failure) is ValueError and str(failure) == want


def test_a_metadata_uid_that_is_not_32_hex_digits_is_named(computed, synth_pool, tmp_path):
    root, _, _ = computed
    bad = tmp_path / "metadata"
    _metadata_copy(root, bad, ["00000000"])
    table = pq.read_table(bad / "00000000.parquet")
    uids = table.column("uid").to_pylist()
    uids[3] = "not-a-uid"
    pq.write_table(table.set_column(0, "uid", pa.array(uids)), bad / "00000000.parquet")
    failure = _failure(synth_pool, tmp_path / "out", bad)
    assert str(failure) == f"{bad / '00000000.parquet'}: uid 'not-a-uid' is not a DataComp uid (32 hex digits)"


def test_provided_and_a_model_cannot_both_be_set(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: pool\noutput: out\nembed:\n  model: ViT-B-32\n  provided:\n    metadata: meta\n")
    with pytest.raises(ConfigError, match="embed.model and embed.provided"):
        load_config(str(path))
    path.write_text("input: pool\noutput: out\nembed:\n  provided:\n    metadata: meta\nselect:\n  dfn:\n    threshold: 0.3\n")
    with pytest.raises(ConfigError, match="embed.provided.dfn_score"):
        load_config(str(path))
