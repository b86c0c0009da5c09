"""compressed-tensors float-quantized FP8 (llm-compressor's FP8_DYNAMIC: a scale per channel;
FP8_BLOCK: 128x128 blocks), written by the compressed-tensors library (`quantize`, the config
model); the oracle is compressed-tensors' own `dequantize` of the same tensors in a plain fp32
checkpoint, run by transformers. twinfer keeps the FP8 bytes and their scales."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.hf_oracle import assert_greedy_matches_hf
from tests.loader.test_fp8 import NUM_TOKENS, PROMPTS, save_tiny_model
from twinfer import LLM
from twinfer.layers.linear import LinearBase
from twinfer.layers.quantization.fp8 import FP8_DTYPE, Fp8BlockLinearMethod


def write_ct_fp8(out: Path, strategy: str) -> Path:
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    tensors = save_tiny_model(out)
    block = {"block_structure": [128, 128]} if strategy == "block" else {}
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, **block)
    acts = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True)
    plain = {}
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w = tensors[name].float()
        n, k = w.shape
        if strategy == "block":
            scale = w.reshape(n // 128, 128, k // 128, 128).abs().amax((1, 3)) / 448
        else:
            scale = w.abs().amax(1, keepdim=True) / 448
        q = quantize(x=w, scale=scale, zero_point=None, args=args, dtype=FP8_DTYPE)
        plain[name] = dequantize(x_q=q, scale=scale, zero_point=None, args=args)
        tensors[name], tensors[name.replace(".weight", ".weight_scale")] = q, scale
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    qc = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
        },
        format="float-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head"],
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {**qc.model_dump(), "quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(cfg))
    oracle = out.parent / f"{out.name}-plain"
    shutil.copytree(out, oracle)
    plain_tensors = {n: t for n, t in tensors.items() if not n.endswith("weight_scale")}
    plain_tensors.update(plain)
    save_file(plain_tensors, oracle / "model.safetensors", metadata={"format": "pt"})
    del cfg["quantization_config"]
    (oracle / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("strategy", ["channel", "block"])
def test_ct_fp8_matches_transformers_on_the_same_values(strategy: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_ct_fp8(tmp_path / "ct", strategy)
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    layers = {m.prefix: m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)}
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert isinstance(qkv.quant_method, Fp8BlockLinearMethod) and qkv.weight.dtype == FP8_DTYPE
    want = (1, 256) if strategy == "channel" else (128, 128)
    assert qkv.quant_method.block == want
    assert f"fp8 {'channel' if strategy == 'channel' else 'blocks 128x128'}" in (
        llm.engine.info.quant_config.describe()
    )
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct-plain", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert_greedy_matches_hf(llm, hf, tok, PROMPTS, NUM_TOKENS, same_prefix=8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": {"num_bits": 4, "type": "float", "strategy": "group"}}, "twinfer loads FP8"),
        ({"input_activations": {"num_bits": 8, "type": "float", "dynamic": False}}, "static"),
        ({"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "'tensor'"),
    ],
)
def test_bad_ct_fp8_configs_name_the_problem(change, message) -> None:
    from twinfer.layers.quantization import get_quantization_config

    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
             "strategy": "channel"}, "format": "float-quantized"}  # fmt: skip
    config = {"quant_method": "compressed-tensors", "config_groups": {"g": group | change}}
    with pytest.raises(ValueError, match=message):
        get_quantization_config(config)
