"""Benchmarks (print figures; not timed tests).

python jobs/benchmark.py genept   # GenePT-w pipeline vs in-memory scipy, 100k and 1M cells
python jobs/benchmark.py kernel   # GenePT-w fused numba kernel vs scipy, beside the FLOP limit
python jobs/benchmark.py ce       # Geneformer tokenizer and CE encoder throughput
python jobs/benchmark.py llm      # LLM actors vs a rate-limited loopback OpenAI server
python jobs/benchmark.py eval     # evaluation: shared kNN graph vs the previous scikit-learn path
python jobs/benchmark.py texts    # gene texts: Ray actors vs plain SentenceTransformer.encode
python jobs/benchmark.py scale    # 1M-cell end-to-end run, per-stage times and memory
python jobs/benchmark.py inplace  # 1M-cell AnnData .zarr read in place vs ingested first
python jobs/benchmark.py discover # cell-type discovery: clustering + assignment at 100k and 1M
python jobs/benchmark.py gpu      # CE at 4 Geneformer sizes + LangCell zero-shot (jobs/gpu_bench.sh)
python jobs/benchmark.py reprocess  # a grown atlas: reuse of the fitted space vs --refit
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHES = {
    "genept": "raypipe.bench.genept",
    "ce": "raypipe.bench.ce",
    "kernel": "raypipe.bench.kernel",
    "llm": "raypipe.bench.llm",
    "eval": "raypipe.bench.evaluate",
    "scale": "raypipe.bench.scale",
    "inplace": "raypipe.bench.inplace",
    "texts": "raypipe.bench.texts",
    "discover": "raypipe.bench.discover",
    "gpu": "raypipe.bench.gpu",
    "reprocess": "raypipe.bench.reprocess",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(__doc__)
        return 2
    module = importlib.import_module(BENCHES[argv[0]])
    rc = module.main(argv[1:])
    return rc if isinstance(rc, int) else 0  # some benches return their figures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
