"""GGUF files' Q4 routed experts (Q4_0, Q4_1, Q4_K stacked `ffn_*_exps`) kept on their int4 grid
in the CPU expert engine, instead of inflated to the model dtype.

Each Q4 block of 32 is value = (q - 8) * scale + zero (loader/gguf.py's `q4_grid`), exactly the
engine's int4z format (a scale and an offset per row and group of 32), so `--moe-cpu-dtype keep`
packs them losslessly. A GGUF mixes types (Q4_K_M stores half the down projections as Q6_K):
a layer's other expert matrices come dequantized and are quantized to int4z (min/max per group)
beside them, one log line says how many. Dense layers are the loader's business (GGUF Q4 dense
weights run on torch's int4 kernel: loader/int4.py).

Legend: `E` experts, `H` hidden, `I` expert inner size, `G` = columns / 32 groups a row.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from twinfer.layers.params import new_param
from twinfer.layers.quantization.base import ExpertTensors, MoEMethod, QuantizationConfig
from twinfer.layers.quantization.unquantized import UnquantizedConfig

if TYPE_CHECKING:
    from twinfer.layers.moe.layer import MoELayer

logger = logging.getLogger(__name__)

GROUP = 32
_LAYER = re.compile(r"layers\.(\d+)\.")


class GgufGridConfig(UnquantizedConfig):
    """A GGUF whose stacked experts are partly Q4: `grid_parts` = {(layer, "w13" | "w2")}."""

    name = "gguf"

    def __init__(self, grid_parts: set[tuple[int, str]]) -> None:
        self.grid_parts = grid_parts

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        return cls(set(config.get("grid_parts", ())))

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        m = _LAYER.search(prefix + ".")
        parts = {p for layer, p in self.grid_parts if m and layer == int(m[1])}
        return GgufGridMoEMethod(parts) if parts else None

    def moe_kept_format(self) -> tuple[str, int] | None:
        return ("int4z", GROUP) if self.grid_parts else None

    def describe(self) -> str:
        layers = len({layer for layer, _ in self.grid_parts})
        return f"gguf (Q4 experts of {layers} layers on their int4 grid)"


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
