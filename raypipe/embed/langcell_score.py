"""``raypipe ce score``: LangCell zero-shot scores of already-tokenised cells → parquet.

Input: a tokens parquet as ``raypipe tokenize`` writes it, or any parquet with ``obs_name``
and ``input_ids`` (Geneformer V1 ids without special tokens; a leading LangCell ``<cls>`` is
accepted); the checkpoint's framing (``[<cls>] + ids``, truncated) is applied here. Candidate
texts: a JSON object ``{name: text}`` in candidate order. Output, one row per cell, written
atomically: ``obs_name``, ``embedding``, ``sim``, ``ctm``, ``score`` (lists in candidate
order), ``label`` (null for a cell without tokens) and ``empty``; the candidate names, α and
the model are in the parquet metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from raypipe.errors import InputError

__all__ = ["check_tokens", "read_candidate_texts", "score_tokens_file"]


def read_candidate_texts(path: str | Path) -> dict[str, str]:
    """Read ``{candidate name: text}`` from a JSON file (order kept).

    Raises
    ------
    InputError
        Unreadable JSON, not an object of strings, or empty.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(
            f"cannot read candidate texts {p}: {e}",
            fix='write a JSON object {"B cell": "B cell: A lymphocyte of B lineage ...", ...}',
        ) from e
    if not isinstance(data, dict) or not data:
        raise InputError(
            f"candidate texts {p} must be a non-empty JSON object name → text",
            fix='write e.g. {"B cell": "B cell: A lymphocyte of B lineage ..."}',
        )
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise InputError(
            f"candidate texts {p}: {', '.join(map(repr, bad[:5]))} have no text",
            fix="give every candidate a non-empty string",
        )
    return {str(k): str(v) for k, v in data.items()}


