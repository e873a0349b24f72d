"""The embedding-method registry (``embed.methods``): each builds its shard stage on the driver.

A builder gets the job, the atlas, the gene space and the shard plan and returns a
:class:`StagePlan`: the stage class, its constructor kwargs (big payloads as ObjectRefs), the
fingerprint that keys its outputs, and the resources its actors need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.config import config_hash
from raypipe.pipeline.execute import StageSpec, map_shards
from raypipe.registry import Registry

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo, Shard
    from raypipe.config import JobConfig
    from raypipe.genes.space import GeneSpace

__all__ = ["METHODS", "StagePlan", "build_genept_w", "stage_hash"]


@dataclass
class StagePlan:
    """How to run one method over the shards: its chained steps and output fingerprint."""

    steps: list[StageSpec]
    fingerprint: str
    kind: str = "embeddings"
    notes: dict[str, Any] = field(default_factory=dict)


METHODS: Registry[Any] = Registry("embedding method")


def stage_hash(*parts: object) -> str:
    """Short hash of the parts (fingerprints of stage outputs)."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


@METHODS.register("genept_w")
def build_genept_w(
    job: JobConfig, atlas: AtlasInfo, genes: GeneSpace, shards: list[Shard]
) -> StagePlan:
    """GenePT-w: fold HVG selection and centring into one (genes × d) weight matrix."""
    import ray

    from raypipe.embed.genept_w import GenePTW, weight_matrix
    from raypipe.embed.hvg import GeneMoments, select_hvg

    cfg = job.embed.genept_w
    mask = None
    notes: dict[str, Any] = {"hvg": cfg.hvg, "center": cfg.center}
    if cfg.hvg is not None:
        spec = StageSpec(
            GeneMoments,
            {
                "atlas_path": atlas.path,
                "collapse": ray.put(genes.collapse),
                "x_kind": atlas.x_kind,
                "target_sum": cfg.target_sum,
            },
            job.ray.actors,
            job.ray.actor_cpus,
        )
        n = 0
        total: Any = 0.0
        total_sq: Any = 0.0
        for row in map_shards([spec], shards):
            n += int(row["n"])
            total = total + np.asarray(row["sum"])
            total_sq = total_sq + np.asarray(row["sum_sq"])
        # rank only genes that have text: a variable gene without text adds nothing
        masked_total = np.where(genes.has_text, total, 0.0)
        mask = select_hvg(n, masked_total, np.where(genes.has_text, total_sq, 0.0), cfg.hvg)
        mask &= genes.has_text
        notes["hvg_genes"] = int(mask.sum())
    weights = weight_matrix(genes.embeddings, genes.has_text, center=cfg.center, gene_mask=mask)
    payload = ray.put({"collapse": genes.collapse, "weights": weights})
    fingerprint = stage_hash(
        "genept_w", config_hash(cfg), genes.fingerprint, atlas.x_kind, stage_hash(weights.tobytes())
    )
    kwargs = {
        "atlas_path": atlas.path,
        "out_dir": job.output_dir,
        "fingerprint": fingerprint,
        "metadata": {"text_source": genes.source, "model": genes.model},
        "genes": payload,
        "x_kind": atlas.x_kind,
        "target_sum": cfg.target_sum,
    }
    return StagePlan(
        [StageSpec(GenePTW, kwargs, job.ray.actors, job.ray.actor_cpus)], fingerprint, notes=notes
    )


METHODS.add("ce", "raypipe.embed.ce:build_ce")
METHODS.add("genept_s", "raypipe.embed.genept_s_stage:build_genept_s")
