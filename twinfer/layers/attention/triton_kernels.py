"""Triton kernels for attention over the paged KV cache, and their thin launchers.

Legend: `T` tokens of the step, `S` sequences, `Hq`/`Hkv` query/KV heads, `G` = Hq / Hkv,
`D` head size, `NB` cache blocks, `bs` block size, `P` decode splits, `M` rows of a query tile
(query tokens x G heads), `N` keys of a KV tile.

- `reshape_and_cache`: this step's K/V rows into the cache at `slot_mapping` (-1 skips a row).
- `varlen_attention`: any mix of query lengths (prefill, chunked prefill, prefix hits, decode).
  A program owns `BLOCK_Q` query tokens of one sequence times the `G` query heads of one KV head
  (`M = BLOCK_Q * G` rows), so each K/V tile is loaded once for the whole group.
- `decode_attention`: one query token per sequence, split-K (flash-decoding): grid
  `(S, Hkv, P)`, every split owns a contiguous run of whole KV tiles, then a combine kernel merges
  the splits by their log-sum-exp. Grid and launch parameters depend only on `S`, the head counts
  and the `max_seq_len` bound, so one CUDA graph replays for every context length.

Keys are gathered per token through the block table (`slot = block_table[s, p // bs] * bs +
p % bs`), so any power-of-two block size works with any tile size. Softmax runs in float32 in the
log2 domain (`exp2`, scale folded with log2(e)); float32 inputs use exact (`ieee`) dots.

An fp8 cache (--kv-cache-dtype fp8|fp8_e5m2, float8_e4m3fn or float8_e5m2) is passed to the
kernels as its bytes (the constexpr `FP8`: 0 the cache holds plain floats, 1 e4m3fn, 2 e5m2),
as the torch backend moves it: values are cast with no scale (vLLM's default scale 1.0) when
written, rounded to nearest even exactly as torch casts them, and converted back exactly when
read; integer ops only, so the interpreter (whose fp8 casts are wrong) and GPUs before sm_89 run
the same code. With `FP8` 0 the kernels compile as they did before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class KernelConfig:
    block_m: int  # query rows per tile (tokens x G); varlen only
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# NOTE: the tuning knobs, keyed by (head-size bucket, 16-bit or float32). Sweep them with
# `scripts/bench_attention.py --sweep` on the GPU; float32 configs only serve the tests. The
# 16-bit defaults compile for sm_90 without spills (ptxas: 128-176 registers a thread for
# prefill, ~120 for decode) and keep shared memory under 100 KB.
PREFILL_CONFIGS: dict[tuple[int, bool], KernelConfig] = {
    (64, True): KernelConfig(128, 64, 8, 3),
    (128, True): KernelConfig(128, 64, 8, 3),
    (256, True): KernelConfig(64, 32, 8, 2),
    (64, False): KernelConfig(64, 32, 4, 2),
    (128, False): KernelConfig(32, 32, 4, 2),
    (256, False): KernelConfig(16, 16, 4, 1),
}
DECODE_CONFIGS: dict[tuple[int, bool], KernelConfig] = {
    (64, True): KernelConfig(16, 64, 4, 3),
    (128, True): KernelConfig(16, 64, 4, 3),
    (256, True): KernelConfig(16, 32, 4, 3),
    (64, False): KernelConfig(16, 32, 4, 2),
    (128, False): KernelConfig(16, 32, 4, 2),
    (256, False): KernelConfig(16, 16, 4, 1),
}
MAX_SPLITS = 64
_FP8_CODES = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}  # the kernels' `FP8` switch
SPLIT_WAVES = 2  # decode aims at SPLIT_WAVES x SM count programs


def _config(
    table: dict[tuple[int, bool], KernelConfig], d: int, dtype: torch.dtype
) -> KernelConfig:
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    if d > 256:
        raise ValueError(f"head size {d} is not supported by the triton backend (at most 256)")
    return table[(bucket, dtype != torch.float32)]


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend an H100 so the split logic is exercised


def _kernel_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The cache as the kernels take it and its `FP8` switch: an fp8 cache as a byte view."""
    fp8 = _FP8_CODES.get(kv_cache.dtype, 0)
    return (kv_cache.view(torch.uint8) if fp8 else kv_cache), fp8


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device
) -> int:
    """Splits per (sequence, KV head): fill ~SPLIT_WAVES waves of SMs, never more than tiles."""
    want = triton.cdiv(SPLIT_WAVES * _num_sms(device), max(num_seqs * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(max(max_seq_len, 1), block_n), MAX_SPLITS))


