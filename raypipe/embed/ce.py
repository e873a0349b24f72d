"""CE embeddings on Ray Data: CPU tokenise actors → (GPU) encode actors, overlapped.

Step 1, :class:`CETokenize` (CPU): reads the shard's rows, rank-value encodes them
(:class:`~raypipe.embed.tokenizer.RankValueTokenizer`) and passes packed token ids on.
Step 2, :class:`CEEncode` (``num_gpus`` when configured): embeds them with
:class:`~raypipe.embed.ce_model.CellEncoder` (length-bucketed batches under a token budget),
and writes ``embeddings/ce/part-*.parquet``. Ray Data streams shards through both pools, so
tokenisation of shard k+1 overlaps inference on shard k.

With the ``langcell`` annotation scorer on, :class:`CEEncode` also gets the candidate texts and
runs LangCell's zero-shot head (:class:`~raypipe.embed.langcell.LangCellZeroShot`) in the same
pass that embeds the cells: the cell hidden states never leave the actor. The per-cell
``langcell_sim`` and ``langcell_ctm`` (softmax over candidates of the similarity and of the
match probability, lists in candidate order; NaN for cells without tokens) are extra columns of
the CE part, so they share its atomic write, its completion marker and its fingerprint (which
then includes the candidate names and texts); the candidate names are in the part's metadata.
The mixing weight ``annotate.langcell_alpha`` is applied by the ``langcell`` scorer, so a new α
re-annotates without re-encoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from raypipe.atlas.store import AtlasShardStage
from raypipe.config import config_hash
from raypipe.core.plan import StagePlan, StageSpec, stage_hash
from raypipe.core.stage import SHARD_COLUMNS, check_contract
from raypipe.core.storage import is_url, local_copy
from raypipe.errors import ConfigError, InputError

if TYPE_CHECKING:
    from raypipe.atlas.store import AtlasInfo
    from raypipe.config import JobConfig
    from raypipe.core.plan import Shard
    from raypipe.genes.space import GeneSpace

__all__ = [
    "LANGCELL_COLUMNS",
    "CEEncode",
    "CETokenize",
    "build_ce",
    "check_checkpoint",
    "pack_tokens",
    "unpack_tokens",
]

TOKEN_COLUMNS = (*SHARD_COLUMNS, "ids", "offsets")
#: extra CE-part columns written when the langcell scorer is on (part metadata: candidates)
LANGCELL_COLUMNS = ("langcell_sim", "langcell_ctm")


def pack_tokens(cells: list[np.ndarray]) -> tuple[bytes, bytes]:
    """Pack ragged token arrays into (ids bytes, offsets bytes)."""
    offsets = np.zeros(len(cells) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in cells], out=offsets[1:])
    ids = np.concatenate(cells).astype(np.int32) if cells else np.zeros(0, np.int32)
    return ids.tobytes(), offsets.tobytes()


def unpack_tokens(ids: bytes, offsets: bytes) -> list[np.ndarray]:
    """Inverse of :func:`pack_tokens`."""
    flat = np.frombuffer(ids, dtype=np.int32)
    off = np.frombuffer(offsets, dtype=np.int64)
    return [flat[off[i] : off[i + 1]] for i in range(off.size - 1)]


def _tokenizer(dictionary: str, variant: Any, max_length: int | None) -> Any:
    from raypipe.embed.dictionaries import GeneformerDictionaries
    from raypipe.embed.tokenizer import RankValueTokenizer

    return RankValueTokenizer(
        GeneformerDictionaries.load(dictionary), variant=variant, max_length=max_length
    )  # type: ignore[arg-type]


class CETokenize:
    """Ray Data step: shard specs → packed Geneformer tokens of the shard's cells.

    Batch contract: in ``shard, start, stop, content_hash``; out the same plus ``ids`` and
    ``offsets`` (bytes).
    """

    def __init__(
        self,
        *,
        atlas_path: str,
        dictionary: str,
        variant: str,
        max_length: int | None,
        ensembl_ids: list[str | None],
        x_kind: str,
    ) -> None:
        self.atlas_path = atlas_path
        self.tokenizer = _tokenizer(dictionary, variant, max_length)
        self.tokenizer.plan(ensembl_ids)
        self.x_kind = x_kind

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Tokenise each shard of the batch."""
        from raypipe.atlas.store import read_shard

        check_contract("CETokenize", batch, SHARD_COLUMNS)
        out: dict[str, list[Any]] = {c: [] for c in TOKEN_COLUMNS}
        for i in range(len(batch["shard"])):
            x = read_shard(self.atlas_path, int(batch["start"][i]), int(batch["stop"][i]))
            ids, offsets = pack_tokens(self.tokenizer.tokenize(x, x_kind=self.x_kind))
            for c in SHARD_COLUMNS:
                out[c].append(batch[c][i])
            out["ids"].append(ids)
            out["offsets"].append(offsets)
        return {
            k: np.asarray(v, dtype=object if k in ("ids", "offsets") else None)
            for k, v in out.items()
        }


