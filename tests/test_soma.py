"""TileDB-SOMA experiments as inputs and as export targets (issue #21, items 2-4).

Local experiments are written by ``soma_io.from_anndata`` from the real Kang files; the
Census itself (``input.soma.census_version``) needs the network and is not tested here. Gene
texts are embedded by a loopback OpenAI server, so the runs spend their time reading cells.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from data_factory import (
    LOOPBACK_KEY,
    LOOPBACK_KEY_ENV,
    job_dict,
    loopback_text_model,
    read_embeddings,
    write_real_gene_table,
)
from servers.openai_server import FakeOpenAI

from raypipe.config import load_config
from raypipe.errors import InputError
from raypipe.orchestrate.prepare import validate_job
from raypipe.orchestrate.runner import run_job

tiledbsoma = pytest.importorskip("tiledbsoma")
soma_io = pytest.importorskip("tiledbsoma.io")

SUBSET = "cluster_id == 'B cells' or cluster_id == 'CD8 T cells'"
PLAIN = {"methods": ["genept_w"], "genept_w": {"hvg": None}}


@pytest.fixture(scope="module")
def kang(kang1k5: Path) -> ad.AnnData:
    return ad.read_h5ad(kang1k5)


@pytest.fixture(scope="module")
def table(shared_data: Path, kang: ad.AnnData, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("genes") / "kang_genes.tsv"
    return write_real_gene_table(shared_data, path, list(kang.var_names))


@pytest.fixture(scope="module")
def experiment(kang1k5: Path, tmp_path_factory) -> Path:
    """Kang 1.5k as a SOMA experiment (measurement RNA, X layer raw), as tiledbsoma writes it."""
    uri = tmp_path_factory.mktemp("soma") / "kang"
    soma_io.from_h5ad(str(uri), str(kang1k5), measurement_name="RNA", X_layer_name="raw")
    return uri


@pytest.fixture(scope="module")
def srv():
    with FakeOpenAI(LOOPBACK_KEY, dim=32) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOOPBACK_KEY_ENV, LOOPBACK_KEY)
        yield server


@pytest.fixture(scope="module")
def ray_env(srv, ray_fresh):
    """The loopback server's key is set before the module's Ray starts (its workers see it)."""
    return srv


def _job(path: str, out: Path, table: Path, srv, *sets: str, **sections):
    cfg = job_dict(path, out, table, embed=PLAIN, **sections)
    cfg["genes"]["min_coverage"] = 0.1
    cfg["input"]["rows_per_chunk"] = 256
    cfg["shards"]["rows"] = 256
    cfg["text_model"] = loopback_text_model(srv.base_url)
    return load_config(cfg, list(sets))


def _soma(uri: Path, **soma) -> dict:
    return {"path": f"soma+file://{uri}", "label_key": "cluster_id", "soma": soma}


@pytest.fixture(scope="module")
def runs(experiment, kang1k5, table, ray_env, tmp_path_factory):
    """The h5ad path over every cell, and the SOMA path over a filtered subset (annotated)."""
    root = tmp_path_factory.mktemp("runs")
    h5 = _job(str(kang1k5), root / "h5ad", table, ray_env, "input.label_key=cluster_id")
    run_job(h5, progress=False)
    job = _job(
        "", root / "soma", table, ray_env,
        input=_soma(experiment, obs_value_filter=SUBSET),
        annotate={"enabled": True, "scorers": {"text": 1.0}, "smoothing": 0.0},
    )  # fmt: skip
    summary = run_job(job, progress=False)
    return root / "h5ad", root / "soma", summary


@pytest.mark.slow
@pytest.mark.integration
def test_filtered_subset_equals_the_h5ad_path(runs, kang):
    h5ad, soma, summary = runs
    assert not (soma / "atlas.zarr").exists()  # read in place, no copy
    assert "TileDB-SOMA" in summary.input
    want = kang.obs_names[kang.obs["cluster_id"].isin(["B cells", "CD8 T cells"])]
    assert summary.n_cells == len(want) < kang.n_obs
    a = read_embeddings(h5ad).set_index("obs_name").loc[want]
    b = read_embeddings(soma).set_index("obs_name")
    assert b.index.tolist() == list(want)  # the experiment's order, every selected cell once
    assert np.array_equal(np.stack(a["embedding"]), np.stack(b["embedding"]))  # bit for bit
    assert (a["empty"].to_numpy() == b["empty"].to_numpy()).all()


@pytest.mark.slow
@pytest.mark.integration
def test_export_round_trips_through_to_anndata(runs, experiment, kang, tmp_path, capsys):
    from raypipe.cli import main

    _, soma, _ = runs
    uri = tmp_path / "copy"
    shutil.copytree(experiment, uri)
    cli = [sys.executable, "-m", "raypipe", "export", str(soma), "--soma", str(uri)]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "obsm X_genept_w; obs raypipe_genept_w_label" in done.stdout
    assert not done.stderr.strip()  # quiet: no third-party warning
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        back = soma_io.to_anndata(exp, "RNA", X_layer_name="raw")
    assert back.n_obs == kang.n_obs  # every cell is still there; the run's got results
    emb = read_embeddings(soma).set_index("obs_name")
    rows = back.obs_names.get_indexer(emb.index)
    got = back.obsm["X_genept_w"]
    assert np.array_equal(got[rows], np.stack(emb["embedding"]))
    others = np.setdiff1d(np.arange(back.n_obs), rows)
    assert not got[others].any()  # cells the run did not read have no embedding
    assert (back.X != kang.X).nnz == 0  # X untouched
    ann = pd.concat(
        pq.read_table(p).to_pandas()
        for p in sorted((soma / "annotations" / "genept_w").glob("part-*.parquet"))
    )
    ann = ann.set_index("obs_name").loc[emb.index]
    obs = back.obs.iloc[rows]
    assert obs["raypipe_genept_w_label"].tolist() == ann["label"].tolist()
    np.testing.assert_array_equal(obs["raypipe_genept_w_score"], ann["score"].astype(np.float32))
    mapping = pq.read_table(soma / "annotations" / "label_mapping.parquet").to_pandas()
    to_cl = dict(zip(mapping["label"], mapping["cl_id"], strict=True))
    assert obs["raypipe_genept_w_cl_id"].tolist() == [to_cl[v] or "" for v in ann["label"]]
    assert obs["raypipe_genept_w_cl_id"].str.startswith("CL:").any()
    assert (back.obs.iloc[others]["raypipe_genept_w_label"] == "").all()
    assert back.obs["cluster_id"].tolist() == kang.obs["cluster_id"].tolist()  # kept as it was
    # a second export refuses to overwrite; --overwrite replaces
    assert main(["export", str(soma), "--soma", str(uri)]) == 2
    err = capsys.readouterr().err
    assert "X_genept_w" in err
    assert "--overwrite" in err
    assert main(["export", str(soma), "--soma", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'} is not a TileDB-SOMA experiment" in err
    assert "set --soma to" in err
    assert main(["export", str(soma), "--soma", str(uri), "--overwrite"]) == 0
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        again = soma_io.to_anndata(exp, "RNA", X_layer_name="raw")
    assert np.array_equal(again.obsm["X_genept_w"], got)


@pytest.mark.slow
@pytest.mark.integration
def test_a_soma_run_exports_as_anndata_like_any_run(runs, kang, tmp_path):
    """The atlas view reads like an atlas: `raypipe export --out` streams X from the experiment."""
    import raypipe

    _, soma, _ = runs
    out = raypipe.open_run(soma).export(tmp_path / "subset.h5ad")
    back = ad.read_h5ad(out)
    want = kang[kang.obs["cluster_id"].isin(["B cells", "CD8 T cells"])]
    assert back.obs_names.tolist() == want.obs_names.tolist()
    assert (back.X != want.X).nnz == 0
    assert (
        back.obs["cluster_id"].astype(str).tolist() == want.obs["cluster_id"].astype(str).tolist()
    )
    assert back.obsm["X_genept_w"].shape == (want.n_obs, 32)


def test_census_layout_genes_and_cells(kang, tmp_path):
    """CELLxGENE layout: var indexed by feature_id (Ensembl ids), symbols in feature_name."""
    from raypipe.atlas.soma import SomaRows, resolve_selection
    from raypipe.config import SomaConfig
    from raypipe.genes.identity import gene_names_from_var

    small = kang[:200].copy()
    small.var = pd.DataFrame(
        {"feature_name": small.var_names.to_numpy()},
        index=pd.Index(small.var["ensembl_id"].astype(str).to_numpy(), name="feature_id"),
    )
    uri = tmp_path / "census_like"
    soma_io.from_anndata(str(uri), small, measurement_name="RNA", X_layer_name="raw")
    sel = resolve_selection(f"soma+file://{uri}", SomaConfig(), [])
    assert sel.var.index.tolist() == small.var_names.tolist()  # Ensembl ids
    names, ensembl, note = gene_names_from_var(sel.var)
    assert names == kang.var_names.tolist()  # the symbols, matched first
    assert ensembl == small.var_names.tolist()
    assert "feature_name" in note
    rows = SomaRows(sel.source, sel.joinids)
    assert rows.obs_names(0, 3).tolist() == small.obs_names[:3].tolist()
    assert (rows.rows(0, 200) != sp.csr_matrix(small.X)).nnz == 0


def test_dry_run_counts_the_selected_cells(experiment, kang, table, tmp_path):
    from raypipe.orchestrate.dryrun import dry_run

    data = job_dict("", tmp_path / "out", table, input=_soma(experiment, obs_value_filter=SUBSET))
    text = dry_run(load_config(data))
    n = int(kang.obs["cluster_id"].isin(["B cells", "CD8 T cells"]).sum())
    assert f"{n:,} cells × {kang.n_vars:,} genes" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_grown_experiment_recomputes_only_new_shards(kang, table, ray_env, tmp_path):
    uri = tmp_path / "growing"
    soma_io.from_anndata(str(uri), kang[:1024].copy(), measurement_name="RNA", X_layer_name="raw")
    out = tmp_path / "out"
    first = run_job(_job("", out, table, ray_env, input=_soma(uri)), progress=False)
    assert first.n_shards == 4
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings" / "genept_w").iterdir()}
    rest = kang[1024:].copy()
    reg = soma_io.register_anndatas(
        str(uri), [rest], measurement_name="RNA", obs_field_name="cell_id", var_field_name="var_id"
    )
    reg.prepare_experiment(str(uri))
    soma_io.from_anndata(
        str(uri), rest, measurement_name="RNA", registration_mapping=reg, X_layer_name="raw"
    )
    grown = run_job(_job("", out, table, ray_env, input=_soma(uri)), progress=False)
    assert grown.n_cells == kang.n_obs
    assert grown.shards_skipped == {"genept_w": 4}  # the cells it had: new joinids only
    assert grown.shards_done == {"genept_w": grown.n_shards - 4}
    after = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings" / "genept_w").iterdir()}
    assert all(after[n] == t for n, t in before.items())
    seen = collections.Counter(read_embeddings(out)["obs_name"])
    assert seen == collections.Counter(kang.obs_names)  # every cell exactly once


@pytest.mark.slow
@pytest.mark.integration
def test_a_changed_filter_is_a_different_job(runs, experiment, table, ray_env):
    _, soma, _ = runs
    job = _job(
        "",
        soma,
        table,
        ray_env,
        input=_soma(experiment, obs_value_filter="cluster_id == 'B cells'"),
    )
    with pytest.raises(InputError, match=r"input\.soma\.obs_value_filter was") as err:
        run_job(job, progress=False)
    assert "--overwrite" in err.value.fix


@pytest.mark.parametrize(
    ("soma", "path", "named"),
    [
        ({}, "soma+file:///nonexistent/kang", "/nonexistent/kang is not a TileDB-SOMA experiment"),
        ({"obs_value_filter": "tissue == 'lung'"}, None, "obs_value_filter \"tissue == 'lung'\""),
        ({"obs_value_filter": "cluster_id =="}, None, "cannot select cells"),
        ({"obs_value_filter": "cluster_id == 'lung'"}, None, "selects no cell"),
        ({"measurement": "ATAC"}, None, "no measurement 'ATAC'; measurements: RNA"),
        ({"layer": "counts"}, None, "no X layer 'counts'; layers: raw"),
        ({"obs_columns": ["donor"]}, None, "has no column 'donor'"),
        ({}, "census:homo_sapiens", "census_version is not set"),
    ],
)
def test_bad_uri_filter_measurement_are_named(experiment, table, tmp_path, soma, path, named):
    data = job_dict("", tmp_path / "out", table, input=_soma(experiment, **soma))
    if path:
        data["input"]["path"] = path
    with pytest.raises(InputError) as err:
        validate_job(load_config(data))
    assert named in str(err.value)
    assert "\n" not in err.value.message  # one line, no C++ stack
    assert not (tmp_path / "out").exists()


def test_ingest_refuses_an_experiment(experiment, tmp_path):
    from raypipe.atlas import ingest

    with pytest.raises(InputError, match="TileDB-SOMA experiment: raypipe runs read it in place"):
        ingest(experiment, tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_missing_tiledbsoma_names_the_extra(experiment, table, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # import fails as when not installed
    data = job_dict("", tmp_path / "out", table, input=_soma(experiment))
    with pytest.raises(InputError, match="tiledbsoma") as err:
        validate_job(load_config(data))
    assert "raypipe[soma]" in err.value.fix


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_two_node_ray_job_reads_the_experiment(experiment, kang, table, srv, tmp_path):
    """`ray job submit` on a head + worker cluster: actors on both nodes query the experiment."""
    from cluster_utils import LocalCluster

    out = tmp_path / "cluster-soma"
    sets = {
        "input.path": f"soma+file://{experiment}",
        "input.soma.obs_value_filter": SUBSET,
        "output_dir": out,
        "genes.text_source": "table",
        "genes.table": table,
        "genes.min_coverage": 0.1,
        "text_model.backend": "openai",
        "text_model.model": "fake-embed",
        "text_model.base_url": srv.base_url,
        "text_model.api_key_env": LOOPBACK_KEY_ENV,
        "embed.genept_w.hvg": "null",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cluster = LocalCluster(head_cpus=1)
    try:
        cluster.start()
        cluster.add_worker(num_cpus=1)
        entry = ["python", "jobs/run.py", "--config", "configs/cluster-demo.yaml", *args]
        cluster.submit_job("soma", entry, env_vars={LOOPBACK_KEY_ENV: LOOPBACK_KEY})
        status = cluster.wait_job("soma", timeout=480)
        logs = cluster.job_logs("soma")
    finally:
        cluster.stop()
    assert status == "SUCCEEDED", logs[-4000:]
    assert "Ray cluster" in logs  # the driver joined the cluster
    assert "TileDB-SOMA" in logs
    assert not (out / "atlas.zarr").exists()
    want = kang.obs_names[kang.obs["cluster_id"].isin(["B cells", "CD8 T cells"])]
    seen = collections.Counter(read_embeddings(out)["obs_name"])
    assert seen == collections.Counter(want)  # every selected cell exactly once


@pytest.mark.slow
@pytest.mark.integration
def test_kang8k_subset_equals_the_h5ad_path(kang8k, shared_data, ray_env, tmp_path):
    """The issue's "Done when" on Kang 8k: a local SOMA experiment, a filtered subset."""
    adata = ad.read_h5ad(kang8k)
    table = write_real_gene_table(shared_data, tmp_path / "genes.tsv", list(adata.var_names))
    uri = tmp_path / "kang8k"
    soma_io.from_h5ad(str(uri), str(kang8k), measurement_name="RNA", X_layer_name="raw")
    label = adata.obs["cluster_id"].astype(str)
    keep = sorted(label.unique())[:2]
    where = " or ".join(f"cluster_id == '{v}'" for v in keep)
    run_job(_job(str(kang8k), tmp_path / "h5ad", table, ray_env), progress=False)
    summary = run_job(
        _job("", tmp_path / "soma", table, ray_env, input=_soma(uri, obs_value_filter=where)),
        progress=False,
    )
    want = adata.obs_names[label.isin(keep)]
    assert summary.n_cells == len(want) < adata.n_obs
    a = read_embeddings(tmp_path / "h5ad").set_index("obs_name").loc[want]
    b = read_embeddings(tmp_path / "soma").set_index("obs_name")
    assert b.index.tolist() == list(want)
    assert np.array_equal(np.stack(a["embedding"]), np.stack(b["embedding"]))


