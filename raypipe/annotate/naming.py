"""Name discovered clusters: GPTCelltype-style with an LLM, or offline from marker knowledge.

**With an LLM** (``annotate.discover.naming: llm``): one chat request per cluster through the
job's generation backend (:data:`raypipe.llm.generate.GENERATORS`: cached, rate-limited,
cost-accounted), the prompt :data:`NAMING_PROMPTS` (GPTCelltype, Hou & Ji 2024: the cluster's
top markers, the tissue, "only the cell type name"). An empty, multi-line or evasive answer is
a failure row and the cluster is named offline instead.

**Offline** (the default): :func:`raypipe.annotate.knowledge.name_offline` against
:func:`raypipe.annotate.knowledge.marker_knowledge`.

Backends are registered in :data:`NAMERS` (``annotate.discover.naming``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from raypipe.annotate.knowledge import MarkerKnowledge, name_offline
from raypipe.registry import Registry

if TYPE_CHECKING:
    from raypipe.annotate.ontology import Ontology
    from raypipe.config import JobConfig

__all__ = [
    "NAMERS",
    "NAMING_PROMPTS",
    "llm_cluster_names",
    "name_clusters_llm",
    "name_clusters_offline",
    "naming_prompt",
    "parse_name_answer",
]

#: Versioned prompts for naming one cluster (the version is part of the LLM cache key).
#: GPTCelltype's wording, one cluster per request.
NAMING_PROMPTS: dict[str, str] = {
    "celltype-v1": (
        "Identify the cell type of {tissue} cells using the following markers. Only provide "
        "the cell type name. Do not show numbers before the name. Some can be a mixture of "
        "multiple cell types.\n{markers}"
    ),
}
PROMPT_VERSION = "celltype-v1"

_EVASIVE = re.compile(
    r"\b(unknown|unclear|cannot|can't|unable|not sure|insufficient|undetermined|sorry)\b",
    re.IGNORECASE,
)


def parse_name_answer(text: str) -> tuple[str | None, str | None]:
    """Parse an LLM's cell-type name strictly.

    Returns
    -------
    (str or None, str or None)
        The name (list markers, quotes and a trailing period stripped), or None and why the
        answer is unusable: empty, several lines, longer than 12 words, or evasive ("unknown").
    """
    t = (text or "").strip()
    if not t:
        return None, "empty answer"
    lines = [ln for ln in t.splitlines() if ln.strip()]
    if len(lines) > 1:
        return None, f"several lines instead of one name ({len(lines)} lines)"
    name = re.sub(r"^\s*(?:\d+[.):]\s*|[-*•]\s*)", "", lines[0]).strip().strip("\"'`*").strip()
    name = name.rstrip(".").strip()
    if not name:
        return None, "empty answer"
    if len(name.split()) > 12:
        return None, f"not a cell-type name ({len(name.split())} words)"
    if _EVASIVE.search(name):
        return None, f"no cell type named ({name!r})"
    return name, None


def naming_prompt(markers: Sequence[str], tissue: str | None) -> str:
    """Return the GPTCelltype prompt for one cluster (:data:`NAMING_PROMPTS`)."""
    return NAMING_PROMPTS[PROMPT_VERSION].format(
        tissue=tissue or "human", markers=", ".join(markers)
    )


def llm_cluster_names(
    markers: Sequence[Sequence[str]], job: JobConfig, *, generator: Any = None
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """Ask the job's LLM once per cluster for a cell-type name (cached, rate-limited).

    Parameters
    ----------
    markers
        Per cluster, its top markers (``annotate.discover.prompt_markers`` of them).
    job
        The job (``llm``, ``limits``, ``cache``, ``annotate.tissue``).
    generator
        Inject a generator (default: :func:`raypipe.llm.generate.build_generator`).

    Returns
    -------
    (list of dict, list of dict, dict)
        Per cluster ``{prompt, answer, name, error}``; failure rows ``{stage, item, reason}``
        (the cluster falls back to the offline name); the generator's usage.
    """
    from raypipe.llm.generate import build_generator

    prompts = [naming_prompt(m, job.annotate.tissue) for m in markers]

    def validate(answer: str) -> str | None:
        return parse_name_answer(answer)[1]

    gen = generator if generator is not None else build_generator(job)
    try:
        results = gen.generate(prompts, version=PROMPT_VERSION, validate=validate)
        usage = dict(gen.usage())
    finally:
        if generator is None:
            gen.close()
    rows: list[dict[str, Any]] = []
    fails: list[dict[str, str]] = []
    for c, (prompt, r) in enumerate(zip(prompts, results, strict=True)):
        name, why = (None, r.error) if r.error else parse_name_answer(r.text or "")
        rows.append({"prompt": prompt, "answer": r.text or "", "name": name, "error": why or ""})
        if name is None:
            fails.append(
                {"stage": "annotate_discover_names", "item": f"cluster {c}", "reason": str(why)}
            )
    return rows, fails, usage


def name_clusters_offline(
    markers: Sequence[Sequence[str]],
    job: JobConfig,
    know: MarkerKnowledge,
    ontology: Ontology,
    **_: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """Offline naming of every cluster (:func:`name_offline`); no failures, no usage."""
    discover = job.annotate.discover
    rows = name_offline(
        markers,
        know,
        ontology,
        min_support=discover.min_support,
        min_genes=discover.min_marker_genes,
    )
    for r in rows:
        r.update(
            found_by="offline" if r["cl_id"] else "unassigned", name=None, prompt="", answer=""
        )
    return rows, [], {}


def name_clusters_llm(
    markers: Sequence[Sequence[str]],
    job: JobConfig,
    know: MarkerKnowledge,
    ontology: Ontology,
    *,
    generator: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """GPTCelltype naming (:func:`llm_cluster_names`); an unusable answer falls back offline."""
    n = job.annotate.discover.prompt_markers
    asked, fails, usage = llm_cluster_names([m[:n] for m in markers], job, generator=generator)
    offline, _, _ = name_clusters_offline(markers, job, know, ontology)
    rows: list[dict[str, Any]] = []
    for a, off in zip(asked, offline, strict=True):
        if a["name"] is not None:
            rows.append(
                {
                    "cl_id": None,  # mapped to CL by the caller, like any label
                    "name": a["name"],
                    "support": float("nan"),
                    "evidence": list(markers[len(rows)][:n]),
                    "runner_up": "",
                    "why": "",
                    "found_by": "llm",
                    "prompt": a["prompt"],
                    "answer": a["answer"],
                }
            )
        else:
            off = dict(off, prompt=a["prompt"], answer=a["answer"])
            off["found_by"] = f"{off['found_by']} (llm answer unusable: {a['error']})"
            rows.append(off)
    return rows, fails, usage


#: Naming backends (``annotate.discover.naming``): ``namer(markers, job, know, ontology) ->
#: (rows, fails, usage)``, one row per cluster.
NAMERS: Registry[Callable[..., Any]] = Registry("cluster naming")
NAMERS.add("offline", name_clusters_offline)
NAMERS.add("llm", name_clusters_llm)
