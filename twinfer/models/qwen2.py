"""Qwen2: Llama with a bias on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from torch import nn

from twinfer.layers.rotary import RotaryEmbedding
from twinfer.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_attention(self, layer_idx: int, rotary_emb: RotaryEmbedding, prefix: str) -> nn.Module:
        return self.attention(rotary_emb, prefix, qkv_bias=True, o_bias=False)

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        return self.dense_mlp(self.config.intermediate_size, prefix)
