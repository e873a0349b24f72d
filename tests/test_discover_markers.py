"""Marker genes per cluster: sums merged over shards equal scanpy's t-test on the whole matrix."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from raypipe.annotate.cluster_markers import ClusterStats, cluster_sums, rank_markers
from raypipe.core.expression import log_normalize


@pytest.fixture(scope="module")
def kang_lognorm(kang1k5):
    a = ad.read_h5ad(kang1k5)
    xl = log_normalize(sp.csr_matrix(a.X))
    clusters = a.obs["cluster_id"].astype("category").cat.codes.to_numpy()
    return xl, clusters, np.asarray(a.var_names), a.obs["cluster_id"].astype("category")


def test_t_test_equals_scanpy_on_real_cells(kang_lognorm):
    """Top 25 genes per cluster, their scores, logFC and fractions: scanpy's t-test, exactly."""
    import scanpy as sc

    xl, clusters, genes, cats = kang_lognorm
    n_clusters = int(clusters.max()) + 1
    stats = ClusterStats.zeros(n_clusters, xl.shape[1])
    for start in range(0, xl.shape[0], 300):  # five "shards", merged as the driver does
        stats.merge(
            cluster_sums(xl[start : start + 300], clusters[start : start + 300], n_clusters)
        )
    ours = rank_markers(stats, genes, n_top=25)

    adata = ad.AnnData(X=xl.copy(), obs={"cl": cats.to_numpy()}, var={"g": genes})
    adata.obs["cl"] = adata.obs["cl"].astype("category")
    adata.var_names = genes
    sc.tl.rank_genes_groups(adata, "cl", method="t-test", n_genes=25, pts=True, use_raw=False)
    res = adata.uns["rank_genes_groups"]
    for c, name in enumerate(cats.cat.categories):
        mine = ours[ours["cluster"] == c]
        theirs_genes = np.asarray(res["names"][name], dtype=object)
        theirs_scores = np.asarray(res["scores"][name], dtype=np.float64)
        np.testing.assert_allclose(mine["score"].to_numpy(), theirs_scores, rtol=1e-4, atol=1e-4)
        assert list(mine["gene"]) == list(theirs_genes), name
        lfc = np.asarray(res["logfoldchanges"][name], dtype=np.float64)
        np.testing.assert_allclose(mine["logfc"].to_numpy(), lfc, rtol=1e-3, atol=1e-3)
        pts = res["pts"][name].loc[theirs_genes].to_numpy()
        pts_rest = res["pts_rest"][name].loc[theirs_genes].to_numpy()
        np.testing.assert_allclose(mine["pct_in"].to_numpy(), pts, atol=1e-9)
        np.testing.assert_allclose(mine["pct_out"].to_numpy(), pts_rest, atol=1e-9)


def test_a_single_cell_cluster_scores_without_nan():
    x = sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.5, 0.5]]))
    stats = cluster_sums(x, np.array([0, 0, 0, 1]), 2)
    out = rank_markers(stats, ["A", "B"], n_top=2)
    assert np.isfinite(out[["score", "logfc", "pct_in", "pct_out"]].to_numpy()).all()
    assert (out.groupby("cluster").size() == 2).all()
