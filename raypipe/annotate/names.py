"""Read cell-type names and Cell Ontology texts as *words* and *marker mentions*.

A cell-type name mixes two vocabularies: cell-type words (``B``, ``monocyte``, ``naive``,
``regulatory``) and marker genes with a polarity (``CD14+``, ``CD16-negative``,
``NK_CD56bright``, ``FCGR3A``). :func:`parse_name` splits any such string the same way for a
user's label and for a CL label/synonym, so both sides can be compared concept by concept:

* a marker is a token followed by a polarity (``+``, ``-positive``, ``-negative``, ``-low``,
  ``-high``, ``bright``/``dim``, a trailing ``-``), a ``CD<number>`` token, or a token that is
  a gene symbol/alias (``is_gene``) and not a cell-type word of the ontology (``vocabulary``);
  a marker written without polarity counts as positive (``CD4 T cells``, ``Mono_CD14``);
* numbers are concepts of their own: a free-standing number or roman numeral (``type 2``,
  ``type II``, ``L2/3``) and the digits that end a word (``ILC2`` → ``ilc`` + 2, ``AT1`` →
  ``at`` + 1) go to :attr:`ParsedName.numbers` (roman numerals as digits), so ``type 1`` and
  ``type 2`` never read as the same name;
* everything else is a word: lower case, singular, British spellings made American
  (``haem`` → ``hem``, ``leuc`` → ``leuk``), split on ``_ / - , ( )`` and spaces; the filler
  word ``cell`` is dropped (``B`` and ``B cells`` are the same concept), a one-letter capital
  is a word even when it is a filler word in lower case (``type A``).

:func:`extract_marker_mentions` reads a free-text definition ("a monocyte that expresses CD14
and is negative for CD3, CD19") and keeps the positive mentions (``negative=True``: the
negated ones). :class:`GeneNames` says
which marker names are the same gene (``FCGR3A`` ~ ``CD16``); :func:`align_abbreviation` and
:func:`acronym_words` are the abbreviation conventions the label mapper uses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FILLER",
    "GeneNames",
    "Marker",
    "ParsedName",
    "acronym_words",
    "align_abbreviation",
    "extract_marker_mentions",
    "normalise_word",
    "parse_name",
]

#: Words that carry no cell-type meaning when matching names.
FILLER = frozenset({"cell", "of", "and", "the", "a", "an", "in", "with", "or", "to"})

_POS, _NEG, _LOW = "positive", "negative", "low"
_SUFFIX = re.compile(
    r"(\+\+?|-positive|-negative|-bright|-dim|-high|-hi|-low|-lo|-int|-neg|-pos|"
    r"(?<=\d)(?:bright|dim|high|hi|low|lo)|-(?=[\s,/)_;+]|$|[A-Z]{2,}\d)|−(?=[\s,/)_;]|$))",
)
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9.]*|\d+")
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4"}
_TRAILING_DIGITS = re.compile(r"^([A-Za-z]+?)(\d+)$")
_CD = re.compile(r"^CD\d+[A-Za-z]{0,3}$", re.IGNORECASE)
_GENE_LIKE = re.compile(r"^[A-Z][A-Z0-9]*\d[A-Z0-9]*$|^[A-Z]{3,}[0-9]*[A-Z0-9]*$")
_NO_SINGULAR = ("ss", "us", "is", "os", "ys")
_SPELLING = (("haem", "hem"), ("leuc", "leuk"), ("oesin", "eosin"), ("foet", "fet"))
_NEG_CLAUSE = re.compile(
    r"\b(?:negative for|lacks?|lacking|does not express|do not express|not expressing|"
    r"low expression of|low levels? of|low responsiveness to|absence of|absent)\b[^.;]*",
    re.IGNORECASE,
)
_ABSENT_CLAUSE = re.compile(
    r"\b(?:negative for|lacks?|lacking|does not express|do not express|not expressing|"
    r"absence of)\b[^.;]*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Marker:
    """A marker mention: the name as written (upper case) and its polarity."""

    name: str
    polarity: str = _POS  # positive / negative / low


@dataclass(frozen=True)
class ParsedName:
    """Words (normalised, filler removed) and marker mentions of a name, in order."""

    text: str
    words: tuple[str, ...]
    markers: tuple[Marker, ...]
    all_words: tuple[str, ...] = ()  # words with the filler kept (for initials)
    acronyms: frozenset[str] = frozenset()  # words written like acronyms (``TEM``, ``Tcm``)
    numbers: tuple[str, ...] = ()  # digits and roman numerals, as digits (``II`` → ``2``)
    capitals: frozenset[str] = frozenset()  # words written with two or more capitals (``RGC``)

    @property
    def positive(self) -> tuple[str, ...]:
        """Names of the positive markers."""
        return tuple(m.name for m in self.markers if m.polarity == _POS)


def _polarity(suffix: str) -> str:
    s = suffix.lower().lstrip("-")
    if s in ("+", "++", "positive", "pos", "bright", "high", "hi"):
        return _POS
    if s in ("low", "lo", "dim", "int"):
        return _LOW
    return _NEG


@functools.lru_cache(maxsize=65536)
def normalise_word(word: str) -> str:
    """Lower case, singular, American spelling: ``"Haematopoietic"`` → ``"hematopoietic"``."""
    w = word.lower()
    for a, b in _SPELLING:
        if w.startswith(a):
            w = b + w[len(a) :]
    if len(w) > 3 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 3 and w.endswith("s") and not w.endswith(_NO_SINGULAR):
        w = w[:-1]
    return w


def parse_name(
    text: str,
    *,
    vocabulary: Iterable[str] | Callable[[str], bool] = (),
    is_gene: Callable[[str], bool] | None = None,
) -> ParsedName:
    """Split a cell-type name into words and marker mentions.

    Parameters
    ----------
    text
        A label (``"CD4+/CD25 T Reg"``, ``"FCGR3A+ Monocytes"``, ``"T_CD4"``) or a CL
        label/synonym (``"CD14-positive, CD16-low monocyte"``).
    vocabulary
        Cell-type words of the ontology (normalised) or a predicate; an unsigned token that is
        one of them is a word even when it is also a gene alias (``NK``, ``MK``, ``DC``).
    is_gene
        Predicate "is this a gene symbol or alias"; unsigned tokens it accepts become markers.

    Returns
    -------
    ParsedName
        ``parse_name("CD4+/CD25 T Reg")`` → words ``("t", "reg")``, markers
        ``(CD4 positive, CD25 positive)``.
    """
    vocab = vocabulary if callable(vocabulary) else frozenset(vocabulary).__contains__
    import unicodedata

    raw = text.replace("−", "-").replace("–", "-").replace("—", "-")
    raw = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode()
    words: list[str] = []
    all_words: list[str] = []
    acronyms: set[str] = set()
    capitals: set[str] = set()
    markers: list[Marker] = []
    numbers: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(raw):
        if m.start() < pos:
            continue
        tok = m.group(0).rstrip(".")
        if tok.isdigit():
            numbers.append(str(int(tok)))
            pos = m.start() + len(tok)
            continue
        end = m.start() + len(tok)
        rest = raw[end:]
        sm = _SUFFIX.match(rest)
        # "NK_CD56bright" / "CD16dim": a polarity glued to a token ending in a digit
        glued = re.match(r"^(.*\d)(bright|dim|high|hi|low|lo)$", tok, re.IGNORECASE)
        if glued and _CD.match(glued.group(1)):
            markers.append(Marker(glued.group(1).upper(), _polarity(glued.group(2))))
            pos = end
            continue
        key = normalise_word(tok)
        if sm and (sm.group(0) != "-" or _gene_shaped(tok)) and not _is_plain_word(tok, vocab):
            markers.append(Marker(tok.upper(), _polarity(sm.group(0))))
            pos = end + len(sm.group(0))
            continue
        if _CD.match(tok) or (
            not vocab(key)
            and key not in FILLER
            and (_GENE_LIKE.match(tok) and (is_gene is None or is_gene(tok)))
        ):
            markers.append(Marker(tok.upper(), _POS))
        else:
            glued = _TRAILING_DIGITS.match(tok)
            if glued:  # "ILC2", "AT1", "Lamp5": the word, then its number
                tok = glued.group(1)
                key = normalise_word(tok)
                numbers.append(str(int(glued.group(2))))
            if key in _ROMAN:
                numbers.append(_ROMAN[key])
                pos = end
                continue
            all_words.append(key)
            if key not in FILLER or (len(tok) == 1 and tok.isupper()):
                words.append(key)
                upper = sum(c.isupper() for c in tok)
                if tok.isalpha() and (upper >= 2 or (upper == 1 and len(tok) <= 3)):
                    acronyms.add(key)
                if upper >= 2:
                    capitals.add(key)
        pos = end
    return ParsedName(
        text,
        tuple(words),
        tuple(markers),
        tuple(all_words),
        frozenset(acronyms),
        tuple(numbers),
        frozenset(capitals),
    )


def _gene_shaped(tok: str) -> bool:
    return bool(_CD.match(tok) or _GENE_LIKE.match(tok) or any(c.isdigit() for c in tok))


def _is_plain_word(tok: str, vocab: Callable[[str], bool]) -> bool:
    """Lower-case words before ``-positive`` are still markers (``Kit-positive``); ``T-`` is not."""
    return len(tok) == 1 and tok.isalpha()


def extract_marker_mentions(
    text: str, *, is_gene: Callable[[str], bool] | None = None, negative: bool = False
) -> list[Marker]:
    """Positive (or, with ``negative``, absent) marker mentions in free text, in order, unique.

    Mentions inside a negating clause ("negative for CD3, CD19", "lacks CD4") or with a
    negative/low polarity (``CD14-low``, ``CD16-negative``) are not positive. With
    ``negative=True`` only the mentions stated as *absent* are returned: inside "negative for",
    "lacks", "does not express" ... clauses or written ``-negative``; low expression
    (``CD14-low``, "low levels of") is neither.

    Parameters
    ----------
    text
        Free text.
    is_gene
        Predicate for tokens without a digit (``GNLY``); without it only tokens with a digit or
        an explicit polarity count.
    negative
        Return the absent markers instead of the positive ones.
    """
    spans = [m.span() for m in _NEG_CLAUSE.finditer(text)]
    absent = [m.span() for m in _ABSENT_CLAUSE.finditer(text)]
    out: list[Marker] = []
    seen: set[str] = set()
    for m in _TOKEN.finditer(text):
        tok = m.group(0).rstrip(".")
        end = m.start() + len(tok)
        sm = _SUFFIX.match(text[end:].replace("−", "-"))
        polarity = _polarity(sm.group(0)) if sm else _POS
        if negative:  # stated absent, never written positive ("lacks CD3 and is CD56+")
            explicit_pos = sm is not None and polarity == _POS
            if polarity == _LOW or explicit_pos:
                continue
            if polarity != _NEG and not any(a <= m.start() < b for a, b in absent):
                continue
        elif polarity != _POS or any(a <= m.start() < b for a, b in spans):
            continue
        if not (tok[:1].isupper() or _CD.match(tok)):
            continue
        shaped = _CD.match(tok) or (_GENE_LIKE.match(tok) and any(c.isdigit() for c in tok))
        if not shaped and not (
            (sm is not None or _GENE_LIKE.match(tok)) and is_gene is not None and is_gene(tok)
        ):
            continue
        if tok.upper() not in seen:
            seen.add(tok.upper())
            out.append(Marker(tok.upper(), _NEG if negative else _POS))
    return out


class GeneNames:
    """Gene symbol/alias knowledge for marker matching.

    Parameters
    ----------
    official
        ``name -> official symbol`` (case-insensitive) or None.
    aliases
        ``name -> official symbols it is an alias of`` (empty when none).
    """

    def __init__(
        self,
        official: Callable[[str], str | None],
        aliases: Callable[[str], Sequence[str]],
    ) -> None:
        self._official, self._aliases = official, aliases
        self._memo: dict[str, tuple[str | None, frozenset[str]]] = {}

    @classmethod
    def from_table(cls, table: Any) -> GeneNames:
        """From a :class:`raypipe.genes.table.GeneTable` (``lookup_symbol``/``lookup_alias``)."""
        return cls(table.lookup_symbol, table.lookup_alias)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], symbols: Sequence[str]) -> GeneNames:
        """From ``(alias, symbol)`` pairs and the official symbols."""
        upper = {s.upper(): s for s in symbols}
        table: dict[str, list[str]] = {}
        for a, s in pairs:
            table.setdefault(a.upper(), []).append(s)
        return cls(lambda n: upper.get(n.upper()), lambda n: table.get(n.upper(), []))

    def _info(self, name: str) -> tuple[str | None, frozenset[str]]:
        key = name.upper()
        if key not in self._memo:
            off = self._official(name)
            self._memo[key] = (
                off.upper() if off else None,
                frozenset(s.upper() for s in self._aliases(name)),
            )
        return self._memo[key]

    def official(self, name: str) -> str | None:
        """Return the official symbol spelled ``name`` (upper case), or None."""
        return self._info(name)[0]

    def is_gene(self, name: str) -> bool:
        """Return True when ``name`` is an official symbol or an alias."""
        off, al = self._info(name)
        return bool(off or al)

    def symbols(self, name: str) -> list[str]:
        """Official symbols ``name`` stands for (itself when official, else its alias targets)."""
        off, al = self._info(name)
        return [off] if off else sorted(al)

    def same(self, a: str, b: str) -> bool:
        """Do two marker names mean the same gene? (``FCGR3A`` ~ ``CD16``; never two aliases)."""
        if a == b:
            return True
        oa, aa = self._info(a)
        ob, ab = self._info(b)
        return bool((oa and (oa == ob or oa in ab)) or (ob and ob in aa))


def acronym_words(word: str, initials: tuple[tuple[str, str], ...]) -> list[str] | None:
    """Return the words whose initials spell ``word``.

    Consecutive and in order (``CTL`` = cytotoxic T lymphocyte); or, in the lineage-first
    convention (``TEM``, ``Tcm``, ``Bmem``), a one-letter lineage word of the term followed by
    the rest in order (effector memory ... T cell).
    """
    letters = "".join(c for _, c in initials)
    i = letters.find(word)
    if i >= 0:
        return [w for w, _ in initials[i : i + len(word)]]
    lineage = [w for w, _ in initials if len(w) == 1 and w == word[0]]
    content = [(w, c) for w, c in initials if w not in FILLER]
    rest, letters = word[1:], "".join(c for _, c in content)
    if lineage and len(rest) >= 2 and (j := letters.find(rest)) >= 0:
        return [lineage[0], *(w for w, _ in content[j : j + len(rest)])]
    return None


def align_abbreviation(segments: list[str], words: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Align abbreviation segments to a contiguous run of words; return learned pairs."""
    segs = [s for s in segments if s.isalpha()]
    if not segs:
        return []
    for start in range(len(words)):
        got = _align_from(segs, words, start)
        if got is not None:
            return [(s.lower(), exp) for s, exp in got if len(s) >= 2]
    return []


def _align_from(
    segs: list[str], words: list[str], start: int
) -> list[tuple[str, tuple[str, ...]]] | None:
    if not segs:
        return []
    seg, rest = segs[0], segs[1:]
    low = seg.lower()
    options: list[tuple[tuple[str, ...], int]] = []
    n = len(low)
    if seg.isupper() and start + n <= len(words):
        run = words[start : start + n]
        if all(w and w[0] == c for w, c in zip(run, low, strict=True)):
            options.append((tuple(run), n))
    if start < len(words) and n >= 2 and _abbreviates(low, words[start]):
        options.append(((words[start],), 1))
    for exp, used in options:
        tail = _align_from(rest, words, start + used)
        if tail is not None:
            return [(seg, exp), *tail]
    return None


def _abbreviates(short: str, word: str) -> bool:
    """``mk`` abbreviates ``megakaryocyte``: same first letter, the rest in order."""
    if not word or short[0] != word[0] or len(short) >= len(word):
        return False
    i = 1
    for c in short[1:]:
        i = word.find(c, i) + 1
        if i == 0:
            return False
    return True
