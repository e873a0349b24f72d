"""Keep umap-learn's compiled numba kernels on disk, so only the first report ever compiles them.

umap-learn compiles its layout, fuzzy-set and spectral kernels with numba in every new process
(the first UMAP of a process took 8.9 s against 1.7 s for the next, 5,000 cells, on 2 cores),
and it does not ask numba to cache them. :func:`cache_umap_kernels` turns numba's on-disk
cache on for every kernel of umap's modules (numba's ``Dispatcher.enable_caching``): the first
process writes the compiled code beside umap's sources (or in numba's user-wide cache when
that folder is read-only), later processes load it (1.8 s for the same first UMAP). Numba keys
the cache on each source file, so a new umap-learn recompiles.
"""

from __future__ import annotations

__all__ = ["cache_umap_kernels"]

_DONE = False
_MODULES = ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances")


def cache_umap_kernels() -> int:
    """Enable numba's disk cache for umap's kernels (once per process); return how many."""
    global _DONE
    if _DONE:
        return 0
    import importlib

    from numba.core.dispatcher import Dispatcher

    n = 0
    for name in _MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and obj.__module__ == module.__name__:
                try:
                    obj.enable_caching()
                except RuntimeError:  # no writable cache location: compile as umap would
                    continue
                n += 1
    _DONE = True
    return n
