"""Ontology-aware annotation metrics: calls and truth compared as Cell Ontology terms.

* ``cl_exact``: the call is the truth's CL term.
* ``cl_lineage``: the call is the truth's term, a descendant of it (more specific), or an
  ancestor at most ``max_up`` ``is_a`` steps above it that is not a broad class
  (:data:`raypipe.annotate.ontology.BROAD_CLASSES`: "cell", "leukocyte", "lymphocyte", …
  earn nothing).

Cells whose truth maps to no CL term are left out (and counted); a cell with no call
(``unassigned``, an unmapped name) counts as wrong. The ``is_a`` distances come from the
ontology source's ``ancestors: {id: steps}`` (:func:`load_ancestor_distances`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from raypipe.annotate.ontology import BROAD_CLASSES
from raypipe.errors import InputError

__all__ = [
    "BROAD_CLASSES",
    "cl_exact",
    "cl_lineage",
    "cl_metric_rows",
    "cl_per_class",
    "lineage_credit",
    "load_ancestor_distances",
]

Ancestors = Mapping[str, Mapping[str, int]]


def load_ancestor_distances(path: str | None = None) -> dict[str, dict[str, int]]:
    """CL id → {ancestor id: ``is_a`` steps}, from the same source as the ontology.

    Parameters
    ----------
    path
        A CL JSON(.gz) (``annotate.ontology``); None reads cellxgene-ontology-guide's release.
    """
    if path:
        from raypipe.core.storage import local_copy

        local = Path(local_copy(path))
        opener: Any = gzip.open if local.suffix == ".gz" else open
        try:
            with opener(local, "rt", encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"ontology file {path} cannot be read: {exc}") from None
    else:
        from cellxgene_ontology_guide.supported_versions import CXGSchema

        data = CXGSchema().ontology("CL")
    out: dict[str, dict[str, int]] = {}
    for tid, raw in data.items():
        anc = raw.get("ancestors") if isinstance(raw, Mapping) else None
        if str(tid).startswith("CL:"):
            out[str(tid)] = (
                {str(a): int(d) for a, d in anc.items()} if isinstance(anc, Mapping) else {}
            )
    return out


def lineage_credit(
    true_id: str | None,
    pred_id: str | None,
    ancestors: Ancestors,
    *,
    max_up: int = 3,
    broad: Mapping[str, str] = BROAD_CLASSES,
) -> bool:
    """Whether a call earns ``cl_lineage`` credit (see the module docstring)."""
    if not true_id or not pred_id:
        return False
    if pred_id == true_id or true_id in ancestors.get(pred_id, {}):
        return True
    steps = ancestors.get(true_id, {}).get(pred_id)
    return steps is not None and steps <= max_up and pred_id not in broad


def _ids(values: ArrayLike) -> np.ndarray:
    return np.array(
        [
            None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
            for v in np.asarray(values, dtype=object)
        ],
        dtype=object,
    )


def cl_exact(true_ids: ArrayLike, pred_ids: ArrayLike) -> float:
    """Share of cells (with a truth term) whose call is exactly the truth's CL term.

    Parameters
    ----------
    true_ids
        (n,) truth CL ids (None: the label maps to no term; left out).
    pred_ids
        (n,) called CL ids (None: no call; wrong).
    """
    t, p = _ids(true_ids), _ids(pred_ids)
    keep = np.array([v is not None for v in t], dtype=bool)
    if not keep.any():
        raise InputError("cl_exact: no cell's truth label maps to a Cell Ontology term")
    return float(np.mean(t[keep] == p[keep]))


def cl_lineage(
    true_ids: ArrayLike,
    pred_ids: ArrayLike,
    ancestors: Ancestors,
    *,
    max_up: int = 3,
) -> float:
    """Share of cells (with a truth term) whose call earns lineage credit.

    Parameters
    ----------
    true_ids, pred_ids
        (n,) truth and called CL ids (see :func:`cl_exact`).
    ancestors
        CL id → {ancestor: steps} (:func:`load_ancestor_distances`).
    max_up
        Most ``is_a`` steps an ancestor may be above the truth.
    """
    t, p = _ids(true_ids), _ids(pred_ids)
    keep = np.array([v is not None for v in t], dtype=bool)
    if not keep.any():
        raise InputError("cl_lineage: no cell's truth label maps to a Cell Ontology term")
    pairs = pd.Series(list(zip(t[keep], p[keep], strict=True))).value_counts()
    hits = sum(
        int(n) for (a, b), n in pairs.items() if lineage_credit(a, b, ancestors, max_up=max_up)
    )
    return hits / int(keep.sum())


def cl_per_class(
    true_ids: ArrayLike,
    pred_ids: ArrayLike,
    ancestors: Ancestors,
    *,
    labels: Mapping[str, str] | None = None,
    max_up: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per truth term: cells, ``cl_exact`` and ``cl_lineage``; and the confusion on CL terms.

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame)
        Per class (index ``term``: ``"CL:… label"``): ``support, cl_exact, cl_lineage``; the
        confusion counts (rows truth terms, columns called terms, ``none`` = no call).
    """
    labels = labels or {}

    def name(v: str | None) -> str:
        return "none" if v is None else f"{v} {labels.get(v, '')}".strip()

    t, p = _ids(true_ids), _ids(pred_ids)
    keep = np.array([v is not None for v in t], dtype=bool)
    df = pd.DataFrame({"true": t[keep], "pred": p[keep]})
    df["exact"] = df["true"] == df["pred"]
    df["lineage"] = [
        lineage_credit(a, b, ancestors, max_up=max_up)
        for a, b in zip(df["true"], df["pred"], strict=True)
    ]
    df["term"] = df["true"].map(name)
    per = df.groupby("term", sort=True).agg(
        support=("exact", "size"), cl_exact=("exact", "mean"), cl_lineage=("lineage", "mean")
    )
    conf = pd.crosstab(df["term"], df["pred"].map(name))
    return per, conf


