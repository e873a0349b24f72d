"""GenePT-w benchmark: the sharded Ray pipeline vs an in-memory scipy baseline.

Builds synthetic atlases by resampling real cells (Kang 2018 PBMCs) to each size, written
streaming, chunk by chunk (never 1M cells in memory): a raypipe Zarr atlas for the pipeline
and an ``.h5ad`` for the baseline. Gene texts and their embeddings are prepared once (not
timed) and reused by every run. Then, per size, it measures

* the pipeline end to end (Zarr → parquet, ``run_job`` on a warm 2-CPU local Ray), and its
  peak memory summed over the driver and every Ray process it started (sampled every 0.2 s);
* the baseline (read the whole ``.h5ad``, normalise to 1e4, log1p, ``X @ E``, L2-normalise)
  in a subprocess, and its peak RSS (``getrusage``),

and prints both side by side::

    python jobs/benchmark.py genept --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TreeSampler", "build_synthetic", "main", "tree_rss"]

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SOURCE = SHARED / "cells" / "kang2018_pbmc_8k_muscat_kang.h5ad"
ROWS_PER_CHUNK = 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- memory sampling (/proc)
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(b"ray::")
    except OSError:
        return False


def tree_rss(root: int) -> tuple[int, int]:
    """Return ``(rss of root + Ray workers, rss of root's whole process tree)`` in bytes.

    Parameters
    ----------
    root
        Pid of the driver process; Ray's system processes and workers are its descendants.
    """
    kids = _children_map()
    todo, tree = [root], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(kids.get(pid, ()))
    sizes = {pid: _rss(pid) for pid in tree}
    workers = sizes[root] + sum(v for p, v in sizes.items() if p != root and _is_worker(p))
    return workers, sum(sizes.values())


class TreeSampler:
    """Sample :func:`tree_rss` of a process every ``interval`` seconds; keep the peaks.

    Parameters
    ----------
    pid
        Root process to follow.
    interval
        Seconds between samples.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_workers = 0
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            workers, tree = tree_rss(self.pid)
            self.peak_workers = max(self.peak_workers, workers)
            self.peak_tree = max(self.peak_tree, tree)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- synthetic data
def build_synthetic(
    source: Path, n_cells: int, atlas: Path, h5ad: Path, *, seed: int = 0, pairs: bool = False
) -> dict[str, Any]:
    """Write ``n_cells`` resampled cells of ``source`` as a raypipe atlas and as an ``.h5ad``.

    Both are written chunk by chunk (``ROWS_PER_CHUNK`` rows): memory stays at one chunk plus
    the source (8k cells) and the obs table. Existing outputs of the same recipe are reused.

    Parameters
    ----------
    source
        ``.h5ad`` with raw counts (CSR).
    n_cells
        Cells to draw (with replacement).
    atlas, h5ad
        Destinations.
    seed
        Seed of the resampling.
    pairs
        Make each cell from two random source cells of the same ``cluster_id``: half of each
        one's counts (binomial thinning, seeded) added up. Resampled cells then differ (a
        clustering benchmark needs this: exact copies make cliques in a kNN graph); False
        copies cells as they are.

    Returns
    -------
    The recipe (also stored next to the outputs as ``<atlas>.recipe.json``).
    """
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    import zarr
    from anndata.io import sparse_dataset, write_elem

    from raypipe.atlas.csr_writer import CsrWriter, chunk_elements
    from raypipe.atlas.ingest import chunk_hash, write_atlas_metadata

    recipe = {"source": str(source), "n_cells": n_cells, "seed": seed, "rows": ROWS_PER_CHUNK}
    if pairs:
        recipe["pairs"] = True
    stamp = atlas.with_name(atlas.name + ".recipe.json")
    ready = atlas.exists() and h5ad.exists() and stamp.exists()
    if ready and json.loads(stamp.read_text()) == recipe:
        return recipe
    src = ad.read_h5ad(source)
    x_src = sp.csr_matrix(src.X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, src.n_obs, size=n_cells)
    thinning = np.random.default_rng([seed, 1])
    mate = pick.copy()  # pairs: a second cell of the same label for every pick
    if pairs:
        labels = np.asarray(src.obs["cluster_id"]).astype(str)
        for lab in np.unique(labels):
            same = np.flatnonzero(labels == lab)
            rows = np.flatnonzero(labels[pick] == lab)
            mate[rows] = same[thinning.integers(0, same.size, size=rows.size)]
    obs = pd.DataFrame(
        {"cluster_id": pd.Categorical(np.asarray(src.obs["cluster_id"])[pick])},
        index=pd.Index([f"c{i:08d}" for i in range(n_cells)], name="cell_id"),
    )
    var = src.var.copy()
    del src
    for p in (atlas, h5ad, stamp):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    atlas.parent.mkdir(parents=True, exist_ok=True)
    tmp_atlas = atlas.with_name(f".{atlas.name}.tmp")
    tmp_h5 = h5ad.with_name(f".{h5ad.name}.tmp")
    shutil.rmtree(tmp_atlas, ignore_errors=True)
    # plain row chunks, as ingest writes them (and no anndata warning about a future default)
    with ad.settings.override(auto_shard_zarr_v3=False):
        group = zarr.open_group(str(tmp_atlas), mode="w", zarr_format=3)
        write_elem(group, "obs", obs)
        write_elem(group, "var", var)
        hashes: list[str] = []
        zero_cells = 0
        zx: CsrWriter | None = None  # the atlas written as ingest writes it
        hx: Any = None
        with h5py.File(tmp_h5, "w") as fh, ExitStack() as stack:
            write_elem(fh, "obs", obs)
            write_elem(fh, "var", var)
            for start in range(0, n_cells, ROWS_PER_CHUNK):
                x = x_src[pick[start : start + ROWS_PER_CHUNK]]
                if pairs:
                    halves = [x, x_src[mate[start : start + ROWS_PER_CHUNK]]]
                    for h in halves:
                        h.data = thinning.binomial(h.data.astype(np.int64), 0.5).astype(np.float32)
                    x = (halves[0] + halves[1]).tocsr()
                    x.eliminate_zeros()
                x.sort_indices()
                hashes.append(chunk_hash(x))
                zero_cells += int(np.count_nonzero(np.diff(x.indptr) == 0))
                if zx is None:
                    chunk = chunk_elements(x, ROWS_PER_CHUNK)
                    zx = stack.enter_context(CsrWriter(group, "X", x, chunk))
                    write_elem(fh, "X", x, dataset_kwargs={"chunks": (chunk,)})
                    hx = sparse_dataset(fh["X"])
                else:
                    zx.append(x)
                    hx.append(x)
            fh.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            assert zx is not None  # n_cells > 0
            zx.close()
        write_atlas_metadata(
            group,
            n_obs=n_cells,
            var_names=var.index,
            x_kind="counts",
            x_kind_detected="counts",
            rows_per_chunk=ROWS_PER_CHUNK,
            chunk_hashes=hashes,
            source=f"resampled from {source} (seed {seed})",
            layer=None,
            zero_count_cells=zero_cells,
        )
    tmp_atlas.rename(atlas)
    tmp_h5.rename(h5ad)
    stamp.write_text(json.dumps(recipe))
    return recipe


# ---------------------------------------------------------------- jobs (run in subprocesses)
def _job(atlas: Path, out_dir: Path, table: Path | None, shard_rows: int) -> Any:
    from raypipe.config import load_config

    genes = {"text_source": "table", "table": str(table)} if table else {"text_source": "orgdb"}
    return load_config(
        {
            "input": {"path": str(atlas)},
            "output_dir": str(out_dir),
            "shards": {"rows": shard_rows},
            "genes": genes,
            "text_model": {"backend": "local", "model": "all-MiniLM-L6-v2"},
            "embed": {"methods": ["genept_w"], "genept_w": {"hvg": None, "center": False}},
            "ray": {"num_cpus": 2, "object_store_memory": 1 << 30, "actors": 2, "actor_cpus": 1.0},
        }
    )


def _init_ray(job: Any) -> None:
    from raypipe.core.execute import init_ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    init_ray(job.ray)


def _worker_genes(atlas: Path, workdir: Path, seed_cache: Path | None) -> dict[str, Any]:
    """Prepare gene texts (orgdb) and embeddings once; write the table, cache and E."""
    import pandas as pd

    from raypipe.atlas.store import open_atlas
    from raypipe.embed.genept_w import weight_matrix
    from raypipe.genes.space import CACHE_FILE, prepare_gene_space

    warm = workdir / "genes-warm"
    (warm / CACHE_FILE).parent.mkdir(parents=True, exist_ok=True)
    if seed_cache is not None:
        shutil.copy(seed_cache, warm / CACHE_FILE)
    info = open_atlas(atlas)
    job = _job(atlas, warm, None, 65536)
    _init_ray(job)
    space = prepare_gene_space(job, info, warm)
    texts = space.texts
    sym_to_ens = dict(
        zip(space.resolution.unique_symbols, space.resolution.unique_ensembl, strict=True)
    )
    table = pd.DataFrame(
        {
            "symbol": texts["symbol"],
            "ensembl_id": [sym_to_ens.get(s) or "" for s in texts["symbol"]],
            "text": texts["text"],
        }
    )
    table.to_csv(workdir / "gene_texts.tsv", sep="\t", index=False)
    shutil.copy(warm / CACHE_FILE, workdir / "gene_embeddings.parquet")
    # the baseline's E uses exactly the pipeline's gene space (same table, same cache)
    tjob = _job(atlas, warm, workdir / "gene_texts.tsv", 65536)
    tspace = prepare_gene_space(tjob, info, warm)
    w = weight_matrix(tspace.embeddings, tspace.has_text)
    e = np.asarray(tspace.collapse @ w, dtype=np.float32)
    np.save(workdir / "E.npy", e)
    return {"coverage": tspace.coverage.summary(), "E": list(e.shape)}


def _worker_pipeline(atlas: Path, workdir: Path, out_dir: Path, shard_rows: int) -> dict[str, Any]:
    """Run the GenePT-w job on a warm Ray; return timings."""
    from raypipe.genes.space import CACHE_FILE
    from raypipe.orchestrate.runner import run_job

    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / CACHE_FILE).parent.mkdir(parents=True)
    shutil.copy(workdir / "gene_embeddings.parquet", out_dir / CACHE_FILE)
    job = _job(atlas, out_dir, workdir / "gene_texts.tsv", shard_rows)
    t = time.perf_counter()
    _init_ray(job)
    ray_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = run_job(job, progress=False)
    wall = time.perf_counter() - t
    return {
        "wall_s": wall,
        "ray_start_s": ray_s,
        "timings": summary.timings,
        "n_cells": summary.n_cells,
        "n_shards": summary.n_shards,
    }


