"""Zero-shot annotation: Cell Ontology candidates, scorers and per-cell assignment."""

from __future__ import annotations

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
