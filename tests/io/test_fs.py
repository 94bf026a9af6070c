import stat

from pipeline.io import fs
from tests.helpers import jpeg_bytes, make_tar


def test_a_directory_named_like_a_shard_is_not_a_shard(tmp_path):
    pool = tmp_path / "pool"
    (pool / "x.tar").mkdir(parents=True)
    (pool / "00000000.tar").write_bytes(make_tar([("a.jpg", jpeg_bytes()), ("a.txt", b"a caption here")]))
    shard = str(pool / "00000000.tar")
    assert fs.resolve_shards(str(pool)) == [shard]
    assert fs.resolve_shards(f"{pool}/*.tar") == [shard]
    assert fs.resolve_files([str(pool), f"{pool}/x*"], ".tar") == [shard]


def test_atomically_written_files_have_the_mode_of_an_ordinary_file(tmp_path, umask_022):
    fs.write_bytes_atomic(str(tmp_path / "a.bin"), b"abc")
    with fs.atomic_open(str(tmp_path / "sub" / "b.bin")) as handle:
        handle.write(b"def")
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "sub" / "b.bin").stat().st_mode) == 0o644


def test_remove_temporaries_takes_only_the_unfinished_writes(tmp_path):
    from pipeline.io.fs import remove_temporaries

    keep = [tmp_path / "manifest.json", tmp_path / "metadata" / "part-000000.parquet", tmp_path / "shards" / "00000000.tar"]
    stale = [tmp_path / "manifest.json.tmp-0a1b", tmp_path / "metadata" / "part-000001.parquet.tmp-ff",
             tmp_path / "shards" / ".tmp-9c.tar"]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert remove_temporaries(str(tmp_path)) == 3
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert remove_temporaries(str(tmp_path / "absent")) == 0
