"""Progress inside partitions: workers count what they finish through a plain callback (Reporter),
a small actor adds the counts up, and the driver logs totals, rate and ETA while the stage runs.

Part of the Ray adapter: stages only ever see the callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import ray

log = logging.getLogger("curate")

REPORT_EVERY_S = 1.0  # a worker sends what it counted at most once a second


@ray.remote(num_cpus=0)
class _Counts:
    """Where the workers of one stage add up what they finished; the driver reads the totals.

    The rate is measured from the first report on, in this actor's clock: the time before it
    (actors starting, models loading) does not count, and no clocks of two machines are compared.
    """

    def __init__(self):
        self.counts: Counter = Counter()
        self.first: tuple[float, dict] | None = None  # (time, counts) of the first report

    def add(self, counts: dict) -> None:
        self.counts.update(counts)
        if self.first is None:
            self.first = (time.monotonic(), dict(self.counts))

    def snapshot(self) -> dict:
        if self.first is None:
            return {"counts": {}, "first": {}, "seconds": 0.0}
        return {"counts": dict(self.counts), "first": self.first[1], "seconds": time.monotonic() - self.first[0]}


class Reporter:
    """The workers' end of a Progress: a plain callback, `report(samples=1, bytes=n)`.

    Counts are sent to the stage's counter actor at most every `every_s` seconds (and by `flush`,
    which the adapter calls after each work item), so per-sample calls cost nothing.
    """

    def __init__(self, counts_actor, every_s: float = REPORT_EVERY_S):
        self._actor = counts_actor
        self._every_s = every_s
        self._pending: Counter = Counter()
        self._sent = 0.0

    def __call__(self, **counts: int) -> None:
        self._pending.update(counts)
        if time.monotonic() - self._sent >= self._every_s:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._actor.add.remote(dict(self._pending))
            self._pending = Counter()
        self._sent = time.monotonic()

    def __reduce__(self):
        return (Reporter, (self._actor, self._every_s))  # each process counts afresh


class Progress:
    """What a stage's workers finished inside their partitions, logged by the driver as it runs.

    Partitions are the unit of resume, but a stage can spend minutes on a few of them; so workers
    report counts as they go (map_items and map_prepared hand them a Reporter as `progress=`), and
    a driver thread (the driver's own loop waits on whole partitions) logs the totals every
    `every_s` seconds: done out of `total` in `measure` (one of the counts), the other counts, a
    rate and an ETA. Nothing is logged when the stage ends within `every_s`. `partitions_done` is
    kept up to date by the caller (RunContext.partition_done).
    """

    def __init__(self, label: str, total: int, *, every_s: float, measure: str = "samples", partitions: int = 0,
                 partitions_done: int = 0):
        self.label = label
        self.total = int(total)
        self.measure = measure
        self.partitions = partitions
        self.partitions_done = partitions_done
        self.every_s = every_s
        self._actor = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reporter(self) -> Reporter:
        if self._actor is None:
            self._actor = _Counts.remote()
        # a few reports per logged line, and never more than one a second from a worker
        return Reporter(self._actor, min(REPORT_EVERY_S, self.every_s / 4))

    def __enter__(self) -> "Progress":
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a thread still asking the counter logs nothing more
        # Not killed: a worker's last counts may still be on their way. The actor ends by itself
        # once no worker and no driver holds a handle to it.
        self._actor = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            snapshot = self.snapshot()
            if snapshot is not None and not self._stop.is_set():
                log.info("%s", self.line(snapshot))

    def snapshot(self) -> dict | None:
        """The counter's totals (None when it did not answer in time; the next line will tell)."""
        if self._actor is None:
            return None
        try:
            return ray.get(self._actor.snapshot.remote(), timeout=self.every_s / 2)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            return None

    def line(self, snapshot: dict) -> str:
        """`embed: 812/1,890 samples (43%), 2/4 partitions, 31 samples/s, ETA 35s`."""
        counts, first, seconds = snapshot["counts"], snapshot["first"], snapshot["seconds"]
        done = min(int(counts.get(self.measure, 0)), self.total)  # a retried item reports twice
        parts = [f"{_amount(done, self.measure)}/{_amount(self.total, self.measure)} {_unit(self.measure)}"
                 f" ({100 * done / self.total if self.total else 100:.0f}%)"]
        parts += [f"{_amount(v, k)} {_unit(k)}" for k, v in sorted(counts.items()) if k != self.measure]
        if self.partitions:
            parts.append(f"{self.partitions_done}/{self.partitions} partitions")
        rate = (done - first.get(self.measure, 0)) / seconds if seconds > 0 else 0.0
        if not counts:
            parts.append("waiting for the first results")
        elif rate <= 0:
            parts.append("measuring the rate")
        else:
            shown = "samples" if "samples" in counts else self.measure
            per_s = (counts[shown] - first.get(shown, 0)) / seconds
            parts.append(f"{_amount(per_s, shown) if per_s >= 10 else f'{per_s:.1f}'} {_unit(shown)}/s")
            parts.append(f"ETA {_duration((self.total - done) / rate)}")
        return f"{self.label}: " + ", ".join(parts)


def _unit(measure: str) -> str:
    return "MB" if measure == "bytes" else measure


def _amount(value: float, measure: str) -> str:
    if measure == "bytes":
        return f"{value / 1e6:,.1f}"
    return f"{value:,.0f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
