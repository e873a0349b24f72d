"""Gene-text embedding benchmark: the Ray actor path vs plain ``SentenceTransformer.encode``.

Takes the orgdb (GO) texts of the Kang 2018 genes (the texts a real run embeds), then, side by
side on this machine:

* **plain**: ``SentenceTransformer(...).encode(texts)`` in this process, torch threads = CPUs
  (model load timed apart);
* **raypipe actor**: the ``local`` backend (:class:`raypipe.llm.local.LocalEmbedder`) inside a
  1-CPU Ray actor with the threads the text stage gives it, its ``embed`` call timed alone;
* **raypipe**: :func:`raypipe.llm.text_stage.embed_texts` on a local Ray with the job's
  settings, end to end (actor start and model load included, as in a run),

and prints texts/s of each, their ratios to plain and the largest difference between the
vectors::

    python jobs/benchmark.py texts [--limit 0]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from raypipe.bench.scale import SOURCE

__all__ = ["gene_texts", "main"]


def gene_texts(limit: int = 0) -> list[str]:
    """Return the unique orgdb texts of the Kang 2018 genes (sorted), at most ``limit`` (0 = all)."""
    import anndata as ad

    from raypipe.config import load_config
    from raypipe.genes.sources import build_text_source

    var = ad.read_h5ad(SOURCE, backed="r").var_names.tolist()
    job = load_config(
        {
            "input": {"path": str(SOURCE)},
            "output_dir": "/tmp/raypipe-bench-texts",
            "genes": {"text_source": "orgdb"},
        }
    )
    table = build_text_source(job.genes, job).texts(var, [None] * len(var))
    texts = sorted({str(t) for t in table["text"] if isinstance(t, str) and t})
    return texts[:limit] if limit else texts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print plain vs Ray texts/s; return the figures."""
    import ray
    import torch
    from sentence_transformers import SentenceTransformer

    from raypipe.config import load_config
    from raypipe.core.execute import init_ray
    from raypipe.llm.local import resolve_local_model
    from raypipe.llm.text_stage import embed_texts, release_text_actors

    p = argparse.ArgumentParser(prog="benchmark.py texts", description=__doc__)
    p.add_argument("--limit", type=int, default=0, help="texts to embed (0 = all)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    texts = gene_texts(args.limit)
    lengths = [len(t) for t in texts]
    print(f"{len(texts)} gene texts, {np.mean(lengths):.0f} characters on average")
    job = load_config(
        {
            "input": {"path": str(SOURCE)},
            "text_model": {"backend": "local", "model": "all-MiniLM-L6-v2"},
            "ray": {"num_cpus": args.cpus},
            "output_dir": "/tmp/raypipe-bench-texts",
        }
    )
    torch.set_num_threads(args.cpus)
    t = time.perf_counter()
    model = SentenceTransformer(resolve_local_model(job.text_model.model), device="cpu")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    plain = model.encode(texts, batch_size=job.text_model.batch_size, convert_to_numpy=True)
    plain_s = time.perf_counter() - t
    init_ray(job.ray)

    @ray.remote(num_cpus=job.ray.actor_cpus)
    class _Backend:  # the text stage's backend, as its actor holds it
        def __init__(self, threads: int) -> None:
            from raypipe.llm.backends import build_embedder
            from raypipe.llm.text_stage import THREADS_ENV

            os.environ[THREADS_ENV] = str(threads)
            self.embedder = build_embedder(job)
            self.embedder.embed(texts[:8])

        def timed(self) -> tuple[float, np.ndarray]:
            t = time.perf_counter()
            emb = self.embedder.embed(texts)
            return time.perf_counter() - t, emb

    backend = _Backend.remote(args.cpus)  # type: ignore[attr-defined]
    actor_s, actor_emb = ray.get(backend.timed.remote())
    ray.kill(backend)
    embed_texts(texts[:8], job)  # Ray warm-up; the actor it kept ends, so the timed call
    release_text_actors()  # starts and loads its own, as a run's first texts do
    t = time.perf_counter()
    emb, errors, _ = embed_texts(texts, job)
    ray_s = time.perf_counter() - t
    ray.shutdown()
    n = len(texts)
    out = {
        "texts": n,
        "plain_load_s": load_s,
        "plain_encode_s": plain_s,
        "raypipe_s": ray_s,
        "actor_encode_s": actor_s,
        "actor_ratio": plain_s / actor_s,
        "ratio": plain_s / ray_s,
        "max_abs_diff": float(
            max(np.abs(np.asarray(plain) - emb).max(), np.abs(np.asarray(plain) - actor_emb).max())
        ),
        "errors": sum(bool(e) for e in errors),
    }
    print(
        f"plain encode   {plain_s:7.2f} s  {n / plain_s:8.1f} texts/s  (+ model load {load_s:.1f} s)"
    )
    print(
        f"raypipe actor  {actor_s:7.2f} s  {n / actor_s:8.1f} texts/s  (the backend's embed call)"
    )
    print(f"raypipe (Ray)  {ray_s:7.2f} s  {n / ray_s:8.1f} texts/s  (actor start + load included)")
    print(
        f"speed / plain: actor {out['actor_ratio']:.2f}×, end to end {out['ratio']:.2f}×  "
        f"(back to back on this machine); max |Δ| {out['max_abs_diff']:.1e}"
    )
    return out
