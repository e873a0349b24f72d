"""A finished run's results as AnnData: ``Run.to_anndata`` and ``raypipe export``.

Conventions (docs/python.md, "Results as AnnData"): ``obsm["X_<method>"]`` float32, rows in the atlas's obs
order, empty cells all zeros and flagged in ``obs["<method>_empty"]``;
``obs["raypipe_<method>_label"]`` (categorical), ``..._score``, ``..._margin`` and
``..._cl_id`` (the call's Cell Ontology id: CELLxGENE's ``cell_type`` /
``cell_type_ontology_term_id`` pair) for each annotated method, ``obs["raypipe_cluster"]``
when the candidates were discovered (``annotate.candidates: auto``); ``uns["raypipe"]`` the
manifest essentials and the metrics table; ``var`` as the atlas has it. Results are read part by part into the output arrays (nothing larger is
held); ``X`` is copied from the atlas row chunk by row chunk; files are written under a
temporary name and renamed, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.core.outputs import read_frame, read_parquet
from raypipe.core.storage import AnyPath, ObjectPath, as_path, sorted_paths
from raypipe.errors import InputError

if TYPE_CHECKING:
    import anndata as ad

__all__ = [
    "RunResults",
    "attach_results",
    "collect_results",
    "export_anndata",
    "read_embedding_matrix",
    "uns_payload",
]

#: Parquet columns of an annotation part copied into obs (as ``raypipe_<method>_<column>``);
#: ``cl_id`` (the call's Cell Ontology id, CELLxGENE's ``cell_type_ontology_term_id`` beside
#: the label) and ``cluster`` (``annotate.candidates: auto``) when the part has them.
ANNOTATION_COLUMNS = ("label", "score", "margin")
OPTIONAL_COLUMNS = ("cl_id", "cluster")


@dataclass
class RunResults:
    """A run's results as in-memory arrays in the atlas's obs order.

    Attributes
    ----------
    obs_names
        (n,) atlas obs names.
    obsm
        ``X_<method>`` → (n, d) float32 embedding.
    obs
        New obs columns (index = obs names).
    uns
        The ``uns["raypipe"]`` payload.
    """

    obs_names: pd.Index
    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    obs: pd.DataFrame = field(default_factory=pd.DataFrame)
    uns: dict[str, Any] = field(default_factory=dict)


def _parts(out_dir: AnyPath, kind: str, method: str) -> list[AnyPath]:
    return sorted_paths((out_dir / kind / method).glob("part-*.parquet"))


def _check_rows(
    rows: np.ndarray, names: np.ndarray, obs_names: np.ndarray, where: AnyPath, n: int
) -> None:
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise InputError(
            f"{where} holds atlas rows up to {int(rows.max())} but the atlas has {n:,} cells",
            fix="the run folder mixes outputs of another atlas: re-run with --overwrite",
        )
    bad = np.flatnonzero(names != obs_names[rows])
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"{where}: row {int(rows[i])} is cell {names[i]!r} but the atlas has "
            f"{obs_names[rows[i]]!r} there",
            fix="the run folder mixes outputs of another atlas: re-run with --overwrite",
        )


def _check_complete(seen: np.ndarray, out_dir: AnyPath, kind: str, method: str) -> None:
    if (seen == 1).all():
        return
    missing = int((seen == 0).sum())
    twice = int((seen > 1).sum())
    raise InputError(
        f"{out_dir / kind / method} covers {int((seen > 0).sum()):,} of {seen.size:,} cells "
        f"({missing:,} missing, {twice:,} more than once)",
        fix="finish the run (`raypipe run CONFIG` resumes it) before exporting",
    )


def read_embedding_matrix(
    out_dir: str | AnyPath, method: str, obs_names: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``embeddings/<method>`` into one (n, d) float32 array in atlas row order.

    Reads one part at a time into the output array (values copied bit for bit), checks that
    every atlas row appears exactly once and that each row's obs name is the atlas's.

    Parameters
    ----------
    out_dir
        The run's output folder.
    method
        Embedding method (a folder under ``embeddings/``).
    obs_names
        (n,) the atlas's obs names, in order.

    Returns
    -------
    tuple
        ``(X, empty)``: (n, d) float32 and (n,) bool.
    """
    out = as_path(out_dir)
    n = len(obs_names)
    x: np.ndarray | None = None
    empty = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=np.int32)
    for f in _parts(out, "embeddings", method):
        t = read_parquet(f, columns=["obs_name", "row", "embedding", "empty"])
        rows = t.column("row").to_numpy().astype(np.int64)
        _check_rows(
            rows, np.asarray(t.column("obs_name").to_pylist(), dtype=object), obs_names, f, n
        )
        col = t.column("embedding").combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
        if x is None:
            x = np.zeros((n, values.shape[1]), dtype=np.float32)
        x[rows] = values
        empty[rows] = t.column("empty").to_numpy(zero_copy_only=False)
        seen[rows] += 1
    _check_complete(seen, out, "embeddings", method)
    assert x is not None  # n > 0 and every row seen
    return x, empty


