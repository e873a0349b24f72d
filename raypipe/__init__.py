"""raypipe: a distributed batch processor on Ray for single-cell RNA atlases.

The Python API — :func:`run`, :func:`open_run`, :func:`embed`, :class:`Run` — is defined in
:mod:`raypipe.api`, which imports nothing heavy at module level: ``import raypipe`` loads no
Ray, torch, AnnData or Zarr (a test proves it).
"""

from __future__ import annotations

__version__ = "0.1.0"

# `raypipe.embed` names two things: the embedding-stage package raypipe/embed/ and the
# one-call API function. Python binds a package onto its parent only when the package is
# first imported, so loading the (light, empty) package here, before the function takes
# the name, keeps `raypipe.embed` the function for good; stage code imports its modules as
# always (`from raypipe.embed.genept_w import ...`). Only dotted-string lookups that walk
# attributes from `raypipe` (e.g. monkeypatch.setattr("raypipe.embed.x.y", ...)) would see
# the function: patch the module object instead.
import raypipe.embed  # noqa: F401  (the package only, none of its modules)
from raypipe.api import Run, embed, open_run, run

__all__ = ["Run", "__version__", "embed", "open_run", "run"]
