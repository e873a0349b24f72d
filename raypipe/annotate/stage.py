"""Zero-shot annotation on Ray: candidate texts embedded once and broadcast; shards scored.

Driver: the candidates (:mod:`~raypipe.annotate.prepare` → ``annotations/label_mapping.parquet``)
and each method's atlas-mean embedding (for centring). Actors: per shard, read
the method's embedding part (and X for the markers scorer), score, assign, and write
``annotations/<method>/part-*.parquet`` atomically with a completion marker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from raypipe.atlas.store import AtlasShardStage
from raypipe.config import config_hash
from raypipe.core.outputs import part_path, read_parquet
from raypipe.core.plan import StagePlan, StageSpec, resolve, stage_hash
from raypipe.core.stage import set_kernel_threads
from raypipe.core.storage import AnyPath, as_path, sorted_paths
from raypipe.errors import ConfigError

if TYPE_CHECKING:
    from raypipe.annotate.prepare import Candidates
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.space import FittedSpace

__all__ = [
    "AnnotateShards",
    "annotation_fingerprint",
    "build_annotation",
    "embedding_mean",
]

log = logging.getLogger(__name__)


def embedding_mean(out_dir: AnyPath, method: str) -> np.ndarray:
    """Mean cell embedding of a method over the whole atlas, streamed part by part."""
    total: Any = None
    n = 0
    for f in sorted_paths((out_dir / "embeddings" / method).glob("part-*.parquet")):
        col = read_parquet(f, columns=["embedding"]).column("embedding").combine_chunks()
        x = col.values.to_numpy().reshape(len(col), -1)
        total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
        n += len(col)
    return (total / max(n, 1)).astype(np.float32)


class AnnotateShards(AtlasShardStage):
    """Ray Data stage: shard specs → ``annotations/<method>/part-*.parquet``.

    Batch contract: in ``shard, start, stop, content_hash``; out ``shard, n_cells, n_empty,
    seconds, path``. Reads the method's embedding part (``text`` scorer; its
    ``langcell_sim``/``langcell_ctm`` columns for the ``langcell`` scorer) and the shard's X
    (``markers`` scorer).
    """

    kind: ClassVar[str] = "annotations"

    def __init__(
        self,
        *,
        method: str,
        labels: list[str],
        text_emb: Any,
        cell_mean: Any,
        marker_idx: list[np.ndarray],
        weights: dict[str, float],
        center: bool,
        top_k: int,
        unassigned_threshold: float | None,
        langcell_alpha: float = 0.1,
        marker_weights: list[np.ndarray] | None = None,
        standardise: str = "cell",
        smoothing: float = 0.0,
        smoothing_k: int = 15,
        smoothing_block: int = 4096,
        smoothing_graph: str = "embedding",
        threads: int = 1,
        negative: float = 0.0,
        cl_ids: list[str | None] | None = None,
        clusters: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cl_of = dict(zip(labels, cl_ids or [None] * len(labels), strict=True))
        self.clusters = clusters
        set_kernel_threads(threads)  # the marker kernel's
        self.method = method  # type: ignore[misc]  # one class serves every embedding method
        self.labels = labels
        self.text_emb, self.cell_mean = resolve(text_emb), resolve(cell_mean)
        self.marker_idx, self.weights, self.center = marker_idx, weights, center
        self.marker_weights, self.standardise = marker_weights, standardise
        self.smoothing, self.smoothing_k, self.graph = smoothing, smoothing_k, smoothing_graph
        self.smoothing_block = smoothing_block
        self.top_k, self.threshold = top_k, unassigned_threshold
        self.langcell_alpha, self.negative = langcell_alpha, negative
        self._langcell: tuple[np.ndarray, np.ndarray] | None = None

    def _score(self, emb: np.ndarray | None, x: Any) -> dict[str, np.ndarray]:
        """Each scorer's (n, k) matrix for the shard (text centred when ``center``)."""
        from raypipe.annotate.scorers import ScoreInputs, score_cells

        inputs = ScoreInputs(
            cell_emb=emb,
            text_emb=self.text_emb if emb is not None else None,
            cell_mean=self.cell_mean,
            center=self.center,
            expr=x,
            marker_idx=self.marker_idx,
            langcell_sim=self._langcell[0] if self._langcell else None,
            langcell_ctm=self._langcell[1] if self._langcell else None,
            langcell_alpha=self.langcell_alpha,
            marker_weights=self.marker_weights,
            negative=self.negative,
        )
        return score_cells(inputs, self.weights, standardise=self.standardise)[0]

    def output_table(self, batch: dict[str, np.ndarray], i: int) -> tuple[Any, int]:
        """Score and assign the shard's cells."""
        import pyarrow as pa

        from raypipe.annotate.scorers import assign, combine, text_scores

        shard, start, stop = int(batch["shard"][i]), int(batch["start"][i]), int(batch["stop"][i])
        table = read_parquet(part_path(as_path(self.out_dir), "embeddings", self.method, shard))
        self._langcell = self._langcell_scores(table, shard) if "langcell" in self.weights else None
        part = table.to_pandas()
        emb_all = np.stack(part["embedding"].to_numpy())
        emb = emb_all if "text" in self.weights else None
        need_x = "markers" in self.weights or (self.smoothing > 0 and self.graph == "expression")
        x = self.read_rows(start, stop) if need_x else None
        per = self._score(emb, x)
        scores = combine(per, self.weights, standardise=self.standardise)
        if self.smoothing > 0:
            from raypipe.annotate.smoothing import expression_features, smooth_scores

            feats = (
                emb_all
                if self.graph == "embedding"
                else expression_features(x, fit_rows=self.smoothing_block)
            )
            scores = smooth_scores(
                scores,
                feats,
                strength=self.smoothing,
                k=self.smoothing_k,
                block=self.smoothing_block,
            )
        pred = assign(scores, self.labels, top_k=self.top_k, unassigned_threshold=self.threshold)
        if self.center and "text" in per:
            assert emb is not None  # the text scorer ran on it
            # the other scorers' matrices are reused: only the text cosine changes
            uncentred = dict(per, text=text_scores(emb, self.text_emb, center=False))
            raw = combine(uncentred, self.weights, standardise=self.standardise)
            pred["label_uncentred"] = assign(raw, self.labels, top_k=1)["best_label"].to_numpy()
        pred.insert(1, "cl_id", [self.cl_of.get(v) for v in pred["label"]])
        if self.clusters:
            from raypipe.annotate.clustering import read_cell_clusters

            pred["cluster"] = read_cell_clusters(self.out_dir, shard)
        pred.insert(0, "row", part["row"].to_numpy())
        pred.insert(0, "shard", shard)
        pred.insert(0, "obs_name", part["obs_name"].to_numpy())
        table = pa.Table.from_pandas(pred, preserve_index=False)
        return table.replace_schema_metadata(
            {"method": self.method, "fingerprint": self.fingerprint}
        ), 0

    def _langcell_scores(self, table: Any, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """LangCell's per-cell sim/ctm from the CE part, checked against the candidates."""
        import json

        from raypipe.embed.ce import LANGCELL_COLUMNS

        meta = table.schema.metadata or {}
        names = json.loads(meta.get(b"langcell_candidates", b"null"))
        if any(c not in table.column_names for c in LANGCELL_COLUMNS) or names != self.labels:
            raise ConfigError(
                f"the {self.method} part of shard {shard} has no LangCell scores for candidates "
                f"{self.labels} (it has {names})",
                fix="the runner must pass the candidate texts to build_ce when the langcell "
                "scorer is on; re-run to recompute the CE parts",
            )
        k = len(self.labels)
        sim, ctm = (
            table.column(c).combine_chunks().values.to_numpy().reshape(-1, k)
            for c in LANGCELL_COLUMNS
        )
        return sim, ctm


def annotation_fingerprint(
    job: JobConfig, method_fp: str, cand: Candidates, cell_mean: np.ndarray | None = None
) -> str:
    """Hash what an annotation part depends on: settings, the embeddings, the candidates.

    ``cell_mean`` (the atlas's mean cell the text scorer centres on) is part of it too.
    """
    return stage_hash(
        "annotate",
        config_hash(job.annotate),
        method_fp,
        "" if cell_mean is None else stage_hash(np.asarray(cell_mean).tobytes()),
        "|".join(cand.labels),
        stage_hash(cand.text_emb.tobytes()),
        stage_hash(repr([i.tolist() for i in cand.marker_idx]).encode()),
        stage_hash(repr([w.tolist() for w in cand.marker_weights or []]).encode()),
        cand.discovery or "",
    )


def _cell_mean(job: JobConfig, method: str, method_fp: str, space: FittedSpace | None) -> Any:
    """Return the method's mean cell: recorded in ``space`` (reused later) or computed."""
    name, depends = f"annotate_{method}", stage_hash("cell_mean", method_fp)
    data = space.get(name, depends) if space is not None else None
    if data is not None:
        return np.asarray(data["cell_mean"], dtype=np.float32)
    mean = embedding_mean(as_path(job.output_dir), method)
    if space is not None:
        space.put(name, depends, {"cell_mean": [float(v) for v in mean]})
    return mean


def build_annotation(
    job: JobConfig,
    atlas: AtlasInfo,
    method: str,
    method_fp: str,
    cand: Candidates,
    space: FittedSpace | None = None,
) -> tuple[StagePlan | None, str]:
    """Plan the annotation of one embedding method's cells.

    The atlas's mean cell (centring of the text scorer) is fitted once and recorded in
    ``space``: an atlas that grows keeps its old cells' annotations.

    Returns
    -------
    (StagePlan or None, str)
        The plan (kind ``annotations``), or None with the reason when no scorer with a
        positive weight applies to ``method`` (``text`` needs a method in the text space).
    """
    import ray

    from raypipe.embed.methods import METHODS

    weights = dict(job.annotate.scorers)
    if not METHODS.get(method).text_space:
        weights.pop("text", None)  # CE cells and candidate texts live in different spaces
    if not METHODS.get(method).cell_text_scores:
        weights.pop("langcell", None)  # only the CE actors compute LangCell's scores
    if not any(w > 0 for w in weights.values()):
        return (
            None,
            f"annotate: no scorer applies to {method} (text needs a GenePT method, langcell "
            "the ce method); skipped",
        )
    cell_mean = _cell_mean(job, method, method_fp, space)
    fp = annotation_fingerprint(job, method_fp, cand, cell_mean)
    kwargs = {
        "method": method,
        "atlas_path": atlas.path,
        "out_dir": job.output_dir,
        "fingerprint": fp,
        "labels": cand.labels,
        "text_emb": ray.put(cand.text_emb),
        "cell_mean": ray.put(cell_mean),
        "marker_idx": cand.marker_idx,
        "marker_weights": cand.marker_weights,
        "weights": weights,
        "standardise": job.annotate.standardise,
        "smoothing": job.annotate.smoothing,
        "smoothing_k": job.annotate.smoothing_k,
        "smoothing_block": job.annotate.smoothing_block,
        "smoothing_graph": job.annotate.smoothing_graph,
        "center": job.annotate.center,
        "top_k": job.annotate.top_k,
        "unassigned_threshold": job.annotate.unassigned_threshold,
        "langcell_alpha": job.annotate.langcell_alpha,
        "negative": job.annotate.negative_markers,
        "threads": max(1, round(job.ray.actor_cpus)),
        "cl_ids": [None if pd.isna(v) else str(v) for v in cand.table["cl_id"]],
        "clusters": cand.discovery is not None,
    }
    step = StageSpec(AnnotateShards, kwargs, job.ray.actors, job.ray.actor_cpus)
    return StagePlan([step], fp, kind="annotations", notes={"scorers": weights}), ""
