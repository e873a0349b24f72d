"""Plans: shards (row ranges), the chained Ray Data steps of a stage, and fingerprints.

Everything here is plain data built on the driver from metadata only; nothing reads
expression data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Shard", "StagePlan", "StageSpec", "resolve", "stage_hash"]


@dataclass(frozen=True)
class Shard:
    """A row range ``[start, stop)`` of the atlas with the content hash of its rows."""

    index: int
    start: int
    stop: int
    content_hash: str

    @property
    def n_rows(self) -> int:
        """Rows in the shard."""
        return self.stop - self.start


@dataclass(frozen=True)
class StageSpec:
    """One Ray Data ``map_batches`` step: a callable class, its kwargs and actor resources."""

    stage: type
    kwargs: dict[str, Any]
    actors: int
    actor_cpus: float
    num_gpus: float = 0.0


@dataclass
class StagePlan:
    """How to run one method over the shards: its chained steps and output fingerprint.

    Attributes
    ----------
    steps
        The chained steps; the last one writes parts and completion markers.
    fingerprint
        Hash of everything the outputs depend on besides the rows.
    kind
        Output folder (``embeddings`` or ``annotations``).
    notes
        Key/values recorded in the manifest (settings, coverage, estimates).
    """

    steps: list[StageSpec]
    fingerprint: str
    kind: str = "embeddings"
    notes: dict[str, Any] = field(default_factory=dict)


def stage_hash(*parts: object) -> str:
    """Short hash of the parts (fingerprints of stage outputs)."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def resolve(obj: Any) -> Any:
    """Return ``ray.get(obj)`` for an ObjectRef (a payload broadcast once), else ``obj``."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; keeps pure use light
        return obj
    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj
