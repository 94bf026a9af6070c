"""The tar reader on hostile and broken shards: it never raises, never hangs, never ends early in
silence, and keeps every offset exact."""

import io
import random
import tarfile

import pyarrow as pa
import pytest

from pipeline.io.tar import TarReader, TarShardError, iter_tar_members
from tests.helpers import make_tar
from tests.tar_mutations import BLOCK, END, Unseekable, base256, header, member, mutate, padded, pax, random_shard

LIMIT = 1 << 20


def read(data: bytes, limit: int = LIMIT, *, seekable: bool = True):
    reader = TarReader(io.BytesIO(data) if seekable else Unseekable(data), limit)
    members = list(reader)
    for m in members:  # the invariants every test relies on
        m.name.encode("utf-8")  # no surrogates
        if m.problem is None:
            assert m.data == data[m.offset : m.offset + m.size]
    return members, reader


def names(members):
    return [m.name for m in members]


def test_a_corrupt_middle_header_is_skipped_and_named_with_its_offset():
    tar = make_tar([("a.jpg", b"A" * 700), ("b.jpg", b"B" * 1000), ("c.txt", b"C" * 10), ("d.txt", b"D")])
    broken = bytearray(tar)
    b_header = 512 + 1024  # after a.jpg's header and two data blocks
    broken[b_header + 10] ^= 0x55
    members, reader = read(bytes(broken))
    assert names(members) == ["a.jpg", "c.txt", "d.txt"]
    assert [m.data for m in members] == [b"A" * 700, b"C" * 10, b"D"]
    (gap,) = reader.breaks
    c_header = b_header + 512 + 1024
    assert (gap.offset, gap.resumed) == (b_header, c_header)
    assert str(gap) == f"corrupt tar header at byte {b_header}, resynchronised at byte {c_header} (1536 bytes skipped)"
    with pytest.raises(TarShardError, match=f"byte {b_header}"):  # the convenience wrapper, after every member
        list(iter_tar_members(io.BytesIO(bytes(broken)), LIMIT))