def check_tokens(pf: Any, src: Path) -> None:
    """Check a tokens parquet before any model is loaded: rows, id dtype, unique cell names.

    Raises
    ------
    InputError
        No rows; ``input_ids`` not lists of integers (float ids would be truncated, strings
        are no ids); repeated ``obs_name`` (scores are matched to cells by name).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = "write it with `raypipe tokenize CELLS.h5ad --out tokens.parquet`"
    ids = pf.schema_arrow.field("input_ids").type
    listy = pa.types.is_list(ids) or pa.types.is_large_list(ids) or pa.types.is_fixed_size_list(ids)
    if not listy or not pa.types.is_integer(ids.value_type):
        raise InputError(
            f"tokens parquet {src}: column input_ids holds {ids}, not lists of integer token ids",
            fix=f"store the ids as integers (list<int64>); {fix}",
        )
    if pf.metadata.num_rows == 0:
        raise InputError(f"tokens parquet {src} has no rows (no cells to score)", fix=fix)
    names = pq.read_table(src, columns=["obs_name"]).column("obs_name").to_pandas()
    dup = names[names.duplicated(keep=False)]
    if len(dup):
        raise InputError(
            f"tokens parquet {src}: {len(dup):,} rows share {dup.nunique():,} obs_name(s) "
            f"(e.g. {', '.join(map(repr, dup.unique()[:3]))}); scores are matched to cells "
            "by name",
            fix="give every cell a unique obs_name (e.g. adata.obs_names_make_unique() "
            "before raypipe tokenize)",
        )


def score_tokens_file(
    tokens: str | Path,
    model: str | Path,
    texts: str | Path,
    out: str | Path,
    *,
    alpha: float = 0.1,
    text_max_length: int = 512,
    max_tokens_per_batch: int = 65_536,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    device: str | None = None,
    chunk_cells: int = 8192,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every cell of a tokens parquet with a LangCell checkpoint; write ``out``.

    Parameters
    ----------
    tokens
        Parquet with ``obs_name`` and ``input_ids``.
    model
        LangCell checkpoint folder (see :mod:`raypipe.embed.langcell`).
    texts
        JSON ``{name: text}``.
    out
        Output parquet (written to a temporary name, then renamed).
    alpha
        Weight of the similarity in ``score = alpha·sim + (1 − alpha)·ctm``.
    text_max_length, max_tokens_per_batch, dtype, device
        Text truncation; padded-token budget per pass; ``auto`` = bf16 on CUDA, fp32 on CPU.
    chunk_cells
        Cells read and scored per step (length buckets form within a step).
    progress
        Show a progress bar.

    Returns
    -------
    dict
        ``n_cells``, ``n_empty``, ``candidates``, ``label_counts``, ``out``, ``device``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from raypipe.core.outputs import write_parquet_atomic
    from raypipe.embed.langcell import LangCellModel, LangCellZeroShot, frame_cells, mix_scores

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha must be in [0, 1] (got {alpha})")
    src = Path(tokens)
    try:
        pf = pq.ParquetFile(src)
    except (OSError, pa.ArrowException) as e:
        raise InputError(
            f"cannot read tokens parquet {src}: {e}",
            fix="write it with `raypipe tokenize CELLS.h5ad --out tokens.parquet`",
        ) from e
    cols = pf.schema_arrow.names
    if "obs_name" not in cols or "input_ids" not in cols:
        raise InputError(
            f"tokens parquet {src} needs columns obs_name and input_ids; it has {', '.join(cols)}",
            fix="write it with `raypipe tokenize` or give those two columns",
        )
    check_tokens(pf, src)
    cand = read_candidate_texts(texts)
    lc = LangCellModel.load(
        model,
        max_tokens_per_batch=max_tokens_per_batch,
        dtype=dtype,
        device=device,
    )
    zs = LangCellZeroShot(lc, cand, text_max_length=text_max_length)
    names_arr = np.asarray(zs.names, dtype=object)
    n_total = pf.metadata.num_rows
    tables = []
    bar = tqdm(total=n_total, unit="cell", desc="langcell", disable=not progress)
    cls_id = int(lc.cell.cls_id) if lc.cell.cls_id is not None else 0
    for batch in pf.iter_batches(batch_size=chunk_cells, columns=["obs_name", "input_ids"]):
        ids_col = batch.column("input_ids")
        cells = [
            np.asarray(x if x is not None else [], dtype=np.int64) for x in ids_col.to_pylist()
        ]
        res = zs.score(frame_cells(cells, cls_id=cls_id, max_length=lc.cell.max_length))
        score = mix_scores(res.sim, res.ctm, alpha)
        best = np.nan_to_num(score, nan=-np.inf).argmax(axis=1)
        labels = [None if e else str(names_arr[b]) for e, b in zip(res.empty, best, strict=True)]
        tables.append(
            pa.table(
                {
                    "obs_name": pa.array([str(x) for x in batch.column("obs_name").to_pylist()]),
                    "embedding": _fixed(res.embedding),
                    "sim": _fixed(res.sim),
                    "ctm": _fixed(res.ctm),
                    "score": _fixed(score),
                    "label": pa.array(labels, pa.string()),
                    "empty": pa.array(res.empty),
                }
            )
        )
        bar.update(len(cells))
    bar.close()
    table = pa.concat_tables(tables) if tables else _empty_table(lc.cell.dim, zs.k)
    meta = {
        "candidates": json.dumps(zs.names),
        "alpha": str(alpha),
        "temperature": "0.05",
        "model": str(model),
        "method": "langcell_zero_shot",
    }
    write_parquet_atomic(Path(out), table.replace_schema_metadata(meta))
    lab = table.column("label").to_pandas()
    return {
        "n_cells": table.num_rows,
        "n_empty": int(np.count_nonzero(table.column("empty").to_numpy())),
        "candidates": zs.names,
        "label_counts": lab.value_counts().to_dict(),
        "out": str(out),
        "device": str(lc.cell.device),
    }


def _fixed(x: np.ndarray) -> Any:
    import pyarrow as pa

    arr = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def _empty_table(dim: int, k: int) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "obs_name": pa.array([], pa.string()),
            "embedding": pa.array([], pa.list_(pa.float32(), dim)),
            "sim": pa.array([], pa.list_(pa.float32(), k)),
            "ctm": pa.array([], pa.list_(pa.float32(), k)),
            "score": pa.array([], pa.list_(pa.float32(), k)),
            "label": pa.array([], pa.string()),
            "empty": pa.array([], pa.bool_()),
        }
    )
