"""Marker genes per candidate, from knowledge, in order of trust.

1. **config**: ``annotate.markers`` (weight 1 each);
2. **llm**: with ``annotate.llm_markers``, one cached, cost-accounted chat request per candidate
   through :data:`raypipe.llm.generate.GENERATORS` asking for canonical positive markers of the
   CL term in ``annotate.tissue``; the answer is parsed strictly (a comma-separated list of
   gene symbols) and every name resolved through gene aliases; an answer naming no known gene
   is a failure row (``failures.parquet``), never silently empty markers;
3. **marker_db**: a curated resource (``annotate.marker_db``, :mod:`raypipe.annotate.marker_db`:
   PanglaoDB), its cell types mapped to CL terms once;
4. **ontology**: markers named positively in the term's label/synonyms (weight 1), its
   definition and its ancestors' names (1), and its descendants' labels/synonyms (0.5 × the
   share of descendants stating them; under 5% dropped).

**Negative markers** (weight −1): a config marker written ``GENE-``, and every marker the term's
names or definition state as absent (``CD16-negative``, "lacks CD3", "negative for CD19"; low
expression, ``CD14-low``, is not absence) — the ``markers`` scorer subtracts their signature
score, times ``annotate.negative_markers``.

Gene weights are then made specific (:func:`specificity_weights`): a candidate's weight for a
gene is multiplied by its share of the weight all candidates give that gene (a marker every
candidate shares equally tells none apart), so the markers scorer is a weighted UCell.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raypipe.annotate.mapping import LabelMapper

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = [
    "MARKER_PROMPTS",
    "MarkerSet",
    "estimate_cost",
    "llm_markers",
    "ontology_markers",
    "parse_marker_answer",
    "specificity_weights",
]

#: Versioned prompt for LLM markers (part of the cache key).
MARKER_PROMPTS: dict[str, str] = {
    "markers-v1": (
        "List the canonical positive marker genes of the cell type '{name}' ({cl}) in human "
        "{tissue}, as used to annotate single-cell RNA-seq data. Answer with 5 to 10 official "
        "HGNC gene symbols separated by commas, on one line, and nothing else."
    ),
}

_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9.\-]{0,19}$")
_MAX_MARKERS = 25


@dataclass
class MarkerSet:
    """One candidate's markers: names as found, weights, where each came from."""

    names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def add(self, name: str, weight: float, source: str) -> None:
        """Add a marker (keeps the highest weight when it is already there)."""
        key = name.upper()
        for i, n in enumerate(self.names):
            if n.upper() == key:
                if weight > self.weights[i]:
                    self.weights[i], self.sources[i] = weight, source
                return
        self.names.append(name)
        self.weights.append(weight)
        self.sources.append(source)


def ontology_markers(mapper: LabelMapper, term_id: str) -> MarkerSet:
    """Markers the Cell Ontology states or implies for one term (see the module docstring)."""
    out = MarkerSet()
    for name in sorted(mapper.stated_markers(term_id)):
        out.add(name, 1.0, "ontology:term")
    for name in sorted(mapper.implied_markers(term_id)):
        out.add(name, 1.0, "ontology:definition/ancestors")
    below = mapper.descendant_markers(term_id)
    n_desc = max(len(mapper.ontology.descendants(term_id)), 1)
    for name, count in sorted(below.items(), key=lambda kv: (-kv[1], kv[0])):
        share = count / n_desc
        if share >= 0.05:  # a marker one descendant in 40 states says little about the term
            out.add(name, 0.5 * share, "ontology:descendants")
    return out


def specificity_weights(
    genes_per_candidate: Sequence[Mapping[str, float]],
) -> list[dict[str, float]]:
    """Weight each gene by the candidate's share of it; keep the top ones.

    Parameters
    ----------
    genes_per_candidate
        Per candidate, atlas gene symbol → weight.

    Returns
    -------
    list of dict
        Per candidate, gene → ``w_c(g) · w_c(g) / Σ_c' w_c'(g)``, at most 25 genes each: a gene
        stated by one candidate keeps its weight; one two candidates state equally halves.
    """
    total: dict[str, float] = {}
    for genes in genes_per_candidate:
        for g, v in genes.items():
            total[g] = total.get(g, 0.0) + v
    out = []
    for genes in genes_per_candidate:
        w = {g: v * v / total[g] for g, v in genes.items() if total[g] > 0}
        top = sorted(w.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_MARKERS]
        out.append(dict(top))
    return out


