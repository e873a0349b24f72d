"""The shard-stage contract shared by every per-shard computation.

A :class:`ShardStage` is a callable class used with ``ds.map_batches(Stage,
compute=ray.data.ActorPoolStrategy(...))``: heavy setup happens once per actor in
``__init__``; ``__call__`` takes a batch of shard specs, reads each shard's rows *inside the
actor* (the kit knows no atlas format: subclasses implement :meth:`ShardStage.read_rows`), computes, writes the part atomically plus its completion
marker, and returns a small summary (so no sparse or dense payload crosses the object store).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from raypipe.core.ledger import Ledger
from raypipe.core.outputs import embedding_table
from raypipe.core.plan import Shard
from raypipe.errors import StageContractError

__all__ = [
    "SHARD_COLUMNS",
    "SUMMARY_COLUMNS",
    "ShardStage",
    "check_contract",
    "set_kernel_threads",
]

SHARD_COLUMNS = ("shard", "start", "stop", "content_hash")
SUMMARY_COLUMNS = ("shard", "n_cells", "n_empty", "seconds", "path")


def set_kernel_threads(cpus: float) -> None:
    """Run this process's numba kernels on the actor's CPUs (at least 1 thread).

    numba starts one thread per core of the machine; two 1-CPU actors each running a
    ``prange`` kernel on every core would fight over them.
    """
    import numba

    most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(round(cpus), most)))


def check_contract(stage: str, batch: dict[str, Any], required: tuple[str, ...]) -> None:
    """Raise :class:`StageContractError` naming the stage and the missing/present columns."""
    missing = [c for c in required if c not in batch]
    if missing:
        raise StageContractError(
            f"stage {stage} needs columns {missing}; the batch has {sorted(batch)}",
            fix="feed it the shard plan from raypipe.atlas.plan_shards",
        )


class ShardStage:
    """Base class: subclasses set ``method`` and implement :meth:`compute`.

    Parameters
    ----------
    atlas_path
        Where the rows come from (the atlas ``.zarr``; read by the subclass's
        :meth:`read_rows` / :meth:`read_names`, e.g. ``raypipe.atlas.AtlasShardStage``).
    out_dir
        The job's output folder (must be shared storage on a multi-node cluster).
    fingerprint
        Hash of everything the result depends on besides the rows (settings, models, genes).
    metadata
        Extra key/values stored in each part's parquet metadata.
    """

    method: ClassVar[str] = ""
    kind: ClassVar[str] = "embeddings"
    input_columns: ClassVar[tuple[str, ...]] = SHARD_COLUMNS
    output_columns: ClassVar[tuple[str, ...]] = SUMMARY_COLUMNS

    def __init__(
        self,
        atlas_path: str,
        out_dir: str,
        fingerprint: str,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.atlas_path = atlas_path
        self.out_dir = out_dir
        self.fingerprint = fingerprint
        self.metadata = dict(metadata or {})

    def compute(self, x: Any, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(embedding (n, d) float32, empty (n,) bool)`` for the shard's rows."""
        raise NotImplementedError

    def marker_extra(self) -> dict[str, Any]:
        """Extra fields for the shard's completion marker (e.g. LLM usage of this shard)."""
        return {}

    def read_rows(self, start: int, stop: int) -> Any:
        """Read rows ``[start, stop)`` of the expression matrix (see AtlasShardStage)."""
        raise NotImplementedError

    def read_names(self, start: int, stop: int) -> np.ndarray:
        """Read the names of rows ``[start, stop)`` (see AtlasShardStage)."""
        raise NotImplementedError

    def compute_row(self, batch: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray]:
        """Compute row ``i`` of ``batch``: by default read the shard's X and :meth:`compute`."""
        start, stop = int(batch["start"][i]), int(batch["stop"][i])
        return self.compute(self.read_rows(start, stop), start, stop)

    @property
    def ledger(self) -> Ledger:
        """Where this stage's parts and completion markers go."""
        return Ledger(self.out_dir, self.kind, self.method)

    def output_table(self, batch: dict[str, np.ndarray], i: int) -> tuple[Any, int]:
        """Build shard ``i``'s output table and count its empty cells (default: embeddings)."""
        shard, start, stop = int(batch["shard"][i]), int(batch["start"][i]), int(batch["stop"][i])
        names = self.read_names(start, stop)
        emb, empty = self.compute_row(batch, i)
        meta = {**self.metadata, "method": self.method, "fingerprint": self.fingerprint}
        return embedding_table(names, shard, start, emb, empty, meta), int(np.count_nonzero(empty))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Process each shard spec in ``batch``: write its part, then its marker; summarise."""
        check_contract(type(self).__name__, batch, self.input_columns)
        rows: dict[str, list[Any]] = {c: [] for c in self.output_columns}
        ledger = self.ledger
        for i in range(len(batch["shard"])):
            t0 = time.perf_counter()
            shard = Shard(
                int(batch["shard"][i]),
                int(batch["start"][i]),
                int(batch["stop"][i]),
                str(batch["content_hash"][i]),
            )
            table, n_empty = self.output_table(batch, i)
            summary: dict[str, Any] = {
                "shard": shard.index,
                "n_cells": shard.n_rows,
                "n_empty": n_empty,
            }
            summary["seconds"] = time.perf_counter() - t0
            path = ledger.write(
                shard,
                table,
                fingerprint=self.fingerprint,
                summary=summary,
                extra=self.marker_extra(),
            )
            summary["path"] = str(path)
            for k, v in summary.items():
                rows[k].append(v)
        return {k: np.asarray(v) for k, v in rows.items()}
