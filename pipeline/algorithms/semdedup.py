"""SemDeDup inside one cluster (docs/algorithms.md section 4).

Members are visited in order of ``dist_to_centroid`` descending (ties: uid ascending).
Member ``b`` has ``M_b = max_{a before b} cos(x_a, x_b)`` and is dropped when
``M_b > 1 - eps``; ``duplicate_of`` is the argmax ``a`` (earliest in the order on ties).
There is no transitive rescue: ``b`` is dropped even when its ``a`` was dropped.

How the comparison is made exact
--------------------------------
A float32 matrix product does not have a unique value: two BLAS calls (a dense ``n x n``
product and a ``block x chunk`` tile, or the same pair seen as ``(a, b)`` and ``(b, a)``)
may differ in the last bits, so "identical to the dense computation" cannot mean "identical
float32 matmul output". Instead the deciding similarity of a pair is defined canonically:

    canon(a, b) = sum over i = 0 .. d-1, in that order, of float64(x_a[i]) * float64(x_b[i])

(every product of two float32 values is exact in float64, so this is a fixed, symmetric,
device-independent sequence of IEEE operations; it is within ~d * 2**-53 of the real dot
product). ``M_b`` and its argmax are taken over ``canon``; the drop test is
``M_b > 1 - eps`` in float64.

The float32 matrix products only *screen*: any summation order gives a value within
``E = (gamma_d(2**-24) + gamma_d(2**-53)) * max_norm**2`` of ``canon`` (the classic bound
for a length-d dot product, gamma_d(u) = d*u / (1 - d*u)). For each member, every earlier
``a`` whose screened value is within ``2E`` (plus a few float32 ulps) of the screened row
maximum is a candidate, and only candidates get ``canon`` evaluated; every other ``a`` is
provably below the canonical maximum. The blocked path and the dense reference run the same
candidate rule and the same refinement, so their outputs are equal however the BLAS rounds.
On torch devices where float32 matmuls may run in TF32 / bf16 (global precision flags), the
bound is widened to cover inputs rounded to 8 significant bits.

Cost: the blocked path multiplies only the lower triangle (``n^2 d`` flops, half the dense
product) in ``block_size x chunk`` tiles that stay in cache, reduces each tile to a row maximum
at once and never materialises the ``n x n`` matrix. Bitwise-identical embeddings are folded
onto their first occurrence before screening (a later copy can never be the earliest
argmax), so a large group of exact copies does not produce a quadratic candidate list.

Angular pruning (``prune=True``, the default of the eps-dependent entry points)
-------------------------------------------------------------------------------
Only pairs with ``canon(a, b) > T = 1 - eps`` can drop anything, and the sphere's triangle
inequality rules most of them out without a dot product. Take any reference direction ``c``
(the cluster centroid when the caller passes it, else the normalised mean of the members) and
let ``theta_i`` be the angle between ``x_i`` and ``c``. Then ``angle(x_a, x_b) >= |theta_a -
theta_b|``, and with ``N^2 >= max |x_i|^2`` and ``E_c = gamma_d(2**-53) N^2`` (the canonical
sum's error)

    canon(a, b) <= |x_a| |x_b| max(cos angle(x_a, x_b), 0) + E_c <= N^2 max(cos|theta_a - theta_b|, 0) + E_c,

so ``canon(a, b) <= T`` whenever ``|theta_a - theta_b| >= delta = arccos((T - E_c) / N^2)``.
The angles are computed here, in float64, from the embeddings themselves (never from the
caller's ``dist_to_centroid``), with error at most ``mu = (pi / sqrt 2) sqrt(e_cos)`` where
``e_cos`` bounds the error of the computed cosine (``|arccos u - arccos v| <= arccos(1 - |u -
v|) <= (pi / sqrt 2) sqrt|u - v|``); the band half-width is ``delta + 2 mu`` plus slack. Each row
block is multiplied only against the earlier members whose computed angle lies within that
distance of the block's angle range (the contiguous hull of them, in column chunks that hold at
least one), plus the block itself. Members are visited by ``dist_to_centroid`` descending, which
for consistent inputs is the angle descending, so the band is a short contiguous run just
before the block; for inconsistent inputs (distances to another clustering's centroid, a
shuffled column, unnormalised vectors) the bound still holds as written, the band merely
widens, up to the full triangle. Pruning is switched off (full triangle) when ``T - E_c <= 0``
(eps near 1 or above) or the reference direction is zero.

Why the result is unchanged: every pair outside a row's band has ``canon <= T``. If the true
``M_b > T``, its maximiser lies in the band, so the band's canonical maximum is ``M_b`` and its
earliest argmax is the same (out-of-band values are ``<= T < M_b`` and cannot tie); if ``M_b <=
T`` the band's maximum is ``<= T`` too. Either way ``dropped`` and ``duplicate_of`` equal the
dense reference's. ``max_similarity`` is exact where it exceeds ``1 - eps`` (the dropped rows);
elsewhere it is NaN (only known to be ``<= 1 - eps``; the band maximum would depend on the
block size). Re-thresholding at any ``eps' <= eps`` therefore stays exact; ``prune=False`` or
:func:`semdedup_max_similarity` (always unpruned) give ``M_b`` for every row.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "canonical_dot",
    "semdedup_cluster",
    "semdedup_cluster_with_similarity",
    "semdedup_cluster_dense",
    "semdedup_max_similarity",
    "semdedup_order",
]

Backend = Literal["auto", "numpy", "torch"]

_U32 = 2.0**-24
_U64 = 2.0**-53
# torch matmuls may round float32 inputs to TF32 (11 bits) or bf16 (8 bits) under global
# precision flags; 2**-7 bounds the relative input error of either, rounding or truncating.
_U_REDUCED_INPUT = 2.0**-7
_CPU_COL_CHUNK = 2048
_TORCH_COL_CHUNK = 16384
_REFINE_CHUNK = 4096


def semdedup_order(dist_to_centroid: npt.ArrayLike, uids: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Row indices in SemDeDup visiting order: dist_to_centroid descending, then uid ascending."""
    dist = np.asarray(dist_to_centroid)
    if dist.ndim != 1:
        raise ValueError("dist_to_centroid must be 1-D")
    u = _as_str_array(uids, len(dist))
    if dist.size and not np.all(np.isfinite(dist)):
        raise ValueError("dist_to_centroid must be finite")
    neg = -dist.astype(np.float64) + 0.0  # + 0.0 folds -0.0 into 0.0 so they tie
    return np.lexsort((u, neg)).astype(np.int64)


