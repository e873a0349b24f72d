"""Small synthetic single-cell data for the core tests (seeded, a few hundred cells).

Genes are real PBMC marker symbols with short, real-looking descriptions; Ensembl ids are
synthetic but well-formed (``ENSG9...``) so the gene text table carries its own symbol ↔
Ensembl map and no test depends on an orgdb found on the machine.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

GENE_TEXT = {
    "CD3D": "CD3d molecule; part of the T-cell receptor/CD3 complex, T cell activation",
    "CD3E": "CD3e molecule; T-cell receptor complex, signal transduction in T cells",
    "CD4": "CD4 molecule; co-receptor of MHC class II antigen recognition on helper T cells",
    "CD8A": "CD8 subunit alpha; co-receptor of MHC class I on cytotoxic T cells",
    "IL7R": "interleukin 7 receptor; lymphocyte development and T cell homeostasis",
    "CCR7": "C-C motif chemokine receptor 7; lymph node homing of naive T cells",
    "MS4A1": "membrane spanning 4-domains A1 (CD20); B cell activation and proliferation",
    "CD79A": "CD79a molecule; B-cell antigen receptor complex signalling",
    "CD79B": "CD79b molecule; B-cell antigen receptor complex signalling",
    "CD19": "CD19 molecule; B cell co-receptor regulating B cell activation",
    "CD14": "CD14 molecule; monocyte LPS co-receptor in innate immune response",
    "LYZ": "lysozyme; antibacterial enzyme secreted by monocytes and macrophages",
    "S100A8": "S100 calcium binding protein A8; inflammatory response of neutrophils/monocytes",
    "S100A9": "S100 calcium binding protein A9; calprotectin, leukocyte migration",
    "FCGR3A": "Fc gamma receptor IIIa (CD16a); antibody-dependent cytotoxicity of NK cells",
    "NKG7": "natural killer cell granule protein 7; cytotoxic granule exocytosis",
    "GNLY": "granulysin; antimicrobial cytolytic protein of NK and cytotoxic T cells",
    "GZMB": "granzyme B; serine protease inducing apoptosis of target cells",
    "PRF1": "perforin 1; pore-forming protein of cytotoxic lymphocytes",
    "KLRD1": "killer cell lectin like receptor D1 (CD94); NK cell receptor",
    "FCER1A": "Fc epsilon receptor Ia; IgE receptor of dendritic cells and basophils",
    "CST3": "cystatin C; cysteine protease inhibitor highly expressed in dendritic cells",
    "PPBP": "pro-platelet basic protein (CXCL7); platelet chemokine",
    "PF4": "platelet factor 4 (CXCL4); platelet chemokine in coagulation",
    "HBB": "hemoglobin subunit beta; oxygen transport in erythrocytes",
    "ITGAX": "integrin subunit alpha X (CD11c); dendritic cell adhesion",
    "IL3RA": "interleukin 3 receptor subunit alpha (CD123); plasmacytoid dendritic cells",
    "FOXP3": "forkhead box P3; transcription factor of regulatory T cells",
    "IL2RA": "interleukin 2 receptor subunit alpha (CD25); T cell activation",
    "ISG15": "ISG15 ubiquitin like modifier; interferon-stimulated antiviral response",
    "IFIT1": "interferon induced protein with tetratricopeptide repeats 1; antiviral",
    "MX1": "MX dynamin like GTPase 1; interferon-induced antiviral protein",
    "ACTB": "actin beta; cytoskeleton, cell motility",
    "GAPDH": "glyceraldehyde-3-phosphate dehydrogenase; glycolysis",
    "B2M": "beta-2-microglobulin; MHC class I antigen presentation",
    "HLA-DRA": "major histocompatibility complex class II DR alpha; antigen presentation",
    "MALAT1": "metastasis associated lung adenocarcinoma transcript 1; nuclear lncRNA",
    "TMSB4X": "thymosin beta 4 X-linked; actin sequestering protein",
    "RPL13": "ribosomal protein L13; component of the 60S ribosomal subunit",
    "RPS27": "ribosomal protein S27; component of the 40S ribosomal subunit",
}
GENES = list(GENE_TEXT)


def ensembl_id(i: int) -> str:
    """A well-formed synthetic Ensembl gene id."""
    return f"ENSG9{i:010d}"


def write_gene_table(path: Path, genes: list[str] | None = None) -> Path:
    """Write a TSV gene text table (symbol, ensembl_id, text) for ``genes``."""
    genes = genes or GENES
    df = pd.DataFrame(
        {
            "symbol": genes,
            "ensembl_id": [ensembl_id(GENES.index(g)) for g in genes],
            "text": [GENE_TEXT[g] for g in genes],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False)
    return path


def counts(n_cells: int, n_genes: int, *, seed: int = 0, density: float = 0.35) -> sp.csr_matrix:
    """Seeded integer counts (float32 CSR) with cell-type-like structure, no empty cells."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, size=n_cells)
    base = rng.gamma(1.0, 2.0, size=(4, n_genes))
    lam = base[groups] * (rng.random((n_cells, n_genes)) < density)
    x = rng.poisson(lam).astype(np.float32)
    x[:, 0] += 1  # every cell has at least one count
    return sp.csr_matrix(x)


