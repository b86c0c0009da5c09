"""GGUF files' Q4 matrices (Q4_0, Q4_1, Q4_K) kept on their int4 grid instead of inflated to the
model dtype: routed experts (stacked `ffn_*_exps`) in the CPU expert engine, and on the CPU with
bf16/fp16 activations the dense linear layers, on torch's int4 kernel.

Each Q4 block of 32 is value = (q - 8) * scale + zero (loader/gguf.py's `q4_grid`), exactly the
engine's int4z format (a scale and an offset per row and group of 32), so `--moe-cpu-dtype keep`
packs them losslessly. A GGUF mixes types (Q4_K_M stores half the down projections as Q6_K):
a layer's other expert matrices come dequantized and are quantized to int4z (min/max per group)
beside them, one log line says how many. A dense layer is kept when all the matrices it fuses
(q/k/v, gate/up) are Q4: a decode step on the CPU then reads a quarter of bf16's bytes.

Legend: `E` experts, `H` hidden, `I` expert inner size, `G` = columns / 32 groups a row.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from twinfer.layers.params import new_param
from twinfer.layers.quantization.base import (
    ExpertTensors,
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
    fused_names,
    quant_param,
)
from twinfer.layers.quantization.cpu_kernels import int4_linear, pack_int4
from twinfer.layers.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase
    from twinfer.layers.moe.layer import MoELayer

logger = logging.getLogger(__name__)

GROUP = 32
_LAYER = re.compile(r"layers\.(\d+)\.")


class GgufGridConfig(UnquantizedConfig):
    """A GGUF's Q4 matrices kept as grids: experts `grid_parts` = {(layer, "w13" | "w2")}, dense
    layers whose every fused matrix is among `q4_dense` (HF module names)."""

    name = "gguf"

    def __init__(self, grid_parts: set[tuple[int, str]], q4_dense: set[str] = frozenset()) -> None:
        self.grid_parts = grid_parts
        fused = {name: fused_names(_fused_prefix(name)) for name in q4_dense}
        # The HF modules the loader hands over as grids (all of their fused layer is Q4).
        self.dense_modules = frozenset(n for n, group in fused.items() if set(group) <= q4_dense)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        return cls(set(config.get("grid_parts", ())), set(config.get("q4_dense", ())))

    def linear_method(self, prefix: str) -> LinearMethod:
        if fused_names(prefix)[0] in self.dense_modules:
            return GgufInt4LinearMethod()
        return UnquantizedLinearMethod()

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        m = _LAYER.search(prefix + ".")
        parts = {p for layer, p in self.grid_parts if m and layer == int(m[1])}
        return GgufGridMoEMethod(parts) if parts else None

    def moe_kept_format(self) -> tuple[str, int] | None:
        return ("int4z", GROUP) if self.grid_parts else None

    def describe(self) -> str:
        layers = len({layer for layer, _ in self.grid_parts})
        parts = [f"{len(self.dense_modules)} dense matrices"] if self.dense_modules else []
        parts += [f"the experts of {layers} layers"] if layers else []
        return f"gguf (Q4 on their int4 grid: {' and '.join(parts)})"


def _fused_prefix(module: str) -> str:
    """The twinfer layer an HF module loads into (q_proj -> qkv_proj, up_proj -> gate_up_proj)."""
    head, _, leaf = module.rpartition(".")
    return f"{head}.{_FUSED_INTO.get(leaf, leaf)}"


_FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
_FUSED_INTO |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


class GgufInt4LinearMethod(LinearMethod):
    """A dense layer from its Q4 grid: `grid_q` uint8 [N, K] (0..15), `grid_scale` and
    `grid_zero` float32 [N, K/32], W = (q - 8) * scale + zero; run by torch's CPU int4 kernel
    (rows packed in 16s; a layer of other row counts computes with W dequantized)."""

    def create_weights(self, layer: LinearBase) -> None:
        n, k = layer.output_size_local, layer.input_size_local
        if k % GROUP:
            raise ValueError(f"{layer.prefix}: GGUF Q4 weights need {k} % 32 == 0.")
        layer.grid_q = quant_param(torch.empty(n, k, dtype=torch.uint8), layer)
        for name in ("grid_scale", "grid_zero"):
            p = quant_param(torch.empty(n, k // GROUP, dtype=torch.float32), layer)
            p.block_size = (1, GROUP)
            setattr(layer, name, p)
        layer.quant_dtype = torch.get_default_dtype()
        layer.dense_weight = None

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if layer.int4_weight is not None or layer.dense_weight is not None:
            return
        q, scale, zero = layer.grid_q.data, layer.grid_scale.data, layer.grid_zero.data
        if layer.output_size_local % 16:
            w = (q.float() - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(
                GROUP, 1
            )
            layer.dense_weight = w.to(layer.quant_dtype)
        else:
            layer.int4_weight = pack_int4(q.to(torch.int32), scale, zero, layer.quant_dtype)
        for name in ("grid_q", "grid_scale", "grid_zero"):
            getattr(layer, name).data = getattr(layer, name).data.new_empty(0)

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        if layer.dense_weight is not None:
            return F.linear(x, layer.dense_weight, bias)
        return int4_linear(x, layer.int4_weight, bias)


class GgufGridMoEMethod(MoEMethod):
    """Per expert matrix kind in `parts`: `{w}_grid_q` uint8 [E, R, C] (0..15), `{w}_grid_scale`
    and `{w}_grid_zero` float32 [E, R, C/32]; the other kind: `{w}_weight` in the model dtype."""

    def __init__(self, parts: set[str]) -> None:
        self.parts = parts

    def param_names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = ()
        for w in ("w13", "w2"):
            if w in self.parts:
                names += (f"{w}_grid_q", f"{w}_grid_scale", f"{w}_grid_zero")
            else:
                names += (f"{w}_weight",)
        return names

    def create_weights(self, layer: MoELayer) -> None:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size_local
        for w, rows, cols in (("w13", 2 * i, h), ("w2", h, i)):
            if w not in self.parts:
                setattr(layer, f"{w}_weight", new_param(e, rows, cols))
                continue
            if cols % GROUP:
                raise ValueError(f"{layer.prefix}: GGUF Q4 experts need {cols} % 32 == 0.")
            q = torch.empty(e, rows, cols, dtype=torch.uint8)
            setattr(layer, f"{w}_grid_q", torch.nn.Parameter(q, requires_grad=False))
            for name in ("grid_scale", "grid_zero"):
                p = torch.nn.Parameter(torch.empty(e, rows, cols // GROUP), requires_grad=False)
                p.block_size = (1, GROUP)
                setattr(layer, f"{w}_{name}", p)

    def _values(self, layer: MoELayer, w: str, dtype: torch.dtype) -> Tensor:
        if w not in self.parts:
            return getattr(layer, f"{w}_weight").data.to(dtype)
        q = getattr(layer, f"{w}_grid_q").data
        scale = getattr(layer, f"{w}_grid_scale").data.repeat_interleave(GROUP, -1)
        zero = getattr(layer, f"{w}_grid_zero").data.repeat_interleave(GROUP, -1)
        return ((q.float() - 8) * scale + zero).to(dtype)

    def dequantize(self, layer: MoELayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self._values(layer, "w13", dtype), self._values(layer, "w2", dtype)

    def expert_tensors(self, layer: MoELayer, fmt: str, dtype: torch.dtype) -> ExpertTensors:
        if fmt != "int4z":
            return super().expert_tensors(layer, fmt, dtype)
        # NOTE: float32 values (one layer at a time): a Q4_1/Q4_K zero may be many scales away
        # from the values, which bf16 would not keep to within half a step.
        w13, w2 = self.dequantize(layer, torch.float32)
        scales, offsets = [], []
        for w, values in (("w13", w13), ("w2", w2)):
            if w in self.parts:
                scales.append(getattr(layer, f"{w}_grid_scale").data)
                offsets.append(getattr(layer, f"{w}_grid_zero").data)
            else:
                s, m = min_max_groups(values)
                scales.append(s)
                offsets.append(m)
        missing = {"w13": "gate/up", "w2": "down"}
        if requantized := [missing[w] for w in ("w13", "w2") if w not in self.parts]:
            logger.info(
                "%s: %s experts are not Q4 in the file: quantized to int4 with zero points "
                "(groups of 32)", layer.prefix, " and ".join(requantized),
            )  # fmt: skip
        return ExpertTensors(w13, w2, GROUP, (scales[0], scales[1]), (offsets[0], offsets[1]))


def min_max_groups(w: Tensor) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 per group of 32: (scale, offset) [..., C/32] with w ~ q * scale + offset,
    q in -8..7: scale = (max - min) / 15, offset = min + 8 * scale (a constant group: scale 1,
    so its q is -8 and the value exact)."""
    groups = w.reshape(*w.shape[:-1], -1, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo + 8 * scale
