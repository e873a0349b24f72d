"""The ``input.soma`` config section: how a TileDB-SOMA experiment (or the Census) is read.

Used when ``input.path`` is a SOMA experiment (``soma+file:///…``, ``soma+s3://…``, a local
folder holding one) or ``census:<organism>``. Validation never imports ``tiledbsoma``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from raypipe.config.base import Section

__all__ = ["SomaConfig"]


class SomaConfig(Section):
    """Which measurement, X layer, cells and obs columns of a SOMA experiment a run reads."""

    measurement: str = Field(
        "RNA", description="SOMA measurement holding X and var (the Census: `RNA`)."
    )
    layer: str = Field(
        "raw", description="X layer of the measurement (the Census: `raw`, raw counts)."
    )
    obs_value_filter: str | None = Field(
        None,
        description="SOMA obs value filter selecting the cells, e.g. "
        "`tissue_general == 'lung' and is_primary_data == True` (default: every cell).",
    )
    obs_columns: list[str] = Field(
        default_factory=list,
        description="obs columns read with the cells (besides input.label_key / batch_key); "
        "obs names are `obs_id` when the experiment has it, else the `soma_joinid`.",
    )
    census_version: str | None = Field(
        None,
        description="With `input.path: census:<organism>` (e.g. `census:homo_sapiens`): the "
        "CELLxGENE Census release opened through `cellxgene_census.open_soma`, e.g. `2025-01-30`.",
    )

    @field_validator("measurement", "layer")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a measurement / X layer, e.g. RNA / raw")
        return v
