"""Every input is checked before the first write, and the small defects of issue 20.

Each test here failed before the change it guards:
- a bad LangCell checkpoint stops ``raypipe run`` before anything is written (one error);
- blank labels are missing labels, never a candidate;
- ``annotate.markers`` / ``annotate.mapping`` keys that name no candidate fail, naming the
  nearest one; config markers none of which is in the atlas are dropped loudly;
- ``raypipe.embed`` honours ``gene_symbol_column`` and names the user's input on 0 cells;
- ``raypipe ce score`` refuses float/string token ids, repeated cell names and 0 rows;
- ``--overwrite`` refuses (without ``--force``) foreign files inside raypipe's folders, locally
  and on S3;
- a Ctrl-C while Ray shuts down ends the process cleanly (no atexit traceback, no SIGSEGV).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from data_factory import GENES, job_dict, make_adata, write_gene_table, write_h5ad
from servers.s3 import moto_env

from raypipe.cli import main
from raypipe.config import load_config
from raypipe.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- checkpoints
def _langcell_job(shared_data: Path, ckpt: Path, out: Path):
    kang = shared_data / "cells" / "kang2018_pbmc_ctrl_stim_1.5k_muscat_example_sce.h5ad"
    return load_config(
        {
            "input": {"path": str(kang)},
            "output_dir": str(out),
            "genes": {"text_source": "symbol", "min_coverage": 0.1},
            "embed": {"methods": ["ce"], "ce": {"model": str(ckpt), "variant": "langcell"}},
            "annotate": {"enabled": True, "candidates": ["B cell"], "scorers": {"langcell": 1.0}},
        }
    )


def test_incomplete_langcell_checkpoint_fails_before_anything_is_written(shared_data, tmp_path):
    from raypipe.orchestrate.runner import run_job

    ckpt = tmp_path / "ckpt"
    shutil.copytree(shared_data / "langcell" / "ckpt", ckpt)
    (ckpt / "text_proj.bin").unlink()
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"LangCell checkpoint .* lacks text_proj\.bin"):
        run_job(_langcell_job(shared_data, ckpt, out), progress=False)
    assert not out.exists()  # no atlas, genes or annotations were written first


@pytest.mark.slow
def test_bad_langcell_head_fails_before_anything_is_written(shared_data, tmp_path):
    """A head of the wrong shape: found by loading the checkpoint on the driver."""
    import torch

    from raypipe.orchestrate.runner import run_job

    ckpt = tmp_path / "ckpt"
    shutil.copytree(shared_data / "langcell" / "ckpt", ckpt)
    torch.save({"weight": torch.zeros(3, 7), "bias": torch.zeros(3)}, ckpt / "ctm_head.bin")
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"LangCell ctm_head .*ctm_head\.bin maps 7 → 3"):
        run_job(_langcell_job(shared_data, ckpt, out), progress=False)
    assert not out.exists()  # no atlas, genes or annotations were written first


# ---------------------------------------------------------------------------- candidates
def test_blank_labels_are_missing_never_a_candidate(tmp_path):
    from raypipe.annotate.prepare import _candidate_names
    from raypipe.atlas import ingest
    from raypipe.core.labels import missing_labels

    adata = make_adata(40, seed=2)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[:7], labels[7:9] = "", "  "
    adata.obs["cell_type"] = pd.Categorical(labels)
    atlas = ingest(write_h5ad(tmp_path / "c.h5ad", adata), tmp_path / "a.zarr").atlas
    job = load_config(
        job_dict(tmp_path / "c.h5ad", tmp_path / "run", tmp_path / "g.tsv"),
        ["input.label_key=cell_type"],
    )
    names = _candidate_names(job, atlas)
    assert "" not in names
    assert "  " not in names
    assert names == sorted(set(labels[9:]))
    assert missing_labels(pd.Series(["B", "", " ", None, np.nan])).tolist() == [
        False,
        True,
        True,
        True,
        True,
    ]


@pytest.mark.parametrize(
    ("section", "entry", "nearest"),
    [
        ("markers", {"B cells": ["MS4A1"]}, "B cell"),
        ("mapping", {"natural killer": "CL:0000623"}, "natural killer cell"),
    ],
)
def test_a_key_naming_no_candidate_fails_naming_the_nearest(section, entry, nearest, tmp_path):
    from raypipe.annotate.prepare import check_annotate_config

    job = load_config(
        job_dict(
            tmp_path / "c.h5ad",
            tmp_path / "run",
            tmp_path / "g.tsv",
            annotate={
                "enabled": True,
                "candidates": ["B cell", "natural killer cell", "monocyte"],
                section: entry,
            },
        )
    )
    with pytest.raises(ConfigError, match=f"nearest candidate is '{nearest}'") as info:
        check_annotate_config(job)
    assert f"annotate.{section} has a key {next(iter(entry))!r}" in str(info.value)


def test_a_marker_key_is_checked_against_the_label_column(kang1k5, tmp_path):
    """Candidates from input.label_key: the check runs where the labels are read (validate_job)."""
    from raypipe.orchestrate.prepare import validate_job

    job = load_config(
        {
            "input": {"path": str(kang1k5), "label_key": "cluster_id"},
            "output_dir": str(tmp_path / "run"),
            "genes": {"text_source": "symbol"},
            "annotate": {"enabled": True, "markers": {"CD4 T cell": ["CD4"]}},
        }
    )
    with pytest.raises(ConfigError, match="nearest candidate is 'CD4 T cells'"):
        validate_job(job)
    assert not (tmp_path / "run").exists()


def test_config_markers_absent_from_the_atlas_fall_back_loudly():
    from raypipe.annotate.checks import markers_in_atlas

    atlas = {"MS4A1", "CD79A"}
    warnings: list[str] = []
    kept = markers_in_atlas(
        {"B cell": ["MS4A1", "NOPE1"], "T cell": ["CD3E", "CD3D"]},
        lambda g: [g] if g in atlas else [],
        warnings,
    )
    assert kept == {"B cell": ["MS4A1", "NOPE1"]}
    assert len(warnings) == 1
    assert "'T cell': none of CD3E, CD3D is in the atlas" in warnings[0]
    assert "Cell Ontology" in warnings[0]


# ---------------------------------------------------------------------------- raypipe.embed
def test_embed_honours_gene_symbol_column(tmp_path):
    """var names are opaque ids, symbols in var['hgnc']: checked and written as the run reads them."""
    import anndata as ad

    from raypipe.genes.identity import gene_names_from_var
    from raypipe.orchestrate.adata_input import check_gene_names, matrix_to_embed, write_input

    adata = make_adata(30, seed=1)
    adata.var["hgnc"] = adata.var_names.to_numpy()
    adata.var_names = [f"probe-{i}" for i in range(adata.n_vars)]
    table = write_gene_table(tmp_path / "genes.tsv")
    job = load_config(
        job_dict(tmp_path / "in.h5ad", tmp_path / "run", table),
        ["input.gene_symbol_column=hgnc"],
    )
    matrix, var = matrix_to_embed(adata, None)
    check_gene_names(var, job)  # raised "only 0% of adata.var_names are known" before
    write_input(tmp_path / "in.h5ad", adata, matrix, var, job)
    written = ad.read_h5ad(tmp_path / "in.h5ad").var
    names, _, note = gene_names_from_var(written, "hgnc")  # raised "columns: (none)" before
    assert names == GENES[: len(names)]
    assert note is not None


@pytest.mark.slow
def test_embed_with_gene_symbol_column_end_to_end(tmp_path):
    """The issue's case: raypipe.embed(adata, input={"gene_symbol_column": "hgnc"}) runs."""
    import raypipe

    adata = make_adata(60, seed=4)
    adata.var["hgnc"] = adata.var_names.to_numpy()
    adata.var_names = [f"probe-{i}" for i in range(adata.n_vars)]
    table = write_gene_table(tmp_path / "genes.tsv")
    out = raypipe.embed(
        adata,
        input={"gene_symbol_column": "hgnc"},
        genes={"text_source": "table", "table": str(table)},
        ray={"num_cpus": 2, "actors": 1, "actor_cpus": 0.5},
        progress=False,
    )
    x = out.obsm["X_genept_w"]
    assert x.shape[0] == 60
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_embed_zero_cells_names_the_users_input(tmp_path):
    import raypipe

    adata = make_adata(20)[:0].copy()
    with pytest.raises(InputError) as info:
        raypipe.embed(adata, output_dir=str(tmp_path / "run"))
    assert str(info.value).startswith("adata has 0 cells")
    assert "embed_input" not in str(info.value)
    assert "raypipe-embed-" not in str(info.value)


