"""GenePT-w: expression-weighted average of gene-text embeddings (Chen & Zou 2024).

Per cell: scale to ``target_sum`` counts, ``log1p``, weight each gene's text embedding by its
value, sum (a sparse × dense product over the whole shard), L2-normalise. Variants (chosen on
the driver, folded into the weight matrix): restrict to highly variable genes, centre the gene
embeddings before weighting. Measurements: docs/methods/genept.md ("Variants, measured").

:func:`genept_w` is the scipy reference; the Ray stage runs the same arithmetic fused in one
numba kernel over only the genes that carry weight (:mod:`raypipe.embed.kernel`; equal to the
reference within 1e-5, ≈ 3× faster per core with HVG-500 — ``jobs/benchmark.py genept``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from raypipe.atlas.store import AtlasShardStage
from raypipe.config import config_hash
from raypipe.core.expression import log_normalize
from raypipe.core.plan import StagePlan, StageSpec, resolve, stage_hash
from raypipe.core.stage import set_kernel_threads

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard
    from raypipe.core.space import FittedSpace
    from raypipe.genes.space import GeneSpace

__all__ = ["GenePTW", "build_genept_w", "fold_collapse", "genept_w", "weight_matrix"]


def weight_matrix(
    gene_emb: np.ndarray,
    has_text: np.ndarray,
    *,
    center: bool = False,
    gene_mask: np.ndarray | None = None,
    center_mean: np.ndarray | None = None,
) -> np.ndarray:
    """Return the (g, d) matrix applied to expression: rows of genes without text are zero.

    Parameters
    ----------
    gene_emb
        (g, d) text embeddings of the (unique) genes.
    has_text
        (g,) bool: the gene has a text embedding.
    center
        Subtract the mean embedding of the genes with text (removes the direction every
        gene shares, which otherwise dominates every cell).
    gene_mask
        (g,) bool: genes to use (e.g. highly variable genes); others get zero weight.
    center_mean
        (d,) the mean to subtract when ``center`` (a recorded one, see
        :class:`raypipe.core.space.FittedSpace`); default: computed here.
    """
    w = np.asarray(gene_emb, dtype=np.float32).copy()
    use = np.asarray(has_text, dtype=bool).copy()
    if gene_mask is not None:
        use &= np.asarray(gene_mask, dtype=bool)
    if center and use.any():
        mean = w[use].mean(axis=0) if center_mean is None else center_mean
        w -= np.asarray(mean, dtype=np.float32)[None, :]
    w[~use] = 0.0
    return w


def genept_w(
    x: sp.csr_matrix,
    collapse: sp.csr_matrix | None,
    weights: np.ndarray,
    *,
    x_kind: str = "counts",
    target_sum: float = 1e4,
) -> tuple[np.ndarray, np.ndarray]:
    """GenePT-w embeddings of a block of cells.

    Parameters
    ----------
    x
        (n, g_atlas) expression (raw counts, or log-normalised when ``x_kind='lognorm'``).
    collapse
        (g_atlas, g) 0/1 matrix summing duplicate atlas columns into unique genes, or None
        when ``weights`` is already per atlas column (no duplicates: see :func:`fold_collapse`).
    weights
        (g, d) from :func:`weight_matrix` (or (g_atlas, d) when ``collapse`` is None).
    x_kind
        ``counts`` (normalise + log1p here) or ``lognorm`` (used as is).
    target_sum
        Counts per cell after scaling.

    Returns
    -------
    embedding
        (n, d) float32, unit norm; all-zero rows where ``empty``.
    empty
        (n,) bool: no expressed gene with a text embedding (e.g. a zero-count cell).
    """
    genes = x if collapse is None else x @ collapse
    if x_kind == "counts":  # totals over every atlas gene, as scanpy's normalize_total
        xl = log_normalize(genes, np.asarray(x.sum(axis=1)).ravel(), target_sum)
    else:
        xl = sp.csr_matrix(genes, dtype=np.float32)
    emb = np.asarray(xl @ weights, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1)
    empty = ~(norms > 0)
    emb[~empty] /= norms[~empty, None]
    emb[empty] = 0.0
    return emb, empty


def fold_collapse(
    collapse: sp.csr_matrix, weights: np.ndarray
) -> tuple[sp.csr_matrix | None, np.ndarray]:
    """Fold the collapse matrix into the weights when no two atlas columns share a gene.

    Then ``log1p(norm(x @ C)) @ W == log1p(norm(x)) @ (C @ W)`` exactly, and the per-shard
    sparse product with ``C`` disappears from the hot path. With duplicates, counts must be
    summed before ``log1p``, so ``C`` stays.
    """
    c = sp.csc_matrix(collapse)
    if c.nnz == 0 or np.diff(c.indptr).max() <= 1:
        return None, np.asarray(sp.csr_matrix(collapse) @ weights, dtype=np.float32)
    return collapse, weights


class GenePTW(AtlasShardStage):
    """Ray Data stage: shard specs in → ``embeddings/genept_w/part-*.parquet`` written.

    Batch contract: in ``shard, start, stop, content_hash``; out ``shard, n_cells, n_empty,
    seconds, path``.

    Parameters
    ----------
    genes
        ``{"collapse": csr (g_atlas, g), "weights": (g, d)}`` or an ObjectRef to it (broadcast
        once through the object store).
    x_kind, target_sum
        See :func:`genept_w`.
    threads
        numba threads of the fused kernel (the actor's CPUs, at least 1).
    **kwargs
        Passed to :class:`ShardStage`.
    """

    method: ClassVar[str] = "genept_w"

    def __init__(
        self, *, genes: Any, x_kind: str, target_sum: float, threads: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        payload = resolve(genes)
        self.collapse, self.weights = fold_collapse(payload["collapse"], payload["weights"])
        self.x_kind = x_kind
        self.target_sum = target_sum
        self.fused: tuple[np.ndarray, np.ndarray] | None = None
        if self.collapse is None:  # no duplicate genes: the fused kernel applies
            from raypipe.embed.kernel import compact_weights

            set_kernel_threads(threads)
            self.fused = compact_weights(self.weights)

    def compute(self, x: sp.csr_matrix, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """GenePT-w of the shard's rows."""
        if self.fused is not None:
            from raypipe.embed.kernel import fused_genept_w

            col_map, compact = self.fused
            return fused_genept_w(
                x, col_map, compact, x_kind=self.x_kind, target_sum=self.target_sum
            )
        return genept_w(
            x, self.collapse, self.weights, x_kind=self.x_kind, target_sum=self.target_sum
        )


def _fit_space(
    job: JobConfig,
    atlas: AtlasInfo,
    genes: GeneSpace,
    shards: list[Shard],
    space: FittedSpace | None,
) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """Return the HVG mask and centring mean: recorded in ``space``, else fitted and recorded.

    Fitted on the atlas (HVG from the cached moments pre-pass), they are recorded in the
    run's fitted space; a later run on a grown or changed atlas reuses them (same genes, same
    mean, so old cells' vectors stay bit-identical) unless refitted (``--refit``) or the
    settings they depend on changed. The centring mean is recomputed when the gene
    embeddings changed (every shard is recomputed then anyway).
    """
    from raypipe.embed.hvg import hvg_mask

    cfg = job.embed.genept_w
    symbols = np.asarray(genes.resolution.unique_symbols, dtype=object)
    depends = stage_hash("genept_w-space", cfg.hvg, cfg.target_sum, atlas.x_kind, genes.source)
    data = space.get("genept_w", depends) if space is not None else None
    mask = None
    if data is not None and data.get("hvg_genes") is not None:
        mask = np.isin(symbols, np.asarray(data["hvg_genes"], dtype=object)) & genes.has_text
    elif data is None and cfg.hvg is not None:
        mask = hvg_mask(job, atlas, genes.collapse, genes.has_text, shards, cfg.hvg)
    mean = None
    if data is not None and data.get("genes_fingerprint") == genes.fingerprint:
        mean = np.asarray(data["center_mean"], dtype=np.float32)
    notes: dict[str, Any] = {}
    if mask is not None:
        notes["hvg_genes"] = int(mask.sum())
    if mean is None:
        use = genes.has_text & (mask if mask is not None else True)
        emb = np.asarray(genes.embeddings, dtype=np.float32)
        mean = emb[use].mean(axis=0) if use.any() else np.zeros(emb.shape[1], np.float32)
        if space is not None:
            space.put(
                "genept_w",
                depends,
                {
                    "hvg_genes": None if mask is None else [str(g) for g in symbols[mask]],
                    "center_mean": [float(v) for v in mean],
                    "genes_fingerprint": genes.fingerprint,
                    "n_cells": atlas.n_obs,
                },
            )
    return mask, mean, notes


def build_genept_w(
    job: JobConfig,
    atlas: AtlasInfo,
    genes: GeneSpace,
    shards: list[Shard],
    space: FittedSpace | None = None,
) -> StagePlan:
    """GenePT-w: fold HVG selection and centring into one (genes × d) weight matrix.

    With ``hvg`` set, the gene moments come from a cached, resumable pre-pass
    (:func:`raypipe.embed.hvg.hvg_mask`): a resume reads no expression data. The HVG set and
    centring mean are recorded in ``space`` and reused by later runs (:func:`_fit_space`).
    """
    import ray

    cfg = job.embed.genept_w
    mask, mean, fit_notes = _fit_space(job, atlas, genes, shards, space)
    notes: dict[str, Any] = {"hvg": cfg.hvg, "center": cfg.center, **fit_notes}
    weights = weight_matrix(
        genes.embeddings, genes.has_text, center=cfg.center, gene_mask=mask, center_mean=mean
    )
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
        "threads": max(1, round(job.ray.actor_cpus)),
    }
    return StagePlan(
        [StageSpec(GenePTW, kwargs, job.ray.actors, job.ray.actor_cpus)], fingerprint, notes=notes
    )
