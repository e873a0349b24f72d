"""Read cell-type names and Cell Ontology texts as *words* and *marker mentions*.

A cell-type name mixes two vocabularies: cell-type words (``B``, ``monocyte``, ``naive``,
``regulatory``) and marker genes with a polarity (``CD14+``, ``CD16-negative``,
``NK_CD56bright``, ``FCGR3A``). :func:`parse_name` splits any such string the same way for a
user's label and for a CL label/synonym, so both sides can be compared concept by concept:

* a marker is a token followed by a polarity (``+``, ``-positive``, ``-negative``, ``-low``,
  ``-high``, ``bright``/``dim``, a trailing ``-``), a ``CD<number>`` token, or a token that is
  a gene symbol/alias (``is_gene``) and not a cell-type word of the ontology (``vocabulary``);
  a marker written without polarity counts as positive (``CD4 T cells``, ``Mono_CD14``);
* everything else is a word: lower case, singular, British spellings made American
  (``haem`` → ``hem``, ``leuc`` → ``leuk``), split on ``_ / - , ( )`` and spaces; the filler
  word ``cell`` is dropped (``B`` and ``B cells`` are the same concept).

:func:`extract_marker_mentions` reads a free-text definition ("a monocyte that expresses CD14
and is negative for CD3, CD19") and keeps the positive mentions only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "FILLER",
    "Marker",
    "ParsedName",
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
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9.]*")
_CD = re.compile(r"^CD\d+[A-Za-z]{0,3}$", re.IGNORECASE)
_GENE_LIKE = re.compile(r"^[A-Z][A-Z0-9]*\d[A-Z0-9]*$|^[A-Z]{3,}[0-9]*[A-Z0-9]*$")
_NO_SINGULAR = ("ss", "us", "is", "os", "ys")
_SPELLING = (("haem", "hem"), ("leuc", "leuk"), ("oesin", "eosin"), ("foet", "fet"))
_NEG_CLAUSE = re.compile(
    r"\b(?:negative for|lacks?|lacking|does not express|do not express|not expressing|"
    r"low expression of|low levels? of|low responsiveness to|absence of|absent)\b[^.;]*",
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
    markers: list[Marker] = []
    pos = 0
    for m in _TOKEN.finditer(raw):
        if m.start() < pos:
            continue
        tok = m.group(0).rstrip(".")
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
            all_words.append(key)
            if key not in FILLER:
                words.append(key)
                upper = sum(c.isupper() for c in tok)
                if tok.isalpha() and (upper >= 2 or (upper == 1 and len(tok) <= 3)):
                    acronyms.add(key)
        pos = end
    return ParsedName(text, tuple(words), tuple(markers), tuple(all_words), frozenset(acronyms))


def _gene_shaped(tok: str) -> bool:
    return bool(_CD.match(tok) or _GENE_LIKE.match(tok) or any(c.isdigit() for c in tok))


def _is_plain_word(tok: str, vocab: Callable[[str], bool]) -> bool:
    """Lower-case words before ``-positive`` are still markers (``Kit-positive``); ``T-`` is not."""
    return len(tok) == 1 and tok.isalpha()


def extract_marker_mentions(
    text: str, *, is_gene: Callable[[str], bool] | None = None
) -> list[Marker]:
    """Positive marker mentions in free text (a CL definition), in order, unique.

    Mentions inside a negating clause ("negative for CD3, CD19", "lacks CD4") or with a
    negative/low polarity (``CD14-low``, ``CD16-negative``) are dropped.

    Parameters
    ----------
    text
        Free text.
    is_gene
        Predicate for tokens without a digit (``GNLY``); without it only tokens with a digit or
        an explicit polarity count.
    """
    spans = [m.span() for m in _NEG_CLAUSE.finditer(text)]
    out: list[Marker] = []
    seen: set[str] = set()
    for m in _TOKEN.finditer(text):
        tok = m.group(0).rstrip(".")
        if any(a <= m.start() < b for a, b in spans):
            continue
        end = m.start() + len(tok)
        sm = _SUFFIX.match(text[end:].replace("−", "-"))
        if sm and _polarity(sm.group(0)) != _POS:
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
            out.append(Marker(tok.upper(), _POS))
    return out
