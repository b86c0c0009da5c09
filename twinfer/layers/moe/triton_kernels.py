"""Fused mixture-of-experts in Triton: routing top-k, slot alignment and two grouped GEMMs.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size, `S` = T*K slots
(slot s = t*K + k), `EM` the padded slot count (a static bound), `B` = EM / block_m blocks.

The pipeline (vLLM's fused_moe): `moe_align_block_size` sorts the slots by expert and pads every
expert's group to a multiple of block_m, so each block of block_m rows belongs to one expert;
the gate+up GEMM (SiLU fused) writes act [S, I] by slot, the down GEMM writes the weighted
[S, H] by slot, and a sum over K gives [T, H]. Nothing syncs with the host, so a decode step
with all of this replays from one CUDA graph; nothing uses atomics, so results are
deterministic. Quantized experts (MoEQuant: block FP8, int4 W4A16) run the same pipeline and
kernel (constexpr QUANT; the unquantized kernel compiles to the same SASS as before); their tile
helpers live in layers/quantization/triton_kernels.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

from twinfer.layers.quantization.triton_kernels import (
    FP8_DTYPE,
    fp8_dot,
    fp8_operand,
    fp8_view,
    int4_tile,
    native_fp8,
    per_token_group_quant_fp8,
    pow2_divisor,
    repack_w4a16,
    tile_of,
    unpack_int4_rows,
)


@dataclass(frozen=True, slots=True)
class GemmConfig:
    """Launch parameters of one grouped GEMM (block_m is shared, see MoEConfig)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 1


@dataclass(frozen=True, slots=True)
class MoEConfig:
    block_m: int
    up: GemmConfig  # gate+up GEMM: N = I, reduction over H
    down: GemmConfig  # down GEMM: N = H, reduction over I


# NOTE: keyed by the largest T of the bucket, for the Qwen3-30B-A3B expert shape on an H100
# (E=128, K=8, H=2048, I=768, bf16); other (E, K) are looked up at the T with the same slots per
# expert (see get_moe_config). Decode (block_m 16) splits N finely so that ~200 programs stream
# the 8 experts' weights; prefill grows block_m with the slots per expert. The gate+up GEMM holds
# two accumulators, so its block_m x block_n stays <= 8192 (64 registers a thread at 8 warps).
# Overwrite entries with what `python scripts/bench_fused_moe.py --sweep` prints.
MOE_CONFIGS: dict[int, MoEConfig] = {
    # Measured (H100, 2026-11-21, `--sweep`): T=1 40.3 us (bound 25.4), T=64 407 us (bound 401).
    1: MoEConfig(16, GemmConfig(64, 128, 4, 4, 1), GemmConfig(128, 64, 8, 4, 1)),
    8: MoEConfig(16, GemmConfig(64, 128, 4, 4, 1), GemmConfig(128, 64, 8, 4, 1)),
    64: MoEConfig(16, GemmConfig(32, 256, 4, 4, 1), GemmConfig(128, 128, 4, 4, 1)),
    512: MoEConfig(32, GemmConfig(64, 64, 4, 4, 8), GemmConfig(64, 64, 4, 4, 8)),
    4096: MoEConfig(64, GemmConfig(128, 64, 8, 4, 8), GemmConfig(128, 64, 8, 4, 8)),
    1 << 30: MoEConfig(128, GemmConfig(64, 64, 8, 4, 8), GemmConfig(128, 64, 8, 3, 8)),
}


