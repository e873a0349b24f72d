"""An AnnData ``.zarr`` read where it is (issue #21, item 1): no ingest copy, same embeddings.

The store's own chunk grid gives the row chunks, chunk-byte hashes are cached and local to the
chunks that changed, and dense / CSC / too-coarse X still go through ingest with the reason
in the summary. The end-to-end runs use the real Kang files (1.5k here, 8k as `slow`).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from data_factory import (
    LOOPBACK_KEY,
    LOOPBACK_KEY_ENV,
    job_dict,
    loopback_text_model,
    read_embeddings,
    write_anndata_zarr,
    write_real_gene_table,
)
from servers.openai_server import FakeOpenAI

from raypipe.atlas.store import ZarrRows, open_atlas, plan_shards, read_shard
from raypipe.atlas.views import VIEW, inplace_layout, zarr_view
from raypipe.config import load_config
from raypipe.errors import InputError
from raypipe.orchestrate.prepare import ensure_atlas
from raypipe.orchestrate.runner import run_job

PLAIN = {"methods": ["genept_w"], "genept_w": {"hvg": None}}


@pytest.fixture(scope="module")
def kang(kang1k5: Path) -> ad.AnnData:
    return ad.read_h5ad(kang1k5)


@pytest.fixture(scope="module")
def table(shared_data: Path, kang: ad.AnnData, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("genes") / "kang_genes.tsv"
    return write_real_gene_table(shared_data, path, list(kang.var_names))


@pytest.fixture(scope="module")
def srv():
    """Gene texts are embedded by a loopback OpenAI server (set up before the module's Ray)."""
    with FakeOpenAI(LOOPBACK_KEY, dim=32) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOOPBACK_KEY_ENV, LOOPBACK_KEY)
        yield server


@pytest.fixture(scope="module")
def ray_env(srv, ray_fresh):
    return srv


def _job(src: Path, out: Path, table: Path, *sets: str, embed=None, srv=None):
    cfg = job_dict(src, out, table, embed=embed or PLAIN)
    cfg["genes"]["min_coverage"] = 0.1
    cfg["input"]["rows_per_chunk"] = 256
    cfg["shards"]["rows"] = 512
    if srv is not None:
        cfg["text_model"] = loopback_text_model(srv.base_url)
    return load_config(cfg, list(sets))


# ------------------------------------------------------------------------- pure, fast


def test_layout_follows_the_store_chunk_grid(kang, tmp_path):
    store = write_anndata_zarr(tmp_path / "k.zarr", kang, chunk=32_768)
    job = _job(store, tmp_path / "out", tmp_path / "t.tsv")
    layout, why = inplace_layout(store, job)
    assert why == ""
    per_cell = kang.X.nnz / kang.n_obs
    chunk_rows = int(np.ceil(32_768 / per_cell))
    assert layout["rows_per_chunk"] % chunk_rows == 0  # whole data chunks per row chunk
    assert chunk_rows <= layout["rows_per_chunk"] <= 256


@pytest.mark.parametrize(
    ("x", "chunk", "reason"),
    [
        ("dense", 0, "is a dense array"),
        ("csc", 0, "is stored as CSC"),
        ("csr", 10_000_000, "more than a shard (shards.rows = 512)"),
    ],
)
def test_what_cannot_be_read_in_place_says_why(kang, tmp_path, x, chunk, reason):
    store = write_anndata_zarr(tmp_path / "k.zarr", kang[:300].copy(), x=x, chunk=chunk or 32_768)
    layout, why = inplace_layout(store, _job(store, tmp_path / "out", tmp_path / "t.tsv"))
    assert layout is None
    assert reason in why


def test_dense_x_is_ingested_and_the_summary_says_why(kang, tmp_path):
    store = write_anndata_zarr(tmp_path / "dense.zarr", kang[:300].copy(), x="dense")
    out = tmp_path / "out"
    atlas = ensure_atlas(_job(store, out, tmp_path / "t.tsv"), out, progress=False)
    assert (out / "atlas.zarr").is_dir()
    assert atlas.path == str(out / "atlas.zarr")
    assert "because X is a dense array" in atlas.extra["input"]


def test_chunk_hashes_are_cached_and_follow_the_changed_chunk(kang, tmp_path):
    store = write_anndata_zarr(tmp_path / "k.zarr", kang, chunk=16_384)
    out = tmp_path / "out"
    job = _job(store, out, tmp_path / "t.tsv", "input.rows_per_chunk=64")
    layout, _ = inplace_layout(store, job)
    first = zarr_view(store, layout, job, out)
    assert not (out / "atlas.zarr").exists()
    n_files = first.extra["chunk_files_hashed"]
    assert n_files == 2 * int(np.ceil(kang.X.nnz / 16_384))  # data + indices, each file once
    again = zarr_view(store, layout, job, out)
    assert again.extra["chunk_files_hashed"] == 0  # the cache: sizes and mtimes unchanged
    assert again.chunk_hashes == first.chunk_hashes
    # change one stored value: only the row chunks whose values lie in that data chunk change
    data = zarr.open_group(str(store), mode="r+")["X"]["data"]
    pos = 5 * 16_384 + 7
    data[pos] = data[pos] + 1
    changed = zarr_view(store, layout, job, out)
    assert changed.extra["chunk_files_hashed"] == 1
    indptr = kang.X.indptr
    rows = layout["rows_per_chunk"]
    touched = {
        c
        for c in range(len(first.chunk_hashes))
        if indptr[c * rows] < 6 * 16_384 and indptr[min((c + 1) * rows, kang.n_obs)] > 5 * 16_384
    }
    diff = {
        i
        for i, (a, b) in enumerate(zip(first.chunk_hashes, changed.chunk_hashes, strict=True))
        if a != b
    }
    assert diff == touched
    assert 0 < len(diff) < len(first.chunk_hashes)
    old = {s.index: s.content_hash for s in plan_shards(first, 512)}
    new = {s.index: s.content_hash for s in plan_shards(changed, 512)}
    assert 0 < sum(old[i] != new[i] for i in old) < len(old)


