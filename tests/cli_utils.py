"""Running the ``raypipe`` command line from tests (a subprocess with this checkout first)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "BackgroundCli", "CliRun", "raypipe_cli"]


@dataclass(frozen=True)
class CliRun:
    """A finished ``raypipe run`` subprocess: its output folder and what it printed."""

    out: Path
    stdout: str
    stderr: str


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    full = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    full.pop("RAY_BACKEND_LOG_LEVEL", None)
    return full


class BackgroundCli:
    """``python -m raypipe ARGS`` started now, read later (its output goes to files).

    The session starts its longest CLI run (the demo) when collection ends, so it runs beside
    the quick tests instead of after them; the fixture that needs it waits for it.
    """

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self._out = (cwd / "stdout.txt").open("w")
        self._err = (cwd / "stderr.txt").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raypipe", *args],
            cwd=cwd,
            stdout=self._out,
            stderr=self._err,
            text=True,
            env=_cli_env(env),
        )

    def result(self, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
        """Wait for the command; its return code and what it printed."""
        code = self.proc.wait(timeout=timeout)
        self._out.close()
        self._err.close()
        out, err = ((self.cwd / f).read_text() for f in ("stdout.txt", "stderr.txt"))
        return subprocess.CompletedProcess(self.proc.args, code, out, err)

    def stop(self) -> None:
        """Kill the command if it still runs (an interrupted session)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def raypipe_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 1200
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m raypipe ARGS`` with this checkout first on the path."""
    full = _cli_env(env)
    return subprocess.run(
        [sys.executable, "-m", "raypipe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
    )
