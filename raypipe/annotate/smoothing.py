"""Graph smoothing of cell × candidate scores (training-free label propagation, GRIT-style).

Cells of one type sit close together in any decent representation; a single cell's zero-shot
scores are noisy. Smoothing solves ``(I + λL) P = P₀`` on a kNN graph of the cells, with
``L = I − D^{-1/2} W D^{-1/2}`` the normalised Laplacian of the symmetrised kNN graph (cosine
weights): each cell's scores move towards its neighbours' while staying tied to its own.
``λ = 0`` is off; larger λ smooths more. Solved per candidate column by conjugate gradients
(``I + λL`` is symmetric positive definite).

Graphs are built per shard inside the annotation stage (a shard of thousands of cells is a
fine graph; the default 4,096-row shards are), on blocks of at most ``block`` cells: a larger
shard is dealt into ``⌈n / block⌉`` interleaved blocks (rows ``b, b + B, b + 2B, …``, so each
block is a sample of the whole shard) with one graph each. Exact kNN is quadratic in the cells
of a graph, so blocks keep the cost linear in the shard size and the result independent of
``shards.rows`` above ``block`` (a shard of ≤ ``block`` rows is one graph, as before). A shard
with fewer than ``min_cells`` cells is left unsmoothed (too few neighbours to say anything);
with fewer than ``k + 1`` cells, ``k`` shrinks to ``n − 1``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["block_knn_graph", "expression_features", "knn_graph", "smooth_scores"]


def knn_graph(x: np.ndarray, *, k: int = 15) -> sp.csr_matrix:
    """Symmetric kNN affinity graph of the rows of ``x`` (cosine similarity, clipped at 0).

    Parameters
    ----------
    x
        (n, d) features (cell embeddings or expression PCs).
    k
        Neighbours per cell (excluding itself).

    Returns
    -------
    scipy.sparse.csr_matrix
        (n, n) symmetric, zero diagonal, weights in [0, 1].
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    k = max(1, min(k, n - 1))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norm > 0, norm, 1.0)
    nn = NearestNeighbors(n_neighbors=k + 1, metric="euclidean").fit(unit)
    dist, idx = nn.kneighbors(unit)
    sim = np.clip(1.0 - dist[:, 1:] ** 2 / 2.0, 0.0, 1.0)  # unit vectors: cos = 1 − d²/2
    rows = np.repeat(np.arange(n), k)
    w = sp.csr_matrix((sim.ravel(), (rows, idx[:, 1:].ravel())), shape=(n, n))
    w = w.maximum(w.T).tocsr()
    w.setdiag(0.0)
    w.eliminate_zeros()
    return w


def block_knn_graph(x: np.ndarray, *, k: int = 15, block: int = 4096) -> sp.csr_matrix:
    """:func:`knn_graph` on interleaved blocks of at most ``block`` rows (block-diagonal)."""
    n = x.shape[0]
    n_blocks = max(1, -(-n // max(block, 2)))
    if n_blocks == 1:
        return knn_graph(x, k=k)
    rows, cols, vals = [], [], []
    for b in range(n_blocks):
        members = np.arange(b, n, n_blocks)
        g = knn_graph(x[members], k=k).tocoo()
        rows.append(members[g.row])
        cols.append(members[g.col])
        vals.append(g.data)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )


def smooth_scores(
    scores: np.ndarray,
    features: np.ndarray,
    *,
    strength: float,
    k: int = 15,
    min_cells: int = 50,
    block: int = 4096,
) -> np.ndarray:
    """Smooth (n, k) scores over a kNN graph of ``features``: ``(I + λL)⁻¹ P₀``.

    Parameters
    ----------
    scores
        (n, c) cell × candidate scores ``P₀``.
    features
        (n, d) representation the graph is built on.
    strength
        λ ≥ 0; 0 returns ``scores`` unchanged.
    k
        Neighbours per cell.
    min_cells
        Shards with fewer cells are returned unchanged.
    block
        Most cells in one kNN graph (larger inputs: interleaved blocks, one graph each).

    Returns
    -------
    numpy.ndarray
        (n, c) float32 smoothed scores.
    """
    from scipy.sparse.linalg import cg

    p0 = np.asarray(scores, dtype=np.float64)
    n = p0.shape[0]
    if strength <= 0 or n < max(min_cells, 3):
        return p0.astype(np.float32)
    w = block_knn_graph(features, k=k, block=block)
    deg = np.asarray(w.sum(axis=1)).ravel()
    inv = 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0))
    a = sp.diags(inv) @ w @ sp.diags(inv)
    system = ((1.0 + strength) * sp.identity(n) - strength * a).tocsr()
    out = p0.copy()
    for j in range(p0.shape[1]):
        if not np.isfinite(p0[:, j]).all():
            continue  # a candidate no scorer could score (-inf) stays as it is
        sol, _info = cg(system, p0[:, j], x0=p0[:, j], rtol=1e-6, maxiter=200)
        out[:, j] = sol
    return out.astype(np.float32)


def expression_features(
    x: sp.csr_matrix | None, *, n_components: int = 30, fit_rows: int | None = 4096
) -> np.ndarray:
    """PCs of a shard's log-normalised expression (counts or log values: both give ranks).

    Counts are scaled to 10,000 per cell and ``log1p``-ed; rows whose values are not integers
    are taken as already log-normalised. Seeded truncated SVD, at most ``n_components``. With
    more than ``fit_rows`` cells the axes are fitted on an interleaved sample of about
    ``fit_rows`` of them (every ``⌈n / fit_rows⌉``-th row) and every cell is projected onto
    them: the fit is the costly part and a few thousand cells find the same main axes.
    """
    from sklearn.decomposition import TruncatedSVD

    from raypipe.core.expression import log_normalize

    if x is None:
        raise ValueError("expression features need the shard's expression matrix")
    m = sp.csr_matrix(x)
    data = m.data
    is_counts = data.size == 0 or bool(np.all(np.abs(data - np.round(data)) < 1e-6))
    ln = log_normalize(m) if is_counts else m.astype(np.float32)
    n = ln.shape[0]
    if fit_rows is None or n <= fit_rows:
        k = max(1, min(n_components, min(ln.shape) - 1))
        return np.asarray(TruncatedSVD(n_components=k, random_state=0).fit_transform(ln))
    fit = ln[:: -(-n // fit_rows)]
    k = max(1, min(n_components, min(fit.shape) - 1))
    return np.asarray(TruncatedSVD(n_components=k, random_state=0).fit(fit).transform(ln))
