"""Discovery benchmark: clustering and assignment of a resampled atlas at 100k and 1M cells.

Cells are resampled from real Kang 2018 PBMCs (8,684 cells, as ``jobs/benchmark.py scale``
does) into a raypipe atlas, each cell half the counts of two random real cells of one type
(exact copies would make cliques of duplicates in the kNN graph, and Leiden thousands of tiny
clusters); then, timed separately, with peak RSS of the driver and every Ray
process it started (sampled every 0.2 s):

* **cluster**: the driver's part (:func:`raypipe.annotate.clustering.load_or_fit`): read a
  seeded sample (or every cell), exact PCA, cosine kNN graph, Leiden;
* **assign + sums**: the Ray map step over the shards (:class:`ClusterShards`): every cell's
  cluster (nearest sampled neighbours above ``--max-cells``) and the per-cluster sums;
* **markers**: merging the sums and ranking genes (Welch t).

``--max-cells`` chooses between clustering every cell and a sample; the agreement (ARI) of the
clusters with the source labels is printed as a sanity check::

    python jobs/benchmark.py discover --cells 100000,1000000 --max-cells 200000
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SOURCE = SHARED / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py discover", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="100000,1000000", help="atlas sizes (comma-separated)")
    p.add_argument("--max-cells", type=int, default=None, help="annotate.discover.max_cells")
    p.add_argument("--sample-cells", type=int, default=None, help="annotate.discover.sample_cells")
    p.add_argument("--workdir", default="/tmp/raypipe-discover", help="data and outputs")
    p.add_argument("--shard-rows", type=int, default=32768, help="shards.rows")
    p.add_argument("--source", default=str(SOURCE), help="real cells to resample (.h5ad, counts)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _job(atlas: Path, out: Path, args: argparse.Namespace) -> Any:
    from raypipe.config import load_config

    discover: dict[str, Any] = {}
    if args.max_cells is not None:
        discover["max_cells"] = args.max_cells
    if args.sample_cells is not None:
        discover["sample_cells"] = args.sample_cells
    return load_config(
        {
            "input": {"path": str(atlas)},
            "output_dir": str(out),
            "shards": {"rows": args.shard_rows},
            "annotate": {"enabled": True, "candidates": "auto", "discover": discover},
            "ray": {"num_cpus": 2, "object_store_memory": 1 << 30, "actors": 2, "actor_cpus": 1.0},
        }
    )


def bench_one(atlas: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Time and measure one atlas; return the figures."""
    from raypipe.annotate.cluster_markers import rank_markers
    from raypipe.annotate.clustering import CELLS, cluster_plan, load_or_fit, merged_stats
    from raypipe.atlas.store import open_atlas, plan_shards, read_obs_columns, read_var
    from raypipe.bench.genept import TreeSampler
    from raypipe.core.execute import run_plan
    from raypipe.core.storage import as_path

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = _job(atlas, out, args)
    info = open_atlas(atlas)
    shards = plan_shards(info, job.shards.rows)
    res: dict[str, Any] = {"cells": info.n_obs, "shards": len(shards)}
    with TreeSampler(os.getpid()) as mem:
        t = time.perf_counter()
        clustering, _ = load_or_fit(job, info, shards, as_path(out), False)
        res["cluster_s"] = time.perf_counter() - t
    res["cluster_rss"] = mem.peak_tree
    res["clustered"] = int(clustering.rows.size)
    res["n_clusters"] = clustering.n_clusters
    with TreeSampler(os.getpid()) as mem:
        t = time.perf_counter()
        run_plan(cluster_plan(job, info, clustering), str(out), CELLS, shards, progress=False)
        res["assign_s"] = time.perf_counter() - t
    res["assign_rss"] = mem.peak_tree
    with TreeSampler(os.getpid()) as mem:
        t = time.perf_counter()
        genes = read_var(atlas).index.astype(str).to_numpy()
        stats = merged_stats(str(out), shards, clustering.n_clusters, genes.size)
        rank_markers(stats, genes, n_top=25)
        res["markers_s"] = time.perf_counter() - t
    res["markers_rss"] = mem.peak_tree
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    cells = pd.concat(
        pd.read_parquet(p, columns=["row", "cluster"])
        for p in sorted((out / "state" / CELLS).glob("part-*.parquet"))
    ).sort_values("row")
    truth = read_obs_columns(atlas, ["cluster_id"])["cluster_id"].astype(str).to_numpy()
    res["ari"] = float(adjusted_rand_score(truth, cells["cluster"].to_numpy()))
    res["by_neighbours"] = info.n_obs - res["clustered"]
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (see the module docstring)."""
    from raypipe.bench.genept import build_synthetic
    from raypipe.core.execute import init_ray

    args = _parser().parse_args(argv)
    source, work = Path(args.source), Path(args.workdir)
    if not source.is_file():
        print(f"source cells {source} not found (set --source or RAYPIPE_SHARED_DATA)")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    print(f"machine: {os.cpu_count()} CPUs, {_gib(ram)} RAM")
    rows = []
    for n in [int(x) for x in args.cells.split(",") if x]:
        t = time.perf_counter()
        atlas = work / f"atlas_{n}.zarr"
        build_synthetic(source, n, atlas, work / f"cells_{n}.h5ad", seed=args.seed, pairs=True)
        print(
            f"synthetic atlas ({n:,} cells resampled from {source.name}): "
            f"{time.perf_counter() - t:.1f} s"
        )
        init_ray(_job(atlas, work / "out", args).ray)
        res = bench_one(atlas, work / f"out_{n}", args)
        rows.append(res)
        print(res)
    print()
    head = (
        f"{'cells':>10} {'clustered':>10} {'clusters':>8} {'cluster s':>10} {'assign s':>9} "
        f"{'markers s':>9} {'cells/s':>9} {'peak RSS':>10} {'ARI':>6}"
    )
    print(head)
    for r in rows:
        total = r["cluster_s"] + r["assign_s"] + r["markers_s"]
        peak = max(r["cluster_rss"], r["assign_rss"], r["markers_rss"])
        print(
            f"{r['cells']:>10,} {r['clustered']:>10,} {r['n_clusters']:>8} "
            f"{r['cluster_s']:>10.1f} {r['assign_s']:>9.1f} {r['markers_s']:>9.1f} "
            f"{r['cells'] / total:>9,.0f} {_gib(peak):>10} {r['ari']:>6.3f}"
        )
    return 0