class CEEncode(AtlasShardStage):
    """Ray Data step: packed tokens → ``embeddings/ce/part-*.parquet`` (+ completion marker).

    Batch contract: in ``shard, start, stop, content_hash, ids, offsets``; out the shard-stage
    summary. With ``candidate_names``/``candidate_texts`` (a LangCell checkpoint), the part
    also holds :data:`LANGCELL_COLUMNS`.
    """

    method: ClassVar[str] = "ce"
    input_columns: ClassVar[tuple[str, ...]] = TOKEN_COLUMNS

    def __init__(
        self,
        *,
        model: str,
        dictionary: str,
        variant: str,
        max_length: int | None,
        pooling: Any,
        max_tokens_per_batch: int,
        dtype: str,
        candidate_names: list[str] | None = None,
        candidate_texts: list[str] | None = None,
        text_max_length: int = 512,
        **kwargs: Any,
    ) -> None:
        from raypipe.embed.ce_model import CellEncoder

        super().__init__(**kwargs)
        if is_url(model):  # a checkpoint folder in a bucket: each node downloads it once
            model = str(local_copy(model))
        tok = _tokenizer(dictionary, variant, max_length)
        self.zero_shot: Any = None
        if candidate_names is not None:
            from raypipe.embed.langcell import LangCellModel, LangCellZeroShot

            lc = LangCellModel.load(
                model,
                tokenizer=tok,
                max_tokens_per_batch=max_tokens_per_batch,
                dtype=dtype,  # type: ignore[arg-type]
            )
            pairs = list(zip(candidate_names, candidate_texts or [], strict=True))
            self.zero_shot = LangCellZeroShot(lc, pairs, text_max_length=text_max_length)
            self.encoder = lc.cell
        else:
            self.encoder = CellEncoder(
                model,
                tokenizer=tok,
                pooling=pooling,
                max_tokens_per_batch=max_tokens_per_batch,
                dtype=dtype,  # type: ignore[arg-type]
            )

    def compute_row(self, batch: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray]:
        """Encode the shard's packed tokens."""
        cells = unpack_tokens(batch["ids"][i], batch["offsets"][i])
        emb = self.encoder.encode(cells)
        return emb, np.array([len(c) == 0 for c in cells], dtype=bool)

    def output_table(self, batch: dict[str, np.ndarray], i: int) -> tuple[Any, int]:
        """Embed the shard; with candidates, add LangCell's per-cell scores in the same pass."""
        if self.zero_shot is None:
            return super().output_table(batch, i)
        import pyarrow as pa

        from raypipe.core.outputs import embedding_table

        shard, start, stop = int(batch["shard"][i]), int(batch["start"][i]), int(batch["stop"][i])
        names = self.read_names(start, stop)
        res = self.zero_shot.score(unpack_tokens(batch["ids"][i], batch["offsets"][i]))
        meta = {
            **self.metadata,
            "method": self.method,
            "fingerprint": self.fingerprint,
            "langcell_candidates": json.dumps(self.zero_shot.names),
        }
        table = embedding_table(names, shard, start, res.embedding, res.empty, meta)
        k = self.zero_shot.k
        for col, values in zip(LANGCELL_COLUMNS, (res.sim, res.ctm), strict=True):
            flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
            table = table.append_column(col, pa.FixedSizeListArray.from_arrays(flat, k))
        return table, int(np.count_nonzero(res.empty))


def _atlas_ensembl_ids(
    atlas: AtlasInfo, genes: GeneSpace, dicts: Any
) -> tuple[list[str | None], str]:
    from raypipe.atlas.store import read_var
    from raypipe.embed.dictionaries import resolve_ensembl_ids

    var = read_var(atlas.path)
    col = next(
        (c for c in ("ensembl_id", "gene_ids", "gene_id", "feature_id") if c in var.columns), None
    )
    if col is not None:
        return resolve_ensembl_ids(list(var.index), list(var[col]))
    if any(e is not None for e in genes.resolution.ensembl):
        return list(genes.resolution.ensembl), "gene table (genes.id_table / text source)"
    return resolve_ensembl_ids(list(var.index), None, dicts.gene_name_id)


