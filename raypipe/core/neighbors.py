"""Cosine k-nearest neighbours, kNN graphs and Leiden: shared by evaluation and discovery.

Leiden agreement, the kNN probe and the report's UMAP all start from the same neighbours, so
:func:`cosine_neighbors` runs once per embedding (as scib-metrics shares ``NeighborsResults``);
cell-type discovery (:mod:`raypipe.annotate.discover`) clusters with :func:`leiden` and assigns
cells outside its sample with :func:`query_neighbors`:

* exact below ``exact_max`` cells: rows L2-normalised, blocks of ``x_b @ x.T`` (BLAS, float32),
  a one-pass numba top-``k`` per row; memory ``block × n`` floats, never ``n × n``;
* approximate above it: pynndescent (seeded), the index umap-learn itself uses.

Self-matches are left out: row ``i`` of :attr:`Neighbors.indices` never contains ``i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe.errors import InputError

__all__ = [
    "EXACT_MAX_CELLS",
    "Neighbors",
    "bisect_resolution",
    "cosine_neighbors",
    "knn_igraph",
    "leiden",
    "normalize_rows",
    "query_neighbors",
]

EXACT_MAX_CELLS = 50_000
"""Above this many cells :func:`cosine_neighbors` switches to pynndescent (measured in
``jobs/benchmark.py eval``: exact blocks win below it on 2 cores, numba compile included)."""


@dataclass(frozen=True)
class Neighbors:
    """The ``k`` nearest neighbours (cosine) of every cell, self excluded, nearest first.

    Attributes
    ----------
    indices
        (n, k) int64 neighbour rows.
    distances
        (n, k) float32 cosine distances ``1 - cos``, ascending along each row.
    exact
        True when computed exactly, False when approximate (pynndescent).
    """

    indices: np.ndarray
    distances: np.ndarray
    exact: bool

    @property
    def k(self) -> int:
        """Neighbours per cell."""
        return int(self.indices.shape[1])

    def first(self, k: int) -> Neighbors:
        """Keep the ``k`` nearest of the stored neighbours."""
        if k > self.k:
            raise InputError(f"asked for {k} neighbours; the graph holds {self.k}")
        return Neighbors(self.indices[:, :k], self.distances[:, :k], self.exact)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


_TOPK = None


def _topk_kernel():  # type: ignore[no-untyped-def]
    """Numba: per row of a similarity block, the ``k`` largest (self excluded), best first.

    One pass per row keeping a sorted buffer of ``k``; a value enters only when it beats the
    buffer's worst, so almost every entry costs one comparison (``argpartition`` over the
    whole block was 3× the GEMM's time; measured in ``jobs/benchmark.py eval``). Ties keep the
    lower column first.
    """
    global _TOPK
    if _TOPK is None:
        import numba

        @numba.njit(parallel=True, cache=True, nogil=True)
        def topk(sims, k, offset, idx, val):  # type: ignore[no-untyped-def]
            rows, n = sims.shape
            for r in numba.prange(rows):
                bv = np.full(k, -np.inf, dtype=np.float32)
                bi = np.full(k, -1, dtype=np.int64)
                me = r + offset
                for c in range(n):
                    v = sims[r, c]
                    if c == me or not v > bv[k - 1]:
                        continue
                    j = k - 1
                    while j > 0 and bv[j - 1] < v:
                        bv[j] = bv[j - 1]
                        bi[j] = bi[j - 1]
                        j -= 1
                    bv[j] = v
                    bi[j] = c
                for j in range(k):
                    idx[r, j] = bi[j]
                    val[r, j] = bv[j]

        _TOPK = topk
    return _TOPK


def query_neighbors(
    queries: np.ndarray, reference: np.ndarray, k: int, *, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine ``k`` nearest rows of ``reference`` for each row of ``queries``.

    Blocks of ``q_b @ ref.T`` (BLAS, float32) and the same one-pass top-``k`` kernel as
    :func:`cosine_neighbors`; memory ``block × len(reference)`` floats (default: a block of
    at most 2²⁶ floats, 256 MB: 671 rows against a 100,000-cell reference).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        (m, k) int64 reference rows, nearest first, and (m, k) float32 cosine distances.
    """
    ref = normalize_rows(reference)
    q = normalize_rows(queries)
    n_ref = ref.shape[0]
    if not 1 <= k <= n_ref:
        raise InputError(f"query_neighbors: k={k} needs 1 <= k <= reference rows ({n_ref})")
    m = q.shape[0]
    block = block or max(64, min(2048, (1 << 26) // n_ref))
    idx = np.empty((m, k), dtype=np.int64)
    sim = np.empty((m, k), dtype=np.float32)
    topk = _topk_kernel()
    for start in range(0, m, block):
        stop = min(start + block, m)
        # offset -n_ref - m: no reference column is ever "this row" (nothing to leave out)
        topk(q[start:stop] @ ref.T, k, -n_ref - m, idx[start:stop], sim[start:stop])
    return idx, np.maximum(1.0 - sim, 0.0)


def _exact(x: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    xn = normalize_rows(x)
    n = xn.shape[0]
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    topk = _topk_kernel()
    for start in range(0, n, block):
        stop = min(start + block, n)
        topk(xn[start:stop] @ xn.T, k, start, idx[start:stop], sim[start:stop])
    return idx, np.maximum(1.0 - sim, 0.0)


def _approx(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pynndescent import NNDescent

    n = x.shape[0]
    index = NNDescent(
        normalize_rows(x), metric="cosine", n_neighbors=k + 1, random_state=seed, n_jobs=1
    )
    got_idx, got_dist = index.neighbor_graph
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for i in range(n):  # drop the self-match (or, when absent, the farthest neighbour)
        keep = got_idx[i] != i
        if keep.sum() > k:
            keep[np.flatnonzero(keep)[k:]] = False
        idx[i], dist[i] = got_idx[i][keep], got_dist[i][keep]
    return idx, np.maximum(dist, 0.0).astype(np.float32)


def cosine_neighbors(
    x: np.ndarray,
    k: int,
    *,
    exact_max: int = EXACT_MAX_CELLS,
    seed: int = 0,
    block: int = 2048,
) -> Neighbors:
    """Find the ``k`` nearest cosine neighbours of every row of ``x`` (self excluded).

    Parameters
    ----------
    x
        (n, d) embedding.
    k
        Neighbours per cell (``1 <= k < n``).
    exact_max
        Exact search up to this many cells, pynndescent above.
    seed
        pynndescent's random state (exact search has no randomness).
    block
        Rows per block of the exact search.

    Returns
    -------
    Neighbors
    """
    n = int(np.asarray(x).shape[0])
    if not 1 <= k < n:
        raise InputError(f"cosine_neighbors: k={k} needs 1 <= k < n cells ({n})")
    if n <= exact_max:
        return Neighbors(*_exact(np.asarray(x), k, block), exact=True)
    return Neighbors(*_approx(np.asarray(x), k, seed), exact=False)


def knn_igraph(indices: np.ndarray) -> Any:
    """Undirected igraph graph (unit weights) joining each row to its ``(n, k)`` ``indices``."""
    import igraph as ig

    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    pairs = np.unique(np.sort(np.stack([rows, indices.ravel()], axis=1), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    graph = ig.Graph(n=n, edges=pairs.tolist(), directed=False)
    graph.es["weight"] = 1.0
    return graph


def leiden(graph: Any, resolution: float, *, seed: int = 0) -> np.ndarray:
    """Cluster with igraph's C Leiden: modularity with a resolution (= leidenalg's RBConfiguration).

    About 15× faster than leidenalg on a 9k-cell graph with the same cluster counts (measured
    in ``jobs/benchmark.py eval``). igraph draws from Python's ``random``: it is seeded here
    and its state restored afterwards.
    """
    import random

    state = random.getstate()
    random.seed(seed)
    try:
        part = graph.community_leiden(
            objective_function="modularity",
            weights="weight",
            resolution=resolution,
            n_iterations=2,
        )
    finally:
        random.setstate(state)
    return np.asarray(part.membership)


def bisect_resolution(
    cluster: Callable[[float], np.ndarray], n_target: int, *, resolution: float, max_steps: int
) -> tuple[float, np.ndarray]:
    """Bisect a clustering resolution (geometrically) for ``n_target`` clusters.

    ``cluster(resolution)`` returns (n,) cluster ids; at most ``max_steps`` tries starting at
    ``resolution``; returns ``(resolution, clusters)`` of the closest cluster count found.
    """
    res = resolution
    lo: float | None = None  # a resolution known to give too few clusters
    hi: float | None = None  # ... too many
    best: tuple[int, float, np.ndarray] | None = None
    for _ in range(max(1, max_steps)):
        clusters = cluster(res)
        got = len(np.unique(clusters))
        if best is None or abs(got - n_target) < best[0]:
            best = (abs(got - n_target), res, clusters)
        if got == n_target:
            break
        if got > n_target:
            hi = res
        else:
            lo = res
        if lo is None and hi is not None:
            res = hi / 2
        elif hi is None and lo is not None:
            res = lo * 2
        elif lo is not None and hi is not None:
            res = float(np.sqrt(lo * hi))
    assert best is not None
    return best[1], best[2]
