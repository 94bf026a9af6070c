"""Perceptual near-duplicates: 64-bit pHash within Hamming distance r (docs/algorithms.md
section 5.3).

Candidates come from exact matches on *keys* (subsets of the 64 bits) such that every pair
within distance r agrees exactly on at least one key; candidates are verified with a
vectorised popcount, linked with a vectorised union-find, and each component keeps its
smallest uid.

Keys. The basic scheme of section 5.3 is r+1 bands (pigeonhole: r differing bits leave one band intact;
tests/algorithms/reference.py implements it as given, as explicit pair lists). Its cost is set by the band width: for
10^6 random hashes at r = 8 the bands are 7 bits wide and the groups hold ~7,800 hashes each,
~3.5e10 pairs to verify. :func:`index_plan` keeps the same guarantee with wider keys: split the
64 bits into m blocks; a pair within distance r differs in at most r blocks, so it agrees on
some t = m - r blocks; a *covering* family of s-block keys (every t-set of blocks contains one
of them; built greedily, also from the affine planes of F_2^4 when m = 16, s = 4, keeping the
smaller) then catches every such pair. The r+1 bands are the special case m = r+1, s = 1.

Cost and the choice of plan. A table costs a linear pass (hash and radix-sort the keys) plus
work for the rows that share their key with another: with w-bit keys a row has ~n / 2^w
partners among n random hashes. Keeping that constant as n grows needs w ~ log2 n, and wider
keys need more tables (the covering grows). :func:`index_plan` costs every block split (m <=
16) with a per-row model measured on the benchmark machine and keeps the cheapest, so the key
width follows log2 n: for r = 4, 12 tables of 21-22 bits from 10^5 to 10^7 hashes; for r = 6
and 8, 16-bit keys up to ~10^6 hashes (20 and 60 tables), 20-bit keys beyond.

Linking. :func:`near_duplicates` never materialises a candidate list: each table links what it
verifies straight into a union-find. Groups of up to ``_SMALL_GROUP`` members compare every
pair (contiguous slices of the sorted order, one offset at a time). Larger groups (clusters
of near-identical hashes from templates, blank or lightly edited images, or narrow keys) are
linked component-aware: a few chaining passes join each member to its next neighbours, then
only pairs of members in *different* components are checked (or all pairs, when that is
fewer), so a dense cluster costs about linear rather than quadratic time and memory. A pair
is skipped only when its ends are already connected, and every other pair in a group is
verified, so the components equal those of the all-pairs graph.

Identical hashes are collapsed first: tables compare distinct values only, and rows with an
equal hash share that value's component, so a large group of equal hashes costs O(group)
instead of O(group^2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from itertools import combinations

import numpy as np
import numpy.typing as npt

__all__ = [
    "connected_components",
    "hamming_distance",
    "index_plan",
    "near_duplicates",
]

_BITS = 64
_MAX_BLOCKS = 16
_MAX_SUBSETS = 20000
# Per-row cost model of one table (nanoseconds; measured on the benchmark machine, only used
# to rank plans): hashing and sorting the keys, plus a cost for each row that shares its key
# with another (gathering it, laying out its group) and for each comparison in a group.
_COST_TABLE = 14.0
_COST_GROUPED = 20.0
_COST_COMPARE = 2.0


def _as_hashes(hashes: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    h = np.asarray(hashes)
    if h.ndim != 1:
        raise ValueError("hashes must be 1-D")
    if h.dtype == np.int64:
        return h.view(np.uint64)
    if h.dtype != np.uint64:
        h = h.astype(np.uint64)
    return h


def _check_radius(radius: int) -> int:
    r = int(radius)
    if not 0 <= r < _BITS:
        raise ValueError("radius must be in [0, 63]")
    return r


def hamming_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Element-wise popcount(a XOR b) of uint64 hashes (int64 bit patterns accepted)."""

    def u64(v: npt.ArrayLike) -> np.ndarray:
        arr = np.asarray(v)
        return arr.view(np.uint64) if arr.dtype == np.int64 else arr.astype(np.uint64)

    return np.bitwise_count(u64(a) ^ u64(b))


