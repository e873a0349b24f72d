"""Config sections of a run's own safety: the run-folder lease and the progress watchdog.

Validation never touches hardware, network or heavy libraries.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from raypipe.config.base import Section

__all__ = ["LeaseConfig", "WatchdogConfig"]


class LeaseConfig(Section):
    """One writer per output folder: the lease a run holds while it works (docs/reprocessing.md)."""

    heartbeat_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between the lease's heartbeats (`<output_dir>/lease.json`).",
    )
    stale_after_s: float = Field(
        300.0,
        gt=0,
        description="A lease with no heartbeat for this long (or whose process on this host is "
        "gone) is taken over by the next run, which says so.",
    )

    @model_validator(mode="after")
    def _beats_fit(self) -> LeaseConfig:
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"lease.stale_after_s ({self.stale_after_s:g}) must be at least twice "
                f"lease.heartbeat_s ({self.heartbeat_s:g}), or a live run loses its lease"
            )
        return self


class WatchdogConfig(Section):
    """Says what a run waits for when it makes no progress."""

    stall_s: float = Field(
        300.0,
        gt=0,
        description="When no shard finished and no step began for this long, print what the run "
        "is waiting for (again every stall_s).",
    )
