"""Gene text sources: where the text describing each gene comes from.

Each source is a class registered in :data:`TEXT_SOURCES`, built as ``Source(genes_cfg)``,
with ``texts(symbols, ensembl_ids) -> DataFrame[gene_id, symbol, text, source]`` (one row
per input gene that has a text), ``fingerprint()`` (a hash of the source's content and
version, keying the embedding cache) and ``gene_table()`` (the symbol/Ensembl/alias map
the source provides, or ``None``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd

from raypipe.core.storage import local_copy
from raypipe.errors import InputError, RaypipeError
from raypipe.genes.identity import GeneTable, detect_id_space, strip_version
from raypipe.registry import Registry

if TYPE_CHECKING:
    from raypipe.config import GenesConfig, JobConfig

__all__ = [
    "TEXT_COLUMNS",
    "TEXT_SOURCES",
    "NcbiTextSource",
    "SymbolTextSource",
    "TableTextSource",
    "TextSource",
    "build_text_source",
]

TEXT_COLUMNS = ("gene_id", "symbol", "text", "source")
TEXT_SOURCES: Registry[type[TextSource]] = Registry("gene text source")


class TextSource:
    """Base class of gene text sources.

    Every source is built as ``Source(genes_cfg, job)`` and offers :meth:`texts`,
    :meth:`fingerprint`, :meth:`gene_table`, :meth:`usage` (paid calls so far),
    :attr:`failures` (genes whose text could not be made: ``gene_id, symbol, stage, reason``
    dicts) and :meth:`close`.

    Parameters
    ----------
    genes_cfg
        The job's ``genes`` config section.
    job
        The whole job config (sources that call models need ``llm``, ``limits``, ``cache``).
    """

    name: ClassVar[str] = "base"

    def __init__(self, genes_cfg: GenesConfig, job: JobConfig | None = None) -> None:
        self.cfg = genes_cfg
        self.job = job
        self.failures: list[dict[str, str]] = []

    def texts(self, symbols: list[str], ensembl_ids: list[str | None]) -> pd.DataFrame:
        """Return ``gene_id, symbol, text, source`` rows for the genes that have a text.

        Parameters
        ----------
        symbols
            Canonical symbols (e.g. ``GeneResolution.unique_symbols``).
        ensembl_ids
            Matching Ensembl ids (or ``None``), same length.
        """
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Return a short hash of this source's content and version."""
        raise NotImplementedError

    def gene_table(self) -> GeneTable | None:
        """Return the symbol ↔ Ensembl/alias map this source provides, if any."""
        return None

    def usage(self) -> dict[str, dict[str, int]]:
        """Return calls, tokens and cache hits per model so far (none for file sources)."""
        return {}

    def close(self) -> None:
        """Release what the source holds (clients, files)."""

    @staticmethod
    def _check_lengths(symbols: list[str], ensembl_ids: list[str | None]) -> None:
        if len(symbols) != len(ensembl_ids):
            raise InputError(
                f"texts() got {len(symbols)} symbols but {len(ensembl_ids)} Ensembl ids",
                fix="pass one Ensembl id (or None) per symbol",
            )

    def _frame(self, rows: list[tuple[str, str, str]]) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=["gene_id", "symbol", "text"])
        df["source"] = self.name
        return df[list(TEXT_COLUMNS)]


