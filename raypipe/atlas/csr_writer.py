"""Append CSR row blocks to an AnnData ``csr_matrix`` group in Zarr, writing whole chunks only.

``anndata``'s ``sparse_dataset(...).append`` writes each block where the last one ended: the
chunk it lands in is usually half full, so Zarr reads, decompresses, merges and recompresses
it — every chunk of ``data`` and ``indices`` is compressed about twice. This writer keeps the
tail that does not fill a chunk in memory and writes only complete chunks (each compressed
once), on one background thread so reading and checking the next block overlaps the
compression of the last one. The group it leaves is the same AnnData CSR encoding
(``encoding-type: csr_matrix``, ``shape``, ``data``/``indices``/``indptr``) any reader opens.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["CsrWriter", "chunk_elements"]


def chunk_elements(first: sp.csr_matrix, rows_per_chunk: int) -> int:
    """Elements per Zarr chunk of ``data``/``indices`` holding about ``rows_per_chunk`` rows.

    Sized from the first block's values per row, between 4,096 and 2²⁴ elements.
    """
    per_row = max(1, first.nnz // max(1, first.shape[0]))
    return int(min(max(rows_per_chunk * per_row, 4096), 1 << 24))


class CsrWriter:
    """Write ``name`` in ``group`` from CSR blocks given in row order.

    Parameters
    ----------
    group
        Open Zarr group to write into.
    name
        Element name (``"X"``).
    first
        The first row block (defines dtypes and the number of columns).
    chunk
        Elements per Zarr chunk of ``data`` and ``indices``.

    Use as a context manager; :meth:`append` each later block, :meth:`close` on success.
    """

    def __init__(self, group: Any, name: str, first: sp.csr_matrix, chunk: int) -> None:
        from anndata.io import write_elem

        self.chunk = int(chunk)
        write_elem(group, name, first, dataset_kwargs={"chunks": (self.chunk,)})
        self.node = group[name]
        self.data, self.indices = self.node["data"], self.node["indices"]
        self.n_cols = first.shape[1]
        self.lengths: list[np.ndarray] = []
        self.tail: list[tuple[np.ndarray, np.ndarray]] = []
        self.tail_size = 0
        self.written = 0  # elements already in whole chunks (the first block is rewritten)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypipe-csr-writer")
        self.pending: Future[None] | None = None
        self.append(first)

    def append(self, x: sp.csr_matrix) -> None:
        """Queue a block's rows; whole chunks go to the background writer."""
        if x.shape[1] != self.n_cols:
            raise ValueError(f"block has {x.shape[1]} columns, expected {self.n_cols}")
        self.lengths.append(np.diff(x.indptr).astype(np.int64))
        self.tail.append(
            (
                np.asarray(x.data, dtype=self.data.dtype),
                np.asarray(x.indices, dtype=self.indices.dtype),
            )
        )
        self.tail_size += x.nnz
        if self.tail_size >= self.chunk:
            self._flush(whole_chunks_only=True)

    def _flush(self, *, whole_chunks_only: bool) -> None:
        data = np.concatenate([d for d, _ in self.tail]) if self.tail else np.zeros(0)
        idx = np.concatenate([i for _, i in self.tail]) if self.tail else np.zeros(0)
        n = (data.size // self.chunk) * self.chunk if whole_chunks_only else data.size
        self.tail = [(data[n:], idx[n:])] if n < data.size else []
        self.tail_size = data.size - n
        if n == 0 and whole_chunks_only:
            return
        self.wait()  # one write in flight: memory stays bounded by two chunks
        self.pending = self.pool.submit(self._write, self.written, data[:n], idx[:n])
        self.written += n

    def _write(self, at: int, data: np.ndarray, idx: np.ndarray) -> None:
        end = at + data.size
        if self.data.shape[0] < end:
            self.data.resize((end,))
            self.indices.resize((end,))
        self.data[at:end] = data
        self.indices[at:end] = idx

    def wait(self) -> None:
        """Block until the write in flight is done (re-raising its error)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> int:
        """Write the tail, ``indptr`` and ``shape``; return the number of rows written."""
        self._flush(whole_chunks_only=False)
        self.wait()
        self.pool.shutdown()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        indptr = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        if self.data.shape[0] != self.written:
            self.data.resize((self.written,))
            self.indices.resize((self.written,))
        arr = self.node["indptr"]
        if indptr[-1] > np.iinfo(arr.dtype).max:  # more values than its integer type holds
            del self.node["indptr"]
            arr = self.node.create_array(
                "indptr", shape=indptr.shape, dtype=np.int64, chunks=(self.chunk,)
            )
        else:
            arr.resize(indptr.shape)
        arr[:] = indptr.astype(arr.dtype)
        self.node.attrs["shape"] = [int(lengths.size), int(self.n_cols)]
        return int(lengths.size)

    def abort(self) -> None:
        """Stop the background writer after a failure (its error, if any, is dropped)."""
        with suppress(Exception):  # the caller is already raising the first error
            self.wait()
        self.pool.shutdown()

    def __enter__(self) -> CsrWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
