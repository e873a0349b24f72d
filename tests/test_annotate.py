from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import rankdata

from raypipe.annotate import (
    SCORERS,
    ScoreInputs,
    assign,
    build_candidates,
    candidates_from_labels,
    combine,
    extract_marker_tokens,
    load_ontology,
    marker_indices,
    marker_scores,
    resolver_from_aliases,
    score_cells,
    text_scores,
    unmatched,
)
from raypipe.annotate.mapping import GeneNames, LabelMapper
from raypipe.annotate.ontology import Ontology, normalise
from raypipe.errors import ConfigError, InputError

KANG_EXPECTED = {
    "B cells": ("CL:0000236", "B cell"),
    "CD14+ Monocytes": ("CL:0001054", "CD14-positive monocyte"),
    "CD4 T cells": ("CL:0000624", "CD4-positive, alpha-beta T cell"),
    "CD8 T cells": ("CL:0000625", "CD8-positive, alpha-beta T cell"),
    "NK cells": ("CL:0000623", "natural killer cell"),
    "FCGR3A+ Monocytes": ("CL:0002397", "CD14-positive, CD16-positive monocyte"),
    "Dendritic cells": ("CL:0000451", "dendritic cell"),
    "Megakaryocytes": ("CL:0000556", "megakaryocyte"),
}


@pytest.fixture(scope="module")
def onto() -> Ontology:
    return load_ontology()  # the package's bundled CL, offline


@pytest.fixture
def tiny_ontology(tmp_path):
    data = {
        "CL:0000236": {
            "label": "B cell",
            "description": "A lymphocyte of B lineage.",
            "synonyms": ["B lymphocyte", "B-cell"],
            "ancestors": {"CL:0000542": 1},
            "deprecated": False,
        },
        "CL:0001054": {
            "label": "CD14-positive monocyte",
            "description": "A monocyte that expresses CD14 and is negative for CD3, CD19.",
            "deprecated": False,
        },
        "CL:0000099": {"label": "obsolete thing", "deprecated": True},
    }
    path = tmp_path / "cl.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump(data, fh)
    return path


def test_normalise():
    assert normalise("CD14+ Monocytes") == "cd14 positive monocyte"
    assert normalise("CD4-positive, alpha-beta T cell") == "cd4 positive alpha beta t cell"
    assert normalise("B cells") == normalise("B-cell") == "b cell"


def test_package_ontology_has_terms(onto):
    assert len(onto) > 3000
    assert onto.source.startswith("cellxgene-ontology-guide")
    assert onto.term("CL_0000236").label == "B cell"
    with pytest.raises(InputError, match="not a term"):
        onto.term("CL:9999999")


def test_kang_label_names_map_to_sensible_terms(onto):
    mapper = LabelMapper(onto)  # no gene knowledge: FCGR3A is not known to be CD16 here
    for name, (cl_id, label) in KANG_EXPECTED.items():
        if name == "FCGR3A+ Monocytes":
            continue
        got = mapper.map(name)
        assert (got.cl_id, got.cl_label) == (cl_id, label), name
    assert onto.best("B cells").kind == "label"
    assert onto.best("NK cells").kind == "synonym"
    assert onto.best("CD4 T cells") is None  # exact names only; the mapper parses it
    assert mapper.map("CD4 T cells").how == "parsed"
    assert onto.search("not a cell type at all") == []


def test_kang_real_label_values_all_match(onto, kang8k, kang1k5, shared_data):
    import anndata as ad

    from raypipe.genes.table import GeneTable

    genes = GeneTable.from_files(
        shared_data / "genes" / "orgHs_gene_text_go.tsv.gz",
        shared_data / "genes" / "orgHs_gene_aliases.tsv.gz",
    )
    mapper = LabelMapper(onto, genes=GeneNames.from_table(genes))
    values = set()
    for path in (kang8k, kang1k5):
        values |= set(ad.read_h5ad(path, backed="r").obs["cluster_id"].astype(str))
    table = candidates_from_labels(sorted(values), onto, mapper=mapper)
    assert unmatched(table) == []
    got = dict(zip(table["label"], table["cl_id"], strict=True))
    for name in values:
        assert got[name] == KANG_EXPECTED[name][0]


