"""What a run is: its output layout, its input partitions, and the context every stage receives."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from pipeline.config import CurateConfig
from pipeline.io import fs
from pipeline.io.manifest import Manifest, StageRecord

log = logging.getLogger("curate")
PROGRESS_EVERY_S = 10.0  # a stage's progress lines come at most this often


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
        """A stage's per-partition file; the embed and metadata stages' are the user-facing
        embeddings/ and metadata/."""
        if stage == "embed":
            return self.url("embeddings", f"part-{partition:06d}.parquet")
        if stage == "metadata":
            return self.metadata_part(partition)
        return self.url("stages", stage, f"part-{partition:06d}.parquet")

    def stage_part_pattern(self, stage: str) -> str:
        """stage_part as a format string with `{partition}`, for workers to fill in."""
        return self.stage_part(stage, 0).replace("part-000000.parquet", "part-{partition:06d}.parquet")

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


class UndeclaredReadError(RuntimeError):
    """A stage read a file of a stage it does not declare it reads: its resume and the config's
    checks would not know of that dependency."""


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
    reads: tuple[str, ...] = ()  # the stages this one declares it reads (pipeline.stages)
    resources: object = None  # its declared pipeline.stages.Resources
    _done_now: int = 0  # partitions finished in this run (not an earlier, interrupted one)
    _samples_now: int = 0
    _progress: object = None  # the stage's pipeline.ray_progress.Progress, when it has one
    _logged_at: float = 0.0

    @property
    def item_timeout_s(self) -> float | None:
        """The wall-clock bound of one work item (ray.item_timeout_s), for map_items / map_prepared."""
        return self.config.ray.item_timeout_s

    def read(self, stage: str, partition: int) -> str:
        """The URL of another stage's file for `partition`, which this stage must declare it reads."""
        self._check_read(stage)
        return self.paths.stage_part(stage, partition)

    def read_pattern(self, stage: str) -> str:
        """read() as a format string with `{partition}`, for workers to fill in."""
        self._check_read(stage)
        return self.paths.stage_part_pattern(stage)

    def reading(self, stage: str) -> bool:
        """Whether this stage reads `stage` in this run (an optional read: its stage ran)."""
        return stage in self.reads

    def _check_read(self, stage: str) -> None:
        if stage != self.stage_name and stage not in self.reads:
            raise UndeclaredReadError(f"stage {self.stage_name} reads {stage}'s files but does not declare it "
                                      f"(it reads {', '.join(self.reads) or 'nothing'}; see pipeline.stages)")

    def progress(self, total: int, measure: str = "samples"):
        """A tracker of the work inside this stage's partitions, for map_items / map_prepared:
        workers report counts in `measure` (of which `total` is to be done), the driver logs totals,
        rate and ETA every few seconds, and counts the finished partitions in those lines."""
        from pipeline.ray_progress import Progress

        self._progress = Progress(self.stage_name, total, measure=measure,
                                  partitions=self.record.counts.get("partitions_total", 0),
                                  partitions_done=len(self.record.partitions_done), every_s=PROGRESS_EVERY_S)
        return self._progress

    def partition_done(self, partition: int, stats: dict) -> None:
        """Record a completed partition (its output is already renamed into place) and log progress.

        A stage that tracks work inside partitions (`progress`) logs through its tracker; for the
        others a line at most every PROGRESS_EVERY_S seconds, with an ETA from the partitions done.
        """
        if partition not in self.record.partitions_done:
            self.record.partitions_done.append(partition)
            self._done_now += 1
            self._samples_now += int(stats.get("samples", stats.get("count", 0)) or 0)
        self.record.counts.setdefault("partitions", {})[str(partition)] = stats
        self.manifest.set_stage(self.stage_name, self.record, throttle_s=2.0)
        done, total = len(self.record.partitions_done), self.record.counts.get("partitions_total", 0)
        if self._progress is not None:
            self._progress.partitions_done = done
            return
        now = time.perf_counter()
        if not self._done_now or done >= total or now - max(self.started, self._logged_at) < PROGRESS_EVERY_S:
            return  # the runner logs the stage's end
        self._logged_at = now
        elapsed = now - self.started
        eta = (total - done) * elapsed / self._done_now
        log.info("%s: %d/%d partitions, %d samples (%.0f samples/s), ETA %.0fs",
                 self.stage_name, done, total, self._samples_now, self._samples_now / elapsed, eta)

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


# A local file's times identify its content only when the content was read a little after the file
# last changed: a rewrite of the same size within the same tick of the filesystem's clock would
# otherwise leave size and times equal. The tick is a few milliseconds where times have sub-second
# parts (the kernel stamps with a coarse clock), up to two seconds where they have none (FAT, HFS+,
# some network filesystems). A stamp read within that window is not recorded, and the next run
# hashes the file instead of trusting it.
RACY_FINE_S = 0.05
RACY_COARSE_S = 2.0


def file_identity(url: str) -> dict:
    """A file's size and stamp: the key under which a rerun reuses the content digest of a file.

    The stamp is the object store's ETag where it has one (it changes whenever the bytes do), else
    a local file's modification and change times in nanoseconds (the change time moves on every
    write, even one that puts the modification time back), else the store's modification time.
    `settled_at` is when a local file last changed and `racy_s` how soon after that a read cannot
    trust the stamp (see RACY_FINE_S); both None where the stamp is not a time.
    """
    fsys, path = fs.to_fs(url)
    if "file" in _protocols(fsys):
        st = os.stat(path)
        coarse = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
        return {"size": st.st_size, "stamp": f"{st.st_mtime_ns}/{st.st_ctime_ns}",
                "settled_at": max(st.st_mtime_ns, st.st_ctime_ns) / 1e9,
                "racy_s": RACY_COARSE_S if coarse else RACY_FINE_S}
    info = fsys.info(path)
    etag = info.get("ETag") or info.get("etag")
    stamp = f"etag:{etag}" if etag else (
        info.get("generation") or info.get("LastModified") or info.get("mtime") or info.get("updated"))
    return {"size": info.get("size"), "stamp": None if stamp is None else str(stamp), "settled_at": None,
            "racy_s": None}


def _protocols(fsys) -> tuple[str, ...]:
    protocol = fsys.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def recorded_identity(identity: dict, sha256: str, read_started: float) -> dict:
    """What the manifest keeps of a file that was read (`identity` taken after `read_started`, a
    time.time(), and before the read): size, digest and, unless the read was racy, its stamp."""
    settled = identity["settled_at"]
    racy = settled is not None and read_started - settled < identity["racy_s"]
    return {"size": identity["size"], "stamp": None if racy else identity["stamp"], "sha256": sha256}


def file_digest(url: str, block_size: int = 8 * 2**20) -> str:
    """sha256 of a file's bytes, read as a stream."""
    digest = hashlib.sha256()
    with fs.open_input(url, block_size) as handle:
        while chunk := handle.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()


def unchanged_without_reading(recorded: dict | None, url: str) -> bool | None:
    """Whether a file still holds the bytes recorded for it, when its size and stamp tell.

    True: same size and stamp (the recorded digest holds). False: a different size, or the file
    appeared or went away. None: same size, another stamp; only hashing it again can tell.
    `recorded` is None for a file that did not exist when it was read.
    """
    exists = fs.exists(url)
    if recorded is None or not exists:
        return recorded is None and not exists
    now = file_identity(url)
    if now["size"] != recorded["size"]:
        return False
    if recorded.get("stamp") is not None and now["stamp"] == recorded["stamp"]:
        return True
    return None

