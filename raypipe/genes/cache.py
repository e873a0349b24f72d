"""The shared text-embedding cache: append-only segments keyed by (text hash, model).

Gene texts, and the other texts a run embeds with its text model (candidate cell-type texts,
the Cell Ontology names the label mapper compares with: :func:`embed_cached`), live there.
Lives under ``cache.path`` (default ``$RAYPIPE_CACHE_DIR`` or ``~/.cache/raypipe``; a bucket
URL works the same), outside any run, so a second atlas, a scheduled re-run or a switch of
text source A → B → A embeds only texts no run embedded before.

Each write is a new segment ``seg-<model key>-<time>-<random>.parquet`` written once
(temporary file + rename locally, one PUT in a bucket): concurrent writers never touch each
other's files, a reader never sees half a segment, and nothing is ever rewritten, so entries
accumulate. An interrupted embedding keeps the segments it flushed; the re-run embeds the rest.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.core.outputs import read_parquet, write_parquet_atomic
from raypipe.core.storage import AnyPath, as_path, sorted_paths

if TYPE_CHECKING:
    import pandas as pd

    from raypipe.config import JobConfig

__all__ = ["CachedEmbedding", "GeneEmbeddingCache", "embed_cached", "model_key", "text_key"]

log = logging.getLogger(__name__)

#: Texts buffered before a segment is written while an embedding runs.
SEGMENT_ROWS = 2048


def model_key(model: str) -> str:
    """Short stable key of a text model id (segment names carry it)."""
    return hashlib.blake2b(model.encode(), digest_size=6).hexdigest()


def text_key(text: str) -> str:
    """Content hash of a gene text (the cache key, with the model)."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class GeneEmbeddingCache:
    """Read and append the gene-text embeddings of one text model.

    Parameters
    ----------
    folder
        The cache folder or URL (``<cache.path>/gene_embeddings``).
    model
        The text model id; only its entries are read.
    """

    folder: AnyPath | str
    model: str
    written: int = 0
    _buffer: list[tuple[str, np.ndarray]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.folder = as_path(self.folder)

    @property
    def path(self) -> AnyPath:
        """The cache folder."""
        return as_path(self.folder)

    def load(self) -> dict[str, np.ndarray]:
        """Return text → embedding for every entry of this model (all segments)."""
        out: dict[str, np.ndarray] = {}
        for f in sorted_paths(self.path.glob(f"seg-{model_key(self.model)}-*.parquet")):
            try:
                t = read_parquet(f, columns=["text", "model", "embedding"])
            except (FileNotFoundError, OSError) as exc:  # removed meanwhile, or unreadable
                log.warning("gene-embedding cache: skipping %s (%s)", f, exc)
                continue
            texts = t.column("text").to_pylist()
            models = t.column("model").to_pylist()
            embs = t.column("embedding").to_pylist()
            for text, m, e in zip(texts, models, embs, strict=True):
                if m == self.model:
                    out[text] = np.asarray(e, dtype=np.float32)
        return out

    def add(self, texts: list[str], embeddings: Any) -> None:
        """Buffer new entries; a segment is written every :data:`SEGMENT_ROWS` texts."""
        self._buffer += [
            (t, np.asarray(e, dtype=np.float32)) for t, e in zip(texts, embeddings, strict=True)
        ]
        if len(self._buffer) >= SEGMENT_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one new segment (nothing when empty)."""
        if not self._buffer:
            return
        import pyarrow as pa

        rows, self._buffer = self._buffer, []
        d = len(rows[0][1])
        flat = np.concatenate([e.reshape(-1) for _, e in rows]).astype(np.float32)
        table = pa.table(
            {
                "text_hash": pa.array([text_key(t) for t, _ in rows]),
                "text": pa.array([t for t, _ in rows]),
                "model": pa.array([self.model] * len(rows)),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), d),
            }
        )
        name = f"seg-{model_key(self.model)}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        write_parquet_atomic(self.path / name, table)
        self.written += len(rows)


@dataclass
class CachedEmbedding:
    """What :func:`embed_cached` returns: vectors in input order, per-text errors, usage.

    ``vectors`` rows of texts that failed are zeros (their ``errors`` entry says why);
    ``stats`` (``texts``, ``hits``, ``embedded``) counts unique texts, for the manifest.
    """

    vectors: np.ndarray
    errors: list[str]
    usage: dict[str, Any]
    stats: dict[str, int]


def embed_cached(
    texts: list[str],
    job: JobConfig,
    *,
    known: dict[str, np.ndarray] | None = None,
    progress: bool = False,
    desc: str = "texts",
    on_batch: Callable[[pd.DataFrame], None] | None = None,
) -> CachedEmbedding:
    """Embed ``texts`` with the run's text model, through the shared (text, model) cache.

    Only texts neither in the cache nor in ``known`` (e.g. a run folder's own copy) are
    embedded; what is embedded is added to the cache as it arrives (an interrupted call keeps
    its finished batches), so a re-run, or another run with the same texts, starts no model.

    Parameters
    ----------
    texts
        Texts in the order wanted (duplicates allowed).
    job
        The job (``text_model``, ``cache.path``).
    known
        Extra text → embedding entries to use before the cache.
    progress, desc
        Draw a bar of texts done (cache hits counted as done).
    on_batch
        Also called with each embedded batch (see :func:`raypipe.llm.text_stage.embed_texts`).
    """
    from raypipe.llm.text_stage import embed_texts

    unique = list(dict.fromkeys(texts))
    cache = GeneEmbeddingCache(job.gene_cache_dir(), job.text_model.model)
    have = {**cache.load(), **(known or {})}
    todo = [t for t in unique if t not in have]
    errors: dict[str, str] = {}
    usage: dict[str, Any] = {}
    if todo:

        def keep(batch: pd.DataFrame) -> None:
            ok = batch["error"].fillna("") == ""
            cache.add([str(t) for t in batch["text"][ok]], list(batch["embedding"][ok]))
            if on_batch is not None:
                on_batch(batch)

        try:
            emb, errs, usage = embed_texts(
                todo,
                job,
                on_batch=keep,
                progress=progress,
                desc=desc,
                cached=len(unique) - len(todo),
            )
        finally:
            cache.flush()
        for t, e, err in zip(todo, emb, errs, strict=True):
            if err:
                errors[t] = err
            else:
                have[t] = np.asarray(e, dtype=np.float32)
    dim = len(next(iter(have.values()))) if have else 0
    zero = np.zeros(dim, dtype=np.float32)
    vectors = np.stack([have.get(t, zero) for t in texts]) if texts else np.zeros((0, dim))
    return CachedEmbedding(
        vectors=vectors.astype(np.float32),
        errors=[errors.get(t, "") for t in texts],
        usage=usage,
        stats={
            "texts": len(unique),
            "hits": len(unique) - len(todo),
            "embedded": len(todo),
        },
    )
