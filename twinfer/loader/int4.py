"""GGUF Q4_0 / Q4_1 / Q4_K linear weights kept on their int4 grid for the CPU, not dequantized.

A decode step on the CPU reads every weight once, so bytes per step set its speed: the Q4 grid
(4.5 bits a weight with its scales) is a quarter of bf16. The grid is exact: the int4 kernel
computes with the very values the GGUF holds, so only the activations' rounding differs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from twinfer.layers.linear import LinearBase
from twinfer.loader.gguf import GGUFCheckpoint
from twinfer.models.weights import resolve_name

logger = logging.getLogger(__name__)

_SHARD_ORDER = {"q": 0, "k": 1, "v": 2, 0: 0, 1: 1, None: 0}


def use_gguf_int4(model: nn.Module, checkpoint: GGUFCheckpoint) -> int:
    """Switch every linear layer whose whole weight is Q4 in the file to int4; returns how many."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    parts: dict[str, dict[object, tuple[torch.Tensor, ...]]] = {}
    for hf_name, grid in checkpoint.int4_weights():
        target = resolve_name(hf_name, params)
        if target is None:
            continue
        param_name, shard_id = target
        parts.setdefault(param_name, {})[shard_id] = grid

    converted = 0
    for param_name, shards in parts.items():
        module = modules.get(param_name.removesuffix(".weight"))
        if not isinstance(module, LinearBase) or module.parallel.tp_size != 1:
            continue
        if set(shards) != set(getattr(params[param_name], "shard_ids", {None})):
            continue  # some shard is not Q4 in the file: stay dense
        ordered = [shards[s] for s in sorted(shards, key=lambda s: _SHARD_ORDER[s])]
        q, scale, zero = (torch.cat(t) for t in zip(*ordered, strict=True))
        if q.shape != (module.output_size_local, module.input_size_local):
            continue
        module.use_int4(q, scale, zero)
        converted += 1
    logger.info("GGUF Q4 weights kept as int4 on the CPU in %d linear layers", converted)
    return converted
