"""A lease on a run's output, so that two runs never write into the same output at once.

A run clears and rewrites its stage folders: a second run into the same output (another config, a
second scheduler) would replace files under the first, which would then publish verdicts that are
not its own. So a run first takes OUTPUT/lease.json (its run id, host and pid), renews it while it
runs, and removes it when it ends. A run that finds a fresh lease of another run refuses to start;
a stale one (its process on this host is gone, or it was not renewed within `stale_s`) is taken
over with a warning naming the run it belonged to.

It works on local filesystems and object stores alike: the lease is taken by writing it and reading
it back after a short pause (a local file that does not exist yet is created exclusively), and every
renewal reads it first, so a run whose lease another run took over stops before its next stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from pipeline.config import UserError
from pipeline.io import fs

log = logging.getLogger("curate")
LEASE_NAME = "lease.json"
SETTLE_S = 1.0  # between writing the lease and reading it back: a run that wrote at the same time shows


class OutputInUseError(UserError, RuntimeError):
    """Another run holds a fresh lease on this output."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over by another run while it ran."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@dataclass
class OutputLease:
    output: str
    stale_s: float
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    lost: str | None = None  # why the lease is no longer this run's

    @property
    def url(self) -> str:
        return fs.join(self.output, LEASE_NAME)

    def _record(self) -> dict:
        return {"run_id": self.run_id, "host": self.host, "pid": self.pid, "renewed": time.time(),
                "stale_after_s": self.stale_s}

    def _read(self) -> dict | None:
        try:
            data = json.loads(fs.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except ValueError:  # a lease cut short by a crash mid-write holds no run
            return {}
        return data if isinstance(data, dict) else {}

    def stale_reason(self, held: dict, now: float) -> str | None:
        """Why another run's lease no longer counts, or None while it does."""
        if not held.get("run_id"):
            return "it holds no run id"
        if held.get("host") == self.host and isinstance(held.get("pid"), int) and not _pid_alive(held["pid"]):
            return f"its process {held['pid']} on this host is gone"
        renewed = held.get("renewed")
        limit = held.get("stale_after_s", self.stale_s)
        if not isinstance(renewed, (int, float)) or now - renewed > max(limit, self.stale_s):
            age = "never" if not isinstance(renewed, (int, float)) else f"{now - renewed:.0f} s ago"
            return f"it was last renewed {age}, over the {max(limit, self.stale_s):g} s after which a lease is stale"
        return None

    def acquire(self) -> None:
        held = self._read()
        if held is not None:
            why = self.stale_reason(held, time.time())
            if why is None:
                raise OutputInUseError(_in_use(self.output, held))
            log.warning("output %s: taking over the lease of run %s (host %s, pid %s): %s", self.output,
                        held.get("run_id", "?"), held.get("host", "?"), held.get("pid", "?"), why)
        if held is None and not fs.has_protocol(self.url):
            self._create_local()  # atomic: nothing to read back
            return
        self._write()
        time.sleep(SETTLE_S)
        now = self._read()
        if not now or now.get("run_id") != self.run_id:
            raise OutputInUseError(_in_use(self.output, now or {}) + " (it took the lease at the same moment)")

    def _data(self) -> bytes:
        return (json.dumps(self._record(), indent=1) + "\n").encode()

    def _create_local(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.url)), exist_ok=True)
        try:
            handle = os.open(self.url, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise OutputInUseError(_in_use(self.output, self._read() or {}) + " (it took the lease at the same moment)")
        with os.fdopen(handle, "wb") as out:
            out.write(self._data())

    def _write(self) -> None:
        fs.write_bytes_atomic(self.url, self._data())

    def renew(self) -> None:
        """Renew the lease, or note that it is no longer this run's."""
        if self.lost is not None:
            return
        held = self._read()
        if not held or held.get("run_id") != self.run_id:
            self.lost = ("another run took over its lease: " + _holder(held or {})) if held else "its lease file is gone"
            return
        self._write()

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseLostError(f"output {self.output}: this run stopped, {self.lost}; "
                                 "the output now belongs to that run")

    def release(self) -> None:
        held = self._read()
        if held and held.get("run_id") == self.run_id:
            fsys, path = fs.to_fs(self.url)
            fsys.rm(path)


def _holder(held: dict) -> str:
    renewed = held.get("renewed")
    ago = f", renewed {time.time() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else ""
    return f"run {held.get('run_id', '?')} on host {held.get('host', '?')}, pid {held.get('pid', '?')}{ago}"


def _in_use(output: str, held: dict) -> str:
    return (f"output {output} is in use by {_holder(held)} (its {LEASE_NAME}); two runs must not share an "
            "output: wait for it to end, or choose another output (a lease not renewed for output_lease_s "
            "seconds, or whose process on this host is gone, is taken over)")


@contextlib.contextmanager
def hold_output(output: str, stale_s: float):
    """Hold the output's lease for the duration of the block, renewing it every quarter of `stale_s`."""
    lease = OutputLease(output, stale_s)
    lease.acquire()
    stop = threading.Event()

    def renew_until_stopped():
        while not stop.wait(stale_s / 4):
            try:
                lease.renew()
            except Exception as exc:  # storage briefly unreachable: the next renewal tries again
                log.debug("output lease: renewal failed: %s", exc)

    renewer = threading.Thread(target=renew_until_stopped, name="curate-output-lease", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        if lease.lost is None:
            lease.release()
