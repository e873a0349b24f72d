"""Label comparison as counts: integer label codes and exact confusion matrices.

The label metrics (:mod:`raypipe.evaluate.metrics`: accuracy, per-class precision/recall/F1,
macro-F1) all follow from one :func:`confusion_matrix`, so an evaluation passes over a
million cells' labels once per annotation method.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["confusion_matrix", "label_codes", "merge_confusion", "present_labels"]


def present_labels(labels: Any) -> np.ndarray:
    """Return True where a label is present (not None/NaN)."""
    return ~pd.isna(pd.Series(np.asarray(labels, dtype=object))).to_numpy()


def label_codes(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes of the labelled cells' truth and prediction over one vocabulary.

    Cells with a missing label are dropped; labels and predictions are compared as strings
    (a missing prediction is ``"nan"``). The vocabulary is the sorted strings, so code order is
    label order. Only the distinct values are turned into strings: a million cells cost two
    hash passes, not a million ``str`` calls.
    """
    yt = np.asarray(y_true, dtype=object)
    yp = np.asarray(y_pred, dtype=object)
    keep = present_labels(yt)
    ct, ut = pd.factorize(yt[keep])
    cp, up = pd.factorize(yp[keep], use_na_sentinel=False)
    names_t = np.array([str(u) for u in ut], dtype=object)
    names_p = np.array([str(u) for u in up], dtype=object)
    vocab = np.unique(np.concatenate([names_t, names_p]).astype(str))
    t = np.searchsorted(vocab, names_t.astype(str))[ct] if ct.size else ct
    p = np.searchsorted(vocab, names_p.astype(str))[cp] if cp.size else cp
    return np.asarray(t, np.int64), np.asarray(p, np.int64), vocab


def confusion_matrix(y_true: Sequence[Any], y_pred: Sequence[Any]) -> pd.DataFrame:
    """Exact confusion counts: rows = true labels, columns = predicted labels (both sorted).

    Shard results add up with :func:`merge_confusion`.
    """
    t, p, vocab = label_codes(y_true, y_pred)
    v = vocab.size
    counts = np.bincount(t * v + p, minlength=v * v).reshape(v, v)
    rows, cols = np.unique(t), np.unique(p)
    return pd.DataFrame(
        counts[np.ix_(rows, cols)].astype(np.int64),
        index=pd.Index([str(x) for x in vocab[rows]], name="true"),
        columns=pd.Index([str(x) for x in vocab[cols]], name="predicted"),
    )


def merge_confusion(parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Sum partial confusion matrices (label sets may differ between shards)."""
    total: pd.DataFrame | None = None
    for part in parts:
        total = part if total is None else total.add(part, fill_value=0)
    if total is None:
        return pd.DataFrame(dtype=np.int64)
    total = total.fillna(0).astype(np.int64)
    return total.sort_index(axis=0).sort_index(axis=1)
