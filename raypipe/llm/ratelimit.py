"""One rate limiter for the whole cluster, a circuit breaker, and the one retry helper.

Design
------
* :class:`WindowBudget` is the pure core. A request holds a budget slot from the moment it is
  granted until one window after its answer (or error) came back: the limiter grants only while
  fewer than ``requests_per_window`` slots (and ``tokens_per_window`` tokens) are live, so every
  window of arrivals at the server holds at most the budget, however late requests are sent or
  answered. ``pause(s)`` (from a ``Retry-After``) stops the whole budget; ``report(ok)``
  drives a circuit breaker (``breaker_failures`` consecutive failures open it for a cooldown
  that doubles up to ``breaker_max_cooldown_s``; then one probe is let through, half-open, and
  its outcome closes or re-opens it).
* :func:`get_limiter` returns a :class:`RayLimiter` (a named Ray actor, ``get_if_exists=True``,
  one per endpoint, shared by every actor of the cluster) when Ray is initialised, else a
  :class:`LocalLimiter` (in-process). Both expose ``async acquire(n_tokens) -> slot``,
  ``release(slot, ok)``, ``pause(s)`` and ``report(ok)``; clients bound their own in-flight
  requests with a semaphore.
* :func:`call_with_retries` is the only retry loop: exponential backoff with full jitter on
  429 (honouring ``Retry-After``), 5xx, timeouts, connection errors and malformed responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from raypipe.errors import RaypipeError
from raypipe.llm.budget import WindowBudget

__all__ = [
    "CallFailed",
    "CircuitOpen",
    "EndpointFailing",
    "FailureBudget",
    "LocalLimiter",
    "RayLimiter",
    "Retryable",
    "WindowBudget",
    "call_with_retries",
    "classify_error",
    "get_limiter",
    "limiter_name",
    "redact",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class CircuitOpen(Exception):
    """The endpoint is considered down; the attempt was not sent."""


class CallFailed(Exception):
    """A call failed for good (retries exhausted or a non-retryable answer).

    Attributes
    ----------
    reason
        A short, key-free description (e.g. ``"HTTP 500 after 7 attempts"``).
    retryable
        Whether the last error was of a transient kind.
    status
        The HTTP status of the last error, when there was one.
    """

    def __init__(self, reason: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retryable, self.status = reason, retryable, status


class EndpointFailing(RaypipeError):
    """An endpoint failed more requests in a row than ``limits.failure_budget``: stop the step."""


@dataclass
class FailureBudget:
    """Failed requests in a row one client tolerates before its step stops (no silent hangs).

    The circuit breaker spaces out requests to a failing endpoint; this budget ends the
    wait: after ``limit`` failed requests with no success between, :meth:`failed` raises
    :class:`EndpointFailing` with the endpoint and its last error.

    Attributes
    ----------
    limit
        ``limits.failure_budget``.
    endpoint
        What the requests go to (named in the error).
    on_failure
        Called once per failed request (e.g. to count it in the usage line).
    """

    limit: int
    endpoint: str
    on_failure: Callable[[], None] | None = None
    in_row: int = 0
    sent: int = 0
    failed_total: int = 0
    last: str = ""

    def ok(self) -> None:
        """Count a request that succeeded."""
        self.sent += 1
        self.in_row = 0

    def failed(self, reason: str, *, endpoint_down: bool = True) -> None:
        """Count a failed request; raise :class:`EndpointFailing` once the budget is spent.

        Only failures that say the endpoint is down (5xx, timeouts, connection errors,
        malformed answers) spend the budget; an answer refusing one input (a 4xx) or a rate
        limit (429) shows the endpoint is up: it is counted, and ends the run of failures.
        """
        self.sent += 1
        self.failed_total += 1
        self.in_row = self.in_row + 1 if endpoint_down else 0
        self.last = reason
        if self.on_failure is not None:
            self.on_failure()
        if self.in_row >= self.limit:
            raise EndpointFailing(
                f"{self.endpoint} failed {self.in_row} requests in a row ({self.failed_total} "
                f"of {self.sent} sent by this client failed); last error: {reason}",
                fix="check that the endpoint is up and serves the model; finished items are "
                "cached, so a re-run pays only for the rest (limits.failure_budget sets how "
                "many failures in a row stop the step)",
            )


@dataclass(frozen=True)
class Retryable:
    """How :func:`call_with_retries` treats an exception."""

    retry: bool
    reason: str
    retry_after_s: float | None = None
    status: int | None = None
    fatal: bool = False  # e.g. a rejected key: stop the whole run, not just the item


_SECRET = re.compile(r"(sk-[A-Za-z0-9_\-]{4,}|Bearer\s+\S+)")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys (given ones and anything key-shaped) from ``text``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return _SECRET.sub("***", text)


class _Gate:
    """One waiter per event loop asks the limiter at a time (the others queue locally).

    Keeps a full budget from being polled by every coroutine of every actor: a process sends
    at most one pending ask, and sleeps exactly until the earliest moment a slot can free.
    """

    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._guard = threading.Lock()

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._guard:
            lk = self._locks.get(id(loop))
            if lk is None or getattr(lk, "_raypipe_loop", None) is not loop:
                lk = asyncio.Lock()
                lk._raypipe_loop = loop  # type: ignore[attr-defined]
                self._locks[id(loop)] = lk
            return lk


async def _acquire(ask: Callable[[], Awaitable[tuple[float, str, int]]], gate: _Gate) -> int:
    async with gate.lock():
        while True:
            wait, status, slot = await ask()
            if status == "ok":
                return slot
            await asyncio.sleep(wait)
            if status == "open":
                raise CircuitOpen(f"endpoint down (circuit open, waited {wait:.1f}s)")


class LocalLimiter:
    """In-process limiter (single process, unit tests)."""

    def __init__(self, budget: WindowBudget) -> None:
        self.budget = budget
        self._lock = threading.Lock()  # clients may run event loops in several threads
        self._gate = _Gate()

    async def acquire(self, n_tokens: float = 0.0, lease_s: float = 600.0) -> int:
        """Wait for a slot and return its id; raise :class:`CircuitOpen` when the circuit is open."""

        async def ask() -> tuple[float, str, int]:
            with self._lock:
                return self.budget.reserve(n_tokens, lease_s)

        return await _acquire(ask, self._gate)

    def release(self, slot: int, ok: bool | None = None) -> None:
        """Give back ``slot`` (its request finished); ``ok`` feeds the breaker."""
        with self._lock:
            self.budget.release(slot, ok)

    def pause(self, seconds: float) -> None:
        """Pause the whole budget."""
        with self._lock:
            self.budget.pause(seconds)

    def report(self, ok: bool) -> None:
        """Feed the circuit breaker."""
        with self._lock:
            self.budget.report(ok)

    def state(self) -> dict[str, Any]:
        """Budget counters."""
        with self._lock:
            return self.budget.state()


class RayLimiter:
    """Client of the cluster-wide limiter actor (same API as :class:`LocalLimiter`)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._gate = _Gate()

    async def acquire(self, n_tokens: float = 0.0, lease_s: float = 600.0) -> int:
        """Wait for a slot and return its id; raise :class:`CircuitOpen` when the circuit is open."""

        async def ask() -> tuple[float, str, int]:
            return await self.handle.reserve.remote(n_tokens, lease_s)  # type: ignore[no-any-return]

        return await _acquire(ask, self._gate)

    def release(self, slot: int, ok: bool | None = None) -> None:
        """Give back ``slot`` (fire and forget: the actor sees it late, which is conservative)."""
        self.handle.release.remote(slot, ok)

    def pause(self, seconds: float) -> None:
        """Pause the whole budget (fire and forget)."""
        self.handle.pause.remote(seconds)

    def report(self, ok: bool) -> None:
        """Feed the circuit breaker (fire and forget)."""
        self.handle.report.remote(ok)

    def state(self) -> dict[str, Any]:
        """Budget counters."""
        import ray

        return ray.get(self.handle.state.remote())  # type: ignore[no-any-return]


