"""Block FP8 weights as DeepSeek-V3, MiniMax-M2 and the Qwen FP8 releases ship them.

`quantization_config: {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
weight_block_size: [128, 128]}`: each linear weight is float8_e4m3fn [N, K] beside a float32
`weight_scale_inv` [ceil(N/bn), ceil(K/bk)], and W = weight * scale of its (bn x bk) block.

Legend: `T` tokens, `N` output features, `K` input features, `bn`/`bk` the block's rows/columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from twinfer.layers.quantization.base import (
    ExpertTensors,
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
    fused_names,
    module_matches,
    quant_param,
)
from twinfer.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase
    from twinfer.layers.moe.layer import MoELayer

FP8_DTYPE = torch.float8_e4m3fn


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, block: tuple[int, int], ignored: list[str]) -> None:
        self.block = block
        self.ignored = ignored

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        fmt = config.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):  # MiniMax-M2 spells it out
            raise ValueError(f"quantization_config fmt {fmt!r}: twinfer reads e4m3 FP8 weights.")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"quantization_config activation_scheme {scheme!r} is not supported; twinfer "
                "runs FP8 checkpoints with dynamic activations (the DeepSeek/Qwen block format)."
            )
        block = config.get("weight_block_size")
        if block is None:
            raise ValueError(
                "this FP8 checkpoint has one scale per tensor (no weight_block_size), which "
                "twinfer does not load yet; block-scaled FP8 ([128, 128]) is supported."
            )
        if (
            not isinstance(block, list | tuple)
            or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise ValueError(
                f"quantization_config weight_block_size must be two positive ints, got {block!r}."
            )
        ignored = config.get("modules_to_not_convert") or config.get("ignored_layers") or []
        return cls((block[0], block[1]), [str(name) for name in ignored])

    def linear_method(self, prefix: str) -> LinearMethod:
        if is_ignored(prefix, self.ignored):
            return UnquantizedLinearMethod()
        return Fp8BlockLinearMethod(self.block)

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        expert = f"{prefix}.experts.0.{gate_proj}"
        if is_ignored(f"{prefix}.experts", self.ignored) or is_ignored(expert, self.ignored):
            return None
        return Fp8BlockMoEMethod(self.block)

    def moe_kept_format(self) -> tuple[str, int] | None:
        # The engine's fp8 keeps a scale per row per group of 32/64/128 columns: a block's
        # scale is repeated over its rows.
        bn, bk = self.block
        return ("fp8", bk) if bk in (32, 64, 128) else None

    def describe(self) -> str:
        return f"fp8 (e4m3, blocks of {self.block[0]}x{self.block[1]}, dynamic activations)"


def is_ignored(prefix: str, ignored: list[str]) -> bool:
    """Whether the layer `prefix` stays unquantized; a fused layer needs all or none of its
    checkpoint projections listed."""
    names = fused_names(prefix)
    hits = [any(module_matches(name, entry) for entry in ignored) for name in names]
    if any(hits) and not all(hits):
        raise ValueError(
            f"{prefix}: the checkpoint quantizes some of {', '.join(names)} but not all; twinfer "
            "fuses them into one layer, which needs one format."
        )
    return all(hits)


class Fp8BlockLinearMethod(LinearMethod):
    """Keeps the FP8 bytes and block scales. On a GPU: the Triton W8A8 block GEMM (activations
    quantized per token and bk columns, DeepSeek's recipe). Elsewhere W dequantized to the
    activations' dtype.

    NOTE: the reference path (the CPU has no FP8 GEMM) expands the weight each call, which costs
    a [N, K] temporary; the memory held stays 1 byte per weight.
    """

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def create_weights(self, layer: LinearBase) -> None:
        n, k = layer.output_size_local, layer.input_size_local
        bn, bk = self.block
        layer.weight = quant_param(torch.empty(n, k, dtype=FP8_DTYPE), layer)
        scale = quant_param(torch.empty(-(-n // bn), -(-k // bk), dtype=torch.float32), layer)
        scale.block_size = self.block  # the layer's loaders slice it in blocks
        layer.weight_scale_inv = scale

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        if x.is_cuda:
            from twinfer.layers.quantization.triton_kernels import w8a8_block_fp8_matmul

            rows = x.reshape(-1, x.shape[-1])
            y = w8a8_block_fp8_matmul(rows, layer.weight, layer.weight_scale_inv, self.block, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        w = dequantize_blocks(layer.weight, layer.weight_scale_inv, self.block, x.dtype)
        return F.linear(x, w, bias)


class Fp8ChannelLinearMethod(Fp8BlockLinearMethod):
    """FP8 with a scale per output row (compressed-tensors' channel strategy): blocks of one row
    by the whole input, so `weight_scale_inv` is [N, 1] and activations are quantized per
    token."""

    def __init__(self) -> None:
        super().__init__((1, 0))

    def create_weights(self, layer: LinearBase) -> None:
        self.block = (1, layer.input_size_local)
        super().create_weights(layer)


def quantize_blocks(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (FP8 e4m3 [N, K], float32 scales [ceil(N/bn), ceil(K/bk)]): each block's
    scale is its absmax / 448 (e4m3's largest), so w ~ fp8 * scale (`dequantize_blocks`)."""
    n, k = w.shape
    bn, bk = block
    padded = torch.nn.functional.pad(w.float(), (0, -k % bk, 0, -n % bn))
    blocks = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)) / torch.finfo(FP8_DTYPE).max  # [N/bn, K/bk]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / safe[:, None, :, None]).reshape(padded.shape)[:n, :k].to(FP8_DTYPE)
    return q.contiguous(), scale