@pytest.mark.integration
def test_an_experiment_in_a_bucket_is_read_like_a_local_one(experiment, kang, tmp_path):
    """soma+s3:// on a moto S3 server: TileDB gets the endpoint; credentials from the env."""
    from servers.s3 import moto_env

    from raypipe.atlas.soma import SomaRows, is_soma_input, resolve_selection
    from raypipe.config import SomaConfig
    from raypipe.core import storage

    with moto_env("experiments"):
        fs = storage.open_fs("s3")
        fs.put(str(experiment), "experiments/kang", recursive=True)
        assert is_soma_input("s3://experiments/kang")  # a bucket's TileDB group, no prefix
        assert not is_soma_input("s3://experiments/other")
        cfg = SomaConfig(obs_value_filter=SUBSET)
        remote = resolve_selection("soma+s3://experiments/kang", cfg, ["cluster_id"])
        local = resolve_selection(f"soma+file://{experiment}", cfg, ["cluster_id"])
        assert np.array_equal(remote.joinids, local.joinids)
        a = SomaRows(remote.source, remote.joinids)
        b = SomaRows(local.source, local.joinids)
        assert (a.rows(0, 200) != b.rows(0, 200)).nnz == 0
        assert a.obs_names(0, 200).tolist() == b.obs_names(0, 200).tolist()
