"""Gene identity: which gene each atlas column is, and how many of them we can describe.

Atlases name their genes by symbol (often outdated: ``IL8``, ``SEPT7``) or by Ensembl id
(often versioned: ``ENSG00000169429.11``). :func:`resolve_genes` maps every column to one
canonical symbol (and Ensembl id) through a :class:`GeneTable`, and builds the sparse matrix
that sums columns that turn out to be the same gene.

Matching rule, per column (first rule that applies wins):

1. ``exact``: the name is an official symbol, spelled exactly; ``casefold``: it is one only
   case-insensitively (``Cd3e`` → CD3E: a mouse name on a human table is never "exact";
   :func:`check_species` refuses mouse-style names unless ``genes.cross_species``). Symbols
   win over a conflicting Ensembl id (annotations move Ensembl ids between loci, e.g. an old
   ``TAF9`` id now belongs to ``AK6``); the conflict is listed in the warnings.
2. ``ensembl``: the name is not an official symbol, but the column's Ensembl id (from
   ``ensembl_ids`` or the name itself when the names are Ensembl ids) is in the table.
3. ``alias``: the name is an alias (previous symbol or synonym) of exactly one official
   symbol; case-insensitive when unambiguous.
4. ``unmatched``: anything else. An alias shared by several genes (``CD16`` is an alias of
   both FCGR3A and FCGR3B) is **not guessed**: the column stays unmatched unless its Ensembl
   id decides, and :attr:`GeneResolution.ambiguous` lists the candidates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from raypipe.errors import InputError
from raypipe.genes.table import GeneTable, detect_id_space, is_ensembl, strip_version

if TYPE_CHECKING:
    from raypipe.config import GenesConfig

__all__ = [
    "CoverageReport",
    "GeneResolution",
    "GeneTable",
    "check_coverage",
    "check_species",
    "detect_id_space",
    "detect_species",
    "gene_names_from_var",
    "resolve_genes",
    "strip_version",
    "text_coverage",
]

MatchHow = Literal["exact", "casefold", "alias", "ensembl", "unmatched"]
MATCH_KINDS: tuple[MatchHow, ...] = ("exact", "casefold", "alias", "ensembl", "unmatched")


@dataclass(frozen=True, eq=False)
class CoverageReport:
    """How many atlas genes something covers.

    Attributes
    ----------
    what
        What was counted, e.g. ``"atlas genes with text (orgdb)"``.
    n_genes, n_covered, share
        Totals and ``n_covered / n_genes``.
    unmatched
        Up to 10 example names of genes that are not covered.
    by_how
        Counts per match kind (``exact``, ``alias``, ``ensembl``, ``unmatched``), when known.
    """

    what: str
    n_genes: int
    n_covered: int
    share: float
    unmatched: tuple[str, ...] = ()
    by_how: Mapping[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """Return a one-line human summary."""
        line = f"{self.what}: {self.n_covered:,} / {self.n_genes:,} ({self.share:.1%})"
        if self.by_how:
            line += " [" + ", ".join(f"{k} {v:,}" for k, v in self.by_how.items() if v) + "]"
        if self.unmatched:
            line += "; not covered, e.g. " + ", ".join(self.unmatched)
        return line


def _report(
    what: str, names: Sequence[str], covered: np.ndarray, by_how: Mapping[str, int]
) -> CoverageReport:
    n = len(names)
    k = int(covered.sum())
    missing = tuple(str(names[i]) for i in np.flatnonzero(~covered)[:10])
    return CoverageReport(what, n, k, k / n if n else 0.0, missing, dict(by_how))


def check_coverage(report: CoverageReport, min_coverage: float) -> None:
    """Raise :class:`InputError` when ``report.share`` is below ``min_coverage``.

    The message lists examples of uncovered genes and how to fix it.
    """
    examples = ", ".join(report.unmatched) or "(none listed)"
    if report.n_covered == 0:  # whatever min_coverage says: there is nothing to embed
        raise InputError(
            f"none of the {report.n_genes:,} {report.what.split(':')[0]}: no atlas gene "
            f"matches a gene of the text source (e.g. {examples})",
            fix="check the gene names (symbols or Ensembl ids; input.gene_symbol_column), "
            "the species (genes.cross_species) and genes.id_table/genes.aliases",
        )
    if report.share >= min_coverage:
        return
    raise InputError(
        f"only {report.share:.1%} of {report.what.split(':')[0]} are covered "
        f"({report.n_covered:,} of {report.n_genes:,}; required {min_coverage:.0%}); "
        f"e.g. not covered: {examples}",
        fix="set genes.id_table/genes.aliases for your gene naming, check the species, "
        "or lower genes.min_coverage",
    )


@dataclass(frozen=True, eq=False)
class GeneResolution:
    """Which gene each atlas column is.

    Attributes
    ----------
    names
        Input names, one per atlas column.
    symbols, ensembl, how
        Per column: canonical symbol (``None`` when unmatched), Ensembl id (atlas's own
        when given, else the table's primary one; ``None`` when unknown) and match kind.
    unique_symbols, unique_ensembl
        The distinct matched genes, in order of first appearance.
    column_to_unique
        Per column, the index into ``unique_symbols`` (``-1`` when unmatched).
    collapse
        CSR matrix ``(n_columns, n_unique)`` of ones: ``X @ collapse`` sums duplicate
        columns and drops unmatched ones.
    ambiguous
        Name → candidate symbols for aliases that were not guessed.
    warnings
        Messages about duplicates, conflicts and ambiguous aliases.
    """

    names: tuple[str, ...]
    symbols: tuple[str | None, ...]
    ensembl: tuple[str | None, ...]
    how: tuple[MatchHow, ...]
    unique_symbols: tuple[str, ...]
    unique_ensembl: tuple[str | None, ...]
    column_to_unique: np.ndarray
    collapse: sp.csr_matrix
    ambiguous: Mapping[str, tuple[str, ...]]
    warnings: tuple[str, ...]

    @property
    def n_matched(self) -> int:
        """Number of matched columns."""
        return int((self.column_to_unique >= 0).sum())

    def by_how(self) -> dict[str, int]:
        """Count columns per match kind."""
        return {k: self.how.count(k) for k in MATCH_KINDS}

    def coverage(self, what: str = "atlas genes matched to a known gene") -> CoverageReport:
        """Return the mapping coverage (columns matched to a gene)."""
        return _report(what, self.names, self.column_to_unique >= 0, self.by_how())

    def to_frame(self) -> pd.DataFrame:
        """Return one row per column: name, symbol, ensembl_id, how, unique_index."""
        return pd.DataFrame(
            {
                "name": list(self.names),
                "symbol": list(self.symbols),
                "ensembl_id": list(self.ensembl),
                "how": list(self.how),
                "unique_index": self.column_to_unique,
            }
        )


def _match_one(
    name: str, ens: str | None, table: GeneTable
) -> tuple[str | None, MatchHow, tuple[str, ...], str | None]:
    """Return (symbol, how, ambiguous candidates, conflict message)."""
    by_ens = table.ensembl_to_symbol.get(ens) if ens else None
    sym = table.lookup_symbol(name) if name else None
    if sym is not None:
        agrees = by_ens is None or by_ens == sym or ens in table.symbol_to_ensembl.get(sym, ())
        conflict = None if agrees else f"{name!r}: its Ensembl id {ens} is {by_ens} in the table"
        return sym, "exact" if sym == name else "casefold", (), conflict
    if by_ens is not None:
        return by_ens, "ensembl", (), None
    cands = table.lookup_alias(name) if name else ()
    if len(cands) == 1:
        return cands[0], "alias", (), None
    return None, "unmatched", cands, None


def resolve_genes(
    var_names: Sequence[str],
    table: GeneTable | None,
    *,
    ensembl_ids: Sequence[str | None] | None = None,
) -> GeneResolution:
    """Map atlas columns to canonical genes (see the module docstring for the rule).

    Parameters
    ----------
    var_names
        Atlas gene names: symbols or Ensembl ids (versions allowed), mixed freely; names
        that look like Ensembl ids are matched as Ensembl ids.
    table
        The gene table; ``None`` trusts the names as they are (every non-empty name is
        ``exact``; Ensembl names are kept as their own gene).
    ensembl_ids
        Optional per-column Ensembl ids (e.g. ``var["ensembl_id"]``), versions allowed.

    Returns
    -------
    GeneResolution
    """
    names = tuple(str(n) for n in var_names)
    if ensembl_ids is not None and len(ensembl_ids) != len(names):
        raise InputError(
            f"ensembl_ids has {len(ensembl_ids)} entries but there are {len(names)} genes",
            fix="pass one Ensembl id (or None) per atlas column",
        )
    given: list[str | None] = (
        [strip_version(str(e)) if _present(e) else None for e in ensembl_ids]
        if ensembl_ids is not None
        else [None] * len(names)
    )
    is_ens = [is_ensembl(n) for n in names]
    ens_in = [
        g or (strip_version(n) if e else None) for g, n, e in zip(given, names, is_ens, strict=True)
    ]

    symbols: list[str | None] = []
    ensembl: list[str | None] = []
    how: list[MatchHow] = []
    ambiguous: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    for name, ens, name_is_ens in zip(names, ens_in, is_ens, strict=True):
        query = "" if name_is_ens else name.strip()
        if table is None:
            sym: str | None = query or ens or None
            kind: MatchHow = "exact" if sym else "unmatched"
            cands: tuple[str, ...] = ()
        else:
            sym, kind, cands, conflict = _match_one(query, ens, table)
            if conflict:
                warnings.append(f"symbol/Ensembl conflict, kept the symbol: {conflict}")
        if cands:
            ambiguous[name] = cands
        symbols.append(sym)
        how.append(kind)
        primary = table.symbol_to_ensembl.get(sym, ()) if (table and sym) else ()
        ensembl.append(ens or (primary[0] if primary else None))

    index: dict[str, int] = {}
    col_to_u = np.full(len(names), -1, dtype=np.int64)
    first_col: list[int] = []
    for i, sym in enumerate(symbols):
        if sym is None:
            continue
        j = index.setdefault(sym, len(index))
        if j == len(first_col):
            first_col.append(i)
        col_to_u[i] = j
    u_syms = tuple(index)
    u_ens = tuple(ensembl[i] for i in first_col)
    rows = np.flatnonzero(col_to_u >= 0)
    collapse = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, col_to_u[rows])),
        shape=(len(names), len(u_syms)),
    )
    counts = np.bincount(col_to_u[rows], minlength=len(u_syms))
    for dup in np.flatnonzero(counts > 1).tolist():
        cols = [names[i] for i in np.flatnonzero(col_to_u == dup)]
        warnings.append(f"columns {', '.join(map(repr, cols))} are all {u_syms[dup]}: summed")
    if ambiguous:
        ex = "; ".join(f"{k} → {'/'.join(v)}" for k, v in list(ambiguous.items())[:10])
        warnings.append(f"{len(ambiguous)} ambiguous aliases left unmatched, e.g. {ex}")
    return GeneResolution(
        names=names,
        symbols=tuple(symbols),
        ensembl=tuple(ensembl),
        how=tuple(how),
        unique_symbols=u_syms,
        unique_ensembl=u_ens,
        column_to_unique=col_to_u,
        collapse=collapse,
        ambiguous=ambiguous,
        warnings=tuple(warnings),
    )


def _present(value: object) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return str(value).strip() not in ("", "nan", "None")


def text_coverage(
    resolution: GeneResolution,
    symbols_with_text: Iterable[str],
    *,
    what: str = "atlas genes with text",
) -> CoverageReport:
    """Return the share of atlas columns whose gene has a text.

    Parameters
    ----------
    resolution
        From :func:`resolve_genes`.
    symbols_with_text
        Canonical symbols that have a text (e.g. the ``symbol`` column of
        ``source.texts(...)``).
    what
        Label used in the summary.
    """
    have = set(symbols_with_text)
    covered = np.array([s is not None and s in have for s in resolution.symbols], dtype=bool)
    return _report(what, resolution.names, covered, resolution.by_how())


#: var columns that hold gene symbols when var_names are Ensembl ids (CELLxGENE: feature_name)
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name")
_MOUSE_CASE = re.compile(r"[A-Z][a-z][A-Za-z0-9.-]*")


def gene_names_from_var(
    var: pd.DataFrame, column: str | None = None
) -> tuple[list[str], list[str] | None, str | None]:
    """Return (names to match, per-column Ensembl ids or None, a note on where names came from).

    When ``var_names`` are Ensembl ids and ``var`` has a symbol column (``column``, else the
    first of :data:`SYMBOL_COLUMNS` present), the symbols are matched first and the Ensembl
    ids second (a gene whose id is unknown to the table keeps its text through its symbol).
    Otherwise the names are ``var_names`` and the Ensembl ids come from an ``ensembl_id``-like
    column.

    Raises
    ------
    InputError
        When ``column`` is given but absent from ``var``.
    """
    names = [str(n) for n in var.index]
    if column is not None and column not in var.columns:
        raise InputError(
            f"var has no column {column!r} (input.gene_symbol_column); columns: "
            f"{', '.join(map(str, var.columns)) or '(none)'}",
            fix="set input.gene_symbol_column to a var column of gene symbols, or drop it",
        )
    ens_col = next(
        (c for c in ("ensembl_id", "gene_ids", "gene_id", "feature_id") if c in var.columns), None
    )
    ens_ids = [str(v) for v in var[ens_col]] if ens_col else None
    found = column or next((c for c in SYMBOL_COLUMNS if c in var.columns), None)
    if found is None or (column is None and detect_id_space(names) != "ensembl"):
        return names, ens_ids, None
    symbols = [str(v).strip() if _present(v) else "" for v in var[found]]
    if any(is_ensembl(n) for n in names):
        ens_ids = [n if is_ensembl(n) else "" for n in names]
    note = (
        f"gene names: symbols from var[{found!r}] ({sum(bool(s) for s in symbols):,} of "
        f"{len(names):,} genes have one), matched before Ensembl ids"
    )
    return [s or n for s, n in zip(symbols, names, strict=True)], ens_ids, note


def detect_species(names: Iterable[str]) -> tuple[str, float]:
    """Guess the species of gene names: ``human``, ``mouse`` or ``other``, and the evidence share.

    Ensembl ids decide by prefix (``ENSG`` human, ``ENSMUSG`` mouse, another ``ENS…G``
    other); symbols by case: mouse symbols are capitalised (``Cd3e``, ``Actb``), human ones
    upper case (``CD3E``; ``C1orf56`` is not counted as mouse-style).
    """
    ens = sym = mouse = other = 0
    for raw in names:
        n = str(raw).strip()
        if not n:
            continue
        if is_ensembl(n):
            ens += 1
            mouse += n.startswith("ENSMUSG")
            other += not (n.startswith("ENSMUSG") or n[4:5].isdigit())  # ENSG<digits>: human
        else:
            sym += 1
            mouse += bool(_MOUSE_CASE.fullmatch(n)) and "orf" not in n
    total = ens + sym
    if not total:
        return "human", 0.0
    if mouse * 2 > total:
        return "mouse", mouse / total
    if other * 2 > total:
        return "other", other / total
    return "human", 1 - (mouse + other) / total


def check_species(names: Sequence[str], cfg: GenesConfig, where: str) -> str:
    """Refuse non-human gene names unless ``genes.cross_species`` is on; return the species.

    Raises
    ------
    InputError
        Naming the species, the evidence and examples.
    """
    species, share = detect_species(names)
    if species == "human" or cfg.cross_species:
        return species
    ex = ", ".join(str(n) for n in list(names)[:5])
    raise InputError(
        f"{where}: the gene names look like {species} genes ({share:.0%} of them in {species} "
        f"style, e.g. {ex}); gene texts and tables are human, and matching them anyway would "
        "only fold letter case (Cd3e → CD3E)",
        fix="use a human atlas, or set genes.cross_species: true to match names to human "
        "symbols case-insensitively (reported as `casefold`, never `exact`)",
    )
