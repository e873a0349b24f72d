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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from raypipe.atlas.reader import AtlasSource, open_source, resolve_input_path
from raypipe.atlas.store import ATLAS_ATTR, AtlasInfo, check_values, open_atlas
from raypipe.core.faults import fault_point
from raypipe.core.outputs import disk_full_error, is_disk_full
from raypipe.core.storage import AnyPath, ObjectPath, as_path, zarr_store
from raypipe.errors import InputError

__all__ = [
    "IngestResult",
    "atlas_metadata",
    "check_unique_obs_names",
    "chunk_hash",
    "detect_x_kind",
    "ingest",
    "resolve_input_path",
    "write_atlas_metadata",
]

log = logging.getLogger(__name__)

LOGNORM_MAX = 30.0  # log1p(1e4 * a whole cell) ≈ 9.2; anything log-scaled stays far below this


@dataclass(frozen=True)
class IngestResult:
    """What ingest wrote and saw."""

    atlas: AtlasInfo
    seconds: float
    zero_count_cells: int
    duplicate_genes: list[str]


def detect_x_kind(nonint_values: int, max_value: float) -> str:
    """Classify X from what the chunk scan saw: ``counts``, ``lognorm`` or ``unknown``."""
    if nonint_values == 0:
        return "counts"
    if max_value <= LOGNORM_MAX:
        return "lognorm"
    return "unknown"


