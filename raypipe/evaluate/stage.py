"""The evaluation step of a run (driver): metrics.parquet, per-class tables, the report.

Inputs are the run's outputs: ``embeddings/<method>`` parts, ``annotations/<method>`` parts,
the candidate texts, and the atlas (streamed three times for the PCA-50 baseline).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.core.labels import missing_labels
from raypipe.core.outputs import read_parquet
from raypipe.core.storage import AnyPath, sorted_paths

if TYPE_CHECKING:
    from raypipe.annotate.prepare import Candidates
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig

__all__ = ["load_embedding_rows", "run_evaluation"]

log = logging.getLogger(__name__)


def load_embedding_rows(out_dir: AnyPath, method: str, rows: np.ndarray) -> np.ndarray:
    """(len(rows), d) float32 embeddings of ``method`` for the atlas rows ``rows`` (sorted).

    Reads one part at a time, so memory is bounded by the sample, not the atlas.
    """
    pos = {int(r): i for i, r in enumerate(rows)}
    out: np.ndarray | None = None
    for f in sorted_paths((out_dir / "embeddings" / method).glob("part-*.parquet")):
        t = read_parquet(f, columns=["row", "embedding"])
        part_rows = t.column("row").to_numpy()
        hit = np.flatnonzero(np.isin(part_rows, rows))
        if hit.size == 0:
            continue
        col = t.column("embedding").take(hit).combine_chunks()  # only the sample's rows
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        if out is None:
            out = np.zeros((rows.size, x.shape[1]), dtype=np.float32)
        out[[pos[int(r)] for r in part_rows[hit]]] = x
    return out if out is not None else np.zeros((rows.size, 0), dtype=np.float32)


def _sample_counts(atlas: AtlasInfo, rows: np.ndarray) -> Any:
    """Read the sample's rows of X as raw counts (one streamed pass over the atlas)."""
    from raypipe.atlas.store import read_rows

    x = read_rows(atlas, rows)
    if atlas.x_kind == "lognorm":  # the baseline normalises counts itself
        x.data = np.expm1(x.data)
    return x


def _concat(*frames: pd.DataFrame) -> pd.DataFrame:
    """Rows of every non-empty frame (pandas warns about concatenating empty ones)."""
    full = [f for f in frames if not f.empty]
    return pd.concat(full, ignore_index=True) if full else frames[0]


def _ontology_metrics(
    job: JobConfig,
    dataset: str,
    labels: np.ndarray,
    calls: dict[str, Any],
    candidates: Candidates | None,
    out_dir: AnyPath,
) -> pd.DataFrame:
    """cl_exact / cl_lineage rows; per-class tables and confusions on CL terms written."""
    import pyarrow as pa

    from raypipe.annotate.ontology import load_ontology
    from raypipe.core.outputs import write_parquet_atomic
    from raypipe.evaluate.ontology_metrics import cl_metric_rows, load_ancestor_distances

    if not calls or candidates is None or not candidates.truth_cl:
        return pd.DataFrame()
    onto = load_ontology(job.annotate.ontology)
    rows, per_class, confusion, notes = cl_metric_rows(
        dataset,
        labels,
        calls,
        candidates.truth_cl,
        load_ancestor_distances(job.annotate.ontology),
        term_labels={t: term.label for t, term in onto.terms.items()},
    )
    for note in notes:
        log.warning(note)
    for m, pc in per_class.items():
        write_parquet_atomic(
            out_dir / "evaluation" / f"cl_per_class_{m}.parquet",
            pa.Table.from_pandas(pc.reset_index()),
        )
        write_parquet_atomic(
            out_dir / "evaluation" / f"cl_confusion_{m}.parquet",
            pa.Table.from_pandas(confusion[m].reset_index()),
        )
    return rows


