"""Ray actors share one named limiter: the server never sees more than the budget."""

from __future__ import annotations

import tempfile

import pytest
from servers.openai_server import FakeOpenAI

from raypipe.bench.llm import KEY, LLMWorker, _job
from raypipe.llm.ratelimit import limiter_name

pytestmark = pytest.mark.integration


def test_two_actors_share_one_budget(ray_local):
    ray = ray_local
    # 6 requests per 2 s window for both actors together (each alone would send 6); no
    # safety margin: a slot stays live until one window after its answer
    with FakeOpenAI(KEY, rpm=6, window_s=2.0) as srv, tempfile.TemporaryDirectory() as out:
        job = _job(srv.base_url, out, rpm=6 * 30, tpm=1e9, in_flight=8)
        cls = ray.remote(num_cpus=0.5, runtime_env={"env_vars": {"RAYPIPE_BENCH_KEY": KEY}})(
            LLMWorker
        )
        workers = [cls.remote(job.model_dump_json(), 2.0, 0.0) for _ in range(2)]
        genes = [[f"RAYA{i}" for i in range(12)], [f"RAYB{i}" for i in range(12)]]
        done = ray.get([w.describe.remote(g) for w, g in zip(workers, genes, strict=True)])
        assert done == [12, 12]
        # one named limiter actor for the endpoint, found by both workers
        assert ray.get_actor(limiter_name(srv.base_url), namespace="raypipe") is not None
        ray.get([w.close.remote() for w in workers])
        for w in workers:
            ray.kill(w)
    assert srv.status[429] == 0
    assert srv.max_requests_in_window(2.0) <= 6
    assert set(srv.served.values()) == {1}
    assert len(srv.served) == 24


def test_many_actors_with_server_latency_never_exceed_the_budget(ray_local):
    # 3 actors x 8 in flight against a budget of 8 requests per 1.5 s window; the server takes
    # 0.4 s per answer and the machine is loaded: grant-to-arrival delays vary. No safety margin.
    ray = ray_local
    with (
        FakeOpenAI(KEY, rpm=8, window_s=1.5, latency_s=0.4) as srv,
        tempfile.TemporaryDirectory() as out,
    ):
        job = _job(srv.base_url, out, rpm=8 * 40, tpm=1e9, in_flight=8)
        cls = ray.remote(num_cpus=0.25, runtime_env={"env_vars": {"RAYPIPE_BENCH_KEY": KEY}})(
            LLMWorker
        )
        workers = [cls.remote(job.model_dump_json(), 1.5, 0.0) for _ in range(3)]
        genes = [[f"LAT{a}_{i}" for i in range(10)] for a in range(3)]
        done = ray.get([w.describe.remote(g) for w, g in zip(workers, genes, strict=True)])
        ray.get([w.close.remote() for w in workers])
        for w in workers:
            ray.kill(w)
        ray.kill(ray.get_actor(limiter_name(srv.base_url), namespace="raypipe"))
    assert done == [10, 10, 10]
    assert srv.status[429] == 0
    assert srv.max_requests_in_window(1.5) <= 8
    assert set(srv.served.values()) == {1}
