"""Gene texts from Bioconductor's org.Hs.eg.db + GO.db: full name and GO term names.

Two readers give the same table: the flat TSV (``orgHs_gene_text_go.tsv.gz``: entrez_id,
symbol, ensembl_ids, gene_type, full_name, go_bp, go_mf, go_cc) and the two SQLite files
Bioconductor ships (``org.Hs.eg.sqlite`` + ``GO.sqlite``, read with the stdlib ``sqlite3``).
Either is read once per process and cached (keyed on path, mtime and size).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from raypipe.core.storage import local_copy
from raypipe.errors import InputError, RaypipeError
from raypipe.genes.identity import GeneTable
from raypipe.genes.sources import TEXT_COLUMNS, TextSource

if TYPE_CHECKING:
    from raypipe.config import GenesConfig, JobConfig

__all__ = [
    "DEBIAN_PACKAGES",
    "DEFAULT_ORGDB_DIR",
    "OrgdbData",
    "OrgdbFiles",
    "OrgdbTextSource",
    "fetch_orgdb",
    "locate_orgdb",
    "orgdb_text",
    "read_orgdb",
]

ORG_SQLITE = "org.Hs.eg.sqlite"
GO_SQLITE = "GO.sqlite"
TSV_NAME = "orgHs_gene_text_go.tsv.gz"
ALIAS_TSV_NAME = "orgHs_gene_aliases.tsv.gz"
DEBIAN_PACKAGES = ("r-bioc-org.hs.eg.db", "r-bioc-go.db")
DEFAULT_ORGDB_DIR = Path("~/.cache/raypipe/orgdb")
_DEBIAN_LIB = Path("/usr/lib/R/site-library")
_DEBIAN_ORG = _DEBIAN_LIB / "org.Hs.eg.db" / "extdata" / ORG_SQLITE
_DEBIAN_GO = _DEBIAN_LIB / "GO.db" / "extdata" / GO_SQLITE
_GO_ROOTS = frozenset({"biological_process", "molecular_function", "cellular_component"})
_GO_COLUMNS = (("go_bp", "Biological process"), ("go_mf", "Molecular function"),
               ("go_cc", "Cellular component"))  # fmt: skip
_REGULATION = ("regulation of", "positive regulation of", "negative regulation of")
_SEP = "\x1f"  # GO term separator inside the cached table (terms contain commas)
TEXT_VERSION = "orgdb-text-v1"
FETCH_FIX = (
    "run `raypipe genes fetch-orgdb` (apt-get download r-bioc-org.hs.eg.db r-bioc-go.db, "
    "dpkg -x, copy org.Hs.eg.sqlite and GO.sqlite to ~/.cache/raypipe/orgdb), or set "
    "genes.orgdb to an orgHs_gene_text_go.tsv.gz file"
)


@dataclass(frozen=True)
class OrgdbFiles:
    """Where the orgdb data lives: a TSV (plus optional alias TSV) or the two SQLite files."""

    kind: Literal["tsv", "sqlite"]
    main: Path
    go: Path | None = None
    aliases: Path | None = None

    def describe(self) -> str:
        """Return the paths as one string."""
        return ", ".join(str(p) for p in (self.main, self.go, self.aliases) if p)


def _files_in(folder: Path) -> OrgdbFiles | None:
    if (folder / ORG_SQLITE).is_file() and (folder / GO_SQLITE).is_file():
        return OrgdbFiles("sqlite", folder / ORG_SQLITE, folder / GO_SQLITE)
    if (folder / TSV_NAME).is_file():
        return _tsv_files(folder / TSV_NAME)
    return None


def _tsv_files(path: Path) -> OrgdbFiles:
    alias = path.parent / ALIAS_TSV_NAME
    return OrgdbFiles("tsv", path, aliases=alias if alias.is_file() else None)


def locate_orgdb(setting: str | Path | None = None, *, cwd: Path | None = None) -> OrgdbFiles:
    """Find the orgdb data.

    Parameters
    ----------
    setting
        ``genes.orgdb``: a TSV file or a folder holding ``org.Hs.eg.sqlite`` and
        ``GO.sqlite`` (or the TSV). ``None`` searches, in order: env ``RAYPIPE_ORGDB``,
        ``~/.cache/raypipe/orgdb/``, Debian's R library (``/usr/lib/R/site-library``) and
        ``../shared/data/genes/orgHs_gene_text_go.tsv.gz`` relative to ``cwd``.

    Raises
    ------
    InputError
        Nothing found (the message lists where it looked and how to fetch the files).
    """
    if setting is not None:
        path = local_copy(setting).expanduser()  # a URL (file or folder): downloaded once
        found = _files_in(path) if path.is_dir() else (_tsv_files(path) if path.is_file() else None)
        if found is None:
            raise InputError(
                f"genes.orgdb={setting!r}: no {TSV_NAME}-style TSV and no {ORG_SQLITE} + "
                f"{GO_SQLITE} pair there",
                fix=FETCH_FIX,
            )
        return found
    looked: list[str] = []
    env = os.environ.get("RAYPIPE_ORGDB")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(DEFAULT_ORGDB_DIR.expanduser())
    for cand in candidates:
        looked.append(str(cand))
        if cand.is_file():
            return _tsv_files(cand)
        if cand.is_dir() and (found := _files_in(cand)) is not None:
            return found
    looked.append(str(_DEBIAN_ORG.parent.parent.parent))
    if _DEBIAN_ORG.is_file() and _DEBIAN_GO.is_file():
        return OrgdbFiles("sqlite", _DEBIAN_ORG, _DEBIAN_GO)
    try:
        here = cwd or Path.cwd()
    except FileNotFoundError:  # the working directory is gone (seen in `ray job submit` drivers)
        here = Path(__file__).resolve().parents[2]
    shared = here / ".." / "shared" / "data" / "genes" / TSV_NAME
    looked.append(str(shared))
    if shared.is_file():
        return _tsv_files(shared.resolve())
    raise InputError(f"no orgdb gene data found; looked in: {', '.join(looked)}", fix=FETCH_FIX)


@dataclass(frozen=True, eq=False)
class OrgdbData:
    r"""The orgdb table, one row per gene, and its alias table.

    Attributes
    ----------
    genes
        Columns entrez_id, symbol, ensembl_ids (``;``-joined), gene_type, full_name and
        go_bp/go_mf/go_cc (term names joined by :attr:`go_sep`, as stored); one row per
        symbol (duplicates keep the row with Ensembl ids, then the lowest Entrez id);
        indexed by symbol.
    aliases
        Columns alias, symbol.
    fingerprint
        Hash of the data version (TSV bytes, or the SQLite metadata tables).
    go_sep
        Separator of the GO term names in the go_* columns.
    """

    genes: pd.DataFrame
    aliases: pd.DataFrame | None
    fingerprint: str
    go_sep: str = _SEP

    @functools.cached_property
    def gene_table(self) -> GeneTable:
        """Symbol ↔ Ensembl and alias maps of this orgdb."""
        ids = self.genes.reset_index(drop=True)
        return GeneTable.from_frames(
            ids, self.aliases, ensembl_col="ensembl_ids", source=f"orgdb {self.fingerprint}"
        )


def _clean_terms(cell: object, sep: str) -> list[str]:
    if not isinstance(cell, str) or not cell:
        return []
    return sorted({t.strip() for t in cell.split(sep)} - _GO_ROOTS - {""})


def _finish(genes: pd.DataFrame) -> pd.DataFrame:
    genes = genes.fillna("")
    genes["entrez_id"] = genes["entrez_id"].astype(str)
    eid = pd.to_numeric(genes["entrez_id"], errors="coerce")
    keys = pd.DataFrame({"no_ens": genes["ensembl_ids"] == "", "eid": eid})
    best = keys.sort_values(["no_ens", "eid"], kind="stable").index
    genes = genes.loc[best]
    genes = genes[genes["symbol"] != ""].drop_duplicates("symbol", keep="first")
    genes = genes.loc[eid.loc[genes.index].sort_values(kind="stable").index]
    return genes.set_index("symbol", drop=False).rename_axis(None)


def _read_tsv(path: Path, alias_path: Path | None) -> OrgdbData:
    try:
        genes = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"orgdb TSV {path} cannot be read: {exc}", fix=FETCH_FIX) from None
    need = {"entrez_id", "symbol", "ensembl_ids", "full_name", "go_bp", "go_mf", "go_cc"}
    if missing := need - set(genes.columns):
        raise InputError(
            f"orgdb TSV {path} lacks columns {sorted(missing)}; found {list(genes.columns)}",
            fix=f"use the {TSV_NAME} layout or the SQLite files ({FETCH_FIX})",
        )
    if "gene_type" not in genes:
        genes["gene_type"] = ""
    aliases = None
    if alias_path is not None:
        aliases = pd.read_csv(alias_path, sep="\t", dtype=str, keep_default_na=False)[
            ["alias", "symbol"]
        ]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return OrgdbData(_finish(genes), aliases, f"tsv:{digest}", go_sep="; ")


_SQL_GENES = """
SELECT g._id AS _id, g.gene_id AS entrez_id, i.symbol AS symbol, i.gene_name AS full_name,
       t.gene_type AS gene_type
