"""GenePT-s on Ray Data: per shard, cell sentences → the text-embedding backend → parquet.

Each actor builds the run's embedder once (``local`` MiniLM, ``openai`` with the cluster-wide
rate limiter and the shared cache, or ``vllm``). Identical sentences are embedded once; cells
whose sentence could not be embedded get a zero vector flagged ``empty`` and a row in
``failures.parquet``; each shard's marker records the LLM usage it caused.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from raypipe.config import config_hash
from raypipe.pipeline.stage import ShardStage

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo, Shard
    from raypipe.config import JobConfig
    from raypipe.genes.space import GeneSpace
    from raypipe.pipeline.methods import StagePlan

__all__ = ["GenePTS", "build_genept_s"]

log = logging.getLogger(__name__)

PAID_BACKENDS = ("openai",)


class GenePTS(ShardStage):
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
        from raypipe.embed.genept_w import _resolve
        from raypipe.llm.backends import build_embedder

        super().__init__(**kwargs)
        self.embedder = build_embedder(JobConfig.model_validate(json.loads(job_json)))
        self.collapse = _resolve(collapse)
        self.symbols = np.asarray(symbols)
        self.x_kind, self.top_n = x_kind, top_n
        self._seen: dict[str, dict[str, int]] = {}
        self._last_failures: list[dict[str, str]] = []

    def compute(self, x: sp.csr_matrix, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Sentences of the shard's cells, embedded and L2-normalised."""
        from raypipe.embed.genept_s import cell_sentences, embed_sentences
        from raypipe.embed.genept_w import log_normalize

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
        from raypipe.embed.text_stage import usage_delta

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

    from raypipe.pipeline.execute import StageSpec
    from raypipe.pipeline.methods import StagePlan, stage_hash

    cfg = job.embed.genept_s
    notes: dict[str, Any] = {
        "top_n": cfg.top_n,
        "backend": job.text_model.backend,
        "model": job.text_model.model,
    }
    if job.text_model.backend in PAID_BACKENDS and atlas.n_obs > cfg.warn_calls:
        from raypipe.pipeline.dryrun import plan_estimates

        est = dict(plan_estimates(job)).get("GenePT-s cell sentences")
        if est is not None:
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
    remote = job.text_model.backend != "local"
    actors = job.limits.actors if remote else job.ray.actors
    gpus = job.text_model.num_gpus if job.text_model.backend == "vllm" else 0.0
    return StagePlan(
        [StageSpec(GenePTS, kwargs, actors, job.ray.actor_cpus, gpus)], fingerprint, notes=notes
    )