def test_rows_read_in_place_are_checked(kang, tmp_path):
    bad = kang[:200].copy()
    x = sp.csr_matrix(bad.X, dtype=np.float32)
    x.data[x.indptr[150] + 2] = np.nan
    bad.X = x
    store = write_anndata_zarr(tmp_path / "nan.zarr", bad)
    gene = bad.var_names[x.indices[x.indptr[150] + 2]]
    with pytest.raises(InputError, match=f"first at cell row 150, gene '{gene}'"):
        ZarrRows(str(store), checked=False).rows(100, 200)


@pytest.mark.integration
def test_a_zarr_in_a_bucket_is_read_in_place(kang, tmp_path):
    """On S3 (a moto server) the chunk files' ETags are the cache key: same hashes as locally."""
    from servers.s3 import moto_env

    from raypipe.core import storage

    store = write_anndata_zarr(tmp_path / "kang.zarr", kang, chunk=32_768)
    job = _job(store, tmp_path / "local", tmp_path / "t.tsv")
    local = zarr_view(store, inplace_layout(store, job)[0], job, tmp_path / "local")
    with moto_env("atlases"):
        fs = storage.open_fs("s3")
        fs.put(str(store), "atlases/kang.zarr", recursive=True)
        url = storage.as_path("s3://atlases/kang.zarr")
        out = tmp_path / "bucket"
        layout, why = inplace_layout(url, job)
        assert why == ""
        view = zarr_view(url, layout, job, out)
        assert view.chunk_hashes == local.chunk_hashes  # hashes of the same stored bytes
        assert zarr_view(url, layout, job, out).extra["chunk_files_hashed"] == 0
        x = read_shard(view.path, 0, view.n_obs)
        assert (x != sp.csr_matrix(kang.X)).nnz == 0


# ------------------------------------------------------------------- end to end (Ray)


@pytest.mark.slow
@pytest.mark.integration
def test_kang_in_place_equals_ingested_bitwise(kang, table, ray_env, tmp_path):
    store = write_anndata_zarr(tmp_path / "kang.zarr", kang, chunk=32_768)
    copy = tmp_path / "copied"
    s_copy = run_job(_job(store, copy, table, "input.in_place=false", srv=ray_env), progress=False)
    assert (copy / "atlas.zarr").is_dir()
    assert "because input.in_place is false" in s_copy.input
    here = tmp_path / "in_place"
    s_here = run_job(_job(store, here, table, srv=ray_env), progress=False)
    assert not (here / "atlas.zarr").exists()  # no copy
    assert (here / VIEW).is_file()
    assert "read in place" in s_here.input
    assert "read in place" in s_here.render()
    a, b = read_embeddings(copy), read_embeddings(here)
    assert a["obs_name"].tolist() == b["obs_name"].tolist() == list(kang.obs_names)
    ea, eb = np.stack(a["embedding"]), np.stack(b["embedding"])
    assert ea.dtype == eb.dtype == np.float32
    assert np.array_equal(ea, eb)  # bit for bit
    atlas = open_atlas(here / VIEW)
    assert (read_shard(atlas.path, 0, atlas.n_obs) != sp.csr_matrix(kang.X)).nnz == 0
    again = run_job(_job(store, here, table, srv=ray_env), progress=False)
    assert again.shards_done == {"genept_w": 0}  # resume: the view's hashes are stable


@pytest.mark.slow
@pytest.mark.integration
def test_kang8k_in_place_equals_ingested_bitwise(kang8k, shared_data, ray_env, tmp_path):
    """The issue's "Done when": Kang 8k as an AnnData zarr, default GenePT-w (HVG, centred)."""
    adata = ad.read_h5ad(kang8k)
    table = write_real_gene_table(shared_data, tmp_path / "genes.tsv", list(adata.var_names))
    store = write_anndata_zarr(tmp_path / "kang8k.zarr", adata, chunk=65_536)
    embed = {"methods": ["genept_w"]}
    copy, here = tmp_path / "copied", tmp_path / "in_place"
    sets = ("input.in_place=false",)
    run_job(_job(store, copy, table, *sets, embed=embed, srv=ray_env), progress=False)
    summary = run_job(_job(store, here, table, embed=embed, srv=ray_env), progress=False)
    assert "read in place" in summary.input
    assert not (here / "atlas.zarr").exists()
    a, b = read_embeddings(copy), read_embeddings(here)
    assert a["obs_name"].tolist() == b["obs_name"].tolist()
    assert np.array_equal(np.stack(a["embedding"]), np.stack(b["embedding"]))
