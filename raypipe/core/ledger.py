"""The completions ledger: which shards of one (kind, method) are done, and with what.

One :class:`Ledger` per output (``embeddings/genept_w``, ``annotations/ce``,
``state/gene_moments`` ...) owns both halves of a shard's result: its part
(``<out>/<kind>/<method>/part-NNNNN.parquet``) and its completion marker
(``<out>/state/<stage>/shard-NNNNN.json``). The part is written first, the marker last: the
marker is the commit point, and a part without a fresh marker is never trusted (a crash
leaves nothing that looks complete). A marker is fresh when its fingerprint, its rows' content
hash and its row range equal the plan's, its part exists, and it does not ask for a retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raypipe.core.outputs import (
    atomic_write_json,
    marker_path,
    part_path,
    read_marker,
    write_parquet_atomic,
)
from raypipe.core.plan import Shard
from raypipe.core.storage import AnyPath, as_path

__all__ = ["STALE_REASONS", "Ledger", "stage_name"]

NEW = "new rows (no result yet)"
RANGE = "rows added or removed (its row range moved)"
ROWS = "its rows changed"
SETTINGS = "settings or fitted space changed"
MISSING = "its part is missing"
RETRY = "failed items are retried"
#: Why a shard is computed again, as :meth:`Ledger.why_stale` says it.
STALE_REASONS = (NEW, RANGE, ROWS, SETTINGS, MISSING, RETRY)

#: Marker folders of the kinds other than ``embeddings`` (whose markers are named by method).
_STAGE_PREFIX = {"annotations": "annotate_"}


def stage_name(kind: str, method: str) -> str:
    """Return the marker folder (``state/<name>/``) of a ``kind``/``method`` output."""
    return f"{_STAGE_PREFIX.get(kind, '')}{method}"


@dataclass(frozen=True)
class Ledger:
    """Parts and completion markers of one output.

    Parameters
    ----------
    out_dir
        The run's output folder.
    kind
        ``embeddings``, ``annotations`` or ``state`` (cached pre-passes).
    method
        The method (``genept_w``, ``ce`` ...) or pre-pass (``gene_moments``).
    """

    out_dir: str
    kind: str
    method: str

    @property
    def stage(self) -> str:
        """Name of the marker folder."""
        return stage_name(self.kind, self.method)

    def part(self, shard: int) -> AnyPath:
        """Path of a shard's part."""
        return part_path(self.out_dir, self.kind, self.method, shard)

    def marker(self, shard: int) -> AnyPath:
        """Path of a shard's completion marker."""
        return marker_path(self.out_dir, self.stage, shard)

    def read(self, shard: int) -> dict[str, Any] | None:
        """Return a shard's marker (None when absent or unreadable)."""
        return read_marker(self.marker(shard))

    def why_stale(self, shard: Shard, fingerprint: str) -> str | None:
        """Why ``shard`` must be computed (one of :data:`STALE_REASONS`), or None when fresh.

        Fresh: done with exactly this fingerprint, content and range, its part present.
        """
        m = self.read(shard.index)
        if m is None:
            return NEW
        if (m.get("start"), m.get("stop")) != (shard.start, shard.stop):
            return RANGE
        if m.get("content_hash") != shard.content_hash:
            return ROWS
        if m.get("fingerprint") != fingerprint:
            return SETTINGS
        if not self.part(shard.index).exists():
            return MISSING
        if m.get("retry"):  # items that failed for a transient reason are retried
            return RETRY
        return None

    def is_fresh(self, shard: Shard, fingerprint: str) -> bool:
        """Whether ``shard`` is done with exactly this fingerprint, content and range."""
        return self.why_stale(shard, fingerprint) is None

    def stale(self, shards: list[Shard], fingerprint: str) -> dict[Shard, str]:
        """Return the shards to compute, in order, each with why (:meth:`why_stale`)."""
        out = {}
        for s in shards:
            why = self.why_stale(s, fingerprint)
            if why is not None:
                out[s] = why
        return out

    def pending(self, shards: list[Shard], fingerprint: str) -> list[Shard]:
        """Return the shards whose marker is missing or stale (content, range, settings)."""
        return list(self.stale(shards, fingerprint))

    def write(
        self,
        shard: Shard,
        table: Any,
        *,
        fingerprint: str,
        summary: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> AnyPath:
        """Write a shard's part, then (the commit point) its marker; return the part's path.

        On a bucket each is one PUT (write-once objects: visible whole or not at all); the
        marker is written only after the part's PUT returned, so it is the commit point there
        too.
        """
        path = self.part(shard.index)
        write_parquet_atomic(path, table)
        atomic_write_json(
            self.marker(shard.index),
            {
                **summary,
                "path": str(path),
                "start": shard.start,
                "stop": shard.stop,
                "content_hash": shard.content_hash,
                "fingerprint": fingerprint,
                **(extra or {}),
            },
        )
        return path

    def drop_stale(self, n_shards: int) -> None:
        """Remove parts and markers of shard indices beyond the plan (the atlas shrank)."""
        base = as_path(self.out_dir)
        for folder, pattern in (
            (base / self.kind / self.method, "part-*.parquet"),
            (base / "state" / self.stage, "shard-*.json"),
        ):
            for p in folder.glob(pattern):
                if int(p.stem.split("-")[1]) >= n_shards:
                    p.unlink()

    def records(self, shards: list[Shard]) -> list[dict[str, Any]]:
        """Return the markers of ``shards`` (``{}`` when missing), e.g. for per-shard LLM usage."""
        return [self.read(s.index) or {} for s in shards]
