"""Bounded waits, visible (issue 20, item 3): no endpoint can make a run hang in silence.

- an LLM endpoint that answers 500 to every request stops the step after
  ``limits.failure_budget`` failures in a row, naming the endpoint and the last error; the
  failed requests are counted in the usage line;
- a frozen S3 server (SIGSTOP) fails the run within ``max_attempts x (connect + read)``
  per request, naming the endpoint; the manifest never says ``complete``;
- a run with no progress says what it waits for (the watchdog).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from data_factory import GENES, job_dict, write_gene_table
from servers.openai_server import FakeOpenAI, Faults
from servers.s3 import moto_env, s3_env

from raypipe.config import load_config
from raypipe.core.watchdog import Watchdog
from raypipe.llm.cost import CostMeter

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "RAYPIPE_TEST_BOUNDED_KEY"


@pytest.fixture(scope="module")
def small(kang1k5, tmp_path_factory):
    full = ad.read_h5ad(kang1k5)
    genes = [g for g in GENES if g in full.var_names]
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, 200, replace=False))
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    full[rows, genes].copy().write_h5ad(path)
    return path


@pytest.mark.slow
def test_always_500_llm_fails_the_run_within_the_budget(ray_local, small, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-loopback")
    from raypipe.llm.ratelimit import EndpointFailing
    from raypipe.orchestrate.runner import run_job

    with FakeOpenAI("sk-loopback", faults=Faults(error_rate=1.0)) as srv:
        url = srv.base_url
        cfg = load_config(
            job_dict(
                small,
                tmp_path / "run",
                write_gene_table(tmp_path / "genes.tsv"),
                input={"path": str(small), "label_key": "cluster_id", "rows_per_chunk": 64},
                llm={"model": "fake-chat", "base_url": srv.base_url, "api_key_env": KEY_ENV},
                # the defaults but the budget (12) and the time scale of the backoffs
                limits={"failure_budget": 6, "backoff_base_s": 0.05, "breaker_cooldown_s": 0.2},
                annotate={"enabled": True, "llm_markers": True, "smoothing": 0.0},
                embed={"genept_w": {"hvg": None}},  # test only: no HVG pre-pass, for speed
            )
        )
        t0 = time.perf_counter()
        with pytest.raises(EndpointFailing) as info:
            run_job(cfg, progress=False)
        took = time.perf_counter() - t0
        sent = srv.calls["/v1/chat/completions"]
    msg = str(info.value)
    assert url in msg
    assert "failed 6 requests in a row" in msg
    assert "last error: HTTP 500" in msg
    assert 6 <= sent <= 6 + 8  # the budget, plus requests already in flight
    assert took < 120, took
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert url in manifest["error"]


def test_always_500_llm_client_stops_after_the_budget(tmp_path, monkeypatch):
    """The chat client itself: 5 candidates' prompts, every request 500 → one clear error."""
    monkeypatch.setenv(KEY_ENV, "sk-loopback")
    from raypipe.llm.generate import OpenAIChat
    from raypipe.llm.ratelimit import EndpointFailing

    with FakeOpenAI("sk-loopback", faults=Faults(error_rate=1.0)) as srv:
        url = srv.base_url
        job = load_config(
            job_dict(
                tmp_path / "x.h5ad",
                tmp_path / "run",
                tmp_path / "genes.tsv",
                llm={"model": "fake-chat", "base_url": url, "api_key_env": KEY_ENV},
                limits={"failure_budget": 5, "backoff_base_s": 0.05, "breaker_cooldown_s": 0.2},
            )
        )
        chat = OpenAIChat(job)
        t0 = time.perf_counter()
        try:
            with pytest.raises(EndpointFailing, match="failed 5 requests in a row") as info:
                chat.generate([f"markers of cell type {i}" for i in range(5)], version="t")
        finally:
            chat.close()
        took = time.perf_counter() - t0
        sent = srv.calls["/v1/chat/completions"]
    assert url in str(info.value)
    assert "last error: HTTP 500" in str(info.value)
    assert 5 <= sent <= 5 + 8  # the budget, plus requests already in flight
    assert took < 30, took
    assert chat.usage()["fake-chat"]["failed_calls"] >= 5


