"""The run manifest (``manifest.json``): one typed record of what a run is and did.

Every manifest raypipe writes carries its signature (``"format": "raypipe-run/1"``), which is
what lets ``--overwrite`` prove a folder is a raypipe run before deleting anything in it.
``status`` is ``running`` while a run works, ``complete`` only when every stage finished, and
``failed`` (with ``error``) on every failure path raypipe sees; a run killed outright stays
``running`` — never ``complete``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from raypipe import __version__
from raypipe.core.outputs import atomic_write_json
from raypipe.core.storage import AnyPath, as_path

__all__ = ["FORMAT", "MANIFEST", "Manifest", "is_raypipe_manifest", "read_manifest", "versions"]

MANIFEST = "manifest.json"
FORMAT = "raypipe-run/1"

Status = Literal["running", "complete", "failed"]


def versions() -> dict[str, str]:
    """Versions of raypipe, Python and the libraries a run's results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"raypipe": __version__, "python": sys.version.split()[0]}
    for pkg in (
        "ray",
        "anndata",
        "zarr",
        "numpy",
        "scipy",
        "torch",
        "transformers",
        "sentence-transformers",
        "openai",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Manifest:
    """A run's manifest; :meth:`write` stores it atomically as ``<out>/manifest.json``.

    Sections are filled as the run goes (``atlas`` after ingest, ``genes`` after the gene
    space, ``methods`` per method, ...) and written at each step, so a failed run records how
    far it got.
    """

    config: dict[str, Any]
    config_hash: str
    status: Status = "running"
    format: str = FORMAT
    versions: dict[str, str] = field(default_factory=versions)
    started: str = field(default_factory=_now)
    finished: str | None = None
    error: str | None = None
    previous: dict[str, Any] | None = None
    atlas: dict[str, Any] = field(default_factory=dict)
    genes: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    embedding_space: dict[str, Any] | None = None
    lease_takeover: dict[str, Any] | None = None
    annotate: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    llm_usage: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object (sections not reached are left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self, out_dir: str | AnyPath) -> None:
        """Write ``<out_dir>/manifest.json`` atomically."""
        atomic_write_json(as_path(out_dir) / MANIFEST, self.to_dict())

    def finish(self, status: Status, *, error: str | None = None) -> None:
        """Mark the run ``complete`` or ``failed`` (with the reason) and stamp the time."""
        self.status, self.error, self.finished = status, error, _now()


def read_manifest(out_dir: str | AnyPath) -> dict[str, Any] | None:
    """Return the manifest of ``out_dir`` as a dict (None when absent or not JSON)."""
    try:
        data = json.loads((as_path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_raypipe_manifest(data: dict[str, Any] | None) -> bool:
    """Whether ``data`` is a manifest raypipe wrote (its signature, or a pre-signature run's)."""
    if not data:
        return False
    if data.get("format") == FORMAT:
        return True
    legacy = data.get("versions")  # runs written before the signature existed
    return isinstance(legacy, dict) and "raypipe" in legacy and "config_hash" in data
