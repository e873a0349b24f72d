"""The atlas store: a Zarr v3 AnnData with CSR ``X`` chunked along rows, plus metadata.

The driver reads only metadata (:func:`open_atlas`) and plans row-range shards aligned to the
row chunks (:func:`plan_shards`); tasks read their own rows (:func:`read_shard`) with
``anndata.io.sparse_dataset``, so sparse data never travels through the object store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.core.plan import Shard
from raypipe.core.stage import ShardStage
from raypipe.core.storage import AnyPath, as_path, zarr_store
from raypipe.errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

__all__ = [
    "ATLAS_ATTR",
    "AtlasInfo",
    "AtlasShardStage",
    "Shard",
    "open_atlas",
    "plan_shards",
    "read_obs",
    "read_obs_columns",
    "read_obs_names",
    "read_rows",
    "read_shard",
    "read_var",
]

ATLAS_ATTR = "raypipe_atlas"


@dataclass(frozen=True)
class AtlasInfo:
    """What the driver knows about an atlas (metadata only).

    Attributes
    ----------
    path
        The ``.zarr`` store.
    n_obs, n_vars
        Cells and genes.
    x_kind
        ``counts`` or ``lognorm`` (what X holds, as used by the pipeline).
    x_kind_detected
        What ingest detected (``x_kind`` differs when the user overrode it).
    rows_per_chunk
        Row chunk size; shards are whole multiples of it.
    chunk_hashes
        Content hash of each row chunk (indptr deltas, indices and values).
    source
        The file the atlas was ingested from.
    """

    path: str
    n_obs: int
    n_vars: int
    x_kind: str
    x_kind_detected: str
    rows_per_chunk: int
    chunk_hashes: tuple[str, ...]
    source: str
    var_hash: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _open_group(path: str | AnyPath) -> Any:
    import zarr

    p = as_path(path)
    if not p.exists():
        raise InputError(
            f"atlas {p} does not exist", fix=f"run `raypipe ingest INPUT --out {p}` first"
        )
    try:
        return zarr.open_group(zarr_store(p), mode="r")
    except Exception as exc:
        raise InputError(
            f"{p} is not a Zarr store ({type(exc).__name__}: {exc})",
            fix="pass an atlas written by `raypipe ingest`, or an .h5ad to ingest on the fly",
        ) from None


def open_atlas(path: str | AnyPath) -> AtlasInfo:
    """Read the atlas metadata written by ``raypipe ingest``.

    Raises
    ------
    InputError
        When ``path`` is missing, not Zarr, or not a raypipe atlas.
    """
    group = _open_group(path)
    meta = dict(group.attrs).get(ATLAS_ATTR)
    if meta is None:
        raise InputError(
            f"{path} is a Zarr store but not a raypipe atlas (no {ATLAS_ATTR!r} metadata)",
            fix=f"ingest it first: raypipe ingest {path} --out atlas.zarr",
        )
    return AtlasInfo(
        path=str(path),
        n_obs=int(meta["n_obs"]),
        n_vars=int(meta["n_vars"]),
        x_kind=str(meta["x_kind"]),
        x_kind_detected=str(meta["x_kind_detected"]),
        rows_per_chunk=int(meta["rows_per_chunk"]),
        chunk_hashes=tuple(meta["chunk_hashes"]),
        source=str(meta.get("source", "")),
        var_hash=str(meta["var_hash"]),
        extra={k: v for k, v in meta.items() if k not in {"chunk_hashes"}},
    )


def plan_shards(atlas: AtlasInfo, rows: int) -> list[Shard]:
    """Split the atlas into shards of about ``rows`` rows, aligned to whole row chunks.

    Parameters
    ----------
    atlas
        Atlas metadata from :func:`open_atlas`.
    rows
        Target rows per shard; rounded up to a multiple of ``atlas.rows_per_chunk``.
    """
    if rows <= 0:
        raise InputError(
            f"shards.rows must be > 0 (got {rows})", fix="set shards.rows to e.g. 4096"
        )
    per = max(1, -(-rows // atlas.rows_per_chunk))  # chunks per shard
    shards = []
    n_chunks = len(atlas.chunk_hashes)
    for index, c0 in enumerate(range(0, n_chunks, per)):
        c1 = min(c0 + per, n_chunks)
        digest = hashlib.blake2b(digest_size=12)
        for h in atlas.chunk_hashes[c0:c1]:
            digest.update(h.encode())
        start = c0 * atlas.rows_per_chunk
        stop = min(c1 * atlas.rows_per_chunk, atlas.n_obs)
        shards.append(Shard(index, start, stop, digest.hexdigest()))
    return shards


def read_shard(path: str | AnyPath, start: int, stop: int) -> sp.csr_matrix:
    """Read rows ``[start, stop)`` of X as a float32 CSR matrix (only those rows are read)."""
    from anndata.io import sparse_dataset

    group = _open_group(path)
    x = sparse_dataset(group["X"])[start:stop]
    return x.astype(np.float32, copy=False).tocsr()


def read_rows(atlas: AtlasInfo, rows: np.ndarray, *, threads: int = 2) -> sp.csr_matrix:
    """Read the sorted atlas ``rows`` of X (float32 CSR, in the order given).

    Only blocks of 8 row chunks that hold some of the rows are read, on ``threads`` threads
    (Zarr's decompression leaves the GIL: 1M cells, 20,000 sampled, 6.0 → 4.0 s), in order,
    at most ``threads`` blocks in memory beyond the result.
    """
    from concurrent.futures import ThreadPoolExecutor

    import scipy.sparse as sp

    rows = np.asarray(rows, dtype=np.int64)
    step = 8 * atlas.rows_per_chunk

    def block(start: int) -> sp.csr_matrix:
        stop = min(start + step, atlas.n_obs)
        return read_shard(atlas.path, start, stop)[rows[(rows >= start) & (rows < stop)] - start]

    starts = np.unique(rows // step) * step  # only blocks holding some of the rows
    if starts.size == 0:
        return sp.csr_matrix((0, atlas.n_vars), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raypipe-rows") as pool:
        return sp.vstack(list(pool.map(block, starts.tolist()))).tocsr()


def read_obs_names(path: str | AnyPath, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Return obs names of rows ``[start, stop)`` (reads only the chunks it needs)."""
    group = _open_group(path)
    obs = group["obs"]
    index_key = obs.attrs.get("_index", "_index")
    arr = obs[index_key]
    values = arr[start : (stop if stop is not None else arr.shape[0])]
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=object)


