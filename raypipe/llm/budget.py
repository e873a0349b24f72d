"""The pure core of the cluster rate limiter: a request/token budget over a sliding window.

See :class:`WindowBudget`; :mod:`raypipe.llm.ratelimit` puts it in a named Ray actor (one per
endpoint) or in-process, and wraps it with the retry loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["WindowBudget"]

log = logging.getLogger("raypipe.llm.ratelimit")


class WindowBudget:
    """Cluster request/token budget: a slot is held from grant until ``completion + window``.

    Pure (no I/O). A request takes a slot when granted (:meth:`reserve`) and gives it back
    (:meth:`release`) when its answer or error came back; the slot then still counts for one
    more window. The limiter grants only while the live slots (in flight, or finished less than
    a window ago) hold fewer than ``requests_per_window`` requests and ``tokens_per_window``
    tokens. Any window ``[t, t + W)`` of arrivals at the server therefore holds at most the
    budget: each request arriving in it was granted before ``t + W`` and finished after ``t``,
    so all of them were live together just before ``t + W``. Unlike booking at grant time, no
    delay between grant and arrival (event-loop starvation, a slow network, a loaded CPU) can
    push two windows' requests into one.

    Parameters
    ----------
    requests_per_window, tokens_per_window
        Budget per window.
    window_s
        Window length (60 = per minute; smaller values scale time down for tests).
    breaker_failures
        Consecutive failures that open the circuit.
    breaker_cooldown_s, breaker_max_cooldown_s
        First and largest open time.
    safety_s
        Extra time a finished slot stays live (margin for clock granularity).
    clock
        Monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        requests_per_window: float,
        tokens_per_window: float,
        window_s: float = 60.0,
        *,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 2.0,
        breaker_max_cooldown_s: float = 60.0,
        safety_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.safety = float(safety_s)
        self.max_req = max(1, int(requests_per_window))
        self.max_tok = float(tokens_per_window)
        self.window = float(window_s)
        self.clock = clock
        self._next_id = 0
        self._inflight: dict[int, tuple[float, float]] = {}  # id -> (tokens, lease deadline)
        self._inflight_tok = 0.0
        self._done: deque[tuple[float, float]] = deque()  # (expiry, tokens), expiry ascending
        self._done_tok = 0.0
        self._paused_until = 0.0
        self.breaker_failures = breaker_failures
        self.cooldown0, self.cooldown_max = breaker_cooldown_s, breaker_max_cooldown_s
        self._cooldown = breaker_cooldown_s
        self._fails = 0
        self._open_until: float | None = None
        self._probe_deadline: float | None = None
        self.granted = 0
        self.paused = 0
        self.leaked = 0

    def _expire(self, now: float) -> None:
        d = self._done
        while d and d[0][0] <= now:
            self._done_tok -= d.popleft()[1]
        stale = [i for i, (_, lease) in self._inflight.items() if lease <= now]
        for i in stale:  # never released (a client died): live one more window after its lease
            n, lease = self._inflight.pop(i)
            self._inflight_tok -= n
            self._add_done(lease + self.window + self.safety, n)
            self.leaked += 1

    def _add_done(self, expiry: float, n: float) -> None:
        d = self._done
        if d and expiry < d[-1][0]:  # only leaked slots can arrive out of order
            items = sorted([*d, (expiry, n)])
            d.clear()
            d.extend(items)
        else:
            d.append((expiry, n))
        self._done_tok += n

    def live(self) -> tuple[int, float]:
        """Live slots and their tokens (in flight, or finished less than a window ago)."""
        self._expire(self.clock())
        return len(self._inflight) + len(self._done), self._inflight_tok + self._done_tok

    def reserve(self, n_tokens: float = 0.0, lease_s: float = 600.0) -> tuple[float, str, int]:
        """Try to take a slot for one request of ``n_tokens`` (estimated) tokens.

        Parameters
        ----------
        n_tokens
            Tokens the request may consume (clamped to the whole budget).
        lease_s
            A slot not released within this time is treated as finished then (a dead client).

        Returns
        -------
        (wait_s, status, slot)
            ``"ok"``: send now, then :meth:`release` ``slot``. ``"wait"``: the budget is full
            or paused; ask again after ``wait_s`` (the earliest moment a slot can free).
            ``"open"``: the circuit is open; try again after ``wait_s`` (counts as a failed
            attempt). ``"probing"``: a half-open probe is in flight; ask again after ``wait_s``.
            ``slot`` is -1 unless ``"ok"``.
        """
        now = self.clock()
        probe = False
        if self._open_until is not None:
            if now < self._open_until:
                return self._open_until - now, "open", -1
            if self._probe_deadline is not None and now < self._probe_deadline:
                return min(0.2, self._probe_deadline - now), "probing", -1
            probe = True
        if now < self._paused_until:
            return self._paused_until - now, "wait", -1
        self._expire(now)
        n = min(float(n_tokens), self.max_tok)
        count = len(self._inflight) + len(self._done)
        tokens = self._inflight_tok + self._done_tok
        if count >= self.max_req or tokens + n > self.max_tok + 1e-9:
            # a slot in flight that finishes now frees at now + W; finished ones at their expiry
            due = [now + self.window + self.safety]
            due += [lease + self.window for _, lease in self._inflight.values()]
            if self._done:
                due.append(self._done[0][0])
            return max(1e-3, min(due) - now), "wait", -1
        if probe:  # half-open: let exactly one probe through
            self._probe_deadline = now + max(self.cooldown0, 5.0)
        slot = self._next_id
        self._next_id += 1
        self._inflight[slot] = (n, now + float(lease_s))
        self._inflight_tok += n
        self.granted += 1
        return 0.0, "ok", slot

    def release(self, slot: int, ok: bool | None = None) -> None:
        """Mark the request of ``slot`` finished: its slot stays live one more window.

        ``ok`` (True/False), when given, also feeds the circuit breaker (:meth:`report`).
        """
        got = self._inflight.pop(slot, None)
        if got is not None:
            self._inflight_tok -= got[0]
            self._add_done(self.clock() + self.window + self.safety, got[0])
        if ok is not None:
            self.report(ok)

    def pause(self, seconds: float) -> None:
        """Stop granting for ``seconds`` (a server's ``Retry-After``)."""
        self._paused_until = max(self._paused_until, self.clock() + float(seconds))
        self.paused += 1

    def report(self, ok: bool) -> None:
        """Feed the circuit breaker with a request outcome."""
        if ok:
            self._fails, self._open_until, self._probe_deadline = 0, None, None
            self._cooldown = self.cooldown0
            return
        self._fails += 1
        half_open = self._probe_deadline is not None
        if half_open or self._fails >= self.breaker_failures:
            if half_open:
                self._cooldown = min(self._cooldown * 2, self.cooldown_max)
            self._open_until = self.clock() + self._cooldown
            self._probe_deadline = None
            log.warning("LLM endpoint failing: circuit open for %.1fs", self._cooldown)

    def state(self) -> dict[str, Any]:
        """Counters for logs and tests."""
        now = self.clock()
        is_open = self._open_until is not None and now < self._open_until
        live, live_tok = self.live()
        return {
            "granted": self.granted,
            "paused": self.paused,
            "leaked": self.leaked,
            "in_flight": len(self._inflight),
            "live": live,
            "live_tokens": live_tok,
            "circuit": "open" if is_open else ("half-open" if self._open_until else "closed"),
            "consecutive_failures": self._fails,
        }
