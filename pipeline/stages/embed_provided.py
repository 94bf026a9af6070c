"""The embed stage's other source: embeddings and scores that come with the pool (DataComp metadata).

Each embeddable sample takes its vectors and scores from the metadata row with its uid. Finding
that row is a distributed join on the uid, so no process holds the pool's uids or the metadata's
(the pool reaches 10^10 samples):
1. map: each ingest partition to do emits (uid, partition, row) of its embeddable rows, each
   metadata file (uid, file, row in file) of its rows, keyed by a bucket of the uid;
2. per bucket: a uid in more than one metadata row, or an embeddable sample with none, is an
   error; every other sample gets its metadata row;
3. home: the matches are shuffled by partition, and each partition's are written to its own
   locations file (row -> file, row in file).
Then one task per partition reads its ingest rows, its locations and the metadata rows they name,
and writes its embeddings file. With one bucket the join is one task, without a shuffle.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import fs
from pipeline.io.datacomp import (EMBEDDING_ARRAYS, SUBSET_DTYPE, halves_to_uid, npz_shape, npz_url, read_metadata_rows,
                                  uid_halves)
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.ray_adapter import map_items, run_remote
from pipeline.ray_shuffle import fetch, map_to_refs, shuffle_map
from pipeline.stages.embed import NAME, EmbedError, assemble, embeddable, embeddable_total, record_totals, stored_dims
from pipeline.stages.steps import integer_buckets

log = logging.getLogger("curate")
METADATA = -1  # the partition of a metadata record, and of a bucket's report of a repeated uid

KEYS = pa.schema([("bucket", pa.int64()), ("hi", pa.uint64()), ("lo", pa.uint64()), ("partition", pa.int64()),
                  ("row", pa.int64()), ("file", pa.int64())])
MATCHES = pa.schema([("partition", pa.int64()), ("row", pa.int64()), ("file", pa.int64()), ("file_row", pa.int64()),
                     ("hi", pa.uint64()), ("lo", pa.uint64())])
SUMMARY = pa.schema([("partition", pa.int64()), ("missing", pa.int64()), ("hi", pa.uint64()), ("lo", pa.uint64())])


def locations_dir(paths) -> str:
    """The join's per-partition results, in the stage's directory: kept only while the stage runs."""
    return paths.url("stages", NAME, "locations")


# -- 1. map: keyed uid records ------------------------------------------------------------------

def emit_keys(item: dict, buckets: int) -> pa.Table:
    """An ingest partition's embeddable rows (`ingest` in the item) or a metadata file's rows, as
    uid records with their bucket."""
    if "ingest" in item:
        table = read_table(item["ingest"], ["uid", "drop_reason"])
        rows, _ = embeddable(table.column("drop_reason").to_pylist())
        halves = uid_halves(table.column("uid").take(rows).to_pylist(), f"shard {item['source']}")
        partition, file = item["partition"], -1
    else:
        with fs.open_input(item["url"]) as handle:
            uids = pq.read_table(handle, columns=["uid"]).column("uid").to_pylist()
        halves = uid_halves(uids, item["url"])
        rows, partition, file = np.arange(len(uids), dtype=np.int64), METADATA, item["file"]
    n = len(rows)
    return pa.table([integer_buckets(halves[:, 0] ^ halves[:, 1], buckets), halves[:, 0], halves[:, 1],
                     np.full(n, partition, np.int64), rows.astype(np.int64), np.full(n, file, np.int64)], schema=KEYS)


# -- 2. per bucket: match -----------------------------------------------------------------------

def _pairs(records: pa.Table) -> np.ndarray:
    pairs = np.empty(records.num_rows, SUBSET_DTYPE)
    pairs["f0"], pairs["f1"] = records.column("hi").to_numpy(), records.column("lo").to_numpy()
    return pairs


def join_bucket(records: pa.Table) -> pa.Table:
    """Each sample's metadata row (file -1 where it has none); where a uid has several metadata
    rows, only one record, of partition METADATA, naming the smallest such uid."""
    file = records.column("file").to_numpy()
    row = records.column("row").to_numpy()
    pairs, meta = _pairs(records), file >= 0
    order = np.argsort(pairs[meta], kind="stable")
    keys, key_file, key_row = pairs[meta][order], file[meta][order], row[meta][order]
    repeated = np.flatnonzero(keys[1:] == keys[:-1])
    if len(repeated):
        first = keys[repeated[0]]
        return pa.table([[METADATA], [-1], [-1], [-1], [first["f0"]], [first["f1"]]], schema=MATCHES)
    wanted = pairs[~meta]
    file_of, row_of = np.full(len(wanted), -1, np.int64), np.full(len(wanted), -1, np.int64)
    if len(keys):
        pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        found = keys[pos] == wanted
        file_of[found], row_of[found] = key_file[pos[found]], key_row[pos[found]]
    return pa.table([records.column("partition").to_numpy()[~meta], row[~meta], file_of, row_of,
                     wanted["f0"], wanted["f1"]], schema=MATCHES)


# -- 3. home: a locations file per partition ----------------------------------------------------

def write_home(matches: pa.Table, template: str) -> pa.Table:
    """Write each partition's matches, in row order, as its locations file; returns a summary per
    partition (how many samples have no metadata row, and the uid of the first) and the smallest
    repeated uid (partition METADATA). A partition with missing rows gets no file."""
    partition = matches.column("partition").to_numpy()
    summaries = []
    for p in np.unique(partition):
        mine = matches.filter(pa.array(partition == p))
        if p == METADATA:
            smallest = np.sort(_pairs(mine))[0]
            summaries.append((METADATA, 0, smallest["f0"], smallest["f1"]))
            continue
        mine = mine.sort_by("row")
        missing = np.flatnonzero(mine.column("file").to_numpy() < 0)
        if len(missing):
            first = int(missing[0])
            summaries.append((int(p), len(missing), mine.column("hi")[first].as_py(),
                              mine.column("lo")[first].as_py()))
            continue
        write_table_atomic(mine.select(["row", "file", "file_row"]), template.format(partition=int(p)))
        summaries.append((int(p), 0, 0, 0))
    return pa.table([list(column) for column in zip(*summaries)] if summaries else [[], [], [], []], schema=SUMMARY)


def _join_all(template: str, *tables: pa.Table) -> pa.Table:
    """The one-bucket join: every record in this task."""
    records = pa.concat_tables(tables) if tables else KEYS.empty_table()
    return write_home(join_bucket(records), template)


def join(ctx, files: list[str], todo: list[int], metadata_rows: int) -> None:
    """Write the locations file of every partition of `todo` with embeddable rows; raise on a
    repeated metadata uid or a sample with no metadata row (the lowest partition's first)."""
    provided = ctx.config.embed.provided
    records = embeddable_total(ctx) + metadata_rows
    buckets = max(1, math.ceil(records / ctx.config.ray.rows_per_bucket))
    items = [{"partition": p, "ingest": ctx.read("ingest", p), "source": ctx.partitions[p].url} for p in todo]
    items += [{"file": number, "url": url} for number, url in enumerate(files)]
    refs = [ref for _, ref, _ in map_to_refs(emit_keys, items, kwargs={"buckets": buckets})]
    template = fs.join(locations_dir(ctx.paths), "part-{partition:06d}.parquet")
    if buckets == 1:
        summaries = [run_remote(_join_all, template, *refs)]
    else:
        batch = ctx.config.ray.shuffle_map_mib * 2**20
        matched = shuffle_map(refs, "bucket", join_bucket, partitions=buckets, map_batch_bytes=batch)
        written = shuffle_map(matched, "partition", functools.partial(write_home, template=template),
                              partitions=min(len(todo) + 1, buckets), map_batch_bytes=batch)
        summaries = fetch(written)
    summary = pa.concat_tables([t.cast(SUMMARY) for t in summaries] or [SUMMARY.empty_table()])
    partition, missing = summary.column("partition").to_numpy(), summary.column("missing").to_numpy()
    hi, lo = summary.column("hi").to_numpy(), summary.column("lo").to_numpy()
    repeated = np.flatnonzero(partition == METADATA)
    if len(repeated):
        uid = min(halves_to_uid(hi[i], lo[i]) for i in repeated)
        raise ValueError(f"DataComp metadata: uid {uid} appears in more than one row of {len(files)} file(s)")
    short = np.flatnonzero(missing > 0)
    if len(short):
        i = short[np.argmin(partition[short])]
        raise EmbedError(
            f"shard {ctx.partitions[int(partition[i])].url}: {int(missing[i])} sample(s) have no row in the metadata "
            f"{provided.metadata}, first uid {halves_to_uid(hi[i], lo[i])}; embed.provided needs a row for every "
            f"sample it embeds")
    log.info("embed: joined %d samples' uids with %d metadata rows in %d bucket(s)", records - metadata_rows,
             metadata_rows, buckets)


# -- then: each partition's embeddings from its metadata rows -----------------------------------

def provided_partition(item: dict, files: list[str], embeddings: str, clip_score: str, dfn_score: str | None,
                       dim: int, width: int, face_bboxes: bool = False) -> dict:
    """One partition's embeddings table: its ingest rows, with the metadata rows its locations name
    (and their face_bboxes, for the faces stage, with faces.source provided)."""
    image_array, text_array = EMBEDDING_ARRAYS[embeddings]
    columns = [clip_score] + ([dfn_score] if dfn_score else [])
    ingest = read_table(item["ingest"], ["uid", "drop_reason"])
    rows, has_text = embeddable(ingest.column("drop_reason").to_pylist())
    located = _locations(item, len(rows))
    if not np.array_equal(located.column("row").to_numpy(), rows):
        raise EmbedError(f"{item['locations']}: its rows are not the embeddable rows of {item['ingest']} "
                         f"(ingest changed?)")
    file_of, row_of = located.column("file").to_numpy(), located.column("file_row").to_numpy()
    n, text_pos = len(rows), np.flatnonzero(has_text)
    image, text = np.zeros((n, dim), np.float32), np.zeros((len(text_pos), dim), np.float32)
    clip = np.full(len(text_pos), np.nan, np.float32)
    dfn = np.full(len(text_pos), np.nan, np.float32)
    text_index = np.cumsum(has_text) - 1
    used = [files[number] for number in np.unique(file_of)]
    for number in np.unique(file_of):
        mine = np.flatnonzero(file_of == number)
        values = read_metadata_rows(files[number], row_of[mine], columns, [image_array, text_array])
        image[mine] = values[image_array]
        picked = has_text[mine]
        with_text = text_index[mine[picked]]
        text[with_text] = values[text_array][picked]
        clip[with_text] = values[clip_score][picked]
        if dfn_score:
            dfn[with_text] = values[dfn_score][picked]
    result = {
        "rows": rows,
        "text_pos": text_pos,
        "image_embedding": _normalised(image, used, "image"),
        "text_embedding": _normalised(text, used, "text") if len(text_pos) else None,
        "clip_score": clip,
        "dfn_score": dfn if dfn_score else None,
    }
    table = assemble(ingest.column("uid"), [result], dim, width)
    if face_bboxes:
        table = table.append_column("face_bboxes", provided_boxes(files, file_of, row_of, rows, ingest.num_rows))
    write_table_atomic(table, item["out"])
    return {"partition": item["partition"], "samples": ingest.num_rows, "embedded": n, "with_text": len(text_pos)}


def provided_boxes(files: list[str], file_of: np.ndarray, row_of: np.ndarray, rows: np.ndarray, n: int) -> pa.ChunkedArray:
    """The metadata's face_bboxes of the embedded rows, as the faces stage reads them (null elsewhere)."""
    from pipeline.schema import METADATA_SCHEMA

    kind = METADATA_SCHEMA.field("face_bboxes").type
    boxes: list = [None] * n
    for number in np.unique(file_of):
        mine = np.flatnonzero(file_of == number)
        with fs.open_input(files[number]) as handle:
            schema = pq.read_schema(handle)
            if "face_bboxes" not in schema.names:
                raise EmbedError(f"{files[number]} has no face_bboxes column: faces.source provided needs one "
                                 "(set faces.source: detect to run the detector)")
        with fs.open_input(files[number]) as handle:
            column = pq.read_table(handle, columns=["face_bboxes"]).column("face_bboxes")
        values = column.take(pa.array(row_of[mine])).cast(kind).to_pylist()
        for at, value in zip(rows[mine], values):
            boxes[at] = [] if value is None else value
    return pa.chunked_array([pa.array(boxes, kind)])


def _locations(item: dict, expected: int) -> pa.Table:
    if expected == 0:
        return pa.table({"row": pa.array([], pa.int64()), "file": pa.array([], pa.int64()),
                         "file_row": pa.array([], pa.int64())})
    if not fs.exists(item["locations"]):
        raise EmbedError(f"{item['locations']}: missing, though {item['ingest']} has {expected} rows to embed")
    return read_table(item["locations"])


def _normalised(vectors: np.ndarray, files: list[str], what: str) -> np.ndarray:
    """L2-normalised float16; vectors already of unit length to float16 precision are kept as given
    (DataComp's are), so embeddings given back unchanged reproduce a run bit for bit."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise EmbedError(f"a zero or non-finite {what} embedding in the metadata .npz of {files}")
    return np.where(np.abs(norms - 1) < 2e-3, vectors, vectors / norms).astype(np.float16)


def _file_rows(item: dict) -> dict:
    with fs.open_input(item["url"]) as handle:
        return {"file": item["file"], "rows": pq.ParquetFile(handle).metadata.num_rows}


def _dim(files: list[str], array: str) -> int:
    """The embedding width, from the first .npz with rows (an empty one's arrays may have no width)."""
    for url in files:
        shape = npz_shape(npz_url(url), array)
        if shape[0]:
            return int(shape[1])
    return 0


def run(ctx) -> None:
    provided = ctx.config.embed.provided
    files = fs.resolve_files(provided.metadata, ".parquet")
    if not files:
        raise EmbedError(f"embed.provided.metadata {provided.metadata}: no .parquet files")
    dim = _dim(files, EMBEDDING_ARRAYS[provided.embeddings][0])
    width = stored_dims(dim, ctx.config.embed.store_dims) if dim else dim
    todo = ctx.todo([p.index for p in ctx.partitions])
    if todo:
        embed_partitions(ctx, files, todo, dim, width)
    record_totals(ctx, {"embed": f"DataComp metadata {provided.embeddings}"}, "none", dim, width)


def embed_partitions(ctx, files: list[str], todo: list[int], dim: int, width: int) -> None:
    """The join, then one task per partition; the join's files go once every partition is written."""
    provided = ctx.config.embed.provided
    counted = map_items(_file_rows, [{"file": k, "url": url} for k, url in enumerate(files)], timeout_s=ctx.item_timeout_s)
    metadata_rows = sum(r["rows"] for r in counted)
    log.info("embed: %s embeddings and scores from %d DataComp metadata file(s) (%d rows), no model pass",
             provided.embeddings, len(files), metadata_rows)
    fs.remove_tree(ctx.paths.stage_dir(NAME))  # what an interrupted run left
    join(ctx, files, todo, metadata_rows)
    items = [{"partition": p, "ingest": ctx.read("ingest", p), "out": ctx.paths.stage_part(NAME, p),
              "locations": fs.join(locations_dir(ctx.paths), f"part-{p:06d}.parquet")} for p in todo]
    from pipeline.stages import faces_provided

    kwargs = {"files": files, "embeddings": provided.embeddings, "clip_score": provided.clip_score,
              "dfn_score": provided.dfn_score, "dim": dim, "width": width, "face_bboxes": faces_provided(ctx.config)}
    for result in map_items(provided_partition, items, worker_kwargs=kwargs, num_cpus=1, timeout_s=ctx.item_timeout_s):
        ctx.partition_done(result["partition"], {k: result[k] for k in ("samples", "embedded", "with_text")})
    fs.remove_tree(ctx.paths.stage_dir(NAME))
