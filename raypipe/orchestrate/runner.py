"""``raypipe run``: compose the stages a config names and run them on Ray.

validate the job (read-only) → atlas (ingest on the fly if needed) → gene space (texts,
embeddings, coverage) → cell-type discovery (``annotate.candidates: auto``) → each method's
plan, run over the shards its ledger says are pending → annotation → evaluation → LLM usage and failures → manifest + summary.

This is the only module that knows every stage; each stage owns its builder
(``raypipe.embed.methods.METHODS``, ``raypipe.annotate.stage.build_annotation``) and the kit
(``raypipe.core``) runs plans (:func:`raypipe.core.execute.run_plan`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from raypipe.config import JobConfig, config_hash
from raypipe.core import watchdog
from raypipe.core.lease import Lease
from raypipe.core.outputs import read_frame
from raypipe.core.space import FittedSpace
from raypipe.core.storage import as_path, sorted_paths
from raypipe.core.storage import configure as configure_storage
from raypipe.llm.text_stage import release_text_actors
from raypipe.orchestrate.manifest import MANIFEST, Manifest
from raypipe.orchestrate.outdir import check_output_dir, clear_run, make_output_dir
from raypipe.orchestrate.prepare import ensure_atlas, validate_job
from raypipe.orchestrate.summary import RunSummary

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo
    from raypipe.core.plan import Shard, StagePlan
    from raypipe.genes.space import GeneSpace

__all__ = ["MANIFEST", "RunSummary", "ensure_atlas", "run_job"]

log = logging.getLogger(__name__)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    from raypipe.errors import RaypipeError

    if isinstance(exc, RaypipeError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


class _Run:
    """One run's state as it goes: the job, its manifest, its summary, what it computed."""

    def __init__(
        self, job: JobConfig, manifest: Manifest, progress: bool, space: FittedSpace, lease: Lease
    ) -> None:
        self.job, self.manifest, self.progress = job, manifest, progress
        self.space, self.lease = space, lease
        self.out_dir = as_path(job.output_dir)
        self.summary = RunSummary(output_dir=str(self.out_dir))
        self.computed: dict[str, list[Shard]] = {}
        self.discovered: Any = None  # what annotate.candidates: auto found

    def _timed(self, name: str, t0: float) -> None:
        self.lease.check()  # another run took the folder over: stop before writing more
        self.summary.timings[name] = time.perf_counter() - t0
        self.manifest.timings = self.summary.timings
        watchdog.activity(f"the manifest write to {self.out_dir / MANIFEST}")
        self.manifest.write(self.out_dir)  # a failure later keeps what got this far
        watchdog.activity(f"the step after {name}")

    def run_plan(
        self, plan: StagePlan, method: str, shards: list[Shard], desc: str
    ) -> dict[str, list[int]]:
        """Run ``plan`` over its stale shards; return why each was computed (reason → shards)."""
        from raypipe.core.execute import run_plan

        todo = run_plan(
            plan, self.job.output_dir, method, shards, progress=self.progress, desc=desc
        )
        self.computed[f"{plan.kind}/{method}"] = list(todo)
        self.summary.outputs.append(str(self.out_dir / plan.kind / method))
        why: dict[str, list[int]] = {}
        for shard, reason in todo.items():
            why.setdefault(reason, []).append(shard.index)
        self.summary.recomputed[desc] = {r: len(v) for r, v in why.items()}
        return why

    def atlas(self) -> AtlasInfo:
        from raypipe.core.execute import init_ray

        t = time.perf_counter()
        watchdog.activity(f"the atlas: opening or ingesting {self.job.input.path}")
        atlas = ensure_atlas(self.job, self.out_dir, progress=self.progress)
        watchdog.activity("Ray to start (or the cluster to answer)")
        self.summary.n_cells = atlas.n_obs
        self.summary.input = str(atlas.extra.get("input", ""))  # in place, or why it was copied
        self.manifest.atlas = dict(atlas.extra) | {"path": atlas.path}
        self.summary.ray = init_ray(self.job.ray)
        self._timed("atlas", t)
        return atlas

    def genes(self, atlas: AtlasInfo) -> GeneSpace:
        from raypipe.core.faults import fault_point
        from raypipe.genes.space import prepare_gene_space

        t = time.perf_counter()
        fault_point("genes", self.out_dir)
        watchdog.activity(f"gene texts and their embeddings ({self.job.text_model.model})")
        genes = prepare_gene_space(self.job, atlas, self.out_dir, progress=self.progress)
        self.summary.coverage = genes.coverage.summary()
        self.summary.warnings += genes.warnings
        self.manifest.genes = {
            "text_source": genes.source,
            "model": genes.model,
            "fingerprint": genes.fingerprint,
            "coverage": {
                "n_genes": genes.coverage.n_genes,
                "n_covered": genes.coverage.n_covered,
                "share": genes.coverage.share,
            },
            "matched_by": genes.resolution.by_how(),
            "unmatched_examples": list(genes.coverage.unmatched),
            "cache": genes.cache,
        }
        self._timed("genes", t)
        return genes

    def methods(
        self, atlas: AtlasInfo, genes: GeneSpace, shards: list[Shard], candidates: Any
    ) -> None:
        """Plan and run every embedding method.

        With the ``langcell`` scorer on, the methods that compute per-cell text scores on their
        own actors (CE) get the candidate texts now, so cell states never leave those actors.
        """
        from raypipe.embed.methods import METHODS

        texts = None
        if candidates is not None:
            texts = dict(zip(candidates.labels, candidates.table["text"].astype(str), strict=True))
        for name in self.job.embed.methods:
            t = time.perf_counter()
            entry = METHODS.get(name)
            extra: dict[str, Any] = (
                {"space": self.space, "progress": self.progress} if entry.fits_space else {}
            )
            if texts and entry.cell_text_scores:
                extra["candidate_texts"] = texts
            plan = entry.build(self.job, atlas, genes, shards, **extra)
            why = self.run_plan(plan, name, shards, desc=name)
            n = sum(len(v) for v in why.values())
            self.summary.shards_done[name] = n
            self.summary.shards_skipped[name] = len(shards) - n
            self.manifest.methods[name] = {
                "fingerprint": plan.fingerprint,
                "shards_computed": n,
                "recomputed": why,
                **plan.notes,
            }
            self._timed(name, t)

    def discover(self, atlas: AtlasInfo, genes: GeneSpace, shards: list[Shard]) -> Any:
        """``annotate.candidates: auto``: clusters → markers → names (annotations/clusters.parquet)."""
        from raypipe.annotate.discover import CLUSTERS_FILE, discover

        t = time.perf_counter()
        found = discover(self.job, atlas, shards, genes, self.out_dir, progress=self.progress)
        self.summary.warnings += found.warnings
        self.summary.outputs.append(str(self.out_dir / "annotations" / CLUSTERS_FILE))
        self._timed("discover", t)
        return found

    def candidates(self, atlas: AtlasInfo, genes: GeneSpace, discovered: Any = None) -> Any:
        """Build, embed and write the annotation candidates (once per run)."""
        from raypipe.annotate.prepare import prepare_candidates

        t = time.perf_counter()
        watchdog.activity("the annotation candidates (ontology, markers, texts)")
        cand = prepare_candidates(self.job, atlas, genes, self.out_dir, discovered)
        self.summary.warnings += list(cand.warnings or [])
        self.summary.outputs.append(str(self.out_dir / "annotations" / "label_mapping.parquet"))
        self.manifest.annotate = {"candidates": cand.labels, "methods": {}}
        if discovered is not None:
            table = discovered.table
            self.manifest.annotate["discover"] = {
                "fingerprint": discovered.fingerprint,
                "n_clusters": len(table),
                "named": int((table["candidate"] != "unassigned").sum()),
                "naming": self.job.annotate.discover.naming,
            }
        release_text_actors()  # the run's last text to embed: free the model's memory
        self._timed("candidates", t)
        return cand

    def annotate(self, atlas: AtlasInfo, cand: Any, shards: list[Shard]) -> None:
        from raypipe.annotate.stage import build_annotation

        t = time.perf_counter()
        assert self.manifest.annotate is not None
        for method in self.job.embed.methods:
            method_fp = self.manifest.methods[method]["fingerprint"]
            plan, why_not = build_annotation(
                self.job, atlas, method, method_fp, cand, space=self.space
            )
            if plan is None:
                self.summary.warnings.append(why_not)
                continue
            why = self.run_plan(plan, method, shards, desc=f"annotate_{method}")
            self.manifest.annotate["methods"][method] = {
                "fingerprint": plan.fingerprint,
                **plan.notes,
                "shards_computed": sum(len(v) for v in why.values()),
                "recomputed": why,
            }
        self._timed("annotate", t)

    def evaluate(self, atlas: AtlasInfo, candidates: Any, previous: dict[str, Any]) -> None:
        """Evaluate, unless the previous run evaluated exactly these outputs (then reuse)."""
        from raypipe.core.plan import stage_hash
        from raypipe.evaluate.stage import run_evaluation

        t = time.perf_counter()
        ann = (self.manifest.annotate or {}).get("methods", {})
        fingerprint = stage_hash(
            "evaluate",
            config_hash(self.job.evaluate),
            self.job.input.label_key,
            self.job.input.batch_key,
            self.job.input.name,
            atlas.chunk_hashes,
            sorted((m, v["fingerprint"]) for m, v in self.manifest.methods.items()),
            sorted((m, v["fingerprint"]) for m, v in ann.items()),
        )
        metrics = self.out_dir / "metrics.parquet"
        old = previous.get("evaluation") or {}
        if old.get("fingerprint") == fingerprint and metrics.exists():
            ev = dict(old, reused=True)
            self.summary.evaluation = "reused (same outputs as the previous run)"
            self.summary.metrics = read_frame(metrics)
            self.summary.outputs += [p for p in (old.get("metrics"), old.get("report")) if p]
        else:
            watchdog.activity("the evaluation (metrics, neighbours, report)")
            ev = run_evaluation(
                self.job,
                atlas,
                self.out_dir,
                list(self.job.embed.methods),
                candidates,
                progress=self.progress,
            )
            ev["fingerprint"] = fingerprint
            self.summary.evaluation = (
                "computed (first evaluation)"
                if not old
                else "recomputed (the atlas, a setting or an output it reads changed)"
            )
            if "table" in ev:
                self.summary.metrics = ev.pop("table")
                self.summary.outputs += [p for p in (ev.get("metrics"), ev.get("report")) if p]
        self.manifest.evaluation = ev
        self._timed("evaluate", t)

    def llm_usage(self, genes: GeneSpace, candidates: Any, shards: list[Shard]) -> str | None:
        """Sum LLM usage and cost; merge failures into failures.parquet; check the share."""
        import pandas as pd
        import pyarrow as pa

        from raypipe.core.ledger import Ledger
        from raypipe.core.outputs import write_parquet_atomic
        from raypipe.embed.methods import METHODS
        from raypipe.llm.cost import CostMeter

        job, out_dir = self.job, self.out_dir
        meter = CostMeter().merge(genes.usage or {})
        if self.discovered is not None:
            meter.merge(self.discovered.usage or {})
        if candidates is not None:
            meter.merge(candidates.usage or {})
        rows: list[dict[str, Any]] = []
        for f in sorted_paths((out_dir / "state" / "failures").glob("*.parquet")):
            rows += read_frame(f).to_dict("records")
        exceeded = None
        for method in job.embed.methods:
            ledger = Ledger(job.output_dir, "embeddings", method)
            computed = {s.index for s in self.computed.get(f"embeddings/{method}", [])}
            n_failed = 0
            for s, marker in zip(shards, ledger.records(shards), strict=True):
                if s.index in computed:  # reused shards cost nothing this run
                    meter.merge(marker.get("usage") or {})
                failed = marker.get("failures") or []
                n_failed += len(failed)
                rows += failed
            share = n_failed / max(self.summary.n_cells, 1)
            if share > job.limits.max_failure_share:
                exceeded = (
                    f"{n_failed:,} of {self.summary.n_cells:,} cells ({share:.1%}) got no "
                    f"{METHODS.get(method).title} embedding, more than limits.max_failure_share = "
                    f"{job.limits.max_failure_share:.1%}"
                )
        if rows:
            df = pd.DataFrame(rows).astype(str)
            write_parquet_atomic(
                out_dir / "failures.parquet", pa.Table.from_pandas(df, preserve_index=False)
            )
            self.summary.outputs.append(str(out_dir / "failures.parquet"))
            self.summary.warnings.append(f"{len(df):,} items failed for good: see failures.parquet")
        prices = {k: v.model_dump() for k, v in job.prices.items()}
        if meter.models:
            self.manifest.llm_usage = meter.summary(prices)
            self.summary.llm = meter.format(prices)
        return exceeded

    def all_stages(self, previous: dict[str, Any]) -> str | None:
        """Run every stage; return why the run failed its failure budget (else None)."""
        from raypipe.atlas.store import plan_shards

        atlas = self.atlas()
        genes = self.genes(atlas)
        shards = plan_shards(atlas, self.job.shards.rows)
        self.summary.n_shards = len(shards)
        self.manifest.shards = {"rows": self.job.shards.rows, "n": len(shards)}
        ann = self.job.annotate
        if not ann.enabled:
            release_text_actors()  # no candidate texts will follow the gene texts
        candidates = None
        if ann.enabled and ann.candidates == "auto":
            self.discovered = self.discover(atlas, genes, shards)
        if ann.enabled and ann.scorers.get("langcell", 0) > 0:  # the CE actors need them
            candidates = self.candidates(atlas, genes, self.discovered)
        self.methods(atlas, genes, shards, candidates)
        if ann.enabled:
            candidates = candidates or self.candidates(atlas, genes, self.discovered)
            self.annotate(atlas, candidates, shards)
        if self.job.evaluate.enabled:
            self.evaluate(atlas, candidates, previous)
        if candidates is not None:
            self.summary.candidates = self._candidate_lines(candidates)
        return self.llm_usage(genes, candidates, shards)

    def _candidate_lines(self, candidates: Any) -> list[str]:
        """Per candidate: its CL term, how it was found, its markers (and F1 when evaluated)."""
        import pandas as pd

        from raypipe.annotate.summary import summary_lines

        per_class: dict[str, pd.DataFrame] = {
            str(m): read_frame(f)
            for m in self.job.embed.methods
            if (f := self.out_dir / "evaluation" / f"per_class_{m}.parquet").is_file()
        }
        return summary_lines(candidates.table, per_class or None)


