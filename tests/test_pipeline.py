"""End to end on an embedded Ray: every sample accounted for, deterministic, resumable."""

import filecmp
import gzip
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import UserError
from pipeline.io.catalog import connect
from pipeline.runner import format_summary, run_pipeline
from tests.helpers import jpeg_bytes, link, make_tar, png_header_only, read_metadata, run_config, shard_members

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def first_run(synth_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = run_pipeline(run_config(synth_pool, out, write={"shard_size": 100}))
    return out, summary


def test_every_input_sample_is_kept_or_dropped_with_a_reason(first_run, synth_pool):
    out, summary = first_run
    truth = pq.read_table(synth_pool / "truth" / "truth.parquet").to_pandas()
    meta = read_metadata(out).to_pandas()
    assert len(meta) == len(truth) == summary.samples
    assert set(zip(meta.shard, meta.key)) == set(zip(truth.shard, truth.key))
    assert (meta.kept == meta.drop_reason.isna()).all()
    assert summary.kept + sum(summary.dropped.values()) == summary.samples
    assert Counter(meta.drop_reason.dropna()) == Counter(summary.dropped)


def test_each_kept_uid_is_in_the_shards_exactly_once(first_run):
    out, summary = first_run
    meta = read_metadata(out).to_pandas()
    kept = meta[meta.kept]
    names = shard_members(out)
    image_uids = [n.split(".")[0] for n in names if n.endswith((".jpg", ".jpeg", ".png", ".webp"))]
    assert sorted(image_uids) == sorted(kept.uid)
    assert Counter(n.split(".")[0] for n in names if n.endswith(".txt")) == Counter(kept.uid)
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == summary.kept
    assert max(sizes.values()) - min(sizes.values()) <= 1  # balanced
    assert max(sizes.values()) <= 100


def test_output_bytes_are_the_input_bytes(first_run, synth_pool):
    import io
    import tarfile

    out, _ = first_run
    meta = read_metadata(out).to_pandas().set_index("uid")
    originals = {}
    for shard in synth_pool.glob("*.tar"):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                originals[(shard.name, member.name)] = archive.extractfile(member).read()
    checked = 0
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                uid, ext = member.name.split(".", 1)
                row = meta.loc[uid]
                assert archive.extractfile(member).read() == originals[(row.shard, f"{row.key}.{ext}")]
                checked += 1
    assert checked >= 3 * 100


def test_ingest_flags_equal_the_injected_defects(first_run, synth_pool):
    out, _ = first_run
    truth = pq.read_table(synth_pool / "truth" / "truth.parquet").to_pandas()
    meta = read_metadata(out).to_pandas().merge(truth[["shard", "key", "defects"]], on=["shard", "key"])
    injected = lambda defect: set(meta[meta.defects.map(lambda d: defect in list(d))].uid)
    flagged = lambda reason: set(meta[meta.drop_reason == reason].uid)
    for defect, reason in [
        ("corrupt_image", "corrupt_image"),
        ("missing_caption", "missing_caption"),
        ("short_caption", "caption_too_short"),
        ("small_image", "image_too_small"),
        ("extreme_aspect", "extreme_aspect"),
    ]:
        assert injected(defect), defect
        assert flagged(reason) == injected(defect), reason
    # Language id is statistical: lid.176 on templated captions. Bounds: all injected non-English
    # captions are real sentences of >= 5 words, which lid.176 labels correctly almost always.
    non_english, not_english = injected("non_english"), flagged("not_english")
    assert len(non_english & not_english) >= 0.95 * len(non_english)
    assert len(not_english - non_english) <= 0.01 * len(meta)


def test_same_input_and_config_give_byte_identical_output(first_run, synth_pool, tmp_path):
    out, _ = first_run
    again = tmp_path / "again"
    run_pipeline(run_config(synth_pool, again, write={"shard_size": 100}))
    for folder, pattern in [("shards", "*.tar"), ("metadata", "*.parquet")]:
        first = sorted(p.name for p in (out / folder).glob(pattern))
        second = sorted(p.name for p in (again / folder).glob(pattern))
        assert first == second and first
        match, mismatch, errors = filecmp.cmpfiles(out / folder, again / folder, first, shallow=False)
        assert not mismatch and not errors
    assert (out / "shards" / "sizes.json").read_bytes() == (again / "shards" / "sizes.json").read_bytes()


def test_rerun_skips_completed_stages_and_config_changes_rerun_only_what_they_touch(synth_pool, tmp_path):
    out = tmp_path / "out"
    run_pipeline(run_config(synth_pool, out, write={"shard_size": 100}))
    ingest_part = next((out / "stages" / "ingest").glob("*.parquet"))
    stamp = ingest_part.stat().st_mtime_ns
    summary = run_pipeline(run_config(synth_pool, out, write={"shard_size": 100}))
    assert all(s["skipped"] for s in summary.stages.values())
    summary = run_pipeline(run_config(synth_pool, out, write={"shard_size": 40}))
    skipped = {name for name, s in summary.stages.items() if s["skipped"]}
    assert skipped == {"ingest", "dedup", "metadata"}
    assert ingest_part.stat().st_mtime_ns == stamp
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert max(sizes.values()) <= 40 and sum(sizes.values()) == summary.kept
    assert len(list((out / "shards").glob("*.tar"))) == len(sizes)  # no stale shards left


def test_interrupted_stage_resumes_from_its_done_partitions(synth_pool, tmp_path, first_run):
    out = tmp_path / "out"
    run_pipeline(run_config(synth_pool, out, write={"shard_size": 100}))
    manifest = json.loads((out / "manifest.json").read_text())
    # As if the driver died during ingest after two partitions: later stages never ran.
    ingest = manifest["stages"]["ingest"]
    ingest.update(complete=False, partitions_done=[0, 1])
    ingest["counts"]["partitions"] = {k: v for k, v in ingest["counts"]["partitions"].items() if k in ("0", "1")}
    for name in ("dedup", "metadata", "write"):
        manifest["stages"].pop(name)
    (out / "manifest.json").write_text(json.dumps(manifest))
    kept_parts = {p: p.stat().st_mtime_ns for p in (out / "stages" / "ingest").glob("part-00000[01].parquet")}
    for p in (out / "stages" / "ingest").glob("part-00000[23].parquet"):
        p.unlink()
    for folder in ("metadata", "shards"):
        for p in (out / folder).iterdir():
            p.unlink()
    summary = run_pipeline(run_config(synth_pool, out, write={"shard_size": 100}))
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in kept_parts.items())  # not redone
    reference, _ = first_run
    for folder in ("metadata", "shards"):
        names = sorted(p.name for p in (reference / folder).iterdir())
        assert names == sorted(p.name for p in (out / folder).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(reference / folder, out / folder, names, shallow=False)
        assert not mismatch and not errors
    assert summary.samples == 600


def test_hostile_and_broken_shards_end_in_metadata_and_nothing_escapes(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    caption = b"a photo of a green triangle on a grey background"
    (pool / "00000000.tar").write_bytes(make_tar([
        ("../../escape.jpg", jpeg_bytes()), ("../../escape.txt", caption),
        link("link.jpg", "/etc/passwd"), ("link.txt", caption),
        ("/abs/evil.jpg", jpeg_bytes()), ("/abs/evil.txt", caption),
        ("good.jpg", jpeg_bytes()), ("good.txt", caption),
    ]))
    (pool / "00000001.tar").write_bytes(make_tar([("bomb.png", png_header_only(30000, 30000)), ("bomb.txt", caption)]))
    whole = make_tar([("a.jpg", jpeg_bytes(300, 300)), ("a.txt", caption), ("b.jpg", jpeg_bytes(400, 400)), ("b.txt", caption)])
    (pool / "00000002.tar").write_bytes(whole[: len(whole) // 2])
    (pool / "00000003.tar").write_bytes(b"this is not a tar file at all" * 100)
    # gzip-compressed shards are read, and a key repeated within a shard is a row of its own
    (pool / "00000004.tar.gz").write_bytes(gzip.compress(make_tar([
        ("z.jpg", jpeg_bytes(280, 280)), ("z.txt", caption), ("z.jpg", jpeg_bytes(290, 290)), ("z.txt", caption),
    ]), mtime=0))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "out"
    summary = run_pipeline(run_config(pool, out))
    after = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out}
    assert after == before  # nothing written outside the output directory
    assert not list(tmp_path.parent.rglob("escape*")) and not (tmp_path.parent / "abs").exists()
    meta = read_metadata(out).to_pandas().set_index("key")
    assert meta.loc["../../escape", "drop_reason"] == "unsafe_member"
    assert meta.loc["link", "drop_reason"] == "unsafe_member"
    assert meta.loc["/abs/evil", "drop_reason"] == "unsafe_member"
    assert meta.loc["bomb", "drop_reason"] == "image_too_large"
    assert meta.loc["good", "kept"]
    assert meta.loc["a", "kept"] and meta.loc["b", "drop_reason"] == "truncated"
    gzipped = meta[meta.shard == "00000004.tar.gz"]
    assert sorted(gzipped.drop_reason.fillna("kept")) == ["duplicate_key", "kept"]
    assert summary.kept == 3 and summary.samples == 9
    # one entry per shard not read to its end, at the top of the manifest, in the catalog and the summary
    manifest = json.loads((out / "manifest.json").read_text())
    errors = manifest["shard_errors"]
    assert [(e["shard"], type(e["offset"])) for e in errors] == [("00000002.tar", int), ("00000003.tar", int)]
    assert "b.jpg" in errors[0]["error"] and "corrupt tar header at byte 0" in errors[1]["error"]
    assert not any(e["error"].startswith("shard ") for e in errors)  # the shard is its own field
    assert summary.shard_errors == errors
    assert "shard errors: 2 input shard(s) could not be read to their end (first: 00000002.tar" in format_summary(summary)
    con = connect(str(out))
    assert con.execute('select shard, "offset", error from shard_errors order by shard').fetchall() == [
        (e["shard"], e["offset"], e["error"]) for e in errors]
    con.close()
    report = (out / "report.html").read_text()
    assert 'id="shard-errors-table"' in report and "00000003.tar" in report
    assert sorted(n.split(".")[0] for n in shard_members(out) if n.endswith(".jpg")) == sorted(meta[meta.kept].uid)


def test_missing_input_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_pipeline(run_config(tmp_path / "nope", tmp_path / "out"))


def test_open_clip_s_webdataset_loader_reads_the_shards(first_run):
    import webdataset as wds

    out, summary = first_run
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    # the pipeline open_clip's trainer builds: tar -> samples -> decode -> rename image/text
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg;png;jpeg;webp", "txt")
    seen = 0
    for image, text in dataset:
        assert image.size[0] > 0 and isinstance(text, str) and text
        seen += 1
    assert seen == summary.kept


def test_the_invariant_check_finds_a_kept_uid_twice(first_run, tmp_path):
    """The check runs on what the files hold: a kept uid written into another kept row fails it."""
    from pipeline.io.manifest import Manifest
    from pipeline.run import RunPaths
    from pipeline.runner import InvariantError, check_invariant

    out, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert check_invariant(RunPaths(str(copy)), Manifest.load(str(copy / "manifest.json"))).kept > 1
    part = sorted((copy / "metadata").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    kept = [i for i, k in enumerate(table.column("kept").to_pylist()) if k]
    uids = table.column("uid").to_pylist()
    uids[kept[1]] = uids[kept[0]]
    pq.write_table(table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids, table.schema.field("uid").type)), part)
    with pytest.raises(InvariantError, match="1 kept uids are not unique"):
        check_invariant(RunPaths(str(copy)), Manifest.load(str(copy / "manifest.json")))
