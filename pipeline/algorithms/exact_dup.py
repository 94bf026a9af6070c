"""Exact duplicates: same sha256 of the image bytes (docs/algorithms.md section 5.2).

Each group of equal digests keeps the member with the smallest uid (string order); the others
point at that row. One sort, O(n log n); for a sharded pool a stage can first route rows by a
digest prefix so that every group lands in one call.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["exact_duplicates"]


def exact_duplicates(
    sha256: npt.ArrayLike, uids: npt.ArrayLike
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """``(dropped bool[n], duplicate_of int64[n])``; duplicate_of is the row index of the kept
    member of the group, -1 where kept. Digests compare case-insensitively (hex); a missing
    digest (None, NaN or empty string) never matches anything."""
    raw = np.asarray(sha256)
    u = np.asarray(uids)
    n = len(raw)
    if raw.ndim != 1 or u.shape != (n,):
        raise ValueError("sha256 and uids must be 1-D of equal length")
    if u.dtype.kind != "U":
        u = u.astype(str)
    if raw.dtype.kind == "U":  # fast path: a plain string column
        digests = np.char.lower(raw)
        present = digests != ""
    else:
        objs = raw.astype(object)
        present = np.array([isinstance(s, (str, bytes)) and len(s) > 0 for s in objs], dtype=bool)
        text = [
            (s.decode() if isinstance(s, bytes) else s).lower() if ok else "" for s, ok in zip(objs, present)
        ]
        digests = np.array(text, dtype=str) if n else np.zeros(0, dtype=str)
    dropped = np.zeros(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(present)
    if rows.size < 2:
        return dropped, duplicate_of
    d, uu = digests[rows], u[rows]
    order = np.lexsort((uu, d))
    sd = d[order]
    head = np.r_[True, sd[1:] != sd[:-1]]
    keeper = rows[order[head]][np.cumsum(head) - 1]
    target = rows[order]
    dup = ~head
    dropped[target[dup]] = True
    duplicate_of[target[dup]] = keeper[dup]
    return dropped, duplicate_of