def _space_line(space: FittedSpace) -> str:
    """Return the summary's line on the fitted space (what was reused, what was fitted)."""
    parts = []
    if space.reused:
        parts.append("reused " + ", ".join(space.reused))
    if space.fitted:
        parts.append(("refitted " if space.refit else "fitted ") + ", ".join(space.fitted))
    where = str(space.path) if space.entries else "nothing fitted on the atlas"
    return f"v{space.version}" + (f" ({'; '.join(parts)})" if parts else "") + f": {where}"


def run_job(
    job: JobConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    force: bool = False,
    refit: bool = False,
) -> RunSummary:
    """Run every stage the config names; return the summary (also written to the manifest).

    Everything that can be checked is checked before the output folder is touched; from then
    on every failure leaves ``manifest.json`` with ``status: failed`` and the reason (finished
    shards are kept and reused by the next run). ``force`` uses a suspicious label column
    (numeric, one class per few cells) with a warning instead of refusing it. Statistics
    fitted on the atlas (HVG genes, centring means) are recorded by the first run and reused
    (:class:`~raypipe.core.space.FittedSpace`); ``refit`` fits them again as a new version.
    """
    t_start = time.perf_counter()
    st = job.storage  # endpoint/region/anonymous for this process and the Ray workers it starts
    configure_storage(
        endpoint=st.endpoint,
        region=st.region,
        anonymous=st.anonymous,
        connect_timeout_s=st.connect_timeout_s,
        read_timeout_s=st.read_timeout_s,
        max_attempts=st.max_attempts,
    )
    out_dir = as_path(job.output_dir)
    previous = check_output_dir(out_dir, job, overwrite, force=force)
    notes = validate_job(job, force=force)
    make_output_dir(out_dir)
    lease = Lease(job.output_dir, job.lease.heartbeat_s, job.lease.stale_after_s).acquire()
    try:
        with watchdog.Watchdog(job.watchdog.stall_s):
            return _run_leased(job, lease, previous, notes, overwrite, progress, refit, t_start)
    finally:
        lease.release()


