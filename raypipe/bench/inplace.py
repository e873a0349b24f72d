"""In-place benchmark: an AnnData ``.zarr`` read where it is vs ingested first, side by side.

Resamples real cells (Kang 2018 PBMCs) into a ``--cells``-cell AnnData ``.zarr`` with CSR X in
row chunks (the synthetic atlas of ``benchmark.py genept``, stripped of raypipe's metadata:
a plain AnnData store, hard-linked, no copy), warms the gene-embedding cache once (not timed),
then runs the same GenePT-w job twice on a fresh 2-CPU embedded Ray:

* **in place**: ``input.in_place: true`` — the run plans shards on the store's chunk grid,
  hashes its chunk files and reads them where they are;
* **copy**: ``input.in_place: false`` — the run ingests the store into
  ``<output_dir>/atlas.zarr`` first (what every run did before).

It prints, for both, the time to the first finished shard (the first completion marker's
mtime, from the start of ``run_job``: a shard of the HVG gene-moments pass, which GenePT-w's
default settings run first) and to the first GenePT-w shard, the atlas stage, the GenePT-w
stage and the total wall time, and the ratio. The in-place run goes first, so the copy run finds the input in the page cache
(the comparison favours the copy)::

    python jobs/benchmark.py inplace --cells 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "plain_anndata_zarr"]

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SOURCE = SHARED / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"


def plain_anndata_zarr(atlas: Path, dest: Path) -> Path:
    """Hard-link a raypipe atlas into ``dest`` as a plain AnnData ``.zarr`` (metadata dropped)."""
    from raypipe.atlas.store import ATLAS_ATTR

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(atlas, dest, copy_function=os.link)
    root = dest / "zarr.json"
    meta = json.loads(root.read_text())
    meta.get("attributes", {}).pop(ATLAS_ATTR, None)
    root.unlink()  # a new file: the hard link to the atlas's zarr.json stays as it was
    root.write_text(json.dumps(meta))
    return dest


def _job(store: Path, out: Path, *, in_place: bool, shard_rows: int, cache: Path) -> Any:
    from raypipe.config import load_config

    return load_config(
        {
            "input": {"path": str(store), "in_place": in_place, "rows_per_chunk": 4096},
            "output_dir": str(out),
            "shards": {"rows": shard_rows},
            "genes": {"text_source": "orgdb"},
            "text_model": {"backend": "local", "model": "all-MiniLM-L6-v2"},
            "cache": {"path": str(cache)},
            "embed": {"methods": ["genept_w"]},
            "ray": {"num_cpus": 2, "object_store_memory": 1 << 30, "actors": 2, "actor_cpus": 1.0},
        }
    )


def _first_shard_s(out: Path, t0: float, stage: str = "*") -> float:
    """Seconds from ``t0`` to the first completion marker of ``stage`` (any stage: ``*``)."""
    marks = list((out / "state").glob(f"{stage}/shard-*.json"))
    return min(p.stat().st_mtime for p in marks) - t0 if marks else float("nan")


def _timed_run(job: Any) -> dict[str, Any]:
    from raypipe.orchestrate.runner import run_job

    out = Path(job.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    summary = run_job(job, progress=False)
    wall = time.time() - t0
    return {
        "first_shard_s": _first_shard_s(out, t0),  # the HVG gene-moments pass comes first
        "first_genept_w_shard_s": _first_shard_s(out, t0, "genept_w"),
        "atlas_s": summary.timings.get("atlas", 0.0),
        "genept_w_s": summary.timings.get("genept_w", 0.0),
        "wall_s": wall,
        "input": summary.input,
        "copy_on_disk": (out / "atlas.zarr").exists(),
        "n_shards": summary.n_shards,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py inplace", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=1_000_000, help="cells in the AnnData .zarr")
    p.add_argument("--workdir", default="/tmp/raypipe-inplace", help="data and outputs")
    p.add_argument("--shard-rows", type=int, default=32768, help="shards.rows")
    p.add_argument("--source", default=str(SOURCE), help="real cells to resample (.h5ad, counts)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (see the module docstring)."""
    from raypipe.bench.genept import build_synthetic
    from raypipe.core.execute import init_ray
    from raypipe.orchestrate.runner import run_job

    args = _parser().parse_args(argv)
    source, work, n = Path(args.source), Path(args.workdir), args.cells
    if not source.is_file():
        print(f"source cells {source} not found (set --source or RAYPIPE_SHARED_DATA)")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs (shared: other work may run beside this)")
    t = time.perf_counter()
    build_synthetic(source, n, work / f"synth_{n}.zarr", work / f"cells_{n}.h5ad", seed=args.seed)
    store = plain_anndata_zarr(work / f"synth_{n}.zarr", work / f"anndata_{n}.zarr")
    print(f"AnnData .zarr of {n:,} resampled cells: {time.perf_counter() - t:.1f} s (not timed)")
    cache = work / "cache"
    warm = _job(source, work / "warm", in_place=False, shard_rows=args.shard_rows, cache=cache)
    init_ray(warm.ray)
    shutil.rmtree(work / "warm", ignore_errors=True)
    run_job(warm, progress=False)  # gene texts and embeddings into the cache (not timed)
    rows = {}
    for name, in_place in (("in place", True), ("copy", False)):
        job = _job(
            store, work / f"out_{name.replace(' ', '_')}", in_place=in_place,
            shard_rows=args.shard_rows, cache=cache,
        )  # fmt: skip
        rows[name] = _timed_run(job)
        print(f"{name}: {rows[name]['input']}")
    a, b = rows["in place"], rows["copy"]
    print()
    print(f"{n:,} cells, {a['n_shards']} shards of {args.shard_rows:,} rows, GenePT-w, 2-CPU Ray")
    print(f"{'':<22} {'in place':>10} {'copy':>10} {'copy / in place':>16}")
    for key, label in (
        ("first_shard_s", "time to first shard s"),
        ("first_genept_w_shard_s", "first GenePT-w shard s"),
        ("atlas_s", "atlas stage s"),
        ("genept_w_s", "genept_w stage s"),
        ("wall_s", "total wall s"),
    ):
        ratio = b[key] / a[key] if a[key] else float("nan")
        print(f"{label:<22} {a[key]:>10.1f} {b[key]:>10.1f} {ratio:>15.2f}x")
    print(f"atlas.zarr copy in the output: in place {a['copy_on_disk']}, copy {b['copy_on_disk']}")
    (work / f"inplace_{n}.json").write_text(json.dumps({"cells": n, **rows}, indent=2))
    return 0
