"""Faults: damaged inputs, full disks, kill -9 mid-run, Ray helpers outliving their driver.

Issue #10, items 4, 8 and 10. Each fault must end in one clear ``error: ... fix: ...`` (never
a raw or Ray-wrapped traceback), ``status: failed`` or a resumable state, no foreign file
touched, and no leftover temporary folder after the next successful run. A full disk is
injected with ``RAYPIPE_FAULT`` (``raypipe.core.faults``), which reaches the Ray workers of a
``raypipe run`` subprocess; kill points pause there until the test sends SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_factory import PLAIN_GENEPT_W, job_dict, make_adata, write_gene_table, write_h5ad

from raypipe.atlas import ingest
from raypipe.cli import main
from raypipe.config import load_config
from raypipe.core.reaper import ray_descendants
from raypipe.errors import InputError, RaypipeError
from raypipe.orchestrate.runner import run_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    table = write_gene_table(root / "genes.tsv")
    h5 = write_h5ad(root / "cells.h5ad", make_adata(300, seed=11))
    return h5, table


def _config(tmp: Path, h5: Path, table: Path) -> tuple[Path, Path]:
    out = tmp / "run"
    cfg = job_dict(h5, out, table, embed={"methods": ["genept_w"], "genept_w": PLAIN_GENEPT_W})
    cfg["ray"]["num_cpus"] = 2
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start(cfg: Path, fault: str, tmp: Path) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        RAYPIPE_FAULT=fault,
        RAYPIPE_FAULT_READY=str(tmp / "ready"),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "raypipe", "run", str(cfg), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def _resume_and_check(cfg: Path, out: Path) -> None:
    """The next run completes and leaves no temporary file or folder behind."""
    summary = run_job(load_config(cfg), progress=False)
    assert summary.shards_done == {"genept_w": 3}
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert _temps(out) == []


# item 4: damaged input, full disk, bad paths and values ------------------------------------


def test_damaged_h5ad_body_is_one_message_naming_the_file(data, tmp_path, capsys):
    good = tmp_path / "c.h5ad"
    make_adata(2000, seed=1).write_h5ad(good, compression="gzip")  # chunks fail to decode
    raw = bytearray(good.read_bytes())
    lo = int(len(raw) * 0.3)
    raw[lo : lo + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    bad = tmp_path / "damaged.h5ad"
    bad.write_bytes(bytes(raw))
    assert main(["ingest", str(bad), "--out", str(tmp_path / "a.zarr")]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad} is damaged" in err
    assert "fix:" in err
    assert "Traceback" not in err
    assert _temps(tmp_path) == []
    assert not (tmp_path / "a.zarr").exists()


def test_disk_full_during_ingest_names_the_target(data, tmp_path, monkeypatch, capsys):
    h5, _ = data
    monkeypatch.setenv("RAYPIPE_FAULT", "ingest_chunk:enospc")
    out = tmp_path / "a.zarr"
    with pytest.raises(RaypipeError, match=f"disk full while writing {out}"):
        ingest(h5, out, rows_per_chunk=64, progress=False)
    assert main(["ingest", str(h5), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: disk full" in err
    assert "fix: free space" in err
    assert _temps(tmp_path) == []
    assert not out.exists()


def test_bad_paths_and_values_are_one_message(data, tmp_path, capsys):
    h5, table = data
    cfg, _ = _config(tmp_path, h5, table)
    assert main(["run", str(cfg), "--set", "embed.methods=[genept_w", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: --set 'embed.methods=[genept_w': the value '[genept_w'" in err
    assert "Traceback" not in err
    for where in (Path("/proc/raypipe-test/out"), h5 / "out"):
        assert main(["run", str(cfg), "--set", f"output_dir={where}"]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {where} cannot be created or written" in err
    with pytest.raises(InputError, match="cannot be created"):
        run_job(load_config(cfg, [f"output_dir={h5}/x"]), progress=False)


@pytest.mark.slow
def test_disk_full_in_a_ray_worker_reaches_the_user_as_raypipes_message(ray_local, data, tmp_path):
    h5, table = data
    cfg, out = _config(tmp_path, h5, table)
    proc = _start(cfg, "write:enospc:/embeddings/genept_w/part-", tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "error: disk full while writing" in err
    assert f"{out}/embeddings/genept_w/part-" in err
    assert "fix: free space" in err
    for noise in ("Traceback", "RayTaskError", "UserCodeException", "UDF failed"):
        assert noise not in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert "disk full" in m["error"]
    _resume_and_check(cfg, out)


# items 8 and 10: kill -9 at three points -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    ["ingest_chunk:pause", "genes:pause", "write:pause:/embeddings/genept_w/part-"],
    ids=["ingest", "genes", "shards"],
)
def test_kill9_leaves_a_resumable_run_and_no_ray_processes(ray_local, data, tmp_path, fault):
    h5, table = data
    cfg, out = _config(tmp_path, h5, table)
    neighbour = tmp_path / "neighbour.txt"
    neighbour.write_text("not raypipe's")
    before = _digest(h5)
    proc = _start(cfg, fault, tmp_path)
    deadline = time.monotonic() + 300
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.2)
    helpers = ray_descendants(proc.pid)
    if not fault.startswith("ingest"):
        assert helpers, "an embedded Ray runs below the driver"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 60  # Ray's own cleanup takes ~2 minutes; the reaper seconds
    while any(Path(f"/proc/{pid}").exists() for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in helpers if Path(f"/proc/{pid}").exists()]
    assert left == [], "Ray processes outlived their killed driver"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    if fault.startswith("ingest"):
        assert list(out.glob(".atlas.zarr.tmp-*"))  # what a killed ingest leaves ...
    _resume_and_check(cfg, out)  # ... is gone after the next successful run
    assert neighbour.read_text() == "not raypipe's"
    assert _digest(h5) == before
