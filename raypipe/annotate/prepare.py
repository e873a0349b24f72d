"""The driver's candidate step of zero-shot annotation: which cell types, and what is known of them.

Candidates come from ``annotate.candidates``, the label column's values, or discovery
(``annotate.candidates: auto``, :mod:`~raypipe.annotate.discover`); each is mapped to a Cell
Ontology term, given markers (config > LLM > marker resource > ontology) and a text, embedded
once with the run's text model, and written to ``annotations/label_mapping.parquet``. The
shard stage that scores cells against them is :mod:`~raypipe.annotate.stage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raypipe.annotate.checks import check_candidate_keys, label_candidates, markers_in_atlas
from raypipe.core.outputs import write_parquet_atomic
from raypipe.core.storage import AnyPath
from raypipe.errors import ConfigError

if TYPE_CHECKING:
    from raypipe.annotate.discover import Discovery
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.genes.space import GeneSpace

__all__ = ["Candidates", "check_annotate_config", "prepare_candidates"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Candidate cell types with their text embeddings and marker columns."""

    table: pd.DataFrame
    labels: list[str]
    text_emb: np.ndarray
    marker_idx: list[np.ndarray]
    usage: dict[str, Any]
    marker_weights: list[np.ndarray] | None = None
    warnings: list[str] | None = None
    discovery: str | None = None  # fingerprint of the discovery the candidates came from
    truth_cl: dict[str, str | None] | None = None  # input.label_key value → CL id (evaluation)


def _candidate_names(job: JobConfig, atlas: AtlasInfo) -> list[str]:
    from raypipe.atlas.store import read_obs_columns

    if job.annotate.candidates:
        return list(job.annotate.candidates)
    if job.input.label_key:
        labels = read_obs_columns(atlas.path, [job.input.label_key])[job.input.label_key]
        return label_candidates(labels)  # blank labels are missing, never a candidate
    raise ConfigError(
        "annotate.enabled but there are no candidates",
        fix="list annotate.candidates, or set input.label_key to map its values to Cell Ontology terms",
    )


def check_annotate_config(job: JobConfig) -> None:
    """Fail early (before any embedding work) on an ``annotate`` section that cannot run.

    Checks that the ontology loads, that every ``annotate.mapping`` id is a live CL term,
    that the marker resource (``annotate.marker_db``) is there and readable, and (for
    candidates the config lists) that markers/mapping keys name candidates; keys against a
    label column's candidates are checked where its values are read
    (:func:`check_candidate_keys`).
    """
    from raypipe.annotate.mapping import check_overrides
    from raypipe.annotate.ontology import load_ontology

    if job.annotate.enabled and job.annotate.mapping:
        check_overrides(job.annotate.mapping, load_ontology(job.annotate.ontology))
    if job.annotate.enabled and job.annotate.marker_db.enabled:
        from raypipe.annotate.marker_db import check_marker_db

        check_marker_db(job)
    if job.annotate.enabled and job.annotate.candidates:
        blank = [c for c in job.annotate.candidates if not str(c).strip()]
        if blank:
            raise ConfigError("annotate.candidates has an empty name", fix="remove the empty entry")
        check_candidate_keys(job, list(job.annotate.candidates))