# ---- fp8 cache values ----
@triton.jit
def _fp8_code(x, E5M2: tl.constexpr):
    """Values -> their e4m3fn (E5M2 False) or e5m2 codes (uint8), as torch casts them: rounded
    to nearest even; e4m3fn saturates at +-448 (inf too), e5m2 overflows to inf; NaN stays NaN."""
    y = x.to(tl.float32)
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80  # -0.0 too
    if E5M2:
        a = tl.minimum(tl.abs(y), 65536.0)  # 2^16 is inf's code (0x7C), like all past 61440
        # |y| < 2^-14: multiples of 2^-16; adding 1.5 * 2^7 (ulp 2^-16) rounds to them, ties to
        # even. Code 4 (a round up to 2^-14) is the smallest normal's code: the formats line up.
        sub = ((a + 192.0) - 192.0) * 65536.0
        # Normal: round float32's mantissa to 2 bits (carry runs into the exponent), rebias
        # 127 -> 15.
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0xFFFFF + ((bits >> 21) & 1)) >> 21) - ((127 - 15) << 2)
        code = tl.where(a < 0.00006103515625, sub.to(tl.int32), normal)
    else:
        a = tl.minimum(tl.abs(y), 448.0)
        sub = ((a + 24576.0) - 24576.0) * 512.0  # |y| < 2^-6: multiples of 2^-9 (as above)
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
        code = tl.where(a < 0.015625, sub.to(tl.int32), normal)
    code = tl.where(y != y, 0x7F, code) | sign
    return code.to(tl.uint8)


@triton.jit
def _fp8_value(b, E5M2: tl.constexpr):
    """e4m3fn / e5m2 codes (uint8) -> float16, exactly: every finite code is a float16 (e4m3fn's
    NaN codes read as +-480: only a NaN input writes them)."""
    b16 = b.to(tl.uint16)
    if E5M2:
        return (b16 << 8).to(tl.float16, bitcast=True)  # e5m2 is float16's high byte
    else:
        # The code's bits shifted into float16's places read 2^-8 of the value (biases 15 vs
        # 7); e4m3 subnormals land on float16 subnormals.
        h = ((b16 & 0x7F) << 7) | ((b16 & 0x80) << 8)
        return h.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def _to_cache(x, cache_ptr, FP8: tl.constexpr):
    """x as the cache stores it: its dtype, or the fp8 code (FP8 1: e4m3fn, 2: e5m2)."""
    if FP8 == 0:
        return x.to(cache_ptr.dtype.element_ty)
    else:
        return _fp8_code(x, FP8 == 2)


@triton.jit
def _from_cache(x, FP8: tl.constexpr):
    """Loaded cache elements as values: themselves, or float16 from their fp8 codes."""
    if FP8 == 0:
        return x
    else:
        return _fp8_value(x, FP8 == 2)


# ---- cache write ----
@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < HKV) & (offs_d < D) & (slot >= 0)  # slot -1: a padded row, skipped
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    dst = slot * stride_cs + offs_h * stride_ch + offs_d
    tl.store(k_cache_ptr + dst, _to_cache(k, k_cache_ptr, FP8), mask=mask)
    tl.store(v_cache_ptr + dst, _to_cache(v, v_cache_ptr, FP8), mask=mask)