def make_adata(
    n_cells: int = 200,
    genes: list[str] | None = None,
    *,
    seed: int = 0,
    x: sp.spmatrix | np.ndarray | None = None,
    zero_rows: tuple[int, ...] = (),
) -> ad.AnnData:
    """An AnnData with counts, obs ``cell_type``/``donor`` and var ``ensembl_id``."""
    genes = list(genes or GENES)
    mat = sp.csr_matrix(x if x is not None else counts(n_cells, len(genes), seed=seed))
    if zero_rows:
        lil = mat.tolil()
        for r in zero_rows:
            lil[r, :] = 0
        mat = lil.tocsr()
        mat.eliminate_zeros()
    n = mat.shape[0]
    rng = np.random.default_rng(seed + 1)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK", "Mono"], size=n)),
            "donor": pd.Categorical(rng.choice(["d1", "d2"], size=n)),
        },
        index=[f"cell-{i:05d}" for i in range(n)],
    )
    ens = [
        ensembl_id(GENES.index(g)) if g in GENES else f"ENSG8{i:010d}" for i, g in enumerate(genes)
    ]
    var = pd.DataFrame({"ensembl_id": ens}, index=pd.Index(genes))
    return ad.AnnData(X=mat.astype(np.float32), obs=obs, var=var)


