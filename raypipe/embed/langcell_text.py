"""LangCell's text encoder, assembled from transformers' BERT building blocks.

LangCell's text side is a BERT (PubMedBERT-base in the release) that differs from
``transformers.BertModel`` in two ways:

* its embeddings have **no token-type table**: ``LayerNorm(word[ids] + position[0..T-1])``
  (the tokenizer's ``token_type_ids`` are ignored);
* **every** layer carries a cross-attention to the cell encoder's hidden states, and
  self-attention stays bidirectional (transformers ties cross-attention to a causal decoder).

Modes: ``text`` runs each layer as self-attention → FFN (the cross-attention weights unused);
``multimodal`` runs self-attention → cross-attention (query = the self-attention output;
key/value = linear maps of the cell states, of width ``encoder_width``; padded cell positions
masked) → FFN. Both use transformers' ``BertAttention`` (its ``BertSelfOutput`` does dense +
residual + LayerNorm), ``BertIntermediate`` and ``BertOutput``.

Batching the multimodal pass: cross-attention never mixes query positions, so the ``k``
candidate texts of one cell are laid side by side as one query sequence ``(C, k·T)`` against
that cell's ``L`` keys: the cell's keys/values are computed once per cell and layer, never
copied per candidate. Text self-attention runs per (cell, candidate) as ``(C·k, T)``, with
padded text positions masked.

This module imports ``torch`` and ``transformers`` at import time: import it lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

from raypipe.embed.weights import find_weight_file, load_state_dict_file
from raypipe.errors import InputError

__all__ = ["TextEncoder", "additive_mask", "load_text_encoder", "text_config"]

#: checkpoint keys LangCell's text BERT may carry that this encoder does not use
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids", "embeddings.token_type_")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(b, s)`` 1/0 mask → ``(b, 1, 1, s)`` additive mask: 0 to keep, ``finfo.min`` to drop."""
    keep = mask.to(torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


class _TextEmbeddings(nn.Module):
    """``LayerNorm(word[ids] + position[0..T-1])``: no token-type table."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _TextLayer(nn.Module):
    def __init__(self, cfg: BertConfig, encoder_width: int, index: int) -> None:
        super().__init__()
        self.attention = BertAttention(cfg, is_causal=False, layer_idx=index)
        self.crossattention = BertAttention(
            cfg, is_causal=False, layer_idx=index, is_cross_attention=True
        )
        inner = self.crossattention.self.all_head_size
        self.crossattention.self.key = nn.Linear(encoder_width, inner)
        self.crossattention.self.value = nn.Linear(encoder_width, inner)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(
        self,
        h: torch.Tensor,
        mask: torch.Tensor,
        cell: torch.Tensor | None,
        cell_mask: torch.Tensor | None,
        k: int,
    ) -> torch.Tensor:
        a = self.attention(h, mask)[0]
        if cell is not None:
            n, t, d = a.shape
            q = a.reshape(n // k, k * t, d)  # the k texts of one cell share its keys
            a = self.crossattention(
                q, encoder_hidden_states=cell, encoder_attention_mask=cell_mask
            )[0]
            a = a.reshape(n, t, d)
        out: torch.Tensor = self.output(self.intermediate(a), a)
        return out


class _Layers(nn.Module):
    def __init__(self, cfg: BertConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            _TextLayer(cfg, encoder_width, i) for i in range(cfg.num_hidden_layers)
        )


class TextEncoder(nn.Module):
    """LangCell's text BERT (``text`` and ``multimodal`` modes; module docstring).

    Parameters
    ----------
    cfg
        A ``BertConfig`` (``vocab_size``, ``hidden_size``, layers, heads, ``intermediate_size``,
        ``max_position_embeddings``, ``hidden_act``, ``layer_norm_eps``); its
        ``_attn_implementation`` picks eager or SDPA attention.
    encoder_width
        Hidden size of the cell encoder whose states the cross-attention reads.
    """

    def __init__(self, cfg: BertConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = cfg
        self.encoder_width = int(encoder_width)
        self.embeddings = _TextEmbeddings(cfg)
        self.encoder = _Layers(cfg, self.encoder_width)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cell_states: torch.Tensor | None = None,
        cell_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``(n, T, hidden)`` of the texts.

        Parameters
        ----------
        ids, mask
            ``(n, T)`` text token ids and 1/0 mask (padded positions are never attended to).
        cell_states, cell_mask
            ``multimodal`` mode: ``(C, L, encoder_width)`` cell hidden states and their
            ``(C, L)`` mask, with ``n = C·k``: rows ``c·k .. c·k + k - 1`` of ``ids`` are the
            ``k`` texts read against cell ``c``. ``None``: ``text`` mode.
        """
        h = self.embeddings(ids)
        dtype = h.dtype
        self_mask = additive_mask(mask, dtype)
        k, cross_mask = 1, None
        if cell_states is not None:
            if cell_mask is None or ids.shape[0] % cell_states.shape[0]:
                raise InputError(
                    f"multimodal pass: {ids.shape[0]} texts for {cell_states.shape[0]} cells "
                    "(need k texts per cell and the cells' mask)"
                )
            k = ids.shape[0] // cell_states.shape[0]
            cross_mask = additive_mask(cell_mask, dtype)
            cell_states = cell_states.to(dtype)
        for layer in self.encoder.layer:
            h = layer(h, self_mask, cell_states, cross_mask, k)
        return h


def text_config(raw: dict[str, Any], attn_implementation: str = "sdpa") -> BertConfig:
    """Build a ``BertConfig`` for :class:`TextEncoder` from a ``config.json`` mapping."""
    data = {k: v for k, v in raw.items() if k not in ("architectures", "encoder_width")}
    cfg = BertConfig(**data)
    cfg._attn_implementation = attn_implementation
    return cfg


def load_text_encoder(
    folder: str | Path, *, dtype: torch.dtype, device: torch.device | str
) -> TextEncoder:
    """Load LangCell's ``text_bert/`` folder (``config.json`` + weights) as a :class:`TextEncoder`.

    Weights: ``model.safetensors`` or ``pytorch_model.bin`` (read with
    ``torch.load(weights_only=True)``). Unused keys (the tanh pooler, ``position_ids``) are
    dropped; a missing or misshapen parameter is an error naming it.

    Raises
    ------
    InputError
        Missing/unreadable config or weights, or weights that do not fit the config.
    """
    path = Path(folder)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(
            f"cannot read LangCell text encoder config {path / 'config.json'}: {e}",
            fix="text_bert/ needs config.json as LangCell saves it",
        ) from e
    weights = find_weight_file(path, "model") or find_weight_file(path, "pytorch_model")
    if weights is None:
        raise InputError(
            f"LangCell text encoder {path} has no model.safetensors / pytorch_model.bin",
            fix="copy text_bert/ of the LangCell checkpoint whole",
        )
    state = load_state_dict_file(weights, what="LangCell text_bert")
    if all(k.startswith("bert.") for k in state):
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    cfg = text_config(raw)
    with torch.device("meta"):
        model = TextEncoder(cfg, int(raw.get("encoder_width", cfg.hidden_size)))
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        )
        raise InputError(
            f"LangCell text encoder weights {weights} do not fit {path / 'config.json'} ({detail})",
            fix="use the text_bert/ folder of one LangCell checkpoint (config and weights together)",
        )
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()
