"""DuckDB views over a run's files: `samples`, `embeddings`, `clusters` (its Parquet), `duplicates`
(each dedup drop with the sample its `duplicate_of` chain ends at) and `shard_errors` (the input
shards that could not be read to their end, from manifest.json)."""

from __future__ import annotations

import os
import tempfile

import duckdb

from pipeline.io import fs
from pipeline.reasons import DROP_REASONS

VIEWS = {"samples": "metadata", "embeddings": "embeddings", "clusters": "clusters"}

# Rows that are no link of a duplicate_of chain: those dropped before dedup, and duplicate_uid drops,
# which share their uid with the sample they point at (the first survivor of that uid).
_NOT_LINKS = tuple(r.name for r in DROP_REASONS if r.step in ("ingest", "basic_filter")) + ("duplicate_uid",)
# Dedup never makes a cycle; a chain this long would be one, and shows up with this many hops.
MAX_HOPS = 64

# A dedup drop points at a sample that may itself be a duplicate (an exact copy of a near duplicate
# of a semantic duplicate ...), and the end of the chain, which survived dedup, may still have been
# dropped by a select step. `survivor_*` names that end sample; `survivor_kept` is null when it is
# not in this run (a sample an earlier run of the reference chain published).
DUPLICATES_VIEW = f"""
create view duplicates as
with recursive
links as (
    select uid, duplicate_of, kept, drop_reason from samples
    where drop_reason is null or drop_reason not in ({", ".join(f"'{name}'" for name in _NOT_LINKS)})
),
chain as (
    select uid, shard, key, drop_reason, duplicate_of, duplicate_of as reached, 1 as hops
    from samples where duplicate_of is not null
    union all
    select c.uid, c.shard, c.key, c.drop_reason, c.duplicate_of, l.duplicate_of, c.hops + 1
    from chain c join links l on l.uid = c.reached
    where l.duplicate_of is not null and c.hops < {MAX_HOPS}
)
select c.uid, c.drop_reason, c.duplicate_of, c.reached as survivor_uid, l.kept as survivor_kept,
       l.drop_reason as survivor_drop_reason, c.hops, c.shard, c.key
from chain c left join links l on l.uid = c.reached
where l.duplicate_of is null or c.hops = {MAX_HOPS}
"""


def _sql_string(text: str) -> str:
    """`text` as a SQL string literal (quotes doubled): a view stores its SQL, so a path cannot be a
    bound parameter there, and a path may hold an apostrophe."""
    return "'" + text.replace("'", "''") + "'"


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


# manifest.json's `shard_errors`, one row per entry; the column types are given, so that a run
# without errors (an empty list) has the same columns.
SHARD_ERRORS_VIEW = """
create view shard_errors as
select e.shard, e."offset", e.error
from (select unnest(shard_errors) as e
      from read_json({manifest}, columns = {{'shard_errors': 'STRUCT(shard VARCHAR, "offset" BIGINT, error VARCHAR)[]'}}))
"""


def _create_views(con: duckdb.DuckDBPyConnection, run_url: str) -> list[str]:
    sources = _view_sources(run_url)
    for view, glob in sources.items():
        source = glob if fs.has_protocol(glob) else os.path.abspath(glob)
        con.execute(f"create view {view} as select * from read_parquet({_sql_string(source)}, union_by_name = true)")
    views = sorted(sources)
    if "samples" in sources:
        con.execute(DUPLICATES_VIEW)
        views.append("duplicates")
    manifest = fs.join(run_url, "manifest.json")
    if fs.exists(manifest):
        con.execute(SHARD_ERRORS_VIEW.format(manifest=_sql_string(manifest if fs.has_protocol(manifest)
                                                                  else os.path.abspath(manifest))))
        views.append("shard_errors")
    return views


def connect(run_url: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views; works for local and fsspec (s3://, gs://) runs.

    A URL with neither manifest.json nor metadata/ (a typo) raises NotARunError naming it, rather than
    leaving the user with DuckDB's error about a missing view.
    """
    from pipeline.io.reference import NotARunError

    if not fs.exists(fs.join(run_url, "manifest.json")) and not fs.list_files(fs.join(run_url, "metadata"), ".parquet"):
        raise NotARunError(f"{run_url.rstrip('/')} is not a run (no manifest.json, no metadata/)")
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