def get_moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """The MOE_CONFIGS entry for T tokens. NOTE: the table is tuned at E/K = 16 (Qwen3-30B-A3B);
    another model is looked up at the T giving the same slots per expert, T*K/E, which is what
    decides how full the blocks are."""
    t_eq = -(-num_tokens * top_k * 16 // num_experts)
    for bound in sorted(MOE_CONFIGS):
        if t_eq <= bound:
            return MOE_CONFIGS[bound]
    return MOE_CONFIGS[max(MOE_CONFIGS)]


# ---------------------------------------------------------------------------------------------
# Routing: softmax + top-k (+ renormalize) in one kernel, one program per token.


@triton.jit
def _topk_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_experts, stride_t,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < num_experts
    x = tl.load(logits_ptr + t * stride_t + offs_e, mask=mask_e, other=float("-inf"))
    x = x.to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(mask_e, p, 0.0)
    p = p / tl.sum(p, axis=0)  # [E] softmax in float32, like torch.softmax(dtype=float32)
    # Probabilities are >= 0, so -1 marks lanes that are padding or already taken.
    rest = tl.where(mask_e, p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        # NOTE: ties go to the lower expert id (tie_break_left), the order torch.topk gives
        # on CUDA in practice (it does not promise one).
        i = tl.argmax(rest, axis=0, tie_break_left=True)
        top_w = tl.where(offs_k == k, tl.max(rest, axis=0), top_w)
        top_i = tl.where(offs_k == k, i, top_i)
        rest = tl.where(offs_e == i, -1.0, rest)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)  # lanes >= K hold 0
    mask_k = offs_k < TOP_K
    top_w = top_w.to(weights_ptr.dtype.element_ty)  # rounded once to the asked dtype
    tl.store(weights_ptr + t * TOP_K + offs_k, top_w, mask=mask_k)
    tl.store(ids_ptr + t * TOP_K + offs_k, top_i, mask=mask_k)


def fused_topk(
    router_logits: Tensor,
    top_k: int,
    renormalize: bool,
    weights_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """router_logits [T, E] -> (topk_weights [T, K] in weights_dtype, topk_ids [T, K] int32):
    MoELayer's routing (softmax in float32, top-k by probability, optional renormalize, then one
    rounding to weights_dtype) in one launch."""
    t, e = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(t, top_k, dtype=weights_dtype, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t == 0:
        return weights, ids
    block_e = max(16, triton.next_power_of_2(e))
    _topk_kernel[(t,)](
        router_logits, weights, ids, e, router_logits.stride(0),
        TOP_K=top_k, BLOCK_E=block_e, BLOCK_K=max(2, triton.next_power_of_2(top_k)),
        RENORMALIZE=renormalize, num_warps=1 if block_e <= 256 else 4,
    )  # fmt: skip
    return weights, ids


# ---------------------------------------------------------------------------------------------
# Alignment: slots grouped by expert (stable: slot order within an expert), groups padded.

# NOTE: loops with a runtime trip count are `while` loops: Triton's interpreter cannot take a
# runtime scalar as a `range` bound under numpy >= 2.4 (the GEMMs' loops have constexpr bounds).
# The slot ranks come from a one-hot [SUB, E] cumsum per sub-block of slots; its size is
# capped here. Up to ALIGN_SINGLE_MAX_SUBS sub-blocks (decode, small prefill) one program does
# everything in one launch; beyond, ALIGN_MAX_CHUNKS programs count their chunk first (launch 1)
# and then each scatters its chunk after a prefix over the chunks' counts (launch 2).
ALIGN_ONEHOT_ELEMS = 8192
ALIGN_SINGLE_MAX_SUBS = 4
ALIGN_MAX_CHUNKS = 64
_FILL_BLOCK = 1024


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """EM: the static bound on padded slots; each expert that got a slot pads < block_m."""
    em = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return -(-em // block_m) * block_m


@triton.jit
def _align_count_kernel(
    ids_ptr, counts_ptr, sorted_ptr, num_slots, chunk, em,
    BLOCK_E: tl.constexpr, SUB: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    """Per chunk: counts[pid, e] = slots of expert e in the chunk; also fills its share of the
    sorted ids with the sentinel S (the scatter kernel, launched after, overwrites real slots)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_e = tl.arange(0, BLOCK_E)
    hist = tl.zeros([BLOCK_E], dtype=tl.int32)
    end = tl.minimum(pid * chunk + chunk, num_slots)
    s = pid * chunk
    while s < end:
        offs = s + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < end, other=-1).to(tl.int32)
        hist += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
        s += SUB
    tl.store(counts_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E), hist)
    f = pid * FILL
    while f < em:
        offs = f + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, num_slots, mask=offs < em)
        f += nprog * FILL


@triton.jit
def _align_scatter_kernel(
    ids_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,
    num_slots, num_experts, chunk, em, num_chunks,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, SUB: tl.constexpr, CHUNKS_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr, FILL: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_e = tl.arange(0, BLOCK_E)
    begin = pid * chunk
    end = tl.minimum(begin + chunk, num_slots)
    if SINGLE:  # one program: count here, fill the sentinel here
        total = tl.zeros([BLOCK_E], dtype=tl.int32)
        s = 0
        while s < num_slots:
            offs = s + tl.arange(0, SUB)
            ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
            total += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
            s += SUB
        before = tl.zeros([BLOCK_E], dtype=tl.int32)
        f = 0
        while f < em:
            offs = f + tl.arange(0, FILL)
            tl.store(sorted_ptr + offs, num_slots, mask=offs < em)
            f += FILL
        tl.debug_barrier()  # the sentinel stores land before the scatter's
    else:
        rows = tl.arange(0, CHUNKS_PAD)[:, None]
        counts = tl.load(
            counts_ptr + rows * BLOCK_E + offs_e[None, :], mask=rows < num_chunks, other=0
        )  # [chunks, E]
        total = tl.sum(counts, axis=0)  # [E]
        before = tl.sum(tl.where(rows < pid, counts, 0), axis=0)  # [E] earlier chunks' slots
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E]
    group_end = tl.cumsum(padded, axis=0)  # [E]
    num_post = tl.sum(padded, axis=0)
    base = group_end - padded + before  # [E] where this chunk's next slot of expert e goes
    s = begin
    while s < end:
        offs = s + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < end, other=-1).to(tl.int32)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [SUB, E]
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # [SUB]
        dest = tl.sum(onehot * base[None, :], axis=1) + rank  # [SUB]
        tl.store(sorted_ptr + dest, offs, mask=offs < end)
        base += tl.sum(onehot, axis=0)
        s += SUB
    # Block b starts at b*block_m; its expert is the number of groups ending at or before it.
    num_blocks = em // BLOCK_M
    b = pid * BLOCK_B
    while b < num_blocks:
        offs_b = b + tl.arange(0, BLOCK_B)
        pos = offs_b * BLOCK_M
        ended = (group_end[None, :] <= pos[:, None]) & (offs_e[None, :] < num_experts)
        expert = tl.sum(ended.to(tl.int32), axis=1)
        expert = tl.where(pos < num_post, expert, -1)
        tl.store(expert_ids_ptr + offs_b, expert, mask=offs_b < num_blocks)
        b += nprog * BLOCK_B
    if pid == 0:
        tl.store(num_post_ptr, num_post)


def moe_align_block_size(
    topk_ids: Tensor, block_m: int, num_experts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """topk_ids [T, K] -> (sorted_token_ids [EM] int32, expert_ids [B] int32,
    num_tokens_post_padded [1] int32).

    sorted_token_ids lists the slots (t*K + k) of expert 0, then of expert 1, ..., each group in
    slot order and padded to a multiple of block_m with the sentinel S = T*K; expert_ids[b] is
    the expert of block b, -1 past num_tokens_post_padded. EM = max_padded_slots(S, E, block_m)
    depends on shapes only, so no host sync happens and the call is CUDA-graph capturable.
    """
    num_slots = topk_ids.numel()
    device = topk_ids.device
    em = max_padded_slots(num_slots, num_experts, block_m)
    sorted_ids = torch.empty(em, dtype=torch.int32, device=device)
    expert_ids = torch.empty(em // block_m, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    if num_slots == 0:
        num_post.zero_()
        return sorted_ids, expert_ids, num_post
    ids = topk_ids.reshape(-1)  # [S]
    if not ids.is_contiguous():
        ids = ids.contiguous()
    block_e = max(16, triton.next_power_of_2(num_experts))
    sub = min(max(ALIGN_ONEHOT_ELEMS // block_e, 16), 1024, triton.next_power_of_2(num_slots))
    sub = max(sub, 16)
    num_subs = triton.cdiv(num_slots, sub)
    single = num_subs <= ALIGN_SINGLE_MAX_SUBS
    num_chunks = 1 if single else min(num_subs, ALIGN_MAX_CHUNKS)
    chunk = triton.cdiv(num_subs, num_chunks) * sub
    num_chunks = triton.cdiv(num_slots, chunk)
    counts = sorted_ids  # a dummy pointer: one program counts for itself
    if not single:
        counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)  # [chunks, E]
        _align_count_kernel[(num_chunks,)](
            ids, counts, sorted_ids, num_slots, chunk, em,
            BLOCK_E=block_e, SUB=sub, FILL=_FILL_BLOCK, num_warps=4,
        )  # fmt: skip
    _align_scatter_kernel[(num_chunks,)](
        ids, counts, sorted_ids, expert_ids, num_post,
        num_slots, num_experts, chunk, em, num_chunks,
        BLOCK_M=block_m, BLOCK_E=block_e, SUB=sub,
        CHUNKS_PAD=triton.next_power_of_2(num_chunks), BLOCK_B=max(16, 4096 // block_e),
        FILL=_FILL_BLOCK, SINGLE=single, num_warps=4,
    )  # fmt: skip
    return sorted_ids, expert_ids, num_post


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs over the aligned slots.


@triton.jit
def tile_rows(sorted_ptr, expert_ids_ptr, pid_m, num_slots, A_DIV, BLOCK_M: tl.constexpr):
    """Row block pid_m's slots [BLOCK_M] (the sentinel S on padding rows), which are real, the
    activation row each reads, and the block's expert.
    NOTE: padding rows read row 0 instead of masking, so the loads stay unmasked along M
    (vectorized); only their stores are masked."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < num_slots
    a_row = tl.where(row_ok, slot // A_DIV, 0).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    return slot, row_ok, a_row, expert


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, topk_weights_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,
    as_ptr, ws_ptr, wz_ptr,
    num_slots, em,
    stride_at, stride_we, stride_wn, stride_wk, stride_cs, stride_ast, stride_wse, stride_wsn,
    N: tl.constexpr, K: tl.constexpr, GATED: tl.constexpr, A_DIV: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr, QBLOCK_N: tl.constexpr, QBLOCK_K: tl.constexpr, UP_ROW: tl.constexpr,
    HAS_ZERO: tl.constexpr, NATIVE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of one expert's GEMM over gathered rows.

    GATED (gate+up): a = hidden [T, H] read at row slot // K (A_DIV = K), w = w13 [E, 2I, H]
    with N = I: c[slot, n] = silu(a @ w[e, n]) * (a @ w[e, I + n]) -> act [S, I].
    Not GATED (down): a = act [S, I] read at row slot (A_DIV = 1), w = w2 [E, H, I] with N = H:
    c[slot, n] = topk_weights[slot] * (a @ w[e, n]) -> [S, H].

    QUANT 0: a and w in one float dtype (as, ws, wz unused). QUANT 1 (block FP8): a is the
    per-token-group FP8 activation with scales as [rows, ceil(K/bk)], w FP8 with block scales
    ws [E, rows/bn, ceil(K/bk)] (QBLOCK_N = bn, QBLOCK_K = bk; the up half's scale rows start
    at UP_ROW); each k-tile's dot is scaled in float32. QUANT 2 (int4): w is the W4A16 layout
    (uint8 [E, rows, K/2], layers/quantization/triton_kernels.py) with scales (and zeros)
    [E, rows, K/g] (QBLOCK_N = 1, QBLOCK_K = g, UP_ROW = N), dequantized to a's dtype.
    """
    pid_m, pid_n = tile_of(em, N, BLOCK_M, BLOCK_N, GROUP_M)  # em: a multiple of BLOCK_M
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return  # a padding block past the last expert's group
    slot, row_ok, a_row, expert = tile_rows(
        sorted_ptr, expert_ids_ptr, pid_m, num_slots, A_DIV, BLOCK_M
    )
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % N  # wrapped columns load real weights; their outputs are masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_at + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    if QUANT == 2:  # bytes [BLOCK_N, BLOCK_K/2]
        w_ptrs = w_ptr + expert * stride_we + offs_wn[:, None] * stride_wn
        w_ptrs += tl.arange(0, BLOCK_K // 2)[None, :]
    else:  # [BLOCK_K, BLOCK_N]
        w_ptrs = (
            w_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk
        )
    if QUANT != 0:
        as_ptrs = as_ptr + a_row * stride_ast  # [BLOCK_M] (FP8)
        ws_rows = expert * stride_wse + (offs_wn // QBLOCK_N) * stride_wsn  # [BLOCK_N]
        wsu_rows = ws_rows + UP_ROW * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if QUANT == 2:  # K % BLOCK_K == 0: BLOCK_K divides g, g divides K
            a = tl.load(a_ptrs)
            kg = k * BLOCK_K // QBLOCK_K
            w = int4_tile(w_ptrs, ws_ptr + ws_rows + kg, wz_ptr + ws_rows + kg, HAS_ZERO, a.dtype)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if GATED:
                w_up = int4_tile(
                    w_ptrs + N * stride_wn, ws_ptr + wsu_rows + kg, wz_ptr + wsu_rows + kg,
                    HAS_ZERO, a.dtype,
                )  # fmt: skip
                acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        else:
            if K % BLOCK_K == 0:  # no mask along the reduction
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)  # [BLOCK_K, BLOCK_N]
                if GATED:
                    w_up = tl.load(w_ptrs + N * stride_wn)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
                if GATED:
                    w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None], other=0.0)
            if QUANT == 1:
                kg = k * BLOCK_K // QBLOCK_K  # the tile's k-group (BLOCK_K divides bk)
                a_s = tl.load(as_ptrs + kg)[:, None]
                a = fp8_operand(a, NATIVE)
                part = fp8_dot(a, fp8_operand(w, NATIVE), DOT)
                acc += part * a_s * tl.load(ws_ptr + ws_rows + kg)[None, :]
                if GATED:
                    part = fp8_dot(a, fp8_operand(w_up, NATIVE), DOT)
                    acc_up += part * a_s * tl.load(ws_ptr + wsu_rows + kg)[None, :]
            else:
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
                if GATED:
                    acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2 if QUANT == 2 else BLOCK_K * stride_wk
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up in float32
    else:
        acc = acc * tl.load(topk_weights_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slot.to(tl.int64)[:, None] * stride_cs + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@functools.cache
def _smem_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use (the limit Triton checks at launch)."""
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["max_shared_mem"]


def _fit_smem(cfg: GemmConfig, block_m: int, gated: bool, a: Tensor) -> GemmConfig:
    """cfg with block_k, then num_stages, cut until the pipelined tiles fit the GPU's shared
    memory. NOTE: the table is tuned for bf16 on an H100 (227 KB); float32 inputs and GPUs with
    ~100 KB (consumer cards) would otherwise fail to launch."""
    if a.device.type != "cuda":
        return cfg
    limit = _smem_limit(a.device.index if a.device.index is not None else 0)

    def need(c: GemmConfig) -> int:
        tiles = block_m * c.block_k + (2 if gated else 1) * c.block_k * c.block_n
        return c.num_stages * tiles * a.element_size()

    return shrink_to_fit(cfg, need, limit)


def shrink_to_fit(cfg: GemmConfig, need: Callable[[GemmConfig], int], limit: int) -> GemmConfig:
    """cfg with block_k halved down to 32, then num_stages cut down to 2, then block_k down to
    16, until `need(cfg)` bytes of shared memory fit in `limit`."""
    while need(cfg) > limit and cfg.block_k > 32:
        cfg = replace(cfg, block_k=cfg.block_k // 2)
    while need(cfg) > limit and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while need(cfg) > limit and cfg.block_k > 16:
        cfg = replace(cfg, block_k=cfg.block_k // 2)
    return cfg


@dataclass(frozen=True, slots=True, eq=False)
class _QuantArgs:
    """One quantized grouped GEMM's extra operands (see _moe_gemm_kernel's QUANT)."""

    kind: int  # 1 block FP8, 2 int4
    k: int  # the reduction size (int4 rows hold K/2 bytes)
    w_scale: Tensor
    w_zero: Tensor | None = None
    a_scale: Tensor | None = None  # FP8: the activation's per-token-group scales
    qblock_n: int = 1
    qblock_k: int = 1
    up_row: int = 0
    native: bool = True


def _launch_gemm(
    a: Tensor,
    w: Tensor,
    c: Tensor,
    topk_weights: Tensor,
    align: tuple[Tensor, Tensor, Tensor],
    num_slots: int,
    gated: bool,
    top_k: int,
    block_m: int,
    cfg: GemmConfig,
    quant: _QuantArgs | None = None,
) -> None:
    sorted_ids, expert_ids, num_post = align
    if quant is not None:  # each k-tile inside one FP8 block / int4 group
        cfg = replace(cfg, block_k=pow2_divisor(quant.qblock_k, cfg.block_k))
    cfg = _fit_smem(cfg, block_m, gated, a)
    em = sorted_ids.numel()
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2] if quant is None else quant.k
    q = quant or _QuantArgs(0, k, a)  # unquantized: dummy pointers, unused
    a_scale = q.a_scale if q.a_scale is not None else a
    w_zero = q.w_zero if q.w_zero is not None else q.w_scale
    grid = (em // block_m * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, w, c, topk_weights, sorted_ids, expert_ids, num_post,
        a_scale, q.w_scale, w_zero,
        num_slots, em,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), c.stride(0),
        a_scale.stride(0), q.w_scale.stride(0), q.w_scale.stride(1),
        N=n, K=k, GATED=gated, A_DIV=top_k if gated else 1,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        QUANT=q.kind, QBLOCK_N=q.qblock_n, QBLOCK_K=q.qblock_k, UP_ROW=q.up_row,
        HAS_ZERO=q.w_zero is not None, NATIVE=q.native, DOT=q.native and cfg.block_k >= 32,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


_ONE_TOKEN_LAYOUTS: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}


def _one_token_align(topk_ids: Tensor, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """moe_align_block_size for one token, with no kernel: block k holds slot k alone and its
    expert is topk_ids[0, k] (a token's K experts are distinct, so no weight is read twice).
    NOTE: a decode step of batch 1 saves one launch per MoE layer (~4 us of a ~1.3 ms step);
    the constant layout is cached, made outside any graph capture by the eager warm-up."""
    top_k = topk_ids.shape[1]
    key = (top_k, block_m, topk_ids.device)
    if key not in _ONE_TOKEN_LAYOUTS:
        rows = torch.arange(top_k * block_m, device=topk_ids.device)
        sorted_ids = torch.where(rows % block_m == 0, rows // block_m, top_k).to(torch.int32)
        num_post = torch.tensor([top_k * block_m], dtype=torch.int32, device=topk_ids.device)
        _ONE_TOKEN_LAYOUTS[key] = (sorted_ids, num_post)
    sorted_ids, num_post = _ONE_TOKEN_LAYOUTS[key]
    return sorted_ids, topk_ids.reshape(-1), num_post


@dataclass(frozen=True, slots=True, eq=False)
class MoEQuant:
    """Quantized experts for fused_moe (w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]).

    kind "fp8_block": w13/w2 float8_e4m3fn, w13_scale float32 [E, 2*ceil(I/bn), ceil(H/bk)]
    (the gate's block rows, then the up projection's), w2_scale [E, ceil(H/bn), ceil(I/bk)],
    block = (bn, bk). hidden and the SiLU*up intermediate are quantized per token and bk
    columns (per_token_group_quant_fp8) as the A operands.
    kind "int4": w13/w2 in the W4A16 layout (uint8 [E, 2I, H/2], [E, H, I/2]: repack_moe_w4a16
    or quantization.triton_kernels.repack_w4a16), scales [E, 2I, H/g], [E, H, I/g], zeros
    uint8 of the same shapes or None (symmetric), group_size = g.
    """

    kind: Literal["fp8_block", "int4"]
    w13_scale: Tensor
    w2_scale: Tensor
    block: tuple[int, int] | None = None
    group_size: int | None = None
    w13_zero: Tensor | None = None
    w2_zero: Tensor | None = None


def _expect(name: str, tensor: Tensor, shape: tuple[int, ...], why: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {why} needs {shape}")


def _quant_args(
    quant: MoEQuant, hidden: Tensor, w13: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor, _QuantArgs, _QuantArgs]:
    """Checks the quantized experts against hidden [T, H] -> (a of the gate+up GEMM, the
    weights as the kernel reads them, the two GEMMs' extra operands)."""
    e, two_i, _ = w13.shape
    h, i = hidden.shape[1], two_i // 2
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fused_moe: hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if quant.kind == "fp8_block":
        if quant.block is None or quant.block[1] % 16:
            raise ValueError(
                f"MoEQuant fp8_block needs block (bn, bk), bk % 16 == 0: {quant.block}"
            )
        bn, bk = quant.block
        for name, wt, shape in (("w13", w13, (e, 2 * i, h)), ("w2", w2, (e, h, i))):
            if wt.dtype != FP8_DTYPE:
                raise ValueError(
                    f"fused_moe fp8_block: {name} must be float8_e4m3fn, got {wt.dtype}"
                )
            _expect(name, wt, shape, f"hidden size {h} and w13 {tuple(w13.shape)}")
        cd = triton.cdiv
        _expect("w13_scale", quant.w13_scale, (e, 2 * cd(i, bn), cd(h, bk)), f"w13 in {bn}x{bk}")
        _expect("w2_scale", quant.w2_scale, (e, cd(h, bn), cd(i, bk)), f"w2 in {bn}x{bk}")
        native = native_fp8(hidden.device)
        xq, xs = per_token_group_quant_fp8(hidden, bk)
        s13, s2 = quant.w13_scale.float().contiguous(), quant.w2_scale.float().contiguous()
        up = _QuantArgs(1, h, s13, None, xs, bn, bk, cd(i, bn), native)
        down = _QuantArgs(1, i, s2, None, None, bn, bk, 0, native)
        return fp8_view(xq, native), fp8_view(w13, native), fp8_view(w2, native), up, down
    if quant.kind != "int4":
        raise ValueError(f"MoEQuant kind must be 'fp8_block' or 'int4', got {quant.kind!r}")
    g = quant.group_size
    if g is None or g % 16 or h % g or i % g:
        raise ValueError(
            f"fused_moe int4: hidden size {h} and expert inner size {i} must be multiples of "
            f"the group size {g} (a multiple of 16)"
        )
    for name, wt, rows, cols in (("w13", w13, 2 * i, h), ("w2", w2, h, i)):
        if wt.dtype != torch.uint8 or wt.shape[:2] != (e, rows) or wt.shape[2] * 2 < cols:
            raise ValueError(
                f"{name} has {wt.dtype} {tuple(wt.shape)} but the int4 layout needs uint8 "
                f"({e}, {rows}, {cols // 2}) (see repack_moe_w4a16)"
            )
    _expect("w13_scale", quant.w13_scale, (e, 2 * i, h // g), f"w13 in groups of {g}")
    _expect("w2_scale", quant.w2_scale, (e, h, i // g), f"w2 in groups of {g}")
    zeros = []
    for name, zero, scale in (("w13_zero", quant.w13_zero, quant.w13_scale),
                              ("w2_zero", quant.w2_zero, quant.w2_scale)):  # fmt: skip
        if zero is not None:
            _expect(name, zero, tuple(scale.shape), f"{name[:-5]}_scale of that shape")
            if zero.dtype != torch.uint8:
                raise ValueError(f"fused_moe int4: {name} must be uint8, got {zero.dtype}")
            zero = zero.contiguous()
        zeros.append(zero)
    s13, s2 = quant.w13_scale.contiguous(), quant.w2_scale.contiguous()
    up = _QuantArgs(2, h, s13, zeros[0], None, 1, g, i)
    down = _QuantArgs(2, i, s2, zeros[1], None, 1, g, 0)
    return hidden, w13, w2, up, down


def repack_moe_w4a16(
    w13_packed: Tensor,
    w13_scale: Tensor,
    w2_packed: Tensor,
    w2_scale: Tensor,
    w13_zero_point: Tensor | None = None,
    w2_zero_point: Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, MoEQuant]:
    """Checkpoint int4 experts -> (w13, w2, MoEQuant) for fused_moe, once at load, lossless.

    w13_packed int32 [E, 2I, H/8], w2_packed [E, H, I/8] (element i at bits 4i, 0..15), scales
    [E, 2I, H/g], [E, H, I/g], zero points as compressed-tensors packs them along the rows,
    int32 [E, 2*ceil(I/8), H/g] (gate and up packed apart) and [E, ceil(H/8), I/g], or None.
    Works per expert too (E = 1 slices). See repack_w4a16 for the layout.
    """
    h = w2_packed.shape[1]
    zero13 = zero2 = None
    if w13_zero_point is not None:
        zero13 = unpack_int4_rows(w13_zero_point, w13_packed.shape[1], parts=2)
    if w2_zero_point is not None:
        zero2 = unpack_int4_rows(w2_zero_point, h, parts=1)
    w13, s13, z13 = repack_w4a16(w13_packed, w13_scale, zero13, scale_dtype)
    w2, s2, z2 = repack_w4a16(w2_packed, w2_scale, zero2, scale_dtype)
    group = h // w13_scale.shape[-1]
    return w13, w2, MoEQuant("int4", s13, s2, group_size=group, w13_zero=z13, w2_zero=z2)


def fused_moe(
    hidden: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13: Tensor,
    w2: Tensor,
    config: MoEConfig | None = None,
    quant: MoEQuant | None = None,
) -> Tensor:
    """hidden [T, H], topk_weights [T, K], topk_ids [T, K] int, w13 [E, 2I, H] (gate rows then up
    rows), w2 [E, H, I] -> [T, H] in hidden's dtype: sum_k w_k * down(silu(gate(x)) * up(x)).

    Float32 runs exact (IEEE) dots; bf16/fp16 run tensor cores with float32 accumulation and
    round act and each slot's output once to hidden's dtype. 4-5 launches, no host sync.
    quant (MoEQuant): quantized experts. Block FP8 quantizes hidden, and act again, per token
    group (two more launches; vLLM's recipe); int4 dequantizes each weight tile in the GEMMs.
    NOTE (decode): the table's configs serve the quantized kinds too (block_k cut to the FP8
    block / int4 group): at T=1 the K=8 experts' weight bytes bound the step, 1 B a weight for
    FP8 (Qwen3-30B-A3B: 8 x 3 x 2048 x 768 = 37.7 MB, 11 us at 3.35 TB/s), 0.5 B for int4.
    """
    t, h = hidden.shape
    e, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    num_slots = t * top_k
    if t == 0:
        return hidden.new_empty(0, h)
    if quant is None and not hidden.dtype == w13.dtype == w2.dtype:
        raise ValueError(
            f"fused_moe needs one dtype: hidden is {hidden.dtype}, w13 {w13.dtype}, w2 {w2.dtype}"
        )
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs expert weights contiguous along their last dim")
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    a13, q13, q2 = hidden, None, None
    if quant is not None:
        a13, w13, w2, q13, q2 = _quant_args(quant, hidden, w13, w2)
    cfg = config or get_moe_config(t, top_k, e)
    if t == 1:
        align = _one_token_align(topk_ids, cfg.block_m)
    else:
        align = moe_align_block_size(topk_ids, cfg.block_m, e)
    weights = topk_weights.reshape(-1)  # [S]
    if not weights.is_contiguous():
        weights = weights.contiguous()
    act = torch.empty(num_slots, two_i // 2, dtype=hidden.dtype, device=hidden.device)  # [S, I]
    _launch_gemm(a13, w13, act, weights, align, num_slots, True, top_k, cfg.block_m, cfg.up, q13)
    a2 = act
    if q2 is not None and q2.kind == 1:  # FP8: act [S, I] quantized per token group again
        a2, a2_scale = per_token_group_quant_fp8(act, q2.qblock_k)
        a2, q2 = fp8_view(a2, q2.native), replace(q2, a_scale=a2_scale)
    out = torch.empty(num_slots, h, dtype=hidden.dtype, device=hidden.device)  # [S, H]
    _launch_gemm(a2, w2, out, weights, align, num_slots, False, top_k, cfg.block_m, cfg.down, q2)
    if top_k == 1:
        return out
    return moe_sum(out.view(t, top_k, h))


@triton.jit
def _moe_sum_kernel(x_ptr, out_ptr, h, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < h
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(x_ptr + (t * TOP_K + k) * h + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * h + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(x: Tensor) -> Tensor:
    """x [T, K, H] contiguous -> [T, H]: the sum over the K slots of each token, float32
    accumulation and one rounding. NOTE: deterministic (no atomics in the down GEMM), and one
    small launch where torch's reduction kernel took ~5 us at decode sizes."""
    t, k, h = x.shape
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(h))
    _moe_sum_kernel[(t, triton.cdiv(h, block))](x, out, h, TOP_K=k, BLOCK=block, num_warps=4)
    return out
