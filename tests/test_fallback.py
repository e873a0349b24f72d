"""An unavailable gene text source stops the run, or falls back to symbols loudly when asked."""

from __future__ import annotations

import pytest
from data_factory import job_dict, make_adata, read_embeddings, write_gene_table, write_h5ad

from raypipe.config import load_config
from raypipe.errors import InputError
from raypipe.orchestrate.runner import run_job

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_missing_orgdb_fails_or_falls_back_loudly(ray_local, tmp_path):
    src = write_h5ad(tmp_path / "cells.h5ad", make_adata(120))
    missing = tmp_path / "no-orgdb-here"
    missing.mkdir()
    cfg = job_dict(src, tmp_path / "strict", write_gene_table(tmp_path / "g.tsv"))
    cfg["genes"] = {"text_source": "orgdb", "orgdb": str(missing)}
    with pytest.raises(InputError, match="no-orgdb-here"):
        run_job(load_config(cfg), progress=False)

    cfg["output_dir"] = str(tmp_path / "fallback")
    cfg["genes"]["fallback"] = "symbol"
    summary = run_job(load_config(cfg), progress=False)
    assert any(w.startswith("FALLBACK") for w in summary.warnings)
    assert "FALLBACK" in summary.render()
    assert len(read_embeddings(tmp_path / "fallback")) == 120
