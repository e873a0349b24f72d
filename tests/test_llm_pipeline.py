"""The LLM issue's done-criterion, end to end: ``run_job`` with LLM gene texts and OpenAI embeddings.

A small atlas made from real data (the first 300 cells and the 200 most-detected genes of
Kang 8k) is run through ``raypipe.orchestrate.runner.run_job`` with ``genes.text_source: llm``,
``llm.backend: openai`` and ``text_model.backend: openai``, both pointed at the loopback fake
OpenAI server, computing GenePT-w and GenePT-s under a scaled-down rate limit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from data_factory import read_embeddings
from servers.openai_server import FakeOpenAI, Faults

from raypipe.config import load_config
from raypipe.genes.llm_source import load_full_names
from raypipe.llm.cost import FailureShareExceeded
from raypipe.orchestrate.runner import run_job

pytestmark = pytest.mark.integration

KEY = "sk-e2e-PIPELINESECRET-4242424242"
KEY_ENV = "RAYPIPE_E2E_OPENAI_KEY"
N_CELLS, N_GENES = 300, 200
WINDOW_S = 2.0
RPW = 40  # requests per 2 s window (1,200 per scaled "minute")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, kang8k: Path):
    # the key must be in the environment before Ray starts: local workers inherit it
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        object_store_memory=1 << 30,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    root = tmp_path_factory.mktemp("llm_pipeline")
    full = ad.read_h5ad(kang8k)
    cells = full[:N_CELLS]
    detected = np.asarray((cells.X > 0).sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-detected, kind="stable")[:N_GENES])
    small = cells[:, keep].copy()
    h5 = root / "kang_small.h5ad"
    small.write_h5ad(h5)
    yield SimpleNamespace(root=root, h5=h5, adata=small, orgdb=kang8k.parents[1] / "genes")
    ray.shutdown()
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old


def _job(env, srv: FakeOpenAI, out: Path, **over):
    data = {
        "input": {"path": str(env.h5), "rows_per_chunk": 64},
        "output_dir": str(out),
        "shards": {"rows": 100},
        "genes": {
            "text_source": "llm",
            "orgdb": str(env.orgdb / "orgHs_gene_text_go.tsv.gz"),
            "min_coverage": 0.5,
        },
        "text_model": {
            "backend": "openai", "model": "fake-embed", "base_url": srv.base_url,
            "api_key_env": KEY_ENV, "batch_size": 32,
        },
        "llm": {"backend": "openai", "model": "fake-chat", "base_url": srv.base_url,
                "api_key_env": KEY_ENV, "max_tokens": 60},
        "embed": {"methods": ["genept_w", "genept_s"], "genept_w": {"hvg": None},
                  "genept_s": {"top_n": 50}},
        "limits": {
            "requests_per_minute": RPW * 60 / WINDOW_S, "tokens_per_minute": 1e9,
            "window_s": WINDOW_S, "max_in_flight": 8, "actors": 1, "timeout_s": 10,
            "max_retries": 4, "backoff_base_s": 0.05, "backoff_max_s": 0.5,
            "breaker_cooldown_s": 0.2,
        },
        "prices": {"fake-chat": {"input": 0.15, "output": 0.6}, "fake-embed": {"input": 0.02}},
        "ray": {"address": "local", "actors": 1, "actor_cpus": 0.5},
    }  # fmt: skip
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values}
    return load_config(data)


def _no_secret_anywhere(out: Path, texts: list[str]) -> None:
    import ray

    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files += [p for p in logs.rglob("*") if p.is_file()]
    for secret in (KEY, "PIPELINESECRET"):
        assert not any(secret in t for t in texts)
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked


@pytest.mark.slow
def test_llm_texts_openai_embeddings_genept_w_and_s_rate_limited_and_free_rerun(
    env, tmp_path, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    with FakeOpenAI(KEY, rpm=RPW, window_s=WINDOW_S, dim=32) as srv:
        summary = run_job(_job(env, srv, out), progress=False)
        texts = pd.read_parquet(out / "genes" / "gene_texts.parquet")
        # every gene described exactly once (no failures, no retries, no duplicates)
        assert len(texts) == N_GENES
        assert texts.symbol.is_unique
        assert srv.calls["/v1/chat/completions"] == N_GENES
        assert all(srv.served[p] == 1 for p in texts.prompt)
        assert {"backend", "model", "prompt_version", "created_at", "prompt"} <= set(texts)
        assert (texts.model == "fake-chat").all()
        assert (texts.prompt_version == "v1").all()
        assert texts.created_at.notna().all()
        # full names from the orgdb table reach the prompt
        names = load_full_names(env.orgdb / "orgHs_gene_text_go.tsv.gz")
        named = [s for s in texts.symbol if s in names]
        assert len(named) > 0.9 * N_GENES
        prompts = texts.set_index("symbol").prompt
        assert all(
            prompts[s].startswith(f"Describe the human gene {s} ({names[s]})") for s in named
        )
        # every description and every cell sentence embedded once
        embedded = [t for t, n in srv.served.items() if t not in set(texts.prompt)]
        assert all(srv.served[t] == 1 for t in embedded)
        assert set(texts.text) <= set(embedded)
        # the rate: never more than the budget in any window, and no 429
        assert srv.status[429] == 0
        assert srv.max_requests_in_window(WINDOW_S) <= RPW
        first_calls = srv.total_calls

        obs = list(env.adata.obs_names)
        for method in ("genept_w", "genept_s"):
            df = read_embeddings(out, method)
            assert list(df.obs_name) == obs
            norms = np.linalg.norm(np.stack(df.embedding.to_numpy()), axis=1)
            assert np.allclose(norms, 1.0, atol=1e-4)
        assert summary.shards_done == {"genept_w": 3, "genept_s": 3}
        assert not (out / "failures.parquet").exists()

        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        usage = {r["model"]: r for r in manifest["llm_usage"]}
        assert usage["fake-chat"]["calls"] == N_GENES
        assert usage["fake-chat"]["tokens_in"] > 0
        assert usage["fake-chat"]["tokens_out"] > 0
        assert usage["fake-embed"]["calls"] == srv.calls["/v1/embeddings"]
        assert usage["fake-embed"]["items"] == len(embedded)
        assert usage["fake-chat"]["tokens_in"] + usage["fake-embed"]["tokens_in"] + usage[
            "fake-chat"
        ]["tokens_out"] == pytest.approx(srv.tokens_charged)
        chat = usage["fake-chat"]
        assert chat["cost_usd"] == pytest.approx(
            (chat["tokens_in"] * 0.15 + chat["tokens_out"] * 0.6) / 1e6
        )
        assert "fake-chat: 200 calls" in summary.render()
        print(summary.render())

        # a second run: zero new calls
        srv.reset_counters()
        again = run_job(_job(env, srv, out), progress=False)
        assert srv.total_calls == 0
        assert again.shards_skipped == {"genept_w": 3, "genept_s": 3}
        # a fresh output folder that shares the cache: zero calls too (content-addressed)
        fresh = tmp_path / "fresh"
        third = run_job(_job(env, srv, fresh, cache={"path": str(out / "cache")}), progress=False)
        assert srv.total_calls == 0
        assert third.shards_done == {"genept_w": 3, "genept_s": 3}
        for method in ("genept_w", "genept_s"):
            a, b = read_embeddings(out, method), read_embeddings(fresh, method)
            assert np.array_equal(np.stack(a.embedding), np.stack(b.embedding))
        hits = {r["model"]: r for r in json.loads((fresh / "manifest.json").read_text())[
            "llm_usage"]}  # fmt: skip
        assert hits["fake-chat"]["calls"] == 0
        assert hits["fake-chat"]["cache_hits"] == N_GENES
    assert first_calls > N_GENES
    captured = capfd.readouterr()
    _no_secret_anywhere(out, [caplog.text, captured.out, captured.err])
    _no_secret_anywhere(fresh, [])


@pytest.mark.slow
def test_a_gene_that_always_fails_is_recorded_and_the_run_succeeds(env, tmp_path):
    bad = "IL7R" if "IL7R" in env.adata.var_names else str(env.adata.var_names[5])
    out = tmp_path / "run"
    faults = Faults(fail_inputs={f"gene {bad} (": "500", f"gene {bad}:": "500"},
                    fail_inputs_on="chat")  # fmt: skip
    with FakeOpenAI(KEY, dim=32, faults=faults) as srv:
        job = _job(env, srv, out, embed={"methods": ["genept_w"]},
                   limits={"requests_per_minute": 60_000, "window_s": 60.0})  # fmt: skip
        summary = run_job(job, progress=False)
        tries = sum(n for t, n in srv.attempted.items() if f"gene {bad} " in t)
    assert tries == 1 + job.limits.max_retries
    fails = pd.read_parquet(out / "failures.parquet")
    row = fails[fails.symbol == bad]
    assert len(row) == 1
    assert "HTTP 500" in row.reason.iloc[0]
    assert row.stage.iloc[0] == "describe"
    texts = pd.read_parquet(out / "genes" / "gene_texts.parquet")
    assert bad not in set(texts.symbol)
    assert len(texts) == N_GENES - 1
    assert len(read_embeddings(out, "genept_w")) == N_CELLS
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert any("failures.parquet" in w for w in summary.warnings)


@pytest.mark.slow
def test_many_failed_cell_sentences_fail_the_run_with_a_clear_message(env, tmp_path):
    names = [str(n) for n in env.adata.var_names]
    x = env.adata.X
    detected = np.asarray((x > 0).mean(axis=0)).ravel()
    # a gene in 20-60% of cells whose symbol is no substring of another symbol
    needle = next(
        n
        for i, n in enumerate(names)
        if 0.2 < detected[i] < 0.6 and len(n) >= 4 and not any(n in m for m in names if m != n)
    )
    expected = int((np.asarray(x[:, names.index(needle)].todense()).ravel() > 0).sum())
    out = tmp_path / "run"
    faults = Faults(fail_inputs={needle: "400"}, fail_inputs_on="embeddings")
    with FakeOpenAI(KEY, dim=32, faults=faults) as srv:
        # top_n covers every gene: a cell's sentence holds the needle iff it expresses it
        job = _job(env, srv, out, embed={"methods": ["genept_s"], "genept_s": {"top_n": 500}},
                   limits={"requests_per_minute": 60_000, "window_s": 60.0,
                           "max_failure_share": 0.05})  # fmt: skip
        with pytest.raises(FailureShareExceeded) as exc:
            run_job(job, progress=False)
    msg = str(exc.value)
    assert f"{expected:,} of {N_CELLS:,} cells" in msg
    assert "GenePT-s" in msg
    assert "limits.max_failure_share" in msg
    assert "failures.parquet" in msg
    fails = pd.read_parquet(out / "failures.parquet")
    cells = fails[fails.stage == "genept_s"]
    assert len(cells) == expected
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    # the good cells are complete
    df = read_embeddings(out, "genept_s")
    ok = np.linalg.norm(np.stack(df.embedding.to_numpy()), axis=1) > 0
    assert ok.sum() == N_CELLS - expected
