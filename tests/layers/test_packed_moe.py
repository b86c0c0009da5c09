"""fused_moe_packed (the fused MoE kernels reading the native engine's packed bytes) against the
torch reference on the weights the packing keeps (`pack_unpack`: rounded or dequantized).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on small float32 /
float16 shapes; the tests marked `gpu` run bf16 hidden states against fused_moe.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size.
"""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

pytest.importorskip("triton")

from twinfer.native import native_engine, native_error  # noqa: E402

if native_engine is None:
    pytest.skip(native_error or "no native engine", allow_module_level=True)

from twinfer.layers.moe.backends import TorchExpertBackend  # noqa: E402
from twinfer.layers.moe.packed_kernels import (  # noqa: E402
    PackedGeometry,
    fused_moe_packed,
    packed_block_bytes,
)
from twinfer.layers.moe.triton_kernels import GemmConfig, MoEConfig, fused_moe  # noqa: E402

_E = native_engine
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (format, group size): every packed format, the grouped ones (int4, int4z, fp8) at two sizes.
FORMATS = [
    ("f32", 0), ("f16", 0), ("bf16", 0), ("int8", 0), ("int4", 32), ("int4", 64), ("int4z", 32),
    ("fp8", 32), ("fp8", 64),
]  # fmt: skip
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 5e-3)}
# Blocks of 16 everywhere: several N blocks, several k-steps per int4 group, ragged edges.
SMALL = MoEConfig(16, GemmConfig(16, 16, 4, 2, 2), GemmConfig(16, 32, 4, 2, 1))


class Packed:
    """Random experts packed by the native engine: the layer's bytes (the shards' arenas
    concatenated, as gpu_prefill copies them), its geometry and the effective weights."""

    def __init__(self, fmt: str, group: int, e: int, h: int, i: int, nodes=(0,), seed=0) -> None:
        g = torch.Generator().manual_seed(seed)
        w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5  # [E, 2I, H] gate rows, up rows
        w2 = torch.randn(e, h, i, generator=g) / i**0.5  # [E, H, I]
        pool = _E.ThreadPool([[] for _ in nodes], list(nodes), 20)  # unpinned workers
        layer = _E.ExpertLayer(pool, e, h, i, fmt, group, False)
        layer.load_experts(
            list(range(e)), [w.data_ptr() for w in w13], [w.data_ptr() for w in w2], "f32"
        )
        self.plan = layer.shard_plan()
        self.buf = torch.cat([_host_bytes(s["arena_ptr"], s["arena_bytes"]) for s in self.plan])
        self.geom = PackedGeometry.from_layer(layer)
        self.w13, self.w2 = torch.empty_like(w13), torch.empty_like(w2)
        for x in range(e):
            _E.pack_unpack(fmt, 2 * i, h, group, w13[x].data_ptr(), "f32", self.w13[x].data_ptr())
            _E.pack_unpack(fmt, h, i, group, w2[x].data_ptr(), "f32", self.w2[x].data_ptr())

    def run(self, hidden, weights, ids, config=None) -> torch.Tensor:
        buf, geom = self.buf.to(DEVICE), self.geom.to(DEVICE)
        return fused_moe_packed(hidden, weights, ids, buf, geom, config=config)

    def reference(self, hidden, weights, ids) -> torch.Tensor:
        """float64 on the same (rounded) inputs and the effective weights."""
        return TorchExpertBackend().forward(
            hidden.cpu().double(), weights.cpu().double(), ids.cpu().long(),
            self.w13.double(), self.w2.double(),
        )  # fmt: skip


def _host_bytes(ptr: int, nbytes: int) -> torch.Tensor:
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8).clone()


_CACHE: dict[tuple, Packed] = {}


def _packed(fmt: str, group: int, e: int = 8, h: int = 64, i: int = 64, nodes=(0,)) -> Packed:
    key = (fmt, group, e, h, i, tuple(nodes))
    if key not in _CACHE:
        _CACHE[key] = Packed(fmt, group, e, h, i, nodes)
    return _CACHE[key]


def _route(t: int, e: int, k: int, seed: int = 0):
    """(weights [T, K] float32, ids [T, K] int64): softmax top-k of random logits."""
    g = torch.Generator().manual_seed(seed)
    w, ids = torch.randn(t, e, generator=g).softmax(-1).topk(k, dim=-1)
    return w.to(DEVICE), ids.to(DEVICE)


