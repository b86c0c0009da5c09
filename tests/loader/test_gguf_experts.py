"""GGUF Q4 routed experts (stacked `ffn_*_exps` in Q4_0 / Q4_1) kept on their int4 grid in the
CPU expert engine (int4z: a scale and an offset per group of 32), losslessly; other types in the
same layer (Q8_0 here) quantized beside them. The files are written by the `gguf` package."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.loader.test_gguf import EXPERTS, HIDDEN, INNER, _hf_tensors, _write_gguf
from twinfer.layers.moe import MoELayer
from twinfer.layers.moe.backends import TorchExpertBackend
from twinfer.layers.quantization.gguf_grid import GgufGridConfig, GgufGridMoEMethod
from twinfer.loader.gguf import GGUFCheckpoint
from twinfer.native import native_engine, native_error

needs_native = pytest.mark.skipif(native_engine is None, reason=native_error or "no engine")
PREFIX = "model.layers.1.mlp"


def _checkpoint(tmp_path: Path, qtypes: dict[str, str]) -> GGUFCheckpoint:
    path = tmp_path / "moe.gguf"
    _write_gguf(path, "qwen3moe", _hf_tensors("qwen3moe", moe=True), qtype="Q4_1", qtypes=qtypes)
    return GGUFCheckpoint(path)


def _layer(ckpt: GGUFCheckpoint) -> MoELayer:
    """Layer 1's experts loaded from the file's grids (and dequantized tensors elsewhere)."""
    config = GgufGridConfig(ckpt.q4_expert_parts())
    layer = MoELayer(EXPERTS, 2, HIDDEN, INNER, True, prefix=PREFIX,
                     quant_method=config.moe_method(PREFIX))  # fmt: skip
    params = dict(layer.named_parameters())
    shard = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for name, tensor in ckpt.weights(torch.float32, expert_grids=True):
        if not name.startswith(f"{PREFIX}.experts."):
            continue
        expert, proj, kind = name.split(".")[-3:]  # ...experts.<e>.<proj>.<weight | grid_*>
        expert = int(expert)
        target = f"{'w2' if proj == 'down_proj' else 'w13'}_{kind}"
        params[target].weight_loader(params[target], tensor, (expert, shard[proj]))
    return layer


def test_q4_expert_grids_are_the_files_values(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, {"down_proj": "Q4_0"})
    assert ckpt.q4_expert_parts() == {(n, w) for n in (0, 1) for w in ("w13", "w2")}
    plain = dict(ckpt.weights(torch.float32))
    grids = dict(ckpt.weights(torch.float32, expert_grids=True))
    for proj in ("gate_proj", "down_proj"):
        base = f"{PREFIX}.experts.2.{proj}"
        q, s, z = (grids[f"{base}.grid_{k}"] for k in ("q", "scale", "zero"))
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        value = (q.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
        torch.testing.assert_close(value, plain[f"{base}.weight"], rtol=0, atol=1e-6)
        assert f"{base}.weight" not in grids


@needs_native
def test_q4_experts_pack_losslessly_as_int4z(tmp_path: Path) -> None:
    from twinfer.hybrid.cpu_experts import CpuExpertEngine
    from twinfer.hybrid.numa import WorkerPlan

    layer = _layer(_checkpoint(tmp_path, {"down_proj": "Q4_0"}))
    experts = layer.quant_method.expert_tensors(layer, "int4z", torch.float32)
    engine = CpuExpertEngine(WorkerPlan([[]], [0]), spin_us=20, max_tokens=16)
    host = engine.add_layer(experts.w13, experts.w2, "int4z", 32, experts.scales, experts.offsets)
    w13, w2 = layer.quant_method.dequantize(layer, torch.float32)
    hidden = torch.randn(5, HIDDEN)
    weights, ids = torch.softmax(torch.randn(5, EXPERTS), -1).topk(2)
    got = host.forward(hidden, weights, ids)
    want = TorchExpertBackend().forward(hidden, weights, ids, w13, w2)
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # the grid, not a requantization


def test_mixed_layers_quantize_the_rest_beside_the_grid(tmp_path: Path, caplog) -> None:
    ckpt = _checkpoint(tmp_path, {"down_proj": "Q8_0"})
    assert ckpt.q4_expert_parts() == {(0, "w13"), (1, "w13")}
    layer = _layer(ckpt)
    assert isinstance(layer.quant_method, GgufGridMoEMethod)
    assert layer.w2_weight.dtype.is_floating_point  # Q8_0: dequantized as it loads
    with caplog.at_level(logging.INFO):
        experts = layer.quant_method.expert_tensors(layer, "int4z", torch.float32)
    assert "down experts are not Q4 in the file" in caplog.text
    s2, m2 = experts.scales[1], experts.offsets[1]
    q = torch.round((experts.w2 - m2.repeat_interleave(32, -1)) / s2.repeat_interleave(32, -1))
    assert q.min() >= -8 and q.max() <= 7  # min/max groups: every value on the grid's range
    assert GgufGridConfig(ckpt.q4_expert_parts()).moe_kept_format() == ("int4z", 32)
