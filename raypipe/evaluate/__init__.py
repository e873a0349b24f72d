"""Evaluation: pure metrics, the PCA baseline, the long-format reduction and the report."""

from __future__ import annotations

from raypipe.evaluate.baseline import BASELINE_METHOD, fit_pca_baseline
from raypipe.evaluate.metrics import MetricSkipped, merge_confusion, safe, subsample_indices
from raypipe.evaluate.reduce import METRIC_COLUMNS, METRIC_NAMES, Evaluation, evaluate_embeddings

__all__ = [
    "BASELINE_METHOD",
    "METRIC_COLUMNS",
    "METRIC_NAMES",
    "Evaluation",
    "MetricSkipped",
    "evaluate_embeddings",
    "fit_pca_baseline",
    "merge_confusion",
    "safe",
    "subsample_indices",
]
