"""Linear layers that shard over tensor-parallel ranks and load checkpoint tensors (vLLM style).

Shapes: `T` tokens; weights are [out, in] like nn.Linear. Column layers split the output dim across
ranks (no communication), row layers split the input dim and all-reduce their partial sums. Each
parameter carries a `weight_loader(param, loaded_weight, shard_id)` that takes the full checkpoint
tensor and copies in this rank's slice, so a loader never needs to know how a layer is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinfer.layers.cuda_ops import cuda_ops
from twinfer.parallel import ParallelConfig


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


def tp_all_reduce(x: Tensor, parallel: ParallelConfig) -> Tensor:
    """Sum `x` over the tensor-parallel group (a no-op at tp 1)."""
    if parallel.tp_size == 1:
        return x
    # NOTE: assumes the default process group is the tensor-parallel group (one TP group per
    # process set); moves to a communicator module once there is pipeline or data parallelism.
    torch.distributed.all_reduce(x)
    return x


def tp_all_gather(x: Tensor, parallel: ParallelConfig) -> Tensor:
    """Concatenate every rank's `x` along the last dim (a no-op at tp 1)."""
    if parallel.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(parallel.tp_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


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


class LinearBase(nn.Module):
    """y = x W^T (+ b) with this rank's slice of W: [output_size_local, input_size_local]."""

    packed_weight: Tensor | None = None
    int4_weight: tuple[Tensor, Tensor] | None = None  # see `use_int4`

    def __init__(
        self,
        input_size_local: int,
        output_size_local: int,
        bias: bool,
        parallel: ParallelConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.parallel = parallel or ParallelConfig()
        self.prefix = prefix
        self.input_size_local = input_size_local
        self.output_size_local = output_size_local
        self.weight = new_param(output_size_local, input_size_local)
        self.weight.weight_loader = self.weight_loader
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = new_param(output_size_local)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded_weight)

    def use_int4(self, q: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Run on an exact int4 grid instead of W (GGUF Q4 weights on the CPU; bf16/fp16 only).

        NOTE: 4x fewer bytes per decode step than bf16; torch's int4 CPU kernel is fast for bf16
        and fp16 activations only, so fp32 models keep dense weights.
        """
        self.int4_weight = pack_int4(q, scale, zero, self.weight.dtype)
        self.weight.data = self.weight.data.new_empty(0)

    def process_weights_after_loading(self) -> None:
        """Prepare W once for the runtime kernel (CPU: prepacked, the plain copy freed)."""
        if self.int4_weight is not None:
            return
        packed = cpu_prepack(self.weight)
        if packed is not None:
            self.packed_weight = packed
            self.weight.data = self.weight.data.new_empty(0)

    def matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.int4_weight is not None:
            return int4_linear(x, self.int4_weight, bias)
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, bias)
        if x.dim() == 2 and x.shape[0] == 1 and (ops := cuda_ops(x)) is not None:
            return ops.gemv(x, self.weight, bias)  # decode of one sequence: one streaming kernel
        return F.linear(x, self.weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in={self.input_size_local}, out={self.output_size_local}, bias={bias}"


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank (e.g. the MoE router)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, bias, parallel, prefix)


class ColumnParallelLinear(LinearBase):
    """Splits the output dim: rank r holds output rows [r * out/tp, (r + 1) * out/tp)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
    ) -> None:
        parallel = parallel or ParallelConfig()
        out_local = parallel.shard(output_size, f"{prefix or 'linear'} output size")
        super().__init__(input_size, out_local, bias, parallel, prefix)
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output

    def _load_rows(
        self, param: Tensor, loaded: Tensor, full_rows: int, src: int, dst: int, n: int
    ) -> None:
        """Check `loaded` is [full_rows, ...]; copy its rows [src, src+n) to param[dst, dst+n)."""
        expected = (full_rows, *param.shape[1:])
        check_shape(loaded, expected)
        param.data[dst : dst + n].copy_(loaded[src : src + n])

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        n = self.output_size_local
        self._load_rows(param, loaded_weight, self.output_size, self.parallel.tp_rank * n, 0, n)

    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x, self.bias)  # [T, out_local]
        return tp_all_gather(y, self.parallel) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers of one input fused into one matmul (gate_up_proj = [gate; up]).

    `weight_loader(param, w, shard_id)` with shard_id the index into `output_sizes`.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
    ) -> None:
        self.output_sizes = list(output_sizes)
        parallel = parallel or ParallelConfig()
        for i, size in enumerate(self.output_sizes):
            parallel.shard(size, f"{prefix or 'linear'} output {i} size")
        super().__init__(input_size, sum(self.output_sizes), bias, False, parallel, prefix)
        for p in (self.weight, self.bias):
            if p is not None:
                p.shard_ids = frozenset(range(len(self.output_sizes)))

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
            for i, part in enumerate(torch.split(loaded_weight, self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"{self.prefix}: shard_id must index output_sizes: {shard_id!r}")
        tp = self.parallel.tp_size
        n = self.output_sizes[shard_id] // tp
        dst = sum(self.output_sizes[:shard_id]) // tp
        full_rows = self.output_sizes[shard_id]
        self._load_rows(param, loaded_weight, full_rows, self.parallel.tp_rank * n, dst, n)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused: [q heads | k heads | v heads] of this rank.

    Query heads split over ranks; key/value heads split too, or replicate when tp_size exceeds
    their number (rank r then holds kv head r // (tp_size / num_kv_heads)).
    `weight_loader(param, w, shard_id)` with shard_id "q", "k" or "v".
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
    ) -> None:
        parallel = parallel or ParallelConfig()
        tp = parallel.tp_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = parallel.shard(total_num_heads, "num_attention_heads")
        if tp >= total_num_kv_heads:
            if tp % total_num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size ({tp}) is larger than num_key_value_heads "
                    f"({total_num_kv_heads}) but not a multiple of it; pick a tensor_parallel_size "
                    "that divides or is a multiple of the number of key/value heads."
                )
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp // total_num_kv_heads
        else:
            self.num_kv_heads = parallel.shard(total_num_kv_heads, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size  # local sizes
        self.kv_size = self.num_kv_heads * head_size
        # Build as a column layer of the *local* size times tp, so the base class sizes match.
        out = (self.q_size + 2 * self.kv_size) * tp
        super().__init__(hidden_size, out, bias, False, parallel, prefix)
        for p in (self.weight, self.bias):
            if p is not None:
                p.shard_ids = frozenset(("q", "k", "v"))

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        rank, d = self.parallel.tp_rank, self.head_size
        if shard_id == "q":
            full, n, dst = self.total_num_heads * d, self.q_size, 0
            src = rank * self.q_size
        elif shard_id in ("k", "v"):
            full, n = self.total_num_kv_heads * d, self.kv_size
            dst = self.q_size + (self.kv_size if shard_id == "v" else 0)
            src = (rank // self.num_kv_head_replicas) * self.kv_size
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v': {shard_id!r}")
        self._load_rows(param, loaded_weight, full, src, dst, n)


class RowParallelLinear(LinearBase):
    """Splits the input dim: rank r holds input columns [r * in/tp, (r + 1) * in/tp) and the
    partial products are summed over ranks; the bias is added once, after the sum."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
    ) -> None:
        parallel = parallel or ParallelConfig()
        in_local = parallel.shard(input_size, f"{prefix or 'linear'} input size")
        super().__init__(in_local, output_size, bias, parallel, prefix)
        self.input_size = input_size
        self.output_size = output_size
        self.reduce_results = reduce_results

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            default_weight_loader(param, loaded_weight)
            return
        check_shape(loaded_weight, (self.output_size, self.input_size))
        n, lo = self.input_size_local, self.parallel.tp_rank * self.input_size_local
        param.data.copy_(loaded_weight[:, lo : lo + n])

    def forward(self, x: Tensor) -> Tensor:
        if self.parallel.tp_size == 1:
            # NOTE: bias inside F.linear at tp 1 (one fused addmm, bit-identical to nn.Linear).
            return self.matmul(x, self.bias)
        y = self.matmul(x, None)  # [T, out] partial sum over this rank's input slice
        if self.reduce_results:
            y = tp_all_reduce(y, self.parallel)
        return y if self.bias is None else y + self.bias