def read_obs_columns(path: str | AnyPath, columns: list[str]) -> pd.DataFrame:
    """Read whole obs columns (labels, batches); a missing column names the ones present."""
    import pandas as pd
    from anndata.io import read_elem

    group = _open_group(path)
    obs = group["obs"]
    present = list(obs.attrs.get("column-order", []))
    missing = [c for c in columns if c not in present]
    if missing:
        raise InputError(
            f"obs of {path} has no column {missing[0]!r}; columns present: {', '.join(present) or '(none)'}",
            fix="set input.label_key / input.batch_key to one of the columns present",
        )
    data = {c: read_elem(obs[c]) for c in columns}
    return pd.DataFrame(data, index=read_obs_names(path))


def read_obs(path: str | AnyPath) -> pd.DataFrame:
    """Read the whole obs table (cell names in the index)."""
    from anndata.io import read_elem

    return read_elem(_open_group(path)["obs"])


def read_var(path: str | AnyPath) -> pd.DataFrame:
    """Read the var table (gene names in the index)."""
    from anndata.io import read_elem

    return read_elem(_open_group(path)["var"])


class AtlasShardStage(ShardStage):
    """A :class:`~raypipe.core.stage.ShardStage` whose rows come from the Zarr atlas."""

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` of X (float32 CSR)."""
        return read_shard(self.atlas_path, start, stop)

    def read_names(self, start: int, stop: int) -> np.ndarray:
        """Obs names of rows ``[start, stop)``."""
        return read_obs_names(self.atlas_path, start, stop)
