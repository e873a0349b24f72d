"""The ``annotate.discover`` section: cell-type discovery when ``annotate.candidates: auto``.

Kept apart from :mod:`raypipe.config.models` (module size); validation touches no hardware,
network or heavy library.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypipe.config.base import Section

__all__ = ["DiscoverConfig", "NamingName"]

NamingName = Literal["offline", "llm"]  # raypipe.annotate.naming.NAMERS


class DiscoverConfig(Section):
    """Discover the candidates from the atlas (``annotate.candidates: auto``): clusters → markers → names.

    See ``docs/discovery.md``: Leiden clusters of expression PCs, marker genes per cluster
    (Welch t-test, one cluster vs the rest), names from an LLM or from marker knowledge,
    mapped to Cell Ontology terms.
    """

    resolution: float = Field(
        1.0, gt=0, description="Leiden resolution (higher = more, smaller clusters)."
    )
    n_neighbors: int = Field(15, ge=2, description="Neighbours per cell in the clustering graph.")
    n_pcs: int = Field(
        50, gt=1, description="Expression PCs the clustering graph is built on (cosine)."
    )
    n_top_genes: int = Field(
        2000, gt=1, description="Most variable log-normalised genes the PCs are fitted on."
    )
    max_cells: int = Field(
        2_000_000,
        gt=0,
        description="Cluster every cell up to this many; above it cluster a seeded sample of "
        "`sample_cells` and assign every other cell to its nearest sampled neighbours' cluster.",
    )
    sample_cells: int = Field(
        100_000,
        gt=1,
        description="Cells the PCs are fitted on, and cells clustered above `max_cells`.",
    )
    seed: int = Field(0, description="Seed of the samples and of Leiden.")
    n_markers: int = Field(
        25, gt=0, description="Top marker genes per cluster written to clusters.parquet."
    )
    naming: NamingName = Field(
        "offline",
        description="`offline`: name clusters from marker knowledge; `llm`: one request per "
        "cluster to the `llm` backend (GPTCelltype), offline when an answer is unusable.",
    )
    prompt_markers: int = Field(
        10, gt=0, description="Top markers listed per cluster in the LLM prompt (GPTCelltype: 10)."
    )
    marker_table: str | None = Field(
        None,
        description="Extra marker knowledge: CSV/TSV/parquet with columns `cell_type` (name or "
        "CL id) and `gene` (optional `weight`).",
    )
    gene_text_knowledge: bool = Field(
        True,
        description="Offline naming also reads the Cell Ontology terms that each marker gene's "
        "text (e.g. GO process names) mentions.",
    )
    min_support: float = Field(
        1.5,
        ge=0,
        description="Offline naming: least enrichment (−log10 p, summed over knowledge sources) "
        "of a cluster's best Cell Ontology term; below it the cluster is `unassigned`.",
    )
    min_marker_genes: int = Field(
        3,
        ge=1,
        description="Offline naming: a Cell Ontology term names a cluster only when at least "
        "this many of the cluster's marker genes support it (a term known by a few genes "
        "reaches a high enrichment on one or two chance hits).",
    )
    min_cluster_cells: int = Field(
        10, ge=1, description="Smaller clusters are not named (left `unassigned`)."
    )

    @model_validator(mode="after")
    def _sizes(self) -> DiscoverConfig:
        if self.sample_cells > self.max_cells:
            raise ValueError(
                f"annotate.discover.sample_cells ({self.sample_cells}) exceeds max_cells "
                f"({self.max_cells}); set sample_cells <= max_cells"
            )
        return self
