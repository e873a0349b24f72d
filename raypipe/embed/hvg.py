"""Highly variable genes from streamed per-shard moments (Seurat-style dispersion).

Each shard returns the per-gene sum and sum of squares of its log-normalised values; the
driver adds them up (exact, any shard order) and ranks genes by dispersion normalised within
20 bins of mean expression, as scanpy's ``flavor='seurat'`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from raypipe.core.expression import log_normalize
from raypipe.core.plan import resolve
from raypipe.core.stage import check_contract

__all__ = ["GeneMoments", "gene_moments", "select_hvg"]


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


class GeneMoments:
    """Ray Data stage (tasks or actors): shard specs → per-gene moments of that shard.

    Batch contract: in ``shard, start, stop``; out ``n, sum, sum_sq`` (one row per shard).
    """

    def __init__(self, *, atlas_path: str, collapse: Any, x_kind: str, target_sum: float) -> None:
        self.atlas_path = atlas_path
        self.collapse = resolve(collapse)
        self.x_kind = x_kind
        self.target_sum = target_sum

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Moments of each shard in the batch."""
        from raypipe.atlas.store import read_shard

        check_contract("GeneMoments", batch, ("shard", "start", "stop"))
        ns, sums, sqs = [], [], []
        for start, stop in zip(batch["start"], batch["stop"], strict=True):
            x = read_shard(self.atlas_path, int(start), int(stop))
            n, s, sq = gene_moments(
                x, self.collapse, x_kind=self.x_kind, target_sum=self.target_sum
            )
            ns.append(n)
            sums.append(s)
            sqs.append(sq)
        return {"n": np.asarray(ns), "sum": np.stack(sums), "sum_sq": np.stack(sqs)}
