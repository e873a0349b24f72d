"""The shared kNN graph (issue #14): same metric values as the previous scikit-learn path."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_samples
from sklearn.neighbors import NearestNeighbors

from raypipe.core.neighbors import cosine_neighbors
from raypipe.evaluate import metrics as M
from raypipe.evaluate.silhouette import cosine_silhouette_samples


def test_exact_neighbors_match_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    got = cosine_neighbors(x, 10, block=128)
    dist, idx = NearestNeighbors(n_neighbors=10, metric="cosine").fit(x).kneighbors()
    assert got.exact
    assert (got.indices == idx).mean() > 0.999
    np.testing.assert_allclose(got.distances, dist, atol=1e-5)
    assert not (got.indices == np.arange(600)[:, None]).any()
    assert got.first(4).indices.shape == (600, 4)


def test_cosine_silhouette_matches_sklearn_with_singletons_and_zero_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    x[5] = 0.0
    groups = rng.choice(["a", "b", "c"], size=300).astype(object)
    groups[7] = "alone"
    np.testing.assert_allclose(
        cosine_silhouette_samples(x, groups),
        silhouette_samples(x, groups, metric="cosine"),
        atol=1e-9,
    )


def test_shared_graph_metrics_equal_previous_on_kang(kang8k):
    """Kang 8k (2,000 seeded cells, PCA-50): Leiden, kNN probe, ASW within ±0.01 of before."""
    from raypipe.bench.evaluate import reference_metrics
    from raypipe.evaluate.baseline import fit_pca_baseline

    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp

    a = anndata.read_h5ad(kang8k)
    rows = M.subsample_indices(a.n_obs, 2000, seed=0)
    counts = sp.csr_matrix(a.X)[rows]
    x = fit_pca_baseline(lambda: iter([counts]), 50)
    lab = a.obs["cluster_id"].astype(str).to_numpy()[rows]
    before = reference_metrics(x, lab, k=15, seed=0)
    graph = cosine_neighbors(x, 35)
    leiden = M.leiden_agreement(x, lab, k_neighbors=15, seed=0, neighbors=graph)
    assert leiden["ari"] == pytest.approx(before["ari_leiden"], abs=0.01)
    knn = M.knn_accuracy(x, lab, k=15, seed=0, neighbors=graph)
    assert knn == pytest.approx(before["knn_accuracy"], abs=0.01)
    assert M.asw_label(x, lab) == pytest.approx(before["asw_label"], abs=1e-6)


def test_knn_accuracy_falls_back_when_graph_is_short():
    """A graph too small to hold k training neighbours gives the exact answer anyway."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 5))
    lab = rng.choice(["a", "b"], size=200).astype(object)
    full = M.knn_accuracy(x, lab, k=7, seed=1)
    short = M.knn_accuracy(x, lab, k=7, seed=1, neighbors=cosine_neighbors(x, 8))
    assert short == pytest.approx(full)