# ---------------------------------------------------------------------------- ce score input
def _tokens(path: Path, names: list[str], ids: pa.Array) -> Path:
    pq.write_table(pa.table({"obs_name": names, "input_ids": ids}), path)
    return path


@pytest.mark.parametrize(
    ("case", "names", "ids", "says"),
    [
        (
            "float ids",
            ["a", "b"],
            pa.array([[3.7, 5.2], [4.0]]),
            "double>, not lists of integer token ids",
        ),
        (
            "string ids",
            ["a", "b"],
            pa.array([["3", "5"], ["4"]]),
            "string>, not lists of integer token ids",
        ),
        ("duplicate names", ["a", "a"], pa.array([[3, 5], [4]]), "share 1 obs_name(s) (e.g. 'a')"),
        ("no rows", [], pa.array([], pa.list_(pa.int64())), "has no rows"),
    ],
)
def test_ce_score_refuses_bad_tokens(case, names, ids, says, shared_data, tmp_path, capsys):
    tokens = _tokens(tmp_path / "t.parquet", names, ids)
    argv = ["ce", "score", str(tokens), "--model", str(shared_data / "langcell" / "ckpt")]
    argv += ["--texts", str(shared_data / "langcell" / "texts.json"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--no-progress"]) == 2, case
    err = capsys.readouterr().err
    assert err.startswith(f"error: tokens parquet {tokens}")
    assert says in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- --overwrite
def _old_run(out, job) -> None:
    from raypipe.orchestrate.manifest import Manifest

    Manifest(config=job.model_dump(mode="json"), config_hash="x", status="complete").write(out)


def test_overwrite_refuses_foreign_files_at_any_depth(tmp_path):
    from raypipe.orchestrate.outdir import check_output_dir

    out = tmp_path / "run"
    job = load_config(job_dict(tmp_path / "c.h5ad", out, tmp_path / "g.tsv"))
    (out / "embeddings" / "genept_w").mkdir(parents=True)
    (out / "embeddings" / "genept_w" / "part-00000.parquet").write_bytes(b"x")
    (out / "embeddings" / "genept_w" / "mine.csv").write_text("mine")
    (out / "state" / "notes").mkdir(parents=True)
    (out / "state" / "notes" / "todo.txt").write_text("mine")
    _old_run(out, job)
    with pytest.raises(InputError) as info:
        check_output_dir(out, job, overwrite=True)
    msg = str(info.value)
    assert "embeddings/genept_w/mine.csv" in msg
    assert "state/notes/todo.txt" in msg
    assert "part-00000" not in msg
    assert "--force" in msg
    assert check_output_dir(out, job, overwrite=True, force=True) is not None


def test_overwrite_refuses_foreign_objects_at_any_depth_on_s3(tmp_path):
    from raypipe.core import storage
    from raypipe.orchestrate.outdir import check_output_dir

    with moto_env("runs"):
        fs = storage.open_fs("s3")
        fs.pipe_file("runs/x/embeddings/genept_w/part-00000.parquet", b"x")
        fs.pipe_file("runs/x/embeddings/genept_w/mine.csv", b"mine")
        out = storage.as_path("s3://runs/x")
        job = load_config(job_dict(tmp_path / "c.h5ad", "s3://runs/x", tmp_path / "g.tsv"))
        _old_run(out, job)
        with pytest.raises(InputError, match=r"embeddings/genept_w/mine\.csv"):
            check_output_dir(out, job, overwrite=True)
        assert fs.exists("runs/x/embeddings/genept_w/mine.csv")


# ---------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_during_ray_shutdown_exits_cleanly(tmp_path):
    """SIGINT right after the summary (Ray shutting down): no traceback, no SIGSEGV (rc 139)."""
    table = write_gene_table(tmp_path / "genes.tsv")
    h5 = write_h5ad(tmp_path / "cells.h5ad", make_adata(64, seed=3))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job_dict(h5, tmp_path / "run", table)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "raypipe", "run", str(cfg), "--no-progress"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("  ") and line.rstrip().endswith("manifest.json"):
            break  # the summary is out: the process now shuts Ray down
    for _ in range(10):  # Ctrl-C, again and again, while Ray shuts down
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert "atexit" not in err
