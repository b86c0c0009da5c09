#!/usr/bin/env bash
# Serving overhead: output tokens/s of `twinfer serve` under `twinfer bench serve`, against the
# same engine offline (`twinfer bench throughput`, same prompts' shape, all requests at once) on
# the same machine. The offline engine is the server's ceiling: the ratio is what the HTTP layer,
# the second process and streaming cost. Writes bench/results/serve_overhead_<name>.json.
# Usage: scripts/bench_serve_overhead.sh [NAME] [extra engine flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-c32_smollm2_cpu}; shift || true
num=${NUM_PROMPTS:-32} in_len=${INPUT_LEN:-128} out_len=${OUTPUT_LEN:-64} port=${PORT:-8123}
tmp=$(mktemp -d)
twinfer bench throughput --num-prompts "$num" --input-len "$in_len" --output-len "$out_len" \
  --disable-tqdm --output-json "$tmp/offline.json" "$@"
twinfer serve --port "$port" --disable-uvicorn-access-log "$@" > "$tmp/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 0.5; done
twinfer bench serve --base-url "http://127.0.0.1:$port" --num-prompts "$num" \
  --random-input-len "$in_len" --random-output-len "$out_len" --ignore-eos --disable-tqdm \
  --save-result --result-dir "$tmp" --result-filename serve.json
python - "$tmp" "$name" <<'PY'
import json, sys
from pathlib import Path
from twinfer.bench.results import write_result
tmp, name = Path(sys.argv[1]), sys.argv[2]
offline = json.loads((tmp / "offline.json").read_text())
served = json.loads((tmp / "serve.json").read_text())
keys = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms",
        "p99_itl_ms", "mean_e2el_ms", "request_throughput", "completed", "failed")
write_result(
    Path("bench/results"), f"serve_overhead_{name}", served["output_throughput"], "tokens/s",
    offline["output_tokens_per_second"],
    {"offline": offline["config"], "serve": served["config"]},
    bound_kind="offline engine output tokens/s, same machine, same request shape",
    **{k: served[k] for k in keys},
)
PY
