"""Linear layers that shard over tensor-parallel ranks and load checkpoint tensors (vLLM style).

Shapes: `T` tokens; weights are [out, in] like nn.Linear. Column layers split the output dim across
ranks (no communication), row layers split the input dim and all-reduce their partial sums. Each
parameter carries a `weight_loader(param, loaded_weight, shard_id)` that takes the full checkpoint
tensor and copies in this rank's slice, so a loader never needs to know how a layer is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from twinfer.layers.params import check_shape, default_weight_loader, in_param_units, new_param
from twinfer.layers.quantization import LinearMethod, UnquantizedLinearMethod
from twinfer.parallel import ParallelConfig


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


class LinearBase(nn.Module):
    """y = x W^T (+ b) with this rank's slice of W: [output_size_local, input_size_local].

    The weight's format is the layer's `quant_method` (plain by default): it creates the weight
    parameters, prepares them after loading and applies the matmul; the layer shards them.
    """

    packed_weight: Tensor | None = None
    int4_weight: tuple[Tensor, Tensor] | None = None  # torch's CPU int4 layout (cpu_kernels)

    def __init__(
        self,
        input_size_local: int,
        output_size_local: int,
        bias: bool,
        parallel: ParallelConfig | None,
        prefix: str,
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel or ParallelConfig()
        self.prefix = prefix
        self.input_size_local = input_size_local
        self.output_size_local = output_size_local
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = new_param(output_size_local)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded_weight)

    def process_weights_after_loading(self) -> None:
        """Prepare the weights once for the runtime kernel (e.g. CPU: prepacked)."""
        self.quant_method.process_weights_after_loading(self)

    def matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return self.quant_method.apply(self, x, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        method = type(self.quant_method).__name__
        return f"in={self.input_size_local}, out={self.output_size_local}, bias={bias}, {method}"


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank (e.g. the MoE router)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(input_size, output_size, bias, parallel, prefix, quant_method)


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
        quant_method: LinearMethod | None = None,
    ) -> None:
        parallel = parallel or ParallelConfig()
        out_local = parallel.shard(output_size, f"{prefix or 'linear'} output size")
        super().__init__(input_size, out_local, bias, parallel, prefix, quant_method)
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output

    def _load_rows(
        self, param: Tensor, loaded: Tensor, full_rows: int, src: int, dst: int, n: int
    ) -> None:
        """Check `loaded` is [full_rows, ...]; copy its rows [src, src+n) to param[dst, dst+n).

        Rows count elements of the weight; a block scale's loader converts them to blocks."""
        name = self.prefix or type(self).__name__
        dst = in_param_units(param, 0, dst + n, dst, n, name)[1]
        full_rows, src, n = in_param_units(param, 0, full_rows, src, n, name)
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
        quant_method: LinearMethod | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        parallel = parallel or ParallelConfig()
        for i, size in enumerate(self.output_sizes):
            parallel.shard(size, f"{prefix or 'linear'} output {i} size")
        super().__init__(
            input_size, sum(self.output_sizes), bias, False, parallel, prefix, quant_method
        )
        for p in self.parameters(recurse=False):
            p.shard_ids = frozenset(range(len(self.output_sizes)))

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            rows = in_param_units(param, 0, self.output_size, 0, 0, self.prefix)[0]
            check_shape(loaded_weight, (rows, *param.shape[1:]))
            sizes = [in_param_units(param, 0, n, 0, n, self.prefix)[2] for n in self.output_sizes]
            for i, part in enumerate(torch.split(loaded_weight, sizes, dim=0)):
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
        quant_method: LinearMethod | None = None,
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
        super().__init__(hidden_size, out, bias, False, parallel, prefix, quant_method)
        for p in self.parameters(recurse=False):
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
        quant_method: LinearMethod | None = None,
    ) -> None:
        parallel = parallel or ParallelConfig()
        in_local = parallel.shard(input_size, f"{prefix or 'linear'} input size")
        super().__init__(in_local, output_size, bias, parallel, prefix, quant_method)
        self.input_size = input_size
        self.output_size = output_size
        self.reduce_results = reduce_results

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            default_weight_loader(param, loaded_weight)
            return
        rows = in_param_units(param, 0, self.output_size, 0, 0, self.prefix)[0]
        n, lo = self.input_size_local, self.parallel.tp_rank * self.input_size_local
        cols, lo, n = in_param_units(param, 1, self.input_size, lo, n, self.prefix)
        check_shape(loaded_weight, (rows, cols))
        param.data.copy_(loaded_weight[:, lo : lo + n])

    def forward(self, x: Tensor) -> Tensor:
        if self.parallel.tp_size == 1:
            # NOTE: bias inside F.linear at tp 1 (one fused addmm, bit-identical to nn.Linear).
            return self.matmul(x, self.bias)
        y = self.matmul(x, None)  # [T, out] partial sum over this rank's input slice
        if self.reduce_results:
            y = tp_all_reduce(y, self.parallel)
        return y if self.bias is None else y + self.bias