def _run_leased(
    job: JobConfig,
    lease: Lease,
    previous: dict[str, Any] | None,
    notes: list[str],
    overwrite: bool,
    progress: bool,
    refit: bool,
    t_start: float,
) -> RunSummary:
    """:func:`run_job` once the folder's lease is held."""
    out_dir = as_path(job.output_dir)
    kept = clear_run(out_dir) if overwrite else []
    manifest = Manifest(config=job.model_dump(mode="json"), config_hash=config_hash(job))
    if previous is not None and not overwrite:
        manifest.previous = {k: previous.get(k) for k in ("status", "config_hash", "finished")}
    space = FittedSpace.open(job.output_dir, refit=refit)
    manifest.write(out_dir)
    run = _Run(job, manifest, progress, space, lease)
    run.summary.warnings += notes
    if lease.took_over:
        run.summary.warnings.append(
            f"took over the lease of {out_dir} from a run that is gone "
            f"({lease.took_over['why']}; pid {lease.took_over.get('pid')} on host "
            f"{lease.took_over.get('host')}, started {lease.took_over.get('started')})"
        )
        manifest.lease_takeover = lease.took_over
    if previous and previous.get("input_note"):
        run.summary.warnings.append(previous["input_note"])
    if kept:
        run.summary.warnings.append(f"--overwrite kept what raypipe did not write: {kept}")
    try:
        try:
            exceeded = run.all_stages(previous if previous and not overwrite else {})
        finally:
            release_text_actors()  # the local text model kept for the run's texts
    except BaseException as exc:
        manifest.embedding_space = space.record()
        manifest.finish("failed", error=_reason(exc))
        manifest.wall_s = time.perf_counter() - t_start
        manifest.warnings = run.summary.warnings
        try:
            manifest.write(out_dir)
        except (
            Exception
        ) as write_exc:  # storage down: the manifest stays `running`, never `complete`
            log.error("could not record the failure in %s: %s", out_dir / MANIFEST, write_exc)
        raise
    summary = run.summary
    summary.wall_s = time.perf_counter() - t_start
    if not exceeded:
        space.commit()
    manifest.embedding_space = space.record()
    summary.space = _space_line(space)
    manifest.finish("failed" if exceeded else "complete", error=exceeded)
    manifest.wall_s, manifest.warnings = summary.wall_s, summary.warnings
    manifest.outputs = list(summary.outputs)
    summary.outputs.append(str(out_dir / MANIFEST))
    manifest.write(out_dir)
    if (out_dir / "report" / "index.html").is_file():
        from raypipe.evaluate.report import rerender_report

        rerender_report(out_dir)  # the report's summary shows the finished run
    if exceeded:
        from raypipe.llm.cost import FailureShareExceeded

        print(summary.render())
        raise FailureShareExceeded(
            exceeded, fix="see failures.parquet; re-run to retry only the failed items"
        )
    return summary
