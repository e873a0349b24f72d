"""A whole run with zero-shot annotation and evaluation on real Kang PBMCs (small slice)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from data_factory import GENES, job_dict, write_gene_table

from raypipe.config import load_config
from raypipe.evaluate.reduce import METRIC_NAMES
from raypipe.orchestrate.runner import run_job

pytestmark = [pytest.mark.integration, pytest.mark.shared_gene_cache]


@pytest.fixture(scope="module")
def small_kang(kang1k5, tmp_path_factory):
    """400 real cells, restricted to the marker genes the test gene table describes."""
    full = ad.read_h5ad(kang1k5)
    genes = [g for g in GENES if g in full.var_names]
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(full.n_obs, 400, replace=False))
    sub = full[rows, genes].copy()
    path = tmp_path_factory.mktemp("kang") / "kang_small.h5ad"
    sub.write_h5ad(path)
    return path, sub


@pytest.mark.slow
def test_annotate_and_evaluate_write_every_output(ray_local, small_kang, tmp_path):
    path, adata = small_kang
    table = write_gene_table(tmp_path / "genes.tsv")
    cfg = job_dict(
        path,
        tmp_path / "run",
        table,
        input={
            "path": str(path),
            "label_key": "cluster_id",
            "batch_key": "sample_id",
            "rows_per_chunk": 64,
        },
        genes={"min_coverage": 0.5},
        annotate={"enabled": True, "scorers": {"text": 1.0}},
        evaluate={"enabled": True, "report": False, "sample_size": 300},
    )
    summary = run_job(load_config(cfg), progress=False)
    out = tmp_path / "run"

    mapping = pd.read_parquet(out / "annotations" / "label_mapping.parquet")
    assert set(mapping["label"]) == set(adata.obs["cluster_id"].astype(str))
    assert mapping.set_index("label").loc["B cells", "cl_id"] == "CL:0000236"

    ann = pd.concat(
        [
            pd.read_parquet(f)
            for f in sorted((out / "annotations" / "genept_w").glob("part-*.parquet"))
        ]
    ).sort_values("row")
    assert ann["obs_name"].tolist() == adata.obs_names.tolist()
    assert set(ann["label"]) <= set(mapping["label"])
    assert (ann["margin"] >= 0).all()
    assert {"top_labels", "top_scores", "label_uncentred"} <= set(ann.columns)

    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == [
        "dataset",
        "method",
        "metric",
        "value",
        "n_cells",
        "sample_size",
    ]
    assert set(metrics["metric"]) <= set(METRIC_NAMES)
    assert {"genept_w", "pca", "genept_w_uncentred"} <= set(metrics["method"])
    wide = metrics.pivot_table(index="metric", columns="method", values="value")
    for m in ("ari_kmeans", "ami_kmeans", "asw_label", "asw_batch", "knn_accuracy"):
        assert np.isfinite(wide.loc[m, "genept_w"])
        assert np.isfinite(wide.loc[m, "pca"])
    acc = metrics[(metrics.method == "genept_w") & (metrics.metric == "accuracy")].iloc[0]
    assert acc["n_cells"] == acc["sample_size"] == 400  # exact: every cell
    assert acc["value"] == pytest.approx(
        np.mean(ann["label"].to_numpy() == adata.obs["cluster_id"].astype(str).to_numpy())
    )
    knn = metrics[(metrics.method == "pca") & (metrics.metric == "knn_accuracy")].iloc[0]
    assert (knn["n_cells"], knn["sample_size"]) == (400, 300)  # quadratic: the seeded sample
    assert (out / "evaluation" / "confusion_genept_w.parquet").exists()
    assert summary.metrics is not None

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["annotate"]["methods"]["genept_w"]["shards_computed"] > 0

    again = run_job(load_config(cfg), progress=False)
    assert again.shards_done["genept_w"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["annotate"]["methods"]["genept_w"]["shards_computed"] == 0
