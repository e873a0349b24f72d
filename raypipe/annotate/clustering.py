"""Clusters of an atlas's cells at any size, and their per-shard marker sums (discovery).

* :func:`load_or_fit`: exact PCA (:func:`raypipe.core.pca.fit_pca`) of the log-normalised
  expression of a seeded sample of at most ``annotate.discover.sample_cells`` cells (read on
  the driver), a cosine kNN graph of the PCs and Leiden (``resolution``, seeded). Up to
  ``max_cells`` every cell is clustered (beyond the PCA sample, their PCs come from a Ray map
  step, :class:`FeatureShards`); above it only the sample is. The result is cached in
  ``state/discover/clustering.npz`` while the atlas and the settings are unchanged.
* :class:`ClusterShards` (a Ray map step over the shards): each cell's cluster (a cell outside
  the clustered sample takes the majority cluster of its ``n_neighbors`` nearest sampled
  cells: memory flat in the atlas size) and, per cluster, the sums, sums of squares and
  non-zero counts of the shard's log-normalised expression (:func:`merged_stats` adds them up).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from raypipe.atlas.store import AtlasShardStage
from raypipe.core.outputs import part_path, read_parquet, write_parquet_atomic
from raypipe.core.pca import PCAxes
from raypipe.core.plan import StagePlan, StageSpec, resolve, stage_hash
from raypipe.core.storage import AnyPath, as_path
from raypipe.errors import InputError

if TYPE_CHECKING:
    from raypipe.annotate.cluster_markers import ClusterStats
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard

__all__ = [
    "CELLS",
    "ClusterShards",
    "Clustering",
    "FeatureShards",
    "assign_by_neighbours",
    "cluster_plan",
    "load_or_fit",
    "lognorm",
    "merged_stats",
    "read_cell_clusters",
]

CELLS = "discover_clusters"
"""``state/discover_clusters/part-*.parquet``: per-cell cluster ids (``obs_name, row, cluster``)."""
STATS = "discover_stats"
FEATURES = "discover_features"
_CACHE = "clustering.npz"


def lognorm(x: sp.spmatrix, x_kind: str) -> sp.csr_matrix:
    """Log-normalised rows: counts scaled to 10,000 and log1p-ed; ``lognorm`` atlases as they are."""
    from raypipe.core.expression import log_normalize

    if x_kind == "counts":
        return log_normalize(x)
    return sp.csr_matrix(x, dtype=np.float32)


def assign_by_neighbours(
    features: np.ndarray, reference: np.ndarray, ref_clusters: np.ndarray, k: int
) -> np.ndarray:
    """Cluster of each row: the majority among its ``k`` nearest reference rows (cosine).

    Ties go to the cluster of the nearest reference row among the tied ones.
    """
    from raypipe.core.neighbors import query_neighbors

    k = max(1, min(k, reference.shape[0]))
    idx, _ = query_neighbors(features, reference, k)
    votes = np.asarray(ref_clusters)[idx]  # (m, k), nearest first
    n_clusters = int(np.max(ref_clusters)) + 1
    counts = np.zeros((votes.shape[0], n_clusters), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(votes.shape[0]), k), votes.ravel()), 1)
    tied = counts == counts.max(axis=1, keepdims=True)
    first = np.argmax(np.take_along_axis(tied, votes, axis=1), axis=1)  # nearest tied vote
    return votes[np.arange(votes.shape[0]), first].astype(np.int64)


@dataclass(frozen=True)
class Clustering:
    """The driver's clustering: which rows, their clusters, the PCA they live in.

    Attributes
    ----------
    rows
        (m,) clustered atlas rows, sorted.
    clusters
        (m,) their cluster ids (0 = the largest cluster).
    pca
        The expression PCA (fitted on at most ``sample_cells`` cells).
    reference
        (m, k) PCs of ``rows`` when only a sample was clustered (the other cells are assigned
        to their nearest sampled neighbours' cluster), else None.
    fingerprint
        Hash of the atlas rows and every setting the clustering depends on.
    """

    rows: np.ndarray
    clusters: np.ndarray
    pca: PCAxes
    reference: np.ndarray | None
    fingerprint: str

    @property
    def n_clusters(self) -> int:
        """Clusters found."""
        return int(self.clusters.max()) + 1 if self.clusters.size else 0

    def to_bytes(self) -> bytes:
        """Serialise (``np.savez``; read back with :meth:`from_bytes`)."""
        buf = io.BytesIO()
        ref = self.reference if self.reference is not None else np.zeros((0, 0), np.float32)
        np.savez(
            buf,
            rows=self.rows,
            clusters=self.clusters,
            genes=self.pca.genes,
            mean=self.pca.mean,
            axes=self.pca.axes,
            reference=ref,
            sampled=np.array(self.reference is not None),
            fingerprint=np.array(self.fingerprint),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Clustering:
        """Inverse of :meth:`to_bytes`."""
        z = np.load(io.BytesIO(data), allow_pickle=False)
        pca = PCAxes(z["genes"], z["mean"], z["axes"])
        ref = z["reference"] if bool(z["sampled"]) else None
        return cls(z["rows"], z["clusters"], pca, ref, str(z["fingerprint"]))


def _clustering_fingerprint(job: JobConfig, atlas: AtlasInfo) -> str:
    cfg = job.annotate.discover
    keys = (
        "resolution",
        "n_neighbors",
        "n_pcs",
        "n_top_genes",
        "max_cells",
        "sample_cells",
        "seed",
    )
    return stage_hash(
        "discover-clustering",
        json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True),
        atlas.x_kind,
        atlas.n_obs,
        stage_hash(*atlas.chunk_hashes),
    )


class FeatureShards(AtlasShardStage):
    """Ray Data stage: shard specs → ``state/discover_features/part-*.parquet`` (expression PCs).

    Batch contract: in ``shard, start, stop, content_hash``; out the shard-stage summary. Each
    part holds ``row`` and ``features`` (fixed-size list of float32) of the shard's cells.
    """

    kind: ClassVar[str] = "state"
    method: ClassVar[str] = FEATURES

    def __init__(self, *, pca: Any, x_kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pca: PCAxes = resolve(pca)
        self.x_kind = x_kind

    def output_table(self, batch: dict[str, np.ndarray], i: int) -> tuple[Any, int]:
        """PCs of shard ``i``'s cells."""
        import pyarrow as pa

        start, stop = int(batch["start"][i]), int(batch["stop"][i])
        f = self.pca.transform(lognorm(self.read_rows(start, stop), self.x_kind))
        flat = pa.array(np.ascontiguousarray(f, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "row": pa.array(np.arange(start, stop, dtype=np.int64)),
                "features": pa.FixedSizeListArray.from_arrays(flat, f.shape[1]),
            }
        )
        return table, 0


class ClusterShards(AtlasShardStage):
    """Ray Data stage: each cell's cluster and the shard's per-cluster sums.

    Batch contract: in ``shard, start, stop, content_hash``; out the shard-stage summary.
    Writes ``state/discover_stats/part-*.parquet`` (one row per cluster: ``cluster, n, sum,
    sum_sq, nnz``, the last three lists over the atlas genes) and then, through the ledger,
    ``state/discover_clusters/part-*.parquet`` (``obs_name, row, cluster, by_neighbours``) and
    its completion marker: the marker commits both.
    """

    kind: ClassVar[str] = "state"
    method: ClassVar[str] = CELLS

    def __init__(
        self,
        *,
        pca: Any,
        x_kind: str,
        rows: Any,
        clusters: Any,
        reference: Any,
        n_clusters: int,
        k: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pca: PCAxes = resolve(pca)
        self.x_kind = x_kind
        self.rows, self.clusters = resolve(rows), resolve(clusters)
        self.reference = resolve(reference)
        self.n_clusters, self.k = n_clusters, k

    def output_table(self, batch: dict[str, np.ndarray], i: int) -> tuple[Any, int]:
        """Assign the shard's cells, sum them per cluster, write the sums."""
        import pyarrow as pa

        from raypipe.annotate.cluster_markers import cluster_sums

        shard, start, stop = int(batch["shard"][i]), int(batch["start"][i]), int(batch["stop"][i])
        xl = lognorm(self.read_rows(start, stop), self.x_kind)
        cl = np.full(stop - start, -1, dtype=np.int64)
        lo, hi = np.searchsorted(self.rows, [start, stop])
        cl[self.rows[lo:hi] - start] = self.clusters[lo:hi]
        missing = np.flatnonzero(cl < 0)
        if missing.size:
            if self.reference is None:
                raise InputError(
                    f"shard {shard}: {missing.size} cells were not clustered and there is no "
                    "sample to assign them from",
                    fix="re-run: the clustering in state/discover is stale",
                )
            feats = self.pca.transform(xl[missing])
            cl[missing] = assign_by_neighbours(feats, self.reference, self.clusters, self.k)
        stats = cluster_sums(xl, cl, self.n_clusters)
        write_parquet_atomic(part_path(self.out_dir, "state", STATS, shard), _stats_table(stats))
        by_nb = np.zeros(stop - start, dtype=bool)
        by_nb[missing] = True
        table = pa.table(
            {
                "obs_name": pa.array([str(s) for s in self.read_names(start, stop)]),
                "row": pa.array(np.arange(start, stop, dtype=np.int64)),
                "cluster": pa.array(cl.astype(np.int32)),
                "by_neighbours": pa.array(by_nb),
            }
        )
        return table, 0


def _stats_table(stats: ClusterStats) -> Any:
    import pyarrow as pa

    g = stats.total.shape[1]

    def col(a: np.ndarray, typ: Any) -> Any:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), typ), g)

    return pa.table(
        {
            "cluster": pa.array(np.arange(stats.n.size, dtype=np.int32)),
            "n": pa.array(stats.n),
            "sum": col(stats.total, pa.float64()),
            "sum_sq": col(stats.total_sq, pa.float64()),
            "nnz": col(stats.nnz, pa.int64()),
        }
    )


