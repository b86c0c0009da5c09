"""--quantization fp8: a plain checkpoint's linear weights and experts quantized at load to block
FP8 (e4m3, 128x128 blocks). The oracle is the recipe written out here (absmax / 448 per block);
on the GPU the quantized model's greedy tokens follow the bf16 model's (top-5 rule)."""

from __future__ import annotations

import re

import pytest
import torch

from twinfer import LLM
from twinfer.layers.linear import ReplicatedLinear
from twinfer.layers.quantization.fp8 import FP8_DTYPE, dequantize_blocks, quantize_blocks
from twinfer.layers.quantization.online_fp8 import OnlineFp8LinearMethod, OnlineFp8MoEMethod


def _recipe(w: torch.Tensor, block: int) -> torch.Tensor:
    """Each block x block tile scaled by absmax / 448, cast to e4m3 and back."""
    out = torch.empty_like(w)
    for r in range(0, w.shape[0], block):
        for c in range(0, w.shape[1], block):
            tile = w[r : r + block, c : c + block]
            scale = tile.abs().max() / 448
            q = (tile / scale).to(FP8_DTYPE) if scale > 0 else torch.zeros_like(tile)
            out[r : r + block, c : c + block] = q.float() * scale
    return out


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (16, 16)])
def test_quantize_blocks_is_the_recipe(shape) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    w[:128, :128] = 0  # an all-zero block: scale 0, values 0
    q, scale = quantize_blocks(w, (128, 128))
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128)) and scale[0, 0] == 0
    got = dequantize_blocks(q, scale, (128, 128), torch.float32)
    torch.testing.assert_close(got, _recipe(w, 128), rtol=0, atol=0)


def test_online_fp8_linear_keeps_fp8_and_computes_on_it() -> None:
    torch.manual_seed(0)
    layer = ReplicatedLinear(256, 160, prefix="x", quant_method=OnlineFp8LinearMethod((128, 128)))
    w = torch.randn(160, 256)
    layer.weight.weight_loader(layer.weight, w)
    layer.process_weights_after_loading()
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale_inv.shape == (2, 2)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ _recipe(w, 128).t(), rtol=1e-5, atol=1e-5)


def test_online_fp8_experts_stay_plain_where_no_kernel_reads_fp8() -> None:
    """On a device without an FP8 MoE kernel, quantizing and expanding again would only lose
    precision: the experts stay as loaded."""
    from twinfer.layers.moe import MoELayer

    layer = MoELayer(4, 2, 64, 32, renormalize=True, quant_method=OnlineFp8MoEMethod((128, 128)))
    w13, w2 = torch.randn(4, 64, 64), torch.randn(4, 64, 32)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    layer.process_weights_after_loading()
    assert torch.equal(layer.w13_weight, w13) and torch.equal(layer.w2_weight, w2)


def test_online_fp8_experts_quantize_gate_and_up_blocks_apart() -> None:
    """When kept (the CPU engine's fp8, a GPU kernel), w13's blocks never straddle gate and up:
    an inner size of 96 gives 1 gate block row and 1 up block row, as a checkpoint stores them."""
    from twinfer.layers.moe import MoELayer

    method = OnlineFp8MoEMethod((128, 128))
    layer = MoELayer(2, 2, 128, 96, renormalize=True, quant_method=method)
    w13, w2 = torch.randn(2, 192, 128), torch.randn(2, 128, 96)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    method.keeps_fp8 = lambda layer: True  # as where a kernel reads FP8
    method.process_weights_after_loading(layer)
    assert layer.w13_weight.dtype == FP8_DTYPE and layer.w13_weight_scale_inv.shape == (2, 2, 1)
    got13, got2 = method.dequantize(layer, torch.float32)
    want13 = torch.stack([torch.cat([_recipe(w[:96], 128), _recipe(w[96:], 128)]) for w in w13])
    torch.testing.assert_close(got13, want13, rtol=0, atol=0)
    torch.testing.assert_close(got2, torch.stack([_recipe(w, 128) for w in w2]), rtol=0, atol=0)


def test_online_fp8_on_the_cpu_names_the_fix(tiny_checkpoints) -> None:
    with pytest.raises(ValueError, match=re.escape("on the CPU use --quantization int4")):
        LLM(str(tiny_checkpoints("qwen3-tiny")), device="cpu", quantization="fp8")


@pytest.mark.gpu
def test_online_fp8_on_the_gpu_follows_bf16(tiny_checkpoints) -> None:
    from tests.entrypoints.test_gpu_cuda_path import UTIL
    from tests.entrypoints.test_hf_parity import PROMPTS, check_logprobs_close
    from twinfer import SamplingParams

    path = str(tiny_checkpoints("qwen3-moe-tiny"))
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5)
    runs = {}
    for quant in (None, "fp8"):
        llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=2048, quantization=quant,
                  gpu_memory_utilization=UTIL)  # fmt: skip
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        runs[quant] = [(o.outputs[0].token_ids, [set(lp) for lp in o.outputs[0].logprobs])
                       for o in outs]  # fmt: skip
        del llm
    for i, (ours, ref) in enumerate(zip(runs["fp8"], runs[None], strict=True)):
        check_logprobs_close(ours, ref, f"fp8 prompt {i}")
