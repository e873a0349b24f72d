"""The candidate table: which cell types a cell may be, their text and their marker genes.

One row per candidate, columns:

``label``            the name as given (config entry or a value of the label column)
``cl_id``            matched CL id, or None when nothing matched
``cl_label``         the CL term label, or None
``match_kind``       id / label / synonym / curated / unmatched
``definition``       the CL definition ("" when unmatched)
``text``             LangCell-style ``"<cl_label>: <definition>"`` (+ description, + markers)
``markers``          official gene symbols (config/LLM markers first, then genes named in the
                     CL label/definition after alias resolution)
``missing_markers``  marker names that did not resolve to an atlas gene
``marker_source``    config / llm / ontology / none

The lead writes it to ``annotations/label_mapping.parquet``; unmatched candidates stay in it
(text = the name itself) and are listed by :func:`unmatched` and in a logged warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import pandas as pd

from raypipe.annotate.ontology import Ontology

__all__ = [
    "CANDIDATE_COLUMNS",
    "Resolver",
    "build_candidates",
    "candidate_text",
    "candidates_from_labels",
    "extract_marker_tokens",
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
    "definition",
    "text",
    "markers",
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


def _resolve(names: Sequence[str], resolver: Resolver | None) -> tuple[list[str], list[str]]:
    if resolver is None:
        return list(dict.fromkeys(names)), []
    found: list[str] = []
    missing: list[str] = []
    for name in names:
        hit = resolver(name)
        hits = [hit] if isinstance(hit, str) else list(hit or [])
        if hits:
            found.extend(h for h in hits if h not in found)
        else:
            missing.append(name)
    return found, missing


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

    Returns
    -------
    pandas.DataFrame
        One row per distinct name, columns :data:`CANDIDATE_COLUMNS`.
    """
    descriptions = descriptions or {}
    markers = markers or {}
    llm_markers = llm_markers or {}
    known = None
    if resolver is not None:

        def known(tok: str) -> bool:
            return bool(resolver(tok))

    rows = []
    for name in dict.fromkeys(str(n) for n in names):
        match = ontology.best(name)
        if match is None:
            cl_id = cl_label = None
            kind, definition, title = "unmatched", "", name
        else:
            cl_id, cl_label, kind = match.term.id, match.term.label, match.kind
            definition, title = match.term.description, match.term.label
        if markers.get(name):
            raw, source = list(markers[name]), "config"
        elif llm_markers.get(name):
            raw, source = list(llm_markers[name]), "llm"
        else:
            raw = extract_marker_tokens(f"{title}. {definition}", known=known)
            source = "ontology" if raw else "none"
        found, missing = _resolve(raw, resolver)
        text = candidate_text(
            title,
            definition,
            description=descriptions.get(name),
            markers=found if markers_in_text else (),
        )
        rows.append(
            {
                "label": name,
                "cl_id": cl_id,
                "cl_label": cl_label,
                "match_kind": kind,
                "definition": definition,
                "text": text,
                "markers": found,
                "missing_markers": missing,
                "marker_source": source,
            }
        )
    table = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    lost = unmatched(table)
    if lost:
        log.warning(
            "%d candidate(s) match no Cell Ontology term (%s): %s; they are scored on their "
            "name alone. Fix: use a CL label/synonym or id (see label_mapping.parquet).",
            len(lost),
            ontology.source,
            ", ".join(lost),
        )
    return table


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