def merged_stats(out_dir: str, shards: list[Shard], n_clusters: int, n_genes: int) -> Any:
    """Add up the shards' sums in shard order (the same totals on every run)."""
    from raypipe.annotate.cluster_markers import ClusterStats

    total = ClusterStats.zeros(n_clusters, n_genes)
    for s in shards:
        t = read_parquet(part_path(out_dir, "state", STATS, s.index))

        def arr(name: str, t: Any = t) -> np.ndarray:
            return np.asarray(t.column(name).combine_chunks().flatten().to_numpy()).reshape(
                n_clusters, n_genes
            )

        part = ClusterStats(
            t.column("n").to_numpy(), arr("sum"), arr("sum_sq"), arr("nnz").astype(np.int64)
        )
        total.merge(part)
    return total


def _fit(job: JobConfig, atlas: AtlasInfo, shards: list[Shard], progress: bool) -> Clustering:
    """Sample, PCA, (features of every cell), kNN graph, Leiden."""
    from raypipe.atlas.store import read_rows
    from raypipe.core.neighbors import cosine_neighbors, knn_igraph, leiden
    from raypipe.core.pca import fit_pca

    cfg = job.annotate.discover
    n = atlas.n_obs
    rng = np.random.default_rng(cfg.seed)
    fit_rows = (
        np.arange(n)
        if n <= cfg.sample_cells
        else np.sort(rng.choice(n, cfg.sample_cells, replace=False))
    )
    xl = lognorm(read_rows(atlas, fit_rows), atlas.x_kind)
    pca, _ = fit_pca(lambda: [xl], cfg.n_pcs, n_top_genes=cfg.n_top_genes)
    sampled = n > cfg.max_cells
    if n <= cfg.sample_cells or sampled:
        rows, feats = fit_rows, pca.transform(xl)
    else:  # every cell, more than the PCA sample: PCs from a Ray map step over the shards
        rows, feats = np.arange(n), _all_features(job, atlas, shards, pca, progress)
    k = min(cfg.n_neighbors, rows.size - 1)
    graph = knn_igraph(cosine_neighbors(feats, k, seed=cfg.seed).indices)
    raw = leiden(graph, cfg.resolution, seed=cfg.seed)
    sizes = np.bincount(raw)
    order = np.argsort(-sizes, kind="stable")  # 0 = the largest cluster
    relabel = np.empty_like(order)
    relabel[order] = np.arange(order.size)
    return Clustering(
        rows.astype(np.int64),
        relabel[raw].astype(np.int64),
        pca,
        feats.astype(np.float32) if sampled else None,
        _clustering_fingerprint(job, atlas),
    )


