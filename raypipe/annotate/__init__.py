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

__all__ = [
    "CANDIDATE_COLUMNS",
    "SCORERS",
    "Ontology",
    "OntologyMatch",
    "OntologyTerm",
    "ScoreInputs",
    "assign",
    "build_candidates",
    "candidates_from_labels",
    "combine",
    "extract_marker_tokens",
    "load_ontology",
    "marker_indices",
    "marker_scores",
    "resolver_from_aliases",
    "score_cells",
    "text_scores",
    "unmatched",
]
