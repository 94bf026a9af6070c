"""Write a planned synthetic pool: tar shards, img2dataset metadata and the ground truth.

Layout of ``out_dir`` (img2dataset / DataComp):

- ``{shard:08d}.tar``: per sample ``{key}.jpg``, ``{key}.json`` and, unless the caption is missing,
  ``{key}.txt``; keys are ``{shard:05d}{index_in_shard:04d}``.
- ``{shard:08d}.parquet``: img2dataset's per-shard metadata (``IMG2DATASET_SCHEMA``).
- ``{shard:08d}_stats.json``: img2dataset-like counts (no timestamps).
- ``truth/truth.parquet``: one row per sample (``TRUTH_SCHEMA``), never read by the pipeline:

  uid, key, shard (tar file name), concept ("red circle on stripes"), defects (list of names from
  ``DEFECTS``, empty when clean), concept_id, shape, colour, background, spread (the concept's
  visual spread, 0 = tight, 1 = varied), source_uid / source_key (the clean sample a duplicate
  copies), caption_concept_id (the concept the caption describes; null without caption),
  language (ISO code of the caption; null without caption), index (position in the pool),
  concept_rank (1 = most frequent by design), concept_prob (design frequency), caption, width,
  height, sha256 and image_bytes (of the image as written), adjacent (False when the sample's tar
  members were spread apart), transform (how a near duplicate or a corrupt image was made).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io.tar import TarWriter

from .concepts import BACKGROUNDS, COLOURS, CONCEPTS, SHAPES
from .looks import ConceptStyle
from .plan import DEFECTS, PoolPlan, SamplePlan, plan_pool, sample_look_of, shard_name
from .render import render_jpeg
from .transforms import corrupt, near_duplicate

TRUTH_DIR = "truth"
TRUTH_FILE = "truth.parquet"
_SHARD_FILE = re.compile(r"^(\d{8})(\.tar|\.parquet|_stats\.json)$")

IMG2DATASET_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
    ]
)

TRUTH_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("concept", pa.string()),
        ("defects", pa.list_(pa.string())),
        ("concept_id", pa.int64()),
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("background", pa.string()),
        ("spread", pa.float64()),
        ("source_uid", pa.string()),
        ("caption_concept_id", pa.int64()),
        ("language", pa.string()),
        ("index", pa.int64()),
        ("concept_rank", pa.int64()),
        ("concept_prob", pa.float64()),
        ("source_key", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("sha256", pa.string()),
        ("image_bytes", pa.int64()),
        ("adjacent", pa.bool_()),
        ("transform", pa.string()),
    ]
)


class Rendered(NamedTuple):
    """What a shard worker reports about one written sample."""

    index: int
    width: int
    height: int
    sha256: str
    n_bytes: int


class _Task(NamedTuple):
    out_dir: str
    shard: int
    samples: list[SamplePlan]
    styles: list[ConceptStyle]


def _image_bytes(s: SamplePlan, cache: dict[int, bytes], styles: list[ConceptStyle]) -> tuple[bytes, int, int]:
    """The sample's image bytes and the intended (width, height) of its image."""
    look = sample_look_of(s, styles)
    if s.source is not None:
        src = cache.get(s.source)
        if src is None:  # the source lies in another shard: re-render it (same look, same bytes)
            src = render_jpeg(look)
            cache[s.source] = src
        if s.defect == "near_duplicate":
            return near_duplicate(src, s.near), look.width, look.height
        return src, look.width, look.height
    data = render_jpeg(look)
    if s.corruption is not None:
        data = corrupt(data, s.corruption)
    return data, look.width, look.height


def _sample_json(s: SamplePlan, width: int, height: int, sha: str) -> bytes:
    meta = {
        "uid": s.uid,
        "url": s.url,
        "caption": s.caption,
        "key": s.key,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "sha256": sha,
    }
    return json.dumps(meta, indent=4).encode("utf-8")


def _layout(members: list[tuple[SamplePlan, list[tuple[str, bytes]]]]) -> list[tuple[str, bytes]]:
    """Tar order: each sample's members together, except non-adjacent samples', which are split.

    A non-adjacent sample keeps its image in place and has its other members moved to the end of
    the shard, after later samples; the last sample of a shard instead has its image moved to the
    front, before earlier samples.
    """
    head: list[tuple[str, bytes]] = []
    body: list[tuple[str, bytes]] = []
    tail: list[tuple[str, bytes]] = []
    last = len(members) - 1
    for pos, (s, files) in enumerate(members):
        if s.adjacent or len(files) < 2:
            body.extend(files)
        elif pos < last:
            body.append(files[0])
            tail.extend(files[1:])
        else:
            head.append(files[0])
            body.extend(files[1:])
    return head + body + tail


def _same_bytes(path: str, data: bytes) -> bool:
    try:
        if os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except FileNotFoundError:
        return False


