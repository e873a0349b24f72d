"""End-to-end GenePT-w runs on a local Ray: outputs, math, shard independence, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_factory import (
    GENES,
    PLAIN_GENEPT_W,
    dense_genept_w,
    job_dict,
    make_adata,
    read_embeddings,
    write_gene_table,
    write_h5ad,
)

from raypipe.atlas import ingest
from raypipe.config import load_config
from raypipe.core.outputs import marker_path, part_path, read_marker
from raypipe.errors import InputError
from raypipe.genes.space import CACHE_FILE
from raypipe.orchestrate.runner import run_job

pytestmark = [pytest.mark.integration, pytest.mark.shared_gene_cache]

# The runs here are compared with dense_genept_w, the paper's plain GenePT-w: plain settings.
PLAIN = {"methods": ["genept_w"], "genept_w": PLAIN_GENEPT_W}

N_CELLS = 600
N_SHARDS = 5  # rows_per_chunk 64, shards.rows 128


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ray_local):
    root = tmp_path_factory.mktemp("pipeline")
    table = write_gene_table(root / "gene_texts.tsv")
    adata = make_adata(N_CELLS, seed=21, zero_rows=(10,))
    h5 = write_h5ad(root / "cells.h5ad", adata)
    atlas = root / "atlas.zarr"
    ingest(h5, atlas, rows_per_chunk=64, progress=False)
    base = root / "base"
    summary = run_job(load_config(job_dict(atlas, base, table, embed=PLAIN)), progress=False)
    return SimpleNamespace(
        root=root, table=table, adata=adata, h5=h5, atlas=atlas, base=base, summary=summary
    )


def _run(env, out: Path, *overrides: str, input_path=None, overwrite=False, seed=True, table=None):
    """Run a job; new output folders get the module's gene embeddings (no re-embedding)."""
    if seed and not out.exists():
        (out / CACHE_FILE).parent.mkdir(parents=True)
        shutil.copy(env.base / CACHE_FILE, out / CACHE_FILE)
    cfg = job_dict(input_path or env.atlas, out, table or env.table, embed=PLAIN)
    job = load_config(cfg, list(overrides))
    return run_job(job, overwrite=overwrite, progress=False)


def _gene_matrix(out: Path) -> np.ndarray:
    cache = pq.read_table(out / CACHE_FILE).to_pandas()
    by_symbol = dict(zip(cache["symbol"], cache["embedding"], strict=True))
    return np.stack([np.asarray(by_symbol[g], dtype=np.float64) for g in GENES])


def _emb(df) -> np.ndarray:
    return np.stack(df["embedding"].to_numpy()).astype(np.float64)


