"""The gene space of a run: which gene each atlas column is, its text and text embedding.

Runs on the driver before the per-shard stages. Gene embeddings are cached keyed by (text,
model) in the shared cache that outlives runs (:mod:`raypipe.genes.cache`, under
``cache.path``) and, for this run, in ``genes/gene_embeddings.parquet``: a re-run, another
atlas, or a run whose source changed only for a few genes, embeds only texts no run embedded
before.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.core.outputs import read_frame
from raypipe.core.storage import AnyPath
from raypipe.errors import InputError
from raypipe.genes.cache import GeneEmbeddingCache, embed_cached

if TYPE_CHECKING:
    import scipy.sparse as sp

    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import GenesConfig, JobConfig
    from raypipe.genes.identity import CoverageReport, GeneResolution, GeneTable
    from raypipe.genes.sources import TextSource

__all__ = [
    "GeneSpace",
    "estimate_costs",
    "gene_table_for",
    "load_cached_embeddings",
    "prepare_gene_space",
    "record_failures",
    "write_failures",
]

log = logging.getLogger(__name__)

CACHE_FILE = Path("genes") / "gene_embeddings.parquet"


@dataclass(frozen=True, eq=False)
class GeneSpace:
    """Everything per-shard stages need about genes.

    Attributes
    ----------
    resolution
        Atlas column → canonical gene mapping (with the duplicate-collapse matrix).
    texts
        One row per unique gene with text: gene_id, symbol, text, source.
    embeddings
        (n_unique, d) float32 text embeddings (zero rows for genes without text).
    has_text
        (n_unique,) bool.
    coverage
        Atlas genes with text, as a report.
    fingerprint
        Hash of source, texts, model and gene order (keys the downstream results).
    cache
        Shared gene-text embedding cache: ``path``, ``texts`` needed, ``hits``, ``embedded``.
    warnings
        Loud notes for the summary (fallbacks, ambiguous aliases, failures).
    """

    resolution: GeneResolution
    texts: pd.DataFrame
    embeddings: np.ndarray
    has_text: np.ndarray
    coverage: CoverageReport
    source: str
    model: str
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    table: Any = None
    usage: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def collapse(self) -> sp.csr_matrix:
        """(n_atlas_genes, n_unique) duplicate-summing matrix."""
        return self.resolution.collapse


def _build_source(job: JobConfig) -> TextSource:
    from raypipe.genes.sources import TEXT_SOURCES

    return TEXT_SOURCES.get(job.genes.text_source)(job.genes, job)


def load_cached_embeddings(path: AnyPath, model: str) -> dict[str, np.ndarray]:
    """Return text → embedding for rows of ``path`` embedded with ``model``."""
    if not path.exists():
        return {}
    df = read_frame(path, columns=["text", "model", "embedding"])
    df = df[df["model"] == model]
    return {
        t: np.asarray(e, dtype=np.float32) for t, e in zip(df["text"], df["embedding"], strict=True)
    }


def _write_cache(path: AnyPath, texts: pd.DataFrame, emb: np.ndarray, model: str) -> None:
    import pyarrow as pa

    from raypipe.core.outputs import write_parquet_atomic

    d = emb.shape[1]
    table = pa.table(
        {
            "gene_id": pa.array(texts["gene_id"].astype(str)),
            "symbol": pa.array(texts["symbol"].astype(str)),
            "text": pa.array(texts["text"].astype(str)),
            "source": pa.array(texts["source"].astype(str)),
            "model": pa.array([model] * len(texts)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
        }
    )
    write_parquet_atomic(path, table)


def _merge_usage(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    from raypipe.llm.cost import CostMeter

    return CostMeter().merge(a).merge(b).to_dict()


def write_failures(out_dir: AnyPath, stage: str, rows: list[dict[str, Any]]) -> AnyPath:
    """Write a stage's failed items to ``state/failures/<stage>.parquet`` (merged at the end)."""
    import pyarrow as pa

    from raypipe.core.outputs import write_parquet_atomic

    df = pd.DataFrame(rows).astype(str)
    path = out_dir / "state" / "failures" / f"{stage}.parquet"
    write_parquet_atomic(path, pa.Table.from_pandas(df, preserve_index=False))
    return path