def _block_bounds(m: int) -> list[tuple[int, int]]:
    """m contiguous bit ranges [lo, hi) covering 0..63, widths differing by at most 1."""
    base, extra = divmod(_BITS, m)
    out, lo = [], 0
    for i in range(m):
        w = base + (1 if i < extra else 0)
        out.append((lo, lo + w))
        lo += w
    return out


def _blocks_mask(bounds: list[tuple[int, int]], blocks: tuple[int, ...] | list[int]) -> int:
    mask = 0
    for b in blocks:
        lo, hi = bounds[b]
        mask |= ((1 << (hi - lo)) - 1) << lo
    return mask


def _affine_planes_16() -> np.ndarray:
    """The 140 affine planes of F_2^4 as 16-bit masks (block i <-> vector i): a structured
    family of 4-sets that covers the 8-of-16 case with far fewer keys than plain greedy."""
    planes = {
        sum(1 << p for p in {a, b, c, a ^ b ^ c})
        for a, b, c in combinations(range(16), 3)
        if a ^ b ^ c not in (a, b, c)
    }
    return np.array(sorted(planes), dtype=np.int64)


def _greedy_cover(tmask: np.ndarray, targets: np.ndarray, kmask: np.ndarray, m: int, s: int) -> list[int]:
    """Greedy set cover of the t-sets ``tmask`` by the s-sets ``kmask`` (ties: lowest index),
    then drop keys made redundant by later picks. Returns key masks."""
    t = targets.shape[1]
    lookup = np.full(1 << m, -1, dtype=np.int64)
    lookup[kmask] = np.arange(len(kmask))
    inner = np.array(list(combinations(range(t), s)), dtype=np.int64).reshape(-1, s)
    contained = lookup[(np.int64(1) << targets[:, inner]).sum(axis=2)]  # [n_targets, C(t,s)]

    def tally(rows: np.ndarray) -> np.ndarray:
        ids = contained[rows].ravel()
        return np.bincount(ids[ids >= 0], minlength=len(kmask))

    counts = tally(np.arange(len(tmask)))
    uncovered = np.ones(len(tmask), dtype=bool)
    chosen: list[int] = []
    while uncovered.any():
        k = int(np.argmax(counts))
        if counts[k] == 0:
            raise ValueError("key family cannot cover every target")
        chosen.append(k)
        newly = uncovered & ((tmask & kmask[k]) == kmask[k])
        uncovered &= ~newly
        counts -= tally(np.flatnonzero(newly))
    cover_count = np.zeros(len(tmask), dtype=np.int64)
    inside = {k: (tmask & kmask[k]) == kmask[k] for k in chosen}
    for k in chosen:
        cover_count += inside[k]
    for k in reversed(list(chosen)):
        if (cover_count[inside[k]] >= 2).all():
            cover_count -= inside[k]
            chosen.remove(k)
    return [int(kmask[k]) for k in chosen]


@lru_cache(maxsize=1024)
def _greedy_covering(m: int, t: int, s: int) -> tuple[int, ...]:
    """s-subsets of range(m) (as bit masks) such that every t-subset contains one of them."""
    targets = np.array(list(combinations(range(m), t)), dtype=np.int64).reshape(-1, t)
    tmask = (np.int64(1) << targets).sum(axis=1)
    all_keys = np.array([sum(1 << b for b in c) for c in combinations(range(m), s)], dtype=np.int64)
    best = _greedy_cover(tmask, targets, all_keys, m, s)
    if m == 16 and s == 4:
        try:
            alt = _greedy_cover(tmask, targets, _affine_planes_16(), m, s)
        except ValueError:  # planes cannot cover this t (t < 7): keep the general cover
            alt = best
        if len(alt) < len(best):
            best = alt
    return tuple(best)


def _table_cost(n: int, bits: float) -> float:
    """Estimated seconds of one table over ``n`` distinct random hashes, ``bits``-bit key."""
    lam = max(n - 1, 0) * (2.0**-bits + 2.0**-_MAX_HASH_BITS)  # expected partners per row
    grouped = -math.expm1(-lam)  # share of rows whose key another row has
    return n * (_COST_TABLE + _COST_GROUPED * grouped + _COST_COMPARE * lam) * 1e-9


