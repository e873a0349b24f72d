"""Zero-shot scorers: cells × candidates score matrices, their combination and the assignment.

Every scorer is a pure function ``scorer(inputs: ScoreInputs) -> (n, k) float32`` registered in
:data:`SCORERS` (config ``annotate.scorers: {name: weight}``). Shards score independently:
everything that must agree across shards (the atlas mean of the cell embeddings, the candidate
text embeddings, the marker column indices) is computed once by the driver and passed in.

``text``     cosine between cell embeddings and candidate-text embeddings; with ``center``
             both sides are centred first (cells on the *atlas* mean ``cell_mean``, texts on
             the mean over candidates) and re-normalised. :func:`text_scores` exposes raw
             and centred so both can be reported.
``markers``  UCell-style signature score (Andreatta & Carmona 2021): within each cell genes
             are ranked by decreasing expression (average rank for ties, the zero genes
             sharing one average rank), ranks above ``max_rank`` are capped at
             ``max_rank + 1``, and for a signature of ``m`` genes
             ``score = 1 - U / (m * max_rank)`` with ``U = sum(ranks) - m(m+1)/2`` (the
             Mann-Whitney U). Rank-based, hence robust to sequencing depth. With gene weights
             ``w`` (marker knowledge, :mod:`raypipe.annotate.markers`) the sums are weighted:
             ``1 - (Σ w r - W(m+1)/2) / (W * max_rank)``, equal weights giving UCell exactly.
             Candidates without any marker in the atlas score 0.
``langcell`` LangCell's zero-shot score ``α·sim + (1−α)·ctm`` from the per-cell ``sim``/``ctm``
             the CE encode actors computed (``raypipe.embed.langcell``; ``ce`` method only);
             cells without tokens (NaN rows) score ``1/k`` for every candidate.

Combination (:func:`combine`): each scorer's matrix is standardised (``standardise``:
``candidate`` = per candidate column over the shard's cells, which removes a candidate's
constant advantage — some texts are simply closer to every cell; ``cell`` = per cell across
candidates; ``none``), then averaged with the configured weights. A new scorer is one
registry entry in :data:`SCORERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from raypipe.errors import ConfigError, InputError
from raypipe.registry import Registry

__all__ = [
    "SCORERS",
    "STANDARDISE",
    "ScoreInputs",
    "assign",
    "combine",
    "marker_indices",
    "marker_scores",
    "score_cells",
    "text_scores",
]


@dataclass(frozen=True)
class ScoreInputs:
    """What the scorers of one shard may use (each reads only its own fields).

    Attributes
    ----------
    cell_emb
        (n, d) cell embeddings of the shard, rows in obs order.
    text_emb
        (k, d) candidate-text embeddings, rows in candidate order.
    cell_mean
        (d,) mean of the cell embeddings over the *whole atlas* (for centring).
    center
        Centre both sides before the cosine (``annotate.center``).
    expr
        (n, g) CSR expression of the shard (counts or log-normalised: ranks are the same).
    marker_idx
        k integer arrays of column indices into ``expr`` (one per candidate).
    marker_weights
        k float arrays of gene weights matching ``marker_idx`` (None = equal weights).
    max_rank
        UCell rank cap.
    negative
        Weight of the negative markers' signature (``annotate.negative_markers``).
    langcell_sim, langcell_ctm
        (n, k) LangCell's per-cell softmax-over-candidates similarity and matching scores
        (NaN rows for cells without tokens), columns in candidate order.
    langcell_alpha
        Weight of ``langcell_sim`` (``annotate.langcell_alpha``).
    """

    cell_emb: np.ndarray | None = None
    text_emb: np.ndarray | None = None
    cell_mean: np.ndarray | None = None
    center: bool = True
    expr: sp.csr_matrix | None = None
    marker_idx: Sequence[np.ndarray] | None = None
    marker_weights: Sequence[np.ndarray] | None = None
    max_rank: int = 1500
    negative: float = 0.0
    langcell_sim: np.ndarray | None = None
    langcell_ctm: np.ndarray | None = None
    langcell_alpha: float = 0.1


SCORERS: Registry[Callable[[ScoreInputs], np.ndarray]] = Registry("annotation scorer")


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def text_scores(
    cell_emb: np.ndarray,
    text_emb: np.ndarray,
    *,
    cell_mean: np.ndarray | None = None,
    center: bool = True,
) -> np.ndarray:
    """Cosine similarity of cells to candidate texts, optionally centred.

    Parameters
    ----------
    cell_emb
        (n, d) cell embeddings.
    text_emb
        (k, d) candidate-text embeddings (same space).
    cell_mean
        (d,) atlas mean of the cell embeddings; defaults to the mean of ``cell_emb`` (only
        right when ``cell_emb`` is the whole atlas).
    center
        Subtract ``cell_mean`` from cells and the candidate mean from texts (skipped with
        fewer than 2 candidates), then re-normalise. False gives the raw cosine.

    Returns
    -------
    numpy.ndarray
        (n, k) float32 cosine similarities in [-1, 1].
    """
    cells = np.asarray(cell_emb, dtype=np.float32)
    texts = np.asarray(text_emb, dtype=np.float32)
    if cells.ndim != 2 or texts.ndim != 2 or cells.shape[1] != texts.shape[1]:
        raise InputError(
            f"text scorer: cell embeddings {cells.shape} and text embeddings {texts.shape} "
            "are not in the same space",
            fix="embed candidate texts with the same text model as the gene texts",
        )
    if center:
        mean = cells.mean(axis=0) if cell_mean is None else np.asarray(cell_mean, np.float32)
        cells = cells - mean
        if texts.shape[0] > 1:
            texts = texts - texts.mean(axis=0)
    return (_unit(cells) @ _unit(texts).T).astype(np.float32)


def marker_indices(
    markers: Sequence[Sequence[str]], var_names: Sequence[str]
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Column indices of each candidate's marker genes, and the ones not in the atlas.

    Parameters
    ----------
    markers
        Per candidate, official gene symbols.
    var_names
        Atlas gene symbols (column order of the expression matrix).

    Returns
    -------
    (list of numpy.ndarray, list of list of str)
        Indices per candidate, and missing names per candidate.
    """
    pos = {str(g): i for i, g in enumerate(var_names)}
    idx, missing = [], []
    for genes in markers:
        idx.append(np.array([pos[g] for g in genes if g in pos], dtype=np.int64))
        missing.append([g for g in genes if g not in pos])
    return idx, missing