def _hidden(t: int, h: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, h, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _check(p: Packed, hidden, weights, ids, config=None) -> None:
    out = p.run(hidden, weights, ids, config=config)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    atol, rtol = TOLERANCE[hidden.dtype]
    torch.testing.assert_close(
        out.cpu().double(), p.reference(hidden, weights, ids), atol=atol, rtol=rtol
    )


# ---- interpreter (or GPU) tests on small shapes -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("t,k", [(1, 1), (1, 2), (5, 2), (12, 1), (40, 2)])
def test_matches_reference(fmt: str, group: int, dtype: torch.dtype, t: int, k: int) -> None:
    p = _packed(fmt, group)
    weights, ids = _route(t, 8, k, seed=t)  # T = 1, 5: most of the 8 experts get no token
    _check(p, _hidden(t, 64, dtype), weights, ids)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_small_blocks_two_shards(fmt: str, group: int) -> None:
    """Two simulated NUMA nodes (two arenas in the buffer, tables across them) and blocks of 16:
    several N blocks and k-steps, two k-steps per int4 group of 32."""
    p = _packed(fmt, group, e=6, nodes=(0, 1))
    assert len(p.geom.shard_offsets) == 2 and p.geom.aligned
    weights, ids = _route(21, 6, 3, seed=3)
    _check(p, _hidden(21, 64, torch.float32), weights.half(), ids.int(), config=SMALL)
    if group == 32:  # f16 activations: the q and scales path at two k-steps per group
        _check(p, _hidden(21, 64, torch.float16), weights, ids, config=SMALL)


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "int8"])
@pytest.mark.parametrize("h,i", [(72, 20), (40, 40)])
def test_unaligned_shards_and_ragged_k(fmt: str, h: int, i: int) -> None:
    """Shard bounds off the 16-row blocks (I = 20 splits 10 + 10), N not a multiple of 16 and
    K not a multiple of the k-step: no contiguity hints, masked last steps."""
    p = _packed(fmt, 0, e=4, h=h, i=i, nodes=(0, 1))
    assert not p.geom.aligned
    weights, ids = _route(9, 4, 2, seed=5)
    _check(p, _hidden(9, h, torch.float32), weights, ids)
    _check(p, _hidden(9, h, torch.float32), weights, ids, config=SMALL)


