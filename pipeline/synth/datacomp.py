"""DataComp-style metadata for a local pool, so `jobs/datacomp_metadata.yaml` runs on the demo pool.

DataComp ships per metadata file NAME.parquet (uid, url, text, original_width, original_height,
clip_b32_similarity_score, clip_l14_similarity_score, sha256, ...) and NAME.npz beside it with the
OpenAI CLIP ViT-B/32 and ViT-L/14 embeddings (b32_img, b32_txt, l14_img, l14_txt), row-aligned.
`write_datacomp_metadata` writes that layout into POOL/metadata/, one file pair per shard
(00000000.parquet + 00000000.npz for 00000000.tar).

The numbers are real, but not OpenAI's: neither model ships with this package nor may be
downloaded at run time. Every vector and score comes from the quickstart job's model
(`curate-dfn-rn16-64`, 128-d, in pipeline/assets), computed by the embed stage's own core (ingest,
`chunk_items`, `prepare_chunk`, `EmbedWorker`) in this process, on the CPU in fp32, without Ray.
That one model's vectors are stored under both names (b32_* and l14_* are the same arrays), and
clip_b32_similarity_score equals clip_l14_similarity_score: the cosine of the two, as DataComp's.

Rows: one per sample the embed stage would embed, i.e. whose image ingest can decode (a missing,
truncated or corrupt image has no row: there is nothing to embed). A sample without a usable
caption has `text` null, both scores null and zero text vectors. A uid seen twice keeps its first
row (DataComp's uids are unique; the pipeline drops the second as duplicate_uid anyway).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger("curate")

# The quickstart job's embedder (jobs/quickstart.yaml), shipped in pipeline/assets.
MODEL = "curate-dfn-rn16-64"
PRETRAINED = "curate-dfn-rn16-64.safetensors"
METADATA_DIR = "metadata"
BATCH_SIZE = 64
_METADATA_FILE = re.compile(r"^(.+)\.(parquet|npz)$")


def write_datacomp_metadata(pool_dir: str, *, out_dir: str | None = None, model: str = MODEL,
                            pretrained: str | None = PRETRAINED, batch_size: int = BATCH_SIZE,
                            threads: int | None = None) -> dict:
    """Embed every shard of the local pool `pool_dir` and write its DataComp metadata into `out_dir`
    (default POOL/metadata); metadata files of shards the pool no longer has are removed, so the
    folder never lists a uid twice. Returns a summary (files, rows, rows_with_text, no_row)."""
    from pipeline import models
    from pipeline.config import CurateConfig
    from pipeline.io.datacomp import write_metadata
    from pipeline.stages import embed
    from pipeline.stages.ingest import LanguageIdentifier, ingest_shard

    shards = sorted(Path(pool_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{pool_dir}: no .tar shards to describe")
    out = Path(out_dir) if out_dir is not None else Path(pool_dir) / METADATA_DIR
    out.mkdir(parents=True, exist_ok=True)
    # The embed settings come from a job config; its output is required by the schema but never written here
    # (and may not lie inside the pool it reads).
    unused_output = os.path.join(tempfile.gettempdir(), "curate-datacomp-metadata-unused")
    config = CurateConfig.model_validate({"input": str(pool_dir), "output": unused_output,
                                          "embed": {"model": model, "pretrained": pretrained}})
    specs = models.preflight(config)
    worker = embed.EmbedWorker({"embed": vars(specs["embed"])}, "cpu", "fp32", threads or (os.cpu_count() or 1),
                               config.embed.jpeg_draft_factor)
    prepare_spec = worker.prepare_spec()
    langid = LanguageIdentifier()
    seen: set[str] = set()
    summary = {"out_dir": str(out), "model": specs["embed"].label, "files": 0, "rows": 0, "rows_with_text": 0,
               "no_row": 0}
    for partition, shard in enumerate(shards):
        with open(shard, "rb") as stream:
            ingested, _ = ingest_shard(stream, shard=shard.name, partition=partition, config=config, langid=langid)
        items = embed.chunk_items(ingested, partition, str(shard), batch_size)
        results = [worker(embed.prepare_chunk(item, prepare_spec)) for item in items]
        table, arrays = _metadata_rows(ingested, results, seen)
        write_metadata(str(out / f"{shard.stem}.parquet"), table, arrays)
        summary["files"] += 1
        summary["rows"] += table.num_rows
        summary["rows_with_text"] += table.num_rows - table.column("text").null_count
        summary["no_row"] += ingested.num_rows - table.num_rows
        log.info("datacomp metadata: %s: %d rows", shard.name, table.num_rows)
    keep = {shard.stem for shard in shards}
    for path in out.iterdir():
        match = _METADATA_FILE.match(path.name)
        if match and match.group(1) not in keep:
            path.unlink()
    return summary


def _metadata_rows(ingested: pa.Table, results: list[dict], seen: set[str]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """One shard's DataComp rows (the embedded samples, in shard order) and the row-aligned arrays."""
    columns = ingested.select(["uid", "url", "caption", "width", "height", "original_width", "original_height",
                               "sha256"]).to_pydict()
    image_of: dict[int, np.ndarray] = {}
    text_of: dict[int, tuple[np.ndarray, float]] = {}
    for result in results:
        rows = np.asarray(result["rows"], dtype=np.int64)
        for i, row in enumerate(rows):
            image_of[int(row)] = result["image_embedding"][i]
        if result["text_embedding"] is not None:
            for j, pos in enumerate(result["text_pos"]):
                text_of[int(rows[pos])] = (result["text_embedding"][j], float(result["clip_score"][j]))
    picked = []
    for row in sorted(image_of):
        if columns["uid"][row] not in seen:
            seen.add(columns["uid"][row])
            picked.append(row)
    dim = next(iter(image_of.values())).shape[0] if image_of else 0
    image = np.zeros((len(picked), dim), np.float16)
    text = np.zeros((len(picked), dim), np.float16)
    score = np.full(len(picked), np.nan)
    for i, row in enumerate(picked):
        image[i] = image_of[row]
        if row in text_of:
            text[i], score[i] = text_of[row]
    has_text = np.array([row in text_of for row in picked], dtype=bool)
    scores = pa.array(score, pa.float64(), mask=~has_text)

    def column(name: str, fallback: str | None = None) -> list:
        values = [columns[name][row] for row in picked]
        if fallback is not None:
            values = [v if v is not None else columns[fallback][row] for v, row in zip(values, picked)]
        return values

    table = pa.table({
        "uid": pa.array(column("uid"), pa.string()),
        "url": pa.array(column("url"), pa.string()),
        "text": pa.array([c if ok else None for c, ok in zip(column("caption"), has_text)], pa.string()),
        "original_width": pa.array(column("original_width", "width"), pa.int64()),
        "original_height": pa.array(column("original_height", "height"), pa.int64()),
        "clip_b32_similarity_score": scores,
        "clip_l14_similarity_score": scores,
        "sha256": pa.array(column("sha256"), pa.string()),
    })
    # one model, two names (see the module docstring)
    arrays = {"b32_img": image, "b32_txt": text, "l14_img": image, "l14_txt": text}
    return table, arrays
