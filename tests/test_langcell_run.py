"""LangCell's zero-shot inside ``raypipe run``: the ``langcell`` scorer on the CE actors.

The run (400 cells of Kang 1.5k: the size does not matter here, the fixture's random-weight LangCell checkpoint, CL candidates) must give
every cell the same scores and label as ``raypipe ce score`` gives the same cells tokenised by
``raypipe tokenize`` — the command the conformance test checks against LangCell's own code.
Random weights: this checks the wiring (candidates → CE actors → annotation), not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.cli import main
from raypipe.config import load_config
from raypipe.orchestrate.runner import run_job

pytestmark = [pytest.mark.integration, pytest.mark.shared_gene_cache]

CANDIDATES = ["B cell", "CD14-positive monocyte", "natural killer cell", "megakaryocyte"]


@pytest.mark.slow
def test_run_with_the_langcell_scorer_equals_ce_score(ray_local, shared_data, tmp_path):
    import anndata as ad

    full = shared_data / "cells" / "kang2018_pbmc_ctrl_stim_1.5k_muscat_example_sce.h5ad"
    kang = tmp_path / "kang400.h5ad"
    ad.read_h5ad(full)[::4][:400].copy().write_h5ad(kang)
    ckpt = shared_data / "langcell" / "ckpt"
    out = tmp_path / "run"
    job = load_config(
        {
            "input": {"path": str(kang), "rows_per_chunk": 128},
            "output_dir": str(out),
            "shards": {"rows": 128},
            "genes": {"text_source": "symbol", "min_coverage": 0.1},
            "embed": {
                "methods": ["ce"],
                "ce": {"model": str(ckpt), "variant": "langcell", "dictionary": "V1"},
            },
            # LangCell's own zero-shot: its score as is (no standardisation, no smoothing)
            "annotate": {
                "enabled": True,
                "candidates": CANDIDATES,
                "scorers": {"langcell": 1.0},
                "standardise": "none",
                "smoothing": 0.0,
            },
            "ray": {"actors": 1, "actor_cpus": 0.5},
        }
    )
    summary = run_job(job, progress=False)
    assert summary.shards_done == {"ce": 4}  # 400 cells in shards of 128
    ann = pd.concat(
        [pd.read_parquet(p) for p in sorted((out / "annotations" / "ce").glob("part-*.parquet"))]
    ).set_index("obs_name")
    assert set(ann["label"]) <= set(CANDIDATES)
    mapping = pd.read_parquet(out / "annotations" / "label_mapping.parquet")
    texts = dict(zip(mapping["label"], mapping["text"], strict=True))
    (tmp_path / "texts.json").write_text(json.dumps(texts))

    tokens, scored = tmp_path / "tokens.parquet", tmp_path / "scores.parquet"
    assert main(["tokenize", str(kang), "--out", str(tokens), "--dictionary", "V1"]) == 0
    argv = [
        "ce",
        "score",
        str(tokens),
        "--model",
        str(ckpt),
        "--texts",
        str(tmp_path / "texts.json"),
    ]
    assert main([*argv, "--out", str(scored), "--no-progress"]) == 0
    ref = pd.read_parquet(scored).set_index("obs_name").loc[ann.index]
    best = np.array([max(s) for s in ref["score"]])
    np.testing.assert_allclose(ann["score"].to_numpy(), best, atol=1e-5)
    assert (ann["best_label"] == ref["label"]).mean() > 0.99  # exact up to float near-ties
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["annotate"]["methods"]["ce"]["scorers"] == {"langcell": 1.0}


def test_langcell_scorer_without_ce_fails_before_anything_is_written(tmp_path: Path):
    from raypipe.errors import ConfigError

    job = load_config(
        {
            "input": {"path": str(tmp_path / "x.h5ad")},
            "output_dir": str(tmp_path / "out"),
            "annotate": {"enabled": True, "candidates": ["B cell"], "scorers": {"langcell": 1}},
        }
    )
    with pytest.raises(ConfigError, match="no method computes LangCell"):
        run_job(job, progress=False)
    assert not (tmp_path / "out").exists()
