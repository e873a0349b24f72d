"""What the label mapper knows of the Cell Ontology: its names read as words and markers.

:class:`Lexicon` parses every live term's label and synonyms once (:mod:`~raypipe.annotate.names`)
into :class:`Entry` rows, learns the abbreviations the ontology's own synonyms define, indexes
the entries by word prefix, initials, number and marker (so a label is scored against the few
hundred entries it can match, not all of them), and answers what markers a term states,
implies (its definition, its ancestors' names), gets from its descendants, or negates.

Species: a term or synonym tagged for another species (:func:`species_of`: ``(Mmus)``,
``(sensu Mus)``, ``, mouse``, ``(sensu Teleostei)`` ...) is left out for ``genes.species``.
:class:`~raypipe.annotate.mapping.LabelMapper` builds on it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from raypipe.annotate.anatomy import TissueWords, load_anatomy
from raypipe.annotate.names import (
    FILLER,
    GeneNames,
    ParsedName,
    acronym_words,
    align_abbreviation,
    extract_marker_mentions,
    normalise_word,
    parse_name,
)
from raypipe.annotate.ontology import Ontology, OntologyTerm

__all__ = ["Entry", "Lexicon", "species_of"]

log = logging.getLogger(__name__)

_EXTRA_WORD = 0.15
_SEGMENT = re.compile(r"[A-Z]+[a-z]*|[a-z]+|[0-9]+")


#: Species tags of CL labels/synonyms → the species they include (``None``: every species).
_TAXA: dict[str, frozenset[str] | None] = {
    "human": frozenset({"human"}),
    "homo sapiens": frozenset({"human"}),
    "hsap": frozenset({"human"}),
    "primate": frozenset({"human"}),
    "mouse": frozenset({"mouse"}),
    "mmus": frozenset({"mouse"}),
    "mus": frozenset({"mouse"}),
    "mus musculus": frozenset({"mouse"}),
    "rat": frozenset(),
    "zebrafish": frozenset(),
    "vertebrata": None,
    "metazoa": None,
    "animalia": None,
}


_TAG = re.compile(r"(?:\((?:sensu )?([^()]+)\)|, (human|mouse|rat|zebrafish))\s*$", re.IGNORECASE)


def species_of(text: str) -> frozenset[str] | None:
    """Return the species a CL label/synonym is restricted to by its tag (None: any).

    ``"alpha retinal ganglion cell (Mmus)"`` → {mouse}; ``"ILC1, human"`` → {human};
    ``"... (sensu Teleostei)"`` → {} (no mammal); ``"... (sensu Vertebrata)"`` → None.
    """
    m = _TAG.search(text)
    if not m:
        return None
    tag = (m.group(1) or m.group(2)).strip().lower()
    if tag in _TAXA:
        return _TAXA[tag]
    sensu = re.search(r"\(sensu ", text, re.IGNORECASE)
    return frozenset() if sensu else None


@dataclass(frozen=True)
class Entry:
    """One name (label or synonym) of a term, parsed."""

    term: OntologyTerm
    kind: str
    parsed: ParsedName
    words: frozenset[str]
    initials: tuple[tuple[str, str], ...]  # (word, its initial), filler words included


def _shared(a: str, b: str) -> int:
    """Length of the common prefix of two words."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Lexicon:
    """The Cell Ontology's names as words and markers, for one species.

    Parameters
    ----------
    ontology
        The Cell Ontology.
    genes
        Gene symbol/alias knowledge (``FCGR3A`` ~ ``CD16``); None compares marker names
        literally.
    species
        ``human`` or ``mouse``: terms and synonyms tagged for another species are left out.
    """

    def __init__(
        self, ontology: Ontology, *, genes: GeneNames | None = None, species: str = "human"
    ) -> None:
        self.ontology, self.genes, self.species = ontology, genes, species
        self._known: dict[str, set[str]] = {}
        self._anc_words: dict[str, frozenset[str]] = {}
        self._weights: dict[str, float] = {}
        self._relations: dict[tuple[str, str], str] = {}

    def _allowed(self, text: str) -> bool:
        taxa = species_of(text)
        return taxa is None or self.species in taxa

    def _is_gene(self, tok: str) -> bool:
        """Decide whether a label token is a gene name.

        Any alias when it has a digit, else an official symbol only (``GNLY`` is a marker;
        ``TEM``, ``MAIT``, ``HSPC`` stay words).
        """
        if self.genes is None:
            return False
        if any(c.isdigit() for c in tok):
            return self.genes.is_gene(tok)
        return bool(self.genes.official(tok))

    @cached_property
    def _entries(self) -> list[Entry]:
        raw = [
            (t, text, kind)
            for t in self.ontology.live()
            if self._allowed(t.label)
            for text, kind in t.names()
            if self._allowed(text)
        ]
        vocab0 = {normalise_word(w) for _, text, _ in raw for w in re.findall(r"[A-Za-z]+", text)}
        out = []
        for term, text, kind in raw:
            p = parse_name(text, vocabulary=vocab0, is_gene=self._is_gene)
            initials = tuple((w, w[0]) for w in p.all_words)
            out.append(Entry(term, kind, p, frozenset(p.words), initials))
        return out

    @cached_property
    def _index(self) -> dict[str, list[int]]:
        """Entry positions by key, to score only plausible terms.

        Keys: word prefixes (``w:mon``), initials runs (``i:dc``), numbers (``n:2``) and
        marker symbols (``m:FCGR3A``).
        """
        index: dict[str, set[int]] = {}
        for i, e in enumerate(self._entries):
            keys = {f"w:{w[:3]}" for w in e.words}
            letters = "".join(c for _, c in e.initials)
            keys |= {
                f"i:{letters[a:b]}"
                for a in range(len(letters))
                for b in range(a + 2, min(len(letters), a + 6) + 1)
            }
            keys |= {f"n:{n}" for n in e.parsed.numbers}
            for m in e.parsed.markers:
                keys |= {f"m:{x}" for x in self._symbols(m.name)}
            for key in keys:
                index.setdefault(key, set()).add(i)
        return {k: sorted(v) for k, v in index.items()}

    def _symbols(self, name: str) -> list[str]:
        if self.genes is None:
            return [name.upper()]
        return [name.upper(), *self.genes.symbols(name)]

    def _candidates(self, q: ParsedName) -> list[Entry]:
        """Return the entries a parsed label can match.

        Those sharing a word prefix, an initials run, a number or a marker with ``q`` (or an
        abbreviation's words), and, for a label with markers, the terms implying them.
        """
        keys: set[str] = set()
        for w in q.words:
            keys.add(f"w:{w[:3]}")
            keys |= {f"w:{x[:3]}" for exp in self.abbreviations.get(w, []) for x in exp}
            if w in q.acronyms:
                keys.add(f"i:{w}")
            keys.add(f"m:{w.upper()}")
        keys |= {f"n:{n}" for n in q.numbers}
        for m in q.markers:
            keys |= {f"m:{x}" for x in self._symbols(m.name)}
        index = self._index
        hits = sorted({i for k in keys for i in index.get(k, ())})
        if q.markers:  # markers a term only implies (its definition, its ancestors)
            ids = self._implied_by(q)
            hits = sorted(set(hits) | {i for i, e in enumerate(self._entries) if e.term.id in ids})
        return [self._entries[i] for i in hits]

    def _implied_by(self, q: ParsedName) -> set[str]:
        names = {x for m in q.markers for x in self._symbols(m.name)}
        return {
            t.id
            for t in self.ontology.live()
            if names & {x for k in self._implied(t) for x in self._symbols(k)}
        }

    @cached_property
    def vocabulary(self) -> frozenset[str]:
        """Every word of every live term label/synonym (normalised)."""
        return frozenset(w for e in self._entries for w in e.words)

    @cached_property
    def abbreviations(self) -> dict[str, list[tuple[str, ...]]]:
        """Abbreviation → expansions learned from the ontology's synonyms, most supported first.

        A synonym token such as ``pDC`` / ``LT-HSC`` / ``MkP`` is split at case changes into
        segments that are aligned, in order, to the words of the term's label: a segment is the
        initials of consecutive words (``DC`` = dendritic cell) or an abbreviation of one word
        (``Mk`` = megakaryocyte: same first letter, the rest in order). Segments of two or more
        letters that align are kept. A one-word synonym of a label of several words is a
        compound of them (``cardiomyocyte`` = cardiac muscle, from "cardiac muscle cell").
        """
        counts: dict[str, Counter[tuple[str, ...]]] = {}
        for term in self.ontology.live():
            label_words = [normalise_word(w) for w in re.findall(r"[A-Za-z]+", term.label)]
            content = tuple(w for w in label_words if w not in FILLER)
            for syn in (*term.synonyms, *term.other_synonyms):
                one = re.fullmatch(r"[a-z]{6,}s?", syn.strip())
                if one and len(content) >= 2:  # "cardiomyocyte" = cardiac muscle (cell)
                    counts.setdefault(normalise_word(syn.strip()), Counter())[content] += 1
                    continue
                for tok in re.findall(r"[A-Za-z][A-Za-z0-9]*", syn):
                    if normalise_word(tok) in label_words or tok.islower():
                        continue
                    for seg, exp in align_abbreviation(_SEGMENT.findall(tok), label_words):
                        counts.setdefault(seg, Counter())[exp] += 1
        return {s: [e for e, _ in c.most_common()] for s, c in counts.items()}

    @cached_property
    def _stated_by_term(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for e in self._entries:
            out.setdefault(e.term.id, set()).update(
                m.name for m in e.parsed.markers if m.polarity == "positive"
            )
        return out

    @cached_property
    def _negated_by_term(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for e in self._entries:
            out.setdefault(e.term.id, set()).update(
                m.name for m in e.parsed.markers if m.polarity != "positive"
            )
        return out

    @cached_property
    def _below_by_term(self) -> dict[str, set[str]]:
        """Positive markers stated in the names of each term's descendants."""
        out: dict[str, set[str]] = {}
        for tid, names in self._stated_by_term.items():
            for anc in self.ontology.terms[tid].ancestors:
                out.setdefault(anc, set()).update(names)
        return out

    def _implied(self, term: OntologyTerm) -> set[str]:
        """Positive markers a term implies: its definition and its ancestors' names."""
        if term.id not in self._known:
            names = {
                m.name for m in extract_marker_mentions(term.description, is_gene=self._is_gene)
            }
            for anc in term.ancestors:
                names |= self._stated_by_term.get(anc, set())
            negated = self._negated_by_term.get(term.id, set())  # "CD14-low" beats an ancestor
            self._known[term.id] = {n for n in names if n not in negated}
        return self._known[term.id]

    def _ancestor_words(self, term: OntologyTerm) -> frozenset[str]:
        """Words of the labels of a term's ancestors (what the term *is*, e.g. photoreceptor)."""
        if term.id not in self._anc_words:
            words: set[str] = set()
            for anc in term.ancestors:
                t = self.ontology.terms.get(anc)
                if t is not None:
                    words |= {normalise_word(w) for w in re.findall(r"[A-Za-z]{3,}", t.label)}
            self._anc_words[term.id] = frozenset(words - FILLER)
        return self._anc_words[term.id]

    @cached_property
    def _word_df(self) -> Counter[str]:
        return Counter(w for e in self._entries for w in e.words)

    def _word_weight(self, word: str) -> float:
        """Penalty of an unrequested word: rarer words specialise more (``alpha`` < ``decidual``)."""
        w = self._weights.get(word)
        if w is None:
            n = max(len(self._entries), 2)
            w = 2 * _EXTRA_WORD * (1.0 - float(np.log(self._word_df.get(word, 1))) / np.log(n))
            self._weights[word] = w
        return w

    def _same(self, a: str, b: str) -> bool:
        return a == b or (self.genes is not None and self.genes.same(a, b))

    def _word_cover(
        self, word: str, e: Entry, acronym: bool = False, capitals: bool = False
    ) -> tuple[frozenset[str], float] | None:
        """Which term words a query word stands for, and how fully (1 = exact)."""
        words = e.words
        if word in words:
            return frozenset({word}), 1.0
        for exp in self.abbreviations.get(word, []):
            need = frozenset(x for x in exp if x not in FILLER)
            if need and need <= words:
                return need, 1.0
        if (
            acronym
            and 2 <= len(word) <= 6
            and word not in self.abbreviations
            and (capitals or word not in self.vocabulary)
        ):
            hit = acronym_words(word, e.initials)
            if hit is not None and hit[0] in FILLER - {"cell"}:
                hit = None  # "TA" is not "the appendix"
            if hit is not None:  # a guess from initials, not a spelling the ontology uses
                return frozenset(hit) - FILLER, 0.9
        if len(word) >= 3:
            hits = sorted((w for w in words if w.startswith(word)), key=len)
            if hits:  # a prefix: the shorter the completion, the closer ("mono" → monocyte)
                if not acronym and len(hits[0]) - len(word) <= 2:  # an ending: glia → glial
                    return frozenset(hits[:1]), 0.95
                return frozenset(hits[:1]), 0.5 + 0.5 * len(word) / len(hits[0])
        if len(word) >= 6 and not acronym:  # noun and adjective: endothelium ~ endothelial
            for w in words:
                n = _shared(word, w)
                if n >= 6 and n >= 0.75 * min(len(word), len(w)):
                    return frozenset({w}), 0.95
        return None

    def _related(self, a: str, b: str) -> bool:
        return a in self.ontology.terms[b].ancestors or b in self.ontology.terms[a].ancestors

    def _common_ancestors(self, a: str, b: str) -> list[str]:
        """Return the terms above (or equal to) both ``a`` and ``b``, deepest first."""
        above_a = {a, *self.ontology.terms[a].ancestors}
        common = [t for t in (b, *self.ontology.terms[b].ancestors) if t in above_a]
        common = [t for t in common if t in self.ontology.terms]
        return sorted(common, key=lambda t: -len(self.ontology.terms[t].ancestors))

    def stated_markers(self, term_id: str) -> set[str]:
        """Positive markers the term's own label/synonyms state (``CD14-positive monocyte``)."""
        return set(self._stated_by_term.get(term_id, set()))

    def negated_markers(self, term_id: str) -> set[str]:
        """Markers the term states as absent: its names (``CD16-negative``) and definition."""
        names = {
            m.name
            for m in extract_marker_mentions(
                self.ontology.terms[term_id].description, is_gene=self._is_gene, negative=True
            )
        }
        for e in self._entries:
            if e.term.id == term_id:
                names |= {m.name for m in e.parsed.markers if m.polarity == "negative"}
        return names - self.implied_markers(term_id) - self.stated_markers(term_id)

    def implied_markers(self, term_id: str) -> set[str]:
        """Positive markers in the term's definition and its ancestors' names."""
        return set(self._implied(self.ontology.terms[term_id]))

    def descendant_markers(self, term_id: str) -> Counter[str]:
        """Positive markers stated by the term's descendants, with how many state each."""
        out: Counter[str] = Counter()
        for tid in self.ontology.descendants(term_id):
            out.update(self._stated_by_term.get(tid, set()))
        return out

    def tissue_words(self, tissue: str | None) -> TissueWords | None:
        """Return a tissue text's UBERON words (None without a tissue or one UBERON lacks)."""
        if not tissue:
            return None
        tw = load_anatomy().tissue(tissue)
        if tw is None and tissue not in self._unknown_tissues:
            self._unknown_tissues.add(tissue)
            log.warning(
                "annotate.tissue %r names no UBERON term: labels are mapped without tissue "
                "context (use an organ name such as lung, kidney, liver, brain, blood)",
                tissue,
            )
        return tw

    @cached_property
    def _unknown_tissues(self) -> set[str]:
        return set()

    def relation(self, term_id: str, tw: TissueWords | None) -> str:
        """``fit`` / ``other`` / ``neutral``: where the term's names place it for a tissue."""
        if tw is None:
            return "neutral"
        key = (term_id, tw.text)
        if key not in self._relations:
            t = self.ontology.terms[term_id]
            self._relations[key] = tw.relation(t.label, t.synonyms)
        return self._relations[key]

    def above_stating(self, q: ParsedName) -> tuple[OntologyTerm, float, str] | None:
        """Return the deepest term above most of the terms stating all of ``q``'s markers.

        For a label of markers only (``CD34+``): the term, the share of the stating terms
        below it, and a sentence saying so; None when no term states them all.
        """
        ids = {
            e.term.id
            for e in self._entries
            if all(
                any(
                    self._same(m.name, x.name) and m.polarity == x.polarity
                    for x in e.parsed.markers
                )
                for m in q.markers
            )
        }
        if not ids:
            return None
        support: Counter[str] = Counter()
        for tid in ids:
            for a in {tid, *self.ontology.terms[tid].ancestors}:
                support[a] += 1
        ok = [a for a, c in support.items() if c * 2 >= len(ids) and a in self.ontology.terms]
        best = max(ok, key=lambda a: (len(self.ontology.terms[a].ancestors), support[a]))
        names = ", ".join(m.name for m in q.markers)
        detail = f"above {support[best]} of {len(ids)} terms stating {names}"
        return self.ontology.terms[best], support[best] / len(ids), detail
