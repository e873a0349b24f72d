"""What ``annotate.tissue`` means to the label mapper: the words of a tissue and its parts.

The anatomy ontology UBERON ships inside ``cellxgene-ontology-guide`` (the same package as the
Cell Ontology; ``CXGSchema().ontology("UBERON")``, offline). Its ``ancestors`` hold both
*is a* and *part of*, so the terms below a tissue are its subtypes and its parts: below
``lung`` are "pulmonary alveolus", "bronchiole", "pleura" ...

:meth:`Anatomy.tissue` turns free text into :class:`TissueWords`: the UBERON terms whose label
or exact synonym is the text (and the organs of cellxgene's organ list whose name contains it
as a word: ``skin`` → "skin of body"), then every word of those terms and of the terms below
them. Words are compared by stem (the first six letters of the singular, so ``alveolar`` ~
``alveolus``, ``pancreatic`` ~ ``pancreas``). A word found below many organs ("epithelium",
"left", "artery", "duct") says nothing about which organ a cell belongs to: only words found
below at most :data:`SPECIFIC_ORGANS` of the organ list's organs are kept.

``other`` words are the organ-specific words of *other* organs: a Cell Ontology term whose
name uses one ("colon goblet cell" when the tissue is ``lung``) belongs elsewhere.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypipe.annotate.names import normalise_word
from raypipe.annotate.ontology import normalise

__all__ = ["SPECIFIC_ORGANS", "Anatomy", "TissueWords", "load_anatomy", "stem"]


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Return the comparison key of a word: singular, American, first six letters."""
    return normalise_word(word)[:6]


#: A word below more of the organ list's organs than this is generic anatomy ("duct").
SPECIFIC_ORGANS = 3
#: Another organ's words: within this many steps below it, and below no other organ.
OTHER_DEPTH = 2

#: Qualifiers of age, size, position and kind that UBERON uses below a few organs but that
#: name no organ (``early``, ``small``, ``progenitor``): never tissue evidence.
_QUALIFIERS = frozenset(
    stem(w)
    for w in (  # noqa: SIM905 - a word list reads best as words
        "adult early late mature immature embryo embryonic fetal larval primitive progenitor "
        "precursor stem small large long short great common high low base basal border "
        "proper type neural neuron main superficial deep anterior posterior dorsal ventral "
        "lateral medial inner outer upper lower central peripheral region part zone segment "
        "associated between non and with male female light dark clear thick thin multi "
        "semi shaped round ring group unit pair core shell tree crest plus path press "
        "yellow brown grey white visual sensory receptor projecting migratory transitional "
        "function formation plasma pigment supporting lining barrier tuft brush principal "
        "scale placode rodent interstitial stellate lymph node body entire organ portion layer "
        "internal external tunica vertebrate"
    ).split()
)


@dataclass(frozen=True)
class TissueWords:
    """A tissue as the mapper uses it.

    Attributes
    ----------
    text
        ``annotate.tissue`` as given.
    uberon
        ``(id, label)`` of the UBERON terms it named.
    words
        Organ-specific word stems of those terms and everything below them.
    own
        The words that name the tissue itself: its own label and synonyms, and the words
        used by at least 5% (and 3) of the terms up to two steps below it (``pulmonary``,
        ``hepatic``, ``cardiac``; not ``striatum``, a part that names a region).
    other
        Words naming another organ (not in ``words``): below exactly one organ of the list,
        at most :data:`OTHER_DEPTH` steps down (``colon``, ``gastric``, ``glomerular``).
    """

    text: str
    uberon: tuple[tuple[str, str], ...]
    words: frozenset[str]
    other: frozenset[str]
    own: frozenset[str] = frozenset()

    def relation(self, label: str, synonyms: Iterable[str] = ()) -> str:
        """Place a term by its name: ``fit`` (this tissue), ``other`` (another) or ``neutral``.

        ``fit`` when its label and synonyms use more words of the tissue than its label uses
        of other organs, ``other`` the reverse, ``neutral`` when as many (none, or "alveolus of
        lactiferous gland"). Synonyms only add evidence for the tissue ("gastric chief cell"):
        they also carry old and loose names ("adventitial cell" for a pericyte).
        """
        found = {stem(w) for t in (label, *synonyms) for w in re.findall(r"[A-Za-z]{3,}", t)}
        named = {stem(w) for w in re.findall(r"[A-Za-z]{3,}", label)}
        fit, other = len(found & self.words), len(named & self.other)
        if fit != other:
            return "fit" if fit > other else "other"
        return "neutral"


