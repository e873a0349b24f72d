"""The evaluation step of a run (driver): metrics.parquet, per-class tables, the report.

Inputs are the run's outputs: ``embeddings/<method>`` parts, ``annotations/<method>`` parts,
the candidate texts, and the atlas (streamed three times for the PCA-50 baseline).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from raypipe.annotate.stage import Candidates
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig

__all__ = ["load_embedding_matrix", "run_evaluation"]

log = logging.getLogger(__name__)


def load_embedding_matrix(out_dir: Path, method: str, n_obs: int) -> np.ndarray:
    """(n_obs, d) float32 embeddings of ``method`` in atlas row order."""
    import pyarrow.parquet as pq

    out: np.ndarray | None = None
    for f in sorted((out_dir / "embeddings" / method).glob("part-*.parquet")):
        t = pq.read_table(f, columns=["row", "embedding"])
        col = t.column("embedding").combine_chunks()
        x = col.values.to_numpy().reshape(len(col), -1)
        if out is None:
            out = np.zeros((n_obs, x.shape[1]), dtype=np.float32)
        out[t.column("row").to_numpy()] = x
    if out is None:
        return np.zeros((n_obs, 0), dtype=np.float32)
    return out


def _pca(job: JobConfig, atlas: AtlasInfo) -> np.ndarray:
    from raypipe.atlas.store import read_shard
    from raypipe.evaluate.baseline import fit_pca_baseline

    step = max(atlas.rows_per_chunk, 4 * atlas.rows_per_chunk)

    def blocks() -> Any:
        for start in range(0, atlas.n_obs, step):
            x = read_shard(atlas.path, start, min(start + step, atlas.n_obs))
            if atlas.x_kind == "lognorm":  # the baseline normalises counts itself
                x.data = np.expm1(x.data)
            yield x

    return fit_pca_baseline(blocks, job.evaluate.pca_components)


def run_evaluation(
    job: JobConfig,
    atlas: AtlasInfo,
    out_dir: Path,
    methods: list[str],
    candidates: Candidates | None,
) -> dict[str, Any]:
    """Compute every metric, write ``metrics.parquet`` (+ per-class, confusion) and the report.

    Returns
    -------
    dict
        ``metrics`` (path), ``report`` (path or None), ``skipped`` and ``notes`` for the manifest.
    """
    import pyarrow as pa

    from raypipe.annotate.stage import TEXT_METHODS, read_parts
    from raypipe.atlas.store import read_obs_columns
    from raypipe.evaluate.reduce import evaluate_embeddings
    from raypipe.pipeline.outputs import write_parquet_atomic

    label_key, batch_key = job.input.label_key, job.input.batch_key
    if not label_key:
        log.warning(
            "evaluate.enabled but input.label_key is not set: no metrics need no labels; skipped"
        )
        return {"skipped": "no input.label_key"}
    obs = read_obs_columns(atlas.path, [k for k in (label_key, batch_key) if k])
    labels = obs[label_key].to_numpy()
    batches = obs[batch_key].to_numpy() if batch_key else None
    embeddings = {m: load_embedding_matrix(out_dir, m, atlas.n_obs) for m in methods}
    embeddings["pca"] = _pca(job, atlas)
    annotations: dict[str, Any] = {}
    text_emb: dict[str, np.ndarray] = {}
    text_labels = None
    if candidates is not None:
        mapping = dict(zip(candidates.table["label"], candidates.table["label"], strict=True))
        for m in methods:
            ann = read_parts(out_dir, "annotations", m)
            if ann.empty:
                continue
            annotations[m] = ann["label"].map(mapping).to_numpy()
            if "label_uncentred" in ann.columns:
                annotations[f"{m}_uncentred"] = ann["label_uncentred"].to_numpy()
            if m in TEXT_METHODS:
                text_emb[m] = candidates.text_emb
        text_labels = candidates.labels
    dataset = job.input.name or Path(job.input.path).stem
    ev = evaluate_embeddings(
        dataset,
        embeddings,
        labels,
        batches,
        cfg=job.evaluate,
        annotations=annotations,
        text_emb=text_emb or None,
        text_labels=text_labels,
        center=job.annotate.center,
    )
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
    if job.evaluate.report:
        from raypipe.evaluate.report import write_report

        predictions = {m: p for m, p in annotations.items() if not m.endswith("_uncentred")}
        report = write_report(
            out_dir,
            ev.metrics,
            embeddings,
            labels,
            predictions,
            ev.confusion,
            skipped=ev.skipped,
            notes=ev.notes,
            seed=job.evaluate.seed,
            title=f"raypipe report: {dataset}",
        )
    return {
        "metrics": str(out_dir / "metrics.parquet"),
        "report": str(report) if report else None,
        "table": ev.metrics,
        "skipped": ev.skipped.to_dict("records"),
        "notes": ev.notes,
    }