def _plan_cost(n: int, widths: list[int]) -> float:
    return sum(_table_cost(n, w) for w in widths)


@lru_cache(maxsize=256)
def index_plan(radius: int, n: int) -> tuple[int, ...]:
    """Key masks (Python ints, bit i = bit i of the hash) such that every pair of hashes within
    Hamming distance ``radius`` agrees exactly on all bits of at least one key. ``n`` is the
    number of distinct hashes the plan is for: it steers the trade-off between few narrow
    keys (more pairs per group to verify, growing with n) and more, wider keys (the key width
    grows with log2 n, so the pairs to verify per row stay about constant). One table per
    key: a natural unit of parallel work (:func:`key_candidate_pairs`)."""
    r = _check_radius(radius)
    n = max(int(n), 0)
    if r == 0:
        return ((1 << _BITS) - 1,)
    best: tuple[float, tuple[int, ...]] | None = None
    for m in range(r + 1, max(r + 1, _MAX_BLOCKS) + 1):  # every split; coverings are cached
        t = m - r
        if math.comb(m, t) > _MAX_SUBSETS:
            continue
        bounds = _block_bounds(m)
        for s in range(1, t + 1):
            if math.comb(m, s) > _MAX_SUBSETS:
                continue
            keys = _greedy_covering(m, t, s)
            widths = [sum(hi - lo for b, (lo, hi) in enumerate(bounds) if (k >> b) & 1) for k in keys]
            cost = _plan_cost(n, widths)
            if best is None or cost < best[0]:
                masks = tuple(_blocks_mask(bounds, [b for b in range(m) if (k >> b) & 1]) for k in keys)
                best = (cost, masks)
    assert best is not None
    return best[1]


def _compress(values: np.ndarray, mask: int) -> tuple[np.ndarray, int]:
    """Gather the bits of ``mask`` into a compact unsigned key (smallest dtype that fits)."""
    runs: list[tuple[int, int]] = []
    b = 0
    while b < _BITS:
        if (mask >> b) & 1:
            e = b
            while e < _BITS and (mask >> e) & 1:
                e += 1
            runs.append((b, e - b))
            b = e
        else:
            b += 1
    width = sum(w for _, w in runs)
    key = np.zeros(len(values), dtype=np.uint64)
    off = 0
    for lo, w in runs:
        part = (values >> np.uint64(lo)) & np.uint64((1 << w) - 1)
        key |= part << np.uint64(off)
        off += w
    dtype = np.uint16 if width <= 16 else np.uint32 if width <= 32 else np.uint64
    return key.astype(dtype), width


