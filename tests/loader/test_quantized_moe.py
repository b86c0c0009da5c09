"""Quantized routed experts (block FP8, compressed-tensors INT4) load in every placement and give
transformers' tokens; transformers reading the same files in fp32 is the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_oracle import assert_greedy_matches_hf
from tests.loader.test_fp8 import quantize_blocks
from twinfer import LLM

NUM_TOKENS = 16
PROMPTS = ["The quick brown fox jumps over the lazy dog because", "def f(x):\n    return"]
BLOCK = 32  # the tiny shape: hidden 64, expert inner 32


def _fp8(src: Path, out: Path) -> dict:
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w = tensors.pop(name).float()
        q, scale = quantize_blocks(w, BLOCK)
        tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = q, scale
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": ["lm_head", "gate"],
    }


def _ct_int4(src: Path, out: Path) -> dict:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w, module = tensors.pop(name).float(), name.removesuffix(".weight")
        scale = (w.reshape(w.shape[0], -1, 32).abs().amax(-1) / 7.5).clamp(min=1e-8)
        zero = torch.zeros_like(scale, dtype=torch.int8)
        q = quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=torch.int8)
        tensors[f"{module}.weight_packed"] = pack_to_int32(q, 4)
        tensors[f"{module}.weight_scale"] = scale.bfloat16()
        tensors[f"{module}.weight_shape"] = torch.tensor(w.shape)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head", "re:.*mlp\\.gate$"],
    )
    return {**qc.model_dump(), "quant_method": "compressed-tensors"}


@pytest.fixture(scope="module", params=["fp8", "ct-int4"])
def quantized_moe(request, tiny_checkpoints, tmp_path_factory) -> tuple[str, Path]:
    src = tiny_checkpoints("qwen3-moe-tiny")  # 2 MoE layers, 8 experts top-2, H 64, I 32
    out = tmp_path_factory.mktemp(request.param)
    shutil.copytree(src, out, dirs_exist_ok=True)
    quant = (_fp8 if request.param == "fp8" else _ct_int4)(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg))
    return request.param, out


def _oracle(kind: str, path: Path):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    extra = {}
    if kind == "fp8":
        extra["quantization_config"] = FineGrainedFP8Config(
            weight_block_size=(BLOCK, BLOCK), dequantize=True
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
    return model


@pytest.mark.parametrize("moe_backend", ["auto", "torch"])  # auto: the native CPU expert engine
def test_quantized_experts_match_transformers(quantized_moe, moe_backend: str) -> None:
    from transformers import AutoTokenizer

    kind, path = quantized_moe
    llm = LLM(str(path), dtype="float32", max_model_len=256, moe_backend=moe_backend)
    hf, tok = _oracle(kind, path), AutoTokenizer.from_pretrained(path)
    assert_greedy_matches_hf(llm, hf, tok, PROMPTS, NUM_TOKENS, same_prefix=6)
    moe = next(m for m in llm.engine.runner.model.modules() if hasattr(m, "w13_weight"))
    assert moe.quant_method is None  # expanded at load (MoEMethod's NOTE), the format's copy freed
    assert not any("weight_scale" in n or "packed" in n for n, _ in moe.named_parameters())
    if moe.host_experts is not None and moe.host_experts.layer is not None:
        # The CPU engine (--moe-cpu-dtype keep): an int4 g32 checkpoint stays int4 g32, packed
        # with its own scales (lossless); FP8 is kept in the model dtype.
        layer = moe.host_experts.layer
        want = ("int4", 32) if kind == "ct-int4" else ("f32", 0)
        assert (layer.format, layer.group_size if layer.format == "int4" else 0) == want
