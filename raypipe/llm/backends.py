"""The text-embedding backend registry (``text_model.backend``).

Each backend is a class built from :class:`raypipe.config.TextModelConfig` (plus the
job config where it needs limits/cache) that embeds a list of texts into a float32 matrix.
Heavy imports (torch, sentence-transformers, openai, vllm) happen inside the backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from raypipe.registry import Capabilities, Registry

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = [
    "EMBEDDERS",
    "EmbedOutcome",
    "EmbedderBase",
    "TextEmbedder",
    "build_embedder",
    "embedder_resources",
]


@dataclass
class EmbedOutcome:
    """Embeddings with per-item failures.

    Attributes
    ----------
    vectors
        float32 (n, d); rows of failed items are zero.
    ok
        bool (n,): the item has an embedding.
    reasons
        Row index → why it failed.
    """

    vectors: np.ndarray
    ok: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)


class TextEmbedder(Protocol):
    """What every embedding backend offers."""

    model_id: str
    failures: list[dict[str, Any]]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` → float32 array of shape (len(texts), dim)."""
        ...

    def embed_detailed(self, texts: list[str]) -> EmbedOutcome:
        """Embed ``texts``, isolating failures per item (never raises for a single item)."""
        ...

    def usage(self) -> dict[str, dict[str, int]]:
        """Return calls, tokens and cache hits per model so far (empty for free local models)."""
        ...

    def close(self) -> None:
        """Release clients/actors (may be a no-op)."""
        ...


class EmbedderBase:
    """Defaults for backends whose items cannot fail one by one and that cost nothing."""

    model_id: str = ""

    def __init__(self) -> None:
        self.failures: list[dict[str, Any]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` → float32 (n, dim)."""
        raise NotImplementedError

    def embed_detailed(self, texts: list[str]) -> EmbedOutcome:
        """Embed ``texts``; a failure here fails the whole batch, so every item is ok."""
        vecs = np.asarray(self.embed(texts), dtype=np.float32)
        return EmbedOutcome(vecs, np.ones(len(texts), dtype=bool))

    def usage(self) -> dict[str, dict[str, int]]:
        """Return no usage (nothing is paid or metered)."""
        return {}

    def close(self) -> None:
        """Nothing to release."""


EMBEDDERS: Registry[type] = Registry("text-model backend")
EMBEDDERS.add("local", "raypipe.llm.local:LocalEmbedder")
EMBEDDERS.add(
    "openai", "raypipe.llm.openai_backend:OpenAIEmbedder", Capabilities(paid=True, remote=True)
)
EMBEDDERS.add("vllm", "raypipe.llm.vllm_backend:VLLMEmbedder", Capabilities(remote=True, gpu=True))


def build_embedder(job: JobConfig) -> TextEmbedder:
    """Build the embedding backend the job config names."""
    cls = EMBEDDERS.get(job.text_model.backend)
    return cls(job)  # type: ignore[no-any-return]


def embedder_resources(job: JobConfig) -> tuple[int, float]:
    """Actor-pool size and GPUs per actor for the job's text-model backend.

    Remote backends (an API, vLLM actors) go through the LLM client actors
    (``limits.actors``); in-process models use the embedding pool (``ray.actors``).
    """
    caps = EMBEDDERS.capabilities(job.text_model.backend)
    actors = job.limits.actors if caps.remote else job.ray.actors
    return actors, (job.text_model.num_gpus if caps.gpu else 0.0)
