"""Mixtral: Llama attention (no biases) and an MoE block of renormalized top-k experts."""

from __future__ import annotations

from torch import nn

from twinfer.layers.moe import MoELayer
from twinfer.layers.rotary import RotaryEmbedding
from twinfer.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    def make_attention(self, layer_idx: int, rotary_emb: RotaryEmbedding, prefix: str) -> nn.Module:
        return self.attention(rotary_emb, prefix)

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        c = self.config
        return MoELayer(
            num_experts=c.num_local_experts,
            top_k=c.num_experts_per_tok,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            renormalize=True,
            parallel=self.parallel,
            prefix=prefix,
            # The format is looked up under the checkpoint's names (block_sparse_moe, w1/w2/w3).
            plan=self.expert_plan,
            quant_method=self.quant_config.moe_method(
                prefix.replace(".mlp", ".block_sparse_moe"), gate_proj="w1"
            ),
            # HF Mixtral multiplies by the float32 top-k weights, then casts the product.
            cast_routing_weights=False,
        )

    def hf_to_param_name(self, name: str) -> str:
        # NOTE: the MoE block is `mlp` here, as in transformers 5; checkpoints say block_sparse_moe.
        return name.replace(".block_sparse_moe.", ".mlp.")
