"""The one reader of input atlases: ``.h5ad``, AnnData ``.zarr``, 10x folders, builtins.

Used by ingest (chunk by chunk) and by the dry run (shape, genes, a sample of rows).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from raypipe.core.storage import AnyPath, ObjectPath, as_path, zarr_store
from raypipe.errors import InputError

__all__ = ["BUILTINS", "AtlasSource", "open_source", "resolve_input_path"]

log = logging.getLogger(__name__)

BUILTINS = {"pbmc68k_reduced"}


def resolve_input_path(path: str) -> AnyPath:
    """Resolve ``builtin:NAME`` (data shipped inside an installed package), a path or a URL.

    A TileDB-SOMA experiment is refused here: runs read it in place (:mod:`raypipe.atlas.soma`).
    """
    from raypipe.atlas.soma import is_soma_input

    if is_soma_input(path):
        raise InputError(
            f"{path} is a TileDB-SOMA experiment: raypipe runs read it in place, ingest does not "
            "take it",
            fix="set it as input.path of a job (docs/soma.md); `raypipe export RUN --out "
            "FILE.h5ad` writes a run's cells with their results as AnnData",
        )
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
    return as_path(path)


class AtlasSource:
    """Row-chunk reader over one of the supported input formats (the one atlas reader).

    Opens ``.h5ad`` (backed: only the rows asked for are read), AnnData ``.zarr`` and 10x
    ``matrix.mtx`` folders, X or ``raw`` or a named layer. Use :func:`open_source`, which
    closes the file.

    Attributes
    ----------
    obs, var
        The obs and var tables.
    n_obs, n_vars
        Shape of the chosen matrix.
    """

    def __init__(self, path: AnyPath, layer: str | None) -> None:
        self.path = path
        self._handle: Any = None
        self._fileobj: Any = None  # a bucket's .h5ad: h5py reads it through ranged GETs
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

    def _open_10x(self, path: AnyPath) -> None:
        if isinstance(path, ObjectPath):
            raise InputError(
                f"{path}: 10x folders are read from local paths only",
                fix="ingest it locally, or convert it to .h5ad and upload that",
            )
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

    def _open_anndata_group(self, path: AnyPath, kind: str, layer: str | None) -> None:
        from anndata.io import read_elem, sparse_dataset

        try:
            if kind == "h5":
                import h5py

                if isinstance(path, ObjectPath):
                    self._fileobj = path.open("rb")
                self._handle = h5py.File(self._fileobj or path, "r")
                group = self._handle
            else:
                import zarr

                group = zarr.open_group(zarr_store(path), mode="r")
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
        try:
            self.obs = read_elem(group["obs"])
            self.var = read_elem(var_elem)
        except Exception as exc:  # damaged bytes in obs/var
            raise InputError(
                f"{path} is damaged: obs/var cannot be read ({type(exc).__name__}: {exc})",
                fix="copy or download the file again, or write it again from its source",
            ) from None
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

    def _open_in_memory(self, path: AnyPath, layer: str | None) -> None:
        import warnings

        import anndata as ad

        self._handle.close()
        self._handle = None
        log.warning("%s uses a legacy AnnData layout; reading it into memory", path)
        with warnings.catch_warnings():
            if not log.isEnabledFor(logging.INFO):  # `raypipe -v` shows them
                # anndata moves legacy .uns['neighbors'] matrices to .obsp while reading
                # (FutureWarning "Moving element from .uns[...]"); harmless here: only X/raw,
                # obs and var are used, and the warning above already names the old layout.
                warnings.filterwarnings("ignore", "Moving element from", FutureWarning)
            adata = ad.read_h5ad(self._fileobj or path)
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
        """Rows ``[start, stop)`` of the chosen matrix as float32 CSR (only those are read)."""
        if self._matrix is not None:
            return self._matrix[start:stop]
        try:
            block = self._x[start:stop]
            return sp.csr_matrix(block, dtype=np.float32)
        except Exception as exc:  # h5py/zarr/numcodecs errors on damaged bytes
            raise InputError(
                f"{self.path} is damaged: cells {start}–{stop - 1} of X cannot be read "
                f"({type(exc).__name__}: {exc})",
                fix="copy or download the file again, or write it again from its source",
            ) from None

    def close(self) -> None:
        """Close the underlying file (idempotent)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._fileobj is not None:
            self._fileobj.close()
            self._fileobj = None


def _is_hdf5(path: AnyPath) -> bool:
    with path.open("rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


@contextmanager
def open_source(path: str | AnyPath, layer: str | None = None) -> Iterator[AtlasSource]:
    """Open an input atlas for reading rows; the file is closed on exit.

    Parameters
    ----------
    path
        ``.h5ad``, AnnData ``.zarr``, a 10x ``matrix.mtx(.gz)`` folder, or ``builtin:NAME``.
    layer
        ``raw`` (adata.raw), a named layer, or None for X.
    """
    src = AtlasSource(resolve_input_path(str(path)), layer)
    try:
        yield src
    finally:
        src.close()
