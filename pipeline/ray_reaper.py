"""Stop what an embedded Ray leaves behind when its driver is killed.

A driver that started Ray itself (`ray.init()` with no cluster) takes Ray's head processes with it
when it dies, even by SIGKILL, but not the raylet's agents (ray::DashboardAgent and
ray::RuntimeEnvAgent): they live on, holding ports and memory, after every killed run. So the
driver starts this small watcher beside Ray. The watcher holds the read end of a pipe whose write
end only the driver has; when the driver ends, however it ends, the read returns, and the watcher
kills the processes that name the driver's raylet as theirs (RAY_RAYLET_PID in their environment):
exactly that Ray's, never another's on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def start_watcher(raylet_pid: int) -> None:
    """Start the watcher for the embedded Ray whose raylet is `raylet_pid` (Linux: it reads /proc)."""
    if not Path("/proc").is_dir():
        return
    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-m", "pipeline.ray_reaper", str(raylet_pid)], stdin=read_end,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                     close_fds=True)
    os.close(read_end)
    # The write end stays open, unused, until this process exits: its closing is the signal.


def processes_of(raylet_pid: int) -> list[int]:
    """The processes whose environment names `raylet_pid` as their raylet."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def main(raylet_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver is not for the watcher
    sys.stdin.buffer.read()  # returns when the driver, the only writer, has exited
    for pid in processes_of(raylet_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
