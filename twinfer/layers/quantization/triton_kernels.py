"""Dense GEMMs of quantized weights in Triton: block FP8 (W8A8, DeepSeek-V3's recipe) and W4A16
integer groups, plus the jit helpers the fused MoE shares (fp8 conversion, int4 tile dequant).

Legend: `T` tokens, `N` output features, `K` input features, `bn`/`bk` the FP8 weight block's
rows/columns, `g` the int4 group size (K/g groups per row), `S` split-K partitions.

Block FP8: weight float8_e4m3fn [N, K] and weight_scale float32 [ceil(N/bn), ceil(K/bk)];
activations are quantized per token per group of bk columns (s = max(absmax, 1e-10) / 448,
xq = clamp(x / s, +-448) rounded to e4m3), and y = sum over k-groups (xq . wq) * s_x * s_w in
float32. Each k-tile lies inside one bk group, so the dot of a tile is scaled once, in float32.

W4A16 GPU layout (what `repack_w4a16` returns; lossless, and free: it reinterprets bytes):
  qweight uint8 [N, 4*ceil(K/8)]: byte j of row n holds q[n, 2j] (low nibble) and q[n, 2j+1]
    (high nibble), q in 0..15. This is the checkpoint's int32 [N, K/8] (element i at bits 4i)
    read as little-endian bytes, so `repack` is a view; rows stay K-contiguous (coalesced loads).
  scales [N, K/g] (float32 as loaded, or scale_dtype, e.g. bf16: 12.5% of the weight bytes at
    g=32 instead of 25%); zeros uint8 [N, K/g] in 0..15 or None (symmetric: z = 8).
  W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]. The kernel loads a [BLOCK_N, BLOCK_K/2]
  byte tile, splits the nibbles and interleaves them back into k order (tl.interleave), and
  dequantizes in float32 before one rounding to x's dtype; BLOCK_K divides g, so a k-tile has one
  scale (and zero) per row. Leading dims (MoE experts [E, N, ...]) repack the same way.

Without a GPU (Triton's interpreter), and on GPUs before sm_89, FP8 tensors are read and written
as their bytes (uint8) and converted with integer ops: the interpreter's fp8 casts and dots are
wrong. GPUs from sm_89 (H100) use native casts (cvt.rn.satfinite) and FP8 tensor-core dots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True, slots=True)
class QuantGemmConfig:
    """Launch parameters of a dense quantized GEMM. split_k 0: chosen from the grid and the
    GPU's SM count (decode only); block_k is cut to divide the FP8 block / int4 group."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 0


# NOTE: keyed by the largest T of the bucket; untuned starting points for an H100 (vLLM's
# w8a8_block_fp8 / moe_wna16 defaults). Decode (T <= 16) is weight-bandwidth bound: block_m 16
# (the smallest MMA tile), 4 stages of weight tiles in flight per program, and split-K where
# the grid alone leaves most SMs idle; prefill grows block_m for tensor-core reuse.
FP8_CONFIGS: dict[int, QuantGemmConfig] = {
    16: QuantGemmConfig(16, 64, 128, 4, 4, 1),
    64: QuantGemmConfig(32, 64, 128, 4, 4, 8),
    256: QuantGemmConfig(64, 128, 128, 4, 3, 8),
    1 << 30: QuantGemmConfig(128, 128, 128, 8, 3, 8),
}
W4A16_CONFIGS: dict[int, QuantGemmConfig] = {
    16: QuantGemmConfig(16, 64, 128, 4, 4, 1),
    64: QuantGemmConfig(32, 64, 128, 4, 4, 8),
    256: QuantGemmConfig(64, 128, 64, 4, 3, 8),
    1 << 30: QuantGemmConfig(128, 128, 64, 8, 3, 8),
}
DECODE_MAX_T = 64  # auto split-K only up to this many tokens
MAX_SPLIT_K = 16
INFLIGHT_BYTES = 2 << 20  # weight bytes in flight to stream HBM at full speed (see _split_k)