def parse_marker_answer(
    text: str, known: Callable[[str], bool]
) -> tuple[list[str] | None, str | None]:
    """Parse an LLM marker answer strictly.

    Parameters
    ----------
    text
        The answer: gene symbols separated by commas (one line; a trailing period allowed).
    known
        Predicate "is this a known gene symbol or alias".

    Returns
    -------
    (list of str or None, str or None)
        The symbols, or None and the reason the answer is unusable (empty, prose instead of a
        list, or no known gene named).
    """
    t = (text or "").strip().strip(".").strip()
    if not t:
        return None, "empty answer"
    if "\n" in t:
        t = t.replace("\n", ",")
    items = [x.strip().strip(".*-•").strip() for x in t.split(",")]
    items = [x for x in items if x]
    bad = [x for x in items if not _SYMBOL.match(x)]
    if bad or not items:
        return None, f"not a comma-separated list of gene symbols (e.g. {bad[:2]})"
    genes = [x for x in items if known(x)]
    if not genes:
        return None, f"names no known gene ({', '.join(items[:5])})"
    return list(dict.fromkeys(genes)), None


def llm_markers(
    candidates: Sequence[tuple[str, str, str | None]],
    job: JobConfig,
    known: Callable[[str], bool],
    *,
    generator: Any = None,
) -> tuple[dict[str, list[str]], list[dict[str, str]], dict[str, Any]]:
    """Ask the job's LLM once per candidate for canonical positive markers (cached).

    Parameters
    ----------
    candidates
        ``(label, name for the prompt, CL id or None)`` per candidate.
    job
        The job config (``llm``, ``limits``, ``cache``, ``annotate.tissue``).
    known
        Predicate "is this a known gene symbol or alias" for the strict parse.
    generator
        Inject a generator (default: :func:`raypipe.llm.generate.build_generator`).

    Returns
    -------
    (dict, list of dict, dict)
        Label → marker symbols (only candidates with a usable answer); failure rows
        ``{stage, item, reason}``; the generator's usage (calls, tokens, cache hits).
    """
    from raypipe.llm.generate import build_generator

    version = "markers-v1"
    tissue = job.annotate.tissue or "tissue"
    prompts = [
        MARKER_PROMPTS[version].format(name=name, cl=cl or "no Cell Ontology id", tissue=tissue)
        for _, name, cl in candidates
    ]

    def validate(answer: str) -> str | None:
        return parse_marker_answer(answer, known)[1]

    gen = generator if generator is not None else build_generator(job)
    try:
        results = gen.generate(prompts, version=version, validate=validate)
        usage = dict(gen.usage())
    finally:
        if generator is None:
            gen.close()
    found: dict[str, list[str]] = {}
    fails: list[dict[str, str]] = []
    for (label, _, _), r in zip(candidates, results, strict=True):
        genes, why = (None, r.error) if r.error else parse_marker_answer(r.text or "", known)
        if genes:
            found[label] = genes
        else:
            fails.append({"stage": "annotate_llm_markers", "item": label, "reason": str(why)})
    return found, fails, usage


def estimate_cost(job: JobConfig, names: Sequence[str]) -> Any:
    """Estimate the LLM marker requests (one chat call per candidate) without calling anything.

    Returns
    -------
    raypipe.llm.cost.Estimate
    """
    from raypipe.llm.cost import estimate

    tissue = job.annotate.tissue or "tissue"
    prompts = [
        MARKER_PROMPTS["markers-v1"].format(name=n, cl="CL:0000000", tissue=tissue) for n in names
    ]
    lim = job.limits
    return estimate(
        prompts,
        model=job.llm.model,
        prices={k: v.model_dump() for k, v in job.prices.items()},
        requests_per_minute=lim.requests_per_minute,
        tokens_per_minute=lim.tokens_per_minute,
        max_tokens_out=job.llm.max_tokens,
    )
