#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA GPU: the native CPU expert engine's build and CPU tests,
# the `gpu`-marked tests, the kernel micro-benchmarks, `twinfer check`, `twinfer bench gpu` and
# `twinfer bench hybrid` and `twinfer bench hybrid-prefill` (JSON results). Everything is logged
# to $OUT/suite.log.
#   OUT=gpu-logs TOKENIZER=path/to/tokenizer bash scripts/gpu_suite.sh \
#     [all|build|tests|kernels|bench|hybrid|prefill]
# Set TWINFER_COMMIT to the commit under test where the tree was copied without its git metadata.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 TWINFER_TEST_TOKENIZER=${TOKENIZER:-}
log="$OUT/suite.log"
# Each step is time-boxed (seconds in $LIMIT_<name> or the default), so one stuck step cannot
# take the others' time.
step() { local limit=$1; shift; echo "=== $* ($(date +%T))" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"; }

part=${1:-all}
step 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
if [[ $part == all || $part == build ]]; then
  # The native CPU expert engine, built in place (scikit-build-core + nanobind, no isolation: the
  # GPU machine has no package index), then its CPU tests on this machine's cores and ISA.
  step 300 python -m pip install -q --no-build-isolation --no-deps -e .
  step 300 python -m pytest -q -p no:cacheprovider tests/native tests/hybrid -m "not gpu"
fi
if [[ $part == all || $part == tests ]]; then
  step "${LIMIT_TESTS:-300}" python -m pytest -m gpu -q -p no:cacheprovider -n "${TEST_WORKERS:-4}" --durations=15 tests --ignore=tests/server
fi
if [[ $part == all || $part == kernels ]]; then
  step 60 python scripts/bench_fused_ops.py
  step 90 python scripts/bench_attention.py
  step 90 python scripts/bench_fused_moe.py
fi
if [[ $part == all || $part == bench ]]; then
  step 60 python -m twinfer.cli check --json
  step 240 python -m twinfer.cli bench gpu --results-dir "$OUT/results" --profile \
    ${TOKENIZER:+--tokenizer "$TOKENIZER"}
fi
if [[ $part == all || $part == bench || $part == hybrid ]]; then
  step "${LIMIT_HYBRID:-420}" python -m twinfer.cli bench hybrid --results-dir "$OUT/results" \
    --profile ${TOKENIZER:+--tokenizer "$TOKENIZER"}
fi
if [[ $part == all || $part == bench || $part == prefill ]]; then
  step "${LIMIT_PREFILL:-420}" python -m twinfer.cli bench hybrid-prefill \
    --results-dir "$OUT/results" ${TOKENIZER:+--tokenizer "$TOKENIZER"}
fi
