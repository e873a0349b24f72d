"""The plain baseline every embedding is compared with: PCA of the log-normalised matrix.

Streamed over row blocks so memory stays bounded on any atlas (three passes, each block
normalised to ``target_sum`` counts and log1p-transformed on the fly):

1. per-gene mean and variance → the ``n_top_genes`` most variable genes (all genes if fewer);
2. the exact covariance of those genes, accumulated in float64 (``h × h``; 2,000 genes = 32 MB);
   its top eigenvectors are the principal axes (exact PCA, not an approximation — equal to
   scikit-learn's ``PCA`` on the same genes up to the sign of each axis);
3. projection of each block, centred on the gene means.

Signs are fixed so that the largest-magnitude loading of each axis is positive, which makes
the result deterministic; there is no randomness and therefore no seed. Method name: ``pca``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

from raypipe.core.expression import log_normalize
from raypipe.errors import InputError

__all__ = ["BASELINE_METHOD", "fit_pca_baseline"]

BASELINE_METHOD = "pca"
_ROWS = 4096  # rows per dense block of the covariance pass (4,096 × 2,000 float64 = 66 MB)


def _dense(x: sp.spmatrix | np.ndarray) -> np.ndarray:
    if sp.issparse(x):
        return np.asarray(x.toarray())  # type: ignore[union-attr]
    return np.asarray(x)


def _top_axes(cov: np.ndarray, k: int) -> np.ndarray:
    """Return the top ``k`` eigenvectors of a symmetric matrix, largest eigenvalue first.

    Lanczos (ARPACK, fixed start vector, ``tol=0``: machine precision, deterministic) when
    ``k`` is small next to the matrix; a full ``eigh`` costs 3-30 s at 2,000 genes on 2 cores.
    """
    import scipy.linalg
    from scipy.sparse.linalg import eigsh

    h = cov.shape[0]
    if h > 2 * k + 1:
        vals, vecs = eigsh(cov, k=k, which="LA", v0=np.full(h, h**-0.5), tol=0)
    else:
        vals, vecs = scipy.linalg.eigh(cov, subset_by_index=[h - k, h - 1])
    return np.asarray(vecs[:, np.argsort(-vals, kind="stable")])


def fit_pca_baseline(
    iter_blocks: Callable[[], Iterable[sp.spmatrix | np.ndarray]],
    n_components: int = 50,
    *,
    n_top_genes: int = 2000,
    target_sum: float = 1e4,
) -> np.ndarray:
    """PCA embedding of the log-normalised counts, streamed over row blocks.

    Parameters
    ----------
    iter_blocks
        Called once per pass (three times); each call yields (rows, n_genes) raw-count blocks
        (CSR or dense) covering the atlas in obs order.
    n_components
        PCA dimensions (``evaluate.pca_components``); capped at min(n_cells, n_genes used) - 1.
    n_top_genes
        Most variable genes (of the log-normalised data) kept for the PCA.
    target_sum
        Counts per cell after normalisation.

    Returns
    -------
    numpy.ndarray
        (n_cells, n_components) float32, rows in obs order.
    """
    n = 0
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None
    for block in iter_blocks():
        x = log_normalize(block, target_sum=target_sum, dtype=np.float64)
        if s1 is None:
            s1 = np.zeros(x.shape[1])
            s2 = np.zeros(x.shape[1])
        elif x.shape[1] != s1.size:
            raise InputError(f"PCA baseline: a block has {x.shape[1]} genes, expected {s1.size}")
        n += x.shape[0]
        s1 += np.asarray(x.sum(axis=0)).ravel()
        s2 += np.asarray(x.multiply(x).sum(axis=0)).ravel()  # type: ignore[operator]
    if s1 is None or s2 is None or n < 2:
        raise InputError(
            f"PCA baseline: the atlas has {n} cells; need at least 2",
            fix="check the input path and shards",
        )
    mean_all = s1 / n
    var = s2 / n - mean_all**2
    genes = np.sort(np.argsort(-var, kind="stable")[: min(n_top_genes, var.size)])
    h = genes.size
    k = min(n_components, h - 1 if h > 1 else 1, n - 1)
    if k < 1:
        raise InputError(f"PCA baseline: {h} genes and {n} cells leave no component")

    gram = np.zeros((h, h))
    for block in iter_blocks():
        xh = log_normalize(block, target_sum=target_sum, dtype=np.float64)[:, genes]
        for start in range(0, xh.shape[0], _ROWS):  # dense BLAS beats a sparse X^T X here
            dense = _dense(xh[start : start + _ROWS])
            gram += dense.T @ dense
    mean = mean_all[genes]
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    axes = _top_axes(cov, k)
    flip = np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(k)])
    axes = axes * np.where(flip == 0, 1.0, flip)

    out = []
    for block in iter_blocks():
        xh = log_normalize(block, target_sum=target_sum, dtype=np.float64)[:, genes]
        out.append((xh @ axes - mean @ axes).astype(np.float32))
    emb = np.vstack(out)
    if emb.shape[0] != n:
        raise InputError(f"PCA baseline: the passes saw {n} and {emb.shape[0]} cells")
    return emb
