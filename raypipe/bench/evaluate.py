"""Evaluation benchmark: the shared-graph metrics vs the previous implementation, side by side.

On real cells (Kang 2018 PBMCs by default; ``--embedding`` may name an ``.npy`` instead of the
PCA-50 baseline) it times and prints, in one process:

* **before**: scikit-learn per metric, as the evaluation did until issue #14 — a
  ``NearestNeighbors`` graph inside Leiden (leidenalg), five ``KNeighborsClassifier`` fits for the kNN probe,
  ``silhouette_samples`` (cosine, quadratic), and umap-learn's own neighbour search;
* **after**: one :func:`~raypipe.core.neighbors.cosine_neighbors` graph shared by Leiden,
  the kNN probe and the UMAP, igraph's C Leiden, the linear-time cosine silhouette;

and each metric's value under both (the issue's tolerance is ±0.01)::

    python jobs/benchmark.py eval [--cells 8684] [--umap]

``--umap`` adds the report's 2-D projection (the first one in a process compiles numba code).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from raypipe.bench.scale import SOURCE
from raypipe.core.neighbors import bisect_resolution, knn_igraph

__all__ = ["main", "reference_metrics"]


def reference_metrics(x: np.ndarray, lab: np.ndarray, *, k: int = 15, seed: int = 0) -> dict:
    """Compute the previous (scikit-learn) Leiden graph, kNN probe and cosine silhouette.

    Returns
    -------
    dict
        ``ari_leiden``, ``knn_accuracy``, ``asw_label`` and ``seconds`` per metric.
    """
    import leidenalg
    from sklearn.metrics import adjusted_rand_score, silhouette_samples
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    def _leiden(graph: Any, resolution: float, seed: int) -> np.ndarray:
        part = leidenalg.find_partition(
            graph,
            leidenalg.RBConfigurationVertexPartition,
            weights="weight",
            resolution_parameter=resolution,
            seed=seed,
        )
        return np.asarray(part.membership)

    out: dict[str, Any] = {"seconds": {}}
    t = time.perf_counter()
    idx = (
        NearestNeighbors(n_neighbors=k + 1, metric="cosine")
        .fit(x)
        .kneighbors(return_distance=False)[:, :k]
    )
    graph = knn_igraph(idx)
    _, clusters = bisect_resolution(  # the same bisection as leiden_agreement
        lambda r: _leiden(graph, r, seed), len(np.unique(lab)), resolution=1.0, max_steps=12
    )
    out["ari_leiden"] = float(adjusted_rand_score(lab, clusters))
    out["seconds"]["leiden"] = time.perf_counter() - t
    t = time.perf_counter()
    correct = 0
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, lab):
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(x[train], lab[train])
        correct += int(np.sum(clf.predict(x[test]) == lab[test]))
    out["knn_accuracy"] = correct / x.shape[0]
    out["seconds"]["knn_accuracy"] = time.perf_counter() - t
    t = time.perf_counter()
    out["asw_label"] = float((np.mean(silhouette_samples(x, lab, metric="cosine")) + 1) / 2)
    out["seconds"]["asw_label"] = time.perf_counter() - t
    return out


def _embedding(cells: int, seed: int) -> tuple[np.ndarray, Any]:
    import anndata as ad
    import scipy.sparse as sp

    from raypipe.evaluate.baseline import fit_pca_baseline
    from raypipe.evaluate.metrics import subsample_indices

    a = ad.read_h5ad(SOURCE)
    rows = subsample_indices(a.n_obs, cells, seed=seed)
    x = sp.csr_matrix(a.X)[rows]
    lab = a.obs["cluster_id"].astype(str).to_numpy()[rows]
    return fit_pca_baseline(lambda: iter([x]), 50), lab


def main(argv: list[str] | None = None) -> dict:
    """Print before/after seconds and values; return them."""
    import warnings

    from raypipe.core.neighbors import cosine_neighbors
    from raypipe.evaluate import metrics as M

    warnings.filterwarnings("ignore", module="umap")
    p = argparse.ArgumentParser(prog="benchmark.py eval", description=__doc__)
    p.add_argument("--cells", type=int, default=8684)
    p.add_argument("--embedding", help=".npy (cells × d) instead of the PCA-50 baseline")
    p.add_argument("--umap", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x, lab = _embedding(args.cells, args.seed)
    if args.embedding:
        x = np.load(args.embedding)[: lab.size]
    print(f"evaluation benchmark: {x.shape[0]} cells × {x.shape[1]} dims, {len(set(lab))} labels")
    before = reference_metrics(x, lab, seed=args.seed)
    after: dict[str, Any] = {"seconds": {}}
    t = time.perf_counter()
    graph = cosine_neighbors(x, 35, seed=args.seed)
    after["seconds"]["neighbors"] = time.perf_counter() - t
    t = time.perf_counter()
    after["ari_leiden"] = M.leiden_agreement(x, lab, seed=args.seed, neighbors=graph)["ari"]
    after["seconds"]["leiden"] = time.perf_counter() - t
    t = time.perf_counter()
    after["knn_accuracy"] = M.knn_accuracy(x, lab, seed=args.seed, neighbors=graph)
    after["seconds"]["knn_accuracy"] = time.perf_counter() - t
    t = time.perf_counter()
    after["asw_label"] = M.asw_label(x, lab)
    after["seconds"]["asw_label"] = time.perf_counter() - t
    if args.umap:
        from raypipe.evaluate.report import umap_2d

        t = time.perf_counter()
        umap_2d(x, seed=args.seed)
        after["seconds"]["umap"] = time.perf_counter() - t
        import umap

        t = time.perf_counter()
        umap.UMAP(n_neighbors=15, metric="cosine", random_state=args.seed, n_jobs=1).fit_transform(
            x
        )
        before["seconds"]["umap"] = time.perf_counter() - t
    print(f"{'metric':<14}{'before s':>10}{'after s':>10}{'before':>10}{'after':>10}{'|Δ|':>8}")
    for m in ("ari_leiden", "knn_accuracy", "asw_label"):
        step = "leiden" if m == "ari_leiden" else m
        d = abs(before[m] - after[m])
        print(
            f"{m:<14}{before['seconds'][step]:>10.2f}{after['seconds'][step]:>10.2f}"
            f"{before[m]:>10.4f}{after[m]:>10.4f}{d:>8.4f}"
        )
    for step in ("neighbors", "umap"):
        if step in after["seconds"]:
            b = before["seconds"].get(step)
            print(f"{step:<14}{'' if b is None else f'{b:.2f}':>10}{after['seconds'][step]:>10.2f}")
    tb, ta = sum(before["seconds"].values()), sum(after["seconds"].values())
    print(f"{'total':<14}{tb:>10.2f}{ta:>10.2f}   speed-up {tb / ta:.1f}× (same process)")
    return {"before": before, "after": after}
