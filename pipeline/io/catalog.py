"""DuckDB views over a run's Parquet files: `samples`, `embeddings`, `clusters`."""

from __future__ import annotations

import os
import tempfile

import duckdb

from pipeline.io import fs

VIEWS = {"samples": "metadata", "embeddings": "embeddings", "clusters": "clusters"}


def _view_sources(run_url: str) -> dict[str, str]:
    """view name -> parquet glob, for the views whose files exist."""
    sources = {}
    for view, folder in VIEWS.items():
        if fs.list_files(fs.join(run_url, folder), ".parquet"):
            sources[view] = fs.join(run_url, folder, "*.parquet")
    return sources


def _register_filesystem(con: duckdb.DuckDBPyConnection, run_url: str) -> None:
    """Let DuckDB read remote runs through fsspec (its own httpfs extension needs a download)."""
    if fs.has_protocol(run_url) and not run_url.startswith("file://"):
        con.register_filesystem(fs.to_fs(run_url)[0])


def _create_views(con: duckdb.DuckDBPyConnection, run_url: str) -> list[str]:
    sources = _view_sources(run_url)
    for view, glob in sources.items():
        source = glob if fs.has_protocol(glob) else os.path.abspath(glob)
        con.execute(f"create view {view} as select * from read_parquet('{source}', union_by_name = true)")
    return sorted(sources)


def connect(run_url: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views; works for local and fsspec (s3://, gs://) runs."""
    con = duckdb.connect()
    _register_filesystem(con, run_url)
    _create_views(con, run_url)
    return con


def write_catalog(run_url: str, catalog_url: str) -> list[str]:
    """Write catalog.duckdb with the views (absolute paths), for users who open it directly.

    For a remote run the views name s3:// (gs://, ...) URLs: opening the file then needs DuckDB's
    httpfs extension or an fsspec filesystem registered on the connection; `curate query` does that.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "catalog.duckdb")
        con = duckdb.connect(local)
        _register_filesystem(con, run_url)
        views = _create_views(con, run_url)
        con.close()
        fs.put_file_atomic(local, catalog_url)
    return views
