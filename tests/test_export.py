"""``raypipe export`` / ``Run.to_anndata`` round-trip a real run (the demo), refuse what the
run did not compute, never leave half a file; ``raypipe report`` re-renders from the run's files."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import raypipe
from raypipe.cli import main
from raypipe.evaluate.report import rerender_report, summary_html, write_report

ROOT = Path(__file__).resolve().parents[1]


def _parts(run_dir: Path, kind: str, method: str) -> pd.DataFrame:
    files = sorted((run_dir / kind / method).glob("part-*.parquet"))
    df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    return df.sort_values("row").reset_index(drop=True)


@pytest.fixture(scope="module")
def demo_run(demo_cli_run) -> Path:
    """The demo job through the real CLI (the session's): GenePT-w, annotation, metrics, report."""
    return demo_cli_run.out


@pytest.fixture(scope="module")
def demo_source():
    """The demo's input as the run read it: pbmc68k_reduced's log-normalised ``raw``."""
    import scanpy as sc

    full = sc.datasets.pbmc68k_reduced()
    return full.raw.to_adata(), full.obs


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


@pytest.mark.integration
def test_cli_export_h5ad_round_trips_the_demo_run(
    demo_run: Path, demo_source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "demo.h5ad"
    assert main(["export", str(demo_run), "--out", str(out)]) == 0
    assert f"wrote {out}: 700 cells; obsm X_genept_w" in capsys.readouterr().out
    back = ad.read_h5ad(out)
    src, src_obs = demo_source

    assert back.obs_names.tolist() == src.obs_names.tolist()
    emb = _parts(demo_run, "embeddings", "genept_w")
    assert emb["obs_name"].tolist() == back.obs_names.tolist()
    x = back.obsm["X_genept_w"]
    assert x.dtype == np.float32
    assert np.array_equal(_bits(x), _bits(np.stack(emb["embedding"].to_numpy())))
    assert back.obs["genept_w_empty"].tolist() == emb["empty"].tolist()
    ann = _parts(demo_run, "annotations", "genept_w")
    assert back.obs["raypipe_genept_w_label"].astype(str).tolist() == ann["label"].tolist()
    assert np.array_equal(back.obs["raypipe_genept_w_score"].to_numpy(), ann["score"].to_numpy())
    assert np.array_equal(back.obs["raypipe_genept_w_margin"].to_numpy(), ann["margin"].to_numpy())
    # the atlas as it came in (the `raw` layer the config names): var names, X and obs kept
    assert back.var_names.tolist() == src.var_names.tolist()
    assert (back.X != src.X).nnz == 0
    assert (
        back.obs["bulk_labels"].astype(str).tolist() == src_obs["bulk_labels"].astype(str).tolist()
    )
    meta = back.uns["raypipe"]
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert meta["config_hash"] == manifest["config_hash"]
    assert meta["versions"]["raypipe"] == raypipe.__version__
    assert meta["gene_coverage"]["n_genes"] == 765
    assert json.loads(meta["config"])["input"]["path"] == "builtin:pbmc68k_reduced"
    metrics = pd.read_parquet(demo_run / "metrics.parquet")
    pd.testing.assert_frame_equal(
        meta["metrics"].reset_index(drop=True), metrics, check_dtype=False
    )
    assert not [p for p in tmp_path.iterdir() if p.name != "demo.h5ad"]  # no temporary left


@pytest.mark.integration
def test_to_anndata_and_zarr_export_match(demo_run: Path, tmp_path: Path):
    run = raypipe.open_run(demo_run)
    mem = run.to_anndata()
    assert main(["export", str(demo_run), "--out", str(tmp_path / "k.zarr")]) == 0
    disk = ad.read_zarr(tmp_path / "k.zarr")
    assert mem.obs_names.equals(disk.obs_names)
    assert np.array_equal(_bits(mem.obsm["X_genept_w"]), _bits(disk.obsm["X_genept_w"]))
    assert np.array_equal(
        _bits(mem.obsm["X_genept_w"]), _bits(run.embeddings("genept_w").to_numpy())
    )
    for col in ("raypipe_genept_w_label", "raypipe_genept_w_score", "genept_w_empty"):
        assert mem.obs[col].tolist() == disk.obs[col].tolist()
    assert (mem.X != disk.X).nnz == 0
    calls = run.annotations("genept_w")
    assert calls.index.equals(mem.obs_names)
    assert calls["label"].tolist() == mem.obs["raypipe_genept_w_label"].astype(str).tolist()
    assert set(run.metrics()["method"]) >= {"genept_w", "pca"}


@pytest.mark.integration
def test_export_of_a_method_the_run_did_not_compute(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "x.h5ad"
    assert main(["export", str(demo_run), "--out", str(out), "--methods", "ce"]) == 2
    err = capsys.readouterr().err
    assert f"error: run {demo_run} has no embeddings of method 'ce'; it has: genept_w" in err
    assert "fix: use one of those, or add the method to embed.methods" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_export_refuses_existing_out_and_other_suffixes(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "x.h5ad"
    out.write_text("keep me")
    assert main(["export", str(demo_run), "--out", str(out)]) == 2
    assert f"error: {out} already exists" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["export", str(demo_run), "--out", str(tmp_path / "x.csv")]) == 2
    assert "must end in .h5ad or .zarr" in capsys.readouterr().err


@pytest.mark.integration
def test_an_interrupted_export_leaves_nothing(
    demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from raypipe.orchestrate import export

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_x_streamed", boom)
    for name in ("x.h5ad", "x.zarr"):
        with pytest.raises(KeyboardInterrupt):
            raypipe.open_run(demo_run).export(tmp_path / name)
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_cli_report_renders_the_summary_from_the_run_files(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import shutil

    run = shutil.copytree(demo_run, tmp_path / "demo")  # the session's run stays as it was
    (run / "report" / "index.html").unlink()
    assert main(["report", str(run)]) == 0
    index = Path(capsys.readouterr().out.strip())
    assert index == run / "report" / "index.html"
    page = index.read_text()
    assert page.index("Run summary") < page.index("<h2>Metrics</h2>")
    assert "700 cells × 765 genes" in page
    assert "FALLBACK: gene text = gene symbol only" in page  # what fell back
    assert '<tr class="baseline"><td>pca</td>' in page
    assert 'src="umap_genept_w.png"' in page  # the figures drawn by the run are kept


# ------------------------------------------------------------------ report, no Ray


def _pca2(x, *, seed):
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(x)


MANIFEST = {
    "status": "complete",
    "config_hash": "abc123",
    "started": "2026-01-01T00:00:00",
    "finished": "2026-01-01T00:01:40",
    "wall_s": 100.0,
    "timings": {"atlas": 1.0, "genes": 20.0},
    "atlas": {"n_obs": 40, "n_vars": 12, "x_kind": "counts"},
    "shards": {"n": 2, "rows": 32},
    "genes": {
        "text_source": "symbol",
        "model": "all-MiniLM-L6-v2",
        "coverage": {"n_genes": 12, "n_covered": 9, "share": 0.75},
    },
    "methods": {"genept_w": {"shards_computed": 1}},
    "warnings": ["FALLBACK: gene text source 'orgdb' is unavailable", "2 ambiguous aliases"],
}


def test_summary_opens_the_report_and_rerender_keeps_the_figures(tmp_path: Path):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    labels = np.repeat(["a", "b"], 20)
    metrics = pd.DataFrame(
        {"dataset": "d", "method": ["genept_w", "pca"], "metric": "ari_kmeans", "value": [0.5, 0.4]}
    )
    conf = pd.DataFrame([[18, 2], [3, 17]], index=["a", "b"], columns=["a", "b"])
    index = write_report(
        tmp_path, metrics, {"genept_w": x}, labels, {"genept_w": labels}, {"genept_w": conf},
        sample_size=30, projector=_pca2,
    )  # fmt: skip
    first = index.read_text()
    assert first.index("Run summary") < first.index("<h2>Metrics</h2>")
    for text in (
        "40 cells × 12 genes",
        "100.0 s",
        "9 / 12 atlas genes have text (75.0%",
        "FALLBACK: gene text source &#x27;orgdb&#x27; is unavailable",
        "2 ambiguous aliases",
        "genept_w: 1 shards computed, 1 reused",
        "(30 of 40 cells, seeded subsample)",
        'src="umap_genept_w.png"',
        'src="confusion_genept_w.png"',
    ):
        assert text in first, text
    # re-rendered from the files alone: same page (metrics.parquet is the run's table)
    metrics.to_parquet(tmp_path / "metrics.parquet")
    index.unlink()
    assert rerender_report(tmp_path) == index
    assert index.read_text() == first


def test_summary_of_a_running_manifest_says_so():
    page = summary_html({"status": "running", "config_hash": "x", "started": "now"})
    assert "running — this summary is completed when the run ends" in page
    assert "raypipe report OUTPUT_DIR" in page


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(tmp_path)]) == 2
    assert f"error: {tmp_path} is not a raypipe run (no manifest.json)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "report"])
def test_help_of_the_new_commands(command: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: raypipe {command} [-h]")
