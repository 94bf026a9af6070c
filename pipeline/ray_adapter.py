"""Where stages meet Ray (with pipeline.ray_shuffle, which moves keyed records through Ray Data).

A stage hands over a worker class (`__init__` loads what it needs once per actor, `__call__` takes
one work item and returns a small dict of counts) and a list of work items; this module runs them
on Ray actors or tasks and yields the results as they complete, so the driver can record completed
partitions while the job runs. A worker may also be given `progress=`, a plain callback for what it
finishes inside a work item, whose totals the driver logs (Progress). Stage code never imports Ray
itself, and its cores run without Ray (and without a callback) as well.

Each work item can run under a wall-clock bound (ray.item_timeout_s): a read that never returns
would otherwise hang the run. Past it the item's worker process is killed and the item runs once
more in a fresh one; a second time ends the run with ItemTimeoutError, naming the worker and the
item's partition and shard.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import ray
import ray.data  # noqa: F401  (sets up Ray Data's loggers, which _quiet_ray_loggers below filters)

from pipeline.ray_progress import Progress, Reporter

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
    try:
        ray.init(**kwargs)
    except Exception as exc:
        if not _transient_start_failure(exc):
            raise
        log.warning("ray: did not start (%s); retrying once", " ".join(str(exc).split()))
        ray.shutdown()  # whatever the failed attempt left running
        ray.init(**kwargs)
    if kwargs.get("address") == "local":
        _watch_embedded()
    resources = ray.cluster_resources()
    log.info("ray: %s, %s CPUs, %s GPUs", ray.get_runtime_context().gcs_address, resources.get("CPU", 0), resources.get("GPU", 0))
    return True


def _watch_embedded() -> None:
    """Have the agents of the Ray this process just started stopped when it ends (pipeline.ray_reaper)."""
    from pipeline.ray_reaper import start_watcher

    try:
        from ray._private import ray_constants

        raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    except (AttributeError, KeyError, IndexError):  # Ray's internals moved: nothing to watch by
        log.debug("ray: the embedded raylet's pid is not known; its agents are not watched")
        return
    start_watcher(raylet)


# What ray.init raises when a loaded machine is too slow for its start-up deadlines (the raylet not
# registering in time, the GCS not answering); Ray raises these as plain Exception or RuntimeError.
_TRANSIENT_START_FAILURES = ("timed out", "failed to start gcs", "failed to connect to gcs", "overloaded")


def _transient_start_failure(exc: Exception) -> bool:
    """A start-up failure that a second attempt usually gets past, unlike a wrong address or argument."""
    text = str(exc).lower()
    return isinstance(exc, TimeoutError) or any(marker in text for marker in _TRANSIENT_START_FAILURES)


def _cluster_reachable() -> bool:
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_bootstrap_address

        return bool(find_bootstrap_address(None))
    except Exception:
        return False


# --- Ray's own output ----------------------------------------------------------------------------
#
# What Ray prints on every healthy run (its token-auth notice, Ray Data's per-dataset INFO lines and
# its note that progress bars are off) says nothing about the job, and the user's terminal shows
# Curate's log instead. These records are dropped where they are made, by logger and level; warnings
# and errors of every other Ray logger, and everything a worker raises, still come through.
# `curate -v` (the "curate" logger at DEBUG) or CURATE_RAY_LOGS=1 shows them all again.
RAY_LOGS_ENV = "CURATE_RAY_LOGS"
# logger -> the lowest level shown without -v / CURATE_RAY_LOGS
_RAY_LOGGER_FLOORS = {
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
}


def ray_logs_wanted() -> bool:
    return os.environ.get(RAY_LOGS_ENV, "") not in ("", "0") or log.isEnabledFor(logging.DEBUG)


class _UnlessVerbose(logging.Filter):
    """Drops a logger's records below `floor` unless Ray's own logs were asked for (checked per
    record, so `-v` counts however late logging was configured)."""

    def __init__(self, floor: int):
        super().__init__()
        self.floor = floor

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.floor or ray_logs_wanted()


def _quiet_ray_loggers() -> None:
    for name, floor in _RAY_LOGGER_FLOORS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UnlessVerbose) for f in logger.filters):
            logger.addFilter(_UnlessVerbose(floor))
    # Ray Data's INFO lines still reach its own log file (ray-data.log in the session's logs):
    # only its console handler is held back. A logger's filter sees only that logger's records, so
    # the handler gets one too (ray.data's children log through it).
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console" or type(handler).__name__ == "PlainRayHandler":  # Ray Data's own
            if not any(isinstance(f, _UnlessVerbose) for f in handler.filters):
                handler.addFilter(_UnlessVerbose(logging.WARNING))


_quiet_ray_loggers()


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def gpus_per_worker(resources) -> float:
    """The GPUs a worker of a stage declaring `resources` (pipeline.stages.Resources) asks for:
    its declared share where the cluster has GPUs, none (the CPU path) where it has none."""
    wanted = float(getattr(resources, "gpus", 0.0) or 0.0)
    return wanted if wanted and cluster_gpus() >= wanted else 0.0


# --- running work items ----------------------------------------------------------------------------


def _capacity(num_cpus: float, num_gpus: float, wanted: int) -> int:
    """How many workers asking for `num_cpus` / `num_gpus` to start at once: as many as the
    cluster holds now, or, on a cluster that holds none yet (an autoscaling cluster starts with
    no workers), every one wanted, so that the autoscaler sees the whole demand and adds nodes."""
    capacity = int(cluster_gpus() // num_gpus) if num_gpus else int(cluster_cpus() // max(num_cpus, 1e-3))
    return capacity if capacity >= 1 else wanted


class ItemTimeoutError(RuntimeError):
    """A work item ran longer than its wall-clock bound twice, the second time in a fresh worker."""


def _describe(item) -> str:
    """A work item as a timeout names it: its partition and the shard (or file) it reads, where it has them."""
    if not isinstance(item, dict):
        return "a work item"
    where = next((str(item[key]) for key in ("url", "source", "shard") if item.get(key)), None)
    partition = item.get("partition")
    if partition is not None:
        return f"partition {partition} ({where})" if where else f"partition {partition}"
    return where or "a work item"


class _Deadlines:
    """The wall-clock bound of one loop's running calls (None: no bound).

    Says how long ray.wait may block (until the earliest deadline) and which calls ran out of time;
    the first time an item does it logs the retry, the second time it raises ItemTimeoutError.
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.due: dict = {}  # call ref -> time.monotonic() by which it must finish

    def start(self, ref) -> None:
        if self.timeout_s is not None:
            self.due[ref] = time.monotonic() + self.timeout_s

    def forget(self, ref) -> None:
        self.due.pop(ref, None)

    def wait_s(self) -> float | None:
        """The timeout for ray.wait: until the earliest deadline, or None (no bound, nothing running)."""
        if not self.due:
            return None
        return max(0.0, min(self.due.values()) - time.monotonic())

    def expired(self, ready=()) -> list:
        """The calls past their deadline, except those in `ready` (finished after all)."""
        now = time.monotonic()
        return [ref for ref, due in self.due.items() if due <= now and ref not in ready]

    def ran_out(self, name: str, item, again: bool) -> None:
        """Log the retry of an item that ran out of time; raise ItemTimeoutError when it did so before."""
        what = f"{name} on {_describe(item)}"
        if again:
            raise ItemTimeoutError(
                f"{what} ran longer than {self.timeout_s:g} s (ray.item_timeout_s) twice, the second time in a "
                f"fresh worker: its input may never finish reading (a hung storage read, a pipe), or the bound "
                f"is too small for it")
        log.warning("%s ran longer than %g s; retrying it once in a fresh worker", what, self.timeout_s)


