"""`--quantization int4` (alias `sym_int4`): a bf16/fp16 checkpoint's dense linear weights
quantized at load to a symmetric int4 grid in groups of 32 and run by torch's CPU int4 kernel.

A CPU decode step reads every weight once, so its speed follows the bytes: int4 with its group
scales is about a quarter of bf16. Each layer is quantized right after the checkpoint is loaded and
its bf16 copy freed at once, so the whole model is never held twice. Routed experts follow
`--moe-cpu-dtype` (the CPU engine's own int4), not this setting.

Legend: `N` output features, `K` input features, `G` = K / 32 groups a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from twinfer.layers.quantization.base import LinearMethod, QuantizationConfig
from twinfer.layers.quantization.cpu_kernels import INT4_GROUP, int4_linear, pack_int4
from twinfer.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase


class OnlineInt4Config(QuantizationConfig):
    name = "int4"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OnlineInt4Config:
        return cls()

    @staticmethod
    def check_device(device: torch.device, dtype: torch.dtype) -> None:
        if device.type != "cpu":
            raise ValueError(
                "--quantization int4 runs on the CPU's int4 kernel; on a GPU use --quantization "
                "fp8 (or drop the flag)."
            )
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                "--quantization int4 computes with bf16/fp16 activations (torch's int4 kernel); "
                "add --dtype bfloat16."
            )

    def linear_method(self, prefix: str) -> LinearMethod:
        # NOTE: routers stay exact: a rounded router picks other experts (quantized checkpoints
        # leave them out too); they are a sliver of the bytes.
        if prefix.endswith(".gate"):
            return UnquantizedLinearMethod()
        return OnlineInt4LinearMethod()

    def describe(self) -> str:
        return "int4 (quantized at load: symmetric, groups of 32, torch's CPU int4 kernel)"


class OnlineInt4LinearMethod(UnquantizedLinearMethod):
    """Loads the plain weight, then replaces it by its int4 grid (`quantize_int4`)."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        w = layer.weight.data
        n, k = w.shape
        # torch's kernel packs rows in 16s and columns in groups of 32; other layers stay plain.
        if w.device.type != "cpu" or n % 16 or k % INT4_GROUP or w.dtype == torch.float32:
            return super().process_weights_after_loading(layer)
        q, scale = quantize_int4(w)
        layer.int4_weight = pack_int4(q + 8, scale, torch.zeros_like(scale), w.dtype)
        layer.weight.data = w.new_empty(0)

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        if layer.int4_weight is not None:
            return int4_linear(x, layer.int4_weight, bias)
        return super().apply(layer, x, bias)


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q [N, K] int32 in -8..7, scale [N, G] float32): scale = absmax / 7 of each
    group of 32 (the CPU expert engine's rule), q = round(w / scale); an all-zero group has scale 0
    and q 0."""
    n, k = w.shape
    groups = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    scale = groups.abs().amax(-1) / 7  # [N, G]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe[..., None]).clamp_(-8, 7).to(torch.int32)
    return q.reshape(n, k), scale
