"""What the run summary and the HTML report say about the candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raypipe.annotate import summary_lines
from raypipe.annotate.candidates import CANDIDATE_COLUMNS


def _table() -> pd.DataFrame:
    rows = [
        ["B cells", "CL:0000236", "B cell", "label", 1.0, "b cell", "A lymphocyte.", "B cell: ...",
         ["MS4A1", "CD79A"], [1.0, 0.5], ["ontology:descendants (CD20)", "llm"], ["CD19"], "ontology"],
        ["Foo", None, None, "unmatched", 0.0, "foo", "", "Foo", [], [], [], [], "none"],
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def test_summary_lines_name_terms_markers_sources_f1_and_unmatched():
    per_class = {"genept_w": pd.DataFrame({"label": ["B cells", "Foo"], "f1": [0.91, 0.0]})}
    lines = summary_lines(_table(), per_class)
    assert lines[0].startswith("candidates")
    b = next(ln for ln in lines if ln.strip().startswith("B cells"))
    assert "CL:0000236 B cell" in b
    assert "label (1.00)" in b
    assert "MS4A1 [ontology:descendants]" in b
    assert "CD79A [llm]" in b
    assert "missing: CD19" in b
    assert "F1 genept_w 0.910" in b
    assert "match no Cell Ontology term" in lines[-1]
    assert "Foo" in lines[-1]


def test_report_has_a_candidate_section(tmp_path):
    from raypipe.evaluate.report import write_report

    (tmp_path / "annotations").mkdir()
    _table().to_parquet(tmp_path / "annotations" / "label_mapping.parquet")
    (tmp_path / "evaluation").mkdir()
    pd.DataFrame({"label": ["B cells"], "f1": [0.91], "support": [3]}).to_parquet(
        tmp_path / "evaluation" / "per_class_genept_w.parquet"
    )
    metrics = pd.DataFrame(
        {"dataset": ["d"], "method": ["genept_w"], "metric": ["accuracy"], "value": [0.9],
         "n_cells": [3], "sample_size": [3]}
    )  # fmt: skip
    rng = np.random.default_rng(0)
    page = write_report(
        tmp_path,
        metrics,
        {"genept_w": rng.normal(size=(12, 4))},
        ["B cells"] * 12,
        projector=lambda x, seed=0: x[:, :2],
    ).read_text()
    assert "<h2>Candidates</h2>" in page
    assert "CL:0000236 B cell" in page
    assert "F1 genept_w" in page
    assert "— (unmatched)" in page
