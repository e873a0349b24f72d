"""Gene tables: symbol ↔ Ensembl id and alias → symbol maps, read from common files."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from raypipe.core.storage import local_copy
from raypipe.errors import InputError

__all__ = ["GeneTable", "detect_id_space", "is_ensembl", "strip_version"]


IdSpace = Literal["ensembl", "symbol"]

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


def is_ensembl(name: str) -> bool:
    """Return whether ``name`` looks like an Ensembl gene id (optionally versioned)."""
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
        hits += is_ensembl(s)
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
        upper: dict[str, str | None] = {}
        for sym in self.symbol_to_ensembl:
            key = sym.upper()
            upper[key] = None if key in upper else sym
        return {k: v for k, v in upper.items() if v is not None}

    @cached_property
    def _upper_alias(self) -> dict[str, tuple[str, ...]]:
        ualias: dict[str, tuple[str, ...]] = {}
        for alias, syms in self.alias_to_symbols.items():
            key = alias.upper()
            prev = ualias.get(key)
            ualias[key] = syms if prev is None else tuple(sorted({*prev, *syms}))
        return ualias

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
        ids = _read_id_table(local_copy(id_table)) if id_table else None
        al = _read_alias_table(local_copy(aliases)) if aliases else None
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
    return float(np.mean([is_ensembl(v.split(";")[0]) for v in sample])) if len(sample) else 0.0


def _read_id_table(path: Path) -> pd.DataFrame:
    raw = _read_table(path, header=None)
    if raw.shape[1] < 2 or raw.empty:
        raise InputError(
            f"gene id table {path} needs a symbol and an Ensembl column; found "
            f"{raw.shape[1]} column(s)",
            fix="give a CSV/TSV with columns symbol and ensembl_id (or GENCODE's id,name CSV)",
        )
    has_header = not is_ensembl(str(raw.iloc[0, 0]).split(";")[0]) and any(
        is_ensembl(str(v).split(";")[0]) for v in raw.iloc[1:3].to_numpy().ravel()
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
