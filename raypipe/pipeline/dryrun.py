"""``raypipe run --dry-run``: the plan and the LLM cost estimate, calling nothing.

Counts the paid calls a run would make (gene descriptions, gene-text embeddings, GenePT-s
cell sentences), estimates their tokens (sentences from a sample of cells), and prices them
with the config's ``prices`` table at the configured rate limits. Results already in the LLM
cache are not charged again in a real run, so this is an upper bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["dry_run", "plan_estimates"]

SENTENCE_SAMPLE = 2000


def _atlas_shape(job: JobConfig) -> tuple[int, list[str], Any]:
    """Cells, gene names and a function reading a sample of rows, without ingesting."""
    import zarr
    from anndata.io import read_elem, sparse_dataset

    from raypipe.atlas.ingest import resolve_input_path
    from raypipe.errors import InputError

    src = resolve_input_path(job.input.path)
    if not src.exists():
        raise InputError(f"input file {src} does not exist", fix="check input.path")
    if src.is_dir():
        group: Any = zarr.open_group(str(src), mode="r")
    else:
        import h5py

        group = h5py.File(src, "r")
    if job.input.layer == "raw" and "raw" in group:
        x_elem, var = group["raw"]["X"], read_elem(group["raw"]["var"])
    elif "raw.X" in group:  # legacy layout
        import anndata as ad

        adata = ad.read_h5ad(src)
        adata = (
            adata.raw.to_adata() if job.input.layer == "raw" and adata.raw is not None else adata
        )
        return adata.n_obs, [str(v) for v in adata.var_names], lambda n: adata.X[:n]
    else:
        x_elem, var = group["X"], read_elem(group["var"])
    x = (
        sparse_dataset(x_elem)
        if dict(x_elem.attrs).get("encoding-type") == "csr_matrix"
        else x_elem
    )
    return int(x.shape[0]), [str(v) for v in var.index], lambda n: x[:n]


def plan_estimates(job: JobConfig, shape: tuple[int, list[str], Any] | None = None) -> list[Any]:
    """Return :class:`raypipe.llm.cost.Estimate` rows for every paid step of the run."""
    import scipy.sparse as sp

    from raypipe.embed.genept_s import cell_sentences
    from raypipe.llm.cost import estimate

    n_cells, genes, sample = shape or _atlas_shape(job)
    lim, prices = job.limits, {k: v.model_dump() for k, v in job.prices.items()}
    rows = []
    budget: dict[str, Any] = {
        "prices": prices,
        "requests_per_minute": lim.requests_per_minute,
        "tokens_per_minute": lim.tokens_per_minute,
    }
    if job.genes.text_source == "llm":
        from raypipe.genes.llm_source import render_prompt

        prompts = [render_prompt(job.llm.prompt_version, g) for g in genes]
        rows.append(
            (
                "gene descriptions (chat)",
                estimate(
                    prompts,
                    model=job.llm.model,
                    **budget,
                    max_tokens_out=job.llm.max_tokens,
                ),
            )
        )
        gene_texts = ["x" * (3 * job.llm.max_tokens)] * len(genes)
    else:
        gene_texts = [f"{g}: " + "x" * 600 for g in genes]  # ~200 tokens per gene text
    batch = job.text_model.batch_size
    rows.append(
        (
            "gene-text embeddings",
            estimate(
                gene_texts,
                model=job.text_model.model,
                **budget,
                items_per_call=batch,
            ),
        )
    )
    if "genept_s" in job.embed.methods:
        block = sp.csr_matrix(sample(min(n_cells, SENTENCE_SAMPLE)))
        sents = cell_sentences(block, np.asarray(genes), job.embed.genept_s.top_n)
        scale = n_cells / max(len(sents), 1)
        est = estimate(
            sents,
            model=job.text_model.model,
            **budget,
            items_per_call=batch,
        )
        est = type(est)(
            est.model,
            int(est.items * scale),
            int(np.ceil(est.calls * scale)),
            int(est.tokens_in * scale),
            int(est.tokens_out * scale),
            None if est.cost_usd is None else est.cost_usd * scale,
            est.time_s * scale,
        )
        rows.append(("GenePT-s cell sentences", est))
    return rows


def dry_run(job: JobConfig) -> str:
    """Render the plan and estimates as text."""
    shape = _atlas_shape(job)
    rows = plan_estimates(job, shape)
    n_cells, genes, _ = shape
    lines = [
        f"dry run: {job.input.path} — {n_cells:,} cells × {len(genes):,} genes → {Path(job.output_dir)}",
        f"methods: {', '.join(job.embed.methods)}; shards of ~{job.shards.rows} rows; "
        f"text model {job.text_model.backend}:{job.text_model.model}",
    ]
    paid = {"openai"}
    for what, est in rows:
        backend = job.llm.backend if "chat" in what else job.text_model.backend
        note = "" if backend in paid else f"  (backend {backend}: no API cost)"
        lines.append(f"- {what}: {est.format()}{note}")
    lines.append("nothing was called; results already in the cache will not be paid again")
    return "\n".join(lines)
