"""The GenePT-w hot loop as one fused numba kernel: normalise, log1p, multiply, L2-normalise.

Per cell ``i`` (a CSR row) with ``s_i = target_sum / total_i``::

    out[i] = sum over stored (j, v) with col_map[j] >= 0 of  log1p(v * s_i) * W[col_map[j]]
    out[i] /= ||out[i]||

Only genes that carry weight are touched: ``col_map`` sends every atlas column either to its
row of the compact weight matrix or to -1 (skipped before any arithmetic), so with HVG-500
the product runs over 500 rows, not every gene, and no normalised copy of the shard is made.
Rows run in parallel (``prange``) over numba's threads; the inner loop over the ``d`` output
columns vectorises (AVX2). Compiled once per machine (``cache=True``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["compact_weights", "fused_genept_w"]


def compact_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a (g, d) weight matrix into a column map and the rows that carry weight.

    Returns
    -------
    col_map
        (g,) int32: the row of ``compact`` for each gene, -1 for an all-zero row.
    compact
        (g_used, d) float32, C-contiguous.
    """
    w = np.asarray(weights, dtype=np.float32)
    used = np.flatnonzero(np.any(w != 0, axis=1))
    col_map = np.full(w.shape[0], -1, dtype=np.int32)
    col_map[used] = np.arange(used.size, dtype=np.int32)
    return col_map, np.ascontiguousarray(w[used])


_KERNEL = None


def _kernel():  # type: ignore[no-untyped-def]
    global _KERNEL
    if _KERNEL is None:
        import numba

        @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
        def kernel(indptr, indices, data, scale, col_map, w, log, out):  # type: ignore[no-untyped-def]
            n = indptr.size - 1
            d = w.shape[1]
            for i in numba.prange(n):
                acc = np.zeros(d, dtype=np.float32)
                s = scale[i]
                for p in range(indptr[i], indptr[i + 1]):
                    c = col_map[indices[p]]
                    if c < 0:
                        continue
                    v = np.float32(np.log1p(data[p] * s)) if log else np.float32(data[p])
                    if v == 0:
                        continue
                    for k in range(d):
                        acc[k] += v * w[c, k]
                norm = np.float32(0.0)
                for k in range(d):
                    norm += acc[k] * acc[k]
                if norm > 0:
                    inv = np.float32(1.0) / np.sqrt(norm)
                    for k in range(d):
                        out[i, k] = acc[k] * inv
                else:
                    for k in range(d):
                        out[i, k] = 0.0

        _KERNEL = kernel
    return _KERNEL


def fused_genept_w(
    x: sp.csr_matrix,
    col_map: np.ndarray,
    compact: np.ndarray,
    *,
    x_kind: str = "counts",
    target_sum: float = 1e4,
) -> tuple[np.ndarray, np.ndarray]:
    """GenePT-w of a CSR block in one pass (no duplicate genes: see ``fold_collapse``).

    Parameters
    ----------
    x
        (n, g) expression: raw counts (``x_kind='counts'``: scaled to ``target_sum`` over every
        atlas gene, then ``log1p``) or log-normalised values (used as they are).
    col_map, compact
        From :func:`compact_weights`.
    x_kind, target_sum
        As :func:`raypipe.embed.genept_w.genept_w`.

    Returns
    -------
    embedding
        (n, d) float32, unit norm, zero rows where ``empty``.
    empty
        (n,) bool: no expressed gene carries weight.
    """
    x = sp.csr_matrix(x)
    n = x.shape[0]
    if x_kind == "counts":
        totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros(n), where=totals > 0)
    else:
        scale = np.ones(n)
    out = np.empty((n, compact.shape[1]), dtype=np.float32)
    if n and compact.shape[0]:
        _kernel()(
            x.indptr,
            x.indices,
            np.asarray(x.data, dtype=np.float32),
            scale.astype(np.float32),
            col_map,
            compact,
            x_kind == "counts",
            out,
        )
    else:
        out[:] = 0.0
    empty = ~np.any(out != 0, axis=1)
    return out, empty
