"""A run that makes no progress says what it is waiting for.

The runner starts one :class:`Watchdog` per run; stages and the kit report what they are
doing (:func:`activity`) and when something finished (:func:`progress`). When nothing
finished and no new step began for ``stall_s`` seconds, the watchdog prints (once per
``stall_s``) what the run waits for and for how long, e.g. ``genept_w: 3 of 13 shards still
running on Ray actors (waiting on Ray workers and storage)``. It never stops the run: the
bounded waits (storage and LLM timeouts, retries, the failure budget) end a stuck request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Watchdog", "activity", "progress"]

log = logging.getLogger(__name__)

_CURRENT: list[Watchdog] = []


class Watchdog:
    """Watches one run's progress from a daemon thread.

    Parameters
    ----------
    stall_s
        Seconds without progress before it speaks (``watchdog.stall_s``).
    say
        Where the message goes (default: a raypipe warning on the terminal).
    """

    def __init__(self, stall_s: float, say: Callable[[str], None] | None = None) -> None:
        self.stall_s = stall_s
        self.say = say or log.warning
        self.what = "starting"
        self.since = time.monotonic()
        self.said = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raypipe-watchdog", daemon=True)

    def activity(self, what: str) -> None:
        """Say that the run now does ``what`` (counts as progress)."""
        with self._lock:
            self.what, self.since, self.said = what, time.monotonic(), 0

    def progress(self, what: str | None = None) -> None:
        """Something finished (a shard, a batch); ``what`` updates the description."""
        self.activity(what or self.what)

    def stalled(self) -> str | None:
        """Return the message to print now, or None (at most once per ``stall_s``)."""
        with self._lock:
            idle = time.monotonic() - self.since
            if idle < self.stall_s * (self.said + 1):
                return None
            self.said += 1
            return (
                f"no progress for {idle:.1f} s: waiting for {self.what} "
                f"(watchdog.stall_s = {self.stall_s:g} s)"
            )

    def _watch(self) -> None:
        tick = min(5.0, self.stall_s / 4)
        while not self._stop.wait(tick):
            msg = self.stalled()
            if msg:
                self.say(msg)

    def __enter__(self) -> Watchdog:
        _CURRENT.append(self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self in _CURRENT:
            _CURRENT.remove(self)


def activity(what: str) -> None:
    """Tell the run's watchdog (if any) what the run now does."""
    for w in _CURRENT:
        w.activity(what)


def progress(what: str | None = None) -> None:
    """Tell the run's watchdog (if any) that something finished."""
    for w in _CURRENT:
        w.progress(what)
