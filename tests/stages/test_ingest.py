import gzip
import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from pipeline.config import CurateConfig
from pipeline.io.tar import TarWriter
from pipeline.stages.ingest import LanguageIdentifier, ingest_shard
from tests.helpers import jpeg_bytes, link, make_tar, png_header_only

CAPTION = b"a red square drawn on a plain white background"


@pytest.fixture(scope="module")
def langid():
    return LanguageIdentifier()


def ingest(data: bytes, langid, **overrides):
    config = CurateConfig.model_validate({"input": "pool", "output": "out", **overrides})
    table, report = ingest_shard(io.BytesIO(data), shard="00000000.tar", partition=3, config=config, langid=langid)
    return {row["key"]: row for row in table.to_pylist()}, report


def test_clean_sample_has_every_field(langid):
    image = jpeg_bytes(320, 240)
    meta = {"uid": "0123456789ABCDEF0123456789abcdef", "url": "http://x/1.jpg", "original_width": 640, "original_height": 480}
    rows, report = ingest(make_tar([("k1.jpg", image), ("k1.txt", CAPTION), ("k1.json", json.dumps(meta).encode())]), langid)
    row = rows["k1"]
    assert row["drop_reason"] is None and report.samples == 1
    assert row["uid"] == "0123456789abcdef0123456789abcdef" and row["uid_source"] == "json"
    assert (row["width"], row["height"], row["original_width"], row["original_height"]) == (320, 240, 640, 480)
    assert row["caption_words"] == 9 and row["caption_chars"] == len(CAPTION)
    assert row["language"] == "en" and 0 < row["language_score"] <= 1
    assert row["image_format"] == "JPEG" and row["image_ext"] == "jpg"
    import hashlib

    assert row["sha256"] == hashlib.sha256(image).hexdigest()
    assert row["phash"] is not None and row["partition"] == 3 and row["shard"] == "00000000.tar"


def test_uid_derivation_is_deterministic_and_distinguishes_sources(langid):
    tar = make_tar([
        ("a.jpg", jpeg_bytes()), ("a.txt", CAPTION), ("a.json", b'{"url": "http://x/a.jpg"}'),
        ("b.jpg", jpeg_bytes()), ("b.txt", CAPTION),
    ])
    rows, _ = ingest(tar, langid)
    again, _ = ingest(tar, langid)
    assert rows["a"]["uid_source"] == "url_caption" and rows["b"]["uid_source"] == "shard_key"
    assert rows["a"]["uid"] == again["a"]["uid"] and rows["b"]["uid"] == again["b"]["uid"]
    assert len(rows["a"]["uid"]) == 32 and rows["a"]["uid"] != rows["b"]["uid"]


def test_json_uid_with_a_trailing_newline_is_not_taken(langid):
    hex_uid = "0123456789abcdef0123456789abcdef"
    meta = {"uid": hex_uid + "\n", "url": "http://x/a.jpg"}
    rows, _ = ingest(make_tar([("a.jpg", jpeg_bytes()), ("a.txt", CAPTION), ("a.json", json.dumps(meta).encode())]), langid)
    row = rows["a"]
    assert row["uid_source"] == "url_caption"
    assert row["uid"] not in (hex_uid, hex_uid + "\n") and len(row["uid"]) == 32


def test_members_need_not_be_adjacent(langid):
    tar = make_tar([
        ("a.jpg", jpeg_bytes()), ("b.jpg", jpeg_bytes(colour=(0, 0, 200))), ("b.txt", CAPTION),
        ("c.txt", CAPTION), ("a.txt", CAPTION), ("c.jpg", jpeg_bytes(colour=(0, 200, 0))),
    ])
    rows, report = ingest(tar, langid)
    assert report.samples == 3
    assert all(rows[k]["drop_reason"] is None for k in "abc")
    assert [rows[k]["row"] for k in "abc"] == [0, 1, 2]