def test_outputs_schema_order_norm_and_math(env):
    s = env.summary
    assert s.n_cells == N_CELLS
    assert s.n_shards == N_SHARDS
    assert s.shards_done == {"genept_w": N_SHARDS}
    parts = sorted((env.base / "embeddings" / "genept_w").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(N_SHARDS)]
    schema = pq.read_schema(parts[0])
    assert schema.field("obs_name").type == pa.string()
    assert schema.field("shard").type == pa.int32()
    assert schema.field("row").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert schema.field("empty").type == pa.bool_()
    assert schema.metadata[b"method"] == b"genept_w"
    df = read_embeddings(env.base)
    assert df["obs_name"].tolist() == list(env.adata.obs_names)
    assert df["row"].tolist() == list(range(N_CELLS))
    assert df["shard"].tolist() == [r // 128 for r in range(N_CELLS)]
    emb = _emb(df)
    assert not np.isnan(emb).any()
    assert df["empty"].tolist() == [i == 10 for i in range(N_CELLS)]
    assert np.all(emb[10] == 0)
    np.testing.assert_allclose(np.linalg.norm(np.delete(emb, 10, axis=0), axis=1), 1.0, atol=1e-5)
    ref = dense_genept_w(env.adata.X.toarray(), _gene_matrix(env.base))
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    manifest = json.loads((env.base / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["genes"]["coverage"]["share"] == 1.0
    assert manifest["shards"] == {"n": N_SHARDS, "rows": 128}
    assert manifest["methods"]["genept_w"]["shards_computed"] == N_SHARDS
    assert "sentence-transformers" in manifest["versions"]
    text = s.render()
    assert "600 in 5 shards" in text
    assert "genept_w    5 shards computed, 0 reused" in text


def test_rerun_reuses_every_shard(env):
    before = {p: p.stat().st_mtime_ns for p in (env.base / "embeddings" / "genept_w").iterdir()}
    s = _run(env, env.base)
    assert s.shards_done == {"genept_w": 0}
    assert s.shards_skipped == {"genept_w": N_SHARDS}
    after = {p: p.stat().st_mtime_ns for p in (env.base / "embeddings" / "genept_w").iterdir()}
    assert before == after


@pytest.mark.slow
def test_independent_of_shard_size_and_actor_count(env):
    hvg = ("embed.genept_w.hvg=20", "embed.genept_w.center=true")
    small = _run(env, env.root / "s64", *hvg, "shards.rows=64", "ray.actors=1")
    big = _run(env, env.root / "s256", *hvg, "shards.rows=256", "ray.actors=2")
    assert (small.n_shards, big.n_shards) == (10, 3)
    a = read_embeddings(env.root / "s64").set_index("obs_name")
    b = read_embeddings(env.root / "s256").set_index("obs_name").loc[a.index]
    np.testing.assert_allclose(_emb(a), _emb(b), atol=1e-6)
    assert (a["empty"] == b["empty"]).all()
    m = json.loads((env.root / "s64" / "manifest.json").read_text())
    assert m["methods"]["genept_w"]["hvg_genes"] == 20
    # the variant differs from the plain method
    plain = read_embeddings(env.base).set_index("obs_name").loc[a.index]
    assert not np.allclose(_emb(a), _emb(plain), atol=1e-3)


@pytest.mark.slow
def test_changed_setting_recomputes_that_method(env):
    out = env.root / "setting"
    assert _run(env, out).shards_done == {"genept_w": N_SHARDS}
    fp = read_marker(marker_path(out, "genept_w", 0))["fingerprint"]
    s = _run(env, out, "embed.genept_w.center=true")
    assert s.shards_done == {"genept_w": N_SHARDS}
    assert read_marker(marker_path(out, "genept_w", 0))["fingerprint"] != fp
    assert _run(env, out, "embed.genept_w.center=true").shards_done == {"genept_w": 0}
    s = _run(env, out, "embed.genept_w.center=true", overwrite=True, seed=False)
    assert s.shards_done == {"genept_w": N_SHARDS}
    assert (out / CACHE_FILE).exists()


def test_changed_row_recomputes_only_its_shard(env):
    src = env.root / "mutable.h5ad"
    shutil.copy(env.h5, src)
    out = env.root / "rowchange"
    assert _run(env, out, input_path=src).shards_done == {"genept_w": N_SHARDS}
    before = read_embeddings(out)
    markers = {i: read_marker(marker_path(out, "genept_w", i)) for i in range(N_SHARDS)}
    changed = env.adata.copy()
    x = changed.X.tolil()
    x[300, 2] = x[300, 2] + 50  # row 300 is in shard 2 (rows 256..383)
    changed.X = x.tocsr()
    write_h5ad(src, changed)
    s = _run(env, out, input_path=src)
    assert s.shards_done == {"genept_w": 1}
    assert s.shards_skipped == {"genept_w": N_SHARDS - 1}
    for i in range(N_SHARDS):
        now = read_marker(marker_path(out, "genept_w", i))
        assert (now == markers[i]) == (i != 2), i
    after = read_embeddings(out)
    diff = np.flatnonzero(np.abs(_emb(before) - _emb(after)).max(axis=1) > 1e-7)
    assert diff.tolist() == [300]


@pytest.mark.slow
def test_interrupted_run_recomputes_unfinished_shards(env):
    out = env.root / "crash"
    shutil.copytree(env.base, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    # shards 1 and 3: part written, marker not (a crash between the two)
    marker_path(out, "genept_w", 1).unlink()
    marker_path(out, "genept_w", 3).unlink()
    # shard 4: marker left but its part is gone; plus a stray temporary file
    part_path(out, "embeddings", "genept_w", 4).unlink()
    stray = out / "embeddings" / "genept_w" / ".part-00002.parquet.dead0000.tmp"
    stray.write_bytes(b"half a parquet")
    s = _run(env, out)
    assert s.shards_done == {"genept_w": 3}
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    a, b = read_embeddings(out), read_embeddings(env.base)
    assert a["obs_name"].tolist() == b["obs_name"].tolist()
    np.testing.assert_allclose(_emb(a), _emb(b), atol=1e-6)


def test_failed_run_never_looks_complete(env):
    out = env.root / "fail"
    with pytest.raises(InputError) as err:
        _run(env, out, "input.label_key=celltype")
    msg = str(err.value)
    assert "no column 'celltype'" in msg
    assert "columns present: cell_type, donor" in msg
    # the job is validated before the output is touched (issue 10): no manifest, no parts
    assert not (out / "manifest.json").exists()
    assert not (out / "embeddings").exists()
    s = _run(env, out, "input.label_key=cell_type", "input.batch_key=donor")
    assert s.shards_done == {"genept_w": N_SHARDS}
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_duplicate_genes_summed_like_presummed_columns(env):
    genes = [*GENES, "CD3D"]
    dup = make_adata(200, genes, seed=31, zero_rows=(4,))
    x = dup.X.toarray()
    summed = x[:, :40].copy()
    summed[:, 0] += x[:, 40]  # CD3D is column 0 and column 40
    pre = make_adata(200, GENES, seed=31, x=summed)
    h_dup = write_h5ad(env.root / "dup.h5ad", dup)
    h_pre = write_h5ad(env.root / "pre.h5ad", pre)
    s = _run(env, env.root / "dup", input_path=h_dup)
    assert any("'CD3D', 'CD3D'" in w and "summed" in w for w in s.warnings)
    _run(env, env.root / "pre", input_path=h_pre)
    a, b = read_embeddings(env.root / "dup"), read_embeddings(env.root / "pre")
    assert a["empty"].tolist() == [i == 4 for i in range(200)]
    np.testing.assert_allclose(_emb(a), _emb(b), atol=1e-6)


@pytest.mark.slow
def test_genes_in_neither_id_space(env):
    genes = [*GENES[:10], *[f"LOC{i}X" for i in range(30)]]
    h5 = write_h5ad(env.root / "unknown.h5ad", make_adata(64, genes, seed=41))
    with pytest.raises(InputError) as err:
        _run(env, env.root / "unknown", input_path=h5)
    msg = str(err.value)
    assert "only 25.0% of atlas genes with text (table) are covered (10 of 40; required 50%)" in msg
    assert "LOC0X, LOC1X" in msg
    assert "genes.min_coverage" in msg


def test_output_dir_guards(env):
    # another input that lacks some of the run's cells (one holding them all may take over:
    # a grown atlas under a new name, tests/test_reprocess.py)
    fewer = write_h5ad(env.root / "fewer.h5ad", env.adata[:100].copy())
    with pytest.raises(InputError) as err:
        _run(env, env.base, input_path=fewer)
    assert f"holds a run of a different input ({env.atlas})" in str(err.value)
    assert "does not hold every cell of it" in str(err.value)
    assert "--overwrite" in str(err.value)
    foreign = env.root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="not empty and holds no raypipe manifest"):
        _run(env, foreign, seed=False)
    with pytest.raises(InputError, match="refuses to delete"):
        _run(env, foreign, seed=False, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "do not delete"
