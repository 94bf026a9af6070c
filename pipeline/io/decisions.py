"""The cumulative keep/drop verdict of every sample, carried from one selection step to the next.

Each decision stage reads the previous verdicts, lets its steps drop survivors, and writes one
file per partition with every row in ingest order. Counting and the "first reason wins" rule live
here once, not in each step.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.reasons import REASON_NAMES
from pipeline.schema import DECISION_SCHEMA


class Decisions:
    def __init__(self, partition: np.ndarray, uid: np.ndarray, reason: np.ndarray, detail: np.ndarray, duplicate_of: np.ndarray):
        self.partition = partition
        self.uid = uid
        self.reason = reason
        self.detail = detail
        self.duplicate_of = duplicate_of
        self.dropped_by_step: Counter = Counter()

    @classmethod
    def load(cls, urls_by_partition: dict[int, str]) -> "Decisions":
        """Concatenate the verdict files of all partitions (in partition order)."""
        parts, uids, reasons, details, dups = [], [], [], [], []
        for partition in sorted(urls_by_partition):
            table = read_table(urls_by_partition[partition])
            columns = table.column_names
            n = table.num_rows
            parts.append(np.full(n, partition, dtype=np.int32))
            uids.append(table.column("uid").to_numpy(zero_copy_only=False).astype(object))
            reasons.append(table.column("drop_reason").to_numpy(zero_copy_only=False).astype(object))
            details.append(table.column("drop_detail").to_numpy(zero_copy_only=False).astype(object))
            dup = table.column("duplicate_of") if "duplicate_of" in columns else pa.nulls(n, pa.string())
            dups.append(dup.to_numpy(zero_copy_only=False).astype(object))
        join = lambda arrays, dtype=object: np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)
        return cls(join(parts, np.int32), join(uids), join(reasons), join(details), join(dups))

    def __len__(self) -> int:
        return len(self.uid)

    def survivors(self) -> np.ndarray:
        """Row indices of samples no step has dropped yet."""
        return np.flatnonzero(np.equal(self.reason, None))

    def drop(self, rows: np.ndarray, reason: str, details=None, duplicate_of=None) -> int:
        """Drop `rows` (indices into this table) for `reason`; rows already dropped keep their first reason."""
        if reason not in REASON_NAMES:
            raise ValueError(f"unknown drop reason {reason!r}")
        rows = np.asarray(rows, dtype=np.int64)
        fresh = np.equal(self.reason[rows], None)
        rows = rows[fresh]
        self.reason[rows] = reason
        if details is not None:
            self.detail[rows] = np.asarray(details, dtype=object)[fresh]
        if duplicate_of is not None:
            self.duplicate_of[rows] = np.asarray(duplicate_of, dtype=object)[fresh]
        self.dropped_by_step[reason] += len(rows)
        return len(rows)

    def write(self, urls_by_partition: dict[int, str]) -> None:
        for partition, url in urls_by_partition.items():
            rows = self.partition == partition
            table = pa.table(
                {
                    "uid": pa.array(self.uid[rows], pa.string()),
                    "drop_reason": pa.array(self.reason[rows], pa.string()),
                    "drop_detail": pa.array(self.detail[rows], pa.string()),
                    "duplicate_of": pa.array(self.duplicate_of[rows], pa.string()),
                },
                schema=DECISION_SCHEMA,
            )
            write_table_atomic(table, url)

    def reason_counts(self) -> dict[str, int]:
        counts = Counter(r for r in self.reason if r is not None)
        return {name: counts[name] for name in REASON_NAMES if counts[name]}
