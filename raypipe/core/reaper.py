"""A watcher that kills an embedded Ray's processes when the driver that started them dies.

Ray's helper processes (raylet, GCS, ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, idle
workers) are re-parented to PID 1 when the driver is killed with SIGKILL and linger for
minutes. :func:`start_reaper` starts this module as a small separate process (its own
session, standard library only) that, while the driver lives, notes the driver's Ray
descendants (PID and start time, read from ``/proc``) every half second; once the driver's
PID is gone it sends SIGTERM to every noted process (and their descendants) that still has
the same start time, then SIGKILL after a grace second, and exits. Linux only (``/proc``);
elsewhere it is not started.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ray_descendants", "start_reaper"]

_RAY_CMD = re.compile(r"(^ray::|/ray/|raylet|gcs_server)")
_POLL_S = 0.5


def _stat(pid: int) -> tuple[int, int] | None:
    """Return (parent PID, start time in clock ticks) of ``pid``, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                out.setdefault(st[0], []).append(int(entry.name))
    return out


def _descendants(roots: list[int]) -> list[int]:
    children = _children()
    seen: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def ray_descendants(pid: int) -> dict[int, int]:
    """Return the Ray processes below ``pid``: PID → start time (``/proc`` clock ticks)."""
    out = {}
    for child in _descendants([pid]):
        st = _stat(child)
        if st is not None and child != os.getpid() and _RAY_CMD.search(_cmdline(child)):
            out[child] = st[1]
    return out


def _same(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == started


def _reap(noted: dict[int, int]) -> None:
    alive = {p: s for p, s in noted.items() if _same(p, s)}
    for child in _descendants(list(alive)):  # what they started after the last look
        st = _stat(child)
        if st is not None:
            alive.setdefault(child, st[1])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p, s in alive.items():
            if _same(p, s):
                with contextlib.suppress(OSError):
                    os.kill(p, sig)
        time.sleep(1.0)


def _watch(driver: int) -> None:
    started = _stat(driver)
    noted: dict[int, int] = {}
    while started is not None and _same(driver, started[1]):
        noted.update(ray_descendants(driver))
        time.sleep(_POLL_S)
    _reap(noted)


def start_reaper() -> subprocess.Popen[bytes] | None:
    """Start the watcher for this process's embedded Ray (None where ``/proc`` is absent)."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-I", __file__, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the driver's process group: a Ctrl-C does not stop it
        close_fds=True,
    )


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
