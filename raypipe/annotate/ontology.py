"""The Cell Ontology (CL): load it offline and match free-text cell-type names to CL terms.

Sources, in order of preference:

* the ``cellxgene-ontology-guide`` package, which ships its CL release inside the wheel
  (``CXGSchema().ontology("CL")`` reads a bundled ``.json.zst``; no network);
* a JSON or JSON.gz file in the same layout (``{"CL:0000236": {"label": ..., "description":
  ..., "synonyms": [...], "ancestors": {...}, "deprecated": false}, ...}``), e.g.
  ``../shared/data/ontology/CL-ontology-v2026-03-26.json.gz``.

Synonym kinds: cellxgene-ontology-guide's JSON carries **exact synonyms only** (its builder
reads ``hasExactSynonym``; related/broad/narrow synonyms are not in it). A JSON file may add
``related_synonyms``, ``broad_synonyms`` and ``narrow_synonyms`` lists per term; every kind
present is used (:attr:`OntologyTerm.other_synonyms`), exact ones first.

Exact-name search (:meth:`Ontology.search`) is case- and punctuation-insensitive. Match kinds,
best first:

``id``          the query is a CL id (``CL:0000236`` or ``CL_0000236``)
``label``       the normalised query equals the normalised term label
``synonym``     ... equals a normalised exact synonym
``synonym_other`` ... equals a related/broad/narrow synonym (when the source has them)

Everything beyond exact names (marker-named labels, abbreviations, the text-embedding fallback)
is :mod:`raypipe.annotate.mapping`.

Normalisation lower-cases, writes ``+`` as ``-positive``, turns punctuation into spaces and
singularises plural words (``B cells`` → ``b cell``, ``Monocytes`` → ``monocyte``).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.core.storage import local_copy
from raypipe.errors import InputError

__all__ = [
    "BROAD_CLASSES",
    "Ontology",
    "OntologyMatch",
    "OntologyTerm",
    "load_ontology",
    "normalise",
]

#: Cell Ontology classes too broad to be a cell type: never a discovered name, and no credit in
#: ``cl_lineage`` (:mod:`raypipe.evaluate.ontology_metrics`). The one list.
BROAD_CLASSES: dict[str, str] = {
    "CL:0000000": "cell",
    "CL:0000003": "native cell",
    "CL:0002371": "somatic cell",
    "CL:0000255": "eukaryotic cell",
    "CL:0000548": "animal cell",
    "CL:0002242": "nucleate cell",
    "CL:0000226": "single nucleate cell",
    "CL:0000219": "motile cell",
    "CL:0000325": "stuff accumulating cell",
    "CL:0011115": "precursor cell",
    "CL:0011026": "progenitor cell",
    "CL:0000988": "hematopoietic cell",
    "CL:0000738": "leukocyte",
    "CL:0000842": "mononuclear leukocyte",
    "CL:0000542": "lymphocyte",
    "CL:0000763": "myeloid cell",
    "CL:0000766": "myeloid leukocyte",
    "CL:0000234": "phagocyte",
    "CL:0000518": "phagocyte (sensu Vertebrata)",
    "CL:0000145": "professional antigen presenting cell",
    "CL:0000066": "epithelial cell",
    "CL:0000499": "stromal cell",
    "CL:0002320": "connective tissue cell",
    "CL:0000034": "stem cell",
    "CL:0000723": "somatic stem cell",
    "CL:0000081": "blood cell",
    "CL:0000151": "secretory cell",
    "CL:0000183": "contractile cell",
    "CL:0000211": "electrically active cell",
    "CL:0000215": "barrier cell",
    "CL:0000393": "electrically responsive cell",
    "CL:0000404": "electrically signaling cell",
    "CL:0000473": "defensive cell",
    "CL:0000630": "supporting cell",
    "CL:0002319": "neural cell",
}


_CL_ID = re.compile(r"^CL[:_](\d{7})$", re.IGNORECASE)
_NO_SINGULAR = {"ss", "us", "is", "os"}


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and word[-2:] not in _NO_SINGULAR:
        return word[:-1]
    return word


def normalise(name: str) -> str:
    """Return the matching key of a cell-type name.

    Parameters
    ----------
    name
        Any cell-type name, e.g. ``"CD14+ Monocytes"``.

    Returns
    -------
    str
        Lower case, ``+`` → ``-positive``, punctuation → space, plural words singular:
        ``"cd14 positive monocyte"``.
    """
    import unicodedata

    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = text.strip().lower().replace("+", "-positive ")
    text = re.sub(r"[^0-9a-z]+", " ", text)
    return " ".join(_singular(w) for w in text.split())


@dataclass(frozen=True)
class OntologyTerm:
    """One Cell Ontology term."""

    id: str
    label: str
    description: str = ""
    synonyms: tuple[str, ...] = ()
    ancestors: tuple[str, ...] = ()
    deprecated: bool = False
    other_synonyms: tuple[str, ...] = ()

    def names(self) -> list[tuple[str, str]]:
        """``(text, kind)`` for the label, exact synonyms and other synonyms, in that order."""
        out = [(self.label, "label")]
        out += [(s, "synonym") for s in self.synonyms]
        out += [(s, "synonym_other") for s in self.other_synonyms]
        return out


@dataclass(frozen=True)
class OntologyMatch:
    """A query matched to a term: ``kind`` is one of id, label, synonym, synonym_other."""

    query: str
    term: OntologyTerm
    kind: str
    matched: str


@dataclass
class Ontology:
    """An in-memory Cell Ontology with name search.

    Parameters
    ----------
    terms
        CL id → term.
    source
        Where it was loaded from (for messages and provenance).
    """

    terms: dict[str, OntologyTerm]
    source: str = "(memory)"
    _labels: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _synonyms: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _other: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _children: dict[str, set[str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for tid, term in self.terms.items():
            if term.deprecated:
                continue
            self._labels.setdefault(normalise(term.label), []).append(tid)
            for syn in term.synonyms:
                self._synonyms.setdefault(normalise(syn), []).append(tid)
            for syn in term.other_synonyms:
                self._other.setdefault(normalise(syn), []).append(tid)

    @property
    def synonym_kinds(self) -> list[str]:
        """The synonym kinds this source carries (``exact`` only for cellxgene-ontology-guide)."""
        kinds = ["exact"] if any(t.synonyms for t in self.terms.values()) else []
        return kinds + (["related/broad/narrow"] if self._other else [])

    def descendants(self, term_id: str) -> set[str]:
        """Ids of the live terms below ``term_id`` (from every term's ``ancestors``)."""
        if self._children is None:
            below: dict[str, set[str]] = {}
            for tid, term in self.terms.items():
                if term.deprecated:
                    continue
                for anc in term.ancestors:
                    below.setdefault(anc, set()).add(tid)
            self._children = below
        return set(self._children.get(term_id, set()))

    def live(self) -> list[OntologyTerm]:
        """Terms that are not deprecated, in id order."""
        return [t for _, t in sorted(self.terms.items()) if not t.deprecated]

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Mapping[str, Any]], *, source: str = "(dict)"
    ) -> Ontology:
        """Build from the cellxgene-ontology-guide JSON layout (id → term fields)."""
        terms = {}
        for tid, raw in data.items():
            if not tid.startswith("CL:") or not isinstance(raw, Mapping):
                continue
            terms[tid] = OntologyTerm(
                id=tid,
                label=str(raw.get("label", tid)),
                description=str(raw.get("description") or ""),
                synonyms=tuple(raw.get("synonyms") or ()),
                ancestors=tuple(raw.get("ancestors") or ()),
                deprecated=bool(raw.get("deprecated", False)),
                other_synonyms=tuple(
                    str(x)
                    for key in ("related_synonyms", "broad_synonyms", "narrow_synonyms")
                    for x in (raw.get(key) or ())
                ),
            )
        if not terms:
            raise InputError(
                f"ontology {source} holds no CL terms",
                fix="give a Cell Ontology JSON like CL-ontology-v2026-03-26.json.gz",
            )
        return cls(terms, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> Ontology:
        """Load a CL JSON or JSON.gz file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(
                f"ontology file {path} not found",
                fix="set annotate.ontology to a CL JSON(.gz), or leave it empty to use "
                "the cellxgene-ontology-guide package",
            )
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"ontology file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_package(cls) -> Ontology:
        """Load the CL release bundled with ``cellxgene-ontology-guide`` (offline)."""
        try:
            from cellxgene_ontology_guide.supported_versions import CXGSchema
        except ImportError as exc:  # pragma: no cover - core dependency
            raise InputError(
                "cellxgene-ontology-guide is not installed",
                fix="pip install cellxgene-ontology-guide, or set annotate.ontology to a file",
            ) from exc
        schema = CXGSchema()
        data = schema.ontology("CL")
        name = schema.ontology_file_names.get("CL", "CL")
        return cls.from_dict(data, source=f"cellxgene-ontology-guide:{name}")

    def term(self, term_id: str) -> OntologyTerm:
        """Return the term with id ``term_id`` (``CL:...`` or ``CL_...``)."""
        m = _CL_ID.match(term_id.strip())
        tid = f"CL:{m.group(1)}" if m else term_id
        try:
            return self.terms[tid]
        except KeyError:
            raise InputError(
                f"{term_id!r} is not a term of the Cell Ontology ({self.source})",
                fix="check the id on https://www.ebi.ac.uk/ols4/ontologies/cl",
            ) from None

    def search(self, name: str) -> list[OntologyMatch]:
        """Find CL terms for a cell-type name, best match kind first.

        Parameters
        ----------
        name
            A name or CL id, e.g. ``"B cells"``, ``"CD14+ Monocytes"``, ``"CL:0000236"``.

        Returns
        -------
        list of OntologyMatch
            Empty when nothing matches; within a kind, ids are sorted.
        """
        if _CL_ID.match(name.strip()):
            term = self.term(name)
            return [OntologyMatch(name, term, "id", term.id)]
        key = normalise(name)
        out: list[OntologyMatch] = []
        seen: set[str] = set()

        def add(ids: list[str], kind: str) -> None:
            for tid in sorted(ids):
                if tid not in seen:
                    seen.add(tid)
                    out.append(OntologyMatch(name, self.terms[tid], kind, key))

        add(self._labels.get(key, []), "label")
        add(self._synonyms.get(key, []), "synonym")
        add(self._other.get(key, []), "synonym_other")
        return out

    def best(self, name: str) -> OntologyMatch | None:
        """Return the best match for ``name``, or None."""
        found = self.search(name)
        return found[0] if found else None

    def __len__(self) -> int:
        return len(self.terms)


def load_ontology(path: str | Path | None = None) -> Ontology:
    """Load the Cell Ontology from ``path`` or, when None, from cellxgene-ontology-guide.

    Parameters
    ----------
    path
        A CL JSON(.gz) file (``annotate.ontology``); None uses the package's bundled release.
    """
    return Ontology.from_file(local_copy(path)) if path else Ontology.from_package()
