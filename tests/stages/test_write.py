import hashlib
import io
import stat
import tarfile

import pytest

from pipeline.stages.write import WriteError, balanced_sizes, uid_digest, write_shard
from tests.helpers import jpeg_bytes, make_tar


@pytest.mark.parametrize("count, size", [(0, 10), (1, 10), (10, 10), (11, 10), (1587, 500), (999, 1)])
def test_balanced_sizes_cover_everything_within_one(count, size):
    sizes = balanced_sizes(count, size)
    assert sum(sizes) == count
    if sizes:
        assert max(sizes) <= size and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-count // size)


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
        "uid": "ab" * 16, "source": str(path), "image_ext": "jpg", "sha256": hashlib.sha256(image).hexdigest(),
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


def test_written_shard_has_the_mode_of_an_ordinary_file(tmp_path, umask_022):
    sample, _ = _source(tmp_path)
    out = tmp_path / "out" / "00000000.tar"
    write_shard({"shard": 0, "samples": [sample]}, str(out), 1 << 16)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
