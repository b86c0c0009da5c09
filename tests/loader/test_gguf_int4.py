"""GGUF Q4 weights on their int4 grid: exact grid, a linear layer that computes with it."""

from __future__ import annotations

import pytest
import torch

from twinfer.layers.linear import MergedColumnParallelLinear
from twinfer.loader.gguf import GGUFCheckpoint, dequantize, q4_grid


def dense(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return ((q.float() - 8).view(n, k // 32, 32) * scale[..., None] + zero[..., None]).view(n, k)


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf) -> GGUFCheckpoint:
    return GGUFCheckpoint(smollm2_gguf)


def test_int4_grid_is_exactly_the_dequantized_weight(checkpoint) -> None:
    weights = dict(checkpoint.weights(torch.float32))
    q4 = checkpoint.q4_dense_modules()
    assert len(q4) == 210  # every Q4_1 matrix of SmolLM2 (the Q8_0 embedding is not)
    grids = dict(checkpoint.weights(torch.float32, dense_grids=frozenset(q4)))
    for module in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.7.self_attn.k_proj",  # llama.cpp's row permutation undone on the grid
        "model.layers.29.mlp.down_proj",
    ):
        q, scale, zero = (grids[f"{module}.grid_{k}"] for k in ("q", "scale", "zero"))
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        assert torch.equal(dense(q, scale, zero), weights[f"{module}.weight"])
        assert f"{module}.weight" not in grids


def test_q4_0_blocks() -> None:
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (4 * 3, 18), dtype=torch.uint8)
    blocks[:, :2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)  # d = 1.0 (fp16)
    raw = blocks.reshape(-1)
    q, scale, zero = q4_grid(raw, 2, (4, 96))
    assert torch.equal(dense(q, scale, zero), dequantize(raw, 2, (4, 96)))
    assert q4_grid(raw, 8, (4, 96)) is None  # not a Q4 type


@pytest.mark.parametrize("n", [64, 20])  # 2 x 20 rows: not in 16-row packs, dequantized
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_matches_the_dense_layer(dtype, n: int) -> None:
    """A fused layer (gate_up) loads both projections' grids and computes with them."""
    from twinfer.layers.quantization.gguf_grid import GgufGridConfig

    torch.manual_seed(0)
    k = 128
    grids = [
        (
            torch.randint(0, 16, (n, k), dtype=torch.uint8),
            torch.rand(n, k // 32) * 0.02,
            torch.randn(n, k // 32) * 0.01,
        )
        for _ in range(2)
    ]
    config = GgufGridConfig(set(), {"m.mlp.gate_proj", "m.mlp.up_proj"})
    method = config.linear_method("m.mlp.gate_up_proj")
    with torch.device("cpu"):
        torch.set_default_dtype(dtype)
        try:
            layer = MergedColumnParallelLinear(k, [n, n], bias=False, quant_method=method)
        finally:
            torch.set_default_dtype(torch.float32)
    for shard, grid in enumerate(grids):
        for name, t in zip(("grid_q", "grid_scale", "grid_zero"), grid, strict=True):
            param = getattr(layer, name)
            param.weight_loader(param, t, shard)
    layer.process_weights_after_loading()
    w = torch.cat([dense(*g) for g in grids])
    x = torch.randn(5, k, dtype=dtype)
    got = layer(x)
    assert got.dtype == dtype and layer.grid_q.numel() == 0  # the grid's copy freed
    assert (layer.int4_weight is not None) == (2 * n % 16 == 0)
    torch.testing.assert_close(got.float(), x.float() @ w.t(), atol=2e-2, rtol=2e-2)


def test_q4_k_blocks_are_an_int4_grid_in_groups_of_32() -> None:
    """Q4_K (the bulk of Q4_K_M files): sub-block j's d * sc_j * q - dmin * m_j is the int4 grid
    (q - 8) * scale + zero; gguf-py's dequantizer (an independent reader) is the oracle."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as np_dequantize

    from tests.loader.test_gguf import _random_blocks

    t = GGMLQuantizationType.Q4_K
    rows, cols = 24, 512
    blocks = _random_blocks(t, rows, cols)  # every bit pattern of scales, mins and quants
    raw = torch.from_numpy(blocks.reshape(-1).copy())
    q, scale, zero = q4_grid(raw, int(t), (rows, cols))
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (rows, cols // 32)
    reference = torch.from_numpy(np_dequantize(blocks, t)).reshape(rows, cols)
    assert torch.allclose(dense(q, scale, zero), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(dequantize(raw, int(t), (rows, cols)), reference)
