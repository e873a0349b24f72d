"""GenePT-w kernel benchmark: the fused numba kernel vs scipy, beside this machine's limit.

In memory, on Kang 2018 cells tiled to ``--cells`` rows (real sparsity, 2,511 genes), with
random (g × 384) gene embeddings, it times in one process:

* **scipy**: the previous hot path, :func:`raypipe.embed.genept_w.genept_w` (normalise,
  ``log1p``, ``X @ W`` over every gene, L2);
* **fused**: :func:`raypipe.embed.kernel.fused_genept_w` over only the genes that carry
  weight, at 1 and at every CPU's worth of numba threads;

for all genes and for HVG-500 (the default), checks the two agree within 1e-5, and prints
cells/s beside an arithmetic limit: ``2 × (weighted non-zeros per cell) × d`` FLOP per cell
against ``cores × 32 FLOP/cycle`` (AVX2: two 8-wide float32 FMA units) at the CPU's clock::

    python jobs/benchmark.py kernel [--cells 100000]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from raypipe.bench.scale import SOURCE

__all__ = ["cpu_ghz", "main"]


def cpu_ghz() -> float:
    """Return the CPU clock in GHz from ``/proc/cpuinfo`` (2.5 when unknown)."""
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = [float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else 2.5
    except OSError:
        return 2.5


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print scipy vs fused cells/s and the arithmetic limit; return the figures."""
    import anndata as ad
    import numba
    import scipy.sparse as sp

    from raypipe.embed.genept_w import genept_w
    from raypipe.embed.kernel import compact_weights, fused_genept_w

    p = argparse.ArgumentParser(prog="benchmark.py kernel", description=__doc__)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    args = p.parse_args(argv)
    src = sp.csr_matrix(ad.read_h5ad(SOURCE).X, dtype=np.float32)
    x = sp.vstack([src] * (args.cells // src.shape[0] + 1)).tocsr()[: args.cells]
    n, g = x.shape
    rng = np.random.default_rng(0)
    w_all = rng.normal(size=(g, args.dim)).astype(np.float32)
    var = np.asarray(x[:20000].power(2).mean(axis=0)).ravel()
    hvg = np.zeros(g, dtype=bool)
    hvg[np.argsort(-var)[:500]] = True
    cores = os.cpu_count() or 1
    ghz = cpu_ghz()
    peak = cores * 32 * ghz * 1e9
    print(f"{n:,} cells × {g:,} genes, {x.nnz / n:.0f} stored values per cell, d = {args.dim}")
    print(f"machine: {cores} CPUs at {ghz:.2f} GHz → {peak / 1e9:.0f} GFLOP/s float32 FMA peak")
    out: dict[str, Any] = {}
    for name, mask in (("all genes", np.ones(g, dtype=bool)), ("HVG-500", hvg)):
        w = w_all * mask[:, None]
        col_map, compact = compact_weights(w)
        fused_genept_w(x[:16], col_map, compact)  # compile / load from cache
        t = time.perf_counter()
        ref, _ = genept_w(x, None, w)
        scipy_s = time.perf_counter() - t
        row = {"scipy": n / scipy_s}
        for threads in sorted({1, cores}):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
            t = time.perf_counter()
            got, _ = fused_genept_w(x, col_map, compact)
            row[f"fused×{threads}"] = n / (time.perf_counter() - t)
            assert float(np.abs(got - ref).max()) < 1e-5
        kept = float(np.mean(mask[x.indices])) * x.nnz / n
        row["limit"] = peak / (2 * kept * args.dim)
        out[name] = row
        cells = ", ".join(f"{k} {v:,.0f}" for k, v in row.items() if k != "limit")
        print(
            f"{name:<10} cells/s: {cells}  | fused/scipy {max(row[k] for k in row if k.startswith('fused')) / row['scipy']:.1f}× "
            f"| arithmetic limit {row['limit']:,.0f} ({kept:.0f} weighted values/cell)"
        )
    return out
