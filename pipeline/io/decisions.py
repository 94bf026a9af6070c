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
from pipeline.schema import DECISION_SCHEMA, DECISION_VALUES


class Decisions:
    def __init__(self, partition, uid, reason, detail, duplicate_of, values: dict[str, np.ndarray]):
        self.partition = partition
        self.uid = uid
        self.reason = reason
        self.detail = detail
        self.duplicate_of = duplicate_of
        self.values = values  # DECISION_VALUES columns as float64, NaN where null
        self.dropped_by_step: Counter = Counter()

    @classmethod
    def load(cls, urls_by_partition: dict[int, str]) -> "Decisions":
        """Concatenate the verdict files of all partitions (in partition order).

        Ingest files are verdict files too (they carry uid, drop_reason and drop_detail)."""
        parts, uids, reasons, details, dups = [], [], [], [], []
        values: dict[str, list] = {name: [] for name in DECISION_VALUES}
        for partition in sorted(urls_by_partition):
            table = read_table(urls_by_partition[partition])
            n = table.num_rows
            column = lambda name, kind=pa.string(): (
                table.column(name) if name in table.column_names else pa.nulls(n, kind)
            )
            parts.append(np.full(n, partition, dtype=np.int32))
            uids.append(_objects(column("uid")))
            reasons.append(_objects(column("drop_reason")))
            details.append(_objects(column("drop_detail")))
            dups.append(_objects(column("duplicate_of")))
            for name, kind in DECISION_VALUES.items():
                values[name].append(column(name, kind).cast(pa.float64()).to_numpy(zero_copy_only=False))
        join = lambda arrays, dtype=object: np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)
        return cls(
            join(parts, np.int32), join(uids), join(reasons), join(details), join(dups),
            {name: join(arrays, np.float64) for name, arrays in values.items()},
        )

    def __len__(self) -> int:
        return len(self.uid)

    def survivors(self) -> np.ndarray:
        """Row indices of samples no step has dropped yet."""
        return np.flatnonzero(np.equal(self.reason, None))

    def drop(self, rows: np.ndarray, reason: str, details=None, duplicate_of=None, **values) -> int:
        """Drop `rows` (indices into this table) for `reason`; rows already dropped keep their first
        reason. `values` fill DECISION_VALUES columns for the rows dropped here."""
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
        for name, column in values.items():
            self.values[name][rows] = np.asarray(column, dtype=np.float64)[fresh]
        self.dropped_by_step[reason] += len(rows)
        return len(rows)

    def set_values(self, name: str, rows: np.ndarray, column: np.ndarray) -> None:
        self.values[name][np.asarray(rows, dtype=np.int64)] = column

    def write(self, urls_by_partition: dict[int, str]) -> None:
        for partition, url in urls_by_partition.items():
            rows = self.partition == partition
            columns = {
                "uid": pa.array(self.uid[rows], pa.string()),
                "drop_reason": pa.array(self.reason[rows], pa.string()),
                "drop_detail": pa.array(self.detail[rows], pa.string()),
                "duplicate_of": pa.array(self.duplicate_of[rows], pa.string()),
            }
            for name, kind in DECISION_VALUES.items():
                column = self.values[name][rows]
                columns[name] = pa.array(column, pa.float64(), mask=np.isnan(column)).cast(kind)
            write_table_atomic(pa.table(columns, schema=DECISION_SCHEMA), url)

    def reason_counts(self) -> dict[str, int]:
        counts = Counter(r for r in self.reason if r is not None)
        return {name: counts[name] for name in REASON_NAMES if counts[name]}


def _objects(column) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(object)
