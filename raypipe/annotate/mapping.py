"""Map free-text cell-type labels to Cell Ontology terms, with how and how sure.

No rule here knows a dataset: every step follows a naming convention of single-cell labels.
In order (the first that answers wins):

``config``         ``annotate.mapping`` names the CL id for this label
``id``             the label is a CL id
``label`` / ``synonym`` / ``synonym_other``
                   the normalised label equals a term's label or synonym (case, plurals,
                   ``_ + / -`` and punctuation ignored)
``parsed``         the label read as *words* and *marker mentions* (:mod:`~raypipe.annotate.names`)
                   matches a term's label or synonym concept by concept: every word matches a
                   term word exactly, as a prefix (``Mono`` → monocyte, ``Reg`` → regulatory) or
                   through an abbreviation the ontology's own synonyms define (``NK`` → natural
                   killer from "NK cell", ``DC`` → dendritic cell from "pDC", ``Mk`` →
                   megakaryocyte from "MkP", ``HSC`` from "LT-HSC"); every marker matches a
                   marker the term states with the same polarity, where gene aliases make
                   ``FCGR3A`` and ``CD16`` the same marker; markers a term only implies (named
                   in its definition or an ancestor's name: full credit; in a descendant's name:
                   partial credit) count too. Among the best-covering terms the most general
                   one wins (a label states constraints; nothing unstated is added), then the
                   one with the fewest unrequested words/markers
``parsed_partial`` as ``parsed`` when no term covers every word (``Naive Cytotoxic`` ...)
``markers_only``   a label that is only markers (``CD34+``): the deepest term above most of the
                   terms that state those markers
``embedding``      nearest term label by text embedding, above a cosine threshold
``unmatched``      nothing above: the label is scored on its own name, and listed loudly
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

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
from raypipe.annotate.ontology import Ontology, OntologyTerm, normalise
from raypipe.errors import InputError

__all__ = ["GeneNames", "LabelMapper", "LabelMapping", "check_overrides"]

log = logging.getLogger(__name__)

_STATED, _IMPLIED, _BELOW = 1.0, 0.9, 0.3
_EXTRA_WORD, _EXTRA_MARKER, _MISSING_WORD = 0.15, 0.5, 1.0
_GENERAL_SLACK = 0.2  # an ancestor covering as much wins unless it adds this much more
_SEGMENT = re.compile(r"[A-Z]+[a-z]*|[a-z]+|[0-9]+")


@dataclass(frozen=True)
class LabelMapping:
    """One label mapped to a CL term (``cl_id`` None when unmatched)."""

    label: str
    cl_id: str | None
    cl_label: str | None
    how: str
    confidence: float
    detail: str = ""


@dataclass(frozen=True)
class _Entry:
    term: OntologyTerm
    kind: str
    parsed: ParsedName
    words: frozenset[str]
    initials: tuple[tuple[str, str], ...]  # (word, its initial), filler words included


def check_overrides(overrides: Mapping[str, str], ontology: Ontology) -> None:
    """Raise :class:`InputError` naming every ``annotate.mapping`` id the ontology lacks."""
    bad = []
    for name, tid in overrides.items():
        try:
            ontology.term(tid)
        except InputError:
            bad.append(f"{name!r} → {tid!r}")
    if bad:
        raise InputError(
            f"annotate.mapping names CL ids that are not in the Cell Ontology ({ontology.source}): "
            + ", ".join(bad),
            fix="use live ids such as CL:0000236 (look terms up on https://www.ebi.ac.uk/ols4/ontologies/cl)",
        )


class LabelMapper:
    """Map labels to CL terms (see the module docstring for the steps).

    Parameters
    ----------
    ontology
        The Cell Ontology.
    genes
        Gene symbol/alias knowledge (marker names such as ``FCGR3A`` ~ ``CD16``); None compares
        marker names literally.
    overrides
        Label → CL id (``annotate.mapping``); checked with :func:`check_overrides`.
    embed
        ``embed(texts) -> (n, d)`` with the run's text model, for the nearest-term fallback;
        None skips it.
    embed_threshold
        Minimum cosine for the fallback.
    """

    def __init__(
        self,
        ontology: Ontology,
        *,
        genes: GeneNames | None = None,
        overrides: Mapping[str, str] | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        embed_threshold: float = 0.8,
    ) -> None:
        self.ontology, self.genes = ontology, genes
        self.overrides = dict(overrides or {})
        check_overrides(self.overrides, ontology)
        self.embed, self.embed_threshold = embed, embed_threshold
        self._known: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ lexicon
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
    def _entries(self) -> list[_Entry]:
        raw = [(t, text, kind) for t in self.ontology.live() for text, kind in t.names()]
        vocab0 = {normalise_word(w) for _, text, _ in raw for w in re.findall(r"[A-Za-z]+", text)}
        out = []
        for term, text, kind in raw:
            p = parse_name(text, vocabulary=vocab0, is_gene=self._is_gene)
            out.append(
                _Entry(term, kind, p, frozenset(p.words), tuple((w, w[0]) for w in p.all_words))
            )
        return out

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
        letters that align are kept.
        """
        counts: dict[str, Counter[tuple[str, ...]]] = {}
        for term in self.ontology.live():
            label_words = [normalise_word(w) for w in re.findall(r"[A-Za-z]+", term.label)]
            for syn in (*term.synonyms, *term.other_synonyms):
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

    @cached_property
    def _word_df(self) -> Counter[str]:
        return Counter(w for e in self._entries for w in e.words)

    def _word_weight(self, word: str) -> float:
        """Penalty of an unrequested word: rarer words specialise more (``alpha`` < ``decidual``)."""
        n = max(len(self._entries), 2)
        return 2 * _EXTRA_WORD * (1.0 - np.log(self._word_df.get(word, 1)) / np.log(n))

    # ------------------------------------------------------------------ matching
    def _same(self, a: str, b: str) -> bool:
        return a == b or (self.genes is not None and self.genes.same(a, b))

    def _word_cover(
        self, word: str, e: _Entry, acronym: bool = False
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
            and word not in self.vocabulary
        ):
            hit = acronym_words(word, e.initials)
            if hit is not None:
                return frozenset(hit) - FILLER, 1.0
        if len(word) >= 3:
            hits = sorted((w for w in words if w.startswith(word)), key=len)
            if hits:  # a prefix: the shorter the completion, the closer ("mono" → monocyte)
                return frozenset(hits[:1]), 0.5 + 0.5 * len(word) / len(hits[0])
        return None

    def _score(self, q: ParsedName, e: _Entry, strict: bool) -> tuple[float, float, int] | None:
        covered: set[str] = set()
        missing = 0
        cover = 0.0
        for w in q.words:
            c = self._word_cover(w, e, w in q.acronyms)
            if c is None:
                missing += 1
                if strict:
                    return None
            else:
                covered |= c[0]
                cover += c[1]
        used: set[int] = set()
        for m in q.markers:
            hit = next(
                (i for i, x in enumerate(e.parsed.markers) if self._same(m.name, x.name)), None
            )
            if hit is not None:
                if e.parsed.markers[hit].polarity != m.polarity:
                    return None  # the term says the opposite
                used.add(hit)
                cover += _STATED
                continue
            if m.polarity != "positive":
                continue
            if any(self._same(m.name, k) for k in self._implied(e.term)):
                cover += _IMPLIED
            elif any(self._same(m.name, k) for k in self._below_by_term.get(e.term.id, ())):
                cover += _BELOW
        extras = sum(self._word_weight(w) for w in e.words - covered) + _EXTRA_MARKER * (
            len(e.parsed.markers) - len(used)
        )
        return cover, extras, missing

    def _parsed(self, name: str) -> LabelMapping | None:
        q = parse_name(name, vocabulary=self.vocabulary, is_gene=self._is_gene)
        n_concepts = len(q.words) + len(q.markers)
        if n_concepts == 0:
            return None
        if not q.words:
            return self._markers_only(name, q)
        for strict in (True, False):
            best: dict[str, tuple[float, float, _Entry]] = {}
            for e in self._entries:
                s = self._score(q, e, strict)
                if s is None or s[0] <= 0:
                    continue
                cover = s[0] - _MISSING_WORD * s[2]
                if not strict and (s[0] < 1.0 or s[0] < 0.5 * n_concepts):
                    continue  # a partial match must cover at least half of the label
                prev = best.get(e.term.id)
                if prev is None or (cover, -s[1]) > (prev[0], -prev[1]):
                    best[e.term.id] = (cover, s[1], e)
            if not best:
                continue
            top = max(c for c, _, _ in best.values())
            tied = {tid: v for tid, v in best.items() if v[0] >= top - 1e-9}
            roots = [
                v
                for tid, v in tied.items()
                if not any(
                    a in tied and tied[a][1] <= v[1] + _GENERAL_SLACK
                    for a in self.ontology.terms[tid].ancestors
                )
            ]
            cover, extras, e = min(
                roots, key=lambda v: (v[1], len(v[2].term.ancestors), v[2].term.id)
            )
            conf = max(0.0, min(1.0, cover / n_concepts)) * max(0.5, 1.0 - extras / 2)
            how = "parsed" if strict else "parsed_partial"
            if not strict:
                conf = min(conf, 0.5)
            return LabelMapping(
                name, e.term.id, e.term.label, how, round(conf, 3), f"matched {e.parsed.text!r}"
            )
        return None

    def _markers_only(self, name: str, q: ParsedName) -> LabelMapping | None:
        stating = [
            e.term
            for e in self._entries
            if all(
                any(
                    self._same(m.name, x.name) and m.polarity == x.polarity
                    for x in e.parsed.markers
                )
                for m in q.markers
            )
        ]
        ids = {t.id for t in stating}
        if not ids:
            return None
        support: Counter[str] = Counter()
        for tid in ids:
            for a in {tid, *self.ontology.terms[tid].ancestors}:
                support[a] += 1
        ok = [a for a, c in support.items() if c * 2 >= len(ids) and a in self.ontology.terms]
        best = max(ok, key=lambda a: (len(self.ontology.terms[a].ancestors), support[a]))
        term = self.ontology.terms[best]
        share = support[best] / len(ids)
        return LabelMapping(
            name,
            term.id,
            term.label,
            "markers_only",
            round(0.6 * share, 3),
            f"above {support[best]} of {len(ids)} terms stating {', '.join(m.name for m in q.markers)}",
        )

    # ------------------------------------------------------------------ knowledge
    def stated_markers(self, term_id: str) -> set[str]:
        """Positive markers the term's own label/synonyms state (``CD14-positive monocyte``)."""
        return set(self._stated_by_term.get(term_id, set()))

    def implied_markers(self, term_id: str) -> set[str]:
        """Positive markers in the term's definition and its ancestors' names."""
        return set(self._implied(self.ontology.terms[term_id]))

    def descendant_markers(self, term_id: str) -> Counter[str]:
        """Positive markers stated by the term's descendants, with how many state each."""
        out: Counter[str] = Counter()
        for tid in self.ontology.descendants(term_id):
            out.update(self._stated_by_term.get(tid, set()))
        return out

    # ------------------------------------------------------------------ public
    def map(self, name: str) -> LabelMapping:
        """Map one label without the embedding fallback (see :meth:`map_all`)."""
        if name in self.overrides:
            t = self.ontology.term(self.overrides[name])
            return LabelMapping(name, t.id, t.label, "config", 1.0, "annotate.mapping")
        found = self.ontology.search(name)
        if found:
            m = found[0]
            conf = {"id": 1.0, "label": 1.0, "synonym": 0.95}.get(m.kind, 0.8)
            return LabelMapping(name, m.term.id, m.term.label, m.kind, conf, m.matched)
        hit = self._parsed(name)
        return hit or LabelMapping(name, None, None, "unmatched", 0.0, normalise(name))

    def map_all(self, names: Sequence[str]) -> list[LabelMapping]:
        """Map every label; unmatched ones go through the text-embedding fallback once."""
        out = [self.map(n) for n in names]
        lost = [i for i, m in enumerate(out) if m.cl_id is None]
        if lost and self.embed is not None:
            terms = self.ontology.live()
            term_emb = _unit(self.embed([t.label for t in terms]))
            q = _unit(self.embed([out[i].label for i in lost]))
            sims = q @ term_emb.T
            for row, i in enumerate(lost):
                j = int(np.argmax(sims[row]))
                cos = float(sims[row, j])
                if cos >= self.embed_threshold:
                    t = terms[j]
                    out[i] = LabelMapping(
                        out[i].label, t.id, t.label, "embedding", round(cos, 3), f"cosine {cos:.2f}"
                    )
                else:
                    out[i] = LabelMapping(
                        out[i].label,
                        None,
                        None,
                        "unmatched",
                        0.0,
                        f"nearest {terms[j].label!r} at cosine {cos:.2f} < {self.embed_threshold}",
                    )
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)
