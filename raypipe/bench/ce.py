"""Benchmark of the CE path: rank-value tokenisation and the cell encoder on CPU.

Prints, in one run: the numba rank kernel, a shard-wide ``np.lexsort`` engine and a plain
per-cell numpy implementation of the same algorithm (cells per CPU-second, i.e. per core),
read+rank throughput from an ``.h5ad`` on disk, peak memory, and cell-encoder cells/s for a
randomly initialised Geneformer V1 (6 layers, hidden 256) at real and at 2,048-token lengths.

Run: ``python -m raypipe.bench.ce [--cells 50000] [--ce-cells 32]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.embed.dictionaries import GeneformerDictionaries, TokenPlan
from raypipe.errors import InputError

__all__ = ["lexsort_rank", "main", "per_cell_reference", "synthetic_atlas"]

TARGET_SUM = 10_000.0


def lexsort_rank(
    indptr, indices, data, col_gene, gene_median, gene_token, prefix, suffix, lognorm,
    own_total, totals, max_body, has_dups, starts, out, lens,
):  # fmt: skip
    """Rank kernel as one stable ``np.lexsort`` over (row, -value) for the whole shard.

    Same contract as ``raypipe.embed.rank_kernel.rank_kernel_py`` (pass it as ``engine=``).
    """
    status = np.zeros(3, dtype=np.int64)
    data = data.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(data) | (data < 0))
    if bad.size:
        j = int(bad[0])
        row = int(np.searchsorted(indptr, j, side="right") - 1)
        status[:] = (1 if not np.isfinite(data[j]) else 2, row, j)
        return status
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    if own_total and not lognorm:
        totals = np.bincount(rows, weights=data, minlength=n).astype(np.float64)
    g = col_gene[indices]
    keep = (g >= 0) & (data > 0)
    rows, g, v = rows[keep], g[keep], data[keep]
    if lognorm:
        v = np.expm1(v)
    if has_dups:  # sum duplicate genes within a row, first-occurrence order
        key = rows * (len(gene_median) + 1) + g
        _, first, inv = np.unique(key, return_index=True, return_inverse=True)
        summed = np.bincount(inv, weights=v)
        order = np.argsort(first, kind="stable")
        rows, g, v = rows[first[order]], g[first[order]], summed[order]
    score = v / gene_median[g] if lognorm else v / totals[rows] * TARGET_SUM / gene_median[g]
    order = np.lexsort((-score, rows))
    rows, g = rows[order], g[order]
    counts = np.bincount(rows, minlength=n)
    lens[:] = np.minimum(counts, max_body)
    first_of_row = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=first_of_row[1:])
    pos = np.arange(rows.size) - first_of_row[rows]
    sel = pos < max_body
    out[starts[rows[sel]] + prefix.size + pos[sel]] = gene_token[g[sel]]
    full = np.flatnonzero(lens > 0)
    for j, tid in enumerate(prefix):
        out[starts[full] + j] = tid
    for j, tid in enumerate(suffix):
        out[starts[full] + prefix.size + lens[full] + j] = tid
    return status


def per_cell_reference(X: Any, plan: TokenPlan, *, max_length: int = 2048) -> list[np.ndarray]:
    """Straightforward per-cell numpy version of the algorithm (V1 framing), for comparison.

    Parameters
    ----------
    X
        CSR counts, columns in plan order.
    plan
        The column plan.
    max_length
        Tokens kept per cell.
    """
    n_genes = plan.gene_token.size
    cells = []
    for i in range(X.shape[0]):
        row = X.getrow(i)
        vals = row.data.astype(np.float64)
        total = vals.sum()
        g = plan.col_gene[row.indices]
        vec = np.zeros(n_genes)
        np.add.at(vec, g[g >= 0], vals[g >= 0])
        nz = np.flatnonzero(vec)
        norm = vec[nz] / total * TARGET_SUM / plan.gene_median[nz]
        order = np.argsort(-norm, kind="stable")
        cells.append(plan.gene_token[nz[order]][:max_length].astype(np.int32))
    return cells


def synthetic_atlas(source: Path, n_cells: int, seed: int = 0) -> Any:
    """Resample ``n_cells`` rows (with replacement) of a real counts atlas."""
    import anndata as ad

    src = ad.read_h5ad(source)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, src.n_obs, size=n_cells)
    out = ad.AnnData(X=src.X[idx].tocsr(), var=src.var.copy())
    out.obs_names = [f"c{i}" for i in range(n_cells)]
    return out


def _rate(fn: Callable[[], Any], n: int) -> tuple[float, float, Any]:
    w0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return n / max(cpu, 1e-9), n / max(wall, 1e-9), res


def _bench_tokenizer(args: argparse.Namespace, dicts: GeneformerDictionaries) -> dict[str, Any]:
    import anndata as ad

    from raypipe.embed.tokenizer import RankValueTokenizer

    atlas = synthetic_atlas(args.source, args.cells, args.seed)
    tok = RankValueTokenizer(dicts, variant="geneformer_v1")
    plan = tok.plan(atlas.var["ensembl_id"].tolist())
    X = atlas.X
    tok.tokenize(X[:100])  # compile / load the numba kernel outside the timing
    res: dict[str, Any] = {
        "cells": args.cells,
        "chunk": args.chunk,
        "genes": int(X.shape[1]),
        "expressed_genes_per_cell": float(np.diff(X.indptr).mean()),
    }
    shards = [X[lo : lo + args.chunk] for lo in range(0, X.shape[0], args.chunk)]

    def by_shard(engine: Any = None) -> list[np.ndarray]:
        return [c for sh in shards for c in tok.tokenize(sh, engine=engine)]

    cpu_rate, wall_rate, cells = _rate(by_shard, args.cells)  # timed without tracemalloc
    res["numba_cells_per_cpu_s"], res["numba_cells_per_wall_s"] = cpu_rate, wall_rate
    tracemalloc.start()  # memory in a second pass: tracing slows every allocation
    by_shard()
    res["numba_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20  # all shards' tokens
    tracemalloc.stop()
    res["tokens_per_cell"] = float(np.mean([c.size for c in cells]))
    cpu_rate, wall_rate, lex = _rate(lambda: by_shard(lexsort_rank), args.cells)
    res["lexsort_cells_per_cpu_s"] = cpu_rate
    assert all(np.array_equal(a, b) for a, b in zip(cells, lex, strict=True))
    n_ref = min(args.cells, args.ref_cells)
    cpu_rate, _, ref = _rate(lambda: per_cell_reference(X[:n_ref], plan), n_ref)
    res["per_cell_numpy_cells_per_cpu_s"] = cpu_rate
    assert all(np.array_equal(a, b) for a, b in zip(cells[:n_ref], ref, strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "atlas.h5ad"
        atlas.write_h5ad(path)
        del atlas

        def read_rank() -> int:
            backed = ad.read_h5ad(path, backed="r")
            n = 0
            for lo in range(0, backed.n_obs, args.chunk):
                n += len(tok.tokenize(backed.X[lo : lo + args.chunk]))
            backed.file.close()
            return n

        res["read_rank_cells_per_cpu_s"], res["read_rank_cells_per_wall_s"], _ = _rate(
            read_rank, args.cells
        )
    return res


def _bench_encoder(args: argparse.Namespace, dicts: GeneformerDictionaries) -> dict[str, Any]:
    import anndata as ad
    import torch

    from raypipe.embed.ce_model import CellEncoder, build_random_encoder
    from raypipe.embed.tokenizer import RankValueTokenizer

    cfg = args.geneformer_dir / "config_Geneformer-V1-10M.json"
    tok = RankValueTokenizer(dicts, variant="geneformer_v1")
    real = ad.read_h5ad(args.source)[: args.ce_cells]
    tok.plan(real.var["ensembl_id"].tolist())
    cells = tok.tokenize(real.X)
    rng = np.random.default_rng(args.seed)
    gene_ids = np.array(sorted(v for k, v in dicts.token_dict.items() if k.startswith("ENS")))
    full = [rng.choice(gene_ids, 2048, replace=False).astype(np.int32) for _ in range(8)]
    res: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        enc = CellEncoder(build_random_encoder(cfg, tmp, args.seed), tokenizer=tok)
        enc.encode(cells[:2])  # warm-up
        res["ce_real_len_mean"] = float(np.mean([c.size for c in cells]))
        res["ce_real_cells_per_cpu_s"], res["ce_real_cells_per_wall_s"], _ = _rate(
            lambda: enc.encode(cells), len(cells)
        )
        res["ce_2048_cells_per_cpu_s"], res["ce_2048_cells_per_wall_s"], _ = _rate(
            lambda: enc.encode(full), len(full)
        )
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CE benchmark and print a side-by-side table; returns the figures.

    Parameters
    ----------
    argv
        Command-line arguments (see ``--help``).
    """
    from raypipe.embed.dictionaries import default_search_dirs

    p = argparse.ArgumentParser(prog="raypipe-bench-ce", description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=50_000, help="synthetic atlas size")
    p.add_argument("--ref-cells", type=int, default=5_000, help="cells for the per-cell baseline")
    p.add_argument("--ce-cells", type=int, default=32, help="cells for the cell encoder")
    p.add_argument("--chunk", type=int, default=4096, help="rows per read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", type=Path, default=None, help="counts .h5ad with var.ensembl_id")
    p.add_argument("--no-ce", action="store_true", help="skip the cell-encoder part")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    gdir = next((d for d in default_search_dirs() if (d / "token_dictionary.pkl").is_file()), None)
    if gdir is None:
        raise InputError("Geneformer dictionaries not found", fix="set RAYPIPE_GENEFORMER_DIR")
    args.geneformer_dir = gdir
    if args.source is None:
        args.source = gdir.parent / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"
    dicts = GeneformerDictionaries.load("V1", search=[gdir])
    res = {"source": str(args.source), **_bench_tokenizer(args, dicts)}
    if not args.no_ce:
        res.update(_bench_encoder(args, dicts))
    res["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _print(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


def _print(r: dict[str, Any]) -> None:
    print(f"synthetic atlas: {r['cells']:,} cells resampled from {Path(r['source']).name}, "
          f"{r['genes']:,} genes, {r['expressed_genes_per_cell']:.0f} expressed genes/cell, "
          f"{r['tokens_per_cell']:.0f} tokens/cell")  # fmt: skip
    print(f"{'rank step (in memory, ' + str(r['chunk']) + '-row shards)':<34}{'cells/CPU-s':>14}")
    for key, name in (
        ("numba", "numba kernel (raypipe)"),
        ("lexsort", "shard-wide np.lexsort"),
        ("per_cell_numpy", "per-cell numpy loop (baseline)"),
    ):
        print(f"  {name:<32}{r[f'{key}_cells_per_cpu_s']:>14,.0f}")
    print(f"  {'read .h5ad + rank (raypipe)':<32}{r['read_rank_cells_per_cpu_s']:>14,.0f}"
          f"   ({r['read_rank_cells_per_wall_s']:,.0f} cells/wall-s)")  # fmt: skip
    print(f"peak traced memory while tokenising {r['cells']:,} cells (tokens kept): "
          f"{r['numba_peak_mib']:.0f} MiB; "
          f"process max RSS {r['max_rss_mib']:.0f} MiB")  # fmt: skip
    if "ce_real_cells_per_cpu_s" in r:
        print(f"cell encoder, Geneformer V1 size (6 layers, hidden 256), random weights, CPU, "
              f"{r['torch_threads']} torch threads:")  # fmt: skip
        print(f"  real cells (mean {r['ce_real_len_mean']:.0f} tokens): "
              f"{r['ce_real_cells_per_wall_s']:.1f} cells/wall-s, "
              f"{r['ce_real_cells_per_cpu_s']:.1f} cells/CPU-s")  # fmt: skip
        print(f"  2,048-token cells: {r['ce_2048_cells_per_wall_s']:.2f} cells/wall-s, "
              f"{r['ce_2048_cells_per_cpu_s']:.2f} cells/CPU-s")  # fmt: skip


if __name__ == "__main__":
    main()
