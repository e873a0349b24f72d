"""A real loopback HTTP server speaking OpenAI's ``/v1/embeddings`` and ``/v1/chat/completions``.

Used by the tests and by ``raypipe.bench.llm``. It binds 127.0.0.1 on a free port, checks the
Bearer key, enforces a requests/min and tokens/min budget over a sliding window (429 +
``Retry-After``), injects faults (500s, timeouts, dropped connections, malformed JSON, 400s) by
rate or for inputs containing given substrings, and counts every call and input.

Time can be scaled: ``window_s=2`` makes "per minute" budgets apply per 2 s window, so rate
tests take seconds.

Run it by hand (e.g. for ``configs/kang8k-openai-loopback.yaml``)::

    export RAYPIPE_LOOPBACK_KEY=sk-loopback-anything
    python tests/servers/openai_server.py --port 8765 --rpm 400 --window-s 10

It prints its counters (calls, HTTP statuses, most requests seen in any window) every
``--report-s`` seconds and when stopped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

__all__ = ["FakeOpenAI", "Faults", "fake_embedding", "fake_tokens", "main", "max_in_window"]


def fake_tokens(text: str) -> int:
    """Token count the fake service charges: one token per 4 UTF-8 bytes (at least 1)."""
    return max(1, math.ceil(len(text.encode()) / 4))


def fake_embedding(model: str, text: str, dim: int) -> np.ndarray:
    """Deterministic unit vector seeded by sha256(model, text)."""
    seed = int.from_bytes(hashlib.sha256(f"{model}\x00{text}".encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def max_in_window(times: list[float], weights: list[float], window: float) -> float:
    """Largest total weight of events inside any half-open window ``(t - window, t]``."""
    order = np.argsort(times, kind="stable")
    t = np.asarray(times)[order]
    w = np.asarray(weights, dtype=float)[order]
    best, lo, acc = 0.0, 0, 0.0
    for hi in range(len(t)):
        acc += w[hi]
        while t[lo] <= t[hi] - window:
            acc -= w[lo]
            lo += 1
        best = max(best, acc)
    return best


@dataclass
class Faults:
    """Faults to inject.

    ``*_rate`` are probabilities per request (seeded); ``fail_inputs`` maps a substring of an
    input (embedding text or chat message) to a mode that every request containing it gets:
    ``"500"``, ``"400"``, ``"timeout"``, ``"drop"``, ``"malformed"`` or ``"refuse"`` (chat
    answers with a refusal). ``fail_inputs_on`` restricts ``fail_inputs`` to requests whose
    path contains it (e.g. ``"embeddings"``; empty = every path).
    """

    error_rate: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    timeout_sleep_s: float = 3.0
    fail_inputs: dict[str, str] = field(default_factory=dict)
    fail_inputs_on: str = ""
    seed: int = 0


class FakeOpenAI:
    """The fake OpenAI service.

    Parameters
    ----------
    api_key
        The only Bearer key accepted.
    rpm, tpm
        Requests and tokens allowed per window (``None`` = unlimited).
    window_s
        Length of the budget window in seconds (60 = real per-minute budgets).
    dim
        Embedding size.
    latency_s
        Service time added to every request.
    faults
        Faults to inject.
    port
        TCP port on 127.0.0.1 (0 = a free one).
    chat_answer
        Scripted chat answers: ``chat_answer(prompt) -> str | None``; None falls back to the
        default gene description.
    """

    def __init__(
        self,
        api_key: str = "sk-loopback",
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        window_s: float = 60.0,
        dim: int = 32,
        latency_s: float = 0.0,
        faults: Faults | None = None,
        port: int = 0,
        chat_answer: Callable[[str], str | None] | None = None,
    ) -> None:
        self.api_key = api_key
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self.dim, self.latency_s = dim, latency_s
        self.faults = faults or Faults()
        self.port = port
        self.chat_answer = chat_answer
        self._rng = np.random.default_rng(self.faults.seed)
        self._lock = threading.Lock()
        self.reset_counters()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        """Forget every counted call."""
        with self._lock:
            self.calls: Counter[str] = Counter()  # by path
            self.status: Counter[int] = Counter()
            self.served: Counter[str] = Counter()  # inputs answered with 200
            self.attempted: Counter[str] = Counter()  # inputs in any request
            self.tokens_charged = 0
            self.arrivals: list[float] = []
            self.accepted: list[float] = []  # arrival times of requests answered 200
            self.arrival_tokens: list[float] = []
            self._acc_times: list[float] = []
            self._acc_tokens: list[float] = []

    @property
    def total_calls(self) -> int:
        """Every request received, whatever its answer."""
        return sum(self.calls.values())

    def max_requests_in_window(self, window_s: float | None = None) -> float:
        """Most requests received (accepted or not) in any sliding window."""
        with self._lock:
            times = list(self.arrivals)
        if not times:
            return 0.0
        return max_in_window(times, [1.0] * len(times), window_s or self.window_s)

    def max_tokens_in_window(self, window_s: float | None = None) -> float:
        """Most tokens received in any sliding window."""
        with self._lock:
            times, toks = list(self.arrivals), list(self.arrival_tokens)
        if not times:
            return 0.0
        return max_in_window(times, toks, window_s or self.window_s)

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        """Start serving in a daemon thread; returns self."""
        handler = type("Handler", (_Handler,), {"service": self})
        server_cls = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 512})
        self._httpd = server_cls(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ logic
    def admit(self, tokens: int) -> float | None:
        """Record an arrival; return seconds to wait if over budget, else None."""
        now = time.monotonic()
        with self._lock:
            self.arrivals.append(now)
            self.arrival_tokens.append(float(tokens))
            lo = now - self.window_s
            keep = [i for i, t in enumerate(self._acc_times) if t > lo]
            self._acc_times = [self._acc_times[i] for i in keep]
            self._acc_tokens = [self._acc_tokens[i] for i in keep]
            over_r = self.rpm is not None and len(self._acc_times) + 1 > self.rpm
            over_t = self.tpm is not None and sum(self._acc_tokens) + tokens > self.tpm
            if over_r or over_t:
                oldest = self._acc_times[0] if self._acc_times else now
                return max(0.001, oldest + self.window_s - now)
            self._acc_times.append(now)
            self._acc_tokens.append(float(tokens))
            return None

    def fault_for(self, inputs: list[str], path: str = "") -> str | None:
        """The fault this request gets, if any."""
        targeted = self.faults.fail_inputs_on in path
        for text in inputs if targeted else []:
            for needle, mode in self.faults.fail_inputs.items():
                if needle in text:
                    return mode
        f = self.faults
        with self._lock:
            r = float(self._rng.random())
        for mode, rate in (
            ("500", f.error_rate),
            ("timeout", f.timeout_rate),
            ("drop", f.drop_rate),
            ("malformed", f.malformed_rate),
        ):
            if r < rate:
                return mode
            r -= rate
        return None


def describe(symbol: str) -> str:
    """A deterministic made-up description of a gene (the fake chat model's answer)."""
    h = hashlib.sha256(symbol.encode()).hexdigest()
    pathways = ["immune signalling", "cell cycle", "RNA processing", "lipid metabolism"]
    cells = ["T cells", "B cells", "monocytes", "NK cells", "hepatocytes", "neurons"]
    p, c = pathways[int(h[0], 16) % 4], cells[int(h[1], 16) % 6]
    return (
        f"{symbol} is a human protein-coding gene involved in {p}. It is expressed mainly in "
        f"{c}, where its product takes part in {p} and related pathways (id {h[:12]})."
    )


class _Handler(BaseHTTPRequestHandler):
    service: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        return

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        if code == 200:
            with self.service._lock:
                self.service.accepted.append(time.monotonic())
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.service.status[code] += 1

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": {"message": message, "type": "fake", "code": code}})
        self._send(code, body.encode(), headers)

    def do_POST(self) -> None:
        svc = self.service
        path = self.path.rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with svc._lock:
            svc.calls[path] += 1
        if self.headers.get("Authorization", "") != f"Bearer {svc.api_key}":
            self._error(401, "Incorrect API key provided.")
            return
        try:
            req = json.loads(raw)
        except ValueError:
            self._error(400, "request body is not JSON")
            return
        if path.endswith("/embeddings"):
            inputs = req.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        elif path.endswith("/chat/completions"):
            inputs = [str(m.get("content", "")) for m in req.get("messages", [])]
        else:
            self._error(404, f"no route {path}")
            return
        tokens = sum(fake_tokens(t) for t in inputs)
        if path.endswith("/chat/completions"):
            tokens += int(req.get("max_tokens") or req.get("max_completion_tokens") or 0)
        with svc._lock:
            for t in inputs:
                svc.attempted[t] += 1
        wait = svc.admit(tokens)
        if wait is not None:
            self._error(
                429,
                "Rate limit reached; please retry.",
                {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000))},
            )
            return
        if svc.latency_s:
            time.sleep(svc.latency_s)
        fault = svc.fault_for(inputs, path)
        if fault in ("500", "400"):
            self._error(int(fault), "injected failure")
            return
        if fault == "timeout":
            time.sleep(svc.faults.timeout_sleep_s)
            self.close_connection = True
            return
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "malformed":
            self._send(200, b'{"object": "list", "data": [{"embedding": [0.1, ')
            return
        model = str(req.get("model", ""))
        if path.endswith("/embeddings"):
            body = self._embeddings(model, inputs, req.get("encoding_format") or "float")
        else:
            body = self._chat(model, req, inputs, refuse=fault == "refuse")
        self._send(200, json.dumps(body).encode())

    def _embeddings(self, model: str, inputs: list[str], fmt: str) -> dict[str, Any]:
        svc = self.service
        data = []
        for i, text in enumerate(inputs):
            v = fake_embedding(model, text, svc.dim)
            emb: Any = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        toks = sum(fake_tokens(t) for t in inputs)
        with svc._lock:
            for t in inputs:
                svc.served[t] += 1
            svc.tokens_charged += toks
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": toks, "total_tokens": toks},
        }

    def _chat(self, model: str, req: dict[str, Any], inputs: list[str], refuse: bool) -> dict:
        svc = self.service
        prompt = inputs[-1] if inputs else ""
        m = re.search(r"gene\s+(\S+)", prompt)
        symbol = m.group(1) if m else "UNKNOWN"
        scripted = svc.chat_answer(prompt) if svc.chat_answer is not None else None
        if refuse:
            text = "I'm sorry, but as an AI I cannot help with that."
        else:
            text = scripted if scripted is not None else describe(symbol)
        pt = sum(fake_tokens(t) for t in inputs)
        ct = fake_tokens(text)
        with svc._lock:
            for t in inputs:
                svc.served[t] += 1
            svc.tokens_charged += pt + ct
        return {
            "id": "chatcmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:16],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }


def _stats(srv: FakeOpenAI) -> dict[str, Any]:
    return {
        "calls": dict(srv.calls),
        "status": {str(k): v for k, v in srv.status.items()},
        "tokens_charged": srv.tokens_charged,
        "max_requests_in_any_window": srv.max_requests_in_window(),
        "budget_per_window": srv.rpm,
        "window_s": srv.window_s,
        "inputs_served_more_than_once": sum(1 for v in srv.served.values() if v > 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (the key comes from ``$RAYPIPE_LOOPBACK_KEY``)."""
    import argparse
    import os
    import signal

    p = argparse.ArgumentParser(description="loopback fake OpenAI server (tests only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--rpm", type=float, default=None, help="requests per window")
    p.add_argument("--tpm", type=float, default=None, help="tokens per window")
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--report-s", type=float, default=10.0)
    args = p.parse_args(argv)
    key = os.environ.get("RAYPIPE_LOOPBACK_KEY", "")
    if not key:
        print("set RAYPIPE_LOOPBACK_KEY (the only key the server accepts)")
        return 2
    srv = FakeOpenAI(
        key, rpm=args.rpm, tpm=args.tpm, window_s=args.window_s, dim=args.dim, port=args.port
    ).start()
    print(f"serving {srv.base_url}", flush=True)

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # background jobs ignore SIGINT: report on TERM too
    try:
        while True:
            time.sleep(args.report_s)
            print(json.dumps(_stats(srv)), flush=True)
    except KeyboardInterrupt:
        print(json.dumps(_stats(srv)), flush=True)
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