def prepare_candidates(
    job: JobConfig,
    atlas: AtlasInfo,
    genes: GeneSpace,
    out_dir: AnyPath,
    discovered: Discovery | None = None,
) -> Candidates:
    """Map, describe, embed and write the candidates (``annotations/label_mapping.parquet``).

    Labels are mapped to CL terms (:class:`~raypipe.annotate.mapping.LabelMapper`, with the
    run's text model for the nearest-term fallback), markers gathered
    (:mod:`~raypipe.annotate.markers`: config, then LLM when ``annotate.llm_markers``, then the
    ontology), candidate texts embedded once. LLM marker failures go to
    ``state/failures/annotate_markers.parquet`` (merged into ``failures.parquet``). With
    ``discovered`` (``annotate.candidates: auto``) the candidates are the discovered names and
    each one's markers are its clusters' top markers (source ``discovered``) unless
    ``annotate.markers`` names it.
    """
    import pyarrow as pa

    from raypipe.annotate.candidates import build_candidates, unmatched
    from raypipe.annotate.knowledge import gene_resolver
    from raypipe.annotate.mapping import GeneNames, LabelMapper
    from raypipe.annotate.marker_db import marker_db_for_job
    from raypipe.annotate.ontology import load_ontology
    from raypipe.annotate.scorers import marker_indices
    from raypipe.genes.cache import embed_cached
    from raypipe.llm.cost import CostMeter

    cfg = job.annotate
    names = discovered.names if discovered is not None else _candidate_names(job, atlas)
    found = {  # discovered clusters' top markers, unless the config names the candidate's
        n: m for n, m in (discovered.markers if discovered else {}).items() if n not in cfg.markers
    }
    ontology = load_ontology(cfg.ontology)
    gene_names = GeneNames.from_table(genes.table) if genes.table is not None else None
    usage = CostMeter()

    def embed(texts: list[str]) -> np.ndarray:  # the mapper's nearest-term fallback
        got = embed_cached(texts, job)
        usage.merge(got.usage)
        return got.vectors

    mapper = LabelMapper(
        ontology,
        genes=gene_names,
        overrides=cfg.mapping,
        embed=embed,
        embed_threshold=cfg.mapping_embed_threshold,
        tissue=cfg.tissue,
        species=job.genes.species,
    )
    mappings = mapper.map_all(names)
    resource = marker_db_for_job(job, mapper, out_dir)
    truth_cl = None
    if job.input.label_key and job.evaluate.enabled:  # truth labels as CL terms (cl_* metrics)
        from raypipe.atlas.store import read_obs_columns
        from raypipe.core.labels import missing_labels

        col = read_obs_columns(atlas.path, [job.input.label_key])[job.input.label_key]
        truth = sorted({str(v) for v in col[~missing_labels(col)].unique()})
        by_label = {m.label: m for m in mappings}
        todo = [t for t in truth if t not in by_label]
        by_label.update({m.label: m for m in mapper.map_all(todo)} if todo else {})
        truth_cl = {t: by_label[t].cl_id for t in truth}
    resolver = gene_resolver(genes)
    warnings: list[str] = []
    llm = None
    if cfg.llm_markers:
        from raypipe.annotate.markers import llm_markers
        from raypipe.genes.space import record_failures

        asks = [(m.label, m.cl_label or m.label, m.cl_id) for m in mappings]
        known = gene_names.is_gene if gene_names is not None else (lambda g: bool(resolver(g)))
        llm, fails, llm_usage = llm_markers(asks, job, known)
        usage.merge(llm_usage)
        record_failures(out_dir, "annotate_markers", fails)
        if fails:
            warnings.append(
                f"LLM markers failed for {len(fails)} candidate(s): "
                + ", ".join(f["item"] for f in fails)
                + " (see failures.parquet); they fall back to ontology markers"
            )
    descriptions = None
    if cfg.llm_descriptions:
        from raypipe.annotate.descriptions import descriptions_for_job

        descriptions, more, llm_usage = descriptions_for_job(job, mappings, out_dir)
        usage.merge(llm_usage)
        warnings += more
    markers = markers_in_atlas(cfg.markers, resolver, warnings)
    cand = build_candidates(
        names,
        ontology,
        markers={**markers, **found} or None,
        llm_markers=llm,
        resolver=resolver,
        mapper=mapper,
        mappings=mappings,
        use_ontology_markers=cfg.ontology_markers,
        is_gene=gene_names.is_gene if gene_names is not None else None,
        resource=resource,
        negatives=cfg.negative_markers > 0,
        descriptions=descriptions,
    )
    for i, name in enumerate(cand["label"]):  # say where discovered markers came from
        if name in found:
            cand.at[i, "marker_source"] = "discovered"
            cand.at[i, "marker_sources"] = ["discovered"] * len(cand.at[i, "markers"])
    lost = unmatched(cand)
    if lost:
        warnings.append(
            f"{len(lost)} candidate(s) match no Cell Ontology term and are scored on their name "
            f"alone: {', '.join(lost)} (fix: annotate.mapping {{name: CL id}})"
        )
    out = cand.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, list | tuple | np.ndarray)).any():
            out[col] = out[col].map(lambda v: list(v) if v is not None else [])
    write_parquet_atomic(
        out_dir / "annotations" / "label_mapping.parquet",
        pa.Table.from_pandas(out, preserve_index=False),
    )
    got = embed_cached(list(cand["text"].astype(str)), job)  # cached: a re-run loads no model
    emb, errors = got.vectors, got.errors
    usage.merge(got.usage)
    bad = [n for n, e in zip(cand["label"], errors, strict=True) if e]
    if bad:
        raise ConfigError(
            f"candidate texts could not be embedded: {', '.join(bad)}", fix="see failures.parquet"
        )
    symbols_per_col = [s or "" for s in genes.resolution.symbols]
    idx, _ = marker_indices([list(m) for m in cand["markers"]], symbols_per_col)
    pos = {s: i for i, s in enumerate(symbols_per_col) if s}
    wts = [
        np.array([w for g, w in zip(m, ws, strict=True) if g in pos], dtype=np.float64)
        for m, ws in zip(cand["markers"], cand["marker_weights"], strict=True)
    ]
    for w in warnings:
        log.warning(w)
    return Candidates(
        cand,
        [str(x) for x in cand["label"]],
        emb,
        idx,
        usage.to_dict(),
        marker_weights=wts,
        warnings=warnings,
        discovery=discovered.fingerprint if discovered is not None else None,
        truth_cl=truth_cl,
    )