def record_failures(out_dir: AnyPath, stage: str, rows: list[dict[str, Any]]) -> None:
    """Record a stage's failed items of this run.

    Written when there are any; otherwise an earlier run's record of the stage is removed, so
    ``failures.parquet`` lists only what failed this time.
    """
    if rows:
        write_failures(out_dir, stage, rows)
        return
    path = out_dir / "state" / "failures" / f"{stage}.parquet"
    if path.exists():
        path.unlink()


def prepare_gene_space(
    job: JobConfig, atlas: AtlasInfo, out_dir: AnyPath, *, progress: bool = False
) -> GeneSpace:
    """Resolve atlas genes, fetch their texts, embed them (cached) and check coverage.

    ``progress`` draws a bar of gene texts embedded (cache hits count as done).

    Raises
    ------
    InputError
        When fewer than ``genes.min_coverage`` of atlas genes get a text (with examples).
    """
    from raypipe.atlas.store import read_var
    from raypipe.genes.identity import (
        check_coverage,
        gene_names_from_var,
        resolve_genes,
        text_coverage,
    )

    var = read_var(atlas.path)
    names, ensembl_ids, names_note = gene_names_from_var(var, job.input.gene_symbol_column)
    fallback_note = None
    try:
        source = _build_source(job)
        source_fp = source.fingerprint()  # sources that locate data lazily fail here, not mid-run
    except InputError as exc:
        if job.genes.fallback != "symbol":
            raise
        fallback_note = f"FALLBACK: gene text source {job.genes.text_source!r} is unavailable ({exc.message}); using gene symbols as text"
        log.warning(fallback_note)
        job = job.model_copy(
            update={"genes": job.genes.model_copy(update={"text_source": "symbol"})}
        )
        source = _build_source(job)
        source_fp = source.fingerprint()
    table = gene_table_for(job.genes, source)
    resolution = resolve_genes(names, table, ensembl_ids=ensembl_ids)
    warnings = list(resolution.warnings[:5]) + ([fallback_note] if fallback_note else [])
    if names_note:
        warnings.append(f"{names_note}: {resolution.coverage().summary()}")
    symbols = list(resolution.unique_symbols)
    texts = source.texts(symbols, list(resolution.unique_ensembl))
    texts = texts.drop_duplicates("symbol").reset_index(drop=True)
    coverage = text_coverage(
        resolution, texts["symbol"], what=f"atlas genes with text ({job.genes.text_source})"
    )
    log.info(coverage.summary())
    check_coverage(coverage, job.genes.min_coverage)
    if job.genes.text_source == "symbol":
        warnings.append(
            "FALLBACK: gene text = gene symbol only (genes.text_source: symbol); embeddings carry "
            "little biology. Use orgdb/ncbi/table/llm for real gene text."
        )
    model = job.text_model.model
    cache_path = out_dir / CACHE_FILE
    unique = sorted(set(texts["text"]))
    got = embed_cached(
        unique,
        job,
        known=load_cached_embeddings(cache_path, model),
        progress=progress,
        desc="genes",
    )
    cache_stats = {"path": str(GeneEmbeddingCache(job.gene_cache_dir(), model).path), **got.stats}
    usage = _merge_usage(dict(source.usage()), got.usage)
    failures: list[dict[str, Any]] = list(source.failures)
    by_text = dict(zip(texts["text"], texts["symbol"], strict=False))
    cached: dict[str, np.ndarray] = {}
    for t, e, err in zip(unique, got.vectors, got.errors, strict=True):
        if err:
            failures.append(
                {"stage": "gene_embeddings", "item": by_text.get(t, t[:80]), "reason": err}
            )
        else:
            cached[t] = e
    record_failures(out_dir, "genes", failures)
    if failures:
        from raypipe.llm.cost import check_failure_share

        warnings.append(f"{len(failures)} genes got no text embedding (see failures.parquet)")
        check_failure_share(
            len(failures), max(len(symbols), 1), job.limits.max_failure_share, "genes"
        )
    texts = texts[texts["text"].isin(cached)].reset_index(drop=True)
    if texts.empty:
        raise InputError(
            "no gene text could be embedded", fix="check text_model settings and failures.parquet"
        )
    dim = len(next(iter(cached.values())))
    text_emb = np.stack([cached[t] for t in texts["text"]]).astype(np.float32)
    _write_cache(cache_path, texts, text_emb, model)
    index = {s: i for i, s in enumerate(symbols)}
    embeddings = np.zeros((len(symbols), dim), dtype=np.float32)
    has_text = np.zeros(len(symbols), dtype=bool)
    rows = np.array([index[s] for s in texts["symbol"]], dtype=np.int64)
    embeddings[rows] = text_emb
    has_text[rows] = True
    digest = hashlib.sha256()
    digest.update(f"{job.genes.text_source}|{source_fp}|{model}|{atlas.var_hash}".encode())
    digest.update("\n".join(symbols).encode())
    digest.update(embeddings.tobytes())
    source.close()
    return GeneSpace(
        resolution=resolution,
        texts=texts,
        embeddings=embeddings,
        has_text=has_text,
        coverage=coverage,
        source=job.genes.text_source,
        model=model,
        fingerprint=digest.hexdigest()[:16],
        warnings=warnings,
        table=table,
        usage=usage,
        cache=cache_stats,
    )


