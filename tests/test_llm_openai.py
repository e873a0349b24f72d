"""The openai backend against a real loopback HTTP server (tests/servers/openai_server.py)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from servers.openai_server import FakeOpenAI, Faults

from raypipe.config import load_config
from raypipe.embed.genept_s import cell_sentences, embed_sentences
from raypipe.errors import ConfigError
from raypipe.genes.llm_source import LLMTextSource
from raypipe.llm.cost import FailureShareExceeded
from raypipe.llm.generate import OpenAIChat
from raypipe.llm.openai_backend import OpenAIEmbedder
from raypipe.llm.ratelimit import get_limiter

pytestmark = pytest.mark.integration

KEY = "sk-test-TOPSECRET-0123456789"
GENES = [f"GENE{i}" for i in range(40)]
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


@pytest.fixture
def server():
    with FakeOpenAI(KEY, dim=16) as srv:
        yield srv


def make_job(tmp_path, srv, *, window_s=60.0, rpm=60_000, tpm=1e9, safety_s=0.05, **limits):
    job = load_config(
        {
            "input": {"path": "unused.h5ad"},
            "output_dir": str(tmp_path / "out"),
            "text_model": {
                "backend": "openai", "model": "fake-embed", "base_url": srv.base_url,
                "api_key_env": "RAYPIPE_TEST_KEY", "batch_size": 16,
            },
            "llm": {"backend": "openai", "model": "fake-chat", "base_url": srv.base_url,
                    "api_key_env": "RAYPIPE_TEST_KEY", "max_tokens": 50},
            "limits": {"requests_per_minute": rpm, "tokens_per_minute": tpm, "max_retries": 4,
                       "timeout_s": 2.0, **limits},
            "prices": {"fake-embed": {"input": 0.02}, "fake-chat": {"input": 0.15, "output": 0.6}},
        }
    )  # fmt: skip
    lim = get_limiter(
        srv.base_url,
        rpm,
        tpm,
        window_s=window_s,
        use_ray=False,
        breaker_cooldown_s=0.05,
        safety_s=safety_s,
    )
    return job, lim


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("RAYPIPE_TEST_KEY", KEY)


def describe(job, lim, genes, full_names=None):
    chat = OpenAIChat(job, limiter=lim, **FAST)
    src = LLMTextSource(job.genes, job, generator=chat, full_names=full_names or {})
    try:
        return src.texts(genes), src
    finally:
        chat.close()


def embed(job, lim, texts):
    emb = OpenAIEmbedder(job, limiter=lim, **FAST)
    try:
        return emb.embed(texts), emb
    finally:
        emb.close()


def test_each_gene_described_and_embedded_once_and_rerun_is_free(tmp_path, server):
    job, lim = make_job(tmp_path, server)
    genes = GENES + GENES[:5]  # duplicates are described once
    df, _ = describe(job, lim, genes, {"GENE1": "gene one"})
    assert sorted(df.symbol) == sorted(GENES)
    assert server.calls["/v1/chat/completions"] == len(GENES)
    assert set(server.served.values()) == {1}
    on_disk = pd.read_parquet(tmp_path / "out" / "genes" / "gene_texts.parquet")
    assert set(on_disk.columns) >= {"symbol", "text", "backend", "model", "prompt_version"}
    assert (on_disk.model == "fake-chat").all()
    assert (on_disk.prompt_version == "v1").all()
    assert "(gene one)" in on_disk.set_index("symbol").loc["GENE1", "prompt"]
    vecs, emb = embed(job, lim, list(df.text) + list(df.text[:3]))
    assert vecs.shape == (len(GENES) + 3, 16)
    assert server.calls["/v1/embeddings"] == 3  # 40 unique texts in batches of 16
    assert set(server.served.values()) == {1}
    usage = emb.usage()["fake-embed"]
    assert usage["items"] == len(GENES)
    assert usage["tokens_in"] > 0
    # second run: everything from the cache, zero calls
    server.reset_counters()
    df2, _ = describe(job, lim, genes, {"GENE1": "gene one"})
    vecs2, emb2 = embed(job, lim, list(df2.text) + list(df2.text[:3]))
    assert server.total_calls == 0, (server.calls, list(server.attempted))
    assert df2.cached.all()
    assert np.array_equal(vecs, vecs2)
    assert emb2.usage()["fake-embed"]["cache_hits"] == len(GENES)


def test_restart_pays_only_for_the_missing_half(tmp_path, server):
    job, lim = make_job(tmp_path, server)
    half = GENES[: len(GENES) // 2]
    df_half, _ = describe(job, lim, half)  # the "crashed" run got this far
    embed(job, lim, list(df_half.text))
    paid_first = server.tokens_charged
    df, _ = describe(job, lim, GENES)
    embed(job, lim, list(df.text))
    assert len(df) == len(GENES)
    assert set(server.served.values()) == {1}  # nothing was paid twice
    assert server.calls["/v1/chat/completions"] == len(GENES)
    assert 0.3 < paid_first / server.tokens_charged < 0.7


@pytest.mark.slow
def test_rate_limit_is_never_exceeded(tmp_path, server):
    # a scaled window: 8 requests and 200 tokens per 1 s window; no safety margin is needed
    # (a slot stays live until one window after its answer)
    server.rpm, server.tpm, server.window_s = 8, 200, 1.0
    job, lim = make_job(
        tmp_path, server, window_s=1.0, rpm=8 * 60, tpm=200 * 60, max_in_flight=8, safety_s=0.0
    )
    job.text_model.batch_size = 1
    df, _ = describe(job, lim, GENES[:10])  # chat books prompt + max_tokens (~80 tokens)
    vecs, _ = embed(job, lim, [f"text number {i}" for i in range(16)])
    assert len(df) == 10
    assert vecs.shape[0] == 16
    assert server.status[429] == 0
    assert server.max_requests_in_window(1.0) <= 8
    assert server.max_tokens_in_window(1.0) <= 200
    assert server.max_requests_in_window(1.0) >= 5  # and the budget is used


def test_retry_after_pauses_and_every_item_arrives(tmp_path, server):
    server.rpm, server.window_s = 5, 1.0  # the server is stricter than our budget
    job, lim = make_job(tmp_path, server, window_s=1.0, rpm=6000)
    job.text_model.batch_size = 2
    texts = [f"t{i}" for i in range(24)]
    vecs, emb = embed(job, lim, texts)
    assert server.status[429] > 0
    assert lim.state()["paused"] > 0
    assert np.abs(np.linalg.norm(vecs, axis=1) - 1).max() < 1e-5
    assert all(server.served[t] == 1 for t in texts)
    assert not emb.failures


def test_transient_faults_are_retried(tmp_path, server):
    server.faults = Faults(
        error_rate=0.15, drop_rate=0.05, malformed_rate=0.05, timeout_rate=0.03,
        timeout_sleep_s=1.5, seed=3,
    )  # fmt: skip
    server._rng = np.random.default_rng(3)
    job, lim = make_job(tmp_path, server, timeout_s=0.5, max_retries=8)
    job.text_model.batch_size = 4
    texts = [f"fault test {i}" for i in range(60)]
    vecs, emb = embed(job, lim, texts)
    assert not emb.failures
    assert sum(server.status[c] for c in (500,)) > 0
    assert all(server.served[t] == 1 for t in texts)
    assert vecs.shape == (60, 16)


def test_poison_items_fail_alone_and_the_share_rule(tmp_path, server):
    server.faults = Faults(fail_inputs={"BADGENE": "500", "REFUSER": "refuse", "POISON": "400"})
    job, lim = make_job(tmp_path, server, max_failure_share=0.05, max_retries=2)
    genes = [*GENES[:20], "BADGENE", "REFUSER"]
    with pytest.raises(FailureShareExceeded, match="2 of 22 gene descriptions"):
        describe(job, lim, genes)
    fails = pd.read_parquet(tmp_path / "out" / "genes" / "gene_text_failures.parquet")
    assert set(fails.symbol) == {"BADGENE", "REFUSER"}
    reasons = fails.set_index("symbol").reason
    assert "HTTP 500" in reasons["BADGENE"]
    assert reasons["REFUSER"] == "invalid answer: refusal"
    assert len(pd.read_parquet(tmp_path / "out" / "genes" / "gene_texts.parquet")) == 20
    # with a looser rule the run goes on; the good genes are not paid again
    server.reset_counters()
    job.limits.max_failure_share = 0.2
    df, src = describe(job, lim, genes)
    assert len(df) == 20
    assert len(src.failures) == 2
    # only the 2 bad genes are asked again: the refusal once, the 500s 1 + max_retries times
    assert server.calls["/v1/chat/completions"] == 1 + 3
    # embeddings: one poisoned input in a batch of 16 is isolated by bisection
    texts = [f"ok text {i}" for i in range(15)] + ["POISON text"]
    job.limits.max_failure_share = 0.1
    vecs, emb = embed(job, lim, texts)
    assert [f["item"] for f in emb.failures] == ["POISON text"]
    assert "HTTP 400" in emb.failures[0]["reason"]
    assert not vecs[15].any()
    assert np.linalg.norm(vecs[:15], axis=1).min() > 0.99


def test_genept_s_sentences_are_deduplicated_and_cached(tmp_path, server):
    job, lim = make_job(tmp_path, server)
    rng = np.random.default_rng(0)
    X = sp.random(30, 12, density=0.4, random_state=1, format="csr")
    X = sp.vstack([X, X[:10]]).tocsr()  # 10 duplicated cells
    symbols = np.array([f"G{i}" for i in range(12)])
    sents = cell_sentences(X, symbols, top_n=5)
    emb = OpenAIEmbedder(job, limiter=lim, **FAST)
    out, failed = embed_sentences(sents, emb)
    n_unique = len({s for s in sents if s})
    assert sum(server.served.values()) == n_unique
    assert np.array_equal(out[:10], out[30:])
    assert np.allclose(np.linalg.norm(out[~failed], axis=1), 1.0)
    assert failed.tolist() == [s == "" for s in sents]
    server.reset_counters()
    out2, _ = embed_sentences(sents, emb)
    emb.close()
    assert server.total_calls == 0
    assert np.array_equal(out, out2)
    assert rng is not None


def test_the_key_never_leaks(tmp_path, server, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    server.faults = Faults(fail_inputs={"BADGENE": "500"})
    job, lim = make_job(tmp_path, server, max_failure_share=0.5, max_retries=1)
    df, src = describe(job, lim, [*GENES[:4], "BADGENE"])
    _vecs, emb = embed(job, lim, list(df.text))
    texts = [repr(emb), repr(src.generator), str(src.failures)]
    # a wrong key: the whole run stops with an error that names the variable, not the value
    wrong = "sk-wrong-ANOTHERSECRET-987654321"
    monkeypatch.setenv("RAYPIPE_TEST_KEY", wrong)
    with pytest.raises(ConfigError, match="RAYPIPE_TEST_KEY") as exc:
        embed(job, lim, ["never embedded"])
    texts.append(str(exc.value))
    monkeypatch.delenv("RAYPIPE_TEST_KEY")
    with pytest.raises(ConfigError, match="RAYPIPE_TEST_KEY is not set") as exc2:
        embed(job, lim, ["x"])
    texts.append(str(exc2.value))
    out, err = capsys.readouterr()
    texts += [caplog.text, out, err]
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for secret in (KEY, wrong, "TOPSECRET", "ANOTHERSECRET"):
        assert not any(secret in t for t in texts)
        assert not any(secret.encode() in p.read_bytes() for p in files)


@pytest.mark.slow
def test_concurrent_clients_with_slow_server_never_exceed_the_budget(tmp_path, server):
    # 4 clients (each its own event loop thread) share one budget of 8 requests per 1 s window;
    # the server answers after 0.3 s, so requests are in flight across window edges. No safety
    # margin: a slot is live from grant until one window after its answer.
    import threading

    server.rpm, server.window_s, server.latency_s = 8, 1.0, 0.3
    job, lim = make_job(tmp_path, server, window_s=1.0, rpm=8 * 60, max_in_flight=8, safety_s=0.0)
    chats = [OpenAIChat(job, limiter=lim, **FAST) for _ in range(4)]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        prompts = [f"Describe the human gene CONC{i}_{j}: function." for j in range(7)]
        results[i] = chats[i].generate(prompts, version="v1")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for c in chats:
        c.close()
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.error is None for rs in results.values() for r in rs)
    assert server.calls["/v1/chat/completions"] == 28
    assert server.status[429] == 0
    assert server.max_requests_in_window(1.0) <= 8
    assert server.max_requests_in_window(1.0) >= 6  # and the budget is used
    assert lim.state()["in_flight"] == 0
