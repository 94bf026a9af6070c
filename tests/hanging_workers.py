"""Workers that hang on the attempts a test asks for, for the tests of the work-item bound.

A module of its own, importing nothing but the standard library: a fresh Ray worker imports only
this (not Ray Data), so it starts well within the tests' bound. Each attempt at an item leaves a
marker file `<name>-<attempt>` in `markers`, so a test counts attempts and a retry knows it is one.
`hangs` is "once" (the first attempt at partition 0 hangs), "always" (every attempt at partition 0
does) or "never".
"""

from __future__ import annotations

import time
from pathlib import Path

HANG_S = 600  # far beyond any bound a test sets: the worker is killed long before


def attempts(markers, name) -> int:
    return len(list(Path(markers).glob(f"{name}-*")))


def _attempt(name: str, partition: int, markers: str, hangs: str) -> int:
    attempt = attempts(markers, name)
    (Path(markers) / f"{name}-{attempt}").touch()
    if partition == 0 and (hangs == "always" or (hangs == "once" and attempt == 0)):
        time.sleep(HANG_S)
    return attempt


def task(item: dict, markers: str, hangs: str) -> dict:
    return {"partition": item["partition"], "attempt": _attempt(str(item["partition"]), item["partition"], markers, hangs)}


class Worker:
    def __init__(self, markers: str, hangs: str):
        self.markers, self.hangs = markers, hangs

    def __call__(self, item: dict) -> dict:
        return task(item, self.markers, self.hangs)


def prepare(item: dict, markers: str, hangs: str) -> dict:
    return {**item, "prepared": _attempt(f"p{item['partition']}", item["partition"], markers, hangs)}


class Model:
    def __init__(self, markers: str, hangs: str):
        self.markers, self.hangs = markers, hangs

    def __call__(self, prepared: dict) -> dict:
        partition = prepared["partition"]
        return {"partition": partition, "prepared": prepared["prepared"],
                "attempt": _attempt(f"m{partition}", partition, self.markers, self.hangs)}
