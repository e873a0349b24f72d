"""GPU benchmark: the cell encoder at four Geneformer sizes and LangCell's zero-shot path.

Random weights, built from configs carried here (values of ``../shared/data/geneformer/
config_*.json``; a test checks they agree); bf16 on CUDA (fp32 on CPU), SDPA attention,
length-bucketed batches under a padded-token budget — raypipe's own
:class:`~raypipe.embed.ce_model.CellEncoder` and :class:`~raypipe.embed.langcell.LangCellZeroShot`.
Cells: a tokens parquet written by ``raypipe tokenize`` (real lengths), and cells of full
length (the config's ``max_position_embeddings``: 2,048 or 4,096).

Needs only torch, transformers, numpy and pyarrow (+ the stdlib and raypipe modules that import
nothing else): no Ray, anndata, zarr, scipy, pydantic, scikit-learn or numba (a test runs it
with those unimportable), so it runs on a device image that has only those.

FLOPs are counted from the config, on real (unpadded) tokens, 2 FLOPs per multiply-add, matrix
products only (embeddings, LayerNorm, softmax and GELU left out). A cell of ``l`` tokens through
``N`` layers of hidden ``H`` and FFN ``I``::

    cell = N · (l · (8·H² + 4·H·I) + 4·l²·H)        # Q,K,V,O + FFN per token; Q·Kᵀ and A·V

LangCell's matching head adds, per cell of ``l`` tokens and ``k`` candidate texts of ``T``
tokens, through the text encoder's ``Nt`` layers (hidden ``Ht``, FFN ``It``, cell width ``W``)::

    match = Nt · (k · (T · (12·Ht² + 4·Ht·It) + 4·T²·Ht + 4·T·l·Ht) + 4·l·W·Ht)
            # self Q,K,V,O + cross Q,O + FFN per text token; self and cross attention;
            # cross K,V of the cell once per cell (shared by its k candidates)

Model FLOP utilisation = counted FLOPs / seconds / peak (H200 bf16 dense: 989 TFLOP/s unless
``--peak-tflops``). Run: ``python jobs/benchmark.py gpu --tokens TOKENS.parquet``;
``--device cpu --smoke`` runs tiny models on a few cells in seconds and prints the same table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LANGCELL_TEXT",
    "MODELS",
    "SMOKE",
    "cell_flops",
    "main",
    "match_flops",
    "random_bert",
]

#: Carried from ../shared/data/geneformer/config_*.json (the architecture keys only).
MODELS: dict[str, dict[str, Any]] = {
    "V1-10M": {
        "file": "config_Geneformer-V1-10M.json",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 2048,
        "vocab_size": 25426,
        "hidden_act": "relu",
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
    "gf-12L-30M": {
        "file": "config_gf-12L-30M-i2048.json",
        "hidden_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "intermediate_size": 1024,
        "max_position_embeddings": 2048,
        "vocab_size": 25426,
        "hidden_act": "relu",
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
    "V2-104M": {
        "file": "config_Geneformer-V2-104M.json",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 4096,
        "vocab_size": 20275,
        "hidden_act": "relu",
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
    "V2-316M": {
        "file": "config_root_V2-316M.json",
        "hidden_size": 1152,
        "num_hidden_layers": 18,
        "num_attention_heads": 18,
        "intermediate_size": 4608,
        "max_position_embeddings": 4096,
        "vocab_size": 20275,
        "hidden_act": "relu",
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    },
}
#: LangCell: cell encoder = gf-12L-30M + <cls> (vocab 25,427) + Linear(512, 256); text encoder
#: = BERT-base size (PubMedBERT) with a cross-attention in every layer; heads 768 → 256 and → 2.
LANGCELL_CELL = "gf-12L-30M"
LANGCELL_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "vocab_size": 30524,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
LANGCELL_PROJ = 256
#: --smoke: every model shrunk to this (and lengths to max_position_embeddings)
SMOKE: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
H200_BF16_DENSE_TFLOPS = 989.0
_ARCH_KEYS = tuple(k for k in MODELS["V1-10M"] if k != "file")


def cell_flops(lengths: np.ndarray, spec: dict[str, Any]) -> float:
    """Matrix-product FLOPs of the cell encoder on cells of ``lengths`` tokens (module docstring)."""
    lens = np.asarray(lengths, dtype=np.float64)
    h, i, n = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    return float(n * (lens.sum() * (8 * h * h + 4 * h * i) + 4 * h * (lens**2).sum()))


def match_flops(
    lengths: np.ndarray, k: int, text_len: int, text: dict[str, Any], cell_width: int
) -> float:
    """Matrix-product FLOPs of LangCell's matching head (module docstring)."""
    lens = np.asarray(lengths, dtype=np.float64)
    h, i, n, t = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text_len
    per_cell_text = k * (t * (12 * h * h + 4 * h * i) + 4 * t * t * h)
    return float(
        n * (lens.size * per_cell_text + (4 * k * t * h + 4 * cell_width * h) * lens.sum())
    )


