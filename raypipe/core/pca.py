"""Exact PCA of log-normalised expression, fitted over streamed row blocks.

Two passes over the blocks, so memory stays bounded on any number of cells:

1. per-gene mean and variance → the ``n_top_genes`` most variable genes (all genes if fewer);
2. the exact covariance of those genes, accumulated in float64 (``h × h``; 2,000 genes = 32 MB);
   its top eigenvectors are the principal axes (exact PCA, not an approximation — equal to
   scikit-learn's ``PCA`` on the same genes up to the sign of each axis).

Signs are fixed so that the largest-magnitude loading of each axis is positive, which makes
the result deterministic (no randomness, no seed). :meth:`PCAxes.transform` projects any block
(the evaluation's PCA baseline; cell-type discovery's features, fitted on a sample and applied
to every shard inside Ray actors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from raypipe.errors import InputError

__all__ = ["PCAxes", "fit_pca"]

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


@dataclass(frozen=True)
class PCAxes:
    """Fitted principal axes over a subset of genes.

    Attributes
    ----------
    genes
        (h,) column indices of the genes used (sorted).
    mean
        (h,) their means over the fitted cells.
    axes
        (h, k) principal axes, largest variance first.
    """

    genes: np.ndarray
    mean: np.ndarray
    axes: np.ndarray

    @property
    def n_components(self) -> int:
        """Dimensions of the projection."""
        return int(self.axes.shape[1])

    def transform(self, xl: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Project (n, g) log-normalised rows (all atlas genes) onto the axes: (n, k) float32."""
        xh = sp.csr_matrix(xl)[:, self.genes] if sp.issparse(xl) else np.asarray(xl)[:, self.genes]
        return np.asarray(xh @ self.axes - self.mean @ self.axes, dtype=np.float32)


def fit_pca(
    iter_blocks: Callable[[], Iterable[sp.spmatrix | np.ndarray]],
    n_components: int = 50,
    *,
    n_top_genes: int = 2000,
) -> tuple[PCAxes, int]:
    """Fit PCA on log-normalised rows streamed in blocks (two passes).

    Parameters
    ----------
    iter_blocks
        Called once per pass; each call yields (rows, n_genes) log-normalised blocks (CSR or
        dense), the same rows in the same order every time.
    n_components
        Dimensions; capped at min(n_cells, genes used) - 1.
    n_top_genes
        Most variable genes kept.

    Returns
    -------
    (PCAxes, int)
        The axes and the number of cells they were fitted on.
    """
    n = 0
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None
    for block in iter_blocks():
        x = sp.csr_matrix(block, dtype=np.float64)
        if s1 is None:
            s1 = np.zeros(x.shape[1])
            s2 = np.zeros(x.shape[1])
        elif x.shape[1] != s1.size:
            raise InputError(f"PCA: a block has {x.shape[1]} genes, expected {s1.size}")
        n += x.shape[0]
        s1 += np.asarray(x.sum(axis=0)).ravel()
        s2 += np.asarray(x.multiply(x).sum(axis=0)).ravel()
    if s1 is None or s2 is None or n < 2:
        raise InputError(f"PCA: {n} cells; need at least 2", fix="check the input path and shards")
    mean_all = s1 / n
    var = s2 / n - mean_all**2
    genes = np.sort(np.argsort(-var, kind="stable")[: min(n_top_genes, var.size)])
    h = genes.size
    k = min(n_components, h - 1 if h > 1 else 1, n - 1)
    if k < 1:
        raise InputError(f"PCA: {h} genes and {n} cells leave no component")

    gram = np.zeros((h, h))
    for block in iter_blocks():
        xh = sp.csr_matrix(block, dtype=np.float64)[:, genes]
        for start in range(0, xh.shape[0], _ROWS):  # dense BLAS beats a sparse X^T X here
            dense = _dense(xh[start : start + _ROWS])
            gram += dense.T @ dense
    mean = mean_all[genes]
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    axes = _top_axes(cov, k)
    flip = np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(k)])
    axes = axes * np.where(flip == 0, 1.0, flip)
    return PCAxes(genes, mean, axes), n
