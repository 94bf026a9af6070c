"""The one place where stages meet Ray.

A stage hands over a worker class (`__init__` loads what it needs once per actor, `__call__` takes
one work item and returns a small dict of counts) and a list of work items; this module runs them
as a streaming Ray Data job and yields the results as they complete, so the driver can record
progress and completed partitions while the job runs. Stage code never imports Ray itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Iterator

import ray
from ray.data.context import ShuffleStrategy

log = logging.getLogger("curate")


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Attach to Ray; returns True when this call started it (so the caller shuts it down).

    address None follows Ray's own rule: RAY_ADDRESS (set by `ray job submit`), else a cluster
    started on this machine with `ray start`, else a new embedded Ray. "local" always embeds.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address is None or address == "local":
        if address == "local" or not _cluster_reachable():
            kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    resources = ray.cluster_resources()
    log.info("ray: %s, %s CPUs, %s GPUs", ray.get_runtime_context().gcs_address, resources.get("CPU", 0), resources.get("GPU", 0))
    return True


def _cluster_reachable() -> bool:
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_bootstrap_address

        return bool(find_bootstrap_address(None))
    except Exception:
        return False


def _quiet_data_context() -> None:
    """Our own progress lines replace Ray Data's bars (CURATE_PROGRESS_BARS=1 brings them back)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = bool(os.environ.get("CURATE_PROGRESS_BARS"))
    context.print_on_execution_start = False


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def map_items(
    worker: type | Callable[[dict], dict],
    items: list[dict],
    *,
    worker_kwargs: dict | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_workers: int | None = None,
) -> Iterator[dict]:
    """Run a worker over work items and yield its results as they finish.

    A class runs on a pool of actors (`worker(**worker_kwargs)` once per actor, then one call per
    item); a plain function runs as Ray tasks (`worker(item, **worker_kwargs)`). Ray Data restarts
    dead actors and retries tasks lost to worker failures; an exception raised by the worker
    itself fails the stage.
    """
    if not items:
        return
    _quiet_data_context()
    capacity = int(cluster_gpus() // num_gpus) if num_gpus else int(cluster_cpus() // max(num_cpus, 1e-3))
    size = max(1, min(len(items), capacity, max_workers or len(items)))
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    if isinstance(worker, type):
        dataset = dataset.map(
            worker,
            fn_constructor_kwargs=worker_kwargs or {},
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
        )
    else:
        dataset = dataset.map(
            worker,
            fn_kwargs=worker_kwargs or {},
            compute=ray.data.TaskPoolStrategy(size=size),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
        )
    yield from dataset.iter_rows()


# Ray Data's default hash shuffle first starts a pool of aggregator actors: seconds of fixed cost,
# more than the whole shuffle of a few dozen blocks. Below this many input blocks the sort shuffle,
# which has no such start, is used; above it the hash shuffle's scaling pays for its start.
SORT_SHUFFLE_MAX_BLOCKS = 32


def group_map(
    items: list[dict],
    emit: Callable[[dict], dict],
    key: str,
    per_group: Callable[[dict], dict],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    num_partitions: int | None = None,
) -> Iterator[dict]:
    """Shuffle rows by `key` and run `per_group` on each group, in parallel.

    `emit(item)` returns a batch (dict of numpy arrays, 2-D arrays allowed) for one work item;
    Ray Data hash-partitions the rows by `key` and calls `per_group(batch)` once per distinct key
    with all of that key's rows. Yields the result batches as they complete. No process ever
    holds more than the groups it was given.
    """
    if not items:
        return
    _quiet_data_context()

    def emit_batch(batch: dict) -> dict:
        return emit({name: values[0] for name, values in batch.items()})

    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        emit_batch, batch_size=1, batch_format="numpy", num_cpus=num_cpus
    )
    if len(items) <= SORT_SHUFFLE_MAX_BLOCKS:
        dataset.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    groups = dataset.groupby(key, num_partitions=num_partitions).map_groups(
        per_group, batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus or None
    )
    yield from groups.iter_batches(batch_format="numpy", batch_size=None)


def run_remote(fn: Callable, *args, num_cpus: float = 1.0, num_gpus: float = 0, **kwargs):
    """Run one global step as a Ray task (not in the driver) and wait for its result."""
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3)(fn)
    return ray.get(task.remote(*args, **kwargs))


def _get(ref):
    """ray.get, raising what the remote code raised (not Ray's wrapper of a wrapper of it)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc
        while isinstance(cause, ray.exceptions.RayTaskError) and getattr(cause, "cause", None) is not None:
            cause = cause.cause
        if cause is exc or not isinstance(cause, Exception):
            raise
        raise cause from None


class _Host:
    """An actor holding one worker object: `worker(**kwargs)` once, then calls."""

    def __init__(self, worker: type, kwargs: dict):
        self.worker = worker(**kwargs)

    def call(self, payload, **kwargs):
        return self.worker(payload, **kwargs)

    def method(self, name: str):
        return getattr(self.worker, name)()


class _Bound:
    """A function as a worker class (for a pool of prepare actors)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, item, **kwargs):
        return self.fn(item, **kwargs)


