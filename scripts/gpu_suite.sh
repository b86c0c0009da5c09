#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA GPU: the `gpu`-marked tests, the kernel micro-benchmarks,
# `twinfer check`, and `twinfer bench gpu` (JSON results). Everything is logged to $OUT/suite.log.
#   OUT=gpu-logs TOKENIZER=path/to/tokenizer bash scripts/gpu_suite.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
log="$OUT/suite.log"
step() { echo "=== $* ($(date +%T))" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }

step nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
step python -m pytest -m gpu -q -p no:cacheprovider tests "$@"
step python scripts/bench_fused_ops.py
step python scripts/bench_attention.py
step python scripts/bench_fused_moe.py
step python -m twinfer.cli check --json
step python -m twinfer.cli bench gpu --results-dir "$OUT/results" --profile \
    ${TOKENIZER:+--tokenizer "$TOKENIZER"}
