"""Keyed records through Ray Data: the shuffles of the global steps (pipeline.stages.steps).

The half of the Ray adapter that moves data rather than running work items: tasks map
partitions to Arrow tables of keyed records that stay in the object store, Ray Data
hash-partitions them by a key, and a function runs once per key with all of its rows. Stage code
never imports Ray itself.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterator

import ray
from ray.data.context import ShuffleStrategy

from pipeline.ray_adapter import _capacity, _get, _quiet_ray_loggers


def _quiet_data_context() -> None:
    """Our own progress lines replace Ray Data's bars (CURATE_PROGRESS_BARS=1 brings them back)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = bool(os.environ.get("CURATE_PROGRESS_BARS"))
    context.print_on_execution_start = False
    _quiet_ray_loggers()


# Ray Data's default hash shuffle has seconds of fixed cost, more than the whole shuffle of a few
# dozen blocks. Below this many input blocks the sort shuffle, which has no such start, is used;
# above it the hash shuffle's scaling pays for its start.
SORT_SHUFFLE_MAX_BLOCKS = 32


def _shuffled(dataset, blocks: int, map_batch_bytes: int):
    """Pick the shuffle for `blocks` input blocks. The hash shuffle's map task first concatenates
    input blocks up to `map_batch_bytes` (Ray Data's default is 1 GiB) and needs about three times
    that while it partitions them: left at the default, the largest process of a shuffle grows with
    the pool until the pool's records pass 1 GiB."""
    context = dataset.context
    context.shuffle_input_batch_bytes = map_batch_bytes
    if blocks <= SORT_SHUFFLE_MAX_BLOCKS:
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return dataset


def group_map(
    items: list[dict],
    emit: Callable[[dict], dict],
    key: str,
    per_group: Callable[[dict], dict],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    num_partitions: int,
    map_batch_bytes: int,
    then: tuple[str, Callable] | None = None,
) -> Iterator[dict]:
    """Shuffle rows by `key` and run `per_group` on each group, in parallel.

    `emit(item)` returns a batch (dict of numpy arrays, 2-D arrays allowed) for one work item;
    Ray Data hash-partitions the rows by `key` and calls `per_group(batch)` once per distinct key
    with all of that key's rows; `num_partitions` bounds how many keys' rows a task holds at once
    (a hash-shuffle reduce task holds about 1/num_partitions of all rows). With `then=(key2, fn)`
    the results are shuffled again by `key2` and `fn(table)` (an Arrow table) runs once per value
    of it (to route results home to their partition). Yields the last step's result batches as they complete. No process ever holds
    more than the groups it was given.
    """
    if not items:
        return
    _quiet_data_context()

    def emit_batch(batch: dict) -> dict:
        return emit({name: values[0] for name, values in batch.items()})

    dataset = _shuffled(ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        emit_batch, batch_size=1, batch_format="numpy", num_cpus=num_cpus
    ), len(items), map_batch_bytes)
    groups = dataset.groupby(key, num_partitions=num_partitions).map_groups(
        per_group, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus or None
    )
    if then is not None:
        groups = groups.groupby(then[0], num_partitions=num_partitions).map_groups(
            then[1], batch_format="pyarrow", num_cpus=min(num_cpus, 0.5))
    yield from groups.iter_batches(batch_format="numpy", batch_size=None)


# --- global steps: keyed records, shuffled by Ray Data -------------------------------------------


def map_to_refs(fn: Callable[..., Any], items: list[dict], *, kwargs: dict | None = None,
                num_cpus: float = 1.0) -> Iterator[tuple[dict, Any, int]]:
    """Run `fn(item, **kwargs)` (which returns an Arrow table) as Ray tasks and yield `(item,
    reference to the table, its row count)` as each finishes. The tables stay in the object store
    (the driver holds only references and counts), for shuffle_map or run_remote to consume; a
    task's exception is raised here."""
    if not items:
        return
    task = ray.remote(_table_and_rows).options(num_cpus=num_cpus, max_retries=3, num_returns=2,
                                               name=getattr(fn, "__name__", "task"))
    size = max(1, min(len(items), _capacity(num_cpus, 0, len(items))))
    todo = iter(items)
    running: dict = {}  # row-count ref -> (item, table ref)

    def start(item: dict) -> None:
        table_ref, rows_ref = task.remote(fn, item, kwargs or {})
        running[rows_ref] = (item, table_ref)

    for item in itertools.islice(todo, size):
        start(item)
    try:
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            item, table_ref = running.pop(ref)
            nxt = next(todo, None)
            if nxt is not None:
                start(nxt)
            yield item, table_ref, _get(ref)
    finally:
        for ref in running:
            ray.cancel(ref)


def _table_and_rows(fn: Callable, item: dict, kwargs: dict):
    table = fn(item, **kwargs)
    return table, table.num_rows


def shuffle_map(refs: list, key: str, fn: Callable, *, partitions: int, map_batch_bytes: int,
                num_cpus: float = 1.0, num_gpus: float = 0.0) -> list:
    """Ray Data hash-partitions the Arrow record tables behind `refs` by the column `key` and calls
    `fn(table)` once per distinct key value with all of its rows; returns references to the
    result tables. `partitions` bounds how many keys' rows a task holds at once: with one key
    value per bucket of rows, a task holds about one bucket."""
    if not refs:
        return []
    _quiet_data_context()
    dataset = _shuffled(ray.data.from_arrow_refs(list(refs)), len(refs), map_batch_bytes)
    grouped = dataset.groupby(key, num_partitions=max(1, partitions)).map_groups(
        fn, batch_format="pyarrow", num_cpus=num_cpus, num_gpus=num_gpus or None)
    return list(grouped.materialize().to_arrow_refs())


def fetch(refs: list) -> list:
    """The values behind references (small results: per-partition summaries)."""
    return [_get(ref) for ref in refs]
