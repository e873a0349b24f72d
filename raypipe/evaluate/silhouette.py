"""Exact cosine silhouettes in linear time (no ``n × n`` distance matrix).

With rows scaled to unit length the cosine distance is ``1 - x_i · x_j``, so the summed
distance from cell ``i`` to a group ``c`` is ``n_c - x_i · S_c`` with ``S_c`` the sum of the
group's unit rows: one ``(n, d) @ (d, groups)`` product gives every per-group mean distance the
silhouette needs. Equal to scikit-learn's ``silhouette_samples(metric="cosine")`` up to
rounding (scikit-learn clips each pairwise distance at 0; a test compares the two).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_silhouette_samples"]


def cosine_silhouette_samples(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Silhouette of every cell, cosine distance, exact.

    Parameters
    ----------
    x
        (n, d) embedding.
    groups
        (n,) group of each cell (any hashable values).

    Returns
    -------
    numpy.ndarray
        (n,) float64 silhouettes; 0 for a cell alone in its group (as scikit-learn).
    """
    xv = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(xv, axis=1, keepdims=True)
    xn = xv / np.maximum(norm, 1e-300)
    unit = (norm[:, 0] > 0).astype(np.float64)  # x_i · x_i: 1, or 0 for an all-zero row
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    inv = inv.ravel()
    n_groups = int(inv.max()) + 1 if inv.size else 0
    counts = np.bincount(inv, minlength=n_groups).astype(np.float64)
    sums = np.zeros((n_groups, xn.shape[1]))
    np.add.at(sums, inv, xn)
    total = counts[None, :] - xn @ sums.T  # (n, groups) summed cosine distances
    rows = np.arange(inv.size)
    own_n = counts[inv]
    # the own group's sum holds the cell itself at distance 1 - x_i·x_i (0 for a unit row)
    own = (total[rows, inv] - (1.0 - unit)) / np.maximum(own_n - 1, 1)
    mean_other = total / np.maximum(counts, 1)[None, :]
    mean_other[rows, inv] = np.inf
    nearest = mean_other.min(axis=1) if n_groups > 1 else np.zeros(inv.size)
    denom = np.maximum(own, nearest)
    with np.errstate(invalid="ignore", divide="ignore"):
        sil = np.where(denom > 0, (nearest - own) / denom, 0.0)
    return np.where(own_n > 1, sil, 0.0)
