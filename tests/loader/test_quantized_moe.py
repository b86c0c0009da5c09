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
from tests.loader.test_compressed_tensors import int4_scales
from tests.loader.test_fp8 import quantize_blocks
from twinfer import LLM
from twinfer.layers.moe import MoELayer

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


def _ct_int4(src: Path, out: Path, symmetric: bool = True) -> dict:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32
    )
    tensors = load_file(src / "model.safetensors")
    plain = {}  # compressed-tensors' own dequantization: the asymmetric oracle's weights
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w, module = tensors.pop(name).float(), name.removesuffix(".weight")
        scale, zero = int4_scales(w, 32, symmetric)
        scale = scale.bfloat16().float()
        q = quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=torch.int8)
        plain[name] = dequantize(x_q=q, scale=scale, zero_point=zero, args=args)
        tensors[f"{module}.weight_packed"] = pack_to_int32(q, 4)
        tensors[f"{module}.weight_scale"] = scale.bfloat16()
        tensors[f"{module}.weight_shape"] = torch.tensor(w.shape)
        if not symmetric:
            tensors[f"{module}.weight_zero_point"] = pack_to_int32(zero, 4, packed_dim=0)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    save_file(plain, out / "oracle.safetensors.plain")
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head", "re:.*mlp\\.gate$"],
    )
    return {**qc.model_dump(), "quant_method": "compressed-tensors"}


@pytest.fixture(scope="module", params=["fp8", "ct-int4", "ct-int4-asym"])
def quantized_moe(request, tiny_checkpoints, tmp_path_factory) -> tuple[str, Path]:
    src = tiny_checkpoints("qwen3-moe-tiny")  # 2 MoE layers, 8 experts top-2, H 64, I 32
    out = tmp_path_factory.mktemp(request.param)
    shutil.copytree(src, out, dirs_exist_ok=True)
    if request.param == "fp8":
        quant = _fp8(src, out)
    else:
        quant = _ct_int4(src, out, symmetric=request.param == "ct-int4")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg))
    return request.param, out


def _oracle(kind: str, path: Path):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    if kind == "ct-int4-asym":  # NOTE: transformers 5.25 refuses packed zero points: the
        # weights compressed-tensors dequantized, in a plain checkpoint
        plain = path.parent / f"{path.name}-plain"
        if not plain.exists():
            shutil.copytree(path, plain)
            tensors = load_file(path / "model.safetensors")
            tensors = {n: t for n, t in tensors.items() if ".weight_" not in n}
            tensors.update(load_file(path / "oracle.safetensors.plain"))
            save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
            cfg = json.loads((plain / "config.json").read_text())
            del cfg["quantization_config"]
            (plain / "config.json").write_text(json.dumps(cfg))
        return AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
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
    moe = next(m for m in llm.engine.runner.model.modules() if isinstance(m, MoELayer))
    if moe.host_experts is not None and moe.host_experts.layer is not None:
        # The CPU engine (--moe-cpu-dtype keep) keeps the checkpoint's own format, packed from
        # its own values and scales: int4 g32 stays int4 g32, FP8 blocks of 32 columns stay FP8
        # in groups of 32; the format's copy is freed.
        layer = moe.host_experts.layer
        want = {"ct-int4": ("int4", 32), "ct-int4-asym": ("int4z", 32)}.get(kind, ("fp8", BLOCK))
        assert (layer.format, layer.group_size) == want
        assert all(p.numel() == 0 for p in moe.parameters(recurse=False))
    else:  # device experts: expanded at load (MoEMethod), the format's parameters gone
        assert moe.quant_method is None
        assert not any("weight_scale" in n or "packed" in n for n, _ in moe.named_parameters())
