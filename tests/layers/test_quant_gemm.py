"""Dense quantized GEMMs (block FP8 W8A8, W4A16 int4 groups) against float32 torch references.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on small shapes, with
FP8 emulated from its bytes; the tests marked `gpu` run bf16 at DeepSeek-like sizes on the native
FP8 path. The references do the same math on the same quantized operands: FP8 quantizes x per
token group exactly as the kernel (the codes are compared bit for bit) and sums each k-group's
exact dot times s_x * s_w in float32, so only the accumulation order differs; int4 multiplies
by W = (q - z) * s dequantized in float32.

Tolerances: float32 outputs 1e-4 (accumulation order); float16 outputs 2e-3 (the output's and,
for int4, each weight's rounding to float16: 2^-11 relative); bf16 on the GPU 3e-2 (bf16
rounding 2^-8, and the H100's FP8 tensor cores keep ~14 mantissa bits inside one k-tile).

Shapes: `T` tokens, `N` output features, `K` input features, `g` the int4 group size.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from twinfer.layers.quantization.triton_kernels import (  # noqa: E402
    QuantGemmConfig,
    e4m3_bits,
    e4m3_to_f16,
    per_token_group_quant_fp8,
    repack_w4a16,
    unpack_int4_rows,
    w4a16_matmul,
    w8a8_block_fp8_matmul,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}


# ---- references ------------------------------------------------------------------------------


def ref_group_quant(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's act_quant per token and `group` columns (a ragged last group allowed)."""
    t, k = x.shape
    xq = torch.empty(t, k, dtype=FP8, device=x.device)
    scales = []
    for j in range(0, k, group):
        xg = x[:, j : j + group].float()
        s = xg.abs().amax(1).clamp(min=1e-10) / 448.0
        xq[:, j : j + group] = (xg / s[:, None]).clamp(-448.0, 448.0).to(FP8)
        scales.append(s)
    return xq, torch.stack(scales, 1)


def ref_fp8_matmul(x, weight, scale, block, bias=None) -> torch.Tensor:
    """sum over k-groups of (xq . wq) * s_x * s_w in float32 -> [T, N] float32."""
    bn, bk = block
    xq, xs = ref_group_quant(x, bk)
    s_w = scale.float().repeat_interleave(bn, 0)[: weight.shape[0]]  # [N, K/bk]
    y = torch.zeros(x.shape[0], weight.shape[0], device=x.device)
    for g, j in enumerate(range(0, x.shape[1], bk)):
        part = xq[:, j : j + bk].float() @ weight[:, j : j + bk].float().T
        y += part * xs[:, g, None] * s_w[None, :, g]
    return y if bias is None else y + bias.float()


def dequant_int4(q, scales, zeros, group) -> torch.Tensor:
    """W [N, K] float32 = (q - z) * s per group (z = 8 without zeros)."""
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(group, -1)
    return (q.float() - z) * scales.float().repeat_interleave(group, -1)


def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """q [..., R, C] in 0..15 -> int32 [..., R, C/8], element i at bits 4i (the checkpoints')."""
    words = q.reshape(*q.shape[:-1], -1, 8).to(torch.int64) << (torch.arange(8) * 4).to(q.device)
    words = words.sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4_rows(z: torch.Tensor) -> torch.Tensor:
    """z [..., R, G] in 0..15 -> int32 [..., ceil(R/8), G] packed along the rows."""
    rows = z.shape[-2]
    pad = torch.zeros(*z.shape[:-2], -rows % 8, z.shape[-1], dtype=z.dtype, device=z.device)
    return pack_int4_k(torch.cat([z, pad], -2).transpose(-1, -2)).transpose(-1, -2).contiguous()