def _pick(table: dict[int, QuantGemmConfig], t: int) -> QuantGemmConfig:
    return next((table[b] for b in sorted(table) if t <= b), table[max(table)])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def native_fp8(device: torch.device) -> bool:
    """Whether Triton handles float8e4nv natively there (casts and dots): CUDA sm_89+."""
    return device.type == "cuda" and _capability(device.index or 0) >= (8, 9)


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (the k-tile of a block or group of n)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def fp8_view(x: Tensor, native: bool) -> Tensor:
    """An FP8 tensor as the kernels read it: itself, or its bytes where fp8 is emulated."""
    return x if native else x.view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# jit helpers (shared with layers/moe/triton_kernels.py)


@triton.jit
def e4m3_bits(y):
    """float32 y, already clamped to [-448, 448] -> its e4m3 code (uint8), rounded to nearest
    even like cvt.rn.satfinite. Integer ops only (the interpreter's fp8 cast is wrong)."""
    a = tl.abs(y)
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80  # -0.0 too
    # |y| < 2^-6: multiples of 2^-9; adding 1.5 * 2^14 (ulp 2^-9) rounds to them, ties to even.
    # Code 8 (a round up to 2^-6) is the smallest normal's code: the formats line up.
    sub = ((a + 24576.0) - 24576.0) * 512.0
    # Normal: round float32's mantissa to 3 bits (carry runs into the exponent), rebias 127 -> 7.
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    code = tl.where(a < 0.015625, sub.to(tl.int32), normal)
    code = code | sign
    return code.to(tl.uint8)


@triton.jit
def e4m3_to_f16(b):
    """e4m3 codes (uint8) -> float16, exactly: the code's bits shifted into float16's places
    read 2^-8 of the value (biases 15 vs 7; e4m3 subnormals land on float16 subnormals)."""
    b16 = b.to(tl.uint16)
    h = ((b16 & 0x7F) << 7) | ((b16 & 0x80) << 8)
    return h.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def to_fp8(y, NATIVE: tl.constexpr):
    """float32 y clamped to +-448 -> what an FP8 store takes (fp8, or its code as uint8)."""
    if NATIVE:
        return y.to(tl.float8e4nv)
    else:
        return e4m3_bits(y)


@triton.jit
def fp8_operand(x, NATIVE: tl.constexpr):
    """A loaded FP8 tile as a dot operand: itself (native), or float16 from its codes."""
    if NATIVE:
        return x
    else:
        return e4m3_to_f16(x)


@triton.jit
def fp8_dot(a, b, DOT: tl.constexpr):
    """a [M, K] @ b [K, N] -> float32: an FP8 tensor-core dot (DOT: native and K >= 32), else a
    float16 dot of the (exactly) upcast values; both accumulate exact products in float32."""
    if DOT:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def int4_tile(w_ptrs, s_ptrs, z_ptrs, HAS_ZERO: tl.constexpr, dtype: tl.constexpr):
    """w_ptrs [BLOCK_N, BLOCK_K/2] bytes of the W4A16 layout, s_ptrs/z_ptrs [BLOCK_N] the
    k-tile's group -> W^T [BLOCK_K, BLOCK_N] in dtype, (q - z) * s in float32 rounded once."""
    b = tl.load(w_ptrs)
    q = tl.interleave(b & 0xF, b >> 4)  # [BLOCK_N, BLOCK_K]: low nibble is the even k
    s = tl.load(s_ptrs).to(tl.float32)
    z = tl.load(z_ptrs).to(tl.float32) if HAS_ZERO else tl.full(s.shape, 8.0, tl.float32)
    w = (q.to(tl.float32) - z[:, None]) * s[:, None]
    return tl.trans(w.to(dtype))


