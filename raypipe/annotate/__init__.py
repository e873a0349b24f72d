"""Zero-shot annotation: Cell Ontology candidates, scorers and per-cell assignment.

The names below load their module on first use (PEP 562), so importing a submodule (the
``raypipe markers`` CLI, a config check) does not import the scorers, pandas or scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raypipe.annotate.candidates import (
        CANDIDATE_COLUMNS,
        build_candidates,
        candidates_from_labels,
        extract_marker_tokens,
        resolver_from_aliases,
        unmatched,
    )
    from raypipe.annotate.mapping import GeneNames, LabelMapper, LabelMapping, check_overrides
    from raypipe.annotate.markers import llm_markers, ontology_markers, specificity_weights
    from raypipe.annotate.ontology import Ontology, OntologyMatch, OntologyTerm, load_ontology
    from raypipe.annotate.scorers import (
        SCORERS,
        ScoreInputs,
        assign,
        combine,
        marker_indices,
        marker_scores,
        score_cells,
        text_scores,
    )
    from raypipe.annotate.smoothing import knn_graph, smooth_scores
    from raypipe.annotate.summary import candidate_rows, read_candidate_table, summary_lines

_WHERE = {
    "CANDIDATE_COLUMNS": "raypipe.annotate.candidates",
    "GeneNames": "raypipe.annotate.mapping",
    "LabelMapper": "raypipe.annotate.mapping",
    "LabelMapping": "raypipe.annotate.mapping",
    "Ontology": "raypipe.annotate.ontology",
    "OntologyMatch": "raypipe.annotate.ontology",
    "OntologyTerm": "raypipe.annotate.ontology",
    "SCORERS": "raypipe.annotate.scorers",
    "ScoreInputs": "raypipe.annotate.scorers",
    "assign": "raypipe.annotate.scorers",
    "build_candidates": "raypipe.annotate.candidates",
    "candidate_rows": "raypipe.annotate.summary",
    "candidates_from_labels": "raypipe.annotate.candidates",
    "check_overrides": "raypipe.annotate.mapping",
    "combine": "raypipe.annotate.scorers",
    "extract_marker_tokens": "raypipe.annotate.candidates",
    "knn_graph": "raypipe.annotate.smoothing",
    "llm_markers": "raypipe.annotate.markers",
    "load_ontology": "raypipe.annotate.ontology",
    "marker_indices": "raypipe.annotate.scorers",
    "marker_scores": "raypipe.annotate.scorers",
    "ontology_markers": "raypipe.annotate.markers",
    "read_candidate_table": "raypipe.annotate.summary",
    "resolver_from_aliases": "raypipe.annotate.candidates",
    "score_cells": "raypipe.annotate.scorers",
    "smooth_scores": "raypipe.annotate.smoothing",
    "specificity_weights": "raypipe.annotate.markers",
    "summary_lines": "raypipe.annotate.summary",
    "text_scores": "raypipe.annotate.scorers",
    "unmatched": "raypipe.annotate.candidates",
}

__all__ = [
    "CANDIDATE_COLUMNS",
    "SCORERS",
    "GeneNames",
    "LabelMapper",
    "LabelMapping",
    "Ontology",
    "OntologyMatch",
    "OntologyTerm",
    "ScoreInputs",
    "assign",
    "build_candidates",
    "candidate_rows",
    "candidates_from_labels",
    "check_overrides",
    "combine",
    "extract_marker_tokens",
    "knn_graph",
    "llm_markers",
    "load_ontology",
    "marker_indices",
    "marker_scores",
    "ontology_markers",
    "read_candidate_table",
    "resolver_from_aliases",
    "score_cells",
    "smooth_scores",
    "specificity_weights",
    "summary_lines",
    "text_scores",
    "unmatched",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'raypipe.annotate' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