def connected_components(n: int, pairs: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Component label per node = the smallest node index in its component.

    Vectorised union-find: hook the larger root of every unsatisfied edge onto the smaller
    (np.minimum.at), then compress paths by pointer jumping; repeat until every edge joins
    equal roots. Parents only ever point to smaller indices, so a root is its component's
    minimum."""
    parent = np.arange(int(n), dtype=np.int64)
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if p.size and (p.min() < 0 or p.max() >= n):
        raise ValueError("pair index out of range")
    u, v = p[:, 0], p[:, 1]
    while u.size:
        ru, rv = parent[u], parent[v]
        live = ru != rv
        if not live.any():
            break
        u, v, ru, rv = u[live], v[live], ru[live], rv[live]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


# ----------------------------------------------------------------------------- linking engine
# near_duplicates does not materialise candidate pairs: each table links the pairs it
# verifies into a union-find at once, and inside a large key group pairs whose ends are
# already connected need no check. Dense clusters of near-identical hashes (templates, blank
# images, bursts of small edits) thus cost about linear instead of quadratic time and memory.

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplicative hashing of the masked bits
# Keys are a multiplicative hash of the masked bits, 24 bits wide: torch's stable integer sort
# (a radix sort on CPU) orders them in three 8-bit passes into reused buffers, faster than
# numpy's radix argsort of a 16-bit key; unrelated values share a hash with probability
# 2**-24 on top of their key's own 2**-bits.
_MAX_HASH_BITS = 24
_SMALL_GROUP = 48  # groups up to this size: every pair checked; larger: component-aware
_CHAIN_PASSES = 3
_CROSS_CHUNK = 1 << 22  # pairs enumerated at once in a large group


class _Components:
    """Union-find over distinct hash indices. A root is the smallest index of its component;
    ``find`` compresses the paths it walks; ``union`` hooks the larger root under the smaller
    (vectorised, repeated until every edge joins equal roots)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, idx: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[idx]
        while True:
            rr = p[r]
            if np.array_equal(rr, r):
                break
            r = rr
        p[idx] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        p = self.parent
        while a.size:
            ra, rb = self.find(a), self.find(b)
            live = ra != rb
            if not live.any():
                return
            a, b, ra, rb = a[live], b[live], ra[live], rb[live]
            np.minimum.at(p, np.maximum(ra, rb), np.minimum(ra, rb))

    def labels(self) -> np.ndarray:
        return self.find(np.arange(len(self.parent)))


class _Workspace:
    """Buffers reused by every table of one call (large temporaries cost page faults)."""

    def __init__(self, values: np.ndarray) -> None:
        n = len(values)
        self.values = values
        self.tmp = np.empty(n, dtype=np.uint64)
        self.acc = np.empty(n, dtype=np.uint64)
        self.k16 = np.empty(n, dtype=np.uint16)
        self.k32 = np.empty(n, dtype=np.int32)
        self.member = np.empty(n, dtype=bool)
        self.torch = _torch_sort_buffers(n)


def _torch_sort_buffers(n: int):  # type: ignore[no-untyped-def]
    """Output buffers for torch's stable integer sort (a radix sort on CPU: about twice as
    fast as two numpy radix passes on 24-bit keys, and it allocates nothing per call); None
    without torch."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; numpy still works
        return None
    return torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int64)


def _runs(mask: int) -> list[tuple[int, int]]:
    """(lowest bit, width) of each run of consecutive set bits of a 64-bit mask."""
    runs: list[tuple[int, int]] = []
    b = 0
    while b < _BITS:
        if (mask >> b) & 1:
            e = b
            while e < _BITS and (mask >> e) & 1:
                e += 1
            runs.append((b, e - b))
            b = e
        else:
            b += 1
    return runs


def _table_order(ws: _Workspace, mask: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted key) grouping the distinct values by the table's key. Equal masked bits
    give equal keys, so the covering guarantee holds; a hashed key may also put a few
    unrelated values in one group, and verification discards them."""
    values, acc, tmp = ws.values, ws.acc, ws.tmp
    bits = bin(mask).count("1")
    width = _MAX_HASH_BITS
    if bits <= 16 and ws.torch is None:  # exact: gather the key's bit runs, one numpy radix pass
        acc.fill(0)
        off = 0
        for lo, w in _runs(mask):
            np.bitwise_and(values, np.uint64(((1 << w) - 1) << lo), out=tmp)
            if lo > off:
                np.right_shift(tmp, np.uint64(lo - off), out=tmp)
            elif lo < off:
                np.left_shift(tmp, np.uint64(off - lo), out=tmp)
            np.bitwise_or(acc, tmp, out=acc)
            off += w
        np.copyto(ws.k16, acc, casting="unsafe")
        order = np.argsort(ws.k16, kind="stable")
        return order, ws.k16[order]
    np.bitwise_and(values, np.uint64(mask), out=acc)
    np.multiply(acc, _HASH_MUL, out=acc)
    np.right_shift(acc, np.uint64(_BITS - width), out=acc)
    np.copyto(ws.k32, acc, casting="unsafe")  # < 2**24: exact
    if ws.torch is not None:
        import torch

        sk_t, order_t = ws.torch
        torch.sort(torch.from_numpy(ws.k32), stable=True, out=(sk_t, order_t))
        return order_t.numpy(), sk_t.numpy()
    np.copyto(ws.k16, acc, casting="unsafe")  # numpy: low 16 bits, then the high 8
    o1 = np.argsort(ws.k16, kind="stable")
    np.right_shift(acc, np.uint64(16), out=tmp)
    order = o1[np.argsort(tmp.astype(np.uint8)[o1], kind="stable")]
    return order, ws.k32[order]


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + z) over (s, z)."""
    first = np.cumsum(sizes) - sizes
    return np.repeat(starts - first, sizes) + np.arange(int(sizes.sum()))


def _scan_groups(
    key: np.ndarray, idx: np.ndarray, v: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """All pairs within ``radius`` inside groups of consecutive equal ``key`` (members ``idx``
    with values ``v``): at offset k every member is compared with the one k places on
    (contiguous slices, no index lists); members of groups of at most k + 1 leave once all
    their pairs are done. Returns (idx pairs a, b, comparisons made)."""
    m = len(key)
    edge = np.empty(m + 1, dtype=bool)
    edge[0] = edge[m] = True
    np.not_equal(key[1:], key[:-1], out=edge[1:m])
    run = np.flatnonzero(edge)
    sizes = np.diff(run)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    done = 0
    size = None
    off = 1
    while len(v) > off:
        hit = np.bitwise_count(v[:-off] ^ v[off:]) <= radius
        hit &= key[:-off] == key[off:]
        done += len(v) - off
        i = np.flatnonzero(hit)
        if i.size:
            out_a.append(idx[i])
            out_b.append(idx[i + off])
        off += 1
        if size is None:  # after offset 1 only groups of 3 or more go on
            big = sizes >= 3
            if not big.any():
                break
            size = np.repeat(sizes, sizes)
            keep = size > 2
            key, size, idx, v = key[keep], size[keep], idx[keep], v[keep]
            continue
        keep = size > off
        if np.count_nonzero(keep) * 2 < len(keep):
            key, size, idx, v = key[keep], size[keep], idx[keep], v[keep]
    if not out_a:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, done
    return np.concatenate(out_a), np.concatenate(out_b), done


def _scan_sorted(
    order: np.ndarray, eq: np.ndarray, p: np.ndarray, values: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Like :func:`_scan_groups` over the whole sorted order (``eq[i]``: positions i, i + 1
    share a key; ``p`` its true positions): each position in a group is compared with the
    next 1, 2, ... positions while the key still matches."""
    sv = values[order]
    last = len(eq) - 1
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    done = 0
    active = p
    off = 1
    while active.size:
        other = active + off
        done += active.size
        hit = np.bitwise_count(sv[active] ^ sv[other]) <= radius
        i = np.flatnonzero(hit)
        if i.size:
            out_a.append(order[active[i]])
            out_b.append(order[other[i]])
        active = active[active + off <= last]
        active = active[eq[active + off]]
        off += 1
    if not out_a:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, done
    return np.concatenate(out_a), np.concatenate(out_b), done


