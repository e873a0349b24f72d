"""Geneformer rank-value tokenizer, vectorised over a CSR shard.

Each cell's value for gene g is ``x_g / n_counts * 10_000 / median_g`` (Geneformer's
normalisation; ``n_counts`` = the cell's total over *all* genes); the cell's expressed genes
that are in both the token and the median dictionary are sorted by that value, descending,
and mapped to token ids. Duplicate Ensembl ids in an atlas are summed first (as Geneformer's
``collapse_gene_ids`` does). Ties keep the atlas column order (a stable sort).

Log-normalised input (``normalize_total`` + ``log1p``) gives the same ranks after ``expm1``:
the per-cell scale factor is a constant within the cell, so only ``value / median`` matters.

The rank step runs in one numba kernel over the shard's CSR arrays: per row, a stable LSD
radix sort of the float64 scores' bit patterns (exact ordering, ties in column order), writing
framed token ids into one buffer that is sliced per cell. ``raypipe.bench.ce`` compares it
with a shard-wide ``np.lexsort`` engine and a per-cell numpy loop (all three agree exactly).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from raypipe.core.storage import ObjectPath, as_path, zarr_store
from raypipe.embed.dictionaries import (
    GeneformerDictionaries,
    TokenPlan,
    load_dict,
    resolve_ensembl_ids,
)
from raypipe.embed.rank_kernel import rank_kernel
from raypipe.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "RankValueTokenizer",
    "TokenizeStats",
    "Variant",
    "detect_x_kind",
    "write_tokens",
]


Variant = Literal["geneformer_v1", "geneformer_v2", "langcell"]
XKind = Literal["counts", "lognorm", "auto"]
DEFAULT_MAX_LENGTH = {"geneformer_v1": 2048, "geneformer_v2": 4096, "langcell": 2048}
TARGET_SUM = 10_000.0
_LOGNORM_MAX = 30.0  # expm1(30) ~ 1e13 counts: anything larger is not log1p data

_ERR_NONFINITE, _ERR_NEGATIVE = 1, 2


@dataclass(frozen=True)
class TokenizeStats:
    """What one ``tokenize`` call did.

    The path taken (``counts``/``lognorm``), which cells came out empty (``(n_cells,)`` bool)
    and the rank engine that ran.
    """

    x_kind: str
    empty: np.ndarray
    engine: str

    @property
    def n_empty(self) -> int:
        """Number of cells with no tokens."""
        return int(self.empty.sum())


def detect_x_kind(data: np.ndarray) -> Literal["counts", "lognorm"]:
    """Guess whether a shard's CSR ``data`` holds raw counts (all integers) or lognorm values."""
    if data.size == 0:
        return "counts"
    sample = data[:200_000]
    return "counts" if bool(np.all(sample == np.floor(sample))) else "lognorm"