@dataclass
class Row:
    """One measured line of the table."""

    model: str
    length: str
    cells: int
    seconds: float
    tokens: int
    flops: float
    peak_gib: float | None
    note: str = ""

    def as_dict(self, peak_tflops: float) -> dict[str, Any]:
        """Figures of the row (rates derived)."""
        tflops = self.flops / max(self.seconds, 1e-12) / 1e12
        return {
            "model": self.model,
            "length": self.length,
            "cells": self.cells,
            "seconds": self.seconds,
            "cells_per_s": self.cells / max(self.seconds, 1e-12),
            "tokens_per_s": self.tokens / max(self.seconds, 1e-12),
            "peak_gib": self.peak_gib,
            "tflops": tflops,
            "mfu": tflops / peak_tflops,
            "note": self.note,
        }


def _spec(name: str, smoke: bool) -> dict[str, Any]:
    spec = {k: v for k, v in MODELS[name].items() if k != "file"}
    return {**spec, **SMOKE} if smoke else spec


def random_bert(spec: dict[str, Any], device: Any, dtype: Any, vocab_extra: int = 0) -> Any:
    """Build a randomly initialised ``BertModel`` (SDPA attention, no pooler) on ``device``."""
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**{**spec, "vocab_size": spec["vocab_size"] + vocab_extra})
    cfg._attn_implementation = "sdpa"
    build: Any = BertModel
    with torch.device(device):
        model = build(cfg, add_pooling_layer=False)
    return model.to(dtype=dtype).eval()


def _read_tokens(path: Path, limit: int | None) -> list[np.ndarray]:
    import pyarrow.parquet as pq

    from raypipe.errors import InputError

    try:
        col = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    except Exception as e:  # pyarrow raises several types for a missing/bad file
        raise InputError(
            f"cannot read the tokens parquet {path}: {e}",
            fix="write it with `raypipe tokenize CELLS.h5ad --out bench_out/tokens_kang8k.parquet`",
        ) from e
    flat = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    off = col.offsets.to_numpy()
    cells = [flat[off[i] : off[i + 1]] for i in range(len(col)) if off[i + 1] > off[i]]
    if not cells:
        raise InputError(f"tokens parquet {path} holds no cell with tokens")
    return cells[:limit] if limit else cells


def _fold(cells: Sequence[np.ndarray], vocab: int, length: int, prefix: Sequence[int]) -> list:
    """Cells as a model of ``vocab`` ids reads them (random weights: only lengths matter)."""
    low = 4  # keep clear of <pad>/<mask>/<cls>/<eos>
    out = []
    for c in cells:
        ids = (np.asarray(c, np.int64) - low) % (vocab - low) + low
        out.append(np.concatenate([np.asarray(prefix, np.int64), ids])[:length])
    return out


