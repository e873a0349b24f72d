"""The ``raypipe`` command line: version, help on every command, clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from data_factory import make_adata, write_h5ad

from raypipe import __version__
from raypipe.cli import main

COMMANDS = [
    ["ingest"],
    ["run"],
    ["tokenize"],
    ["genes"],
    ["genes", "fetch-orgdb"],
    ["cache"],
    ["markers"],
    ["markers", "fetch"],
]


def _raypipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raypipe", *args], capture_output=True, text=True, timeout=120
    )


def test_version_console():
    out = _raypipe("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"raypipe {__version__}"


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("ingest", "run", "tokenize", "genes", "cache"):
        assert cmd in text


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_help_on_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: raypipe " + " ".join(argv))


def test_run_help_documents_set_and_overwrite(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--set KEY=VALUE" in text
    assert "--overwrite" in text


def test_ingest_missing_file_exit_2_one_error(tmp_path: Path):
    missing = tmp_path / "nope.h5ad"
    out = _raypipe("ingest", str(missing), "--out", str(tmp_path / "a.zarr"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"error: input {missing} does not exist"
    assert lines[1].strip().startswith("fix:")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "a.zarr").exists()


def test_ingest_not_anndata_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    fake = tmp_path / "cells.h5ad"
    fake.write_text("gene,cell\nCD3D,1\n")
    assert main(["ingest", str(fake), "--out", str(tmp_path / "a.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {fake}")
    assert "Traceback" not in err


def test_ingest_bad_rows_per_chunk(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    h5 = write_h5ad(tmp_path / "c.h5ad", make_adata(20))
    assert (
        main(["ingest", str(h5), "--out", str(tmp_path / "a.zarr"), "--rows-per-chunk", "0"]) == 2
    )
    assert "--rows-per-chunk must be > 0" in capsys.readouterr().err


def test_ingest_ok_and_existing_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    h5 = write_h5ad(tmp_path / "c.h5ad", make_adata(50, zero_rows=(3,)))
    out = tmp_path / "a.zarr"
    assert main(["ingest", str(h5), "--out", str(out), "--rows-per-chunk", "16"]) == 0
    text = capsys.readouterr().out
    assert "50 cells × 40 genes, X = counts (detected counts), 4 row chunks of 16" in text
    assert "1 cells have zero counts" in text
    assert main(["ingest", str(h5), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} already exists" in err
    assert "--overwrite" in err
    assert main(["ingest", str(h5), "--out", str(out), "--overwrite", "--x-kind", "lognorm"]) == 0
    assert "X = lognorm (detected counts)" in capsys.readouterr().out


def test_run_bad_config_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input:\n  path: x.zarr\noutput_dir: {tmp_path / 'o'}\nshard:\n  rows: 1\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'shard'" in err
    assert main(["run", str(cfg), "--set", "shards.rows=0"]) == 2
