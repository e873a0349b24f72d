"""The cell encoder (CE): a Geneformer BERT, or LangCell's cell BERT + projection.

Checkpoint layouts understood by :class:`CellEncoder`:

* **Geneformer** (V1 or V2): a Hugging Face folder or hub id holding a ``BertForMaskedLM``
  (or ``BertModel``) checkpoint: ``config.json`` + ``model.safetensors``/``pytorch_model.bin``.
  Cell embedding = mean of the last hidden states over the gene tokens (padding and the
  ``<cls>``/``<eos>`` tokens excluded), as Geneformer's embedding extractor does.
* **LangCell**: a folder with ``cell_bert/`` (a Hugging Face ``BertModel``) and
  ``cell_proj.bin`` (or ``.pt``/``.safetensors``: the ``weight``/``bias`` of a
  ``Linear(hidden, 256)``), as LangCell's release lays out its ``ckpt/`` folder.
  Cell embedding = ``normalize(proj(h[<cls>]))``.

``torch`` and ``transformers`` are imported inside the functions that need them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from raypipe.embed.tokenizer import RankValueTokenizer
from raypipe.embed.weights import WEIGHT_SUFFIXES, find_weight_file, load_state_dict_file
from raypipe.errors import ConfigError, InputError

__all__ = ["BatchHook", "CellEncoder", "bucket_batches", "build_random_encoder", "load_linear"]


Pooling = Literal["cls", "mean"]
#: ``on_batch(indices, last_hidden, mask)`` of :meth:`CellEncoder.encode`
BatchHook = Callable[[np.ndarray, Any, Any], None]
_PROJ_NAMES = tuple(f"cell_proj{s}" for s in WEIGHT_SUFFIXES)


def bucket_batches(
    lengths: Sequence[int] | np.ndarray, max_tokens_per_batch: int
) -> list[np.ndarray]:
    """Group cells into padded batches of similar length.

    Cells are sorted by length (longest first); a batch grows while
    ``batch_size * longest_in_batch <= max_tokens_per_batch`` (a cell longer than the budget
    gets a batch of its own). Zero-length cells are left out.

    Parameters
    ----------
    lengths
        Token count of each cell.
    max_tokens_per_batch
        Padded-token budget of one batch.

    Returns
    -------
    list of numpy.ndarray
        Input indices of each batch.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    order = order[lens[order] > 0]
    batches: list[np.ndarray] = []
    i = 0
    while i < order.size:
        longest = int(lens[order[i]])
        size = max(1, max_tokens_per_batch // longest)
        batches.append(order[i : i + size])
        i += size
    return batches


def _find_proj(folder: Path) -> Path | None:
    return find_weight_file(folder, "cell_proj")


def load_linear(path: Path, what: str) -> Any:
    """Build a ``torch.nn.Linear`` from a plain ``weight``/``bias`` state dict (never a full unpickle)."""
    import torch

    state = load_state_dict_file(path, what=what)
    weight = state.get("weight")
    extra = sorted(set(state) - {"weight", "bias"})
    if weight is None or weight.ndim != 2 or extra:
        raise InputError(
            f"{what} file {path} holds {sorted(state)}, not the weight/bias of a torch.nn.Linear",
            fix="it must be torch.save(nn.Linear(...).state_dict()) as LangCell saves its heads",
        )
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    try:
        lin.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{what} file {path} does not fit a Linear: {e}") from e
    return lin


class CellEncoder:
    """Embed tokenised cells with a Geneformer or LangCell cell encoder.

    Parameters
    ----------
    model
        Checkpoint folder or hub id (layouts in the module docstring).
    tokenizer
        The tokenizer whose output will be encoded (gives variant, pad id, specials, length).
        Without one (cells tokenised elsewhere, e.g. ``raypipe ce score``) the checkpoint says:
        pad = the config's ``pad_token_id``, LangCell's ``<cls>`` = ``vocab_size - 1`` (LangCell
        appends it to Geneformer's V1 dictionary), length = ``max_position_embeddings``.
    pooling
        ``cls`` (LangCell default) or ``mean`` over gene tokens (Geneformer default).
    max_tokens_per_batch
        Padded-token budget per forward pass (``batch_size * longest``).
    dtype
        ``auto`` = float32 on CPU, bfloat16 (else float16) on CUDA.
    device
        torch device (default: ``cuda`` when available, else ``cpu``).
    normalize
        L2-normalise the embeddings (always true for LangCell, whose space is cosine).
    strict_vocab
        Require the model's vocabulary to equal the tokenizer's (else only to cover it).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: RankValueTokenizer | None = None,
        pooling: Pooling | None = None,
        max_tokens_per_batch: int = 65_536,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        device: str | None = None,
        normalize: bool = True,
        strict_vocab: bool = True,
    ) -> None:
        import torch

        device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_t = _resolve_dtype(dtype, device_t)
        bert, proj = _load_model(model, dtype_t)
        self._setup(
            bert,
            proj,
            tokenizer=tokenizer,
            pooling=pooling,
            max_tokens_per_batch=max_tokens_per_batch,
            device=device_t,
            dtype=dtype_t,
            normalize=normalize,
            strict_vocab=strict_vocab,
            name=str(model),
        )

    @classmethod
    def from_modules(
        cls,
        bert: Any,
        proj: Any = None,
        *,
        tokenizer: RankValueTokenizer | None = None,
        pooling: Pooling | None = None,
        max_tokens_per_batch: int = 65_536,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        device: str | None = None,
        normalize: bool = True,
    ) -> CellEncoder:
        """Wrap an in-memory ``BertModel`` (+ projection), e.g. random weights for a benchmark."""
        import torch

        device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_t = _resolve_dtype(dtype, device_t)
        self = cls.__new__(cls)
        self._setup(
            bert.to(dtype=dtype_t),
            proj,
            tokenizer=tokenizer,
            pooling=pooling,
            max_tokens_per_batch=max_tokens_per_batch,
            device=device_t,
            dtype=dtype_t,
            normalize=normalize,
            strict_vocab=True,
            name=f"<in-memory {type(bert).__name__}>",
        )
        return self

    def _setup(
        self,
        bert: Any,
        proj: Any,
        *,
        tokenizer: RankValueTokenizer | None,
        pooling: Pooling | None,
        max_tokens_per_batch: int,
        device: Any,
        dtype: Any,
        normalize: bool,
        strict_vocab: bool,
        name: str,
    ) -> None:
        cfg = bert.config
        self.tokenizer = tokenizer
        if tokenizer is not None:
            variant, prefix = tokenizer.variant, tokenizer.prefix
            self.pad_id = int(tokenizer.pad_id)
            self.special_ids = frozenset(int(i) for i in tokenizer.special_ids)
            self.max_length = int(tokenizer.max_length)
        else:  # the checkpoint's own framing
            variant = "langcell" if proj is not None else "geneformer_v1"
            prefix = (int(cfg.vocab_size) - 1,) if proj is not None else ()
            self.pad_id = int(cfg.pad_token_id or 0)
            self.special_ids = frozenset(prefix)
            self.max_length = int(cfg.max_position_embeddings)
        self.cls_id: int | None = prefix[0] if prefix else None
        self.pooling: Pooling = pooling or ("cls" if variant == "langcell" else "mean")
        if self.pooling == "cls" and not prefix:
            raise ConfigError(
                f"pooling 'cls' needs a <cls> token but variant {variant} has none",
                fix="use pooling 'mean' for geneformer_v1",
            )
        if max_tokens_per_batch < 1:
            raise ConfigError(f"max_tokens_per_batch must be >= 1 (got {max_tokens_per_batch})")
        self.max_tokens_per_batch = int(max_tokens_per_batch)
        self.normalize = normalize
        self.device, self.dtype = device, dtype
        self.bert, self.proj = bert, proj
        self.bert.to(self.device).eval()
        if self.proj is not None:
            self.proj.to(self.device, dtype=self.dtype).eval()
        self.model_path = name
        if tokenizer is not None:
            need = tokenizer.vocab_size
            if cfg.vocab_size < need or (strict_vocab and cfg.vocab_size != need):
                raise InputError(
                    f"model {name} has vocab_size {cfg.vocab_size} but the {tokenizer.dicts.name} "
                    f"dictionary with variant {tokenizer.variant} needs {need} token ids",
                    fix="pair V1/LangCell checkpoints with dictionary V1 and V2 ones with V2",
                )
        if self.max_length > cfg.max_position_embeddings:
            raise InputError(
                f"max_length {self.max_length} exceeds model {name}'s "
                f"max_position_embeddings {cfg.max_position_embeddings}",
                fix=f"tokenize with max_length <= {cfg.max_position_embeddings}",
            )
        self.dim = int(self.proj.out_features if self.proj is not None else cfg.hidden_size)
        self.last_empty: np.ndarray | None = None

    def encode(
        self, token_lists: Sequence[np.ndarray], *, on_batch: BatchHook | None = None
    ) -> np.ndarray:
        """Embed cells given as token-id arrays (from :meth:`RankValueTokenizer.tokenize`).

        Parameters
        ----------
        token_lists
            One int array per cell; zero-length cells get a zero vector and are flagged in
            :attr:`last_empty`.
        on_batch
            Called once per padded batch, inside the same no-grad pass, with the batch's input
            indices (``(b,)`` numpy), last hidden states ``(b, width, hidden)`` and boolean
            attention mask ``(b, width)`` (torch, on the device): how LangCell's matching head
            reads the cell states without them leaving the encoder.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, dim)`` float32, in input order.
        """
        import torch

        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        out = np.zeros((len(token_lists), self.dim), dtype=np.float32)
        self.last_empty = lengths == 0
        if lengths.size and lengths.max() > self.bert.config.max_position_embeddings:
            i = int(lengths.argmax())
            raise InputError(
                f"cell {i} has {lengths[i]} tokens, more than the model's "
                f"{self.bert.config.max_position_embeddings} positions",
                fix="tokenize with the tokenizer given to CellEncoder",
            )
        batches = bucket_batches(lengths, self.max_tokens_per_batch)
        if not batches:
            return out
        # every padded batch built on the host, copied to the device at once; the results stay
        # there until the end, so the host enqueues batch b+1 while the device runs batch b
        widths = [int(lengths[idx[0]]) for idx in batches]
        sizes = [idx.size * w for idx, w in zip(batches, widths, strict=True)]
        host = np.full(sum(sizes), self.pad_id, dtype=np.int64)
        pos = 0
        for idx, w in zip(batches, widths, strict=True):
            for row, i in enumerate(idx):
                host[pos + row * w : pos + row * w + lengths[i]] = token_lists[i]
            pos += idx.size * w
        vocab = self.bert.config.vocab_size
        if host.max() >= vocab or host.min() < 0:
            raise InputError(
                f"token ids outside the model vocabulary (0..{vocab - 1})",
                fix="use the dictionary that matches the checkpoint",
            )
        flat = torch.from_numpy(host)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        order = np.concatenate(batches)
        lens_t = torch.from_numpy(lengths[order]).to(self.device, non_blocking=True)
        specials = torch.tensor(sorted(self.special_ids), dtype=torch.long, device=self.device)
        embs = []
        pos = row0 = 0
        with torch.inference_mode():
            for idx, w in zip(batches, widths, strict=True):
                ids_t = flat[pos : pos + idx.size * w].view(idx.size, w)
                pos += idx.size * w
                blen = lens_t[row0 : row0 + idx.size]
                row0 += idx.size
                mask = torch.arange(w, device=self.device)[None, :] < blen[:, None]
                full = bool(lengths[idx].min() == w)  # no padding: no mask (flash attention)
                hidden = self.bert(
                    input_ids=ids_t, attention_mask=None if full else mask.long()
                ).last_hidden_state
                embs.append(self._pool(hidden, ids_t, mask, specials))
                if on_batch is not None:
                    on_batch(idx, hidden, mask)
            got = torch.cat(embs).float().cpu().numpy()
        out[order] = got
        return out

    def _pool(self, hidden: Any, ids: Any, mask: Any, specials: Any) -> Any:
        import torch

        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            keep = mask & ~torch.isin(ids, specials) if specials.numel() else mask
            w = keep.to(hidden.dtype).unsqueeze(-1)
            emb = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
        if self.proj is not None:
            emb = self.proj(emb)
        if self.normalize or self.proj is not None:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb


def _resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _load_model(model: str | Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import BertModel

    path = Path(model)
    looks_local = path.exists() or str(model).startswith((".", "/", "~")) or "\\" in str(model)
    if looks_local and not path.is_dir():
        raise InputError(
            f"cell-encoder checkpoint folder {path} does not exist",
            fix="point embed.ce.model at a Geneformer HF folder or a LangCell ckpt folder",
        )
    bert_dir, proj = path, None
    if path.is_dir() and (path / "cell_bert").is_dir():  # LangCell layout
        bert_dir = path / "cell_bert"
        proj_path = _find_proj(path)
        if proj_path is None:
            raise InputError(
                f"LangCell checkpoint {path} has cell_bert/ but no {' / '.join(_PROJ_NAMES)}",
                fix="copy LangCell's cell_proj.bin next to cell_bert/",
            )
        proj = load_linear(proj_path, "LangCell cell_proj")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a Geneformer MLM checkpoint's unused head is expected
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(
            str(bert_dir) if looks_local else str(model),
            attn_implementation="sdpa",
            dtype=dtype,
            add_pooling_layer=False,
        )
    except Exception as e:  # transformers raises many types for bad checkpoints
        raise InputError(
            f"cannot load a BERT cell encoder from {bert_dir} ({type(e).__name__}: {e})",
            fix="the folder needs config.json and model.safetensors/pytorch_model.bin of a "
            "Geneformer (BertForMaskedLM/BertModel) checkpoint",
        ) from e
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    return bert, proj


def build_random_encoder(
    config_json_path: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    *,
    layout: Literal["geneformer", "langcell"] = "geneformer",
    num_hidden_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    proj_dim: int = 256,
) -> Path:
    """Save a randomly initialised cell encoder built from a real Geneformer config.

    For tests and benchmarks (no pretrained weights ship with raypipe). The architecture is
    the real one unless shrunk with the keyword options.

    Parameters
    ----------
    config_json_path
        A Geneformer ``config.json`` (e.g. ``config_Geneformer-V1-10M.json``).
    out_dir
        Folder to write (created).
    seed
        torch seed for the initial weights.
    layout
        ``geneformer`` (a ``BertForMaskedLM`` HF folder) or ``langcell`` (``cell_bert/`` +
        ``cell_proj.bin``; vocab grows by one for LangCell's ``<cls>`` unless given).
    num_hidden_layers, hidden_size, num_attention_heads, intermediate_size, vocab_size
        Overrides of the config values.
    proj_dim
        LangCell projection size.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    src = Path(config_json_path)
    try:
        raw = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read model config {src}: {e}") from e
    overrides = {
        "num_hidden_layers": num_hidden_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
    }
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if layout == "langcell" and vocab_size is None:
        raw["vocab_size"] = int(raw["vocab_size"]) + 1
    raw.pop("architectures", None)
    cfg = BertConfig(**raw)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "geneformer":
        model = BertForMaskedLM(cfg)
        model.save_pretrained(out)
        return out
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out / "cell_bert")
    proj = torch.nn.Linear(cfg.hidden_size, proj_dim)
    torch.save(proj.state_dict(), out / "cell_proj.bin")
    return out