def _link_table(
    ws: _Workspace, order: np.ndarray, sk: np.ndarray, radius: int, comps: _Components
) -> int:
    """Link every pair within ``radius`` that shares a key group of this table (``order``
    and ``sk`` from :func:`_table_order`). Returns the number of comparisons made."""
    eq = sk[1:] == sk[:-1]  # positions p, p + 1 in one group
    p = np.flatnonzero(eq)
    if p.size == 0:
        return 0
    member = ws.member  # rows in a group of two or more: eq on either side
    member[0] = eq[0]
    member[-1] = eq[-1]
    np.logical_or(eq[1:], eq[:-1], out=member[1:-1])
    done = 0
    large = None
    if p.size > _SMALL_GROUP:
        run_lo = np.flatnonzero(p[1:] != p[:-1] + 1) + 1
        run_lo = np.concatenate([np.zeros(1, dtype=run_lo.dtype), run_lo])
        gsize = np.diff(run_lo, append=len(p)) + 1
        big = gsize > _SMALL_GROUP
        if big.any():
            pos = _ranges(p[run_lo][big], gsize[big])
            member[pos] = False
            large = (order[pos], gsize[big])
    # groups cover many rows but are mostly pairs and triples: scan the whole sorted order
    # (one gather of every value); sparse or crowded: gather the groups' members first
    if large is None and len(sk) < 8 * p.size < 4 * len(sk):
        a, b, done = _scan_sorted(order, eq, p, ws.values, radius)
    else:
        cpos = np.flatnonzero(member)
        idx = order[cpos]
        a, b, done = _scan_groups(sk[cpos], idx, ws.values[idx], radius)
    if a.size:
        comps.union(a, b)
    if large is not None:
        done += _link_large(large[0], large[1], ws.values, radius, comps)
    return done


