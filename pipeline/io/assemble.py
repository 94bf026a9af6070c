"""Join a partition's stage outputs into metadata rows (METADATA_SCHEMA), by row position."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import METADATA_SCHEMA


def build_metadata(ingest: pa.Table, verdict: pa.Table, extras: list[pa.Table] = ()) -> pa.Table:
    """Columns in METADATA_SCHEMA order; `verdict` and `extras` are row-aligned with `ingest`.

    Every stage writes a partition's rows in ingest order, so joining is positional; the uid
    columns are compared to prove it. Columns of stages that did not run are null, so the
    schema never changes.
    """
    for other in (verdict, *extras):
        if other.num_rows != ingest.num_rows or not other.column("uid").equals(ingest.column("uid")):
            raise ValueError("stage outputs are not aligned with the ingest rows of this partition")
    sources = {name: ingest.column(name) for name in ingest.column_names}
    for extra in extras:
        sources.update({name: extra.column(name) for name in extra.column_names if name != "uid"})
    for name in verdict.column_names:
        if name != "uid":
            sources[name] = verdict.column(name)
    sources["kept"] = pc.is_null(verdict.column("drop_reason"))
    columns = []
    for field in METADATA_SCHEMA:
        column = sources.get(field.name)
        columns.append(pa.nulls(ingest.num_rows, field.type) if column is None else column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=METADATA_SCHEMA)
