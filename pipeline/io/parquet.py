"""Parquet files of a run: written atomically with fixed settings, so equal tables give equal bytes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import fs


def write_table_atomic(table: pa.Table, url: str) -> None:
    with fs.atomic_open(url, "wb") as handle:
        pq.write_table(table, handle, compression="zstd", row_group_size=64 * 1024)


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    fsys, path = fs.to_fs(url)
    return pq.read_table(path, columns=columns, filesystem=fsys)


def read_tables(urls: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    return [read_table(u, columns) for u in urls]
