"""Before a run touches its output: validate the whole job; then find or ingest the atlas.

:func:`validate_job` is read-only: it checks everything that can be checked without
computing — methods, files the config names, the input, its label/batch columns — so a typo
fails before the output folder (or a previous run's manifest) is touched.
:func:`ensure_atlas` then opens the input as an atlas: a raypipe atlas as it is; an AnnData
``.zarr`` with row-chunked CSR X or a TileDB-SOMA experiment read in place (an atlas view,
:mod:`raypipe.atlas.views`); anything else ingested into ``<out>/atlas.zarr`` only when that
copy is missing or stale. The atlas's ``extra["input"]`` says which, and why a copy was made.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.core.outputs import atomic_write_json, read_marker
from raypipe.core.storage import AnyPath, as_path, zarr_store
from raypipe.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pandas as pd

    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig

__all__ = ["ensure_atlas", "validate_job"]

log = logging.getLogger(__name__)

STAMP = Path("state") / "atlas_source.json"


def _is_atlas(src: AnyPath) -> bool:
    from raypipe.atlas.store import ATLAS_ATTR

    if not _is_zarr(src):
        return False
    import zarr

    return ATLAS_ATTR in dict(zarr.open_group(zarr_store(src), mode="r").attrs)


def _stamp(src: AnyPath, layer: str | None) -> dict[str, Any]:
    stat = src.stat()
    return {
        "source": str(src.resolve()) if isinstance(src, Path) else str(src),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "layer": layer,
    }


def _ingested(job: JobConfig, src: AnyPath, out_dir: AnyPath) -> AtlasInfo | None:
    """Return the atlas already ingested from ``src`` into ``out_dir`` while still current."""
    from raypipe.atlas.store import open_atlas

    target = out_dir / "atlas.zarr"
    if target.exists() and read_marker(out_dir / STAMP) == _stamp(src, job.input.layer):
        atlas = open_atlas(target)
        if job.input.x_kind in ("auto", atlas.x_kind):
            return atlas
    return None


def _check_paths(job: JobConfig) -> None:
    """Files and folders the config names must exist (paths and URLs; hub ids are checked later)."""
    named = {
        "genes.table": job.genes.table if job.genes.text_source == "table" else None,
        "genes.orgdb": job.genes.orgdb,
        "genes.id_table": job.genes.id_table,
        "genes.aliases": job.genes.aliases,
        "annotate.ontology": job.annotate.ontology if job.annotate.enabled else None,
    }
    for key, value in named.items():
        if value and not as_path(value if "://" in value else Path(value).expanduser()).exists():
            raise InputError(f"{key} {value} does not exist", fix=f"check {key} in the config")


def _check_columns(present: list[str], keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in present]
    if missing:
        raise InputError(
            f"obs of {where} has no column {missing[0]!r}; columns present: "
            f"{', '.join(present) or '(none)'}",
            fix="set input.label_key / input.batch_key to one of the columns present",
        )


def _check_cells_and_genes(
    job: JobConfig, obs: pd.DataFrame | None, var_names: list[str], where: str, force: bool
) -> list[str]:
    """Check unique cell names, human gene names (or cross_species), a sane label column."""
    from raypipe.atlas.ingest import check_unique_obs_names
    from raypipe.genes.identity import check_species
    from raypipe.orchestrate.input_checks import check_labels

    check_species(var_names, job.genes, where)
    if obs is None:
        return []
    check_unique_obs_names(obs.index.astype(str), where)
    warnings = check_labels(job, obs, where, force=force)
    ann, key = job.annotate, job.input.label_key
    if ann.enabled and not ann.candidates and key and key in obs.columns:
        from raypipe.annotate.checks import check_candidate_keys, label_candidates

        check_candidate_keys(job, label_candidates(obs[key]))
    return warnings


def validate_job(job: JobConfig, *, force: bool = False) -> list[str]:
    """Check the job end to end without writing anything; return warnings for the summary.

    The input and config first (cheap), then each method's preflight (e.g. the CE
    checkpoint is loaded on the driver), so every input is checked before the first write.

    Parameters
    ----------
    job
        The job.
    force
        Use a suspicious label column (numeric, too many classes) with a warning.

    Raises
    ------
    ConfigError, InputError
        Naming the setting, file or column, with the fix.
    """
    from raypipe.embed.methods import METHODS

    warnings = _check_job_input(job, force)
    for name in job.embed.methods:
        METHODS.get(name).check(job)
    return warnings


def _check_job_input(job: JobConfig, force: bool) -> list[str]:
    """:func:`validate_job` without the methods' preflights."""
    from raypipe.annotate.prepare import check_annotate_config
    from raypipe.atlas.reader import open_source, resolve_input_path
    from raypipe.atlas.soma import is_soma_input
    from raypipe.atlas.store import open_atlas, read_obs_columns, read_var
    from raypipe.embed.methods import METHODS

    for name in job.embed.methods:
        METHODS.get(name)
    _check_paths(job)
    langcell = job.annotate.enabled and job.annotate.scorers.get("langcell", 0) > 0
    if langcell and not any(METHODS.get(m).cell_text_scores for m in job.embed.methods):
        raise ConfigError(
            "annotate.scorers has langcell but no method computes LangCell's scores",
            fix="add ce to embed.methods with a LangCell checkpoint (embed.ce.model)",
        )
    if job.annotate.enabled and not job.annotate.candidates and not job.input.label_key:
        raise ConfigError(
            "annotate.enabled but there are no candidates",
            fix="list annotate.candidates, or set input.label_key to map its values to Cell "
            "Ontology terms",
        )
    check_annotate_config(job)  # the ontology loads; annotate.mapping names live CL terms
    if is_soma_input(job.input.path):
        return _validate_soma(job, force)
    src = resolve_input_path(job.input.path)
    if not src.exists():
        raise InputError(f"input file {src} does not exist", fix="check input.path in the config")
    keys = [k for k in (job.input.label_key, job.input.batch_key) if k]
    atlas = open_atlas(src) if _is_atlas(src) else _ingested(job, src, as_path(job.output_dir))
    if atlas is not None:
        if _is_atlas(src) and job.input.x_kind not in ("auto", atlas.x_kind):
            raise InputError(
                f"atlas {src} holds {atlas.x_kind} but input.x_kind is {job.input.x_kind}",
                fix=f"set input.x_kind: {atlas.x_kind} (or auto), or ingest the input again "
                f"with raypipe ingest --x-kind {job.input.x_kind}",
            )
        obs = read_obs_columns(atlas.path, keys) if keys else None
        names = [str(n) for n in read_var(atlas.path).index]
        return _check_cells_and_genes(job, obs, names, str(src), force)
    zarr_dir = (src / "zarr.json").exists() or (src / ".zgroup").exists()
    if keys or src.is_file() or zarr_dir:  # a 10x folder is read whole: only when needed
        with open_source(src, job.input.layer) as source:  # checks the file's layout too
            _check_columns([str(c) for c in source.obs.columns], keys, str(src))
            names = [str(n) for n in source.var.index]
            return _check_cells_and_genes(job, source.obs, names, str(src), force)
    return []


