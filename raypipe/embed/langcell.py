"""LangCell zero-shot cell-type scores: cell encoder × text encoder, re-ranked by cell–text matching.

A LangCell checkpoint folder, in LangCell's own layout::

    cell_bert/        config.json + weights of the cell BERT (no pooler)
    cell_proj.bin     nn.Linear(cell hidden, 256) state dict
    text_bert/        config.json (add_cross_attention, encoder_width) + weights of the text BERT
    text_proj.bin     nn.Linear(text hidden, 256) state dict
    ctm_head.bin      nn.Linear(text hidden, 2) state dict (cell–text matching head)
    text_tokenizer/   the BERT WordPiece tokenizer of the text encoder

(each ``.bin`` may also be ``.pt`` or ``.safetensors``; ``.bin``/``.pt`` load only through
``torch.load(weights_only=True)``, and only as a plain name → tensor mapping).

For cells ``c`` and candidate texts ``t`` (LangCell's zero-shot notebook, exactly):

* ``cell_emb = normalize(cell_proj(h_cell[<cls>]))`` (:class:`~raypipe.embed.ce_model.CellEncoder`);
* ``text_emb = normalize(text_proj(h_text[[CLS]]))``, each text encoded alone in ``text`` mode;
* ``sim = softmax_t(cell_emb · text_emb / 0.05)``;
* ``match[c, t] = softmax(ctm_head(h_mm[[CLS]]))[1]`` where ``h_mm`` is the text encoder in
  ``multimodal`` mode cross-attending to cell ``c``'s hidden states (all positions, padded ones
  masked); ``ctm = softmax_t(match)`` (a softmax over texts of probabilities);
* ``score = α·sim + (1−α)·ctm`` (LangCell: α = 0.1), label = ``argmax_t score``.

The matching head runs on the padded batches of the cell encoder, inside its forward pass,
batched across cells and candidates (:mod:`raypipe.embed.langcell_text`), so cell hidden states
never leave the device. ``torch``/``transformers`` are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from raypipe.embed.weights import WEIGHT_SUFFIXES, find_weight_file
from raypipe.errors import InputError

__all__ = [
    "TEMPERATURE",
    "LangCellModel",
    "LangCellZeroShot",
    "ZeroShotScores",
    "check_langcell_layout",
    "frame_cells",
    "mix_scores",
    "softmax",
]

#: LangCell's temperature of the cell–text similarity
TEMPERATURE = 0.05
_HEADS = ("cell_proj", "text_proj", "ctm_head")
_FOLDERS = ("cell_bert", "text_bert", "text_tokenizer")


def check_langcell_layout(folder: str | Path) -> dict[str, Path]:
    """Check a LangCell checkpoint folder has every part (cheap: no file is read).

    Returns
    -------
    dict
        Part name (``cell_bert``, ``cell_proj``, ``text_bert``, ``text_proj``, ``ctm_head``,
        ``text_tokenizer``) → path.

    Raises
    ------
    InputError
        Naming every missing part (and the folder).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(
            f"LangCell checkpoint folder {root} does not exist",
            fix="point at LangCell's ckpt folder (cell_bert/, text_bert/, *.bin, text_tokenizer/)",
        )
    parts: dict[str, Path] = {}
    missing: list[str] = []
    for name in _FOLDERS:
        if (root / name).is_dir():
            parts[name] = root / name
        else:
            missing.append(f"{name}/")
    for name in _HEADS:
        found = find_weight_file(root, name)
        if found is None:
            missing.append(f"{name}.bin")
        else:
            parts[name] = found
    if "text_tokenizer" in parts and not (parts["text_tokenizer"] / "vocab.txt").is_file():
        missing.append("text_tokenizer/vocab.txt")
    if missing:
        raise InputError(
            f"LangCell checkpoint {root} lacks {', '.join(missing)}",
            fix="copy the whole LangCell ckpt folder (cell_bert/, cell_proj.bin, text_bert/, "
            f"text_proj.bin, ctm_head.bin, text_tokenizer/; heads may end in {'/'.join(WEIGHT_SUFFIXES)})",
        )
    return parts


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float64 internally, float32 out)."""
    z = np.asarray(x, dtype=np.float64)
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return (z / z.sum(axis=axis, keepdims=True)).astype(np.float32)


def mix_scores(sim: np.ndarray, ctm: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha · sim + (1 − alpha) · ctm`` (LangCell's final zero-shot score), float32."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"LangCell alpha must be in [0, 1] (got {alpha})")
    return (
        alpha * np.asarray(sim, np.float32) + (1.0 - alpha) * np.asarray(ctm, np.float32)
    ).astype(np.float32)


def frame_cells(cells: Sequence[np.ndarray], *, cls_id: int, max_length: int) -> list[np.ndarray]:
    """LangCell's framing of Geneformer gene ids: ``([<cls>] + ids)[:max_length]``.

    A cell that already starts with ``<cls>`` (``raypipe tokenize --variant langcell``) is
    kept as it is (truncated); a cell without gene ids stays empty (no embedding, no scores).
    """
    out = []
    for c in cells:
        ids = np.asarray(c, dtype=np.int64)
        if ids.size == 0:
            out.append(ids)
            continue
        if ids[0] != cls_id:
            ids = np.concatenate([np.array([cls_id], np.int64), ids])
        out.append(ids[:max_length])
    return out


@dataclass(frozen=True)
class ZeroShotScores:
    """Per-cell LangCell outputs; rows of empty cells are zero (embedding) and NaN (scores).

    Attributes
    ----------
    embedding
        ``(n, d)`` L2-normalised cell embeddings.
    sim, ctm
        ``(n, k)`` ``softmax_t`` of the similarity and of the match probability.
    match
        ``(n, k)`` match probability ``softmax(ctm_head)[1]`` before the softmax over texts.
    empty
        ``(n,)`` cells without tokens.
    """

    embedding: np.ndarray
    sim: np.ndarray
    ctm: np.ndarray
    match: np.ndarray
    empty: np.ndarray

    def score(self, alpha: float) -> np.ndarray:
        """``alpha · sim + (1 − alpha) · ctm``."""
        return mix_scores(self.sim, self.ctm, alpha)


class LangCellModel:
    """The parts of a LangCell checkpoint, on one device.

    Use :meth:`load` for a checkpoint folder, or build it from in-memory modules (random
    weights for a benchmark).

    Parameters
    ----------
    cell
        The :class:`~raypipe.embed.ce_model.CellEncoder` (LangCell layout: ``<cls>`` pooling
        + ``cell_proj``).
    text
        The :class:`~raypipe.embed.langcell_text.TextEncoder`.
    text_proj, ctm_head
        ``torch.nn.Linear`` heads.
    tokenizer
        The text tokenizer (a transformers ``BertTokenizer``), or None when text ids are given
        directly.
    """

    def __init__(
        self, cell: Any, text: Any, text_proj: Any, ctm_head: Any, tokenizer: Any = None
    ) -> None:
        if cell.proj is None or cell.pooling != "cls":
            raise InputError(
                f"{cell.model_path} is not a LangCell cell encoder (needs cell_proj and <cls> pooling)"
            )
        if text.encoder_width != cell.bert.config.hidden_size:
            raise InputError(
                f"LangCell text encoder cross-attends to width {text.encoder_width} but the cell "
                f"encoder's hidden size is {cell.bert.config.hidden_size}",
                fix="use text_bert/ and cell_bert/ of the same LangCell checkpoint",
            )
        self.cell, self.tokenizer = cell, tokenizer
        self.text = text.to(cell.device, dtype=cell.dtype).eval()
        self.text_proj = text_proj.to(cell.device, dtype=cell.dtype).eval()
        self.ctm_head = ctm_head.to(cell.device, dtype=cell.dtype).eval()

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        tokenizer: Any = None,
        max_tokens_per_batch: int = 65_536,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        device: str | None = None,
    ) -> LangCellModel:
        """Load a LangCell checkpoint folder (layout in the module docstring).

        Parameters
        ----------
        folder
            The checkpoint folder.
        tokenizer
            The :class:`~raypipe.embed.tokenizer.RankValueTokenizer` (variant ``langcell``)
            whose cells will be scored; None = the checkpoint's own framing.
        max_tokens_per_batch, dtype, device
            As in :class:`~raypipe.embed.ce_model.CellEncoder` (bf16 on CUDA, fp32 on CPU).

        Raises
        ------
        InputError
            A missing part (named), a head that is not a plain state dict, weights that do
            not fit their config, or a text tokenizer whose vocabulary does not fit the text
            encoder.
        """
        from raypipe.embed.ce_model import CellEncoder, load_linear
        from raypipe.embed.langcell_text import load_text_encoder

        parts = check_langcell_layout(folder)
        cell = CellEncoder(
            folder,
            tokenizer=tokenizer,
            pooling="cls",
            max_tokens_per_batch=max_tokens_per_batch,
            dtype=dtype,
            device=device,
        )
        text = load_text_encoder(parts["text_bert"], dtype=cell.dtype, device=cell.device)
        text_proj = load_linear(parts["text_proj"], "LangCell text_proj")
        ctm_head = load_linear(parts["ctm_head"], "LangCell ctm_head")
        hidden = text.config.hidden_size
        for name, lin, out in (("text_proj", text_proj, cell.dim), ("ctm_head", ctm_head, 2)):
            if lin.in_features != hidden or lin.out_features != out:
                raise InputError(
                    f"LangCell {name} {parts[name]} maps {lin.in_features} → {lin.out_features} "
                    f"but needs {hidden} → {out} (text hidden size → "
                    f"{'cell embedding size' if name == 'text_proj' else 'match / no match'})",
                    fix="use the heads saved with this checkpoint",
                )
        text_tok = _load_text_tokenizer(parts["text_tokenizer"], text, parts["text_bert"])
        return cls(cell, text, text_proj, ctm_head, text_tok)


def _load_text_tokenizer(folder: Path, text: Any, text_dir: Path) -> Any:
    from transformers import BertTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = BertTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for bad tokenizer folders
        raise InputError(
            f"cannot load the LangCell text tokenizer {folder} ({type(e).__name__}: {e})",
            fix="text_tokenizer/ needs the vocab.txt (+ tokenizer config) saved with the checkpoint",
        ) from e
    finally:
        hf_logging.set_verbosity(level)
    n_ids = max(tok.get_vocab().values()) + 1
    vocab = int(text.config.vocab_size)
    if n_ids > vocab:
        raise InputError(
            f"LangCell text tokenizer {folder} emits token ids up to {n_ids - 1} ({len(tok):,} "
            f"tokens) but the text encoder {text_dir} has only {vocab:,} embeddings",
            fix="use the text_tokenizer/ saved with this checkpoint (LangCell: PubMedBERT's "
            "vocabulary + [DEC] + [ENC])",
        )
    return tok


class LangCellZeroShot:
    """LangCell's zero-shot scores of cells against fixed candidate texts.

    The candidate texts are tokenised and embedded once (``text`` mode, each text alone, as
    LangCell does); :meth:`score` embeds cells and runs the matching head in the same pass.

    Parameters
    ----------
    model
        The loaded checkpoint.
    texts
        Candidate name → text, in candidate order (or ``(name, text)`` pairs).
    text_max_length
        Tokens per text (truncation), at most the text encoder's positions (LangCell: 512).
    text_ids
        Instead of texts: ``(name, token ids)`` pairs (random-weight benchmarks, no tokenizer).
    max_pairs_tokens
        Budget of one multimodal pass: ``cells × k × longest text`` tokens (default: the cell
        encoder's ``max_tokens_per_batch``).
    """

    def __init__(
        self,
        model: LangCellModel,
        texts: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        *,
        text_max_length: int = 512,
        text_ids: Sequence[tuple[str, Sequence[int]]] | None = None,
        max_pairs_tokens: int | None = None,
    ) -> None:
        import torch

        self.model = model
        positions = int(model.text.config.max_position_embeddings)
        if text_max_length > positions:
            raise InputError(
                f"LangCell text max length {text_max_length} exceeds the text encoder's "
                f"{positions} positions",
                fix=f"set it to at most {positions}",
            )
        if text_ids is None:
            pairs = list(texts.items() if isinstance(texts, Mapping) else texts or [])
            if model.tokenizer is None:
                raise InputError("LangCell zero-shot got texts but the model has no text tokenizer")
            ids = [
                model.tokenizer(str(t), truncation=True, max_length=text_max_length)["input_ids"]
                for _, t in pairs
            ]
        else:
            pairs = [(n, "") for n, _ in text_ids]
            ids = [list(map(int, i))[:text_max_length] for _, i in text_ids]
        if not pairs:
            raise InputError("LangCell zero-shot needs at least one candidate text")
        names = [str(n) for n, _ in pairs]
        if len(set(names)) != len(names):
            raise InputError(f"LangCell candidate names repeat: {names}")
        self.names = names
        k, width = len(ids), max(len(i) for i in ids)
        tid = np.zeros((k, width), dtype=np.int64)
        tmask = np.zeros((k, width), dtype=np.int64)
        for j, row in enumerate(ids):
            tid[j, : len(row)], tmask[j, : len(row)] = row, 1
        dev = model.cell.device
        self.text_ids = torch.from_numpy(tid).to(dev)
        self.text_mask = torch.from_numpy(tmask).to(dev)
        self.max_pairs_tokens = int(max_pairs_tokens or model.cell.max_tokens_per_batch)
        with torch.inference_mode():  # each text alone, unpadded, as LangCell embeds them
            embs = []
            for row in ids:
                one = torch.tensor([row], dtype=torch.long, device=dev)
                h = model.text(one, torch.ones_like(one))[:, 0]
                embs.append(torch.nn.functional.normalize(model.text_proj(h).float(), dim=-1))
            self.text_emb = torch.cat(embs).cpu().numpy()
        self._pending: list[tuple[np.ndarray, Any]] = []

    @property
    def k(self) -> int:
        """Number of candidates."""
        return len(self.names)

    def score(self, cells: Sequence[np.ndarray]) -> ZeroShotScores:
        """Embed framed cells and score them against every candidate.

        Parameters
        ----------
        cells
            Token ids per cell, framed for the checkpoint (``<cls>`` first: see
            :func:`frame_cells`); zero-length cells are empty.
        """
        import torch

        n = len(cells)
        self._pending = []
        emb = self.model.cell.encode(cells, on_batch=self._match_batch)
        empty = np.asarray(self.model.cell.last_empty, dtype=bool)
        match = np.full((n, self.k), np.nan, dtype=np.float32)
        if self._pending:  # one device → host copy for the whole call
            rows = np.concatenate([i for i, _ in self._pending])
            match[rows] = torch.cat([p for _, p in self._pending]).cpu().numpy()
        self._pending = []
        sim = softmax(emb.astype(np.float64) @ self.text_emb.T.astype(np.float64) / TEMPERATURE)
        ctm = softmax(match.astype(np.float64))
        sim[empty], ctm[empty] = np.nan, np.nan
        return ZeroShotScores(embedding=emb, sim=sim, ctm=ctm, match=match, empty=empty)

    def _match_batch(self, idx: np.ndarray, hidden: Any, mask: Any) -> None:
        """Run the matching head on one padded cell batch: every (cell, candidate) pair, chunked."""
        import torch

        k, width = self.text_ids.shape
        per = max(1, self.max_pairs_tokens // max(1, k * width))  # cells per chunk
        m = self.model
        for lo in range(0, idx.size, per):
            hi = min(lo + per, idx.size)
            c = hi - lo
            ids = self.text_ids.repeat(c, 1)
            tmask = self.text_mask.repeat(c, 1)
            h = m.text(ids, tmask, cell_states=hidden[lo:hi], cell_mask=mask[lo:hi])[:, 0]
            prob = torch.softmax(m.ctm_head(h).float(), dim=-1)[:, 1]
            self._pending.append((idx[lo:hi], prob.reshape(c, k)))
