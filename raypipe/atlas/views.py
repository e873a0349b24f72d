"""Atlas views: inputs read where they live, with no ingest copy.

Two kinds of input become an *atlas view* — ``<output_dir>/state/atlas_view.json``, which
:func:`raypipe.atlas.store.open_atlas` and every reader of :mod:`raypipe.atlas.store` take
like an atlas ``.zarr``:

* an AnnData ``.zarr`` (local or in a bucket) whose X (or ``input.layer``) is CSR stored in
  chunks no larger than a shard (:func:`inplace_layout` says why not otherwise, and the run
  ingests it as before). Row chunks follow the store's own chunk grid: a whole number of
  data chunks' worth of rows (``nnz / n_obs`` values per row on average), near
  ``input.rows_per_chunk``. A row chunk's content hash is taken from the *stored bytes* of the
  data/indices chunks its values lie in, plus its row lengths — the bytes are read once and
  cached in ``state/atlas_chunks.json`` by each chunk file's size and modification time (in a
  bucket: its ETag), so a re-run reads only the chunk files that changed;
* a TileDB-SOMA experiment (:mod:`raypipe.atlas.soma`): the ``soma_joinid`` the filter
  selects are stored once as ``state/soma_joinids.zarr``; a row chunk's hash is that of its
  joinids (with the measurement and layer): SOMA appends new cells under new joinids, so a
  grown experiment keeps the hashes of the cells it had.

Both kinds detect counts vs log-normalised values on a sample of row chunks
(:data:`SAMPLE_CHUNKS`, evenly spread), where ingest scans everything; the in-place reader
checks every row it reads for NaN/inf/negative values instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.atlas.ingest import atlas_metadata, detect_x_kind
from raypipe.atlas.store import ATLAS_ATTR, AtlasInfo, ZarrRows, check_values, open_atlas
from raypipe.core.outputs import atomic_write_json, read_marker
from raypipe.core.storage import AnyPath, ObjectPath, as_path, zarr_store
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = [
    "CHUNK_CACHE",
    "JOINIDS",
    "SAMPLE_CHUNKS",
    "VIEW",
    "element_paths",
    "inplace_layout",
    "soma_view",
    "zarr_view",
]

log = logging.getLogger(__name__)

VIEW = Path("state") / "atlas_view.json"
CHUNK_CACHE = Path("state") / "atlas_chunks.json"
JOINIDS = Path("state") / "soma_joinids.zarr"
#: Row chunks read to tell counts from log-normalised values (evenly spread over the atlas).
SAMPLE_CHUNKS = 8
_HASH_THREADS = 8


def element_paths(layer: str | None) -> tuple[str, str]:
    """Zarr paths of the matrix and its var for ``input.layer`` (None, ``raw`` or a name)."""
    if layer == "raw":
        return "raw/X", "raw/var"
    if layer:
        return f"layers/{layer}", "var"
    return "X", "var"


def inplace_layout(src: AnyPath, job: JobConfig) -> tuple[dict[str, Any] | None, str]:
    """How an AnnData ``.zarr`` is read in place, or ``(None, why it must be ingested)``.

    Parameters
    ----------
    src
        A Zarr store holding an AnnData (already checked by ``validate_job``).
    job
        ``input.layer``, ``input.rows_per_chunk``, ``input.in_place``, ``shards.rows``.
    """
    import zarr

    if not job.input.in_place:
        return None, "input.in_place is false"
    x_key, var_key = element_paths(job.input.layer)
    group = zarr.open_group(zarr_store(src), mode="r")
    node: Any = group[x_key]
    enc = dict(node.attrs).get("encoding-type", "array")
    if enc == "csc_matrix":
        return None, f"{x_key} is stored as CSC (a cell's values are not contiguous)"
    if enc != "csr_matrix":
        return None, f"{x_key} is a dense array (raypipe reads sparse CSR row chunks)"
    data, indptr = node["data"], node["indptr"]
    n_obs = int(indptr.shape[0]) - 1
    if n_obs <= 0:
        return None, f"{x_key} has no cells"
    nnz = int(indptr[n_obs])
    chunk = int(data.chunks[0])
    per_row = nnz / max(n_obs, 1)
    chunk_rows = max(1, math.ceil(chunk / per_row)) if nnz else job.input.rows_per_chunk
    if chunk_rows > job.shards.rows:
        return None, (
            f"{x_key}'s chunks hold about {chunk_rows:,} cells each ({chunk:,} values per chunk, "
            f"{per_row:,.0f} per cell), more than a shard (shards.rows = {job.shards.rows:,})"
        )
    target = min(job.input.rows_per_chunk, job.shards.rows)
    rows = chunk_rows * max(1, target // chunk_rows)
    return {
        "store": str(src.resolve()) if isinstance(src, Path) else str(src),  # actors' cwd differs
        "x": x_key,
        "var": var_key,
        "rows_per_chunk": rows,
        "n_obs": n_obs,
        "nnz": nnz,
    }, ""


# --------------------------------------------------------------------------- chunk hashes


def _chunk_files(array: AnyPath) -> dict[str, str]:
    """Chunk files of a Zarr array → a signature that changes when the file does."""
    meta = {"zarr.json", ".zarray", ".zattrs"}
    out: dict[str, str] = {}
    if isinstance(array, ObjectPath):
        found = array.fs.find(array.key, detail=True)
        for key, info in found.items():
            rel = key[len(array.key) :].strip("/")
            if rel and rel.rsplit("/", 1)[-1] not in meta:
                tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or ""
                out[rel] = f"{info.get('size')}:{tag}"
        return out
    for root, _, files in os.walk(array):
        for f in files:
            if f in meta:
                continue
            p = Path(root) / f
            st = p.stat()
            out[p.relative_to(array).as_posix()] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def _file_hashes(
    store: AnyPath, names: dict[str, str], cache: dict[str, Any]
) -> tuple[dict[str, str], int]:
    """blake2b of each chunk file's bytes, reusing ``cache`` where the signature is unchanged.

    Returns the hashes and how many files were read.
    """
    todo = [n for n, sig in names.items() if (cache.get(n) or [None])[0] != sig]

    def digest(name: str) -> str:
        return hashlib.blake2b((store / name).read_bytes(), digest_size=12).hexdigest()

    with ThreadPoolExecutor(_HASH_THREADS) as pool:  # hashlib releases the GIL on big buffers
        fresh = dict(zip(todo, pool.map(digest, todo), strict=True))
    if todo:
        log.info("hashed %d of %d chunk files of %s", len(todo), len(names), store)
    return {n: fresh[n] if n in fresh else cache[n][1] for n in names}, len(todo)


def _row_chunk_hashes(
    src: AnyPath, layout: dict[str, Any], out_dir: AnyPath
) -> tuple[list[str], int]:
    """Content hash of every row chunk from its row lengths and its stored chunk bytes.

    Returns the hashes and how many chunk files were read (the others came from the cache).
    """
    import zarr

    group = zarr.open_group(zarr_store(src), mode="r")
    node: Any = group[layout["x"]]
    indptr = np.asarray(node["indptr"][:], dtype=np.int64)
    cache_path = out_dir / CHUNK_CACHE
    old = read_marker(cache_path) or {}
    cache = old if old.get("store") == layout["store"] else {}
    new_cache: dict[str, Any] = {"store": layout["store"]}
    per_file: dict[str, list[str]] = {}  # data / indices → hash of each stored file, in order
    grid: dict[str, int] = {}  # data / indices → values per stored file
    n_read = 0
    for name in ("data", "indices"):
        arr: Any = node[name]
        path = f"{layout['x']}/{name}"
        files = _chunk_files(src / path)
        hashes, n = _file_hashes(src / path, files, cache.get(path) or {})
        n_read += n
        new_cache[path] = {f: [files[f], hashes[f]] for f in files}
        grid[name] = int((arr.shards or arr.chunks)[0])  # what one stored file holds
        n_files = max(1, math.ceil(int(arr.shape[0]) / grid[name]))
        keys = [arr.metadata.encode_chunk_key((i,)) for i in range(n_files)]
        per_file[name] = [hashes.get(k, "absent") for k in keys]  # absent: fill-value chunk
    atomic_write_json(cache_path, new_cache)
    rows, n_obs = int(layout["rows_per_chunk"]), int(layout["n_obs"])
    out = []
    for r0 in range(0, n_obs, rows):
        r1 = min(r0 + rows, n_obs)
        lo, hi = int(indptr[r0]), int(indptr[r1])
        h = hashlib.blake2b(digest_size=12)
        h.update(np.diff(indptr[r0 : r1 + 1]).tobytes())
        for name in ("data", "indices"):
            if hi > lo:
                for i in range(lo // grid[name], (hi - 1) // grid[name] + 1):
                    h.update(f"{name}{i}:{per_file[name][i]}".encode())
        out.append(h.hexdigest())
    return out, n_read


def _sample_kind(reader: Any, n_obs: int, rows: int, var_names: Any, where: str) -> str:
    """Detect counts vs log-normalised values on up to :data:`SAMPLE_CHUNKS` row chunks."""
    n_chunks = max(1, math.ceil(n_obs / rows))
    picks = sorted({int(i) for i in np.linspace(0, n_chunks - 1, min(SAMPLE_CHUNKS, n_chunks))})
    nonint, max_value = 0, 0.0
    for c in picks:
        x = reader.rows(c * rows, min((c + 1) * rows, n_obs))
        check_values(x, c * rows, where, var_names)
        if x.nnz:
            nonint += int(np.count_nonzero(x.data != np.round(x.data)))
            max_value = max(max_value, float(x.data.max()))
    return detect_x_kind(nonint, max_value)


def _x_kind(job: JobConfig, detected: str, where: str) -> str:
    chosen = detected if job.input.x_kind == "auto" else job.input.x_kind
    if chosen == "unknown":
        raise InputError(
            f"{where}: X is neither raw counts nor log-normalised (on a sample of "
            f"{SAMPLE_CHUNKS} row chunks)",
            fix="set input.x_kind: counts (or lognorm) when you know what X holds, or choose "
            "the raw counts (input.layer / input.soma.layer)",
        )
    return chosen


def _write_view(out_dir: AnyPath, kind: str, source: dict[str, Any], meta: dict[str, Any]) -> Any:
    path = out_dir / VIEW
    atomic_write_json(path, {"kind": kind, "source": source, ATLAS_ATTR: meta})
    return path


def zarr_view(src: AnyPath, layout: dict[str, Any], job: JobConfig, out_dir: AnyPath) -> AtlasInfo:
    """Describe an AnnData ``.zarr`` read in place as an atlas view (see the module doc)."""
    source = {k: layout[k] for k in ("store", "x", "var")}
    reader = ZarrRows(layout["store"], layout["x"], layout["var"], checked=False)
    var = reader.var()
    var.index = var.index.astype(str)
    hashes, n_read = _row_chunk_hashes(src, layout, out_dir)
    rows = int(layout["rows_per_chunk"])
    detected = _sample_kind(reader, layout["n_obs"], rows, var.index, str(src))
    meta = atlas_metadata(
        n_obs=int(layout["n_obs"]),
        var_names=var.index,
        x_kind=_x_kind(job, detected, str(src)),
        x_kind_detected=detected,
        rows_per_chunk=rows,
        chunk_hashes=hashes,
        source=str(src),
        layer=job.input.layer,
        zero_count_cells=None,  # not scanned: the run flags them `empty`
    )
    meta["chunk_files_hashed"] = n_read
    _write_view(out_dir, "anndata_zarr", source, meta)
    return open_atlas(out_dir / VIEW)


def soma_view(job: JobConfig, out_dir: AnyPath) -> AtlasInfo:
    """Resolve a SOMA input's cells once and describe them as an atlas view."""
    import zarr

    from raypipe.atlas.soma import SomaRows, resolve_selection

    columns = [c for c in (job.input.label_key, job.input.batch_key) if c]
    sel = resolve_selection(job.input.path, job.input.soma, [*columns, *job.input.soma.obs_columns])
    rows = job.input.rows_per_chunk
    ids_path = out_dir / JOINIDS
    arr = zarr.create_array(
        zarr_store(as_path(ids_path), read_only=False),
        shape=sel.joinids.shape,
        chunks=(rows,),
        dtype="int64",
        overwrite=True,
    )
    arr[:] = sel.joinids
    source = sel.source | {"joinids": str(ids_path)}
    salt = f"soma|{source['measurement']}|{source['layer']}|{source.get('census_version')}|"
    hashes = [
        hashlib.blake2b(
            salt.encode() + sel.joinids[r0 : r0 + rows].tobytes(), digest_size=12
        ).hexdigest()
        for r0 in range(0, sel.joinids.size, rows)
    ]
    where = str(source.get("uri") or job.input.path)
    detected = _sample_kind(SomaRows(source), sel.joinids.size, rows, sel.var.index, where)
    meta = atlas_metadata(
        n_obs=int(sel.joinids.size),
        var_names=sel.var.index,
        x_kind=_x_kind(job, detected, where),
        x_kind_detected=detected,
        rows_per_chunk=rows,
        chunk_hashes=hashes,
        source=job.input.path,
        layer=source["layer"],
        zero_count_cells=None,
    )
    meta["obs_value_filter"] = source["obs_value_filter"]
    _write_view(out_dir, "soma", source, meta)
    return open_atlas(out_dir / VIEW)
