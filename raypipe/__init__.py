"""raypipe: a distributed batch processor on Ray for single-cell RNA atlases.

The Python API (``run``, ``open_run``, ``embed``, ``Run``) lives in :mod:`raypipe.api` and is
imported on first use, so ``import raypipe`` stays light (no Ray, torch, AnnData or Zarr).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raypipe.api import Run, embed, open_run, run

__all__ = ["Run", "__version__", "embed", "open_run", "run"]

__version__ = "0.1.0"

_API = {"Run", "embed", "open_run", "run"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from raypipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'raypipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
