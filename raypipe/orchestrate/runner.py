"""``raypipe run``: compose the stages a config names and run them on Ray.

atlas (ingest on the fly if needed) → gene space (texts, embeddings, coverage) → per-method
shard stages (resumable, atomic parts) → annotation / evaluation → manifest + summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe import __version__
from raypipe.config import JobConfig, config_hash
from raypipe.core.outputs import atomic_write_json, marker_path, read_marker
from raypipe.errors import InputError

__all__ = ["RunSummary", "ensure_atlas", "pending_shards", "run_job"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class RunSummary:
    """What a run did (printed at the end, and stored in the manifest)."""

    output_dir: str
    n_cells: int = 0
    n_shards: int = 0
    shards_done: dict[str, int] = field(default_factory=dict)
    shards_skipped: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    coverage: str = ""
    ray: str = ""
    wall_s: float = 0.0
    metrics: Any = None
    llm: str = ""

    def render(self) -> str:
        """Human summary."""
        cps = self.n_cells / self.wall_s if self.wall_s else 0.0
        lines = [
            "== raypipe run summary ==",
            f"ray:        {self.ray}",
            f"cells:      {self.n_cells:,} in {self.n_shards} shards",
            f"wall time:  {self.wall_s:.1f} s ({cps:,.0f} cells/s end to end, all stages)",
            f"genes:      {self.coverage}",
        ]
        for m in self.shards_done:
            lines.append(
                f"{m:<11} {self.shards_done[m]} shards computed, {self.shards_skipped.get(m, 0)} reused; "
                f"{self.timings.get(m, 0.0):.1f} s"
            )
        lines.append("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.append("outputs:")
        lines += [f"  {o}" for o in self.outputs]
        if self.llm:
            lines.append("LLM usage (this run; cache hits are free):")
            lines += [f"  {ln}" for ln in self.llm.splitlines()]
        if self.metrics is not None and len(self.metrics):
            wide = self.metrics.pivot_table(
                index="metric", columns="method", values="value", sort=False
            )
            lines.append("metrics (metrics.parquet):")
            lines += ["  " + ln for ln in wide.round(3).fillna("").to_string().splitlines()]
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"raypipe": __version__, "python": sys.version.split()[0]}
    for pkg in (
        "ray",
        "anndata",
        "zarr",
        "numpy",
        "scipy",
        "torch",
        "transformers",
        "sentence-transformers",
        "openai",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def ensure_atlas(job: JobConfig, out_dir: Path, *, progress: bool = True) -> Any:
    """Open ``input.path`` as an atlas, ingesting it into ``<out>/atlas.zarr`` when needed."""
    from raypipe.atlas.ingest import ingest, resolve_input_path
    from raypipe.atlas.store import ATLAS_ATTR, open_atlas

    src = resolve_input_path(job.input.path)
    if not src.exists():
        raise InputError(f"input file {src} does not exist", fix="check input.path in the config")
    if src.is_dir() and ((src / "zarr.json").exists() or (src / ".zgroup").exists()):
        import zarr

        if ATLAS_ATTR in dict(zarr.open_group(str(src), mode="r").attrs):
            atlas = open_atlas(src)
            if job.input.x_kind not in ("auto", atlas.x_kind):
                raise InputError(
                    f"atlas {src} holds {atlas.x_kind} but input.x_kind is {job.input.x_kind}",
                    fix=f"re-ingest with --x-kind {job.input.x_kind}, or set input.x_kind: auto",
                )
            return atlas
    target = out_dir / "atlas.zarr"
    stat = src.stat()
    stamp = {
        "source": str(src),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "layer": job.input.layer,
    }
    stamp_file = out_dir / "state" / "atlas_source.json"
    if target.exists() and read_marker(stamp_file) == stamp:
        atlas = open_atlas(target)
        if job.input.x_kind in ("auto", atlas.x_kind):
            return atlas
    log.info("ingesting %s into %s", src, target)
    result = ingest(
        src,
        target,
        rows_per_chunk=job.input.rows_per_chunk,
        x_kind=job.input.x_kind,
        layer=job.input.layer,
        overwrite=True,
        progress=progress,
    )
    atomic_write_json(stamp_file, stamp)
    return result.atlas


def _check_output_dir(out_dir: Path, job: JobConfig, overwrite: bool) -> None:
    manifest = out_dir / MANIFEST
    if overwrite and out_dir.exists():
        if out_dir.is_dir() and (manifest.exists() or not any(out_dir.iterdir())):
            shutil.rmtree(out_dir)
        else:
            raise InputError(
                f"--overwrite refuses to delete {out_dir}: it is not a raypipe output folder (no {MANIFEST})",
                fix="point output_dir at a new or raypipe-made folder",
            )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"output_dir {out_dir} is a file", fix="point output_dir at a folder")
    if manifest.exists():
        old = json.loads(manifest.read_text())
        old_input = old.get("config", {}).get("input", {}).get("path")
        if old_input != job.input.path:
            raise InputError(
                f"output_dir {out_dir} holds a run of a different input ({old_input}), not {job.input.path}",
                fix="use another output_dir, or pass --overwrite to replace that run",
            )
    elif any(p.name not in {"atlas.zarr", "state", "genes", "cache"} for p in out_dir.iterdir()):
        raise InputError(
            f"output_dir {out_dir} is not empty and holds no raypipe manifest",
            fix="use a new output_dir (raypipe never writes into a folder it did not make)",
        )


def _progress(bar: Any) -> Any:
    def update(row: dict[str, Any]) -> None:
        bar.update(int(row["n_cells"]))

    return update


def pending_shards(out_dir: Path, method: str, shards: list[Any], fingerprint: str) -> list[Any]:
    """Return the shards whose completion marker is missing or stale (content, range, settings)."""
    todo = []
    for s in shards:
        m = read_marker(marker_path(out_dir, method, s.index))
        # the part's place inside *this* out_dir (the marker's absolute path may be stale
        # when the output folder was copied or moved)
        part = out_dir / Path(*Path(m["path"]).parts[-3:]) if m else None
        fresh = (
            m is not None
            and m.get("fingerprint") == fingerprint
            and m.get("content_hash") == s.content_hash
            and (m.get("start"), m.get("stop")) == (s.start, s.stop)
            and part is not None
            and part.exists()
            and not m.get("retry")  # items that failed for a transient reason are retried
        )
        if not fresh:
            todo.append(s)
    return todo


def _drop_stale_parts(out_dir: Path, kind: str, method: str, n_shards: int) -> None:
    """Remove parts/markers of shard indices beyond the current plan (the atlas shrank)."""
    for folder, pattern in (
        (out_dir / kind / method, "part-*.parquet"),
        (out_dir / "state" / method, "shard-*.json"),
    ):
        for p in folder.glob(pattern) if folder.exists() else []:
            if int(p.stem.split("-")[1]) >= n_shards:
                p.unlink()


def _annotate(
    job: JobConfig,
    atlas: Any,
    genes: Any,
    shards: list[Any],
    out_dir: Path,
    manifest: dict[str, Any],
    summary: RunSummary,
    progress: bool,
) -> Any:
    """Zero-shot annotation of every embedding method the scorers can use."""
    from tqdm.auto import tqdm

    from raypipe.annotate.stage import build_annotation, prepare_candidates
    from raypipe.core.execute import map_shards

    cand = prepare_candidates(job, atlas, genes, out_dir)
    summary.outputs.append(str(out_dir / "annotations" / "label_mapping.parquet"))
    manifest["annotate"] = {"candidates": cand.labels, "methods": {}}
    for method in job.embed.methods:
        plan, why_not = build_annotation(
            job, atlas, method, manifest["methods"][method]["fingerprint"], cand
        )
        if plan is None:
            summary.warnings.append(why_not)
            continue
        stage_name = f"annotate_{method}"
        _drop_stale_parts(out_dir, "annotations", method, len(shards))
        todo = pending_shards(out_dir, stage_name, shards, plan.fingerprint)
        bar = tqdm(
            total=sum(s.n_rows for s in todo),
            unit="cell",
            desc=stage_name,
            disable=not progress or not todo,
        )
        map_shards(plan.steps, todo, on_done=_progress(bar))
        bar.close()
        summary.outputs.append(str(out_dir / "annotations" / method))
        manifest["annotate"]["methods"][method] = {
            "fingerprint": plan.fingerprint,
            **plan.notes,
            "shards_computed": len(todo),
        }
    return cand


def _collect_llm(
    job: JobConfig,
    out_dir: Path,
    shards: list[Any],
    computed: dict[str, set[int]],
    genes: Any,
    candidates: Any,
    summary: RunSummary,
    manifest: dict[str, Any],
) -> str | None:
    """Sum LLM usage and cost; merge failures into failures.parquet; check the failure share."""
    import pandas as pd
    import pyarrow as pa

    from raypipe.core.outputs import write_parquet_atomic
    from raypipe.llm.cost import CostMeter

    meter = CostMeter().merge(genes.usage or {})
    if candidates is not None:
        meter.merge(candidates.usage or {})
    rows = []
    for f in sorted((out_dir / "state" / "failures").glob("*.parquet")):
        rows += pd.read_parquet(f).to_dict("records")
    exceeded = None
    for method in job.embed.methods:
        n_failed = 0
        for s in shards:
            m = read_marker(marker_path(out_dir, method, s.index)) or {}
            if s.index in computed.get(method, set()):  # reused shards cost nothing this run
                meter.merge(m.get("usage") or {})
            n_failed += len(m.get("failures") or [])
            rows += m.get("failures") or []
        share = n_failed / max(summary.n_cells, 1)
        if method == "genept_s" and share > job.limits.max_failure_share:
            exceeded = (
                f"{n_failed:,} of {summary.n_cells:,} cells ({share:.1%}) got no GenePT-s embedding, "
                f"more than limits.max_failure_share = {job.limits.max_failure_share:.1%}"
            )
    if rows:
        df = pd.DataFrame(rows).astype(str)
        write_parquet_atomic(
            out_dir / "failures.parquet", pa.Table.from_pandas(df, preserve_index=False)
        )
        summary.outputs.append(str(out_dir / "failures.parquet"))
        summary.warnings.append(f"{len(df):,} items failed for good: see failures.parquet")
    prices = {k: v.model_dump() for k, v in job.prices.items()}
    if meter.models:
        manifest["llm_usage"] = meter.summary(prices)
        summary.llm = meter.format(prices)
    return exceeded


def run_job(job: JobConfig, *, overwrite: bool = False, progress: bool = True) -> RunSummary:
    """Run every stage the config names; return the summary (also written to the manifest)."""
    from tqdm.auto import tqdm

    from raypipe.atlas.store import plan_shards, read_obs_columns
    from raypipe.core.execute import init_ray, map_shards
    from raypipe.embed.methods import METHODS
    from raypipe.genes.space import prepare_gene_space

    t_start = time.perf_counter()
    out_dir = Path(job.output_dir)
    _check_output_dir(out_dir, job, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(output_dir=str(out_dir))
    manifest: dict[str, Any] = {
        "status": "running",
        "config": job.model_dump(mode="json"),
        "config_hash": config_hash(job),
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    for name in job.embed.methods:
        METHODS.get(name)  # fail fast on a method that is not available

    t = time.perf_counter()
    atlas = ensure_atlas(job, out_dir, progress=progress)
    summary.timings["atlas"] = time.perf_counter() - t
    keys = [k for k in (job.input.label_key, job.input.batch_key) if k]
    if keys:
        read_obs_columns(atlas.path, keys)  # a missing column fails here, naming those present
    summary.n_cells = atlas.n_obs
    summary.ray = init_ray(job.ray)

    t = time.perf_counter()
    genes = prepare_gene_space(job, atlas, out_dir)
    summary.timings["genes"] = time.perf_counter() - t
    summary.coverage = genes.coverage.summary()
    summary.warnings += genes.warnings
    manifest["atlas"] = dict(atlas.extra) | {"path": atlas.path}
    manifest["genes"] = {
        "text_source": genes.source,
        "model": genes.model,
        "fingerprint": genes.fingerprint,
        "coverage": {
            "n_genes": genes.coverage.n_genes,
            "n_covered": genes.coverage.n_covered,
            "share": genes.coverage.share,
        },
        "unmatched_examples": list(genes.coverage.unmatched),
    }
    shards = plan_shards(atlas, job.shards.rows)
    summary.n_shards = len(shards)
    manifest["shards"] = {"rows": job.shards.rows, "n": len(shards)}
    manifest["methods"] = {}
    computed: dict[str, set[int]] = {}

    for name in job.embed.methods:
        t = time.perf_counter()
        plan = METHODS.get(name).build(job, atlas, genes, shards)
        kind = plan.kind
        _drop_stale_parts(out_dir, kind, name, len(shards))
        todo = pending_shards(out_dir, name, shards, plan.fingerprint)
        computed[name] = {s.index for s in todo}
        bar = tqdm(
            total=sum(s.n_rows for s in todo),
            unit="cell",
            desc=name,
            disable=not progress or not todo,
        )
        map_shards(plan.steps, todo, on_done=_progress(bar))
        bar.close()
        summary.timings[name] = time.perf_counter() - t
        summary.shards_done[name] = len(todo)
        summary.shards_skipped[name] = len(shards) - len(todo)
        summary.outputs.append(str(out_dir / kind / name))
        manifest["methods"][name] = {
            "fingerprint": plan.fingerprint,
            "shards_computed": len(todo),
            **plan.notes,
        }

    candidates = None
    if job.annotate.enabled:
        t = time.perf_counter()
        candidates = _annotate(job, atlas, genes, shards, out_dir, manifest, summary, progress)
        summary.timings["annotate"] = time.perf_counter() - t
    if job.evaluate.enabled:
        from raypipe.evaluate.stage import run_evaluation

        t = time.perf_counter()
        ev = run_evaluation(job, atlas, out_dir, list(job.embed.methods), candidates)
        summary.timings["evaluate"] = time.perf_counter() - t
        if "table" in ev:
            summary.metrics = ev.pop("table")
            summary.outputs += [p for p in (ev.get("metrics"), ev.get("report")) if p]
        manifest["evaluation"] = ev

    failures_exceeded = _collect_llm(
        job, out_dir, shards, computed, genes, candidates, summary, manifest
    )
    summary.wall_s = time.perf_counter() - t_start
    manifest.update(
        status="complete",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        timings=summary.timings,
        wall_s=summary.wall_s,
        warnings=summary.warnings,
        outputs=summary.outputs,
    )
    summary.outputs.append(str(out_dir / MANIFEST))
    if failures_exceeded:
        manifest["status"] = "failed"
    atomic_write_json(out_dir / MANIFEST, manifest)
    if failures_exceeded:
        from raypipe.llm.cost import FailureShareExceeded

        print(summary.render())
        raise FailureShareExceeded(
            failures_exceeded, fix="see failures.parquet; re-run to retry only the failed items"
        )
    return summary