def test_every_corrupt_stretch_is_reported():
    tar = bytearray(make_tar([(f"{i}.txt", b"x" * 600) for i in range(6)]))
    for i in (1, 4):
        tar[i * 1536 + 3] ^= 1
    members, reader = read(bytes(tar))
    assert names(members) == ["0.txt", "2.txt", "3.txt", "5.txt"]
    assert [(b.offset, b.resumed) for b in reader.breaks] == [(1536, 3072), (6144, 7680)]


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("size_field", [base256(2**62), b"77777777777\x00"])
def test_a_size_far_beyond_the_file_is_refused_at_once(seekable, size_field):
    huge = header(b"huge.jpg", size_field) + b"\xab" * 2048
    tar = make_tar([("a.txt", b"first")])[:1024] + huge + member(b"b.txt", b"after") + END
    members, reader = read(tar, seekable=seekable)
    assert reader.blocks_examined <= 2 * (len(tar) // BLOCK + 2)  # never reads through the claimed size
    assert members[0].data == b"first"
    assert members[1].name == "huge.jpg" and members[1].problem == "oversize_member" and members[1].data is None
    if seekable:  # the size is known: the rest of the shard is searched, and b.txt found
        assert names(members) == ["a.txt", "huge.jpg", "b.txt"] and members[2].data == b"after"
        (gap,) = reader.breaks
        assert "'huge.jpg' at byte 1024 claims" in str(gap) and gap.resumed == 1024 + 512 + 2048
    else:  # unknown size: the claimed bytes are read (to the end) but never sought through
        assert names(members) == ["a.txt", "huge.jpg"]


def test_a_member_running_past_the_end_under_the_limit_is_truncated():
    tar = make_tar([("a.txt", b"first")])[:1024] + header(b"t.jpg", 5000) + b"\x01" * 1000
    members, reader = read(tar)
    assert names(members) == ["a.txt", "t.jpg"] and members[1].problem == "truncated"
    assert "claims 5000 bytes from byte 1536" in members[1].detail
    assert reader.breaks == []  # the cut member accounts for the loss


def test_pax_size_that_is_not_a_number_is_unsafe_and_the_stream_continues():
    tar = pax({b"size": b"1e20"}) + member(b"p.jpg", b"P" * 100) + member(b"q.txt", b"Q") + END
    members, reader = read(tar)
    assert names(members) == ["p.jpg", "q.txt"]
    assert members[0].problem == "unsafe_member" and "pax size" in members[0].detail
    assert members[1].data == b"Q" and reader.breaks == []


def test_pax_size_of_1e20_bytes_is_refused_without_seeking():
    tar = pax({b"size": b"1" + b"0" * 20}) + member(b"p.jpg", b"P" * 100) + member(b"q.txt", b"Q") + END
    for seekable in (True, False):
        members, reader = read(tar, seekable=seekable)
        assert members[0].name == "p.jpg" and members[0].problem == "oversize_member"
        assert reader.blocks_examined <= 2 * (len(tar) // BLOCK + 2)


@pytest.mark.parametrize("make", [
    lambda raw: member(raw, b"data"),
    lambda raw: pax({b"path": raw}) + member(b"named-by-pax.jpg", b"data"),
    lambda raw: member(b"././@LongLink", raw + b"\x00", b"L") + member(b"cut", b"data"),
])
def test_names_that_are_not_utf8_are_escaped_and_refused(make):
    tar = make(b"caf\xe9-\xff.jpg") + member(b"ok.txt", b"fine") + END
    members, reader = read(tar)
    bad, ok = members
    assert bad.name == "caf\\xe9-\\xff.jpg" and bad.key == "caf\\xe9-\\xff" and bad.ext == "jpg"
    assert bad.problem == "unsafe_member" and bad.data is None
    assert "caf\\\\xe9-\\\\xff.jpg" in bad.detail and "not valid UTF-8" in bad.detail
    pa.array([bad.name, bad.detail])  # Arrow takes them
    assert ok.data == b"fine" and reader.breaks == []


def test_old_gnu_sparse_member_is_refused_and_skipped_by_its_stored_size():
    stored = b"S" * 1500  # three blocks on disk; the expanded size (realsize) claims far more
    sparse = header(b"s.txt", len(stored), b"S", magic=b"ustar  \x00",
                    extra={386: b"00000000000\x00" + b"%011o\x00" % 1500, 482: b"\x01", 483: b"%011o\x00" % 10**9})
    extension = bytearray(BLOCK)  # one extension block, the last (isextended = 0 at byte 504)
    tar = (make_tar([("a.jpg", b"A")])[:1024] + sparse + bytes(extension) + stored + bytes(36)
           + member(b"s2.txt", b"caption") + END)
    members, reader = read(tar)
    assert names(members) == ["a.jpg", "s.txt", "s2.txt"]
    assert members[1].problem == "unsafe_member" and "GNU sparse member" in members[1].detail
    assert members[1].offset == 1024 + 1024 and members[1].size == 1500 and members[1].data is None
    assert members[2].data == b"caption" and reader.breaks == []


@pytest.mark.parametrize("records", [
    {b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0", b"GNU.sparse.name": b"s.txt",
     b"GNU.sparse.realsize": b"999999"},
    {b"GNU.sparse.size": b"999999", b"GNU.sparse.numblocks": b"1", b"GNU.sparse.offset": b"0",
     b"GNU.sparse.numbytes": b"700"},
    {b"GNU.sparse.map": b"0,700", b"GNU.sparse.name": b"s.txt", b"GNU.sparse.realsize": b"999999"},
])
def test_pax_gnu_sparse_member_is_refused_and_the_next_caption_is_intact(records):
    on_disk = b"512\n0\n700\n".ljust(512, b"\x00") + b"s" * 700  # (1.0 keeps its map in the data)
    tar = (pax(records) + member(b"./GNUSparseFile.0/s.txt", on_disk) + member(b"s.jpg", b"J")
           + member(b"n.txt", b"next caption") + END)
    members, reader = read(tar)
    # Known by its real name where the header gives it, so that the sample it belongs to is the one dropped.
    assert members[0].name == ("s.txt" if b"GNU.sparse.name" in records else "./GNUSparseFile.0/s.txt")
    assert members[0].problem == "unsafe_member" and members[0].detail.endswith("GNU sparse member")
    assert [m.data for m in members[1:]] == [b"J", b"next caption"] and reader.breaks == []


def test_a_file_that_ends_inside_a_header_names_the_offset():
    tar = make_tar([("a.jpg", b"A" * 10), ("b.txt", b"B")])
    members, reader = read(tar[: 1024 + 100])
    assert names(members) == ["a.jpg"]
    (gap,) = reader.breaks
    assert str(gap) == "the shard ends inside a tar header at byte 1024 (100 of 512 bytes)"


@pytest.mark.parametrize("seekable", [True, False])
def test_a_truncated_last_member_is_reported(seekable):
    tar = make_tar([("a.jpg", b"A" * 10), ("b.jpg", b"B" * 3000)])
    members, reader = read(tar[: 1024 + 512 + 1000], seekable=seekable)
    assert names(members) == ["a.jpg", "b.jpg"] and members[1].problem == "truncated"
    assert "b.jpg" in members[1].detail and "1536" in members[1].detail and reader.breaks == []


def test_an_extended_header_cut_short_is_a_break():
    tar = make_tar([("a.jpg", b"A")])[:1024] + header(b"././@LongLink", 300, b"L") + b"x" * 100
    members, reader = read(tar)
    assert names(members) == ["a.jpg"]
    assert str(reader.breaks[0]) == "the shard ends inside the extended header at byte 1024"


@pytest.mark.parametrize("data, why", [
    (b"", "the shard is empty (0 bytes)"),
    (b"<html>not a tar</html>" * 40,
     "corrupt tar header at byte 0, no valid header after it (880 bytes skipped to the end of the shard)"),
    (random.Random(3).randbytes(40_000), "corrupt tar header at byte 0, no valid header after it (40000 bytes skipped"),
    (b"garbage", "the shard ends inside a tar header at byte 0 (7 of 512 bytes)"),
])
def test_not_a_tar_yields_nothing_and_says_why(data, why):
    members, reader = read(data)
    assert members == [] and str(reader.breaks[0]).startswith(why) and len(reader.breaks) == 1
    with pytest.raises(TarShardError):
        list(iter_tar_members(io.BytesIO(data), LIMIT))


def test_an_empty_archive_is_no_error():
    members, reader = read(END * 5)
    assert members == [] and reader.breaks == []


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_keep_exact_offsets(fmt):
    long = "sub/" + "n" * 240 + ".txt"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in [(long, b"long one"), ("short.jpg", b"J" * 600), ("caf\u00e9.txt", b"accent")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    tar = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        listed = [(i.name, i.offset_data) for i in archive.getmembers()]
    members, reader = read(tar)
    assert [(m.name, m.offset) for m in members] == listed and reader.breaks == []
    assert members[0].key == "sub/" + "n" * 240 and members[0].data == b"long one"


def test_ustar_prefix_global_pax_header_and_a_lone_zero_block():
    tar = (pax({b"comment": b"made by git archive"}, b"g")
           + member(b"name.txt", b"prefixed", prefix=b"some/dir")
           + bytes(BLOCK)  # a lone zero block: padding, not the end
           + member(b"after.txt", b"still read") + END)
    members, reader = read(tar)
    assert names(members) == ["some/dir/name.txt", "after.txt"] and reader.breaks == []


def test_signed_checksums_are_accepted():
    block = header(b"\xc3\xa9t\xc3\xa9.txt", 2, signed=True)
    assert block != header(b"\xc3\xa9t\xc3\xa9.txt", 2)
    members, _ = read(block + padded(b"ok") + END)
    assert names(members) == ["\u00e9t\u00e9.txt"] and members[0].data == b"ok"


def test_a_malformed_pax_header_makes_its_member_unsafe():
    bad = member(b"././@PaxHeader", b"99 path=x.jpg\n", b"x")  # the length does not match
    members, reader = read(bad + member(b"x.jpg", b"X") + member(b"y.txt", b"Y") + END)
    assert members[0].problem == "unsafe_member" and "malformed" in members[0].detail
    assert members[1].data == b"Y" and reader.breaks == []


def test_an_implausible_long_name_header_is_corrupt():
    tar = header(b"././@LongLink", base256(2**40), b"L") + member(b"a.txt", b"A") + END
    members, reader = read(tar)
    assert names(members) == ["a.txt"] and reader.breaks[0].resumed == BLOCK


def test_links_devices_and_traversal_in_raw_headers_stay_refused():
    tar = (header(b"s.jpg", 0, b"2", linkname=b"/etc/passwd") + header(b"d.jpg", 0, b"3")
           + member(b"../x.txt", b"e") + member(b"v.txt", b"", b"V") + member(b"ok.txt", b"ok") + END)
    members, _ = read(tar)
    assert [m.problem for m in members] == ["unsafe_member"] * 4 + [None]
    whys = ["symbolic link to '/etc/passwd'", "device entry", "parent-directory traversal", "unsupported member type b'V'"]
    assert all(why in m.detail for why, m in zip(whys, members, strict=False)) and members[4].data == b"ok"


def test_fuzzed_shards_never_raise_never_hang_and_lose_no_untouched_member():
    """Seeded mutations of small shards: byte flips in headers and anywhere, huge sizes with valid
    checksums, cuts and inserted garbage. Every member tarfile lists in the unmutated shard that no
    mutation touched must be found, with its data, at its (shifted) offset; no exception may escape
    and the blocks examined stay within twice the shard's blocks."""
    rng = random.Random(20261202)
    bases = [random_shard(rng) for _ in range(40)]
    cases = checked = 0
    for case in range(5000):
        shard, listing = bases[case % len(bases)]
        data, expected = mutate(rng, shard, listing)
        members, reader = read(data)
        assert reader.blocks_examined <= 2 * (len(data) // BLOCK + 2), case  # bounded work
        found = {(m.name, m.offset): m for m in members}
        for want in expected:
            got = found.get((want.name, want.offset))
            assert got is not None and got.problem is None and got.data == want.data, (case, want.name, reader.breaks)
        if case % 4 == 0:  # unknown size: the same invariants, though what follows a huge size is read as its data
            read(data, seekable=False)
        cases += 1
        checked += len(expected)
    assert cases == 5000 and checked > 10_000
