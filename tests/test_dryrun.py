"""`raypipe run --dry-run`: counts, tokens and cost of the paid calls, without calling anything."""

from __future__ import annotations

from data_factory import job_dict, make_adata, write_gene_table, write_h5ad

from raypipe.cli import main


def test_dry_run_prices_every_paid_step_and_calls_nothing(tmp_path, capsys, monkeypatch):
    src = write_h5ad(tmp_path / "cells.h5ad", make_adata(300))
    cfg = job_dict(
        src,
        tmp_path / "out",
        write_gene_table(tmp_path / "genes.tsv"),
        genes={"text_source": "llm"},
        llm={"backend": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1"},
        text_model={
            "backend": "openai",
            "model": "emb-x",
            "base_url": "http://127.0.0.1:9/v1",
            "batch_size": 100,
        },
        embed={"methods": ["genept_w", "genept_s"]},
        prices={"emb-x": {"input": 0.02}, "gpt-x": {"input": 0.15, "output": 0.6}},
    )
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # no key needed: nothing is called
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "300 cells" in out
    assert "gene descriptions (chat): gpt-x: 40 items in 40 calls" in out
    assert "GenePT-s cell sentences: emb-x: 300 items in 3 calls" in out
    assert "$" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_prices_the_llm_marker_requests(tmp_path, capsys, monkeypatch):
    src = write_h5ad(tmp_path / "cells.h5ad", make_adata(50))
    cfg = job_dict(
        src,
        tmp_path / "out",
        write_gene_table(tmp_path / "genes.tsv"),
        llm={"backend": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:9/v1"},
        annotate={"enabled": True, "llm_markers": True, "tissue": "blood"},
        input={"path": str(src), "label_key": "cell_type"},
        prices={"gpt-x": {"input": 0.15, "output": 0.6}},
    )
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n_types = len(set(make_adata(50).obs["cell_type"]))
    assert f"candidate markers (chat): gpt-x: {n_types} items in {n_types} calls" in out
    assert not (tmp_path / "out").exists()