def map_items(
    worker: type | Callable[[dict], dict],
    items: list[dict],
    *,
    worker_kwargs: dict | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_workers: int | None = None,
    progress: Progress | None = None,
    timeout_s: float | None = None,
) -> Iterator[dict]:
    """Run a worker over work items and yield its results as they finish.

    A class runs on a pool of actors (`worker(**worker_kwargs)` once per actor, then one call per
    item, each to an idle actor); a plain function runs as Ray tasks (`worker(item, **worker_kwargs)`).
    With `progress`, the worker also gets `progress=`, a Reporter: a plain callback for what it
    finishes inside an item; the driver logs the totals while the items run. Dead actors are
    restarted, and calls and tasks lost with a process are retried; an exception raised by the
    worker itself ends the run with that exception. With `timeout_s`, an item still running that
    long after it was handed to its worker has its worker process killed and runs once more in a
    fresh one; a second time raises ItemTimeoutError naming the worker and the item.

    Work items are whole partitions, so they run on plain actors and tasks rather than as a Ray
    Data dataset, whose blocks would only add conversions of the items and results.
    """
    if not items:
        return
    size = max(1, min(len(items), _capacity(num_cpus, num_gpus, len(items)), max_workers or len(items)))
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    clock = _Deadlines(timeout_s)
    with progress if progress is not None else contextlib.nullcontext():
        reporter = progress.reporter() if progress is not None else None
        if isinstance(worker, type):
            yield from _on_actors(worker, worker_kwargs or {}, items, size, options, reporter, clock)
        else:
            yield from _as_tasks(worker, worker_kwargs or {}, items, size, options, reporter, clock)