@pytest.mark.parametrize(
    "members, reason, detail_part",
    [
        ([("s.jpg", jpeg_bytes()[:400]), ("s.txt", CAPTION)], "corrupt_image", "s.jpg"),
        ([("s.jpg", b"GIF89a this is not an image at all"), ("s.txt", CAPTION)], "corrupt_image", "s.jpg"),
        ([("s.jpg", jpeg_bytes())], "missing_caption", "s"),
        ([("s.jpg", jpeg_bytes()), ("s.txt", b" \n")], "missing_caption", "'s.txt' is empty"),
        ([("s.txt", CAPTION), ("s.json", b"{}")], "missing_image", "s"),
        ([("s.jpg", jpeg_bytes()), ("s.txt", b"caf\xe9 \xff\xfe latin-1 text")], "undecodable_caption", "s.txt"),
        ([("s.png", png_header_only(30000, 30000)), ("s.txt", CAPTION)], "image_too_large", "900000000 pixels"),
        ([link("s.jpg", "/etc/shadow"), ("s.txt", CAPTION)], "unsafe_member", "symbolic link"),
        ([("s.jpg", jpeg_bytes()), ("s.txt", b"red star")], "caption_too_short", "2 words"),
        ([("s.jpg", jpeg_bytes()), ("s.txt", b"un carre rouge dessine sur un fond blanc uni")], "not_english", "'fr'"),
        ([("s.jpg", jpeg_bytes(150, 150)), ("s.txt", CAPTION)], "image_too_small", "150x150"),
        ([("s.jpg", jpeg_bytes(700, 200)), ("s.txt", CAPTION)], "extreme_aspect", "700x200"),
    ],
)
def test_each_bad_input_class_gets_its_reason(langid, members, reason, detail_part):
    rows, report = ingest(make_tar(members), langid)
    assert rows["s"]["drop_reason"] == reason
    assert detail_part in rows["s"]["drop_detail"]
    assert report.reasons == {reason: 1}


def test_bomb_is_refused_from_the_header_without_decoding(langid):
    # The PNG's data is invalid: had it been decoded, the reason would be corrupt_image.
    rows, _ = ingest(make_tar([("s.png", png_header_only(2000, 2000)), ("s.txt", CAPTION)]), langid,
                     ingest={"max_image_pixels": 1_000_000})
    assert rows["s"]["drop_reason"] == "image_too_large"
    assert (rows["s"]["width"], rows["s"]["height"]) == (2000, 2000)
    rows, _ = ingest(make_tar([("s.png", png_header_only(500, 500)), ("s.txt", CAPTION)]), langid,
                     ingest={"max_image_pixels": 1_000_000})
    assert rows["s"]["drop_reason"] == "corrupt_image"


def test_basic_filter_uses_the_original_size_when_the_json_has_it(langid):
    meta = json.dumps({"original_width": 150, "original_height": 1000}).encode()
    rows, _ = ingest(make_tar([("s.jpg", jpeg_bytes(256, 256)), ("s.txt", CAPTION), ("s.json", meta)]), langid)
    assert rows["s"]["drop_reason"] == "image_too_small"


def test_basic_filter_thresholds_are_config(langid):
    tar = make_tar([("s.jpg", jpeg_bytes(150, 150)), ("s.txt", b"zu kurz")])
    rows, _ = ingest(tar, langid, basic_filter={"min_image_side": 100, "min_caption_words": 2, "languages": []})
    assert rows["s"]["drop_reason"] is None
    rows, _ = ingest(tar, langid, basic_filter={"enabled": False})
    assert rows["s"]["drop_reason"] is None


def test_hostile_names_become_rows_and_the_rest_of_the_shard_survives(langid):
    tar = make_tar([
        ("../../evil.jpg", jpeg_bytes()), ("../../evil.txt", CAPTION),
        ("/abs.jpg", jpeg_bytes()),
        ("ok.jpg", jpeg_bytes()), ("ok.txt", CAPTION),
    ])
    rows, report = ingest(tar, langid)
    assert rows["../../evil"]["drop_reason"] == "unsafe_member"
    assert rows["/abs"]["drop_reason"] == "unsafe_member"
    assert rows["ok"]["drop_reason"] is None
    assert report.samples == 3


