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


def run_remote(fn: Callable, *args, num_cpus: float = 1.0, **kwargs):
    """Run one global step as a Ray task (not in the driver) and wait for its result."""
    return ray.get(ray.remote(num_cpus=num_cpus, max_retries=3)(fn).remote(*args, **kwargs))
