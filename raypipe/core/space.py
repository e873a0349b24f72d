"""The run's fitted embedding space: statistics fitted on the atlas once, recorded, reused.

Some outputs depend on statistics fitted on the whole atlas: GenePT-w's highly variable
genes and centring mean, the annotation's mean cell. Refitted on every run, they would move
every cell's vector as soon as one cell is added, so nothing could be reused and old and new
cells would not share a space. Instead the run that first fits one records it in a versioned
file, ``<out>/state/space/space-vNNNN.json``, and later runs on a grown or changed atlas reuse
it: only new or changed shards are computed and old cells' vectors stay bit-identical.

A version is *provisional* until its run completes (:meth:`FittedSpace.commit`); a run that
finds a provisional version fits again (the run that fitted it never finished). Fitting an
entry anew when the latest version is committed (``--refit``, or a setting the entry depends
on changed) starts the next version. The manifest names the version a run used.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from raypipe.core.outputs import atomic_write_json
from raypipe.core.storage import AnyPath, as_path

__all__ = ["SPACE_DIR", "FittedSpace"]

#: Where the versions live, under the output folder.
SPACE_DIR = "state/space"
_FORMAT = "raypipe-space/1"
_NAME = re.compile(r"^space-v(\d{4,})\.json$")


def _path(out_dir: AnyPath, version: int) -> AnyPath:
    return out_dir / SPACE_DIR / f"space-v{version:04d}.json"


def _latest(out_dir: AnyPath) -> tuple[int, dict[str, Any] | None]:
    """Return the highest recorded version and its content (0, None when there is none)."""
    folder = out_dir / SPACE_DIR
    versions = []
    if folder.is_dir():
        versions = [int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    if not versions:
        return 0, None
    v = max(versions)
    try:
        data = json.loads(_path(out_dir, v).read_text())
    except (OSError, ValueError):
        return v, None
    return v, data if isinstance(data, dict) and data.get("format") == _FORMAT else None


@dataclass
class FittedSpace:
    """The fitted state a run reads and records (one version file).

    Attributes
    ----------
    out_dir
        The run's output folder.
    version
        The version in use (1, 2, ...).
    entries
        Name (``genept_w``, ``annotate_genept_w``) → ``{"depends", "data", "fitted"}``.
    committed
        Whether a complete run has used this version (then a new fit starts a new version).
    fitted, reused
        Names fitted and reused by this run (for the manifest and the summary).
    """

    out_dir: str
    version: int
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    committed: bool = False
    refit: bool = False
    fitted: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, out_dir: str, *, refit: bool = False) -> FittedSpace:
        """Load the latest version of ``out_dir``; with ``refit`` start a new, empty one.

        A provisional version (its run never completed) is kept as the version number but
        its entries are fitted again.
        """
        latest, data = _latest(as_path(out_dir))
        if data is None or refit:
            return cls(out_dir, latest + 1 if (refit and latest) else max(latest, 1), refit=refit)
        if not data.get("committed"):
            return cls(out_dir, latest)
        return cls(out_dir, latest, dict(data.get("entries") or {}), committed=True)

    @property
    def path(self) -> AnyPath:
        """The version's file."""
        return _path(as_path(self.out_dir), self.version)

    def get(self, name: str, depends: str) -> Any:
        """Return the recorded data of ``name`` when fitted under ``depends``, else None."""
        entry = self.entries.get(name)
        if entry is None or entry.get("depends") != depends:
            return None
        if name not in self.reused:
            self.reused.append(name)
        return entry["data"]

    def put(self, name: str, depends: str, data: Any) -> None:
        """Record freshly fitted ``data`` (JSON-able) of ``name``; written at once.

        When the version in use is committed, the new fit starts the next version (holding
        the other entries unchanged).
        """
        if self.committed:
            self.version += 1
            self.committed = False
        self.entries[name] = {
            "depends": depends,
            "data": data,
            "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if name not in self.fitted:
            self.fitted.append(name)
        self._write()

    def commit(self) -> None:
        """Mark the version as used by a complete run (later runs reuse it)."""
        if not self.committed and self.entries:
            self.committed = True
            self._write()

    def _write(self) -> None:
        atomic_write_json(
            self.path,
            {
                "format": _FORMAT,
                "version": self.version,
                "committed": self.committed,
                "entries": self.entries,
            },
        )

    def record(self) -> dict[str, Any]:
        """Return what the manifest says about the space of this run."""
        return {
            "version": self.version,
            "path": str(self.path),
            "refit": self.refit,
            "fitted": list(self.fitted),
            "reused": list(self.reused),
        }
