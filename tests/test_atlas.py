"""Atlas ingest and store: formats, round trips, shards, hashes, kinds, atomicity, bad input."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from data_factory import GENES, make_adata, write_10x, write_h5ad

from raypipe.atlas import (
    ingest,
    open_atlas,
    plan_shards,
    read_obs_columns,
    read_obs_names,
    read_shard,
    read_var,
)
from raypipe.errors import InputError


def _roundtrip_checks(atlas_path: Path, adata, *, obs_cols=("cell_type", "donor")) -> None:
    info = open_atlas(atlas_path)
    assert (info.n_obs, info.n_vars) == adata.shape
    x = read_shard(atlas_path, 0, info.n_obs)
    ref = sp.csr_matrix(adata.X, dtype=np.float32)
    assert x.dtype == np.float32
    assert (x != ref).nnz == 0
    assert np.array_equal(x.toarray(), ref.toarray())
    assert list(read_obs_names(atlas_path)) == list(adata.obs_names)
    var = read_var(atlas_path)
    assert list(var.index) == list(adata.var_names)
    if obs_cols:
        obs = read_obs_columns(atlas_path, list(obs_cols))
        for c in obs_cols:
            assert list(obs[c].astype(str)) == list(adata.obs[c].astype(str))


def test_ingest_h5ad_roundtrip(tmp_path: Path):
    adata = make_adata(150, seed=1)
    h5 = write_h5ad(tmp_path / "c.h5ad", adata)
    res = ingest(h5, tmp_path / "a.zarr", rows_per_chunk=32, progress=False)
    assert res.atlas.x_kind == "counts"
    assert res.atlas.rows_per_chunk == 32
    assert len(res.atlas.chunk_hashes) == 5
    assert res.zero_count_cells == 0
    assert res.duplicate_genes == []
    _roundtrip_checks(tmp_path / "a.zarr", adata)
    assert list(read_var(tmp_path / "a.zarr")["ensembl_id"]) == list(adata.var["ensembl_id"])
    assert read_obs_names(tmp_path / "a.zarr", 40, 45).tolist() == list(adata.obs_names[40:45])


def test_ingest_anndata_zarr_roundtrip(tmp_path: Path):
    adata = make_adata(90, seed=2)
    adata.write_zarr(tmp_path / "in.zarr")
    res = ingest(tmp_path / "in.zarr", tmp_path / "a.zarr", rows_per_chunk=40, progress=False)
    assert res.atlas.n_obs == 90
    _roundtrip_checks(tmp_path / "a.zarr", adata)


def test_ingest_dense_x(tmp_path: Path):
    adata = make_adata(30, seed=3)
    adata.X = adata.X.toarray()
    h5 = write_h5ad(tmp_path / "dense.h5ad", adata)
    ingest(h5, tmp_path / "a.zarr", rows_per_chunk=8, progress=False)
    _roundtrip_checks(tmp_path / "a.zarr", adata)


def test_ingest_10x_folder_roundtrip(tmp_path: Path):
    adata = make_adata(70, seed=4)
    folder = write_10x(tmp_path / "tenx", adata)
    res = ingest(folder, tmp_path / "a.zarr", rows_per_chunk=16, progress=False)
    assert res.atlas.x_kind == "counts"
    _roundtrip_checks(tmp_path / "a.zarr", adata, obs_cols=())
    var = read_var(tmp_path / "a.zarr")
    assert list(var["gene_ids"]) == list(adata.var["ensembl_id"])


def test_ingest_layer_and_raw(tmp_path: Path):
    adata = make_adata(40, seed=5)
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.log1p(counts.toarray()), dtype=np.float32)
    h5 = write_h5ad(tmp_path / "l.h5ad", adata)
    res = ingest(h5, tmp_path / "x.zarr", progress=False)
    assert res.atlas.x_kind == "lognorm"
    res = ingest(h5, tmp_path / "c.zarr", layer="counts", progress=False)
    assert res.atlas.x_kind == "counts"
    assert np.array_equal(read_shard(tmp_path / "c.zarr", 0, 40).toarray(), counts.toarray())
    res = ingest(h5, tmp_path / "r.zarr", layer="raw", progress=False)
    assert res.atlas.x_kind == "counts"
    with pytest.raises(InputError, match="has no layer 'spliced'; layers: \\['counts'\\]"):
        ingest(h5, tmp_path / "s.zarr", layer="spliced", progress=False)


def _atlas(tmp_path: Path, n: int = 200, rows: int = 32, name: str = "a") -> Path:
    h5 = write_h5ad(tmp_path / f"{name}.h5ad", make_adata(n, seed=7))
    ingest(h5, tmp_path / f"{name}.zarr", rows_per_chunk=rows, progress=False)
    return tmp_path / f"{name}.zarr"


def test_plan_shards_aligned_to_chunks(tmp_path: Path):
    info = open_atlas(_atlas(tmp_path, 200, 32))
    for rows, expect in [(1, 7), (32, 7), (50, 4), (64, 4), (100, 2), (10_000, 1)]:
        shards = plan_shards(info, rows)
        assert len(shards) == expect, rows
        assert shards[0].start == 0
        assert shards[-1].stop == 200
        for a, b in itertools.pairwise(shards):
            assert a.stop == b.start
        assert all(s.start % 32 == 0 for s in shards)
        assert all(s.n_rows % 32 == 0 for s in shards[:-1])
        assert [s.index for s in shards] == list(range(len(shards)))
    for bad in (0, -1):
        with pytest.raises(InputError, match=r"shards\.rows must be > 0"):
            plan_shards(info, bad)


def test_chunk_hashes_stable_and_local(tmp_path: Path):
    adata = make_adata(200, seed=8)
    h5a = write_h5ad(tmp_path / "a.h5ad", adata)
    a1 = ingest(h5a, tmp_path / "a1.zarr", rows_per_chunk=32, progress=False).atlas
    a2 = ingest(h5a, tmp_path / "a2.zarr", rows_per_chunk=32, progress=False).atlas
    assert a1.chunk_hashes == a2.chunk_hashes
    assert len(set(a1.chunk_hashes)) == len(a1.chunk_hashes)
    changed = adata.copy()
    x = changed.X.tolil()
    x[70, 5] = x[70, 5] + 3  # row 70 is in chunk 2 (rows 64..95)
    changed.X = x.tocsr()
    h5b = write_h5ad(tmp_path / "b.h5ad", changed)
    b = ingest(h5b, tmp_path / "b.zarr", rows_per_chunk=32, progress=False).atlas
    diff = [
        i for i, (p, q) in enumerate(zip(a1.chunk_hashes, b.chunk_hashes, strict=True)) if p != q
    ]
    assert diff == [2]
    sa, sb = plan_shards(a1, 64), plan_shards(b, 64)
    assert [s.content_hash != t.content_hash for s, t in zip(sa, sb, strict=True)] == [
        False,
        True,
        False,
        False,
    ]


def test_x_kind_detection_and_override(tmp_path: Path):
    adata = make_adata(60, seed=9)
    h5 = write_h5ad(tmp_path / "c.h5ad", adata)
    res = ingest(h5, tmp_path / "c.zarr", progress=False)
    assert (res.atlas.x_kind, res.atlas.x_kind_detected) == ("counts", "counts")

    x = adata.X.toarray()
    tot = x.sum(axis=1, keepdims=True)
    lognorm = adata.copy()
    lognorm.X = sp.csr_matrix(np.log1p(x / tot * 1e4), dtype=np.float32)
    h5l = write_h5ad(tmp_path / "l.h5ad", lognorm)
    res = ingest(h5l, tmp_path / "l.zarr", progress=False)
    assert (res.atlas.x_kind, res.atlas.x_kind_detected) == ("lognorm", "lognorm")

    res = ingest(h5, tmp_path / "o.zarr", x_kind="lognorm", progress=False)
    assert (res.atlas.x_kind, res.atlas.x_kind_detected) == ("lognorm", "counts")

    scaled = adata.copy()
    scaled.X = sp.csr_matrix(x * 37.5 + 0.5 * (x > 0), dtype=np.float32)  # non-integer, large
    h5s = write_h5ad(tmp_path / "s.h5ad", scaled)
    with pytest.raises(InputError) as err:
        ingest(h5s, tmp_path / "s.zarr", progress=False)
    assert str(h5s) in str(err.value)
    assert "--x-kind counts" in str(err.value)
    assert not (tmp_path / "s.zarr").exists()
    res = ingest(h5s, tmp_path / "s.zarr", x_kind="counts", progress=False)
    assert (res.atlas.x_kind, res.atlas.x_kind_detected) == ("counts", "unknown")


def test_overwrite(tmp_path: Path):
    out = _atlas(tmp_path, 64, 32)
    other = write_h5ad(tmp_path / "other.h5ad", make_adata(96, seed=11))
    with pytest.raises(InputError) as err:
        ingest(other, out, progress=False)
    assert f"{out} already exists" in str(err.value)
    assert "--overwrite" in str(err.value)
    assert open_atlas(out).n_obs == 64  # untouched
    ingest(other, out, overwrite=True, progress=False)
    assert open_atlas(out).n_obs == 96
    assert list(read_obs_names(out)) == [f"cell-{i:05d}" for i in range(96)]


def test_failed_ingest_leaves_nothing(tmp_path: Path):
    adata = make_adata(100, seed=12)
    x = adata.X.tolil()
    x[97, 3] = np.nan  # last chunk (rows 96..99)
    adata.X = x.tocsr()
    h5 = write_h5ad(tmp_path / "nan.h5ad", adata)
    out = tmp_path / "nan.zarr"
    with pytest.raises(InputError) as err:
        ingest(h5, out, rows_per_chunk=32, progress=False)
    msg = str(err.value)
    assert str(h5) in msg
    assert "NaN/inf" in msg
    assert "cell row 97" in msg
    assert f"gene {GENES[3]!r}" in msg
    assert "fix:" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.h5ad"]


def test_failed_overwrite_keeps_old_atlas(tmp_path: Path):
    out = _atlas(tmp_path, 64, 32)
    before = open_atlas(out).chunk_hashes
    adata = make_adata(64, seed=13)
    x = adata.X.tolil()
    x[60, 0] = np.inf
    adata.X = x.tocsr()
    bad = write_h5ad(tmp_path / "inf.h5ad", adata)
    with pytest.raises(InputError, match="NaN/inf values \\(first at cell row 60"):
        ingest(bad, out, rows_per_chunk=32, overwrite=True, progress=False)
    assert open_atlas(out).chunk_hashes == before


def test_negative_values_name_row_and_gene(tmp_path: Path):
    adata = make_adata(50, seed=14)
    x = adata.X.tolil()
    x[12, 7] = -2.0
    adata.X = x.tocsr()
    h5 = write_h5ad(tmp_path / "neg.h5ad", adata)
    with pytest.raises(InputError) as err:
        ingest(h5, tmp_path / "neg.zarr", progress=False)
    msg = str(err.value)
    assert "negative values (first at cell row 12" in msg
    assert f"gene {GENES[7]!r}" in msg
    assert "raw counts" in msg
    assert not (tmp_path / "neg.zarr").exists()


def test_missing_input(tmp_path: Path):
    with pytest.raises(InputError) as err:
        ingest(tmp_path / "missing.h5ad", tmp_path / "a.zarr", progress=False)
    assert f"input {tmp_path / 'missing.h5ad'} does not exist" in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        open_atlas(tmp_path / "missing.zarr")


def test_not_anndata_inputs(tmp_path: Path):
    text = tmp_path / "cells.h5ad"
    text.write_text("this is a csv, not hdf5\n")
    with pytest.raises(InputError) as err:
        ingest(text, tmp_path / "a.zarr", progress=False)
    assert str(text) in str(err.value)

    import zarr

    rnd = zarr.open_group(str(tmp_path / "random.zarr"), mode="w", zarr_format=3)
    rnd.create_array("values", shape=(4,), dtype="f4")
    with pytest.raises(InputError) as err:
        ingest(tmp_path / "random.zarr", tmp_path / "b.zarr", progress=False)
    assert "is not an AnnData store (needs X, obs and var; has values)" in str(err.value)
    with pytest.raises(InputError, match="not a raypipe atlas"):
        open_atlas(tmp_path / "random.zarr")

    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"without matrix\.mtx"):
        ingest(empty_dir, tmp_path / "c.zarr", progress=False)

    other = tmp_path / "cells.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="is not an AnnData file"):
        ingest(other, tmp_path / "d.zarr", progress=False)
    assert not any(p.name.endswith(".zarr") and p.name != "random.zarr" for p in tmp_path.iterdir())


def test_zero_count_cells_and_duplicate_genes(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    genes = [*GENES[:10], "CD3D"]
    adata = make_adata(40, genes, seed=15, zero_rows=(5, 6))
    h5 = write_h5ad(tmp_path / "dup.h5ad", adata)
    with caplog.at_level(logging.WARNING, logger="raypipe"):
        res = ingest(h5, tmp_path / "dup.zarr", progress=False)
    assert res.zero_count_cells == 2
    assert res.duplicate_genes == ["CD3D"]
    assert "1 duplicate gene names (e.g. CD3D)" in caplog.text
    assert "2 cells have zero counts" in caplog.text
    assert list(read_var(tmp_path / "dup.zarr").index) == genes
    assert open_atlas(tmp_path / "dup.zarr").extra["zero_count_cells"] == 2


def test_missing_obs_column_names_present(tmp_path: Path):
    out = _atlas(tmp_path, 40, 32)
    with pytest.raises(InputError) as err:
        read_obs_columns(out, ["cell_type", "celltype_l2"])
    msg = str(err.value)
    assert "no column 'celltype_l2'" in msg
    assert "columns present: cell_type, donor" in msg
    assert "input.label_key" in msg
    df = read_obs_columns(out, ["donor"])
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 40


def test_builtin_dataset(tmp_path: Path):
    with pytest.raises(InputError, match="negative values") as err:
        ingest("builtin:pbmc68k_reduced", tmp_path / "p.zarr", progress=False)  # X is scaled
    assert "input.layer" in str(err.value)
    res = ingest(
        "builtin:pbmc68k_reduced",
        tmp_path / "p.zarr",
        rows_per_chunk=256,
        layer="raw",
        progress=False,
    )
    assert res.atlas.n_obs == 700
    assert res.atlas.x_kind == "lognorm"
    with pytest.raises(InputError, match="unknown builtin dataset 'pbmc3k'"):
        ingest("builtin:pbmc3k", tmp_path / "q.zarr", progress=False)


def test_csr_writer_writes_whole_chunks_that_read_back_exactly(tmp_path):
    import zarr
    from anndata.io import sparse_dataset

    from raypipe.atlas.csr_writer import CsrWriter

    rng = np.random.default_rng(0)
    full = sp.random(503, 40, density=0.2, format="csr", random_state=1, dtype=np.float32)
    full.data = np.round(full.data * 10) + 1
    full.data[full.indptr[17] : full.indptr[18]] = 0  # an empty row
    full.eliminate_zeros()
    cuts = np.unique(np.r_[0, rng.choice(np.arange(1, 503), 30, replace=False), 503])
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w", zarr_format=3)
    blocks = [full[a:b] for a, b in itertools.pairwise(cuts)]
    with CsrWriter(group, "X", blocks[0], chunk=97) as w:  # chunks never align with blocks
        for b in blocks[1:]:
            w.append(b)
        assert w.close() == 503
    back = sparse_dataset(zarr.open_group(str(tmp_path / "x.zarr"), mode="r")["X"])
    assert back.shape == (503, 40)
    assert (back[:] != full).nnz == 0
    assert (back[100:260] != full[100:260]).nnz == 0
    group2 = zarr.open_group(str(tmp_path / "y.zarr"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="columns"), CsrWriter(group2, "X", blocks[0], 97) as w:
        w.append(sp.csr_matrix((3, 41), dtype=np.float32))
