import gzip
import hashlib
import io
import stat
import tarfile

import pytest

from pipeline.stages.write import WriteError, balanced_sizes, plan_slices, published_ext, uid_digest, write_shard
from tests.helpers import jpeg_bytes, make_tar


@pytest.mark.parametrize("count, size", [(0, 10), (1, 10), (10, 10), (11, 10), (1587, 500), (999, 1)])
def test_balanced_sizes_cover_everything_within_one(count, size):
    sizes = balanced_sizes(count, size)
    assert sum(sizes) == count
    if sizes:
        assert max(sizes) <= size and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-count // size)


def _expand(plan):
    """The (partition, kept row) of each planned sample, shard by shard."""
    return [[(p, i) for p, first, stop in slices for i in range(first, stop)] for slices in plan]


def test_plan_slices_number_kept_samples_in_pool_order_and_skip_empty_partitions():
    kept = {0: 3, 1: 0, 2: 1, 3: 0, 4: 4}
    plan = plan_slices(kept, 3)  # 8 kept: shards of 3, 3, 2
    assert plan == [[(0, 0, 3)], [(2, 0, 1), (4, 0, 2)], [(4, 2, 4)]]
    assert _expand(plan) == [[(0, 0), (0, 1), (0, 2)], [(2, 0), (4, 0), (4, 1)], [(4, 2), (4, 3)]]


def test_plan_slices_a_shard_spans_several_partitions_and_a_partition_several_shards():
    plan = plan_slices({0: 2, 1: 1, 2: 5, 3: 2}, 4)  # 10 kept: shards of 4, 3, 3
    assert plan == [[(0, 0, 2), (1, 0, 1), (2, 0, 1)], [(2, 1, 4)], [(2, 4, 5), (3, 0, 2)]]
    assert [sum(stop - first for _, first, stop in slices) for slices in plan] == balanced_sizes(10, 4)


def test_plan_slices_partition_with_one_sample_and_all_empty():
    assert plan_slices({0: 1}, 10) == [[(0, 0, 1)]]
    assert plan_slices({0: 0, 1: 1, 2: 0}, 1) == [[(1, 0, 1)]]
    assert plan_slices({0: 0, 1: 0}, 5) == []
    assert plan_slices({}, 5) == []


@pytest.mark.parametrize("seed", range(20))
def test_plan_slices_covers_every_kept_sample_once_in_order(seed):
    import random

    rng = random.Random(seed)
    kept = {p: rng.choice([0, 0, 1, rng.randint(0, 50)]) for p in range(rng.randint(0, 12))}
    size = rng.randint(1, 40)
    plan = plan_slices(kept, size)
    assert [len(samples) for samples in _expand(plan)] == balanced_sizes(sum(kept.values()), size)
    assert [s for samples in _expand(plan) for s in samples] == [(p, i) for p in sorted(kept) for i in range(kept[p])]
    assert all(first < stop for slices in plan for _, first, stop in slices)


def test_uid_digest_is_a_multiset_fingerprint():
    assert uid_digest(["a", "b", "c"]) == uid_digest(["c", "a", "b"])
    assert uid_digest(["a", "b"]) != uid_digest(["a", "b", "b"])
    assert uid_digest(["a", "b"]) != uid_digest(["a", "c"])


def _source(tmp_path):
    image = jpeg_bytes()
    data = make_tar([("k.jpg", image), ("k.txt", b"a caption here"), ("k.json", b'{"a": 1}')])
    path = tmp_path / "src.tar"
    path.write_bytes(data)
    with tarfile.open(path) as archive:
        infos = {m.name: m for m in archive.getmembers()}
    sample = {
        "uid": "ab" * 16, "source": str(path), "image_ext": "jpg", "image_format": "JPEG",
        "sha256": hashlib.sha256(image).hexdigest(),
        "text_sha256": hashlib.sha256(b"a caption here").hexdigest(), "json_sha256": hashlib.sha256(b'{"a": 1}').hexdigest(),
        **{f"{kind}_offset": infos[f"k.{ext}"].offset_data for kind, ext in [("image", "jpg"), ("text", "txt"), ("json", "json")]},
        **{f"{kind}_size": infos[f"k.{ext}"].size for kind, ext in [("image", "jpg"), ("text", "txt"), ("json", "json")]},
    }
    return sample, image


def test_write_shard_copies_members_byte_for_byte(tmp_path):
    sample, image = _source(tmp_path)
    out = tmp_path / "out" / "00000000.tar"
    count, digest = write_shard({"shard": 0, "samples": [sample]}, str(out), 1 << 16)
    assert count == 1 and digest == uid_digest([sample["uid"]])
    with tarfile.open(out) as archive:
        assert archive.getnames() == [f"{'ab' * 16}.jpg", f"{'ab' * 16}.txt", f"{'ab' * 16}.json"]
        assert archive.extractfile(f"{'ab' * 16}.jpg").read() == image
    assert [p.name for p in out.parent.iterdir()] == ["00000000.tar"]  # no temporary file left


def test_write_shard_refuses_a_source_that_changed(tmp_path):
    sample, _ = _source(tmp_path)
    sample["sha256"] = "0" * 64
    out = tmp_path / "out" / "00000000.tar"
    with pytest.raises(WriteError, match=f"sample {'ab' * 16}"):
        write_shard({"shard": 0, "samples": [sample]}, str(out), 1 << 16)
    assert not out.exists() and not list(out.parent.iterdir())