def test_truncated_shard_keeps_what_was_read(langid):
    good = [("a.jpg", jpeg_bytes()), ("a.txt", CAPTION)]
    tar = make_tar(good + [("b.jpg", jpeg_bytes(400, 400)), ("b.txt", CAPTION)])
    cut = tar[: len(make_tar(good)) - 1024 + 512 + 300]  # into b.jpg's data
    rows, report = ingest(cut, langid)
    assert rows["a"]["drop_reason"] is None
    assert rows["b"]["drop_reason"] == "truncated"
    # the cut member is a sample's row, and the shard, not read to its end, has an error naming where
    assert 0 < report.shard_error_offset < len(cut)  # where b.jpg's data starts
    assert report.shard_error.startswith("shard 00000000.tar: member 'b.jpg' is cut short by the end of the shard")


def test_not_a_tar_is_a_shard_error(langid):
    rows, report = ingest(b"\x00garbage" * 200, langid)
    assert rows == {} and "shard 00000000.tar" in report.shard_error


def test_first_image_extension_in_preference_order_wins(langid):
    png = io.BytesIO()
    Image.new("RGB", (256, 256), (1, 2, 3)).save(png, "PNG")
    rows, _ = ingest(make_tar([("s.png", png.getvalue()), ("s.jpg", jpeg_bytes()), ("s.txt", CAPTION)]), langid)
    assert rows["s"]["image_ext"] == "jpg" and rows["s"]["image_format"] == "JPEG"


def test_tar_writer_output_ingests(langid):
    buffer = io.BytesIO()
    with TarWriter(buffer) as writer:
        writer.add("x.jpg", jpeg_bytes())
        writer.add("x.txt", CAPTION)
    rows, _ = ingest(buffer.getvalue(), langid)
    assert rows["x"]["drop_reason"] is None


def test_listed_samples_missing_from_the_tar_are_accounted_for(langid):
    import pyarrow as pa

    from pipeline.stages.ingest import account_listed_samples

    config = CurateConfig.model_validate({"input": "pool", "output": "out"})
    table, _ = ingest_shard(io.BytesIO(make_tar([("k1.jpg", jpeg_bytes()), ("k1.txt", CAPTION)])),
                            shard="00000.tar", partition=0, config=config, langid=langid)
    listing = pa.table({
        "key": ["k1", "k2", "k3", "k4"],
        "status": ["success", "failed_to_download", "failed_to_resize", "success"],
        "error_message": [None, "HTTP Error 404: Not Found", "image too small", None],
        "url": ["http://x/1", "http://x/2", "http://x/3", "http://x/4"],
        "caption": ["one", "two", "three", "four"],
    })
    out = account_listed_samples(table, listing, shard="00000.tar", partition=0,
                                 listing_name="00000.parquet", shard_error=None).to_pylist()
    by_key = {r["key"]: r for r in out}
    assert len(out) == 4 and by_key["k1"]["drop_reason"] is None
    assert by_key["k2"]["drop_reason"] == "download_failed" and "404" in by_key["k2"]["drop_detail"]
    assert by_key["k3"]["drop_reason"] == "download_failed" and "failed_to_resize" in by_key["k3"]["drop_detail"]
    assert by_key["k4"]["drop_reason"] == "missing_image"
    assert [r["row"] for r in out] == [0, 1, 2, 3]
    assert len({r["uid"] for r in out}) == 4
    cut = account_listed_samples(table, listing, shard="00000.tar", partition=0,
                                 listing_name="00000.parquet", shard_error="broken")
    assert {r["key"]: r["drop_reason"] for r in cut.to_pylist()}["k4"] == "truncated"


def test_corrupt_middle_header_loses_one_sample_and_names_the_offset(langid):
    members = []
    for key in "abc":
        members += [(f"{key}.jpg", jpeg_bytes()), (f"{key}.txt", CAPTION)]
    tar = bytearray(make_tar(members))
    with tarfile.open(fileobj=io.BytesIO(bytes(tar))) as archive:
        b_jpg = next(i for i in archive.getmembers() if i.name == "b.jpg")
    tar[b_jpg.offset + 20] ^= 0xFF
    rows, report = ingest(bytes(tar), langid)
    assert rows["a"]["drop_reason"] is None and rows["c"]["drop_reason"] is None
    assert rows["b"]["drop_reason"] == "missing_image"  # its caption survived, its image did not
    resumed = b_jpg.offset_data + b_jpg.size + (-b_jpg.size % 512)
    assert report.shard_error == (f"shard 00000000.tar: corrupt tar header at byte {b_jpg.offset}, resynchronised at "
                                  f"byte {resumed} ({resumed - b_jpg.offset} bytes skipped)")