def marker_scores(
    expr: sp.csr_matrix | np.ndarray,
    marker_idx: Sequence[np.ndarray],
    *,
    max_rank: int = 1500,
    weights: Sequence[np.ndarray] | None = None,
    negative: float = 0.0,
) -> np.ndarray:
    """UCell-like signature scores (weighted when ``weights`` is given).

    Parameters
    ----------
    expr
        (n, g) expression (CSR or dense); only the order of values within a row matters.
    marker_idx
        k arrays of column indices.
    max_rank
        Rank cap (UCell's ``maxRank``); ranks above it count as ``max_rank + 1``.
    weights
        k arrays of gene weights (same shapes as ``marker_idx``); None = equal. A negative
        weight marks a gene stated absent: those genes form a second signature whose score,
        times ``negative``, is subtracted (so the score can drop below 0).
    negative
        Weight of the negative signature (0 ignores it).

    Returns
    -------
    numpy.ndarray
        (n, k) float32 scores in [0, 1] (minus the negative part); 1 = the markers are the top genes. Candidates
        with no markers score NaN (the marker scorer has nothing to say about them).
    """
    from raypipe.annotate.marker_kernel import ucell_scores

    mat = sp.csr_matrix(expr)
    if mat.dtype not in (np.float32, np.float64):
        mat = mat.astype(np.float64)
    _n, g = mat.shape
    idx = [np.asarray(i, np.int64) for i in marker_idx]
    if any(i.size and (i.min() < 0 or i.max() >= g) for i in idx):
        raise InputError(f"marker column index out of range for a matrix with {g} genes")
    if weights is not None and [np.size(w) for w in weights] != [i.size for i in idx]:
        raise InputError("marker weights must match the marker indices, candidate by candidate")
    return ucell_scores(mat, idx, weights, max_rank=max_rank, negative=negative)


@SCORERS.register("text")
def _text(inputs: ScoreInputs) -> np.ndarray:
    if inputs.cell_emb is None or inputs.text_emb is None:
        raise ConfigError(
            "scorer 'text' needs cell embeddings and candidate-text embeddings",
            fix="enable an embedding method whose space has a text encoder (genept_w/genept_s)",
        )
    return text_scores(
        inputs.cell_emb, inputs.text_emb, cell_mean=inputs.cell_mean, center=inputs.center
    )


@SCORERS.register("markers")
def _markers(inputs: ScoreInputs) -> np.ndarray:
    if inputs.expr is None or inputs.marker_idx is None:
        raise ConfigError(
            "scorer 'markers' needs the expression shard and marker indices",
            fix="set annotate.markers or use candidates whose CL definition names genes",
        )
    return marker_scores(
        inputs.expr,
        inputs.marker_idx,
        max_rank=inputs.max_rank,
        weights=inputs.marker_weights,
        negative=inputs.negative,
    )


@SCORERS.register("langcell")
def _langcell(inputs: ScoreInputs) -> np.ndarray:
    from raypipe.embed.langcell import mix_scores

    if inputs.langcell_sim is None or inputs.langcell_ctm is None:
        raise ConfigError(
            "scorer 'langcell' needs LangCell's per-cell sim/ctm from the CE stage",
            fix="use it with embed.methods [ce] and a LangCell checkpoint in embed.ce.model",
        )
    out = mix_scores(inputs.langcell_sim, inputs.langcell_ctm, inputs.langcell_alpha)
    if out.ndim != 2 or out.shape[1] == 0:
        raise InputError(f"langcell scores have shape {out.shape}; expected (cells, candidates)")
    return np.where(np.isnan(out), np.float32(1.0 / out.shape[1]), out).astype(np.float32)


