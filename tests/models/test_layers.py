"""Layers vs transformers' own modules, and tensor-parallel sharding math on one process.

Shapes: `T` tokens, `H` hidden, `D` head size, `V` vocab.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from twinfer.layers import embedding, linear
from twinfer.layers.activation import SiluAndMul, get_act_and_mul
from twinfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from twinfer.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from twinfer.layers.norm import RMSNorm
from twinfer.layers.params import WeightShapeError
from twinfer.layers.rotary import RotaryEmbedding, rope_parameters
from twinfer.parallel import ParallelConfig


def _load(layer: torch.nn.Module, name: str, tensor: torch.Tensor, shard_id: object = None):
    param = getattr(layer, name)
    param.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    hf = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
    ours = RMSNorm(64, eps=1e-5).to(dtype)
    _load(ours, "weight", hf.weight.detach())
    x = torch.randn(7, 64, dtype=dtype)
    res = torch.randn(7, 64, dtype=dtype)
    # The fused kernel rounds once where HF rounds twice (bf16): equal within one bf16 step.
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0, "rtol": 2**-7}
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), **tol)
        normed, summed = ours(x, res)
        assert torch.equal(summed, res + x)
        torch.testing.assert_close(normed, hf(res + x), **tol)


def test_silu_and_mul_matches_hf() -> None:
    x = torch.randn(5, 2 * 24)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(SiluAndMul()(x), ACT2FN["silu"](gate) * up)
    with pytest.raises(ValueError, match="gelu"):
        get_act_and_mul("gelu")


_ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
        "rope_theta": 500000.0,
    },
}


@pytest.mark.parametrize("case", sorted(_ROPE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_hf(case: str, dtype: torch.dtype) -> None:
    d, nq, nkv, t = 32, 4, 2, 9
    config = LlamaConfig(
        hidden_size=nq * d,
        num_attention_heads=nq,
        num_key_value_heads=nkv,
        max_position_embeddings=512,
        rope_parameters=dict(_ROPE_CASES[case]),
    )
    rope = RotaryEmbedding.from_config(config, d)
    hf_rope = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 2, 3, 100, 250, 511, 7, 64])
    q, k = torch.randn(t, nq * d, dtype=dtype), torch.randn(t, nkv * d, dtype=dtype)
    cos, sin = hf_rope(q, positions[None])  # [1, T, D]
    hq, hk = apply_rotary_pos_emb(
        q.view(1, t, nq, d).transpose(1, 2), k.view(1, t, nkv, d).transpose(1, 2), cos, sin
    )
    oq, ok = rope(positions, q, k)
    assert torch.equal(oq, hq.transpose(1, 2).reshape(t, -1))
    assert torch.equal(ok, hk.transpose(1, 2).reshape(t, -1))


def test_rope_parameters_old_and_new_configs() -> None:
    old = SimpleNamespace(
        rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=8
    )
    assert rope_parameters(old) == {"type": "linear", "factor": 2.0, "rope_theta": 1e6} | {
        "rope_type": "linear"
    }
    plain = SimpleNamespace(rope_theta=None, rope_scaling=None, max_position_embeddings=8)
    assert rope_parameters(plain) == {"rope_theta": 10000.0, "rope_type": "default"}
    new = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    assert rope_parameters(new)["rope_theta"] == 123.0
    with pytest.raises(ValueError, match="yarn"):
        RotaryEmbedding(16, 8, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})


def test_linear_tp1_matches_nn_linear() -> None:
    x = torch.randn(5, 12)
    w, b = torch.randn(8, 12), torch.randn(8)
    for cls in (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear):
        layer = cls(12, 8, bias=True)
        _load(layer, "weight", w)
        _load(layer, "bias", b)
        assert torch.equal(layer(x), F.linear(x, w, b))
    with pytest.raises(WeightShapeError, match=r"\[8, 11\] but the model expects \[8, 12\]"):
        _load(ColumnParallelLinear(12, 8), "weight", torch.randn(8, 11))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_merged_row_sharding(tp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "tp_all_reduce", lambda x, parallel: x)
    x = torch.randn(3, 16)
    wg, wu, wd, bd = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 8), torch.randn(16)
    gate_up, down_parts = [], []
    for rank in range(tp):
        par = ParallelConfig(tp_size=tp, tp_rank=rank)
        merged = MergedColumnParallelLinear(16, [8, 8], parallel=par)
        _load(merged, "weight", wg, 0)
        _load(merged, "weight", wu, 1)
        g, u = merged(x).chunk(2, dim=-1)  # this rank's gate and up slices
        gate_up.append((g, u))
        row = RowParallelLinear(8, 16, bias=True, parallel=par)
        _load(row, "weight", wd)
        _load(row, "bias", bd)
        h = F.silu(g) * u  # [T, I/tp]
        down_parts.append(row(h) - (bd if rank else 0))  # each rank adds the bias once
    gate = torch.cat([g for g, _ in gate_up], dim=-1)
    up = torch.cat([u for _, u in gate_up], dim=-1)
    torch.testing.assert_close(gate, x @ wg.T)
    torch.testing.assert_close(up, x @ wu.T)
    full = F.silu(x @ wg.T) * (x @ wu.T) @ wd.T + bd
    torch.testing.assert_close(sum(down_parts), full)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_qkv_sharding_splits_heads_and_replicates_kv(tp: int) -> None:
    d, nq, nkv, h = 4, 8, 2, 16
    wq, wk, wv = torch.randn(nq * d, h), torch.randn(nkv * d, h), torch.randn(nkv * d, h)
    bq, bk, bv = torch.randn(nq * d), torch.randn(nkv * d), torch.randn(nkv * d)
    for rank in range(tp):
        qkv = QKVParallelLinear(h, d, nq, nkv, bias=True, parallel=ParallelConfig(tp, rank))
        for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            _load(qkv, "weight", w, sid)
            _load(qkv, "bias", b, sid)
        assert qkv.num_heads == nq // tp and qkv.num_kv_heads == max(1, nkv // tp)
        q, k, v = qkv.weight.split([qkv.q_size, qkv.kv_size, qkv.kv_size])
        qs = slice(rank * qkv.q_size, (rank + 1) * qkv.q_size)
        kv_rank = rank // qkv.num_kv_head_replicas
        ks = slice(kv_rank * qkv.kv_size, (kv_rank + 1) * qkv.kv_size)
        assert torch.equal(q, wq[qs]) and torch.equal(k, wk[ks]) and torch.equal(v, wv[ks])
        bqs, bks, bvs = qkv.bias.split([qkv.q_size, qkv.kv_size, qkv.kv_size])
        assert torch.equal(bqs, bq[qs]) and torch.equal(bks, bk[ks]) and torch.equal(bvs, bv[ks])
    with pytest.raises(ValueError, match="not a multiple"):
        QKVParallelLinear(h, d, 6, 4, parallel=ParallelConfig(6, 0))


@pytest.mark.parametrize("tp", [1, 3])
def test_vocab_parallel_embedding_and_lm_head(tp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding, "tp_all_reduce", lambda x, parallel: x)
    v, h = 10, 6  # 10 rows over 3 ranks: 4 + 4 + 2 (+2 zero padding)
    table = torch.randn(v, h)
    ids = torch.tensor([0, 9, 3, 4, 7, 8])
    hidden = torch.randn(4, h)
    embeds, logits = [], []
    for rank in range(tp):
        par = ParallelConfig(tp, rank)
        emb = VocabParallelEmbedding(v, h, par)
        _load(emb, "weight", table)
        embeds.append(emb(ids))
        head = ParallelLMHead(v, h, par)
        _load(head, "weight", table)
        logits.append(F.linear(hidden, head.weight))
    assert torch.equal(sum(embeds), table[ids])
    full = torch.cat(logits, dim=-1)[:, :v]
    torch.testing.assert_close(full, hidden @ table.T)
    head = ParallelLMHead(v, h)
    head.tie_weights(VocabParallelEmbedding(v, h))
    _load(head, "weight", table)
    out = head.compute_logits(hidden.to(torch.bfloat16).float())
    assert out.dtype == torch.float32 and out.shape == (4, v)
