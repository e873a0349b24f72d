"""Ray actors share one named limiter (the server never sees more than the budget); a local
text model runs in one actor."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from servers.openai_server import FakeOpenAI

from raypipe.bench.llm import KEY, LLMWorker, _job
from raypipe.llm.ratelimit import limiter_name

pytestmark = pytest.mark.integration


def test_two_actors_share_one_budget(ray_local):
    ray = ray_local
    # 6 requests per 1 s window for both actors together (each alone would send 6); no
    # safety margin: a slot stays live until one window after its answer
    with FakeOpenAI(KEY, rpm=6, window_s=1.0) as srv, tempfile.TemporaryDirectory() as out:
        job = _job(srv.base_url, out, rpm=6 * 60, tpm=1e9, in_flight=8)
        cls = ray.remote(num_cpus=0.5, runtime_env={"env_vars": {"RAYPIPE_BENCH_KEY": KEY}})(
            LLMWorker
        )
        workers = [cls.remote(job.model_dump_json(), 1.0, 0.0) for _ in range(2)]
        genes = [[f"RAYA{i}" for i in range(12)], [f"RAYB{i}" for i in range(12)]]
        done = ray.get([w.describe.remote(g) for w, g in zip(workers, genes, strict=True)])
        assert done == [12, 12]
        # one named limiter actor for the endpoint, found by both workers
        assert ray.get_actor(limiter_name(srv.base_url), namespace="raypipe") is not None
        ray.get([w.close.remote() for w in workers])
        for w in workers:
            ray.kill(w)
    assert srv.status[429] == 0
    assert srv.max_requests_in_window(1.0) <= 6
    assert set(srv.served.values()) == {1}
    assert len(srv.served) == 24


@pytest.mark.slow
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


@pytest.mark.slow
def test_local_model_embeds_in_one_actor_and_a_model_that_fails_to_load_says_so(
    ray_local, tmp_path
):
    from sentence_transformers import SentenceTransformer

    from raypipe.config import load_config
    from raypipe.errors import ConfigError
    from raypipe.llm.local import resolve_local_model
    from raypipe.llm.text_stage import embed_texts

    def job(model: str):
        return load_config(
            {
                "input": {"path": str(tmp_path / "x.h5ad")},
                "output_dir": str(tmp_path / "out"),
                "text_model": {"backend": "local", "model": model},
                "ray": {"num_cpus": 2},
            }
        )

    texts = ["CD14 is a monocyte marker.", "MS4A1 encodes CD20.", "short"]
    seen = []
    emb, errors, usage = embed_texts(
        texts, job("all-MiniLM-L6-v2"), batch_size=2, on_batch=seen.append
    )
    plain = SentenceTransformer(resolve_local_model("all-MiniLM-L6-v2"), device="cpu").encode(texts)
    np.testing.assert_allclose(emb, plain, atol=1e-5)
    assert errors == ["", "", ""]
    assert usage == {}
    assert [len(b) for b in seen] == [2, 1]  # batch by batch, in order
    with pytest.raises(ConfigError, match=r"cannot load text_model\.model"):
        embed_texts(texts, job(str(tmp_path / "no-such-model")))
