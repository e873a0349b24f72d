"""GenePT-s: each cell as a sentence of gene symbols, embedded by the text model.

A cell's sentence lists its genes by decreasing normalised expression (zeros omitted, ties
broken by column order, truncated to the top N) joined by spaces. Sentences are deduplicated
before embedding (identical cells pay once) and go through the text embedder, which for the
``openai`` backend is cached, rate-limited and isolates failures per sentence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from raypipe.errors import InputError

__all__ = ["cell_sentences", "embed_sentences", "genept_s"]


def cell_sentences(
    X_norm: sp.csr_matrix | np.ndarray, symbols: np.ndarray, top_n: int
) -> list[str]:
    """Write each cell as its top-``top_n`` expressed gene symbols.

    Parameters
    ----------
    X_norm
        (n_cells, n_genes) normalised expression (e.g. counts scaled to 1e4 then log1p; any
        monotone transform of counts/total gives the same order). CSR or dense.
    symbols
        (n_genes,) gene symbols, in column order.
    top_n
        Genes per sentence.

    Returns
    -------
    list of str
        One sentence per cell; ``""`` for a cell with no expressed gene.
    """
    symbols = np.asarray(symbols).astype(str)
    if X_norm.shape[1] != len(symbols):
        raise InputError(
            f"GenePT-s: matrix has {X_norm.shape[1]} genes but {len(symbols)} symbols were given",
            fix="pass var symbols in the matrix's column order",
        )
    if top_n <= 0:
        raise InputError(
            f"GenePT-s: top_n must be > 0 (got {top_n})", fix="set embed.genept_s.top_n"
        )
    X = sp.csr_matrix(X_norm, copy=False)
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    out: list[str] = []
    indptr, indices, data = X.indptr, X.indices, X.data
    for i in range(X.shape[0]):
        lo, hi = indptr[i], indptr[i + 1]
        vals, cols = data[lo:hi], indices[lo:hi]
        keep = vals > 0
        vals, cols = vals[keep], cols[keep]
        order = np.lexsort((cols, -vals))[:top_n]  # by value desc, then column asc
        out.append(" ".join(symbols[cols[order]]))
    return out


def embed_sentences(sentences: list[str], embedder: Any) -> tuple[np.ndarray, np.ndarray]:
    """Embed sentences once each; L2-normalise.

    Parameters
    ----------
    sentences
        One per cell (``""`` = no expressed gene: not sent, flagged failed).
    embedder
        A text embedder (:class:`raypipe.llm.backends.TextEmbedder`); when it has
        ``embed_detailed`` (the ``openai`` backend) per-sentence failures are isolated.

    Returns
    -------
    (embeddings, failed)
        float32 (n_cells, d) unit rows (zero rows where failed) and bool (n_cells,).
    """
    unique = list(dict.fromkeys(s for s in sentences if s))
    if hasattr(embedder, "embed_detailed"):
        res = embedder.embed_detailed(unique)
        vecs, ok = res.vectors, res.ok
    else:
        vecs = np.asarray(embedder.embed(unique), np.float32)
        ok = np.ones(len(unique), bool)
    d = vecs.shape[1] if vecs.ndim == 2 else 0
    norms = np.linalg.norm(vecs, axis=1, keepdims=True) if len(unique) else np.zeros((0, 1))
    ok = ok & (norms[:, 0] > 0)
    vecs = np.where(ok[:, None], vecs / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
    pos = {s: i for i, s in enumerate(unique)}
    emb = np.zeros((len(sentences), d), np.float32)
    failed = np.ones(len(sentences), bool)
    for i, s in enumerate(sentences):
        j = pos.get(s)
        if j is not None and ok[j]:
            emb[i], failed[i] = vecs[j], False
    return emb, failed


def genept_s(
    X_norm: sp.csr_matrix | np.ndarray, symbols: np.ndarray, embedder: Any, *, top_n: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """GenePT-s embeddings of a block of cells.

    Returns
    -------
    (embeddings, failed, sentences)
        See :func:`embed_sentences` and :func:`cell_sentences`.
    """
    sentences = cell_sentences(X_norm, symbols, top_n)
    emb, failed = embed_sentences(sentences, embedder)
    return emb, failed, sentences
