"""Gene identity (symbols, Ensembl ids, aliases, duplicates, coverage) and gene text sources."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from servers.mygene import GENES, mygene_server

from raypipe.config import GenesConfig
from raypipe.errors import ConfigError, InputError, RaypipeError
from raypipe.genes import orgdb as orgdb_mod
from raypipe.genes.identity import (
    CoverageReport,
    GeneTable,
    check_coverage,
    detect_id_space,
    resolve_genes,
    strip_version,
    text_coverage,
)
from raypipe.genes.orgdb import OrgdbTextSource, locate_orgdb, orgdb_text, read_orgdb
from raypipe.genes.sources import (
    TEXT_COLUMNS,
    TEXT_SOURCES,
    NcbiTextSource,
    SymbolTextSource,
    TableTextSource,
    build_text_source,
)
from raypipe.genes.space import gene_table_for

SQLITE_DIR = Path("~/.cache/raypipe/orgdb").expanduser()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def genes_dir(shared_data: Path) -> Path:
    return shared_data / "genes"


@pytest.fixture(scope="module")
def org_tsv(genes_dir: Path) -> Path:
    return genes_dir / "orgHs_gene_text_go.tsv.gz"


@pytest.fixture(scope="module")
def org_table(org_tsv: Path) -> GeneTable:
    return read_orgdb(locate_orgdb(org_tsv)).gene_table


@pytest.fixture
def small_table() -> GeneTable:
    ids = pd.DataFrame(
        {
            "symbol": ["CD3E", "CXCL8", "FCGR3A", "FCGR3B", "CD8A", "Foxp3"],
            "ensembl_id": [
                "ENSG00000198851.10",
                "ENSG00000169429",
                "ENSG00000203747",
                "ENSG00000162747",
                "ENSG00000153563",
                "",
            ],
        }
    )
    aliases = pd.DataFrame(
        {
            "alias": ["IL8", "CD16", "CD16", "CD8", "T3E"],
            "symbol": ["CXCL8", "FCGR3A", "FCGR3B", "CD8A", "CD3E"],
        }
    )
    return GeneTable.from_frames(ids, aliases)


# ------------------------------------------------------------------ id space
def test_detect_id_space_and_versions() -> None:
    assert detect_id_space(["CD3E", "MS4A1", "ENSG00000198851"]) == "symbol"
    assert detect_id_space(["ENSG00000198851.10", "ENSG00000156738.18", "CD3E"]) == "ensembl"
    assert detect_id_space(["ENSMUSG00000032093.8", "ENSMUSG00000024673"]) == "ensembl"
    assert detect_id_space(["", "", "CD3E"]) == "symbol"
    assert detect_id_space([]) == "symbol"
    assert strip_version("ENSG00000198851.10") == "ENSG00000198851"
    assert strip_version("ENSG00000182378.14_PAR_Y") == "ENSG00000182378_PAR_Y"
    assert strip_version("ENSG00000198851") == "ENSG00000198851"
    assert strip_version("RP11-34P13.7") == "RP11-34P13.7"


def test_resolve_ensembl_names_with_versions(small_table: GeneTable) -> None:
    res = resolve_genes(
        ["ENSG00000198851.10", "ENSG00000169429.3", "ENSG00000000000.1"], small_table
    )
    assert res.symbols == ("CD3E", "CXCL8", None)
    assert res.how == ("ensembl", "ensembl", "unmatched")
    assert res.ensembl[:2] == ("ENSG00000198851", "ENSG00000169429")


# ------------------------------------------------------------------ aliases and rules
def test_alias_rules(small_table: GeneTable) -> None:
    res = resolve_genes(["IL8", "CD8", "cd3e", "CD16", "T3E", "FOXP3", "XYZ1"], small_table)
    assert res.symbols == ("CXCL8", "CD8A", "CD3E", None, "CD3E", "Foxp3", None)
    assert res.how == ("alias", "alias", "casefold", "unmatched", "alias", "casefold", "unmatched")
    # ambiguous aliases are never guessed, and their candidates are reported
    assert res.ambiguous == {"CD16": ("FCGR3A", "FCGR3B")}
    assert any("CD16 → FCGR3A/FCGR3B" in w for w in res.warnings)
    # ... but the column's Ensembl id decides
    res2 = resolve_genes(["CD16"], small_table, ensembl_ids=["ENSG00000203747.5"])
    assert res2.symbols == ("FCGR3A",)
    assert res2.how == ("ensembl",)
    # the table's primary Ensembl id fills in when the atlas has none
    assert res.ensembl[0] == "ENSG00000169429"


def test_symbol_wins_over_conflicting_ensembl(small_table: GeneTable) -> None:
    res = resolve_genes(["CD3E"], small_table, ensembl_ids=["ENSG00000153563"])
    assert res.symbols == ("CD3E",)
    assert res.how == ("exact",)
    assert res.ensembl == ("ENSG00000153563",)  # the atlas's own id is kept
    assert any("conflict" in w and "CD8A" in w for w in res.warnings)


def test_real_alias_table(org_table: GeneTable) -> None:
    assert org_table.lookup_alias("CD16") == ("FCGR3A", "FCGR3B")
    res = resolve_genes(["CD16", "CD8", "IL8", "SEPT7", "H3F3A", "T3E"], org_table)
    assert res.symbols == (None, "CD8A", "CXCL8", "SEPTIN7", "H3-3A", "CD3E")
    assert res.how[0] == "unmatched"
    assert res.ambiguous["CD16"] == ("FCGR3A", "FCGR3B")


# ------------------------------------------------------------------ duplicates
def test_duplicate_columns_collapse_by_summing(small_table: GeneTable) -> None:
    names = ["IL8", "CD3E", "NOTAGENE", "CXCL8", "T3E", "CD8"]
    res = resolve_genes(names, small_table)
    assert res.unique_symbols == ("CXCL8", "CD3E", "CD8A")
    assert res.unique_ensembl == ("ENSG00000169429", "ENSG00000198851", "ENSG00000153563")
    assert isinstance(res.collapse, sp.csr_matrix)
    assert res.collapse.shape == (6, 3)
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, size=(40, 6)).astype(np.float32))
    got = (X @ res.collapse).toarray()
    dense = X.toarray()
    want = np.stack([dense[:, 0] + dense[:, 3], dense[:, 1] + dense[:, 4], dense[:, 5]], axis=1)
    np.testing.assert_array_equal(got, want)
    assert list(res.column_to_unique) == [0, 1, -1, 0, 1, 2]
    assert sum("summed" in w for w in res.warnings) == 2
    frame = res.to_frame()
    assert list(frame.columns) == ["name", "symbol", "ensembl_id", "how", "unique_index"]
    assert frame.loc[2, "how"] == "unmatched"


def test_no_table_trusts_names() -> None:
    res = resolve_genes(["CD3E", "CD3E", ""], None)
    assert res.unique_symbols == ("CD3E",)
    assert res.how == ("exact", "exact", "unmatched")


# ------------------------------------------------------------------ coverage
def test_coverage_threshold_error_lists_examples(small_table: GeneTable) -> None:
    names = ["CD3E", *[f"FAKE{i}" for i in range(15)]]
    res = resolve_genes(names, small_table)
    report = res.coverage()
    assert isinstance(report, CoverageReport)
    assert (report.n_genes, report.n_covered) == (16, 1)
    assert report.unmatched == tuple(f"FAKE{i}" for i in range(10))
    assert "1 / 16 (6.2%)" in report.summary()
    with pytest.raises(InputError, match="FAKE0, FAKE1") as exc:
        check_coverage(report, 0.5)
    assert "genes.min_coverage" in str(exc.value)
    assert "genes.id_table" in str(exc.value)
    check_coverage(report, 0.05)  # above the threshold: no error


def test_kang8k_mapping_and_text_coverage(kang8k: Path, org_tsv: Path) -> None:
    import anndata as ad

    adata = ad.read_h5ad(kang8k, backed="r")
    names = list(adata.var_names)
    ens = adata.var["ensembl_id"].tolist()
    adata.file.close()
    src = OrgdbTextSource(GenesConfig(orgdb=str(org_tsv)))
    table = src.gene_table()
    res = resolve_genes(names, table, ensembl_ids=ens)
    assert res.coverage().share > 0.99
    counts = res.by_how()
    assert counts["exact"] > 2300
    assert counts["ensembl"] > 100  # renamed genes found through their Ensembl id
    # without Ensembl ids, aliases catch most renamed genes; ambiguous ones stay unmatched
    res_sym = resolve_genes(names, table)
    assert res_sym.coverage().share > 0.99
    assert res_sym.symbols[names.index("H3F3A")] == "H3-3A"
    assert "SARS" in res_sym.ambiguous
    texts = src.texts(list(res.unique_symbols), list(res.unique_ensembl))
    assert list(texts.columns) == list(TEXT_COLUMNS)
    report = text_coverage(res, texts["symbol"], what="Kang 8k genes with orgdb text")
    assert report.share > 0.99
    assert report.summary().startswith("Kang 8k genes with orgdb text: ")
    check_coverage(report, 0.9)


# ------------------------------------------------------------------ gene table files
def test_gene_table_from_files(genes_dir: Path, tmp_path: Path) -> None:
    gencode = GeneTable.from_files(genes_dir / "GENCODEv44_Gene_id2name.csv")
    assert gencode.ensembl_to_symbol["ENSG00000198851"] == "CD3E"
    cxg = GeneTable.from_files(genes_dir / "cxg_schema_genes_homo_sapiens.csv.gz")
    assert "ENSG00000198851" in cxg.symbol_to_ensembl["CD3E"]
    org = GeneTable.from_files(
        genes_dir / "orgHs_gene_text_go.tsv.gz", genes_dir / "orgHs_gene_aliases.tsv.gz"
    )
    assert org.symbol_to_ensembl["ABCF1"][0] == "ENSG00000204574"
    assert org.lookup_alias("IL8") == ("CXCL8",)
    two = tmp_path / "ids.tsv"
    two.write_text("gene_name\tgene_id\nCD3E\tENSG00000198851.10\nMS4A1\tENSG00000156738\n")
    t = GeneTable.from_files(two)
    assert t.symbol_to_ensembl == {"CD3E": ("ENSG00000198851",), "MS4A1": ("ENSG00000156738",)}
    al = tmp_path / "al.csv"
    al.write_text("IL8,CXCL8\nCD8,CD8A\n")
    assert GeneTable.from_files(aliases=al).lookup_alias("il8") == ("CXCL8",)


def test_gene_table_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        GeneTable.from_files(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("symbol,length\nCD3E,100\nMS4A1,200\n")
    with pytest.raises(InputError, match="no column holds Ensembl ids"):
        GeneTable.from_files(bad)


# ------------------------------------------------------------------ table source
def _cfg(**kw: object) -> GenesConfig:
    return GenesConfig(**kw)


def test_genept_json_loads_as_is(tmp_path: Path) -> None:
    data = {
        "CD3E": "Gene Symbol CD3E This gene encodes the CD3-epsilon polypeptide.",
        "MS4A1": "Gene Symbol MS4A1 This gene encodes a B-lymphocyte surface molecule.",
        "LYZ": "Gene Symbol LYZ This gene encodes human lysozyme.",
    }
    path = tmp_path / "NCBI_summary_of_genes.json"
    path.write_text(json.dumps(data))
    src = build_text_source(_cfg(text_source="table", table=str(path)))
    assert isinstance(src, TableTextSource)
    out = src.texts(["CD3E", "ms4a1", "GAPDH"], ["ENSG00000198851", None, None])
    assert out["symbol"].tolist() == ["CD3E", "ms4a1"]
    assert out["gene_id"].tolist() == ["ENSG00000198851", "ms4a1"]
    assert out["text"].tolist() == [data["CD3E"], data["MS4A1"]]
    assert set(out["source"]) == {"table"}
    fp = src.fingerprint()
    assert src.gene_table() is None
    data["LYZ"] = "changed"
    path.write_text(json.dumps(data))
    assert TableTextSource(_cfg(table=str(path))).fingerprint() != fp


def test_table_formats_and_ensembl_keys(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "gene_symbol": ["CD3E", "MS4A1"],
            "ensembl_id": ["ENSG00000198851.10", "ENSG00000156738"],
            "summary": ["T cell receptor subunit.", "B cell surface molecule."],
        }
    )
    for name in ("t.parquet", "t.csv.gz", "t.tsv"):
        path = tmp_path / name
        if name.endswith(".parquet"):
            df.to_parquet(path)
        else:
            with gzip.open(path, "wt") if name.endswith(".gz") else open(path, "w") as fh:
                df.to_csv(fh, sep="\t" if name.endswith(".tsv") else ",", index=False)
        src = TableTextSource(_cfg(table=str(path)))
        out = src.texts(["OLDNAME", "MS4A1"], ["ENSG00000198851", None])
        assert out["text"].tolist() == ["T cell receptor subunit.", "B cell surface molecule."]
        table = src.gene_table()
        assert table is not None
        assert table.ensembl_to_symbol["ENSG00000198851"] == "CD3E"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.tsv", None, "not found"),
        ("notext.tsv", "gene\tfoo\nCD3E\tx\n", r"no text column; columns found: \['gene', 'foo'\]"),
        ("nogene.tsv", "foo\ttext\nCD3E\tx\n", r"no gene column; columns found: \['foo', 'text'\]"),
        ("empty.tsv", "gene\ttext\n", "no rows with text"),
        ("blank.csv", "gene,text\nCD3E,\n", "no rows with text"),
        ("lists.json", '{"CD3E": ["a", "b"]}', "values must be strings"),
        ("scalar.json", "42", "holds a int"),
        ("broken.json", "{not json", "cannot be read"),
    ],
)
def test_bad_tables(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match) as exc:
        TableTextSource(_cfg(table=str(path)))
    assert str(path) in str(exc.value)


def test_table_source_needs_a_path() -> None:
    with pytest.raises(InputError, match=r"genes\.table is not set"):
        build_text_source(_cfg(text_source="table"))


# ------------------------------------------------------------------ orgdb
def test_orgdb_tsv_text_for_cd3e(org_tsv: Path) -> None:
    src = build_text_source(_cfg(text_source="orgdb", orgdb=str(org_tsv)))
    out = src.texts(["CD3E", "A1BG", "NOT_A_GENE"], [None, None, None])
    assert out["symbol"].tolist() == ["CD3E", "A1BG"]
    cd3e = out["text"].iloc[0]
    assert cd3e.startswith("CD3E: CD3 epsilon subunit of T-cell receptor complex. ")
    assert "Biological process: " in cd3e
    assert "T cell receptor signaling pathway" in cd3e
    assert "Molecular function: " in cd3e
    assert "T cell receptor binding" in cd3e
    assert "Cellular component: " in cd3e
    assert "T cell receptor complex" in cd3e
    bp = cd3e.split("Biological process: ")[1].split(". Molecular function")[0]
    assert len(bp.split("; ")) == 30  # CD3E has 35 BP terms: trimmed
    assert out["gene_id"].iloc[0] == "ENSG00000198851"
    # A1BG's only BP/MF annotations are the root terms: no such sentence
    a1bg = out["text"].iloc[1]
    assert "Biological process" not in a1bg
    assert "biological_process" not in a1bg
    assert "Cellular component: blood microparticle" in a1bg
    assert len(src.fingerprint()) == 16


def test_orgdb_text_trims_regulation_terms_first() -> None:
    core = [f"core term {i:02d}" for i in range(3)]
    reg = [f"regulation of thing {i:02d}" for i in range(5)]
    row = {"symbol": "G", "full_name": "a gene", "go_bp": "\x1f".join(sorted(core + reg)),
           "go_mf": "", "go_cc": ""}  # fmt: skip
    text = orgdb_text(row, max_terms=4)
    assert text == (
        "G: a gene. Biological process: core term 00; core term 01; core term 02; "
        "regulation of thing 00."
    )


@pytest.mark.skipif(
    not (SQLITE_DIR / "org.Hs.eg.sqlite").is_file(),
    reason=f"org.Hs.eg.sqlite absent from {SQLITE_DIR} (run raypipe genes fetch-orgdb)",
)
def test_orgdb_sqlite_matches_tsv(org_tsv: Path) -> None:
    genes = ["CD3E", "MS4A1", "ABCF1", "A1BG", "HBD", "MEMO1", "CXCL8", "LYZ"]
    tsv = OrgdbTextSource(_cfg(orgdb=str(org_tsv)))
    sql = OrgdbTextSource(_cfg(orgdb=str(SQLITE_DIR)))
    assert sql.files.kind == "sqlite"
    a = tsv.texts(genes, [None] * len(genes))
    b = sql.texts(genes, [None] * len(genes))
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == len(genes)
    assert sql.gene_table().lookup_alias("CD16") == ("FCGR3A", "FCGR3B")
    assert sql.fingerprint() != tsv.fingerprint()


def test_locate_orgdb(org_tsv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="fetch-orgdb"):
        locate_orgdb(tmp_path)
    monkeypatch.setenv("RAYPIPE_ORGDB", str(org_tsv))
    found = locate_orgdb(None)
    assert found.kind == "tsv"
    assert found.main == org_tsv
    assert found.aliases == org_tsv.parent / "orgHs_gene_aliases.tsv.gz"
    monkeypatch.delenv("RAYPIPE_ORGDB")
    monkeypatch.setattr(orgdb_mod, "DEFAULT_ORGDB_DIR", tmp_path / "cache")
    monkeypatch.setattr(orgdb_mod, "_DEBIAN_ORG", tmp_path / "no" / "org.Hs.eg.sqlite")
    work = tmp_path / "a" / "project"
    work.mkdir(parents=True)
    with pytest.raises(InputError, match="no orgdb gene data found") as exc:
        locate_orgdb(None, cwd=work)
    assert "apt-get download" in str(exc.value)
    shared = tmp_path / "a" / "shared" / "data" / "genes"
    shared.mkdir(parents=True)
    (shared / "orgHs_gene_text_go.tsv.gz").write_bytes(org_tsv.read_bytes())
    assert locate_orgdb(None, cwd=work).main == (shared / "orgHs_gene_text_go.tsv.gz").resolve()


# ------------------------------------------------------------------ symbol, registry
def test_symbol_source_and_registry() -> None:
    src = build_text_source(_cfg(text_source="symbol"))
    assert isinstance(src, SymbolTextSource)
    out = src.texts(["CD3E", ""], ["ENSG00000198851", None])
    assert out.to_dict("records") == [
        {"gene_id": "ENSG00000198851", "symbol": "CD3E", "text": "CD3E", "source": "symbol"}
    ]
    assert src.gene_table() is None
    assert TEXT_SOURCES.names() == ["llm", "ncbi", "orgdb", "symbol", "table"]
    with pytest.raises(ConfigError, match="known: llm, ncbi"):
        TEXT_SOURCES.get("wikipedia")
    with pytest.raises(InputError, match="2 symbols but 1"):
        src.texts(["A", "B"], [None])


def test_gene_table_for_prefers_user_tables(tmp_path: Path) -> None:
    ids = tmp_path / "ids.csv"
    ids.write_text("ENSG00000198851,CD3E\nENSG00000156738,MS4A1\n")
    aliases = tmp_path / "al.tsv"
    aliases.write_text("alias\tsymbol\nT3E\tCD3E\n")
    cfg = _cfg(text_source="symbol", id_table=str(ids), aliases=str(aliases))
    table = gene_table_for(cfg, build_text_source(cfg))
    assert table is not None
    res = resolve_genes(["T3E", "ENSG00000156738"], table)
    assert res.symbols == ("CD3E", "MS4A1")


# ------------------------------------------------------------------ ncbi via MyGene.info
@pytest.mark.integration
def test_ncbi_source_batches_against_loopback_server() -> None:
    symbols = ["CD3E", "MS4A1", "CD14", "NOTAGENE", "NKG7", "LYZ", "CD3E"]
    with mygene_server() as server:
        cfg = _cfg(text_source="ncbi", ncbi_url=server.url, ncbi_batch_size=2)
        src = build_text_source(cfg)
        assert isinstance(src, NcbiTextSource)
        out = src.texts(symbols, [None, None, None, None, None, "ENSG00000090382", None])
        assert len(server.posts) == 3  # 6 distinct symbols / batches of 2
        assert [p["q"] for p in server.posts] == ["CD3E,MS4A1", "CD14,NOTAGENE", "NKG7,LYZ"]
        assert all(p["species"] == "human" and p["scopes"] == "symbol" for p in server.posts)
        assert all(p["fields"] == "symbol,name,summary,ensembl.gene" for p in server.posts)
        assert out["symbol"].tolist() == ["CD3E", "MS4A1", "CD14", "NKG7", "LYZ", "CD3E"]
        cd3e = out["text"].iloc[0]
        assert cd3e == f"CD3E: {GENES['CD3E']['name']}. {GENES['CD3E']['summary']}"
        assert out["text"].iloc[3] == "NKG7: natural killer cell granule protein 7."
        assert out["gene_id"].tolist()[:3] == [
            "ENSG00000198851",
            "ENSG00000156738",
            "ENSG00000170458",
        ]
        # texts are fetched once per source
        src.texts(["CD3E", "LYZ"], [None, None])
        assert len(server.posts) == 3
        fp = src.fingerprint()
        assert server.gets == ["/v3/metadata"]
        assert src.fingerprint() == fp
        server.build_version = "20250101"  # a new MyGene.info build changes the fingerprint
        assert NcbiTextSource(cfg).fingerprint() != fp


@pytest.mark.integration
def test_ncbi_retries_transient_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NcbiTextSource, "backoff_s", 0.01)
    with mygene_server(fail_first=2) as server:
        src = NcbiTextSource(_cfg(ncbi_url=server.url))
        out = src.texts(["LYZ"], [None])
        assert len(server.posts) == 3
        assert out["text"].iloc[0].startswith("LYZ: lysozyme. ")


@pytest.mark.integration
def test_ncbi_unreachable_names_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(NcbiTextSource, "backoff_s", 0.01)
    monkeypatch.setattr(NcbiTextSource, "max_retries", 1)
    with mygene_server() as server:
        url = server.url
    src = NcbiTextSource(_cfg(ncbi_url=url))
    with pytest.raises(RaypipeError, match=rf"MyGene.info at {url}/query is unreachable") as exc:
        src.texts(["CD3E"], [None])
    assert "genes.ncbi_url" in str(exc.value)