def test_hostile_tar_structure_becomes_rows_not_crashes(langid):
    def header(name: bytes, size: int, kind: bytes = b"0") -> bytes:
        block = bytearray(512)
        block[0 : len(name)] = name
        block[124:136] = b"%011o\x00" % size
        block[156:157] = kind
        block[257:265] = b"ustar\x0000"
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\x00 " % sum(block)
        return bytes(block)

    def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
        return header(name, len(data), kind) + data + bytes(-len(data) % 512)

    image = jpeg_bytes()
    tar = (member(b"caf\xe9.jpg", image) + member(b"caf\xe9.txt", CAPTION)
           + member(b"s.txt", b"sparse data " * 100, b"S")  # old GNU sparse, no extension blocks
           + member(b"s.jpg", image) + member(b"ok.jpg", image) + member(b"ok.txt", CAPTION) + bytes(1024))
    rows, report = ingest(tar, langid)
    assert rows["caf\\xe9"]["drop_reason"] == "unsafe_member" and "not valid UTF-8" in rows["caf\\xe9"]["drop_detail"]
    assert rows["s"]["drop_reason"] == "unsafe_member" and "GNU sparse member" in rows["s"]["drop_detail"]
    assert rows["ok"]["drop_reason"] is None and rows["ok"]["caption"] == CAPTION.decode()
    assert report.shard_error is None and report.samples == 3


def test_an_unseekable_stream_reads_alike_given_its_size(langid):
    from pipeline.stages.ingest import DigestingReader

    tar = make_tar([("a.jpg", jpeg_bytes()), ("a.txt", CAPTION)])
    config = CurateConfig.model_validate({"input": "pool", "output": "out"})
    table, report = ingest_shard(DigestingReader(io.BytesIO(tar)), shard="s.tar", partition=0, config=config,
                                 langid=langid, size=len(tar))
    assert table.column("drop_reason").to_pylist() == [None] and report.shard_error is None


def test_a_hostile_json_is_an_error_of_its_sample_not_of_the_run(langid):
    deep = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    surrogate = b'{"url": "http://x/\\ud800.jpg", "uid": "0123456789abcdef0123456789abcdef"}'
    tar = make_tar([("a.jpg", jpeg_bytes()), ("a.txt", CAPTION), ("a.json", deep),
                    ("b.jpg", jpeg_bytes()), ("b.txt", CAPTION), ("b.json", surrogate),
                    ("c.jpg", jpeg_bytes()), ("c.txt", CAPTION), ("c.json", b'{"url": "http://x/c.jpg"}')])
    rows, report = ingest(tar, langid)
    assert report.samples == 3
    assert rows["a"]["json_error"] == "'a.json' is nested too deeply to parse"
    assert rows["b"]["json_error"] == "'b.json' holds a string with a lone surrogate escape ('\\ud800')"
    assert rows["b"]["uid_source"] != "json"  # nothing of a rejected json is used
    assert rows["c"]["json_error"] is None and rows["c"]["uid_source"] == "url_caption"
    assert all(rows[k]["drop_reason"] is None for k in "abc")


def test_a_json_integer_too_long_for_python_is_an_error_of_its_sample(langid):
    # json.loads raises a plain ValueError (not JSONDecodeError) for an integer of over 4300
    # digits, which used to fail the whole shard.
    long_int = b'{"uid": "0123456789abcdef0123456789abcdef", "n": ' + b"7" * 4400 + b"}"
    tar = make_tar([("a.jpg", jpeg_bytes()), ("a.txt", CAPTION), ("a.json", long_int),
                    ("b.jpg", jpeg_bytes()), ("b.txt", CAPTION)])
    rows, report = ingest(tar, langid)
    assert report.samples == 2 and report.shard_error is None
    assert rows["a"]["json_error"].startswith("'a.json' is not valid JSON: Exceeds the limit (4300 digits)")
    assert rows["a"]["uid_source"] == "shard_key"  # nothing of a rejected json is used
    assert rows["a"]["drop_reason"] is None and rows["b"]["drop_reason"] is None