def limiter_name(base_url: str | None) -> str:
    """Actor name of the limiter for an endpoint (one budget per endpoint)."""
    digest = hashlib.sha256((base_url or "default").encode()).hexdigest()[:12]
    return f"raypipe-llm-limiter-{digest}"


_LOCAL: dict[tuple[str, float, float, float], LocalLimiter] = {}


def get_limiter(
    base_url: str | None,
    requests_per_minute: float,
    tokens_per_minute: float,
    *,
    window_s: float = 60.0,
    use_ray: bool | None = None,
    detached: bool = False,
    namespace: str = "raypipe",
    **breaker: Any,
) -> LocalLimiter | RayLimiter:
    """Return the limiter for ``base_url``.

    Parameters
    ----------
    base_url
        Endpoint; every client of the same endpoint shares one budget.
    requests_per_minute, tokens_per_minute
        Budgets per ``window_s`` (per minute unless time is scaled).
    window_s
        Window length in seconds.
    use_ray
        ``None``: a named Ray actor when Ray is initialised, else in-process.
    detached
        Keep the actor alive after the job (to share one budget across jobs).
    namespace
        Ray namespace of the named actor.
    **breaker
        ``breaker_failures``, ``breaker_cooldown_s``, ``breaker_max_cooldown_s``, ``safety_s``
        (extra time a finished slot stays live, default max(0.05 s, 0.5% of the window)).
    """
    scale = window_s / 60.0 if window_s != 60.0 else 1.0
    rpw, tpw = requests_per_minute * scale, tokens_per_minute * scale
    breaker.setdefault("safety_s", max(0.05, 0.005 * window_s))
    if use_ray is None:
        try:
            import ray

            use_ray = ray.is_initialized()
        except ImportError:  # pragma: no cover
            use_ray = False
    if not use_ray:
        key = (limiter_name(base_url), rpw, tpw, window_s)
        if key not in _LOCAL:
            _LOCAL[key] = LocalLimiter(WindowBudget(rpw, tpw, window_s, **breaker))
        return _LOCAL[key]
    import ray

    actor = ray.remote(WindowBudget).options(
        name=limiter_name(base_url),
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        num_cpus=0,
        max_concurrency=1,
    )
    return RayLimiter(actor.remote(rpw, tpw, window_s, **breaker))


