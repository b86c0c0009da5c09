"""Qwen3-MoE: Qwen3 attention; routed experts (no shared expert) on the sparse layers."""

from __future__ import annotations

from torch import nn

from twinfer.layers.moe import MoELayer
from twinfer.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def is_moe_layer(self, layer_idx: int) -> bool:
        """As HF: every `decoder_sparse_step`-th layer, except those in `mlp_only_layers`."""
        c = self.config
        return (
            layer_idx not in (getattr(c, "mlp_only_layers", None) or [])
            and c.num_experts > 0
            and (layer_idx + 1) % c.decoder_sparse_step == 0
        )

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        c = self.config
        if not self.is_moe_layer(layer_idx):
            return self.dense_mlp(c.intermediate_size, prefix)
        return MoELayer(
            num_experts=c.num_experts,
            top_k=c.num_experts_per_tok,
            hidden_size=c.hidden_size,
            intermediate_size=c.moe_intermediate_size,
            renormalize=bool(c.norm_topk_prob),
            parallel=self.parallel,
            prefix=prefix,
            plan=self.expert_plan,
            quant_method=self.quant_config.moe_method(prefix),
            # HF casts the top-k weights to the hidden dtype before the weighted sum.
            cast_routing_weights=True,
        )