def test_a_repeated_key_is_a_row_of_its_own(langid):
    first, second = jpeg_bytes(300, 300), jpeg_bytes(320, 320, colour=(10, 200, 10))
    tar = make_tar([("k.jpg", first), ("k.txt", CAPTION), ("other.jpg", first), ("other.txt", CAPTION),
                    ("k.jpg", second), ("k.txt", CAPTION + b" again"), ("k.txt", b"a third caption, alone")])
    config = CurateConfig.model_validate({"input": "pool", "output": "out"})
    table, report = ingest_shard(io.BytesIO(tar), shard="00000000.tar", partition=0, config=config, langid=langid)
    rows = table.to_pylist()
    assert [(r["key"], r["row"]) for r in rows] == [("k", 0), ("other", 1), ("k", 2), ("k", 3)]
    assert rows[0]["drop_reason"] is None and rows[0]["width"] == 300 and rows[0]["caption"] == CAPTION.decode()
    assert rows[1]["drop_reason"] is None
    assert [r["drop_reason"] for r in rows[2:]] == ["duplicate_key", "duplicate_key"]
    assert rows[2]["width"] == 320 and rows[2]["caption"].endswith("again")  # its own members, not the first's
    assert "member 'k.jpg' repeats the key 'k'" in rows[2]["drop_detail"]
    assert "member 'k.txt' repeats the key 'k'" in rows[3]["drop_detail"]
    assert report.samples == 4 and report.reasons == {"duplicate_key": 2}


def test_a_gzip_shard_reads_as_its_tar_with_the_same_offsets(langid):
    tar = make_tar([("a.jpg", jpeg_bytes()), ("a.txt", CAPTION), ("b.jpg", jpeg_bytes(300, 200)), ("b.txt", CAPTION)])
    plain, _ = ingest(tar, langid)
    packed, report = ingest(gzip.compress(tar, mtime=0), langid)  # whatever the name says: the bytes are gzip
    assert packed == plain and report.shard_error is None


def test_a_cut_short_gzip_shard_keeps_what_was_read_and_names_the_break(langid):
    tar = make_tar([("a.jpg", jpeg_bytes()), ("a.txt", CAPTION)] +
                   [(f"n{i}.jpg", jpeg_bytes(300, 300, colour=(i, 9, 9), quality=95)) for i in range(8)])
    packed = gzip.compress(tar, mtime=0)
    rows, report = ingest(packed[: len(packed) * 2 // 3], langid)
    assert rows["a"]["drop_reason"] is None
    assert "the gzip stream breaks after" in report.shard_error and report.shard_error_offset > 0
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2] ^= 0xFF
    rows, report = ingest(bytes(corrupt), langid)
    assert rows["a"]["drop_reason"] is None and report.shard_error is not None


def test_captions_and_json_are_hashed_for_the_write_stage(langid):
    meta = json.dumps({"url": "http://x/1.jpg"}).encode()
    rows, _ = ingest(make_tar([("k.jpg", jpeg_bytes()), ("k.txt", CAPTION), ("k.json", meta)]), langid)
    assert rows["k"]["text_sha256"] == hashlib.sha256(CAPTION).hexdigest()
    assert rows["k"]["json_sha256"] == hashlib.sha256(meta).hexdigest()


def test_a_seekable_shard_without_a_given_size_is_measured_so_members_after_an_impossible_size_are_found(langid):
    from tests.tar_mutations import END, header, member

    tar = header(b"huge.jpg", 10 * 2**20) + member(b"b.jpg", jpeg_bytes()) + member(b"b.txt", CAPTION) + END
    rows, report = ingest(tar, langid)  # a BytesIO, no size given
    assert rows["huge"]["drop_reason"] == "truncated" and rows["b"]["drop_reason"] is None
    assert "resynchronised" in report.shard_error