def _all_features(
    job: JobConfig, atlas: AtlasInfo, shards: list[Shard], pca: PCAxes, progress: bool
) -> np.ndarray:
    import ray

    from raypipe.core.execute import run_plan
    from raypipe.core.ledger import Ledger

    fp = stage_hash(FEATURES, _clustering_fingerprint(job, atlas), atlas.x_kind)
    kwargs = {
        "atlas_path": atlas.path,
        "out_dir": job.output_dir,
        "fingerprint": fp,
        "pca": ray.put(pca),
        "x_kind": atlas.x_kind,
    }
    step = StageSpec(FeatureShards, kwargs, job.ray.actors, job.ray.actor_cpus)
    plan = StagePlan([step], fp, kind=FeatureShards.kind)
    run_plan(plan, job.output_dir, FEATURES, shards, progress=progress, desc="discover_pcs")
    ledger = Ledger(job.output_dir, FeatureShards.kind, FEATURES)
    out = np.zeros((atlas.n_obs, pca.n_components), dtype=np.float32)
    for s in shards:
        t = read_parquet(ledger.part(s.index))
        f = t.column("features").combine_chunks()
        out[t.column("row").to_numpy()] = f.flatten().to_numpy().reshape(len(f), -1)
    return out


def load_or_fit(
    job: JobConfig, atlas: AtlasInfo, shards: list[Shard], out_dir: AnyPath, progress: bool
) -> tuple[Clustering, bool]:
    """Return the cached clustering when the atlas and settings are unchanged, else a new one."""
    from raypipe.core.outputs import atomic_write_bytes

    path = out_dir / "state" / "discover" / _CACHE
    fp = _clustering_fingerprint(job, atlas)
    if path.exists():
        try:
            old = Clustering.from_bytes(path.read_bytes())
        except (OSError, ValueError, KeyError):
            old = None
        if old is not None and old.fingerprint == fp:
            return old, True
    fitted = _fit(job, atlas, shards, progress)
    atomic_write_bytes(path, fitted.to_bytes())
    return fitted, False


