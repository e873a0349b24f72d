"""Discover the cell types of an unlabelled atlas (``annotate.candidates: auto``).

1. **Clusters** (:mod:`raypipe.annotate.clustering`): Leiden on a cosine kNN graph of
   expression PCs; every cell up to ``annotate.discover.max_cells``, else a seeded sample
   whose neighbours assign every other cell in a Ray map step (memory flat in the atlas size).
2. **Markers**: the same map step writes, per shard, the per-cluster sums, sums of squares and
   non-zero counts of the log-normalised expression; the driver adds them up in shard order
   and ranks genes by Welch's t (:mod:`raypipe.annotate.cluster_markers`).
3. **Names** (:mod:`raypipe.annotate.naming`): an LLM (GPTCelltype) or marker knowledge
   (:mod:`raypipe.annotate.knowledge`); names are mapped to Cell Ontology terms; clusters on
   one term make one candidate whose markers are its clusters' top markers.

Outputs: ``annotations/clusters.parquet`` (one row per cluster), ``state/discover_clusters/``
(per-cell cluster ids, resumable parts with completion markers), ``state/discover_stats/``
(per-shard sums) and ``state/discover/clustering.npz`` (the driver's clustering, reused while
the atlas and the settings are unchanged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.annotate.clustering import CELLS, cluster_plan, load_or_fit, merged_stats
from raypipe.core.outputs import write_parquet_atomic
from raypipe.core.plan import stage_hash
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.annotate.cluster_markers import ClusterStats
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard
    from raypipe.core.storage import AnyPath
    from raypipe.genes.space import GeneSpace

__all__ = ["CLUSTERS_FILE", "DOTPLOT_FILE", "Discovery", "discover"]

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.parquet"
"""One row per cluster, under ``annotations/``."""
DOTPLOT_FILE = "cluster_dotplot.parquet"
"""``annotations/cluster_dotplot.parquet``: mean and share expressing per cluster of each
cluster's top 3 markers (``cluster, gene, mean, pct``), for the report's dot plot."""


@dataclass
class Discovery:
    """What discovery found, for the candidates and the outputs.

    Attributes
    ----------
    table
        ``annotations/clusters.parquet`` (one row per cluster).
    names
        The candidate names (distinct Cell Ontology labels, or LLM names no term matched).
    markers
        Candidate → its clusters' top up-regulated markers (best first).
    fingerprint
        Hash of the clustering and the names (keys the annotation parts).
    usage
        LLM usage of the naming requests.
    warnings
        Loud notes for the summary.
    """

    table: pd.DataFrame
    names: list[str]
    markers: dict[str, list[str]]
    fingerprint: str
    usage: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _gene_names(genes: GeneSpace, atlas: AtlasInfo) -> np.ndarray:
    from raypipe.atlas.store import read_var

    var = read_var(atlas.path).index.astype(str).to_numpy()
    symbols = list(genes.resolution.symbols)
    return np.array([s or v for s, v in zip(symbols, var, strict=True)], dtype=object)


def _naming_markers(full: pd.DataFrame, n_clusters: int) -> list[list[str]]:
    """Per cluster, its specific up-regulated genes for naming, largest log fold change first.

    Kept: Welch t > 0 with p < 0.01, log2 fold change > 0.5, expressed in at least 25% of the
    cluster's cells (as Seurat's ``FindAllMarkers`` filters). The t ranking favours highly
    expressed genes shared by many types (ribosomal, interferon); the fold change ranks the
    ones that tell the cluster apart first (measured: docs/discovery.md).
    """
    keep = full[
        (full["score"] > 0)
        & (full["pval"] < 0.01)
        & (full["logfc"] > 0.5)
        & (full["pct_in"] >= 0.25)
    ]
    by = {
        int(c): list(g.sort_values(["logfc", "gene"], ascending=[False, True])["gene"])
        for c, g in keep.groupby("cluster", sort=True)
    }
    return [by.get(c, []) for c in range(n_clusters)]


def _dotplot(stats: ClusterStats, names: np.ndarray, up: list[list[str]]) -> pd.DataFrame:
    """Mean and share expressing, per cluster, of every cluster's top 3 markers."""
    shown = list(dict.fromkeys(g for lst in up for g in lst[:3]))
    pos = {g: i for i, g in enumerate(names.tolist())}
    idx = np.array([pos[g] for g in shown], dtype=np.int64)
    n = np.maximum(stats.n, 1)[:, None]
    mean, pct = stats.total[:, idx] / n, stats.nnz[:, idx] / n
    k = stats.n.size
    return pd.DataFrame(
        {
            "cluster": np.repeat(np.arange(k), idx.size),
            "gene": np.tile(np.asarray(shown, dtype=object), k),
            "mean": mean.ravel(),
            "pct": pct.ravel(),
        }
    )