def _link_large(
    idx: np.ndarray, gsize: np.ndarray, values: np.ndarray, radius: int, comps: _Components
) -> int:
    """Large key groups (members ``idx`` concatenated group after group, ``gsize`` each).

    A pair whose ends are already in one component needs no check, and a group whose members
    share one component is done. A few chaining passes first link members to their next
    neighbours (a dense cluster mostly collapses here). Then, per group, either every pair of
    members in different components is checked (when few such pairs are left: one big
    component and some stragglers), or every pair is (a group of unrelated hashes). Either
    way no pair within ``radius`` is left unlinked."""
    v = values[idx]
    done = 0
    for off in range(1, _CHAIN_PASSES + 2):
        comp = comps.find(idx)
        starts = np.cumsum(gsize) - gsize
        keep_g = np.minimum.reduceat(comp, starts) != np.maximum.reduceat(comp, starts)
        if not keep_g.all():
            keep = np.repeat(keep_g, gsize)
            idx, v, comp, gsize = idx[keep], v[keep], comp[keep], gsize[keep_g]
            if not idx.size:
                return done
            starts = np.cumsum(gsize) - gsize
        if off > _CHAIN_PASSES:
            break
        gend = np.repeat(starts + gsize, gsize)
        a = np.flatnonzero(np.arange(len(idx)) + off < gend)
        b = a + off
        apart = comp[a] != comp[b]
        a, b = a[apart], b[apart]
        done += a.size
        hit = np.bitwise_count(v[a] ^ v[b]) <= radius
        if hit.any():
            comps.union(idx[a[hit]], idx[b[hit]])
    # members sorted by component within each group: member i pairs with every member after
    # the end of its component's run ("cross" pairs)
    gid = np.repeat(np.arange(len(gsize)), gsize)
    o = np.lexsort((comp, gid))
    idx, v, comp = idx[o], v[o], comp[o]
    m = len(idx)
    starts = np.cumsum(gsize) - gsize
    gend = np.repeat(starts + gsize, gsize)
    run_lo = np.flatnonzero(np.r_[True, (comp[1:] != comp[:-1]) | (gid[1:] != gid[:-1])])
    rsize = np.diff(np.r_[run_lo, m])
    rend = np.repeat(run_lo + rsize, rsize)
    cnt = gend - rend
    cross = np.add.reduceat(cnt, starts)
    plain = cross * 4 > gsize * (gsize - 1)  # over half of all pairs: scan them all instead
    if plain.any():
        sel = np.repeat(plain, gsize)
        a, b, c = _scan_groups(gid[sel], idx[sel], v[sel], radius)
        done += c
        if a.size:
            comps.union(a, b)
        cnt = np.where(sel, 0, cnt)
    cum = np.cumsum(cnt)
    lo = int(np.searchsorted(cum, 0, side="right"))  # skip leading members with no pairs
    while lo < m:
        base = int(cum[lo - 1]) if lo else 0
        if base == int(cum[-1]):
            break
        hi = max(lo + 1, int(np.searchsorted(cum, base + _CROSS_CHUNK, side="right")))
        c = cnt[lo:hi]
        total = int(c.sum())
        if total:
            a = np.repeat(np.arange(lo, hi), c)
            b = rend[a] + (np.arange(total) - np.repeat(np.cumsum(c) - c, c))
            done += total
            hit = np.bitwise_count(v[a] ^ v[b]) <= radius
            if hit.any():
                comps.union(idx[a[hit]], idx[b[hit]])
        lo = hi
    return done


