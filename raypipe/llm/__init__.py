"""Language models: text-embedding and generation backends, rate limits, cache, costs."""

from __future__ import annotations

from raypipe.llm.backends import EMBEDDERS, TextEmbedder, build_embedder

__all__ = ["EMBEDDERS", "TextEmbedder", "build_embedder"]
