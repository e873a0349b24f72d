"""The plain baseline every embedding is compared with: PCA of the log-normalised matrix.

Streamed over row blocks so memory stays bounded on any atlas (three passes, each block
normalised to ``target_sum`` counts and log1p-transformed on the fly): the exact PCA of
:func:`raypipe.core.pca.fit_pca` (most variable genes, exact covariance, deterministic signs),
then the projection of each block, centred on the gene means. Method name: ``pca``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

from raypipe.core.expression import log_normalize
from raypipe.core.pca import fit_pca
from raypipe.errors import InputError

__all__ = ["BASELINE_METHOD", "fit_pca_baseline"]

BASELINE_METHOD = "pca"


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

    def lognorm() -> Iterable[sp.csr_matrix]:
        for block in iter_blocks():
            yield log_normalize(block, target_sum=target_sum, dtype=np.float64)

    pca, n = fit_pca(lognorm, n_components, n_top_genes=n_top_genes)
    emb = np.vstack([pca.transform(xl) for xl in lognorm()])
    if emb.shape[0] != n:
        raise InputError(f"PCA baseline: the passes saw {n} and {emb.shape[0]} cells")
    return emb
