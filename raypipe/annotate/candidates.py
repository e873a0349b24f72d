"""The candidate table: which cell types a cell may be, their text and their marker genes.

One row per candidate, columns:

``label``            the name as given (config entry or a value of the label column)
``cl_id``            matched CL id, or None when nothing matched
``cl_label``         the CL term label, or None
``match_kind``       how it was found (:mod:`raypipe.annotate.mapping`: config, id, label,
                     synonym, parsed, parsed_partial, markers_only, embedding, unmatched)
``confidence``       0–1
``match_detail``     the term text matched, or why nothing matched
``definition``       the CL definition ("" when unmatched)
``text``             LangCell-style ``"<cl_label>: <definition>"`` (+ description, + markers)
``markers``          atlas gene symbols: positive markers, highest weight first, then negative
                     ones (:mod:`raypipe.annotate.markers`)
``marker_weights``   their weights after the specificity division; **negative** for a marker
                     stated absent (``CD3E-`` in config, "lacks CD3" in a CL definition)
``marker_sources``   per marker: config / llm / marker_db:<resource> (<its cell type>) /
                     ontology:term / ontology:definition/ancestors / ontology:descendants /
                     ontology:negated (+ the name it was written as, e.g. ``(CD16)``)
``missing_markers``  marker names that did not resolve to an atlas gene
``marker_source``    where the candidate's positive markers came from, the most trusted source
                     that has any: config / llm / marker_db / ontology / none

The lead writes it to ``annotations/label_mapping.parquet``; unmatched candidates stay in it
(text = the name itself) and are listed by :func:`unmatched` and in a logged warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from raypipe.annotate.mapping import LabelMapper, LabelMapping
from raypipe.annotate.markers import MarkerSet, ontology_markers, specificity_weights
from raypipe.annotate.names import parse_name
from raypipe.annotate.ontology import Ontology

if TYPE_CHECKING:
    from raypipe.annotate.marker_db import MarkerDB

__all__ = [
    "CANDIDATE_COLUMNS",
    "Resolver",
    "build_candidates",
    "candidate_text",
    "candidates_from_labels",
    "extract_marker_tokens",
    "marker_source_counts",
    "resolver_from_aliases",
    "unmatched",
]

log = logging.getLogger(__name__)

#: alias → official symbol(s); None (or empty) when the name is not a known gene.
Resolver = Callable[[str], "str | Sequence[str] | None"]

CANDIDATE_COLUMNS = [
    "label",
    "cl_id",
    "cl_label",
    "match_kind",
    "confidence",
    "match_detail",
    "definition",
    "text",
    "markers",
    "marker_weights",
    "marker_sources",
    "missing_markers",
    "marker_source",
]

_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])([A-Z][A-Za-z0-9]*\d[A-Za-z0-9]*|[A-Z]{3,}[A-Z0-9]*)(?![A-Za-z0-9])"
)
_NEG_SUFFIX = re.compile(r"^(?:-negative|-low|-lo\b|-neg\b|−|-(?![A-Za-z0-9]))")
_NEG_CLAUSE = re.compile(
    r"\b(?:negative for|lacks?|lacking|does not express|do not express|low expression of|"
    r"low levels? of|low responsiveness to)\b[^.;)]*",
    re.IGNORECASE,
)


def extract_marker_tokens(text: str, *, known: Callable[[str], bool] | None = None) -> list[str]:
    """Return the gene-like tokens a text names as *positive* markers, in order.

    Parameters
    ----------
    text
        A CL label and/or definition, e.g. ``"A monocyte that expresses CD14 and is negative
        for the lineage markers CD3, CD19, and CD20."``.
    known
        Optional predicate "is this a gene name"; tokens without a digit (``GNLY``) are kept
        only when it says yes. Without it only tokens with a digit (``CD14``) are kept.

    Returns
    -------
    list of str
        Unique tokens; those followed by ``-negative``/``-low`` or inside a "negative for ..."
        clause are left out (``["CD14"]`` for the example).
    """
    negative = [m.span() for m in _NEG_CLAUSE.finditer(text)]
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group(1)
        if any(a <= m.start() < b for a, b in negative):
            continue
        if _NEG_SUFFIX.match(text[m.end() : m.end() + 10]):
            continue
        has_digit = any(c.isdigit() for c in tok)
        if not has_digit and (known is None or not known(tok)):
            continue
        if tok not in out:
            out.append(tok)
    return out


def resolver_from_aliases(
    pairs: pd.DataFrame | Iterable[tuple[str, str]], *, symbols: Iterable[str] | None = None
) -> Resolver:
    """Make a resolver from alias → symbol pairs (e.g. ``orgHs_gene_aliases.tsv.gz``).

    Parameters
    ----------
    pairs
        A DataFrame with columns ``alias`` and ``symbol``, or ``(alias, symbol)`` tuples.
    symbols
        Official symbols of the atlas genes; when given, results are restricted to them.

    Returns
    -------
    Resolver
        ``resolver("CD16") -> ["FCGR3A", "FCGR3B"]``; official symbols resolve to themselves.
    """
    if isinstance(pairs, pd.DataFrame):
        items: Iterable[tuple[str, str]] = zip(pairs["alias"], pairs["symbol"], strict=True)
    else:
        items = pairs
    table: dict[str, list[str]] = {}
    for alias, symbol in items:
        table.setdefault(str(alias).upper(), [])
        if symbol not in table[str(alias).upper()]:
            table[str(alias).upper()].append(str(symbol))
    keep = set(symbols) if symbols is not None else None

    def resolve(name: str) -> list[str]:
        key = name.upper()
        own = [key] if (keep is not None and key in keep) else []
        hits = own or table.get(key, [])
        if keep is not None:
            hits = [h for h in hits if h in keep]
        return hits

    return resolve


def candidate_text(
    name: str, definition: str, *, description: str | None = None, markers: Sequence[str] = ()
) -> str:
    """Return LangCell-style candidate text: ``"name: definition"`` (+ description, markers)."""
    parts = [f"{name}: {definition}".strip() if definition else name]
    if description:
        parts.append(description.strip())
    if markers:
        parts.append("Marker genes: " + ", ".join(markers) + ".")
    return " ".join(parts)


def build_candidates(
    names: Sequence[str],
    ontology: Ontology,
    *,
    descriptions: Mapping[str, str] | None = None,
    markers: Mapping[str, Sequence[str]] | None = None,
    llm_markers: Mapping[str, Sequence[str]] | None = None,
    resolver: Resolver | None = None,
    markers_in_text: bool = False,
    mapper: LabelMapper | None = None,
    mappings: Sequence[LabelMapping] | None = None,
    use_ontology_markers: bool = True,
    is_gene: Callable[[str], bool] | None = None,
    resource: MarkerDB | None = None,
    negatives: bool = True,
) -> pd.DataFrame:
    """Map candidate names (or CL ids) to CL terms and build their text and markers.

    Parameters
    ----------
    names
        Candidate names or CL ids (``annotate.candidates`` or label-column values).
    ontology
        The Cell Ontology.
    descriptions
        Optional name → extra description (e.g. LLM-written), appended to the text.
    markers
        Optional name → marker genes (``annotate.markers``); these take precedence.
    llm_markers
        Optional name → LLM-proposed marker genes (used when ``markers`` has none).
    resolver
        alias → official symbol(s) restricted to atlas genes (e.g. CD16 → FCGR3A); names it
        cannot resolve are listed in ``missing_markers``. None keeps names unchecked.
    markers_in_text
        Append the resolved markers to the candidate text.
    mapper
        The label mapper (default: one without gene knowledge or overrides).
    mappings
        Precomputed mappings, one per distinct name (e.g. with the embedding fallback).
    use_ontology_markers
        Gather markers from the ontology when neither config nor LLM gives any.
    is_gene
        "Is this a gene symbol or alias at all" (whole gene table, not only the atlas):
        ontology-derived names that are not genes (``NK1.1``, ``pre-BCR``) are dropped instead
        of being listed as missing. An alias naming several genes (``CD16`` → FCGR3A, FCGR3B)
        splits its weight among them.
    resource
        A curated marker resource (:class:`~raypipe.annotate.marker_db.MarkerDB`), trusted
        after config and LLM markers and before the ontology; the markers the term's own
        name states (``CD14-positive``) are added to the resource's.
    negatives
        Keep negative markers (config names written ``GENE-``; names and definitions of the
        term saying a marker is absent) as negative weights.

    Returns
    -------
    pandas.DataFrame
        One row per distinct name, columns :data:`CANDIDATE_COLUMNS`.
    """
    descriptions = descriptions or {}
    markers = markers or {}
    llm_markers = llm_markers or {}
    mapper = mapper or LabelMapper(ontology)
    unique = list(dict.fromkeys(str(n) for n in names))
    if mappings is None:
        mappings = [mapper.map(n) for n in unique]
    by_name = {m.label: m for m in mappings}
    rows: list[dict[str, Any]] = []
    gene_weights: list[dict[str, float]] = []
    negs: list[dict[str, float]] = []
    for name in unique:
        mp = by_name.get(name) or mapper.map(name)
        term = ontology.terms.get(mp.cl_id) if mp.cl_id else None
        definition = term.description if term is not None else ""
        title = term.label if term is not None else name
        found_set = MarkerSet()
        if markers.get(name):
            for g in markers[name]:
                found_set.add(*_signed(str(g)), "config")
        elif llm_markers.get(name):
            for g in llm_markers[name]:
                found_set.add(str(g), 1.0, "llm")
        elif term is not None and resource is not None and resource.markers_for(term.id):
            for g, (w, cell_type) in resource.markers_for(term.id).items():
                found_set.add(g, w, f"marker_db:{resource.source} ({cell_type})")
            if use_ontology_markers:  # the term's own name still says what sets it apart
                for g in sorted(mapper.stated_markers(term.id)):  # (CD14- vs CD16-positive)
                    found_set.add(g, 1.0, "ontology:term")
        elif term is not None and use_ontology_markers:
            found_set = ontology_markers(mapper, term.id)
        if term is not None and use_ontology_markers and not markers.get(name):
            for g in sorted(mapper.negated_markers(term.id)):
                found_set.add(g, -1.0, "ontology:negated")
        weights: dict[str, float] = {}
        negative: dict[str, float] = {}
        origin: dict[str, str] = {}
        neg_origin: dict[str, str] = {}
        missing: list[str] = []
        for g, w, src in zip(found_set.names, found_set.weights, found_set.sources, strict=True):
            if w < 0 and not negatives:
                continue
            hits = _resolve_one(g, resolver)
            if not hits:
                if not (src.startswith("ontology") and is_gene is not None and not is_gene(g)):
                    missing.append(g)
                continue
            share = w / len(hits)
            into, said = (negative, neg_origin) if w < 0 else (weights, origin)
            for h in hits:
                if abs(share) > abs(into.get(h, 0.0)):
                    into[h] = share
                    said[h] = f"{src} ({g})" if g.upper() != h.upper() else src
        for h in list(negative):
            if h in weights:  # stated both ways (a descendant's name): no signal
                negative.pop(h)
            else:
                origin[h] = neg_origin[h]
        negs.append(negative)
        gene_weights.append(weights)
        positive = [
            src for src, w in zip(found_set.sources, found_set.weights, strict=True) if w > 0
        ]
        source = positive[0].split(":")[0] if positive else "none"
        rows.append(
            {
                "label": name,
                "cl_id": mp.cl_id,
                "cl_label": mp.cl_label,
                "match_kind": mp.how,
                "confidence": float(mp.confidence),
                "match_detail": mp.detail,
                "definition": definition,
                "marker_source": source,
                "missing_markers": missing,
                "_origin": origin,
                "_title": title,
            }
        )
    final = specificity_weights(gene_weights)
    for row, gw, neg in zip(rows, final, negs, strict=True):
        order = sorted(gw, key=lambda g: (-gw[g], g))
        neg_order = sorted(neg, key=lambda g: (neg[g], g))
        row["markers"] = order + neg_order
        row["marker_weights"] = [round(float(gw[g]), 4) for g in order] + [
            round(float(neg[g]), 4) for g in neg_order
        ]
        row["marker_sources"] = [row["_origin"].get(g, "") for g in order + neg_order]
        row["text"] = candidate_text(
            row.pop("_title"),
            row["definition"],
            description=descriptions.get(row["label"]),
            markers=order if markers_in_text else (),
        )
        row.pop("_origin")
    table = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    lost = unmatched(table)
    if lost:
        log.warning(
            "%d candidate(s) match no Cell Ontology term (%s): %s; they are scored on their "
            "name alone. Fix: set annotate.mapping {name: CL id}, or use a CL label/synonym or "
            "id (see label_mapping.parquet).",
            len(lost),
            ontology.source,
            ", ".join(lost),
        )
    return table


def _signed(name: str) -> tuple[str, float]:
    """Split a config marker into name and sign: ``CD3E-`` (``-negative``) is absent, -1."""
    marks = parse_name(name).markers
    if len(marks) == 1 and marks[0].polarity == "negative":
        return marks[0].name, -1.0
    return name, 1.0


def marker_source_counts(table: pd.DataFrame, *, least: int = 3) -> dict[str, tuple[int, int]]:
    """Per marker source: candidates with at least ``least`` of its markers in the atlas.

    Returns
    -------
    dict
        ``source → (candidates with >= least positive atlas markers from it, candidates
        with any)``; sources are config / llm / marker_db / ontology.
    """
    out: dict[str, tuple[int, int]] = {}
    for srcs, wts in zip(table["marker_sources"], table["marker_weights"], strict=True):
        per: dict[str, int] = {}
        for src, w in zip(list(srcs), list(wts), strict=True):
            if w > 0:
                key = str(src).split(":")[0].split(" ")[0]
                per[key] = per.get(key, 0) + 1
        for key, n in per.items():
            enough, anyn = out.get(key, (0, 0))
            out[key] = (enough + (n >= least), anyn + 1)
    return dict(sorted(out.items()))


def _resolve_one(name: str, resolver: Resolver | None) -> list[str]:
    if resolver is None:
        return [name]
    hit = resolver(name)
    return [hit] if isinstance(hit, str) else list(hit or [])


def candidates_from_labels(
    labels: Iterable[object], ontology: Ontology, **kwargs: object
) -> pd.DataFrame:
    """Build candidates from the distinct non-missing label values, sorted (evaluation mode).

    Parameters
    ----------
    labels
        The label column (any iterable; NaN/None are ignored).
    ontology
        The Cell Ontology.
    **kwargs
        Passed to :func:`build_candidates`.
    """
    values = sorted({str(v) for v in pd.Series(list(labels)).dropna()})
    return build_candidates(values, ontology, **kwargs)  # type: ignore[arg-type]


def unmatched(table: pd.DataFrame) -> list[str]:
    """Return the candidate names that matched no CL term."""
    return table.loc[table["match_kind"] == "unmatched", "label"].tolist()