def _write_atomic(path: str, data: bytes) -> None:
    """Replace `path` by `data`, unless it already holds exactly these bytes: then the file and its
    modification time stay as they are, so rendering the same pool again changes nothing on disk."""
    if _same_bytes(path, data):
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _render_shard(task: _Task) -> list[Rendered]:
    cache: dict[int, bytes] = {}
    needed = {s.source for s in task.samples if s.source is not None}
    members = []
    results = []
    for s in task.samples:
        data, width, height = _image_bytes(s, cache, task.styles)
        if s.index in needed:
            cache[s.index] = data
        if s.near is not None:
            width, height = Image.open(io.BytesIO(data)).size
        sha = hashlib.sha256(data).hexdigest()
        files = [(f"{s.key}.jpg", data), (f"{s.key}.json", _sample_json(s, width, height, sha))]
        if s.caption is not None:
            files.append((f"{s.key}.txt", s.caption.encode("utf-8")))
        members.append((s, files))
        results.append(Rendered(s.index, width, height, sha, len(data)))
    buf = io.BytesIO()
    with TarWriter(buf) as tar:
        for name, data in _layout(members):
            tar.add(name, data)
    _write_atomic(os.path.join(task.out_dir, shard_name(task.shard) + ".tar"), buf.getvalue())
    return results


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_shard_metadata(out_dir: str, shard: int, samples: list[SamplePlan], rendered: dict[int, Rendered]) -> None:
    rows = {name: [] for name in IMG2DATASET_SCHEMA.names}
    for s in samples:
        r = rendered[s.index]
        for name, value in (
            ("uid", s.uid), ("key", s.key), ("url", s.url), ("caption", s.caption), ("status", "success"),
            ("error_message", None), ("width", r.width), ("height", r.height), ("original_width", r.width),
            ("original_height", r.height), ("sha256", r.sha256),
        ):
            rows[name].append(value)
    base = os.path.join(out_dir, shard_name(shard))
    _write_atomic(base + ".parquet", _parquet_bytes(pa.table(rows, schema=IMG2DATASET_SCHEMA)))
    n = len(samples)
    stats = {
        "count": n,
        "successes": n,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": 0.0,
        "status_dict": {"success": n},
    }
    _write_atomic(base + "_stats.json", json.dumps(stats, indent=4).encode("utf-8"))


def _truth_table(plan: PoolPlan, rendered: dict[int, Rendered]) -> pa.Table:
    rows = {name: [] for name in TRUTH_SCHEMA.names}
    for s in plan.samples:
        c = CONCEPTS[s.concept_id]
        r = rendered[s.index]
        src = plan.samples[s.source] if s.source is not None else None
        transform = None
        if s.near is not None:
            transform = s.near.describe()
        elif s.corruption is not None:
            transform = s.corruption.describe()
        for name, value in (
            ("uid", s.uid),
            ("key", s.key),
            ("shard", shard_name(s.shard) + ".tar"),
            ("concept", c.name),
            ("defects", [s.defect] if s.defect else []),
            ("concept_id", c.id),
            ("shape", SHAPES[c.shape]),
            ("colour", COLOURS[c.colour]),
            ("background", BACKGROUNDS[c.background]),
            ("spread", plan.styles[c.id].spread),
            ("source_uid", src.uid if src else None),
            ("caption_concept_id", s.caption_concept_id),
            ("language", s.language),
            ("index", s.index),
            ("concept_rank", int(plan.concept_rank[c.id])),
            ("concept_prob", float(plan.concept_prob[c.id])),
            ("source_key", src.key if src else None),
            ("caption", s.caption),
            ("width", r.width),
            ("height", r.height),
            ("sha256", r.sha256),
            ("image_bytes", r.n_bytes),
            ("adjacent", s.adjacent),
            ("transform", transform),
        ):
            rows[name].append(value)
    return pa.table(rows, schema=TRUTH_SCHEMA)


def _remove_stale_shards(out_dir: str, n_shards: int) -> None:
    """Drop shard files of an earlier, larger pool in the same directory (they would join this one)."""
    for name in os.listdir(out_dir):
        m = _SHARD_FILE.match(name)
        if m and int(m.group(1)) >= n_shards:
            os.remove(os.path.join(out_dir, name))


def _process_context():
    """Fork on Linux: workers need no importable main module and only run numpy, Pillow and hashlib
    (no BLAS, no Arrow, no network clients), so no lock held by a caller's thread can block them."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def synthesize(
    out_dir: str,
    samples: int,
    seed: int,
    shard_size: int = 1000,
    *,
    defect_rates: dict[str, float] | None = None,
    non_adjacent_fraction: float = 0.0,
    workers: int | None = None,
) -> dict:
    """Render a synthetic pool with ground truth into the local directory ``out_dir``.

    Writes ``{shard:08d}.tar`` / ``.parquet`` / ``_stats.json`` per shard and
    ``truth/truth.parquet``. The same arguments (``workers`` aside) give byte-identical files.
    ``defect_rates`` overrides the default rate of the defects it names. Returns a summary.
    """
    started = time.perf_counter()
    plan = plan_pool(samples, seed, shard_size, defect_rates, non_adjacent_fraction)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, TRUTH_DIR), exist_ok=True)
    n_shards = plan.n_shards
    _remove_stale_shards(out_dir, n_shards)

    tasks = [_Task(out_dir, shard, plan.shard_samples(shard), plan.styles) for shard in range(n_shards)]

    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), n_shards))
    rendered: dict[int, Rendered] = {}
    if workers == 1:
        results = map(_render_shard, tasks)
        for res in results:
            rendered.update((r.index, r) for r in res)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_process_context()) as pool:
            for res in pool.map(_render_shard, tasks):
                rendered.update((r.index, r) for r in res)

    for shard in range(n_shards):
        _write_shard_metadata(out_dir, shard, plan.shard_samples(shard), rendered)
    truth_path = os.path.join(out_dir, TRUTH_DIR, TRUTH_FILE)
    _write_atomic(truth_path, _parquet_bytes(_truth_table(plan, rendered)))

    counts = {name: 0 for name in DEFECTS}
    for s in plan.samples:
        if s.defect:
            counts[s.defect] += 1
    return {
        "out_dir": out_dir,
        "shards": n_shards,
        "samples": len(plan.samples),
        "clean": len(plan.samples) - sum(counts.values()),
        "defects": counts,
        "non_adjacent": sum(1 for s in plan.samples if not s.adjacent),
        "truth": truth_path,
        "seconds": round(time.perf_counter() - started, 3),
    }
