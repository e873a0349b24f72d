"""Candidate checks: blank labels are missing; config keys must name candidates; markers exist.

Run before anything is written (:func:`raypipe.orchestrate.prepare.validate_job`) and when
the candidates are built (:func:`raypipe.annotate.prepare.prepare_candidates`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from raypipe.errors import ConfigError

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["check_candidate_keys", "label_candidates", "markers_in_atlas"]


def label_candidates(labels: Any) -> list[str]:
    """Return the candidates a label column gives: its distinct values (blank = missing)."""
    from raypipe.core.labels import missing_labels

    s = pd.Series(labels, copy=False)
    return sorted({str(v) for v in s[~missing_labels(s)].unique()})


def check_candidate_keys(job: JobConfig, names: list[str]) -> None:
    """Check that every ``annotate.markers`` / ``annotate.mapping`` key names a candidate.

    Raises
    ------
    ConfigError
        Naming the key and the nearest candidate.
    """
    import difflib

    lower = {n.casefold(): n for n in names}
    for section in ("markers", "mapping"):
        for key in getattr(job.annotate, section):
            if key in names:
                continue
            near = difflib.get_close_matches(key.casefold(), list(lower), n=1, cutoff=0.0)
            nearest = f"; the nearest candidate is {lower[near[0]]!r}" if near else ""
            raise ConfigError(
                f"annotate.{section} has a key {key!r} that names no candidate{nearest}",
                fix=f"use a candidate's exact name as the key (candidates: {', '.join(names[:12])}"
                + (" ..." if len(names) > 12 else "")
                + "), or remove the entry",
            )


def markers_in_atlas(
    markers: dict[str, list[str]], resolver: Any, warnings: list[str]
) -> dict[str, list[str]]:
    """Return the config markers less those of candidates with none in the atlas (said loudly).

    Such a candidate would otherwise have no marker at all and no ontology fallback either;
    dropped here, it falls back to the next source (LLM, then ontology) like one the config
    does not name.
    """
    kept = {}
    for label, genes in markers.items():
        if any(resolver(g) for g in genes):
            kept[label] = genes
        else:
            warnings.append(
                f"annotate.markers for {label!r}: none of {', '.join(genes)} is in the atlas; "
                "its markers come from the next source (LLM or Cell Ontology) instead"
            )
    return kept
