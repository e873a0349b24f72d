"""Text generation backends (``llm.backend``): OpenAI-compatible chat and in-cluster vLLM.

A generator is built as ``cls(job)`` from the job's ``llm`` section and offers
``generate(prompts, *, version, validate=None) -> list[GenResult]``: one result per prompt, in
order, with the answer or the reason it failed. Answers are cached by
``(backend, model, "chat", version, prompt, max_tokens, temperature)``; answers rejected by
``validate`` are not cached (a re-run asks again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from raypipe.registry import Capabilities, Registry

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["GENERATORS", "GenResult", "Generator", "OpenAIChat", "build_generator"]

Validator = Callable[[str], "str | None"]  # answer -> None if valid, else the reason


@dataclass(frozen=True)
class GenResult:
    """One generated answer (``text``) or its failure (``error``)."""

    text: str | None
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cached: bool = False


class Generator(Protocol):
    """What every generation backend offers."""

    model_id: str
    backend: str

    def generate(
        self, prompts: list[str], *, version: str, validate: Validator | None = None
    ) -> list[GenResult]:
        """Answer every prompt; failures are results, not exceptions."""
        ...

    def usage(self) -> dict[str, dict[str, int]]:
        """Return calls, tokens and cache hits per model so far."""
        ...

    def close(self) -> None:
        """Release clients/actors."""
        ...


GENERATORS: Registry[type] = Registry("llm backend")
GENERATORS.add("openai", "raypipe.llm.generate:OpenAIChat", Capabilities(paid=True, remote=True))
GENERATORS.add(
    "vllm", "raypipe.llm.vllm_backend:VLLMGenerator", Capabilities(remote=True, gpu=True)
)


def build_generator(job: JobConfig, **kwargs: Any) -> Generator:
    """Build the generation backend the job's ``llm.backend`` names."""
    return GENERATORS.get(job.llm.backend)(job, **kwargs)  # type: ignore[no-any-return]


def chat_params(job: JobConfig) -> dict[str, Any]:
    """Parameters that change a chat answer (part of the cache key)."""
    return {"max_tokens": job.llm.max_tokens, "temperature": job.llm.temperature}


class OpenAIChat:
    """Chat completions through an OpenAI-compatible ``/v1/chat/completions``.

    Parameters
    ----------
    job
        The job config (``llm``, ``limits``, ``cache``, ``prices``).
    **kwargs
        Passed to :class:`raypipe.llm.openai_backend.OpenAIClientBase`.
    """

    def __init__(self, job: JobConfig, **kwargs: Any) -> None:
        from raypipe.llm.openai_backend import OpenAIClientBase

        cfg = job.llm
        self._base = OpenAIClientBase(
            backend="openai",
            model=cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            job=job,
            **kwargs,
        )
        self.backend, self.model_id = "openai", cfg.model
        self.max_tokens, self.temperature = cfg.max_tokens, cfg.temperature
        self.params = chat_params(job)

    @property
    def meter(self) -> Any:
        """The :class:`~raypipe.llm.cost.CostMeter` of this client."""
        return self._base.meter

    @property
    def cache(self) -> Any:
        """The :class:`~raypipe.llm.cache.LLMCache` of this client."""
        return self._base.cache

    def key(self, prompt: str, version: str) -> str:
        """Cache key of one prompt."""
        from raypipe.llm.cache import cache_key

        return cache_key(self.backend, self.model_id, "chat", version, prompt, self.params)

    def generate(
        self, prompts: list[str], *, version: str, validate: Validator | None = None
    ) -> list[GenResult]:
        """Answer every prompt (deduplicated, cached, rate-limited, failures isolated)."""
        return self._base._loop.run(self._agenerate(list(prompts), version, validate))

    async def _agenerate(
        self, prompts: list[str], version: str, validate: Validator | None
    ) -> list[GenResult]:
        base = self._base
        unique = list(dict.fromkeys(prompts))
        keys = {p: self.key(p, version) for p in unique}
        base.cache.refresh()
        hits = base.cache.get_many(list(keys.values()))
        base.meter.add_hits(self.model_id, len(hits))
        done: dict[str, GenResult] = {}
        for p, k in keys.items():
            if k in hits:
                h = hits[k]
                bad = validate(h.text or "") if validate else None
                err = f"invalid answer: {bad}" if bad else None
                done[p] = GenResult(h.text, err, h.tokens_in, h.tokens_out, True)
        todo = [p for p in unique if p not in done]
        await base._gather([self._one(p, version, validate, done) for p in todo])
        base.cache.flush()
        failed = sum(1 for p in prompts if done[p].error)
        base.meter.add_failures(self.model_id, failed)
        return [done[p] for p in prompts]

    async def _one(
        self, prompt: str, version: str, validate: Validator | None, done: dict[str, GenResult]
    ) -> None:
        from raypipe.llm.cost import estimate_tokens
        from raypipe.llm.ratelimit import CallFailed

        base = self._base
        client = base._get_client()

        async def fn() -> Any:
            resp = await client.chat.completions.create(
                model=self.model_id,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=self.max_tokens,
                temperature=self.temperature,
            )
            if not resp.choices:
                raise ValueError("chat response has no choices")
            return resp

        try:
            resp = await base._call(fn, estimate_tokens(prompt) + self.max_tokens)
        except CallFailed as exc:
            if exc.status in (401, 403) or "insufficient_quota" in exc.reason:
                raise base._fatal(exc) from None
            done[prompt] = GenResult(None, exc.reason)
            return
        text = (resp.choices[0].message.content or "").strip()
        usage = getattr(resp, "usage", None)
        tin = int(getattr(usage, "prompt_tokens", 0) or 0)
        tout = int(getattr(usage, "completion_tokens", 0) or 0)
        base.meter.add_call(self.model_id, items=1, tokens_in=tin, tokens_out=tout)
        reason = validate(text) if validate else None
        if reason:
            done[prompt] = GenResult(text, f"invalid answer: {reason}", tin, tout)
            return
        base.cache.put(
            self.key(prompt, version),
            backend=self.backend,
            model=self.model_id,
            kind="chat",
            version=version,
            text=text,
            tokens_in=tin,
            tokens_out=tout,
        )
        done[prompt] = GenResult(text, None, tin, tout, False)

    def usage(self) -> dict[str, dict[str, int]]:
        """Token/call/cache-hit counts per model."""
        return self._base.usage()

    def close(self) -> None:
        """Flush the cache and stop the client."""
        self._base.close()
