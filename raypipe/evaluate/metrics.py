"""Evaluation metrics: pure functions ``metric(X, labels, *, ...)``, checked against scikit-learn.

Conventions
-----------
* Labels may hold missing values (NaN/None): those cells are dropped inside every metric.
* When a metric cannot be computed (fewer than 2 classes, more clusters than cells, ...) it
  raises :class:`MetricSkipped` with the reason; :func:`safe` turns that into
  ``(None, reason)`` so a reduction never crashes.
* Randomness only through ``np.random.default_rng(seed)`` / ``random_state=seed``.
* Quadratic metrics (silhouettes, Leiden, kNN probe) are meant to run on
  :func:`subsample_indices` (uniform, seeded, without replacement, sorted); exact ones
  (accuracy, F1, confusion, retrieval) on all cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from raypipe.core.neighbors import (
    Neighbors,
    bisect_resolution,
    cosine_neighbors,
    knn_igraph,
    leiden,
    normalize_rows,
)
from raypipe.errors import RaypipeError
from raypipe.evaluate.confusion import (
    confusion_matrix,
    label_codes,
    merge_confusion,
    present_labels,
)
from raypipe.evaluate.silhouette import cosine_silhouette_samples

__all__ = [
    "MetricSkipped",
    "accuracy",
    "accuracy_from_confusion",
    "asw_batch",
    "asw_label",
    "avg_bio",
    "confusion_matrix",
    "kmeans_agreement",
    "knn_accuracy",
    "leiden_agreement",
    "macro_f1",
    "macro_f1_from_table",
    "merge_confusion",
    "per_class_from_confusion",
    "per_class_precision_recall",
    "retrieval_recall",
    "s_final",
    "safe",
    "subsample_indices",
]


class MetricSkipped(RaypipeError):
    """A metric cannot be computed on this input; the message says why."""


def safe(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """Call a metric; return ``(value, None)`` or ``(None, reason)`` when it was skipped."""
    try:
        return fn(*args, **kwargs), None
    except MetricSkipped as exc:
        return None, exc.message


def _clean(labels: Any, *others: Any) -> tuple[np.ndarray, ...]:
    """Drop cells whose label is missing; labels become strings."""
    lab = np.asarray(labels, dtype=object)
    keep = present_labels(lab)
    out = [lab[keep].astype(str)]
    for o in others:
        out.append(np.asarray(o)[keep] if o is not None else None)
    return tuple(out)


def _need_classes(labels: np.ndarray, what: str, minimum: int = 2) -> int:
    k = len(np.unique(labels))
    if k < minimum:
        raise MetricSkipped(f"{what} needs at least {minimum} classes; the labels have {k}")
    return k


def subsample_indices(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Seeded uniform subsample of ``min(n, size)`` row indices (sorted, no replacement)."""
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Share of cells whose prediction equals the label (``unassigned`` counts as wrong).

    Parameters
    ----------
    y_true, y_pred
        (n,) labels and predictions; cells with a missing label are dropped.
    """
    t, p, _ = label_codes(y_true, y_pred)
    if t.size == 0:
        raise MetricSkipped("accuracy: no cell has a label")
    return float(np.mean(t == p))


def accuracy_from_confusion(conf: pd.DataFrame) -> float:
    """:func:`accuracy` from a :func:`confusion_matrix` (no second pass over the cells)."""
    total = int(conf.to_numpy().sum())
    if total == 0:
        raise MetricSkipped("accuracy: no cell has a label")
    both = conf.index.intersection(conf.columns)
    return float(sum(int(conf.at[lab, lab]) for lab in both) / total)


def per_class_from_confusion(conf: pd.DataFrame) -> pd.DataFrame:
    """:func:`per_class_precision_recall` from a :func:`confusion_matrix`."""
    n_pred = conf.sum(axis=0)
    rows = []
    for lab, counts in conf.iterrows():
        support = int(counts.sum())
        tp = float(counts.get(lab, 0))
        prec = tp / float(n_pred[lab]) if lab in n_pred.index and n_pred[lab] else 0.0
        rec = tp / support
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append(
            {"label": str(lab), "precision": prec, "recall": rec, "f1": f1, "support": support}
        )
    return pd.DataFrame(rows, columns=["label", "precision", "recall", "f1", "support"])


def per_class_precision_recall(y_true: Sequence[Any], y_pred: Sequence[Any]) -> pd.DataFrame:
    """Precision, recall, F1 and support for each true label.

    Returns
    -------
    pandas.DataFrame
        Columns ``label, precision, recall, f1, support``; one row per true label (sorted).
        Precision is 0 for a class never predicted (scikit-learn's ``zero_division=0``).
    """
    return per_class_from_confusion(confusion_matrix(y_true, y_pred))


def macro_f1_from_table(table: pd.DataFrame) -> float:
    """:func:`macro_f1` from a :func:`per_class_precision_recall` table."""
    if table.empty:
        raise MetricSkipped("macro_f1: no cell has a label")
    return float(table["f1"].mean())


def macro_f1(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Macro-averaged F1 over the true labels (``f1_score(average="macro", labels=true)``)."""
    return macro_f1_from_table(per_class_precision_recall(y_true, y_pred))


def _agreement(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import (
        adjusted_mutual_info_score,
        adjusted_rand_score,
        normalized_mutual_info_score,
    )

    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
    }


def kmeans_agreement(
    X: np.ndarray, labels: Sequence[Any], *, seed: int = 0, n_init: int = 10
) -> dict[str, float]:
    """ARI / AMI / NMI between the labels and k-means with k = number of labels.

    Parameters
    ----------
    X
        (n, d) embedding.
    labels
        (n,) labels.
    seed
        k-means ``random_state``.
    n_init
        k-means restarts.

    Returns
    -------
    dict
        ``{"ari", "ami", "nmi"}``.
    """
    from sklearn.cluster import KMeans

    lab, x = _clean(labels, X)
    k = _need_classes(lab, "kmeans_agreement")
    if k > len(np.unique(x, axis=0)):
        raise MetricSkipped(f"kmeans_agreement: {k} clusters but only {x.shape[0]} distinct cells")
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    return _agreement(lab, clusters)


def leiden_agreement(
    X: np.ndarray,
    labels: Sequence[Any],
    *,
    k_neighbors: int = 15,
    resolution: float = 1.0,
    match_n_labels: bool = True,
    seed: int = 0,
    max_steps: int = 12,
    neighbors: Neighbors | None = None,
) -> dict[str, float]:
    """ARI / AMI / NMI between the labels and Leiden clusters of a kNN graph.

    The graph joins each cell to its ``k_neighbors`` nearest neighbours (cosine), symmetrised,
    unit weights; pass ``neighbors`` (of these rows, at least ``k_neighbors`` each) to reuse a
    graph built once per embedding. With ``match_n_labels`` the resolution is bisected (geometrically, starting
    at ``resolution``, at most ``max_steps`` tries) for a cluster count equal to the number of
    labels; the closest count found is used. Otherwise ``resolution`` is used as given.

    Returns
    -------
    dict
        ``{"ari", "ami", "nmi", "n_clusters", "resolution"}``.
    """
    lab, x = _clean(labels, X)
    k = _need_classes(lab, "leiden_agreement")
    n = x.shape[0]
    if n <= k_neighbors:
        raise MetricSkipped(
            f"leiden_agreement: {n} cells, need more than k_neighbors={k_neighbors}"
        )
    graph = knn_igraph(_graph(neighbors, x, n, k_neighbors, seed).indices[:, :k_neighbors])
    res, clusters = bisect_resolution(
        lambda r: leiden(graph, r, seed=seed),
        k,
        resolution=resolution,
        max_steps=max_steps if match_n_labels else 1,
    )
    out: dict[str, float] = _agreement(lab, clusters)
    out["n_clusters"] = float(len(np.unique(clusters)))
    out["resolution"] = float(res)
    return out


def _graph(neighbors: Neighbors | None, x: np.ndarray, n: int, k: int, seed: int) -> Neighbors:
    """Reuse the shared graph when it fits these ``n`` rows with ``k`` neighbours, else build one."""
    if neighbors is not None and neighbors.indices.shape[0] == n and neighbors.k >= k:
        return neighbors
    return cosine_neighbors(x, k, seed=seed)


def _silhouette(x: np.ndarray, groups: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return cosine_silhouette_samples(x, groups)
    from sklearn.metrics import silhouette_samples

    return np.asarray(silhouette_samples(x, groups, metric=metric))


def asw_label(X: np.ndarray, labels: Sequence[Any], *, metric: str = "cosine") -> float:
    """ASW_label = (mean silhouette of the labels + 1) / 2, cosine distance by default.

    Parameters
    ----------
    X
        (n, d) embedding (pass a subsample: memory is quadratic in n per chunk).
    labels
        (n,) labels.
    metric
        ``"cosine"`` (METHODS.md) or ``"euclidean"`` (scib-metrics' default).
    """
    lab, x = _clean(labels, X)
    _need_classes(lab, "asw_label")
    if len(np.unique(lab)) >= lab.size:
        raise MetricSkipped("asw_label: every cell is its own class")
    return float((np.mean(_silhouette(x, lab, metric)) + 1) / 2)


def asw_batch(
    X: np.ndarray, labels: Sequence[Any], batches: Sequence[Any], *, metric: str = "euclidean"
) -> float:
    """Return scIB ASW_batch, following scib-metrics' ``silhouette_batch`` (rescale=True).

    For each label: silhouette of the cells of that label with the batches as clusters,
    ``1 - |s|`` per cell, averaged per label; labels with a single batch, or with as many
    batches as cells, are skipped; the result is the mean over labels. 1 = well mixed.

    Parameters
    ----------
    X
        (n, d) embedding.
    labels, batches
        (n,) labels and batch ids (cells with a missing label or batch are dropped).
    metric
        ``"euclidean"`` (scib-metrics' default) or ``"cosine"``.
    """
    lab, x, bat = _clean(labels, X, np.asarray(batches, dtype=object))
    keep = present_labels(bat)
    lab, x, bat = lab[keep], x[keep], bat[keep].astype(str)
    if len(np.unique(bat)) < 2:
        raise MetricSkipped("asw_batch needs at least 2 batches")
    means = []
    for group in np.unique(lab):
        mask = lab == group
        n_b = len(np.unique(bat[mask]))
        if n_b == 1 or n_b == int(mask.sum()):
            continue
        means.append(np.mean(1 - np.abs(_silhouette(x[mask], bat[mask], metric))))
    if not means:
        raise MetricSkipped("asw_batch: no label has cells from 2 or more batches")
    return float(np.mean(means))


def avg_bio(ari: float, nmi: float, asw_label_value: float) -> float:
    """Return scIB AvgBio = mean(ARI, NMI, ASW_label)."""
    return float(np.mean([ari, nmi, asw_label_value]))


def s_final(avg_bio_value: float, asw_batch_value: float) -> float:
    """S_final = 0.6 * bio + 0.4 * batch (scib-metrics' weights; batch = ASW_batch here)."""
    return float(0.6 * avg_bio_value + 0.4 * asw_batch_value)


def knn_accuracy(
    X: np.ndarray,
    labels: Sequence[Any],
    *,
    k: int = 15,
    n_folds: int = 5,
    seed: int = 0,
    neighbors: Neighbors | None = None,
) -> float:
    """Return the kNN label-transfer accuracy, stratified k-fold (a few-shot probe).

    Each held-out cell takes the uniform vote of its ``k`` nearest training-fold cells (ties:
    the first label in sorted order, as scikit-learn's ``KNeighborsClassifier``). The
    neighbours come from one graph of every cell: a cell's nearest training cells are its
    nearest neighbours outside its own fold; a cell with fewer than ``k`` of them in the graph
    is searched exactly against its training folds.

    Parameters
    ----------
    X
        (n, d) embedding.
    labels
        (n,) labels.
    k
        Neighbours (cosine distance, uniform vote); capped to the training-fold size.
    n_folds
        Folds of ``StratifiedKFold(shuffle=True, random_state=seed)``.
    seed
        Fold shuffling seed.
    neighbors
        A graph of these rows to reuse (best with about ``2k + 5`` neighbours per cell).

    Returns
    -------
    float
        Accuracy over all held-out cells.
    """
    from sklearn.model_selection import StratifiedKFold

    lab, x = _clean(labels, X)
    _need_classes(lab, "knn_accuracy")
    smallest = int(pd.Series(lab).value_counts().min())
    if smallest < n_folds:
        raise MetricSkipped(
            f"knn_accuracy: the smallest class has {smallest} cells, fewer than n_folds={n_folds}"
        )
    n = lab.size
    classes, codes = np.unique(lab, return_inverse=True)
    fold = np.empty(n, dtype=np.int64)
    for f, (_, test) in enumerate(
        StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, lab)
    ):
        fold[test] = f
    kk = min(k, int(n - np.bincount(fold).max()))
    graph = _graph(neighbors, x, n, min(n - 1, 2 * k + 5), seed)
    other = fold[graph.indices] != fold[:, None]  # (n, g): neighbour is in a training fold
    rank = np.cumsum(other, axis=1)
    use = other & (rank <= kk)
    votes = np.zeros((n, classes.size), dtype=np.int64)
    rows = np.broadcast_to(np.arange(n)[:, None], use.shape)
    np.add.at(votes, (rows[use], codes[graph.indices[use]]), 1)
    short = np.flatnonzero(rank[:, -1] < kk)
    if short.size:  # too few training neighbours in the graph: exact search for these cells
        xn = normalize_rows(x)
        for i in short:
            train = np.flatnonzero(fold != fold[i])
            sims = xn[train] @ xn[i]
            best = train[np.argsort(-sims, kind="stable")[:kk]]
            votes[i] = np.bincount(codes[best], minlength=classes.size)
    return float(np.mean(np.argmax(votes, axis=1) == codes))


def retrieval_recall(
    cell_emb: np.ndarray,
    text_emb: np.ndarray,
    cell_label_idx: Sequence[int],
    *,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Cell → text retrieval recall@k: is the cell's own type's text among its k best texts.

    Parameters
    ----------
    cell_emb
        (n, d) cell embeddings (centre them beforehand if the scorer centres).
    text_emb
        (t, d) candidate-text embeddings.
    cell_label_idx
        (n,) row of ``text_emb`` that describes each cell's true type; negative = no text
        (those cells are dropped).
    ks
        Cut-offs. A cut-off >= t is trivially 1 and is skipped (left out of the result).

    Returns
    -------
    dict
        k → recall. Ties count against the cell (a text scoring equal to the true one ranks
        ahead of it).
    """
    idx = np.asarray(cell_label_idx, dtype=np.int64)
    cells = np.asarray(cell_emb, dtype=np.float64)[idx >= 0]
    idx = idx[idx >= 0]
    texts = np.asarray(text_emb, dtype=np.float64)
    if idx.size == 0:
        raise MetricSkipped("retrieval_recall: no cell has a label with a text")
    t = texts.shape[0]
    cells = cells / np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)
    texts = texts / np.maximum(np.linalg.norm(texts, axis=1, keepdims=True), 1e-12)
    sims = cells @ texts.T
    own = sims[np.arange(idx.size), idx]
    rank = np.sum(sims >= own[:, None], axis=1) - 1  # 0 = best
    out = {int(k): float(np.mean(rank < k)) for k in ks if k < t}
    if not out:
        raise MetricSkipped(f"retrieval_recall: only {t} texts, every k in {list(ks)} is trivial")
    return out