def _validate_soma(job: JobConfig, force: bool) -> list[str]:
    """Open the SOMA experiment, resolve the filter, check its cells, genes and columns."""
    from raypipe.atlas.soma import SomaRows, resolve_selection

    keys = [k for k in (job.input.label_key, job.input.batch_key) if k]
    sel = resolve_selection(job.input.path, job.input.soma, [*keys, *job.input.soma.obs_columns])
    obs = SomaRows(sel.source).read_obs(keys, sel.joinids)
    where = str(sel.source.get("uri") or job.input.path)
    return _check_cells_and_genes(job, obs, [str(n) for n in sel.var.index], where, force)


def _is_zarr(src: AnyPath) -> bool:
    return src.is_dir() and ((src / "zarr.json").exists() or (src / ".zgroup").exists())


def _noted(atlas: AtlasInfo, note: str) -> AtlasInfo:
    return dataclasses.replace(atlas, extra=atlas.extra | {"input": note})


def ensure_atlas(job: JobConfig, out_dir: AnyPath, *, progress: bool = True) -> AtlasInfo:
    """Open ``input.path`` as an atlas: as it is, in place (a view), or ingested when needed."""
    from raypipe.atlas.ingest import ingest
    from raypipe.atlas.reader import resolve_input_path
    from raypipe.atlas.soma import is_soma_input
    from raypipe.atlas.store import open_atlas
    from raypipe.atlas.views import inplace_layout, soma_view, zarr_view

    if is_soma_input(job.input.path):
        atlas = soma_view(job, out_dir)
        return _noted(atlas, f"read in place (TileDB-SOMA, {atlas.n_obs:,} cells selected)")
    src = resolve_input_path(job.input.path)
    if _is_atlas(src):
        return _noted(open_atlas(src), "a raypipe atlas, read as it is")
    why = ""
    if _is_zarr(src):
        layout, why = inplace_layout(src, job)
        if layout is not None:
            atlas = zarr_view(src, layout, job, out_dir)
            return _noted(atlas, "read in place (AnnData Zarr with row-chunked CSR X: no copy)")
    copied = f"ingested into {out_dir / 'atlas.zarr'}" + (f" because {why}" if why else "")
    found = _ingested(job, src, out_dir)
    if found is not None:
        return _noted(found, copied)
    target = out_dir / "atlas.zarr"
    log.info("ingesting %s into %s", src, target)
    result = ingest(
        src,
        target,
        rows_per_chunk=job.input.rows_per_chunk,
        x_kind=job.input.x_kind,
        layer=job.input.layer,
        overwrite=True,
        progress=progress,
    )
    atomic_write_json(out_dir / STAMP, _stamp(src, job.input.layer))
    return _noted(result.atlas, copied)