def reshape_and_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, NB, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, -1 skips
) -> None:
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.is_contiguous()
    cache, fp8 = _kernel_cache(kv_cache)
    k_cache, v_cache = cache[0], cache[1]
    _reshape_and_cache_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        HKV=hkv, D=d, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
        FP8=fp8,
    )  # fmt: skip


# ---- one KV tile of online softmax, shared by both attention kernels ----
@triton.jit
def _attend_tile(
    acc, m_i, l_i, q,  # [M, BLOCK_D] f32, [M] f32, [M] f32, [M, BLOCK_D]
    start_n, seq_len, limit,  # limit [M]: last key position each row may see
    bt_row, k_cache_ptr, v_cache_ptr, head_off, stride_cs, qk_scale,
    offs_n, offs_d,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    pos = start_n + offs_n  # [N] key positions
    if MASKED:
        key_ok = pos < seq_len
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=key_ok, other=0)
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE)
    slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_off = slot[:, None] * stride_cs + head_off + offs_d[None, :]  # [N, BLOCK_D]
    if MASKED:
        kv_mask = key_ok[:, None] & (offs_d[None, :] < D)
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_cache_ptr + kv_off)
        v = tl.load(v_cache_ptr + kv_off)
    else:
        k = tl.load(k_cache_ptr + kv_off, mask=offs_d[None, :] < D, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=offs_d[None, :] < D, other=0.0)
    k = _from_cache(k, FP8)
    v = _from_cache(v, FP8)
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    if MASKED:
        qk = tl.where(pos[None, :] <= limit[:, None], qk, float("-inf"))
    # NOTE: every row sees at least one key of its first tile, so m_new is finite after it and
    # fully masked later tiles give alpha = 1, p = 0 (no -inf - -inf).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ---- varlen (prefill / mixed) ----
# NOTE: num_seqs is not specialized (== 1 would make it a constexpr, breaking the search loop).
@triton.jit(do_not_specialize=["num_seqs"])
def _varlen_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    # NOTE: reversed, so the q tiles with the most keys (the last ones) start first and the
    # cheap ones fill the tail of the causal imbalance.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    # Sequence s owns q blocks from query_start_loc[s] // BLOCK_Q + s on (strictly increasing in
    # s), so a binary search finds this program's sequence; the grid needs only T and S.
    lo = tl.zeros([], tl.int32)
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    s = lo - 1
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    first = (pid - (q_start // BLOCK_Q + s)) * BLOCK_Q  # first query token of this tile
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    context = seq_len - q_len  # keys cached before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = first + offs_m // G  # [M] query token within the sequence
    head = kvh * G + offs_m % G  # [M] query head
    row_ok = (offs_m < BLOCK_Q * G) & (tok < q_len)
    q_rows = (q_start + tok).to(tl.int64)
    io_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q_off = q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)  # [M, BLOCK_D]
    limit = context + tok  # [M] causal: token t sees keys 0 .. context + t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + s.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    last = tl.minimum(first + BLOCK_Q, q_len) - 1
    # Keys 0 .. context + first are seen by every row: whole tiles there need no mask.
    full_end = tl.maximum(context + first + 1, 0) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(context + last + 1, seq_len)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, start_n, seq_len, limit, bt_row, k_cache_ptr, v_cache_ptr,
            head_off, stride_cs, qk_scale, offs_n, offs_d,
            D, BLOCK_SIZE, False, D == BLOCK_D, DOT_PRECISION, FP8,
        )  # fmt: skip
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, start_n, seq_len, limit, bt_row, k_cache_ptr, v_cache_ptr,
            head_off, stride_cs, qk_scale, offs_n, offs_d,
            D, BLOCK_SIZE, True, D == BLOCK_D, DOT_PRECISION, FP8,
        )  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key (seq_len 0): zeros
    o_off = q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)


