"""Which kernels a layer runs: fused Triton ops on a CUDA GPU, torch ops everywhere else.

NOTE: layers ask per call (`cuda_ops(x)`), vLLM's CustomOp idea without the class: model files
stay device-free, the CPU path keeps the torch code that matches transformers, and triton is
imported only when a CUDA tensor first needs it.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

from torch import Tensor


@functools.cache
def _triton_module(name: str) -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(name)


def cuda_ops(x: Tensor) -> ModuleType | None:
    """`twinfer.layers.fused_ops` when x is on a CUDA GPU and triton is installed, else None."""
    return _triton_module("twinfer.layers.fused_ops") if x.is_cuda else None


def cuda_moe_ops(x: Tensor) -> ModuleType | None:
    """`twinfer.layers.moe.triton_kernels` (fused routing) under the same rule."""
    return _triton_module("twinfer.layers.moe.triton_kernels") if x.is_cuda else None