def discover(
    job: JobConfig,
    atlas: AtlasInfo,
    shards: list[Shard],
    genes: GeneSpace,
    out_dir: AnyPath,
    *,
    progress: bool = False,
) -> Discovery:
    """Cluster the atlas, find each cluster's markers, name the clusters (module docstring).

    Raises
    ------
    InputError
        Too few cells to cluster, a single cluster, or no cluster that could be named; the
        message says why and what to change. Nothing is written to ``clusters.parquet`` then.
    """
    import pyarrow as pa

    from raypipe.annotate.cluster_markers import rank_markers
    from raypipe.annotate.knowledge import gene_resolver, marker_knowledge
    from raypipe.annotate.mapping import GeneNames, LabelMapper
    from raypipe.annotate.naming import NAMERS
    from raypipe.annotate.ontology import load_ontology
    from raypipe.config import config_hash
    from raypipe.core.execute import run_plan
    from raypipe.genes.space import record_failures

    cfg = job.annotate.discover
    n = atlas.n_obs
    need = cfg.n_neighbors + 1
    if n < need:
        raise InputError(
            f"annotate.candidates: auto needs at least {need} cells to cluster; the atlas "
            f"{atlas.source or atlas.path} has {n}",
            fix="annotate a larger atlas, or list annotate.candidates",
        )
    for stale in (CLUSTERS_FILE, DOTPLOT_FILE):  # never a stale table
        (out_dir / "annotations" / stale).unlink(missing_ok=True)
    clustering, reused = load_or_fit(job, atlas, shards, out_dir, progress)
    k = clustering.n_clusters
    if k < 2:
        raise InputError(
            f"cell-type discovery found a single cluster in {n:,} cells at Leiden resolution "
            f"{cfg.resolution}: no cluster can be compared with the rest",
            fix="raise annotate.discover.resolution (e.g. 2.0), or list annotate.candidates",
        )
    plan = cluster_plan(job, atlas, clustering)
    run_plan(plan, job.output_dir, CELLS, shards, progress=progress, desc="discover")
    fp = plan.fingerprint
    names = _gene_names(genes, atlas)
    stats = merged_stats(job.output_dir, shards, k, names.size)
    full = rank_markers(stats, names, n_top=names.size)  # every gene, ranked by t
    ranked = full[full["rank"] < cfg.n_markers]
    up = _naming_markers(full, k)

    ontology = load_ontology(job.annotate.ontology)
    gene_names = GeneNames.from_table(genes.table) if genes.table is not None else None
    mapper = LabelMapper(ontology, genes=gene_names, overrides=job.annotate.mapping)
    texts = {  # every atlas gene's text: the background of the enrichment
        str(s): str(t) for s, t in zip(genes.texts["symbol"], genes.texts["text"], strict=True)
    }
    know = marker_knowledge(job, ontology, mapper, gene_resolver(genes), gene_texts=texts)
    rows, fails, usage = NAMERS.get(cfg.naming)(up, job, know, ontology)
    warnings: list[str] = []
    record_failures(out_dir, "annotate_discover", fails)
    if fails:
        warnings.append(
            f"LLM naming failed for {len(fails)} cluster(s) (see failures.parquet); they were "
            "named offline"
        )
    llm_names = [r["name"] for r in rows if r.get("name")]
    mapped = {m.label: m for m in mapper.map_all(list(dict.fromkeys(llm_names)))}
    records = []
    for c, r in enumerate(rows):
        size = int(stats.n[c])
        cl_id = r["cl_id"]
        how = r["found_by"]
        name = r.get("name")
        if name:  # an LLM answer: mapped like any label
            m = mapped[name]
            cl_id = m.cl_id
            how = f"llm → {m.how}"
        why = r.get("why", "")
        if size < cfg.min_cluster_cells:
            cl_id, name, how = None, None, "unassigned"
            why = f"{size} cells < annotate.discover.min_cluster_cells {cfg.min_cluster_cells}"
        term = ontology.terms.get(cl_id) if cl_id else None
        candidate = term.label if term is not None else name
        top = ranked[ranked["cluster"] == c]
        records.append(
            {
                "cluster": c,
                "n_cells": size,
                "candidate": candidate or "unassigned",
                "cl_id": cl_id,
                "cl_label": term.label if term is not None else None,
                "found_by": how if candidate or how.startswith("unassigned") else "unassigned",
                "support": float(r.get("support", float("nan"))),
                "evidence": list(r.get("evidence") or []),
                "runner_up": r.get("runner_up", ""),
                "why_unassigned": "" if candidate else (why or "not named"),
                "markers": list(top["gene"].astype(str)),
                "logfc": [float(v) for v in top["logfc"]],
                "pct_in": [float(v) for v in top["pct_in"]],
                "pct_out": [float(v) for v in top["pct_out"]],
                "scores": [float(v) for v in top["score"]],
                "naming_markers": list(up[c][: cfg.n_markers]),
                "prompt": r.get("prompt", ""),
                "answer": r.get("answer", ""),
                "llm_name": r.get("name") or "",
            }
        )
    table = pd.DataFrame(records)
    named = table[table["candidate"] != "unassigned"]
    if named.empty:
        atlas_genes = set(names.tolist())
        reason = (
            "none of the atlas genes is in the marker knowledge (annotate.markers, "
            "annotate.discover.marker_table, Cell Ontology markers, gene texts)"
            if not (know.genes & atlas_genes)
            else "no cluster's markers support any Cell Ontology term enough: "
            + "; ".join(f"cluster {r.cluster}: {r.why_unassigned}" for r in table.itertuples())
        )
        raise InputError(
            f"cell-type discovery named none of its {k} clusters: {reason}",
            fix="give marker knowledge (annotate.markers or annotate.discover.marker_table), "
            "use annotate.discover.naming: llm, lower annotate.discover.min_support, or list "
            "annotate.candidates",
        )
    lost = table[table["candidate"] == "unassigned"]
    if not lost.empty:
        warnings.append(
            f"{len(lost)} of {k} discovered clusters ({int(lost['n_cells'].sum()):,} cells) could "
            f"not be named and are not candidates: clusters {', '.join(map(str, lost['cluster']))} "
            "(see annotations/clusters.parquet, why_unassigned)"
        )
    cand_markers: dict[str, list[str]] = {}
    for c, g in named.groupby("candidate", sort=False):
        merged: list[str] = []
        for cl in g["cluster"]:
            merged += [x for x in up[int(cl)][: cfg.prompt_markers] if x not in merged]
        cand_markers[str(c)] = merged
    write_parquet_atomic(
        out_dir / "annotations" / DOTPLOT_FILE,
        pa.Table.from_pandas(_dotplot(stats, names, up), preserve_index=False),
    )
    write_parquet_atomic(
        out_dir / "annotations" / CLUSTERS_FILE, pa.Table.from_pandas(table, preserve_index=False)
    )
    if reused:
        log.info("discovery: clustering reused from %s", out_dir / "state" / "discover")
    for w in warnings:
        log.warning(w)
    return Discovery(
        table=table,
        names=list(cand_markers),
        markers=cand_markers,
        fingerprint=stage_hash(
            "discover", fp, config_hash(cfg), table[["cluster", "candidate", "cl_id"]].to_json()
        ),
        usage=usage,
        warnings=warnings,
    )