def build_ce(
    job: JobConfig,
    atlas: AtlasInfo,
    genes: GeneSpace,
    shards: list[Shard],
    *,
    candidate_texts: dict[str, str] | None = None,
) -> StagePlan:
    """Plan the CE method: check model, dictionary and gene coverage on the driver.

    Parameters
    ----------
    job, atlas, genes, shards
        As for every method builder.
    candidate_texts
        Candidate name → text, in candidate order: the ``langcell`` scorer is on, so the
        encode actors also compute LangCell's per-cell zero-shot scores (the model must be a
        LangCell checkpoint and ``embed.ce.variant`` ``langcell``).
    """
    from raypipe.embed.dictionaries import GeneformerDictionaries

    cfg = job.embed.ce
    model = _model(cfg)
    dicts = GeneformerDictionaries.load(cfg.dictionary)
    tok = _tokenizer(cfg.dictionary, cfg.variant, None)
    ens, how = _atlas_ensembl_ids(atlas, genes, dicts)
    plan = tok.plan(ens)
    if plan.coverage < cfg.min_coverage:
        raise InputError(
            f"only {plan.coverage:.1%} of the atlas's {plan.n_vars:,} genes are in the "
            f"{dicts.name} token dictionary (Ensembl ids from {how}); required "
            f"{cfg.min_coverage:.0%}; e.g. unknown: {', '.join(plan.unknown_examples)}",
            fix="give Ensembl ids (var['ensembl_id'] or embed.ce.gene_name_id), check the species, "
            "or lower embed.ce.min_coverage",
        )
    parts: list[object] = ["ce", config_hash(cfg), atlas.var_hash, atlas.x_kind, dicts.name]
    langcell: dict[str, Any] = {}
    if candidate_texts is not None:
        langcell = _langcell_kwargs(job, model, candidate_texts)
        parts.append(stage_hash("langcell", json.dumps(langcell, sort_keys=True)))
    fingerprint = stage_hash(*parts)
    common = {"dictionary": cfg.dictionary, "variant": cfg.variant, "max_length": None}
    tokenize = StageSpec(
        CETokenize,
        {**common, "atlas_path": atlas.path, "ensembl_ids": ens, "x_kind": atlas.x_kind},
        job.ray.actors,
        job.ray.actor_cpus,
    )
    encode = StageSpec(
        CEEncode,
        {
            **common,
            "model": cfg.model,
            "pooling": cfg.pooling,
            "max_tokens_per_batch": cfg.max_tokens_per_batch,
            "dtype": cfg.dtype,
            **langcell,
            "atlas_path": atlas.path,
            "out_dir": job.output_dir,
            "fingerprint": fingerprint,
            "metadata": {"model": cfg.model, "variant": cfg.variant, "dictionary": dicts.name},
        },
        cfg.actors,
        job.ray.actor_cpus,
        cfg.num_gpus,
    )
    notes = {
        "model": cfg.model,
        "variant": cfg.variant,
        "dictionary": dicts.name,
        "gene_coverage": plan.coverage,
        "ensembl_ids_from": how,
        "tokenizer_path": "counts"
        if atlas.x_kind == "counts"
        else "lognorm (expm1 before ranking)",
    }
    if langcell:
        notes["langcell_candidates"] = langcell["candidate_names"]
    return StagePlan([tokenize, encode], fingerprint, notes=notes)


def check_checkpoint(job: JobConfig) -> None:
    """Load the CE checkpoint on the driver, as the encode actors will, before any write.

    A bad checkpoint (a missing part, a head that does not fit, weights that do not load)
    then stops the run with one error naming the file, before the atlas, gene texts and
    annotations are written, instead of surfacing as Ray actor deaths later. The model is
    loaded on the CPU in float32 and freed at once.
    """
    from raypipe.embed.ce_model import CellEncoder

    cfg = job.embed.ce
    model = _model(cfg)
    model = str(local_copy(model)) if is_url(model) else model
    ann = job.annotate
    if ann.enabled and ann.scorers.get("langcell", 0) > 0:
        from raypipe.embed.langcell import LangCellModel

        _check_langcell(job, model)
        LangCellModel.load(model, dtype="float32", device="cpu")
    else:
        CellEncoder(model, pooling=cfg.pooling, dtype="float32", device="cpu")


def _model(cfg: Any) -> str:
    """Return ``embed.ce.model``, or fail naming the setting when it is missing."""
    if not cfg.model:
        raise ConfigError(
            "embed.methods has ce but embed.ce.model is not set",
            fix="set embed.ce.model to a Geneformer/LangCell checkpoint folder or hub id "
            "(for a smoke test: raypipe ce init-random --out models/ce-random)",
        )
    if Path(cfg.model).exists() is False and "/" not in cfg.model:
        raise InputError(
            f"embed.ce.model {cfg.model} does not exist", fix="give the checkpoint folder"
        )
    return str(cfg.model)


def _check_langcell(job: JobConfig, model: str) -> None:
    """Check the LangCell setup on the driver (settings and files; no weights are read)."""
    from raypipe.embed.langcell import check_langcell_layout

    cfg = job.embed.ce
    if cfg.variant != "langcell":
        raise ConfigError(
            f"the langcell scorer needs embed.ce.variant langcell (got {cfg.variant})",
            fix="set embed.ce.variant: langcell and embed.ce.model to a LangCell checkpoint",
        )
    if cfg.pooling not in (None, "cls"):
        raise ConfigError(
            f"the langcell scorer reads LangCell's <cls> embedding but embed.ce.pooling is {cfg.pooling}",
            fix="leave embed.ce.pooling unset (or cls) for LangCell",
        )
    check_langcell_layout(model)


def _langcell_kwargs(job: JobConfig, model: str, texts: dict[str, str]) -> dict[str, Any]:
    """Check the LangCell setup on the driver (files only) and return the encode kwargs."""
    if not texts:
        raise ConfigError("the langcell scorer got no candidate texts")
    _check_langcell(job, model)
    return {
        "candidate_names": [str(n) for n in texts],
        "candidate_texts": [str(t) for t in texts.values()],
        "text_max_length": job.annotate.langcell_text_max_length,
    }