@triton.jit
def tile_of(
    M, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr
):
    """(pid_m, pid_n) in grouped order: GROUP_M row blocks share each weight tile in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = pid // in_group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size


# ---------------------------------------------------------------------------------------------
# Per-token-group activation quantization.


@triton.jit
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr, K, G, stride_x, stride_q, stride_s,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_G: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """Row t, groups [BLOCK_G * pid1, ...): one [BLOCK_G, GROUP] tile, an absmax per group."""
    t = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, GROUP_PAD)
    cols = offs_g[:, None] * GROUP + offs_c[None, :]  # [BLOCK_G, GROUP_PAD]
    mask = (offs_c[None, :] < GROUP) & (cols < K)  # a ragged last group is shorter
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # NOTE: IEEE divisions (Triton's `/` is approximate on GPUs), so the codes are torch's.
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10), 448.0)  # [BLOCK_G]
    y = tl.clamp(tl.math.div_rn(x, s[:, None]), -448.0, 448.0)
    tl.store(q_ptr + t * stride_q + cols, to_fp8(y, NATIVE), mask=mask)
    tl.store(s_ptr + t * stride_s + offs_g, s, mask=offs_g < G)


def per_token_group_quant_fp8(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """x [T, K] (bf16/fp16/fp32) -> (xq float8_e4m3fn [T, K], xs float32 [T, ceil(K/group)]):
    per token and group of `group` columns, s = max(absmax, 1e-10) / 448 and
    xq = clamp(x / s, -448, 448) rounded to nearest e4m3 (DeepSeek-V3's act_quant). A ragged
    last group (K % group != 0) is quantized over its own columns. No host sync."""
    if x.dim() != 2:
        raise ValueError(f"per_token_group_quant_fp8 needs x [T, K], got shape {tuple(x.shape)}")
    if group < 1:
        raise ValueError(f"per_token_group_quant_fp8: group must be positive, got {group}")
    t, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    num_groups = -(-k // group)
    xq = torch.empty(t, k, dtype=FP8_DTYPE, device=x.device)
    xs = torch.empty(t, num_groups, dtype=torch.float32, device=x.device)
    if t == 0 or k == 0:
        return xq, xs
    native = native_fp8(x.device)
    group_pad = triton.next_power_of_2(group)
    block_g = min(max(1, 2048 // group_pad), triton.next_power_of_2(num_groups))
    _group_quant_kernel[(t, triton.cdiv(num_groups, block_g))](
        x, fp8_view(xq, native), xs, k, num_groups, x.stride(0), xq.stride(0), xs.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_G=block_g, NATIVE=native, num_warps=4,
    )  # fmt: skip
    return xq, xs


# ---------------------------------------------------------------------------------------------
# GEMMs: c [T, N] (or float32 partials [S, T, N] with split-K) = x [T, K] @ W^T.


@triton.jit
def _store_tile(c_ptr, bias_ptr, acc, offs_m, offs_n, M, N: tl.constexpr, stride_cm,
                stride_cs, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partials, summed by _split_k_sum_kernel
        tl.store(c_ptrs + tl.program_id(1).to(tl.int64) * stride_cs, acc, mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, bias_ptr, M,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_cm, stride_cs,
    N: tl.constexpr, K: tl.constexpr, QBLOCK_N: tl.constexpr, QBLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr, DOT: tl.constexpr,
    SPLIT_K: tl.constexpr, K_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile over K_TILES k-tiles (split pid1's share of K).
    a = xq [T, K] fp8, as = xs [T, ceil(K/bk)], w [N, K] fp8, ws [ceil(N/bn), ceil(K/bk)]."""
    pid_m, pid_n = tile_of(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # NOTE: wrapped rows/columns load real data, so the loads need no mask along M and N
    # (vectorized); their outputs are masked at the store.
    a_row = (offs_m % M).to(tl.int64)
    w_row = offs_n % N
    k0 = tl.program_id(1) * K_TILES * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + w_row.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, N]
    as_ptrs = as_ptr + a_row * stride_asm  # [BLOCK_M]
    ws_ptrs = ws_ptr + (w_row // QBLOCK_N) * stride_wsn  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, K_TILES):
        if K % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - i * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        kg = (k0 + i * BLOCK_K) // QBLOCK_K  # the tile's k-group (BLOCK_K divides bk)
        a_s = tl.load(as_ptrs + kg)
        w_s = tl.load(ws_ptrs + kg)
        part = fp8_dot(fp8_operand(a, NATIVE), fp8_operand(w, NATIVE), DOT)
        acc += part * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _store_tile(c_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cs, HAS_BIAS, SPLIT_K)


@triton.jit
def _w4a16_gemm_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, bias_ptr, M,
    stride_am, stride_wn, stride_sn, stride_zn, stride_cm, stride_cs,
    N: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, K_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile; K % BLOCK_K == 0 (BLOCK_K divides g, g divides K)."""
    pid_m, pid_n = tile_of(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_row = (offs_m % M).to(tl.int64)
    w_row = (offs_n % N).to(tl.int64)
    k0 = tl.program_id(1) * K_TILES * BLOCK_K
    a_ptrs = a_ptr + a_row[:, None] * stride_am + (k0 + tl.arange(0, BLOCK_K))[None, :]
    offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    w_ptrs = w_ptr + w_row[:, None] * stride_wn + offs_kb[None, :]  # [BLOCK_N, BLOCK_K/2]
    s_ptrs = s_ptr + w_row * stride_sn
    z_ptrs = z_ptr + w_row * stride_zn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, K_TILES):
        a = tl.load(a_ptrs)
        kg = (k0 + i * BLOCK_K) // GROUP
        w = int4_tile(w_ptrs, s_ptrs + kg, z_ptrs + kg, HAS_ZERO, a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
    _store_tile(c_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cs, HAS_BIAS, SPLIT_K)


@triton.jit
def _split_k_sum_kernel(
    p_ptr, bias_ptr, c_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    p_ptrs = p_ptr + offs
    for _ in tl.static_range(SPLIT_K):  # partitions in a fixed order: deterministic
        acc += tl.load(p_ptrs, mask=mask, other=0.0)
        p_ptrs += MN
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _split_k(
    cfg: QuantGemmConfig, t: int, n: int, k_tiles: int, tile_bytes: int, device: torch.device
) -> int:
    """Split-K partitions (a divisor of k_tiles, so every partition is full).
    NOTE: a decode GEMV streams the weight at HBM speed only with ~INFLIGHT_BYTES of loads in
    flight (Little's law: 3.35 TB/s x ~600 ns) spread over most SMs. Each program keeps
    num_stages - 1 weight tiles in flight, so a [T, N] grid of few tiles (N=2048, block_n 64:
    32) or small tiles (int4 with g=32: block_k 32, 1 KB) splits K, at the price of a float32
    [S, T, N] round trip and one small sum kernel (deterministic, unlike atomics)."""
    if cfg.split_k:
        return max(d for d in range(1, min(cfg.split_k, k_tiles) + 1) if k_tiles % d == 0)
    if t > DECODE_MAX_T or device.type != "cuda":
        return 1
    sms = _num_sms(device.index or 0)
    tiles = triton.cdiv(t, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    in_flight = tiles * (cfg.num_stages - 1) * tile_bytes
    if 2 * tiles > sms and in_flight >= INFLIGHT_BYTES:
        return 1
    want = max(triton.cdiv(sms, tiles), triton.cdiv(INFLIGHT_BYTES, in_flight))
    want = min(MAX_SPLIT_K, want, k_tiles // 2)
    return max(d for d in range(1, max(want, 1) + 1) if k_tiles % d == 0)


def _launch(
    kernel, cfg: QuantGemmConfig, x: Tensor, n: int, k_tiles: int, tile_bytes: int,
    bias: Tensor | None, ptrs: tuple[Tensor, ...], strides: tuple[int, ...], **meta,
) -> Tensor:  # fmt: skip
    """Runs a GEMM kernel over the [T, N] grid (and split-K) -> [T, N] in x's dtype."""
    t = x.shape[0]
    split = _split_k(cfg, t, n, k_tiles, tile_bytes, x.device)
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    c = out if split == 1 else torch.empty(split, t, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    bias_arg = bias if bias is not None else out  # a dummy pointer without bias
    kernel[grid](
        *ptrs, c, bias_arg, t, *strides, c.stride(-2), c.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split, K_TILES=k_tiles // split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(t * n, block),)](
            c, bias_arg, out, t * n, n, SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return out


def _check_x(name: str, x: Tensor, k: int) -> Tensor:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)} but the weight needs [T, {k}]")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: x must be bf16, fp16 or fp32, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], why: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {why} needs {expected}")


def w8a8_block_fp8_matmul(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    block: tuple[int, int],
    bias: Tensor | None = None,
    config: QuantGemmConfig | None = None,
) -> Tensor:
    """x [T, K] (bf16/fp16/fp32) @ W^T -> [T, N] in x's dtype, W = weight [N, K] float8_e4m3fn
    times weight_scale [ceil(N/bn), ceil(K/bk)] per (bn, bk) = block; bias [N] optional.

    x is quantized per token and bk columns (per_token_group_quant_fp8), then each k-tile's
    FP8 dot (float32 accumulation) is scaled by s_x[t] * s_w[n] and summed in float32. Two or
    three launches, no host sync, shapes-only allocations: CUDA-graph safe.

    NOTE (decode): T=1 is a GEMV bound by the weight bytes (N*K, 1 byte each): 7168 x 2048 is
    14.7 MB, 4.4 us at 3.35 TB/s on an H100. block_m 16 is the smallest MMA tile (15 rows are
    padding, free while bandwidth bound), 4 pipeline stages keep weight tiles in flight, and
    split-K (see _split_k) spreads a narrow N (2048: 32 tiles) over the SMs.
    """
    n, k = weight.shape
    bn, bk = block
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"w8a8_block_fp8_matmul: weight must be float8_e4m3fn, got {weight.dtype}")
    if bk % 16:
        raise ValueError(f"w8a8_block_fp8_matmul: block {block}: bk must be a multiple of 16")
    x = _check_x("w8a8_block_fp8_matmul", x, k)
    _check_shape(
        "weight_scale", weight_scale, (-(-n // bn), -(-k // bk)), f"weight {(n, k)} in {block}"
    )
    if bias is not None:
        _check_shape("bias", bias, (n,), f"weight {(n, k)}")
    weight_scale = weight_scale.float().contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    t = x.shape[0]
    if t == 0:
        return x.new_empty(0, n)
    cfg = config or _pick(FP8_CONFIGS, t)
    cfg = replace(cfg, block_k=pow2_divisor(bk, cfg.block_k))
    native = native_fp8(x.device)
    xq, xs = per_token_group_quant_fp8(x, bk)
    ptrs = (fp8_view(xq, native), xs, fp8_view(weight, native), weight_scale)
    strides = (xq.stride(0), xs.stride(0), weight.stride(0), weight_scale.stride(0))
    return _launch(
        _fp8_gemm_kernel, cfg, x, n, triton.cdiv(k, cfg.block_k), cfg.block_n * cfg.block_k,
        bias, ptrs, strides,
        N=n, K=k, QBLOCK_N=bn, QBLOCK_K=bk, NATIVE=native, DOT=native and cfg.block_k >= 32,
    )  # fmt: skip


def w4a16_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    group: int,
    bias: Tensor | None = None,
    config: QuantGemmConfig | None = None,
) -> Tensor:
    """x [T, K] (bf16/fp16/fp32) @ W^T -> [T, N] in x's dtype, W in the layout of
    `repack_w4a16`: qweight uint8 [N, >= K/2], scales [N, K/g], zeros uint8 [N, K/g] or None
    (symmetric, z = 8); W[n, k] = (q - z[n, k // g]) * s[n, k // g]; bias [N] optional.

    Each k-tile (BLOCK_K divides g) is dequantized in float32, rounded once to x's dtype and
    fed to a tensor-core dot with float32 accumulation. No host sync: CUDA-graph safe.

    NOTE (decode): T=1 is a GEMV bound by the weight bytes, N*K/2 plus the scales (bf16 at
    g=128: +3%): 7168 x 2048 is 7.3 MB, 2.2 us at 3.35 TB/s on an H100. As for FP8, block_m 16
    (the smallest MMA tile), 4 pipeline stages and split-K for narrow N keep the loads in
    flight; the dequant (~5 ALU ops a weight) hides under them.
    """
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(
            f"w4a16_matmul: qweight must be uint8 [N, K/2] (see repack_w4a16), got "
            f"{qweight.dtype} {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    k = x.shape[-1]
    if group < 16 or k % group:
        raise ValueError(
            f"w4a16_matmul: K={k} must be a multiple of the group size {group} (>= 16)"
        )
    x = _check_x("w4a16_matmul", x, k)
    if qweight.shape[1] * 2 < k:
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)} but K={k} needs ({n}, {k // 2})"
        )
    _check_shape("scales", scales, (n, k // group), f"weight ({n}, {k}) in groups of {group}")
    if zeros is not None:
        _check_shape("zeros", zeros, (n, k // group), f"weight ({n}, {k}) in groups of {group}")
        if zeros.dtype != torch.uint8:
            raise ValueError(
                f"w4a16_matmul: zeros must be uint8 (see repack_w4a16), got {zeros.dtype}"
            )
        zeros = zeros.contiguous()
    if bias is not None:
        _check_shape("bias", bias, (n,), f"weight ({n}, {k})")
    t = x.shape[0]
    if t == 0:
        return x.new_empty(0, n)
    cfg = config or _pick(W4A16_CONFIGS, t)
    cfg = replace(cfg, block_k=pow2_divisor(group, cfg.block_k))
    if cfg.block_k < 16:
        raise ValueError(f"w4a16_matmul: group size {group} must be a multiple of 16")
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    scales = scales.contiguous()
    z = zeros if zeros is not None else scales  # a dummy pointer when symmetric
    ptrs = (x, qweight, scales, z)
    strides = (x.stride(0), qweight.stride(0), scales.stride(0), z.stride(0))
    return _launch(
        _w4a16_gemm_kernel, cfg, x, n, k // cfg.block_k, cfg.block_n * cfg.block_k // 2,
        bias, ptrs, strides,
        N=n, GROUP=group, HAS_ZERO=zeros is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# One-time repack of checkpoint int4 weights (load time; not on the forward path).


def repack_w4a16(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Checkpoint int4 -> the GPU layout (module docstring), for one matrix or stacked experts.

    qweight int32 [..., N, ceil(K/8)] (element i of a word at bits 4i, values 0..15),
    scales [..., N, K/g], zeros [..., N, K/g] integer zero points in 0..15 (already unpacked:
    see `unpack_int4_rows` for the checkpoints' N-packed int32) or None for symmetric ->
    (qweight uint8 [..., N, 4*ceil(K/8)], scales in scale_dtype (default: as given),
    zeros uint8 or None). Lossless: the bytes of qweight are reinterpreted, not moved
    (little-endian words, as on x86 and NVIDIA GPUs). `...` is empty or E (MoE experts).
    """
    if qweight.dtype != torch.int32:
        raise ValueError(
            f"repack_w4a16: qweight must be int32 packed 8 a word, got {qweight.dtype}"
        )
    if scales.shape[:-1] != qweight.shape[:-1]:
        raise ValueError(
            f"scales has shape {tuple(scales.shape)} but qweight {tuple(qweight.shape)} needs the "
            f"same leading dims {tuple(qweight.shape[:-1])}"
        )
    packed = qweight.contiguous().view(torch.uint8)  # [..., N, 4 * words]
    scales = scales.to(scale_dtype or scales.dtype).contiguous()
    if zeros is not None:
        _check_shape("zeros", zeros, tuple(scales.shape), "scales of that shape")
        if zeros.is_floating_point() or (zeros.numel() and (zeros.min() < 0 or zeros.max() > 15)):
            raise ValueError("repack_w4a16: zeros must be integer zero points in 0..15")
        zeros = zeros.to(torch.uint8).contiguous()
    return packed, scales, zeros


def unpack_int4_rows(packed: Tensor, rows: int, parts: int = 1) -> Tensor:
    """Zero points packed along N as the checkpoints store them, int32 [..., ceil(N/8), G]
    (row i of a word at bits 4i) -> uint8 [..., rows, G] in 0..15. parts > 1: the rows are
    `parts` equal blocks, each packed on its own (MoE w13: gate rows then up rows)."""
    per = rows // parts
    words = -(-per // 8)
    if rows % parts or packed.shape[-2] != parts * words:
        raise ValueError(
            f"zero points have shape {tuple(packed.shape)} but {rows} rows in {parts} part(s) "
            f"need {parts * words} packed rows"
        )
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 4
    out = []
    for p in range(parts):
        block = packed[..., p * words : (p + 1) * words, :]  # [..., words, G]
        values = (block.unsqueeze(-2) >> shifts[:, None]) & 0xF  # [..., words, 8, G]
        out.append(values.flatten(-3, -2)[..., :per, :])
    return torch.cat(out, dim=-2).to(torch.uint8)
