"""Fewer dimensions for k-means, SemDeDup and DBP (docs/algorithms.md section 3.1).

Two reductions of L2-normalised embeddings ``[n, D]`` to ``[n, d]``, both renormalised to unit
length so that inner products stay cosines:

- ``truncate``: the first d coordinates (Matryoshka truncation; models trained with a nested loss
  put the most information first, for others it is a cheap projection of unknown quality);
- ``pca``: the d principal directions of a training sample, fitted once, saved, and applied as
  they are to every later row. They are the directions of the sample's uncentred second moment
  (its top right singular vectors): the consumers compare cosines, and a projection through the
  origin keeps them, where centring on the sample mean first would measure angles around the
  mean instead (benchmarks/reduced_dims.py compares the two).

A row's reduced vector depends only on the row (and the projection), never on batching, threads
or the BLAS, so every stage that reduces the same row gets the same bits: norms are summed in
float64 in index order (as ``semdedup.canonical_dot`` sums a dot product), and the projection is
exact: the rows are taken on the grid of 2**-24 (every float16 value lies on it, and stored
embeddings are float16), the components are rounded to the grid of 2**-26, so every product is
a multiple of 2**-50 and, for rows of norm at most 4, every partial sum of a dot product is below
2**2: all exact in float64, whatever order a BLAS adds them in. Truncation to d = D returns the
rows unchanged, so a full-width setting reproduces the unreduced run exactly.

The fit itself (float64 BLAS and LAPACK) runs once, in the k-means training task; the same sample
gives the same projection on the same machine, and what is saved is what every row gets.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["METHODS", "fit_pca", "project", "reduce", "truncate", "unit_rows"]

METHODS = ("truncate", "pca")
_CHUNK = 16384  # rows per step: bounds the float64 working set to _CHUNK x D
_ROW_GRID = 2.0**24  # rows are taken on the grid of 2**-24: every float16 value lies on it
_WEIGHT_GRID = 2.0**26  # components on the grid of 2**-26: products are multiples of 2**-50
_MAX_NORM = 4.0  # rows up to this norm keep every partial sum below 2**2: exact in float64


def unit_rows(y: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length as float32 (a zero row stays zero); the squared norm is summed
    in float64 in index order."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError("expected a 2-D array [n, d]")
    out = np.empty(y.shape, np.float32)
    for s in range(0, len(y), _CHUNK):
        block = np.asarray(y[s : s + _CHUNK], np.float64)  # float64 a chunk at a time
        squared = np.zeros(len(block), np.float64)
        for i in range(block.shape[1]):
            squared += block[:, i] * block[:, i]
        norm = np.sqrt(squared)
        out[s : s + _CHUNK] = block / np.where(norm > 0, norm, 1.0)[:, None]
    return out


def truncate(x: npt.ArrayLike, d: int) -> npt.NDArray[np.float32]:
    """The first d coordinates of each row, renormalised; d equal to the width: x unchanged (float32)."""
    xa = np.asarray(x, dtype=np.float32)
    if xa.ndim != 2:
        raise ValueError("x must be a 2-D array [n, D]")
    if not 1 <= d <= xa.shape[1]:
        raise ValueError(f"cannot keep {d} of {xa.shape[1]} dimensions")
    if d == xa.shape[1]:
        return xa
    return unit_rows(xa[:, :d])


def fit_pca(sample: npt.ArrayLike, d: int, *, centre: bool = False) -> npt.NDArray[np.float64]:
    """The projection onto the sample's d principal directions: float64 ``[d, D]``, unit rows by
    decreasing second moment (with ``centre``: variance about the sample mean, for comparison).

    The moment matrix and its eigenvectors are computed in float64 (numpy: LAPACK ``syevd``); each
    component's sign is fixed so that its largest-magnitude coordinate (the first, on ties) is
    positive, so the same sample gives the same projection."""
    sample = np.asarray(sample)
    if sample.ndim != 2 or len(sample) == 0:
        raise ValueError("sample must be a non-empty 2-D array [n, D]")
    n, width = sample.shape
    if not 1 <= d <= width:
        raise ValueError(f"cannot fit {d} principal components to {width}-d vectors")
    if not np.all(np.isfinite(sample)):
        raise ValueError("sample must be finite")
    mean = np.zeros(width)
    if centre:
        for s in range(0, n, _CHUNK):
            mean += np.asarray(sample[s : s + _CHUNK], np.float64).sum(axis=0)
        mean /= n
    moment = np.zeros((width, width), np.float64)
    for s in range(0, n, _CHUNK):  # float64 a chunk at a time: the sample may be large
        block = np.asarray(sample[s : s + _CHUNK], np.float64) - mean
        moment += block.T @ block
    moment /= n
    values, vectors = np.linalg.eigh((moment + moment.T) / 2)
    order = np.argsort(-values, kind="stable")[:d]
    components = vectors[:, order].T  # [d, D]
    lead = np.argmax(np.abs(components), axis=1)
    signs = np.where(components[np.arange(d), lead] < 0, -1.0, 1.0)
    return np.ascontiguousarray(np.round(components * signs[:, None] * _WEIGHT_GRID) / _WEIGHT_GRID)


def project(x: npt.ArrayLike, projection: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Rows projected onto the projection's components ``[d, D]`` and renormalised.

    Exact in float64 (module docstring): rows on the 2**-24 grid, components on the 2**-26 grid
    (as fit_pca gives them), rows of norm at most 4."""
    xa = np.asarray(x, dtype=np.float32)
    p = np.asarray(projection, dtype=np.float64)
    if xa.ndim != 2 or p.ndim != 2 or p.shape[1] != xa.shape[1] or len(p) < 1:
        raise ValueError(f"a projection [d, {xa.shape[-1]}] is needed for {xa.shape[-1]}-d rows, got {p.shape}")
    if not np.array_equal(np.round(p * _WEIGHT_GRID) / _WEIGHT_GRID, p) or np.abs(p).max() > 1:
        raise ValueError("the projection's components must be unit vectors on the 2**-26 grid (as fit_pca gives them)")
    weights = np.ascontiguousarray(p.T)  # [D, d]
    out = np.empty((len(xa), len(p)), np.float32)
    for s in range(0, len(xa), _CHUNK):
        rows = np.round(xa[s : s + _CHUNK].astype(np.float64) * _ROW_GRID) / _ROW_GRID
        if not np.all(np.isfinite(rows)) or (len(rows) and np.einsum("ij,ij->i", rows, rows).max() > _MAX_NORM**2):
            raise ValueError(f"rows to project must be finite and of norm at most {_MAX_NORM:g}")
        out[s : s + _CHUNK] = unit_rows(rows @ weights)
    return out


def reduce(x: npt.ArrayLike, dims: int | None, method: str = "truncate",
           projection: npt.ArrayLike | None = None) -> npt.NDArray[np.float32]:
    """x in the reduced space: dims None (full width) leaves it as it is; pca needs the projection."""
    if method not in METHODS:
        raise ValueError(f"unknown reduction {method!r}; one of {METHODS}")
    if method == "pca":
        if projection is None:
            raise ValueError("pca needs its fitted projection")
        return project(x, projection)
    xa = np.asarray(x, dtype=np.float32)
    return xa if dims is None else truncate(xa, dims)
