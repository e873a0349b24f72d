"""Cell-type discovery, the pure pieces: neighbours, naming, knowledge, ontology metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypipe.annotate.clustering import Clustering, assign_by_neighbours
from raypipe.annotate.knowledge import (
    BROAD_CLASSES,
    MarkerKnowledge,
    name_offline,
    score_terms,
    text_mentions,
)
from raypipe.annotate.naming import naming_prompt, parse_name_answer
from raypipe.config import load_config
from raypipe.core.neighbors import query_neighbors
from raypipe.core.pca import PCAxes
from raypipe.errors import ConfigError
from raypipe.evaluate.ontology_metrics import (
    cl_exact,
    cl_lineage,
    cl_per_class,
    lineage_credit,
    load_ancestor_distances,
)

B, T, MONO, CD14_MONO, CD4_AB = (
    "CL:0000236",
    "CL:0000084",
    "CL:0000576",
    "CL:0001054",
    "CL:0000624",
)


@pytest.fixture(scope="module")
def ontology():
    from raypipe.annotate.ontology import load_ontology

    return load_ontology()


@pytest.fixture(scope="module")
def ancestors():
    return load_ancestor_distances(None)


def test_query_neighbors_equals_brute_force():
    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(300, 8)), rng.normal(size=(50, 8))
    idx, dist = query_neighbors(q, ref, 5, block=16)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(q) @ unit(ref).T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(dist, 1 - np.take_along_axis(sims, want, axis=1), atol=1e-5)


def test_assign_by_neighbours_takes_the_majority_then_the_nearest():
    reference = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    clusters = np.array([0, 0, 0, 1, 1])
    got = assign_by_neighbours(
        np.array([[1, 0.05], [0.05, 1]], dtype=np.float32), reference, clusters, 3
    )
    assert got.tolist() == [0, 1]
    # a 1-1 tie goes to the nearest reference row's cluster
    tie = assign_by_neighbours(np.array([[0.2, 1]], dtype=np.float32), reference, clusters, 2)
    assert tie.tolist() == [1]


def test_clustering_round_trips():
    pca = PCAxes(np.array([0, 2]), np.array([0.5, 1.0]), np.eye(2))
    for ref in (None, np.ones((3, 2), dtype=np.float32)):
        c = Clustering(np.array([1, 4, 7]), np.array([0, 1, 0]), pca, ref, "fp")
        back = Clustering.from_bytes(c.to_bytes())
        assert back.fingerprint == "fp"
        assert back.n_clusters == 2
        np.testing.assert_array_equal(back.rows, c.rows)
        assert (back.reference is None) == (ref is None)


@pytest.mark.parametrize(
    ("answer", "name", "why"),
    [
        ("B cells", "B cells", None),
        ("  CD14+ Monocytes.\n", "CD14+ Monocytes", None),
        ("1. NK cells", "NK cells", None),
        ('"Plasmacytoid dendritic cells"', "Plasmacytoid dendritic cells", None),
        ("", None, "empty"),
        ("T cells\nB cells", None, "several lines"),
        ("Unknown", None, "no cell type"),
        ("I cannot determine the cell type from these markers alone, sorry about that", None, "no"),
    ],
)
def test_parse_name_answer(answer, name, why):
    got, reason = parse_name_answer(answer)
    assert got == name
    assert (reason is None) == (why is None)
    if why:
        assert why in reason


def test_prompt_lists_markers_and_tissue():
    p = naming_prompt(["MS4A1", "CD79A"], "blood")
    assert "blood cells" in p
    assert p.endswith("MS4A1, CD79A")


def test_text_mentions_longest_term_and_not_process_targets(ontology):
    got = text_mentions(
        {
            "CD79A": "CD79a molecule; B cell activation; B cell receptor signaling pathway",
            "CXCL8": "C-X-C motif chemokine ligand 8; neutrophil chemotaxis",
            "CD4": "CD4-positive, alpha-beta T cell activation",
            "ACTB": "actin beta; cytoskeleton",
        },
        ontology,
        skip=BROAD_CLASSES,
    )
    assert got["CD79A"] == {B: 1.0}
    assert "CXCL8" not in got  # the chemokine attracts neutrophils; it is not their marker
    assert got["CD4"] == {CD4_AB: 1.0}  # the longest phrase, not "T cell" inside it
    assert "ACTB" not in got


def test_offline_naming_from_knowledge_and_unassigned(ontology):
    know = MarkerKnowledge()
    for g in ("MS4A1", "CD79A", "CD79B", "CD19"):
        know.add(B, g, 1.0)
    for g in ("CD14", "LYZ", "S100A8"):
        know.add(CD14_MONO, g, 1.0)
    for g in ("CD3E", "CD3D"):
        know.add(T, g, 1.0)
    filler = [f"G{i}" for i in range(40)]
    for g in filler:
        know.add("CL:0000540", g, 0.1)  # neuron: background genes
    ranked = [
        ["MS4A1", "CD79A", "CD79B", "G1"],
        ["LYZ", "CD14", "S100A8", "G2"],
        ["G3", "G4", "XYZ"],
    ]
    rows = name_offline(ranked, know, ontology, min_support=1.5)
    assert rows[0]["cl_id"] == B
    assert rows[0]["evidence"][:2] == ["MS4A1", "CD79A"]
    assert rows[1]["cl_id"] == CD14_MONO
    assert rows[2]["cl_id"] is None
    assert "min_support" in rows[2]["why"]
    tables = score_terms(ranked, know, ontology)
    b = tables[0].set_index("cl_id")
    assert b.loc[B, "support"] == pytest.approx(b.loc["CL:0000945", "support"])  # true path
    assert all(r["cl_id"] not in BROAD_CLASSES for r in rows)


def test_a_term_supported_by_too_few_genes_names_no_cluster(ontology):
    know = MarkerKnowledge()
    for g in ("CD3E", "CD3D"):  # a term known by two genes: two chance hits look significant
        know.add(T, g, 1.0)
    for g in ("MS4A1", "CD79A", "CD79B"):
        know.add(B, g, 1.0)
    for i in range(40):
        know.add("CL:0000540", f"G{i}", 0.1)
    ranked = [["CD3E", "CD3D", "G1"], ["CD3E", "CD3D", "MS4A1", "CD79A", "CD79B"]]
    two, three = (
        name_offline(ranked, know, ontology, min_support=1.0, min_genes=n) for n in (2, 3)
    )
    assert two[0]["cl_id"] == T
    assert three[0]["cl_id"] is None
    assert "min_marker_genes 3" in three[0]["why"]
    assert three[0]["evidence"] == ["CD3E", "CD3D"]
    assert three[1]["cl_id"] == B


def test_offline_naming_without_any_known_gene(ontology):
    rows = name_offline([["A1", "A2"]], MarkerKnowledge(), ontology, min_support=1.0)
    assert rows[0]["cl_id"] is None
    assert "marker knowledge" in rows[0]["why"]


def test_broad_classes_are_real_terms(ontology):
    for tid, label in BROAD_CLASSES.items():
        assert ontology.terms[tid].label.lower().removeprefix("obsolete ") == label.lower()


def test_lineage_credit_rules(ancestors):
    assert lineage_credit(CD4_AB, CD4_AB, ancestors)
    assert lineage_credit(T, CD4_AB, ancestors)  # a more specific call
    assert lineage_credit(CD4_AB, T, ancestors)  # T cell is 3 is_a steps above
    assert not lineage_credit(CD4_AB, "CL:0000542", ancestors)  # lymphocyte: broad
    assert not lineage_credit(CD4_AB, B, ancestors)
    assert not lineage_credit("CL:0000860", "CL:0000875", ancestors)  # classical vs non-classical
    assert lineage_credit(CD14_MONO, MONO, ancestors)
    assert not lineage_credit(None, B, ancestors)
    assert not lineage_credit(B, None, ancestors)


def test_cl_metrics_and_per_class(ancestors):
    truth = [B, B, CD4_AB, CD4_AB, None]
    pred = [B, "CL:0000945", T, None, B]  # B lineage parent, T ancestor, no call, no truth
    assert cl_exact(truth, pred) == pytest.approx(1 / 4)
    assert cl_lineage(truth, pred, ancestors) == pytest.approx(3 / 4)
    per, conf = cl_per_class(truth, pred, ancestors, labels={B: "B cell"})
    assert per.loc["CL:0000236 B cell", "support"] == 2
    assert per.loc["CL:0000236 B cell", "cl_lineage"] == 1.0
    assert conf.loc["CL:0000624", "none"] == 1


def test_config_accepts_auto_and_checks_sizes():
    job = load_config(
        {"input": {"path": "x.h5ad"}, "output_dir": "o", "annotate": {"candidates": "auto"}}
    )
    assert job.annotate.candidates == "auto"
    assert job.annotate.discover.naming == "offline"
    with pytest.raises(ConfigError, match="sample_cells"):
        load_config(
            {
                "input": {"path": "x.h5ad"},
                "output_dir": "o",
                "annotate": {"discover": {"max_cells": 10, "sample_cells": 100}},
            }
        )
    with pytest.raises(ConfigError):
        load_config(
            {"input": {"path": "x.h5ad"}, "output_dir": "o", "annotate": {"candidates": "all"}}
        )


def test_per_class_frame_types(ancestors):
    per, _ = cl_per_class([B], [B], ancestors)
    assert isinstance(per, pd.DataFrame)
    assert per["cl_exact"].iloc[0] == 1.0


def test_llm_names_each_cluster_once_through_the_real_client(tmp_path, monkeypatch):
    """GPTCelltype naming with the real openai client against the loopback server: one request
    per cluster, cached (a second call sends none), an unusable answer a failure row."""
    from servers.openai_server import FakeOpenAI

    from raypipe.annotate.naming import llm_cluster_names
    from raypipe.llm.generate import build_generator

    monkeypatch.setenv("RAYPIPE_TEST_NAMING_KEY", "sk-loopback")

    def answer(prompt: str) -> str | None:
        last = prompt.splitlines()[-1]
        return "B cells" if "MS4A1" in last else ("" if "BAD1" in last else "NK cells")

    with FakeOpenAI("sk-loopback", chat_answer=answer) as srv:
        job = load_config(
            {
                "input": {"path": "x.h5ad"},
                "output_dir": str(tmp_path / "run"),
                "llm": {
                    "model": "fake-chat",
                    "base_url": srv.base_url,
                    "api_key_env": "RAYPIPE_TEST_NAMING_KEY",
                    "max_tokens": 20,
                },
                "limits": {"max_retries": 0, "timeout_s": 10},
                "annotate": {"tissue": "blood"},
            }
        )
        markers = [["MS4A1", "CD79A"], ["NKG7", "GNLY"], ["BAD1", "BAD2"]]
        gen = build_generator(job)
        try:
            rows, fails, usage = llm_cluster_names(markers, job, generator=gen)
            assert srv.calls["/v1/chat/completions"] == 3
            assert [r["name"] for r in rows] == ["B cells", "NK cells", None]
            assert rows[0]["prompt"].endswith("MS4A1, CD79A")
            assert "blood" in rows[0]["prompt"]
            assert fails == [
                {
                    "stage": "annotate_discover_names",
                    "item": "cluster 2",
                    "reason": rows[2]["error"],
                }
            ]
            assert usage["fake-chat"]["calls"] == 3
            llm_cluster_names(markers, job, generator=gen)
            assert srv.calls["/v1/chat/completions"] == 4  # only the failed cluster asked again
        finally:
            gen.close()


def test_auto_with_zero_cells_fails_before_any_work(tmp_path):
    from data_factory import job_dict, make_adata, write_gene_table, write_h5ad

    from raypipe.errors import InputError
    from raypipe.orchestrate.runner import run_job

    path = write_h5ad(tmp_path / "zero.h5ad", make_adata(20)[:0].copy())
    cfg = job_dict(
        path,
        tmp_path / "run",
        write_gene_table(tmp_path / "genes.tsv"),
        annotate={"enabled": True, "candidates": "auto"},
    )
    with pytest.raises(InputError, match="has no cells"):
        run_job(load_config(cfg), progress=False)
    assert not (tmp_path / "run" / "annotations" / "clusters.parquet").exists()


def test_marker_table_is_knowledge_and_an_unknown_cell_type_is_an_error(ontology, tmp_path):
    from raypipe.annotate.knowledge import marker_knowledge
    from raypipe.annotate.mapping import LabelMapper
    from raypipe.errors import InputError

    atlas_genes = {"MS4A1", "CD79A", "NKG7", "GNLY"}

    def resolve(name: str) -> list[str]:
        return [name] if name in atlas_genes else []

    table = tmp_path / "markers.csv"
    pd.DataFrame(
        {
            "cell_type": ["B cells", "B cells", "CL:0000623", "CL:0000623", "CL:0000623"],
            "gene": ["MS4A1", "CD79A", "NKG7", "GNLY", "NOTINATLAS"],
        }
    ).to_csv(table, index=False)
    job = load_config(
        {
            "input": {"path": "x.h5ad"},
            "output_dir": "o",
            "annotate": {"ontology_markers": False, "discover": {"marker_table": str(table)}},
        }
    )
    know = marker_knowledge(job, ontology, LabelMapper(ontology), resolve)
    assert know.term_genes == {
        B: {"MS4A1": 1.0, "CD79A": 1.0},
        "CL:0000623": {"NKG7": 1.0, "GNLY": 1.0},
    }
    pd.DataFrame({"cell_type": ["Zorblax cells"], "gene": ["MS4A1"]}).to_csv(table, index=False)
    with pytest.raises(
        InputError, match=r"match no Cell Ontology term.*markers.csv: Zorblax cells"
    ):
        marker_knowledge(job, ontology, LabelMapper(ontology), resolve)
