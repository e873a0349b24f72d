"""The ``annotate.marker_db`` section: a curated public marker resource (PanglaoDB)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raypipe.config.base import Section

__all__ = ["MarkerDBConfig", "MarkerDBName"]

MarkerDBName = Literal["panglaodb"]  # raypipe.annotate.marker_db.MARKER_DBS


class MarkerDBConfig(Section):
    """A curated marker resource, trusted after config and LLM markers, before the ontology."""

    enabled: bool = Field(
        False,
        description="Give candidates without config/LLM markers the resource's markers for "
        "their Cell Ontology term (fetch it once with `raypipe markers fetch`).",
    )
    source: MarkerDBName = Field("panglaodb", description="Registry name of the resource.")
    path: str | None = Field(
        None,
        description="The resource file: a local path or a bucket URL (`s3://…`); default: the "
        "copy `raypipe markers fetch` keeps in the user cache (`$RAYPIPE_CACHE_DIR/markers`).",
    )
    canonical_only: bool = Field(
        False, description="Keep only the genes the resource flags as canonical markers."
    )
    min_confidence: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Use a resource cell type only when it maps to a CL term with at least this "
        "confidence (the mapping is recorded in `annotations/marker_db_mapping.parquet`).",
    )
