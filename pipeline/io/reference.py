"""An earlier run that an incremental run tops up, and the chain of runs it topped up in turn.

Day 2 references day 1, day 3 references day 2: the samples already published are the kept
samples of the whole chain, and the shards already seen are the inputs of the whole chain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import UserError
from pipeline.io import fs
from pipeline.io.parquet import read_table


class ReferenceRunError(UserError, ValueError):
    """The run named by `reference` cannot be topped up: not a finished run, or missing what dedup needs."""


class NotARunError(UserError, FileNotFoundError):
    """A URL given as a run (to query, report or reference) holds no run."""


@dataclass(frozen=True)
class ReferencePart:
    """One partition of a referenced run: its metadata and (when it embedded) its embeddings."""

    run: str
    metadata: str
    embeddings: str | None


class Reference:
    def __init__(self, runs: list[tuple[str, dict]]):
        self.runs = runs  # (url, manifest), nearest first

    @classmethod
    def load(cls, url: str) -> "Reference":
        runs, seen = [], set()
        while url is not None:
            url = url.rstrip("/")
            if url in seen:
                raise ReferenceRunError(f"reference chain loops back to {url}")
            seen.add(url)
            manifest_url = fs.join(url, "manifest.json")
            if not fs.exists(manifest_url):
                raise ReferenceRunError(f"reference {url} is not a finished run (no manifest.json)")
            manifest = json.loads(fs.read_bytes(manifest_url))
            if "counts" not in manifest:
                raise ReferenceRunError(f"reference {url} did not finish (its manifest has no final counts)")
            runs.append((url, manifest))
            url = manifest.get("reference")
        return cls(runs)

    @property
    def url(self) -> str:
        return self.runs[0][0]

    def seen_shards(self) -> set[str]:
        return {s["url"] for _, manifest in self.runs for s in manifest["input"]["shards"]}

    def artifact(self, *parts: str) -> str | None:
        """A file of the nearest run (e.g. clusters/dedup_centroids.npy), None when absent."""
        url = fs.join(self.url, *parts)
        return url if fs.exists(url) else None

    def parts(self) -> list[ReferencePart]:
        found = []
        for url, manifest in self.runs:
            for shard in manifest["input"]["shards"]:
                name = f"part-{shard['partition']:06d}.parquet"
                metadata = fs.join(url, "metadata", name)
                embeddings = fs.join(url, "embeddings", name)
                found.append(ReferencePart(url, metadata, embeddings if fs.exists(embeddings) else None))
        return found

    def rows(self, columns: list[str]) -> pa.Table:
        """`columns` of every row (kept or not) of the chain's metadata."""
        tables = [read_table(part.metadata, columns) for part in self.parts()]
        return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})

    def kept(self, columns: list[str]) -> pa.Table:
        """`columns` of every kept sample of the chain."""
        tables = []
        for part in self.parts():
            table = read_table(part.metadata, list(dict.fromkeys(["kept", *columns])))
            tables.append(table.filter(table.column("kept")).select(columns))
        return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})



def published_with_embeddings(part: ReferencePart, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
    """One referenced partition's kept rows (`columns`) and their image embeddings (float32)."""
    from pipeline.io.embeddings import read_vectors

    if part.embeddings is None:
        raise ReferenceRunError(f"reference run {part.run} has no embeddings to deduplicate against")
    table = read_table(part.metadata, list(dict.fromkeys(["kept", *columns])))
    present, matrix = read_vectors(part.embeddings)
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    if not present[kept].all():
        raise ReferenceRunError(f"reference run {part.run}: a kept sample has no image embedding")
    rows = np.flatnonzero(kept)
    return table.filter(table.column("kept")).select(columns), matrix[(np.cumsum(present) - 1)[rows]]
