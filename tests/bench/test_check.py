"""`twinfer check`: platform measurement on this machine, model bounds on hand-counted configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from twinfer.bench import check
from twinfer.bench.check import ModelCost, PlatformReport, measure_platform
from twinfer.bench.random_model import SHAPES, build_config

SMALL = 64 * 2**20  # a small DRAM buffer keeps the tests fast (the figure is then partly cache)
GPU_FIELDS = ("gpu_name", "gpu_memory_gib", "gpu_sms", "hbm_gbps", "bf16_tflops", "h2d_gbps")

# A dense Llama, counted by hand below: V 1000, H 64, L 3, Hq 8, Hkv 2, D = H / Hq = 8, I 96, tied.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def report() -> PlatformReport:
    return measure_platform(dram_bytes=SMALL)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    check.add_cli_args(parser)
    return parser


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return tmp_path


# ---- platform --------------------------------------------------------------------------------
def test_platform_report(report: PlatformReport) -> None:
    assert report.dram_read_gbps > 0 and report.dram_bytes == SMALL
    # The best of torch's reductions and the CPU expert engine's own pinned vector read.
    assert report.dram_method.startswith(("torch ", "native vector read"))
    assert report.physical_cores >= 1 and report.logical_cpus >= report.physical_cores
    assert report.numa_nodes >= 1 and len(report.numa_cpus) == report.numa_nodes
    assert report.dram_total_gib > 0 and report.cpu_model
    assert set(report.cpu_flags) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    if torch.cuda.is_available():
        assert all(getattr(report, f) > 0 for f in GPU_FIELDS if f != "gpu_name"), report.errors
    else:
        assert all(getattr(report, f) is None for f in GPU_FIELDS) and report.gpu_count == 0


def test_report_json_round_trip(report: PlatformReport) -> None:
    again = PlatformReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report


def test_table_says_none_without_gpu(report: PlatformReport) -> None:
    cpu_only = dataclasses.replace(report, **dict.fromkeys(GPU_FIELDS), d2h_gbps=None)
    rows = dict(line.split("  ", 1) for line in check.format_table(cpu_only).splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    for label in ("GPU", "HBM (d2d copy)", "GPU bf16 matmul", "PCIe H2D pinned", "PCIe D2H pinned"):
        assert rows[label] == "none"
    assert rows["DRAM read"].endswith("GiB buffer)") and "GB/s" in rows["DRAM read"]


def test_parse_bytes_and_cpulist() -> None:
    assert check.parse_bytes("64MiB") == SMALL and check.parse_bytes("2G") == 2 * 2**30
    assert check.parse_bytes("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="1GiB"):
        check.parse_bytes("lots")
    assert check.parse_cpulist("0-2,8,10-11\n") == [0, 1, 2, 8, 10, 11]


# ---- model bounds ----------------------------------------------------------------------------
def test_dense_llama_counts(llama_dir: Path) -> None:
    cost = ModelCost.from_pretrained(llama_dir, "bf16")
    # attention per layer: q 64x64 + k 64x16 + v 64x16 + o 64x64 = 10,240; x3 layers
    assert cost.attention_params == 30_720
    assert cost.norm_params == (2 * 3 + 1) * 64 == 448
    assert cost.dense_mlp_params == 3 * (3 * 64 * 96) == 55_296
    assert cost.embedding_params == cost.lm_head_params == 64_000 and cost.tied_embeddings
    assert cost.num_moe_layers == 0 and cost.expert_params == 0
    assert cost.total_params == 64_000 + 30_720 + 448 + 55_296 == 150_464  # tied: head once
    # K and V: 2 x 3 layers x 2 heads x 8 x 2 bytes
    assert cost.kv_bytes_per_token == 192
    # every weight once (the tied lm_head is the embedding, read once): 150,464 x 2 bytes
    assert cost.decode_bytes_per_step(1, 0) == 300_928
    assert cost.decode_bytes_per_step(2, 100) == 300_928 + 2 * 100 * 192
    assert cost.decode_bound_tokens_per_s(2, 100, 1.0) == pytest.approx(2e9 / 339_328)
    # 2 x (30,720 + 448 + 55,296) x 16 + 3 layers x 4 x 16^2 / 2 x 8 x 8 + 2 x 64,000
    assert cost.prefill_flops(16) == 2_766_848 + 98_304 + 128_000
    assert cost.prefill_expert_bytes(16) == 0
    # memory: 300,928 bytes at 1 GB/s = 300.9 us; compute: 2,993,152 FLOPs at 1 TFLOP/s = 3 us
    assert cost.prefill_bound_tokens_per_s(16, 1.0, 1.0) == pytest.approx(16 / 300_928e-9)
    fp32 = ModelCost.from_config(TINY_LLAMA, "float32")
    assert fp32.kv_bytes_per_token == 384 and fp32.decode_bytes_per_step(1, 0) == 4 * 150_464


def test_qwen3_moe_counts() -> None:
    # qwen3-moe-tiny: V 49152, H 64, L 2, Hq 4, Hkv 2, D 16, E 8, K 2, expert I 32, untied
    cost = ModelCost.from_config(build_config("qwen3-moe-tiny"), "bfloat16")
    assert (cost.num_experts, cost.top_k, cost.num_moe_layers) == (8, 2, 2)
    # q 64x64 + k 64x32 + v 64x32 + o 64x64 + q/k norms 2x16 = 12,320 per layer
    assert cost.attention_params == 2 * 12_320
    assert cost.router_params == 2 * 64 * 8 and cost.dense_mlp_params == 0
    assert cost.expert_params == 3 * 64 * 32 == 6_144 and cost.expert_bytes == 12_288
    assert cost.total_params == 2 * 49_152 * 64 + 24_640 + 320 + 1_024 + 2 * 8 * 6_144
    assert cost.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 == 256
    # distinct experts: K at batch 1, E for a large batch, uniform routing in between
    assert cost.expected_experts(1) == pytest.approx(2)
    assert cost.expected_experts(3) == pytest.approx(8 * (1 - 0.75**3))
    assert cost.expected_experts(10_000) == pytest.approx(8)
    # dense: attention 24,640 + norms 320 + routers 1,024 + lm_head 3,145,728 = 3,171,712 params;
    # experts: 2 layers x 2 x 6,144 = 24,576 params; all x 2 bytes
    assert cost.decode_bytes_per_step(1, 0) == pytest.approx(2 * (3_171_712 + 24_576))
    at_64 = 2 * 3_171_712 + 2 * 8 * 12_288 * (1 - 0.75**64) + 64 * 10 * 256
    assert cost.decode_bytes_per_step(64, 10) == pytest.approx(at_64)
    # active per token: 24,640 + 320 + 1,024 + 2 layers x 2 experts x 6,144 = 50,560
    flops = 2 * 50_560 * 10 + 2 * 4 * 10**2 / 2 * 16 * 4 + 2 * 64 * 49_152
    assert cost.prefill_flops(10) == pytest.approx(flops)
    assert cost.prefill_expert_bytes(10) == pytest.approx(2 * 8 * (1 - 0.75**10) * 12_288)


def test_config_dict_and_object_agree(tmp_path: Path) -> None:
    # transformers 5 stores Qwen3-MoE's num_experts as num_local_experts: both names must work
    config = build_config("qwen3-moe-tiny")
    config.save_pretrained(tmp_path)
    assert ModelCost.from_pretrained(tmp_path) == ModelCost.from_config(config)


_SMALL = dict(
    vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
)  # fmt: skip
# Families beyond the tiny shapes: biases, shared experts, leading dense layers.
_FAMILIES = {
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen3-bias": ("qwen3", dict(attention_bias=True)),
    "mixtral-moe-size-ignored": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe-shared": ("qwen2_moe", dict(
        num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48,
        decoder_sparse_step=2,
    )),
    "glm4-moe": ("glm4_moe", dict(
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        use_qk_norm=True, attention_bias=True,
    )),
}  # fmt: skip


def _config(name: str):
    """A tiny-shape config, or a small config of one of _FAMILIES."""
    if name in SHAPES:
        return build_config(name)
    from transformers import AutoConfig

    model_type, extra = _FAMILIES[name]
    try:
        return AutoConfig.for_model(model_type, **_SMALL, **extra)
    except (KeyError, ValueError):
        pytest.skip(f"this transformers has no {model_type}")


@pytest.mark.parametrize("name", [s for s in SHAPES if s != "qwen3-30b-a3b"] + list(_FAMILIES))
def test_total_params_match_transformers(name: str) -> None:
    """An independent oracle for the counts: transformers' own modules, built on meta."""
    from transformers import AutoModelForCausalLM

    config = _config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert ModelCost.from_config(config).total_params == sum(p.numel() for p in model.parameters())


