"""``raypipe run --dry-run``: the plan and the LLM cost estimate, calling nothing.

Counts the paid calls a run would make (gene descriptions, gene-text embeddings, GenePT-s
cell sentences, LLM marker lists of the annotation candidates), estimates their tokens (sentences from a sample of cells), and prices them
with the config's ``prices`` table at the configured rate limits. Each stage owns its
estimate (:func:`raypipe.genes.space.estimate_costs`,
:func:`raypipe.embed.genept_s.estimate_cost`); this module only composes them. Results already
in the LLM cache are not charged again in a real run, so this is an upper bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["dry_run", "plan_estimates"]

SENTENCE_SAMPLE = 2000


def plan_estimates(job: JobConfig) -> tuple[int, list[str], list[tuple[str, Any]]]:
    """Return ``(n_cells, gene names, [(step, Estimate)])`` for every paid step of the run."""
    from raypipe.embed.genept_s import cell_sentences, estimate_cost
    from raypipe.genes.space import estimate_costs

    with _source(job) as src:
        n_cells, genes = src.n_obs, [str(v) for v in src.var.index]
        rows = estimate_costs(job, genes)
        ann = job.annotate
        if ann.enabled and ann.llm_markers:
            from raypipe.annotate.markers import estimate_cost as marker_cost

            auto = ann.candidates == "auto"  # discovered names exist only after clustering
            names = [] if auto else list(ann.candidates)
            if not names and not auto and job.input.label_key in src.obs.columns:
                names = sorted({str(v) for v in src.obs[job.input.label_key].dropna()})
            rows.append(("candidate markers (chat)", marker_cost(job, names)))
        if "genept_s" in job.embed.methods:
            block = src.rows(0, min(n_cells, SENTENCE_SAMPLE))
            sents = cell_sentences(block, np.asarray(genes), job.embed.genept_s.top_n)
            rows.append(("GenePT-s cell sentences", estimate_cost(job, n_cells, sents)))
    return n_cells, genes, rows


@contextmanager
def _source(job: JobConfig) -> Iterator[Any]:
    """Open the input's rows, var and label column (a SOMA input: its selected cells)."""
    from raypipe.atlas.reader import open_source
    from raypipe.atlas.soma import SomaRows, is_soma_input, resolve_selection

    if not is_soma_input(job.input.path):
        with open_source(job.input.path, job.input.layer) as src:
            yield src
        return
    keys = [job.input.label_key] if job.input.label_key else []
    sel = resolve_selection(job.input.path, job.input.soma, keys)
    rows = SomaRows(sel.source, sel.joinids)
    yield SimpleNamespace(
        n_obs=sel.joinids.size, var=sel.var, obs=rows.read_obs(keys, sel.joinids), rows=rows.rows
    )


def dry_run(job: JobConfig) -> str:
    """Render the plan and estimates as text."""
    from raypipe.llm.backends import EMBEDDERS
    from raypipe.llm.generate import GENERATORS

    n_cells, genes, rows = plan_estimates(job)
    lines = [
        f"dry run: {job.input.path} — {n_cells:,} cells × {len(genes):,} genes → {Path(job.output_dir)}",
        f"methods: {', '.join(job.embed.methods)}; shards of ~{job.shards.rows} rows; "
        f"text model {job.text_model.backend}:{job.text_model.model}",
    ]
    for what, est in rows:
        chat = "chat" in what
        backend = job.llm.backend if chat else job.text_model.backend
        paid = (GENERATORS if chat else EMBEDDERS).capabilities(backend).paid
        note = "" if paid else f"  (backend {backend}: no API cost)"
        lines.append(f"- {what}: {est.format()}{note}")
    lines.append("nothing was called; results already in the cache will not be paid again")
    return "\n".join(lines)
