"""Evaluation reductions: every metric for every embedding and annotation, in long format.

``metrics.parquet`` columns: ``dataset, method, metric, value, n_cells, sample_size``, with
metric names (fixed, comparable across runs): accuracy, macro_f1, ari_kmeans, ami_kmeans,
nmi_kmeans, ari_leiden, ami_leiden, asw_label, asw_batch, avg_bio, s_final, knn_accuracy,
recall_at_1, recall_at_5, recall_at_10, cl_exact, cl_lineage (calls and truth as Cell Ontology
terms, :mod:`raypipe.evaluate.ontology_metrics`).

Exact metrics (accuracy, macro_f1, retrieval) use every labelled cell. Quadratic ones
(k-means/Leiden agreement, silhouettes, kNN probe) use one seeded uniform subsample of the
labelled cells of at most ``evaluate.sample_size`` rows, the same rows for every method.
AvgBio uses the k-means ARI/NMI; S_final = 0.6·AvgBio + 0.4·ASW_batch.

One cosine kNN graph per embedding (:func:`raypipe.core.neighbors.cosine_neighbors`,
``2·knn_k + 5`` neighbours) serves Leiden, the kNN probe and the report's UMAP; each metric's
seconds are kept in :attr:`Evaluation.timings` (the manifest records them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.core.neighbors import Neighbors, cosine_neighbors
from raypipe.errors import InputError
from raypipe.evaluate import metrics as M

if TYPE_CHECKING:
    from raypipe.config import EvaluateConfig

__all__ = ["METRIC_COLUMNS", "METRIC_NAMES", "Evaluation", "evaluate_embeddings"]

METRIC_COLUMNS = ["dataset", "method", "metric", "value", "n_cells", "sample_size"]
METRIC_NAMES = [
    "accuracy",
    "macro_f1",
    "ari_kmeans",
    "ami_kmeans",
    "nmi_kmeans",
    "ari_leiden",
    "ami_leiden",
    "asw_label",
    "asw_batch",
    "avg_bio",
    "s_final",
    "knn_accuracy",
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "cl_exact",
    "cl_lineage",
]


@dataclass
class Evaluation:
    """What :func:`evaluate_embeddings` returns.

    Attributes
    ----------
    metrics
        Long table, columns :data:`METRIC_COLUMNS` (write it to ``metrics.parquet``).
    skipped
        ``dataset, method, metric, reason`` for every metric not computed.
    confusion
        Annotation method → confusion counts (rows true, columns predicted).
    per_class
        Annotation method → per-class precision/recall/F1/support.
    sample
        Row indices (into the atlas) of the subsample used by the quadratic metrics.
    notes
        Human-readable remarks (cells dropped for missing labels, ...).
    timings
        Method → step (``neighbors``, ``kmeans``, ``leiden``, ...) → seconds.
    graphs
        Method → the kNN graph of its sample rows (reused by the report's UMAP).
    """

    metrics: pd.DataFrame
    skipped: pd.DataFrame
    confusion: dict[str, pd.DataFrame] = field(default_factory=dict)
    per_class: dict[str, pd.DataFrame] = field(default_factory=dict)
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    notes: list[str] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    graphs: dict[str, Neighbors] = field(default_factory=dict)


class _Sink:
    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.rows: list[dict[str, Any]] = []
        self.skips: list[dict[str, Any]] = []

    def add(self, method: str, metric: str, value: float, n: int, sample: int) -> None:
        self.rows.append(
            dict(
                zip(
                    METRIC_COLUMNS,
                    [self.dataset, method, metric, float(value), n, sample],
                    strict=True,
                )
            )
        )

    def skip(self, method: str, metrics: Sequence[str], reason: str) -> None:
        for m in metrics:
            self.skips.append(
                {"dataset": self.dataset, "method": method, "metric": m, "reason": reason}
            )


def _embedding_metrics(
    sink: _Sink,
    method: str,
    x: np.ndarray,
    lab: np.ndarray,
    bat: np.ndarray | None,
    n_lab: int,
    cfg: EvaluateConfig,
) -> tuple[dict[str, float], Neighbors | None]:
    ns = x.shape[0]
    vals: dict[str, float] = {}
    times: dict[str, float] = {}

    def timed(step: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[step] = round(time.perf_counter() - t, 3)

    graph: Neighbors | None = None
    if ns > 2 * cfg.knn_k + 5:
        graph = timed("neighbors", cosine_neighbors, x, 2 * cfg.knn_k + 5, seed=cfg.seed)
    km, why = timed("kmeans", M.safe, M.kmeans_agreement, x, lab, seed=cfg.seed)
    if km is None:
        sink.skip(method, ["ari_kmeans", "ami_kmeans", "nmi_kmeans"], str(why))
    else:
        for key in ("ari", "ami", "nmi"):
            vals[f"{key}_kmeans"] = km[key]
    ld, why = timed(
        "leiden",
        M.safe,
        M.leiden_agreement,
        x,
        lab,
        k_neighbors=cfg.knn_k,
        resolution=cfg.leiden_resolution,
        seed=cfg.seed,
        neighbors=graph,
    )
    if ld is None:
        sink.skip(method, ["ari_leiden", "ami_leiden"], str(why))
    else:
        vals["ari_leiden"], vals["ami_leiden"] = ld["ari"], ld["ami"]
    asw, why = timed("asw_label", M.safe, M.asw_label, x, lab)
    if asw is None:
        sink.skip(method, ["asw_label"], str(why))
    else:
        vals["asw_label"] = asw
    if bat is None:
        sink.skip(method, ["asw_batch", "s_final"], "no batch column (input.batch_key)")
    elif np.array_equal(bat, lab):
        sink.skip(method, ["asw_batch", "s_final"], "batch column equals the label column")
    else:
        ab, why = timed("asw_batch", M.safe, M.asw_batch, x, lab, bat)
        if ab is None:
            sink.skip(method, ["asw_batch", "s_final"], str(why))
        else:
            vals["asw_batch"] = ab
    if {"ari_kmeans", "nmi_kmeans", "asw_label"} <= vals.keys():
        vals["avg_bio"] = M.avg_bio(vals["ari_kmeans"], vals["nmi_kmeans"], vals["asw_label"])
        if "asw_batch" in vals:
            vals["s_final"] = M.s_final(vals["avg_bio"], vals["asw_batch"])
    else:
        sink.skip(method, ["avg_bio", "s_final"], "needs ari_kmeans, nmi_kmeans and asw_label")
    knn, why = timed(
        "knn_accuracy", M.safe, M.knn_accuracy, x, lab, k=cfg.knn_k, seed=cfg.seed, neighbors=graph
    )
    if knn is None:
        sink.skip(method, ["knn_accuracy"], str(why))
    else:
        vals["knn_accuracy"] = knn
    for name in METRIC_NAMES:
        if name in vals:
            sink.add(method, name, vals[name], n_lab, ns)
    return times, graph


def evaluate_embeddings(
    dataset: str,
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence[Any],
    batches: Sequence[Any] | None = None,
    *,
    cfg: EvaluateConfig,
    annotations: Mapping[str, Sequence[Any]] | None = None,
    text_emb: Mapping[str, np.ndarray] | None = None,
    text_labels: Sequence[str] | None = None,
    center: bool = True,
) -> Evaluation:
    """Compute every metric for every embedding method and every annotation.

    Parameters
    ----------
    dataset
        Dataset name (``input.name`` or the file stem).
    embeddings
        Method → (n, d) embedding in obs order (include the baseline as ``"pca"``).
    labels
        (n,) true labels (missing values are dropped and counted in ``notes``).
    batches
        (n,) batch ids, or None (then asw_batch and s_final are skipped).
    cfg
        The ``evaluate`` config (sample_size, seed, leiden_resolution, knn_k).
    annotations
        Annotation method → (n,) predicted labels (accuracy, macro_f1, confusion).
    text_emb
        Method → (t, d) candidate-text embeddings in that method's space (retrieval recall).
    text_labels
        (t,) the label value each text row describes (required with ``text_emb``).
    center
        Centre cells (on the atlas mean) and texts before retrieval, as the text scorer does.

    Returns
    -------
    Evaluation
    """
    lab_all = np.asarray(labels, dtype=object)
    n = lab_all.size
    keep = ~pd.isna(pd.Series(lab_all)).to_numpy()
    lab = lab_all[keep].astype(str)
    n_lab = int(keep.sum())
    sink = _Sink(dataset)
    notes = []
    if n_lab < n:
        notes.append(f"{n - n_lab} of {n} cells have no label and are left out of every metric")
    bat = None
    if batches is not None:
        bat = np.asarray(batches, dtype=object)[keep]
        if bat.size != n_lab:
            raise InputError(f"batches have {len(batches)} entries, labels {n}")
        bat = np.where(pd.isna(pd.Series(bat)).to_numpy(), None, bat.astype(str))
    sub = M.subsample_indices(n_lab, cfg.sample_size, seed=cfg.seed)
    rows_all = np.flatnonzero(keep)
    times: dict[str, dict[str, float]] = {}
    graphs: dict[str, Neighbors] = {}
    for method, emb in embeddings.items():
        x = np.asarray(emb)
        if x.shape[0] != n:
            raise InputError(
                f"embedding {method!r} has {x.shape[0]} rows, the labels {n}",
                fix="pass embeddings in obs order covering the whole atlas",
            )
        times[method], graph = _embedding_metrics(
            sink,
            method,
            x[keep][sub],
            lab[sub],
            None if bat is None else bat[sub],
            n_lab,
            cfg,
        )
        if graph is not None:
            graphs[method] = graph
        if text_emb is not None and method in text_emb:
            _retrieval(sink, method, x[keep], lab, text_emb[method], text_labels, center)
    confusion: dict[str, pd.DataFrame] = {}
    per_class: dict[str, pd.DataFrame] = {}
    for method, pred in (annotations or {}).items():
        p = np.asarray(pred, dtype=object)
        if p.size != n:
            raise InputError(f"annotation {method!r} has {p.size} predictions, the labels {n}")
        p = p[keep]
        # one pass over the cells: accuracy and per-class F1 follow from the confusion counts
        confusion[method] = M.confusion_matrix(lab, p)
        per_class[method] = M.per_class_from_confusion(confusion[method])
        for name, fn, arg in (
            ("accuracy", M.accuracy_from_confusion, confusion[method]),
            ("macro_f1", M.macro_f1_from_table, per_class[method]),
        ):
            value, why = M.safe(fn, arg)
            if value is None:
                sink.skip(method, [name], str(why))
            else:
                sink.add(method, name, value, n_lab, n_lab)
    return Evaluation(
        metrics=pd.DataFrame(sink.rows, columns=METRIC_COLUMNS),
        skipped=pd.DataFrame(sink.skips, columns=["dataset", "method", "metric", "reason"]),
        confusion=confusion,
        per_class=per_class,
        sample=rows_all[sub],
        notes=notes,
        timings=times,
        graphs=graphs,
    )


def _retrieval(
    sink: _Sink,
    method: str,
    x: np.ndarray,
    lab: np.ndarray,
    texts: np.ndarray,
    text_labels: Sequence[str] | None,
    center: bool,
) -> None:
    names = ["recall_at_1", "recall_at_5", "recall_at_10"]
    if text_labels is None or len(text_labels) != texts.shape[0]:
        sink.skip(method, names, "text_labels missing or not one per text embedding")
        return
    pos = {str(t): i for i, t in enumerate(text_labels)}
    idx = np.array([pos.get(v, -1) for v in lab], dtype=np.int64)
    if center:
        cells = x - x.mean(axis=0)
        tx = texts - texts.mean(axis=0) if texts.shape[0] > 1 else texts
    else:
        cells, tx = x, texts
    rec, why = M.safe(M.retrieval_recall, cells, tx, idx, ks=(1, 5, 10))
    if rec is None:
        sink.skip(method, names, str(why))
        return
    n_used = int((idx >= 0).sum())
    for k in (1, 5, 10):
        if k in rec:
            sink.add(method, f"recall_at_{k}", rec[k], n_used, n_used)
        else:
            sink.skip(
                method,
                [f"recall_at_{k}"],
                f"only {texts.shape[0]} texts: recall@{k} is trivially 1",
            )
