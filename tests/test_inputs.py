"""Bad inputs are refused (or flagged) with the reason and the fix (issue #10, items 3, 5-7, 9).

Duplicate cell names, a gene-symbol column beside Ensembl var_names, nonsense label columns,
mouse gene names on human tables, and the messages of item 9. Refusals happen before the
output folder exists; the two runs that go through use a 300-cell atlas and a module Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from data_factory import GENES, PLAIN_GENEPT_W, job_dict, make_adata, write_gene_table, write_h5ad

from raypipe.atlas import ingest
from raypipe.config import load_config
from raypipe.errors import InputError
from raypipe.genes.identity import GeneTable, resolve_genes
from raypipe.orchestrate.prepare import ensure_atlas, validate_job
from raypipe.orchestrate.runner import run_job

pytestmark = [pytest.mark.integration, pytest.mark.shared_gene_cache]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gene_table(tmp_path_factory.mktemp("inputs") / "genes.tsv")


def _job(h5: Path, out: Path, table: Path, *overrides: str, label: str | None = "cell_type"):
    cfg = job_dict(h5, out, table, embed={"methods": ["genept_w"], "genept_w": PLAIN_GENEPT_W})
    cfg["input"]["label_key"] = label
    return load_config(cfg, list(overrides))


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# item 3 -----------------------------------------------------------------------------------


def test_duplicate_obs_names_are_refused_with_the_names_and_the_fix(table, tmp_path):
    adata = make_adata(300, seed=2)
    names = adata.obs_names.to_numpy().copy()
    names[[10, 20, 30]] = names[[11, 21, 31]]  # 3 duplicated names
    adata.obs_names = names
    h5 = write_h5ad(tmp_path / "dup.h5ad", adata)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="3 cell names") as err:
        run_job(_job(h5, out, table), progress=False)
    assert "'cell-00011'" in str(err.value)
    assert "obs_names_make_unique()" in str(err.value)
    assert not out.exists()  # refused before the output folder is made
    with pytest.raises(InputError, match="obs_names_make_unique"):
        ingest(h5, tmp_path / "dup.zarr", progress=False)
    assert not list(tmp_path.glob(".dup.zarr*"))
    assert not (tmp_path / "dup.zarr").exists()


# items 5 and 6 (one run) ----------------------------------------------------------------


@pytest.mark.slow
def test_symbol_column_beside_ensembl_var_names_and_missing_labels(ray_local, table, tmp_path):
    """CELLxGENE layout: var_names Ensembl ids, symbols in var['feature_name'].

    11 genes carry Ensembl ids the text table does not know; their symbols match. Before,
    those 11 lost their text. 7 cells have no label: the printed summary says so.
    """
    adata = make_adata(300, seed=4)
    ens = adata.var["ensembl_id"].to_numpy().copy()
    ens[:11] = [f"ENSG7{i:010d}" for i in range(11)]  # ids unknown to the table
    adata.var = pd.DataFrame({"feature_name": GENES}, index=pd.Index(ens))
    labels = adata.obs["cell_type"].astype(object).to_numpy()
    labels[:7] = np.nan
    adata.obs["cell_type"] = pd.Categorical(labels)
    h5 = write_h5ad(tmp_path / "cxg.h5ad", adata)
    out = tmp_path / "cxg"
    summary = run_job(_job(h5, out, table), progress=False)
    genes = _manifest(out)["genes"]
    assert genes["coverage"]["n_covered"] == len(GENES)  # the 11 keep their text
    assert genes["matched_by"]["exact"] == len(GENES)  # through the symbol column
    text = summary.render()
    assert "symbols from var['feature_name']" in text
    assert "7 of 300 cells have no label in obs['cell_type']" in text


def test_numeric_or_many_class_label_columns_are_refused_unless_forced(table, tmp_path):
    adata = make_adata(300, seed=6)
    rng = np.random.default_rng(0)
    adata.obs["score"] = rng.random(300)  # a float: one class per cell
    adata.obs["cluster"] = rng.integers(0, 5, 300)  # integers 0..4 as "cell types"
    h5 = write_h5ad(tmp_path / "num.h5ad", adata)
    out = tmp_path / "num"
    with pytest.raises(InputError, match="300 distinct values") as err:
        run_job(_job(h5, out, table, label="score"), progress=False)
    assert "--force" in str(err.value)
    with pytest.raises(InputError, match=r"obs\['cluster'\] is numeric"):
        run_job(_job(h5, out, table, "annotate.enabled=true", label="cluster"), progress=False)
    assert not out.exists()
    notes = validate_job(_job(h5, out, table, label="cluster"), force=True)
    assert any("is numeric" in n and "--force" in n for n in notes)


# item 7 -----------------------------------------------------------------------------------


def test_mouse_names_are_refused_and_never_reported_exact(table, tmp_path):
    mouse = [g.capitalize() if g[0].isalpha() else g for g in GENES]  # CD3E → Cd3e
    adata = make_adata(200, mouse, seed=7)
    h5 = write_h5ad(tmp_path / "mouse.h5ad", adata)
    out = tmp_path / "mouse"
    with pytest.raises(InputError, match="look like mouse genes") as err:
        run_job(_job(h5, out, table), progress=False)
    assert "genes.cross_species" in str(err.value)
    assert not out.exists()
    ens = adata.copy()
    ens.var_names = [f"ENSMUSG{i:011d}" for i in range(len(GENES))]
    h5e = write_h5ad(tmp_path / "mouse_ens.h5ad", ens)
    with pytest.raises(InputError, match="mouse"):
        validate_job(_job(h5e, out, table))
    assert validate_job(_job(h5, out, table, "genes.cross_species=true")) == []
    ids = pd.read_csv(table, sep="\t")
    res = resolve_genes(mouse, GeneTable.from_frames(ids), ensembl_ids=None)
    assert "exact" not in res.how  # a case fold is never an exact match
    assert res.by_how()["casefold"] == sum(m != g for m, g in zip(mouse, GENES, strict=True))


# item 9 -----------------------------------------------------------------------------------


def test_no_overlapping_gene_blames_the_gene_names_not_the_text_model(ray_local, table, tmp_path):
    genes = [f"NOTAGENE{i}" for i in range(40)]
    h5 = write_h5ad(tmp_path / "none.h5ad", make_adata(100, genes, seed=3))
    out = tmp_path / "none"
    with pytest.raises(InputError, match="no atlas gene matches") as err:
        run_job(_job(h5, out, table, "genes.min_coverage=0"), progress=False)
    assert "failures.parquet" not in str(err.value)
    assert "text_model" not in str(err.value)
    assert _manifest(out)["status"] == "failed"


def test_cpm_input_names_the_config_key_in_run(ray_local, table, tmp_path):
    adata = make_adata(100, seed=8)
    x = adata.X.toarray()
    adata.X = sp.csr_matrix(x / x.sum(1, keepdims=True) * 1e6, dtype=np.float32)  # CPM
    h5 = write_h5ad(tmp_path / "cpm.h5ad", adata)
    with pytest.raises(InputError, match=r"input\.x_kind: counts"):
        run_job(_job(h5, tmp_path / "cpm", table), progress=False)


def test_tokenize_cpm_with_auto_does_not_claim_lognorm(shared_data):
    from raypipe.embed.dictionaries import GeneformerDictionaries
    from raypipe.embed.tokenizer import RankValueTokenizer

    tok = RankValueTokenizer(GeneformerDictionaries.load("V1", search=[shared_data / "geneformer"]))
    tok.plan(["ENSG00000188290"])
    with pytest.raises(InputError, match="x_kind auto") as err:
        tok.tokenize(sp.csr_matrix(np.array([[812.25]])), x_kind="auto")
    assert "x_kind=lognorm" not in str(err.value)


def test_the_same_file_through_dotdot_is_not_ingested_again(table, tmp_path):
    h5 = write_h5ad(tmp_path / "d" / "cells.h5ad", make_adata(150, seed=9))
    out = tmp_path / "dd"
    ensure_atlas(_job(h5, out, table), out, progress=False)
    stamp = (out / "atlas.zarr" / "zarr.json").stat().st_mtime_ns
    via = h5.parent / ".." / h5.parent.name / h5.name
    atlas = ensure_atlas(_job(via, out, table), out, progress=False)
    assert Path(atlas.path) == out / "atlas.zarr"
    assert (out / "atlas.zarr" / "zarr.json").stat().st_mtime_ns == stamp  # not ingested again