class Anatomy:
    """UBERON terms with their descendants (subtypes and parts), for tissue words.

    Parameters
    ----------
    terms
        UBERON id → ``{"label", "synonyms", "ancestors", "deprecated"}`` (cellxgene layout).
    organs
        UBERON ids of the organs whose words are told apart (cellxgene's organ list).
    """

    def __init__(self, terms: Mapping[str, Mapping[str, Any]], organs: Iterable[str]) -> None:
        self.terms = {t: v for t, v in terms.items() if not v.get("deprecated")}
        self.organs = [o for o in organs if o in self.terms]
        self._below: dict[str, dict[str, int]] = {}
        for tid, v in self.terms.items():
            for anc, dist in (v.get("ancestors") or {}).items():
                self._below.setdefault(anc, {})[tid] = int(dist or 0)
        self._names: dict[str, list[str]] = {}
        for tid, v in self.terms.items():
            for name in [v.get("label", ""), *(v.get("synonyms") or [])]:
                self._names.setdefault(normalise(str(name)), []).append(tid)
        closures = {o: self._closure_words([o]) for o in self.organs}
        df = Counter(w for ws in closures.values() for w in ws)
        self.specific = frozenset(w for w, c in df.items() if c <= SPECIFIC_ORGANS)
        near = {o: self._closure_words([o], depth=OTHER_DEPTH) for o in self.organs}
        df_near = Counter(w for ws in near.values() for w in ws)
        self.organ_words = frozenset(w for w, c in df_near.items() if c == 1) & self.specific

    def _words(self, tid: str) -> set[str]:
        """Word stems of a term's label (synonyms add Latin and abbreviations, not meaning)."""
        label = str(self.terms[tid].get("label", ""))
        return {stem(w) for w in re.findall(r"[A-Za-z]{4,}", label)} - _QUALIFIERS

    def _closure_words(self, ids: Iterable[str], depth: int | None = None) -> set[str]:
        out: set[str] = set()
        for tid in ids:
            below = self._below.get(tid, {})
            for t in {tid, *(b for b, d in below.items() if depth is None or d <= depth)}:
                out |= self._words(t)
        return out

    def find(self, text: str) -> list[str]:
        """UBERON ids a tissue text names (label or exact synonym; organs containing the word)."""
        key = normalise(text)
        ids = list(dict.fromkeys(self._names.get(key, [])))
        for o in self.organs:
            label = normalise(str(self.terms[o].get("label", "")))
            if o not in ids and re.search(rf"\b{re.escape(key)}\b", label):
                ids.append(o)
        return ids

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Anatomy per process (load_anatomy)
    def tissue(self, text: str) -> TissueWords | None:
        """Return the tissue's words, or None when UBERON has no term of that name."""
        ids = self.find(text)
        if not ids:
            return None
        said = {stem(w) for w in re.findall(r"[A-Za-z]{3,}", text)}
        words = (self._closure_words(ids) & self.specific) | said
        near: Counter[str] = Counter()
        n = 0
        for tid in ids:
            for t, d in self._below.get(tid, {}).items():
                if d <= 2:
                    near.update(self._words(t))
                    n += 1
        own = {w for w, c in near.items() if c >= max(3, 0.05 * n)} & self.specific
        for tid in ids:
            v = self.terms[tid]
            for name in [v.get("label", ""), *(v.get("synonyms") or [])]:
                own |= {stem(w) for w in re.findall(r"[A-Za-z]{4,}", str(name))}
        return TissueWords(
            text,
            tuple((i, str(self.terms[i].get("label", i))) for i in ids),
            frozenset(words),
            frozenset(self.organ_words - words),
            frozenset((own - _QUALIFIERS) | said),
        )


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """UBERON and the organ list bundled with ``cellxgene-ontology-guide`` (read once)."""
    import cellxgene_ontology_guide
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    data = CXGSchema().ontology("UBERON")
    organ_file = Path(cellxgene_ontology_guide.__file__).parent / "data" / "organ_list.json"
    organs = json.loads(organ_file.read_text())
    return Anatomy(data, organs)
