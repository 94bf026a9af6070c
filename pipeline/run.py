"""What a run is: its output layout, its input partitions, and the context every stage receives."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from pipeline.config import CurateConfig
from pipeline.io import fs
from pipeline.io.manifest import Manifest, StageRecord

log = logging.getLogger("curate")


class RunPaths:
    """Every file a run writes, under its output URL."""

    def __init__(self, output: str):
        self.root = output.rstrip("/")

    def url(self, *parts: str) -> str:
        return fs.join(self.root, *parts)

    @property
    def manifest(self) -> str:
        return self.url("manifest.json")

    def stage_dir(self, stage: str) -> str:
        return self.url("stages", stage)

    def stage_part(self, stage: str, partition: int) -> str:
        """A stage's per-partition file; the embed stage's are the user-facing embeddings/."""
        if stage == "embed":
            return self.url("embeddings", f"part-{partition:06d}.parquet")
        return self.url("stages", stage, f"part-{partition:06d}.parquet")

    @property
    def metadata_dir(self) -> str:
        return self.url("metadata")

    def metadata_part(self, partition: int) -> str:
        return self.url("metadata", f"part-{partition:06d}.parquet")

    @property
    def embeddings_dir(self) -> str:
        return self.url("embeddings")

    @property
    def clusters_dir(self) -> str:
        return self.url("clusters")

    @property
    def shards_dir(self) -> str:
        return self.url("shards")

    def shard(self, index: int) -> str:
        return self.url("shards", f"{index:08d}.tar")

    @property
    def catalog(self) -> str:
        return self.url("catalog.duckdb")

    @property
    def report(self) -> str:
        return self.url("report.html")


@dataclass(frozen=True)
class Partition:
    """One input shard; partitions are numbered by the sorted shard URLs."""

    index: int
    url: str
    name: str


@dataclass
class RunContext:
    config: CurateConfig
    paths: RunPaths
    partitions: list[Partition]
    manifest: Manifest
    record: StageRecord = field(default=None)  # the running stage's record
    stage_name: str = ""
    started: float = 0.0
    reference: object = None  # pipeline.io.reference.Reference of an incremental run
    _done_now: int = 0  # partitions finished in this run (not an earlier, interrupted one)
    _samples_now: int = 0

    def partition_done(self, partition: int, stats: dict) -> None:
        """Record a completed partition (its output is already renamed into place) and log progress."""
        if partition not in self.record.partitions_done:
            self.record.partitions_done.append(partition)
            self._done_now += 1
            self._samples_now += int(stats.get("samples", stats.get("count", 0)) or 0)
        self.record.counts.setdefault("partitions", {})[str(partition)] = stats
        self.manifest.set_stage(self.stage_name, self.record, throttle_s=2.0)
        done, total = len(self.record.partitions_done), self.record.counts.get("partitions_total", 0)
        elapsed = time.perf_counter() - self.started
        rate = self._samples_now / elapsed if elapsed > 0 else 0.0
        per_partition = elapsed / self._done_now if self._done_now else 0.0
        eta = (total - done) * per_partition
        log.info("%s: %d/%d partitions, %d samples (%.0f samples/s), ETA %.0fs",
                 self.stage_name, done, total, self._samples_now, rate, eta)

    def todo(self, indices: list[int]) -> list[int]:
        """The partitions of `indices` not yet done (resume)."""
        done = set(self.record.partitions_done)
        return [i for i in indices if i not in done]


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def discover_partitions(config: CurateConfig, seen: set[str] = frozenset()) -> list[Partition]:
    """The input shards not in `seen` (those an incremental run's reference chain processed)."""
    urls = fs.resolve_shards(config.input)
    names = dict(zip(urls, fs.shard_names(urls)))
    fresh = [url for url in urls if url not in seen]
    return [Partition(i, url, names[url]) for i, url in enumerate(fresh)]


def input_signature(partitions: list[Partition]) -> list[dict]:
    """What identifies the input for resume: each shard's URL, size and modification stamp."""
    signature = []
    for p in partitions:
        fsys, path = fs.to_fs(p.url)
        info = fsys.info(path)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag")
        signature.append({"url": p.url, "size": info.get("size"), "stamp": str(stamp)})
    return signature
