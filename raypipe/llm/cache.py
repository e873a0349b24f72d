"""A durable, content-addressed cache of every paid LLM result.

Layout: a folder of immutable parquet files. Every writer (one per actor/process) buffers its
new results and flushes them as a new segment ``seg-<host>-<pid>-<rand>-<seq>.parquet``
(written to a temporary name, then renamed: readers never see half a file). Nothing is ever
appended in place, so any number of writers on any number of nodes can share the folder (on a
shared file system) without locks. :func:`compact` merges segments into one ``merged-*.parquet``
and only then deletes the files it read, so a concurrent writer or merger never loses data (at
worst a key is stored twice, which readers resolve by keeping one).

Readers index only the ``key`` column of every file (key → file, row group, row) and read the
values of the row groups they need, so a cache far larger than memory stays usable.

Key: ``sha256(backend, model, kind, version, params, input text)`` (:func:`cache_key`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.core.storage import AnyPath, ObjectPath, as_path, sorted_paths

__all__ = ["CacheEntry", "LLMCache", "cache_key", "compact", "prune", "stats"]

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("kind", pa.string()),
        ("version", pa.string()),
        ("text", pa.string()),
        ("vec", pa.binary()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("created", pa.float64()),
    ]
)
ROW_GROUP = 8192


def cache_key(
    backend: str,
    model: str,
    kind: str,
    version: str,
    text: str,
    params: dict[str, Any] | None = None,
) -> str:
    """Return the hex sha256 content address of one LLM call.

    Parameters
    ----------
    backend, model, kind, version
        E.g. ``"openai"``, ``"text-embedding-3-small"``, ``"embed"`` / ``"chat"``, ``"v1"``.
    text
        The input text (or the rendered prompt).
    params
        Parameters that change the answer (dimensions, temperature, max_tokens).
    """
    blob = json.dumps(
        [backend, model, kind, version, params or {}, text], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One cached result: a chat answer (``text``) or an embedding (``vec``)."""

    text: str | None
    vec: np.ndarray | None
    tokens_in: int
    tokens_out: int


def _files(path: AnyPath) -> list[AnyPath]:
    return sorted_paths([p for p in path.glob("*.parquet") if not p.name.startswith(".")])


def _parquet(f: AnyPath) -> pq.ParquetFile:
    """Open a segment (a bucket's is fetched whole: segments are small and written once)."""
    if isinstance(f, ObjectPath):
        return pq.ParquetFile(io.BytesIO(f.read_bytes()))
    return pq.ParquetFile(f)


def _write_atomic(table: pa.Table, dest: AnyPath) -> None:
    if isinstance(dest, ObjectPath):  # one PUT: visible whole or not at all
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="zstd")
        dest.write_bytes(buf.getvalue())
        return
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression="zstd")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)


