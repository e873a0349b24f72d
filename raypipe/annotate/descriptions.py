"""LLM-written candidate descriptions (``annotate.llm_descriptions``), as in scELMo.

One cached, cost-accounted chat request per candidate through
:data:`raypipe.llm.generate.GENERATORS` asks for a 2–3 sentence description of the cell type
(its CL term, in ``annotate.tissue`` of ``genes.species``): what it is, where it lives, which
genes it expresses. The answer is checked (plain prose of one to four sentences, 60–800
characters, not a refusal) and appended to the candidate's text — the text the ``text``
scorer embeds — after the CL definition (:func:`raypipe.annotate.candidates.candidate_text`).
An unusable answer is a failure row (``failures.parquet``, stage ``annotate_llm_descriptions``)
and that candidate keeps its ontology text; nothing is silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["DESCRIPTION_PROMPTS", "check_description", "descriptions_for_job", "llm_descriptions"]

#: Versioned prompt (part of the cache key).
DESCRIPTION_PROMPTS: dict[str, str] = {
    "descriptions-v1": (
        "Describe the cell type '{name}' ({cl}) as found in {species} {tissue}, in 2 to 3 "
        "sentences of plain prose for a single-cell RNA-seq annotation: what the cell is and "
        "does, where it sits, and the genes it characteristically expresses. No lists, no "
        "headings, no preamble."
    ),
}
_REFUSAL = re.compile(r"\b(I'm sorry|I cannot|I can't|as an AI)\b", re.IGNORECASE)


def check_description(text: str) -> str | None:
    """Return why an answer is not a usable description, or None when it is."""
    t = (text or "").strip()
    if not t:
        return "empty answer"
    if _REFUSAL.search(t):
        return "a refusal, not a description"
    if re.search(r"^\s*(?:[-*•]|\d+[.)]|#)", t, re.MULTILINE):
        return "a list or headings, not 2-3 sentences of prose"
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", t) if s.strip()]
    if not 1 <= len(sentences) <= 4 or not 60 <= len(t) <= 800:
        return f"{len(sentences)} sentences / {len(t)} characters; want 2-3 sentences"
    return None


def llm_descriptions(
    candidates: Sequence[tuple[str, str, str | None]],
    job: JobConfig,
    *,
    generator: Any = None,
) -> tuple[dict[str, str], list[dict[str, str]], dict[str, Any]]:
    """Ask the job's LLM once per candidate for a short description (cached).

    Parameters
    ----------
    candidates
        ``(label, name for the prompt, CL id or None)`` per candidate.
    job
        The job config (``llm``, ``limits``, ``cache``, ``annotate.tissue``, ``genes.species``).
    generator
        Inject a generator (default: :func:`raypipe.llm.generate.build_generator`).

    Returns
    -------
    (dict, list of dict, dict)
        Label → description (usable answers only); failure rows ``{stage, item, reason}``;
        the generator's usage.
    """
    from raypipe.llm.generate import build_generator

    version = "descriptions-v1"
    prompts = [
        DESCRIPTION_PROMPTS[version].format(
            name=name,
            cl=cl or "no Cell Ontology id",
            species=job.genes.species,
            tissue=job.annotate.tissue or "tissue",
        )
        for _, name, cl in candidates
    ]
    gen = generator if generator is not None else build_generator(job)
    try:
        results = gen.generate(prompts, version=version, validate=check_description)
        usage = dict(gen.usage())
    finally:
        if generator is None:
            gen.close()
    found: dict[str, str] = {}
    fails: list[dict[str, str]] = []
    for (label, _, _), r in zip(candidates, results, strict=True):
        why = r.error or check_description(r.text or "")
        if why is None and r.text:
            found[label] = r.text.strip()
        else:
            fails.append({"stage": "annotate_llm_descriptions", "item": label, "reason": str(why)})
    return found, fails, usage


def descriptions_for_job(
    job: JobConfig, mappings: Sequence[Any], out_dir: Any
) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """Describe a run's candidates (``annotate.llm_descriptions``); failures to their file.

    Returns
    -------
    (dict, list of str, dict)
        Label → description, warnings for the summary, the generator's usage. Failures are
        written to ``state/failures/annotate_descriptions.parquet`` (merged into
        ``failures.parquet``); a clean re-run removes a stale file.
    """
    from raypipe.genes.space import record_failures

    asks = [(m.label, m.cl_label or m.label, m.cl_id) for m in mappings]
    found, fails, usage = llm_descriptions(asks, job)
    warnings: list[str] = []
    record_failures(out_dir, "annotate_descriptions", fails)
    if fails:
        warnings.append(
            f"LLM descriptions failed for {len(fails)} candidate(s): "
            + ", ".join(f["item"] for f in fails)
            + " (see failures.parquet); they keep their ontology text"
        )
    return found, warnings, usage