def test_sparse_and_mixtral_layers() -> None:
    sparse = ModelCost.from_config(build_config("qwen3-moe-sparse-tiny"))
    assert sparse.num_moe_layers == 2  # layers 1 and 5; 3 is in mlp_only_layers
    assert sparse.dense_mlp_params == 4 * 3 * 64 * 128
    mixtral = ModelCost.from_config(build_config("mixtral-tiny"))
    assert mixtral.num_moe_layers == 2 and mixtral.expert_params == 3 * 64 * 32


def test_benchmark_model_decode_bytes() -> None:
    """Qwen3-30B-A3B shape, 12 layers, bf16, batch 1, empty context.

    per layer: q 2048x4096 + o 4096x2048 = 16,777,216; k + v 2 x 2048x512 = 2,097,152;
    q/k norms 256; layer norms 4,096; router 2048x128 = 262,144 -> 19,140,864 x 12 = 229,690,368
    final norm 2,048; lm_head 151,936 x 2,048 = 311,164,928
    experts: 8 a layer x 12 x (3 x 2048 x 768 = 4,718,592) = 452,984,832
    total 993,842,176 params x 2 bytes = 1,987,684,352 bytes ~ 1.99e9
    """
    cost = ModelCost.from_config(build_config("qwen3-30b-a3b", num_layers=12), "bf16")
    assert cost.decode_bytes_per_step(1, 0) == pytest.approx(1.98e9, rel=0.01)
    assert cost.decode_bytes_per_step(1, 0) == pytest.approx(1_987_684_352)
    assert cost.kv_bytes_per_token == 2 * 12 * 4 * 128 * 2


