"""The text-embedding backend registry (``text_model.backend``).

Each backend is a class built from :class:`raypipe.config.TextModelConfig` (plus the
job config where it needs limits/cache) that embeds a list of texts into a float32 matrix.
Heavy imports (torch, sentence-transformers, openai, vllm) happen inside the backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from raypipe.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from raypipe.config import JobConfig

__all__ = ["EMBEDDERS", "TextEmbedder", "build_embedder"]


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
EMBEDDERS.add("openai", "raypipe.llm.openai_backend:OpenAIEmbedder")
EMBEDDERS.add("vllm", "raypipe.llm.vllm_backend:VLLMEmbedder")


def build_embedder(job: JobConfig) -> TextEmbedder:
    """Build the embedding backend the job config names."""
    cls = EMBEDDERS.get(job.text_model.backend)
    return cls(job)  # type: ignore[no-any-return]
