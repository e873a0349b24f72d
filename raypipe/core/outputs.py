"""Atomic, resumable outputs: shard parts, completion markers, the manifest.

A shard's part is written under a temporary name and renamed into place; only then is its
completion marker written (also atomically). A part without a matching marker is never
counted as done, so a crash leaves nothing that looks complete.
"""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.core.storage import AnyPath, ObjectPath, as_path, sorted_paths, write_bytes_atomic
from raypipe.errors import RaypipeError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "disk_full_error",
    "embedding_table",
    "is_disk_full",
    "marker_path",
    "part_path",
    "read_frame",
    "read_marker",
    "read_parquet",
    "read_parts",
    "write_parquet_atomic",
]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, OSError) and ("[Errno 28]" in str(exc) or "No space left" in str(exc))


def disk_full_error(path: str | AnyPath) -> RaypipeError:
    """Return the error a full disk gives: the path written and the fix."""
    return RaypipeError(
        f"disk full while writing {path} (No space left on device)",
        fix="free space on that disk or point output_dir at a larger one, then re-run: "
        "finished shards are kept and reused",
    )


@contextmanager
def _disk_full_named(path: Path, tmp: Path) -> Iterator[None]:
    """Create ``path``'s folder; on failure remove ``tmp``; a full disk names ``path``."""
    from raypipe.core.faults import fault_point

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fault_point("write", path)
        yield
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from None
        raise


def atomic_write_bytes(path: AnyPath, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename (one PUT on a bucket)."""
    if isinstance(path, ObjectPath):
        write_bytes_atomic(path, data)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with _disk_full_named(path, tmp):
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def atomic_write_json(path: AnyPath, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_parquet_atomic(path: AnyPath, table: Any) -> None:
    """Write a pyarrow table to ``path`` atomically (on a bucket: one PUT of the whole file)."""
    import pyarrow.parquet as pq

    if isinstance(path, ObjectPath):
        buf = io.BytesIO()
        pq.write_table(table, buf, use_dictionary=False)
        path.write_bytes(buf.getvalue())
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with _disk_full_named(path, tmp):
        pq.write_table(table, tmp, use_dictionary=False)  # embeddings and cell names never repeat
        os.replace(tmp, path)


def part_path(out_dir: str | AnyPath, kind: str, method: str, shard: int) -> AnyPath:
    """Return ``<out>/<kind>/<method>/part-<shard>.parquet``."""
    return as_path(out_dir) / kind / method / f"part-{shard:05d}.parquet"


def marker_path(out_dir: str | AnyPath, stage: str, shard: int) -> AnyPath:
    """Return the completion marker of ``stage`` for ``shard``."""
    return as_path(out_dir) / "state" / stage / f"shard-{shard:05d}.json"


def read_parquet(path: AnyPath, columns: list[str] | None = None) -> Any:
    """Read a parquet file (local or in a bucket) as a pyarrow table."""
    import pyarrow.parquet as pq

    if isinstance(path, ObjectPath):
        return pq.read_table(io.BytesIO(path.read_bytes()), columns=columns)
    return pq.read_table(path, columns=columns)


def read_frame(path: AnyPath, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a parquet file (local or in a bucket) as a pandas DataFrame."""
    import pandas as pd

    if isinstance(path, ObjectPath):
        return pd.read_parquet(io.BytesIO(path.read_bytes()), columns=columns)
    return pd.read_parquet(path, columns=columns)


def read_marker(path: AnyPath) -> dict[str, Any] | None:
    """Read a completion marker (None when absent or unreadable)."""
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def embedding_table(
    obs_names: np.ndarray,
    shard: int,
    start: int,
    embedding: np.ndarray,
    empty: np.ndarray,
    metadata: dict[str, str],
) -> Any:
    """Build the output table: obs_name, shard, row, embedding (fixed-size list), empty.

    Parameters
    ----------
    obs_names
        (n,) cell names.
    shard, start
        Shard index and the atlas row of the first cell.
    embedding
        (n, d) float32.
    empty
        (n,) bool: the cell had no usable signal (zero counts / no known genes); its
        embedding is all zeros.
    metadata
        Stored in the parquet schema (method, fingerprint, model ...).
    """
    import pyarrow as pa

    n, d = embedding.shape
    flat = pa.array(np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1))
    emb = (
        pa.FixedSizeListArray.from_arrays(flat, d) if n else pa.array([], pa.list_(pa.float32(), d))
    )
    table = pa.table(
        {
            "obs_name": pa.array([str(x) for x in obs_names], pa.string()),
            "shard": pa.array(np.full(n, shard, dtype=np.int32)),
            "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "embedding": emb,
            "empty": pa.array(np.asarray(empty, dtype=bool)),
        }
    )
    return table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})


def read_parts(
    out_dir: str | AnyPath, kind: str, method: str, columns: list[str] | None = None
) -> pd.DataFrame:
    """Read every part of an output, sorted by atlas row (``columns`` absent from a part are skipped)."""
    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted_paths((as_path(out_dir) / kind / method).glob("part-*.parquet"))
    if not files:
        return pd.DataFrame(columns=columns or [])

    def read(f: AnyPath) -> pd.DataFrame:
        if isinstance(f, ObjectPath):
            t = pq.read_table(io.BytesIO(f.read_bytes()))
            keep = (
                t.column_names if columns is None else [c for c in columns if c in t.column_names]
            )
            return t.select(keep).to_pandas()
        names = pq.read_schema(f).names
        cols = None if columns is None else [c for c in columns if c in names]
        return pq.read_table(f, columns=cols).to_pandas()

    df = pd.concat([read(f) for f in files], ignore_index=True)
    return df.sort_values("row").reset_index(drop=True) if "row" in df.columns else df
