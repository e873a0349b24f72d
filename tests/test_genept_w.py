"""GenePT-w math against plain dense numpy references (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from data_factory import GENES, counts, dense_genept_w, ensembl_id

from raypipe.core.stage import check_contract
from raypipe.embed.genept_w import GenePTW, fold_collapse, genept_w, log_normalize, weight_matrix
from raypipe.embed.hvg import gene_moments, select_hvg
from raypipe.errors import StageContractError
from raypipe.genes.identity import GeneTable, resolve_genes


def _emb(g: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(g, d)).astype(np.float32)


def test_log_normalize_matches_dense():
    x = counts(50, 30, seed=1)
    totals = np.asarray(x.sum(axis=1)).ravel()
    got = log_normalize(x, totals, 1e4).toarray()
    dense = x.toarray().astype(np.float64)
    ref = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_genept_w_equals_dense_reference():
    x = counts(120, 40, seed=2).tolil()
    x[7, :] = 0  # a zero-count cell
    x = x.tocsr()
    x.eliminate_zeros()
    e = _emb(40, 32, seed=3)
    has = np.ones(40, dtype=bool)
    emb, empty = genept_w(x, sp.identity(40, format="csr", dtype=np.float32), weight_matrix(e, has))
    ref = dense_genept_w(x.toarray(), e)
    assert emb.dtype == np.float32
    assert emb.shape == (120, 32)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert empty.tolist() == [i == 7 for i in range(120)]
    assert not np.isnan(emb).any()
    assert np.all(emb[7] == 0)
    norms = np.linalg.norm(emb[~empty], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_genes_without_text_get_zero_weight_and_cells_with_only_those_are_empty():
    x = sp.csr_matrix(np.array([[0, 0, 5.0, 1.0], [2.0, 1.0, 0, 0], [0, 3.0, 0, 1.0]]))
    e = _emb(4, 8, seed=4)
    has = np.array([True, True, False, False])
    emb, empty = genept_w(x, sp.identity(4, format="csr"), weight_matrix(e, has))
    assert empty.tolist() == [True, False, False]
    # the normalisation still uses the total over all genes (as scanpy would)
    ref = dense_genept_w(x.toarray(), np.where(has[:, None], e, 0.0))
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_lognorm_input_is_used_as_is():
    x = counts(30, 20, seed=5)
    dense = x.toarray().astype(np.float64)
    xl = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    e = _emb(20, 8, seed=6)
    emb, _ = genept_w(
        sp.csr_matrix(xl.astype(np.float32)),
        sp.identity(20, format="csr"),
        weight_matrix(e, np.ones(20, bool)),
        x_kind="lognorm",
    )
    ref = xl @ e
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_target_sum_changes_result_consistently():
    x = counts(20, 15, seed=7)
    e = _emb(15, 8, seed=8)
    w = weight_matrix(e, np.ones(15, bool))
    emb, _ = genept_w(x, sp.identity(15, format="csr"), w, target_sum=100.0)
    np.testing.assert_allclose(emb, dense_genept_w(x.toarray(), e, target_sum=100.0), atol=1e-5)


def test_hvg_mask_and_centring_vs_reference():
    x = counts(200, 40, seed=9)
    e = _emb(40, 24, seed=10)
    has = np.ones(40, dtype=bool)
    has[[3, 11]] = False
    mask = np.zeros(40, dtype=bool)
    mask[::2] = True
    w = weight_matrix(e, has, center=True, gene_mask=mask)
    use = has & mask
    ref_w = e.astype(np.float64) - e[use].astype(np.float64).mean(axis=0)
    ref_w[~use] = 0.0
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    emb, _ = genept_w(x, sp.identity(40, format="csr"), w)
    np.testing.assert_allclose(emb, dense_genept_w(x.toarray(), ref_w), atol=1e-5)
    # without centring, only the mask applies
    w2 = weight_matrix(e, has, gene_mask=mask)
    np.testing.assert_allclose(w2, np.where(use[:, None], e, 0.0))


def _ref_hvg(xl: np.ndarray, n_top: int, n_bins: int) -> np.ndarray:
    mean = xl.mean(axis=0)
    var = xl.var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(var / mean)
    df = pd.DataFrame({"disp": disp, "bin": pd.cut(np.log1p(mean), n_bins)})
    grp = df.groupby("bin", observed=True)["disp"]
    z = (df["disp"] - grp.transform("mean")) / grp.transform("std")
    return np.argsort(-z.fillna(-np.inf).to_numpy(), kind="stable")[:n_top]


@pytest.mark.parametrize("n_bins", [1, 5])
def test_select_hvg_vs_reference_and_shard_additivity(n_bins: int):
    x = counts(400, 40, seed=11, density=0.5)
    ident = sp.identity(40, format="csr", dtype=np.float32)
    n, s, sq = 0, 0.0, 0.0
    for a, b in [(0, 100), (100, 250), (250, 400)]:  # moments streamed over three shards
        k, s1, sq1 = gene_moments(x[a:b], ident, x_kind="counts", target_sum=1e4)
        n, s, sq = n + k, s + s1, sq + sq1
    totals = np.asarray(x.sum(axis=1)).ravel()
    xl = log_normalize(x, totals, 1e4).toarray().astype(np.float64)
    np.testing.assert_allclose(s, xl.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(sq, (xl**2).sum(axis=0), rtol=1e-5)
    mask = select_hvg(n, s, sq, 10, n_bins=n_bins)
    assert mask.sum() == 10
    assert set(np.flatnonzero(mask)) == set(_ref_hvg(xl, 10, n_bins).tolist())
    assert select_hvg(n, s, sq, 100).all()


def test_duplicate_genes_are_summed():
    genes = ["CD3D", "CD4", "LYZ", "CD3D", "NKG7"]
    table = GeneTable.from_frames(
        pd.DataFrame({"symbol": GENES, "ensembl_id": [ensembl_id(i) for i in range(len(GENES))]}),
        source="test",
    )
    res = resolve_genes(genes, table)
    assert res.unique_symbols == ("CD3D", "CD4", "LYZ", "NKG7")
    assert any("'CD3D', 'CD3D'" in w and "summed" in w for w in res.warnings)
    x = counts(60, 5, seed=12)
    e = _emb(4, 16, seed=13)
    w = weight_matrix(e, np.ones(4, bool))
    got, _ = genept_w(x, res.collapse, w)
    dense = x.toarray()
    pre = np.stack([dense[:, 0] + dense[:, 3], dense[:, 1], dense[:, 2], dense[:, 4]], axis=1)
    want, _ = genept_w(sp.csr_matrix(pre), sp.identity(4, format="csr"), w)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, dense_genept_w(pre, e), atol=1e-5)


def test_stage_checks_its_contract(tmp_path):
    stage = GenePTW(
        genes={"collapse": sp.identity(3, format="csr"), "weights": np.eye(3, dtype=np.float32)},
        x_kind="counts",
        target_sum=1e4,
        atlas_path=str(tmp_path / "a.zarr"),
        out_dir=str(tmp_path),
        fingerprint="f",
    )
    with pytest.raises(StageContractError) as err:
        stage({"shard": np.array([0]), "start": np.array([0])})
    assert "stage GenePTW needs columns ['stop', 'content_hash']" in str(err.value)
    assert "['shard', 'start']" in str(err.value)
    check_contract("X", {"a": 1}, ("a",))


def test_fold_collapse_is_exact_without_duplicates_and_kept_with_them():
    rng = np.random.default_rng(3)
    x = sp.random(50, 6, density=0.5, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    # columns 0..3 are genes 0..3; columns 4, 5 are unmatched (dropped)
    c = sp.csr_matrix((np.ones(4), ([0, 1, 2, 3], [0, 1, 2, 3])), shape=(6, 4))
    folded_c, folded_w = fold_collapse(c, w)
    assert folded_c is None
    np.testing.assert_allclose(genept_w(x, None, folded_w)[0], genept_w(x, c, w)[0], atol=1e-6)
    dup = sp.csr_matrix((np.ones(5), ([0, 1, 2, 3, 4], [0, 1, 2, 3, 3])), shape=(6, 4))
    kept_c, kept_w = fold_collapse(dup, w)
    assert kept_c is dup
    assert kept_w is w


@pytest.mark.parametrize("x_kind", ["counts", "lognorm"])
def test_fused_kernel_equals_scipy_product(x_kind: str):
    """The numba kernel (only weighted genes, fused normalise/log1p/L2) = scipy within 1e-5."""
    from raypipe.embed.kernel import compact_weights, fused_genept_w

    rng = np.random.default_rng(4)
    x = sp.random(300, 80, density=0.2, format="csr", random_state=4, dtype=np.float32)
    x.data = np.round(x.data * 20 + 1).astype(np.float32)
    x[5] = 0.0  # an empty cell
    x.eliminate_zeros()
    if x_kind == "lognorm":
        x = log_normalize(x, np.asarray(x.sum(axis=1)).ravel(), 1e4)
    mask = rng.random(80) < 0.4  # e.g. HVG: most genes carry no weight
    w = weight_matrix(rng.normal(size=(80, 16)), np.ones(80, bool), center=True, gene_mask=mask)
    ref, ref_empty = genept_w(x, None, w, x_kind=x_kind)
    col_map, compact = compact_weights(w)
    assert compact.shape[0] == mask.sum()
    got, empty = fused_genept_w(x, col_map, compact, x_kind=x_kind)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(empty, ref_empty)
    assert empty[5]
