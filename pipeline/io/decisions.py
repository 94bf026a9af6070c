"""The cumulative keep/drop verdict of every sample, one file per partition, and the updates a
decision step makes to it.

A decision step never loads the pool's verdicts. Its global part (a shuffle or an aggregate)
writes, per partition, an *update* table: rows (by their position in the partition) that the
step drops, with reason, detail, duplicate_of and the DECISION_VALUES it fills. Applying the
updates to a partition's verdict is a per-partition job: the first reason wins, so a row an
earlier step dropped keeps its reason. Counting and that rule live here once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.io import fs
from pipeline.io.parquet import read_table, write_table_atomic
from pipeline.reasons import REASON_NAMES
from pipeline.schema import DECISION_SCHEMA, DECISION_VALUES

UPDATE_SCHEMA = pa.schema(
    [pa.field("row", pa.int64()), pa.field("drop_reason", pa.string()), pa.field("drop_detail", pa.string()),
     pa.field("duplicate_of", pa.string())]
    + [pa.field(name, kind) for name, kind in DECISION_VALUES.items()]
)


def read_verdict(url: str) -> pa.Table:
    """A partition's verdict as DECISION_SCHEMA (ingest files are verdict files too: they carry
    uid, drop_reason and drop_detail; the columns they lack are null)."""
    table = read_table(url)
    n = table.num_rows
    columns = {}
    for field in DECISION_SCHEMA:
        columns[field.name] = (table.column(field.name).cast(field.type) if field.name in table.column_names
                               else pa.nulls(n, field.type))
    return pa.table(columns, schema=DECISION_SCHEMA)


def survivor_rows(verdict: pa.Table) -> np.ndarray:
    """Row indices of samples no step has dropped yet."""
    return np.flatnonzero(verdict.column("drop_reason").is_null().to_numpy(zero_copy_only=False))


def updates(rows, reason: str, details=None, duplicate_of=None, **values) -> pa.Table:
    """An update table dropping `rows` for `reason`; `values` fill DECISION_VALUES columns."""
    if reason not in REASON_NAMES:
        raise ValueError(f"unknown drop reason {reason!r}")
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    columns = {
        "row": pa.array(rows, pa.int64()),
        "drop_reason": pa.array([reason] * n, pa.string()),
        "drop_detail": pa.array(details, pa.string()) if details is not None else pa.nulls(n, pa.string()),
        "duplicate_of": pa.array(duplicate_of, pa.string()) if duplicate_of is not None else pa.nulls(n, pa.string()),
    }
    for name, kind in DECISION_VALUES.items():
        columns[name] = pa.array(np.asarray(values[name]), kind) if name in values else pa.nulls(n, kind)
    return pa.table(columns, schema=UPDATE_SCHEMA)


def no_updates() -> pa.Table:
    return UPDATE_SCHEMA.empty_table()


def write_updates(table: pa.Table, url: str) -> None:
    """Write one partition's updates in row order (so the file is the same whatever order the
    shuffle delivered them in)."""
    table = table.select(UPDATE_SCHEMA.names).cast(UPDATE_SCHEMA)
    write_table_atomic(table.take(np.argsort(table.column("row").to_numpy(), kind="stable")), url)


def read_updates(url: str) -> pa.Table:
    return read_table(url).cast(UPDATE_SCHEMA) if fs.exists(url) else no_updates()


def apply_updates(verdict: pa.Table, update: pa.Table, values: dict[str, np.ndarray] | None = None) -> tuple[pa.Table, dict[str, int]]:
    """The verdict after `update`: each listed row still alive takes the update's reason, detail,
    duplicate_of and values; rows already dropped keep their first reason. `values` (whole
    columns, NaN where unset) are set on every row where they are not NaN, dropped or not (DBP
    records the cluster of every sample that reached it). Returns the new verdict and the count
    of rows this update dropped, by reason."""
    n = verdict.num_rows
    rows = update.column("row").to_numpy().astype(np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows)):
        raise ValueError("an update names a row twice or one the partition does not have")
    reason = verdict.column("drop_reason").to_numpy(zero_copy_only=False).astype(object)
    fresh = np.equal(reason[rows], None)
    rows = rows[fresh]
    chosen = update.filter(pa.array(fresh))
    columns = {"uid": verdict.column("uid")}
    for name in ("drop_reason", "drop_detail", "duplicate_of"):
        column = verdict.column(name).to_numpy(zero_copy_only=False).astype(object)
        column[rows] = chosen.column(name).to_numpy(zero_copy_only=False).astype(object)
        columns[name] = pa.array(column, pa.string())
    for name, kind in DECISION_VALUES.items():
        column = verdict.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy().copy()
        given = chosen.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()
        column[rows] = np.where(np.isnan(given), column[rows], given)
        if values and name in values:
            extra = np.asarray(values[name], dtype=np.float64)
            column = np.where(np.isnan(extra), column, extra)
        columns[name] = pa.array(column, pa.float64(), mask=np.isnan(column)).cast(kind)
    dropped: dict[str, int] = {}
    for name in chosen.column("drop_reason").to_pylist():
        dropped[name] = dropped.get(name, 0) + 1
    return pa.table(columns, schema=DECISION_SCHEMA), dropped


def write_verdict(table: pa.Table, url: str) -> None:
    write_table_atomic(table, url)
