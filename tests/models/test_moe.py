"""MoELayer vs HF's Qwen3MoeSparseMoeBlock and MixtralSparseMoeBlock with the same random weights.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from twinfer.layers.moe import (
    ExpertPlacement,
    MoELayer,
    available_expert_backends,
    get_expert_backend,
)
from twinfer.layers.moe import layer as moe_layer
from twinfer.parallel import ParallelConfig

H, I, E = 32, 16, 8  # noqa: E741 (the legend's expert inner size)


def _hf_block(family: str, top_k: int, norm_topk_prob: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(
            hidden_size=H,
            moe_intermediate_size=I,
            num_experts=E,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_topk_prob,
            experts_implementation="eager",
        )
        block = Qwen3MoeSparseMoeBlock(config)
    else:
        config = MixtralConfig(
            hidden_size=H,
            intermediate_size=I,
            num_local_experts=E,
            num_experts_per_tok=top_k,
            experts_implementation="eager",
        )
        block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.eval()


def _ours(block: nn.Module, family: str, per_expert: bool, tp: int = 1, rank: int = 0) -> MoELayer:
    layer = MoELayer(
        num_experts=E,
        top_k=block.gate.top_k,
        hidden_size=H,
        intermediate_size=I,
        renormalize=True if family == "mixtral" else block.gate.norm_topk_prob,
        parallel=ParallelConfig(tp, rank),
        prefix="model.layers.0.mlp",
        cast_routing_weights=family != "mixtral",
    )
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    layer.gate.weight.weight_loader(layer.gate.weight, block.gate.weight.detach())
    w13, w2 = layer.w13_weight, layer.w2_weight
    if per_expert:  # the on-disk per-expert names: gate/up [I, H] and down [H, I]
        for e in range(E):
            w13.weight_loader(w13, gate_up[e, :I], (e, "w1"))
            w13.weight_loader(w13, gate_up[e, I:], (e, "w3"))
            w2.weight_loader(w2, down[e], (e, "w2"))
    else:  # transformers 5 fused layout
        w13.weight_loader(w13, gate_up, (None, "w13"))
        w2.weight_loader(w2, down, (None, "w2"))
    return layer


def _compare(block: nn.Module, layer: MoELayer, x: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        expected = block(x[None])[0]
        got = layer(x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("per_expert", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_matches_hf(family: str, per_expert: bool, top_k: int) -> None:
    block = _hf_block(family, top_k)
    layer = _ours(block, family, per_expert)
    _compare(block, layer, torch.randn(13, H))


def test_qwen3_moe_without_renormalize() -> None:
    block = _hf_block("qwen3_moe", 2, norm_topk_prob=False)
    layer = _ours(block, "qwen3_moe", per_expert=True)
    assert not layer.renormalize
    _compare(block, layer, torch.randn(9, H))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_to_one_expert_and_empty_experts(family: str, top_k: int) -> None:
    block = _hf_block(family, top_k)
    with torch.no_grad():  # positive inputs: router rows 5 then 2 win for every token
        block.gate.weight.mul_(0.01)
        block.gate.weight[5] = 1.0
        block.gate.weight[2] = 0.5
    layer = _ours(block, family, per_expert=False)
    x = torch.rand(11, H) + 0.1
    _, ids = layer.route(x)
    assert set(ids.flatten().tolist()) == ({5} if top_k == 1 else {5, 2})
    _compare(block, layer, x)


def test_few_tokens_leave_experts_empty() -> None:
    block = _hf_block("qwen3_moe", 2)
    layer = _ours(block, "qwen3_moe", per_expert=True)
    for t in (1, 2, 3):
        x = torch.randn(t, H)
        _, ids = layer.route(x)
        assert len(set(ids.flatten().tolist())) < E
        _compare(block, layer, x)
    assert layer(torch.empty(0, H)).shape == (0, H)


def test_bf16_close_to_hf() -> None:
    for family in ("qwen3_moe", "mixtral"):
        block = _hf_block(family, 2).to(torch.bfloat16)
        layer = _ours(block, family, per_expert=False).to(torch.bfloat16)
        _compare(block, layer, torch.randn(16, H, dtype=torch.bfloat16), atol=2e-2)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_partial_sums(tp: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_layer, "tp_all_reduce", lambda x, parallel: x)
    block = _hf_block("qwen3_moe", 2)
    x = torch.randn(10, H)
    with torch.no_grad():
        # Ranks alternate per-expert and fused loading: both must cut the same slice of I.
        parts = [_ours(block, "qwen3_moe", r % 2 == 0, tp, r)(x) for r in range(tp)]
        expected = block(x[None])[0]
    torch.testing.assert_close(sum(parts), expected, atol=1e-5, rtol=0)


def test_weight_errors() -> None:
    layer = MoELayer(E, 2, H, I, renormalize=True)
    w13 = layer.w13_weight
    with pytest.raises(ValueError, match="expects"):
        w13.weight_loader(w13, torch.randn(I, H + 1), (0, "w1"))
    with pytest.raises(ValueError, match="expert 8"):
        w13.weight_loader(w13, torch.randn(I, H), (8, "w1"))
    with pytest.raises(ValueError, match="sigmoid"):
        MoELayer(E, 2, H, I, renormalize=True, scoring="sigmoid")


def test_backend_registry_and_placement() -> None:
    assert "torch" in available_expert_backends()
    assert get_expert_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="available: .*torch"):
        get_expert_backend("nope")
    placement = ExpertPlacement.uniform(4, fmt="bf16")
    assert placement.experts_at("gpu") == [0, 1, 2, 3] and placement.experts_at("host") == []
    mixed = ExpertPlacement(("gpu", "host", "host"), ("bf16", "int4", "int4"))
    assert mixed.summary() == "3 experts: 1 gpu/bf16, 2 host/int4"
    with pytest.raises(ValueError, match="location"):
        ExpertPlacement(("disk",), ("bf16",))
    with pytest.raises(ValueError, match="placement covers 4"):
        MoELayer(E, 2, H, I, renormalize=True, placement=placement)
    assert MoELayer(E, 2, H, I, renormalize=True).placement.formats == ("fp32",) * E
