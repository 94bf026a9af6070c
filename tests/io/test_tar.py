import io
import tarfile

import pytest

from pipeline.io.tar import TarShardError, TarWriter, iter_tar_members, split_key
from tests.helpers import device, link, make_tar


def read_all(data: bytes, limit: int = 1 << 20):
    return list(iter_tar_members(io.BytesIO(data), limit))


@pytest.mark.parametrize(
    "name, key, ext",
    [
        ("000001.jpg", "000001", "jpg"),
        ("dir/a.b.JPG", "dir/a", "b.jpg"),
        ("a.b/c.txt", "a.b/c", "txt"),
        ("noext", "noext", ""),
    ],
)
def test_split_key_follows_webdataset(name, key, ext):
    assert split_key(name) == (key, ext)


def test_safe_members_are_read_with_their_offsets():
    data = make_tar([("a.jpg", b"J" * 700), ("a.txt", b"hello")])
    members = read_all(data)
    assert [(m.key, m.ext, m.data) for m in members] == [("a", "jpg", b"J" * 700), ("a", "txt", b"hello")]
    for m in members:  # the recorded range really holds the member's bytes
        assert data[m.offset : m.offset + m.size] == m.data


@pytest.mark.parametrize(
    "member, why",
    [
        (("../../x.txt", b"evil"), "parent-directory traversal"),
        (("/etc/passwd.txt", b"evil"), "absolute path"),
        (("a/../../b.jpg", b"evil"), "parent-directory traversal"),
        (link("s.jpg", "/etc/passwd"), "symbolic link"),
        (link("h.jpg", "a.jpg", tarfile.LNKTYPE), "hard link"),
        (device("d.jpg"), "device"),
        (device("f.txt", tarfile.FIFOTYPE), "fifo"),
    ],
)
def test_hostile_members_are_reported_and_never_read(member, why):
    members = read_all(make_tar([member, ("ok.txt", b"fine")]))
    bad, ok = members
    assert bad.problem == "unsafe_member" and why in bad.detail and bad.data is None
    assert ok.problem is None and ok.data == b"fine"


def test_oversize_member_is_skipped_but_the_stream_continues():
    members = read_all(make_tar([("big.jpg", b"x" * 5000), ("a.txt", b"t")]), limit=1000)
    assert members[0].problem == "oversize_member" and members[0].data is None
    assert members[1].data == b"t"


def test_truncated_member_stops_the_stream_with_a_reason():
    data = make_tar([("a.jpg", b"J" * 2000), ("b.jpg", b"K" * 4000), ("c.jpg", b"L" * 100)])
    cut = data[: 512 + 2048 + 512 + 1000]  # inside b.jpg's data
    members = read_all(cut)
    assert [m.name for m in members] == ["a.jpg", "b.jpg"]
    assert members[0].data == b"J" * 2000
    assert members[1].problem == "truncated" and "b.jpg" in members[1].detail


def test_garbage_is_a_shard_error_not_a_crash():
    with pytest.raises(TarShardError):
        read_all(b"<html>not a tar</html>" * 40)


def test_writer_is_deterministic_and_readable():
    def build():
        buffer = io.BytesIO()
        with TarWriter(buffer) as writer:
            writer.add("a.jpg", b"123")
            writer.add("a.txt", b"caption")
        return buffer.getvalue()

    first, second = build(), build()
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        infos = archive.getmembers()
        assert [i.name for i in infos] == ["a.jpg", "a.txt"]
        assert all(i.mtime == 0 and i.uname == "" and i.mode == 0o444 for i in infos)
