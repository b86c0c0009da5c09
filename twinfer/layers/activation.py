"""Gated activations: the input holds [gate | up] halves along the last dim."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from twinfer.layers.cuda_ops import cuda_ops

SUPPORTED_ACTIVATIONS = ("silu",)


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate | up]: [..., 2I] -> [..., I]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class SiluAndMul(nn.Module):
    """silu(gate) * up: [T, 2I] -> [T, I] (HF: act_fn(gate_proj(x)) * up_proj(x))."""

    def forward(self, x: Tensor) -> Tensor:
        if (ops := cuda_ops(x)) is not None:
            return ops.silu_and_mul(x)
        return silu_and_mul(x)


def get_act_and_mul(hidden_act: str) -> nn.Module:
    """The gated activation for config.hidden_act; a clear error for ones twinfer lacks."""
    if hidden_act in ("silu", "swish"):
        return SiluAndMul()
    raise ValueError(
        f"hidden_act {hidden_act!r} is not supported; twinfer supports: "
        f"{', '.join(SUPPORTED_ACTIVATIONS)}."
    )