def _hash(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # cache key only
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Return a content hash of ``path`` (cached per process on path, mtime and size)."""
    st = path.stat()
    return _file_digest(str(path), st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------- table
_GENE_COLS = ("symbol", "gene_symbol", "gene", "gene_name", "gene_id", "ensembl_id", "name")
_TEXT_COLS = ("text", "summary", "description", "gene_text", "gene_summary")


def _read_any(path: Path) -> pd.DataFrame:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".json"):
        import gzip

        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict):  # GenePT: {symbol: summary}
            bad = [k for k, v in data.items() if not isinstance(v, str)][:5]
            if bad:
                raise InputError(
                    f"gene text JSON {path}: values must be strings; not for {bad}",
                    fix='write the JSON as {"SYMBOL": "text", ...}',
                )
            return pd.DataFrame({"gene": list(data), "text": list(data.values())})
        if isinstance(data, list):
            return pd.DataFrame.from_records(data)
        raise InputError(
            f"gene text JSON {path} holds a {type(data).__name__}, not an object or a list",
            fix='write the JSON as {"SYMBOL": "text", ...} or a list of {"gene", "text"} records',
        )
    if name.endswith(".parquet"):
        return pd.read_parquet(path)
    sep = "\t" if name.endswith((".tsv", ".txt", ".tab")) else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


@functools.lru_cache(maxsize=8)
def _load_table(path_s: str, mtime_ns: int, size: int) -> tuple[pd.DataFrame, bool]:
    """Return (frame with columns key, symbol, ensembl, text; whether keys are Ensembl ids)."""
    del mtime_ns, size
    path = Path(path_s)
    try:
        raw = _read_any(path)
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(
            f"gene text table {path} cannot be read: {exc}",
            fix="give a TSV/CSV/parquet/JSON table with a gene column and a text column",
        ) from None
    cols = {str(c).strip().lower(): c for c in raw.columns}
    found = [str(c) for c in raw.columns]
    text_col = next((cols[c] for c in _TEXT_COLS if c in cols), None)
    gene_cols = [cols[c] for c in _GENE_COLS if c in cols]
    if text_col is None or not gene_cols:
        miss = "text" if text_col is None else "gene"
        raise InputError(
            f"gene text table {path} has no {miss} column; columns found: {found}",
            fix=f"name the gene column one of {list(_GENE_COLS)} and the text column one of "
            f"{list(_TEXT_COLS)}",
        )
    df = pd.DataFrame({"text": raw[text_col].astype(str).str.strip()})
    sym = ens = None
    for c in gene_cols:
        values = raw[c].astype(str).str.strip()
        if detect_id_space(values.head(500)) == "ensembl":
            ens = values.map(strip_version) if ens is None else ens
        else:
            sym = values if sym is None else sym
    df["symbol"], df["ensembl"] = sym, ens
    df = df[(df["text"] != "") & (df["text"] != "nan")]
    if df.empty:
        raise InputError(
            f"gene text table {path} has no rows with text (columns found: {found})",
            fix="fill the text column, or pick another genes.text_source",
        )
    return df.reset_index(drop=True), sym is None


@TEXT_SOURCES.register("table")
class TableTextSource(TextSource):
    """Texts from a table mapping gene → text (``genes.table``).

    TSV/CSV(.gz), parquet or JSON. GenePT's published JSON (a plain ``{symbol: summary}``
    object) loads as is. The gene column may hold symbols or Ensembl ids (or both columns).
    """

    name = "table"

    def __init__(self, genes_cfg: GenesConfig, job: JobConfig | None = None) -> None:
        super().__init__(genes_cfg, job)
        if not genes_cfg.table:
            raise InputError(
                "genes.text_source is 'table' but genes.table is not set",
                fix="set genes.table to a TSV/CSV/parquet/JSON gene→text file",
            )
        self.path = local_copy(genes_cfg.table).expanduser()  # a URL: downloaded once
        if not self.path.is_file():
            raise InputError(
                f"gene text table {self.path} not found",
                fix="check genes.table (a TSV/CSV/parquet/JSON gene→text file)",
            )
        st = self.path.stat()
        self.frame, _ = _load_table(str(self.path), st.st_mtime_ns, st.st_size)

    @functools.cached_property
    def _maps(self) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        by_sym: dict[str, str] = {}
        by_upper: dict[str, str] = {}
        by_ens: dict[str, str] = {}
        for text, sym, ens in zip(
            self.frame["text"], self.frame["symbol"], self.frame["ensembl"], strict=True
        ):
            if isinstance(sym, str) and sym:
                by_sym.setdefault(sym, text)
                by_upper.setdefault(sym.upper(), text)
            if isinstance(ens, str) and ens:
                by_ens.setdefault(ens, text)
        return by_sym, by_upper, by_ens

    def texts(self, symbols: list[str], ensembl_ids: list[str | None]) -> pd.DataFrame:
        """Return the table's text per gene, matched by Ensembl id, symbol, then upper-case."""
        self._check_lengths(symbols, ensembl_ids)
        by_sym, by_upper, by_ens = self._maps
        rows = []
        for sym, ens in zip(symbols, ensembl_ids, strict=True):
            text = by_ens.get(strip_version(ens)) if ens else None
            text = text or by_sym.get(sym) or by_upper.get(sym.upper())
            if text:
                rows.append((ens or sym, sym, text))
        return self._frame(rows)

    def fingerprint(self) -> str:
        """Hash of the table file's bytes."""
        return _hash("table-v1", file_digest(self.path))

    def gene_table(self) -> GeneTable | None:
        """Return a symbol ↔ Ensembl map when the table has both columns, else ``None``."""
        df = self.frame.dropna(subset=["symbol", "ensembl"])
        if df.empty:
            return None
        return GeneTable.from_frames(
            df.rename(columns={"ensembl": "ensembl_id"}), source=str(self.path)
        )


# ---------------------------------------------------------------- symbol
@TEXT_SOURCES.register("symbol")
class SymbolTextSource(TextSource):
    """The gene symbol alone as its text (a weak fallback; GenePT's name-only baseline)."""

    name = "symbol"

    def texts(self, symbols: list[str], ensembl_ids: list[str | None]) -> pd.DataFrame:
        """Return each non-empty symbol as its own text."""
        self._check_lengths(symbols, ensembl_ids)
        rows = [(e or s, s, s) for s, e in zip(symbols, ensembl_ids, strict=True) if s]
        return self._frame(rows)

    def fingerprint(self) -> str:
        """Constant: the text is the symbol."""
        return _hash("symbol-v1")