@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_on_few_experts_others_empty(k: int) -> None:
    p = _packed("int4", 32, i=32)  # the tiny test models' experts: H=64, I=32
    t = 37
    ids = torch.tensor([5, 2][:k], device=DEVICE).repeat(t, 1)  # experts 5 (and 2) only
    weights = torch.rand(t, k, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _check(p, _hidden(t, 64, torch.float32), weights, ids)


def test_no_tokens() -> None:
    p = _packed("bf16", 0)
    hidden = torch.empty(0, 64, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    out = p.run(hidden, torch.empty(0, 2, device=DEVICE), ids)
    assert out.shape == (0, 64)


def test_larger_buffer_is_fine() -> None:
    """gpu_prefill's staging buffers are sized for the largest layer."""
    p = _packed("int8", 0)
    weights, ids = _route(3, 8, 2)
    hidden = _hidden(3, 64, torch.float32)
    buf = torch.cat([p.buf, torch.full((4096,), 255, dtype=torch.uint8)]).to(DEVICE)
    out = fused_moe_packed(hidden, weights, ids, buf, p.geom.to(DEVICE))
    torch.testing.assert_close(out, p.run(hidden, weights, ids), atol=0, rtol=0)


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_inputs_raise() -> None:
    p = _packed("int8", 0)
    buf, geom = p.buf.to(DEVICE), p.geom.to(DEVICE)
    weights, ids = _route(3, 8, 2)
    hidden = _hidden(3, 64, torch.float32)
    with pytest.raises(ValueError, match="buf holds 100 bytes"):
        fused_moe_packed(hidden, weights, ids, buf[:100], geom)
    with pytest.raises(ValueError, match="buf must be a contiguous 1-D uint8"):
        fused_moe_packed(hidden, weights, ids, buf.view(torch.int8), geom)
    with pytest.raises(ValueError, match=r"hidden must be \[T, 64\]"):
        fused_moe_packed(_hidden(3, 32, torch.float32), weights, ids, buf, geom)
    with pytest.raises(ValueError, match="hidden must be float"):
        fused_moe_packed(hidden.int(), weights, ids, buf, geom)
    with pytest.raises(ValueError, match="topk_ids must be int32 or int64"):
        fused_moe_packed(hidden, weights, ids.float(), buf, geom)
    with pytest.raises(ValueError, match="topk_ids and topk_weights must both be"):
        fused_moe_packed(hidden, weights[:, :1], ids, buf, geom)
    with pytest.raises(ValueError, match="topk_weights must be floating"):
        fused_moe_packed(hidden, ids, ids, buf, geom)
    with pytest.raises(ValueError, match="16-byte aligned"):
        fused_moe_packed(hidden, weights, ids, torch.cat([buf, buf])[1 : 1 + buf.numel()], geom)
    meta = p.geom.to("meta")
    with pytest.raises(ValueError, match="one device.*geom's tables on meta"):
        fused_moe_packed(hidden, weights, ids, buf, meta)
    with pytest.raises(ValueError, match="one device.*buf on meta"):
        fused_moe_packed(hidden, weights, ids, torch.empty_like(buf, device="meta"), geom)


# ---- the geometry -------------------------------------------------------------------------------


def _plan_by_hand() -> list[dict]:
    """bf16, E=3, H=64, I=40 in two shards: inner [0, 32) + [32, 40), hidden [0, 48) + [48, 64).
    A bf16 block of 16 rows is 32 * Kp bytes: 2048 for H = 64 columns, 2048 for I = 40 (Kp 64).
    Shard 0: gate 2 blocks (4096 B), up at 4096, down (3 blocks) at 8192, stride 14336.
    Shard 1: gate 1 block, up at 2048, down (1 block) at 4096, stride 6144."""
    return [
        dict(inner_begin=0, inner_end=32, hidden_begin=0, hidden_end=48, arena_bytes=3 * 14336,
             stride=14336, up_off=4096, down_off=8192),
        dict(inner_begin=32, inner_end=40, hidden_begin=48, hidden_end=64, arena_bytes=3 * 6144,
             stride=6144, up_off=2048, down_off=4096),
    ]  # fmt: skip


def test_geometry_by_hand() -> None:
    geom = PackedGeometry.from_shard_plan(_plan_by_hand(), "bf16", 128, 3, 64, 40)
    assert geom.group_size == 0  # ignored for bf16, like the native layer
    assert geom.shard_offsets == (0, 43008) and geom.shard_bytes == (43008, 18432)
    assert geom.nbytes == 61440 and not geom.aligned  # I = 40: not whole blocks of 16
    assert geom.gate.shape == geom.up.shape == (3, 40) and geom.down.shape == (3, 64)
    assert geom.gate.dtype == torch.int64 and geom.device == torch.device("cpu")
    assert geom.gate[:, 17].tolist() == [2048, 1, 14336]  # shard 0, block 1, lane 1
    assert geom.up[:, 17].tolist() == [4096 + 2048, 1, 14336]
    assert geom.gate[:, 39].tolist() == [43008 + 0, 7, 6144]  # shard 1 row 7
    assert geom.up[:, 33].tolist() == [43008 + 2048, 1, 6144]
    assert geom.down[:, 47].tolist() == [8192 + 2 * 2048, 15, 14336]  # shard 0, block 2
    assert geom.down[:, 50].tolist() == [43008 + 4096, 2, 6144]  # shard 1 row 2
    assert geom.to("cpu") is geom
    moved = geom.to("meta")
    assert moved.down.device.type == "meta" and moved.nbytes == geom.nbytes


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_geometry_matches_native_plan(fmt: str, group: int) -> None:
    """Each row's table entry against the plan's own numbers, and the block sizes against the
    native packed_bytes."""
    p = _packed(fmt, group, e=6, nodes=(0, 1))
    geom, plan = p.geom, p.plan
    assert geom.nbytes == p.buf.numel() == sum(s["arena_bytes"] for s in plan)
    for rows, cols in ((16, 64), (32, 64)):
        assert rows // 16 * packed_block_bytes(fmt, cols, group) == _E.packed_bytes(
            fmt, rows, cols, group
        )
    for s, off in zip(plan, geom.shard_offsets, strict=True):
        ub, db = packed_block_bytes(fmt, 64, group), packed_block_bytes(fmt, 64, group)  # H, I
        for r in range(s["inner_begin"], s["inner_end"]):
            local = r - s["inner_begin"]
            assert geom.gate[:, r].tolist() == [off + local // 16 * ub, local % 16, s["stride"]]
            assert geom.up[0, r] == off + s["up_off"] + local // 16 * ub
        for r in range(s["hidden_begin"], s["hidden_end"]):
            local = r - s["hidden_begin"]
            assert geom.down[0, r] == off + s["down_off"] + local // 16 * db


def test_bad_plans_raise() -> None:
    plan = _plan_by_hand()
    args = ("bf16", 0, 3, 64, 40)
    with pytest.raises(ValueError, match="'int3' is not one of"):
        PackedGeometry.from_shard_plan(plan, "int3", 0, 3, 64, 40)
    with pytest.raises(ValueError, match="fp8 group_size 48"):
        PackedGeometry.from_shard_plan(plan, "fp8", 48, 3, 64, 64)
    with pytest.raises(ValueError, match="int4 group_size 16"):
        PackedGeometry.from_shard_plan(plan, "int4", 16, 3, 64, 64)
    with pytest.raises(ValueError, match="divisible by the group size 64"):
        PackedGeometry.from_shard_plan(plan, "int4", 64, 3, 64, 40)
    with pytest.raises(ValueError, match="must be >= 1"):
        PackedGeometry.from_shard_plan(plan, "bf16", 0, 0, 64, 40)
    with pytest.raises(ValueError, match="empty"):
        PackedGeometry.from_shard_plan([], *args)
    with pytest.raises(ValueError, match="lacks up_off"):
        PackedGeometry.from_shard_plan([{k: v for k, v in plan[0].items() if k != "up_off"}], *args)
    gap = [plan[0], dict(plan[1], inner_begin=33)]
    with pytest.raises(ValueError, match=r"must cover \[0, 40\) and \[0, 64\) in order"):
        PackedGeometry.from_shard_plan(gap, *args)
    with pytest.raises(ValueError, match=r"cover inner \[0, 32\) and hidden \[0, 48\)"):
        PackedGeometry.from_shard_plan(plan[:1], *args)
    with pytest.raises(ValueError, match="arena_bytes 40000"):
        PackedGeometry.from_shard_plan([dict(plan[0], arena_bytes=40000), plan[1]], *args)
    # f32 blocks are twice bf16's: the bf16 plan has no room for them.
    with pytest.raises(ValueError, match="wrong format or group size"):
        PackedGeometry.from_shard_plan(plan, "f32", 0, 3, 64, 40)


# ---- GPU tests: bf16 hidden states, the tuned configs -------------------------------------------


def _unpacked(p: Packed, dtype: torch.dtype):
    return p.w13.to(DEVICE, dtype), p.w2.to(DEVICE, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt,group",
    [
        ("bf16", 0), ("int4", 128), ("int4", 32), ("int8", 0), ("f16", 0), ("f32", 0),
        ("int4z", 128), ("fp8", 128), ("fp8", 32),
    ],
)  # fmt: skip
@pytest.mark.parametrize("t", [1, 33, 256])
def test_gpu_bf16_against_fused_moe(fmt: str, group: int, t: int) -> None:
    e, k, h, i = 16, 4, 256, 128
    p = _packed(fmt, group, e=e, h=h, i=i)
    weights, ids = _route(t, e, k, seed=t)
    hidden = _hidden(t, h, torch.bfloat16)
    out = p.run(hidden, weights, ids)
    assert out.dtype == torch.bfloat16 and out.shape == (t, h)
    ref = fused_moe(hidden, weights, ids, *_unpacked(p, torch.bfloat16))
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)
    exact = p.reference(hidden, weights, ids).float().to(DEVICE)
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("fmt,group", [("bf16", 0), ("int4", 128)])
def test_gpu_qwen3_expert_shape(fmt: str, group: int) -> None:
    """Qwen3-30B-A3B's expert shape (H=2048, I=768, K=8; 16 of its 128 experts, so 4096 tokens
    fill each as 32768 tokens would fill 128): the prefill configs, timed against fused_moe."""
    e, k, h, i, t = 16, 8, 2048, 768, 4096
    p = _packed(fmt, group, e=e, h=h, i=i)
    weights, ids = _route(t, e, k, seed=1)
    hidden = _hidden(t, h, torch.bfloat16)
    buf, geom = p.buf.to(DEVICE), p.geom.to(DEVICE)
    w13, w2 = _unpacked(p, torch.bfloat16)
    out = fused_moe_packed(hidden, weights, ids, buf, geom)
    ref = fused_moe(hidden, weights, ids, w13, w2)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)

    def best_ms(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    packed_ms = best_ms(lambda: fused_moe_packed(hidden, weights, ids, buf, geom))
    plain_ms = best_ms(lambda: fused_moe(hidden, weights, ids, w13, w2))
    print(f"\n{fmt}: fused_moe_packed {packed_ms:.3f} ms, fused_moe (bf16) {plain_ms:.3f} ms")
