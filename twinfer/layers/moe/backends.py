"""Expert backends: the math of the routed experts behind one tiny interface and a registry.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size (this rank's slice).
A backend gets the stacked weights w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I] and
returns sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]). CUDA kernels and the native
CPU engine register here; model files never name a backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from twinfer.layers.activation import silu_and_mul


class ExpertBackend(Protocol):
    name: str

    def forward(
        self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor
    ) -> Tensor:
        """hidden [T, H], topk_weights [T, K], topk_ids [T, K] int, w13 [E, 2I, H], w2 [E, H, I]
        -> [T, H] in hidden's dtype."""
        ...


_BACKENDS: dict[str, Callable[[], ExpertBackend]] = {}


def register_expert_backend(name: str) -> Callable[[type], type]:
    """Class decorator: make a backend constructible by name."""

    def wrap(cls: type) -> type:
        _BACKENDS[name] = cls
        return cls

    return wrap


# Backends in their own modules, imported on first use (triton costs a second to import).
_LAZY = {"triton": "twinfer.layers.moe.triton_backend"}


def get_expert_backend(name: str) -> ExpertBackend:
    if name not in _BACKENDS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown MoE expert backend {name!r}; available: "
            f"{', '.join(available_expert_backends())}."
        )
    return _BACKENDS[name]()


def available_expert_backends() -> tuple[str, ...]:
    return tuple(sorted(set(_BACKENDS) | set(_LAZY)))


@register_expert_backend("torch")
class TorchExpertBackend:
    """Reference backend in plain torch: groups token slots by expert and runs one GEMM pair per
    expert that received tokens. Works on any device; the accuracy oracle for faster backends."""

    name = "torch"

    def forward(
        self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor
    ) -> Tensor:
        num_experts, k = w13.shape[0], topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)  # [T*K]
        # Stable sort so slots of one expert stay in token order.
        order = torch.argsort(flat_ids, stable=True)  # [T*K]
        token_of = order // k  # [T*K] token of each sorted slot
        weight_of = topk_weights.reshape(-1)[order]  # [T*K]
        counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # [E] (host sync)
        out = torch.zeros_like(hidden)  # [T, H]
        start = 0
        # NOTE: experts ascending and accumulated in hidden's dtype, the order and precision of
        # HF's eager experts loop, so bf16 results match transformers' rounding too.
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            idx = token_of[start : start + n]  # [n]
            x = hidden.index_select(0, idx)  # [n, H]
            y = F.linear(silu_and_mul(F.linear(x, w13[expert])), w2[expert])  # [n, H]
            # Weighted in the routing weights' dtype (promotes when they are float32), then cast.
            y = y * weight_of[start : start + n, None]
            out.index_add_(0, idx, y.to(out.dtype))
            start += n
        return out
