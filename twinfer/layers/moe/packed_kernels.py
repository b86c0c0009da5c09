"""Fused mixture-of-experts in Triton on the native CPU engine's packed expert bytes.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size, `S` = T*K slots
(slot s = t*K + k), `EM` the padded slot count, `B` = EM / block_m blocks, `R` rows (outputs)
and `C` cols (inputs) of one packed matrix, `Kp` = C rounded up to 32, `gs` the group size of
the grouped formats (int4, int4z, fp8).

GPU prefill streaming (hybrid/gpu_prefill.py) copies a host layer's packed arenas verbatim into a
GPU uint8 buffer, so host RAM keeps one copy of the experts. The pipeline is fused_moe's
(triton_kernels.py: the same alignment, configs and moe_sum); only the two grouped GEMMs differ:
they read each weight where the packed layout keeps it (native/src/pack.cpp). A matrix is stored
in blocks of 16 rows; row r's `lane` is r % 16 and, for expert e, its block starts at byte
`blk = base + e * estride` of the buffer. W[r][c] lies at:
  f32 : f32 at blk + 64 c + 4 lane                      block 64 Kp
  f16 : f16 at blk + 32 c + 2 lane                      block 32 Kp
  bf16: bf16 at blk + 64 (c // 2) + 4 lane + 2 (c % 2)   block 32 Kp (pairs of columns)
  int8: q at blk + 16 c + lane, f32 row scale at blk + 16 Kp + 4 lane        block 16 Kp + 64
  int4: group g = c // gs, j = c % gs: a 32-bit word at blk + 64 g (gs/8 + 1) + 64 (j // 8)
        + 4 lane holds 8 columns, nibble (j % 8) at bit 4 ((j % 8) // 2) + 16 (j % 2), q = nibble
        - 8; the group's f32 scale at blk + 64 g (gs/8 + 1) + 8 gs + 4 lane.
  int4z: int4's words and scale with groups of gs/8 + 2 lines (64 g (gs/8 + 2)), the group's
        f32 offset m after the scale (+ 8 gs + 64 + 4 lane): W = q * s + m.
  fp8 : group g = c // gs, j = c % gs: the e4m3fn byte at blk + g (16 gs + 64) + 16 j + lane,
        the group's f32 scale * 256 at blk + g (16 gs + 64) + 16 gs + 4 lane. The byte b decodes
        exactly as the half ((int16) b << 7) & 0xBF80 = value * 2^-8 (pack.cpp's "FP8
        decoding"), the 2^8 being in the stored scale.
PackedGeometry turns a layer's shard plan into per-row tables (base, lane, estride), built once
and kept on the GPU; the kernels load a tile's column entries once and address every (k, n)
from them. Every lane's step is its element size, so one "column index" per row plus a per-k
line offset addresses every format (see _weight_tile).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from twinfer.layers.moe.triton_kernels import (
    GemmConfig,
    MoEConfig,
    _one_token_align,
    _smem_limit,
    get_moe_config,
    moe_align_block_size,
    moe_sum,
    shrink_to_fit,
    tile_rows,
)
from twinfer.layers.quantization.triton_kernels import tile_of

FORMATS = ("f32", "f16", "bf16", "int8", "int4", "int4z", "fp8")
GROUPED = ("int4", "int4z", "fp8")  # a scale (int4z: and an offset) per row per group
GROUP_SIZES = (32, 64, 128)
_ROW_BLOCK = 16
_COL_PAD = 32
# The element the kernels load per format (the buffer viewed as this dtype): bf16 pairs and int4
# lanes are read as 32-bit words, fp8 bytes as int8 (sign-extended by the decode). Every lane's
# step in the layout is exactly this size.
_LOAD_DTYPE = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.int32,
    "int8": torch.int8,
    "int4": torch.int32,
    "int4z": torch.int32,
    "fp8": torch.int8,
}


def packed_block_bytes(fmt: str, cols: int, group_size: int) -> int:
    """Bytes of one block of 16 packed rows of `cols` columns (pack.cpp's detail::geom)."""
    kp = -(-cols // _COL_PAD) * _COL_PAD
    if fmt == "f32":
        return 64 * kp
    if fmt in ("f16", "bf16"):
        return 32 * kp
    if fmt == "int8":
        return 16 * kp + 64
    if fmt == "fp8":
        return cols // group_size * (16 * group_size + 64)
    return cols // group_size * (group_size // 8 + (2 if fmt == "int4z" else 1)) * 64


@dataclass(frozen=True, slots=True, eq=False)
class PackedGeometry:
    """Where every expert row of one host layer lies in its GPU buffer (the shards' arenas
    concatenated in shard order).

    gate / up [3, I] and down [3, H] int64: per weight row (block base byte offset for expert 0
    within the buffer, lane, expert stride in bytes). `aligned`: every run of 16 rows starting
    at a multiple of 16 is one block's lanes 0..15 at a 64-byte aligned base (the kernels then
    tell Triton the loads are contiguous along N; see _row_columns).
    """

    fmt: str
    group_size: int
    num_experts: int
    hidden: int
    inner: int
    nbytes: int
    shard_offsets: tuple[int, ...]
    shard_bytes: tuple[int, ...]
    gate: Tensor
    up: Tensor
    down: Tensor
    aligned: bool

    @property
    def device(self) -> torch.device:
        return self.gate.device

    def to(self, device: torch.device | str) -> PackedGeometry:
        """A copy with the tables on `device` (built once; the kernels read them there)."""
        device = torch.device(device)
        if self.gate.device == device:
            return self
        return replace(
            self, gate=self.gate.to(device), up=self.up.to(device), down=self.down.to(device)
        )

    @classmethod
    def from_layer(cls, layer) -> PackedGeometry:
        """The geometry of a native `ExpertLayer` (tables on the CPU)."""
        return cls.from_shard_plan(
            layer.shard_plan(), layer.format, layer.group_size, layer.num_experts, layer.hidden,
            layer.inner,
        )  # fmt: skip

    @classmethod
    def from_shard_plan(
        cls,
        plan: list[dict],
        fmt: str,
        group_size: int,
        num_experts: int,
        hidden: int,
        inner: int,
    ) -> PackedGeometry:
        """The geometry of a layer from `ExpertLayer.shard_plan()`: per shard inner_begin /
        inner_end (its gate/up rows of I), hidden_begin / hidden_end (its down rows of H),
        arena_bytes, stride (bytes per expert), up_off and down_off."""
        if fmt not in FORMATS:
            raise ValueError(f"packed format {fmt!r} is not one of {', '.join(FORMATS)}")
        if min(num_experts, hidden, inner) < 1:
            raise ValueError(
                f"num_experts, hidden and inner must be >= 1, got {num_experts}, {hidden}, {inner}"
            )
        if fmt in GROUPED:
            if group_size not in GROUP_SIZES:
                raise ValueError(f"{fmt} group_size {group_size} is not one of {GROUP_SIZES}")
            if hidden % group_size or inner % group_size:
                raise ValueError(
                    f"{fmt} needs hidden ({hidden}) and inner ({inner}) divisible by the group "
                    f"size {group_size}"
                )
        else:
            group_size = 0  # NOTE: like the native layer, ignored for the other formats
        if not plan:
            raise ValueError("the shard plan is empty: a layer has at least one shard")
        keys = ("inner_begin", "inner_end", "hidden_begin", "hidden_end", "arena_bytes",
                "stride", "up_off", "down_off")  # fmt: skip
        up_block = packed_block_bytes(fmt, hidden, group_size)  # gate/up rows: H columns
        down_block = packed_block_bytes(fmt, inner, group_size)  # down rows: I columns
        gate, up, down = [], [], []
        offsets, sizes = [], []
        i_end = h_end = offset = 0
        for n, shard in enumerate(plan):
            missing = [k for k in keys if k not in shard]
            if missing:
                raise ValueError(f"shard {n} of the plan lacks {', '.join(missing)}")
            i0, i1, h0, h1 = (shard[k] for k in keys[:4])
            size, stride, up_off, down_off = (shard[k] for k in keys[4:])
            if i0 != i_end or i1 < i0 or h0 != h_end or h1 < h0:
                raise ValueError(
                    f"shard {n} covers inner [{i0}, {i1}) and hidden [{h0}, {h1}); the shards "
                    f"must cover [0, {inner}) and [0, {hidden}) in order, this one starting at "
                    f"inner {i_end} and hidden {h_end}"
                )
            i_end, h_end = i1, h1
            rows_i, rows_h = i1 - i0, h1 - h0
            gate_bytes = -(-rows_i // _ROW_BLOCK) * up_block
            down_bytes = -(-rows_h // _ROW_BLOCK) * down_block
            if (
                stride % 64 or up_off % 64 or down_off % 64
                or up_off < gate_bytes or down_off < up_off + gate_bytes
                or stride < down_off + down_bytes or size != stride * num_experts
            ):  # fmt: skip
                raise ValueError(
                    f"shard {n} does not hold {fmt} experts of {rows_i} gate/up rows of "
                    f"{hidden} and {rows_h} down rows of {inner}: stride {stride}, up_off "
                    f"{up_off}, down_off {down_off}, arena_bytes {size} for {num_experts} "
                    f"experts (need {gate_bytes} gate/up and {down_bytes} down bytes per expert, "
                    "64-byte aligned offsets); wrong format or group size?"
                )
            r = torch.arange(rows_i, dtype=torch.int64)
            base = offset + r // _ROW_BLOCK * up_block
            lane, estride = r % _ROW_BLOCK, torch.full_like(r, stride)
            gate.append(torch.stack([base, lane, estride]))
            up.append(torch.stack([base + up_off, lane, estride]))
            r = torch.arange(rows_h, dtype=torch.int64)
            base = offset + down_off + r // _ROW_BLOCK * down_block
            down.append(torch.stack([base, r % _ROW_BLOCK, torch.full_like(r, stride)]))
            offsets.append(offset)
            sizes.append(size)
            offset += size
        if i_end != inner or h_end != hidden:
            raise ValueError(
                f"the shards cover inner [0, {i_end}) and hidden [0, {h_end}), not [0, {inner}) "
                f"and [0, {hidden})"
            )
        gate_t, up_t, down_t = (torch.cat(t, dim=1) for t in (gate, up, down))
        aligned = all(_aligned_rows(t) for t in (gate_t, up_t, down_t))
        return cls(
            fmt, group_size, num_experts, hidden, inner, offset, tuple(offsets), tuple(sizes),
            gate_t, up_t, down_t, aligned,
        )  # fmt: skip


def _aligned_rows(table: Tensor) -> bool:
    """Whether every run of 16 rows from a multiple of 16 is lanes 0..15 of one block, at a
    64-byte aligned base (what the kernels' contiguity hints promise)."""
    n = table.shape[1]
    if n % _ROW_BLOCK:
        return False
    runs = table.view(3, n // _ROW_BLOCK, _ROW_BLOCK)
    lanes_ok = bool((runs[1] == torch.arange(_ROW_BLOCK)).all())
    same = bool((runs[0] == runs[0, :, :1]).all() and (runs[2] == runs[2, :, :1]).all())
    return lanes_ok and same and bool((table[0] % 64 == 0).all() and (table[2] % 64 == 0).all())


# ---------------------------------------------------------------------------------------------
# The grouped GEMM over packed weights.


@triton.jit
def _row_columns(
    tab_ptr, offs_wn, expert,
    N: tl.constexpr, LANE_SHIFT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N] element index (in the load dtype) of each weight row's column 0 for `expert`,
    and its block's byte offset."""
    base = tl.load(tab_ptr + offs_wn)
    lane = tl.load(tab_ptr + N + offs_wn)
    estride = tl.load(tab_ptr + 2 * N + offs_wn)
    blk = base + expert * estride  # [BLOCK_N] int64
    col = (blk >> LANE_SHIFT) + lane  # a lane's step is one element of the load dtype
    if ALIGNED:
        # NOTE: the table is data, so Triton cannot see that 16 consecutive rows are one block's
        # 16 consecutive lanes (64-byte aligned, so the run starts at a multiple of 16 elements).
        # PackedGeometry.aligned checked exactly that, and BLOCK_N is a multiple of 16: the hints
        # turn the weight loads into 16-byte vector loads (and cp.async in the pipeline).
        col = tl.max_contiguous(tl.multiple_of(col, 16), 16)
    return col, blk


@triton.jit
def _int4_values(word, SHIFT: tl.constexpr, dtype: tl.constexpr):
    """The q = nibble - 8 at bit SHIFT of each 32-bit word, exact in `dtype`.

    NOTE: the nibble goes straight into the mantissa of a float whose ulp is 1 (2^23, 1024 or
    128 plus the nibble) and one subtraction takes that and the 8 away: integer and/or plus one
    float op (bf16x2/f16x2 pairs on the GPU), where int -> float conversions run at quarter rate.
    """
    nib = (word >> SHIFT) & 15
    if dtype == tl.bfloat16:
        return (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
    elif dtype == tl.float16:
        return (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    else:
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _fp8_values(byte, dtype: tl.constexpr):
    """e4m3fn bytes (int8) -> value * 2^-8, exact in `dtype`: the sign-extended byte shifted
    left 7 and masked is that value's IEEE half (pack.cpp's "FP8 decoding"), integer ops only."""
    bits = ((byte.to(tl.int16) << 7) & -16512).to(tl.int16)  # -16512 = 0xBF80 as an int16
    half = bits.to(tl.float16, bitcast=True)
    if dtype == tl.float16:
        return half
    return half.to(dtype)


@triton.jit
def _group_line(k, GS: tl.constexpr, FMT: tl.constexpr):
    """Grouped formats: the offset (in load-dtype elements from a row's column 0) of the 16-lane
    line holding column k (int4/int4z: its word of 8 columns), and of its group's scale line."""
    if FMT == "fp8":
        group = k // GS * (16 * GS + 64)  # bytes
        return group + k % GS * 16, group + 16 * GS
    else:
        group = k // GS * ((GS // 8 + (2 if FMT == "int4z" else 1)) * 16)  # 32-bit words
        return group + k % GS // 8 * 16, group + GS // 8 * 16


@triton.jit
def _weight_tile(
    w_ptr, col, k0, K, dtype: tl.constexpr,
    FMT: tl.constexpr, GS: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """[BLOCK_K, BLOCK_N] weights W[n][k0 + i] in `dtype` (int8/int4/int4z: the integer q,
    fp8: value * 2^-8, exact).

    NOTE: bf16 and int4 load each 32-bit word once, as a [BLOCK_K / 2 or / 8, BLOCK_N] tile (16
    lanes = 64 contiguous bytes along N), and unpack it in registers: tl.join stacks the 2 (8)
    columns a word holds on a new last axis, and permute + reshape put them back in k order.
    Compiled for sm_90 this keeps one copy of the packed bytes in shared memory per stage and
    stores the unpacked operand with 64/128-bit stores, where loading a word per (k, n) (the
    classic Triton GPTQ kernels' duplicated addresses) moved 2x (bf16) / 8x (int4) the bytes
    from L2, took that much more shared memory and ~1.2-1.7x the instructions per k-step.
    """
    if FMT == "bf16":
        kw = k0 + tl.arange(0, BLOCK_K // 2) * 2  # the first of each word's two columns
        line = kw // 2 * 16  # 64-byte lines of column pairs
    elif FMT == "int4" or FMT == "int4z":
        kw = k0 + tl.arange(0, BLOCK_K // 8) * 8  # the first of each word's eight columns
        line, _ = _group_line(kw, GS, FMT)  # groups of gs/8 + 1 (int4z: + 2) lines
    elif FMT == "fp8":
        kw = k0 + tl.arange(0, BLOCK_K)
        line, _ = _group_line(kw, GS, FMT)  # groups of gs 16-byte lines and a scale line
    else:
        kw = k0 + tl.arange(0, BLOCK_K)
        line = kw * 16  # f32 64-byte, f16 32-byte, int8 16-byte lines
    ptrs = w_ptr + col[None, :] + line[:, None]
    # Packed rows are zero past C: the mask only keeps a ragged last step inside the block.
    w = tl.load(ptrs, mask=(kw < K)[:, None], other=0) if MASKED else tl.load(ptrs)
    if FMT == "bf16":  # the even column in the low half
        if dtype == tl.bfloat16:
            lo = w.to(tl.int16).to(tl.bfloat16, bitcast=True)
            hi = (w >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:  # the bf16 bits as the top half of a float32 (exact), then to dtype
            lo = (w << 16).to(tl.float32, bitcast=True).to(dtype)
            hi = (w & -65536).to(tl.float32, bitcast=True).to(dtype)
        pairs = tl.permute(tl.join(lo, hi), (0, 2, 1))  # [BLOCK_K / 2, 2, BLOCK_N]
        return tl.reshape(pairs, [BLOCK_K, BLOCK_N])
    elif FMT == "int4" or FMT == "int4z":
        # Column m of a word (m = 4a + 2b + c) sits at bit 4 (m // 2) + 16 (m % 2); the joins
        # put c, then b, then a on new last axes.
        q = tl.join(
            tl.join(
                tl.join(_int4_values(w, 0, dtype), _int4_values(w, 16, dtype)),
                tl.join(_int4_values(w, 4, dtype), _int4_values(w, 20, dtype)),
            ),
            tl.join(
                tl.join(_int4_values(w, 8, dtype), _int4_values(w, 24, dtype)),
                tl.join(_int4_values(w, 12, dtype), _int4_values(w, 28, dtype)),
            ),
        )  # [BLOCK_K / 8, BLOCK_N, c, b, a]
        q = tl.permute(q, (0, 4, 3, 2, 1))  # [BLOCK_K / 8, a, b, c, BLOCK_N]
        return tl.reshape(q, [BLOCK_K, BLOCK_N])
    elif FMT == "fp8":
        return _fp8_values(w, dtype)
    else:
        return w.to(dtype)  # f32/f16 weights round to the activations' dtype; int8 q is exact


@triton.jit
def _packed_gemm_kernel(
    a_ptr, w_ptr, s_ptr, tab_ptr, tab_up_ptr, c_ptr, topk_weights_ptr,
    sorted_ptr, expert_ids_ptr, num_post_ptr,
    num_slots, em, stride_at, stride_cs,
    N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, FMT: tl.constexpr, GS: tl.constexpr,
    LANE_SHIFT: tl.constexpr, GATED: tl.constexpr, A_DIV: tl.constexpr,
    PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of one expert's GEMM over gathered rows, weights packed.

    GATED (gate+up): a = hidden [T, H] read at row slot // K (A_DIV = K), tab / tab_up the gate
    and up tables with N = I, K = H: c[slot, n] = silu(a @ gate[e, n]) * (a @ up[e, n]) ->
    act [S, I]. Not GATED (down): a = act [S, I] read at row slot, tab the down table with
    N = H, K = I: c[slot, n] = topk_weights[slot] * (a @ down[e, n]) -> [S, H].
    w_ptr is the buffer viewed as the load dtype, s_ptr as float32 (scales and offsets).
    """
    pid_m, pid_n = tile_of(em, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return  # a padding block past the last expert's group
    slot, row_ok, a_row, expert = tile_rows(
        sorted_ptr, expert_ids_ptr, pid_m, num_slots, A_DIV, BLOCK_M
    )
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % N  # wrapped columns load real weights; their outputs are masked
    offs_k = tl.arange(0, BLOCK_K)
    col, blk = _row_columns(tab_ptr, offs_wn, expert, N, LANE_SHIFT, ALIGNED)
    if GATED:
        col_up, blk_up = _row_columns(tab_up_ptr, offs_wn, expert, N, LANE_SHIFT, ALIGNED)
    a_ptrs = a_ptr + a_row[:, None] * stride_at + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # NOTE: the grouped formats keep BLOCK_K dividing gs (the launcher caps it), so a k-step lies
    # in one group and K % BLOCK_K == 0: dot(a, q) on exact integers (fp8: exact v * 2^-8), then
    # times the (row, group) scale in float32; int4z adds m * (the step's sum of a). Packed rows
    # are zero past C, but a ragged last step can still reach past the block (or the buffer), so
    # it is masked like fused_moe's.
    MASKED: tl.constexpr = K % BLOCK_K != 0
    GROUPED: tl.constexpr = FMT == "int4" or FMT == "int4z" or FMT == "fp8"
    if GROUPED:
        # Scale lines are addressed in f32 units: int4 columns are already 32-bit words, fp8
        # columns bytes (the block's base / 4 plus the lane).
        if FMT == "fp8":
            s_col = (blk >> 2) + (col - blk)
            if GATED:
                s_col_up = (blk_up >> 2) + (col_up - blk_up)
        else:
            s_col = col
            if GATED:
                s_col_up = col_up
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k0 = k * BLOCK_K
        if MASKED:
            a = tl.load(a_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs)
        w = _weight_tile(w_ptr, col, k0, K, a.dtype, FMT, GS, MASKED, BLOCK_K, BLOCK_N)
        if GATED:
            w_up = _weight_tile(w_ptr, col_up, k0, K, a.dtype, FMT, GS, MASKED, BLOCK_K, BLOCK_N)
        if GROUPED:
            _, s_off = _group_line(k0, GS, FMT)  # the group's scale line
            if FMT == "fp8":
                s_off = s_off >> 2  # bytes -> f32 units (16 gs + 64 per group: a multiple of 4)
            acc += tl.dot(a, w, input_precision=PRECISION) * tl.load(s_ptr + s_col + s_off)[None, :]
            if GATED:
                part = tl.dot(a, w_up, input_precision=PRECISION)
                acc_up += part * tl.load(s_ptr + s_col_up + s_off)[None, :]
            if FMT == "int4z":  # + m * sum(a) over the step's columns (all in this group)
                a_sum = tl.sum(a.to(tl.float32), axis=1)[:, None]  # [BLOCK_M, 1]
                acc += a_sum * tl.load(s_ptr + s_col + s_off + 16)[None, :]
                if GATED:
                    acc_up += a_sum * tl.load(s_ptr + s_col_up + s_off + 16)[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if GATED:
                acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
    if FMT == "int8":  # one scale per row: on the exact integer dot's result
        lane = col - blk  # int8: one byte per lane
        acc *= tl.load(s_ptr + ((blk + 16 * KP) >> 2) + lane)[None, :]
        if GATED:
            acc_up *= tl.load(s_ptr + ((blk_up + 16 * KP) >> 2) + (col_up - blk_up))[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up in float32
    else:
        acc = acc * tl.load(topk_weights_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slot.to(tl.int64)[:, None] * stride_cs + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


# Shared-memory bytes per weight of a tile as loaded: the packed bytes (bf16 pairs and int4
# words hold 2 and 8 weights), scales aside.
_TILE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1, "int4": 0.5, "int4z": 0.5, "fp8": 1}


def _fit_smem_packed(cfg: GemmConfig, block_m: int, gated: bool, a: Tensor, fmt: str) -> GemmConfig:
    """triton_kernels._fit_smem for packed tiles: block_k, then num_stages, cut until the
    pipelined tiles fit. NOTE: (num_stages - 1) copies of the loaded tiles plus the activation
    tile and the unpacked weight operand(s) in the activations' dtype: what Triton 3.6 allocated
    (sm_90, every format, block_m 16..128) when compiled offline, exact for wgmma tiles and an
    over-estimate otherwise."""
    if a.device.type != "cuda":
        return cfg
    limit = _smem_limit(a.device.index if a.device.index is not None else 0)
    w_tiles = 2 if gated else 1

    def need(c: GemmConfig) -> int:
        a_tile = block_m * c.block_k * a.element_size()
        w_elems = w_tiles * c.block_k * c.block_n
        stage = a_tile + w_elems * _TILE_BYTES[fmt]
        return int((c.num_stages - 1) * stage + a_tile + w_elems * a.element_size())

    return shrink_to_fit(cfg, need, limit)


def _launch_packed_gemm(
    a: Tensor,
    buf: Tensor,
    geom: PackedGeometry,
    c: Tensor,
    topk_weights: Tensor,
    align: tuple[Tensor, Tensor, Tensor],
    num_slots: int,
    gated: bool,
    top_k: int,
    block_m: int,
    cfg: GemmConfig,
) -> None:
    sorted_ids, expert_ids, num_post = align
    fmt = geom.fmt
    if fmt in GROUPED:  # a k-step within one group (block_k and gs are powers of two)
        cfg = replace(cfg, block_k=min(cfg.block_k, geom.group_size))
    cfg = _fit_smem_packed(cfg, block_m, gated, a, fmt)
    n, k = (geom.inner, geom.hidden) if gated else (geom.hidden, geom.inner)
    em = sorted_ids.numel()
    buf = buf[: geom.nbytes]  # a multiple of 64 bytes: viewable as any of the load dtypes
    w = buf.view(_LOAD_DTYPE[fmt])
    s = buf.view(torch.float32) if fmt in ("int8", *GROUPED) else w
    tab, tab_up = (geom.gate, geom.up) if gated else (geom.down, geom.down)
    grid = (em // block_m * triton.cdiv(n, cfg.block_n),)
    _packed_gemm_kernel[grid](
        a, w, s, tab, tab_up, c, topk_weights, sorted_ids, expert_ids, num_post,
        num_slots, em, a.stride(0), c.stride(0),
        N=n, K=k, KP=-(-k // _COL_PAD) * _COL_PAD, FMT=fmt, GS=max(geom.group_size, 8),
        LANE_SHIFT=w.element_size().bit_length() - 1, GATED=gated, A_DIV=top_k if gated else 1,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        ALIGNED=geom.aligned and cfg.block_n % _ROW_BLOCK == 0,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _check_inputs(
    hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor, buf: Tensor, geom: PackedGeometry
) -> None:
    if hidden.dim() != 2 or hidden.shape[1] != geom.hidden:
        raise ValueError(
            f"fused_moe_packed: hidden must be [T, {geom.hidden}] (the layer's hidden size), got "
            f"{list(hidden.shape)}"
        )
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fused_moe_packed: hidden must be float32/16 or bf16, got {hidden.dtype}")
    t = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"fused_moe_packed: topk_ids and topk_weights must both be [T={t}, K], got "
            f"{list(topk_ids.shape)} and {list(topk_weights.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe_packed: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(
            f"fused_moe_packed: topk_weights must be floating point, got {topk_weights.dtype}"
        )
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(
            f"fused_moe_packed: buf must be a contiguous 1-D uint8 tensor, got {buf.dtype} "
            f"{list(buf.shape)}"
        )
    if buf.numel() < geom.nbytes:
        raise ValueError(
            f"fused_moe_packed: buf holds {buf.numel()} bytes, the layer's packed experts need "
            f"{geom.nbytes}"
        )
    devices = {
        "hidden": hidden.device, "topk_weights": topk_weights.device,
        "topk_ids": topk_ids.device, "buf": buf.device, "geom's tables": geom.device,
    }  # fmt: skip
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"fused_moe_packed needs everything on one device, got {where}")
    if buf.data_ptr() % 16:
        raise ValueError("fused_moe_packed: buf must start at a 16-byte aligned address")


def fused_moe_packed(
    hidden: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    buf: Tensor,
    geom: PackedGeometry,
    config: MoEConfig | None = None,
) -> Tensor:
    """hidden [T, H], topk_weights [T, K], topk_ids [T, K] int, buf: the layer's packed bytes
    (uint8, >= geom.nbytes, laid out as geom says, tables on the same device) -> [T, H] in
    hidden's dtype: sum_k w_k * down(silu(gate(x)) * up(x)), fused_moe's math and roundings.

    Weights are converted to hidden's dtype in the kernel (int8/int4/int4z as exact integers,
    fp8 as exact value * 2^-8, the scales (and int4z's offsets) applied in float32); ids must be
    in [0, E) (not checked: no host sync).
    """
    _check_inputs(hidden, topk_weights, topk_ids, buf, geom)
    t, h = hidden.shape
    top_k = topk_ids.shape[1]
    num_slots = t * top_k
    if t == 0:
        return hidden.new_empty(0, h)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    cfg = config or get_moe_config(t, top_k, geom.num_experts)
    if t == 1:
        align = _one_token_align(topk_ids, cfg.block_m)
    else:
        align = moe_align_block_size(topk_ids, cfg.block_m, geom.num_experts)
    weights = topk_weights.reshape(-1)  # [S]
    if not weights.is_contiguous():
        weights = weights.contiguous()
    act = torch.empty(num_slots, geom.inner, dtype=hidden.dtype, device=hidden.device)  # [S, I]
    _launch_packed_gemm(
        hidden, buf, geom, act, weights, align, num_slots, True, top_k, cfg.block_m, cfg.up
    )
    out = torch.empty(num_slots, h, dtype=hidden.dtype, device=hidden.device)  # [S, H]
    _launch_packed_gemm(
        act, buf, geom, out, weights, align, num_slots, False, top_k, cfg.block_m, cfg.down
    )
    if top_k == 1:
        return out
    return moe_sum(out.view(t, top_k, h))
