"""GenePT-s: each cell as a sentence of gene symbols, embedded by the text model.

A cell's sentence lists its genes by decreasing normalised expression (zeros omitted, ties
broken by column order, truncated to the top N) joined by spaces. Sentences are deduplicated
before embedding (identical cells pay once) and go through the text embedder, which for the
``openai`` backend is cached, rate-limited and isolates failures per sentence.

On Ray (:class:`GenePTS`): each actor builds the run's embedder once (``local`` MiniLM,
``openai`` with the cluster-wide rate limiter and the shared cache, or ``vllm``). Cells whose
sentence could not be embedded get a zero vector flagged ``empty`` and a row in
``failures.parquet``; each shard's marker records the LLM usage it caused.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from raypipe.atlas.store import AtlasShardStage
from raypipe.config import config_hash
from raypipe.core.expression import log_normalize
from raypipe.core.plan import StagePlan, StageSpec, resolve, stage_hash
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard
    from raypipe.genes.space import GeneSpace

__all__ = [
    "GenePTS",
    "build_genept_s",
    "cell_sentences",
    "embed_sentences",
    "estimate_cost",
    "genept_s",
]

log = logging.getLogger(__name__)

TOKENS_PER_SYMBOL = 3  # a gene symbol + its separating space, in BPE tokens (conservative)


def cell_sentences(
    X_norm: sp.csr_matrix | np.ndarray, symbols: np.ndarray, top_n: int
) -> list[str]:
    """Write each cell as its top-``top_n`` expressed gene symbols.

    Parameters
    ----------
    X_norm
        (n_cells, n_genes) normalised expression (e.g. counts scaled to 1e4 then log1p; any
        monotone transform of counts/total gives the same order). CSR or dense.
    symbols
        (n_genes,) gene symbols, in column order.
    top_n
        Genes per sentence.

    Returns
    -------
    list of str
        One sentence per cell; ``""`` for a cell with no expressed gene.
    """
    symbols = np.asarray(symbols).astype(str)
    if X_norm.shape[1] != len(symbols):
        raise InputError(
            f"GenePT-s: matrix has {X_norm.shape[1]} genes but {len(symbols)} symbols were given",
            fix="pass var symbols in the matrix's column order",
        )
    if top_n <= 0:
        raise InputError(
            f"GenePT-s: top_n must be > 0 (got {top_n})", fix="set embed.genept_s.top_n"
        )
    X = sp.csr_matrix(X_norm, copy=False)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    out: list[str] = []
    indptr, indices, data = X.indptr, X.indices, X.data
    for i in range(X.shape[0]):
        lo, hi = indptr[i], indptr[i + 1]
        vals, cols = data[lo:hi], indices[lo:hi]
        keep = vals > 0
        vals, cols = vals[keep], cols[keep]
        order = np.lexsort((cols, -vals))[:top_n]  # by value desc, then column asc
        out.append(" ".join(symbols[cols[order]]))
    return out


def embed_sentences(sentences: list[str], embedder: Any) -> tuple[np.ndarray, np.ndarray]:
    """Embed sentences once each; L2-normalise.

    Parameters
    ----------
    sentences
        One per cell (``""`` = no expressed gene: not sent, flagged failed).
    embedder
        A text embedder (:class:`raypipe.llm.backends.TextEmbedder`); failures are isolated
        per sentence where the backend can (the ``openai`` backend).

    Returns
    -------
    (embeddings, failed)
        float32 (n_cells, d) unit rows (zero rows where failed) and bool (n_cells,).
    """
    unique = list(dict.fromkeys(s for s in sentences if s))
    res = embedder.embed_detailed(unique)
    vecs, ok = res.vectors, res.ok
    d = vecs.shape[1] if vecs.ndim == 2 else 0
    norms = np.linalg.norm(vecs, axis=1, keepdims=True) if len(unique) else np.zeros((0, 1))
    ok = ok & (norms[:, 0] > 0)
    vecs = np.where(ok[:, None], vecs / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
    pos = {s: i for i, s in enumerate(unique)}
    emb = np.zeros((len(sentences), d), np.float32)
    failed = np.ones(len(sentences), bool)
    for i, s in enumerate(sentences):
        j = pos.get(s)
        if j is not None and ok[j]:
            emb[i], failed[i] = vecs[j], False
    return emb, failed


def genept_s(
    X_norm: sp.csr_matrix | np.ndarray, symbols: np.ndarray, embedder: Any, *, top_n: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """GenePT-s embeddings of a block of cells.

    Returns
    -------
    (embeddings, failed, sentences)
        See :func:`embed_sentences` and :func:`cell_sentences`.
    """
    sentences = cell_sentences(X_norm, symbols, top_n)
    emb, failed = embed_sentences(sentences, embedder)
    return emb, failed, sentences


class GenePTS(AtlasShardStage):
    """Ray Data stage: shard specs → ``embeddings/genept_s/part-*.parquet``.

    Batch contract: in ``shard, start, stop, content_hash``; out the shard-stage summary.
    """

    method: ClassVar[str] = "genept_s"

    def __init__(
        self,
        *,
        job_json: str,
        collapse: Any,
        symbols: list[str],
        x_kind: str,
        top_n: int,
        **kwargs: Any,
    ) -> None:
        from raypipe.config import JobConfig
        from raypipe.llm.backends import build_embedder

        super().__init__(**kwargs)
        self.embedder = build_embedder(JobConfig.model_validate(json.loads(job_json)))
        self.collapse = resolve(collapse)
        self.symbols = np.asarray(symbols)
        self.x_kind, self.top_n = x_kind, top_n
        self._seen: dict[str, dict[str, int]] = {}
        self._last_failures: list[dict[str, str]] = []

    def compute(self, x: sp.csr_matrix, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Sentences of the shard's cells, embedded and L2-normalised."""
        if self.x_kind == "counts":
            xl = log_normalize(x @ self.collapse, np.asarray(x.sum(axis=1)).ravel(), 1e4)
        else:
            xl = sp.csr_matrix(x @ self.collapse)
        sentences = cell_sentences(xl, self.symbols, self.top_n)
        emb, failed = embed_sentences(sentences, self.embedder)
        self._last_failures = [
            {
                "stage": "genept_s",
                "item": f"row {start + i}",
                "reason": "no expressed gene" if not s else "embedding failed",
            }
            for i, s in enumerate(sentences)
            if failed[i]
        ]
        return emb, failed

    def marker_extra(self) -> dict[str, Any]:
        """LLM usage and failed cells of the shard just written."""
        from raypipe.llm.text_stage import usage_delta

        transient = any(f["reason"] != "no expressed gene" for f in self._last_failures)
        return {
            "usage": usage_delta(self.embedder, self._seen),
            "failures": self._last_failures,
            "retry": transient,  # the next run recomputes this shard; the cache makes the rest free
        }


