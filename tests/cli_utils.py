"""Running the ``raypipe`` command line from tests (a subprocess with this checkout first)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "CliRun", "raypipe_cli"]


@dataclass(frozen=True)
class CliRun:
    """A finished ``raypipe run`` subprocess: its output folder and what it printed."""

    out: Path
    stdout: str
    stderr: str


def raypipe_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 1200
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m raypipe ARGS`` with this checkout first on the path."""
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    full.pop("RAY_BACKEND_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", "raypipe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
    )
