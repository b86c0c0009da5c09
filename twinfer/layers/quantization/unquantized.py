"""Plain weights in the model dtype: prepacked for oneDNN on the CPU, cuBLAS or a one-row GEMV on
the GPU.

Legend: `T` tokens, `N` output features, `K` input features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from twinfer.layers.cuda_ops import cuda_ops
from twinfer.layers.params import new_param
from twinfer.layers.quantization.base import LinearMethod, QuantizationConfig
from twinfer.layers.quantization.cpu_kernels import cpu_prepack, packed_linear

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = new_param(layer.output_size_local, layer.input_size_local)
        layer.weight.weight_loader = layer.weight_loader

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """CPU: W prepacked once for oneDNN and the plain copy freed."""
        packed = cpu_prepack(layer.weight)
        if packed is not None:
            layer.packed_weight = packed
            layer.weight.data = layer.weight.data.new_empty(0)

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        if layer.packed_weight is not None:
            return packed_linear(x, layer.packed_weight, bias)
        if x.dim() == 2 and x.shape[0] == 1 and (ops := cuda_ops(x)) is not None:
            return ops.gemv(x, layer.weight, bias)  # decode of one sequence: one streaming kernel
        return F.linear(x, layer.weight, bias)


class UnquantizedConfig(QuantizationConfig):
    """No quantization_config: every layer keeps plain weights."""

    name = "none"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UnquantizedConfig:
        return cls()

    def linear_method(self, prefix: str) -> LinearMethod:
        return UnquantizedLinearMethod()

    def describe(self) -> str:
        return "none (the checkpoint's dtype)"
