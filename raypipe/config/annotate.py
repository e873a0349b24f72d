"""The ``annotate`` and ``evaluate`` sections of the job config.

Kept apart from :mod:`raypipe.config.models` (module size); validation touches no hardware,
network or heavy library.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raypipe.config.base import Section
from raypipe.config.discover import DiscoverConfig
from raypipe.config.markers import MarkerDBConfig

__all__ = ["AnnotateConfig", "EvaluateConfig", "ScorerName"]

ScorerName = Literal["langcell", "markers", "text"]  # raypipe.annotate.scorers.SCORERS


class AnnotateConfig(Section):
    """Zero-shot annotation (defaults chosen by measurement: docs/methods/annotation.md)."""

    enabled: bool = Field(False, description="Annotate cells with zero-shot cell-type calls.")
    candidates: list[str] | Literal["auto"] = Field(
        default_factory=list,
        description="Cell-type names or CL ids; empty = from input.label_key; `auto` = discover "
        "them from the atlas (annotate.discover).",
    )
    discover: DiscoverConfig = Field(
        default_factory=DiscoverConfig,
        description="Cell-type discovery for `candidates: auto`.",
    )
    ontology: str | None = Field(
        None, description="Cell Ontology JSON(.gz); default: cellxgene-ontology-guide."
    )
    mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Candidate name → CL id, overriding the automatic mapping.",
    )
    mapping_embed_threshold: float = Field(
        0.8,
        ge=-1,
        le=1,
        description="Cosine above which the text-embedding fallback maps a label to a CL term.",
    )
    scorers: dict[ScorerName, float] = Field(
        default_factory=lambda: dict[ScorerName, float]({"text": 0.25, "markers": 1.0}),
        description="Scorer name → weight.",
    )
    markers: dict[str, list[str]] = Field(
        default_factory=dict, description="Candidate → marker genes (trusted first)."
    )
    ontology_markers: bool = Field(
        True, description="Gather markers from the Cell Ontology when no other source gives any."
    )
    llm_markers: bool = Field(
        False, description="Ask the `llm` backend once per candidate for canonical markers."
    )
    tissue: str | None = Field(
        None,
        description="Tissue of the atlas (`lung`, `kidney`, `blood`; a UBERON name): steers "
        "label mapping to its terms and is named in LLM prompts.",
    )
    marker_db: MarkerDBConfig = Field(
        default_factory=MarkerDBConfig, description="Curated marker resource (PanglaoDB)."
    )
    negative_markers: float = Field(
        0.5,
        ge=0,
        description="Weight of a candidate's negative markers (stated absent: `GENE-` in "
        '`annotate.markers`, "negative for CD3" in a CL definition), subtracted in the '
        "`markers` scorer; 0 ignores them.",
    )
    center: bool = Field(
        True, description="Centre cells and candidate texts against their means before cosine."
    )
    standardise: Literal["candidate", "cell", "none"] = Field(
        "candidate",
        description="Standardise each scorer per candidate over cells, per cell, or not.",
    )
    smoothing: float = Field(
        5.0, ge=0, description="Graph smoothing strength λ of (I + λL)⁻¹ P₀ (0 = off)."
    )
    smoothing_k: int = Field(15, gt=0, description="Neighbours per cell in the smoothing graph.")
    smoothing_block: int = Field(
        4096,
        ge=64,
        description="Most cells in one smoothing graph or PC fit; larger shards use interleaved blocks.",
    )
    smoothing_graph: Literal["embedding", "expression"] = Field(
        "expression", description="Smoothing graph on the cell embedding or on expression PCs."
    )
    unassigned_threshold: float | None = Field(
        None, description="Margin below which a cell is `unassigned`."
    )
    top_k: int = Field(3, gt=0, description="Best candidates kept per cell (`top_labels`).")
    langcell_alpha: float = Field(
        0.1,
        ge=0,
        le=1,
        description="langcell scorer: score = α·sim + (1−α)·ctm (LangCell's zero-shot uses 0.1).",
    )
    langcell_text_max_length: int = Field(
        512, gt=0, description="langcell scorer: candidate-text tokens kept (LangCell: 512)."
    )
    llm_descriptions: bool = Field(
        False,
        description="Ask the `llm` backend once per candidate (cached) for a 2-3 sentence "
        "description, appended to the candidate text the `text` scorer embeds.",
    )

    @field_validator("mapping")
    @classmethod
    def _cl_ids(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        bad = {k: x for k, x in v.items() if not re.match(r"^CL[:_]\d{7}$", str(x).strip())}
        if bad:
            raise ValueError(
                f"annotate.mapping values must be Cell Ontology ids like CL:0000236; got {bad}"
            )
        return v


class EvaluateConfig(Section):
    """Evaluation reductions."""

    enabled: bool = Field(
        False, description="Compute metrics.parquet (skipped without input.label_key)."
    )
    sample_size: int = Field(
        20_000, gt=0, description="Cap for quadratic metrics (seeded subsample)."
    )
    seed: int = Field(0, description="Seed of the subsample, k-means and Leiden.")
    pca_components: int = Field(50, gt=0, description="Dimensions of the PCA baseline.")
    leiden_resolution: float = Field(
        1.0, gt=0, description="Start of the resolution search for as many clusters as labels."
    )
    knn_k: int = Field(
        15, gt=0, description="Neighbours per cell of the Leiden graph and the kNN probe."
    )
    report: bool = Field(True, description="Write report/index.html (UMAPs, confusion, metrics).")