def fp8_weight(n: int, k: int, block: tuple[int, int], seed: int = 0):
    """(weight [N, K] fp8 over the e4m3 range, scale [ceil(N/bn), ceil(K/bk)]): W ~ 1/sqrt(K)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 96).clamp(-448, 448).to(FP8)
    s = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) + 0.5
    return w.to(DEVICE), (s / (96 * k**0.5)).to(DEVICE)


def int4_weight(n: int, k: int, group: int, zero: bool, seed: int = 0):
    """(q [N, K] 0..15, scales [N, K/g], zeros [N, K/g] or None)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    s = (torch.rand(n, k // group, generator=g) + 0.5) / (4 * k**0.5)
    z = torch.randint(0, 16, (n, k // group), generator=g) if zero else None
    return q.to(DEVICE), s.to(DEVICE), None if z is None else z.to(DEVICE)


def _randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _close(out, ref, dtype):
    if dtype == torch.bfloat16:
        return close_bf16(out, ref)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def close_bf16(out, ref, rel: float = 8e-3, worst_share: float = 2e-2) -> None:
    """bf16 outputs of long dots: elementwise tolerances fail on the odd element near zero (a
    relative one) or of large magnitude (an absolute one), as bf16 rounding of the weights and the
    output, and H100 FP8 MMAs' ~14-bit accumulation within a k-tile, scale with the values. So:
    the relative error over the whole output (||out - ref|| / ||ref||, the kernels' 1e-3 rule
    loosened to bf16's 2^-8 precision) and every element within 2% of the largest |ref|."""
    out, ref = out.float(), ref.float()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < rel, f"relative error {err:.2e}"
    worst = (out - ref).abs().max().item()
    assert worst <= worst_share * ref.abs().max().item(), f"max abs error {worst:.3e}"


# ---- FP8 conversions and activation quantization ------------------------------------------------


@triton.jit
def _convert_kernel(y_ptr, bits_ptr, f16_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = e4m3_bits(tl.load(y_ptr + offs, mask=mask, other=0.0))
    tl.store(bits_ptr + offs, bits, mask=mask)
    tl.store(f16_ptr + offs, e4m3_to_f16(bits), mask=mask)


def test_e4m3_emulation_rounds_like_torch() -> None:
    """The interpreter's integer-op conversions: every e4m3 value, every midpoint between two
    (ties to even) and just beside them, and random values over the whole range."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(FP8).float()
    values = values[values.isfinite()].unique()  # [253]: +0 and every finite value
    mids = (values[1:] + values[:-1]) / 2
    y = torch.cat(
        [
            values,
            mids,
            torch.nextafter(mids, torch.full_like(mids, 1e9)),
            torch.nextafter(mids, torch.full_like(mids, -1e9)),
            torch.tensor([-0.0, 1e-30, -1e-30, 2.0**-10, 3 * 2.0**-10, 448.0, -448.0]),
            (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100).clamp(-448, 448),
        ]
    ).to(DEVICE)
    bits = torch.empty(y.numel(), dtype=torch.uint8, device=DEVICE)
    f16 = torch.empty(y.numel(), dtype=torch.float16, device=DEVICE)
    _convert_kernel[(triton.cdiv(y.numel(), 1024),)](y, bits, f16, y.numel(), BLOCK=1024)
    expected = y.to(FP8)
    assert torch.equal(bits, expected.view(torch.uint8))
    assert torch.equal(f16.float(), expected.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,k,group", [(1, 128, 128), (5, 96, 32), (3, 80, 32), (4, 64, 16)])
def test_per_token_group_quant_fp8(dtype: torch.dtype, t: int, k: int, group: int) -> None:
    x = _randn(t, k, dtype=dtype) * torch.logspace(-4, 2, k, device=DEVICE).to(dtype)
    x[0, :group] = 0  # an all-zero group: scale 1e-10 / 448, codes 0
    xq, xs = per_token_group_quant_fp8(x, group)
    rq, rs = ref_group_quant(x, group)
    assert xq.dtype == FP8 and xs.shape == (t, -(-k // group)) and xs.dtype == torch.float32
    assert torch.equal(xs, rs)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))


# ---- block FP8 GEMM ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "t,n,k,block",
    [(1, 40, 72, (16, 16)), (7, 100, 96, (32, 32)), (33, 70, 160, (32, 32)), (3, 24, 64, (16, 32))],
)
def test_w8a8_block_fp8_matmul(
    dtype: torch.dtype, t: int, n: int, k: int, block: tuple[int, int]
) -> None:
    w, s = fp8_weight(n, k, block, seed=t)
    x = _randn(t, k, dtype=dtype)
    bias = _randn(n, seed=2) if t > 1 else None
    out = w8a8_block_fp8_matmul(x, w, s, block, bias=bias)
    assert out.shape == (t, n) and out.dtype == dtype
    _close(out, ref_fp8_matmul(x, w, s, block, bias), dtype)


@pytest.mark.parametrize(
    "cfg",
    [
        QuantGemmConfig(16, 16, 16, 4, 2, 1, split_k=3),  # 9 k-tiles in 3 partitions
        QuantGemmConfig(32, 32, 32, 4, 2, 2, split_k=4),  # block_k 32 > bk 16: cut to 16
        QuantGemmConfig(16, 64, 32, 4, 2, 1, split_k=1),
    ],
)
def test_w8a8_block_fp8_configs_and_split_k(cfg: QuantGemmConfig) -> None:
    t, n, k, block = 19, 56, 144, (32, 16)
    w, s = fp8_weight(n, k, block)
    x = _randn(t, k)
    bias = _randn(n, seed=3)
    out = w8a8_block_fp8_matmul(x, w, s, block, bias=bias, config=cfg)
    _close(out, ref_fp8_matmul(x, w, s, block, bias), torch.float32)


# ---- W4A16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("t,n,k,group", [(1, 40, 64, 32), (5, 72, 128, 64), (9, 50, 256, 128)])
def test_w4a16_matmul(dtype: torch.dtype, zero: bool, t: int, n: int, k: int, group: int) -> None:
    q, s, z = int4_weight(n, k, group, zero, seed=t)
    packed, scales, zeros = repack_w4a16(pack_int4_k(q), s, z)
    x = _randn(t, k, dtype=dtype)
    bias = _randn(n, seed=2, dtype=dtype) if zero else None
    out = w4a16_matmul(x, packed, scales, zeros, group, bias=bias)
    assert out.shape == (t, n) and out.dtype == dtype
    ref = x.float() @ dequant_int4(q, s, z, group).T
    _close(out, ref if bias is None else ref + bias.float(), dtype)


@pytest.mark.parametrize(
    "cfg",
    [
        QuantGemmConfig(16, 16, 32, 4, 2, 1, split_k=4),
        QuantGemmConfig(32, 32, 128, 4, 2, 2, split_k=3),  # block_k cut to the group (64)
        QuantGemmConfig(16, 64, 16, 4, 2, 1),
    ],
)
def test_w4a16_configs_and_split_k(cfg: QuantGemmConfig) -> None:
    t, n, k, group = 21, 88, 192, 64
    q, s, z = int4_weight(n, k, group, True)
    packed, scales, zeros = repack_w4a16(pack_int4_k(q), s, z, scale_dtype=torch.float16)
    x = _randn(t, k)
    out = w4a16_matmul(x, packed, scales, zeros, group, config=cfg)
    _close(out, x @ dequant_int4(q, scales, z, group).T, torch.float32)


def test_repack_is_lossless_and_unpacks_zero_points() -> None:
    n, k, group = 24, 64, 32
    q, s, z = int4_weight(n, k, group, True)
    packed, scales, zeros = repack_w4a16(pack_int4_k(q), s, z)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    nibbles = torch.stack([packed & 0xF, packed >> 4], -1).reshape(n, k)  # low nibble: even k
    assert torch.equal(nibbles.long(), q.long())
    assert torch.equal(scales, s) and torch.equal(zeros.long(), z.long())
    for rows, parts in ((24, 1), (20, 1), (2 * 12, 2), (2 * 5, 2)):  # w13: gate, up packed apart
        zr = torch.randint(0, 16, (3, rows, 4), device=DEVICE)  # [E, rows, G]
        packed_z = torch.cat([pack_int4_rows(p) for p in zr.chunk(parts, dim=1)], dim=1)
        assert torch.equal(unpack_int4_rows(packed_z, rows, parts).long(), zr.long())


# ---- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_name_the_tensor_and_both_shapes() -> None:
    w, s = fp8_weight(40, 64, (16, 16))
    x = _randn(3, 64)
    with pytest.raises(ValueError, match=r"weight_scale has shape \(3, 4\) but .* needs \(3, 2\)"):
        w8a8_block_fp8_matmul(x, w, s, (16, 32))
    with pytest.raises(ValueError, match=r"x has shape \(3, 48\) but the weight needs \[T, 64\]"):
        w8a8_block_fp8_matmul(x[:, :48], w, s, (16, 16))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        w8a8_block_fp8_matmul(x, w.float(), s, (16, 16))
    with pytest.raises(ValueError, match="multiple of 16"):
        w8a8_block_fp8_matmul(x, w, s, (16, 8))
    q, s4, z = int4_weight(40, 64, 32, True)
    packed, scales, zeros = repack_w4a16(pack_int4_k(q), s4, z)
    with pytest.raises(ValueError, match=r"K=64 must be a multiple of the group size 48"):
        w4a16_matmul(x, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"scales has shape \(40, 2\) but .* needs \(40, 4\)"):
        w4a16_matmul(x, packed, scales, zeros, 16)
    with pytest.raises(ValueError, match=r"zeros has shape \(40, 1\) but .* needs \(40, 2\)"):
        w4a16_matmul(x, packed, scales, zeros[:, :1], 32)
    with pytest.raises(ValueError, match=r"bias has shape \(39,\) but .* needs \(40,\)"):
        w4a16_matmul(x, packed, scales, zeros, 32, bias=_randn(39))
    with pytest.raises(ValueError, match="zeros must be integer zero points in 0..15"):
        repack_w4a16(pack_int4_k(q), s4, z + 16)


def test_no_tokens() -> None:
    w, s = fp8_weight(40, 64, (16, 16))
    assert w8a8_block_fp8_matmul(_randn(0, 64), w, s, (16, 16)).shape == (0, 40)
    q, s4, _ = int4_weight(40, 64, 32, False)
    packed, scales, _ = repack_w4a16(pack_int4_k(q), s4)
    assert w4a16_matmul(_randn(0, 64), packed, scales, None, 32).shape == (0, 40)


# ---- GPU: bf16 at DeepSeek-like sizes, decode configs with split-K, CUDA graphs -----------------

GPU_DENSE = [(7168, 2048), (2048, 7168), (1000, 1416)]  # [N, K]; the last ragged vs the tiles


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_DENSE)
@pytest.mark.parametrize("t", [1, 16, 512])
def test_gpu_w8a8_block_fp8(n: int, k: int, t: int) -> None:
    block = (128, 128)
    w, s = fp8_weight(n, k, block)
    x = _randn(t, k, dtype=torch.bfloat16)
    bias = _randn(n, dtype=torch.bfloat16)
    out = w8a8_block_fp8_matmul(x, w, s, block, bias=bias)
    _close(out, ref_fp8_matmul(x, w, s, block, bias), torch.bfloat16)


@pytest.mark.parametrize("t", [1, 5])
def test_w8a8_per_channel_is_a_block_of_one_row(t: int) -> None:
    """compressed-tensors' FP8 channel strategy: block (1, K), activations quantized per token.
    Runs on the GPU too (unmarked): one row per scale and one k-group per row."""
    n, k = 48, 64
    w, s = fp8_weight(n, k, (1, k))
    x = _randn(t, k, dtype=torch.float16 if DEVICE == "cpu" else torch.bfloat16)
    out = w8a8_block_fp8_matmul(x, w, s, (1, k))
    _close(out, ref_fp8_matmul(x, w, s, (1, k)), x.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_DENSE[:2] + [(1000, 1408)])
@pytest.mark.parametrize("group,zero", [(128, False), (32, True), (64, True)])
@pytest.mark.parametrize("t", [1, 16, 512])
def test_gpu_w4a16(n: int, k: int, group: int, zero: bool, t: int) -> None:
    q, s, z = int4_weight(n, k, group, zero)
    packed, scales, zeros = repack_w4a16(pack_int4_k(q), s, z, scale_dtype=torch.bfloat16)
    x = _randn(t, k, dtype=torch.bfloat16)
    out = w4a16_matmul(x, packed, scales, zeros, group)
    ref = x.float() @ dequant_int4(q, scales, z, group).T
    _close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8])
def test_gpu_cuda_graph_replay(t: int) -> None:
    n, k, block, group = 2048, 7168, (128, 128), 128  # few N tiles: the split-K path
    w, s = fp8_weight(n, k, block)
    q, s4, _ = int4_weight(n, k, group, False)
    packed, scales, _ = repack_w4a16(pack_int4_k(q), s4, scale_dtype=torch.bfloat16)
    x = _randn(t, k, dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return w8a8_block_fp8_matmul(x, w, s, block), w4a16_matmul(x, packed, scales, None, group)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in range(3):
        x.copy_(_randn(t, k, dtype=torch.bfloat16, seed=seed + 10))
        graph.replay()
        eager = step()
        assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])
        _close(static[0], ref_fp8_matmul(x, w, s, block), torch.bfloat16)