def varlen_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, NB, bs, Hkv, D]
    query_start_loc: torch.Tensor,  # [S+1] int32
    seq_lens: torch.Tensor,  # [S] int32
    block_table: torch.Tensor,  # [S, max_blocks] int64
    scale: float,
    max_query_len: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    t, hq, d = q.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    g = hq // hkv
    out = q.new_empty((t, hq, d))
    num_seqs = seq_lens.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and kv_cache.is_contiguous()
    cfg = config or _config(PREFILL_CONFIGS, d, q.dtype)
    # NOTE: short queries (decode rows, speculative drafts) take a smaller tile: each tile
    # streams the whole context, so rows beyond the longest query only waste compute.
    rows = max(16, triton.next_power_of_2(max(max_query_len, 1) * g))
    block_m = max(min(cfg.block_m, rows), triton.next_power_of_2(g), 16)
    block_q = block_m // g
    cache, fp8 = _kernel_cache(kv_cache)
    k_cache, v_cache = cache[0], cache[1]
    grid = (t // block_q + num_seqs, hkv)
    _varlen_attention_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_table,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        G=g, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_Q=block_q,
        BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# ---- decode (split-K) ----
@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    seq_lens_ptr, block_table_ptr, qk_scale, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
    k_new_ptr, v_new_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, WRITE_KV: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)  # the real length, read on the device
    if WRITE_KV:
        # This step's key is not in the cache yet: the cache part covers the earlier positions,
        # split 0 adds the new key from registers and writes it (no program reads its slot).
        seq_len = tl.maximum(seq_len - 1, 0)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
    full_hi = tl.minimum(tile_hi, seq_len // BLOCK_N)  # tiles without a key past seq_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    head = kvh * G + offs_g  # [BLOCK_G]
    io_mask = (offs_g < G)[:, None] & (offs_d[None, :] < D)
    row = s.to(tl.int64)  # one query token per sequence: token index == s
    q_off = row * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)  # [BLOCK_G, BLOCK_D]
    limit = tl.zeros([BLOCK_G], tl.int32) + seq_len - 1

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + row * stride_bt
    head_off = kvh * stride_ch
    for tile in range(tile_lo, full_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, tile * BLOCK_N, seq_len, limit, bt_row, k_cache_ptr, v_cache_ptr,
            head_off, stride_cs, qk_scale, offs_n, offs_d,
            D, BLOCK_SIZE, False, D == BLOCK_D, DOT_PRECISION, FP8,
        )  # fmt: skip
    for tile in range(tl.maximum(full_hi, tile_lo), tile_hi):  # the partial last tile
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, tile * BLOCK_N, seq_len, limit, bt_row, k_cache_ptr, v_cache_ptr,
            head_off, stride_cs, qk_scale, offs_n, offs_d,
            D, BLOCK_SIZE, True, D == BLOCK_D, DOT_PRECISION, FP8,
        )  # fmt: skip
    if WRITE_KV:  # noqa: SIM102 (a constexpr branch: compiled away when False)
        if (split == 0) & (tl.load(seq_lens_ptr + s) > 0):
            d_ok = offs_d < D
            k_new = tl.load(k_new_ptr + row * stride_kt + kvh * stride_kh + offs_d, mask=d_ok)
            v_new = tl.load(v_new_ptr + row * stride_vt + kvh * stride_vh + offs_d, mask=d_ok)
            if FP8 != 0:  # attend to the values the cache keeps, as later steps read them
                k_new = _fp8_value(_fp8_code(k_new, FP8 == 2), FP8 == 2)
                v_new = _fp8_value(_fp8_code(v_new, FP8 == 2), FP8 == 2)
            qk = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # [G]
            m_new = tl.maximum(m_i, qk)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
            slot = tl.load(slot_ptr + s)
            if slot >= 0:
                c_off = slot * stride_cs + head_off + offs_d
                tl.store(k_cache_ptr + c_off, _to_cache(k_new, k_cache_ptr, FP8), mask=d_ok)
                tl.store(v_cache_ptr + c_off, _to_cache(v_new, v_cache_ptr, FP8), mask=d_ok)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]  # an empty split or seq_len 0: zeros, never NaN
    if not SPLIT:
        o_off = row * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = (row * HQ + head) * num_splits + split  # [BLOCK_G] into [S, Hq, P]
        tl.store(part_out_ptr + part[:, None] * D + offs_d[None, :], out, mask=io_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # empty: ignored
        tl.store(part_lse_ptr + part, lse, mask=offs_g < G)


@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_ot, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    base = (s * HQ + h) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_p, mask=offs_p < num_splits, other=float("-inf"))
    live = lse > float("-inf")
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # [BLOCK_P], 0 for empty splits
    p_off = (base + offs_p)[:, None] * D + offs_d[None, :]
    part = tl.load(part_out_ptr + p_off, mask=live[:, None] & (offs_d[None, :] < D), other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(den == 0.0, 1.0, den)  # seq_len 0: zeros
    o_ptr = out_ptr + s * stride_ot + h * stride_oh + offs_d
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def decode_attention(
    q: torch.Tensor,  # [S, Hq, D], one query token per sequence
    kv_cache: torch.Tensor,  # [2, NB, bs, Hkv, D]
    seq_lens: torch.Tensor,  # [S] int32, 0 for padded rows
    block_table: torch.Tensor,  # [S, max_blocks] int64
    scale: float,
    max_seq_len: int,
    num_splits: int = 0,
    config: KernelConfig | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [S, Hq, D]
    """Split-K decode. Launch parameters depend only on shapes and `max_seq_len` (an upper bound
    of seq_lens), never on tensor contents, so it is safe to capture in a CUDA graph.

    `new_kv` = (k [S, Hkv, D], v [S, Hkv, D], slot_mapping [S]): this step's K/V, not yet in
    the cache; the kernel attends to them from registers and writes them at their slots (-1:
    none), which saves the reshape_and_cache launch of every layer of a decode step."""
    num_seqs, hq, d = q.shape
    _, _, block_size, hkv, _ = kv_cache.shape
    g = hq // hkv
    out = q.new_empty((num_seqs, hq, d))
    if num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and kv_cache.is_contiguous()
    cfg = config or _config(DECODE_CONFIGS, d, q.dtype)
    # NOTE: the split count is a runtime argument (only SPLIT > 1 is a constexpr): eager decode
    # sees a new count whenever the batch or the longest context changes, and must not recompile.
    splits = num_splits or decode_num_splits(num_seqs, hkv, max_seq_len, cfg.block_n, q.device)
    block_d = max(16, triton.next_power_of_2(d))
    if splits > 1:
        # Scratch in the caller's stream order; under capture it lives in the graph's pool.
        part_out = torch.empty((num_seqs, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    cache, fp8 = _kernel_cache(kv_cache)
    k_cache, v_cache = cache[0], cache[1]
    k_new, v_new, slots = new_kv if new_kv is not None else (q, q, seq_lens)
    assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1
    _decode_attention_kernel[(num_seqs, hkv, splits)](
        q, k_cache, v_cache, out, part_out, part_lse, seq_lens, block_table, scale * _LOG2E, splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        k_new, v_new, slots, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        HQ=hq, G=g, D=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=block_d,
        BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size, SPLIT=splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", WRITE_KV=new_kv is not None,
        FP8=fp8, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _decode_combine_kernel[(num_seqs, hq)](
            part_out, part_lse, out, splits, out.stride(0), out.stride(1),
            HQ=hq, D=d, BLOCK_D=block_d, BLOCK_P=triton.next_power_of_2(splits),
            num_warps=4 if d > 64 else 2,
        )  # fmt: skip
    return out
