"""An in-memory AnnData as a run's input (``raypipe.embed``): checks, then the file the run ingests.

Every check runs before anything is written: duplicate obs names, a matrix that is not raw
counts or log-normalised values (e.g. scaled X), var names that are neither gene symbols nor
Ensembl ids (suggesting a var column that is), an output folder holding another input's run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.errors import InputError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from raypipe.config import JobConfig

__all__ = [
    "check_gene_names",
    "check_obs_names",
    "check_output_dir",
    "matrix_to_embed",
    "write_input",
]


def check_output_dir(out_dir: Path, job: JobConfig) -> None:
    """Refuse, before writing anything there, an output_dir holding another input's run."""
    try:
        old = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return
    old_input = (old.get("config") or {}).get("input", {}).get("path")
    if old_input != job.input.path:
        raise InputError(
            f"output_dir {out_dir} holds a run of another input ({old_input})",
            fix="pass a new output_dir (or none: a temporary one)",
        )


def check_obs_names(adata: ad.AnnData) -> None:
    """Refuse an AnnData without cells, and duplicate obs names (results are matched by name)."""
    if adata.n_obs == 0:
        raise InputError(
            f"adata has 0 cells (shape {adata.shape[0]} × {adata.shape[1]}): nothing to embed",
            fix="pass an AnnData with cells (check the filtering that produced it)",
        )
    names = adata.obs_names
    if names.has_duplicates:
        shared = names.duplicated(keep=False)
        dup = names[shared].unique()
        raise InputError(
            f"adata.obs_names are not unique: {int(shared.sum()):,} cells share {len(dup):,} "
            f"name(s) (e.g. {', '.join(map(repr, dup[:5]))}); results are matched to cells by name",
            fix="make them unique first: adata.obs_names_make_unique()",
        )


def matrix_to_embed(adata: ad.AnnData, layer: str | None) -> tuple[Any, pd.DataFrame]:
    """Return the matrix to embed (X, a layer or raw) and its var, checked for counts."""
    import numpy as np
    import scipy.sparse as sp

    if layer == "raw":
        if adata.raw is None:
            raise InputError(
                "adata has no .raw", fix="drop input.layer, or name one of adata.layers"
            )
        x, var, what = adata.raw.X, adata.raw.var, "adata.raw.X"
    elif layer:
        if layer not in adata.layers:
            raise InputError(
                f"adata has no layer {layer!r}; layers: {', '.join(adata.layers) or '(none)'}",
                fix="pass input={'layer': NAME} with one of them, 'raw' for adata.raw, or no layer for X",
            )
        x, var, what = adata.layers[layer], adata.var, f"adata.layers[{layer!r}]"
    else:
        x, var, what = adata.X, adata.var, "adata.X"
    if x is None:
        raise InputError(
            f"{what} is empty (None)", fix="pass the counts as X or input={'layer': ...}"
        )
    values = x.data if sp.issparse(x) else np.asarray(x)
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        bad = (
            "NaN/inf"
            if not np.isfinite(values).all()
            else f"negative values (min {values.min():.3g})"
        )
        others = [f"'{k}'" for k in adata.layers if k != layer] + (
            ["'raw' (adata.raw)"] if adata.raw is not None and layer != "raw" else []
        )
        raise InputError(
            f"{what} holds {bad}: it looks scaled or corrupted, not raw counts or "
            "log-normalised values",
            fix="pass the counts: raypipe.embed(adata, input={'layer': NAME}) with NAME one of "
            + (", ".join(others) if others else "(none here: keep the counts before sc.pp.scale)"),
        )
    return x, var


def check_gene_names(var: pd.DataFrame, job: JobConfig) -> None:
    """Fail early when var names are neither gene symbols nor Ensembl ids (suggest a column)."""
    from raypipe.genes.identity import gene_names_from_var, resolve_genes
    from raypipe.genes.sources import build_text_source
    from raypipe.genes.space import gene_table_for

    try:
        source: Any = build_text_source(job.genes)
    except InputError:
        if job.genes.fallback != "symbol":
            raise  # the run would stop on it too: say so before anything is written
        source = None  # the run falls back to symbols (loudly)
    table = gene_table_for(job.genes, source)
    names, _, _ = gene_names_from_var(var, job.input.gene_symbol_column)  # as the run will
    if table is None or not names:
        return  # nothing to check against: names are trusted, as in a run

    def share(values: list[str]) -> float:
        return resolve_genes(values, table).n_matched / len(values)

    known = share(names)
    if known >= job.genes.min_coverage:
        return
    best, best_share = None, known
    for col in var.columns:
        if var[col].dtype == object or str(var[col].dtype) in ("string", "category"):
            s = share([str(v) for v in var[col]])
            if s > best_share:
                best, best_share = col, s
    fix = (
        f"use that column as var names: adata.var_names = adata.var[{best!r}] "
        f"({best_share:.0%} known)"
        if best is not None and best_share >= job.genes.min_coverage
        else "use gene symbols (e.g. CD3E) or Ensembl ids (ENSG…) as var names, or pass "
        "genes={'id_table': ..., 'aliases': ...} for your naming"
    )
    raise InputError(
        f"only {known:.0%} of adata.var_names are known gene symbols or Ensembl ids "
        f"(e.g. {', '.join(names[:3])}; required {job.genes.min_coverage:.0%}): raypipe finds "
        "each gene's text by its name",
        fix=fix,
    )


def write_input(
    path: Path, adata: ad.AnnData, matrix: Any, var: pd.DataFrame, job: JobConfig
) -> None:
    """Write what the run reads (the matrix as CSR X, obs label/batch columns, var) as .h5ad."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    keys = [k for k in (job.input.label_key, job.input.batch_key) if k]
    missing = [k for k in keys if k not in adata.obs.columns]
    if missing:
        raise InputError(
            f"adata.obs has no column {missing[0]!r}; columns: {', '.join(adata.obs.columns)}",
            fix="set input={'label_key': ..., 'batch_key': ...} to columns of adata.obs",
        )
    obs = pd.DataFrame(
        {k: adata.obs[k].to_numpy() for k in keys}, index=adata.obs_names.astype(str)
    )
    ids = [c for c in ("ensembl_id", "gene_ids", "gene_id", "feature_id") if c in var.columns]
    symbols = job.input.gene_symbol_column
    if symbols is not None and symbols not in ids:
        ids.append(symbols)  # checked by check_gene_names; the run matches genes by it
    small_var = pd.DataFrame(
        {c: var[c].astype(str).to_numpy() for c in ids}, index=var.index.astype(str)
    )
    x = sp.csr_matrix(matrix, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ad.AnnData(X=x, obs=obs, var=small_var).write_h5ad(tmp)
    tmp.replace(path)
