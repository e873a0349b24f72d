"""``raypipe ingest``: .h5ad / AnnData .zarr / 10x folder → a raypipe Zarr v3 atlas.

Reads the input in row chunks (memory bounded by the chunk, not the atlas), checks every
value (NaN/inf/negative are errors naming the file, row and gene), detects whether X holds raw
counts or log-normalised values, hashes each row chunk for incremental reprocessing, and
writes atomically: a temporary store is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from raypipe.atlas.store import ATLAS_ATTR, AtlasInfo, open_atlas
from raypipe.errors import InputError

__all__ = ["IngestResult", "detect_x_kind", "ingest", "resolve_input_path", "write_atlas_metadata"]

log = logging.getLogger(__name__)

BUILTINS = {"pbmc68k_reduced"}
LOGNORM_MAX = 30.0  # log1p(1e4 * a whole cell) ≈ 9.2; anything log-scaled stays far below this


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote and saw."""

    atlas: AtlasInfo
    seconds: float
    zero_count_cells: int
    duplicate_genes: list[str]


def resolve_input_path(path: str) -> Path:
    """Resolve ``builtin:NAME`` (data shipped inside an installed package) or a plain path."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTINS:
            raise InputError(
                f"unknown builtin dataset {name!r}",
                fix=f"use one of: {', '.join(sorted(BUILTINS))}",
            )
        import scanpy

        found = sorted(Path(scanpy.__file__).parent.glob(f"**/*{name}.h5ad"))
        if not found:
            raise InputError(
                f"scanpy does not ship {name}.h5ad in this version", fix="pass a file path instead"
            )
        return found[0]
    return Path(path)


class _Source:
    """Row-chunk reader over one of the supported input formats."""

    def __init__(self, path: Path, layer: str | None) -> None:
        self.path = path
        self._handle: Any = None
        if not path.exists():
            raise InputError(
                f"input {path} does not exist", fix="check the path (input.path / INPUT)"
            )
        if path.is_dir() and not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
            self._open_10x(path)
        elif path.suffix == ".h5ad" or (path.is_file() and _is_hdf5(path)):
            self._open_anndata_group(path, "h5", layer)
        elif path.is_dir():
            self._open_anndata_group(path, "zarr", layer)
        else:
            raise InputError(
                f"{path} is not an AnnData file (.h5ad), an AnnData .zarr store or a 10x folder",
                fix="convert it to .h5ad (e.g. with scanpy) or pass a 10x matrix.mtx(.gz) folder",
            )

    def _open_10x(self, path: Path) -> None:
        mtx = [p for p in path.iterdir() if p.name.startswith("matrix.mtx")]
        if not mtx:
            raise InputError(
                f"{path} is a folder without matrix.mtx(.gz) and is not a Zarr store",
                fix="pass a 10x folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz) or an .h5ad",
            )
        import scanpy as sc

        try:
            adata = sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=False)
        except Exception as exc:
            raise InputError(f"cannot read 10x folder {path}: {exc}") from None
        self._matrix = sp.csr_matrix(adata.X, dtype=np.float32)
        self.obs = adata.obs
        self.var = adata.var
        self.n_obs, self.n_vars = self._matrix.shape

    def _open_anndata_group(self, path: Path, kind: str, layer: str | None) -> None:
        from anndata.io import read_elem, sparse_dataset

        try:
            if kind == "h5":
                import h5py

                self._handle = h5py.File(path, "r")
                group = self._handle
            else:
                import zarr

                group = zarr.open_group(str(path), mode="r")
        except Exception as exc:
            raise InputError(f"{path} cannot be opened as {kind}: {exc}") from None
        if kind == "h5" and "encoding-type" not in dict(group.attrs):
            self._open_in_memory(path, layer)  # legacy (pre-0.7) layout: small files only
            return
        if "X" not in group or "obs" not in group or "var" not in group:
            raise InputError(
                f"{path} is not an AnnData store (needs X, obs and var; has {', '.join(group.keys())})",
                fix="write it with anndata (adata.write_h5ad / write_zarr)",
            )
        x_elem, var_elem = group["X"], group["var"]
        if layer == "raw":
            if "raw" not in group:
                raise InputError(
                    f"{path} has no .raw", fix="drop input.layer or choose an existing layer"
                )
            x_elem, var_elem = group["raw"]["X"], group["raw"]["var"]
        elif layer:
            if "layers" not in group or layer not in group["layers"]:
                have = list(group["layers"].keys()) if "layers" in group else []
                raise InputError(
                    f"{path} has no layer {layer!r}; layers: {have}",
                    fix="set input.layer to one of them",
                )
            x_elem = group["layers"][layer]
        self.obs = read_elem(group["obs"])
        self.var = read_elem(var_elem)
        enc = dict(x_elem.attrs).get("encoding-type", "array")
        if enc == "csr_matrix":
            self._x = sparse_dataset(x_elem)
        elif enc == "csc_matrix":
            raise InputError(
                f"{path}: X is stored as CSC; row shards need CSR",
                fix="convert once: adata.X = adata.X.tocsr(); adata.write_h5ad(...)",
            )
        else:
            self._x = x_elem  # dense array: row slices are cheap
        self.n_obs, self.n_vars = int(self._x.shape[0]), int(self._x.shape[1])
        self._matrix = None

    def _open_in_memory(self, path: Path, layer: str | None) -> None:
        import anndata as ad

        self._handle.close()
        self._handle = None
        log.warning("%s uses a legacy AnnData layout; reading it into memory", path)
        adata = ad.read_h5ad(path)
        if layer == "raw":
            if adata.raw is None:
                raise InputError(
                    f"{path} has no .raw", fix="drop input.layer or choose an existing layer"
                )
            adata = adata.raw.to_adata()
        elif layer:
            if layer not in adata.layers:
                raise InputError(f"{path} has no layer {layer!r}; layers: {list(adata.layers)}")
            adata.X = adata.layers[layer]
        self._matrix = sp.csr_matrix(adata.X, dtype=np.float32)
        self.obs, self.var = adata.obs, adata.var
        self.n_obs, self.n_vars = self._matrix.shape

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        if self._matrix is not None:
            return self._matrix[start:stop]
        block = self._x[start:stop]
        return sp.csr_matrix(block, dtype=np.float32)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def detect_x_kind(nonint_values: int, max_value: float) -> str:
    """Classify X from what the chunk scan saw: ``counts``, ``lognorm`` or ``unknown``."""
    if nonint_values == 0:
        return "counts"
    if max_value <= LOGNORM_MAX:
        return "lognorm"
    return "unknown"


def _check_chunk(x: sp.csr_matrix, start: int, path: Path, var_names: pd.Index) -> None:
    data = x.data
    bad = ~np.isfinite(data)
    if bad.any() or (data < 0).any():
        pos = int(np.flatnonzero(bad | (data < 0))[0])
        row = int(np.searchsorted(x.indptr, pos, side="right") - 1) + start
        gene = var_names[int(x.indices[pos])]
        what = "NaN/inf" if bad.any() else "negative"
        raise InputError(
            f"{path}: X holds {what} values (first at cell row {row}, gene {gene!r}: {data[pos]})",
            fix="ingest raw counts or log-normalised values (e.g. adata.raw / a counts layer via "
            "input.layer), not scaled or corrupted data",
        )


def write_atlas_metadata(
    group: Any,
    *,
    n_obs: int,
    var_names: pd.Index,
    x_kind: str,
    x_kind_detected: str,
    rows_per_chunk: int,
    chunk_hashes: list[str],
    source: str,
    layer: str | None,
    zero_count_cells: int,
) -> None:
    """Mark a written Zarr group as a raypipe atlas (the metadata :func:`open_atlas` reads)."""
    meta = {
        "format_version": 1,
        "n_obs": n_obs,
        "n_vars": len(var_names),
        "x_kind": x_kind,
        "x_kind_detected": x_kind_detected,
        "rows_per_chunk": rows_per_chunk,
        "chunk_hashes": chunk_hashes,
        "source": source,
        "layer": layer,
        "var_hash": hashlib.blake2b(
            "\n".join(map(str, var_names)).encode(), digest_size=12
        ).hexdigest(),
        "zero_count_cells": zero_count_cells,
        "duplicate_genes": int(var_names.duplicated().sum()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0", ATLAS_ATTR: meta})


def _chunk_hash(x: sp.csr_matrix) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(np.diff(x.indptr).astype(np.int64).tobytes())
    h.update(x.indices.astype(np.int32).tobytes())
    h.update(x.data.astype(np.float32).tobytes())
    return h.hexdigest()


def _chunks(src: _Source, rows_per_chunk: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    for start in range(0, src.n_obs, rows_per_chunk):
        yield start, src.rows(start, min(start + rows_per_chunk, src.n_obs))


def ingest(
    input_path: str | Path,
    out: str | Path,
    *,
    rows_per_chunk: int = 1024,
    x_kind: str = "auto",
    layer: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> IngestResult:
    """Write ``input_path`` as a raypipe atlas at ``out`` (Zarr v3, CSR X chunked by rows).

    Parameters
    ----------
    input_path
        ``.h5ad``, AnnData ``.zarr``, a 10x ``matrix.mtx(.gz)`` folder, or ``builtin:NAME``.
    out
        Destination ``.zarr`` folder.
    rows_per_chunk
        Rows per Zarr chunk (the unit of sharding).
    x_kind
        ``auto`` (detect), ``counts`` or ``lognorm`` (override the detection).
    layer
        Read X from ``raw`` (adata.raw.X) or a named layer instead of X.
    overwrite
        Replace an existing ``out``.
    progress
        Show a progress bar.
    """
    import zarr
    from anndata.io import sparse_dataset, write_elem
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if rows_per_chunk <= 0:
        raise InputError(f"--rows-per-chunk must be > 0 (got {rows_per_chunk})", fix="e.g. 1024")
    src_path = resolve_input_path(str(input_path))
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(
            f"{out} already exists", fix="pass --overwrite to replace it, or choose another --out"
        )
    src = _Source(src_path, layer)
    try:
        if src.n_obs == 0 or src.n_vars == 0:
            raise InputError(f"{src_path} has no cells or no genes ({src.n_obs} × {src.n_vars})")
        var = src.var.copy()
        var.index = var.index.astype(str)
        dup = var.index[var.index.duplicated()].unique().tolist()
        if dup:
            log.warning(
                "%s: %d duplicate gene names (e.g. %s); their counts are summed when genes are mapped",
                src_path,
                len(dup),
                ", ".join(dup[:5]),
            )
        obs = src.obs.copy()
        obs.index = obs.index.astype(str)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        write_elem(group, "obs", obs)
        write_elem(group, "var", var)
        hashes: list[str] = []
        nonint = 0
        max_value = 0.0
        zero_cells = 0
        bar = tqdm(total=src.n_obs, unit="cell", desc="ingest", disable=not progress)
        xds = None
        for start, x in _chunks(src, rows_per_chunk):
            x.sum_duplicates()
            x.sort_indices()
            _check_chunk(x, start, src_path, var.index)
            if x.nnz:
                nonint += int(np.count_nonzero(x.data != np.round(x.data)))
                max_value = max(max_value, float(x.data.max()))
            zero_cells += int(np.count_nonzero(np.diff(x.indptr) == 0))
            hashes.append(_chunk_hash(x))
            if xds is None:
                per_row = max(1, x.nnz // max(1, x.shape[0]))
                chunk = int(min(max(rows_per_chunk * per_row, 4096), 1 << 24))
                write_elem(group, "X", x, dataset_kwargs={"chunks": (chunk,)})
                xds = sparse_dataset(group["X"])
            else:
                xds.append(x)
            bar.update(x.shape[0])
        bar.close()
        detected = detect_x_kind(nonint, max_value)
        chosen = detected if x_kind == "auto" else x_kind
        if chosen == "unknown":
            raise InputError(
                f"{src_path}: X is neither raw counts (it has {nonint} non-integer values) nor "
                f"log-normalised (max {max_value:.4g} > {LOGNORM_MAX})",
                fix="pass --x-kind counts (e.g. ambient-corrected counts) or --x-kind lognorm, or "
                "ingest the raw counts layer (--layer)",
            )
        if zero_cells:
            log.warning(
                "%s: %d cells have zero counts; they get a zero embedding flagged `empty`",
                src_path,
                zero_cells,
            )
        write_atlas_metadata(
            group,
            n_obs=src.n_obs,
            var_names=var.index,
            x_kind=chosen,
            x_kind_detected=detected,
            rows_per_chunk=rows_per_chunk,
            chunk_hashes=hashes,
            source=str(src_path),
            layer=layer,
            zero_count_cells=zero_cells,
        )
    except BaseException:
        src.close()
        if "tmp" in locals() and Path(tmp).exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    src.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return IngestResult(open_atlas(out), time.perf_counter() - t0, zero_cells, dup)