def read_annotation_columns(
    out_dir: str | AnyPath, method: str, obs_names: np.ndarray
) -> dict[str, np.ndarray]:
    """Read ``annotations/<method>`` in atlas row order.

    Columns ``label``, ``score``, ``margin``, and ``cl_id`` and ``cluster`` where present.
    """
    out = as_path(out_dir)
    n = len(obs_names)
    cols: dict[str, np.ndarray] = {}
    seen = np.zeros(n, dtype=np.int32)
    for f in _parts(out, "annotations", method):
        t = read_parquet(f)
        present = [c for c in OPTIONAL_COLUMNS if c in t.column_names]
        t = t.select(["obs_name", "row", *ANNOTATION_COLUMNS, *present])
        rows = t.column("row").to_numpy().astype(np.int64)
        _check_rows(
            rows, np.asarray(t.column("obs_name").to_pylist(), dtype=object), obs_names, f, n
        )
        for c in (*ANNOTATION_COLUMNS, *present):
            values = t.column(c).to_numpy(zero_copy_only=False)
            if c not in cols:
                obj = c in ("label", "cl_id")
                cols[c] = np.empty(n, dtype=object if obj else values.dtype)
            cols[c][rows] = values
        seen[rows] += 1
    _check_complete(seen, out, "annotations", method)
    return cols


def _plain(value: Any) -> Any:
    """Turn manifest JSON into what AnnData can store in ``uns`` (no None, arrays for lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return np.asarray(value, dtype=object)
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return np.asarray(value)
        return json.dumps(value, default=str)
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def uns_payload(manifest: dict[str, Any], metrics: pd.DataFrame | None) -> dict[str, Any]:
    """Return ``uns["raypipe"]``: the manifest essentials and the metrics table.

    Keys: ``status``, ``config_hash``, ``config`` (the whole config as JSON), ``versions``,
    ``models`` (text model, text source, per-method model ids), ``gene_coverage``,
    ``methods`` (fingerprints and settings), ``annotate``, ``warnings``, ``started``,
    ``finished``, ``wall_s`` and ``metrics`` (long format, as ``metrics.parquet``).
    """
    genes = manifest.get("genes") or {}
    methods = manifest.get("methods") or {}
    models: dict[str, Any] = {
        "text_model": genes.get("model"),
        "text_source": genes.get("text_source"),
    }
    for m, notes in methods.items():
        if isinstance(notes, dict) and notes.get("model"):
            models[m] = notes["model"]
    data: dict[str, Any] = {
        "status": manifest.get("status"),
        "config_hash": manifest.get("config_hash"),
        "config": json.dumps(manifest.get("config", {}), sort_keys=True, default=str),
        "versions": manifest.get("versions"),
        "models": models,
        "gene_coverage": {
            **(genes.get("coverage") or {}),
            "unmatched_examples": genes.get("unmatched_examples") or [],
        },
        "methods": methods,
        "annotate": manifest.get("annotate"),
        "warnings": manifest.get("warnings") or [],
        "started": manifest.get("started"),
        "finished": manifest.get("finished"),
        "wall_s": manifest.get("wall_s"),
    }
    out = _plain(data)
    if metrics is not None and not metrics.empty:
        out["metrics"] = metrics.reset_index(drop=True)
    return out  # type: ignore[no-any-return]


def collect_results(
    out_dir: str | AnyPath,
    manifest: dict[str, Any],
    obs_names: np.ndarray,
    embeddings: list[str],
    annotations: list[str],
) -> RunResults:
    """Read the chosen methods' results into arrays in atlas order (see module docstring)."""
    out = as_path(out_dir)
    index = pd.Index(obs_names, name=None)
    res = RunResults(obs_names=index, obs=pd.DataFrame(index=index))
    for m in embeddings:
        x, empty = read_embedding_matrix(out, m, obs_names)
        res.obsm[f"X_{m}"] = x
        res.obs[f"{m}_empty"] = empty
    for m in annotations:
        cols = read_annotation_columns(out, m, obs_names)
        res.obs[f"raypipe_{m}_label"] = pd.Categorical(cols["label"].astype(str))
        res.obs[f"raypipe_{m}_score"] = cols["score"]
        res.obs[f"raypipe_{m}_margin"] = cols["margin"]
        if "cl_id" in cols:  # CELLxGENE's pair: cell_type + cell_type_ontology_term_id
            ids = [None if v is None else str(v) for v in cols["cl_id"]]
            res.obs[f"raypipe_{m}_cl_id"] = pd.Categorical(ids)
        if "cluster" in cols and "raypipe_cluster" not in res.obs.columns:
            res.obs["raypipe_cluster"] = pd.Categorical(cols["cluster"].astype(np.int64))
    metrics_path = out / "metrics.parquet"
    metrics = read_frame(metrics_path) if metrics_path.is_file() else None
    res.uns = uns_payload(manifest, metrics)
    return res


