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

A row is reduced by a fixed sequence of float64 operations in index order (as
``semdedup.canonical_dot`` computes a dot product), so its reduced vector depends only on the
row and the projection, never on batching, threads or the BLAS; every stage that reduces the
same row gets the same bits. Truncation to d = D returns the rows unchanged, so a full-width
setting reproduces the unreduced run exactly.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["METHODS", "fit_pca", "project", "reduce", "truncate", "unit_rows"]

METHODS = ("truncate", "pca")
_CHUNK = 16384  # rows per step: bounds the float64 working set to _CHUNK x d


def unit_rows(y: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length as float32 (a zero row stays zero); the squared norm is summed
    in float64 in index order."""
    y64 = np.asarray(y, dtype=np.float64)
    if y64.ndim != 2:
        raise ValueError("expected a 2-D array [n, d]")
    out = np.empty(y64.shape, np.float32)
    for s in range(0, len(y64), _CHUNK):
        block = y64[s : s + _CHUNK]
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
    x = np.asarray(sample, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("sample must be a non-empty 2-D array [n, D]")
    n, width = x.shape
    if not 1 <= d <= width:
        raise ValueError(f"cannot fit {d} principal components to {width}-d vectors")
    if not np.all(np.isfinite(x)):
        raise ValueError("sample must be finite")
    mean = x.sum(axis=0) / n if centre else np.zeros(width)
    moment = np.zeros((width, width), np.float64)
    for s in range(0, n, _CHUNK):
        block = x[s : s + _CHUNK] - mean
        moment += block.T @ block
    moment /= n
    values, vectors = np.linalg.eigh((moment + moment.T) / 2)
    order = np.argsort(-values, kind="stable")[:d]
    components = vectors[:, order].T  # [d, D]
    lead = np.argmax(np.abs(components), axis=1)
    signs = np.where(components[np.arange(d), lead] < 0, -1.0, 1.0)
    return np.ascontiguousarray(components * signs[:, None])


def project(x: npt.ArrayLike, projection: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Rows projected onto the projection's components ``[d, D]`` and renormalised.

    Each output coordinate is summed over the input coordinates in index order in float64."""
    xa = np.asarray(x, dtype=np.float32)
    p = np.asarray(projection, dtype=np.float64)
    if xa.ndim != 2 or p.ndim != 2 or p.shape[1] != xa.shape[1] or len(p) < 1:
        raise ValueError(f"a projection [d, {xa.shape[-1]}] is needed for {xa.shape[-1]}-d rows, got {p.shape}")
    weights = p.T  # [D, d]: row i is what input coordinate i adds to each output
    out = np.empty((len(xa), len(p)), np.float32)
    term = np.empty((min(len(xa), _CHUNK), len(p)), np.float64)
    for s in range(0, len(xa), _CHUNK):
        rows = xa[s : s + _CHUNK].astype(np.float64)
        acc = np.zeros((len(rows), len(p)), np.float64)
        part = term[: len(rows)]
        for i in range(rows.shape[1]):
            np.multiply(rows[:, i : i + 1], weights[i], out=part)
            acc += part
        out[s : s + _CHUNK] = unit_rows(acc)
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
