"""`twinfer bench latency` and `twinfer bench throughput` on a tiny random model on the CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from twinfer.bench import latency, throughput


def parse(module, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_cli_args(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def engine_flags(tiny_checkpoints) -> list[str]:
    model = tiny_checkpoints("llama-tiny")
    # A short max_model_len keeps the KV cache (and the test) small.
    return ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-model-len", "64"]


def test_latency(engine_flags: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "latency.json"
    args = parse(
        latency, *engine_flags, "--input-len", "8", "--output-len", "4", "--batch-size", "2",
        "--num-iters-warmup", "1", "--num-iters", "2", "--output-json", str(out), "--disable-tqdm",
    )  # fmt: skip
    assert latency.main(args) == 0
    assert "Avg latency:" in capsys.readouterr().out
    r = json.loads(out.read_text())
    for key in ("avg_latency", "p50_latency", "p90_latency", "p99_latency", "value"):
        assert r[key] > 0, key
    assert len(r["latencies"]) == 2 and r["unit"] == "s" and r["benchmark"] == "latency"
    assert min(r["latencies"]) <= r["p50_latency"] <= r["p99_latency"] <= max(r["latencies"])
    assert {"machine", "date", "commit"} <= r.keys()
    c = r["config"]
    assert (c["input_len"], c["output_len"], c["batch_size"], c["num_iters"]) == (8, 4, 2, 2)
    assert c["resolved_dtype"] == "float32" and c["resolved_device"] == "cpu"


def test_throughput(engine_flags: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "throughput.json"
    args = parse(
        throughput, *engine_flags, "--input-len", "8", "--output-len", "4", "--num-prompts", "3",
        "--output-json", str(out), "--disable-tqdm",
    )  # fmt: skip
    assert throughput.main(args) == 0
    assert "Throughput:" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert (r["num_requests"], r["total_prompt_tokens"], r["total_output_tokens"]) == (3, 24, 12)
    assert r["total_num_tokens"] == 36
    for key in ("elapsed_time", "requests_per_second", "tokens_per_second", "value"):
        assert r[key] > 0, key
    assert r["output_tokens_per_second"] == pytest.approx(12 / r["elapsed_time"])
    assert r["tokens_per_second"] == pytest.approx(36 / r["elapsed_time"])
    assert r["value"] == r["output_tokens_per_second"] and r["unit"] == "tokens/s"
    assert {"machine", "date", "commit"} <= r.keys() and r["config"]["num_prompts"] == 3


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (latency, ["--input-len", "0"], "--input-len must be at least 1"),
        (latency, ["--output-len", "-1"], "--output-len must be at least 1"),
        (latency, ["--batch-size", "0"], "--batch-size must be at least 1"),
        (latency, ["--num-iters", "0"], "--num-iters must be at least 1"),
        (latency, ["--num-iters-warmup", "-1"], "--num-iters-warmup must be at least 0"),
        (throughput, ["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (throughput, ["--input-len", "0"], "--input-len must be at least 1"),
        (latency, ["--input-len", "60", "--output-len", "8"], "raise --max-model-len"),
        (throughput, ["--max-model-len", "4096", "--input-len", "4000", "--output-len", "200"],
         "raise --max-model-len"),
    ],
)  # fmt: skip
def test_bad_input(module, argv: list[str], message: str, engine_flags: list[str]) -> None:
    with pytest.raises(ValueError, match=message):
        module.main(parse(module, *engine_flags, *argv))
