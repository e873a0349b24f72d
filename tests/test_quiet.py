"""A normal run prints progress bars, raypipe's own warnings and the summary — no third-party
noise (zarr/anndata, Ray, Ray Data, umap); ``-v`` shows everything."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cli_utils import raypipe_cli

ROOT = Path(__file__).resolve().parents[1]

#: What raypipe itself writes to stderr: a tqdm bar ("stage:  42%|███ ...") or a log record
#: of a raypipe logger (format set by the CLI: "LEVEL raypipe.module: message").
OWN_STDERR = re.compile(r"^(\w+:\s+\d+%\||(WARNING|ERROR|CRITICAL) raypipe(\.\w+)*: )")

#: Shapes of third-party output: Python warnings ("file.py:12: UserWarning: ..."), Ray's
#: C++ log lines ("[2026-... E 123 123] core_worker.cc:..."), Ray / Ray Data Python log lines
#: ("2026-... INFO streaming_executor.py:371 -- ..."), and the known messages by name.
THIRD_PARTY = re.compile(
    r"\w+Warning: |^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]|^\d{4}-\d\d-\d\d [\d:,]+\s+"
    r"(DEBUG|INFO|WARNING|ERROR)\s+\S+\.py:\d+ -- |autosharding|core_worker\.cc|Progress bars "
    r"disabled|n_jobs value|Moving element from|RAY_BACKEND_LOG_LEVEL"
)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return raypipe_cli(*args, cwd=cwd)


def _lines(text: str) -> list[str]:
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


@pytest.mark.integration
def test_the_demo_prints_no_third_party_lines(demo_cli_run):
    """The session's demo run (tests/conftest.py: the demo as shipped, symbols as gene text)."""
    out = demo_cli_run
    noisy = [ln for ln in _lines(out.stdout + "\n" + out.stderr) if THIRD_PARTY.search(ln)]
    assert not noisy, "third-party lines on the terminal:\n" + "\n".join(noisy)
    foreign = [ln for ln in _lines(out.stderr) if not OWN_STDERR.match(ln)]
    assert not foreign, "stderr lines raypipe did not write:\n" + "\n".join(foreign)
    assert out.stdout.startswith("== raypipe run summary ==")
    for stage in ("ingest", "genes", "genept_w", "annotate_genept_w"):
        assert re.search(rf"^{stage}: 100%\|", out.stderr, flags=re.M), stage
    assert "WARNING: FALLBACK" in out.stdout  # raypipe's own warnings still surface
    # the legacy-layout file is read (and warned about) once: input checks and ingest share it
    assert out.stderr.count("uses a legacy AnnData layout") == 1
    # the report drawn during the run shows the finished run's summary
    page = (out.out / "report" / "index.html").read_text()
    assert "<th>status</th><td>complete</td>" in page
    assert "700 cells × 765 genes" in page


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "-v"])
def test_verbose_shows_third_party_warnings(tmp_path: Path, verbose: bool):
    # pbmc68k_reduced is a legacy .h5ad: anndata warns (FutureWarning) while reading it
    flags = ["-v"] if verbose else []
    out = _run(
        *flags,
        "ingest",
        "builtin:pbmc68k_reduced",
        "--out",
        str(tmp_path / "a.zarr"),
        "--layer",
        "raw",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert ("FutureWarning: Moving element from" in out.stderr) is verbose
    assert ("autosharding" in out.stderr) is False  # a decision, not a filter: never printed
    assert "uses a legacy AnnData layout" in out.stderr  # raypipe's own warning, always
