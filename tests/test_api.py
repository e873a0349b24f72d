"""The Python API: a light ``import raypipe``, ``open_run``/``embed`` refusals and the one-call
``embed`` round trip (the README's and the docs' examples run in tests/test_docs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_factory import make_adata, read_embeddings, write_gene_table

import raypipe
from raypipe.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

LIGHT_PROBE = """
import sys
import raypipe
assert callable(raypipe.run) and callable(raypipe.open_run) and callable(raypipe.embed)
assert raypipe.Run.__name__ == "Run"
heavy = [m for m in ("torch", "ray", "anndata", "zarr", "transformers", "scanpy")
         if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)]
print("HEAVY=" + ",".join(heavy))
"""


def test_import_raypipe_and_its_api_names_import_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", LIGHT_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", out.stdout + out.stderr


def test_raypipe_embed_stays_the_function_after_the_stage_package_is_used():
    import raypipe.embed.genept_w  # the stage package and one of its modules
    from raypipe.embed.methods import METHODS

    assert callable(raypipe.embed)
    assert raypipe.embed.__module__ == "raypipe.api"
    assert "genept_w" in METHODS.names()


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = raypipe.nope  # type: ignore[attr-defined]


# ------------------------------------------------------------------ open_run refusals


def _manifest(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"config": {}, **fields}))
    return folder


def test_open_run_missing_folder(tmp_path: Path):
    with pytest.raises(InputError, match=r"run folder .*nope does not exist"):
        raypipe.open_run(tmp_path / "nope")


def test_open_run_folder_that_is_not_a_run(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError) as err:
        raypipe.open_run(tmp_path)
    assert f"{tmp_path} is not a raypipe run (no manifest.json)" in str(err.value)
    assert "output_dir of a `raypipe run`" in str(err.value.fix)


@pytest.mark.parametrize(
    ("status", "words"),
    [("running", "has not finished"), ("failed", "did not complete")],
)
def test_open_run_unfinished_or_failed(tmp_path: Path, status: str, words: str):
    run_dir = _manifest(tmp_path / "r", status=status)
    with pytest.raises(InputError) as err:
        raypipe.open_run(run_dir)
    assert words in str(err.value)
    assert repr(status) in str(err.value)
    assert "finished shards are reused" in str(err.value.fix)


# ------------------------------------------------------------------ embed refusals


@pytest.fixture(scope="module")
def gene_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gene_table(tmp_path_factory.mktemp("genes") / "genes.tsv")


def _genes(table: Path) -> dict:
    return {"text_source": "table", "table": str(table), "min_coverage": 0.5}


def test_embed_refuses_scaled_x_and_names_the_layers(tmp_path: Path, gene_table: Path):
    adata = make_adata(60)
    adata.layers["counts"] = adata.X.copy()
    dense = adata.X.toarray()
    adata.X = (dense - dense.mean(0)) / (dense.std(0) + 1)  # what sc.pp.scale leaves
    out_dir = tmp_path / "out"
    with pytest.raises(InputError) as err:
        raypipe.embed(adata, genes=_genes(gene_table), output_dir=str(out_dir))
    assert "adata.X holds negative values" in str(err.value)
    assert "'counts'" in str(err.value.fix)
    assert not out_dir.exists()  # nothing written
    assert "X_genept_w" not in adata.obsm


def test_embed_refuses_duplicate_obs_names(gene_table: Path):
    adata = make_adata(30)
    adata.obs_names = ["c1", "c1", *adata.obs_names[2:]]
    with pytest.raises(InputError, match=r"2 cells share 1 name\(s\) \(e.g. 'c1'\)") as err:
        raypipe.embed(adata, genes=_genes(gene_table))
    assert "obs_names_make_unique" in str(err.value.fix)


def test_embed_refuses_var_names_in_neither_id_space_and_suggests_a_column(gene_table: Path):
    adata = make_adata(30)
    adata.var = pd.DataFrame({"symbol": adata.var_names.to_numpy()}, index=adata.var_names)
    adata.var_names = [f"feature_{i}" for i in range(adata.n_vars)]
    with pytest.raises(InputError) as err:
        raypipe.embed(adata, genes=_genes(gene_table))
    assert "0% of adata.var_names are known gene symbols or Ensembl ids" in str(err.value)
    assert "feature_0" in str(err.value)
    assert "adata.var_names = adata.var['symbol']" in str(err.value.fix)


def test_embed_refuses_an_unknown_layer(gene_table: Path):
    with pytest.raises(InputError, match="adata has no layer 'counts'; layers: "):
        raypipe.embed(make_adata(20), input={"layer": "counts"}, genes=_genes(gene_table))


def test_embed_refuses_an_output_dir_of_another_run_before_writing(
    tmp_path: Path, gene_table: Path
):
    other = _manifest(tmp_path / "other", status="complete", config={"input": {"path": "x.h5ad"}})
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(InputError, match="holds a run of another input"):
        raypipe.embed(make_adata(20), genes=_genes(gene_table), output_dir=str(other))
    assert sorted(p.name for p in other.iterdir()) == before


# ------------------------------------------------------------------ embed, for real


@pytest.mark.integration
def test_embed_attaches_results_and_leaves_the_input_alone(
    tmp_path: Path, gene_table: Path, ray_local
):
    adata = make_adata(150, seed=3)
    adata.obs_names = [f"cell-{i:05d}" for i in np.random.default_rng(0).permutation(150)]
    before = adata.copy()
    out_dir = tmp_path / "run"
    job = {
        "genes": _genes(gene_table),
        "text_model": {"backend": "local", "model": "all-MiniLM-L6-v2", "batch_size": 64},
        "shards": {"rows": 64},
        "input": {"rows_per_chunk": 32, "label_key": "cell_type"},
        "ray": {"actors": 2, "actor_cpus": 0.5},
    }
    res = raypipe.embed(adata, progress=False, output_dir=str(out_dir), **job)

    # the input is untouched; the copy carries the results in the input's order
    assert "X_genept_w" not in adata.obsm
    assert "raypipe" not in adata.uns
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert res is not adata
    assert res.obs_names.equals(adata.obs_names)
    assert res.var.equals(adata.var)
    parts = read_embeddings(out_dir).set_index("obs_name").loc[res.obs_names]
    x = res.obsm["X_genept_w"]
    assert x.dtype == np.float32
    assert np.array_equal(x, np.stack(parts["embedding"].to_numpy()).astype(np.float32))
    assert res.obs["genept_w_empty"].to_numpy().tolist() == parts["empty"].tolist()
    meta = res.uns["raypipe"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert meta["config_hash"] == manifest["config_hash"]
    assert meta["status"] == "complete"
    assert meta["models"]["text_model"] == "all-MiniLM-L6-v2"
    assert 0 < meta["gene_coverage"]["share"] <= 1

    # Run reads the same results; to_anndata(adata=...) aligns by name, in place
    run = raypipe.open_run(out_dir)
    emb = run.embeddings("genept_w")
    assert emb.index.tolist() == adata.obs_names.tolist()  # the atlas is written in input order
    shuffled = adata[::-1].copy()
    same = run.to_anndata(adata=shuffled)
    assert same is shuffled
    assert np.array_equal(same.obsm["X_genept_w"], emb.loc[same.obs_names].to_numpy())
    with pytest.raises(InputError, match="adata's cells are not the run's"):
        run.to_anndata(adata=make_adata(10, seed=9))
    with pytest.raises(InputError, match=r"has no annotations of method 'genept_w'"):
        run.annotations("genept_w")

    # copy=False attaches to the object itself
    again = raypipe.embed(adata, copy=False, progress=False, output_dir=str(out_dir), **job)
    assert again is adata
    assert np.array_equal(adata.obsm["X_genept_w"], x)
