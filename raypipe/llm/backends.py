"""The text-embedding backend registry (``text_model.backend``).

Each backend is a class built from :class:`raypipe.config.TextModelConfig` (plus the
job config where it needs limits/cache) that embeds a list of texts into a float32 matrix.
Heavy imports (torch, sentence-transformers, openai, vllm) happen inside the backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from raypipe.registry import Capabilities, Registry

if TYPE_CHECKING:
    import numpy as np

    from raypipe.config import JobConfig

__all__ = ["EMBEDDERS", "TextEmbedder", "build_embedder", "embedder_resources"]


class TextEmbedder(Protocol):
    """What every embedding backend offers."""

    model_id: str

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` → float32 array of shape (len(texts), dim)."""
        ...

    def close(self) -> None:
        """Release clients/actors (may be a no-op)."""
        ...


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