def _worker_baseline(h5ad: Path, e_path: Path) -> dict[str, Any]:
    """Read the whole .h5ad, normalise, log1p, X @ E, L2-normalise; return timings."""
    import resource

    import anndata as ad

    e = np.load(e_path)
    t0 = time.perf_counter()
    x = ad.read_h5ad(h5ad).X.tocsr()
    t1 = time.perf_counter()
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    np.log1p(x.data, out=x.data)
    emb = np.asarray(x @ e, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    np.divide(emb, norms, out=emb, where=norms > 0)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "wall_s": t2 - t0,
        "read_s": t1 - t0,
        "compute_s": t2 - t1,
        "peak_rss": peak,
        "n_cells": x.shape[0],
    }


def _spawn(args: list[str], *, sample: bool) -> tuple[dict[str, Any], int, int]:
    cmd = [sys.executable, "-m", "raypipe.bench.genept", "--_worker", *args]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    if sample:
        sampler.__enter__()
    out, _ = proc.communicate()
    if sample:
        sampler.__exit__()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step {args[0]} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return result, sampler.peak_workers, sampler.peak_tree


# ---------------------------------------------------------------- driver
def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py genept", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated cell counts")
    p.add_argument("--workdir", default="/tmp/raypipe-bench", help="data and outputs")
    p.add_argument("--shard-rows", type=int, default=16384, help="shards.rows of the pipeline")
    p.add_argument("--source", default=str(SOURCE), help="real cells to resample (.h5ad, counts)")
    p.add_argument("--gene-embeddings", default=None, help="seed genes/gene_embeddings.parquet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    return p


def _run_worker(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "genes":
        res = _worker_genes(Path(rest[0]), Path(rest[1]), Path(rest[2]) if len(rest) > 2 else None)
    elif kind == "pipeline":
        res = _worker_pipeline(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]))
    else:
        res = _worker_baseline(Path(rest[0]), Path(rest[1]))
    print(json.dumps(res, default=float), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args._worker:
        return _run_worker(args._worker)
    source = Path(args.source)
    if not source.is_file():
        print(f"source cells {source} not found (set --source or RAYPIPE_SHARED_DATA)")
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = sum(sizes) * 2 * 424 * 8 * 1.2  # ~424 nnz/cell, h5ad (uncompressed) + zarr
    print(f"workdir {work}: {_gib(free)} free, need about {_gib(need)}")
    if free < need:
        print("not enough disk space for these sizes")
        return 2
    print(
        f"machine: {os.cpu_count()} CPUs; pipeline: local Ray, 2 CPUs, 2 actors × 1 CPU, "
        f"shards.rows={args.shard_rows}; GenePT-w plain (all genes, no centring)"
    )
    for n in sizes:
        t = time.perf_counter()
        build_synthetic(
            source, n, work / f"atlas_{n}.zarr", work / f"cells_{n}.h5ad", seed=args.seed
        )
        print(f"data {n:,} cells ready in {time.perf_counter() - t:.1f} s")
    if not (work / "E.npy").exists() or not (work / "gene_texts.tsv").exists():
        seed = [args.gene_embeddings] if args.gene_embeddings else []
        info, _, _ = _spawn(
            ["genes", str(work / f"atlas_{sizes[0]}.zarr"), str(work), *seed], sample=False
        )
        print(f"gene space (not timed): {info['coverage']}; E {info['E']}")
    rows = []
    for n in sizes:
        pipe, peak_w, peak_t = _spawn(
            [
                "pipeline",
                str(work / f"atlas_{n}.zarr"),
                str(work),
                str(work / f"out_{n}"),
                str(args.shard_rows),
            ],
            sample=True,
        )
        base, _, base_tree = _spawn(
            ["baseline", str(work / f"cells_{n}.h5ad"), str(work / "E.npy")], sample=True
        )
        rows.append((n, pipe, peak_w, peak_t, base, max(base["peak_rss"], base_tree)))
        print(
            f"  {n:,}: pipeline {pipe['wall_s']:.1f} s, baseline {base['wall_s']:.1f} s", flush=True
        )
    print()
    print(
        f"{'cells':>10} | {'pipeline cells/s':>16} {'peak (driver+workers)':>22} "
        f"{'peak (whole Ray)':>17}"
        f" | {'baseline cells/s':>16} {'peak':>10} | ratio"
    )
    for n, pipe, peak_w, peak_t, base, base_peak in rows:
        p_cps, b_cps = n / pipe["wall_s"], n / base["wall_s"]
        print(
            f"{n:>10,} | {p_cps:>16,.0f} {_gib(peak_w):>22} {_gib(peak_t):>17} | {b_cps:>16,.0f}"
            f" {_gib(base_peak):>10} | {p_cps / b_cps:.2f}×"
        )
    for n, pipe, *_ in rows:
        t = pipe["timings"]
        print(
            f"pipeline {n:,}: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
            + f" ({pipe['n_shards']} shards; Ray start {pipe['ray_start_s']:.1f}s, not timed)"
        )
    for n, *_, base, _ in rows:
        print(f"baseline {n:,}: read {base['read_s']:.1f}s, compute {base['compute_s']:.1f}s")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(
            f"memory growth {a[0]:,} → {b[0]:,} cells: "
            f"pipeline ×{b[2] / a[2]:.2f} (driver+workers), "
            f"×{b[3] / a[3]:.2f} (whole Ray); baseline ×{b[5] / a[5]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