class _Pool:
    """Actors of one kind and how many calls each has queued; calls go to the least busy."""

    def __init__(self, worker: type, kwargs: dict, size: int, options: dict):
        host = ray.remote(_Host)
        self.actors = [host.options(**options).remote(worker, kwargs) for _ in range(max(1, size))]
        self.load = [0] * len(self.actors)
        self.calls: dict = {}  # call ref -> actor index

    def free(self, depth: int) -> bool:
        return min(self.load) < depth

    def submit(self, payload, **kwargs):
        index = self.load.index(min(self.load))
        ref = self.actors[index].call.remote(payload, **kwargs)
        self.calls[ref] = index
        self.load[index] += 1
        return ref

    def done(self, ref) -> None:
        self.load[self.calls.pop(ref)] -= 1

    def kill(self) -> None:
        for ref in self.calls:
            ray.cancel(ref)
        for actor in self.actors:
            ray.kill(actor)


def map_prepared(
    prepare: Callable[..., Any],
    worker: type,
    items: Iterable[dict],
    *,
    worker_kwargs: dict | None = None,
    actors: int = 1,
    actor_cpus: float = 1.0,
    actor_gpus: float = 0.0,
    prepare_cpus: float = 1.0,
    prepare_slots: int = 1,
    prefetch: int = 2,
    actor_concurrency: int = 1,
    actor_env: dict[str, str] | None = None,
) -> Iterator[dict]:
    """Two steps, streamed: CPU workers run `prepare(item, spec=...)` and feed actors that hold `worker`.

    `prepare_slots` prepare actors (each `prepare_cpus` CPUs) take the items; each prepared result
    goes, as an object reference, to the least busy of `actors` model actors (`worker(**worker_kwargs)`
    once per actor, then `worker(prepared)` per item; at most `prefetch` queued per actor). Yields the
    model actors' results as they finish. `actor_concurrency` > 1 lets a model actor take the next
    item while the previous one runs (threads: a GPU actor copies one batch in while it computes
    another). `actor_env` sets environment variables in the model actors' processes from their
    start (for settings read when a library loads, such as OpenMP's). When the worker has a
    `prepare_spec()` method, its result (asked of the first model actor once it is up) is passed to
    prepare as `spec`. Items are pulled from the iterable only as there is room, so the caller may
    produce them lazily.

    Prepare runs in long-lived actors rather than tasks: under backpressure, idle task workers are
    reaped and the next task pays a fresh process and its imports (seconds with torch), which on a
    small machine costs more CPU than the work itself. Actors restart and retry calls when their
    process dies; an exception raised by `prepare` or `worker` ends the run with that exception.
    """
    iterator = iter(items)
    first = next(iterator, None)
    if first is None:
        return
    model_options: dict[str, Any] = {"num_cpus": actor_cpus, "max_restarts": 3, "max_task_retries": 3,
                                     "max_concurrency": max(1, actor_concurrency)}
    if actor_env:
        model_options["runtime_env"] = {"env_vars": dict(actor_env)}
    if actor_gpus:
        model_options["num_gpus"] = actor_gpus
    models = _Pool(worker, worker_kwargs or {}, actors, model_options)
    # Both pools start at once; prepare calls wait on the spec by reference, the driver never does.
    preparers = _Pool(_Bound, {"fn": prepare}, prepare_slots,
                      {"num_cpus": prepare_cpus, "max_restarts": 3, "max_task_retries": 3})
    kwargs = {"spec": models.actors[0].method.remote("prepare_spec")} if hasattr(worker, "prepare_spec") else {}
    try:
        item = first  # the next item not yet handed to a prepare actor; None once all are
        ready: list = []  # prepared refs waiting for a model actor
        depth = prefetch + max(0, actor_concurrency - 1)  # calls in flight per model actor
        limit = 2 * len(preparers.actors) + len(models.actors) * depth  # items prepared or preparing
        while True:
            while item is not None and preparers.free(2) and len(preparers.calls) + len(ready) < limit:
                preparers.submit(item, **kwargs)
                item = next(iterator, None)
            while ready and models.free(depth):
                models.submit(ready.pop(0))
            if not preparers.calls and not models.calls:
                return  # nothing running: nothing ready and no item left either
            done, _ = ray.wait(list(preparers.calls) + list(models.calls), num_returns=1, fetch_local=False)
            for ref in done:
                if ref in preparers.calls:
                    preparers.done(ref)
                    ready.append(ref)
                else:
                    models.done(ref)
                    yield _get(ref)
    finally:
        models.kill()
        preparers.kill()