def _distinct_rows(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, index of each row's value among them). Sorted with torch when it is
    there (its integer sort is ~3x faster than numpy's argsort of uint64); the order of the
    distinct values (signed there, unsigned in numpy) does not matter."""
    n = len(h)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and n:
        sv, si = torch.sort(torch.from_numpy(h.view(np.int64)))
        hs, order = sv.numpy().view(np.uint64), si.numpy()
    else:
        order = np.argsort(h)
        hs = h[order]
    first = np.empty(n, dtype=bool)
    if n:
        first[0] = True
        np.not_equal(hs[1:], hs[:-1], out=first[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return hs[first], inverse


def near_duplicates(
    hashes: npt.ArrayLike,
    uids: npt.ArrayLike,
    radius: int,
    *,
    plan: tuple[int, ...] | None = None,
    n_threads: int = 1,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """``(dropped bool[n], duplicate_of int64[n])``: components of the "within ``radius``"
    graph (transitively: a chain of near pairs is one component); each keeps its smallest uid
    (string order), every other member points at that row; -1 where kept.
    ``plan`` defaults to :func:`index_plan` for the number of distinct hashes; ``n_threads``
    > 1 builds the next tables' sort orders in a thread pool while the current one is linked
    (numpy releases the GIL in the heavy steps)."""
    r = _check_radius(radius)
    h = _as_hashes(hashes)
    n = len(h)
    u = np.asarray(uids)
    if u.dtype.kind != "U":
        u = u.astype(str)
    if u.shape != (n,):
        raise ValueError("uids must have one value per hash")
    values, inverse = _distinct_rows(h)  # equal hashes share one value: linked for free
    keys = plan if plan is not None else index_plan(r, len(values))
    comps = _Components(len(values))
    if len(values) > 1 and r > 0:  # at r = 0 equal hashes are all there is to link
        with _torch_threads(max(1, int(n_threads))):
            if n_threads > 1 and len(keys) > 1:
                _link_tables_threaded(values, keys, r, comps, int(n_threads))
            else:
                ws = _Workspace(values)
                for k in keys:
                    order, sk = _table_order(ws, int(k))
                    _link_table(ws, order, sk, r, comps)
    return _keep_smallest_uid(comps.labels()[inverse], u)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Cap torch's intra-op threads at ``n`` (the caller's thread budget) while the tables'
    sorts run; restored afterwards."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    before = torch.get_num_threads()
    if before > n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before > n:
            torch.set_num_threads(before)


def _link_tables_threaded(
    values: np.ndarray, keys: tuple[int, ...], radius: int, comps: _Components, n_threads: int
) -> None:
    """Sort orders computed ahead by worker threads (own buffers each); linking stays in
    this thread, in table order."""
    from concurrent.futures import ThreadPoolExecutor
    from queue import SimpleQueue

    spare: SimpleQueue = SimpleQueue()
    for _ in range(n_threads + 1):
        spare.put(_Workspace(values))

    def build(mask: int) -> tuple[_Workspace, np.ndarray, np.ndarray]:
        ws = spare.get()
        order, sk = _table_order(ws, mask)
        return ws, order, sk

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        pending = [pool.submit(build, int(k)) for k in keys[: n_threads + 1]]
        nxt = len(pending)
        while pending:
            ws, order, sk = pending.pop(0).result()
            _link_table(ws, order, sk, radius, comps)
            spare.put(ws)
            if nxt < len(keys):
                pending.append(pool.submit(build, int(keys[nxt])))
                nxt += 1


def _keep_smallest_uid(
    labels: np.ndarray, uids: np.ndarray
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """In each label group keep the row with the smallest uid; the others point at it. Only
    rows whose label another row shares are sorted (by label, then uid)."""
    n = len(labels)
    dropped = np.zeros(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return dropped, duplicate_of
    shared = np.bincount(labels, minlength=int(labels.max()) + 1)[labels] > 1
    rows = np.flatnonzero(shared)
    if rows.size == 0:
        return dropped, duplicate_of
    lab = labels[rows]
    order = rows[np.lexsort((uids[rows], lab))]
    sl = labels[order]
    head = np.empty(len(order), dtype=bool)
    head[0] = True
    np.not_equal(sl[1:], sl[:-1], out=head[1:])
    keeper = order[head][np.cumsum(head) - 1]
    duplicate_of[order] = keeper
    dropped[order] = keeper != order
    duplicate_of[~dropped] = -1
    return dropped, duplicate_of
