"""Marker genes per cluster from sufficient statistics: a reduction over shards.

Each shard contributes, per cluster and gene, the sum, the sum of squares and the non-zero count
of its log-normalised expression (:func:`cluster_sums`); shards merge by addition
(:meth:`ClusterStats.merge`), so the whole atlas is never in memory. From the merged sums,
:func:`rank_markers` tests each cluster against all other cells per gene exactly as
``scanpy.tl.rank_genes_groups(method="t-test")`` does (tests/test_discover_markers.py checks it):

* means and unbiased variances (``n / (n - 1)``; a single cell's variance stays 0);
* Welch's t (``scipy.stats.ttest_ind_from_stats``, ``equal_var=False``); NaN scores become 0;
* ``logfc = log2((expm1(mean_in) + 1e-9) / (expm1(mean_out) + 1e-9))``;
* ``pct_in`` / ``pct_out``: share of cells with a non-zero value in / outside the cluster;
* genes ranked by score, highest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["MARKER_COLUMNS", "ClusterStats", "cluster_sums", "rank_markers"]

#: Columns of :func:`rank_markers` (one row per cluster and ranked gene).
MARKER_COLUMNS = ["cluster", "rank", "gene", "score", "logfc", "pct_in", "pct_out", "pval"]


@dataclass
class ClusterStats:
    """Per-cluster sufficient statistics of log-normalised expression.

    Attributes
    ----------
    n
        (c,) cells per cluster.
    total
        (c, g) sum of values.
    total_sq
        (c, g) sum of squared values.
    nnz
        (c, g) cells with a non-zero value.
    """

    n: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    nnz: np.ndarray

    @classmethod
    def zeros(cls, n_clusters: int, n_genes: int) -> ClusterStats:
        """Empty statistics (the identity of :meth:`merge`)."""
        return cls(
            np.zeros(n_clusters, dtype=np.int64),
            np.zeros((n_clusters, n_genes)),
            np.zeros((n_clusters, n_genes)),
            np.zeros((n_clusters, n_genes), dtype=np.int64),
        )

    def merge(self, other: ClusterStats) -> ClusterStats:
        """Add ``other`` in place (shards of one atlas, same clusters and genes); return self."""
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.nnz += other.nnz
        return self


def cluster_sums(xl: sp.spmatrix, clusters: np.ndarray, n_clusters: int) -> ClusterStats:
    """Sum, sum of squares and non-zero counts per cluster of one shard.

    Parameters
    ----------
    xl
        (n, g) log-normalised expression (CSR).
    clusters
        (n,) cluster ids in ``[0, n_clusters)``.
    n_clusters
        Number of clusters of the whole atlas.

    Returns
    -------
    ClusterStats
    """
    x = sp.csr_matrix(xl)
    cl = np.asarray(clusters, dtype=np.int64)
    n = x.shape[0]
    onehot = sp.csr_matrix((np.ones(n), (cl, np.arange(n))), shape=(n_clusters, n))
    sq = x.multiply(x).tocsr()
    nz = x.copy()
    nz.data = (nz.data != 0).astype(np.float64)
    return ClusterStats(
        np.bincount(cl, minlength=n_clusters).astype(np.int64),
        np.asarray((onehot @ x.astype(np.float64)).todense()),
        np.asarray((onehot @ sq.astype(np.float64)).todense()),
        np.rint(np.asarray((onehot @ nz).todense())).astype(np.int64),
    )


def _mean_var(total: np.ndarray, total_sq: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
    nn = np.maximum(n, 1).astype(np.float64)[:, None]
    mean = total / nn
    var = total_sq / nn - mean**2
    corr = np.where(n > 1, n / np.maximum(n - 1, 1), 1.0).astype(np.float64)[:, None]
    return mean, var * corr


def rank_markers(
    stats: ClusterStats, genes: np.ndarray | list[str], *, n_top: int = 25
) -> pd.DataFrame:
    """Rank genes per cluster by Welch's t, one cluster vs all other cells.

    Parameters
    ----------
    stats
        Merged statistics of the whole atlas.
    genes
        (g,) gene names (columns of the statistics).
    n_top
        Genes kept per cluster.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`MARKER_COLUMNS`, ``n_top`` rows per cluster (fewer when the atlas has
        fewer genes), best first; ``rank`` counts from 0.
    """
    from scipy import stats as st

    names = np.asarray(genes, dtype=object)
    n = stats.n.astype(np.float64)
    n_all = float(n.sum())
    mean_in, var_in = _mean_var(stats.total, stats.total_sq, stats.n)
    rest_total = stats.total.sum(axis=0)[None, :] - stats.total
    rest_sq = stats.total_sq.sum(axis=0)[None, :] - stats.total_sq
    n_rest = (n_all - n).astype(np.int64)
    mean_out, var_out = _mean_var(rest_total, rest_sq, n_rest)
    var_in, var_out = np.maximum(var_in, 0.0), np.maximum(var_out, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        score, pval = st.ttest_ind_from_stats(
            mean1=mean_in,
            std1=np.sqrt(var_in),
            nobs1=n[:, None],
            mean2=mean_out,
            std2=np.sqrt(var_out),
            nobs2=n_rest[:, None].astype(np.float64),
            equal_var=False,
        )
    score = np.where(np.isnan(score), 0.0, score)
    pval = np.where(np.isnan(pval), 1.0, pval)
    logfc = np.log2((np.expm1(mean_in) + 1e-9) / (np.expm1(mean_out) + 1e-9))
    nnz_rest = stats.nnz.sum(axis=0)[None, :] - stats.nnz
    pct_in = stats.nnz / np.maximum(stats.n, 1)[:, None]
    pct_out = nnz_rest / np.maximum(n_rest, 1)[:, None]
    k = min(n_top, names.size)
    rows = []
    for c in range(stats.n.size):
        order = np.argsort(-score[c], kind="stable")[:k]
        rows.append(
            pd.DataFrame(
                {
                    "cluster": c,
                    "rank": np.arange(k),
                    "gene": names[order],
                    "score": score[c, order],
                    "logfc": logfc[c, order],
                    "pct_in": pct_in[c, order],
                    "pct_out": pct_out[c, order],
                    "pval": pval[c, order],
                }
            )
        )
    return pd.concat(rows, ignore_index=True)[MARKER_COLUMNS]
