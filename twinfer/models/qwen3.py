"""Qwen3: Llama attention plus a per-head RMSNorm on q and k before RoPE; bias per config."""

from __future__ import annotations

from torch import nn

from twinfer.layers.rotary import RotaryEmbedding
from twinfer.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_attention(self, layer_idx: int, rotary_emb: RotaryEmbedding, prefix: str) -> nn.Module:
        bias = bool(getattr(self.config, "attention_bias", False))
        return self.attention(rotary_emb, prefix, qkv_bias=bias, o_bias=bias, qk_norm=True)

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        return self.dense_mlp(self.config.intermediate_size, prefix)