def cluster_plan(job: JobConfig, atlas: AtlasInfo, clustering: Clustering) -> StagePlan:
    """Plan :class:`ClusterShards` over the shards (kind ``state``, method :data:`CELLS`)."""
    import ray

    fp = stage_hash(CELLS, clustering.fingerprint)
    kwargs = {
        "atlas_path": atlas.path,
        "out_dir": job.output_dir,
        "fingerprint": fp,
        "pca": ray.put(clustering.pca),
        "x_kind": atlas.x_kind,
        "rows": ray.put(clustering.rows),
        "clusters": ray.put(clustering.clusters),
        "reference": ray.put(clustering.reference),
        "n_clusters": clustering.n_clusters,
        "k": job.annotate.discover.n_neighbors,
    }
    step = StageSpec(ClusterShards, kwargs, job.ray.actors, job.ray.actor_cpus)
    return StagePlan([step], fp, kind=ClusterShards.kind)


def read_cell_clusters(out_dir: str | AnyPath, shard: int) -> np.ndarray | None:
    """Cluster ids of one shard's cells (None when discovery did not run)."""
    path = part_path(as_path(out_dir), "state", CELLS, shard)
    if not path.exists():
        return None
    return np.asarray(read_parquet(path, columns=["cluster"]).column("cluster").to_numpy())
