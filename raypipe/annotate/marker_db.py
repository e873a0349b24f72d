"""A curated public marker resource: cell-type marker genes for every tissue.

The Cell Ontology names markers for immune cells and little else; a curated resource covers
epithelial, endocrine, neural, stromal and endothelial types too. Resources are registry
entries (:data:`MARKER_DBS`, config ``annotate.marker_db.source``); one is registered:

``panglaodb``  PanglaoDB (Franzén, Gan & Björkegren, *Database* 2019, baz046), the marker
               table of 27 Mar 2020: 8,286 rows, 178 cell types of 29 organs, human and mouse
               (``species`` ``Hs``/``Mm``), a canonical-marker flag and per-species sensitivity
               and specificity. Public download, no registration:
               https://panglaodb.se/markers/PanglaoDB_markers_27_Mar_2020.tsv.gz. Licence: the
               site states none; it is offered for free use with citation of the paper
               (OmniPath's resource list classes it "informal", free for any use). Chosen over
               CellMarker 2.0 (larger, with CL ids, but an ``.xlsx`` from a site without a
               stated licence and many single-paper entries) and MSigDB C8 (CC BY 4.0, but
               signatures of a few dozen studies under study-specific names).

How it is used, once per run (:func:`load_marker_db`):

1. the file is read from ``annotate.marker_db.path`` (a local path or a bucket URL, through
   :func:`raypipe.core.storage.local_copy`) or from the user cache, where ``raypipe markers
   fetch`` puts it; a missing or malformed file is one :class:`~raypipe.errors.InputError`
   naming the file and the fix;
2. rows of other species than ``genes.species`` are dropped;
3. each (cell type, organ) is mapped to a CL term **once** with the label mapper, the organ as
   its tissue; the mapping (how, confidence) is cached beside the file's copy in the user cache
   and written to ``annotations/marker_db_mapping.parquet`` by the run; cell types mapped with
   confidence under ``annotate.marker_db.min_confidence`` are not used;
4. a candidate's markers (:meth:`MarkerDB.markers_for`) are the genes of the resource cell
   types mapped to its term (weight 1 for canonical markers, 0.5 for the others, times one
   minus the share of other cell types expressing the gene; genes in at least 10% of all cells
   dropped), else those
   of its descendants (weighted by the share of them naming each gene; genes a quarter of them
   name, for terms with at most 25 such descendants), else those of a close ancestor (half
   weight); names go through the gene-alias table like every other marker.

:func:`resource_markers` is the plain entry point for other stages: ``CL id → {gene: weight}``
for one species (positive weights; a negative weight would be a negative marker).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from raypipe.annotate.marker_sources import (
    MARKER_DBS,
    MarkerResource,
    default_path,
    gene_weight,
    read_marker_file,
)
from raypipe.core.storage import local_copy, user_cache_dir
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.annotate.mapping import LabelMapper
    from raypipe.annotate.ontology import Ontology
    from raypipe.config import JobConfig

__all__ = [
    "MARKER_DBS",
    "MarkerDB",
    "MarkerResource",
    "check_marker_db",
    "default_path",
    "fetch_markers",
    "gene_weight",
    "load_job_marker_db",
    "load_marker_db",
    "marker_db_for_job",
    "read_marker_file",
    "resource_markers",
]

log = logging.getLogger(__name__)

#: Bump when the mapping of resource cell types to CL terms changes (invalidates the cache).
MAPPING_VERSION = "marker-db-mapping-v1"
#: A term's markers from its descendants: at most this many mapped descendant cell types
#: (a broad class gets none), and genes named by at least this share of them.
_MAX_BELOW, _SHARE_BELOW = 25, 0.25


_SPECIES = {"human": "Hs", "mouse": "Mm"}


def fetch_markers(
    source: str = "panglaodb", *, url: str | None = None, dest: str | Path | None = None
) -> Path:
    """Download a marker resource into the user cache (or ``dest``) and check it.

    Parameters
    ----------
    source
        Registry name (``panglaodb``).
    url
        Download from here instead of the resource's public home (a mirror, a test server).
    dest
        Target file; default :func:`default_path`.

    Returns
    -------
    pathlib.Path
        The file, written whole or not at all (a temporary name, checked by reading it, then
        renamed); a ``.source.json`` beside it records the URL and sha256.
    """
    res = MARKER_DBS.get(source)
    target = Path(dest).expanduser() if dest else default_path(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{uuid.uuid4().hex[:8]}.{target.name}")  # same suffix: .gz
    src = url or res.url
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(src, timeout=120) as resp, tmp.open("wb") as fh:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        read_marker_file(tmp, source)  # a page of HTML or a cut file never replaces a good copy
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"could not download the {source} marker resource from {src}: {exc}",
            fix="check the network (or pass --url for a mirror), or download the file by hand "
            "and set annotate.marker_db.path to it",
        ) from None
    except InputError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"the file downloaded from {src} is not a {source} marker table: {exc.message}",
            fix="check the URL (--url), or download the file by hand and set "
            "annotate.marker_db.path to it",
        ) from None
    os.replace(tmp, target)
    meta = {"source": source, "url": src, "sha256": digest.hexdigest(), "licence": res.licence}
    target.with_name(target.name + ".source.json").write_text(json.dumps(meta, indent=2))
    return target


@dataclass
class MarkerDB:
    """A resource's rows for one species, and its cell types mapped to CL terms.

    Attributes
    ----------
    source
        Registry name.
    rows
        ``cell_type, organ, gene, canonical, ubiquity, spread`` of this species (``spread``:
        the share of other cell types expressing the gene, NaN when unknown).
    mapping
        One row per (cell type, organ): ``cl_id, cl_label, how, confidence, detail, used``.
    ontology
        The Cell Ontology the mapping refers to.
    """

    source: str
    rows: pd.DataFrame
    mapping: pd.DataFrame
    ontology: Ontology
    _by_term: dict[str, dict[str, tuple[float, str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        used = self.mapping[self.mapping["used"]]
        key = {(r.cell_type, r.organ): r.cl_id for r in used.itertuples(index=False)}
        for r in self.rows.itertuples(index=False):
            tid = key.get((r.cell_type, r.organ))
            if tid is None:
                continue
            genes = self._by_term.setdefault(tid, {})
            w = gene_weight(r.canonical, r.spread, r.ubiquity)
            if w <= 0:
                continue
            if w > genes.get(r.gene, (0.0, ""))[0]:
                genes[r.gene] = (w, str(r.cell_type))

    def describe(self) -> dict[str, Any]:
        """Return counts for logs and the summary: rows, cell types, mapped and used."""
        return {
            "source": self.source,
            "rows": len(self.rows),
            "cell_types": int(self.mapping.shape[0]),
            "mapped": int(self.mapping["cl_id"].notna().sum()),
            "used": int(self.mapping["used"].sum()),
        }

    @property
    def terms(self) -> set[str]:
        """CL ids some resource cell type maps to."""
        return set(self._by_term)

    def markers_for(self, term_id: str) -> dict[str, tuple[float, str]]:
        """``gene → (weight, resource cell type)`` for a CL term (see the module docstring)."""
        if term_id in self._by_term:
            return dict(self._by_term[term_id])
        below = [t for t in self.ontology.descendants(term_id) if t in self._by_term]
        if 0 < len(below) <= _MAX_BELOW:
            out: dict[str, tuple[float, str]] = {}
            counts: dict[str, int] = {}
            for t in below:
                for g, (w, name) in self._by_term[t].items():
                    counts[g] = counts.get(g, 0) + 1
                    if w > out.get(g, (0.0, ""))[0]:
                        out[g] = (w, name)
            return {
                g: (w * counts[g] / len(below), n)
                for g, (w, n) in out.items()
                if counts[g] >= _SHARE_BELOW * len(below)
            }
        term = self.ontology.terms.get(term_id)
        if term is None:
            return {}
        depth = len(term.ancestors)
        for anc in term.ancestors:  # nearest first (the ontology lists them by distance)
            a = self.ontology.terms.get(anc)
            if a is None or depth - len(a.ancestors) > 3:
                continue
            if anc in self._by_term:
                return {g: (0.5 * w, n) for g, (w, n) in self._by_term[anc].items()}
        return {}


def _map_cell_types(rows: pd.DataFrame, mapper: LabelMapper, min_confidence: float) -> pd.DataFrame:
    from raypipe.annotate.anatomy import load_anatomy

    anatomy = load_anatomy()
    out = []
    for (cell_type, organ), _ in rows.groupby(["cell_type", "organ"], sort=True):
        tissue = organ if organ and anatomy.tissue(organ) is not None else None
        m = mapper.map(str(cell_type), tissue=tissue)
        out.append(
            {
                "cell_type": cell_type,
                "organ": organ,
                "cl_id": m.cl_id,
                "cl_label": m.cl_label,
                "how": m.how,
                "confidence": float(m.confidence),
                "detail": m.detail,
                "used": m.cl_id is not None and m.confidence >= min_confidence,
            }
        )
    return pd.DataFrame(out)


def load_marker_db(
    path: str | None,
    mapper: LabelMapper,
    *,
    source: str = "panglaodb",
    species: str = "human",
    canonical_only: bool = False,
    min_confidence: float = 0.8,
) -> MarkerDB:
    """Read a resource, keep one species, map its cell types to CL terms (cached).

    Parameters
    ----------
    path
        A local path or bucket URL; None: the user-cache copy (:func:`default_path`).
    mapper
        The label mapper (its ontology, gene knowledge and species).
    source, species, canonical_only, min_confidence
        As ``annotate.marker_db`` / ``genes.species``.
    """
    local = _local(path, source)
    rows = read_marker_file(local, source)
    tag = _SPECIES.get(species, species)
    rows = rows[rows["species"].map(lambda s: tag in s)]
    if canonical_only:
        rows = rows[rows["canonical"]]
    spread = f"spread_{species}" if f"spread_{species}" in rows.columns else None
    rows = rows.assign(spread=rows[spread] if spread else float("nan"))
    rows = rows.drop(columns=["species", "spread_human", "spread_mouse"], errors="ignore")
    rows = rows.reset_index(drop=True)
    digest = _file_digest(local)
    key = hashlib.sha256(
        json.dumps([MAPPING_VERSION, digest, mapper.ontology.source, species]).encode()
    ).hexdigest()[:16]
    cache = user_cache_dir() / "markers" / f"{source}-mapping-{key}.parquet"
    mapping: pd.DataFrame | None = None
    if cache.is_file():
        mapping = pd.read_parquet(cache)
    if mapping is None or set(mapping["cell_type"]) != set(rows["cell_type"]):
        mapping = _map_cell_types(rows, mapper, 0.0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}.tmp")
        mapping.to_parquet(tmp, index=False)
        os.replace(tmp, cache)
    mapping = mapping.assign(
        used=mapping["cl_id"].notna() & (mapping["confidence"] >= min_confidence)
    )
    return MarkerDB(source, rows, mapping, mapper.ontology)


def _local(path: str | None, source: str) -> Path:
    """Return the resource file on this machine: a local path, a bucket URL's copy, the cache's."""
    if not path:
        return default_path(source)
    try:
        return local_copy(path)
    except FileNotFoundError:
        raise InputError(
            f"marker resource {path} not found",
            fix="check annotate.marker_db.path, or leave it empty to use the copy "
            "`raypipe markers fetch` keeps in the user cache",
        ) from None


@functools.lru_cache(maxsize=4)
def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resource_markers(
    species: str = "human",
    *,
    path: str | None = None,
    source: str = "panglaodb",
    ontology: Ontology | None = None,
    genes: Any = None,
    canonical_only: bool = False,
    min_confidence: float = 0.8,
) -> dict[str, dict[str, float]]:
    """Marker genes of every CL term the resource covers, for one species.

    Parameters
    ----------
    species
        ``human`` or ``mouse``.
    path
        The resource file (local path or bucket URL); None: the user-cache copy.
    source
        Registry name (``panglaodb``).
    ontology
        The Cell Ontology (default: cellxgene-ontology-guide's).
    genes
        :class:`~raypipe.annotate.names.GeneNames` to rewrite names as official symbols
        (``CD16`` → ``FCGR3A``, ``FCGR3B``; weight split); None keeps the resource's names.
    canonical_only, min_confidence
        As ``annotate.marker_db``.

    Returns
    -------
    dict
        ``CL id → {gene: weight}`` (:func:`gene_weight`: 1 for a canonical marker, 0.5 for
        another, less the more other cell types express it); a negative weight would mark a
        gene stated absent (PanglaoDB states none).
    """
    from raypipe.annotate.mapping import LabelMapper
    from raypipe.annotate.ontology import load_ontology

    onto = ontology or load_ontology()
    db = load_marker_db(
        path,
        LabelMapper(onto, genes=genes, species=species),
        source=source,
        species=species,
        canonical_only=canonical_only,
        min_confidence=min_confidence,
    )
    out: dict[str, dict[str, float]] = {}
    for tid in sorted(db.terms):
        genes_w: dict[str, float] = {}
        for g, (w, _) in db.markers_for(tid).items():
            names = genes.symbols(g) if genes is not None else [g]
            for s in names or [g]:
                genes_w[s] = max(genes_w.get(s, 0.0), w / max(len(names), 1))
        out[tid] = genes_w
    return out


def check_marker_db(job: JobConfig) -> None:
    """Read the run's marker resource once before any work (raises :class:`InputError`)."""
    cfg = job.annotate.marker_db
    read_marker_file(_local(cfg.path, cfg.source), cfg.source)


def load_job_marker_db(job: JobConfig, mapper: LabelMapper) -> MarkerDB:
    """:func:`load_marker_db` with the run's ``annotate.marker_db`` and ``genes.species``."""
    cfg = job.annotate.marker_db
    return load_marker_db(
        cfg.path,
        mapper,
        source=cfg.source,
        species=job.genes.species,
        canonical_only=cfg.canonical_only,
        min_confidence=cfg.min_confidence,
    )


def marker_db_for_job(job: JobConfig, mapper: LabelMapper, out_dir: Any) -> MarkerDB | None:
    """Load the run's marker resource (``annotate.marker_db``), its mapping written for review.

    Returns None when ``annotate.marker_db.enabled`` is off; otherwise writes
    ``annotations/marker_db_mapping.parquet`` (every resource cell type: CL term, how,
    confidence, used) under ``out_dir`` and logs the counts.
    """
    import pyarrow as pa

    from raypipe.core.outputs import write_parquet_atomic

    if not job.annotate.marker_db.enabled:
        return None
    db = load_job_marker_db(job, mapper)
    table = pa.Table.from_pandas(db.mapping.assign(source=db.source), preserve_index=False)
    write_parquet_atomic(out_dir / "annotations" / "marker_db_mapping.parquet", table)
    n = db.describe()
    log.info(
        "marker resource %s: %d rows, %d cell types, %d mapped to CL terms, %d used (confidence "
        ">= %.2f; annotations/marker_db_mapping.parquet)",
        n["source"],
        n["rows"],
        n["cell_types"],
        n["mapped"],
        n["used"],
        job.annotate.marker_db.min_confidence,
    )
    return db
