"""What a run did, for a person: the summary printed at the end of ``raypipe run``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunSummary"]


@dataclass
class RunSummary:
    """What a run did (printed at the end, and stored in the manifest)."""

    output_dir: str
    n_cells: int = 0
    input: str = ""
    n_shards: int = 0
    shards_done: dict[str, int] = field(default_factory=dict)
    shards_skipped: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    coverage: str = ""
    ray: str = ""
    wall_s: float = 0.0
    metrics: Any = None
    llm: str = ""
    candidates: list[str] = field(default_factory=list)
    recomputed: dict[str, dict[str, int]] = field(default_factory=dict)
    space: str = ""
    evaluation: str = ""

    def render(self) -> str:
        """Human summary."""
        cps = self.n_cells / self.wall_s if self.wall_s else 0.0
        lines = [
            "== raypipe run summary ==",
            f"ray:        {self.ray}",
            f"cells:      {self.n_cells:,} in {self.n_shards} shards",
            *([f"input:      {self.input}"] if self.input else []),
            f"wall time:  {self.wall_s:.1f} s ({cps:,.0f} cells/s end to end, all stages)",
            f"genes:      {self.coverage}",
        ]
        for m in self.shards_done:
            lines.append(
                f"{m:<11} {self.shards_done[m]} shards computed, {self.shards_skipped.get(m, 0)} reused; "
                f"{self.timings.get(m, 0.0):.1f} s"
            )
        for stage, why in self.recomputed.items():
            if why:
                lines.append(
                    f"  {stage} computed: " + ", ".join(f"{n} because {r}" for r, n in why.items())
                )
        if self.space:
            lines.append(f"fitted space: {self.space}")
        if self.evaluation:
            lines.append(f"evaluation: {self.evaluation}")
        lines.append("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.append("outputs:")
        lines += [f"  {o}" for o in self.outputs]
        if self.llm:
            lines.append("LLM usage (this run; cache hits are free):")
            lines += [f"  {ln}" for ln in self.llm.splitlines()]
        if self.metrics is not None and len(self.metrics):
            wide = self.metrics.pivot_table(
                index="metric", columns="method", values="value", sort=False
            )
            lines.append("metrics (metrics.parquet):")
            lines += ["  " + ln for ln in wide.round(3).fillna("").to_string().splitlines()]
        lines += self.candidates
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)