@pytest.mark.parametrize(
    "config, message",
    [
        ({"architectures": ["BertForMaskedLM"], "hidden_size": 8}, "not a causal LM"),
        ({"architectures": ["LlamaForCausalLM"]}, "hidden_size"),
        ({**TINY_LLAMA, "num_local_experts": 4, "num_experts_per_tok": 8}, "num_experts_per_tok"),
    ],
)
def test_bad_configs(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelCost.from_config(config)


# ---- CLI -------------------------------------------------------------------------------------
def test_run_json(llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(
        ["--json", "--no-gpu", "--dram-bytes", "64MiB", "--model", str(llama_dir), "--batch", "2"]
    )
    assert check.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["platform"]["gpu_name"] is None and out["platform"]["hbm_gbps"] is None
    assert out["platform"]["dram_read_gbps"] > 0
    model = out["model"]
    assert model["decode_bytes_per_step"] == 300_928 + 2 * 512 * 192
    assert model["decode_bound_tok_s_gpu"] is None and model["decode_bound_tok_s_cpu"] > 0
    assert model["total_params"] == 150_464 and model["prefill_bound_tok_s_gpu"] is None


def test_run_table(llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["--no-gpu", "--dram-bytes", "64MiB", "--model", str(llama_dir)])
    assert check.run(args) == 0
    out = capsys.readouterr().out
    assert "decode bound CPU" in out and re.search(r"^GPU +none$", out, re.MULTILINE)


@pytest.mark.parametrize("bad", ["missing", "not_json", "bert"])
def test_run_bad_model(tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / bad
    if bad != "missing":
        path.mkdir()
        text = "{oops" if bad == "not_json" else json.dumps({"architectures": ["BertModel"]})
        (path / "config.json").write_text(text)
    args = _parser().parse_args(["--no-gpu", "--dram-bytes", "64MiB", "--model", str(path)])
    assert check.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("Hugging Face" in err or "causal LM" in err)
