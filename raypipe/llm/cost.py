"""Token and cost accounting per model, dry-run estimates, and the failure-share rule.

Prices come from the job's ``prices`` table (model id → USD per 1M input/output tokens).
Token counts for estimates use a cheap, deliberately conservative heuristic
(:func:`estimate_tokens`: one token per 3 UTF-8 bytes; real BPE tokenizers average ~4 for
English, ~2.5-3 for gene symbols); billed counts always come from the API's ``usage``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from raypipe.errors import RaypipeError

__all__ = [
    "CostMeter",
    "Estimate",
    "FailureShareExceeded",
    "ModelUsage",
    "check_failure_share",
    "estimate",
    "estimate_tokens",
]


def estimate_tokens(text: str) -> int:
    """Conservative token estimate: ``ceil(utf8_bytes / 3)``, at least 1."""
    return max(1, math.ceil(len(text.encode()) / 3))


def _price(prices: dict[str, Any], model: str) -> tuple[float, float] | None:
    p = prices.get(model)
    if p is None:
        return None
    if isinstance(p, dict):
        return float(p.get("input", 0.0)), float(p.get("output", 0.0))
    return float(p.input), float(p.output)


@dataclass
class ModelUsage:
    """Usage of one model."""

    calls: int = 0
    items: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cache_hits: int = 0
    failures: int = 0
    failed_calls: int = 0


@dataclass
class CostMeter:
    """Accumulates usage per model; mergeable across actors (:meth:`to_dict` / :meth:`merge`)."""

    models: dict[str, ModelUsage] = field(default_factory=dict)

    def _m(self, model: str) -> ModelUsage:
        return self.models.setdefault(model, ModelUsage())

    def add_call(self, model: str, *, items: int, tokens_in: int, tokens_out: int = 0) -> None:
        """Record one paid request."""
        m = self._m(model)
        m.calls += 1
        m.items += items
        m.tokens_in += int(tokens_in)
        m.tokens_out += int(tokens_out)

    def add_failed_call(self, model: str) -> None:
        """Record one request that was sent and failed (an error, a timeout, a bad answer)."""
        self._m(model).failed_calls += 1

    def add_hits(self, model: str, n: int) -> None:
        """Record ``n`` items answered from the cache."""
        self._m(model).cache_hits += n

    def add_failures(self, model: str, n: int) -> None:
        """Record ``n`` items that failed for good."""
        self._m(model).failures += n

    def merge(self, other: CostMeter | dict[str, Any]) -> CostMeter:
        """Add another meter (or its :meth:`to_dict`) into this one; returns self."""
        data = other.to_dict() if isinstance(other, CostMeter) else other
        for model, u in data.items():
            m = self._m(model)
            for k, v in u.items():
                if k in ModelUsage.__dataclass_fields__:
                    setattr(m, k, getattr(m, k) + int(v))
        return self

    def to_dict(self) -> dict[str, dict[str, int]]:
        """Plain dict (for Ray transport and the manifest)."""
        return {k: asdict(v) for k, v in self.models.items()}

    def summary(self, prices: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One row per model with ``cost_usd`` (None when the model has no price)."""
        rows = []
        for model, u in sorted(self.models.items()):
            p = _price(prices or {}, model)
            cost = None if p is None else (u.tokens_in * p[0] + u.tokens_out * p[1]) / 1e6
            rows.append({"model": model, **asdict(u), "cost_usd": cost})
        return rows

    def format(self, prices: dict[str, Any] | None = None) -> str:
        """Human-readable summary lines."""
        lines = []
        for r in self.summary(prices):
            cost = "price unknown" if r["cost_usd"] is None else f"${r['cost_usd']:.4f}"
            lines.append(
                f"{r['model']}: {r['calls']} calls ({r['failed_calls']} more sent and failed), "
                f"{r['items']} items, {r['tokens_in']} tokens "
                f"in, {r['tokens_out']} out, {r['cache_hits']} cache hits, "
                f"{r['failures']} failed, {cost}"
            )
        return "\n".join(lines) or "no LLM calls"


@dataclass(frozen=True)
class Estimate:
    """A dry-run estimate."""

    model: str
    items: int
    calls: int
    tokens_in: int
    tokens_out: int
    cost_usd: float | None
    time_s: float

    def format(self) -> str:
        """One line for ``--dry-run``."""
        cost = "price unknown" if self.cost_usd is None else f"${self.cost_usd:.2f}"
        return (
            f"{self.model}: {self.items} items in {self.calls} calls, ~{self.tokens_in} tokens in"
            f", ~{self.tokens_out} out, ~{cost}, ~{self.time_s / 60:.1f} min at the rate limit"
        )


def estimate(
    texts: list[str],
    *,
    model: str,
    prices: dict[str, Any],
    requests_per_minute: float,
    tokens_per_minute: float,
    items_per_call: int = 1,
    max_tokens_out: int = 0,
    cached: int = 0,
) -> Estimate:
    """Estimate calls, tokens, cost and time for ``texts`` without calling anything.

    Parameters
    ----------
    texts
        The unique inputs (prompts or texts to embed) not yet in the cache.
    model
        Model id (the key of ``prices``).
    prices
        The job's price table.
    requests_per_minute, tokens_per_minute
        The configured budget.
    items_per_call
        Inputs per request (embedding batch size; 1 for chat).
    max_tokens_out
        Output tokens per call (chat ``max_tokens``; an upper bound).
    cached
        Items already answered by the cache (reported, not charged).
    """
    n = len(texts)
    calls = math.ceil(n / max(1, items_per_call))
    tin = sum(estimate_tokens(t) for t in texts)
    tout = max_tokens_out * calls
    p = _price(prices, model)
    cost = None if p is None else (tin * p[0] + tout * p[1]) / 1e6
    minutes = max(calls / requests_per_minute, (tin + tout) / tokens_per_minute)
    return Estimate(model, n + cached, calls, tin, tout, cost, minutes * 60.0)


class FailureShareExceeded(RaypipeError):
    """More items failed than ``limits.max_failure_share`` allows."""


def check_failure_share(n_failed: int, n_total: int, max_share: float, what: str) -> None:
    """Raise :class:`FailureShareExceeded` when ``n_failed / n_total > max_share``.

    Parameters
    ----------
    n_failed, n_total
        Failed and attempted items.
    max_share
        ``limits.max_failure_share``.
    what
        What the items are, e.g. ``"gene descriptions"``.
    """
    if n_total and n_failed / n_total > max_share:
        raise FailureShareExceeded(
            f"{n_failed} of {n_total} {what} failed ({n_failed / n_total:.1%} > "
            f"limits.max_failure_share {max_share:.1%}); see failures.parquet for the reasons",
            fix="check the endpoint and key, then re-run (finished items are cached and "
            "not paid again), or raise limits.max_failure_share",
        )