def write_h5ad(path: Path, adata: ad.AnnData) -> Path:
    """Write ``adata`` as .h5ad (duplicate var names allowed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def write_10x(folder: Path, adata: ad.AnnData) -> Path:
    """Write ``adata`` as a 10x v3 folder: matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz."""
    from scipy.io import mmwrite

    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "matrix.mtx"
    mmwrite(str(raw), sp.coo_matrix(sp.csr_matrix(adata.X).T.astype(np.int64)), field="integer")
    with raw.open("rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    feats = "".join(
        f"{e}\t{g}\tGene Expression\n"
        for e, g in zip(adata.var["ensembl_id"], adata.var_names, strict=True)
    )
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write(feats)
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("".join(f"{b}\n" for b in adata.obs_names))
    return folder


#: The paper's plain GenePT-w (all genes, no centring): what ``dense_genept_w`` computes.
PLAIN_GENEPT_W = {"hvg": None, "center": False}


def job_dict(
    input_path: Path | str, output_dir: Path | str, table: Path | str, **sections: Any
) -> dict:
    """A small job config: table gene text, local MiniLM, 2-CPU local Ray, GenePT-w.

    GenePT-w keeps the production defaults (HVG-500, centring); a test that needs the paper's
    plain method passes ``embed={"genept_w": PLAIN_GENEPT_W}`` and says why.
    """
    data: dict[str, Any] = {
        "input": {"path": str(input_path), "rows_per_chunk": 64},
        "output_dir": str(output_dir),
        "shards": {"rows": 128},
        "genes": {"text_source": "table", "table": str(table), "min_coverage": 0.5},
        "text_model": {"backend": "local", "model": "all-MiniLM-L6-v2", "batch_size": 64},
        "embed": {"methods": ["genept_w"]},
        "ray": {"address": "local", "actors": 2, "actor_cpus": 0.5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def read_embeddings(out_dir: Path | str, method: str = "genept_w") -> pd.DataFrame:
    """Read every part of ``embeddings/<method>`` (ordered by row)."""
    import pyarrow.parquet as pq

    parts = sorted((Path(out_dir) / "embeddings" / method).glob("part-*.parquet"))
    df = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    return df.sort_values("row").reset_index(drop=True)


def dense_genept_w(x: np.ndarray, emb: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """The plain GenePT-w reference, straight from the paper, in dense numpy (float64)."""
    x = np.asarray(x, dtype=np.float64)
    tot = x.sum(axis=1, keepdims=True)
    xl = np.log1p(np.divide(x * target_sum, tot, out=np.zeros_like(x), where=tot > 0))
    out = xl @ np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def write_real_gene_table(shared: Path, path: Path, genes: list[str], n: int = 400) -> Path:
    """A real gene→text table (orgdb symbol: full name) for up to ``n`` of ``genes``.

    Quick to embed (short texts) yet real; tests of input formats use it with
    ``genes.min_coverage`` low, so their runs spend their time reading cells.
    """
    with gzip.open(shared / "genes" / "orgHs_gene_text_go.tsv.gz", "rt") as fh:
        org = pd.read_csv(fh, sep="\t", usecols=["symbol", "full_name"])
    org = org[org["symbol"].isin(set(genes))].drop_duplicates("symbol").head(n)
    text = org["symbol"] + ": " + org["full_name"]
    pd.DataFrame({"symbol": org["symbol"], "text": text}).to_csv(path, sep="\t", index=False)
    return path


def write_anndata_zarr(
    path: Path, adata: ad.AnnData, *, x: str = "csr", chunk: int = 32_768
) -> Path:
    """Write ``adata`` as an AnnData ``.zarr`` with anndata: X as ``csr`` (``chunk`` values per
    Zarr chunk: row chunks of about ``chunk / nnz-per-cell`` cells), ``csc`` or ``dense``."""
    import zarr
    from anndata.io import write_elem

    matrix: Any = {"csr": sp.csr_matrix, "csc": sp.csc_matrix}.get(x, np.asarray)
    data = adata.X.toarray() if x == "dense" and sp.issparse(adata.X) else adata.X
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    with ad.settings.override(auto_shard_zarr_v3=False):
        group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(group, "obs", adata.obs)
        write_elem(group, "var", adata.var)
        write_elem(
            group, "X", matrix(data), dataset_kwargs={"chunks": (chunk,)} if x == "csr" else {}
        )
        for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            write_elem(group, key, {})
    return path


#: Key and its environment variable for jobs embedding gene texts on a loopback OpenAI server.
LOOPBACK_KEY = "sk-loopback-formats-21"
LOOPBACK_KEY_ENV = "RAYPIPE_FORMATS_OPENAI_KEY"


def loopback_text_model(base_url: str) -> dict[str, Any]:
    """``text_model`` of a job embedding gene texts with the loopback OpenAI server (no model
    to load: tests of input formats spend their time reading cells). Set
    :data:`LOOPBACK_KEY_ENV` before Ray starts, so its workers see it."""
    return {
        "backend": "openai",
        "model": "fake-embed",
        "base_url": base_url,
        "api_key_env": LOOPBACK_KEY_ENV,
        "batch_size": 256,
    }