def build_genept_s(
    job: JobConfig, atlas: AtlasInfo, genes: GeneSpace, shards: list[Shard]
) -> StagePlan:
    """Plan GenePT-s; warn with a cost estimate before a large paid run."""
    import ray

    from raypipe.llm.backends import EMBEDDERS, embedder_resources

    cfg = job.embed.genept_s
    notes: dict[str, Any] = {
        "top_n": cfg.top_n,
        "backend": job.text_model.backend,
        "model": job.text_model.model,
    }
    if EMBEDDERS.capabilities(job.text_model.backend).paid and atlas.n_obs > cfg.warn_calls:
        est = estimate_cost(job, atlas.n_obs)
        msg = f"GenePT-s will embed up to {atlas.n_obs:,} cell sentences: {est.format()}"
        log.warning(msg)
        notes["cost_estimate"] = msg
    fingerprint = stage_hash(
        "genept_s",
        config_hash(cfg),
        genes.fingerprint,
        atlas.x_kind,
        job.text_model.backend,
        job.text_model.model,
        job.text_model.dimensions,
    )
    kwargs = {
        "atlas_path": atlas.path,
        "out_dir": job.output_dir,
        "fingerprint": fingerprint,
        "metadata": {"model": job.text_model.model, "backend": job.text_model.backend},
        "job_json": job.model_dump_json(),
        "collapse": ray.put(genes.collapse),
        "symbols": list(genes.resolution.unique_symbols),
        "x_kind": atlas.x_kind,
        "top_n": cfg.top_n,
    }
    actors, gpus = embedder_resources(job)
    return StagePlan(
        [StageSpec(GenePTS, kwargs, actors, job.ray.actor_cpus, gpus)], fingerprint, notes=notes
    )


def estimate_cost(job: JobConfig, n_cells: int, sample: list[str] | None = None) -> Any:
    """Estimate the paid embedding calls of GenePT-s without calling anything.

    Parameters
    ----------
    job
        The job config (text model, limits, prices).
    n_cells
        Cells in the atlas (one sentence each).
    sample
        Sentences of a sample of cells (the dry run writes them); without it, every sentence
        is taken to be ``top_n`` symbols long (metadata only: planning reads no expression).

    Returns
    -------
    raypipe.llm.cost.Estimate
        Scaled to ``n_cells``.
    """
    from raypipe.llm.cost import Estimate, estimate

    cfg, lim = job.embed.genept_s, job.limits
    sents = sample or ["x" * (3 * TOKENS_PER_SYMBOL * cfg.top_n)]
    est = estimate(
        sents,
        model=job.text_model.model,
        prices={k: v.model_dump() for k, v in job.prices.items()},
        requests_per_minute=lim.requests_per_minute,
        tokens_per_minute=lim.tokens_per_minute,
        items_per_call=job.text_model.batch_size,
    )
    scale = n_cells / max(len(sents), 1)
    return Estimate(
        est.model,
        int(est.items * scale),
        int(np.ceil(est.calls * scale)),
        int(est.tokens_in * scale),
        int(est.tokens_out * scale),
        None if est.cost_usd is None else est.cost_usd * scale,
        est.time_s * scale,
    )
