"""Marker knowledge, weighted UCell, per-candidate standardisation and graph smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from raypipe.annotate.candidates import build_candidates
from raypipe.annotate.mapping import GeneNames, LabelMapper
from raypipe.annotate.markers import (
    ontology_markers,
    parse_marker_answer,
    specificity_weights,
)
from raypipe.annotate.ontology import load_ontology
from raypipe.annotate.scorers import combine, marker_scores
from raypipe.annotate.smoothing import (
    block_knn_graph,
    expression_features,
    knn_graph,
    smooth_scores,
)
from raypipe.errors import ConfigError


@pytest.fixture(scope="module")
def gene_table(shared_data):
    from raypipe.genes.table import GeneTable

    return GeneTable.from_files(
        shared_data / "genes" / "orgHs_gene_text_go.tsv.gz",
        shared_data / "genes" / "orgHs_gene_aliases.tsv.gz",
    )


def test_weighted_ucell_reduces_to_ucell_and_follows_weights():
    rng = np.random.default_rng(1)
    dense = rng.poisson(1.0, size=(40, 30)).astype(float)
    dense[:20, 0] += 30  # gene 0 high in the first half, gene 1 never
    sig = [np.array([0, 1])]
    plain = marker_scores(sp.csr_matrix(dense), sig, max_rank=10)
    same = marker_scores(sp.csr_matrix(dense), sig, max_rank=10, weights=[np.array([2.0, 2.0])])
    np.testing.assert_allclose(plain, same, atol=1e-6)
    heavy0 = marker_scores(sp.csr_matrix(dense), sig, max_rank=10, weights=[np.array([9.0, 1.0])])
    # weighting the informative gene separates the halves more
    gap = lambda s: s[:20, 0].mean() - s[20:, 0].mean()  # noqa: E731
    assert gap(heavy0) > gap(plain) > 0


def test_negative_markers_lower_the_score_of_cells_expressing_them():
    rng = np.random.default_rng(2)
    dense = rng.poisson(1.0, size=(60, 30)).astype(float)
    dense[:, 0] += 20  # the positive marker: high everywhere
    dense[:30, 1] += 20  # the negated marker: high in the first half, absent in the second
    dense[30:, 1] = 0
    x = sp.csr_matrix(dense)
    sig, signed = [np.array([0, 1])], [np.array([1.0, -1.0])]
    pos = marker_scores(x, [np.array([0])], max_rank=10)
    off = marker_scores(x, sig, max_rank=10, weights=signed, negative=0.0)
    np.testing.assert_allclose(off, pos, atol=1e-6)  # weight 0: the negative part is ignored
    on = marker_scores(x, sig, max_rank=10, weights=signed, negative=0.5)
    assert (on[:30, 0] < pos[:30, 0] - 0.3).all()  # expressing the absent marker costs
    np.testing.assert_allclose(on[30:, 0], pos[30:, 0], atol=0.05)  # not expressing: no cost
    only_neg = marker_scores(x, [np.array([1])], max_rank=10, weights=[np.array([-1.0])])
    assert np.isnan(only_neg).all()  # no positive marker: the scorer abstains


def test_combine_standardises_per_candidate():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 50)
    text = rng.normal(size=(100, 2)) * 0.01
    text[np.arange(100), truth] += 0.02
    text[:, 0] += 0.5  # candidate 0's text is closer to every cell: a constant advantage
    raw = combine({"text": text}, {"text": 1.0}, standardise="cell")
    assert (raw.argmax(1) == 0).all()
    cal = combine({"text": text}, {"text": 1.0}, standardise="candidate")
    assert (cal.argmax(1) == truth).mean() > 0.9
    np.testing.assert_allclose(cal.mean(0), 0, atol=1e-5)
    with pytest.raises(ConfigError, match="standardise"):
        combine({"text": text}, {"text": 1.0}, standardise="bogus")


def test_smoothing_helps_noisy_clusters_and_leaves_tiny_shards():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 3
    truth = np.repeat(np.arange(3), 100)
    x = centres[truth] + rng.normal(size=(300, 20))
    p0 = np.eye(3)[truth] + rng.normal(scale=1.2, size=(300, 3))  # very noisy calls
    acc0 = (p0.argmax(1) == truth).mean()
    acc = (smooth_scores(p0, x, strength=5.0).argmax(1) == truth).mean()
    assert acc > acc0 + 0.15
    assert acc > 0.9
    np.testing.assert_allclose(smooth_scores(p0, x, strength=0.0), p0.astype(np.float32))
    np.testing.assert_allclose(smooth_scores(p0[:10], x[:10], strength=5.0), p0[:10], rtol=1e-6)
    w = knn_graph(x, k=5)
    assert (w != w.T).nnz == 0
    assert w.diagonal().sum() == 0
    feats = expression_features(sp.csr_matrix(rng.poisson(1.0, size=(60, 40)).astype(float)))
    assert feats.shape == (60, 30)


def test_block_graphs_are_interleaved_samples_and_one_block_is_the_plain_graph():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 20)) * 3
    truth = np.repeat(np.arange(3), 300)  # sorted by type, as atlases often are
    x = centres[truth] + rng.normal(size=(900, 20))
    one = block_knn_graph(x, k=5, block=900)
    assert (one != knn_graph(x, k=5)).nnz == 0
    w = block_knn_graph(x, k=5, block=256)  # 4 blocks: rows 0, 4, 8, … / 1, 5, 9, … / …
    r, c = w.nonzero()
    assert r.size
    assert (r % 4 == c % 4).all()
    assert (w != w.T).nnz == 0
    assert w.diagonal().sum() == 0
    members = np.arange(1, 900, 4)
    assert (w[members][:, members] != knn_graph(x[members], k=5)).nnz == 0
    p0 = np.eye(3)[truth] + rng.normal(scale=1.2, size=(900, 3))
    acc = (smooth_scores(p0, x, strength=5.0, block=256).argmax(1) == truth).mean()
    assert acc > 0.9  # every block holds every type of the shard
    counts = sp.csr_matrix(rng.poisson(np.exp(centres[truth] / 3)).astype(float))
    whole = expression_features(counts, n_components=5, fit_rows=None)
    np.testing.assert_allclose(expression_features(counts, n_components=5, fit_rows=900), whole)
    sampled = expression_features(counts, n_components=5, fit_rows=200)  # axes from 180 rows
    assert sampled.shape == whole.shape
    assert not np.allclose(sampled, whole)  # the sample, not every cell, fitted the axes
    for f in (whole, sampled):  # the same clusters come out: nearest neighbour shares the type
        nn = block_knn_graph(f, k=1, block=900).tolil().rows
        assert np.mean([truth[r[0]] == truth[i] for i, r in enumerate(nn)]) > 0.95


def test_specificity_and_strict_llm_answer_parsing():
    w = specificity_weights([{"A": 1.0, "S": 1.0}, {"B": 0.5, "S": 1.0, "A": 0.25}])
    assert w[0] == pytest.approx({"A": 0.8, "S": 0.5})
    assert w[1] == pytest.approx({"B": 0.5, "S": 0.5, "A": 0.05})
    known = {"CD3E", "CD4", "IL7R"}.__contains__
    assert parse_marker_answer("CD3E, CD4, IL7R.", known) == (["CD3E", "CD4", "IL7R"], None)
    genes, why = parse_marker_answer("FOO1, BAR2", known)
    assert genes is None
    assert "no known gene" in why
    genes, why = parse_marker_answer("Sure! The markers of T cells are CD3E and CD4.", known)
    assert genes is None
    assert "comma-separated" in why
    assert parse_marker_answer("", known) == (None, "empty answer")


def test_ontology_markers_with_aliases_and_negation(gene_table):
    onto = load_ontology()
    mapper = LabelMapper(onto, genes=GeneNames.from_table(gene_table))
    nk = ontology_markers(mapper, "CL:0000623")  # natural killer cell
    assert "CD56" in {n.upper() for n in nk.names}  # from its descendants names
    assert all(s.startswith("ontology:") for s in nk.sources)
    ncm = ontology_markers(mapper, "CL:0002396")  # CD14-low, CD16-positive monocyte
    assert "CD16" in ncm.names
    assert "CD14" not in ncm.names

    symbols = ["CD14", "FCGR3A", "FCGR3B", "NCAM1", "MS4A1", "CD19", "CD38", "CD3E", "CD4"]
    resolve = GeneNames.from_table(gene_table)

    def resolver(name):
        return [s for s in resolve.symbols(name) if s in symbols]

    table = build_candidates(
        ["CD14+ Monocytes", "FCGR3A+ Monocytes", "NK cells", "B cells"],
        onto,
        mapper=mapper,
        resolver=resolver,
    ).set_index("label")
    nk_row = table.loc["NK cells"]
    assert "NCAM1" in nk_row["markers"]  # CD56 → NCAM1 through the alias table
    i = list(nk_row["markers"]).index("NCAM1")
    assert "(CD56)" in nk_row["marker_sources"][i]
    mono16 = table.loc["FCGR3A+ Monocytes"]
    w16 = dict(zip(mono16["markers"], mono16["marker_weights"], strict=True))
    # CD14 is stated by both monocyte candidates: halved. CD16 names two genes: its weight
    # is split between FCGR3A and FCGR3B, and both keep the alias in their source
    assert w16["CD14"] == pytest.approx(0.5)
    assert w16["FCGR3A"] + w16["FCGR3B"] > w16["CD14"]
    src = dict(zip(mono16["markers"], mono16["marker_sources"], strict=True))
    assert "(CD16)" in src["FCGR3A"]
    assert table.loc["B cells", "marker_source"] == "ontology"
    assert "CD38" in table.loc["B cells", "markers"]  # 14 of the 97 B-cell descendants name it
    assert "CD19" not in table.loc["B cells", "markers"]  # 1 of 97: under the 5% cut


def test_llm_descriptions_asked_once_cached_checked_and_used_as_text(tmp_path, monkeypatch):
    from servers.openai_server import FakeOpenAI

    from raypipe.annotate.descriptions import check_description, llm_descriptions
    from raypipe.config import load_config

    good = (
        "B cells are lymphocytes that make antibodies after antigen contact. They circulate "
        "in blood and lymphoid organs. They express MS4A1, CD79A and CD19."
    )

    def answer(prompt):
        if "'B cell'" in prompt:
            return good
        return "- a list\n- not prose"  # an unusable answer: a failure row, not a text

    monkeypatch.setenv("RAYPIPE_TEST_DESC_KEY", "sk-loopback")
    with FakeOpenAI("sk-loopback", chat_answer=answer) as srv:
        job = load_config(
            {
                "input": {"path": "x.h5ad"},
                "output_dir": str(tmp_path / "run"),
                "cache": {"path": str(tmp_path / "cache")},
                "llm": {
                    "backend": "openai",
                    "model": "fake-chat",
                    "base_url": srv.base_url,
                    "api_key_env": "RAYPIPE_TEST_DESC_KEY",
                    "max_tokens": 120,
                },
                "limits": {"max_retries": 1, "backoff_base_s": 0.01, "timeout_s": 10},
                "annotate": {"llm_descriptions": True, "tissue": "blood"},
            }
        )
        asks = [("B cells", "B cell", "CL:0000236"), ("Mono", "monocyte", "CL:0000576")]
        found, fails, _ = llm_descriptions(asks, job)
        assert found == {"B cells": good}
        assert [f["item"] for f in fails] == ["Mono"]
        assert "list" in fails[0]["reason"]
        prompts = [p for p in srv.served if "Describe the cell type" in p]
        assert len(prompts) == 2
        assert all("human blood" in p for p in prompts)
        srv.reset_counters()
        again, _, _ = llm_descriptions(asks, job)
        assert again == found
        assert srv.calls["/v1/chat/completions"] == 1  # B cell from the cache; Mono asked again
        from raypipe.annotate.descriptions import descriptions_for_job
        from raypipe.annotate.mapping import LabelMapping

        maps = [LabelMapping(label, cl, name, "label", 1.0) for label, name, cl in asks]
        texts, warnings, _ = descriptions_for_job(job, maps, tmp_path / "run")
        assert texts == found
        assert "Mono" in warnings[0]
        fails_file = tmp_path / "run" / "state" / "failures" / "annotate_descriptions.parquet"
        assert fails_file.is_file()
    onto = load_ontology()
    table = build_candidates(["B cells"], onto, descriptions=found).set_index("label")
    assert table.loc["B cells", "text"].endswith(good)  # what the text scorer embeds
    assert check_description("I'm sorry, I cannot help with that request today, really.")