def test_file_ontology_and_deprecated_terms(tiny_ontology):
    onto = Ontology.from_file(tiny_ontology)
    assert [m.term.id for m in onto.search("B lymphocytes")] == ["CL:0000236"]
    assert onto.search("obsolete thing") == []
    with pytest.raises(InputError, match="not found"):
        Ontology.from_file(tiny_ontology.parent / "missing.json")


def test_extract_marker_tokens():
    text = "A monocyte that expresses CD14 and is negative for the lineage markers CD3, CD19."
    assert extract_marker_tokens(text) == ["CD14"]
    assert extract_marker_tokens("A monocyte that is CD14-low and CD16-positive.") == ["CD16"]
    assert extract_marker_tokens("Expresses GNLY and MHC.", known=lambda t: t == "GNLY") == ["GNLY"]


def test_candidates_markers_text_and_unmatched(tiny_ontology, caplog):
    onto = Ontology.from_file(tiny_ontology)
    aliases = pd.DataFrame(
        {"alias": ["CD16", "CD16", "CD14"], "symbol": ["FCGR3A", "FCGR3B", "CD14"]}
    )
    resolver = resolver_from_aliases(aliases, symbols=["CD14", "FCGR3A", "MS4A1"])
    assert resolver("CD16") == ["FCGR3A"]
    with caplog.at_level(logging.WARNING):
        table = build_candidates(
            ["CD14+ Monocytes", "B cells", "Foo cells"],
            onto,
            markers={"B cells": ["MS4A1", "CD20X"]},
            descriptions={"B cells": "Makes antibodies."},
        )
    assert "Foo cells" in caplog.text
    table = table.set_index("label")
    assert table.loc["CD14+ Monocytes", "cl_id"] == "CL:0001054"
    assert table.loc["CD14+ Monocytes", "text"].startswith("CD14-positive monocyte: A monocyte")
    mono = table.loc["CD14+ Monocytes"]
    signed = dict(zip(mono["markers"], mono["marker_weights"], strict=True))
    assert [g for g, w in signed.items() if w > 0] == ["CD14"]
    assert {g for g, w in signed.items() if w < 0} == {"CD3", "CD19"}  # "negative for CD3, CD19"
    assert table.loc["CD14+ Monocytes", "marker_source"] == "ontology"
    assert table.loc["B cells", "text"] == "B cell: A lymphocyte of B lineage. Makes antibodies."
    assert table.loc["Foo cells", "match_kind"] == "unmatched"
    assert table.loc["Foo cells", "text"] == "Foo cells"
    table2 = build_candidates(
        ["B cells"], onto, markers={"B cells": ["MS4A1", "CD20X"]}, resolver=resolver
    )
    assert table2.loc[0, "markers"] == ["MS4A1"]
    assert table2.loc[0, "missing_markers"] == ["CD20X"]


def test_text_scores_raw_and_centred():
    rng = np.random.default_rng(0)
    m_hat = rng.normal(size=16)
    m_hat /= np.linalg.norm(m_hat)
    dirs = rng.normal(size=(3, 16))
    dirs -= np.outer(dirs @ m_hat, m_hat)  # type directions orthogonal to the common one
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    # GenePT-w-like: every cell sits near one big common vector; one text leans on it
    cells = np.vstack([20 * m_hat + dirs[i] + 0.05 * rng.normal(size=(20, 16)) for i in range(3)])
    texts = dirs + np.outer([2.0, 0.0, 0.0], m_hat)
    truth = np.repeat(np.arange(3), 20)
    raw = text_scores(cells, texts, center=False)
    ref = (cells / np.linalg.norm(cells, axis=1, keepdims=True)) @ (
        texts / np.linalg.norm(texts, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-6)
    cen = text_scores(cells, texts, cell_mean=cells.mean(0), center=True)
    assert cen.shape == (60, 3)
    assert cen.dtype == np.float32
    acc_raw = (raw.argmax(1) == truth).mean()
    acc_cen = (cen.argmax(1) == truth).mean()
    assert acc_cen == 1.0
    assert acc_raw == pytest.approx(1 / 3)  # raw cosine picks the same type for every cell
    assert (raw.argmax(1) == 0).all()
    # an explicit atlas mean is used as given (shards agree)
    half = text_scores(cells[:30], texts, cell_mean=cells.mean(0), center=True)
    np.testing.assert_allclose(half, cen[:30], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="same space"):
        text_scores(cells, texts[:, :8])


def _ucell_reference(dense, sig, max_rank):
    out = []
    for row in dense:
        ranks = rankdata(-row, method="average")
        ranks = np.minimum(ranks, max_rank + 1)
        m = len(sig)
        u = ranks[sig].sum() - m * (m + 1) / 2
        out.append(max(0.0, 1 - u / (m * max_rank)))
    return np.array(out)


def test_marker_scores_match_ucell_definition_and_ignore_depth():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.5, size=(30, 50)).astype(float)
    dense[:10, :3] += 20
    sigs = [np.array([0, 1, 2]), np.array([10, 11]), np.array([], dtype=np.int64)]
    got = marker_scores(sp.csr_matrix(dense), sigs, max_rank=20)
    for j in range(2):
        np.testing.assert_allclose(got[:, j], _ucell_reference(dense, sigs[j], 20), atol=1e-6)
    assert np.isnan(got[:, 2]).all()  # no markers: the scorer abstains
    assert got[:10, 0].min() > got[10:, 0].max()
    deeper = marker_scores(sp.csr_matrix(dense * 7), sigs, max_rank=20)
    np.testing.assert_allclose(got, deeper)
    idx, missing = marker_indices([["g0", "nope"], ["g10"]], [f"g{i}" for i in range(50)])
    assert idx[0].tolist() == [0]
    assert missing == [["nope"], []]


