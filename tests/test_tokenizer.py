"""Rank-value tokenizer: exact match with Geneformer's own output, framing, safety, bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from raypipe.embed.dictionaries import GeneformerDictionaries, load_dict, resolve_ensembl_ids
from raypipe.embed.tokenizer import RankValueTokenizer, write_tokens
from raypipe.errors import InputError


@pytest.fixture(scope="module")
def v1(shared_data: Path) -> GeneformerDictionaries:
    return GeneformerDictionaries.load("V1", search=[shared_data / "geneformer"])


@pytest.fixture(scope="module")
def kang(kang1k5: Path):
    import anndata as ad

    return ad.read_h5ad(kang1k5)


@pytest.fixture(scope="module")
def expected(shared_data: Path) -> pd.DataFrame:
    return pd.read_parquet(shared_data / "geneformer" / "expected_tokens_kang_1.5k.parquet")


def _tokens(dicts, adata, variant="geneformer_v1", x_kind="counts", **kw):
    tok = RankValueTokenizer(dicts, variant=variant, **kw)
    tok.plan(adata.var["ensembl_id"].tolist())
    return tok, tok.tokenize(adata.X, x_kind=x_kind)


def test_matches_geneformer_tokenizer_for_every_cell(v1, kang, expected):
    tok, cells = _tokens(v1, kang)
    assert list(kang.obs_names) == expected["obs_name"].tolist()
    mismatched = [
        i
        for i, (c, e) in enumerate(zip(cells, expected["input_ids"], strict=True))
        if not np.array_equal(c, e)
    ]
    assert mismatched == []
    assert [len(c) for c in cells] == expected["length"].tolist()
    assert all(c.dtype == np.int32 for c in cells)
    assert tok.last_stats.x_kind == "counts"
    assert tok.last_stats.n_empty == 0


def test_lognorm_input_gives_identical_ids(v1, kang, expected):
    import scanpy as sc

    ln = kang.copy()
    sc.pp.normalize_total(ln, target_sum=1e4)
    sc.pp.log1p(ln)
    tok, cells = _tokens(v1, ln, x_kind="auto")
    assert tok.last_stats.x_kind == "lognorm"
    assert all(np.array_equal(c, e) for c, e in zip(cells, expected["input_ids"], strict=True))


def test_langcell_framing_prepends_cls_on_v1_vocab(v1, kang, expected):
    tok, cells = _tokens(v1, kang, variant="langcell")
    cls_id = len(v1.token_dict)  # LangCell: token_dictionary['<cls>'] = len(token_dictionary)
    assert tok.prefix == (cls_id,)
    assert tok.vocab_size == cls_id + 1
    for c, e in zip(cells[:50], expected["input_ids"][:50], strict=True):
        assert c[0] == cls_id
        assert np.array_equal(c[1:], e[:2047])
    _, short = _tokens(v1, kang, variant="langcell", max_length=8, cls_id=7)
    assert all(len(c) == 8 and c[0] == 7 for c in short)
    assert np.array_equal(short[0][1:], expected["input_ids"][0][:7])


def test_v2_framing_and_truncation(shared_data, v1, kang, expected):
    v2 = GeneformerDictionaries.load("V2", search=[shared_data / "geneformer"])
    inv1 = {t: g for g, t in v1.token_dict.items()}
    tok, cells = _tokens(v2, kang, variant="geneformer_v2")
    assert tok.max_length == 4096
    for c, e in zip(cells[:50], expected["input_ids"][:50], strict=True):
        assert c[0] == v2.token_dict["<cls>"]
        assert c[-1] == v2.token_dict["<eos>"]
        want = [v2.token_dict[inv1[t]] for t in e if inv1[t] in v2.token_dict]
        assert c[1:-1].tolist() == want
    _, short = _tokens(v2, kang, variant="geneformer_v2", max_length=6)
    assert all(len(c) == 6 for c in short)
    assert short[0][1:-1].tolist() == cells[0][1:5].tolist()


def test_duplicate_ensembl_ids_are_summed(v1, kang, expected):
    X = kang.X[:200].tocsr().astype(np.float64)
    ids = kang.var["ensembl_id"].tolist()
    # split every count of the first 40 genes into two columns with the same Ensembl id
    dense = X.toarray()
    half = np.floor(dense[:, :40] / 2)
    split = np.hstack([dense[:, :40] - half, dense[:, 40:], half])
    tok = RankValueTokenizer(v1)
    plan = tok.plan(ids + ids[:40])
    assert plan.has_duplicates
    assert plan.n_known == 1261 + sum(1 for g in ids[:40] if g in v1.token_dict)
    cells = tok.tokenize(sp.csr_matrix(split))
    assert all(
        np.array_equal(c, e) for c, e in zip(cells, expected["input_ids"][:200], strict=True)
    )


def test_empty_cells_are_flagged_not_fatal(v1):
    tok = RankValueTokenizer(v1, variant="langcell")
    tok.plan(["ENSG00000188290", "NOT_A_GENE", "ENSG00000187608"])
    X = sp.csr_matrix(np.array([[0, 5, 0], [3, 0, 1], [0, 0, 0]], dtype=np.float32))
    cells = tok.tokenize(X)
    assert [len(c) for c in cells] == [0, 3, 0]
    assert tok.last_stats.empty.tolist() == [True, False, True]
    # only known genes count; the higher value/median ranks first
    t1, t2 = v1.token_dict["ENSG00000188290"], v1.token_dict["ENSG00000187608"]
    m1, m2 = v1.median_dict["ENSG00000188290"], v1.median_dict["ENSG00000187608"]
    assert cells[1][1:].tolist() == ([t1, t2] if 3 / m1 > 1 / m2 else [t2, t1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_nan_inf_negative_values_are_rejected(v1, bad):
    tok = RankValueTokenizer(v1)
    tok.plan(["ENSG00000188290", "ENSG00000187608"])
    X = sp.csr_matrix(np.array([[1.0, 2.0], [bad, 1.0]]))
    with pytest.raises(InputError, match="row 1"):
        tok.tokenize(X)


def test_lognorm_path_rejects_counts(v1):
    tok = RankValueTokenizer(v1)
    tok.plan(["ENSG00000188290"])
    with pytest.raises(InputError, match="lognorm"):
        tok.tokenize(sp.csr_matrix(np.array([[500.5]])), x_kind="lognorm")


def test_lexsort_engine_and_per_cell_reference_agree_with_kernel(v1, kang):
    from raypipe.bench.ce import lexsort_rank, per_cell_reference

    rng = np.random.default_rng(0)
    X = kang.X[:300].tocsr()
    X.data = rng.integers(1, 4, size=X.data.size).astype(np.float32)  # many ties
    ids = kang.var["ensembl_id"].tolist()
    tok = RankValueTokenizer(v1, max_length=100)
    plan = tok.plan(ids)
    fast = tok.tokenize(X)
    lex = tok.tokenize(X, engine=lexsort_rank)
    ref = per_cell_reference(X, plan, max_length=100)
    assert all(np.array_equal(a, b) for a, b in zip(fast, lex, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(fast, ref, strict=True))


def test_write_tokens_matches_expected_parquet(kang1k5, expected, tmp_path):
    out = tmp_path / "tokens.parquet"
    info = write_tokens(kang1k5, out, dictionary="V1", rows_per_chunk=400)
    got = pd.read_parquet(out)
    assert info["n_cells"] == len(expected)
    assert info["x_kind"] == "counts"
    assert got["obs_name"].tolist() == expected["obs_name"].tolist()
    assert all(
        np.array_equal(a, b) for a, b in zip(got["input_ids"], expected["input_ids"], strict=True)
    )
    assert got["length"].tolist() == expected["length"].tolist()
    assert not (tmp_path / "tokens.parquet.tmp").exists()


def test_write_tokens_maps_symbols_and_checks_coverage(kang, v1, tmp_path):
    import anndata as ad

    sym = ad.AnnData(X=kang.X[:50].copy(), obs=kang.obs.iloc[:50].copy())
    sym.var_names = kang.var_names
    sym.write_h5ad(tmp_path / "sym.h5ad")
    info = write_tokens(tmp_path / "sym.h5ad", tmp_path / "t.parquet")
    assert info["id_source"] == "gene_name_id"
    assert info["coverage"] > 0.9
    bad = sym.copy()
    bad.var_names = [f"FAKE{i}" for i in range(bad.n_vars)]
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(InputError, match="FAKE0"):
        write_tokens(tmp_path / "bad.h5ad", tmp_path / "t2.parquet")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "x": _Evil()}))
    with pytest.raises(InputError, match="refused") as err:
        load_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    inst = tmp_path / "inst.pkl"
    inst.write_bytes(pickle.dumps({"a": pd.Timestamp("2020-01-01")}))
    with pytest.raises(InputError, match="refused"):
        load_dict(inst)


def test_real_pickles_need_only_numpy_scalars(v1):
    assert isinstance(v1.token_dict["ENSG00000000003"], int)
    assert isinstance(v1.median_dict["ENSG00000000003"], float)
    assert v1.gene_name_id["ISG15"].startswith("ENSG")


def test_dictionary_formats_and_missing_or_corrupt_files(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"A": 1}))
    assert load_dict(tmp_path / "d.json") == {"A": 1}
    pd.DataFrame({"key": ["A", "B"], "value": [1.5, 2.0]}).to_parquet(tmp_path / "d.parquet")
    assert load_dict(tmp_path / "d.parquet") == {"A": 1.5, "B": 2.0}
    with pytest.raises(InputError, match=r"missing\.pkl"):
        load_dict(tmp_path / "missing.pkl")
    (tmp_path / "token_dictionary.pkl").write_bytes(pickle.dumps({"<pad>": 0})[:-3])
    with pytest.raises(InputError, match=r"gene_median_dictionary\.pkl does not exist"):
        GeneformerDictionaries.load(tmp_path)
    (tmp_path / "gene_median_dictionary.pkl").write_bytes(pickle.dumps({"ENSG1": 1.0}))
    with pytest.raises(InputError, match=r"token_dictionary\.pkl is corrupt"):
        GeneformerDictionaries.load(tmp_path)
    with pytest.raises(InputError, match="token_dictionary"):
        GeneformerDictionaries.load("V1", search=[tmp_path / "nowhere"])


def test_resolve_ids_prefers_ensembl_column():
    ids, how = resolve_ensembl_ids(["A", "B"], ["ENSG1", None], {"A": "X"})
    assert (ids, how) == (["ENSG1", None], "var['ensembl_id']")
    ids, how = resolve_ensembl_ids(["isg15", "zz"], None, {"ISG15": "ENSG00000187608"})
    assert (ids, how) == (["ENSG00000187608", None], "gene_name_id")