def attach_results(adata: ad.AnnData, res: RunResults) -> ad.AnnData:
    """Attach ``res`` to ``adata`` in place, matching cells by obs name; return ``adata``.

    Raises
    ------
    InputError
        When ``adata``'s obs names are not unique or are not the run's cells.
    """
    names = pd.Index(adata.obs_names.astype(str))
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"adata has duplicate obs names (e.g. {', '.join(map(str, dup))})",
            fix="make them unique (adata.obs_names_make_unique()) before attaching results",
        )
    if not names.equals(res.obs_names):
        missing = res.obs_names.difference(names)
        extra = names.difference(res.obs_names)
        if len(missing) or len(extra):
            raise InputError(
                f"adata's cells are not the run's: {len(extra):,} of its obs names are not in "
                f"the run (e.g. {', '.join(map(str, extra[:3]))}), {len(missing):,} of the "
                f"run's are not in adata (e.g. {', '.join(map(str, missing[:3]))})",
                fix="pass the AnnData the run was made from (same obs names), or call "
                "to_anndata() without adata",
            )
    order = res.obs_names.get_indexer(names)  # run row of each adata cell
    for key, x in res.obsm.items():
        adata.obsm[key] = x[order]
    for col in res.obs.columns:
        adata.obs[col] = res.obs[col].to_numpy()[order]
    adata.uns["raypipe"] = res.uns
    return adata


def _write_x_streamed(group: Any, atlas_path: str, n_obs: int, rows_per_chunk: int) -> None:
    """Copy the atlas's X into ``group["X"]`` (CSR) one block of row chunks at a time."""
    from anndata.io import sparse_dataset, write_elem

    from raypipe.atlas.store import read_shard

    step = max(1, rows_per_chunk) * 8
    xds = None
    for start in range(0, n_obs, step):
        x = read_shard(atlas_path, start, min(start + step, n_obs))
        if xds is None:
            write_elem(group, "X", x)  # anndata makes .h5ad sparse arrays resizable
            xds = sparse_dataset(group["X"])
        else:
            xds.append(x)


def export_anndata(
    out_path: str | AnyPath,
    *,
    atlas_path: str,
    n_obs: int,
    rows_per_chunk: int,
    results: RunResults,
    overwrite: bool = False,
) -> AnyPath:
    """Write the atlas (X, obs, var) plus ``results`` as ``.h5ad`` or AnnData ``.zarr``.

    Streams X from the atlas; writes to a temporary path beside ``out_path`` and renames it
    into place only when complete.

    Raises
    ------
    InputError
        When ``out_path`` has another suffix, exists (without ``overwrite``), or its folder
        does not exist.
    """
    import anndata as ad
    import zarr

    from raypipe.atlas.store import read_obs, read_var

    dest = as_path(out_path)
    kind = {".h5ad": "h5ad", ".zarr": "zarr"}.get(dest.suffix)
    if kind is None:
        raise InputError(f"--out {dest} must end in .h5ad or .zarr", fix="e.g. --out results.h5ad")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} already exists", fix="pass --overwrite, or choose another --out")
    if isinstance(dest, Path) and not dest.parent.is_dir():
        raise InputError(f"folder {dest.parent} does not exist", fix="create it first")
    # a bucket gets a local file written first, then uploaded (one PUT for .h5ad; a .zarr's
    # root metadata last, so a reader never opens a half-uploaded store)
    staging = (
        Path(tempfile.mkdtemp(prefix="raypipe-export-")) if isinstance(dest, ObjectPath) else None
    )
    out = staging / dest.name if staging is not None else Path(str(dest))

    obs = read_obs(atlas_path)
    obs.index = obs.index.astype(str)
    for col in results.obs.columns:
        obs[col] = results.obs[col].to_numpy()
    var = read_var(atlas_path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        # auto_shard_zarr_v3=False: plain chunks, like the atlas (and no anndata warning about
        # a future default); ignored for .h5ad
        with ad.settings.override(auto_shard_zarr_v3=False):
            if kind == "h5ad":
                import h5py

                with h5py.File(tmp, "w") as f:
                    _write_all(f, obs, var, results, atlas_path, n_obs, rows_per_chunk)
            else:
                group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
                _write_all(group, obs, var, results, atlas_path, n_obs, rows_per_chunk)
        if out.exists():
            _remove(out)
        os.replace(tmp, out)
        if isinstance(dest, ObjectPath):
            if dest.exists():
                dest.rmtree()
            dest.upload(out, last="zarr.json")
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _write_all(
    group: Any,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    results: RunResults,
    atlas_path: str,
    n_obs: int,
    rows_per_chunk: int,
) -> None:
    from anndata.io import write_elem

    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    write_elem(group, "obs", obs)
    write_elem(group, "var", var)
    _write_x_streamed(group, atlas_path, n_obs, rows_per_chunk)
    write_elem(group, "obsm", dict(results.obsm))
    write_elem(group, "uns", {"raypipe": results.uns})
    for empty in ("layers", "obsp", "varm", "varp"):
        write_elem(group, empty, {})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
