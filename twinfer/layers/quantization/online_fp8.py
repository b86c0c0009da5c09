"""`--quantization fp8`: a bf16/fp16 checkpoint's linear weights quantized at load to block FP8
(e4m3, a scale per 128x128 block: DeepSeek-V3's format) and run like an FP8 checkpoint.

A decode step on a GPU reads every weight once, so FP8 halves its bytes against bf16. Each layer
is quantized right after it is loaded and its bf16 copy freed at once, so the whole model is
never held twice. Routers stay exact (a rounded router picks other experts). Routed experts are
quantized per layer too: kept in FP8 where the MoE kernels read it (the GPU's fused MoE, the CPU
expert engine with --moe-cpu-dtype keep), else expanded back to the model dtype.

Legend: `N` output features, `K` input features, `E` experts, `H` hidden, `I` expert inner size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from twinfer.layers.params import new_param
from twinfer.layers.quantization.base import LinearMethod, MoEMethod, QuantizationConfig
from twinfer.layers.quantization.fp8 import (
    Fp8BlockLinearMethod,
    Fp8BlockMoEMethod,
    quantize_blocks,
)
from twinfer.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase
    from twinfer.layers.moe.layer import MoELayer

BLOCK = (128, 128)


class OnlineFp8Config(QuantizationConfig):
    name = "fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OnlineFp8Config:
        return cls()

    @staticmethod
    def check_device(device: torch.device, dtype: torch.dtype) -> None:
        if device.type != "cuda":
            raise ValueError(
                "--quantization fp8 runs on a GPU's FP8 kernels; on the CPU use --quantization "
                "int4 (its int4 kernel), or drop the flag."
            )
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("--quantization fp8 computes in bf16/fp16; add --dtype bfloat16.")

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix.endswith(".gate"):
            return UnquantizedLinearMethod()
        return OnlineFp8LinearMethod(BLOCK)

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        return OnlineFp8MoEMethod(BLOCK)

    def moe_kept_format(self) -> tuple[str, int] | None:
        return ("fp8", BLOCK[1])

    def describe(self) -> str:
        return "fp8 (quantized at load: e4m3, blocks of 128x128, dynamic activations)"


class OnlineFp8LinearMethod(Fp8BlockLinearMethod):
    """Loads the plain weight, then replaces it by its FP8 blocks and their scales."""

    def create_weights(self, layer: LinearBase) -> None:
        UnquantizedLinearMethod().create_weights(layer)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight, scale = quantize_blocks(layer.weight.data, self.block)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
        super().process_weights_after_loading(layer)


class OnlineFp8MoEMethod(Fp8BlockMoEMethod):
    """Plain expert parameters while loading; FP8 blocks once the layer is loaded, where a kernel
    reads them (`keeps_fp8`), else they stay plain (no lossy round trip)."""

    def __init__(self, block: tuple[int, int]) -> None:
        super().__init__(block)
        self.quantized = False

    def create_weights(self, layer: MoELayer) -> None:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size_local
        layer.w13_weight = new_param(e, 2 * i, h)
        layer.w2_weight = new_param(e, h, i)

    def param_names(self) -> tuple[str, ...]:
        return self.names if self.quantized else ("w13_weight", "w2_weight")

    def process_weights_after_loading(self, layer: MoELayer) -> None:
        if self.quantized or not self.keeps_fp8(layer):
            return
        i = layer.intermediate_size_local
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        q13, s13, q2, s2 = [], [], [], []
        for e in range(layer.num_experts):  # one expert at a time: a small temporary
            (gate, s_gate), (up, s_up) = (quantize_blocks(w, self.block) for w in w13[e].split(i))
            q13.append(torch.cat([gate, up]))
            s13.append(torch.cat([s_gate, s_up]))  # gate blocks, then up blocks: a checkpoint's
            q, s = quantize_blocks(w2[e], self.block)
            q2.append(q)
            s2.append(s)
        del w13, w2
        for name, tensors in (
            ("w13_weight", q13), ("w13_weight_scale_inv", s13),
            ("w2_weight", q2), ("w2_weight_scale_inv", s2),
        ):  # fmt: skip
            setattr(layer, name, torch.nn.Parameter(torch.stack(tensors), requires_grad=False))
        self.quantized = True

    def keeps_fp8(self, layer: MoELayer) -> bool:
        if layer.on_host:
            return layer.placement.formats[0] == "fp8"
        return self.runs_on(layer.w13_weight.device)

    def dequantize(self, layer: MoELayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if not self.quantized:
            return layer.w13_weight.data.to(dtype), layer.w2_weight.data.to(dtype)
        return super().dequantize(layer, dtype)