def semdedup_cluster(
    embeddings: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    uids: npt.ArrayLike,
    eps: float,
    block_size: int = 1024,
    *,
    device: str = "cpu",
    backend: Backend = "auto",
    centroid: npt.ArrayLike | None = None,
    prune: bool = True,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """SemDeDup for ONE cluster.

    Returns ``(dropped bool[n], duplicate_of int64[n])``; ``duplicate_of`` is a row index into
    the inputs, -1 where kept. Memory is O(block_size x min(n, chunk)) besides the inputs.
    ``device``: "cpu" (numpy BLAS) or a torch device such as "cuda" (blocks run in torch;
    inputs and outputs stay numpy). ``backend="torch"`` forces the torch path on any device.
    ``prune``: skip the pairs the angular bound rules out (module docstring); the result is
    identical either way. ``centroid``: the cluster's centroid [d] (any scale), used as the
    reference direction of the bound; default: the normalised mean of the members. It only
    steers how much work is skipped, never the result.
    """
    dropped, duplicate_of, _ = semdedup_cluster_with_similarity(
        embeddings, dist_to_centroid, uids, eps, block_size, device=device, backend=backend,
        centroid=centroid, prune=prune,
    )
    return dropped, duplicate_of


def semdedup_cluster_with_similarity(
    embeddings: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    uids: npt.ArrayLike,
    eps: float,
    block_size: int = 1024,
    *,
    device: str = "cpu",
    backend: Backend = "auto",
    centroid: npt.ArrayLike | None = None,
    prune: bool = True,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Like :func:`semdedup_cluster`, plus ``max_similarity`` float32[n], so a stage can record it.

    ``dropped`` and ``duplicate_of`` equal the dense reference's with or without ``prune``.
    ``max_similarity``: with ``prune=True`` (default) it is the exact ``M_b`` where ``M_b > 1 -
    eps`` (every dropped row) and NaN elsewhere (kept rows, known only to have ``M_b <= 1 -
    eps``), so it can be re-thresholded exactly at any ``eps' <= eps``. With ``prune=False``
    it is ``M_b`` for every row (NaN for the first member in the order), as
    :func:`semdedup_max_similarity` gives for any eps, at the cost of the full triangle."""
    eps = _check_eps(eps)
    if not prune:
        m, arg = semdedup_max_similarity(
            embeddings, dist_to_centroid, uids, block_size, device=device, backend=backend
        )
        return _threshold(m, arg, eps)
    m, arg = _max_similarity(
        embeddings, dist_to_centroid, uids, block_size, device, backend, eps=eps, centroid=centroid
    )
    dropped, duplicate_of, sim = _threshold(m, arg, eps)
    sim[~dropped] = np.nan
    return dropped, duplicate_of, sim


def semdedup_max_similarity(
    embeddings: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    uids: npt.ArrayLike,
    block_size: int = 1024,
    *,
    device: str = "cpu",
    backend: Backend = "auto",
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """eps-independent core: canonical ``M_b`` (float64, NaN for the first member) and its
    argmax as an input row index (-1 for the first member), both in input row order.
    ``dropped = M > 1 - eps`` for any eps. Never pruned: it multiplies the full lower triangle
    (the eps-dependent entry points skip what the angular bound rules out)."""
    return _max_similarity(embeddings, dist_to_centroid, uids, block_size, device, backend)


def _max_similarity(
    embeddings: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    uids: npt.ArrayLike,
    block_size: int,
    device: str,
    backend: Backend,
    *,
    eps: float | None = None,
    centroid: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Canonical ``M_b`` and argmax in input order. With ``eps`` the angular band is applied:
    exact where ``M_b > 1 - eps``; elsewhere a value ``<= 1 - eps`` (or NaN / -1 for a row with
    no earlier member in its band)."""
    x, order = _prepare(embeddings, dist_to_centroid, uids)
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    use_torch = backend == "torch" or (backend == "auto" and device != "cpu")
    if backend == "numpy" and device != "cpu":
        raise ValueError("backend='numpy' runs on the cpu only")
    xs = np.ascontiguousarray(x[order])
    band = None
    if eps is not None:
        ref = _reference_direction(xs, centroid)
        band = _angular_band(xs, ref, 1.0 - eps)
    if use_torch:
        m_s, arg_s = _blocked_torch(xs, int(block_size), device, band)
    else:
        m_s, arg_s = _blocked_numpy(xs, int(block_size), band)
    return _to_input_order(m_s, arg_s, order)


def semdedup_cluster_dense(
    embeddings: npt.ArrayLike,
    dist_to_centroid: npt.ArrayLike,
    uids: npt.ArrayLike,
    eps: float,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Dense reference, structured like the SemDeDup authors' code: the full ``n x n``
    similarity matrix, its strict upper triangle, the column maximum. Same candidate rule and
    canonical refinement as the blocked path. Returns ``(dropped, duplicate_of,
    max_similarity)``. O(n^2) memory: for tests and benchmarks."""
    x, order = _prepare(embeddings, dist_to_centroid, uids)
    xs = np.ascontiguousarray(x[order])
    n = xs.shape[0]
    if n <= 1:
        return _threshold(*_to_input_order(*_empty_core(n), order), eps)
    # a separate right operand makes numpy call gemm (the full product, as the reference
    # does); ``xs @ xs.T`` would go to OpenBLAS syrk, which crashes here for n ~ 50k
    sim = np.matmul(xs, xs.T.copy())
    for a in range(n):  # keep the strict upper triangle: column b sees rows a < b only
        sim[a, : a + 1] = -np.inf
    import torch  # column max without the transposed copy numpy's argmax(axis=0) makes

    col_max = torch.from_numpy(sim).amax(dim=0).numpy()
    window = _window(xs, reduced_precision=False)
    thr = _candidate_floor(col_max, window)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    step = max(1, (1 << 24) // n)
    for a0 in range(0, n, step):
        a_idx, b_idx = np.nonzero(sim[a0 : a0 + step] >= thr[None, :])
        rows.append(b_idx.astype(np.int64))
        cols.append(a_idx.astype(np.int64) + a0)
    del sim
    m_s, arg_s = _refine(xs, np.concatenate(rows), np.concatenate(cols))
    return _threshold(*_to_input_order(m_s, arg_s, order), eps)


# ----------------------------------------------------------------------------- internals


def _as_str_array(uids: npt.ArrayLike, n: int) -> np.ndarray:
    u = np.asarray(uids)
    if u.ndim != 1 or len(u) != n:
        raise ValueError(f"uids must be 1-D of length {n}")
    if u.dtype.kind not in "U":
        u = u.astype(str)
    return u


def _prepare(
    embeddings: npt.ArrayLike, dist_to_centroid: npt.ArrayLike, uids: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError("embeddings must be a 2-D array [n, d]")
    dist = np.asarray(dist_to_centroid)
    if dist.shape != (x.shape[0],):
        raise ValueError("dist_to_centroid must have one value per embedding row")
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError("embeddings must be finite")
    return x, semdedup_order(dist, uids)


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not np.isfinite(eps):
        raise ValueError("eps must be finite")
    return eps


def _threshold(
    m: np.ndarray, arg: np.ndarray, eps: float
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    eps = _check_eps(eps)
    dropped = m > (1.0 - eps)  # NaN (first member) compares False: kept
    duplicate_of = np.where(dropped, arg, -1).astype(np.int64)
    return dropped, duplicate_of, m.astype(np.float32)


def _empty_core(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, np.nan), np.full(n, -1, dtype=np.int64)


def _to_input_order(
    m_s: np.ndarray, arg_s: np.ndarray, order: np.ndarray
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    n = len(order)
    m = np.empty(n, dtype=np.float64)
    arg = np.empty(n, dtype=np.int64)
    m[order] = m_s
    mapped = np.where(arg_s >= 0, order[np.maximum(arg_s, 0)], -1)
    arg[order] = mapped
    return m, arg


def _gamma(d: int, u: float) -> float:
    du = d * u
    return du / (1.0 - du)


def _window(x: np.ndarray, *, reduced_precision: bool) -> float:
    """Width below the screened row maximum inside which a column may still hold the
    canonical maximum: 2E, plus slack for forming the float32 floor."""
    n, d = x.shape
    if n == 0:
        return 0.0
    max_norm_sq = float(np.max(np.einsum("ij,ij->i", x, x, dtype=np.float64)))
    max_norm_sq = max_norm_sq * (1.0 + 1e-12) + 1e-300
    if reduced_precision:
        ui = _U_REDUCED_INPUT
        rel = (2 * ui + ui * ui) + _gamma(d + 2, _U32) * (1 + ui) ** 2 + _gamma(d + 2, _U64)
    else:
        rel = _gamma(d + 2, _U32) + _gamma(d + 2, _U64)
    e = rel * max_norm_sq + d * 2.0**-140  # last term: float32 underflow of tiny products
    # the floor is formed in float32 next to values of size <= max_norm_sq: 8 ulps of slack
    return 2.0 * e + 8.0 * 2.0**-23 * max(1.0, max_norm_sq)


def _candidate_floor(best: np.ndarray, window: float) -> np.ndarray:
    """Screened values at or above this floor are candidates (float32, rounded down)."""
    floor = best.astype(np.float64) - window
    f32 = floor.astype(np.float32)
    bump = f32.astype(np.float64) > floor
    f32[bump] = np.nextafter(f32[bump], np.float32(-np.inf))
    f32[np.isneginf(best)] = np.inf  # a row with no earlier member has no candidate
    return f32


def _exact_copy_mask(xs: np.ndarray) -> np.ndarray | None:
    """True at rows whose embedding bitwise equals an EARLIER row's (in visiting order).

    Only a shortcut: rows are grouped by a float32 projection (identical rows almost always
    project identically) and groups are verified bit for bit, so a miss costs time, never
    correctness."""
    n, d = xs.shape
    if n < 2 or d == 0:
        return None
    probe = np.random.default_rng(0x5EDD).standard_normal(d).astype(np.float32)
    h = xs @ probe
    order = np.argsort(h, kind="stable")
    hs = h[order]
    dup = hs[1:] == hs[:-1]
    if not dup.any():
        return None
    bits = xs.view(np.uint32)
    mask = np.zeros(n, dtype=bool)
    starts = np.flatnonzero(np.r_[True, ~dup])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts[(ends - starts) > 1], ends[(ends - starts) > 1]):
        grp = np.sort(order[s:e])  # visiting positions, earliest first
        rows = bits[grp]
        claimed = np.zeros(len(grp), dtype=bool)
        for i in range(len(grp) - 1):
            if not claimed[i]:
                claimed[i + 1 :] |= np.all(rows[i + 1 :] == rows[i], axis=1)
        mask[grp[claimed]] = True
    return mask if mask.any() else None


# ----------------------------------------------------------------------------- angular band


class _Band(NamedTuple):
    """Angle (float64, radians) of each member, in visiting order, to the reference direction
    (NaN for a zero row, which has ``canon = 0`` with everyone), and the half-width ``reach``:
    a pair whose computed angles differ by ``>= reach`` has ``canon <= 1 - eps``."""

    theta: np.ndarray
    reach: float


def _reference_direction(xs: np.ndarray, centroid: npt.ArrayLike | None) -> np.ndarray | None:
    """Unit float64 reference direction: the given centroid, else the members' mean direction;
    None when that is zero (no band can be formed: the full triangle is used)."""
    d = xs.shape[1]
    if centroid is not None:
        c = np.asarray(centroid, dtype=np.float64).reshape(-1)
        if c.shape != (d,):
            raise ValueError(f"centroid must have {d} values")
        if not np.all(np.isfinite(c)):
            raise ValueError("centroid must be finite")
    else:
        if xs.shape[0] == 0:
            return None
        c = xs.sum(axis=0, dtype=np.float64)  # buffered cast: no float64 copy of xs
    norm = float(np.sqrt(c @ c))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return c / norm


def _angular_band(xs: np.ndarray, ref: np.ndarray | None, threshold: float) -> _Band | None:
    """The band for drop threshold ``threshold`` (= 1 - eps), or None where it cannot prune.

    Derivation (module docstring): with ``N^2`` bounding every squared norm and ``E_c`` the
    canonical sum's error, a pair at angle ``>= delta = arccos((T - E_c) / N^2)`` has ``canon
    <= T``; the angle between two members is at least the difference of their angles to
    ``ref``; the computed angles are within ``mu`` of the true ones. Every rounding below is
    taken in the direction that widens the band."""
    n, d = xs.shape
    if ref is None or n < 2 or d == 0:
        return None
    dots = np.empty(n, dtype=np.float64)
    norm_sq = np.empty(n, dtype=np.float64)
    for s in range(0, n, _REFINE_CHUNK):
        chunk = xs[s : s + _REFINE_CHUNK].astype(np.float64)
        dots[s : s + _REFINE_CHUNK] = chunk @ ref
        norm_sq[s : s + _REFINE_CHUNK] = np.einsum("ij,ij->i", chunk, chunk)
    g = _gamma(d + 8, _U64)
    # N^2 >= every true squared norm: the computed sums are within gamma_d of the true ones
    big_n_sq = float(norm_sq.max()) * (1.0 + 4.0 * g) + 1e-300
    e_canon = g * big_n_sq  # |canon(a, b) - x_a . x_b| <= gamma_d |x_a| |x_b|
    num = threshold - e_canon
    if not num > 0.0:
        return None  # T <= E_c: pairs at any angle may exceed T (eps near 1 or above)
    kappa = num / big_n_sq * (1.0 - 8.0 * _U64)  # rounded down: a larger delta
    delta = 0.0 if kappa >= 1.0 else float(np.arccos(kappa))
    # |computed cos - true cos| <= e_cos: dot (gamma_d |x| |ref|), two norms (gamma_d each,
    # halved by the square root), a product and a division; doubled for slack. arccos is
    # 1/2-Hoelder: |arccos u - arccos v| <= arccos(1 - |u - v|) <= (pi / sqrt 2) sqrt|u - v|.
    e_cos = 4.0 * g
    mu = (np.pi / np.sqrt(2.0)) * np.sqrt(e_cos) + 16.0 * _U64 * np.pi
    reach = delta + 2.0 * mu + 1e-12 + 16.0 * _U64 * np.pi  # + rounding of arccos(kappa)
    if reach >= np.pi:
        return None  # the band holds every pair
    norms = np.sqrt(norm_sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dots / norms  # ref is unit; a zero row gives NaN
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    theta[norm_sq == 0.0] = np.nan  # canon(zero row, any) = 0 <= T: never in a band
    return _Band(theta, float(reach))


def _block_chunks(band: _Band | None, i0: int, i1: int, cs: int) -> list[tuple[int, int]]:
    """Column ranges the row block [i0, i1) is multiplied against: earlier members in chunks of
    at most ``cs`` columns, then the block itself (its strict lower triangle is kept later).
    With a band, only earlier members whose angle lies within ``reach`` of the block's angle
    range, as the hull of them per chunk (chunks holding none are skipped)."""
    if band is None or i0 == 0:
        return [(j0, min(i0, j0 + cs)) for j0 in range(0, i0, cs)] + [(i0, i1)]
    tb = band.theta[i0:i1]
    tb = tb[~np.isnan(tb)]
    if tb.size == 0:
        return [(i0, i1)]
    lo_t = float(tb.min()) - band.reach
    hi_t = float(tb.max()) + band.reach
    ta = band.theta[:i0]
    inside = (ta > lo_t) & (ta < hi_t)  # NaN angles compare False
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return [(i0, i1)]
    chunks = []
    for j0 in range(int(idx[0]), int(idx[-1]) + 1, cs):
        j1 = min(i0, j0 + cs)
        nz = np.flatnonzero(inside[j0:j1])
        if nz.size:
            chunks.append((j0 + int(nz[0]), j0 + int(nz[-1]) + 1))
    return chunks + [(i0, i1)]


def _blocked_numpy(
    xs: np.ndarray, block_size: int, band: _Band | None = None
) -> tuple[np.ndarray, np.ndarray]:
    n = xs.shape[0]
    if n <= 1:
        return _empty_core(n)
    window = _window(xs, reduced_precision=False)
    copies = _exact_copy_mask(xs)
    bs = min(block_size, n)
    cs = max(_CPU_COL_CHUNK, bs)
    buf = np.empty(bs * cs, dtype=np.float32)
    upper = ~np.tri(bs, bs, -1, dtype=bool)  # diagonal tile: keep col < row only
    rr = np.arange(bs)
    best = np.full(n, -np.inf, dtype=np.float32)
    cand_rows: list[np.ndarray] = []
    cand_cols: list[np.ndarray] = []
    cand_vals: list[np.ndarray] = []
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        h = i1 - i0
        rows = xs[i0:i1]
        row_best = best[i0:i1]
        for j0, j1 in _block_chunks(band, i0, i1, cs):
            w = j1 - j0
            tile = buf[: h * w].reshape(h, w)
            np.matmul(rows, xs[j0:j1].T, out=tile)
            if j0 == i0:
                np.putmask(tile, upper[:h, :h], -np.inf)
            if copies is not None:
                local = np.flatnonzero(copies[j0:j1])
                if local.size:
                    tile[:, local] = -np.inf
            arg = tile.argmax(axis=1)
            v = tile[rr[:h], arg]
            np.maximum(row_best, v, out=row_best)
            floor = _candidate_floor(row_best, window)
            near = np.flatnonzero(v >= floor)
            if near.size == 0:
                continue
            # the row maximum is a candidate; look past it for others only where the second
            # largest value is also within the window (usually none)
            cand_rows.append(near.astype(np.int64) + i0)
            cand_cols.append(arg[near].astype(np.int64) + j0)
            cand_vals.append(v[near])
            tile[near, arg[near]] = -np.inf
            second = tile.max(axis=1)[near] if near.size == h else tile[near].max(axis=1)
            multi = near[second >= floor[near]]
            if multi.size:
                sub = tile[multi]
                r, c = np.nonzero(sub >= floor[multi, None])
                cand_rows.append(multi[r].astype(np.int64) + i0)
                cand_cols.append(c.astype(np.int64) + j0)
                cand_vals.append(sub[r, c])
    return _finish(xs, best, window, cand_rows, cand_cols, cand_vals, complete=band is None)


def _torch_fp32_matmul_is_ieee(torch_device) -> bool:  # type: ignore[no-untyped-def]
    import torch

    if torch.get_float32_matmul_precision() != "highest":
        return False
    settings = [getattr(getattr(torch, "backends", None), "fp32_precision", "none")]
    if torch_device.type == "cuda":
        if torch.backends.cuda.matmul.allow_tf32:
            return False
        settings.append(getattr(torch.backends.cuda.matmul, "fp32_precision", "none"))
    elif torch_device.type == "cpu":
        mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
        settings.append(getattr(mkldnn_matmul, "fp32_precision", "none"))
    else:
        return False
    return all(s in ("none", "ieee") for s in settings)


def _blocked_torch(
    xs: np.ndarray, block_size: int, device: str, band: _Band | None = None
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    n = xs.shape[0]
    if n <= 1:
        return _empty_core(n)
    dev = torch.device(device)
    window = _window(xs, reduced_precision=not _torch_fp32_matmul_is_ieee(dev))
    copies = _exact_copy_mask(xs)
    x_t = torch.from_numpy(xs).to(dev)
    copies_t = torch.from_numpy(copies).to(dev) if copies is not None else None
    bs = min(block_size, n)
    cs = max(_TORCH_COL_CHUNK if dev.type != "cpu" else _CPU_COL_CHUNK, bs)
    buf = torch.empty(bs * cs, dtype=torch.float32, device=dev)
    upper = ~torch.ones(bs, bs, dtype=torch.bool, device=dev).tril_(-1)
    neg_inf = float("-inf")
    best = torch.full((n,), neg_inf, dtype=torch.float32, device=dev)
    cand_rows: list = []
    cand_cols: list = []
    cand_vals: list = []
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        h = i1 - i0
        rows = x_t[i0:i1]
        for j0, j1 in _block_chunks(band, i0, i1, cs):
            w = j1 - j0
            tile = buf[: h * w].view(h, w)
            torch.matmul(rows, x_t[j0:j1].T, out=tile)
            if j0 == i0:
                tile.masked_fill_(upper[:h, :h], neg_inf)
            if copies_t is not None:
                tile.masked_fill_(copies_t[j0:j1][None, :], neg_inf)
            v = tile.amax(dim=1)
            best[i0:i1] = torch.maximum(best[i0:i1], v)
            floor = _torch_candidate_floor(best[i0:i1], window)
            near = torch.nonzero(v >= floor).flatten()
            if near.numel() == 0:
                continue
            sub = tile[near]
            rc = torch.nonzero(sub >= floor[near][:, None])
            r, c = rc[:, 0], rc[:, 1]
            cand_rows.append(near[r] + i0)
            cand_cols.append(c + j0)
            cand_vals.append(sub[r, c])
    rows_np = [t.cpu().numpy().astype(np.int64) for t in cand_rows]
    cols_np = [t.cpu().numpy().astype(np.int64) for t in cand_cols]
    vals_np = [t.cpu().numpy() for t in cand_vals]
    return _finish(xs, best.cpu().numpy(), window, rows_np, cols_np, vals_np, complete=band is None)


def _torch_candidate_floor(best, window: float):  # type: ignore[no-untyped-def]
    import torch

    floor64 = best.double() - window
    f32 = floor64.float()
    bump = f32.double() > floor64
    f32 = torch.where(bump, torch.nextafter(f32, torch.full_like(f32, float("-inf"))), f32)
    return torch.where(torch.isneginf(best), torch.full_like(f32, float("inf")), f32)


def _finish(
    xs: np.ndarray,
    best: np.ndarray,
    window: float,
    cand_rows: list[np.ndarray],
    cand_cols: list[np.ndarray],
    cand_vals: list[np.ndarray],
    *,
    complete: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate(cand_rows) if cand_rows else np.empty(0, np.int64)
    cols = np.concatenate(cand_cols) if cand_cols else np.empty(0, np.int64)
    vals = np.concatenate(cand_vals) if cand_vals else np.empty(0, np.float32)
    # a candidate collected before its row's maximum rose may now be out of the window
    keep = vals >= _candidate_floor(best, window)[rows]
    return _refine(xs, rows[keep], cols[keep], complete=complete)


def canonical_dot(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Row-wise canon(a_i, b_i) of two float32 arrays [m, d]: float64 products (exact) summed
    in index order. A fixed sequence of IEEE operations, so it does not depend on batch,
    device, thread count or BLAS (the module docstring explains why that matters)."""
    a32 = np.asarray(a, dtype=np.float32)
    b32 = np.asarray(b, dtype=np.float32)
    if a32.shape != b32.shape or a32.ndim != 2:
        raise ValueError("a and b must be 2-D arrays of the same shape")
    m, d = a32.shape
    out = np.zeros(m, dtype=np.float64)
    for s in range(0, m, _REFINE_CHUNK):
        prod = np.multiply(
            a32[s : s + _REFINE_CHUNK].T, b32[s : s + _REFINE_CHUNK].T, dtype=np.float64
        )  # [d, chunk]
        if d == 0:
            continue
        acc = prod[0].copy()
        for i in range(1, d):
            acc += prod[i]
        out[s : s + _REFINE_CHUNK] = acc
    return out


def _canonical_dot(xs: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), _REFINE_CHUNK):
        r = rows[s : s + _REFINE_CHUNK]
        c = cols[s : s + _REFINE_CHUNK]
        out[s : s + _REFINE_CHUNK] = canonical_dot(xs[r], xs[c])
    return out


def _refine(
    xs: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, complete: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Canonical maximum and earliest argmax per row from the candidate pairs (visiting order).
    ``complete``: every row after the first was compared with all earlier rows (no band), so
    each has a candidate; with a band a row may have none (NaN, -1)."""
    n = xs.shape[0]
    m, arg = _empty_core(n)
    if n <= 1:
        return m, arg
    if len(rows):
        key = rows * n + cols
        key, first = np.unique(key, return_index=True)  # duplicates are harmless; drop them
        rows, cols = rows[first], cols[first]
        vals = _canonical_dot(xs, rows, cols)
        order = np.lexsort((cols, -vals, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        head = np.r_[True, rows[1:] != rows[:-1]]
        m[rows[head]] = vals[head]
        arg[rows[head]] = cols[head]
    if complete and np.any(arg[1:] < 0):  # every member after the first has a candidate
        raise AssertionError("SemDeDup candidate screening missed a row")
    return m, arg
