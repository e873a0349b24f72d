"""Unit tests of the LLM plumbing that need no server: budget, cache, cost, sentences, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from raypipe.embed.genept_s import cell_sentences, embed_sentences
from raypipe.errors import ConfigError, InputError
from raypipe.genes.llm_source import render_prompt, validate_description
from raypipe.llm.backends import EmbedderBase
from raypipe.llm.cache import LLMCache, cache_key, prune, stats
from raypipe.llm.cost import CostMeter, FailureShareExceeded, check_failure_share, estimate
from raypipe.llm.ratelimit import WindowBudget, redact


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_window_budget_slot_lives_until_completion_plus_window():
    clock = FakeClock()
    b = WindowBudget(5, 1e9, window_s=1.0, safety_s=0.0, clock=clock)
    slots = [b.reserve(1) for _ in range(5)]
    assert [s[1] for s in slots] == ["ok"] * 5
    wait, status, slot = b.reserve(1)
    # all 5 are in flight: nothing can free before now + window
    assert (status, slot) == ("wait", -1)
    assert wait == pytest.approx(1.0)
    clock.t = 3.0  # a slow answer: still in flight, the budget stays full
    assert b.reserve(1)[1] == "wait"
    b.release(slots[0][2])  # finished at t=3: live until t=4
    clock.t = 3.5
    wait, status, _ = b.reserve(1)
    assert status == "wait"
    assert wait == pytest.approx(0.5)
    clock.t = 4.0
    assert b.reserve(1)[1] == "ok"
    assert b.state()["live"] == 5


def test_window_budget_simulated_arrivals_never_exceed_budget():
    # random latencies between grant and arrival and between arrival and completion: every
    # window of arrivals holds at most the budget, and the budget is used
    rng = np.random.default_rng(0)
    clock = FakeClock()
    b = WindowBudget(10, 1e9, window_s=1.0, safety_s=0.0, clock=clock)
    events = []  # (time, kind, slot)
    arrivals = []
    pending = 0
    t = 0.0
    while len(arrivals) < 200:
        # ask as often as possible
        while True:
            wait, status, slot = b.reserve(1)
            if status != "ok":
                break
            arrive = t + rng.uniform(0, 0.5)
            events.append((arrive + rng.uniform(0, 0.5), "done", slot))
            arrivals.append(arrive)
            pending += 1
        events.sort()
        nxt = min([t + wait] + [e[0] for e in events[:1]])
        t = clock.t = nxt
        while events and events[0][0] <= t:
            b.release(events.pop(0)[2])
    arr = np.sort(np.array(arrivals))
    worst = max(((arr >= x) & (arr < x + 1.0)).sum() for x in arr)
    assert worst <= 10
    assert worst >= 8


def test_window_budget_tokens_pause_and_oversized_request():
    clock = FakeClock()
    b = WindowBudget(100, 10, window_s=1.0, safety_s=0.0, clock=clock)
    wait, status, s1 = b.reserve(6)
    assert (wait, status) == (0.0, "ok")
    assert b.reserve(6)[1] == "wait"  # 12 > 10 tokens
    b.release(s1)
    clock.t = 1.0
    _, status, s2 = b.reserve(6)
    assert status == "ok"
    b.release(s2)
    clock.t = 2.0
    _, status, s3 = b.reserve(50)  # clamped to the whole budget
    assert status == "ok"
    assert b.state()["live_tokens"] == 10
    b.release(s3)
    b.pause(5.0)
    wait, status, _ = b.reserve(0)
    assert status == "wait"
    assert wait >= 5.0


def test_window_budget_leaked_slot_expires_after_its_lease():
    clock = FakeClock()
    b = WindowBudget(1, 1e9, window_s=1.0, safety_s=0.0, clock=clock)
    assert b.reserve(0, lease_s=2.0)[1] == "ok"  # its client dies: never released
    clock.t = 2.5
    assert b.reserve(0)[1] == "wait"
    clock.t = 3.0
    assert b.reserve(0)[1] == "ok"
    assert b.state()["leaked"] == 1


def test_circuit_breaker_opens_probes_and_closes():
    clock = FakeClock()
    b = WindowBudget(1000, 1e9, breaker_failures=3, breaker_cooldown_s=2.0, clock=clock)
    for _ in range(3):
        b.report(False)
    wait, status, _ = b.reserve()
    assert status == "open"
    assert wait == pytest.approx(2.0)
    clock.t = 2.1
    _, status, probe = b.reserve()
    assert status == "ok"  # the probe
    assert b.reserve()[1] == "probing"  # others wait for it
    b.release(probe, False)  # probe failed: open again, cooldown doubled
    assert b.reserve() == (pytest.approx(4.0), "open", -1)
    clock.t = 6.2
    _, status, probe = b.reserve()
    assert status == "ok"
    b.release(probe, True)
    assert b.state()["circuit"] == "closed"
    assert b.reserve()[1] == "ok"


def test_redact_removes_keys():
    s = redact("Incorrect API key provided: sk-abc123XYZ; Bearer tok3n", ("tok3n",))
    assert "sk-abc123XYZ" not in s
    assert "tok3n" not in s


def test_cache_roundtrip_flush_and_cross_instance(tmp_path):
    c = LLMCache(tmp_path, flush_rows=3, flush_every_s=1e9)
    keys = [cache_key("openai", "m", "embed", "v1", f"t{i}") for i in range(7)]
    for i, k in enumerate(keys):
        c.put(k, backend="openai", model="m", kind="embed", version="v1", vec=np.full(4, i))
    assert len(list(tmp_path.glob("seg-*.parquet"))) == 2  # two flushes of 3, one pending
    other = LLMCache(tmp_path)
    assert len(other.get_many(keys)) == 6
    c.flush()
    other.refresh()
    got = other.get_many(keys)
    assert len(got) == 7
    assert np.array_equal(got[keys[6]].vec, np.full(4, 6, np.float32))
    c.put("chat1", backend="openai", model="g", kind="chat", version="v1", text="hello")
    c.flush()
    st = stats(tmp_path)
    assert st["entries"] == 8
    assert {(r["model"], r["kind"]) for r in st["by_model_kind"]} == {("m", "embed"), ("g", "chat")}
    out = prune(tmp_path, model="g")
    assert out["removed"] == 1
    assert stats(tmp_path)["entries"] == 7
    assert stats(tmp_path)["files"] == 1
    other.refresh()  # files were merged away: the index is rebuilt
    assert len(other.get_many(keys)) == 7
    assert other.get_many(["chat1"]) == {}


def test_cache_key_depends_on_every_part():
    base = ("openai", "m", "embed", "v1", "text")
    k = cache_key(*base)
    for i in range(5):
        parts = list(base)
        parts[i] = parts[i] + "x"
        assert cache_key(*parts) != k
    assert cache_key(*base, {"dimensions": 8}) != k


def test_cost_meter_and_estimate():
    m = CostMeter()
    m.add_call("emb", items=10, tokens_in=1000)
    m.add_hits("emb", 5)
    other = CostMeter()
    other.add_call("emb", items=1, tokens_in=1_000_000, tokens_out=0)
    m.merge(other.to_dict())
    (row,) = m.summary({"emb": {"input": 0.02, "output": 0.0}})
    assert row["calls"] == 2
    assert row["cache_hits"] == 5
    assert row["cost_usd"] == pytest.approx(1_001_000 * 0.02 / 1e6)
    est = estimate(
        ["abc"] * 100, model="emb", prices={}, requests_per_minute=10, tokens_per_minute=1e9,
        items_per_call=10,
    )  # fmt: skip
    assert est.calls == 10
    assert est.cost_usd is None
    assert est.time_s == pytest.approx(60.0)
    check_failure_share(1, 100, 0.01, "x")
    with pytest.raises(FailureShareExceeded, match="2 of 100"):
        check_failure_share(2, 100, 0.01, "x")


def test_cell_sentences_order_ties_zeros_and_topn():
    # row 0: tie 2.0 → column order B before D; row 1: empty; row 2: a stored zero at B
    data = np.array([2.0, 1.0, 2.0, 5.0, 0.0, 3.0])
    indices = np.array([1, 2, 3, 0, 1, 4])
    X = sp.csr_matrix((data, indices, np.array([0, 3, 3, 6])), shape=(3, 5))
    assert X.nnz == 6  # the explicit zero is stored
    syms = np.array(["A", "B", "C", "D", "E"])
    assert cell_sentences(X, syms, top_n=2) == ["B D", "", "A E"]
    assert cell_sentences(X.toarray(), syms, top_n=10) == ["B D C", "", "A E"]
    with pytest.raises(InputError, match="symbols"):
        cell_sentences(X, syms[:3], top_n=2)


def test_embed_sentences_dedups_and_normalises():
    class Counting(EmbedderBase):
        def __init__(self):
            super().__init__()
            self.calls: list[list[str]] = []

        def embed(self, texts):
            self.calls.append(list(texts))
            return np.arange(len(texts) * 3, dtype=np.float32).reshape(-1, 3) + 1

    emb = Counting()
    out, failed = embed_sentences(["a b", "", "a b", "c"], emb)
    assert emb.calls == [["a b", "c"]]
    assert failed.tolist() == [False, True, False, False]
    assert np.allclose(np.linalg.norm(out[[0, 2, 3]], axis=1), 1.0)
    assert not out[1].any()
    assert np.array_equal(out[0], out[2])


def test_prompts_and_validation():
    p = render_prompt("v1", "CD3E", "CD3 epsilon subunit of T-cell receptor complex")
    assert p.startswith("Describe the human gene CD3E (CD3 epsilon")
    assert render_prompt("v1", "CD3E") == (
        "Describe the human gene CD3E: function, pathways, cell types where it is expressed."
    )
    with pytest.raises(ConfigError, match="v1"):
        render_prompt("v9", "CD3E")
    good = "CD3E encodes the epsilon chain of the CD3 complex, expressed in T cells."
    assert validate_description(good) is None
    assert validate_description("  ") == "empty answer"
    assert "too short" in validate_description("CD3E gene.")
    assert validate_description("I'm sorry, but I can't help with information on that gene.") == (
        "refusal"
    )
    assert validate_description("As an AI language model, I do not know " + "x" * 50) == "refusal"
    assert "too long" in validate_description("x" * 7000)


def test_cache_cli_stats_and_prune(tmp_path, capsys):
    import argparse

    from raypipe.llm.cli import add_cache_parser

    c = LLMCache(tmp_path)
    for i in range(5):
        kind = "chat" if i < 2 else "embed"
        c.put(f"k{i}", backend="openai", model="m", kind=kind, version="v1", text="x", tokens_in=2)
    c.flush()
    parser = argparse.ArgumentParser()
    add_cache_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache", "stats", str(tmp_path)])
    assert args.func(args) == 0
    assert "5 entries" in capsys.readouterr().out
    args = parser.parse_args(["cache", "prune", str(tmp_path), "--kind", "chat"])
    assert args.func(args) == 0
    assert "removed 2 of 5" in capsys.readouterr().out
    assert stats(tmp_path)["entries"] == 3
    args = parser.parse_args(["cache", "stats", str(tmp_path / "nope")])
    with pytest.raises(InputError, match="does not exist"):
        args.func(args)
