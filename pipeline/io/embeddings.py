"""Read the embed stage's per-partition vectors (fixed-size float16 lists, null where not embedded)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.io.parquet import read_table


def vectors(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(present bool[n], float32[n_present, d]) from a fixed_size_list<float16> column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    present = array.is_valid().to_numpy(zero_copy_only=False)
    dim = array.type.list_size
    values = array.values.to_numpy(zero_copy_only=False).reshape(len(array), dim)
    return present, values[present].astype(np.float32)


def read_vectors(url: str, column: str = "image_embedding") -> tuple[np.ndarray, np.ndarray]:
    """(present bool[rows of the partition], float32[n_present, d])."""
    return vectors(read_table(url, [column]).column(column))
