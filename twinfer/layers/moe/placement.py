"""Where each routed expert's weights live and in which runtime format, and the interfaces a
placement policy (hybrid/placement.py) gives MoE layers: the layer never looks one up itself.

A placement never changes the math: all-GPU, all-host and mixed placements give the same tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from twinfer.layers.moe.layer import MoELayer

EXPERT_LOCATIONS = ("gpu", "host")
EXPERT_FORMATS = ("bf16", "fp16", "fp32", "fp8", "int8", "int4", "int4z")
_DTYPE_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def format_of_dtype(dtype: torch.dtype) -> str:
    """The expert format name of an unquantized model dtype ("bf16", "fp16", "fp32")."""
    if dtype not in _DTYPE_FORMATS:
        raise ValueError(f"dtype {dtype} has no expert format; use bfloat16, float16 or float32.")
    return _DTYPE_FORMATS[dtype]


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """Per expert: `locations[e]` in EXPERT_LOCATIONS, `formats[e]` in EXPERT_FORMATS.

    "gpu" means the model's own device (the CPU itself in a CPU-only run); "host" means host RAM,
    served by the CPU expert engine or streamed to the GPU.
    """

    locations: tuple[str, ...]
    formats: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.locations) != len(self.formats):
            raise ValueError(
                f"expert placement has {len(self.locations)} locations but {len(self.formats)} "
                "formats; give one of each per expert."
            )
        for what, values, allowed in (
            ("location", self.locations, EXPERT_LOCATIONS),
            ("format", self.formats, EXPERT_FORMATS),
        ):
            bad = sorted(set(values) - set(allowed))
            if bad:
                raise ValueError(f"unknown expert {what} {bad}; choose from {', '.join(allowed)}.")

    @classmethod
    def uniform(
        cls, num_experts: int, location: str = "gpu", fmt: str | None = None
    ) -> ExpertPlacement:
        """Every expert at `location` in `fmt` (default: the current default dtype's format)."""
        fmt = fmt or format_of_dtype(torch.get_default_dtype())
        return cls((location,) * num_experts, (fmt,) * num_experts)

    @property
    def num_experts(self) -> int:
        return len(self.locations)

    def experts_at(self, location: str) -> list[int]:
        """Expert ids whose weights live at `location`, ascending."""
        return [e for e, loc in enumerate(self.locations) if loc == location]

    def summary(self) -> str:
        """One line for the startup log, e.g. '128 experts: 96 gpu/bf16, 32 host/int4'."""
        counts = Counter(zip(self.locations, self.formats, strict=True))
        parts = ", ".join(f"{n} {loc}/{fmt}" for (loc, fmt), n in sorted(counts.items()))
        return f"{self.num_experts} experts: {parts}"


class RoutedExperts(Protocol):
    """A layer's routed experts where they run (e.g. host RAM on the CPU expert engine)."""

    nbytes: int

    def forward(self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        """hidden [T, H], topk_weights [T, K], topk_ids [T, K] -> [T, H] in hidden's dtype."""
        ...


class HostExpertBuilder(Protocol):
    """Turns a loaded MoE layer's host experts into the runtime that serves them."""

    def build(self, layer: MoELayer) -> RoutedExperts:
        """The layer's loaded expert weights (in host memory, in the checkpoint's format:
        `layer.quant_method`) packed once for the runtime; the layer frees its copy after."""
        ...


class ExpertPlan(Protocol):
    """Where each MoE layer of a model keeps its routed experts (given to the model when it is
    built; hybrid.placement.MoEPlan is the one the flags make)."""

    def layer_placement(
        self, prefix: str, num_experts: int
    ) -> tuple[ExpertPlacement, HostExpertBuilder | None]:
        """The placement of MoE layer `prefix`, and the builder of its host experts (None when
        they all live on the model's device)."""
        ...
