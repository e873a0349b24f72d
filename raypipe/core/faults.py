"""Named fault points: where a test makes a run fail (disk full) or stop (to ``kill -9`` it).

Production code calls :func:`fault_point` at a few places (ingest's chunk loop, the genes
step, every atomic parquet write). It does nothing unless ``RAYPIPE_FAULT`` is set, so the
cost is one environment lookup. Ray workers inherit the driver's environment, so a fault set
for a ``raypipe run`` subprocess reaches its workers too.

``RAYPIPE_FAULT`` holds comma-separated ``POINT:ACTION[:PATH_PART]`` items:

- ``enospc``: raise ``OSError(ENOSPC)`` for the path, as a full disk would;
- ``pause``: create the file named by ``RAYPIPE_FAULT_READY`` (when set), then sleep until
  killed (the test kills the driver with SIGKILL at exactly this point).

``PATH_PART`` limits the fault to paths containing it (e.g. ``write_parquet:enospc:embeddings``).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from raypipe.core.storage import AnyPath

__all__ = ["FAULT_ENV", "READY_ENV", "fault_point"]

FAULT_ENV = "RAYPIPE_FAULT"
READY_ENV = "RAYPIPE_FAULT_READY"


def fault_point(name: str, path: str | AnyPath | None = None) -> None:
    """Inject the fault ``RAYPIPE_FAULT`` asks for at point ``name`` (no-op when unset).

    Parameters
    ----------
    name
        The point: ``ingest_chunk``, ``genes``, ``write_parquet``.
    path
        The file or folder being written there (named in the injected error).

    Raises
    ------
    OSError
        ``ENOSPC`` when the fault asks for a full disk here.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, rest = item.partition(":")
        action, _, part = rest.partition(":")
        if point != name or (part and part not in str(path or "")):
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path or name))
        if action == "pause":
            ready = os.environ.get(READY_ENV)
            if ready:
                Path(ready).write_text(f"{os.getpid()}\n")
            while True:
                time.sleep(3600)
