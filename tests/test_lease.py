"""One writer per run folder (issue 20, item 2): the lease, locally and on S3 (moto).

A second writer is refused naming the holder (pid, host, user, since when); a holder that
was killed, or whose heartbeat stopped longer than ``stale_after_s``, is taken over and the
new owner says so. Holders are real processes; the S3 cases use a real moto server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from data_factory import job_dict, make_adata, write_gene_table, write_h5ad
from servers.s3 import moto_env, s3_env

from raypipe.config import load_config
from raypipe.core.lease import LEASE, Lease, LeaseHeld

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from raypipe.core.lease import Lease
lease = Lease(sys.argv[1], heartbeat_s=float(sys.argv[2]), stale_after_s=60).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(out: str, heartbeat_s: float = 0.5, env: dict[str, str] | None = None):
    """A real process holding the lease of ``out`` (returned once it holds it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, out, str(heartbeat_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read() if proc.stderr else ""
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_second_lease_is_refused_naming_the_holder(tmp_path):
    out = str(tmp_path / "run")
    first = Lease(out).acquire()
    try:
        with pytest.raises(LeaseHeld) as info:
            Lease(out).acquire()
        msg = str(info.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg
        assert "last heartbeat 0 s ago" in msg
        assert "lease.stale_after_s" in msg
    finally:
        first.release()
    assert not (tmp_path / "run" / LEASE).exists()  # given back
    Lease(out).acquire().release()  # free again


def test_stale_heartbeat_is_taken_over_and_said(tmp_path, caplog):
    """Another host's run that stopped beating (e.g. its node died) loses the lease."""
    (tmp_path / LEASE).write_text(
        json.dumps(
            {
                "owner": "x",
                "host": "node-that-died",
                "pid": 1,
                "user": "u",
                "started": "2026-01-01T00:00:00",
                "heartbeat": time.time() - 400,
            }
        )
    )
    lease = Lease(str(tmp_path), stale_after_s=300).acquire()
    try:
        assert lease.took_over is not None
        assert lease.took_over["host"] == "node-that-died"
        assert lease.took_over["why"].startswith("no heartbeat for 4")
        assert "took over the lease" in caplog.text
        assert json.loads((tmp_path / LEASE).read_text())["owner"] == lease.owner
    finally:
        lease.release()


def test_a_live_process_holds_a_killed_one_is_taken_over(tmp_path):
    """Two processes: the second is refused while the first lives, takes over once it is killed."""
    out = str(tmp_path / "run")
    proc = _holder(out)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid} on host"):
            Lease(out).acquire()
        beat = json.loads((tmp_path / "run" / LEASE).read_text())["heartbeat"]
        time.sleep(1.5)
        assert json.loads((tmp_path / "run" / LEASE).read_text())["heartbeat"] > beat
    finally:
        _kill(proc)
    lease = Lease(out).acquire()  # same host, its pid is gone: no need to wait
    try:
        assert lease.took_over is not None
        assert lease.took_over["why"] == f"process {proc.pid} is gone"
    finally:
        lease.release()


def test_run_job_refuses_a_held_folder_before_writing(tmp_path):
    """`raypipe run` on a folder another process holds: refused, nothing written there."""
    table = write_gene_table(tmp_path / "genes.tsv")
    h5 = write_h5ad(tmp_path / "cells.h5ad", make_adata(64, seed=3))
    out = tmp_path / "run"
    proc = _holder(str(out))
    try:
        from raypipe.orchestrate.runner import run_job

        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
            run_job(load_config(job_dict(h5, out, table)), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LEASE]
    finally:
        _kill(proc)


@pytest.fixture(scope="module")
def moto():
    with moto_env("runs") as server:
        yield server


def test_on_s3_a_conditional_create_admits_one_writer(moto):
    """Two processes on a bucket: If-None-Match refuses the second; a killed holder is taken over."""
    out = "s3://runs/leased"
    proc = _holder(out, env=s3_env(moto.endpoint))
    try:
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid} on host"):
            Lease(out).acquire()
    finally:
        _kill(proc)
    lease = Lease(out).acquire()
    try:
        assert lease.took_over is not None
        assert lease.took_over["why"] == f"process {proc.pid} is gone"
        assert not lease.best_effort  # moto honours conditional writes
        with pytest.raises(LeaseHeld):
            Lease(out).acquire()
    finally:
        lease.release()
    from raypipe.core.storage import open_fs

    assert not open_fs("s3").exists(f"runs/leased/{LEASE}")


def test_on_s3_a_stale_lease_is_taken_over_once(moto):
    """Two contenders for one stale lease: If-Match on its ETag lets exactly one win."""
    from raypipe.core.storage import open_fs

    open_fs("s3").pipe_file(
        f"runs/stale/{LEASE}",
        json.dumps(
            {"owner": "x", "host": "gone", "pid": 1, "heartbeat": time.time() - 999}
        ).encode(),
    )
    a = Lease("s3://runs/stale", stale_after_s=300)
    b = Lease("s3://runs/stale", stale_after_s=300)
    a.acquire()
    try:
        assert a.took_over is not None
        with pytest.raises(LeaseHeld, match="last heartbeat 0 s ago"):
            b.acquire()  # a's lease is fresh now: b is refused
    finally:
        a.release()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_concurrent_runs_the_second_refuses(where, moto, kang1k5, tmp_path):
    """Two `raypipe run` processes on one output_dir, 5 s apart: the second exits 2 naming the first."""
    out = str(tmp_path / "run") if where == "local" else "s3://runs/concurrent"
    cfg = {
        "input": {"path": str(kang1k5), "rows_per_chunk": 128},
        "output_dir": out,
        "shards": {"rows": 128},
        "genes": {"text_source": "symbol"},
        "embed": {"genept_w": {"hvg": None}},
        "ray": {"num_cpus": 2, "actors": 1, "actor_cpus": 0.5},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **s3_env(moto.endpoint), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "raypipe", "run", str(path), "--no-progress"]
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    from raypipe.core.lease import LEASE as name
    from raypipe.core.storage import as_path

    try:
        deadline = time.time() + 180
        while not (as_path(out) / name).exists():  # the first run holds the folder
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run(
            [*cmd, "--set", "shards.rows=256"], env=env, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another raypipe run: pid {first.pid}" in second.stderr
        _, err1 = first.communicate(timeout=600)
        assert first.returncode == 0, err1[-3000:]
        assert "status: complete" not in second.stdout
    finally:
        _kill(first)
    manifest = json.loads((as_path(out) / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["shards"]["rows"] == 128  # the first run's results alone
