"""`manifest.json`: the run's config, versions, inputs and per-stage progress (resume and audit).

A stage is skipped on rerun when its record is complete and its fingerprint (its config and the
fingerprints of the stages it reads) is unchanged; an incomplete stage with the same fingerprint
resumes, redoing only partitions not recorded as done. A partition is recorded only after its
output was renamed into place, so a recorded partition is always complete on disk.

Each record keeps what its fingerprint was computed from (`inputs`), so that a rerun can name what
changed; ingest's partitions record the size, stamp and sha256 of the files they read, so that the
input is compared by content.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata

from pipeline.io import fs

PACKAGES = ("curate", "ray", "pyarrow", "duckdb", "numpy", "pillow", "imagehash", "torch", "open_clip_torch", "faiss-cpu", "fsspec")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class StageRecord:
    fingerprint: str
    complete: bool = False
    partitions_done: list[int] = field(default_factory=list)
    seconds: float = 0.0
    samples_in: int = 0
    samples_out: int = 0
    counts: dict = field(default_factory=dict)
    skipped: bool = False
    # What the fingerprint was computed from (config section, upstream fingerprints, input), so
    # that a rerun can say what changed.
    inputs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "complete": self.complete,
            "partitions_done": sorted(self.partitions_done),
            "seconds": round(self.seconds, 3),
            "samples_in": self.samples_in,
            "samples_out": self.samples_out,
            "counts": self.counts,
            "skipped": self.skipped,
            "inputs": self.inputs,
        }


class Manifest:
    def __init__(self, url: str, data: dict):
        self.url = url
        self.data = data
        self._last_save = 0.0

    @classmethod
    def load(cls, url: str) -> "Manifest":
        if fs.exists(url):
            return cls(url, json.loads(fs.read_bytes(url)))
        return cls(url, {"stages": {}})

    def stage(self, name: str) -> StageRecord | None:
        raw = self.data["stages"].get(name)
        if raw is None:
            return None
        return StageRecord(
            fingerprint=raw["fingerprint"],
            complete=raw.get("complete", False),
            partitions_done=list(raw.get("partitions_done", [])),
            seconds=raw.get("seconds", 0.0),
            samples_in=raw.get("samples_in", 0),
            samples_out=raw.get("samples_out", 0),
            counts=raw.get("counts", {}),
            skipped=raw.get("skipped", False),
            inputs=raw.get("inputs", {}),
        )

    def set_stage(self, name: str, record: StageRecord, *, save: bool = True, throttle_s: float = 0.0) -> None:
        self.data["stages"][name] = record.to_json()
        if save and time.monotonic() - self._last_save >= throttle_s:
            self.save()

    def drop_stage(self, name: str) -> None:
        self.data["stages"].pop(name, None)

    def save(self) -> None:
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fs.write_bytes_atomic(self.url, (json.dumps(self.data, indent=2, sort_keys=False) + "\n").encode())
        self._last_save = time.monotonic()
