import numpy as np
import pytest

from pipeline.io.datacomp import SUBSET_DTYPE, read_subset, subset_to_uids, uids_to_subset, write_subset


def test_subset_is_sorted_uid_halves_in_datacomp_s_dtype(tmp_path):
    uids = ["ffffffffffffffff0000000000000001", "00000000000000010000000000000002", "0123456789abcdef0123456789abcdef"]
    path = tmp_path / "subset.npy"
    assert write_subset(str(path), uids) == 3
    array = np.load(path)
    assert array.dtype == np.dtype("u8,u8") == SUBSET_DTYPE
    assert array.tolist() == sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids)
    # DataComp's resharder tests membership by binary search on this sorted array
    probe = np.array([(int(uids[2][:16], 16), int(uids[2][16:], 16))], dtype=SUBSET_DTYPE)
    position = np.searchsorted(array, probe)[0]
    assert array[position] == probe[0]
    assert read_subset(str(path)) == set(uids)
    assert subset_to_uids(uids_to_subset(uids)) == sorted(uids)


def test_a_subset_of_another_dtype_is_refused(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.arange(4))
    with pytest.raises(ValueError, match="expected DataComp"):
        read_subset(str(path))
