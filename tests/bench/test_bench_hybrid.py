"""`twinfer bench hybrid` end to end on the CPU: a tiny random Qwen3-MoE, every figure's JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from twinfer.bench import hybrid
from twinfer.hybrid.numa import CpuTopology
from twinfer.native import native_engine, native_error

pytestmark = pytest.mark.skipif(native_engine is None, reason=f"no native engine: {native_error}")

FIGURES = (
    "hybrid_decode_bs1_bf16", "hybrid_decode_bs1_int4", "hybrid_decode_c2_int4",
    "cpu_expert_kernel_bw", "hybrid_host_ram",
)  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    hybrid.add_cli_args(parser)
    return parser.parse_args(list(argv))


def load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_bench_hybrid_cpu(tiny_checkpoints, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(hybrid, "_KERNEL_SECONDS", 0.2)
    model = str(tiny_checkpoints("qwen3-moe-tiny"))  # 2 MoE layers, 8 experts top-2, H 64, I 32
    args = parse(
        "--model", model, "--device", "cpu", "--input-len", "8", "--output-len", "12",
        "--concurrency", "2", "--threads", "1", "--group-size", "32", "--dram-gbps", "10",
        "--profile", "--results-dir", str(tmp_path),
    )  # fmt: skip
    assert hybrid.main(args) == 0
    out = capsys.readouterr().out
    assert "DRAM read 10.0 GB/s (given (--dram-gbps))" in out
    assert "CPU experts busy" in out  # the --profile table
    fields = {"benchmark", "value", "unit", "bound", "ratio", "machine", "date", "commit", "config"}
    for name in FIGURES:
        r = load(tmp_path, name)
        assert fields <= r.keys() and r["benchmark"] == name and name in out
        assert r["value"] > 0 and r["bound"] > 0, name
        assert r["ratio"] == pytest.approx(r["value"] / r["bound"], rel=1e-2, abs=1e-3)
        c = r["config"]
        assert c["placement"] == "all routed experts on the CPU" and c["threads"] == 1
        assert (c["num_experts"], c["top_k"], c["hidden"], c["expert_inner"]) == (8, 2, 64, 32)
    # bound = DRAM rate / host-expert bytes a token reads: 2 layers x top-2 experts x 3 H I.
    bf16, int4 = load(tmp_path, "hybrid_decode_bs1_bf16"), load(tmp_path, "hybrid_decode_bs1_int4")
    assert bf16["bound_basis"]["host_bytes_per_token"] == 2 * 2 * 3 * 64 * 32 * 2
    per_token = int4["bound_basis"]["host_bytes_per_token"]
    assert per_token < bf16["bound_basis"]["host_bytes_per_token"] / 3  # 4 bits + scales
    assert int4["bound"] == pytest.approx(10e9 / per_token, rel=1e-3)
    assert int4["bound_basis"]["dram_gbps"] == 10.0 and int4["config"]["group_size"] == 32
    assert int4["profile"]["cpu_layer_calls"] == pytest.approx(2)  # a step: one per MoE layer
    assert int4["profile"]["step_wall_ms"] > int4["profile"]["cpu_busy_ms"] > 0
    c2 = load(tmp_path, "hybrid_decode_c2_int4")
    # Bound: the DRAM time of the distinct experts 2 tokens touch (more than one token's).
    assert c2["config"]["batch"] == 2 and int4["bound"] < c2["bound"] < 2 * int4["bound"]
    assert c2["speedup_over_bs1"] == pytest.approx(c2["value"] / int4["value"], rel=1e-2)
    ram = load(tmp_path, "hybrid_host_ram")
    assert ram["lower_is_better"] and ram["bound"] == 1.1
    assert set(ram["by_dtype"]) == {"bf16", "int4"} and ram["config"]["dtype"] in ram["by_dtype"]


def test_bench_hybrid_checkpoint_format(tiny_checkpoints, tmp_path: Path, monkeypatch) -> None:
    """--dtypes ct_int4: the model's shape as a compressed-tensors INT4 g32 checkpoint, its experts
    kept as int4 g32 on the CPU engine; the bound counts those bytes."""
    monkeypatch.setattr(hybrid, "_KERNEL_SECONDS", 0.2)
    model = str(tiny_checkpoints("qwen3-moe-tiny"))
    args = parse(
        "--model", model, "--device", "cpu", "--input-len", "8", "--output-len", "12",
        "--threads", "1", "--dtypes", "ct_int4", "--dram-gbps", "10",
        "--results-dir", str(tmp_path),
    )  # fmt: skip
    assert hybrid.main(args) == 0
    r = load(tmp_path, "hybrid_decode_bs1_ct_int4")
    assert r["config"]["host_format"] == "int4" and r["config"]["group_size"] == 32
    int4_g32 = 2 * 2 * 3 * 64 * 32 // 2 * (1 + 4 / 16)  # 4 bits + an f32 scale per 32: 5 bits
    assert r["bound_basis"]["host_bytes_per_token"] == pytest.approx(int4_g32, rel=0.1)


def test_bench_hybrid_flags(capsys) -> None:
    """More threads than cores run on the cores there are; bad flags are errors with the fix."""
    args = parse("--device", "cpu", "--threads", "100000")
    assert hybrid._prepare(args) is None
    assert args.threads == CpuTopology.detect().physical_cores
    assert "running" in capsys.readouterr().out
    bad = hybrid._prepare(parse("--device", "cpu", "--dtypes", "fp4"))
    assert "bf16, int8, int4, fp8 and ct_int4" in bad
    if not torch.cuda.is_available():
        assert hybrid.main(parse("--device", "cuda")) == 2
        assert "--device cpu" in capsys.readouterr().out


def test_bench_hybrid_prefill_needs_a_gpu(capsys) -> None:
    from twinfer.bench import hybrid_prefill

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the GPU suite runs the benchmark")
    parser = argparse.ArgumentParser()
    hybrid_prefill.add_cli_args(parser)
    assert hybrid_prefill.main(parser.parse_args([])) == 2
    assert "streams host experts to a GPU" in capsys.readouterr().out


def test_itl_during_prefill_measures_both_windows(tiny_checkpoints) -> None:
    """The ITL figure's method on a tiny model on the CPU (nothing streams there): a decode
    alone, then beside a long prompt until its first token; the engine ends empty."""
    import numpy as np

    from twinfer import LLM
    from twinfer.bench.hybrid_prefill import itl_during_prefill

    llm = LLM(
        str(tiny_checkpoints("qwen3-moe-tiny")), device="cpu", max_model_len=512,
        max_num_batched_tokens=64, moe_cpu_threads=1,
    )  # fmt: skip
    itl = itl_during_prefill(llm, np.random.default_rng(0), 300, llm.engine.info.vocab_size)
    assert itl["solo_ms"] > 0 and itl["during_ms"] > 0
    assert itl["decode_tokens_during"] >= 4  # 300 tokens in 64-token chunks, a decode each
    assert itl["during_max_ms"] >= itl["during_p50_ms"]
    assert itl["background_chunks"] == 0
    assert llm.engine.is_empty()