FROM genes g JOIN gene_info i ON i._id = g._id LEFT JOIN genetype t ON t._id = g._id
"""
_SQL_ENSEMBL = """
SELECT _id, group_concat(ensembl_id, ';') FROM (SELECT _id, ensembl_id FROM ensembl ORDER BY rowid)
GROUP BY _id
"""
_SQL_GO = """
SELECT _id, group_concat(term, char(31)) FROM (
  SELECT DISTINCT a._id AS _id, t.term AS term FROM {table} a JOIN go.go_term t ON t.go_id = a.go_id
) GROUP BY _id
"""
_SQL_ALIAS = "SELECT a.alias_symbol, i.symbol FROM alias a JOIN gene_info i ON i._id = a._id"


def _read_sqlite(org: Path, go: Path) -> OrgdbData:
    try:
        con = sqlite3.connect(f"file:{org}?mode=ro", uri=True)
        try:
            con.execute("ATTACH DATABASE ? AS go", (f"file:{go}?mode=ro",))
            genes = pd.read_sql_query(_SQL_GENES, con).set_index("_id")
            genes["ensembl_ids"] = pd.Series(dict(con.execute(_SQL_ENSEMBL).fetchall()))
            for col, _ in _GO_COLUMNS:
                rows = dict(con.execute(_SQL_GO.format(table=col)).fetchall())
                genes[col] = pd.Series(rows).reindex(genes.index)
            aliases = pd.DataFrame(con.execute(_SQL_ALIAS).fetchall(), columns=["alias", "symbol"])
            meta = con.execute("SELECT name, value FROM metadata ORDER BY name").fetchall()
            meta += con.execute("SELECT name, value FROM go.metadata ORDER BY name").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise InputError(
            f"orgdb SQLite files {org} / {go} cannot be read: {exc}", fix=FETCH_FIX
        ) from None
    digest = hashlib.sha256(repr(meta).encode()).hexdigest()[:16]
    return OrgdbData(_finish(genes.reset_index(drop=True)), aliases, f"sqlite:{digest}", _SEP)


@functools.lru_cache(maxsize=4)
def _read_cached(files: OrgdbFiles, stamp: tuple[tuple[int, int], ...]) -> OrgdbData:
    del stamp  # part of the cache key only
    if files.kind == "sqlite":
        assert files.go is not None
        return _read_sqlite(files.main, files.go)
    return _read_tsv(files.main, files.aliases)


def read_orgdb(files: OrgdbFiles) -> OrgdbData:
    """Read the orgdb data once per process (cached on path, mtime and size)."""
    paths = [p for p in (files.main, files.go, files.aliases) if p is not None]
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    return _read_cached(files, stamp)


def orgdb_text(row: pd.Series | dict[str, str], *, max_terms: int = 30, sep: str = _SEP) -> str:
    """Write one gene's text from an :attr:`OrgdbData.genes` row.

    ``"SYMBOL: full name. Biological process: t1; t2. Molecular function: …. Cellular
    component: …."``; GO terms are sorted by name, root terms dropped, and empty lists left
    out.

    Parameters
    ----------
    row
        Needs ``symbol``, ``full_name``, ``go_bp``, ``go_mf``, ``go_cc``.
    max_terms
        Longer GO lists keep this many terms, preferring core terms over ``regulation of …``.
    sep
        Separator of the term names in the go_* fields (:attr:`OrgdbData.go_sep`).
    """
    name = str(row["full_name"]).strip()
    parts = [f"{row['symbol']}: {name}." if name else f"{row['symbol']}."]
    for col, label in _GO_COLUMNS:
        terms = _clean_terms(row[col], sep)
        if len(terms) > max_terms:  # keep core terms before "(positive) regulation of" ones
            terms = sorted(sorted(terms, key=lambda t: (t.startswith(_REGULATION), t))[:max_terms])
        if terms:
            parts.append(f"{label}: {'; '.join(terms)}.")
    return " ".join(parts)


@functools.lru_cache(maxsize=4)
def _source_fingerprint(data_fp: str, max_terms: int) -> str:
    return hashlib.sha256(f"orgdb|{TEXT_VERSION}|{max_terms}|{data_fp}".encode()).hexdigest()[:16]


class OrgdbTextSource(TextSource):
    """Gene texts from org.Hs.eg.db: full name plus GO process/function/component names.

    Parameters
    ----------
    genes_cfg
        ``genes.orgdb`` says where the data is (see :func:`locate_orgdb`).
    max_terms
        GO terms kept per category.
    """

    name = "orgdb"

    def __init__(
        self, genes_cfg: GenesConfig, job: JobConfig | None = None, *, max_terms: int = 30
    ) -> None:
        super().__init__(genes_cfg, job)
        self.files = locate_orgdb(genes_cfg.orgdb)
        self.max_terms = max_terms

    @property
    def data(self) -> OrgdbData:
        """The orgdb table (read once per process)."""
        return read_orgdb(self.files)

    def texts(self, symbols: list[str], ensembl_ids: list[str | None]) -> pd.DataFrame:
        """Return texts for the genes found by symbol, else by Ensembl id."""
        self._check_lengths(symbols, ensembl_ids)
        data = self.data
        genes = data.genes
        ens2sym = data.gene_table.ensembl_to_symbol
        keys = [
            sym if sym in genes.index else ens2sym.get(ens or "")
            for sym, ens in zip(symbols, ensembl_ids, strict=True)
        ]
        found = sorted({k for k in keys if k is not None and k in genes.index})
        records = genes.loc[found].to_dict("index") if found else {}
        rows = []
        for sym, ens, key in zip(symbols, ensembl_ids, keys, strict=True):
            row = records.get(key) if key is not None else None
            if row is None:
                continue
            primary = row["ensembl_ids"].split(";")[0] if row["ensembl_ids"] else None
            text = orgdb_text(row, max_terms=self.max_terms, sep=data.go_sep)
            rows.append((ens or primary or sym, sym, text, self.name))
        return pd.DataFrame(rows, columns=list(TEXT_COLUMNS))

    def fingerprint(self) -> str:
        """Hash of the orgdb data version and the text template."""
        return _source_fingerprint(self.data.fingerprint, self.max_terms)

    def gene_table(self) -> GeneTable:
        """Symbol ↔ Ensembl and alias maps from the same orgdb."""
        return self.data.gene_table


def fetch_orgdb(dest: str | Path | None = None) -> Path:
    """Download org.Hs.eg.db and GO.db's SQLite files from Debian, without R.

    Runs ``apt-get download r-bioc-org.hs.eg.db r-bioc-go.db`` in a temporary folder,
    unpacks the ``.deb`` files with ``dpkg -x`` and copies ``org.Hs.eg.sqlite`` and
    ``GO.sqlite`` to ``dest`` (default ``~/.cache/raypipe/orgdb``).

    Returns
    -------
    Path
        The folder holding the two files (usable as ``genes.orgdb``).
    """
    dest = Path(dest or DEFAULT_ORGDB_DIR).expanduser()
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if apt is None or dpkg is None:
        raise RaypipeError(
            "fetch-orgdb needs apt-get and dpkg (Debian/Ubuntu)",
            fix="install Bioconductor's org.Hs.eg.db and GO.db in R and set genes.orgdb to a "
            f"folder holding {ORG_SQLITE} and {GO_SQLITE}",
        )
    dest.mkdir(parents=True, exist_ok=True)
    if all((dest / name).is_file() for name in (ORG_SQLITE, GO_SQLITE)):
        return dest  # already fetched (delete the folder to fetch again)
    with tempfile.TemporaryDirectory(prefix="raypipe-orgdb-") as tmp:
        run = subprocess.run(
            [apt, "download", *DEBIAN_PACKAGES], cwd=tmp, capture_output=True, text=True
        )
        if run.returncode != 0 and os.geteuid() == 0:
            # a fresh machine has no package lists yet: fetch them once, then retry
            subprocess.run([apt, "update", "-qq"], capture_output=True, text=True)
            run = subprocess.run(
                [apt, "download", *DEBIAN_PACKAGES], cwd=tmp, capture_output=True, text=True
            )
        debs = sorted(Path(tmp).glob("*.deb"))
        if run.returncode != 0 or len(debs) < len(DEBIAN_PACKAGES):
            raise RaypipeError(
                f"apt-get download {' '.join(DEBIAN_PACKAGES)} failed: "
                f"{(run.stderr or run.stdout).strip()[-500:]}",
                fix="run `apt-get update` (network access to the Debian mirror is needed)",
            )
        root = Path(tmp) / "root"
        for deb in debs:
            subprocess.run([dpkg, "-x", str(deb), str(root)], check=True, capture_output=True)
        for name in (ORG_SQLITE, GO_SQLITE):
            found = sorted(root.rglob(name))
            if not found:
                raise RaypipeError(f"{name} not found inside {', '.join(d.name for d in debs)}")
            part = dest / f".{name}.part"
            shutil.copyfile(found[0], part)
            os.replace(part, dest / name)
    return dest