def _zscore(x: np.ndarray, axis: int) -> np.ndarray:
    sd = x.std(axis=axis, keepdims=True)
    return (x - x.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1.0)


STANDARDISE = ("candidate", "cell", "none")


def combine(
    scores: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    *,
    standardise: str = "cell",
) -> np.ndarray:
    """Weighted combination of scorer matrices after standardisation.

    Parameters
    ----------
    scores
        Scorer name → (n, k) matrix.
    weights
        Scorer name → weight (>= 0); names missing here get weight 0.
    standardise
        ``candidate``: z-score each candidate column over the cells (always, even with one
        scorer: it removes each candidate's constant advantage); ``cell``: z-score each cell
        across candidates when there are several scorers (one scorer is returned unchanged,
        so ``unassigned_threshold`` stays in its units, e.g. cosine); ``none``: raw values.

    Returns
    -------
    numpy.ndarray
        (n, k) float32: the weighted mean over the scorers that score each candidate (a
        column of NaN, e.g. markers for a candidate without any, leaves that scorer out for
        that candidate); ``-inf`` for a candidate no scorer can score.
    """
    if standardise not in STANDARDISE:
        raise ConfigError(
            f"unknown annotate.standardise {standardise!r}", fix=f"use one of {STANDARDISE}"
        )
    used = {name: float(weights.get(name, 0.0)) for name in scores}
    used = {name: w for name, w in used.items() if w > 0}
    if not used:
        raise ConfigError(
            f"no scorer with a positive weight among {sorted(scores)} (weights {dict(weights)})",
            fix="set annotate.scorers, e.g. {text: 1.0, markers: 0.5}",
        )
    if standardise == "cell" and len(used) == 1:
        (name,) = used
        one = np.asarray(scores[name], dtype=np.float32)
        return np.where(np.isnan(one), -np.inf, one).astype(np.float32)
    out = np.zeros_like(np.asarray(next(iter(scores.values())), np.float64))
    wsum = np.zeros(out.shape[1])
    for n, w in used.items():
        x = np.asarray(scores[n], np.float64)
        have = ~np.isnan(x).all(axis=0)  # a scorer may have nothing to say about a candidate
        x = np.where(np.isnan(x), 0.0, x)
        if standardise == "candidate":
            x = _zscore(x, 0) if x.shape[0] > 1 else x
        elif standardise == "cell":
            x[:, have] = _zscore(x[:, have], 1) if have.any() else x[:, have]
        out[:, have] += w * x[:, have]
        wsum[have] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(wsum > 0, out / np.where(wsum > 0, wsum, 1.0), -np.inf)
    return np.asarray(out, dtype=np.float32)


def score_cells(
    inputs: ScoreInputs, weights: Mapping[str, float], *, standardise: str = "cell"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run every scorer with a positive weight and combine them (see :func:`combine`).

    Returns
    -------
    (dict, numpy.ndarray)
        Scorer name → (n, k) scores, and the combined (n, k) matrix.
    """
    per = {name: SCORERS.get(name)(inputs) for name, w in weights.items() if w > 0}
    return per, combine(per, weights, standardise=standardise)


def assign(
    scores: np.ndarray,
    labels: Sequence[str],
    *,
    top_k: int = 3,
    unassigned_threshold: float | None = None,
    unassigned_label: str = "unassigned",
) -> pd.DataFrame:
    """Turn a score matrix into per-cell predictions.

    Parameters
    ----------
    scores
        (n, k) combined scores.
    labels
        k candidate names (column order of ``scores``).
    top_k
        How many labels/scores to keep per cell.
    unassigned_threshold
        When set, cells whose margin (best − runner-up) is below it get ``unassigned_label``.

    Returns
    -------
    pandas.DataFrame
        n rows: ``label`` (prediction or ``unassigned``), ``best_label``, ``score``, ``margin``
        (inf with a single candidate), ``top_labels`` and ``top_scores`` (lists of length
        min(top_k, k)), ``unassigned`` (bool).
    """
    s = np.asarray(scores, dtype=np.float32)
    names = np.asarray(list(labels), dtype=object)
    if s.ndim != 2 or s.shape[1] != names.size or names.size == 0:
        raise InputError(f"scores {s.shape} do not match {names.size} candidate labels")
    kk = min(top_k, names.size)
    order = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    top = np.take_along_axis(s, order, axis=1)
    best = top[:, 0]
    if names.size > 1:
        margin = best - np.sort(s, axis=1)[:, -2]
    else:
        margin = np.full(s.shape[0], np.inf, dtype=np.float32)
    unassigned = (
        margin < unassigned_threshold
        if unassigned_threshold is not None
        else np.zeros(s.shape[0], dtype=bool)
    )
    best_label = names[order[:, 0]]
    return pd.DataFrame(
        {
            "label": np.where(unassigned, unassigned_label, best_label),
            "best_label": best_label,
            "score": best,
            "margin": margin.astype(np.float32),
            "top_labels": [list(r) for r in names[order]],
            "top_scores": [list(map(float, r)) for r in top],
            "unassigned": unassigned,
        }
    )
