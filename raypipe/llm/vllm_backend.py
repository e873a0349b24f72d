"""``vllm`` backend: vLLM inside Ray actors on GPUs, for embedding and for generation.

Why our own actors rather than ``ray.data.llm`` processors: the LLM calls here are lookups
made from inside other stages (20k gene descriptions, deduplicated cell sentences), and they
must go through the same content-addressed cache, deduplication, failure isolation and cost
accounting as the ``openai`` backend, so that switching ``text_model.backend`` changes where
the model runs and nothing else. A ``ray.data.llm`` processor is a Dataset → Dataset transform
that would have to be rebuilt around every set of cache misses, and ties the pipeline to the
processor API of a given Ray/vLLM pairing. A plain actor holding ``vllm.LLM`` (``num_gpus``
from the config, ``import vllm`` only inside the actor) is ~50 lines and version-tolerant. For
a vLLM *server* (``vllm serve``), use the ``openai`` backend with ``base_url``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.errors import ConfigError
from raypipe.llm.backends import EmbedderBase
from raypipe.llm.cache import LLMCache, cache_key
from raypipe.llm.cost import CostMeter

if TYPE_CHECKING:
    from raypipe.config import JobConfig
    from raypipe.llm.generate import GenResult, Validator

__all__ = ["VLLMEmbedder", "VLLMGenerator", "vllm_worker"]

EMBED_VERSION = "embed-v1"


class vllm_worker:
    """The actor body: one ``vllm.LLM`` per GPU actor.

    Parameters
    ----------
    model
        Hub id or local directory.
    task
        ``"embed"`` (pooling) or ``"generate"``.
    engine_kwargs
        Extra ``vllm.LLM`` arguments (e.g. ``max_model_len``, ``gpu_memory_utilization``).
    """

    def __init__(self, model: str, task: str, engine_kwargs: dict[str, Any] | None = None):
        import vllm

        kw = dict(engine_kwargs or {})
        try:  # vLLM >= 0.10 names the pooling runner; older versions take task=
            self.llm = vllm.LLM(
                model=model, runner="pooling" if task == "embed" else "generate", **kw
            )
        except TypeError:
            self.llm = vllm.LLM(model=model, task=task, **kw)
        self.task = task

    def embed(self, texts: list[str]) -> list[np.ndarray]:
        """Embed ``texts`` (one float32 vector each)."""
        outs = self.llm.embed(texts, use_tqdm=False)
        return [np.asarray(o.outputs.embedding, np.float32) for o in outs]

    def generate(self, prompts: list[str], max_tokens: int, temperature: float) -> list[dict]:
        """Answer chat prompts (the model's chat template applied when it has one)."""
        import vllm

        tok = self.llm.get_tokenizer()
        texts = prompts
        if getattr(tok, "chat_template", None):
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        sp = vllm.SamplingParams(max_tokens=max_tokens, temperature=temperature)
        outs = self.llm.generate(texts, sp, use_tqdm=False)
        return [
            {
                "text": o.outputs[0].text,
                "tokens_in": len(o.prompt_token_ids or []),
                "tokens_out": len(o.outputs[0].token_ids),
            }
            for o in outs
        ]


def _actors(model: str, task: str, num_gpus: float, n: int) -> list[Any]:
    import ray

    if not ray.is_initialized():
        raise ConfigError(
            "the vllm backend runs in Ray actors, but Ray is not initialised",
            fix="run through `raypipe run` (which starts Ray) or call ray.init() first",
        )
    cls = ray.remote(num_gpus=num_gpus, num_cpus=1)(vllm_worker)
    return [cls.remote(model, task) for _ in range(n)]


def _split(items: list[Any], n: int) -> list[list[Any]]:
    k = max(1, -(-len(items) // n))
    return [items[i : i + k] for i in range(0, len(items), k)]


class VLLMEmbedder(EmbedderBase):
    """Embeddings from vLLM actors (``text_model.backend: vllm``), cached like ``openai``."""

    def __init__(self, job: JobConfig, *, actors: int | None = None) -> None:
        super().__init__()
        cfg = job.text_model
        self.backend, self.model_id = "vllm", cfg.model
        self.cache = LLMCache(job.cache_dir())
        self.meter = CostMeter()
        self._workers = _actors(cfg.model, "embed", cfg.num_gpus, actors or job.limits.actors)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` → float32 (n, d), each unique text computed once ever."""
        import ray

        unique = list(dict.fromkeys(texts))
        keys = {t: cache_key("vllm", self.model_id, "embed", EMBED_VERSION, t) for t in unique}
        self.cache.refresh()
        hits = self.cache.get_many(list(keys.values()))
        self.meter.add_hits(self.model_id, len(hits))
        vecs: dict[str, np.ndarray] = {}
        for t, k in keys.items():
            v = hits[k].vec if k in hits else None
            if v is not None:
                vecs[t] = v
        todo = [t for t in unique if t not in vecs]
        parts = _split(todo, len(self._workers)) if todo else []
        results = ray.get([w.embed.remote(p) for w, p in zip(self._workers, parts, strict=False)])
        for part, res in zip(parts, results, strict=True):
            self.meter.add_call(self.model_id, items=len(part), tokens_in=0)
            for t, v in zip(part, res, strict=True):
                vecs[t] = v
                self.cache.put(
                    keys[t], backend="vllm", model=self.model_id, kind="embed",
                    version=EMBED_VERSION, vec=v,
                )  # fmt: skip
        self.cache.flush()
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.stack([vecs[t] for t in texts]).astype(np.float32)

    def usage(self) -> dict[str, dict[str, int]]:
        """Return calls and cache hits per model (see :class:`CostMeter`)."""
        return self.meter.to_dict()

    def close(self) -> None:
        """Flush the cache and free the GPUs."""
        import ray

        self.cache.flush()
        for w in self._workers:
            ray.kill(w)
        self._workers = []


class VLLMGenerator:
    """Generation from vLLM actors (``llm.backend: vllm``), same contract as ``OpenAIChat``."""

    def __init__(self, job: JobConfig, *, actors: int | None = None) -> None:
        from raypipe.llm.generate import chat_params

        cfg = job.llm
        self.backend, self.model_id = "vllm", cfg.model
        self.max_tokens, self.temperature = cfg.max_tokens, cfg.temperature
        self.params = chat_params(job)
        self.cache = LLMCache(job.cache_dir())
        self.meter = CostMeter()
        self._workers = _actors(cfg.model, "generate", cfg.num_gpus, actors or job.limits.actors)

    def generate(
        self, prompts: list[str], *, version: str, validate: Validator | None = None
    ) -> list[GenResult]:
        """Answer every prompt once (cached); invalid answers are failures, not cached."""
        import ray

        from raypipe.llm.generate import GenResult

        unique = list(dict.fromkeys(prompts))
        keys = {
            p: cache_key("vllm", self.model_id, "chat", version, p, self.params) for p in unique
        }
        self.cache.refresh()
        hits = self.cache.get_many(list(keys.values()))
        self.meter.add_hits(self.model_id, len(hits))
        done = {
            p: GenResult(hits[k].text, None, hits[k].tokens_in, hits[k].tokens_out, True)
            for p, k in keys.items()
            if k in hits
        }
        todo = [p for p in unique if p not in done]
        parts = _split(todo, len(self._workers)) if todo else []
        refs = [
            w.generate.remote(p, self.max_tokens, self.temperature)
            for w, p in zip(self._workers, parts, strict=False)
        ]
        for part, res in zip(parts, ray.get(refs), strict=True):
            for p, r in zip(part, res, strict=True):
                text = r["text"].strip()
                self.meter.add_call(
                    self.model_id, items=1, tokens_in=r["tokens_in"], tokens_out=r["tokens_out"]
                )
                bad = validate(text) if validate else None
                if bad:
                    done[p] = GenResult(text, f"invalid answer: {bad}")
                    continue
                self.cache.put(
                    keys[p], backend="vllm", model=self.model_id, kind="chat", version=version,
                    text=text, tokens_in=r["tokens_in"], tokens_out=r["tokens_out"],
                )  # fmt: skip
                done[p] = GenResult(text, None, r["tokens_in"], r["tokens_out"])
        self.cache.flush()
        return [done[p] for p in prompts]

    def usage(self) -> dict[str, dict[str, int]]:
        """Return calls, tokens and cache hits per model (see :class:`CostMeter`)."""
        return self.meter.to_dict()

    def close(self) -> None:
        """Flush the cache and free the GPUs."""
        import ray

        self.cache.flush()
        for w in self._workers:
            ray.kill(w)
        self._workers = []
