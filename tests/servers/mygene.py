"""A loopback HTTP server speaking the part of MyGene.info's v3 API raypipe uses.

``POST /query`` (form fields ``q`` comma-separated, ``scopes``, ``fields``, ``species``)
answers one JSON object per query term, in order, with ``"notfound": true`` for unknown
terms; ``GET /metadata`` answers ``{"build_version": ...}``. Every request is recorded, and
the first ``fail_first`` POSTs answer HTTP 503 (to exercise retries).
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["GENES", "MyGeneServer", "mygene_server"]

# A few real NCBI Gene records (name, summary abridged from NCBI Gene; Ensembl ids real).
GENES: dict[str, dict[str, Any]] = {
    "CD3E": {
        "_id": "916",
        "name": "CD3 epsilon subunit of T-cell receptor complex",
        "summary": "The protein encoded by this gene is the CD3-epsilon polypeptide, which "
        "together with CD3-gamma, -delta and -zeta, and the T-cell receptor alpha/beta and "
        "gamma/delta heterodimers, forms the T-cell receptor-CD3 complex.",
        "ensembl": {"gene": "ENSG00000198851"},
    },
    "MS4A1": {
        "_id": "931",
        "name": "membrane spanning 4-domains A1",
        "summary": "This gene encodes a member of the membrane-spanning 4A gene family. This "
        "gene encodes a B-lymphocyte surface molecule which plays a role in the development "
        "and differentiation of B-cells into plasma cells.",
        "ensembl": {"gene": "ENSG00000156738"},
    },
    "CD14": {
        "_id": "929",
        "name": "CD14 molecule",
        "summary": "This gene encodes a surface antigen that is preferentially expressed on "
        "monocytes/macrophages. It cooperates with other proteins to mediate the innate "
        "immune response to bacterial lipopolysaccharide.",
        "ensembl": [{"gene": "ENSG00000170458"}],
    },
    "NKG7": {
        "_id": "4818",
        "name": "natural killer cell granule protein 7",
        "ensembl": {"gene": "ENSG00000105374"},
    },
    "LYZ": {
        "_id": "4069",
        "name": "lysozyme",
        "summary": "This gene encodes human lysozyme, whose natural substrate is the bacterial "
        "cell wall peptidoglycan.",
        "ensembl": {"gene": "ENSG00000090382"},
    },
}


@dataclass
class MyGeneServer:
    """Handle on a running server: its base URL and what it received."""

    url: str
    posts: list[dict[str, str]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)
    fail_first: int = 0
    build_version: str = "20240101"


def _handler(state: MyGeneServer, genes: dict[str, dict[str, Any]]) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _send(self, code: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            state.gets.append(self.path)
            if self.path.rstrip("/").endswith("/metadata"):
                self._send(200, {"build_version": state.build_version})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if not self.path.rstrip("/").endswith("/query"):
                self._send(404, {"error": f"no route {self.path}"})
                return
            state.posts.append(form)
            if len(state.posts) <= state.fail_first:
                self._send(503, {"error": "try again"})
                return
            if form.get("species") != "human" or form.get("scopes") != "symbol":
                self._send(400, {"error": "raypipe asks for species=human, scopes=symbol"})
                return
            out = []
            for q in form.get("q", "").split(","):
                rec = genes.get(q.strip())
                if rec is None:
                    out.append({"query": q, "notfound": True})
                else:
                    out.append({"query": q, "symbol": q, "_score": 20.0, **rec})
            self._send(200, out)

    return Handler


@contextmanager
def mygene_server(
    genes: dict[str, dict[str, Any]] | None = None, *, fail_first: int = 0
) -> Iterator[MyGeneServer]:
    """Run the server on 127.0.0.1 (a free port) for the duration of the ``with`` block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    host, port = server.server_address[:2]
    state = MyGeneServer(url=f"http://{host}:{port}/v3", fail_first=fail_first)
    server.RequestHandlerClass = _handler(state, GENES if genes is None else genes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
