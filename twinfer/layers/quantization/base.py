"""A weight format is one object (vLLM's quantization method): it creates a linear layer's
parameters, loads checkpoint tensors into them, prepares them once after loading and applies the
layer. Linear layers hold a `LinearMethod` and never branch on formats.

Legend: `T` tokens, `N` output features (this rank's), `K` input features (this rank's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class ExpertTensors:
    """Routed experts as a runtime packer takes them: w13 [E, 2I, H] (gate rows, then up rows)
    and w2 [E, H, I], float or float8_e4m3fn. With `scales` (f32 per row per group of `group`
    columns: w13 [E, 2I, H/g], w2 [E, H, I/g]) the values lie on that format's grid and pack
    as they are, with no dequantize-requantize round trip: float values w = q * scale (+ offset:
    `offsets`, same shapes, for grids with zero points), fp8 values times their scale."""

    w13: Tensor
    w2: Tensor
    group: int = 0
    scales: tuple[Tensor, Tensor] | None = None
    offsets: tuple[Tensor, Tensor] | None = None


class MoEMethod:
    """How an MoE layer's routed experts are stored in the checkpoint's format.

    Experts in host RAM go to their runtime as `expert_tensors` (the checkpoint's own values
    where the runtime keeps its format). Experts on the device are expanded once at load, layer
    by layer, to the model dtype the expert backends read (`dequantize`).
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
        """The parameters `create_weights` registers."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: MoELayer) -> None:
        """Prepare the loaded experts once (e.g. quantize them, for online formats)."""

    def runs_on(self, device: torch.device) -> bool:
        """Whether a fused MoE kernel reads these experts on `device` in this format (`apply`);
        otherwise device experts are expanded to the model dtype at load."""
        return False

    def prepare_device(self, layer: MoELayer) -> None:
        """Once, before `apply`: e.g. repack for the kernel."""

    def apply(
        self, layer: MoELayer, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor
    ) -> Tensor:
        """hidden [T, H] through the routed experts in this format -> [T, H]."""
        raise NotImplementedError

    def expert_tensors(self, layer: MoELayer, fmt: str, dtype: torch.dtype) -> ExpertTensors:
        """The experts for a runtime that stores them as `fmt` (an expert format name, e.g.
        "int4", "fp8"): this format's own grid where it is `fmt`'s, else dequantized to
        `dtype` (the runtime then converts them)."""
        w13, w2 = self.dequantize(layer, dtype)
        return ExpertTensors(w13, w2)


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

    def moe_kept_format(self) -> tuple[str, int] | None:
        """(expert format, group size) that keeps the routed experts' own values in the CPU
        expert engine (`--moe-cpu-dtype keep`), e.g. ("int4", 32) or ("fp8", 128); None when
        the engine has no such format (the experts then go in the model dtype)."""
        return None

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        """The format of the routed experts of the MoE block `prefix` (its checkpoint name, as
        ignore lists and targets spell it; `gate_proj` names an expert's gate projection there);
        None when they are plain."""
        return None

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterable[tuple[str, Tensor]]:
        """The checkpoint's (name, tensor) pairs as this format's parameters take them: a format
        published in another layout renames and repacks them here, one tensor at a time."""
        return weights

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