class _Timer:
    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def _measure(
    run: Callable[[list[np.ndarray]], Any],
    pool: list[np.ndarray],
    *,
    chunk: int,
    seconds: float,
    flops: Callable[[np.ndarray], float],
    timer: _Timer,
) -> tuple[int, float, int, float, float | None]:
    """Run chunks of ``pool`` (cycling) until ``seconds`` have passed; one warm-up chunk first."""
    run(pool[: max(1, min(chunk, len(pool)) // 4)])  # warm-up (kernels, allocator)
    timer.sync()
    timer.reset_peak()
    n = tokens = 0
    total = 0.0
    pos = 0
    t0 = time.perf_counter()
    while True:
        part = [pool[(pos + j) % len(pool)] for j in range(chunk)]
        pos = (pos + chunk) % len(pool)
        run(part)
        lens = np.fromiter((c.size for c in part), np.int64, len(part))
        n, tokens, total = n + len(part), tokens + int(lens.sum()), total + flops(lens)
        timer.sync()
        if time.perf_counter() - t0 >= seconds:
            break
    return n, time.perf_counter() - t0, tokens, total, timer.peak_gib()


def _bench_ce(name: str, real: list, args: argparse.Namespace, timer: _Timer) -> list[Row]:
    from raypipe.embed.ce_model import CellEncoder

    spec = _spec(name, args.smoke)
    full_len = spec["max_position_embeddings"]
    v2 = spec["vocab_size"] != MODELS["V1-10M"]["vocab_size"]
    bert = random_bert(spec, args.device, args.torch_dtype)
    enc = CellEncoder.from_modules(
        bert, None, pooling="mean", max_tokens_per_batch=args.max_tokens, dtype=args.dtype,
        device=str(args.device),
    )  # fmt: skip
    rows = []
    if v2:  # V2 framing: <cls> + genes + <eos>
        body = _fold(real, spec["vocab_size"], full_len - 2, ())
        cells = [np.concatenate([[2], c, [3]]) for c in body]
    else:
        cells = _fold(real, spec["vocab_size"], full_len, ())
    rng = np.random.default_rng(0)
    per_batch = max(1, args.max_tokens // full_len)
    full = [rng.integers(4, spec["vocab_size"], full_len) for _ in range(per_batch * 4)]
    for label, pool, chunk in (
        ("real", cells, args.chunk),
        (str(full_len), full, per_batch * (1 if args.smoke else 16)),
    ):
        n, sec, tok, fl, peak = _measure(
            enc.encode, pool, chunk=min(chunk, len(pool) if label == "real" else chunk),
            seconds=args.seconds, flops=lambda lens: cell_flops(lens, spec), timer=timer,
        )  # fmt: skip
        note = "ids folded into V2 vocab, <cls>/<eos> added" if v2 and label == "real" else ""
        rows.append(Row(name, label, n, sec, tok, fl, peak, note))
    del enc, bert
    return rows


def _bench_langcell(real: list, args: argparse.Namespace, timer: _Timer) -> list[Row]:
    import torch

    from raypipe.embed.ce_model import CellEncoder
    from raypipe.embed.langcell import LangCellModel, LangCellZeroShot
    from raypipe.embed.langcell_text import TextEncoder, text_config

    cspec = _spec(LANGCELL_CELL, args.smoke)
    tspec = {**LANGCELL_TEXT, **({**SMOKE, "vocab_size": 1000} if args.smoke else {})}
    width, proj_dim = cspec["hidden_size"], LANGCELL_PROJ if not args.smoke else 16
    dev, dt = args.device, args.torch_dtype
    bert = random_bert(cspec, dev, dt, vocab_extra=1)
    with torch.device(dev):
        proj = torch.nn.Linear(width, proj_dim)
        text = TextEncoder(text_config(tspec), width)
        text_proj = torch.nn.Linear(tspec["hidden_size"], proj_dim)
        ctm = torch.nn.Linear(tspec["hidden_size"], 2)
    cell = CellEncoder.from_modules(
        bert, proj, pooling="cls", max_tokens_per_batch=args.max_tokens, dtype=args.dtype,
        device=str(dev),
    )  # fmt: skip
    model = LangCellModel(cell, text, text_proj, ctm)
    text_len = min(args.text_len, tspec["max_position_embeddings"])
    rng = np.random.default_rng(1)
    ids = [
        (f"c{j}", rng.integers(999, tspec["vocab_size"], text_len).tolist()) for j in range(args.k)
    ]
    zs = LangCellZeroShot(model, text_ids=ids, text_max_length=text_len)
    cls_id = int(cell.cls_id or 0)
    full_len = cspec["max_position_embeddings"]
    cells = _fold(real, cspec["vocab_size"], full_len, (cls_id,))
    full = [
        np.concatenate([[cls_id], rng.integers(4, cspec["vocab_size"], full_len - 1)])
        for _ in range(max(1, args.max_tokens // full_len) * 2)
    ]

    def flops(lens: np.ndarray) -> float:
        return cell_flops(lens, cspec) + match_flops(lens, args.k, text_len, tspec, width)

    rows = []
    note = f"k={args.k} texts x {text_len} tokens"
    for label, pool, chunk in (
        ("real", cells, min(args.chunk, len(cells))),
        (str(full_len), full, len(full)),
    ):
        n, sec, tok, fl, peak = _measure(
            zs.score, pool, chunk=chunk, seconds=args.seconds, flops=flops, timer=timer
        )
        rows.append(Row("LangCell zero-shot", label, n, sec, tok, fl, peak, note))
    return rows


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| model | length | cells | cells/s | tokens/s | peak GPU GiB | TFLOP/s | MFU | note |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['model']} | {r['length']} | {r['cells']:,} | {_num(r['cells_per_s'])} | "
            f"{_num(r['tokens_per_s'])} | {peak} | {r['tflops']:.3g} | {r['mfu']:.2%} | "
            f"{r['note']} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/benchmark.py gpu", description=(__doc__ or "").split("\n", 1)[0]
    )
    p.add_argument("--tokens", type=Path, default=Path("bench_out/tokens_kang8k.parquet"),
                   help="tokens parquet from `raypipe tokenize` (real cell lengths)")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto = bf16 on CUDA, fp32 on CPU")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=65_536, help="padded tokens per batch")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row (at least)")
    p.add_argument("--chunk", type=int, default=4096, help="real cells per encode call")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--no-langcell", action="store_true", help="skip the LangCell rows")
    p.add_argument("--k", type=int, default=8, help="LangCell candidate texts")
    p.add_argument("--text-len", type=int, default=80, help="tokens per candidate text")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                   help="peak for MFU (H200 bf16 dense: 989)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny models, few cells (seconds, CPU)")
    p.add_argument("--cells", type=int, default=None, help="use only the first N real cells")
    p.add_argument("--out", type=Path, default=None, help="folder for gpu_bench.json / .md")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return the figures.

    Parameters
    ----------
    argv
        Command-line arguments (see ``--help``).
    """
    import torch
    import transformers

    args = _parser().parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.torch_dtype = getattr(torch, args.dtype)
    if args.smoke:
        args.seconds = min(args.seconds, 0.0)
        args.cells = args.cells or 12
        args.chunk = min(args.chunk, 12)
        args.k, args.text_len = min(args.k, 3), min(args.text_len, 8)
        args.max_tokens = min(args.max_tokens, 512)
    torch.manual_seed(0)
    real = _read_tokens(args.tokens, args.cells)
    timer = _Timer(args.device)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        from raypipe.errors import ConfigError

        raise ConfigError(f"unknown models {unknown}", fix=f"choose from {', '.join(MODELS)}")
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    header = (
        f"GPU benchmark ({'SMOKE: tiny models, ' if args.smoke else ''}random weights): {gpu}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}; {args.dtype}, SDPA, length-bucketed batches of "
        f"<= {args.max_tokens:,} padded tokens; {len(real):,} real cells from {args.tokens.name} "
        f"(mean {np.mean([c.size for c in real]):.0f} gene tokens); >= {args.seconds:g} s per row; "
        f"MFU vs {args.peak_tflops:g} TFLOP/s"
    )
    print(header, flush=True)
    rows: list[Row] = []
    for name in names:
        rows += _bench_ce(name, real, args, timer)
        print(f"  {name}: done", flush=True)
    if not args.no_langcell:
        rows += _bench_langcell(real, args, timer)
        print("  LangCell zero-shot: done", flush=True)
    figures = [r.as_dict(args.peak_tflops) for r in rows]
    table = _table(figures, header)
    print(table)
    result = {"header": header, "rows": figures, "smoke": args.smoke}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
        (args.out / "gpu_bench.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