class LLMCache:
    """Read and write one cache folder.

    Parameters
    ----------
    path
        The cache folder (created if missing).
    flush_rows, flush_every_s
        A new segment is written when this many results are buffered, or this many seconds
        have passed since the last flush (checked on :meth:`put`), and on :meth:`flush`.
        A crash loses at most the unflushed results.
    """

    def __init__(self, path: str | AnyPath, *, flush_rows: int = 4096, flush_every_s: float = 5.0):
        self.path = as_path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.flush_rows, self.flush_every_s = flush_rows, flush_every_s
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._seq = 0
        self._pending: dict[str, dict[str, Any]] = {}
        self._last_flush = time.monotonic()
        self._index: dict[str, tuple[str, int, int]] = {}
        self._known: set[str] = set()
        self._groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = self.misses = 0
        self.refresh()

    # ------------------------------------------------------------------ index
    def _index_file(self, f: AnyPath) -> None:
        pf = _parquet(f)
        for rg in range(pf.num_row_groups):
            keys = pf.read_row_group(rg, columns=["key"]).column(0).to_pylist()
            for i, k in enumerate(keys):
                self._index[k] = (f.name, rg, i)
        self._known.add(f.name)

    def refresh(self) -> None:
        """Pick up segments written by other writers since the last look."""
        with self._lock:
            names = {f.name: f for f in _files(self.path)}
            if self._known - set(names):  # a compaction removed files: rebuild
                self._index.clear()
                self._known.clear()
                self._groups.clear()
            for name in sorted(set(names) - self._known):
                try:
                    self._index_file(names[name])
                except FileNotFoundError:
                    continue

    def __len__(self) -> int:
        return len(set(self._index) | set(self._pending))

    def __contains__(self, key: object) -> bool:
        return key in self._pending or key in self._index

    # ------------------------------------------------------------------ read
    def _group(self, name: str, rg: int) -> pa.Table:
        k = (name, rg)
        if k in self._groups:
            self._groups.move_to_end(k)
            return self._groups[k]
        cols = ["text", "vec", "tokens_in", "tokens_out"]
        t = _parquet(self.path / name).read_row_group(rg, columns=cols)
        self._groups[k] = t
        while len(self._groups) > 8:
            self._groups.popitem(last=False)
        return t

    def get_many(self, keys: list[str]) -> dict[str, CacheEntry]:
        """Return the cached entries among ``keys`` (missing keys are absent)."""
        with self._lock:
            for attempt in range(2):
                try:
                    return self._get_many(keys)
                except FileNotFoundError:
                    if attempt:
                        raise
                    self._known.add("\x00gone")  # force a rebuild
                    self.refresh()
        return {}  # pragma: no cover

    def _get_many(self, keys: list[str]) -> dict[str, CacheEntry]:
        out: dict[str, CacheEntry] = {}
        by_group: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for k in keys:
            if k in self._pending:
                r = self._pending[k]
                vec = np.frombuffer(r["vec"], np.float32) if r["vec"] is not None else None
                out[k] = CacheEntry(r["text"], vec, r["tokens_in"], r["tokens_out"])
            elif k in self._index:
                name, rg, i = self._index[k]
                by_group.setdefault((name, rg), []).append((k, i))
        for (name, rg), items in by_group.items():
            t = self._group(name, rg)
            text, vec = t.column("text"), t.column("vec")
            tin, tout = t.column("tokens_in"), t.column("tokens_out")
            for k, i in items:
                v = vec[i].as_py()
                out[k] = CacheEntry(
                    text[i].as_py(),
                    np.frombuffer(v, np.float32) if v is not None else None,
                    int(tin[i].as_py() or 0),
                    int(tout[i].as_py() or 0),
                )
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    # ------------------------------------------------------------------ write
    def put(
        self,
        key: str,
        *,
        backend: str,
        model: str,
        kind: str,
        version: str,
        text: str | None = None,
        vec: np.ndarray | None = None,
        tokens_in: int = 0,
        tokens_out: int = 0,
    ) -> None:
        """Buffer one result (flushed per :attr:`flush_rows` / :attr:`flush_every_s`)."""
        with self._lock:
            self._pending[key] = {
                "key": key,
                "backend": backend,
                "model": model,
                "kind": kind,
                "version": version,
                "text": text,
                "vec": None if vec is None else np.asarray(vec, np.float32).tobytes(),
                "tokens_in": int(tokens_in),
                "tokens_out": int(tokens_out),
                "created": time.time(),
            }
            due = time.monotonic() - self._last_flush >= self.flush_every_s
            if len(self._pending) >= self.flush_rows or due:
                self.flush()

    def flush(self) -> AnyPath | None:
        """Write buffered results as a new segment; return its path (None if nothing)."""
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._pending:
                return None
            rows = list(self._pending.values())
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            dest = self.path / f"seg-{self.writer}-{self._seq:06d}.parquet"
            self._seq += 1
            _write_atomic(table, dest)
            for i, r in enumerate(rows):
                self._index[r["key"]] = (dest.name, i // ROW_GROUP, i % ROW_GROUP)
            self._known.add(dest.name)
            self._pending.clear()
            return dest

    def close(self) -> None:
        """Flush what is buffered."""
        self.flush()


def _read_all(files: list[AnyPath]) -> pa.Table:
    tables = []
    for f in files:
        try:
            tables.append(
                _parquet(f).read(schema=SCHEMA)
                if isinstance(f, ObjectPath)
                else pq.read_table(f, schema=SCHEMA)
            )
        except FileNotFoundError:
            continue
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _dedup(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    keys = table.column("key").to_numpy(zero_copy_only=False)
    _, first = np.unique(keys[::-1], return_index=True)  # keep the newest copy
    return table.take(np.sort(table.num_rows - 1 - first))


def compact(path: str | AnyPath, *, drop: Any = None) -> dict[str, int]:
    """Merge every segment of the cache at ``path`` into one file, then delete the inputs.

    Parameters
    ----------
    path
        Cache folder.
    drop
        Optional ``pyarrow.compute`` boolean expression over the columns; matching rows are
        removed (used by :func:`prune`).

    Returns
    -------
    dict
        ``files_in``, ``rows_in``, ``rows_out``.
    """
    path = as_path(path)
    files = _files(path)
    table = _dedup(_read_all(files))
    rows_in = table.num_rows
    if drop is not None and rows_in:
        table = table.filter(~drop)
    if table.num_rows:
        _write_atomic(table, path / f"merged-{int(time.time())}-{uuid.uuid4().hex[:8]}.parquet")
    for f in files:
        f.unlink(missing_ok=True)
    return {"files_in": len(files), "rows_in": rows_in, "rows_out": table.num_rows}


def prune(
    path: str | AnyPath,
    *,
    model: str | None = None,
    kind: str | None = None,
    older_than_days: float | None = None,
    everything: bool = False,
) -> dict[str, int]:
    """Remove entries (all conditions given must match), compacting the cache.

    With no condition this only compacts. Returns :func:`compact`'s counts plus ``removed``.
    """
    import pyarrow.compute as pc

    conds = []
    if model is not None:
        conds.append(pc.field("model") == model)
    if kind is not None:
        conds.append(pc.field("kind") == kind)
    if older_than_days is not None:
        conds.append(pc.field("created") < time.time() - older_than_days * 86400)
    expr = None
    if everything:
        expr = pc.scalar(True)
    for c in conds:
        expr = c if expr is None else expr & c
    out = compact(path, drop=expr)
    out["removed"] = out["rows_in"] - out["rows_out"]
    return out


def stats(path: str | AnyPath) -> dict[str, Any]:
    """Summarise a cache folder: entries, files, bytes, tokens, counts by model and kind."""
    path = as_path(path)
    files = _files(path)
    cols = ["key", "model", "kind", "tokens_in", "tokens_out"]
    tables = []
    for f in files:
        try:
            tables.append(_parquet(f).read(columns=cols))
        except FileNotFoundError:
            continue
    empty = pa.schema([SCHEMA.field(c) for c in cols]).empty_table()
    t = _dedup(pa.concat_tables(tables)) if tables else empty
    df = t.to_pandas()
    by = (
        df.groupby(["model", "kind"]).size().rename("entries").reset_index().to_dict("records")
        if len(df)
        else []
    )
    return {
        "path": str(path),
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files if f.exists()),
        "entries": len(df),
        "tokens_in": int(df["tokens_in"].sum()) if len(df) else 0,
        "tokens_out": int(df["tokens_out"].sum()) if len(df) else 0,
        "by_model_kind": by,
    }
