"""``openai`` backend: embeddings (and, via :mod:`raypipe.llm.generate`, chat) over HTTP.

Works with the OpenAI API, Azure-style gateways and vLLM's OpenAI-compatible server
(``base_url``). Every request goes through the shared limiter and :func:`call_with_retries`;
every result goes to the content-addressed cache first and is never paid for twice.

The API key is read from the environment variable named by ``api_key_env`` and only handed to
the ``openai`` client; it is never logged, stored, or put in an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from raypipe.errors import ConfigError
from raypipe.llm.backends import EmbedOutcome
from raypipe.llm.cache import LLMCache, cache_key
from raypipe.llm.cost import CostMeter, check_failure_share, estimate_tokens
from raypipe.llm.ratelimit import (
    CallFailed,
    FailureBudget,
    LocalLimiter,
    RayLimiter,
    call_with_retries,
    get_limiter,
    redact,
)

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["EMBED_VERSION", "EmbedOutcome", "OpenAIClientBase", "OpenAIEmbedder", "read_api_key"]

log = logging.getLogger(__name__)
T = TypeVar("T")

EMBED_VERSION = "embed-v1"
MAX_INPUTS_PER_REQUEST = 2048  # OpenAI /v1/embeddings
MAX_TOKENS_PER_REQUEST = 300_000  # OpenAI /v1/embeddings


def read_api_key(env_name: str) -> str:
    """Return the key held by environment variable ``env_name`` (never its value in errors)."""
    key = os.environ.get(env_name, "")
    if not key:
        raise ConfigError(
            f"the API key environment variable {env_name} is not set",
            fix=f"export {env_name}=... (or set text_model.api_key_env / llm.api_key_env to "
            "the variable that holds it)",
        )
    return key


class _Loop:
    """A private event loop in a daemon thread (usable from sync code, Ray actors, notebooks)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class OpenAIClientBase:
    """What embedding and chat clients share: key, client, limiter, cache, meter, loop.

    Parameters
    ----------
    backend, model, base_url, api_key_env
        Endpoint and model.
    job
        The job config (``limits``, ``cache``, ``prices``, ``output_dir``).
    limiter, cache, meter
        Inject shared objects (default: built from the job).
    window_s
        Budget window (60 s; smaller in tests and the benchmark to scale time down).
    backoff_base_s, backoff_max_s
        Retry backoff.
    """

    def __init__(
        self,
        *,
        backend: str,
        model: str,
        base_url: str | None,
        api_key_env: str,
        job: JobConfig,
        limiter: LocalLimiter | RayLimiter | None = None,
        cache: LLMCache | None = None,
        meter: CostMeter | None = None,
        window_s: float | None = None,
        backoff_base_s: float | None = None,
        backoff_max_s: float | None = None,
    ) -> None:
        lim = job.limits
        self.backend, self.model_id, self.base_url = backend, model, base_url
        self.api_key_env = api_key_env
        self._key = read_api_key(api_key_env)
        self.limits = lim
        self.window_s = window_s or float(getattr(lim, "window_s", 60.0))
        self.backoff_base_s = backoff_base_s or float(getattr(lim, "backoff_base_s", 0.5))
        self.backoff_max_s = backoff_max_s or float(getattr(lim, "backoff_max_s", 30.0))
        self.limiter = limiter or get_limiter(
            base_url,
            lim.requests_per_minute,
            lim.tokens_per_minute,
            window_s=self.window_s,
            breaker_cooldown_s=float(getattr(lim, "breaker_cooldown_s", 2.0)),
        )
        self.cache = cache or LLMCache(job.cache_dir())
        self.meter = meter or CostMeter()
        self.prices = {k: v.model_dump() for k, v in job.prices.items()}
        self.failures: list[dict[str, Any]] = []
        self.budget = FailureBudget(
            int(getattr(lim, "failure_budget", 12)),
            f"the endpoint {base_url or 'https://api.openai.com/v1'} (model {model!r})",
            on_failure=lambda: self.meter.add_failed_call(model),
        )
        self._loop = _Loop()
        self._client: Any = None
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(model={self.model_id!r}, base_url={self.base_url!r})"

    def _get_client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                api_key=self._key,
                base_url=self.base_url,
                max_retries=0,  # retries are ours (call_with_retries)
                timeout=self.limits.timeout_s,
            )
            self._slots = asyncio.Semaphore(self.limits.max_in_flight)
        return self._client

    async def _call(self, fn: Any, n_tokens: int, max_retries: int | None = None) -> Any:
        self._get_client()
        return await call_with_retries(
            fn,
            limiter=self.limiter,
            n_tokens=n_tokens,
            max_retries=self.limits.max_retries if max_retries is None else max_retries,
            timeout_s=self.limits.timeout_s + 1.0,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            slots=self._slots,
            budget=self.budget,
        )

    def _fatal(self, exc: CallFailed) -> ConfigError:
        return ConfigError(
            f"{self.base_url or 'the OpenAI API'} refused the requests for model "
            f"{self.model_id!r}: {redact(exc.reason, (self._key,))}",
            fix=f"check the key in ${self.api_key_env}, its quota and its access to the model",
        )

    @staticmethod
    async def _gather(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    def usage(self) -> dict[str, dict[str, int]]:
        """Token/call/cache-hit counts per model (see :class:`CostMeter`)."""
        return self.meter.to_dict()

    def close(self) -> None:
        """Flush the cache and stop the client."""
        self.cache.flush()
        if self._client is not None:
            with contextlib.suppress(Exception):  # best effort
                self._loop.run(self._client.close())
            self._client = None
        self._loop.stop()


class OpenAIEmbedder(OpenAIClientBase):
    """Text embeddings through ``/v1/embeddings`` (``text_model.backend: openai``).

    Parameters
    ----------
    job
        The job config (``text_model``, ``limits``, ``cache``, ``prices``).
    **kwargs
        Passed to :class:`OpenAIClientBase` (shared limiter/cache/meter, time scale).
    """

    def __init__(self, job: JobConfig, **kwargs: Any) -> None:
        cfg = job.text_model
        super().__init__(
            backend="openai",
            model=cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            job=job,
            **kwargs,
        )
        self.batch_size = min(cfg.batch_size, MAX_INPUTS_PER_REQUEST)
        self.max_batch_tokens = int(min(MAX_TOKENS_PER_REQUEST, job.limits.tokens_per_minute))
        self.dimensions = cfg.dimensions
        self.max_failure_share = job.limits.max_failure_share
        self._params = {"dimensions": cfg.dimensions} if cfg.dimensions else {}

    def key(self, text: str) -> str:
        """Cache key of embedding ``text`` with this model."""
        return cache_key(self.backend, self.model_id, "embed", EMBED_VERSION, text, self._params)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` → float32 (n, d); failed rows are zero and listed in ``failures``.

        Raises
        ------
        FailureShareExceeded
            When more than ``limits.max_failure_share`` of the texts failed.
        """
        out = self.embed_detailed(texts)
        for i, reason in out.reasons.items():
            self.failures.append(
                {"item": texts[i][:500], "kind": "embed", "model": self.model_id, "reason": reason}
            )
        n_failed = int((~out.ok).sum())
        check_failure_share(n_failed, len(texts), self.max_failure_share, "texts to embed")
        return out.vectors

    def embed_detailed(self, texts: list[str]) -> EmbedOutcome:
        """Embed ``texts``, isolating failures per item (never raises for a single item)."""
        return self._loop.run(self._aembed(list(texts)))

    async def _aembed(self, texts: list[str]) -> EmbedOutcome:
        unique = list(dict.fromkeys(texts))
        keys = {t: self.key(t) for t in unique}
        self.cache.refresh()
        hits = self.cache.get_many(list(keys.values()))
        self.meter.add_hits(self.model_id, len(hits))
        vecs: dict[str, np.ndarray] = {t: hits[k].vec for t, k in keys.items() if k in hits}  # type: ignore[misc]
        errors: dict[str, str] = {}
        todo = [t for t in unique if t not in vecs]
        for t in [t for t in todo if not t.strip()]:
            errors[t] = "empty text (not sent)"
        todo = [t for t in todo if t.strip()]
        if todo:
            await self._gather([self._batch(b, vecs, errors, None) for b in self._batches(todo)])
            self.cache.flush()
        self.meter.add_failures(self.model_id, sum(1 for t in texts if t in errors))
        dim = next((len(v) for v in vecs.values()), self.dimensions or 0)
        mat = np.zeros((len(texts), dim), np.float32)
        ok = np.zeros(len(texts), bool)
        reasons: dict[int, str] = {}
        for i, t in enumerate(texts):
            if t in vecs:
                mat[i], ok[i] = vecs[t], True
            else:
                reasons[i] = errors.get(t, "not embedded")
        return EmbedOutcome(mat, ok, reasons)

    def _batches(self, texts: list[str]) -> list[list[str]]:
        out: list[list[str]] = []
        cur: list[str] = []
        tok = 0
        for t in texts:
            n = estimate_tokens(t)
            if cur and (len(cur) >= self.batch_size or tok + n > self.max_batch_tokens):
                out.append(cur)
                cur, tok = [], 0
            cur.append(t)
            tok += n
        if cur:
            out.append(cur)
        return out

    async def _batch(
        self,
        batch: list[str],
        vecs: dict[str, np.ndarray],
        errors: dict[str, str],
        max_retries: int | None,
    ) -> None:
        client = self._get_client()
        extra: dict[str, Any] = {"dimensions": self.dimensions} if self.dimensions else {}

        async def fn() -> Any:
            resp = await client.embeddings.create(
                model=self.model_id, input=batch, encoding_format="float", **extra
            )
            if len(resp.data) != len(batch):
                raise ValueError("embedding response has the wrong number of rows")
            return resp

        n_tok = sum(estimate_tokens(t) for t in batch)
        try:
            resp = await self._call(fn, n_tok, max_retries)
        except CallFailed as exc:
            if exc.status in (401, 403) or "insufficient_quota" in exc.reason:
                raise self._fatal(exc) from None
            if len(batch) == 1:
                errors[batch[0]] = exc.reason
                return
            # isolate the bad input(s): bisect, with fewer retries below the first level
            half = len(batch) // 2
            retries = 0 if not exc.retryable else 1
            await self._gather(
                [self._batch(b, vecs, errors, retries) for b in (batch[:half], batch[half:])]
            )
            return
        usage = getattr(resp, "usage", None)
        tin = int(getattr(usage, "prompt_tokens", 0) or 0)
        self.meter.add_call(self.model_id, items=len(batch), tokens_in=tin)
        share = tin / len(batch)
        for d in sorted(resp.data, key=lambda d: d.index):
            text = batch[d.index]
            v = np.asarray(d.embedding, np.float32)
            vecs[text] = v
            self.cache.put(
                self.key(text),
                backend=self.backend,
                model=self.model_id,
                kind="embed",
                version=EMBED_VERSION,
                vec=v,
                tokens_in=round(share),
            )