class RankValueTokenizer:
    """Rank-value encoding of cells for Geneformer V1/V2 and LangCell.

    Parameters
    ----------
    dicts
        The dictionaries (``GeneformerDictionaries.load("V1")`` for V1 and LangCell).
    variant
        ``geneformer_v1``: up to 2,048 gene tokens, no special tokens.
        ``geneformer_v2``: ``<cls>`` + up to 4,094 gene tokens + ``<eos>``.
        ``langcell``: ``<cls>`` + up to 2,047 gene tokens on the V1 vocabulary. LangCell adds
        ``<cls>`` to Geneformer's V1 dictionary as ``len(token_dict)`` (25,426), so its cell
        BERT has 25,427 embeddings; ``cls_id`` overrides that id.
    max_length
        Total tokens per cell including special tokens (default per variant, above).
    cls_id
        LangCell's ``<cls>`` id (default: the dictionary's ``<cls>`` or ``len(token_dict)``).
    """

    def __init__(
        self,
        dicts: GeneformerDictionaries,
        *,
        variant: Variant = "geneformer_v1",
        max_length: int | None = None,
        cls_id: int | None = None,
    ) -> None:
        if variant not in DEFAULT_MAX_LENGTH:
            raise ConfigError(
                f"unknown tokenizer variant {variant!r}",
                fix=f"use one of {', '.join(DEFAULT_MAX_LENGTH)}",
            )
        self.dicts = dicts
        self.variant: Variant = variant
        self.max_length = int(max_length or DEFAULT_MAX_LENGTH[variant])
        self.prefix: tuple[int, ...] = ()
        self.suffix: tuple[int, ...] = ()
        if variant == "geneformer_v2":
            if dicts.cls_id is None or dicts.eos_id is None:
                raise InputError(
                    f"variant geneformer_v2 needs <cls> and <eos> in the token dictionary "
                    f"{dicts.sources.get('token', dicts.name)}",
                    fix="use dictionary V2 (token_dictionary_gc95M.pkl) with geneformer_v2",
                )
            self.prefix, self.suffix = (dicts.cls_id,), (dicts.eos_id,)
        elif variant == "langcell":
            cid = cls_id if cls_id is not None else dicts.cls_id
            self.prefix = (int(cid if cid is not None else len(dicts.token_dict)),)
        self.max_body = self.max_length - len(self.prefix) - len(self.suffix)
        if self.max_body < 1:
            raise ConfigError(f"max_length {self.max_length} leaves no room for gene tokens")
        self.special_ids = frozenset(self.prefix + self.suffix)
        self._plan: TokenPlan | None = None
        self.last_stats: TokenizeStats | None = None

    @property
    def pad_id(self) -> int:
        """The padding id (``<pad>``)."""
        return self.dicts.pad_id

    @property
    def vocab_size(self) -> int:
        """Embeddings a model needs for every id this tokenizer can emit."""
        return max([*self.dicts.token_dict.values(), *self.special_ids]) + 1

    def plan(self, var_ensembl_ids: Sequence[object]) -> TokenPlan:
        """Map an atlas's columns to tokens and medians (once per atlas).

        Parameters
        ----------
        var_ensembl_ids
            Ensembl id of each atlas column (``None``/empty for unmapped genes); version
            suffixes and case are ignored.

        Returns
        -------
        TokenPlan
            Also kept on the tokenizer and used by :meth:`tokenize`.
        """
        self._plan = self.dicts.plan_columns(var_ensembl_ids)
        return self._plan

    def tokenize(
        self,
        X: Any,
        *,
        x_kind: XKind = "counts",
        n_counts: np.ndarray | None = None,
        plan: TokenPlan | None = None,
        engine: Callable[..., np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Rank-value encode every row of a CSR shard.

        Parameters
        ----------
        X
            ``(n_cells, n_vars)`` ``scipy.sparse`` matrix (CSR preferred) in plan column order.
        x_kind
            ``counts`` (raw), ``lognorm`` (``log1p`` of normalised counts; ``expm1`` first)
            or ``auto`` (integers → counts). The path taken is in :attr:`last_stats`.
        n_counts
            ``(n_cells,)`` total counts per cell (e.g. obs ``n_counts``); default: the row
            sums over all columns. Ignored for lognorm (ranks do not depend on it).
        plan
            Column plan (default: the one from the last :meth:`plan` call).
        engine
            A rank kernel with the contract of ``raypipe.embed.rank_kernel.rank_kernel_py``
            (default: that kernel, compiled by numba; ``raypipe.bench.ce`` passes a lexsort one
            to compare).

        Returns
        -------
        list of numpy.ndarray
            One int32 array of token ids per cell, framed for the variant; zero-length for
            cells without known expressed genes (flagged in ``last_stats.empty``).

        Raises
        ------
        InputError
            NaN, infinite or negative values, or lognorm values too large to be log1p data.
        """
        import scipy.sparse as sp

        plan = plan or self._plan
        if plan is None:
            raise InputError(
                "tokenize() called before plan()", fix="call plan(var_ensembl_ids) first"
            )
        if not sp.issparse(X):
            X = sp.csr_matrix(np.asarray(X))
        X = X.tocsr()
        if X.shape[1] != plan.n_vars:
            raise InputError(
                f"shard has {X.shape[1]} genes but the plan was made for {plan.n_vars}",
                fix="plan() with the var ids of this atlas",
            )
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        data = X.data
        detected = x_kind == "auto"
        if detected:
            x_kind = detect_x_kind(data)
        if x_kind not in ("counts", "lognorm"):
            raise ConfigError(f"x_kind {x_kind!r} is not counts, lognorm or auto")
        lognorm = x_kind == "lognorm"
        if lognorm and data.size and float(np.nanmax(data)) > _LOGNORM_MAX:
            peak = f"{float(np.nanmax(data)):.4g}"
            if detected:
                raise InputError(
                    f"X holds non-integer values up to {peak} (x_kind auto): neither raw counts "
                    "nor log1p-normalised values (CPM or scaled data?)",
                    fix="tokenize the raw counts (e.g. adata.raw or a counts layer), or pass "
                    "--x-kind counts if these are counts (e.g. ambient-corrected)",
                )
            raise InputError(
                f"x_kind=lognorm but the shard holds values up to {peak}, "
                "too large for log1p-normalised data",
                fix="pass x_kind='counts' for raw counts",
            )
        indptr = X.indptr.astype(np.int64, copy=False)
        indices = X.indices.astype(np.int32, copy=False)
        data64 = data if data.dtype in (np.float32, np.float64) else data.astype(np.float64)
        n = X.shape[0]
        totals = np.zeros(n, dtype=np.float64)  # per-cell n_counts (computed when not given)
        if not lognorm and n_counts is not None:
            totals = np.asarray(n_counts, dtype=np.float64).reshape(-1)
            if totals.shape[0] != n:
                raise InputError(f"n_counts has {totals.shape[0]} values for {n} cells")
        rank = engine or rank_kernel()
        pre = np.asarray(self.prefix, dtype=np.int32)
        suf = np.asarray(self.suffix, dtype=np.int32)
        bound = np.minimum(np.diff(indptr), self.max_body) + pre.size + suf.size
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(bound, out=starts[1:])
        out = np.zeros(int(starts[-1]), dtype=np.int32)
        lens = np.zeros(n, dtype=np.int64)
        status = rank(
            indptr, indices, data64, plan.col_gene, plan.gene_median, plan.gene_token, pre, suf,
            lognorm, n_counts is None or lognorm, totals, self.max_body, plan.has_duplicates,
            starts, out, lens,
        )  # fmt: skip
        if status[0]:
            _raise_bad_value(int(status[0]), int(status[1]), data64[int(status[2])])
        b, ends = (
            starts.tolist(),
            np.where(lens > 0, starts[:-1] + lens + pre.size + suf.size, starts[:-1]).tolist(),
        )
        cells = [out[b[i] : ends[i]] for i in range(n)]
        self.last_stats = TokenizeStats(
            x_kind=x_kind, empty=lens == 0, engine=getattr(rank, "__name__", "rank_kernel")
        )
        return cells


def _raise_bad_value(code: int, row: int, value: float) -> None:
    what = "a non-finite value" if code == _ERR_NONFINITE else "a negative value"
    raise InputError(
        f"cell (row {row} of the shard) holds {what} ({value!r}); counts and log-normalised "
        "expression are finite and >= 0",
        fix="pass raw counts or normalize_total+log1p data (not scaled/centred values)",
    )


def write_tokens(
    input_path: str | Path,
    out_path: str | Path,
    *,
    dictionary: str = "V1",
    variant: Variant = "geneformer_v1",
    gene_name_id: str | Path | None = None,
    x_kind: XKind = "auto",
    rows_per_chunk: int = 4096,
    min_coverage: float = 0.5,
) -> dict[str, object]:
    """Tokenise an ``.h5ad`` or AnnData ``.zarr`` in row chunks to parquet.

    Parameters
    ----------
    input_path
        The atlas (read lazily, ``rows_per_chunk`` cells at a time).
    out_path
        Parquet with ``obs_name`` (string), ``input_ids`` (list<int32>), ``length`` (int32),
        in obs order; written to a temporary name and renamed when complete.
    dictionary, variant
        As in :meth:`GeneformerDictionaries.load` and :class:`RankValueTokenizer`.
    gene_name_id
        Symbol → Ensembl table for atlases without ``var['ensembl_id']`` (default: the
        dictionary's ``gene_name_id_dict``).
    x_kind
        ``counts``, ``lognorm`` or ``auto`` (decided on the first chunk).
    rows_per_chunk
        Cells per read.
    min_coverage
        Fail when fewer atlas genes than this share have a token.

    Returns
    -------
    dict
        ``n_cells``, ``n_empty``, ``coverage``, ``x_kind``, ``id_source``, ``out``.
    """
    import anndata as ad
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    src, out = as_path(input_path), as_path(out_path)  # paths or URLs (s3://, gs://)
    dicts = GeneformerDictionaries.load(dictionary)
    table = load_dict(gene_name_id) if gene_name_id else dicts.gene_name_id
    group: Any
    X: Any
    try:
        if src.suffix == ".zarr" or src.is_dir():
            import zarr

            group = zarr.open_group(zarr_store(src), mode="r")
        else:
            import h5py

            group = h5py.File(src.open("rb") if isinstance(src, ObjectPath) else src, "r")
        obs = ad.io.read_elem(group["obs"])
        var = ad.io.read_elem(group["var"])
        xel = group["X"]
        X = ad.io.sparse_dataset(xel) if "indptr" in xel else xel
    except (OSError, KeyError, ValueError) as e:
        raise InputError(
            f"cannot read AnnData {src}: {e}", fix="pass an .h5ad or AnnData .zarr"
        ) from e
    ens = var["ensembl_id"].tolist() if "ensembl_id" in var.columns else None
    ids, how = resolve_ensembl_ids(var.index.tolist(), ens, table)
    tok = RankValueTokenizer(dicts, variant=variant)
    plan = tok.plan(ids)
    if plan.coverage < min_coverage:
        unknown = var.index[np.flatnonzero(plan.col_gene < 0)[:10]].tolist()
        raise InputError(
            f"{src}: only {plan.n_known}/{plan.n_vars} genes ({plan.coverage:.1%}) map to the "
            f"{dicts.name} dictionary via {how}; unknown e.g. {', '.join(map(str, unknown))}",
            fix="add var['ensembl_id'], pass --gene-name-id, or lower min_coverage",
        )
    tmp = (
        Path(tempfile.mkdtemp()) / out.name
        if isinstance(out, ObjectPath)
        else out.with_name(out.name + ".tmp")
    )
    n_empty, n_rows = 0, int(obs.shape[0])
    schema = pa.schema(
        [("obs_name", pa.string()), ("input_ids", pa.list_(pa.int32())), ("length", pa.int32())]
    )
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo in range(0, n_rows, rows_per_chunk):
            hi = min(lo + rows_per_chunk, n_rows)
            chunk = X[lo:hi]
            chunk = chunk if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk))
            cells = tok.tokenize(chunk, x_kind=x_kind)
            stats = cast(TokenizeStats, tok.last_stats)
            x_kind = cast(XKind, stats.x_kind)  # the first chunk decides "auto"
            n_empty += stats.n_empty
            lens = np.fromiter((c.size for c in cells), dtype=np.int32, count=len(cells))
            offsets = np.zeros(len(cells) + 1, dtype=np.int32)
            np.cumsum(lens, out=offsets[1:])
            values = np.concatenate(cells) if cells else np.zeros(0, np.int32)
            ids_arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
            names = pa.array(obs.index[lo:hi].astype(str).tolist(), pa.string())
            writer.write_table(
                pa.Table.from_arrays([names, ids_arr, pa.array(lens)], schema=schema)
            )
    if hasattr(group, "close"):
        group.close()
    if isinstance(out, ObjectPath):  # one upload: the object appears whole when it completes
        out.fs.put_file(str(tmp), out.key)
        tmp.unlink()
    else:
        tmp.replace(out)
    return {"n_cells": n_rows, "n_empty": n_empty, "coverage": plan.coverage,
            "x_kind": x_kind, "id_source": how, "out": str(out)}  # fmt: skip
