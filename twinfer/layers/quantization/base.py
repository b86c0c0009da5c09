"""A weight format is one object (vLLM's quantization method): it creates a linear layer's
parameters, loads checkpoint tensors into them, prepares them once after loading and applies the
layer. Linear layers hold a `LinearMethod` and never branch on formats.

Legend: `T` tokens, `N` output features (this rank's), `K` input features (this rank's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase


class LinearMethod:
    """How one linear layer stores and applies its weight."""

    def create_weights(self, layer: LinearBase) -> None:
        """Register the layer's weight parameters (each with `weight_loader = layer.weight_loader`)
        for [N, K] = (layer.output_size_local, layer.input_size_local)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Prepare the loaded weights once for the runtime kernel."""

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [T, K] -> x W^T (+ bias) [T, N]."""
        raise NotImplementedError


class QuantizationConfig:
    """A checkpoint's `quantization_config` (or `--quantization`): which method each layer gets."""

    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        raise NotImplementedError

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the linear layer named `prefix` (e.g. model.layers.0.self_attn.qkv_proj);
        layers the checkpoint leaves unquantized get the plain one."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start-up log."""
        return self.name


# Checkpoint projections a fused twinfer layer is made of (ignore lists and groups name those).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_names(prefix: str) -> list[str]:
    """The checkpoint names of layer `prefix`: its projections when it fuses several."""
    head, _, leaf = prefix.rpartition(".")
    return [f"{head}.{part}" for part in _FUSED.get(leaf, ())] or [prefix]


def quant_param(data: Tensor, layer: LinearBase) -> nn.Parameter:
    """A format's parameter, filled by the layer's (sharding) weight loader."""
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = layer.weight_loader
    return param