def test_marker_kernel_matches_weighted_reference_on_ties_floats_and_unsorted_rows():
    rng = np.random.default_rng(1)
    counts = rng.poisson(0.7, size=(200, 120)).astype(float)
    logs = np.log1p(counts * rng.uniform(0.5, 3.0, size=(200, 1)))  # non-integer values
    sigs = [rng.choice(120, size=m, replace=False) for m in (1, 4, 9)] + [np.array([5, 5, 7])]
    wts = [rng.uniform(0.2, 3.0, size=s.size) for s in sigs]
    for dense in (counts, logs):
        mat = sp.csr_matrix(dense)
        shuffled = mat.copy()  # same matrix, indices stored out of order within rows
        for r in range(shuffled.shape[0]):
            a, b = shuffled.indptr[r], shuffled.indptr[r + 1]
            perm = rng.permutation(b - a) + a
            shuffled.indices[a:b] = shuffled.indices[perm]
            shuffled.data[a:b] = shuffled.data[perm]
        shuffled.has_sorted_indices = False
        for cap in (5, 40, 1500):
            got = marker_scores(shuffled, sigs, max_rank=cap, weights=wts)
            for j, (sig, w) in enumerate(zip(sigs, wts, strict=True)):
                ranks = np.minimum(np.apply_along_axis(rankdata, 1, -dense), cap + 1)
                u = (ranks[:, sig] * w).sum(1) - w.sum() * (sig.size + 1) / 2
                ref = np.clip(1 - u / (w.sum() * cap), 0, 1)
                np.testing.assert_allclose(got[:, j], ref, atol=1e-6)
    with pytest.raises(InputError, match="out of range"):
        marker_scores(sp.csr_matrix(counts), [np.array([120])])


def test_combine_assign_and_registry():
    text = np.array([[0.9, 0.1, 0.0], [0.2, 0.25, 0.3]], dtype=np.float32)
    mark = np.array([[0.1, 0.9, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(combine({"text": text}, {"text": 2.0}), text)
    both = combine({"text": text, "markers": mark}, {"text": 1.0, "markers": 1.0})
    z = lambda a: (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(both, (z(text) + z(mark)) / 2, rtol=1e-5)
    with pytest.raises(ConfigError):
        combine({"text": text}, {"text": 0.0})
    out = assign(text, ["a", "b", "c"], top_k=2, unassigned_threshold=0.1)
    assert out["best_label"].tolist() == ["a", "c"]
    assert out["label"].tolist() == ["a", "unassigned"]
    assert out["margin"].tolist() == pytest.approx([0.8, 0.05])
    assert out.loc[1, "top_labels"] == ["c", "b"]
    assert out.loc[0, "top_scores"] == pytest.approx([0.9, 0.1])
    assert set(SCORERS.names()) >= {"text", "markers"}
    inputs = ScoreInputs(cell_emb=np.eye(3), text_emb=np.eye(3), center=False)
    _per, combined = score_cells(inputs, {"text": 1.0})
    np.testing.assert_allclose(combined, np.eye(3))
    with pytest.raises(ConfigError, match="markers"):
        score_cells(inputs, {"text": 1.0, "markers": 1.0})
