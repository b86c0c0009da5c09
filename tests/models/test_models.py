"""Each model family vs the transformers model built by `from_config` on a tiny random config.

Attention is a stand-in (causal SDPA over one sequence) so the models are checked on their own;
the paged Attention layer is covered by the runner's end-to-end tests. Shapes: `T` tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from twinfer.models import llama as llama_module
from twinfer.models.registry import SUPPORTED_ARCHITECTURES, get_model_class

T = 11
_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="eager",
)


class CausalSDPA(nn.Module):
    """Stand-in for twinfer's Attention: one sequence of T tokens, causal, GQA by repetition."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, d, rep = q.shape[0], self.head_size, self.num_heads // self.num_kv_heads
        q = q.reshape(t, self.num_heads, d).transpose(0, 1)  # [nq, T, D]
        k = k.reshape(t, self.num_kv_heads, d).transpose(0, 1).repeat_interleave(rep, dim=0)
        v = v.reshape(t, self.num_kv_heads, d).transpose(0, 1).repeat_interleave(rep, dim=0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.transpose(0, 1).reshape(t, -1)  # [T, nq D]


@pytest.fixture(autouse=True)
def _stand_in_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_module, "Attention", CausalSDPA)


CONFIGS: dict[str, PretrainedConfig] = {
    "llama-tied-llama3-bias": LlamaConfig(
        **_COMMON,
        intermediate_size=96,
        num_hidden_layers=2,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-head-dim-linear-rope": LlamaConfig(
        **_COMMON,
        intermediate_size=80,
        num_hidden_layers=2,
        head_dim=24,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "qwen2": Qwen2Config(
        **_COMMON, intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=True
    ),
    "qwen3": Qwen3Config(**_COMMON, intermediate_size=96, num_hidden_layers=2, head_dim=16),
    "qwen3_moe": Qwen3MoeConfig(
        **_COMMON,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        experts_implementation="eager",
    ),
    "mixtral": MixtralConfig(
        **_COMMON,
        intermediate_size=48,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_implementation="eager",
    ),
}


def _hf_model(config: PretrainedConfig) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # bigger than the 0.02 init, so logits differ meaningfully per token
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours(config: PretrainedConfig, arch: str, weights) -> tuple[nn.Module, set[str]]:
    model = get_model_class([arch])(config)
    return model, model.load_weights(weights)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[0])))


def _saved_weights(model: nn.Module, path: Path) -> list[tuple[str, torch.Tensor]]:
    model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return [(name, f.get_tensor(name)) for name in f.keys()]  # noqa: SIM118


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_matches_transformers(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    hf = _hf_model(config)
    ids = torch.randint(0, config.vocab_size, (T,))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0].float()  # [T, V]

    # transformers 5 in-memory names (fused expert tensors for the MoE models)
    arch = type(hf).__name__
    ours, loaded = _ours(config, arch, hf.state_dict().items())
    assert loaded == set(dict(ours.named_parameters()))
    got = _logits(ours, ids)
    assert got.dtype == torch.float32 and got.shape == (T, config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    # on-disk checkpoint names (per-expert tensors, block_sparse_moe for Mixtral)
    disk = _saved_weights(hf, tmp_path)
    ours2, loaded2 = _ours(config, arch, disk)
    assert loaded2 == set(dict(ours2.named_parameters()))
    torch.testing.assert_close(_logits(ours2, ids), got, atol=1e-6, rtol=0)


def test_qwen3_moe_layer_kinds() -> None:
    from twinfer.layers.moe import MoELayer

    config = CONFIGS["qwen3_moe"]
    model = get_model_class(["Qwen3MoeForCausalLM"])(config)
    kinds = [isinstance(layer.mlp, MoELayer) for layer in model.model.layers]
    assert kinds == [True, False, True]
    assert model.sliding_window is None


def test_registry_lists_supported_architectures() -> None:
    assert set(SUPPORTED_ARCHITECTURES) == {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "MixtralForCausalLM",
    }
    assert get_model_class(["Foo", "Qwen3ForCausalLM"]).__name__ == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="GPT2LMHeadModel .*LlamaForCausalLM, Qwen2ForCausalLM"):
        get_model_class(["GPT2LMHeadModel"])


def test_load_weights_errors_and_partial_shards() -> None:
    config = CONFIGS["qwen3"]
    model = get_model_class(["Qwen3ForCausalLM"])(config)
    with pytest.raises(ValueError, match="'model.layers.7.mlp.up_proj.weight' matches no param"):
        model.load_weights([("model.layers.7.mlp.up_proj.weight", torch.zeros(96, 64))])
    with pytest.raises(
        ValueError,
        match=r"weight model.layers.0.self_attn.k_proj.weight has shape \[5, 64\] but the model "
        r"expects \[32, 64\]; the checkpoint does not match config.json",
    ):
        model.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(5, 64))])
    loaded = model.load_weights(
        [
            ("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 64)),
            ("model.layers.0.self_attn.k_proj.weight", torch.zeros(32, 64)),
            ("model.layers.0.mlp.gate_proj.weight", torch.zeros(96, 64)),
            ("model.layers.0.mlp.up_proj.weight", torch.zeros(96, 64)),
            ("model.rotary_emb.inv_freq", torch.zeros(8)),
        ]
    )
    assert loaded == {"model.layers.0.mlp.gate_up_proj.weight"}  # qkv lacks v: not complete
