"""Llama, and the decoder stack the other families share (Qwen2, Qwen3, Qwen3-MoE, Mixtral).

Shapes: `T` tokens of all sequences of a step (flattened), `H` hidden, `D` head size, `V` vocab.
A family differs from Llama only in `make_attention` / `make_mlp` (and checkpoint renames).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from twinfer.layers.activation import get_act_and_mul
from twinfer.layers.attention import Attention
from twinfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from twinfer.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from twinfer.layers.moe.placement import ExpertPlan
from twinfer.layers.norm import RMSNorm
from twinfer.layers.quantization import QuantizationConfig, UnquantizedConfig
from twinfer.layers.rotary import RotaryEmbedding
from twinfer.models.weights import load_hf_weights
from twinfer.parallel import ParallelConfig


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any) -> int | None:
    """The attention window the checkpoint was trained with, or None for full attention."""
    if getattr(config, "use_sliding_window", True) is False:  # Qwen configs gate it with a flag
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None)


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one column-parallel matmul."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        bias: bool = False,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        quant = quant_config or UnquantizedConfig()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias,
            parallel,
            f"{prefix}.gate_up_proj",
            quant.linear_method(f"{prefix}.gate_up_proj"),
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias,
            parallel=parallel,
            prefix=f"{prefix}.down_proj",
            quant_method=quant.linear_method(f"{prefix}.down_proj"),
        )
        self.act_fn = get_act_and_mul(hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, H] -> [T, 2I/tp] -> [T, H]


class LlamaAttention(nn.Module):
    """qkv projection, optional per-head q/k RMSNorm (Qwen3), RoPE, attention, o projection."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        parallel: ParallelConfig | None = None,
        prefix: str = "",
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        quant = quant_config or UnquantizedConfig()
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            head_dim,
            num_heads,
            num_kv_heads,
            qkv_bias,
            parallel,
            f"{prefix}.qkv_proj",
            quant.linear_method(f"{prefix}.qkv_proj"),
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            num_heads * head_dim,
            hidden_size,
            o_bias,
            parallel=parallel,
            prefix=f"{prefix}.o_proj",
            quant_method=quant.linear_method(f"{prefix}.o_proj"),
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            num_heads=self.num_heads,
            head_size=head_dim,
            scale=head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: Tensor, hidden: Tensor) -> Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (nq + 2 nkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Qwen3's q/k norms (RMSNorm over each head's D values) run inside RoPE, before it.
        q, k = self.rotary_emb(positions, q, k, self.q_norm, self.k_norm)
        return self.o_proj(self.attn(q, k, v))  # [T, nq D] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; carries the residual stream alongside so each norm fuses the add."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self, positions: Tensor, hidden: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers built by the family's hooks, final norm."""

    def __init__(self, config: Any, parallel: ParallelConfig, owner: LlamaForCausalLM) -> None:
        super().__init__()
        h = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, h, parallel, "model.embed_tokens"
        )
        # NOTE: one rotary module (one cos/sin cache) shared by every layer.
        self.rotary_emb = RotaryEmbedding.from_config(config, head_dim_of(config))
        layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            attn = owner.make_attention(i, self.rotary_emb, f"{prefix}.self_attn")
            mlp = owner.make_mlp(i, f"{prefix}.mlp")
            layers.append(LlamaDecoderLayer(attn, mlp, h, config.rms_norm_eps))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, H]
        residual: Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama: `attention_bias` and `mlp_bias` from the config; head_dim from config or H / heads."""

    def __init__(
        self,
        config: Any,
        parallel: ParallelConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        expert_plan: ExpertPlan | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel or ParallelConfig()
        # The checkpoint's weight format: every linear layer gets its method from it.
        self.quant_config = quant_config or UnquantizedConfig()
        # Where MoE layers keep their routed experts (None: on the model's device).
        self.expert_plan = expert_plan
        # Window the runner must respect (max_model_len <= it) until attention supports windows.
        self.sliding_window = sliding_window_of(config)
        self.model = LlamaModel(config, self.parallel, self)
        h, v = config.hidden_size, config.vocab_size
        self.lm_head = ParallelLMHead(v, h, self.parallel, "lm_head")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    # ---- family hooks -------------------------------------------------------------------
    def attention(
        self,
        rotary_emb: RotaryEmbedding,
        prefix: str,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
    ) -> LlamaAttention:
        """The shared attention block with this family's bias / q-k-norm choices."""
        c = self.config
        return LlamaAttention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            head_dim_of(c),
            rotary_emb,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm_eps=c.rms_norm_eps if qk_norm else None,
            parallel=self.parallel,
            prefix=prefix,
            quant_config=self.quant_config,
        )

    def make_attention(self, layer_idx: int, rotary_emb: RotaryEmbedding, prefix: str) -> nn.Module:
        bias = bool(getattr(self.config, "attention_bias", False))
        return self.attention(rotary_emb, prefix, qkv_bias=bias, o_bias=bias)

    def dense_mlp(self, intermediate_size: int, prefix: str, bias: bool = False) -> LlamaMLP:
        c = self.config
        return LlamaMLP(
            c.hidden_size,
            intermediate_size,
            c.hidden_act,
            bias,
            self.parallel,
            prefix,
            self.quant_config,
        )

    def make_mlp(self, layer_idx: int, prefix: str) -> nn.Module:
        bias = bool(getattr(self.config, "mlp_bias", False))
        return self.dense_mlp(self.config.intermediate_size, prefix, bias)

    def hf_to_param_name(self, name: str) -> str:
        """Checkpoint name -> this module's naming (before fusing rules apply)."""
        return name

    # ---- model contract -----------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """input_ids [T], positions [T] (int64) -> hidden [T, H]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: Tensor, float32: bool = True) -> Tensor:
        """hidden [N, H] -> logits [N, V], float32 (or the model dtype with float32=False)."""
        return self.lm_head.compute_logits(hidden, float32)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the parameter names filled completely."""

        def skip(name: str) -> bool:
            # A tied checkpoint may still store lm_head.weight (a copy of the embedding).
            return self.tie_word_embeddings and name == "lm_head.weight"

        with torch.no_grad():
            return load_hf_weights(self, weights, rename=self.hf_to_param_name, skip=skip)
