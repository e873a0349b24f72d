"""The shared gene-text embedding cache: append-only segments keyed by (text hash, model).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raypipe.core.outputs import read_parquet, write_parquet_atomic
from raypipe.core.storage import AnyPath, as_path, sorted_paths

__all__ = ["GeneEmbeddingCache", "model_key", "text_key"]

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
