"""Gene identity (symbols, Ensembl ids, aliases) and the texts that describe genes."""

from __future__ import annotations

from raypipe.genes.identity import (
    CoverageReport,
    GeneResolution,
    GeneTable,
    check_coverage,
    detect_id_space,
    resolve_genes,
    strip_version,
    text_coverage,
)
from raypipe.genes.sources import (
    TEXT_COLUMNS,
    TEXT_SOURCES,
    TextSource,
    build_text_source,
)
from raypipe.genes.space import gene_table_for

__all__ = [
    "TEXT_COLUMNS",
    "TEXT_SOURCES",
    "CoverageReport",
    "GeneResolution",
    "GeneTable",
    "TextSource",
    "build_text_source",
    "check_coverage",
    "detect_id_space",
    "gene_table_for",
    "resolve_genes",
    "strip_version",
    "text_coverage",
]