# ---------------------------------------------------------------- ncbi (MyGene.info)
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


@TEXT_SOURCES.register("ncbi")
class NcbiTextSource(TextSource):
    """NCBI Gene summaries through MyGene.info's batch query API (``genes.ncbi_url``).

    POSTs ``{ncbi_url}/query`` with up to ``genes.ncbi_batch_size`` symbols per request;
    transient errors (timeouts, 429, 5xx) are retried with exponential backoff. Text is
    ``"SYMBOL: name. summary"``. The fingerprint includes MyGene's ``build_version`` from
    ``{ncbi_url}/metadata``.
    """

    name = "ncbi"
    fields = "symbol,name,summary,ensembl.gene"
    max_retries: ClassVar[int] = 4
    backoff_s: ClassVar[float] = 0.5
    timeout_s: ClassVar[float] = 60.0

    def __init__(self, genes_cfg: GenesConfig, job: JobConfig | None = None) -> None:
        super().__init__(genes_cfg, job)
        self.url = genes_cfg.ncbi_url.rstrip("/")
        self._hits: dict[str, dict[str, Any] | None] = {}
        self.requests = 0

    def _request(self, url: str, data: dict[str, str] | None = None) -> Any:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, headers={"User-Agent": "raypipe"})
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code not in _TRANSIENT:
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise RaypipeError(
                        f"MyGene.info request {url} failed: HTTP {exc.code} {detail}",
                        fix="check genes.ncbi_url (e.g. https://mygene.info/v3)",
                    ) from None
                last = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
            except json.JSONDecodeError as exc:
                raise RaypipeError(
                    f"MyGene.info request {url} returned invalid JSON: {exc}",
                    fix="check genes.ncbi_url points at a MyGene.info v3 API",
                ) from None
        raise RaypipeError(
            f"MyGene.info at {url} is unreachable after {self.max_retries + 1} tries: {last}",
            fix="check the network or genes.ncbi_url, or use genes.text_source=orgdb (offline)",
        )

    def _fetch(self, symbols: list[str]) -> None:
        todo = [s for s in dict.fromkeys(symbols) if s and s not in self._hits]
        size = self.cfg.ncbi_batch_size
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            data = {"q": ",".join(batch), "scopes": "symbol", "fields": self.fields,
                    "species": "human"}  # fmt: skip
            hits = self._request(f"{self.url}/query", data)
            if not isinstance(hits, list):
                raise RaypipeError(
                    f"MyGene.info {self.url}/query returned {type(hits).__name__}, not a list",
                    fix="check genes.ncbi_url points at a MyGene.info v3 API",
                )
            for s in batch:
                self._hits.setdefault(s, None)
            for hit in hits:
                q = str(hit.get("query", ""))
                if hit.get("notfound") or q not in self._hits:
                    continue
                best = self._hits[q]
                exact = str(hit.get("symbol", "")).upper() == q.upper()
                if best is None or (exact and str(best.get("symbol", "")).upper() != q.upper()):
                    self._hits[q] = hit

    def texts(self, symbols: list[str], ensembl_ids: list[str | None]) -> pd.DataFrame:
        """Fetch (once) and return NCBI summaries for the symbols MyGene.info knows."""
        self._check_lengths(symbols, ensembl_ids)
        self._fetch(symbols)
        rows = []
        for sym, ens in zip(symbols, ensembl_ids, strict=True):
            hit = self._hits.get(sym)
            if not hit:
                continue
            name = str(hit.get("name") or "").strip()
            summary = str(hit.get("summary") or "").strip()
            if not name and not summary:
                continue
            label = hit.get("symbol") or sym
            head = f"{label}: {name}." if name else f"{label}:"
            text = f"{head} {summary}".strip()
            rows.append((ens or _ensembl_of(hit) or sym, sym, text))
        return self._frame(rows)

    @functools.cached_property
    def _build(self) -> str:
        meta = self._request(f"{self.url}/metadata")
        return str(meta.get("build_version") or meta.get("build_date") or "")

    def fingerprint(self) -> str:
        """Hash of the URL, fields and MyGene.info's build version."""
        return _hash("ncbi-v1", self.url, self.fields, self._build)


def _ensembl_of(hit: dict[str, Any]) -> str | None:
    ens = hit.get("ensembl")
    if isinstance(ens, list):
        ens = ens[0] if ens else None
    if isinstance(ens, dict):
        gene = ens.get("gene")
        return str(gene[0] if isinstance(gene, list) else gene) if gene else None
    return None


# ---------------------------------------------------------------- lazy sources
TEXT_SOURCES.add("orgdb", "raypipe.genes.orgdb:OrgdbTextSource")
TEXT_SOURCES.add("llm", "raypipe.genes.llm_source:LLMTextSource")


def build_text_source(cfg: GenesConfig, job: JobConfig | None = None) -> TextSource:
    """Build the text source named by ``cfg.text_source``."""
    return TEXT_SOURCES.get(cfg.text_source)(cfg, job)
