"""Expression preprocessing shared by every stage: the one ``log_normalize``."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["log_normalize"]


def log_normalize(
    x: Any,
    totals: np.ndarray | None = None,
    target_sum: float = 1e4,
    *,
    dtype: Any = np.float32,
) -> sp.csr_matrix:
    """Scale each row of counts to ``target_sum`` and apply ``log1p`` (scanpy's way).

    Parameters
    ----------
    x
        (n, g) counts, CSR (or anything ``scipy.sparse.csr_matrix`` accepts).
    totals
        (n,) counts per cell to scale by; default: the row sums of ``x``. Pass the totals
        over every atlas gene when ``x`` holds a subset (or a collapse) of its columns.
    target_sum
        Counts per cell after scaling (10,000 in GenePT, as in scanpy).
    dtype
        Result dtype (float32 on the hot paths; float64 for the PCA baseline).

    Returns
    -------
    scipy.sparse.csr_matrix
        A new matrix; rows with zero total stay zero.
    """
    out = sp.csr_matrix(x, dtype=dtype, copy=True)
    if totals is None:
        totals = np.asarray(out.sum(axis=1), dtype=np.float64).ravel()
    totals = np.asarray(totals, dtype=np.float64)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out.data *= np.repeat(scale, np.diff(out.indptr)).astype(dtype, copy=False)
    np.log1p(out.data, out=out.data)
    return out