def test_failure_budget_counts_only_failures_that_say_the_endpoint_is_down():
    from raypipe.llm.ratelimit import EndpointFailing, FailureBudget

    counted: list[int] = []
    b = FailureBudget(3, "the endpoint http://x/v1", on_failure=lambda: counted.append(1))
    b.failed("HTTP 500")
    b.failed("HTTP 500")
    b.failed("HTTP 400", endpoint_down=False)  # it answered about one input: it is up
    b.failed("HTTP 500")
    b.ok()
    b.failed("HTTP 500")
    b.failed("HTTP 503")
    with pytest.raises(EndpointFailing, match=r"failed 3 requests in a row .*last error: timeout"):
        b.failed("timeout")
    assert (b.sent, b.failed_total, len(counted)) == (8, 7, 7)


def test_failed_requests_are_counted_in_the_usage_line(tmp_path, monkeypatch):
    """One prompt the endpoint always fails: its requests are counted, not hidden as 0 calls."""
    monkeypatch.setenv(KEY_ENV, "sk-loopback")
    from raypipe.llm.generate import OpenAIChat

    with FakeOpenAI("sk-loopback", faults=Faults(fail_inputs={"POISON": "500"})) as srv:
        job = load_config(
            job_dict(
                tmp_path / "x.h5ad",
                tmp_path / "run",
                tmp_path / "genes.tsv",
                llm={"model": "fake-chat", "base_url": srv.base_url, "api_key_env": KEY_ENV},
                limits={"max_retries": 2, "backoff_base_s": 0.01, "breaker_cooldown_s": 0.1},
            )
        )
        chat = OpenAIChat(job)
        try:
            out = chat.generate(["hello", "POISON please"], version="t")
        finally:
            chat.close()
    assert out[0].error is None
    assert out[1].error == "HTTP 500 after 3 attempts"
    usage = chat.usage()["fake-chat"]
    assert usage["calls"] == 1
    assert usage["failed_calls"] == 3
    assert "1 calls (3 more sent and failed)" in CostMeter().merge(chat.usage()).format()


def test_watchdog_says_what_the_run_waits_for():
    said: list[str] = []
    with Watchdog(0.3, say=said.append) as dog:
        dog.activity("genept_w: 2 of 13 shards still running on Ray actors")
        time.sleep(1.0)
    assert said, "nothing said after 1 s without progress"
    assert said[0].startswith("no progress for 0.")
    assert "s: waiting for genept_w: 2 of 13 shards still running on Ray actors" in said[0]
    assert "watchdog.stall_s = 0.3 s" in said[0]
    n = len(said)
    time.sleep(0.5)
    assert len(said) == n  # stopped with the run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_s3_fails_within_the_bound_naming_the_endpoint(kang1k5, tmp_path):
    """SIGSTOP the S3 server mid-run: the run ends within the configured bound, naming it."""
    from raypipe.core import storage

    with moto_env("runs") as server:
        env = {**os.environ, **s3_env(server.endpoint), "PYTHONPATH": str(ROOT)}
        fs = storage.open_fs("s3")
        cfg = {
            "input": {"path": str(kang1k5), "rows_per_chunk": 128},
            "output_dir": "s3://runs/frozen",
            "cache": {"path": str(tmp_path / "cache")},
            "shards": {"rows": 128},
            "genes": {"text_source": "symbol"},
            "storage": {"connect_timeout_s": 2, "read_timeout_s": 3, "max_attempts": 2},
            "lease": {"heartbeat_s": 2, "stale_after_s": 60},
            "watchdog": {"stall_s": 5},
            "ray": {"num_cpus": 2, "actors": 1, "actor_cpus": 0.5},
        }
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = subprocess.Popen(
            [sys.executable, "-m", "raypipe", "run", str(path), "--no-progress"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            while not fs.exists("runs/frozen/state/genept_w"):  # shards being written
                assert run.poll() is None, run.communicate()[1][-3000:]
                assert time.time() < deadline
                time.sleep(0.2)
            os.kill(server.proc.pid, signal.SIGSTOP)
            t0 = time.time()
            out, err = run.communicate(timeout=400)
            took = time.time() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            os.kill(server.proc.pid, signal.SIGCONT)
        assert run.returncode != 0
        assert server.endpoint in err, err[-3000:]
        assert "storage.read_timeout_s=3 s" in err
        assert took < 240, took  # every request is bounded (and retried a bounded time)
        assert "status: complete" not in out
        storage.reset()
        manifest = json.loads(storage.open_fs("s3").cat_file("runs/frozen/manifest.json"))
        assert manifest["status"] != "complete"
