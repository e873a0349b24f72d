"""Embed texts on a Ray Data actor pool (gene texts, cell sentences, cell-type texts).

Batch contract: in ``text`` (str); out ``text`` plus ``embedding`` (list of float32) and
``error`` (str, empty when fine). The backend (local / openai / vllm) is built once per actor
from the job config, so model loading and HTTP clients are per-actor, not per-batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.core.stage import check_contract
from raypipe.errors import RaypipeError

if TYPE_CHECKING:
    from raypipe.config import JobConfig

__all__ = ["LOCAL_BATCH", "THREADS_ENV", "EmbedTexts", "embed_texts", "release_text_actors"]

THREADS_ENV = "RAYPIPE_TORCH_THREADS"
"""Set by :class:`EmbedTexts` for the local backend: torch threads of this actor."""
LOCAL_BATCH = 512
"""Texts per call of a local CPU model's actor (texts are sorted by length across all batches
first, so batches pad no more than one big ``encode`` would; small batches move the progress bar)."""


class EmbedTexts:
    """Callable Ray Data stage holding one text-embedding backend."""

    def __init__(self, job_json: str, threads: int = 0) -> None:
        from raypipe.config import JobConfig
        from raypipe.llm.backends import build_embedder

        if threads > 0:  # before the backend loads its model
            os.environ[THREADS_ENV] = str(threads)
        self.embedder = build_embedder(JobConfig.model_validate(json.loads(job_json)))
        self._seen: dict[str, dict[str, int]] = {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Embed ``batch['text']``; per-item failures are reported in ``error``."""
        check_contract("EmbedTexts", dict.fromkeys(batch.columns), ("text",))
        texts = [str(t) for t in batch["text"]]
        out = batch.copy()
        res = self.embedder.embed_detailed(texts)
        emb, errors = res.vectors, [res.reasons.get(i, "") for i in range(len(texts))]
        out["embedding"] = list(np.asarray(emb, dtype=np.float32))
        out["error"] = [e or "" for e in errors]
        out["usage"] = [json.dumps(usage_delta(self.embedder, self._seen))] + ["{}"] * (
            len(texts) - 1
        )
        return out


