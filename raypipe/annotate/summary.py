"""What a run summary and report say about the candidates: CL term, markers, how found, F1."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from raypipe.core.outputs import read_frame
from raypipe.core.storage import AnyPath, as_path

__all__ = ["candidate_rows", "read_candidate_table", "summary_lines"]


def _as_list(v: object) -> list:
    if v is None:
        return []
    try:
        return list(v)  # type: ignore[call-overload]
    except TypeError:
        return []


def read_candidate_table(out_dir: str | AnyPath) -> pd.DataFrame | None:
    """``annotations/label_mapping.parquet`` of a run, or None when there is none."""
    path = as_path(out_dir) / "annotations" / "label_mapping.parquet"
    return read_frame(path) if path.exists() else None


def candidate_rows(
    table: pd.DataFrame,
    per_class: Mapping[str, pd.DataFrame] | None = None,
    *,
    max_markers: int = 6,
) -> pd.DataFrame:
    """One display row per candidate: CL term, how found, markers with their source, F1.

    Parameters
    ----------
    table
        The candidate table (``label_mapping.parquet``).
    per_class
        Method → per-class table (``evaluation/per_class_<method>.parquet``: ``label``, ``f1``,
        ``support``); each method adds an ``F1 <method>`` column.
    max_markers
        Markers shown per candidate (highest weight first).

    Returns
    -------
    pandas.DataFrame
        Columns ``candidate, CL term, found by, markers, missing`` (+ ``F1 <method>``).
    """
    rows = []
    for r in table.itertuples(index=False):
        cl = f"{r.cl_id} {r.cl_label}" if getattr(r, "cl_id", None) else "— (unmatched)"
        how = str(getattr(r, "match_kind", ""))
        conf = getattr(r, "confidence", None)
        if conf is not None and pd.notna(conf):
            how += f" ({float(conf):.2f})"
        markers = _as_list(getattr(r, "markers", None))
        sources = _as_list(getattr(r, "marker_sources", None))
        signs = _as_list(getattr(r, "marker_weights", None))
        if len(signs) == len(markers):  # a negative marker shows as "-CD3E"
            markers = [f"-{g}" if w < 0 else g for g, w in zip(markers, signs, strict=True)]
        shown = [
            f"{g} [{s.split(' ')[0]}]" if s else str(g)
            for g, s in zip(markers[:max_markers], sources[:max_markers] or [""] * 99, strict=False)
        ]
        more = f" +{len(markers) - max_markers}" if len(markers) > max_markers else ""
        rows.append(
            {
                "candidate": str(r.label),
                "CL term": cl,
                "found by": how,
                "markers": (", ".join(shown) + more) if shown else "none",
                "missing": ", ".join(map(str, _as_list(getattr(r, "missing_markers", None)))),
            }
        )
    out = pd.DataFrame(rows)
    for method, pc in (per_class or {}).items():
        f1 = dict(zip(pc["label"].astype(str), pc["f1"], strict=True))
        out[f"F1 {method}"] = [f1.get(c) for c in out["candidate"]]
    return out


def summary_lines(
    table: pd.DataFrame, per_class: Mapping[str, pd.DataFrame] | None = None
) -> list[str]:
    """Lines for the run summary: per candidate its CL term, how it was found, its markers.

    Parameters
    ----------
    table
        The candidate table (``Candidates.table`` or ``label_mapping.parquet``).
    per_class
        Optional method → per-class metrics (``evaluation/per_class_<method>.parquet``) to add
        each candidate's F1.

    Returns
    -------
    list of str
        A heading, one line per candidate, and a loud line listing unmatched candidates.
    """
    rows = candidate_rows(table, per_class)
    lines = ["candidates (annotations/label_mapping.parquet):"]
    for r in rows.to_dict("records"):
        f1 = "".join(
            f"; {k} {v:.3f}" for k, v in r.items() if k.startswith("F1 ") and v is not None
        )
        miss = f"; missing: {r['missing']}" if r["missing"] else ""
        lines.append(
            f"  {r['candidate']} → {r['CL term']} [{r['found by']}]; markers: {r['markers']}"
            f"{miss}{f1}"
        )
    if {"marker_sources", "marker_weights"} <= set(table.columns):
        from raypipe.annotate.candidates import marker_source_counts

        counts = marker_source_counts(table)
        if counts:
            lines.append(
                "  marker sources (candidates with >= 3 markers in the atlas / with any): "
                + ", ".join(f"{k} {a}/{b}" for k, (a, b) in counts.items())
            )
    lost = rows.loc[rows["CL term"].str.startswith("—"), "candidate"].tolist()
    if lost:
        lines.append(
            f"  WARNING: {len(lost)} candidate(s) match no Cell Ontology term and are scored on "
            f"their name alone: {', '.join(lost)} (fix: annotate.mapping {{name: CL id}})"
        )
    return lines