def _header(exc: Any, name: str) -> str | None:
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None)
    if headers is None:
        return None
    try:
        return headers.get(name)  # type: ignore[no-any-return]
    except Exception:  # pragma: no cover
        return None


def classify_error(exc: BaseException) -> Retryable:
    """Classify an exception from the OpenAI client (or asyncio/httpx) for retrying."""
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError) or name == "APITimeoutError":
        return Retryable(True, "timeout")
    if name == "APIConnectionError" or isinstance(exc, ConnectionError):
        return Retryable(True, "connection error")
    if isinstance(status, int):
        if status == 429:
            body = str(getattr(exc, "body", "") or "")
            if "insufficient_quota" in body:
                return Retryable(False, "HTTP 429 insufficient_quota", status=429, fatal=True)
            ms, sec = _header(exc, "retry-after-ms"), _header(exc, "retry-after")
            after = None
            try:
                after = float(ms) / 1000 if ms else (float(sec) if sec else None)
            except ValueError:
                after = None
            return Retryable(True, "HTTP 429 rate limited", retry_after_s=after, status=429)
        if status in (401, 403):
            return Retryable(False, f"HTTP {status} key rejected", status=status, fatal=True)
        if status >= 500 or status in (408, 409):
            return Retryable(True, f"HTTP {status}", status=status)
        return Retryable(False, f"HTTP {status}", status=status)
    if isinstance(exc, ValueError) or name in ("APIResponseValidationError", "JSONDecodeError"):
        return Retryable(True, "malformed response")
    return Retryable(False, f"{name}")


async def _attempt(
    fn: Callable[[], Awaitable[T]],
    limiter: LocalLimiter | RayLimiter,
    n_tokens: float,
    timeout_s: float,
    slots: asyncio.Semaphore | None,
) -> T:
    async with slots if slots is not None else contextlib.nullcontext():
        # a slot is live from grant until the answer (or error) is back, plus one window
        slot = await limiter.acquire(n_tokens, lease_s=2 * timeout_s + 60.0)
        try:
            result = await asyncio.wait_for(fn(), timeout_s)
        except BaseException:
            limiter.release(slot)
            raise
        limiter.release(slot, True)
        return result


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    *,
    limiter: LocalLimiter | RayLimiter,
    n_tokens: float = 0.0,
    max_retries: int = 6,
    timeout_s: float = 60.0,
    backoff_base_s: float = 0.5,
    backoff_max_s: float = 30.0,
    classify: Callable[[BaseException], Retryable] = classify_error,
    rng: random.Random | None = None,
    slots: asyncio.Semaphore | None = None,
    budget: FailureBudget | None = None,
) -> T:
    """Run ``fn`` under the limiter, retrying transient failures.

    Each attempt first acquires a slot (``n_tokens`` estimated tokens), then runs ``fn`` with a
    timeout. Transient errors back off ``uniform(0, min(max, base·2^attempt))`` (full jitter);
    a ``Retry-After`` pauses the whole shared budget. A closed-circuit wait counts as an
    attempt, so a dead endpoint fails items after ``max_retries`` cooldowns instead of hanging.

    ``slots`` (the client's in-flight bound) is held from the limiter grant to the answer and
    released during backoff, so a granted request is sent at once, never queued behind others.
    ``budget`` counts every request sent; once it is spent it raises
    :class:`EndpointFailing` (the whole step stops, naming the endpoint and the last error).

    Raises
    ------
    CallFailed
        After ``max_retries`` retries, or at once for non-retryable errors (4xx); the reason
        never contains the API key. ``fatal`` errors (a rejected key, no quota) are raised as
        :class:`CallFailed` with ``status`` set, for the caller to stop the whole run.
    """
    rng = rng or random.Random()
    last: Retryable | None = None
    for attempt in range(max_retries + 1):
        try:
            result = await _attempt(fn, limiter, n_tokens, timeout_s, slots)
        except CircuitOpen as exc:
            last = Retryable(True, str(exc))
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            info = classify(exc)
            last = info
            if budget is not None:
                budget.failed(redact(info.reason), endpoint_down=info.retry and info.status != 429)
            if info.retry and info.status != 429:
                limiter.report(False)  # the endpoint may be down: feed the breaker
            elif not info.retry and not info.fatal and info.status is not None:
                limiter.report(True)  # a 4xx for this input: the endpoint is up
            if not info.retry:
                raise CallFailed(redact(info.reason), retryable=False, status=info.status) from None
            if info.retry_after_s is not None:
                limiter.pause(info.retry_after_s)
            if attempt < max_retries:
                delay = rng.uniform(0, min(backoff_max_s, backoff_base_s * 2**attempt))
                if info.retry_after_s is not None:
                    delay = max(delay, info.retry_after_s)
                await asyncio.sleep(delay)
            continue
        if budget is not None:
            budget.ok()
        return result
    reason = last.reason if last else "no attempt"
    raise CallFailed(
        redact(f"{reason} after {max_retries + 1} attempts"),
        retryable=True,
        status=last.status if last else None,
    )
