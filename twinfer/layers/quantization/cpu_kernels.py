"""CPU matmul kernels of plain weights: oneDNN-prepacked GEMMs and torch's int4 grid GEMM.

Legend: `T` tokens, `N` output features, `K` input features.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cpu_prepack(weight: Tensor) -> Tensor | None:
    """W repacked once into oneDNN's blocked layout for CPU GEMMs, or None where that can't run.

    NOTE: measured on a 2-core AMX Xeon, packed bf16 runs a decode step's GEMVs ~2x and its
    16-row GEMMs ~4x faster than F.linear on the plain weight (fp32: ~1.3x and ~1.8x). oneDNN's
    bf16 path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT: an AVX2-only CPU keeps bf16 weights plain.
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or not torch.backends.mkldnn.is_available()
        or (weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())
        or weight.numel() == 0
    ):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


INT4_GROUP = 32


def pack_int4(q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """An int4 grid (q [N, K] in 0..15, scale/zero [N, K/32]: w = (q - 8) * scale + zero) packed
    for torch's CPU int4 GEMM: (weight [N, K/2] uint8, scales_and_zeros [K/32, N, 2] in dtype)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def int4_linear(x: Tensor, int4: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4[0], INT4_GROUP, int4[1])
    return y if bias is None else y + bias


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """y = x W^T (+ b) with W from `cpu_prepack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