def estimate_costs(job: JobConfig, gene_names: list[str]) -> list[tuple[str, Any]]:
    """Estimate the paid calls of the genes step (descriptions, text embeddings); call nothing.

    Returns
    -------
    list of (str, raypipe.llm.cost.Estimate)
        ``gene descriptions (chat)`` when ``genes.text_source`` is ``llm``, then
        ``gene-text embeddings``.
    """
    from raypipe.llm.cost import estimate

    lim = job.limits
    budget: dict[str, Any] = {
        "prices": {k: v.model_dump() for k, v in job.prices.items()},
        "requests_per_minute": lim.requests_per_minute,
        "tokens_per_minute": lim.tokens_per_minute,
    }
    rows: list[tuple[str, Any]] = []
    if job.genes.text_source == "llm":
        from raypipe.genes.llm_source import render_prompt

        prompts = [render_prompt(job.llm.prompt_version, g) for g in gene_names]
        est = estimate(prompts, model=job.llm.model, **budget, max_tokens_out=job.llm.max_tokens)
        rows.append(("gene descriptions (chat)", est))
        gene_texts = ["x" * (3 * job.llm.max_tokens)] * len(gene_names)
    else:
        gene_texts = [f"{g}: " + "x" * 600 for g in gene_names]  # ~200 tokens per gene text
    est = estimate(
        gene_texts, model=job.text_model.model, **budget, items_per_call=job.text_model.batch_size
    )
    rows.append(("gene-text embeddings", est))
    return rows


def gene_table_for(cfg: GenesConfig, source: TextSource | None = None) -> GeneTable | None:
    """Return the gene table to resolve atlas genes with.

    Combines, earlier winning: ``genes.id_table``/``genes.aliases``, the text source's own
    table, and (when neither gives one) the orgdb table if one can be found. ``None`` when
    nothing is available (names are then trusted as they are).
    """
    from raypipe.genes.identity import GeneTable
    from raypipe.genes.orgdb import locate_orgdb, read_orgdb

    user = (
        GeneTable.from_files(cfg.id_table, cfg.aliases) if (cfg.id_table or cfg.aliases) else None
    )
    own = source.gene_table() if source is not None else None
    if own is None and user is None:
        try:
            own = read_orgdb(locate_orgdb(cfg.orgdb)).gene_table
        except InputError:
            own = None
    return GeneTable.merged(user, own)
