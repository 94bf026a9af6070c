"""DataComp's subset files: the selected uids as a sorted NumPy array of dtype("u8,u8").

DataComp's resharder reads this format (each 128-bit hex uid split into two 64-bit halves,
sorted so membership is a binary search); a run writes its kept set in it and accepts one as a
selection.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.io import fs

SUBSET_DTYPE = np.dtype("u8,u8")


def uids_to_subset(uids) -> np.ndarray:
    pairs = [(int(u[:16], 16), int(u[16:32], 16)) for u in uids]
    array = np.array(pairs, dtype=SUBSET_DTYPE) if pairs else np.empty(0, dtype=SUBSET_DTYPE)
    return np.sort(array)


def subset_to_uids(array: np.ndarray) -> list[str]:
    return [f"{int(high):016x}{int(low):016x}" for high, low in array.tolist()]


def write_subset(url: str, uids) -> int:
    return save_subset(url, uids_to_subset(uids))


def save_subset(url: str, pairs: np.ndarray) -> int:
    """Write uids already turned into SUBSET_DTYPE pairs (in any order) as a subset file."""
    array = np.sort(pairs)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    fs.write_bytes_atomic(url, buffer.getvalue())
    return len(array)


def read_subset(url: str) -> set[str]:
    try:
        array = np.load(io.BytesIO(fs.read_bytes(url)), allow_pickle=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"subset file {url} not found") from exc
    if array.dtype != SUBSET_DTYPE and array.dtype.names != SUBSET_DTYPE.names:
        raise ValueError(f"subset file {url}: dtype {array.dtype}, expected DataComp's {SUBSET_DTYPE}")
    return set(subset_to_uids(array.astype(SUBSET_DTYPE)))


# -- DataComp metadata: scores and embeddings that come with the pool ---------------------------
#
# DataComp ships, per metadata file, `NAME.parquet` (uid, url, text, original_width, ...,
# clip_b32_similarity_score, clip_l14_similarity_score, sha256) and `NAME.npz` beside it with the
# OpenAI CLIP embeddings `b32_img, b32_txt, l14_img, l14_txt`, row-aligned with the Parquet.

EMBEDDING_ARRAYS = {"b32": ("b32_img", "b32_txt"), "l14": ("l14_img", "l14_txt")}


def write_metadata(parquet_url: str, table, arrays: dict[str, np.ndarray]) -> None:
    """Write one DataComp metadata file: `table` as NAME.parquet and `arrays` as NAME.npz beside it,
    row-aligned. The .npz goes first, so whoever finds the .parquet also finds its arrays."""
    import pyarrow.parquet as pq

    if not parquet_url.endswith(".parquet"):
        raise ValueError(f"{parquet_url}: a DataComp metadata file is named NAME.parquet")
    for name, values in arrays.items():
        if len(values) != table.num_rows:
            raise ValueError(f"{name} has {len(values)} rows, the table {table.num_rows}: they must be row-aligned")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fs.write_bytes_atomic(npz_url(parquet_url), buffer.getvalue())
    with fs.atomic_open(parquet_url, "wb") as handle:
        pq.write_table(table, handle)


_HEX = frozenset("0123456789abcdefABCDEF")


def uid_halves(uids, where: str) -> np.ndarray:
    """The uids as (n, 2) uint64 halves (the two 16-digit halves of the 32 hex digits, as in
    SUBSET_DTYPE); a uid that is not 32 hex digits is named in the error, with `where`. Plain hex
    is converted in one go (a partition's worth at once); anything else one uid at a time."""
    uids = list(uids)
    if all(isinstance(u, str) and len(u) == 32 for u in uids):
        digits = "".join(uids)
        if digits.isascii() and all(c in _HEX for c in set(digits)):
            raw = bytes.fromhex(digits)
            return np.frombuffer(raw, dtype=">u8").reshape(len(uids), 2).astype(np.uint64)
    halves = np.empty((len(uids), 2), np.uint64)
    for i, uid in enumerate(uids):
        try:
            if not isinstance(uid, str) or len(uid) != 32:
                raise ValueError
            halves[i] = (int(uid[:16], 16), int(uid[16:], 16))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: uid {uid!r} is not a DataComp uid (32 hex digits)") from None
    return halves


def halves_to_uid(hi: int, lo: int) -> str:
    """A uid from its halves (lower-case hex)."""
    return f"{int(hi):016x}{int(lo):016x}"


def npz_url(parquet_url: str) -> str:
    return parquet_url[: -len(".parquet")] + ".npz"


def npz_shape(url: str, array: str) -> tuple[int, ...]:
    """The shape of one array in an .npz, read from its header without loading the data."""
    import zipfile

    with fs.open_input(url) as handle, zipfile.ZipFile(handle) as archive:
        try:
            member = archive.open(f"{array}.npy")
        except KeyError:
            raise ValueError(f"{url} has no array {array!r} (has {sorted(n[:-4] for n in archive.namelist())})") from None
        with member:
            major, _ = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(member)
    return shape


def read_metadata_rows(parquet_url: str, rows: np.ndarray, columns: list[str], arrays: list[str]) -> dict:
    """Columns of the Parquet and arrays of the .npz beside it, at `rows`."""
    import pyarrow.parquet as pq

    with fs.open_input(parquet_url) as handle:
        table = pq.read_table(handle, columns=columns)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{parquet_url} has no column {missing[0]!r}")
    out = {c: table.column(c).take(rows).to_numpy(zero_copy_only=False) for c in columns}
    url = npz_url(parquet_url)
    with fs.open_input(url) as handle, np.load(handle, allow_pickle=False) as npz:
        for name in arrays:
            if name not in npz.files:
                raise ValueError(f"{url} has no array {name!r} (has {sorted(npz.files)})")
            values = npz[name]
            if len(values) != table.num_rows:
                raise ValueError(f"{url}: {name} has {len(values)} rows, {parquet_url} has {table.num_rows}")
            out[name] = values[rows]
    return out
