"""An earlier run that an incremental run tops up, and the chain of runs it topped up in turn.

Day 2 references day 1, day 3 references day 2: the samples already published are the kept
samples of the whole chain, and the shards already seen are the inputs of the whole chain.

A scheduled run names no fixed day: `reference=latest:ROOT` finds, at run start, the latest
successful run directly under ROOT (`latest_run`), so a day that failed or never ran is skipped
instead of breaking every later day.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import LATEST_PREFIX, UserError, _location, storage_error
from pipeline.io import fs
from pipeline.io.parquet import read_table

log = logging.getLogger("curate")


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


@dataclass(frozen=True)
class PublishedRun:
    """A successful run found under a runs root: its URL, when its manifest was last saved, what it topped up."""

    url: str
    finished: str  # the manifest's updated_at (UTC, ISO 8601: sorts as text)
    reference: str | None


def published_runs(root: str) -> list[PublishedRun]:
    """The runs directly under `root` whose manifest.json holds final `counts`, oldest first.

    Ordered by finish time, then URL, so the same root always gives the same order. A folder
    without a manifest (a day that never ran), or whose manifest has no counts (a run that failed
    or is still running), is not a run that can be topped up and is left out.
    """
    found = []
    for entry in fs.list_files(root):
        url = entry.rstrip("/")
        manifest_url = fs.join(url, "manifest.json")
        try:
            manifest = json.loads(fs.read_bytes(manifest_url))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except ValueError as exc:  # not JSON: not a run that finished
            log.warning("reference: %s is not valid JSON (%s); not a candidate", manifest_url, exc)
            continue
        if isinstance(manifest, dict) and "counts" in manifest:
            found.append(PublishedRun(url, str(manifest.get("updated_at") or ""), manifest.get("reference")))
    return sorted(found, key=lambda run: (run.finished, run.url))


def latest_run(root: str, output: str) -> PublishedRun | None:
    """The run a new run at `output` tops up: the latest published run under `root` that builds on no
    later one; None when there is none.

    Left out: the run at `output` itself (a rerun of the same day) and every run whose reference chain
    passes through it (they came after it). Of the rest, a run that another of them references is
    already part of that one's chain, so only the ends of chains are candidates: a later rerun of an
    old day (which refreshes its manifest's time) cannot cut the days after it out of the chain. Of
    the ends, the last to finish (ties: the larger URL).
    """
    runs = published_runs(root)
    where = {_location(run.url): run for run in runs}
    own = _location(output)

    def through_own(run: PublishedRun) -> bool:
        seen = set()
        while run is not None and _location(run.url) not in seen:
            if _location(run.url) == own:
                return True
            seen.add(_location(run.url))
            run = where.get(_location(run.reference)) if run.reference else None
        return False

    candidates = [run for run in runs if not through_own(run)]
    referenced = {_location(run.reference) for run in candidates if run.reference}
    ends = [run for run in candidates if _location(run.url) not in referenced]
    return ends[-1] if ends else None


def resolve(reference: str | None, output: str) -> Reference | None:
    """The reference chain a run at `output` tops up: `reference` as given, or for `latest:ROOT` the
    run `latest_run` finds (logged); None when there is no reference, or `latest:` finds no run yet
    (the first day: the run processes its whole input)."""
    if reference is None:
        return None
    if not reference.startswith(LATEST_PREFIX):
        return Reference.load(reference)
    root = reference[len(LATEST_PREFIX):]
    try:
        chosen = latest_run(root, output)
    except Exception as exc:  # no credentials, unreachable: a UserError naming the root
        error = storage_error("reference", root, exc)
        if error is None:
            raise
        raise error from exc
    if chosen is None:
        log.warning("reference %s: no successful run under %s yet; this run processes its whole input", reference, root)
        return None
    log.info("reference %s: %s (finished %s)", reference, chosen.url, chosen.finished or "at an unrecorded time")
    return Reference.load(chosen.url)



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
