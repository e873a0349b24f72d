"""The GPU benchmark: CPU smoke run with the packages the device lacks made unimportable,
carried configs equal to ../shared's, and the FLOP formulas equal to torch's own count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.bench.gpu import MODELS, cell_flops, match_flops, random_bert

ROOT = Path(__file__).resolve().parents[1]
#: on the device image only torch, transformers, numpy, pandas, pyarrow (+ their deps) exist
ABSENT = (
    "ray", "anndata", "zarr", "scipy", "pydantic", "sklearn", "numba", "llvmlite", "h5py",
    "scanpy", "umap", "pynndescent", "numcodecs", "sentence_transformers", "vllm", "openai",
    "igraph", "leidenalg", "matplotlib", "cellxgene_ontology_guide",
)  # fmt: skip

PROBE = """
import sys
from importlib.machinery import PathFinder

ABSENT = set({absent!r})


class _Absent(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None  # as if not installed: import fails, importlib.util.find_spec says None
        return super().find_spec(name, path, target)


sys.meta_path = [_Absent if f is PathFinder else f for f in sys.meta_path]
early = sorted({{m.partition(".")[0] for m in sys.modules}} & ABSENT)
assert not early, early
from raypipe.bench import gpu

gpu.main({argv!r})
print("LOADED=" + ",".join(sorted({{m.partition(".")[0] for m in sys.modules}} & ABSENT)))
"""


def _tokens(path: Path, n: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    cells = [rng.integers(2, 25_426, int(m)).astype(np.int32) for m in rng.integers(30, 300, n)]
    ids = pa.array([c.tolist() for c in cells], pa.list_(pa.int32()))
    table = pa.table(
        {
            "obs_name": [f"c{i}" for i in range(n)],
            "input_ids": ids,
            "length": pa.array([c.size for c in cells], pa.int32()),
        }
    )
    pq.write_table(table, path)
    return path


@pytest.mark.slow
def test_smoke_runs_with_only_the_device_packages(tmp_path):
    tokens = _tokens(tmp_path / "tokens.parquet")
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--smoke", "--tokens", str(tokens), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", PROBE.format(absent=ABSENT, argv=argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "LOADED=", res.stdout
    for name in (*MODELS, "LangCell zero-shot"):
        assert f"| {name} | real |" in res.stdout
    assert "| V2-316M | 128 |" in res.stdout  # full length (shrunk to the smoke positions)
    result = json.loads((out / "gpu_bench.json").read_text())
    assert len(result["rows"]) == 2 * len(MODELS) + 2
    for row in result["rows"]:
        assert row["cells"] > 0
        assert row["cells_per_s"] > 0
        assert row["tflops"] > 0
    assert (out / "gpu_bench.md").read_text().startswith("GPU benchmark (SMOKE")


def test_carried_configs_equal_the_shared_files(shared_data):
    for name, spec in MODELS.items():
        raw = json.loads((shared_data / "geneformer" / spec["file"]).read_text())
        for key, value in spec.items():
            if key != "file":
                assert raw[key] == value, f"{name}: {key} {value} != {raw[key]}"


def _small(**kw):
    spec = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "vocab_size": 100,
        "hidden_act": "relu", "layer_norm_eps": 1e-12, "type_vocab_size": 2, "pad_token_id": 0,
    }  # fmt: skip
    return {**spec, **kw}


def test_flop_formulas_equal_torch_flop_counter():
    """Eager attention (torch counts its matmuls; CPU SDPA kernels it does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from raypipe.embed.langcell_text import TextEncoder, text_config

    spec = _small()
    bert = random_bert(spec, "cpu", torch.float32)
    bert.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        bert(input_ids=torch.randint(4, 100, (1, 37)))
    assert fc.get_total_flops() == cell_flops(np.array([37]), spec)

    tspec = _small(hidden_size=48, num_attention_heads=3, intermediate_size=96, vocab_size=200)
    text = TextEncoder(text_config(tspec, "eager"), 32).eval()
    k, t, n_tok = 3, 9, 37
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        text(
            torch.randint(0, 200, (k, t)),
            torch.ones(k, t),
            torch.randn(1, n_tok, 32),
            torch.ones(1, n_tok),
        )
    assert fc.get_total_flops() == match_flops(np.array([n_tok]), k, t, tspec, 32)


def test_device_script_parses_and_reads_the_carried_tokens():
    script = ROOT / "jobs" / "gpu_bench.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "bench_out/tokens_kang8k.parquet" in text
    assert "$OUT" in text


@pytest.mark.gpu
def test_gpu_smoke_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from raypipe.bench import gpu

    res = gpu.main(["--smoke", "--device", "cuda", "--tokens", str(_tokens(tmp_path / "t.pq"))])
    assert all(r["peak_gib"] is not None for r in res["rows"])