def _on_actors(worker: type, kwargs: dict, items: list[dict], size: int, options: dict, reporter,
               clock: _Deadlines) -> Iterator[dict]:
    pool = _Pool(worker, kwargs, size, {**options, "max_restarts": 3, "max_task_retries": 3}, reporter=reporter,
                 clock=clock)
    todo = iter(items)
    try:
        for item in todo:
            pool.submit(item)
            if not pool.free(1):
                break
        while pool.calls:
            ready, _ = ray.wait(list(pool.calls), num_returns=1, timeout=clock.wait_s())
            pool.expire(ready)
            if not ready:
                continue
            pool.done(ready[0])
            item = next(todo, None)
            if item is not None:
                pool.submit(item)
            yield _get(ready[0])
    finally:
        pool.kill()


def _call_reporting(fn: Callable, item: dict, kwargs: dict, reporter):
    """A function worker's call inside its task, given the Reporter when there is one."""
    if reporter is None:
        return fn(item, **kwargs)
    try:
        return fn(item, progress=reporter, **kwargs)
    finally:
        reporter.flush()


def _as_tasks(fn: Callable, kwargs: dict, items: list[dict], size: int, options: dict, reporter,
              clock: _Deadlines) -> Iterator[dict]:
    name = getattr(fn, "__name__", "task")
    task = ray.remote(_call_reporting).options(**options, max_retries=3, name=name)
    running: dict = {}  # task ref -> (its item, whether the item ran out of time before)

    def submit(item: dict, again: bool = False) -> None:
        ref = task.remote(fn, item, kwargs, reporter)
        running[ref] = (item, again)
        clock.start(ref)

    todo = iter(items)
    for item in itertools.islice(todo, size):
        submit(item)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=clock.wait_s())
            for ref in clock.expired(ready):
                # A forced cancel kills the task's process, and Ray retries no cancelled task.
                item, again = running.pop(ref)
                clock.forget(ref)
                ray.cancel(ref, force=True)
                clock.ran_out(name, item, again)
                submit(item, again=True)
            if not ready:
                continue
            running.pop(ready[0])
            clock.forget(ready[0])
            item = next(todo, None)
            if item is not None:
                submit(item)
            yield _get(ready[0])
    finally:
        for ref in running:
            ray.cancel(ref)


def run_remote(fn: Callable, *args, num_cpus: float = 1.0, num_gpus: float = 0, **kwargs):
    """Run one step as a Ray task (not in the driver) and wait for its result. Object references
    among `args` (from map_to_refs or shuffle_map) arrive in the task as their values."""
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=3)(fn)
    return _get(task.remote(*args, **kwargs))


def _get(ref):
    """ray.get, raising what the remote code raised (not Ray's wrapper of a wrapper of it)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        _reraise(exc)


def _reraise(exc: Exception):
    cause = exc
    while isinstance(cause, ray.exceptions.RayTaskError) and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    if cause is exc or not isinstance(cause, Exception):
        raise exc
    raise cause from None


class _Host:
    """An actor holding one worker object: `worker(**kwargs)` once, then calls, each given
    `progress=` the pool's Reporter when it has one.

    The Reporter travels with each call, not with the constructor: arguments holding an actor
    handle go through the object store, and an actor restarted after its process died could not
    get its constructor's arguments back from there.
    """

    def __init__(self, worker: type, kwargs: dict):
        self.worker = worker(**kwargs)

    def call(self, payload, reporter: Reporter | None = None, **kwargs):
        if reporter is None:
            return self.worker(payload, **kwargs)
        try:
            return self.worker(payload, progress=reporter, **kwargs)
        finally:
            reporter.flush()

    def method(self, name: str):
        return getattr(self.worker, name)()


class _Bound:
    """A function as a worker class (for a pool of prepare actors)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, item, **kwargs):
        return self.fn(item, **kwargs)


@dataclass
class _Call:
    """A call queued at a pool's actor, with what it takes to make it again on a fresh actor."""

    payload: Any
    item: Any  # the work item it serves, as a timeout names it
    kwargs: dict
    actor: int  # the actor's index in the pool
    again: bool  # its item ran out of time before


