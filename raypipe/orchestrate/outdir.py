"""The output folder: refuse what is not ours, clear only what we provably wrote.

A run writes only into a new folder, an empty one, or one holding a raypipe run of the same
input. ``--overwrite`` deletes only raypipe's own entries of a folder whose manifest carries
raypipe's signature; every other file stays where it is. Checks here are read-only; the folder
is touched (:func:`clear_run`, :func:`make_output_dir`) only after the whole job was validated.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.core.lease import LEASE
from raypipe.core.storage import AnyPath, ObjectPath, as_path, rmtree, sorted_paths
from raypipe.errors import InputError
from raypipe.orchestrate.manifest import MANIFEST, is_raypipe_manifest, read_manifest

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = [
    "RUN_ENTRIES",
    "check_output_dir",
    "clear_run",
    "foreign_files",
    "make_output_dir",
    "same_input",
]

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
        LEASE,
    }
)
#: What raypipe writes inside its folders (file suffixes; None: anything, e.g. a Zarr store).
#: ``--overwrite`` refuses, without ``--force``, a file anywhere under them that is not one.
_INSIDE: dict[str, frozenset[str] | None] = {
    "embeddings": frozenset({".parquet"}),
    "annotations": frozenset({".parquet"}),
    "evaluation": frozenset({".parquet"}),
    "genes": frozenset({".parquet"}),
    "report": frozenset({".html", ".png", ".json"}),
    "state": frozenset({".json", ".parquet", ".h5ad"}),
    "atlas.zarr": None,
}
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


def _files(folder: AnyPath) -> list[str]:
    """Every file under ``folder``, relative to it (any depth)."""
    if isinstance(folder, ObjectPath):
        found = folder._call("list", folder.fs.find, folder.key)
        return sorted(str(f)[len(folder.key) + 1 :] for f in found)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def foreign_files(out_dir: AnyPath) -> list[str]:
    """Files inside raypipe's own folders of a run that raypipe does not write (any depth).

    E.g. ``embeddings/genept_w/mine.csv``: ``--overwrite`` would delete it with its folder.
    """
    out = []
    for name, suffixes in _INSIDE.items():
        folder = out_dir / name
        if suffixes is None or not folder.is_dir():
            continue
        for rel in _files(folder):
            leaf = rel.rsplit("/", 1)[-1]
            tmp = leaf.startswith(".") and (leaf.endswith(".tmp") or ".tmp-" in leaf)
            if not tmp and not any(leaf.endswith(sfx) for sfx in suffixes):
                out.append(f"{name}/{rel}")
    return out


def check_output_dir(
    out_dir: AnyPath, job: JobConfig, overwrite: bool, *, force: bool = False
) -> dict[str, Any] | None:
    """Check ``output_dir`` can take this run, touching nothing; return its previous manifest.

    Raises
    ------
    InputError
        When ``out_dir`` is a file, holds files raypipe did not write and no raypipe manifest,
        holds a manifest raypipe did not write, holds a run of another input (without
        ``--overwrite``), or, with ``--overwrite`` and without ``force``, holds files raypipe
        does not write inside its own folders (:func:`foreign_files`).
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
    if overwrite and not force:
        alien = foreign_files(out_dir)
        if alien:
            raise InputError(
                f"--overwrite would delete {len(alien)} file(s) in {out_dir} that raypipe did "
                f"not write: {', '.join(alien[:10])}" + (" ..." if len(alien) > 10 else ""),
                fix="move them out of the run folder, or add --force to delete them with it",
            )
    old_input = old.get("config", {}).get("input", {}).get("path")
    if not overwrite and not same_input(old_input, job.input.path):
        note = _grown_input(out_dir, old, job)
        if note is None:
            raise InputError(
                f"output_dir {out_dir} holds a run of a different input ({old_input}), not "
                f"{job.input.path}, and {job.input.path} does not hold every cell of it",
                fix="use another output_dir, or pass --overwrite to replace that run",
            )
        old = dict(old, input_note=note)
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


def _grown_input(out_dir: AnyPath, old: dict[str, Any], job: JobConfig) -> str | None:
    """Return a note when the new ``input.path`` holds every cell of the last run, else None.

    A grown atlas under a new file name may take over a run folder: its cells are matched by
    name here (before anything is written); each shard is then reused only when its rows'
    content hash is unchanged.
    """
    from raypipe.atlas.reader import open_source, resolve_input_path
    from raypipe.atlas.store import ATLAS_ATTR, read_obs_names

    old_atlas = out_dir / "atlas.zarr"
    if not old_atlas.is_dir():
        old_atlas = as_path(str((old.get("atlas") or {}).get("path") or ""))
    src = resolve_input_path(job.input.path)
    try:
        before = set(read_obs_names(old_atlas))
        if (src / "zarr.json").exists() and ATLAS_ATTR in _attrs(src):
            after = set(read_obs_names(src))
        else:
            with open_source(src, job.input.layer) as source:
                after = {str(n) for n in source.obs.index}
    except (InputError, OSError):
        return None
    if not before or not before <= after:
        return None
    return (
        f"input.path changed from {old.get('config', {}).get('input', {}).get('path')} to "
        f"{job.input.path}, which holds all {len(before):,} cells of the previous run "
        f"(+{len(after) - len(before):,} new): shards whose rows are unchanged are reused"
    )


def _attrs(path: AnyPath) -> dict[str, Any]:
    import zarr

    from raypipe.core.storage import zarr_store

    return dict(zarr.open_group(zarr_store(path), mode="r").attrs)


def clear_run(out_dir: AnyPath) -> list[str]:
    """Delete raypipe's own entries of a run folder (``--overwrite``); return what was kept.

    Call only after :func:`check_output_dir` accepted the folder. The LLM cache and any file
    raypipe did not write stay.
    """
    if not out_dir.is_dir():
        return []
    kept = []
    for p in sorted_paths(out_dir.iterdir()):
        if p.name == LEASE:
            continue  # this run's own lease
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
