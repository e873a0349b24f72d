"""vLLM backends in Ray actors (GPU only; skipped without CUDA, vllm or a local model).

Set ``RAYPIPE_VLLM_EMBED_MODEL`` / ``RAYPIPE_VLLM_CHAT_MODEL`` to local model folders (small
ones, e.g. an e5-small / Qwen2.5-0.5B-Instruct copy) to run them.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from raypipe.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

if importlib.util.find_spec("vllm") is None:  # cheap check before any fixture starts Ray
    pytest.skip("vllm is not installed (pip install raypipe[vllm])", allow_module_level=True)


def _need(env: str) -> str:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("vllm")
    path = os.environ.get(env)
    if not path or not os.path.isdir(path):
        pytest.skip(f"set {env} to a local model folder")
    return path


def _job(tmp_path, **sections):
    return load_config({"input": {"path": "x.h5ad"}, "output_dir": str(tmp_path), **sections})


def test_vllm_embedder_embeds_and_caches(tmp_path, ray_local):
    from raypipe.llm.vllm_backend import VLLMEmbedder

    model = _need("RAYPIPE_VLLM_EMBED_MODEL")
    job = _job(tmp_path, text_model={"backend": "vllm", "model": model, "num_gpus": 1})
    emb = VLLMEmbedder(job, actors=1)
    texts = ["CD3E T cell receptor", "CD19 B cell marker", "CD3E T cell receptor"]
    v = emb.embed(texts)
    assert v.shape[0] == 3
    assert v.dtype == np.float32
    assert np.array_equal(v[0], v[2])
    assert emb.meter.to_dict()[model]["items"] == 2
    v2 = emb.embed(texts)
    assert np.allclose(v, v2)
    assert emb.meter.to_dict()[model]["cache_hits"] == 2
    emb.close()


def test_vllm_generator_describes_a_gene(tmp_path, ray_local):
    from raypipe.genes.llm_source import render_prompt
    from raypipe.llm.vllm_backend import VLLMGenerator

    model = _need("RAYPIPE_VLLM_CHAT_MODEL")
    job = _job(tmp_path, llm={"backend": "vllm", "model": model, "max_tokens": 64})
    gen = VLLMGenerator(job, actors=1)
    (res,) = gen.generate([render_prompt("v1", "CD3E")], version="v1")
    assert res.error is None
    assert len(res.text) > 10
    assert res.tokens_out > 0
    gen.close()
