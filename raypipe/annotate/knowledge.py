"""Offline marker knowledge for Cell Ontology terms, and cluster naming from it.

:func:`marker_knowledge` is the one place that gathers what raypipe knows offline about which
genes mark which Cell Ontology terms (extend it there, e.g. with a curated marker resource):

* term → expected genes: ``annotate.markers`` and ``annotate.discover.marker_table`` (names
  mapped to CL terms), the curated marker resource when ``annotate.marker_db.enabled``
  (:mod:`raypipe.annotate.marker_db`), and the markers the Cell Ontology states or implies for each term
  (:func:`raypipe.annotate.markers.ontology_markers`; aliases under 3 characters such as
  ``L5``, ``S2`` are not taken for genes);
* gene → mentioned terms: the Cell Ontology labels and exact synonyms that a marker gene's own
  text names (``genes.text_source``: GO process names such as "B cell activation",
  "natural killer cell mediated cytotoxicity"), each gene's mentions sharing a weight of 1.

:func:`name_offline` names each cluster from its ranked markers (:func:`score_terms`: the
enrichment of each term's genes, its descendants' included, among the cluster's top markers),
or leaves it ``unassigned``: never a made-up name. Broad classes (:data:`BROAD_CLASSES`) are
never names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.annotate.ontology import BROAD_CLASSES
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.annotate.mapping import LabelMapper
    from raypipe.annotate.ontology import Ontology
    from raypipe.config import JobConfig
    from raypipe.genes.space import GeneSpace

__all__ = [
    "MarkerKnowledge",
    "gene_resolver",
    "marker_knowledge",
    "name_offline",
    "score_terms",
    "text_mentions",
]

_TOP = 50  # cluster markers the offline scorer reads
_W_MENTIONED = 0.5  # a text mention counts half an expected marker (measured: docs/discovery.md)


def gene_resolver(genes: GeneSpace) -> Callable[[str], list[str]]:
    """Marker name → atlas symbols: official symbol, else alias (e.g. CD16 → FCGR3A, FCGR3B)."""
    symbols = {s for s in genes.resolution.symbols if s}
    table = genes.table

    def resolve(name: str) -> list[str]:
        if name in symbols:
            return [name]
        if table is None:
            return []
        official = table.lookup_symbol(name)
        hits = [official] if official else list(table.lookup_alias(name))
        return [h for h in hits if h in symbols]

    return resolve


@dataclass
class MarkerKnowledge:
    """What raypipe knows offline about which genes mark which Cell Ontology terms.

    Attributes
    ----------
    term_genes
        CL id → atlas gene → weight (the term expects the gene).
    gene_terms
        Atlas gene → CL id → share of the gene's text mentions naming the term (sums to 1).
    """

    term_genes: dict[str, dict[str, float]] = field(default_factory=dict)
    gene_terms: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, term: str, gene: str, weight: float) -> None:
        """Record that ``term`` expects ``gene`` (the highest weight wins)."""
        genes = self.term_genes.setdefault(term, {})
        if weight > genes.get(gene, 0.0):
            genes[gene] = weight

    @property
    def genes(self) -> set[str]:
        """Every atlas gene the knowledge names."""
        out = set(self.gene_terms)
        for g in self.term_genes.values():
            out |= set(g)
        return out


def _read_marker_table(path: str) -> pd.DataFrame:
    from raypipe.core.storage import local_copy

    local = local_copy(path)
    name = str(path).lower()
    try:
        if name.endswith(".parquet"):
            df = pd.read_parquet(local)
        else:
            df = pd.read_csv(local, sep="\t" if ".tsv" in name else ",")
    except (OSError, ValueError) as exc:
        raise InputError(f"marker table {path} cannot be read: {exc}") from None
    cols = {c.lower(): c for c in df.columns}
    if "cell_type" not in cols or "gene" not in cols:
        raise InputError(
            f"marker table {path} needs columns cell_type and gene; it has {list(df.columns)}",
            fix="one row per (cell_type, gene); cell_type a name or CL id, optional weight",
        )
    out = pd.DataFrame(
        {
            "cell_type": df[cols["cell_type"]].astype(str),
            "gene": df[cols["gene"]].astype(str),
            "weight": df[cols["weight"]].astype(float) if "weight" in cols else 1.0,
        }
    )
    return out


#: A cell type named just before one of these words is the target of the process ("neutrophil
#: chemotaxis" is what a chemokine does to neutrophils), not the cell expressing the gene.
_TARGETED = {"chemotaxis", "migration", "extravasation", "recruitment", "aggregation"}


def text_mentions(
    texts: Mapping[str, str], ontology: Ontology, *, skip: Iterable[str] = ()
) -> dict[str, dict[str, float]]:
    """Cell Ontology terms each gene's text names (labels and exact synonyms, longest first).

    Parameters
    ----------
    texts
        Gene symbol → its text (e.g. full name and GO process names).
    ontology
        The Cell Ontology.
    skip
        Term ids never counted (broad classes).

    Returns
    -------
    dict
        Gene → CL id → share of the gene's mentions (shares sum to 1; genes naming no term
        are absent). A phrase naming several terms is left out, and so is a term named just
        before "chemotaxis", "migration", … (the target of the process, not the expressing cell).
    """
    from raypipe.annotate.ontology import normalise

    skipped = set(skip)
    phrases: dict[tuple[str, ...], set[str]] = {}
    for term in ontology.live():
        if term.id in skipped:
            continue
        for text in (term.label, *term.synonyms):
            key = tuple(normalise(text).split())
            if key:
                phrases.setdefault(key, set()).add(term.id)
    lengths: dict[str, list[int]] = {}  # first word → phrase lengths, longest first
    for key in phrases:
        lengths.setdefault(key[0], []).append(len(key))
    lengths = {w: sorted(set(ns), reverse=True) for w, ns in lengths.items()}
    out: dict[str, dict[str, float]] = {}
    for gene, text in texts.items():
        words = normalise(str(text)).split()
        counts: dict[str, float] = {}
        i = 0
        while i < len(words):
            step = 1
            for n in lengths.get(words[i], ()):
                hit = phrases.get(tuple(words[i : i + n]))
                if hit is not None:
                    nxt = words[i + n] if i + n < len(words) else ""
                    if len(hit) == 1 and nxt not in _TARGETED:
                        tid = next(iter(hit))
                        counts[tid] = counts.get(tid, 0.0) + 1.0
                    step = n
                    break
            i += step
        total = sum(counts.values())
        if total:
            out[gene] = {t: c / total for t, c in counts.items()}
    return out


def _resolve_marker(name: str, resolve: Callable[[str], list[str]]) -> list[str]:
    """Atlas genes of a marker name; an alias of under 3 characters (``L5``, ``S2``) is no gene."""
    hits = resolve(name)
    if len(name) < 3 and hits != [name]:
        return []
    return hits


def marker_knowledge(
    job: JobConfig,
    ontology: Ontology,
    mapper: LabelMapper,
    resolve: Callable[[str], list[str]],
    *,
    gene_texts: Mapping[str, str] | None = None,
) -> MarkerKnowledge:
    """Gather every offline marker source for Cell Ontology terms (the one place to extend).

    Parameters
    ----------
    job
        The job (``annotate.markers``, ``annotate.marker_db``, ``annotate.ontology_markers``,
        ``annotate.discover.marker_table``, ``annotate.discover.gene_text_knowledge``).
    ontology
        The Cell Ontology.
    mapper
        Maps the names of ``annotate.markers`` / the marker table to CL terms, and knows the
        ontology's stated and implied markers.
    resolve
        Marker name → atlas gene symbols (aliases resolved; empty when not in the atlas).
    gene_texts
        Atlas gene symbol → its text (for the text mentions); None skips them.

    Returns
    -------
    MarkerKnowledge
    """
    from raypipe.annotate.markers import ontology_markers

    know = MarkerKnowledge()
    lost: dict[str, list[str]] = {}

    def add_named(name: str, genes: Iterable[tuple[str, float]], where: str) -> None:
        term = mapper.map(name).cl_id
        if term is None:
            lost.setdefault(where, []).append(name)
            return
        for g, w in genes:
            for hit in _resolve_marker(g, resolve):
                know.add(term, hit, float(w))

    for name, genes in job.annotate.markers.items():
        add_named(name, ((g, 1.0) for g in genes), "annotate.markers")
    table = job.annotate.discover.marker_table
    if table:
        df = _read_marker_table(table)
        for name, rows in df.groupby("cell_type", sort=True):
            add_named(str(name), zip(rows["gene"], rows["weight"], strict=True), str(table))
    if lost:
        raise InputError(
            "marker knowledge names cell types that match no Cell Ontology term: "
            + "; ".join(f"{where}: {', '.join(names)}" for where, names in lost.items()),
            fix="write them as CL ids (CL:0000236) or CL labels, or map them with "
            "annotate.mapping {name: CL id}",
        )
    if job.annotate.marker_db.enabled:  # the curated marker resource, mapped to CL once
        from raypipe.annotate.marker_db import load_job_marker_db

        db = load_job_marker_db(job, mapper)
        for tid in sorted(db.terms):
            if tid in BROAD_CLASSES:
                continue
            for g, (w, _name) in db.markers_for(tid).items():
                hits = _resolve_marker(g, resolve)
                for hit in hits:
                    know.add(tid, hit, w / len(hits))
    if job.annotate.ontology_markers:
        for term in ontology.live():
            if term.id in BROAD_CLASSES:
                continue
            found = ontology_markers(mapper, term.id)
            for g, w in zip(found.names, found.weights, strict=True):
                hits = _resolve_marker(g, resolve)
                for hit in hits:
                    know.add(term.id, hit, w / len(hits))
    if gene_texts and job.annotate.discover.gene_text_knowledge:
        know.gene_terms = text_mentions(gene_texts, ontology, skip=BROAD_CLASSES)
    return know


def _term_sets(pairs: Mapping[str, Iterable[str]], ontology: Ontology) -> dict[str, set[str]]:
    """Term → genes of the term or any of its descendants (the true-path rule)."""
    out: dict[str, set[str]] = {}
    for term, genes in pairs.items():
        found = ontology.terms.get(term)
        if found is None:
            continue
        for t in (term, *found.ancestors):
            out.setdefault(t, set()).update(genes)
    return out


def score_terms(
    ranked: Sequence[Sequence[str]],
    know: MarkerKnowledge,
    ontology: Ontology,
    *,
    top: int = _TOP,
) -> list[pd.DataFrame]:
    """Enrichment of every term's genes among each cluster's top markers.

    Per source (``expected``: the genes terms expect; ``mentioned``: the genes whose text names
    them), each term's gene set holds its own and its descendants' genes; among the genes the
    source knows (the universe), a hypergeometric test asks whether the cluster's top
    ``top`` markers hold more of the set than chance. ``support`` is the sum over sources of
    ``−log10 p`` (a term no marker hits scores 0 in that source), the ``mentioned`` source
    counting half.

    Parameters
    ----------
    ranked
        Per cluster, its up-regulated markers, best first.
    know
        The marker knowledge.
    ontology
        The Cell Ontology (the hierarchy).
    top
        Markers read per cluster.

    Returns
    -------
    list of pandas.DataFrame
        Per cluster: ``cl_id, support, expected, mentioned, n_genes, evidence`` sorted by
        support (highest first); ``evidence`` the hit genes, best-ranked first.
    """
    from scipy.stats import hypergeom

    sources = {
        "expected": _term_sets(know.term_genes, ontology),
        "mentioned": _term_sets(_by_term(know.gene_terms), ontology),
    }
    universes = {
        name: set().union(*sets.values()) if sets else set() for name, sets in sources.items()
    }
    out = []
    for genes in ranked:
        top_genes = list(dict.fromkeys(genes))[:top]
        rank = {g: r for r, g in enumerate(top_genes)}
        logp: dict[str, dict[str, float]] = {}
        hits_of: dict[str, set[str]] = {}
        for name, sets in sources.items():
            universe = universes[name]
            drawn = [g for g in top_genes if g in universe]
            got: dict[str, float] = {}
            for term, members in sets.items():
                hits = members.intersection(drawn)
                if not hits:
                    continue
                p = float(hypergeom.sf(len(hits) - 1, len(universe), len(members), len(drawn)))
                got[term] = -np.log10(max(p, 1e-300))
                hits_of.setdefault(term, set()).update(hits)
            logp[name] = got
        ids = sorted(hits_of)
        df = pd.DataFrame(
            {
                "cl_id": ids,
                "expected": [logp["expected"].get(t, 0.0) for t in ids],
                "mentioned": [logp["mentioned"].get(t, 0.0) for t in ids],
                "n_genes": [len(hits_of[t]) for t in ids],
                "evidence": [sorted(hits_of[t], key=rank.__getitem__) for t in ids],
            }
        )
        df["support"] = df["expected"] + _W_MENTIONED * df["mentioned"]
        cols = ["cl_id", "support", "expected", "mentioned", "n_genes", "evidence"]
        out.append(
            df.sort_values(["support", "cl_id"], ascending=[False, True]).reset_index(drop=True)[
                cols
            ]
        )
    return out


def _by_term(gene_terms: Mapping[str, Mapping[str, float]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for g, terms in gene_terms.items():
        for t in terms:
            out.setdefault(t, set()).add(g)
    return out


def name_offline(
    ranked: Sequence[Sequence[str]],
    know: MarkerKnowledge,
    ontology: Ontology,
    *,
    min_support: float,
    min_genes: int = 1,
    specific: float = 1.0,
) -> list[dict[str, Any]]:
    """Name each cluster from marker knowledge, or leave it ``unassigned``.

    Only terms that at least ``min_genes`` of the cluster's markers support may name it (a
    term known by a handful of genes reaches a high enrichment on two chance hits). Among
    them the best-supported non-broad term (:func:`score_terms`) wins; then the deepest term under
    it that keeps at least ``specific`` of its support (and at least two supporting genes) is
    preferred (the default 1.0: only an equally supported descendant; lower values name more
    specific terms and, measured on Kang, earn less ``cl_lineage``). A cluster whose best
    support is under ``min_support`` (−log10 p, summed over the sources) is ``unassigned``.

    Parameters
    ----------
    ranked
        Per cluster, its up-regulated marker genes, best first.
    know
        The marker knowledge (:func:`marker_knowledge`).
    ontology
        The Cell Ontology (for the term hierarchy).
    min_support
        Least support for a name.
    min_genes
        Least number of the cluster's marker genes supporting a name.
    specific
        Share of the best support a more specific term must keep to be preferred.

    Returns
    -------
    list of dict
        Per cluster: ``cl_id`` (None when unassigned), ``support``, ``evidence`` (genes),
        ``runner_up`` (the best term outside the chosen one's lineage) and ``why``.
    """
    out: list[dict[str, Any]] = []
    for table in score_terms(ranked, know, ontology):
        table = table[~table["cl_id"].isin(BROAD_CLASSES)]
        if table.empty:
            out.append(
                {
                    "cl_id": None,
                    "support": 0.0,
                    "evidence": [],
                    "runner_up": "",
                    "why": "no marker gene of this cluster is in the marker knowledge",
                }
            )
            continue
        few = table[table["n_genes"] < min_genes]
        table = table[table["n_genes"] >= min_genes]
        if table.empty:
            first = few.iloc[0]
            out.append(
                {
                    "cl_id": None,
                    "support": round(float(first["support"]), 3),
                    "evidence": list(first["evidence"]),
                    "runner_up": "",
                    "why": f"best term {first['cl_id']} is supported by {int(first['n_genes'])} "
                    f"marker gene(s) < annotate.discover.min_marker_genes {min_genes}",
                }
            )
            continue
        support = dict(zip(table["cl_id"], table["support"], strict=True))
        n_genes = dict(zip(table["cl_id"], table["n_genes"], strict=True))
        evidence = dict(zip(table["cl_id"], table["evidence"], strict=True))
        top = str(table["cl_id"].iloc[0])
        lineage = {top} | ontology.descendants(top)
        keep = [
            t
            for t in lineage
            if support.get(t, 0.0) >= specific * support[top]
            and n_genes.get(t, 0) >= max(2, min_genes)
        ] or [top]
        best = max(keep, key=lambda t: (len(ontology.terms[t].ancestors), support[t], t))
        above = set(ontology.terms[top].ancestors)
        others = [t for t in table["cl_id"] if t not in lineage and t not in above]
        runner = f"{others[0]} ({support[others[0]]:.1f})" if others else ""
        ok = support[top] >= min_support
        out.append(
            {
                "cl_id": best if ok else None,
                "support": round(float(support[best]), 3),
                "evidence": list(evidence[best]),
                "runner_up": runner,
                "why": ""
                if ok
                else f"best term {top} has support {support[top]:.1f} < "
                f"annotate.discover.min_support {min_support}",
            }
        )
    return out