def cl_metric_rows(
    dataset: str,
    labels: ArrayLike,
    calls: Mapping[str, ArrayLike],
    truth_cl: Mapping[str, str | None],
    ancestors: Ancestors,
    *,
    term_labels: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, pd.DataFrame], list[str]]:
    """``cl_exact`` / ``cl_lineage`` of every annotation method, in ``metrics.parquet`` rows.

    Parameters
    ----------
    dataset
        Dataset name.
    labels
        (n,) truth labels (``input.label_key``; missing values left out).
    calls
        Method → (n,) called CL ids (None: no call).
    truth_cl
        Truth label → CL id (None: no term; those cells are left out and noted).
    ancestors
        CL id → {ancestor: steps}.
    term_labels
        CL id → label (names in the per-class table and confusion).

    Returns
    -------
    (pandas.DataFrame, dict, dict, list of str)
        Rows ``dataset, method, metric, value, n_cells, sample_size``; per method the per-class
        table and the confusion on CL terms; notes.
    """
    lab = np.asarray(labels, dtype=object)
    present = ~pd.isna(pd.Series(lab)).to_numpy()
    truth = np.array(
        [truth_cl.get(str(v)) if ok else None for v, ok in zip(lab, present, strict=True)],
        dtype=object,
    )
    unmapped = sorted(
        {str(v) for v, t, ok in zip(lab, truth, present, strict=True) if ok and t is None}
    )
    notes = (
        [
            f"cl_exact/cl_lineage leave out the labels that map to no Cell Ontology term: {', '.join(unmapped)}"
        ]
        if unmapped
        else []
    )
    n_used = int(sum(t is not None for t in truth))
    rows: list[dict[str, Any]] = []
    per_class: dict[str, pd.DataFrame] = {}
    confusion: dict[str, pd.DataFrame] = {}
    if n_used == 0:
        return pd.DataFrame(rows), per_class, confusion, notes
    for method, pred in calls.items():
        p = np.asarray(pred, dtype=object)
        for name, value in (
            ("cl_exact", cl_exact(truth, p)),
            ("cl_lineage", cl_lineage(truth, p, ancestors)),
        ):
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "metric": name,
                    "value": float(value),
                    "n_cells": n_used,
                    "sample_size": n_used,
                }
            )
        per_class[method], confusion[method] = cl_per_class(truth, p, ancestors, labels=term_labels)
    return pd.DataFrame(rows), per_class, confusion, notes
