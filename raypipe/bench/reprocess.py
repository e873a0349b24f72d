"""Reprocessing a grown atlas: reuse under the default config vs refitting, side by side.

The Kang 8k file (8,684 PBMCs) stands in for a nightly atlas: "yesterday" is its first
7,684 cells, "today" all 8,684 (1,000 real new cells), under a new file name. With the
default config (GenePT-w HVG-500, centred) three runs go one after another in one process
(one embedded Ray, one shared gene-text cache, gene texts embedded by the first run only):

1. yesterday's atlas, first run (fits and records the embedding space);
2. today's atlas on the same folder (reuses the space: only new/changed shards);
3. today's atlas with ``--refit`` (what every re-run did before the space was recorded:
   everything recomputed).

It prints each run's wall time, shards computed and whether yesterday's cells kept their
vectors bit for bit::

    python jobs/benchmark.py reprocess [--input ../shared/data/cells/kang2018_pbmc_8k_muscat_kang.h5ad]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"


def _vectors(out: Path) -> Any:
    import numpy as np
    import pandas as pd

    parts = sorted((out / "embeddings" / "genept_w").glob("part-*.parquet"))
    df = pd.concat([pd.read_parquet(p, columns=["obs_name", "embedding"]) for p in parts])
    return df.set_index("obs_name")["embedding"].map(lambda v: np.asarray(v, np.float32))


def main(argv: list[str] | None = None) -> int:
    """Run the three runs and print their figures."""
    import anndata as ad
    import numpy as np

    from raypipe.config import load_config
    from raypipe.orchestrate.runner import run_job

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=str(DEFAULT_INPUT), help=".h5ad to grow")
    p.add_argument("--new", type=int, default=1000, help="cells added (the file's last ones)")
    p.add_argument("--rows", type=int, default=1024, help="shards.rows = input.rows_per_chunk")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="raypipe-bench-reprocess-"))
    try:
        full = ad.read_h5ad(args.input)
        yesterday, today = root / "atlas-yesterday.h5ad", root / "atlas-today.h5ad"
        full[: full.n_obs - args.new].copy().write_h5ad(yesterday)
        shutil.copy(args.input, today)

        def job(path: Path, out: Path) -> Any:
            return load_config(
                {
                    "input": {"path": str(path), "rows_per_chunk": args.rows},
                    "output_dir": str(out),
                    "shards": {"rows": args.rows},
                    "cache": {"path": str(root / "cache")},
                    "ray": {"num_cpus": 2, "actors": 2, "actor_cpus": 1},
                }
            )

        old = full.obs_names[: full.n_obs - args.new]
        rows, vectors = [], []
        out = root / "run"
        for name, path, refit in (
            ("yesterday, first run", yesterday, False),
            ("today (+new cells), reuse", today, False),
            ("today, --refit", today, True),
        ):
            if refit:  # refit a copy of the folder as the reuse run left it
                shutil.copytree(out, root / "refit")
                out = root / "refit"
            t0 = time.perf_counter()
            summary = run_job(job(path, out), progress=False, refit=refit)
            wall = time.perf_counter() - t0
            rows.append((name, summary.n_shards, summary.shards_done["genept_w"], wall))
            vectors.append(_vectors(out).loc[old])
        print(f"{args.input}: {len(old):,} cells + {args.new:,} new, shards of {args.rows} rows")
        print(f"{'run':<28} {'shards':>6} {'computed':>8} {'wall s':>8} {'old cells kept':>15}")
        for (name, n, done, wall), vec in zip(rows, vectors, strict=True):
            same = sum(np.array_equal(a, b) for a, b in zip(vectors[0], vec, strict=True))
            print(f"{name:<28} {n:>6} {done:>8} {wall:>8.1f} {same:>9,} of {len(old):,}")
        print(f"--refit / reuse wall time: {rows[2][3] / rows[1][3]:.1f}x")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