def run_evaluation(
    job: JobConfig,
    atlas: AtlasInfo,
    out_dir: AnyPath,
    methods: list[str],
    candidates: Candidates | None,
) -> dict[str, Any]:
    """Compute every metric, write ``metrics.parquet`` (+ per-class, confusion) and the report.

    Returns
    -------
    dict
        ``metrics`` (path), ``report`` (path or None), ``skipped``, ``notes`` and ``timings``
        (seconds per step and, under ``per_metric``, per method and metric) for the manifest.
    """
    import pyarrow as pa

    from raypipe.atlas.store import read_obs_columns
    from raypipe.core.outputs import read_parts, write_parquet_atomic
    from raypipe.embed.methods import text_space_methods
    from raypipe.evaluate.reduce import evaluate_embeddings

    label_key, batch_key = job.input.label_key, job.input.batch_key
    if not label_key:
        log.warning(
            "evaluate.enabled but input.label_key is not set: no metrics need no labels; skipped"
        )
        return {"skipped": "no input.label_key"}
    from raypipe.evaluate.baseline import fit_pca_baseline
    from raypipe.evaluate.metrics import subsample_indices

    obs = read_obs_columns(atlas.path, [k for k in (label_key, batch_key) if k])
    labels = obs[label_key].to_numpy()
    batches = obs[batch_key].to_numpy() if batch_key else None
    labelled = np.flatnonzero(~missing_labels(obs[label_key]))
    sample = labelled[
        subsample_indices(labelled.size, job.evaluate.sample_size, seed=job.evaluate.seed)
    ]
    timings: dict[str, Any] = {}
    t = time.perf_counter()
    embeddings = {m: load_embedding_rows(out_dir, m, sample) for m in methods}
    timings["load_embeddings"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    x_sample = _sample_counts(atlas, sample)
    timings["read_sample_counts"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    embeddings["pca"] = fit_pca_baseline(lambda: iter([x_sample]), job.evaluate.pca_components)
    timings["pca_baseline"] = round(time.perf_counter() - t, 3)
    annotations: dict[str, Any] = {}
    cl_calls: dict[str, Any] = {}
    text_emb: dict[str, np.ndarray] = {}
    text_labels = None
    if candidates is not None:
        cl_of = dict(zip(candidates.table["label"], candidates.table["cl_id"], strict=True))
        for m in methods:
            cols = ["row", "label", "label_uncentred", "cl_id"]
            ann = read_parts(out_dir, "annotations", m, columns=cols)
            if ann.empty:
                continue
            cl_calls[m] = (
                ann["cl_id"].to_numpy()
                if "cl_id" in ann.columns
                else ann["label"].map(cl_of).to_numpy()
            )
            annotations[m] = ann["label"].to_numpy()
            if "label_uncentred" in ann.columns:
                annotations[f"{m}_uncentred"] = ann["label_uncentred"].to_numpy()
            if m in text_space_methods():
                text_emb[m] = candidates.text_emb
        text_labels = candidates.labels
    dataset = job.input.name or Path(job.input.path).stem
    # quadratic metrics and retrieval: the seeded sample; accuracy/F1/confusion: every cell
    t = time.perf_counter()
    ev = evaluate_embeddings(
        dataset,
        embeddings,
        labels[sample],
        None if batches is None else batches[sample],
        cfg=job.evaluate,
        text_emb=text_emb or None,
        text_labels=text_labels,
        center=job.annotate.center,
    )
    timings["sample_metrics"] = round(time.perf_counter() - t, 3)
    timings["per_metric"] = ev.timings
    ev.metrics["n_cells"] = labelled.size
    t = time.perf_counter()
    discovered = candidates is not None and candidates.discovery is not None
    exact = evaluate_embeddings(
        dataset, {}, labels, cfg=job.evaluate, annotations={} if discovered else annotations
    )
    if discovered:  # the calls are Cell Ontology names, not the label column's values
        why = (
            "annotate.candidates: auto names cells with Cell Ontology terms, not the label "
            "column's values: see cl_exact / cl_lineage"
        )
        exact.skipped = _concat(
            exact.skipped,
            pd.DataFrame(
                [
                    {"dataset": dataset, "method": m, "metric": metric, "reason": why}
                    for m in annotations
                    for metric in ("accuracy", "macro_f1")
                ]
            ),
        )
    timings["exact_metrics"] = round(time.perf_counter() - t, 3)
    cl_rows = _ontology_metrics(job, dataset, labels, cl_calls, candidates, out_dir)
    ev.metrics = _concat(ev.metrics, exact.metrics, cl_rows)
    ev.skipped = _concat(ev.skipped, exact.skipped)
    ev.confusion, ev.per_class = exact.confusion, exact.per_class
    ev.notes += exact.notes
    eval_dir = out_dir / "evaluation"
    write_parquet_atomic(
        out_dir / "metrics.parquet", pa.Table.from_pandas(ev.metrics, preserve_index=False)
    )
    write_parquet_atomic(
        eval_dir / "skipped.parquet", pa.Table.from_pandas(ev.skipped, preserve_index=False)
    )
    for m, conf in ev.confusion.items():
        write_parquet_atomic(
            eval_dir / f"confusion_{m}.parquet", pa.Table.from_pandas(conf.reset_index())
        )
    for m, pc in ev.per_class.items():
        write_parquet_atomic(
            eval_dir / f"per_class_{m}.parquet", pa.Table.from_pandas(pc.reset_index())
        )
    report = None
    t = time.perf_counter()
    if job.evaluate.report:
        from raypipe.evaluate.report import write_report

        predictions = {m: p for m, p in annotations.items() if not m.endswith("_uncentred")}
        report = write_report(
            out_dir,
            ev.metrics,
            embeddings,
            labels[sample],
            {m: p[sample] for m, p in predictions.items()},
            ev.confusion,
            skipped=ev.skipped,
            notes=ev.notes,
            seed=job.evaluate.seed,
            title=f"raypipe report: {dataset}",
            neighbors=ev.graphs,
        )
    timings["report"] = round(time.perf_counter() - t, 3)
    return {
        "timings": timings,
        "metrics": str(out_dir / "metrics.parquet"),
        "report": str(report) if report else None,
        "table": ev.metrics,
        "skipped": ev.skipped.to_dict("records"),
        "notes": ev.notes,
    }
