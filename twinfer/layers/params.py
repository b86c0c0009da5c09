"""Inference parameters and how checkpoint tensors are copied into them (shared by every layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the parameter expects.

    The model's `load_weights` catches it and re-raises with the checkpoint name.
    """

    def __init__(self, got: Sequence[int], expected: Sequence[int]) -> None:
        self.got = tuple(got)
        self.expected = tuple(expected)
        super().__init__(f"weight has shape {list(got)} but the model expects {list(expected)}")


def check_shape(loaded: Tensor, expected: Sequence[int]) -> None:
    """Raise `WeightShapeError` unless `loaded` has exactly the (full, unsharded) shape expected."""
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(loaded.shape, expected)


def new_param(*shape: int) -> nn.Parameter:
    """An uninitialised inference parameter in the current default dtype and device.

    NOTE: torch.empty, not an init function: the loader overwrites every value, so random init
    would only cost time (minutes for a large model).
    """
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def default_weight_loader(param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
    """Copy a replicated tensor as a whole (casting to the parameter's dtype)."""
    check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)


def in_param_units(
    param: Tensor, dim: int, full: int, start: int, n: int, prefix: str
) -> tuple[int, int, int]:
    """(full, start, n) along `dim` of a weight matrix in `param`'s units: elements, or the
    blocks of a format's parameter (`param.block_size`: elements per row and column of it, e.g. a
    scale block, a packed int32 word, a quantization group). Slices start on a block and end on
    one or at `full`."""
    block = getattr(param, "block_size", None)
    if block is None:
        return full, start, n
    b = block[dim]
    if start % b or (n % b and start + n != full):
        raise ValueError(
            f"{prefix}: {'rows' if dim == 0 else 'columns'} {start}..{start + n} of {full} do "
            f"not fall on the checkpoint's blocks of {b} (scales, packed words or groups); twinfer "
            "cannot split or fuse this quantized layer there."
        )
    return -(-full // b), start // b, -(-n // b)
