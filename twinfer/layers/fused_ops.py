"""Fused Triton kernels for CUDA decode: RMSNorm (+ residual add), q/k-norm + RoPE, SiLU-mul.

Shapes: `T` tokens, `H` hidden (the normed dim), `D` head size, `nq` / `nkv` q / kv heads of this
rank, `P` max positions, `I` MLP inner size.

Each op is one kernel launch with no host sync, so it can be captured in a CUDA graph. The CPU path
keeps the torch code in norm.py / rotary.py / activation.py; these launchers are for CUDA tensors
(under TRITON_INTERPRET=1 they also run on CPU tensors, which is how CI tests them). Loads are
cast to float32 before any arithmetic (the interpreter cannot do bf16 arithmetic).

In-place semantics: by default every op returns new contiguous tensors and leaves its inputs alone,
as the torch code does. `inplace=True` writes into the input buffers instead (documented per op);
that saves the allocations, not bandwidth: the kernels move the same bytes either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# NOTE: one program keeps a whole row in registers (one read, one write); beyond this a row would
# spill. The largest hidden size of a supported model is 16384 (Llama-3.1-405B).
MAX_FUSED_SIZE = 32768


def _norm_launch_config(size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a one-program-per-row kernel over `size` elements."""
    if size > MAX_FUSED_SIZE:
        raise ValueError(
            f"fused RMSNorm supports sizes up to {MAX_FUSED_SIZE}, got {size}; use the torch path."
        )
    block = triton.next_power_of_2(size)
    # NOTE: ~256 elements a warp, i.e. 8 per thread: one 16-byte vector load of bf16 at H=2048.
    return block, min(max(block // 256, 1), 16)


# ---- RMSNorm ---------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    x_stride,
    res_stride,
    out_stride,
    res_out_stride,
    size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < size
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0).to(tl.float32)
        # NOTE: HF adds in the model dtype (`residual + hidden_states`): round the sum, which is
        # both the new residual and what gets normed.
        x = (x + r).to(dtype)
        tl.store(res_out_ptr + row * res_out_stride + offs, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / size
    h = (x * tl.math.rsqrt(var + eps)).to(dtype).to(tl.float32)  # HF: h.to(input_dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # The product of two 16-bit floats is exact in float32, so rounding it once equals HF's
    # `weight * h` in the model dtype.
    tl.store(out_ptr + row * out_stride + offs, (w * h).to(dtype), mask=mask)


def _as_rows(x: Tensor) -> Tensor:
    """x [..., H] as a [T, H] view with unit stride along H (a copy only when it must)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, inplace: bool = False) -> Tensor:
    """HF LlamaRMSNorm of x [..., H] with weight [H]: float32 statistics, output in x.dtype.

    `inplace=True` writes the result into x and returns x (x must then be [T, H] with unit stride
    along H, or contiguous).
    """
    x2 = _as_rows(x)  # [T, H]
    if inplace:
        if x2.data_ptr() != x.data_ptr():  # _as_rows had to copy
            raise ValueError("rms_norm(inplace=True) needs x with unit stride along its last dim.")
        out, out2 = x, x2
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out2 = out.view(-1, x.shape[-1])
    t, size = x2.shape
    if t == 0:
        return out
    block, num_warps = _norm_launch_config(size)
    _rms_norm_kernel[(t,)](
        x2, x2, weight, out2, out2,
        x2.stride(0), 0, out2.stride(0), 0, size, eps,
        HAS_RESIDUAL=False, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return out


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, *, inplace: bool = False
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, H]; the sum rounded to x.dtype.

    Same results as `RMSNorm.forward(x, residual)`. `inplace=True` (vLLM's convention) writes the
    sum into `residual` and the normed output into `x`, and returns (x, residual); both must then
    have unit stride along H. Each program reads its whole row before writing, so this is safe.
    """
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ.")
    x2, r2 = _as_rows(x), _as_rows(residual)  # [T, H] each
    if inplace:
        if x2.data_ptr() != x.data_ptr() or r2.data_ptr() != residual.data_ptr():
            raise ValueError("fused_add_rms_norm(inplace=True) needs unit stride along H.")
        out, res_out, out2, res_out2 = x, residual, x2, r2
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out2, res_out2 = out.view(-1, x.shape[-1]), res_out.view(-1, x.shape[-1])
    t, size = x2.shape
    if t == 0:
        return out, res_out
    block, num_warps = _norm_launch_config(size)
    _rms_norm_kernel[(t,)](
        x2, r2, weight, out2, res_out2,
        x2.stride(0), r2.stride(0), out2.stride(0), res_out2.stride(0), size, eps,
        HAS_RESIDUAL=True, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return out, res_out


# ---- per-head q/k RMSNorm + RoPE -------------------------------------------------------------
@triton.jit
def _rope_heads(
    src_ptr,  # this token's first head
    dst_ptr,
    w_ptr,
    head0,
    num_heads,
    cos,  # [HALF_BLOCK] float32
    sin,
    half,  # [HALF_BLOCK] offsets
    half_mask,
    eps,
    HEAD_SIZE: tl.constexpr,
    HEADS: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """Rotates heads head0 .. head0 + HEADS - 1 (those < num_heads) of one token."""
    heads = head0 + tl.arange(0, HEADS)
    offs = heads[:, None] * HEAD_SIZE + half[None, :]  # [HEADS, HALF_BLOCK]
    mask = (heads[:, None] < num_heads) & half_mask[None, :]
    dtype = dst_ptr.dtype.element_ty
    x1 = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + offs + HEAD_SIZE // 2, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        var = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_SIZE  # [HEADS]
        r = tl.math.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + half, mask=half_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HEAD_SIZE // 2 + half, mask=half_mask, other=0.0).to(tl.float32)
        # NOTE: the norm's output is rounded to the dtype as HF's q_norm / k_norm round it (see
        # _rms_norm_kernel), so the rotation starts from HF's values.
        x1 = (w1[None, :] * (x1 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2[None, :] * (x2 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # NOTE: the rotation runs in float32 with float32 cos/sin and rounds once; the torch path (like
    # HF) casts cos/sin to the dtype and rounds after each op, so bf16 results may differ by an ulp.
    cos = cos[None, :]
    sin = sin[None, :]
    tl.store(dst_ptr + offs, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst_ptr + offs + HEAD_SIZE // 2, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cache_ptr,
    q_w_ptr,
    k_w_ptr,
    q_stride,
    k_stride,
    q_out_stride,
    k_out_stride,
    cache_stride,
    num_q_heads,
    num_kv_heads,
    eps,
    HEAD_SIZE: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    HEADS: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    # grid: (T, cdiv(nq, HEADS) + cdiv(nkv, HEADS)); the first blocks are q heads, then k heads.
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    num_q_blocks = tl.cdiv(num_q_heads, HEADS)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    half = tl.arange(0, HALF_BLOCK)
    half_mask = half < HEAD_SIZE // 2
    cos_sin = cache_ptr + pos * cache_stride
    cos = tl.load(cos_sin + half, mask=half_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin + HEAD_SIZE // 2 + half, mask=half_mask, other=0.0).to(tl.float32)
    if blk < num_q_blocks:
        _rope_heads(
            q_ptr + row * q_stride, q_out_ptr + row * q_out_stride, q_w_ptr,
            blk * HEADS, num_q_heads, cos, sin, half, half_mask, eps,
            HEAD_SIZE, HEADS, HAS_NORM,
        )  # fmt: skip
    else:
        _rope_heads(
            k_ptr + row * k_stride, k_out_ptr + row * k_out_stride, k_w_ptr,
            (blk - num_q_blocks) * HEADS, num_kv_heads, cos, sin, half, half_mask, eps,
            HEAD_SIZE, HEADS, HAS_NORM,
        )  # fmt: skip


def rotary_embedding(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    cos_sin_cache: Tensor,
    head_size: int,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Neox RoPE of q [T, nq*D] and k [T, nkv*D] at positions [T], optionally after a per-head
    RMSNorm over D (Qwen3's q_norm / k_norm, weights [D]); one kernel for all of it.

    q and k may be row-strided views (slices of a fused qkv [T, (nq + 2 nkv) D]); each row must be
    contiguous. cos_sin_cache is RotaryEmbedding's [P, D] float32 (cos then sin). Returns new
    contiguous (q, k) by default; `inplace=True` writes into q and k (e.g. into the qkv buffer) and
    returns them. positions must be contiguous and < P (not checked: that would sync the host).
    """
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight, or neither.")
    if head_size % 2 or q.shape[-1] % head_size or k.shape[-1] % head_size:
        raise ValueError(
            f"head_size {head_size} must be even and divide q's {q.shape[-1]} and k's "
            f"{k.shape[-1]} columns."
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_embedding needs unit stride along the last dim of q, k, cache.")
    t = q.shape[0]
    num_q_heads, num_kv_heads = q.shape[-1] // head_size, k.shape[-1] // head_size
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    half_block = triton.next_power_of_2(head_size // 2)
    # NOTE: a program rotates up to HEADS heads (~1K elements: 8 heads at D=128), so a decode step
    # of 32 q + 4 kv heads spreads over 5 SMs instead of waiting on one.
    heads = min(triton.next_power_of_2(max(num_q_heads, num_kv_heads)), max(1, 512 // half_block))
    grid = (t, triton.cdiv(num_q_heads, heads) + triton.cdiv(num_kv_heads, heads))
    has_norm = q_norm_weight is not None
    _rope_kernel[grid](
        positions, q, k, q_out, k_out, cos_sin_cache,
        q_norm_weight if has_norm else cos_sin_cache, k_norm_weight if has_norm else cos_sin_cache,
        q.stride(0), k.stride(0), q_out.stride(0), k_out.stride(0), cos_sin_cache.stride(0),
        num_q_heads, num_kv_heads, eps,
        HEAD_SIZE=head_size, HALF_BLOCK=half_block, HEADS=heads, HAS_NORM=has_norm,
        num_warps=max(1, min(8, heads * half_block // 256)),
    )  # fmt: skip
    return q_out, k_out


# ---- SiLU and mul ----------------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inner + offs, mask=mask, other=0.0).to(tl.float32)
    # As torch: silu in float32 rounded to the dtype, then the product rounded (`silu(g) * up`).
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(gate) * up for x = [gate | up]: [T, 2I] -> new [T, I] (x may be row-strided)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim ([gate | up]), got {x.shape[-1]}.")
    x2 = _as_rows(x)  # [T, 2I]
    t, inner = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    out2 = out.view(-1, inner)
    # NOTE: elementwise, so a row is split into blocks: big prefill T fills the GPU through rows,
    # a decode step (T=1) through blocks of the inner dim.
    block = min(triton.next_power_of_2(inner), 1024)
    _silu_and_mul_kernel[(t, triton.cdiv(inner, block))](
        x2, out2, x2.stride(0), out2.stride(0), inner, BLOCK=block,
        num_warps=max(1, min(4, block // 256)),
    )  # fmt: skip
    return out


# ---- GEMV: one-row linear layers (decode of one sequence) -------------------------------------
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, n, k, w_stride,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    # NOTE: products accumulate elementwise and are reduced once at the end: a reduction per
    # step (the first version) made the loop shuffle-bound and slower than cuBLAS.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * w_stride + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BN, BK]
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0)  # [BK]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)  # [BN]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N], float32 accumulation, one rounding.

    NOTE: measured on the H100 against cuBLAS at batch 1 (CUDA-graph replays, bf16): a 2048 ->
    128 router 3.1 us vs 4.8, a 4096 -> 2048 o_proj 9.5 vs 10.0 (cuBLAS splits K and adds a
    reduce kernel), a 2048 -> 5120 qkv 10.0 vs 9.9. BLOCK_N 4 x BLOCK_K 512 won the sweep.
    """
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got {x.shape[0]}; use F.linear")
    k = x.shape[1]
    n = weight.shape[0]
    x = x if x.is_contiguous() else x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_k = min(512, max(16, triton.next_power_of_2(k)))
    _gemv_kernel[(triton.cdiv(n, 4),)](
        x, weight, bias if bias is not None else x, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=4, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out
