"""Benchmark: LLM client actors against the loopback OpenAI server under a shared budget.

``python -m raypipe.bench.llm`` (from the repository root: it imports the test server from
``tests/servers``). Time is scaled by ``--time-scale``: with the default 3, a "minute" lasts
20 s, so a 600 requests/min budget means 600 requests per 20 s window (30/s) and the bench
finishes in about three minutes on 2 cores. Reported figures:

* throughput share: chat requests answered in the first ``--windows`` windows divided by
  ``windows × rpm`` (the most a sliding-window budget allows), with 1, 2 and 4 Ray actors
  sharing one named limiter; plus lost items (must be 0) and the worst window seen by the server;
* describe + embed wall time for ``--genes`` genes, extrapolated to 20,000 genes at real time
  (each gene is one chat call, so 20,000 genes need ≥ 20,000 / rpm minutes whatever the
  number of actors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["LLMWorker", "main", "run_throughput"]

KEY_ENV = "RAYPIPE_BENCH_KEY"
KEY = "sk-bench-loopback"


class LLMWorker:
    """One LLM client actor: a chat and an embedding client on the shared named limiter.

    Parameters
    ----------
    job_json
        ``JobConfig.model_dump_json()``.
    window_s
        Budget window (60 s real time; shorter when time is scaled).
    safety_s
        Extra time a finished request's slot stays live (default:
        :func:`~raypipe.llm.ratelimit.get_limiter`'s).
    """

    def __init__(
        self, job_json: str, window_s: float = 60.0, safety_s: float | None = None
    ) -> None:
        from raypipe.config import JobConfig
        from raypipe.llm.generate import OpenAIChat
        from raypipe.llm.openai_backend import OpenAIEmbedder
        from raypipe.llm.ratelimit import get_limiter

        job = JobConfig.model_validate_json(job_json)
        lim = job.limits
        extra: dict[str, Any] = {} if safety_s is None else {"safety_s": safety_s}
        limiter = get_limiter(
            job.llm.base_url,
            lim.requests_per_minute,
            lim.tokens_per_minute,
            window_s=window_s,
            use_ray=True,
            **extra,
        )
        kw: dict[str, Any] = {"limiter": limiter, "window_s": window_s}
        self.chat = OpenAIChat(job, **kw)
        self.embedder = OpenAIEmbedder(job, **kw)

    def describe(self, symbols: list[str]) -> int:
        """Describe genes; return how many succeeded."""
        from raypipe.genes.llm_source import render_prompt, validate_description

        prompts = [render_prompt("v1", s) for s in symbols]
        res = self.chat.generate(prompts, version="v1", validate=validate_description)
        return sum(r.error is None for r in res)

    def describe_texts(self, symbols: list[str]) -> list[str]:
        """Describe genes; return the answers ('' where failed)."""
        from raypipe.genes.llm_source import render_prompt, validate_description

        prompts = [render_prompt("v1", s) for s in symbols]
        res = self.chat.generate(prompts, version="v1", validate=validate_description)
        return [r.text or "" if r.error is None else "" for r in res]

    def embed(self, texts: list[str]) -> int:
        """Embed texts; return how many succeeded."""
        return int(self.embedder.embed_detailed(texts).ok.sum())

    def usage(self) -> dict[str, Any]:
        """Token/call counts of both clients."""
        return {"chat": self.chat.usage(), "embed": self.embedder.usage()}

    def close(self) -> None:
        """Flush caches and close clients."""
        self.chat.close()
        self.embedder.close()


def _job(base_url: str, out: str, rpm: float, tpm: float, in_flight: int) -> Any:
    from raypipe.config import load_config

    return load_config(
        {
            "input": {"path": "unused.h5ad"},
            "output_dir": out,
            "text_model": {"backend": "openai", "model": "bench-embed", "base_url": base_url,
                           "api_key_env": KEY_ENV, "batch_size": 256},
            "llm": {"backend": "openai", "model": "bench-chat", "base_url": base_url,
                    "api_key_env": KEY_ENV, "max_tokens": 200},
            "limits": {"requests_per_minute": rpm, "tokens_per_minute": tpm,
                       "max_in_flight": in_flight, "timeout_s": 30},
        }
    )  # fmt: skip


def _split(items: list[str], n: int) -> list[list[str]]:
    return [items[i::n] for i in range(n)]


def _workers(ray: Any, job: Any, n: int, window_s: float) -> list[Any]:
    cls = ray.remote(num_cpus=0.25, runtime_env={"env_vars": {KEY_ENV: KEY}})(LLMWorker)
    return [cls.remote(job.model_dump_json(), window_s) for _ in range(n)]


def _stop(ray: Any, ws: list[Any]) -> None:
    ray.get([w.close.remote() for w in ws])
    for w in ws:
        ray.kill(w)


def _map(ray: Any, ws: list[Any], method: str, items: list[str]) -> list[Any]:
    parts = _split(items, len(ws))
    return ray.get([getattr(w, method).remote(p) for w, p in zip(ws, parts, strict=True)])


def run_throughput(
    ray: Any, server_cls: Any, *, actors: int, rpm: float, window_s: float, windows: int
) -> dict[str, Any]:
    """Saturate the budget with ``actors`` actors; return share, lost items, worst window."""
    n_items = int(rpm * windows + rpm * 0.25)
    srv = server_cls(KEY, rpm=rpm, tpm=None, window_s=window_s, dim=64)
    with srv, tempfile.TemporaryDirectory() as out:
        # the limiter scales per-minute budgets by window_s / 60: rpm requests per window
        job = _job(srv.base_url, out, rpm * 60 / window_s, 1e12, in_flight=64)
        ws = _workers(ray, job, actors, window_s)
        genes = [f"TPUT{actors}_{i}" for i in range(n_items)]
        t0 = time.perf_counter()
        ok = sum(_map(ray, ws, "describe", genes))
        wall = time.perf_counter() - t0
        _stop(ray, ws)
    acc = sorted(srv.accepted)
    in_k = sum(1 for t in acc if t - acc[0] < windows * window_s) if acc else 0
    return {
        "actors": actors,
        "items": n_items,
        "ok": ok,
        "lost": n_items - ok,
        "served_once": all(v == 1 for v in srv.served.values()),
        "share_of_budget": in_k / (windows * rpm),
        "max_requests_in_any_window": srv.max_requests_in_window(window_s),
        "http_429": srv.status[429],
        "wall_s": wall,
    }


def run_genes(
    ray: Any, server_cls: Any, *, n_genes: int, actors: int, rpm: float, tpm: float,
    window_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Describe then embed ``n_genes`` genes; return the wall times."""
    srv = server_cls(KEY, rpm=rpm, tpm=tpm * window_s / 60, window_s=window_s, dim=1536)
    with srv, tempfile.TemporaryDirectory() as out:
        job = _job(srv.base_url, out, rpm * 60 / window_s, tpm, in_flight=64)
        ws = _workers(ray, job, actors, window_s)
        genes = [f"BENCH{i}" for i in range(n_genes)]
        t0 = time.perf_counter()
        texts = [t for part in _map(ray, ws, "describe_texts", genes) for t in part if t]
        t1 = time.perf_counter()
        ok = sum(_map(ray, ws, "embed", texts))
        t2 = time.perf_counter()
        _stop(ray, ws)
    return {
        "genes": n_genes,
        "described": len(texts),
        "embedded": ok,
        "describe_s": t1 - t0,
        "embed_s": t2 - t1,
        "chat_calls": srv.calls["/v1/chat/completions"],
        "embed_calls": srv.calls["/v1/embeddings"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures (JSON with ``--json``)."""
    p = argparse.ArgumentParser(prog="python -m raypipe.bench.llm", description=__doc__)
    p.add_argument("--rpm", type=float, default=600, help="requests per (scaled) minute")
    p.add_argument("--tpm", type=float, default=1_000_000, help="tokens per (scaled) minute")
    p.add_argument("--time-scale", type=float, default=3.0, help="1 = real time")
    p.add_argument("--windows", type=int, default=2, help="windows measured per actor count")
    p.add_argument("--actors", default="1,2,4")
    p.add_argument("--genes", type=int, default=500, help="genes described+embedded (measured)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "tests"))
    import ray
    from servers.openai_server import FakeOpenAI

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only local cluster
    ray.init(
        num_cpus=os.cpu_count() or 2,
        object_store_memory=1 << 30,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    window_s = 60.0 / args.time_scale
    rows = []
    for a in args.actors.split(","):
        r = run_throughput(
            ray, FakeOpenAI, actors=int(a), rpm=args.rpm, window_s=window_s, windows=args.windows
        )
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    g = run_genes(
        ray, FakeOpenAI, n_genes=args.genes, actors=max(int(a) for a in args.actors.split(",")),
        rpm=args.rpm, tpm=args.tpm, window_s=window_s,
    )  # fmt: skip
    ray.shutdown()
    real = args.time_scale * 20_000 / args.genes
    g["extrapolated_20k_real_time_min"] = (g["describe_s"] + g["embed_s"]) * real / 60
    g["lower_bound_20k_min"] = 20_000 / args.rpm
    if args.json:
        print(json.dumps({"throughput": rows, "genes": g}, indent=2))
        return 0
    print(
        f"budget {args.rpm:.0f} requests/min; time scaled x{args.time_scale:g} "
        f"(window {window_s:g} s), {args.windows} windows per run"
    )
    for r in rows:
        print(
            f"  {r['actors']} actor(s): {r['share_of_budget']:.1%} of budget, "
            f"{r['lost']} lost of {r['items']}, each served once: {r['served_once']}, "
            f"max {r['max_requests_in_any_window']:.0f} requests in any window, "
            f"{r['http_429']} HTTP 429"
        )
    print(
        f"describe+embed {g['genes']} genes ({g['described']} described, {g['embedded']} "
        f"embedded; {g['chat_calls']} chat + {g['embed_calls']} embedding calls): "
        f"{g['describe_s']:.1f} s + {g['embed_s']:.1f} s scaled"
    )
    print(
        f"  → 20,000 genes at real time ≈ {g['extrapolated_20k_real_time_min']:.1f} min "
        f"(extrapolated linearly; the rpm budget alone needs ≥ {g['lower_bound_20k_min']:.1f} min)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
