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

Context, in every step:

* **species** (``genes.species``): a term or synonym tagged for another species (``(Mmus)``,
  ``(sensu Mus)``, ``, mouse``, ``(sensu Teleostei)`` ...) is never a match;
* **numbers** are concepts (:mod:`~raypipe.annotate.names`: ``type II`` = ``type 2``, ``ILC2``):
  every number of the label must be one of the term's, a term with other numbers contradicts
  the label, and a number the term adds is a qualifier the label lacks;
* **tissue** (``annotate.tissue``, read through UBERON: :mod:`~raypipe.annotate.anatomy`): a
  term whose name uses words of the tissue or its parts *fits*, one using another organ's
  words is *elsewhere* and loses to any term that is not; words naming the tissue itself
  (``lung``, ``pulmonary``) cost nothing as qualifiers, earn a small bonus, and count as
  said when the label says them of a term that is not elsewhere;
* **qualifiers**: every word, marker and number a term adds that the label did not state
  costs (rarer words more); among terms covering the label equally the plainest wins;
* **abstention**: when the best term and the best *unrelated* term (neither above the
  other) are as good — within :data:`AMBIGUOUS` confidence — the answer is ``unmatched`` with
  both named ("set annotate.tissue or annotate.mapping"), never a coin flip.

``confidence``: 1 for config/id/label, 0.95 an exact synonym (0.7 when it is a gene's name),
0.8 other synonyms; ``parsed``: the share of the label covered times a penalty for what the
term adds (≤ 0.5 partial or markers only; cosine × 0.75 ``embedding``). Its calibration on
``tests/data/mapping/truth.tsv`` is in ``docs/markers-and-mapping.md``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from raypipe.annotate.anatomy import TissueWords, load_anatomy, stem
from raypipe.annotate.lexicon import Entry, Lexicon, species_of
from raypipe.annotate.names import GeneNames, ParsedName, parse_name
from raypipe.annotate.ontology import Ontology, OntologyMatch, normalise
from raypipe.errors import InputError

__all__ = ["AMBIGUOUS", "GeneNames", "LabelMapper", "LabelMapping", "check_overrides", "species_of"]

log = logging.getLogger(__name__)

_STATED, _IMPLIED, _BELOW = 1.0, 0.9, 0.3
_EXTRA_MARKER, _EXTRA_NUMBER, _MISSING_WORD = 0.5, 0.6, 1.0
_IMPLIED_WORD, _TISSUE_WORD, _TIE = 0.95, 0.8, 0.05
_FIT_BONUS = 0.1
_GENERAL_SLACK = 0.2  # an ancestor covering as much wins unless it adds this much more
#: Confidence gap under which the best term and the best unrelated term are a tie.
AMBIGUOUS = 0.02
#: Cost of an unrequested word naming an organ (not the tissue's): "pancreatic" for "alpha".
_EXTRA_ORGAN = 0.5


@dataclass(frozen=True)
class LabelMapping:
    """One label mapped to a CL term (``cl_id`` None when unmatched)."""

    label: str
    cl_id: str | None
    cl_label: str | None
    how: str
    confidence: float
    detail: str = ""


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


class LabelMapper(Lexicon):
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
    tissue
        ``annotate.tissue``: free text naming the tissue of the labels (``lung``, ``kidney``);
        None maps without tissue context. A text UBERON does not know is logged and ignored.
    species
        ``genes.species`` (``human`` or ``mouse``): terms tagged for other species are ignored.
    """

    def __init__(
        self,
        ontology: Ontology,
        *,
        genes: GeneNames | None = None,
        overrides: Mapping[str, str] | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        embed_threshold: float = 0.8,
        tissue: str | None = None,
        species: str = "human",
    ) -> None:
        super().__init__(ontology, genes=genes, species=species)
        self.overrides = dict(overrides or {})
        check_overrides(self.overrides, ontology)
        self.embed, self.embed_threshold = embed, embed_threshold
        self.tissue = tissue

    # ------------------------------------------------------------------ matching

    def _score(
        self, q: ParsedName, e: Entry, strict: bool, tw: TissueWords | None
    ) -> tuple[float, float, int] | None:
        covered: set[str] = set()
        used: set[int] = set()
        missing = 0
        cover = 0.0
        own = 0.0  # cover by the term's own words, markers and numbers
        pending: list[str] = []
        for w in q.words:
            c = self._word_cover(w, e, w in q.acronyms, w in q.capitals)
            if c is None:  # a word the term writes as a marker ("Vip" ~ "VIP GABAergic ...")
                j = next((i for i, x in enumerate(e.parsed.markers) if x.name == w.upper()), None)
                if j is not None and j not in used:
                    used.add(j)
                    c = (frozenset(), 1.0)
            if c is None:
                pending.append(w)
            else:
                covered |= c[0]
                cover += c[1]
                own += c[1]
        have = Counter(e.parsed.numbers)
        for n, k in Counter(q.numbers).items():
            if have[n] >= k:
                cover += k
                own += k
            elif have:
                return None  # the term has other numbers: "type 1" is not "type 2"
            else:
                missing += k
                if strict:
                    return None
        for m in q.markers:
            hit = next(
                (i for i, x in enumerate(e.parsed.markers) if self._same(m.name, x.name)), None
            )
            if hit is not None:
                if e.parsed.markers[hit].polarity != m.polarity:
                    return None  # the term says the opposite
                used.add(hit)
                cover += _STATED
                own += _STATED
                continue
            if m.polarity != "positive":
                continue
            if any(self._same(m.name, k) for k in self._implied(e.term)):
                cover += _IMPLIED
            elif any(self._same(m.name, k) for k in self._below_by_term.get(e.term.id, ())):
                cover += _BELOW
        for w in pending:  # once the term matched something for sure (not only a guess)
            c = None
            if own >= 1.0 and w in self._ancestor_words(e.term):
                c = (frozenset(), _IMPLIED_WORD)  # "cone photoreceptor": a cone is one
            elif (
                own >= 1.0
                and tw is not None
                and stem(w) in tw.own
                and self.relation(e.term.id, tw) != "other"
            ):
                c = (frozenset(), _TISSUE_WORD)  # "pulmonary" said of a lung cell
            if c is None:
                missing += 1
                if strict:
                    return None
            else:
                cover += c[1]
        if own <= 0:
            return None  # only implied or tissue words: nothing of the label is the term's
        free = tw.own if tw is not None else frozenset()
        organ = load_anatomy().organ_words
        extras = 0.0
        for w in e.words - covered:
            key = stem(w)
            if key not in free:
                extras += _EXTRA_ORGAN if key in organ else self._word_weight(w)
        extras += _EXTRA_MARKER * (len(e.parsed.markers) - len(used))
        extras += _EXTRA_NUMBER * max(0, len(e.parsed.numbers) - len(q.numbers))
        return cover, extras, missing

    def _parsed(self, name: str, tw: TissueWords | None) -> LabelMapping | None:
        q = parse_name(name, vocabulary=self.vocabulary, is_gene=self._is_gene)
        if not q.words and not q.numbers and q.markers:
            found = self._markers_only(name, q)
            if found is not None:
                return found
            # markers no term states: read the tokens as words ("AT2", "ILC3")
            q = parse_name(name, vocabulary=self.vocabulary, is_gene=lambda _t: False)
        n_concepts = len(q.words) + len(q.markers) + len(q.numbers)
        if n_concepts == 0 or not (q.words or q.numbers):
            return None
        elsewhere: LabelMapping | None = None
        pool = self._candidates(q)
        for strict in (True, False):
            best: dict[str, tuple[float, float, Entry]] = {}
            by_label: dict[str, float] = {}
            for e in pool:
                s = self._score(q, e, strict, tw)
                if s is None or s[0] <= 0:
                    continue
                if e.kind == "label":
                    by_label[e.term.id] = s[1]
                if not strict and (s[0] < 0.9 or s[0] < 0.45 * n_concepts):
                    continue  # a partial match must cover about half of the label
                prev = best.get(e.term.id)
                if prev is None or (s[0], -s[1]) > (prev[0], -prev[1]):
                    best[e.term.id] = (s[0], s[1], e)
            if not best:
                continue
            if tw is not None and all(self.relation(t, tw) == "other" for t in best):
                # every full match names another organ: a partial match in this tissue, if
                # any, is the better answer; else this one, with low confidence
                if elsewhere is None:
                    found = self._choose(name, q, best, by_label, n_concepts, strict, tw)
                    elsewhere = replace(
                        found,
                        confidence=min(found.confidence, 0.5),
                        detail=found.detail + f" (names another tissue than {tw.text})",
                    )
                continue
            return self._choose(name, q, best, by_label, n_concepts, strict, tw)
        return elsewhere

    def _choose(
        self,
        name: str,
        q: ParsedName,
        best: dict[str, tuple[float, float, Entry]],
        by_label: dict[str, float],
        n_concepts: int,
        strict: bool,
        tw: TissueWords | None,
    ) -> LabelMapping:
        """Pick the plainest, best-placed term among the best-covering ones, or abstain.

        Terms covering the label (nearly, :data:`_TIE`) as well as the best compete; one
        placed in another tissue loses to any that is not; an ancestor covering as much
        absorbs its descendants unless it adds much more than the descendant's own label;
        then the highest confidence (+
        :data:`_FIT_BONUS` for a term of the tissue) wins. An *unrelated* runner-up within
        :data:`AMBIGUOUS` is a tie: the answer is their deepest common ancestor that covers
        all but one concept of the label (confidence 0.6), else ``unmatched``.
        """
        top = max(c for c, _, _ in best.values())
        tied = {tid: v for tid, v in best.items() if v[0] >= top - _TIE}
        rel = {tid: self.relation(tid, tw) for tid in tied}
        if any(r != "other" for r in rel.values()):  # a term placed elsewhere loses
            tied = {tid: v for tid, v in tied.items() if rel[tid] != "other"}

        def ref(tid: str) -> float:
            """Return a term's qualifiers as its label states them.

            A bare synonym of a subtype ("VIP" for a striatal VIP interneuron) does not make
            the subtype plain.
            """
            v = tied[tid][1]
            return max(v, by_label.get(tid, v + _GENERAL_SLACK))

        roots = {
            tid: v
            for tid, v in tied.items()
            if not any(
                a in tied and tied[a][1] <= ref(tid) + _GENERAL_SLACK
                for a in self.ontology.terms[tid].ancestors
            )
        }

        def conf(v: tuple[float, float, Entry]) -> float:
            return max(0.0, min(1.0, v[0] / n_concepts)) * max(0.5, 1.0 - v[1])

        def named(tid: str) -> bool:  # the term names the tissue itself ("lung goblet cell")
            if tw is None:
                return False
            t = self.ontology.terms[tid]
            return any(
                stem(w) in tw.own
                for n in (t.label, *t.synonyms)
                for w in re.findall(r"[A-Za-z]{3,}", n)
            )

        def score(tid: str) -> float:
            return conf(roots[tid]) + (_FIT_BONUS if named(tid) else 0.0)

        order = sorted(roots, key=lambda t: (-score(t), len(roots[t][2].term.ancestors), t))
        win = roots[order[0]]
        how = "parsed" if strict else "parsed_partial"
        cap = 1.0 if strict else 0.5
        plain = win[1] <= 1e-9  # the term adds nothing the label did not say
        rival = next(
            (
                t
                for t in order[1:]
                if not self._related(t, order[0]) and (roots[t][1] <= 1e-9) == plain
            ),
            None,
        )
        if rival is not None and score(rival) >= score(order[0]) - AMBIGUOUS:
            a, b = win[2].term, roots[rival][2].term
            common = next(
                (
                    c
                    for c in self._common_ancestors(a.id, b.id)
                    if self._covers(c, q, n_concepts, tw)
                ),
                None,
            )
            if common is not None:
                t = self.ontology.terms[common]
                return LabelMapping(
                    name,
                    t.id,
                    t.label,
                    how,
                    min(0.6, cap),
                    f"common ancestor of {a.label!r} and {b.label!r}, which fit equally",
                )
            return LabelMapping(
                name,
                None,
                None,
                "unmatched",
                0.0,
                f"ambiguous: {a.label!r} ({a.id}) or {b.label!r} ({b.id}); "
                "set annotate.tissue or annotate.mapping",
            )
        detail = f"matched {win[2].parsed.text!r}"
        if rel[order[0]] == "fit" and tw is not None:
            detail += f" (tissue {tw.text})"
        if not q.markers and not q.numbers and all(len(w) == 1 for w in q.words):
            cap = min(cap, 0.75)  # "L cells", "G cells": one letter names many cells
        return LabelMapping(
            name,
            win[2].term.id,
            win[2].term.label,
            how,
            round(min(conf(win), cap), 3),
            detail,
        )

    def _covers(self, tid: str, q: ParsedName, n_concepts: int, tw: TissueWords | None) -> bool:
        """Say whether the term covers the label (all but one concept of two or more)."""
        need = n_concepts - 1 if n_concepts >= 2 else 0.9
        for e in self._entries:
            if e.term.id == tid:
                s = self._score(q, e, False, tw)
                if s is not None and s[0] >= need:
                    return True
        return False

    def _markers_only(self, name: str, q: ParsedName) -> LabelMapping | None:
        found = self.above_stating(q)
        if found is None:
            return None
        term, share, detail = found
        return LabelMapping(
            name, term.id, term.label, "markers_only", round(0.5 * share, 3), detail
        )

    # ------------------------------------------------------------------ public
    def _exact(self, name: str, tw: TissueWords | None) -> LabelMapping | None:
        """Return an exact id/label/synonym match for this species and tissue, or None."""
        found: list[OntologyMatch] = [
            m for m in self.ontology.search(name) if self._allowed(m.term.label)
        ]
        if not found:
            return None
        rank = {"fit": 0, "neutral": 1, "other": 2}
        found.sort(key=lambda m: rank[self.relation(m.term.id, tw)])
        m = found[0]
        if self.relation(m.term.id, tw) == "other":
            return None  # the name belongs to another tissue: let the parser look further
        same = [
            x
            for x in found[1:]
            if x.kind == m.kind
            and self.relation(x.term.id, tw) == self.relation(m.term.id, tw)
            and not self._related(x.term.id, m.term.id)
        ]
        if same:
            return None  # one name, unrelated terms: the parser decides or abstains
        if m.kind.startswith("synonym"):
            # a subtype may carry the bare name as a synonym ("VIP" for a striatal VIP
            # interneuron): when the name reads as the subtype's ancestor, that is the answer
            read = self._parsed(name, tw)
            if read is not None and read.cl_id in m.term.ancestors and read.how == "parsed":
                return read
        conf = {"id": 1.0, "label": 1.0, "synonym": 0.95}.get(m.kind, 0.8)
        if m.kind.startswith("synonym") and self._is_gene(name.strip()):
            conf = 0.7  # a gene's name as a cell's name ("VIP") is a loose synonym
        return LabelMapping(name, m.term.id, m.term.label, m.kind, conf, m.matched)

    def map(self, name: str, *, tissue: str | None = None) -> LabelMapping:
        """Map one label without the embedding fallback (see :meth:`map_all`).

        Parameters
        ----------
        name
            The label.
        tissue
            Tissue of this label (default: the mapper's ``tissue``).
        """
        if name in self.overrides:
            t = self.ontology.term(self.overrides[name])
            return LabelMapping(name, t.id, t.label, "config", 1.0, "annotate.mapping")
        tw = self.tissue_words(tissue or self.tissue)
        exact = self._exact(name, tw)
        if exact is not None:
            return exact
        hit = self._parsed(name, tw)
        return hit or LabelMapping(name, None, None, "unmatched", 0.0, normalise(name))

    def map_all(self, names: Sequence[str]) -> list[LabelMapping]:
        """Map every label; unmatched ones go through the text-embedding fallback once.

        A label left unmatched because two unrelated terms fit it equally (``ambiguous``) is
        not sent to the fallback: the nearest label by cosine would be a coin flip.
        """
        out = [self.map(n) for n in names]
        lost = [
            i for i, m in enumerate(out) if m.cl_id is None and not m.detail.startswith("ambig")
        ]
        if lost and self.embed is not None:
            terms = [t for t in self.ontology.live() if self._allowed(t.label)]
            term_emb = _unit(self.embed([t.label for t in terms]))
            q = _unit(self.embed([out[i].label for i in lost]))
            sims = q @ term_emb.T
            for row, i in enumerate(lost):
                j = int(np.argmax(sims[row]))
                cos, t, label = float(sims[row, j]), terms[j], out[i].label
                out[i] = (
                    LabelMapping(label, t.id, t.label, "embedding", round(0.75 * cos, 3), f"cosine {cos:.2f}")
                    if cos >= self.embed_threshold
                    else LabelMapping(
                        label, None, None, "unmatched", 0.0,
                        f"nearest {t.label!r} at cosine {cos:.2f} < {self.embed_threshold}",
                    )
                )  # fmt: skip
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)
