"""Scale benchmark: a 1,000,000-cell atlas end to end on this machine.

Resamples real cells (Kang 2018 PBMCs, 8,684 cells) into an ``.h5ad`` of ``--cells`` cells,
written chunk by chunk (never all in memory), then times every stage of a real run:

* **ingest**: ``.h5ad`` → raypipe Zarr atlas (``raypipe.atlas.ingest``);
* **genes**: gene texts (orgdb) and their embeddings (MiniLM; cached when ``--gene-embeddings``
  seeds the cache, so the figure is then the cache lookup);
* **genept_w**: GenePT-w over every shard (Ray actor pool, parquet parts);
* **annotate**: zero-shot annotation against the Cell Ontology texts of the labels;
* **evaluate**: metrics (seeded subsample for quadratic ones) and the report,

and prints wall time, cells/s and peak memory (RSS summed over the driver and every Ray process
it started, sampled every 0.2 s) per stage::

    python jobs/benchmark.py scale --cells 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "scale_job"]

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SOURCE = SHARED / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"


def scale_job(atlas: Path, out_dir: Path, *, shard_rows: int, stages: list[str]) -> Any:
    """Return the job config of the benchmark run.

    Parameters
    ----------
    atlas
        The ingested atlas (``.zarr``).
    out_dir
        Output folder.
    shard_rows
        ``shards.rows``.
    stages
        Which of ``annotate``/``evaluate`` to enable (GenePT-w always runs).
    """
    from raypipe.config import load_config

    return load_config(
        {
            "input": {"path": str(atlas), "label_key": "cluster_id", "name": "kang-resampled"},
            "output_dir": str(out_dir),
            "shards": {"rows": shard_rows},
            "genes": {"text_source": "orgdb"},
            "text_model": {"backend": "local", "model": "all-MiniLM-L6-v2"},
            "embed": {"methods": ["genept_w"]},
            "annotate": {"enabled": "annotate" in stages},
            "evaluate": {"enabled": "evaluate" in stages},
            "ray": {"num_cpus": 2, "object_store_memory": 1 << 30, "actors": 2, "actor_cpus": 1.0},
        }
    )


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=1_000_000, help="cells in the synthetic atlas")
    p.add_argument("--workdir", default="/tmp/raypipe-scale", help="data and outputs")
    p.add_argument("--shard-rows", type=int, default=32768, help="shards.rows")
    p.add_argument("--source", default=str(SOURCE), help="real cells to resample (.h5ad, counts)")
    p.add_argument(
        "--gene-embeddings", default=None, help="seed <out>/genes/gene_embeddings.parquet"
    )
    p.add_argument(
        "--stages", default="annotate,evaluate", help="stages after GenePT-w (comma-separated)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (see the module docstring)."""
    from raypipe.atlas.ingest import ingest
    from raypipe.bench.genept import TreeSampler, build_synthetic
    from raypipe.core.execute import init_ray
    from raypipe.genes.space import CACHE_FILE
    from raypipe.orchestrate.runner import run_job

    args = _parser().parse_args(argv)
    source, work, n = Path(args.source), Path(args.workdir), args.cells
    if not source.is_file():
        print(f"source cells {source} not found (set --source or RAYPIPE_SHARED_DATA)")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    need = n * 424 * 8 * 3.2  # ~424 nnz/cell (4-byte value + 4-byte index): h5ad + 2 zarr
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {_gib(free)} free, need about {_gib(need)}")
    if free < need:
        print("not enough disk space")
        return 2
    stages = [s for s in args.stages.split(",") if s]
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    print(f"machine: {os.cpu_count()} CPUs, {_gib(ram)} RAM")
    t = time.perf_counter()
    h5ad = work / f"cells_{n}.h5ad"
    build_synthetic(source, n, work / f"synth_{n}.zarr", h5ad, seed=args.seed)
    secs = time.perf_counter() - t
    print(f"synthetic data ({n:,} cells resampled from {source.name}): {secs:.1f} s")

    out = work / f"out_{n}"
    shutil.rmtree(out, ignore_errors=True)
    atlas = work / f"atlas_{n}.zarr"
    rows: list[tuple[str, float, int]] = []
    with TreeSampler(os.getpid()) as mem:
        t = time.perf_counter()
        ingest(h5ad, atlas, rows_per_chunk=4096, overwrite=True, progress=False)
        rows.append(("ingest", time.perf_counter() - t, mem.peak_tree))
    job = scale_job(atlas, out, shard_rows=args.shard_rows, stages=stages)
    if args.gene_embeddings:
        (out / CACHE_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.gene_embeddings, out / CACHE_FILE)
    t = time.perf_counter()
    init_ray(job.ray)
    print(f"ray start: {time.perf_counter() - t:.1f} s")
    with TreeSampler(os.getpid()) as mem:
        t = time.perf_counter()
        summary = run_job(job, progress=False)
        wall = time.perf_counter() - t
        peak_run = mem.peak_tree
    for stage, secs in summary.timings.items():
        rows.append((stage, secs, -1))
    print(summary.render())
    print()
    print(f"{'stage':<10} {'wall s':>9} {'cells/s':>12}")
    total = 0.0
    for stage, secs, _ in rows:
        total += secs
        print(f"{stage:<10} {secs:>9.1f} {n / secs if secs else 0:>12,.0f}")
    print(f"{'total':<10} {total:>9.1f} {n / total:>12,.0f}")
    print(f"peak RSS (driver + every Ray process): ingest {_gib(rows[0][2])}, run {_gib(peak_run)}")
    manifest = json.loads((out / "manifest.json").read_text())
    ev_times = (manifest.get("evaluation") or {}).get("timings") or {}
    if ev_times:
        steps = {k: v for k, v in ev_times.items() if k != "per_metric"}
        print("evaluation steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
        for method, per in (ev_times.get("per_metric") or {}).items():
            print(f"  {method}: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
    record = {
        "cells": n,
        "cpus": os.cpu_count(),
        "stages": {s: secs for s, secs, _ in rows},
        "run_wall_s": wall,
        "peak_rss_ingest": rows[0][2],
        "peak_rss_run": peak_run,
        "annotate": job.annotate.enabled,
        "evaluate": job.evaluate.enabled,
        "evaluation_timings": ev_times,
    }
    (work / f"scale_{n}.json").write_text(json.dumps(record, indent=2))
    return 0
