"""MoELayer: router + routed experts with a placement; one layer, whatever the hardware.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size (this rank's slice).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from twinfer.layers.cuda_ops import cuda_moe_ops
from twinfer.layers.linear import ReplicatedLinear, tp_all_reduce
from twinfer.layers.moe.backends import get_expert_backend
from twinfer.layers.moe.placement import (
    ExpertPlacement,
    ExpertPlan,
    HostExpertBuilder,
    RoutedExperts,
)
from twinfer.layers.params import check_shape, in_param_units, new_param
from twinfer.parallel import ParallelConfig

if TYPE_CHECKING:
    from twinfer.layers.quantization import MoEMethod

SCORING_FUNCTIONS = ("softmax",)


class MoELayer(nn.Module):
    # Packed for its runtime as soon as its experts are loaded (models/weights.py), so a large
    # checkpoint never sits in host RAM in two forms at once.
    prepare_when_loaded = True

    """Routed experts with a softmax top-k router (HF's Qwen3-MoE / Mixtral sparse MoE block).

    Parameters: `gate.weight` [E, H] (replicated router), `w13_weight` [E, 2I, H] (gate rows then
    up rows) and `w2_weight` [E, H, I]; with tensor parallelism each rank holds a slice of I and
    the partial outputs are all-reduced. `weight_loader(param, w, shard_id)` takes shard_id
    (expert, "w1"|"w3"|"w2") for a per-expert checkpoint tensor ([I, H], [I, H], [H, I]) or
    (None, "w13"|"w2") for a fused one ([E, 2I, H] or [E, H, I], transformers 5's layout).

    `cast_routing_weights`: cast the top-k weights to the hidden dtype before the weighted sum
    (HF Qwen3-MoE); HF Mixtral keeps them float32. Only matters for bf16/fp16 rounding.

    Placement: without an explicit `placement`, the model's `plan` (an ExpertPlan, made from the
    placement flags by hybrid/placement.py) says whether this layer's routed experts live on the
    model's device or in host RAM, and gives the builder of host experts. Host experts are built
    in host memory, handed to the builder after loading (`process_weights_after_loading`: e.g.
    packed for the CPU expert engine) and run where it puts them; the router stays here.
    """

    # Prepared as soon as its experts are loaded (models/weights.py), so a large checkpoint
    # never sits in host RAM in two forms at once.
    prepare_when_loaded = True

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
        scoring: str = "softmax",
        cast_routing_weights: bool = True,
        placement: ExpertPlacement | None = None,
        backend: str = "torch",
        quant_method: MoEMethod | None = None,
        plan: ExpertPlan | None = None,
    ) -> None:
        super().__init__()
        if scoring not in SCORING_FUNCTIONS:
            raise ValueError(
                f"MoE scoring function {scoring!r} is not supported; twinfer supports: "
                f"{', '.join(SCORING_FUNCTIONS)}."
            )
        if not 0 < top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok ({top_k}) must be in 1..num_experts ({num_experts})."
            )
        self.parallel = parallel or ParallelConfig()
        self.prefix = prefix
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_local = self.parallel.shard(intermediate_size, "expert inner size")
        self.renormalize = renormalize
        self.scoring = scoring
        self.cast_routing_weights = cast_routing_weights
        self.dtype = torch.get_default_dtype()  # the model dtype the experts compute in
        self.quant_method = quant_method  # the checkpoint's expert format; None: plain

        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, prefix=f"{prefix}.gate")
        self.host_builder: HostExpertBuilder | None = None
        if placement is None and plan is not None:
            placement, self.host_builder = plan.layer_placement(prefix, num_experts)
        i_local = self.intermediate_size_local
        on_host = placement is not None and placement.experts_at("host")
        if on_host and len(placement.experts_at("host")) != num_experts:
            raise ValueError(
                "an MoE layer keeps all its routed experts in one place (host RAM or the "
                "device); mixed placements within a layer are not supported."
            )
        # Host experts never touch the device: they are built (and loaded) in host memory.
        with torch.device("cpu") if on_host else contextlib.nullcontext():
            if quant_method is not None:
                quant_method.create_weights(self)
            else:
                self.w13_weight = new_param(num_experts, 2 * i_local, hidden_size)
                self.w2_weight = new_param(num_experts, hidden_size, i_local)
        experts = range(num_experts)
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("w13_"):
                p.shard_ids = frozenset((e, w) for e in experts for w in ("w1", "w3"))
            else:
                p.shard_ids = frozenset((e, "w2") for e in experts)
            p.weight_loader = self.weight_loader

        self.placement = placement or ExpertPlacement.uniform(num_experts)
        if self.placement.num_experts != num_experts:
            raise ValueError(
                f"expert placement covers {self.placement.num_experts} experts but the layer has "
                f"{num_experts}."
            )
        if self.on_host and self.host_builder is None:
            raise ValueError(
                f"{prefix}: host experts need a host expert builder (the model's ExpertPlan)."
            )
        self.backend = get_expert_backend(backend)
        self.host_experts: RoutedExperts | None = None

    @property
    def on_host(self) -> bool:
        return bool(self.placement.experts_at("host"))

    def process_weights_after_loading(self) -> None:
        """Host experts: handed to the host builder once (it packs them in its format from the
        checkpoint's), then the torch copy freed. Device experts in a checkpoint format: expanded
        to the model dtype (see MoEMethod)."""
        if self.quant_method is not None:
            self.quant_method.process_weights_after_loading(self)
        if self.on_host:
            if self.host_experts is None:
                self.host_experts = self.host_builder.build(self)
                self.free_weights()
            return
        if self.quant_method is not None and self.quant_method.runs_on(self.device):
            self.quant_method.prepare_device(self)  # kept in its format: a kernel reads it
        elif self.quant_method is not None:
            w13, w2 = self.quant_method.dequantize(self, self.dtype)
            for name in self.quant_method.param_names():
                delattr(self, name)
            self.w13_weight = nn.Parameter(w13, requires_grad=False)
            self.w2_weight = nn.Parameter(w2, requires_grad=False)
            self.quant_method = None

    @property
    def device(self) -> torch.device:
        """Where the experts' weights live (host RAM for host experts)."""
        return next(self.parameters(recurse=False)).device

    def free_weights(self) -> None:
        """Drop the torch copy of the experts (the runtime that serves them keeps its own)."""
        names = ("w13_weight", "w2_weight")
        if self.quant_method is not None:
            names = self.quant_method.param_names()
        for name in names:
            p = getattr(self, name)
            p.data = torch.empty(0, dtype=p.dtype)

    def set_backend(self, name: str) -> None:
        """Swap the expert backend (by registry name); the weights and the math stay the same."""
        self.backend = get_expert_backend(name)

    def weight_loader(self, param: Tensor, loaded_weight: Tensor, shard_id: object) -> None:
        """Rows and columns count an expert matrix's elements; a format's parameter (block
        scales, packed words, groups) converts them to its own units (`in_param_units`)."""
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2):
            raise ValueError(f"MoE shard_id must be (expert, 'w1'|'w3'|'w2'|'w13'): {shard_id!r}")
        expert, which = shard_id
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        n, lo = self.intermediate_size_local, self.parallel.tp_rank * self.intermediate_size_local
        if expert is not None and not 0 <= expert < e:
            raise ValueError(
                f"the checkpoint has expert {expert} but config.json says there are {e} experts; "
                "the checkpoint does not match config.json."
            )

        def units(dim: int, full: int, start: int = 0, count: int | None = None):
            count = full if count is None else count
            return in_param_units(param, dim, full, start, count, self.prefix)

        if which in ("w1", "w3", "w13"):  # rows of I (gate, then up), columns of H
            i_units, lo, n = units(0, i, lo, n)
            h_units = units(1, h)[0]
            if expert is None and which == "w13":  # [E, 2I, H]: gate rows, then up rows
                check_shape(loaded_weight, (e, 2 * i_units, h_units))
                param.data[:, :n].copy_(loaded_weight[:, lo : lo + n])
                param.data[:, n:].copy_(loaded_weight[:, i_units + lo : i_units + lo + n])
            elif expert is not None and which != "w13":  # one expert's gate or up: [I, H]
                check_shape(loaded_weight, (i_units, h_units))
                dst = 0 if which == "w1" else n
                param.data[expert, dst : dst + n].copy_(loaded_weight[lo : lo + n])
            else:
                raise ValueError(f"MoE shard_id (expert, 'w13') needs no expert: {shard_id!r}")
        elif which == "w2":  # rows of H, columns of I
            h_units = units(0, h)[0]
            i_units, lo, n = units(1, i, lo, n)
            if expert is None:  # [E, H, I]
                check_shape(loaded_weight, (e, h_units, i_units))
                param.data.copy_(loaded_weight[:, :, lo : lo + n])
            else:  # one expert's down: [H, I]
                check_shape(loaded_weight, (h_units, i_units))
                param.data[expert].copy_(loaded_weight[:, lo : lo + n])
        else:
            raise ValueError(f"MoE shard_id must be (expert, 'w1'|'w3'|'w2'|'w13'): {shard_id!r}")

    def route(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """hidden [T, H] -> (topk_weights [T, K], topk_ids [T, K] int64, int32 on a GPU), as HF's
        top-k router."""
        router_logits = self.gate(hidden)  # [T, E] in the model dtype, like HF
        if (ops := cuda_moe_ops(hidden)) is not None:  # softmax, top-k, renormalize: one kernel
            dtype = hidden.dtype if self.cast_routing_weights else torch.float32
            return ops.fused_topk(router_logits, self.top_k, self.renormalize, dtype)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if self.cast_routing_weights:
            topk_weights = topk_weights.to(hidden.dtype)
        return topk_weights, topk_ids

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [T, H] -> [T, H]."""
        topk_weights, topk_ids = self.route(hidden)
        if self.host_experts is not None:
            out = self.host_experts.forward(hidden, topk_weights, topk_ids)
        elif self.quant_method is not None:  # kept in the checkpoint's format on the device
            out = self.quant_method.apply(self, hidden, topk_weights, topk_ids)
        else:
            out = self.backend.forward(
                hidden, topk_weights, topk_ids, self.w13_weight, self.w2_weight
            )
        return tp_all_reduce(out, self.parallel)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"inner={self.intermediate_size_local}, renormalize={self.renormalize}, "
            f"backend={'cpu' if self.on_host else self.backend.name}, "
            f"placement='{self.placement.summary()}'"
        )