def atlas_metadata(
    *,
    n_obs: int,
    var_names: pd.Index,
    x_kind: str,
    x_kind_detected: str,
    rows_per_chunk: int,
    chunk_hashes: list[str],
    source: str,
    layer: str | None,
    zero_count_cells: int | None,
) -> dict[str, Any]:
    """Return the metadata :func:`open_atlas` reads (an atlas's Zarr attributes, or a view)."""
    return {
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


def write_atlas_metadata(group: Any, **meta: Any) -> None:
    """Mark a written Zarr group as a raypipe atlas (``meta``: :func:`atlas_metadata`'s keywords)."""
    group.attrs.update(
        {
            "encoding-type": "anndata",
            "encoding-version": "0.1.0",
            ATLAS_ATTR: atlas_metadata(**meta),
        }
    )


def chunk_hash(x: sp.csr_matrix) -> str:
    """Content hash of a row chunk (row lengths, column indices, float32 values)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(np.diff(x.indptr).astype(np.int64).tobytes())
    h.update(x.indices.astype(np.int32).tobytes())
    h.update(x.data.astype(np.float32).tobytes())
    return h.hexdigest()


def check_unique_obs_names(names: pd.Index, where: str | AnyPath) -> None:
    """Refuse duplicated cell names: every output joins back to the AnnData by ``obs_name``.

    Raises
    ------
    InputError
        Listing the duplicated names (up to 10) and how many there are.
    """
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise InputError(
            f"{where}: {len(dup):,} cell names (obs_names) occur more than once, e.g. "
            f"{', '.join(map(repr, dup[:10].astype(str)))}; outputs are joined back to the "
            "AnnData by name, so every name must be unique",
            fix="make them unique and write the file again: adata.obs_names_make_unique(); "
            "adata.write_h5ad(...)",
        )


def _remove_stale_temps(out: Path) -> None:
    """Remove temporary stores of earlier ingests into ``out`` whose process is gone."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # the ingest that wrote it died (e.g. killed): a leftover
            log.info("removing %s, left by an ingest that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _chunks(src: AtlasSource, rows_per_chunk: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    for start in range(0, src.n_obs, rows_per_chunk):
        yield start, src.rows(start, min(start + rows_per_chunk, src.n_obs))


def ingest(
    input_path: str | AnyPath,
    out: str | AnyPath,
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
        Destination ``.zarr`` folder or URL. Locally the store is written under a temporary
        name and renamed; in a bucket (no rename there) it is written in place and its
        raypipe metadata, written last, is the commit point (:func:`open_atlas` refuses a
        store without it).
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
    import anndata as ad
    import zarr
    from anndata.io import write_elem
    from tqdm.auto import tqdm

    from raypipe.atlas.csr_writer import CsrWriter, chunk_elements

    t0 = time.perf_counter()
    if rows_per_chunk <= 0:
        raise InputError(f"--rows-per-chunk must be > 0 (got {rows_per_chunk})", fix="e.g. 1024")
    src_path = resolve_input_path(str(input_path))
    out = as_path(out)
    if out.exists() and not overwrite:
        raise InputError(
            f"{out} already exists", fix="pass --overwrite to replace it, or choose another --out"
        )
    try:
        # auto_shard_zarr_v3=False states the layout raypipe reads (plain row chunks, no Zarr
        # shards) instead of leaving it to anndata's default, which warns once per array
        # written ("zarr v3 autosharding will be the default in the next minor release").
        with open_source(src_path, layer) as src, ad.settings.override(auto_shard_zarr_v3=False):
            if src.n_obs == 0 or src.n_vars == 0:
                raise InputError(
                    f"{src_path} has no cells or no genes ({src.n_obs} × {src.n_vars})"
                )
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
            check_unique_obs_names(obs.index, src_path)
            if isinstance(out, Path):
                _remove_stale_temps(out)
            tmp = _staging(out)
            group = zarr.open_group(zarr_store(tmp, read_only=False), mode="w", zarr_format=3)
            write_elem(group, "obs", obs)
            write_elem(group, "var", var)
            hashes: list[str] = []
            nonint = 0
            max_value = 0.0
            zero_cells = 0
            bar = tqdm(total=src.n_obs, unit="cell", desc="ingest", disable=not progress)
            with ExitStack() as stack:
                xw: CsrWriter | None = None
                for start, x in _chunks(src, rows_per_chunk):
                    x.sum_duplicates()
                    x.sort_indices()
                    check_values(x, start, src_path, var.index)
                    if x.nnz:
                        nonint += int(np.count_nonzero(x.data != np.round(x.data)))
                        max_value = max(max_value, float(x.data.max()))
                    zero_cells += int(np.count_nonzero(np.diff(x.indptr) == 0))
                    hashes.append(chunk_hash(x))
                    if xw is None:
                        chunk = chunk_elements(x, rows_per_chunk)
                        xw = stack.enter_context(CsrWriter(group, "X", x, chunk))
                    else:
                        xw.append(x)
                    fault_point("ingest_chunk", tmp)
                    bar.update(x.shape[0])
                assert xw is not None  # n_obs > 0 was checked
                xw.close()
            bar.close()
            detected = detect_x_kind(nonint, max_value)
            chosen = detected if x_kind == "auto" else x_kind
            if chosen == "unknown":
                raise InputError(
                    f"{src_path}: X is neither raw counts (it has {nonint} non-integer values) nor "
                    f"log-normalised (max {max_value:.4g} > {LOGNORM_MAX})",
                    fix="set input.x_kind: counts in the config (raypipe ingest: --x-kind counts) "
                    "when X holds counts (e.g. ambient-corrected), or lognorm; or use the raw "
                    "counts layer (input.layer / --layer)",
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
    except BaseException as exc:
        if "tmp" in locals():
            _remove(tmp)
        if is_disk_full(exc):
            raise disk_full_error(out) from None
        raise
    if isinstance(out, Path):
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # type: ignore[union-attr]
    return IngestResult(open_atlas(out), time.perf_counter() - t0, zero_cells, dup)


def _staging(out: AnyPath) -> AnyPath:
    """Where ingest writes: a temporary sibling locally; ``out`` itself (emptied) in a bucket."""
    if isinstance(out, ObjectPath):
        out.rmtree()  # no rename on object stores: the metadata written last commits
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _remove(path: AnyPath) -> None:
    """Delete a store that failed half-way (a bucket's has no raypipe metadata yet)."""
    if isinstance(path, ObjectPath):
        try:
            path.rmtree()
        except (OSError, InputError):
            log.warning("could not remove the partial atlas %s", path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
