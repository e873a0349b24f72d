"""The UCell-style marker scorer as one numba kernel over CSR rows (the annotation hot path).

Per cell (a CSR row), only the marker genes are ranked: the row's positive values are sorted
once, and each marker's rank is found by binary search (genes strictly higher, plus the mean
position among ties; genes at zero share the average rank of the zero block), capped at
``max_rank + 1``. The weighted Mann-Whitney U of each candidate's signature then gives
``1 - (Σ w r - W(m+1)/2) / (W * max_rank)`` clipped to [0, 1] (see
:func:`raypipe.annotate.scorers.marker_scores` for the definition). Negative weights are a
second signature (the markers stated absent), scored the same way with ``|w|`` and subtracted
times ``negative``: ``score = UCell(positive) - negative * UCell(negative)`` (a candidate
without positive markers is NaN). No dense copy of the marker columns is made; rows run in
parallel (``prange``). Compiled once per machine (``cache=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["ucell_scores"]

_KERNEL = None


def _kernel():  # type: ignore[no-untyped-def]
    global _KERNEL
    if _KERNEL is None:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def kernel(
            indptr, indices, data, col_to_used, n_used, ptr, pos, wts, g, max_rank, neg_scale, out
        ):  # type: ignore[no-untyped-def]
            n = indptr.size - 1
            k = ptr.size - 1
            cap = max_rank + 1.0
            for i in numba.prange(n):
                start, end = indptr[i], indptr[i + 1]
                xv = np.zeros(n_used, dtype=np.float64)
                vals = np.empty(end - start, dtype=np.float64)
                nnz = 0
                for p in range(start, end):
                    v = np.float64(data[p])
                    if v > 0:
                        vals[nnz] = v
                        nnz += 1
                    u = col_to_used[indices[p]]
                    if u >= 0:
                        xv[u] = v
                srt = np.sort(vals[:nnz])
                zero_rank = nnz + (g - nnz + 1) / 2.0
                ranks = np.empty(n_used, dtype=np.float64)
                for u in range(n_used):
                    x = xv[u]
                    if x > 0:
                        right = np.searchsorted(srt, x, side="right")
                        left = np.searchsorted(srt, x, side="left")
                        r = (nnz - right) + (right - left + 1) / 2.0
                    else:
                        r = zero_rank
                    ranks[u] = min(r, cap)
                for j in range(k):
                    a, b = ptr[j], ptr[j + 1]
                    total, acc, m = 0.0, 0.0, 0
                    ntotal, nacc, nm = 0.0, 0.0, 0
                    for q in range(a, b):
                        w = wts[q]
                        if w > 0:
                            total += w
                            acc += w * ranks[pos[q]]
                            m += 1
                        elif w < 0:
                            ntotal -= w
                            nacc -= w * ranks[pos[q]]
                            nm += 1
                    if m == 0:
                        out[i, j] = np.nan
                        continue
                    s = 1.0 - (acc - total * (m + 1) / 2.0) / (total * max_rank)
                    s = min(max(s, 0.0), 1.0)
                    if nm > 0 and neg_scale > 0:
                        ns = 1.0 - (nacc - ntotal * (nm + 1) / 2.0) / (ntotal * max_rank)
                        s -= neg_scale * min(max(ns, 0.0), 1.0)
                    out[i, j] = s

        _KERNEL = kernel
    return _KERNEL


def ucell_scores(
    expr: sp.csr_matrix,
    marker_idx: Sequence[np.ndarray],
    weights: Sequence[np.ndarray] | None,
    *,
    max_rank: int,
    negative: float = 0.0,
) -> np.ndarray:
    """(n, k) float32 weighted UCell scores; NaN columns for candidates without markers.

    Negative weights mark genes stated absent; their UCell score, times ``negative``, is
    subtracted (``negative=0`` ignores them).

    ``expr`` must be CSR with every index in range; ``marker_idx`` holds valid column indices.
    """
    n, g = expr.shape
    k = len(marker_idx)
    idx = [np.asarray(i, np.int64) for i in marker_idx]
    used = np.unique(np.concatenate(idx or [np.zeros(0, np.int64)]))
    col_to_used = np.full(g, -1, dtype=np.int32)
    col_to_used[used] = np.arange(used.size, dtype=np.int32)
    ptr = np.zeros(k + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([i.size for i in idx])
    pos = col_to_used[np.concatenate(idx)] if ptr[-1] else np.zeros(0, np.int32)
    wts = (
        np.concatenate([np.asarray(w, np.float64) for w in weights])
        if weights is not None and ptr[-1]
        else np.ones(int(ptr[-1]), dtype=np.float64)
    )
    out = np.empty((n, k), dtype=np.float32)
    if n == 0:
        return out
    _kernel()(
        expr.indptr,
        expr.indices,
        expr.data,
        col_to_used,
        used.size,
        ptr,
        pos.astype(np.int64),
        wts,
        g,
        float(max_rank),
        float(negative),
        out,
    )
    return out
