"""A weight format is one object (vLLM's quantization method): it creates a linear layer's
parameters, loads checkpoint tensors into them, prepares them once after loading and applies the
layer. Linear layers hold a `LinearMethod` and never branch on formats.

Legend: `T` tokens, `N` output features (this rank's), `K` input features (this rank's).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase
    from twinfer.layers.moe.layer import MoELayer


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


class MoEMethod:
    """How an MoE layer's routed experts are stored in the checkpoint's format.

    NOTE: for now the experts are expanded once at load, layer by layer, to the model dtype the
    expert backends and the CPU engine's packer read (`dequantize`); a host layer is then packed
    in the engine's format (--moe-cpu-dtype) and its expanded copy freed, so the whole model is
    never held expanded in host RAM. Kernels that read the formats directly come next.
    """

    def create_weights(self, layer: MoELayer) -> None:
        """Register `w13_*` [E, 2I, H] and `w2_*` [E, H, I] parameters in this format; each
        carries `block_size` (elements per row and column of one expert's matrix) unless it is
        one element per weight."""
        raise NotImplementedError

    def dequantize(self, layer: MoELayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w13 [E, 2I, H], w2 [E, H, I]) in `dtype`, from the loaded parameters."""
        raise NotImplementedError

    def param_names(self) -> tuple[str, ...]:
        """The parameters `create_weights` registers (freed after `dequantize`)."""
        raise NotImplementedError

    def int4_group_scales(self, layer: MoELayer, group: int) -> tuple[Tensor, Tensor] | None:
        """For experts on a symmetric int4 grid in groups of `group` (the engine's): f32 group
        scales (w13 [E, 2I, H/g], w2 [E, H, I/g]) to pack the expanded weights with, losslessly;
        None otherwise (the engine then requantizes)."""
        return None


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

    def moe_int4_group(self) -> int | None:
        """The group size when the routed experts are stored as a symmetric int4 grid that the
        CPU engine packs losslessly (so `--moe-cpu-dtype keep` keeps int4); else None."""
        return None

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        """The format of the routed experts of the MoE block `prefix` (its checkpoint name, as
        ignore lists and targets spell it; `gate_proj` names an expert's gate projection there);
        None when they are plain."""
        return None

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


def module_matches(name: str, entry: str) -> bool:
    """Whether a checkpoint's ignore/target `entry` names module `name`: the name itself, its
    last components (`lm_head`), a parent of it, or `re:<regex>` (compressed-tensors)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry) or name.startswith(entry + ".")