@pytest.mark.parametrize("kind", ["text", "json"])
def test_write_shard_refuses_a_caption_or_json_that_changed(tmp_path, kind):
    sample, _ = _source(tmp_path)
    source = tmp_path / "src.tar"
    data = bytearray(source.read_bytes())
    data[sample[f"{kind}_offset"]] ^= 0x20  # same size, one byte of another case
    source.write_bytes(bytes(data))
    out = tmp_path / "out" / "00000000.tar"
    with pytest.raises(WriteError, match=f"sample {'ab' * 16}: {kind} bytes differ from those ingested"):
        write_shard({"shard": 0, "samples": [sample]}, str(out), 1 << 16)
    assert not out.exists()


def test_an_image_is_published_under_the_extension_of_its_format(tmp_path):
    sample, _ = _source(tmp_path)
    assert published_ext(sample) == "jpg"
    assert published_ext({**sample, "image_ext": "jpeg"}) == "jpeg"  # another name for the same format stays
    assert published_ext({**sample, "image_format": "PNG"}) == "png"
    assert published_ext({**sample, "image_format": "MPO"}) == "jpg"  # a format without an extension of its own
    out = tmp_path / "out" / "00000000.tar"
    write_shard({"shard": 0, "samples": [{**sample, "image_format": "PNG"}]}, str(out), 1 << 16)
    with tarfile.open(out) as archive:
        assert archive.getnames()[0] == f"{'ab' * 16}.png"


def test_members_of_a_gzip_shard_are_fetched_by_their_uncompressed_offsets(tmp_path):
    sample, image = _source(tmp_path)
    plain = tmp_path / "src.tar"
    packed = tmp_path / "src.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    out = tmp_path / "out" / "00000000.tar"
    write_shard({"shard": 0, "samples": [{**sample, "source": str(packed)}]}, str(out), 1 << 16)
    with tarfile.open(out) as archive:
        assert archive.extractfile(f"{'ab' * 16}.jpg").read() == image
        assert archive.extractfile(f"{'ab' * 16}.txt").read() == b"a caption here"


def test_written_shard_has_the_mode_of_an_ordinary_file(tmp_path, umask_022):
    sample, _ = _source(tmp_path)
    out = tmp_path / "out" / "00000000.tar"
    write_shard({"shard": 0, "samples": [sample]}, str(out), 1 << 16)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def _metadata_file(path, partition, kept):
    """A metadata file of PLAN_COLUMNS whose rows are stored out of row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(range(len(kept)))[::-1]
    table = pa.table({
        "uid": [f"{partition:016x}{row:016x}" for row in rows], "partition": [partition] * len(rows), "row": rows,
        "kept": [kept[row] for row in rows], "sha256": ["0" * 64] * len(rows), "image_ext": ["jpg"] * len(rows),
        "image_format": ["JPEG"] * len(rows), "text_sha256": ["1" * 64] * len(rows), "json_sha256": ["2" * 64] * len(rows),
        **{f"{kind}_{field}": rows for kind in ("image", "text", "json") for field in ("offset", "size")},
        "face_bboxes": pa.nulls(len(rows), pa.list_(pa.list_(pa.float64()))), "faces_blurred": pa.nulls(len(rows), pa.bool_()),
        "blurred_sha256": pa.nulls(len(rows), pa.string()),
    })
    pq.write_table(table, path)
    return str(path)


def test_shard_samples_are_the_slices_of_kept_rows_in_row_order(tmp_path):
    from pipeline.stages.write import shard_samples

    item = {
        "slices": [(0, 1, 3), (2, 0, 1)],
        "metadata": {0: _metadata_file(tmp_path / "m0.parquet", 0, [True, False, True, True, True]),
                     2: _metadata_file(tmp_path / "m2.parquet", 2, [False, True])},
        "sources": {0: "pool/a.tar", 2: "pool/c.tar"},
    }
    samples = shard_samples(item)
    assert [(s["partition"], s["row"], s["source"]) for s in samples] == [(0, 2, "pool/a.tar"), (0, 3, "pool/a.tar"),
                                                                           (2, 1, "pool/c.tar")]
    assert "kept" not in samples[0]
    with pytest.raises(WriteError, match="expects at least 5"):
        shard_samples({**item, "slices": [(2, 0, 5)]})


def test_kept_subset_from_the_metadata_equals_the_subset_of_the_kept_uids(tmp_path):
    from pipeline.io.datacomp import write_subset
    from pipeline.stages.write import write_kept_subset

    urls = [_metadata_file(tmp_path / "m0.parquet", 3, [True, False, True]),
            _metadata_file(tmp_path / "m1.parquet", 1, [False, False]),
            _metadata_file(tmp_path / "m2.parquet", 0, [True, True])]
    kept = [f"{p:016x}{r:016x}" for p, r in [(3, 0), (3, 2), (0, 0), (0, 1)]]
    assert write_kept_subset(str(tmp_path / "remote.npy"), urls) == 4
    write_subset(str(tmp_path / "driver.npy"), kept)
    assert (tmp_path / "remote.npy").read_bytes() == (tmp_path / "driver.npy").read_bytes()
    write_kept_subset(str(tmp_path / "none.npy"), [urls[1]])
    write_subset(str(tmp_path / "none-driver.npy"), [])
    assert (tmp_path / "none.npy").read_bytes() == (tmp_path / "none-driver.npy").read_bytes()
