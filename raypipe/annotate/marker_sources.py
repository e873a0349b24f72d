"""Marker resources by name (:data:`MARKER_DBS`) and how each one's file is read.

A resource is a :class:`MarkerResource`: its public URL, the file name in the user cache, its
licence and citation, and a reader turning the file into rows ``cell_type, organ, gene,
canonical, species`` (+ optional ``ubiquity``, ``spread_human``, ``spread_mouse``). Loading,
mapping to CL and per-candidate markers are :mod:`raypipe.annotate.marker_db`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from raypipe.core.storage import user_cache_dir
from raypipe.errors import InputError
from raypipe.registry import Registry

__all__ = [
    "MARKER_DBS",
    "UBIQUITOUS",
    "MarkerResource",
    "default_path",
    "gene_weight",
    "read_marker_file",
]

#: A gene expressed in at least this share of all cells is no marker (PanglaoDB's
#: "ubiquitousness index").
UBIQUITOUS = 0.1


@dataclass(frozen=True)
class MarkerResource:
    """A marker resource: where it lives, what it is, how to read it."""

    name: str
    url: str
    filename: str
    licence: str
    citation: str
    read: Callable[[Path], pd.DataFrame]


MARKER_DBS: Registry[MarkerResource] = Registry("marker resource")

_PANGLAO_NUMBERS = {
    "ubiquitousness index": "ubiquity",
    "specificity_human": "spread_human",
    "specificity_mouse": "spread_mouse",
}
_PANGLAO_COLUMNS = {
    "species": "species",
    "official gene symbol": "gene",
    "cell type": "cell_type",
    "organ": "organ",
    "canonical marker": "canonical",
}


def _read_panglaodb(path: Path) -> pd.DataFrame:
    """PanglaoDB's TSV(.gz) → rows ``cell_type, organ, gene, canonical, species`` (a set)."""
    try:
        raw = pd.read_csv(path, sep="\t", dtype=str, compression="infer")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(
            f"marker resource {path} is not a readable TSV: {exc}",
            fix="fetch it again with `raypipe markers fetch`, or point annotate.marker_db.path "
            "at PanglaoDB_markers_27_Mar_2020.tsv(.gz)",
        ) from None
    missing = [c for c in _PANGLAO_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(
            f"marker resource {path} lacks the PanglaoDB columns {missing} "
            f"(it has {list(raw.columns)[:8]})",
            fix="give PanglaoDB's markers table (species, official gene symbol, cell type, "
            "organ, canonical marker ...), e.g. via `raypipe markers fetch`",
        )
    out = raw[list(_PANGLAO_COLUMNS)].rename(columns=_PANGLAO_COLUMNS)
    for col, name in _PANGLAO_NUMBERS.items():  # optional numbers: NaN when absent
        out[name] = pd.to_numeric(raw.get(col), errors="coerce")
    out = out.dropna(subset=["gene", "cell_type"])
    out["species"] = out["species"].fillna("").map(lambda s: frozenset(str(s).split()))
    out["canonical"] = out["canonical"].fillna("0").astype(str).str.startswith("1")
    out["organ"] = out["organ"].fillna("")
    if out.empty:
        raise InputError(f"marker resource {path} has no rows", fix="fetch it again")
    return out.reset_index(drop=True)


MARKER_DBS.register("panglaodb")(
    MarkerResource(
        name="panglaodb",
        url="https://panglaodb.se/markers/PanglaoDB_markers_27_Mar_2020.tsv.gz",
        filename="PanglaoDB_markers_27_Mar_2020.tsv.gz",
        licence="no formal licence; free use with citation (OmniPath: informal)",
        citation="Franzén O, Gan L-M, Björkegren JLM. PanglaoDB. Database 2019, baz046",
        read=_read_panglaodb,
    )
)


def default_path(source: str = "panglaodb") -> Path:
    """Where ``raypipe markers fetch`` keeps a resource: ``<user cache>/markers/<file>``."""
    return user_cache_dir() / "markers" / MARKER_DBS.get(source).filename


def read_marker_file(path: str | Path, source: str = "panglaodb") -> pd.DataFrame:
    """Read and check a resource file (raises :class:`InputError` naming it when unusable)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"marker resource file {p} not found",
            fix="run `raypipe markers fetch` (downloads it into the user cache), or set "
            "annotate.marker_db.path to a local copy or a bucket URL",
        )
    return MARKER_DBS.get(source).read(p)


def gene_weight(canonical: bool, spread: float, ubiquity: float) -> float:
    """Return a resource gene's weight for its cell type.

    1 for a canonical marker, 0.5 for another, times ``1 - spread`` (PanglaoDB's
    "specificity": the share of *other* cell types expressing the gene; unknown = 0); 0 for a
    gene expressed in at least :data:`UBIQUITOUS` of all cells (``PSAP``, ``JUNB``, ``FTL``).
    """
    if ubiquity == ubiquity and ubiquity >= UBIQUITOUS:  # NaN-safe
        return 0.0
    base = 1.0 if canonical else 0.5
    return base * (1.0 - min(max(spread, 0.0), 1.0)) if spread == spread else base
