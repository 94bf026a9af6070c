"""Per-partition verdicts and the updates a decision step applies to them."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io.decisions import apply_updates, read_updates, updates, write_updates
from pipeline.schema import DECISION_SCHEMA


def _verdict(reasons):
    n = len(reasons)
    columns = {field.name: pa.nulls(n, field.type) for field in DECISION_SCHEMA}
    columns["uid"] = pa.array([f"{i:032x}" for i in range(n)])
    columns["drop_reason"] = pa.array(reasons, pa.string())
    return pa.table(columns, schema=DECISION_SCHEMA)


def test_the_first_reason_wins_and_values_fill_only_fresh_drops():
    verdict = _verdict([None, "caption_too_short", None, None])
    update = updates([1, 2], "near_duplicate", ["a", "b"], duplicate_of=["x", "y"], phash_distance=[3, 4])
    after, dropped = apply_updates(verdict, update)
    assert after.column("drop_reason").to_pylist() == [None, "caption_too_short", "near_duplicate", None]
    assert after.column("duplicate_of").to_pylist() == [None, None, "y", None]
    assert after.column("phash_distance").to_pylist() == [None, None, 4, None]
    assert dropped == {"near_duplicate": 1}


def test_whole_columns_are_set_on_every_row_they_give():
    verdict = _verdict([None, "caption_too_short", None])
    cluster = np.array([2.0, np.nan, 0.0])
    after, dropped = apply_updates(verdict, updates([0], "dbp_pruned", ["pruned"]), {"dbp_cluster": cluster})
    assert after.column("dbp_cluster").to_pylist() == [2, None, 0]
    assert after.column("drop_reason").to_pylist() == ["dbp_pruned", "caption_too_short", None]


@pytest.mark.parametrize("rows", [[0, 0], [5], [-1]])
def test_an_update_naming_a_row_twice_or_outside_the_partition_is_refused(rows):
    with pytest.raises(ValueError, match="row"):
        apply_updates(_verdict([None, None]), updates(rows, "exact_duplicate"))


def test_updates_are_written_in_row_order(tmp_path):
    url = str(tmp_path / "u.parquet")
    write_updates(updates([3, 0, 2], "sql_filter", ["c", "a", "b"]), url)
    assert read_updates(url).column("row").to_pylist() == [0, 2, 3]
    assert read_updates(str(tmp_path / "none.parquet")).num_rows == 0
