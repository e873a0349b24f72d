"""`annotate.candidates: auto` end to end on real Kang PBMCs (a small slice).

Offline naming through `raypipe run` (clusters → markers → names → per-cell calls → cl_exact /
cl_lineage → export), GPTCelltype naming against the loopback OpenAI server (scripted answers),
and the bad inputs that must fail with a clear message and no complete-looking output.
"""

from __future__ import annotations

import json
import os
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from data_factory import GENES, job_dict, write_gene_table
from servers.openai_server import FakeOpenAI

from raypipe.config import load_config
from raypipe.errors import InputError
from raypipe.orchestrate.runner import run_job

pytestmark = pytest.mark.integration

KEY_ENV = "RAYPIPE_TEST_DISCOVER_KEY"


@pytest.fixture(scope="module")
def small(kang1k5, tmp_path_factory):
    """400 real cells, restricted to the marker genes the test gene table describes."""
    full = ad.read_h5ad(kang1k5)
    genes = [g for g in GENES if g in full.var_names]
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, 400, replace=False))
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    full[rows, genes].copy().write_h5ad(path)
    return path


def _cfg(small, out, **sections):
    table = write_gene_table(out.parent / f"{out.name}-genes.tsv")
    base = {
        "input": {"path": str(small), "label_key": "cluster_id", "rows_per_chunk": 64},
        "annotate": {"enabled": True, "candidates": "auto", "tissue": "blood"},
        "evaluate": {"enabled": True, "report": False, "sample_size": 300},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return job_dict(small, out, table, **base)


@pytest.fixture(scope="module")
def offline_run(ray_local, small, tmp_path_factory):
    out = tmp_path_factory.mktemp("discover") / "run"
    cfg = _cfg(small, out)
    summary = run_job(load_config(cfg), progress=False)
    return out, cfg, summary


@pytest.mark.slow
def test_offline_discovery_writes_clusters_calls_and_cl_metrics(offline_run):
    out, _, summary = offline_run
    clusters = pd.read_parquet(out / "annotations" / "clusters.parquet")
    assert clusters["n_cells"].sum() == 400
    assert (clusters["cluster"] == range(len(clusters))).all()
    named = clusters[clusters["candidate"] != "unassigned"]
    assert len(named) >= 2
    assert named["cl_id"].str.match(r"^CL:\d{7}$").all()
    assert (clusters.loc[clusters["candidate"] == "unassigned", "why_unassigned"] != "").all()
    first = clusters.iloc[0]
    assert len(first["markers"]) == len(first["logfc"]) == len(first["pct_in"]) > 0
    assert set(first["markers"]) <= set(GENES)

    mapping = pd.read_parquet(out / "annotations" / "label_mapping.parquet")
    assert set(mapping["label"]) == set(named["candidate"])  # clusters on one term: one candidate
    assert set(mapping["marker_source"]) == {"discovered"}
    ann = pd.concat(
        pd.read_parquet(f) for f in sorted((out / "annotations" / "genept_w").glob("part-*"))
    ).sort_values("row")
    assert {"cl_id", "cluster"} <= set(ann.columns)
    cl_of = dict(zip(mapping["label"], mapping["cl_id"], strict=True))
    assert (ann["cl_id"] == ann["label"].map(cl_of)).all()
    cells = pd.concat(
        pd.read_parquet(f) for f in sorted((out / "state" / "discover_clusters").glob("part-*"))
    ).sort_values("row")
    assert ann["cluster"].tolist() == cells["cluster"].tolist()

    metrics = pd.read_parquet(out / "metrics.parquet")
    got = metrics[metrics["method"] == "genept_w"].set_index("metric")["value"]
    assert 0 <= got["cl_exact"] <= got["cl_lineage"] <= 1
    assert "accuracy" not in got.index  # names are CL terms, not the label column's values
    skipped = pd.read_parquet(out / "evaluation" / "skipped.parquet")
    assert "cl_exact" in skipped[skipped["metric"] == "accuracy"]["reason"].iloc[0]
    assert (out / "evaluation" / "cl_per_class_genept_w.parquet").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["annotate"]["discover"]["n_clusters"] == len(clusters)
    assert "discover" in summary.timings


@pytest.mark.slow
def test_export_has_the_cellxgene_pair_and_the_cluster(offline_run):
    from raypipe.api import open_run

    out, _, _ = offline_run
    adata = open_run(out).to_anndata()
    assert {"raypipe_genept_w_label", "raypipe_genept_w_cl_id", "raypipe_cluster"} <= set(
        adata.obs.columns
    )
    labels = adata.obs["raypipe_genept_w_label"].astype(str)
    ids = adata.obs["raypipe_genept_w_cl_id"].astype(str)
    assert ids[labels != "unassigned"].str.match(r"^CL:\d{7}$").all()


@pytest.mark.slow
def test_rerun_reuses_the_clustering_and_the_report_shows_it(offline_run):
    from raypipe.evaluate.discovery_report import discovery_section, draw_discovery
    from raypipe.orchestrate.manifest import read_manifest

    out, cfg, _ = offline_run
    cache = out / "state" / "discover" / "clustering.npz"
    markers = sorted((out / "state" / "discover_clusters").glob("*"))
    assert markers  # parts and completion markers
    before = (cache.stat().st_mtime_ns, [p.stat().st_mtime_ns for p in markers])
    run_job(load_config(cfg), progress=False)
    assert (cache.stat().st_mtime_ns, [p.stat().st_mtime_ns for p in markers]) == before
    manifest = read_manifest(out)
    (out / "report").mkdir(exist_ok=True)
    assert draw_discovery(out, manifest)
    html = "".join(discovery_section(out, manifest, {"discovered": True}))
    assert "Discovered cell types" in html
    assert "discovered_dotplot.png" in html
    assert (out / "report" / "discovered_dotplot.png").stat().st_size > 0


ANSWERS = {"MS4A1": "B cells", "CD79A": "B cells", "NKG7": "NK cells", "GNLY": "NK cells"}


def _llm(answer_bad: str | None):
    """Scripted answers keyed on the prompt's first marker; ``answer_bad``: that marker → ''."""

    def answer(prompt: str) -> str | None:
        if "cell type name" not in prompt:
            return None
        genes = [g.strip() for g in prompt.splitlines()[-1].split(",")]
        if genes[0] == answer_bad:
            return "   "  # empty: a failure row, the cluster named offline
        for g in genes:
            if g in ANSWERS:
                return ANSWERS[g]
        return "CD14+ Monocytes" if {"CD14", "LYZ", "S100A8"} & set(genes) else "T cells"

    return answer


def _llm_sections(srv):
    return {
        "llm": {
            "backend": "openai",
            "model": "fake-chat",
            "base_url": srv.base_url,
            "api_key_env": KEY_ENV,
            "max_tokens": 20,
        },
        "limits": {
            "requests_per_minute": 4,
            "window_s": 1.0,
            "max_retries": 1,
            "backoff_base_s": 0.01,
            "timeout_s": 10,
            "actors": 1,
        },
        "prices": {"fake-chat": {"input": 0.15, "output": 0.6}},
        "annotate": {"discover": {"naming": "llm"}},
        "evaluate": {"enabled": False},
    }


@pytest.mark.slow
def test_llm_naming_asks_each_cluster_once_caches_and_respects_the_budget(
    ray_local, small, tmp_path
):
    os.environ[KEY_ENV] = "sk-loopback"
    with FakeOpenAI("sk-loopback", rpm=4, window_s=1.0, chat_answer=_llm(None)) as srv:
        cfg = load_config(_cfg(small, tmp_path / "run", **_llm_sections(srv)))
        run_job(cfg, progress=False)
        clusters = pd.read_parquet(tmp_path / "run" / "annotations" / "clusters.parquet")
        chats = srv.calls["/v1/chat/completions"]
        assert chats == len(clusters)  # every cluster asked exactly once
        assert srv.max_requests_in_window(1.0) <= 4  # the budget held
        assert all("Identify the cell type of blood cells" in p for p in clusters["prompt"])
        assert set(clusters["answer"]) <= {"B cells", "NK cells", "CD14+ Monocytes", "T cells"}
        assert (clusters["llm_name"] == clusters["answer"]).all()  # the parsed names
        b = clusters[clusters["answer"] == "B cells"]
        assert (b["cl_id"] == "CL:0000236").all()
        assert b["found_by"].str.startswith("llm").all()
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["llm_usage"]
        run_job(cfg, progress=False)
        assert srv.calls["/v1/chat/completions"] == chats  # the re-run: 0 requests


@pytest.mark.slow
def test_llm_bad_answer_is_a_failure_row_and_falls_back_offline(ray_local, small, tmp_path):
    os.environ[KEY_ENV] = "sk-loopback"
    with FakeOpenAI("sk-loopback", chat_answer=_llm(None)) as probe:
        cfg = load_config(_cfg(small, tmp_path / "probe", **_llm_sections(probe)))
        run_job(cfg, progress=False)
    probe_clusters = pd.read_parquet(tmp_path / "probe" / "annotations" / "clusters.parquet")
    victim = re.findall(r"[^\n]+$", probe_clusters["prompt"].iloc[0])[0].split(",")[0].strip()
    with FakeOpenAI("sk-loopback", chat_answer=_llm(victim)) as srv:
        cfg = load_config(_cfg(small, tmp_path / "bad", **_llm_sections(srv)))
        summary = run_job(cfg, progress=False)
    out = tmp_path / "bad"
    fails = pd.read_parquet(out / "failures.parquet")
    row = fails[fails["stage"] == "annotate_discover_names"]
    assert row["item"].tolist() == ["cluster 0"]
    assert "empty answer" in row["reason"].iloc[0]
    clusters = pd.read_parquet(out / "annotations" / "clusters.parquet")
    assert "llm answer unusable" in clusters["found_by"].iloc[0]
    assert any("LLM naming failed" in w for w in summary.warnings)


@pytest.mark.slow
def test_bad_inputs_fail_clearly_and_leave_no_clusters_table(ray_local, small, tmp_path):
    def failing(out, match, **sections):
        with pytest.raises(InputError, match=match):
            run_job(load_config(_cfg(small, out, **sections)), progress=False)
        assert not (out / "annotations" / "clusters.parquet").exists()
        assert json.loads((out / "manifest.json").read_text())["status"] == "failed"

    failing(
        tmp_path / "one",
        r"(?s)single cluster.*annotate.discover.resolution",
        annotate={"discover": {"resolution": 1e-6}},
    )
    failing(
        tmp_path / "tiny",
        r"(?s)named none of its .* clusters.*min_cluster_cells",
        annotate={"discover": {"min_cluster_cells": 100_000}},
    )
    failing(
        tmp_path / "few",
        r"needs at least 401 cells",
        annotate={"discover": {"n_neighbors": 400}},
    )


@pytest.mark.slow
def test_no_gene_in_any_marker_knowledge_fails_clearly(ray_local, tmp_path):
    """Gene texts that name no cell type and no ontology markers: nothing can be named."""
    from data_factory import ensembl_id, make_adata, write_h5ad

    path = write_h5ad(tmp_path / "atlas.h5ad", make_adata(300, seed=3))
    table = tmp_path / "genes.tsv"
    pd.DataFrame(
        {
            "symbol": GENES,
            "ensembl_id": [ensembl_id(i) for i in range(len(GENES))],
            "text": ["a protein of unknown function"] * len(GENES),
        }
    ).to_csv(table, sep="\t", index=False)
    cfg = job_dict(
        path,
        tmp_path / "run",
        table,
        annotate={
            "enabled": True,
            "candidates": "auto",
            "ontology_markers": False,
            "discover": {"resolution": 2.0},
        },
    )
    with pytest.raises(InputError, match="none of the atlas genes is in the marker knowledge"):
        run_job(load_config(cfg), progress=False)
    assert not (tmp_path / "run" / "annotations" / "clusters.parquet").exists()