def dequantize_blocks(
    weight: Tensor, scale: Tensor, block: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """weight [N, K] (fp8) times its blocks' scales [ceil(N/bn), ceil(K/bk)] -> [N, K] dtype."""
    n, k = weight.shape
    s = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (weight.to(torch.float32) * s).to(dtype)


class Fp8BlockMoEMethod(MoEMethod):
    """Routed experts as published: w13 [E, 2I, H] and w2 [E, H, I] in FP8 with block scales;
    w13's scale rows hold the gate's blocks, then the up projection's."""

    names = ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv")

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block
        self.quantized = True

    def param_names(self) -> tuple[str, ...]:
        return self.names

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda"  # the fused Triton MoE reads block FP8

    def apply(
        self, layer: MoELayer, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor
    ) -> Tensor:
        from twinfer.layers.moe.triton_kernels import MoEQuant, fused_moe

        quant = MoEQuant(
            "fp8_block", layer.w13_weight_scale_inv, layer.w2_weight_scale_inv, block=self.block
        )
        return fused_moe(
            hidden, topk_weights, topk_ids, layer.w13_weight, layer.w2_weight, quant=quant
        )

    def create_weights(self, layer: MoELayer) -> None:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size_local
        bn, bk = self.block
        layer.w13_weight = quant_param(torch.empty(e, 2 * i, h, dtype=FP8_DTYPE), layer)
        layer.w2_weight = quant_param(torch.empty(e, h, i, dtype=FP8_DTYPE), layer)
        w13_scale = torch.empty(e, 2 * -(-i // bn), -(-h // bk), dtype=torch.float32)
        w2_scale = torch.empty(e, -(-h // bn), -(-i // bk), dtype=torch.float32)
        layer.w13_weight_scale_inv = quant_param(w13_scale, layer)
        layer.w2_weight_scale_inv = quant_param(w2_scale, layer)
        for scale in (layer.w13_weight_scale_inv, layer.w2_weight_scale_inv):
            scale.block_size = self.block

    def dequantize(self, layer: MoELayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        i = layer.intermediate_size_local
        w13 = torch.empty(layer.w13_weight.shape, dtype=dtype, device=layer.w13_weight.device)
        w2 = torch.empty(layer.w2_weight.shape, dtype=dtype, device=layer.w2_weight.device)
        half = layer.w13_weight_scale_inv.shape[1] // 2
        for e in range(layer.num_experts):  # one expert at a time: a small temporary
            weight, scale = layer.w13_weight[e], layer.w13_weight_scale_inv[e]
            w13[e, :i] = dequantize_blocks(weight[:i], scale[:half], self.block, dtype)
            w13[e, i:] = dequantize_blocks(weight[i:], scale[half:], self.block, dtype)
            w2[e] = dequantize_blocks(
                layer.w2_weight[e], layer.w2_weight_scale_inv[e], self.block, dtype
            )
        return w13, w2

    def expert_tensors(self, layer: MoELayer, fmt: str, dtype: torch.dtype) -> ExpertTensors:
        if fmt != "fp8" or self.block[1] not in (32, 64, 128):
            return super().expert_tensors(layer, fmt, dtype)
        i, h = layer.intermediate_size_local, layer.hidden_size
        half = layer.w13_weight_scale_inv.shape[1] // 2
        s13 = layer.w13_weight_scale_inv.data
        scales = (
            torch.cat(
                [self.row_scales(s13[:, :half], i, h), self.row_scales(s13[:, half:], i, h)], 1
            ),
            self.row_scales(layer.w2_weight_scale_inv.data, h, i),
        )
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        return ExpertTensors(w13, w2, self.block[1], scales)

    def row_scales(self, scale: Tensor, rows: int, cols: int) -> Tensor:
        """Block scales [E, ceil(R/bn), ceil(C/bk)] -> f32 per row per group of bk [E, R, C/bk]
        (C a multiple of bk)."""
        if cols % self.block[1]:
            raise ValueError(
                f"expert input size {cols} is not a multiple of the FP8 block's {self.block[1]} "
                "columns; use --moe-cpu-dtype bf16 for this checkpoint."
            )
        return scale.float().repeat_interleave(self.block[0], 1)[:, :rows].contiguous()
