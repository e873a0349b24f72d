"""Gene identity: which gene each atlas column is, and how many of them we can describe.

Atlases name their genes by symbol (often outdated: ``IL8``, ``SEPT7``) or by Ensembl id
(often versioned: ``ENSG00000169429.11``). :func:`resolve_genes` maps every column to one
canonical symbol (and Ensembl id) through a :class:`GeneTable`, and builds the sparse matrix
that sums columns that turn out to be the same gene.

Matching rule, per column (first rule that applies wins):

1. ``exact``: the name is an official symbol (case-insensitive when unambiguous). Symbols
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
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from raypipe.errors import InputError

__all__ = [
    "CoverageReport",
    "GeneResolution",
    "GeneTable",
    "check_coverage",
    "detect_id_space",
    "resolve_genes",
    "strip_version",
    "text_coverage",
]

IdSpace = Literal["ensembl", "symbol"]
MatchHow = Literal["exact", "alias", "ensembl", "unmatched"]

_SPLIT_RE = re.compile(r"[;,|\s]+")
_VERSION_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+")
_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(?:\.\d+)?(_PAR_Y)?$")


def strip_version(gene_id: str) -> str:
    """Drop the version suffix of an Ensembl gene id; other names are returned unchanged.

    Parameters
    ----------
    gene_id
        ``"ENSG00000198851.10"`` → ``"ENSG00000198851"``; a GENCODE ``_PAR_Y`` suffix is kept.
    """
    m = _ENSEMBL_RE.match(gene_id.strip())
    if m is None:
        return gene_id
    return m.group(1) + (m.group(2) or "")


def _is_ensembl(name: str) -> bool:
    return _ENSEMBL_RE.match(name.strip()) is not None


def detect_id_space(names: Iterable[str]) -> IdSpace:
    """Say whether gene names are Ensembl ids or symbols (majority of non-empty names).

    Parameters
    ----------
    names
        Atlas gene names (``var_names``).

    Returns
    -------
    ``"ensembl"`` when more than half of the non-empty names look like Ensembl gene ids
    (``ENSG…``, ``ENSMUSG…``, optionally versioned), else ``"symbol"``.
    """
    n = hits = 0
    for name in names:
        s = str(name).strip()
        if not s:
            continue
        n += 1
        hits += _is_ensembl(s)
    return "ensembl" if n and hits * 2 > n else "symbol"


class GeneTable:
    """Symbol ↔ Ensembl map plus alias → symbol map.

    Parameters
    ----------
    symbol_to_ensembl
        Official symbol → its Ensembl ids (first = primary; may be empty).
    alias_to_symbols
        Alias → official symbols it may mean.
    source
        Where the table came from (for messages).

    Notes
    -----
    Build it with :meth:`from_frames`, :meth:`from_files` or :meth:`merged`. An Ensembl id
    listed under several symbols maps to the first one (tables list genes in preference
    order: orgdb by Entrez id).
    """

    def __init__(
        self,
        symbol_to_ensembl: Mapping[str, Sequence[str]],
        alias_to_symbols: Mapping[str, Sequence[str]] | None = None,
        *,
        source: str = "",
    ) -> None:
        self.source = source
        self.symbol_to_ensembl: dict[str, tuple[str, ...]] = {
            s: tuple(e) for s, e in symbol_to_ensembl.items() if s
        }
        self.ensembl_to_symbol: dict[str, str] = {}
        for sym, ids in self.symbol_to_ensembl.items():
            for e in ids:
                self.ensembl_to_symbol.setdefault(e, sym)
        self.alias_to_symbols: dict[str, tuple[str, ...]] = {
            a: tuple(dict.fromkeys(v)) for a, v in (alias_to_symbols or {}).items() if a and v
        }

    @cached_property
    def _upper_symbol(self) -> dict[str, str]:
        upper: dict[str, list[str]] = {}
        for sym in self.symbol_to_ensembl:
            upper.setdefault(sym.upper(), []).append(sym)
        return {k: v[0] for k, v in upper.items() if len(v) == 1}

    @cached_property
    def _upper_alias(self) -> dict[str, tuple[str, ...]]:
        ualias: dict[str, set[str]] = {}
        for alias, syms in self.alias_to_symbols.items():
            ualias.setdefault(alias.upper(), set()).update(syms)
        return {k: tuple(sorted(v)) for k, v in ualias.items()}

    def __len__(self) -> int:
        return len(self.symbol_to_ensembl)

    def __repr__(self) -> str:
        return (
            f"GeneTable({len(self)} symbols, {len(self.ensembl_to_symbol)} Ensembl ids, "
            f"{len(self.alias_to_symbols)} aliases, source={self.source!r})"
        )

    def lookup_symbol(self, name: str) -> str | None:
        """Return the official symbol spelled ``name`` (case-insensitive when unambiguous)."""
        if name in self.symbol_to_ensembl:
            return name
        return self._upper_symbol.get(name.upper())

    def lookup_alias(self, name: str) -> tuple[str, ...]:
        """Return the official symbols ``name`` is an alias of (empty when none)."""
        hit = self.alias_to_symbols.get(name)
        if hit is None:
            hit = self._upper_alias.get(name.upper(), ())
        return tuple(s for s in hit if s in self.symbol_to_ensembl) or hit

    @classmethod
    def from_frames(
        cls,
        ids: pd.DataFrame | None = None,
        aliases: pd.DataFrame | None = None,
        *,
        symbol_col: str = "symbol",
        ensembl_col: str = "ensembl_id",
        alias_col: str = "alias",
        source: str = "frames",
    ) -> GeneTable:
        """Build a table from data frames.

        Parameters
        ----------
        ids
            One row per (symbol, Ensembl id); ``ensembl_col`` may hold several ids joined by
            ``;`` or ``,`` (versions are stripped) or be empty.
        aliases
            Columns ``alias_col`` and ``symbol_col``: one row per alias → symbol.
        """
        sym2ens: dict[str, list[str]] = {}
        if ids is not None:
            pairs = pd.DataFrame({"s": ids[symbol_col].astype(str).str.strip()})
            if ensembl_col in ids:
                pairs["e"] = ids[ensembl_col].fillna("").astype(str).str.strip()
            else:
                pairs["e"] = ""
            multi = pairs["e"].str.contains(_SPLIT_RE.pattern, regex=True)
            if multi.any():
                pairs["e"] = pairs["e"].where(~multi, pairs["e"].str.split(_SPLIT_RE.pattern))
                pairs = pairs.explode("e").fillna("")
            pairs["e"] = pairs["e"].str.replace(_VERSION_RE.pattern, r"\1", regex=True)
            pairs = pairs.drop_duplicates()
            for sym, e in zip(pairs["s"].tolist(), pairs["e"].tolist(), strict=True):
                lst = sym2ens.setdefault(sym, [])
                if e:
                    lst.append(e)
        a2s: dict[str, list[str]] = {}
        if aliases is not None:
            al = aliases[alias_col].astype(str).str.strip()
            asym = aliases[symbol_col].astype(str).str.strip()
            for alias, sym in zip(al, asym, strict=True):
                if alias and sym:
                    a2s.setdefault(alias, []).append(sym)
            for sym in asym.unique():
                if sym:
                    sym2ens.setdefault(sym, [])
        return cls(sym2ens, a2s, source=source)

    @classmethod
    def from_files(
        cls, id_table: str | Path | None = None, aliases: str | Path | None = None
    ) -> GeneTable:
        """Read a symbol↔Ensembl table and/or an alias table.

        Parameters
        ----------
        id_table
            CSV/TSV(.gz): GENCODE's headerless ``ensembl_id,symbol`` CSV, CELLxGENE's
            headerless gene list, the orgdb TSV (``symbol``, ``ensembl_ids``), or any table
            with a symbol column and an Ensembl column (found by their values).
        aliases
            TSV/CSV(.gz) with columns ``alias`` and ``symbol`` (orgdb's alias table), or a
            headerless two-column ``alias, symbol`` table.
        """
        ids = _read_id_table(Path(id_table)) if id_table else None
        al = _read_alias_table(Path(aliases)) if aliases else None
        src = ", ".join(str(p) for p in (id_table, aliases) if p)
        return cls.from_frames(ids, al, source=src)

    @classmethod
    def merged(cls, *tables: GeneTable | None) -> GeneTable | None:
        """Combine tables; earlier tables win where they disagree. ``None`` entries are skipped."""
        real = [t for t in tables if t is not None]
        if not real:
            return None
        sym2ens: dict[str, list[str]] = {}
        a2s: dict[str, list[str]] = {}
        for t in real:
            for sym, ids in t.symbol_to_ensembl.items():
                lst = sym2ens.setdefault(sym, [])
                lst.extend(e for e in ids if e not in lst)
            for alias, syms in t.alias_to_symbols.items():
                a2s.setdefault(alias, []).extend(syms)
        return cls(sym2ens, a2s, source=" + ".join(t.source for t in real))


def _read_table(path: Path, header: int | None) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"gene table {path} not found", fix="check genes.id_table / genes.aliases")
    name = path.name.lower().removesuffix(".gz")
    sep = "\t" if name.endswith((".tsv", ".txt")) else ","
    return pd.read_csv(path, sep=sep, header=header, dtype=str, keep_default_na=False)


def _ensembl_share(col: pd.Series) -> float:
    sample = col.head(200).astype(str)
    return float(np.mean([_is_ensembl(v.split(";")[0]) for v in sample])) if len(sample) else 0.0


def _read_id_table(path: Path) -> pd.DataFrame:
    raw = _read_table(path, header=None)
    if raw.shape[1] < 2 or raw.empty:
        raise InputError(
            f"gene id table {path} needs a symbol and an Ensembl column; found "
            f"{raw.shape[1]} column(s)",
            fix="give a CSV/TSV with columns symbol and ensembl_id (or GENCODE's id,name CSV)",
        )
    has_header = not _is_ensembl(str(raw.iloc[0, 0]).split(";")[0]) and any(
        _is_ensembl(str(v).split(";")[0]) for v in raw.iloc[1:3].to_numpy().ravel()
    )
    df = raw.iloc[1:] if has_header else raw
    cols = [str(c).strip().lower() for c in raw.iloc[0]] if has_header else []
    shares = [_ensembl_share(df[c]) for c in df.columns]
    ens_pos = int(np.argmax(shares))
    if shares[ens_pos] < 0.5:
        raise InputError(
            f"gene id table {path}: no column holds Ensembl ids (columns: {cols or 'no header'})",
            fix="give a table with an Ensembl id column (ENSG...) and a symbol column",
        )
    sym_pos = next(
        (i for i, c in enumerate(cols) if c in ("symbol", "gene_symbol", "gene_name", "name")),
        next(i for i in range(df.shape[1]) if i != ens_pos),
    )
    out = pd.DataFrame(
        {"symbol": df.iloc[:, sym_pos].to_numpy(), "ensembl_id": df.iloc[:, ens_pos].to_numpy()}
    )
    return out[out["symbol"].str.strip() != ""]


def _read_alias_table(path: Path) -> pd.DataFrame:
    raw = _read_table(path, header=0)
    cols = {str(c).strip().lower(): c for c in raw.columns}
    if "alias" in cols and "symbol" in cols:
        df = pd.DataFrame({"alias": raw[cols["alias"]], "symbol": raw[cols["symbol"]]})
    elif raw.shape[1] >= 2:
        raw = _read_table(path, header=None)
        df = pd.DataFrame({"alias": raw.iloc[:, 0], "symbol": raw.iloc[:, 1]})
    else:
        raise InputError(
            f"alias table {path} needs columns alias and symbol; found {list(raw.columns)}",
            fix="give a TSV with columns alias, symbol (like orgHs_gene_aliases.tsv.gz)",
        )
    return df[(df["alias"] != "") & (df["symbol"] != "")]


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
    if report.share >= min_coverage:
        return
    examples = ", ".join(report.unmatched) or "(none listed)"
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
        return {k: self.how.count(k) for k in ("exact", "alias", "ensembl", "unmatched")}

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
        return sym, "exact", (), conflict
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
    is_ens = [_is_ensembl(n) for n in names]
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
    for j in np.flatnonzero(counts > 1):
        cols = [names[i] for i in np.flatnonzero(col_to_u == j)]
        warnings.append(f"columns {', '.join(map(repr, cols))} are all {u_syms[j]}: summed")
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
