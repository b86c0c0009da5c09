"""ModelCost: a model's bytes and FLOPs per step, from its config, and the bounds they imply.

The decode bound is bytes per step over memory bandwidth; the prefill bound the larger of FLOPs
over matmul rate and weight bytes over bandwidth. `twinfer check --model` and the benchmarks use it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---- model bounds -------------------------------------------------------------------------------
# Bytes per parameter of each weight format.
# NOTE: int4 is 4.5 bits, a 16-bit scale per 32 weights (the GGUF Q4_0 grid twinfer's CPU int4
# kernels read); the scales of fp8 / int8 (per channel) are negligible.
DTYPE_BYTES: dict[str, float] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "int8": 1, "int4": 0.5625,
}  # fmt: skip
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}


def parse_weight_dtype(name: str) -> str:
    """A weight format name (aliases bf16 / fp16 / fp32 accepted) -> its DTYPE_BYTES key."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown weight dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}")
    return key


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` set in a config.json dict or a transformers PretrainedConfig."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(slots=True)
class ModelCost:
    """Parameter counts of a decoder-only (MoE) transformer, and the bytes and FLOPs of its steps.

    Counts are totals over all layers, except `expert_params`: one routed expert of one layer.
    "Dense" weights are those every step reads whatever the routing: attention (q/k/v/o, q/k
    norms, biases), norms, dense MLPs, routers, shared experts. Legend: L layers, H hidden, V
    vocab, Hq / Hkv heads, D head size, E experts, K top-k, T tokens.
    NOTE: sliding windows and KV quantization are ignored: every layer attends to all context.
    """

    architecture: str
    dtype: str
    bytes_per_param: float
    num_layers: int
    num_moe_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    tied_embeddings: bool
    embedding_params: int
    lm_head_params: int  # V x H even when tied: the logits read the whole matrix
    attention_params: int
    norm_params: int
    dense_mlp_params: int
    router_params: int
    shared_expert_params: int
    expert_params: int
    kv_bytes_per_token: int

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "bfloat16") -> ModelCost:
        """From a Hugging Face model directory (or its config.json file)."""
        p = Path(path).expanduser()
        fix = "pass a Hugging Face model directory (with config.json)"
        if not p.exists():
            raise ValueError(f"--model {path} does not exist; {fix}.")
        file = p / "config.json" if p.is_dir() else p
        if not file.is_file() or file.suffix != ".json":
            raise ValueError(f"--model {path} has no config.json; {fix}.")
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file} is not readable JSON ({exc}); {fix}.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} is not a config object; {fix}.")
        return cls.from_config(data, dtype, source=str(file))

    @classmethod
    def from_config(cls, config: Any, dtype: str = "bfloat16", source: str = "") -> ModelCost:
        """From a config.json dict or a transformers PretrainedConfig (Llama, Qwen2/3, Qwen3-MoE,
        Mixtral; other Llama-shaped causal LMs with the same field names)."""
        where = source or "the model config"
        archs = list(_get(config, "architectures", default=[]))
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ValueError(
                f"{where} is for {', '.join(archs)}, not a causal LM; pass a decoder-only "
                "*ForCausalLM model such as Llama, Qwen3 or Qwen3-MoE."
            )
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if missing := [n for n in need if _get(config, n) is None]:
            raise ValueError(
                f"{where} has no {', '.join(missing)}: not a decoder-only causal LM config; pass "
                "a Hugging Face Llama / Qwen / Mixtral-style model directory."
            )
        if _get(config, "kv_lora_rank"):
            raise ValueError(f"{where} uses multi-head latent attention, not modelled here yet.")
        dtype = parse_weight_dtype(dtype)
        h, layers, hq, v = (int(_get(config, n)) for n in need)
        hkv = int(_get(config, "num_key_value_heads", default=hq))
        d = int(_get(config, "head_dim") or h // hq)
        model_type = str(_get(config, "model_type", default=""))
        e = int(_get(config, "num_experts", "num_local_experts", "n_routed_experts", default=0))
        k = int(_get(config, "num_experts_per_tok", default=0))
        if e and not 1 <= k <= e:
            raise ValueError(f"{where}: num_experts_per_tok={k} must be in 1..{e}")
        inner = int(_get(config, "intermediate_size", default=0))
        # Mixtral's experts are intermediate_size wide (it has no dense MLP)
        moe_name = "intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"
        moe_inner = int(_get(config, moe_name) or inner or 0)

        # Attention: q [H, Hq D], k and v [H, Hkv D], o [Hq D, H]; Qwen2 always biases q/k/v,
        # `attention_bias` biases q/k/v and (Llama, Qwen3; not GLM-4-MoE) o; Qwen3 adds an
        # RMSNorm [D] on q and on k.
        qwen2 = model_type in ("qwen2", "qwen2_moe")
        bias = bool(_get(config, "attention_bias", default=False))
        o_bias = bias and model_type not in ("qwen2", "qwen2_moe", "glm4_moe")
        attn = 2 * h * hq * d + 2 * h * hkv * d
        attn += (qwen2 or bias) * (hq + 2 * hkv) * d + o_bias * h
        attn += (model_type in ("qwen3", "qwen3_moe") or bool(_get(config, "use_qk_norm"))) * 2 * d

        # MoE layers: every `decoder_sparse_step`-th, minus `mlp_only_layers` (Qwen) and the first
        # `first_k_dense_replace` (DeepSeek-style); dense MLP elsewhere.
        step = int(_get(config, "decoder_sparse_step", default=1) or 1)
        freq = int(_get(config, "moe_layer_freq", default=1) or 1)
        first_dense = int(_get(config, "first_k_dense_replace", default=0))
        mlp_only = set(_get(config, "mlp_only_layers", default=[]))
        moe = e and sum(
            i not in mlp_only and i >= first_dense and (i + 1) % step == 0 and i % freq == 0
            for i in range(layers)
        )
        if layers > moe and not inner:
            raise ValueError(f"{where} has dense MLP layers but no intermediate_size.")
        mlp = 3 * h * inner + bool(_get(config, "mlp_bias")) * (2 * inner + h)
        shared_inner = int(_get(config, "shared_expert_intermediate_size", default=0))
        n_shared = int(_get(config, "n_shared_experts", default=0))
        shared = 3 * h * (shared_inner + n_shared * moe_inner) + (shared_inner > 0) * h  # + gate

        tied = bool(_get(config, "tie_word_embeddings", default=False))
        return cls(
            next((a for a in archs if a.endswith("ForCausalLM")), model_type or "unknown"),
            dtype, DTYPE_BYTES[dtype],
            layers, moe, h, v, hq, hkv, d, e if moe else 0, k if moe else 0, tied,
            embedding_params=v * h, lm_head_params=v * h, attention_params=layers * attn,
            norm_params=(2 * layers + 1) * h, dense_mlp_params=(layers - moe) * mlp,
            router_params=moe * h * e, shared_expert_params=moe * shared,
            expert_params=3 * h * moe_inner if moe else 0,
            # K and V [Hkv, D] per layer, in the activation dtype (bf16 unless the weights are fp32)
            kv_bytes_per_token=2 * layers * hkv * d * (4 if dtype == "float32" else 2),
        )  # fmt: skip

    # ---- sizes ----
    @property
    def total_params(self) -> int:
        """Stored parameters (a tied lm_head counted once)."""
        experts = self.num_moe_layers * self.num_experts * self.expert_params
        head = 0 if self.tied_embeddings else self.lm_head_params
        return self.embedding_params + head + self._layer_dense_params + experts

    @property
    def active_params(self) -> int:
        """Parameters one token runs through, embedding and lm_head excluded: dense + K experts."""
        return self._layer_dense_params + self.num_moe_layers * self.top_k * self.expert_params

    @property
    def _layer_dense_params(self) -> int:
        return (
            self.attention_params
            + self.norm_params
            + self.dense_mlp_params
            + self.router_params
            + self.shared_expert_params
        )

    @property
    def dense_bytes(self) -> float:
        """Bytes every step reads whatever the routing: dense layer weights + the lm_head."""
        return (self._layer_dense_params + self.lm_head_params) * self.bytes_per_param

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert (gate, up, down: 3 x H x I)."""
        return self.expert_params * self.bytes_per_param

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    # ---- bounds ----
    def expected_experts(self, tokens: int) -> float:
        """Expected distinct experts a MoE layer runs for `tokens` tokens: E (1 - (1 - K/E)^T).

        Each token picks K of E experts uniformly and independently: T = 1 gives K, large T
        tends to E. NOTE: real routers are skewed and touch fewer; this is the uniform case.
        """
        if not self.num_experts or tokens <= 0:
            return 0.0
        return self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)

    def decode_bytes_per_step(self, batch: int, context_len: int) -> float:
        """Bytes one decode step of `batch` sequences reads, each with `context_len` KV tokens:

        dense_bytes (dense weights + lm_head, once) + moe_layers x expected_experts(batch) x
        expert_bytes + batch x context_len x kv_bytes_per_token. The embedding rows are left out.
        """
        experts = self.num_moe_layers * self.expected_experts(batch) * self.expert_bytes
        return self.dense_bytes + experts + batch * context_len * self.kv_bytes_per_token

    def decode_bound_tokens_per_s(
        self, batch: int, context_len: int, bandwidth_gbps: float
    ) -> float:
        """Memory-bound decode tokens/s: batch x bandwidth / decode_bytes_per_step."""
        return batch * bandwidth_gbps * 1e9 / self.decode_bytes_per_step(batch, context_len)

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of a T-token prefill: 2 x active_params x T (norms and biases counted like
        weights, a rounding error) + per layer causal attention 4 x T^2/2 x D x Hq (QK^T and PV,
        half the square) + the lm_head for the last token only, 2 x H x V."""
        attention = self.num_layers * 4 * tokens**2 / 2 * self.head_dim * self.num_heads
        return 2 * self.active_params * tokens + attention + 2 * self.lm_head_params

    def prefill_expert_bytes(self, tokens: int) -> float:
        """Routed-expert bytes a T-token prefill reads: moe_layers x expected_experts(T) x
        expert_bytes (each touched expert once)."""
        return self.num_moe_layers * self.expected_experts(tokens) * self.expert_bytes

    def prefill_bound_tokens_per_s(self, tokens: int, tflops: float, hbm_gbps: float) -> float:
        """T / max(prefill_flops / rate, (prefill_expert_bytes + dense_bytes) / bandwidth)."""
        compute = self.prefill_flops(tokens) / (tflops * 1e12)
        memory = (self.prefill_expert_bytes(tokens) + self.dense_bytes) / (hbm_gbps * 1e9)
        return tokens / max(compute, memory)

    def to_dict(self) -> dict[str, Any]:
        derived = ("total_params", "active_params", "weight_bytes", "dense_bytes", "expert_bytes")
        return {**dataclasses.asdict(self), **{n: getattr(self, n) for n in derived}}


# ---- CLI ----------------------------------------------------------------------------------------
