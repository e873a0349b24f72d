"""A run never loses a user's data and never lies about being complete (issues 10 and 11).

- ``--overwrite`` deletes only what raypipe provably wrote;
- a job is validated before its output folder (or a previous run's manifest) is touched;
- every failure after that leaves ``status: failed`` with the reason;
- a resume of a finished run reads no expression data (planning is pure; the HVG moments
  pass is cached under ``state/``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_factory import job_dict, make_adata, write_gene_table, write_h5ad

from raypipe.atlas import ingest
from raypipe.config import load_config
from raypipe.errors import InputError
from raypipe.orchestrate.runner import run_job

pytestmark = [pytest.mark.integration, pytest.mark.shared_gene_cache]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ray_local):
    root = tmp_path_factory.mktemp("safety")
    table = write_gene_table(root / "genes.tsv")
    h5 = write_h5ad(root / "cells.h5ad", make_adata(300, seed=5))
    return root, table, h5


@pytest.fixture(scope="module")
def complete(env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run that the tests needing one copy (a run costs seconds; a copy nothing)."""
    out = tmp_path_factory.mktemp("complete") / "run"
    run_job(_job(env, out), progress=False)
    return out


def _copy_of(complete: Path, out: Path) -> Path:
    shutil.copytree(complete, out)
    return out


def _job(env, out: Path, *overrides: str, input_path=None):
    _, table, h5 = env
    cfg = job_dict(input_path or h5, out, table)
    cfg["input"]["label_key"] = "cell_type"
    return load_config(cfg, list(overrides))


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_overwrite_never_deletes_a_folder_raypipe_did_not_write(env, tmp_path):
    foreign = tmp_path / "p"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "manifest.json").write_text("{}")
    (foreign / "sub" / "results.csv").write_text("x\n")
    with pytest.raises(InputError, match="raypipe did not write"):
        run_job(_job(env, foreign), overwrite=True, progress=False)
    assert (foreign / "sub" / "results.csv").read_text() == "x\n"
    assert (foreign / "manifest.json").read_text() == "{}"


@pytest.mark.slow
def test_overwrite_deletes_only_raypipes_own_entries(env, complete, tmp_path):
    out = _copy_of(complete, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "embeddings" / "genept_w" / "stale-extra.parquet").write_text("old")
    summary = run_job(_job(env, out), overwrite=True, progress=False)
    assert summary.shards_done == {"genept_w": 3}  # everything recomputed
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "embeddings" / "genept_w" / "stale-extra.parquet").exists()
    assert any("notes.txt" in w for w in summary.warnings)
    assert _manifest(out)["status"] == "complete"


def test_a_failed_rerun_keeps_the_record_of_a_complete_run(env, complete, tmp_path):
    out = _copy_of(complete, tmp_path / "complete")
    before = (out / "manifest.json").read_text()
    with pytest.raises(InputError, match="no column 'celltype'"):
        run_job(_job(env, out, "input.label_key=celltype"), progress=False)
    assert (out / "manifest.json").read_text() == before
    m = _manifest(out)
    assert m["status"] == "complete"
    for section in ("atlas", "genes", "methods", "timings", "warnings", "outputs"):
        assert section in m, section


def test_every_failure_after_validation_ends_failed_with_the_reason(env, tmp_path):
    genes = ["CD3D", "CD3E", *[f"NOTAGENE{i}" for i in range(38)]]
    h5 = write_h5ad(tmp_path / "odd.h5ad", make_adata(100, genes, seed=3))
    out = tmp_path / "odd"
    with pytest.raises(InputError, match=r"genes\.min_coverage"):
        run_job(_job(env, out, input_path=h5), progress=False)
    m = _manifest(out)
    assert m["status"] == "failed"
    assert "covered" in m["error"]
    assert "atlas" in m  # it records how far the run got
    assert "finished" in m


def test_bad_input_creates_nothing(env, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(InputError, match="does not exist"):
        run_job(_job(env, out, input_path=tmp_path / "missing.h5ad"), progress=False)
    assert not out.exists()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(InputError, match="cannot be created or written"):
        run_job(_job(env, afile / "sub"), progress=False)


def test_same_input_through_dotdot_is_the_same_run(env, complete, tmp_path):
    _, _, h5 = env
    out = _copy_of(complete, tmp_path / "dotdot")
    via = h5.parent / ".." / h5.parent.name / h5.name
    again = run_job(_job(env, out, input_path=via), progress=False)
    assert again.shards_done == {"genept_w": 0}


@pytest.mark.slow
def test_resume_with_default_hvg_reads_no_expression_data(env, tmp_path):
    """The whole second run works without X: every chunk of X is gone from the atlas."""
    _, _, h5 = env
    atlas = tmp_path / "atlas.zarr"
    ingest(h5, atlas, rows_per_chunk=64, progress=False)
    out = tmp_path / "resume"
    job = _job(
        env,
        out,
        "annotate.enabled=true",
        "evaluate.enabled=true",
        "evaluate.report=false",
        input_path=atlas,
    )
    assert job.embed.genept_w.hvg == 500  # the production default
    first = run_job(job, progress=False)
    assert first.shards_done == {"genept_w": 3}
    assert len(list((out / "state" / "gene_moments").glob("part-*.parquet"))) == 3
    chunks = [f for f in (atlas / "X").rglob("*") if f.is_file() and "c" in f.parts[-3:-1]]
    assert chunks
    for f in chunks:  # every stored chunk of X now fails to decode if anything reads it
        f.write_bytes(b"not a zarr chunk")
    again = run_job(job, progress=False)
    assert again.shards_done == {"genept_w": 0}
    m = _manifest(out)
    assert m["status"] == "complete"
    assert m["annotate"]["methods"]["genept_w"]["shards_computed"] == 0
    assert m["evaluation"]["reused"] is True
    assert again.metrics is not None
