#!/usr/bin/env bash
# The GPU benchmark as one prepared command for the device machine (one H200).
#
# Here, once (the tokens travel in the ignored folder bench_out/, 5.6 MB):
#   raypipe tokenize ../shared/data/cells/kang2018_pbmc_8k_muscat_kang.h5ad --out bench_out/tokens_kang8k.parquet
# There (device tool: run with carry ["bench_out"], timeout_s 600):
#   bash jobs/gpu_bench.sh
# It needs only python3 with torch, transformers, numpy and pyarrow; the table (markdown), the
# figures (JSON) and the log land in $OUT (default bench_out/gpu). About 4-5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out/gpu}"
TOKENS="${TOKENS:-bench_out/tokens_kang8k.parquet}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  # every model, real lengths and full length, and LangCell's zero-shot path (k = 8 texts)
  "$PY" jobs/benchmark.py gpu --tokens "$TOKENS" --device cuda --out "$OUT" "$@"
  # the token budget side by side for the smallest model (launch-bound at small batches?)
  "$PY" jobs/benchmark.py gpu --tokens "$TOKENS" --device cuda --models V1-10M --no-langcell \
    --max-tokens 262144 --out "$OUT/budget262k"
} 2>&1 | tee "$OUT/gpu_bench.log"
