"""LLM marker genes end to end against the loopback OpenAI server (scripted answers)."""

from __future__ import annotations

import os
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from data_factory import GENES, job_dict, write_gene_table
from servers.openai_server import FakeOpenAI

from raypipe.config import load_config
from raypipe.orchestrate.runner import run_job

pytestmark = pytest.mark.integration

KEY_ENV = "RAYPIPE_TEST_MARKER_KEY"
ANSWERS = {
    "B cell": "MS4A1, CD79A, CD19",
    "CD14-positive monocyte": "CD14, LYZ, S100A8.",
    "CD4-positive, alpha-beta T cell": "CD3E, CD4, IL7R",
    "CD8-positive, alpha-beta T cell": "CD8A, CD8B, CD3E",
    "CD14-positive, CD16-positive monocyte": "FCGR3A, MS4A7, LST1",
}


@pytest.fixture(scope="module")
def small(kang1k5, tmp_path_factory):
    full = ad.read_h5ad(kang1k5)
    genes = [g for g in GENES if g in full.var_names]
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, 300, replace=False))
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    full[rows, genes].copy().write_h5ad(path)
    return path


def _answer(bad: str | None):
    def answer(prompt: str) -> str | None:
        m = re.search(r"cell type '([^']+)'", prompt)
        if m is None:
            return None
        name = m.group(1)
        if name == bad:
            return "NOTAGENE1, FAKEGENE2"  # a list, but of no real gene
        return ANSWERS.get(name, "FCGR3A, CD14, LYZ")  # any other mapped monocyte term

    return answer


def _cfg(small, tmp_path, srv):
    table = write_gene_table(tmp_path / "genes.tsv")
    return load_config(
        job_dict(
            small,
            tmp_path / "run",
            table,
            input={"path": str(small), "label_key": "cluster_id", "rows_per_chunk": 64},
            llm={
                "backend": "openai",
                "model": "fake-chat",
                "base_url": srv.base_url,
                "api_key_env": KEY_ENV,
                "max_tokens": 60,
            },
            limits={"max_retries": 1, "backoff_base_s": 0.01, "timeout_s": 10, "actors": 1},
            prices={"fake-chat": {"input": 0.15, "output": 0.6}},
            annotate={
                "enabled": True,
                "llm_markers": True,
                "tissue": "blood",
                "scorers": {"markers": 1.0},
                "smoothing": 0.0,
            },
        )
    )


@pytest.mark.slow
def test_llm_markers_asked_once_cached_and_bad_answers_fail_loudly(ray_local, small, tmp_path):
    os.environ[KEY_ENV] = "sk-loopback"
    with FakeOpenAI("sk-loopback", chat_answer=_answer(None)) as srv:
        cfg = _cfg(small, tmp_path, srv)
        summary = run_job(cfg, progress=False)
        mapping = pd.read_parquet(tmp_path / "run" / "annotations" / "label_mapping.parquet")
        n = len(mapping)
        chats = srv.calls["/v1/chat/completions"]
        assert chats == n  # every candidate asked exactly once
        prompts = [p for p in srv.served if "canonical positive marker genes" in p]
        assert len(prompts) == n
        assert all("human blood" in p for p in prompts)
        assert set(mapping["marker_source"]) == {"llm"}
        b = mapping.set_index("label").loc["B cells"]
        assert set(b["markers"]) == {"MS4A1", "CD79A", "CD19"} & set(ad.read_h5ad(small).var_names)
        assert set(b["marker_sources"]) == {"llm"}
        assert "llm" in summary.llm or "fake-chat" in summary.llm

        srv.reset_counters()
        run_job(cfg, progress=False)
        assert srv.calls["/v1/chat/completions"] == 0  # the re-run is served from the cache

    bad_name = "CD14-positive monocyte"
    with FakeOpenAI("sk-loopback", chat_answer=_answer(bad_name)) as srv:
        cfg = _cfg(small, tmp_path / "bad", srv)
        summary = run_job(cfg, progress=False)
        out = tmp_path / "bad" / "run"
        fails = pd.read_parquet(out / "failures.parquet")
        row = fails[fails["stage"] == "annotate_llm_markers"]
        assert row["item"].tolist() == ["CD14+ Monocytes"]
        assert "no known gene" in row["reason"].iloc[0]
        mapping = pd.read_parquet(out / "annotations" / "label_mapping.parquet").set_index("label")
        assert mapping.loc["CD14+ Monocytes", "marker_source"] == "ontology"  # fell back, loudly
        assert any("failures.parquet" in w for w in summary.warnings)
