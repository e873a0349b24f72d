"""The output folder: refuse what is not ours, clear only what we provably wrote.

A run writes only into a new folder, an empty one, or one holding a raypipe run of the same
input. ``--overwrite`` deletes only raypipe's own entries of a folder whose manifest carries
raypipe's signature; every other file stays where it is. Checks here are read-only; the folder
is touched (:func:`clear_run`, :func:`make_output_dir`) only after the whole job was validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.core.storage import AnyPath, rmtree, sorted_paths
from raypipe.errors import InputError
from raypipe.orchestrate.manifest import MANIFEST, is_raypipe_manifest, read_manifest

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["RUN_ENTRIES", "check_output_dir", "clear_run", "make_output_dir", "same_input"]

#: What a run writes at the top of its folder (``--overwrite`` deletes these and nothing else).
RUN_ENTRIES = frozenset(
    {
        MANIFEST,
        "metrics.parquet",
        "failures.parquet",
        "embeddings",
        "annotations",
        "evaluation",
        "report",
        "genes",
        "state",
        "atlas.zarr",
    }
)
#: Kept by ``--overwrite``: the content-addressed LLM cache (paid results never go stale).
KEPT = frozenset({"cache"})


def _ours(name: str) -> bool:
    tmp = name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)
    return name in RUN_ENTRIES or name in KEPT or tmp


def same_input(a: str | None, b: str) -> bool:
    """Whether two ``input.path`` values name the same input (``..`` and symlinks resolved)."""
    if a is None:
        return False
    if a == b:
        return True
    if ":" in a.split("/")[0] or ":" in b.split("/")[0]:  # builtin:NAME or a URL
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_output_dir(out_dir: AnyPath, job: JobConfig, overwrite: bool) -> dict[str, Any] | None:
    """Check ``output_dir`` can take this run, touching nothing; return its previous manifest.

    Raises
    ------
    InputError
        When ``out_dir`` is a file, holds files raypipe did not write and no raypipe manifest,
        holds a manifest raypipe did not write, or holds a run of another input (without
        ``--overwrite``).
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise InputError(f"output_dir {out_dir} is a file", fix="point output_dir at a folder")
    old = read_manifest(out_dir)
    if (out_dir / MANIFEST).exists() and not is_raypipe_manifest(old):
        raise InputError(
            f"output_dir {out_dir} holds a {MANIFEST} that raypipe did not write; raypipe never "
            "writes into (or deletes) a folder it did not make",
            fix="point output_dir at a new folder",
        )
    if old is None:
        foreign = sorted(p.name for p in out_dir.iterdir() if not _ours(p.name))
        if foreign and overwrite:
            raise InputError(
                f"--overwrite refuses to delete {out_dir}: it is not a raypipe output folder (no "
                f"raypipe {MANIFEST}; holds e.g. {', '.join(foreign[:3])})",
                fix="point output_dir at a new or raypipe-made folder",
            )
        if foreign:
            raise InputError(
                f"output_dir {out_dir} is not empty and holds no raypipe manifest "
                f"(e.g. {', '.join(foreign[:3])})",
                fix="use a new output_dir (raypipe never writes into a folder it did not make)",
            )
        return None
    old_input = old.get("config", {}).get("input", {}).get("path")
    if not overwrite and not same_input(old_input, job.input.path):
        raise InputError(
            f"output_dir {out_dir} holds a run of a different input ({old_input}), not {job.input.path}",
            fix="use another output_dir, or pass --overwrite to replace that run",
        )
    changed = _changed_selection(old, job)
    if not overwrite and changed:
        raise InputError(
            f"output_dir {out_dir} holds a run of other cells of {job.input.path}: input.soma."
            f"{changed[0]} was {changed[1]!r}, now {changed[2]!r} (another selection is another job)",
            fix="use another output_dir, or pass --overwrite to replace that run",
        )
    return old


#: input.soma keys that choose the cells and values of a SOMA input (obs_columns do not)
_SELECTION = ("measurement", "layer", "obs_value_filter", "census_version")


def _changed_selection(old: dict[str, Any], job: JobConfig) -> tuple[str, Any, Any] | None:
    """Return the first ``input.soma`` key choosing cells that differs from the previous run's."""
    from raypipe.atlas.soma import is_soma_input

    if not is_soma_input(job.input.path):
        return None
    before = (old.get("config", {}).get("input", {}) or {}).get("soma")
    now = job.input.soma.model_dump(mode="json")
    for key in _SELECTION:
        if before is not None and before.get(key) != now[key]:
            return key, before.get(key), now[key]
    return None


def clear_run(out_dir: AnyPath) -> list[str]:
    """Delete raypipe's own entries of a run folder (``--overwrite``); return what was kept.

    Call only after :func:`check_output_dir` accepted the folder. The LLM cache and any file
    raypipe did not write stay.
    """
    if not out_dir.is_dir():
        return []
    kept = []
    for p in sorted_paths(out_dir.iterdir()):
        if p.name in KEPT or not _ours(p.name):
            kept.append(p.name)
        else:
            rmtree(p)
    return kept


def make_output_dir(out_dir: AnyPath) -> None:
    """Create ``out_dir`` (and its parents), with a clear error when that is impossible."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".{MANIFEST}.probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"output_dir {out_dir} cannot be created or written ({exc.strerror or exc})",
            fix="point output_dir at a writable folder (not under a file, /proc or a read-only mount)",
        ) from None
