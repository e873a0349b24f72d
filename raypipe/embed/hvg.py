"""Highly variable genes from streamed per-shard moments (Seurat-style dispersion).

Each shard writes the per-gene sum and sum of squares of its log-normalised values (a cached
pre-pass under ``state/gene_moments``); the driver adds them up in shard order and ranks genes by dispersion normalised within
20 bins of mean expression, as scanpy's ``flavor='seurat'`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from raypipe.atlas.store import AtlasShardStage
from raypipe.core.expression import log_normalize
from raypipe.core.outputs import read_parquet
from raypipe.core.plan import StagePlan, StageSpec, resolve, stage_hash

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard

__all__ = ["GeneMoments", "gene_moments", "hvg_mask", "select_hvg"]


def gene_moments(
    x: sp.csr_matrix, collapse: sp.csr_matrix, *, x_kind: str, target_sum: float
) -> tuple[int, np.ndarray, np.ndarray]:
    """Return ``(n_cells, sum, sum_sq)`` of log-normalised values per unique gene."""
    if x_kind == "counts":
        totals = np.asarray(x.sum(axis=1)).ravel()
        xl = log_normalize(x @ collapse, totals, target_sum)
    else:
        xl = sp.csr_matrix(x @ collapse, dtype=np.float32)
    s = np.asarray(xl.sum(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(xl.multiply(xl).sum(axis=0), dtype=np.float64).ravel()
    return x.shape[0], s, sq


def select_hvg(
    n: int, total: np.ndarray, total_sq: np.ndarray, n_top: int, *, n_bins: int = 20
) -> np.ndarray:
    """Pick the ``n_top`` most variable genes by bin-normalised dispersion.

    Parameters
    ----------
    n
        Cells the moments were summed over.
    total, total_sq
        (g,) sums and sums of squares of log-normalised values.
    n_top
        Genes to keep (all genes when ``n_top >= g``).
    n_bins
        Bins of mean expression within which dispersions are z-scored.

    Returns
    -------
    (g,) bool mask.
    """
    g = total.shape[0]
    if n_top >= g:
        return np.ones(g, dtype=bool)
    mean = total / max(n, 1)
    var = np.maximum(total_sq / max(n, 1) - mean**2, 0.0) * (n / max(n - 1, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(np.where(mean > 0, var / mean, np.nan))
        log_mean = np.log1p(mean)
    edges = np.linspace(np.nanmin(log_mean), np.nanmax(log_mean) + 1e-9, n_bins + 1)
    bins = np.clip(np.digitize(log_mean, edges) - 1, 0, n_bins - 1)
    norm = np.full(g, -np.inf)
    for b in np.unique(bins):
        sel = (bins == b) & np.isfinite(disp)
        if not sel.any():
            continue
        mu, sd = disp[sel].mean(), disp[sel].std(ddof=1) if sel.sum() > 1 else 0.0
        norm[sel] = (disp[sel] - mu) / sd if sd > 0 else 0.0
    order = np.argsort(-norm, kind="stable")
    mask = np.zeros(g, dtype=bool)
    mask[order[:n_top]] = True
    return mask


class GeneMoments(AtlasShardStage):
    """Ray Data stage: shard specs → ``state/gene_moments/part-*.parquet`` (a cached pre-pass).

    Batch contract: in ``shard, start, stop, content_hash``; out the shard-stage summary. Each
    part holds one row per unique gene: ``sum`` and ``sum_sq`` of its log-normalised values
    over the shard's cells (float64). Parts are keyed like any output (fingerprint, rows'
    content hash), so a resume reads no expression data for shards already summed.
    """

    kind: ClassVar[str] = "state"
    method: ClassVar[str] = "gene_moments"

    def __init__(self, *, collapse: Any, x_kind: str, target_sum: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.collapse = resolve(collapse)
        self.x_kind = x_kind
        self.target_sum = target_sum

    def output_table(self, batch: dict[str, np.ndarray], i: int) -> tuple[Any, int]:
        """Moments of shard ``i``'s cells."""
        import pyarrow as pa

        x = self.read_rows(int(batch["start"][i]), int(batch["stop"][i]))
        _, s, sq = gene_moments(x, self.collapse, x_kind=self.x_kind, target_sum=self.target_sum)
        return pa.table({"sum": s, "sum_sq": sq}), 0


def hvg_mask(
    job: JobConfig,
    atlas: AtlasInfo,
    collapse: sp.csr_matrix,
    has_text: np.ndarray,
    shards: list[Shard],
    n_top: int,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Select the ``n_top`` most variable genes with text, from per-shard moments (cached).

    Shards whose moments are already in ``state/gene_moments`` (same rows, same gene
    collapse, same settings) are not read again; the sums are added in shard order.
    """
    import ray

    from raypipe.core.execute import run_plan
    from raypipe.core.ledger import Ledger

    target_sum = job.embed.genept_w.target_sum
    digest = stage_hash(collapse.shape, collapse.indptr.tobytes(), collapse.indices.tobytes())
    fingerprint = stage_hash("gene_moments", atlas.x_kind, target_sum, digest)
    kwargs = {
        "atlas_path": atlas.path,
        "out_dir": job.output_dir,
        "fingerprint": fingerprint,
        "collapse": ray.put(collapse),
        "x_kind": atlas.x_kind,
        "target_sum": target_sum,
    }
    step = StageSpec(GeneMoments, kwargs, job.ray.actors, job.ray.actor_cpus)
    plan = StagePlan([step], fingerprint, kind=GeneMoments.kind)
    run_plan(plan, job.output_dir, GeneMoments.method, shards, progress=progress, desc="hvg")
    ledger = Ledger(job.output_dir, GeneMoments.kind, GeneMoments.method)
    total = np.zeros(collapse.shape[1])
    total_sq = np.zeros(collapse.shape[1])
    for s in shards:  # in shard order: the same sums, bit for bit, on every run
        part = read_parquet(ledger.part(s.index))
        total += part.column("sum").to_numpy()
        total_sq += part.column("sum_sq").to_numpy()
    # rank only genes that have text: a variable gene without text adds nothing
    n = sum(s.n_rows for s in shards)
    mask = select_hvg(n, np.where(has_text, total, 0.0), np.where(has_text, total_sq, 0.0), n_top)
    return mask & has_text