class _Pool:
    """Actors of one kind and how many calls each has queued; calls go to the least busy.

    With a bound in `clock`, an actor's oldest call must finish within it (counted from when the
    call reached the front of that actor's queue); an actor that takes longer is killed and replaced
    by a fresh one, and its calls are made again there.
    """

    def __init__(self, worker: type, kwargs: dict, size: int, options: dict, reporter: Reporter | None = None,
                 clock: _Deadlines | None = None):
        # A subclass named after the worker, so that process titles, `ray list actors` and the
        # dashboard say which worker an actor holds ("IngestWorkerHost"), not just "_Host".
        self.host = ray.remote(type(f"{worker.__name__}Host", (_Host,), {})).options(**options)
        self.worker, self.kwargs = worker, kwargs
        self.name = getattr(kwargs.get("fn"), "__name__", "prepare") if worker is _Bound else worker.__name__
        self.actors = [self.host.remote(worker, kwargs) for _ in range(max(1, size))]
        self.reporter = reporter
        self.clock = clock if clock is not None else _Deadlines(None)
        self.load = [0] * len(self.actors)
        self.calls: dict = {}  # call ref -> _Call, in the order they were made

    def free(self, depth: int) -> bool:
        return min(self.load) < depth

    def submit(self, payload, *, item=None, again: bool = False, **kwargs):
        index = self.load.index(min(self.load))
        ref = self.actors[index].call.remote(payload, self.reporter, **kwargs)
        self.calls[ref] = _Call(payload, payload if item is None else item, kwargs, index, again)
        if self.load[index] == 0:
            self.clock.start(ref)  # the front of the actor's queue
        self.load[index] += 1
        return ref

    def done(self, ref) -> _Call:
        call = self.calls.pop(ref)
        self.clock.forget(ref)
        self.load[call.actor] -= 1
        following = next((r for r, c in self.calls.items() if c.actor == call.actor), None)
        if following is not None and following not in self.clock.due:
            self.clock.start(following)  # now at the front of the actor's queue
        return call

    def expire(self, ready=()) -> None:
        """Replace the actors whose oldest call ran out of time and make their calls again (raises
        ItemTimeoutError for a call whose item ran out of time before)."""
        for ref in self.clock.expired(ready):
            call = self.calls.get(ref)
            if call is None:
                continue  # another pool's call, or one lost with an actor replaced just now
            lost = [(r, c) for r, c in self.calls.items() if c.actor == call.actor]
            for r, _ in lost:
                del self.calls[r]
                self.clock.forget(r)
            # no_restart: the actor's own restart would retry the calls too (max_task_retries).
            ray.kill(self.actors[call.actor], no_restart=True)
            self.clock.ran_out(self.name, call.item, call.again)
            self.actors[call.actor] = self.host.remote(self.worker, self.kwargs)
            self.load[call.actor] = 0
            for _, c in lost:
                self.submit(c.payload, item=c.item, again=c.again or c is call, **c.kwargs)

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
    progress: Progress | None = None,
    timeout_s: float | None = None,
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
    produce them lazily. With `progress`, model actors' calls get `progress=` a Reporter, as in
    map_items. `timeout_s` bounds each prepare call and each model call as map_items bounds an
    item's (a model call counted from when it reaches the front of its actor's queue).

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
    reporter = progress.reporter() if progress is not None else None
    clock = _Deadlines(timeout_s)
    models = _Pool(worker, worker_kwargs or {}, actors, model_options, reporter=reporter, clock=clock)
    # Both pools start at once; prepare calls wait on the spec by reference, the driver never does.
    preparers = _Pool(_Bound, {"fn": prepare}, prepare_slots,
                      {"num_cpus": prepare_cpus, "max_restarts": 3, "max_task_retries": 3}, clock=clock)
    kwargs = {"spec": models.actors[0].method.remote("prepare_spec")} if hasattr(worker, "prepare_spec") else {}
    with progress if progress is not None else contextlib.nullcontext():
        try:
            item = first  # the next item not yet handed to a prepare actor; None once all are
            ready: list = []  # (prepared ref, its item) waiting for a model actor
            depth = prefetch + max(0, actor_concurrency - 1)  # calls in flight per model actor
            limit = 2 * len(preparers.actors) + len(models.actors) * depth  # items prepared or preparing
            while True:
                while item is not None and preparers.free(2) and len(preparers.calls) + len(ready) < limit:
                    preparers.submit(item, **kwargs)
                    item = next(iterator, None)
                while ready and models.free(depth):
                    prepared, prepared_item = ready.pop(0)
                    models.submit(prepared, item=prepared_item)
                if not preparers.calls and not models.calls:
                    return  # nothing running: nothing ready and no item left either
                done, _ = ray.wait(list(preparers.calls) + list(models.calls), num_returns=1, fetch_local=False,
                                   timeout=clock.wait_s())
                preparers.expire(done)
                models.expire(done)
                for ref in done:
                    if ref in preparers.calls:
                        ready.append((ref, preparers.done(ref).item))
                    elif ref in models.calls:  # not one made again on a fresh actor just now
                        models.done(ref)
                        yield _get(ref)
        finally:
            models.kill()
            preparers.kill()