def usage_delta(client: Any, seen: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Usage of ``client`` (calls, tokens, cache hits per model) since the last call; updates ``seen``.

    ``client`` is a :class:`~raypipe.llm.backends.TextEmbedder` or a generator (both have
    ``usage()``).
    """
    now = client.usage()
    delta = {
        model: {k: int(v) - int(seen.get(model, {}).get(k, 0)) for k, v in u.items()}
        for model, u in now.items()
    }
    seen.clear()
    seen.update({m: dict(u) for m, u in now.items()})
    return {m: u for m, u in delta.items() if any(u.values())}


_KEPT: dict[tuple[str, str], Any] = {}
"""Local-model actors kept for the rest of a run: (Ray job id, model settings) → handle."""


def _kept_actor(job: JobConfig, threads: int) -> Any:
    """Return the run's local-model actor for these settings, started on first use.

    A run embeds texts more than once (gene texts, then candidate texts, label mapping): one
    actor, one model load. It reserves no CPU while it waits (it runs only when nothing else
    does, using the threads it was given), so it never takes a slot from the shard stages; it
    is placed on the node with the most CPUs (never a CPU-less head node);
    :func:`release_text_actors` ends it with the run.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    key = (ray.get_runtime_context().get_job_id(), f"{job.text_model.model_dump_json()}|{threads}")
    if key not in _KEPT:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        where: Any = "DEFAULT"
        if nodes:
            best = max(nodes, key=lambda n: n["Resources"]["CPU"])
            where = NodeAffinitySchedulingStrategy(best["NodeID"], soft=True)
        _KEPT[key] = (
            ray.remote(_ReportingEmbedTexts)
            .options(num_cpus=0, max_restarts=1, max_task_retries=1, scheduling_strategy=where)
            .remote(job.model_dump_json(), threads)
        )
    return _KEPT[key]


def release_text_actors() -> None:
    """End the local-model actors kept by :func:`embed_texts` (called when a run ends)."""
    import ray

    while _KEPT:
        _key, actor = _KEPT.popitem()
        if ray.is_initialized():
            with suppress(Exception):  # already gone with its Ray session
                ray.kill(actor)


def _one_actor(frame: pd.DataFrame, job: JobConfig, threads: int, bs: int) -> Any:
    """Yield ``frame`` embedded in ``bs``-row batches by the run's local-model actor.

    A local CPU model runs as one actor using every CPU (see :func:`embed_texts`); a Ray Data
    pipeline around it only adds planning and a slower worker (measured in
    ``jobs/benchmark.py texts``). Every batch is queued at once: the actor works through
    them in order while the driver collects (and persists, ``on_batch``) the finished ones.
    """
    import ray
    from ray.exceptions import RayTaskError

    actor = _kept_actor(job, threads)
    try:
        pending = [actor.__call__.remote(frame.iloc[a : a + bs]) for a in range(0, len(frame), bs)]
        for ref in pending:
            yield ray.get(ref)
    except BaseException as exc:
        release_text_actors()  # a failed or dead actor is never reused
        if isinstance(exc, RayTaskError) and isinstance(exc.cause, RaypipeError):
            raise exc.cause from None  # e.g. a model that does not load: say so
        raise


class _ReportingEmbedTexts(EmbedTexts):
    """:class:`EmbedTexts` that raises its set-up error from its first call.

    A model that does not load then reaches the caller as the
    :class:`~raypipe.errors.RaypipeError` itself, not as Ray's "actor died" wrapper.
    """

    def __init__(self, job_json: str, threads: int = 0) -> None:
        self.init_error: RaypipeError | None = None
        try:
            super().__init__(job_json, threads)
        except RaypipeError as exc:
            self.init_error = exc

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """As :meth:`EmbedTexts.__call__`, after re-raising a set-up error."""
        if self.init_error is not None:
            raise self.init_error
        return super().__call__(batch)


def embed_texts(
    texts: list[str],
    job: JobConfig,
    *,
    actors: int | None = None,
    batch_size: int | None = None,
    on_batch: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = False,
    desc: str = "texts",
    cached: int = 0,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Embed unique ``texts`` through an actor pool; return ``(embeddings, errors, usage)`` in order.

    Parameters
    ----------
    texts
        Texts to embed (deduplicate before calling; order is kept).
    job
        The job config (text_model, limits, cache).
    actors
        Actor-pool size (default ``job.ray.actors`` for local models, ``job.limits.actors``
        for API backends).
    batch_size
        Texts per Ray Data batch (default: 8 × ``text_model.batch_size``; a local CPU model
        gets one actor on the free CPUs and :data:`LOCAL_BATCH`-text batches).
    on_batch
        Called with each finished batch (columns ``i``, ``text``, ``embedding``, ``error``) as
        it arrives, e.g. to persist it so an interrupted run keeps what was done.
    progress
        Draw a progress bar (``desc``) of texts done out of ``cached + len(texts)``, starting at
        ``cached`` (texts the caller found in a cache).
    """
    import ray
    from tqdm.auto import tqdm

    from raypipe.llm.backends import EMBEDDERS, embedder_resources
    from raypipe.llm.cost import CostMeter

    if not texts:
        return np.zeros((0, 0), dtype=np.float32), [], {}
    pool, gpus = embedder_resources(job)
    n_actors = max(1, min(actors or pool, len(texts)))
    bs = batch_size or 8 * job.text_model.batch_size
    threads = 0  # 0: the backend's own choice
    if not EMBEDDERS.capabilities(job.text_model.backend).remote and not gpus and actors is None:
        # a local model on CPU: one actor (one model load) whose torch uses every CPU of the
        # node (nothing else runs while texts are embedded), large batches (encode sorts each
        # by length): the speed of a plain encode() call. It reserves only ray.actor_cpus, so
        # it is always schedulable.
        threads = max(1, int(min(ray.cluster_resources().get("CPU", 1), os.cpu_count() or 1)))
        n_actors = 1
        bs = batch_size or LOCAL_BATCH
    frame = pd.DataFrame({"i": np.arange(len(texts)), "text": texts})
    batches = []
    if threads:  # one actor: called directly, batch after batch (no Ray Data pipeline)
        by_length = np.argsort([-len(t) for t in texts], kind="stable")
        batch_iter = _one_actor(frame.iloc[by_length], job, threads, bs)
    else:
        ds: Any = ray.data.from_pandas(frame)
        ds = ds.repartition(max(1, min(len(texts) // bs + 1, 4 * n_actors)))
        batch_iter = ds.map_batches(
            EmbedTexts,
            fn_constructor_kwargs={"job_json": job.model_dump_json(), "threads": threads},
            batch_size=bs,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
            num_cpus=job.ray.actor_cpus,
            num_gpus=gpus or None,
        ).iter_batches(batch_format="pandas", batch_size=None)
    bar = tqdm(
        total=cached + len(texts), initial=cached, unit="text", desc=desc, disable=not progress
    )
    with bar:
        for batch in batch_iter:
            batches.append(batch)
            if on_batch is not None:
                on_batch(batch)
            bar.update(len(batch))
    out = pd.concat(batches, ignore_index=True).sort_values("i")
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in out["embedding"]])
    meter = CostMeter()
    for u in out["usage"]:
        meter.merge(json.loads(u))
    return emb, [str(e) for e in out["error"]], meter.to_dict()
