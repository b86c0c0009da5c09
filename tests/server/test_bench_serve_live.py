"""`twinfer bench serve` against a real `twinfer serve`: every request completes, JSON written."""

from __future__ import annotations

import json

from tests.cli_runner import run_twinfer


def test_bench_serve_against_the_server_writes_its_json(tiny_server, tmp_path):
    """A user benchmarks the server with vLLM's flags and gets latency figures and a JSON file."""
    result = run_twinfer(
        "bench",
        "serve",
        "--base-url",
        tiny_server.url,
        "--num-prompts",
        "12",
        "--random-input-len",
        "24",
        "--random-output-len",
        "8",
        "--max-concurrency",
        "4",
        "--request-rate",
        "50",
        "--ignore-eos",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "serve.json",
    )
    assert result.returncode == 0, result.stderr
    assert "Serving Benchmark Result" in result.stdout
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["completed"] == 12 and data["failed"] == 0, data.get("errors")
    # ignore_eos: every request ran to its max_tokens, and the server's usage says so.
    assert data["total_output_tokens"] == 12 * 8
    assert data["total_input_tokens"] == 12 * 24
    for key in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "median_e2el_ms"):
        assert data[key] > 0, key
    assert data["request_throughput"] > 0 and data["output_throughput"] > 0
