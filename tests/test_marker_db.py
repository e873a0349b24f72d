"""The curated marker resource (PanglaoDB): fetch, read, map to CL once, markers per candidate.

Runs on a cut of the real table (``tests/data/markers/``, provenance and licence beside it);
``raypipe markers fetch`` is tested against an HTTP server the test starts on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import http.server
import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from raypipe.annotate.candidates import build_candidates, marker_source_counts
from raypipe.annotate.mapping import GeneNames, LabelMapper
from raypipe.annotate.marker_db import (
    MARKER_DBS,
    default_path,
    fetch_markers,
    load_marker_db,
    read_marker_file,
    resource_markers,
)
from raypipe.annotate.ontology import load_ontology
from raypipe.annotate.summary import summary_lines
from raypipe.cli import main
from raypipe.errors import InputError

FIXTURE = Path(__file__).parent / "data" / "markers" / "PanglaoDB_markers_27_Mar_2020.cut.tsv"
TRUTH = pd.read_csv(Path(__file__).parent / "data" / "mapping" / "truth.tsv", sep="\t")


@pytest.fixture(scope="module")
def genes(shared_data):
    from raypipe.genes.table import GeneTable

    table = GeneTable.from_files(
        shared_data / "genes" / "orgHs_gene_text_go.tsv.gz",
        shared_data / "genes" / "orgHs_gene_aliases.tsv.gz",
    )
    return GeneNames.from_table(table)


@pytest.fixture(scope="module")
def mapper(genes):
    return LabelMapper(load_ontology(), genes=genes)


@pytest.fixture(scope="module")
def db(mapper):
    return load_marker_db(str(FIXTURE), mapper)


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server on a free port serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):  # quiet test output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_from_loopback_http_into_the_user_cache(served, capsys):
    root, base = served
    gz = root / MARKER_DBS.get("panglaodb").filename
    with FIXTURE.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert main(["markers", "fetch", "--url", f"{base}/{gz.name}"]) == 0
    out = capsys.readouterr().out
    assert "527 rows, 38 cell types" in out
    path = default_path()  # $RAYPIPE_CACHE_DIR/markers/PanglaoDB_markers_27_Mar_2020.tsv.gz
    assert path.is_file()
    meta = json.loads(path.with_name(path.name + ".source.json").read_text())
    assert meta["url"] == f"{base}/{gz.name}"
    assert len(meta["sha256"]) == 64
    assert len(read_marker_file(path)) == 527
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_fetch_and_read_errors_name_the_file_and_the_fix(served, tmp_path):
    root, base = served
    (root / "page.html").write_text("<html><body>Service unavailable</body></html>")
    dest = tmp_path / "m.tsv"
    with pytest.raises(InputError, match=r"page\.html.*not a panglaodb marker table") as err:
        fetch_markers(url=f"{base}/page.html", dest=dest)
    assert "fix:" in str(err.value)
    assert not dest.exists()
    assert not list(tmp_path.glob(".*m.tsv"))  # the bad download is not left behind
    with pytest.raises(InputError, match="could not download"):
        fetch_markers(url=f"{base}/missing.tsv.gz", dest=dest)
    with pytest.raises(InputError, match=r"not found[\s\S]*raypipe markers fetch"):
        read_marker_file(tmp_path / "nowhere.tsv")
    from raypipe.annotate.prepare import check_annotate_config
    from raypipe.config import load_config

    job = load_config(
        {
            "input": {"path": "x.h5ad"},
            "output_dir": str(tmp_path / "out"),
            "annotate": {"enabled": True, "marker_db": {"enabled": True}},
        }
    )
    with pytest.raises(InputError, match=r"PanglaoDB_markers_27_Mar_2020.tsv.gz not found"):
        check_annotate_config(job)  # before any work: the user cache has no copy yet
    cut = tmp_path / "cut.tsv"
    cut.write_text("species\tcell type\nHs\tB cells\n")
    with pytest.raises(InputError, match=r"lacks the PanglaoDB columns.*official gene symbol"):
        read_marker_file(cut)


def test_cell_types_are_mapped_once_and_recorded(db, mapper, tmp_path):
    mp = db.mapping.set_index("cell_type")
    assert len(mp) == 38
    assert mp.loc["B cells", "cl_id"] == "CL:0000236"
    assert mp.loc["Alpha cells", "cl_id"] == "CL:0000171"  # organ "Pancreas" as the tissue
    assert mp.loc["Gastric chief cells", "cl_id"] == "CL:0000155"
    assert mp.loc["Pulmonary alveolar type II cells", "cl_id"] == "CL:0002063"
    assert mp["used"].sum() >= 34
    assert (mp.loc[mp["used"], "confidence"] >= 0.8).all()
    again = load_marker_db(str(FIXTURE), mapper)  # from the cache beside the copy
    pd.testing.assert_frame_equal(again.mapping, db.mapping)
    cached = list((default_path().parent).glob("panglaodb-mapping-*.parquet"))
    assert len(cached) == 1


def test_markers_for_terms_their_descendants_and_ancestors(db):
    b = db.markers_for("CL:0000236")
    assert {"MS4A1", "CD79A"} <= set(b)
    assert all(0 < w <= 1.0 for w, _ in b.values())
    assert b["CD79A"][0] > 0.9  # canonical, expressed by few other cell types
    mono14 = db.markers_for("CL:0001054")  # CD14-positive monocyte: from "Monocytes", halved
    assert mono14
    assert max(w for w, _ in mono14.values()) <= 0.5
    assert {n for _, n in mono14.values()} == {"Monocytes"}
    assert db.markers_for("CL:0000000") == {}  # "cell": nothing this broad
    human = db.rows["gene"].nunique()
    mouse = load_marker_db(str(FIXTURE), LabelMapper(db.ontology, species="mouse"), species="mouse")
    assert mouse.rows["gene"].nunique() != human  # Mm-only and Hs-only rows differ


def test_resource_markers_for_other_stages(genes):
    got = resource_markers("human", path=str(FIXTURE), genes=genes)
    assert {"MS4A1", "CD79A"} <= set(got["CL:0000236"])
    assert all(isinstance(w, float) and w > 0 for m in got.values() for w in m.values())
    raw = pd.read_csv(FIXTURE, sep="\t", dtype=str)
    beta = raw[(raw["cell type"] == "Beta cells") & raw["species"].str.contains("Hs")]
    assert set(got["CL:0000169"]) >= set(beta["official gene symbol"]) - {"GCG"} - set()


def test_every_truth_candidate_the_resource_covers_gets_its_markers(db, mapper):
    covered = {}
    for r in TRUTH.itertuples(index=False):
        m = mapper.map(r.label, tissue=r.tissue)
        if m.cl_id is not None and m.cl_id in db.terms:
            covered[r.label] = m
    assert len(covered) >= 40
    table = build_candidates(
        list(covered), db.ontology, mapper=mapper, mappings=list(covered.values()), resource=db
    )
    lacking = table[[len(m) == 0 for m in table["markers"]]]
    assert lacking.empty, lacking[["label", "cl_id"]].to_string()
    assert set(table["marker_source"]) == {"marker_db"}


def _weights(table, label):
    row = table.loc[label]
    return dict(zip(row["markers"], row["marker_weights"], strict=True))


def test_trust_order_and_summary_per_source(db, mapper):
    table = build_candidates(
        ["B cells", "pancreatic alpha cells", "CD14+ Monocytes", "Hepatocytes", "Mast cells"],
        db.ontology,
        mapper=mapper,
        resource=db,
        markers={"Hepatocytes": ["ALB", "APOA1", "TTR", "CD3E-"]},
    ).set_index("label")
    assert table.loc["Hepatocytes", "marker_source"] == "config"  # config > resource
    hep = _weights(table, "Hepatocytes")
    assert hep["CD3E"] < 0  # "CD3E-" in config: a negative marker
    assert table.loc["B cells", "marker_source"] == "marker_db"  # resource > ontology
    src = table.loc["B cells", "marker_sources"]
    assert all(s.startswith("marker_db:panglaodb (B cells)") for s in src if s)
    assert table.loc["Mast cells", "marker_source"] in ("ontology", "none")  # not in the cut
    mono = _weights(table, "CD14+ Monocytes")
    assert all(mono[g] < 0 for g in ("CD19", "CD3E") if g in mono)  # "negative for CD3, CD19"
    counts = marker_source_counts(table.reset_index())
    assert counts["marker_db"][1] == 3
    assert counts["config"] == (1, 1)
    line = next(x for x in summary_lines(table.reset_index()) if "marker sources" in x)
    assert "config 1/1" in line
    assert "marker_db" in line


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_uses_the_resource_and_negative_markers(ray_local, kang1k5, shared_data, tmp_path):
    """End to end on 300 real Kang cells: resource markers, recorded mapping, summary line."""
    import anndata as ad
    import numpy as np
    from data_factory import GENES, job_dict, write_gene_table

    from raypipe.config import load_config
    from raypipe.orchestrate.runner import run_job

    full = ad.read_h5ad(kang1k5)
    panglao = set(pd.read_csv(FIXTURE, sep="\t")["official gene symbol"])
    genes = [g for g in full.var_names if g in set(GENES) | panglao]
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, 300, replace=False))
    small = tmp_path / "kang_small.h5ad"
    full[rows, genes].copy().write_h5ad(small)
    cfg = job_dict(
        small,
        tmp_path / "run",
        write_gene_table(tmp_path / "genes.tsv"),
        input={"path": str(small), "label_key": "cluster_id", "rows_per_chunk": 64},
        genes={
            "min_coverage": 0.2,
            "aliases": str(shared_data / "genes" / "orgHs_gene_aliases.tsv.gz"),  # CD3, CD20
        },
        annotate={
            "enabled": True,
            "tissue": "blood",
            "scorers": {"markers": 1.0},
            "smoothing": 0.0,
            "marker_db": {"enabled": True, "path": str(FIXTURE)},
        },
    )
    summary = run_job(load_config(cfg), progress=False)
    out = tmp_path / "run" / "annotations"
    recorded = pd.read_parquet(out / "marker_db_mapping.parquet")
    assert len(recorded) == 38
    assert set(recorded["source"]) == {"panglaodb"}
    cand = pd.read_parquet(out / "label_mapping.parquet").set_index("label")
    assert cand.loc["B cells", "marker_source"] == "marker_db"
    assert {"MS4A1", "CD79A"} <= set(cand.loc["B cells", "markers"])
    mono = cand.loc["CD14+ Monocytes"]
    absent = {g for g, w in zip(mono["markers"], mono["marker_weights"], strict=True) if w < 0}
    assert "MS4A1" in absent  # "negative for CD3, CD19, CD20": CD20 = MS4A1 through the aliases
    assert any("marker sources" in line and "marker_db" in line for line in summary.candidates)
    calls = pd.concat(pd.read_parquet(p) for p in sorted((out / "genept_w").glob("part-*")))
    truth = full.obs["cluster_id"].astype(str).to_numpy()[rows]
    assert (calls.sort_values("row")["label"].to_numpy() == truth).mean() > 0.5


@pytest.mark.integration
def test_the_resource_loads_from_a_bucket_url(mapper):
    """``annotate.marker_db.path: s3://…`` against a real S3 server (moto) on loopback."""
    from servers.s3 import moto_env

    from raypipe.core import storage

    with moto_env("resources"):
        storage.open_fs("s3").put_file(str(FIXTURE), "resources/panglao.tsv")
        db = load_marker_db("s3://resources/panglao.tsv", mapper)
        assert len(db.mapping) == 38
        assert "CL:0000236" in db.terms
        with pytest.raises(InputError, match=r"s3://resources/missing\.tsv"):
            load_marker_db("s3://resources/missing.tsv", mapper)
