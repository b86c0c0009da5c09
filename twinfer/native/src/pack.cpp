// Packing (and INT8/INT4/INT4Z/FP8 quantization) of weight matrices into the layout the kernels
// stream.
//
// Legend: R rows (outputs), C cols (inputs), Kp = C rounded up to 32, RB = 16, gs = group size of
// the grouped formats (INT4, INT4Z, FP8), G = C / gs. W[r][c] is the source value; q the
// quantized one.
//
// Layout: row blocks of 16 rows, block b (rows 16b..16b+15) is one contiguous region of
// block_bytes at packed + b * block_bytes, so a thread computing rows [r0, r1) streams one
// contiguous range front to back. Rows past R and cols past C are zero. Within a block every
// 64-byte line holds the same few columns of all 16 rows, lane i (i = row - 16b) in the i-th
// 32-bit slot (or 16-bit / 8-bit slot), so one vector load is 16 rows' weights and a kernel
// accumulates 16 rows in the lanes of one register: no horizontal sums, and the same line feeds
// every token (a broadcast of x[t][c] per FMA).
//   F32  : Kp lines of 64 B, line c = W[i][c] f32 for i = 0..15.                block = 64 Kp
//   F16  : Kp lines of 32 B, line c = W[i][c] f16.                              block = 32 Kp
//   BF16 : Kp/2 lines of 64 B, line p = pairs (W[i][2p], W[i][2p+1]) bf16, the even column in
//          the low half. This is the AMX B-tile (VNNI) layout: cols 32j..32j+31 are lines
//          16j..16j+15, one 1 KiB tile; AVX-512 gets both columns as f32 by shift / and.
//                                                                              block = 32 Kp
//   INT8 : Kp lines of 16 B, line c = q[i][c] int8 (one vpmovsxbd away from 16 int32), then
//          16 f32 row scales (64 B).                                            block = 16 Kp + 64
//   INT4 : per group g: gs/8 lines of 64 B, then 16 f32 scales of the group (64 B). Line l holds
//          cols 8l..8l+7 of the group; lane i = 8 nibbles q + 8 of row i: bits 4k..4k+3 = col 2k,
//          bits 16+4k..19+4k = col 2k+1 (k = 0..3). Why this nibble order: (lane >> 4k) leaves
//          col 2k in the lane's low 4 bits (vpermps reads only those: shift + LUT permute = 16
//          f32 weights) and the pair (2k, 2k+1) in the low nibbles of the two 16-bit halves
//          (vpermw LUT = one AMX bf16 pair line).                block = G * (gs/8 + 1) * 64
//   INT4Z: INT4's group plus one line: gs/8 lines of nibbles (as INT4), 16 f32 scales s, then 16
//          f32 offsets m (64 B each); W = q * s + m.                    block = G * (gs/8 + 2) * 64
//   FP8  : per group g: gs lines of 16 B, line c = the e4m3fn byte of W[i][col gs g + c] for
//          i = 0..15, then 16 f32 scales (64 B) holding s * 256 (see "FP8 decoding").
//                                                                        block = G * (16 gs + 64)
// Quantization: INT8 per row scale = absmax / 127, q = round(w / scale) in [-127, 127]; INT4 per
// group scale = absmax / 7, q = round(w / scale) clamped to [-8, 7]; an all-zero row/group has
// scale 0 and q 0. INT4Z per group: s = (max - min) / 15, m = min + 8 s, q + 8 = round((w - min)
// / s) in [0, 15] (a constant group: s = 0, q = 0, m = min). FP8 per group: s = absmax / 448,
// v = w / s rounded to nearest even e4m3fn, saturated to +-448 (all-zero group: s = 0). Scales
// and offsets are f32 (exact: the dequantized w = q * s (+ m) in f32 is what unpack_matrix
// returns, and what the kernels compute with; INT4Z as s * dot(q, x_g) + m * sum(x_g)).
//
// Given scales (pack_matrix's group_scales / group_offsets: a checkpoint's own grid) replace the
// rules above, so its values come back bit for bit:
//   int4 (compressed-tensors symmetric, GPTQ sym): q = round(w / s).
//   int4z (asymmetric int4: compressed-tensors symmetric=false, AutoAWQ, GPTQ asym, GGUF Q4_1 /
//          Q4_K): W = (u - z) * s with u in [0, 15] is q = u - 8 and m = (8 - z) * s (one f32
//          rounding of m: the values are then q * s + m, within an ulp of (u - z) * s); a float
//          min (W = u * s + min) is m = min + 8 s.
//   fp8 (block-FP8: DeepSeek-V3, MiniMax-M2, Qwen3-FP8: float8_e4m3fn [R, C] and
//          weight_scale_inv [ceil(R/128), ceil(C/128)]): the caller gives each row its block's
//          scale per group of 128 (f32 [R, C/128]); the e4m3 bytes are copied as they are.
//
// FP8 decoding (exact, in registers, no LUT, no f32 denormals): for an e4m3fn byte b,
//   h = ((int16)(b << 8) >> 1) & 0xBF80
// are the bits of an IEEE half equal to value(b) * 2^-8, subnormals included: the arithmetic
// shift puts the sign at bit 15 (and a copy at bit 14, which the mask clears), e4m3's 4 exponent
// bits at the half's low 4 exponent bits (bias 7 vs 15: the 2^-8) and its 3 mantissa bits at the
// top of the half's 10. vcvtph2ps (F16C) then gives f32, and the stored scale is s * 256 (exact,
// a power of two) so that (v * 2^-8) * (s * 256) is v * s bit for bit. AVX2/AVX-512 do it as
// vpmovsxbw (16 bytes -> 16 int16 = b sign-extended), vpsllw 7, vpand 0xBF80, vcvtph2ps: the same
// bits as the formula. e4m3fn's NaN bytes 0x7f / 0xff (never in checkpoints; never made by the
// packing, which saturates) decode to +-480 (exponent 15, mantissa 7: 1.875 * 2^8) times s,
// not NaN.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels_impl.h"

namespace twinfer {

namespace {

using detail::kColPad;
using detail::kRowBlock;

uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  const uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// NOTE: software f16 conversions: this file has baseline flags (no F16C), and packing is load-time.
float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return u2f(sign | f2u(static_cast<float>(m) * 5.9604644775390625e-8f));  // m * 2^-24
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t f32_to_f16(float f) {  // round to nearest even
  const uint32_t u = f2u(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (a >= 0x47800000u) return sign | 0x7c00u;  // >= 65536 (and inf): inf
  if (a < 0x38800000u)                          // below 2^-14: subnormal half (exact scaling)
    return sign | static_cast<uint16_t>(std::nearbyint(u2f(a) * 16777216.0f));
  uint32_t h = ((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may round up to inf: right
  return sign | static_cast<uint16_t>(h);
}

// e4m3fn byte -> the half bits of value * 2^-8 (see "FP8 decoding" above).
uint16_t e4m3_half_bits(uint8_t b) {
  return static_cast<uint16_t>(static_cast<int16_t>(static_cast<uint16_t>(b) << 8) >> 1) & 0xBF80u;
}

// f32 -> e4m3fn, round to nearest even, saturated to +-448 (e4m3fn has no inf); NaN -> 0x7f.
uint8_t f32_to_e4m3(float f) {
  const uint32_t u = f2u(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;
  if (a >= 0x43e00000u) return sign | 0x7eu;  // >= 448: 448 (464 and up would round to NaN)
  if (a < 0x3c800000u)  // below 2^-6: multiples of 2^-9, and m = 8 (2^-6) encodes as 0x08 too
    return sign | static_cast<uint8_t>(std::nearbyint(u2f(a) * 512.f));
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);  // round the mantissa to 3 bits
  return sign | static_cast<uint8_t>((((r >> 23) - 120u) << 3) | ((r >> 20) & 7u));
}

// Source element (r, c) as f32 (float sources; FP8 bytes are read raw).
float src_at(const void* src, WFormat dt, size_t stride, int r, int c) {
  const size_t i = static_cast<size_t>(r) * stride + static_cast<size_t>(c);
  switch (dt) {
    case WFormat::F32: return static_cast<const float*>(src)[i];
    case WFormat::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
  }
}

int quantize(float w, float scale, int lo, int hi) {
  const float q = std::nearbyint(w / scale);
  return q < static_cast<float>(lo) ? lo : (q > static_cast<float>(hi) ? hi : static_cast<int>(q));
}

const char* fmt_name(WFormat f) {
  static const char* names[] = {"f32", "bf16", "f16", "int8", "int4", "fp8", "int4z"};
  return names[static_cast<int>(f)];
}

// One group of `gs` columns of one row (lane i of a block) for the grouped formats. `w(c)` is the
// source value at column c of the group, `raw(c)` the source e4m3 byte (FP8 source only);
// `given_s` / `given_m` the caller's scale / offset (null: derive them).
template <class W, class Raw>
void pack_group(WFormat fmt, int gs, uint8_t* grp, size_t scale_off, int i, W w, Raw raw,
                bool fp8_src, const float* given_s, const float* given_m) {
  auto* scales = reinterpret_cast<float*>(grp + scale_off);
  switch (fmt) {
    case WFormat::INT4:
    case WFormat::INT4Z: {
      float s, m = 0.f, lo = 0.f;
      const bool min_max = given_s == nullptr && fmt == WFormat::INT4Z;
      if (given_s != nullptr) {
        s = *given_s;
        if (given_m != nullptr) m = *given_m;
      } else if (fmt == WFormat::INT4) {
        float amax = 0.f;
        for (int c = 0; c < gs; ++c) amax = std::fmax(amax, std::fabs(w(c)));
        s = amax / 7.f;
      } else {
        float hi = w(0);
        lo = w(0);
        for (int c = 1; c < gs; ++c) lo = std::fmin(lo, w(c)), hi = std::fmax(hi, w(c));
        s = (hi - lo) / 15.f;
        m = lo + 8.f * s;
      }
      scales[i] = s;
      if (fmt == WFormat::INT4Z) scales[16 + i] = m;
      auto* lanes = reinterpret_cast<uint32_t*>(grp);
      for (int c = 0; c < gs; ++c) {
        int qs = 0;
        if (s != 0.f)  // min/max: q + 8 = round((w - min) / s); given m: q = round((w - m) / s)
          qs = min_max ? quantize(w(c) - lo, s, 0, 15) - 8 : quantize(w(c) - m, s, -8, 7);
        const uint32_t q = static_cast<uint32_t>(qs + 8);
        const int k = (c % 8) / 2, shift = 4 * k + 16 * (c & 1);
        lanes[(c / 8) * 16 + i] |= q << shift;
      }
      return;
    }
    case WFormat::FP8: {
      float s;
      if (given_s != nullptr) {
        s = *given_s;
      } else {
        float amax = 0.f;
        for (int c = 0; c < gs; ++c) amax = std::fmax(amax, std::fabs(w(c)));
        s = amax / 448.f;
      }
      scales[i] = s * 256.f;  // the decode gives value * 2^-8
      for (int c = 0; c < gs; ++c)
        grp[16 * c + i] = fp8_src ? raw(c) : (s == 0.f ? 0 : f32_to_e4m3(w(c) / s));
      return;
    }
    default: return;
  }
}

}  // namespace

bool is_grouped(WFormat f) {
  return f == WFormat::INT4 || f == WFormat::INT4Z || f == WFormat::FP8;
}

namespace detail {

Geom geom(const PackedLayout& lay) {
  Geom g;
  g.nb = (lay.rows + kRowBlock - 1) / kRowBlock;
  g.kp = (lay.cols + kColPad - 1) / kColPad * kColPad;
  const size_t kp = static_cast<size_t>(g.kp);
  switch (lay.format) {
    case WFormat::F32: g.block_bytes = 64 * kp; break;
    case WFormat::F16:
    case WFormat::BF16: g.block_bytes = 32 * kp; break;
    case WFormat::INT8: g.block_bytes = 16 * kp + 64; break;
    case WFormat::INT4:
    case WFormat::INT4Z:
    case WFormat::FP8: {
      const size_t gs = static_cast<size_t>(lay.group_size);
      g.groups = lay.cols / lay.group_size;
      g.scale_off = lay.format == WFormat::FP8 ? 16 * gs : gs / 8 * 64;
      g.group_bytes = g.scale_off + (lay.format == WFormat::INT4Z ? 128 : 64);
      g.block_bytes = static_cast<size_t>(g.groups) * g.group_bytes;
      break;
    }
  }
  return g;
}

}  // namespace detail

PackedLayout packed_layout(WFormat format, int rows, int cols, int group_size) {
  const int f = static_cast<int>(format);
  if (f < 0 || f > static_cast<int>(WFormat::INT4Z))
    throw std::invalid_argument("unknown weight format " + std::to_string(f));
  if (rows < 0 || cols <= 0 || cols > (1 << 28) || rows > (1 << 28))
    throw std::invalid_argument("bad matrix shape " + std::to_string(rows) + " x " +
                                std::to_string(cols) + ": need rows >= 0 and cols >= 1");
  PackedLayout lay;
  lay.format = format;
  lay.rows = rows;
  lay.cols = cols;
  if (is_grouped(format)) {
    const std::string name = fmt_name(format);
    if (group_size != 32 && group_size != 64 && group_size != 128)
      throw std::invalid_argument(name + " group_size " + std::to_string(group_size) +
                                  " is not supported; use 32, 64 or 128");
    if (cols % group_size != 0)
      throw std::invalid_argument(name + " needs cols divisible by group_size, got cols " +
                                  std::to_string(cols) + " and group_size " +
                                  std::to_string(group_size) + "; pick a group size dividing " +
                                  std::to_string(cols));
    lay.group_size = group_size;
  }
  // NOTE: group_size is ignored (kept 0) for the other formats: callers pass one setting for all.
  lay.bytes = static_cast<size_t>(detail::geom(lay).nb) * detail::geom(lay).block_bytes;
  return lay;
}

void pack_matrix(const PackedLayout& lay, const void* src, WFormat src_dtype,
                 size_t src_row_stride, void* dst, const float* group_scales,
                 const float* group_offsets) {
  const bool fp8_src = src_dtype == WFormat::FP8;
  if (src_dtype != WFormat::F32 && src_dtype != WFormat::BF16 && src_dtype != WFormat::F16 &&
      !fp8_src)
    throw std::invalid_argument(std::string("pack_matrix: source dtype must be f32, bf16, f16 "
                                            "or fp8, got ") + fmt_name(src_dtype));
  const std::string fmt = fmt_name(lay.format);
  if (fp8_src && lay.format != WFormat::FP8)
    throw std::invalid_argument("pack_matrix: fp8 source bytes pack only into the fp8 format, "
                                "not " + fmt + "; pass float weights to quantize to " + fmt);
  if (fp8_src && group_scales == nullptr)
    throw std::invalid_argument(
        "pack_matrix: fp8 source bytes need their scales (group_scales: f32 [rows, cols / " +
        std::to_string(lay.group_size) + "], a block-FP8 checkpoint's weight_scale_inv expanded "
        "to each row and group)");
  if (group_scales != nullptr && !is_grouped(lay.format))
    throw std::invalid_argument("pack_matrix: group scales are for int4, int4z and fp8, not " +
                                fmt);
  if (group_offsets != nullptr && (lay.format != WFormat::INT4Z || group_scales == nullptr))
    throw std::invalid_argument("pack_matrix: group offsets are for int4z, with group scales "
                                "(got format " + fmt + (group_scales ? ")" : ", no scales)"));
  const detail::Geom g = detail::geom(lay);
  auto* out = static_cast<uint8_t*>(dst);
  std::memset(out, 0, lay.bytes);  // padding rows/cols are zero (and scale 0)
  const int R = lay.rows, C = lay.cols;
  for (int b = 0; b < g.nb; ++b) {
    uint8_t* blk = out + static_cast<size_t>(b) * g.block_bytes;
    const int nr = (R - b * kRowBlock) < kRowBlock ? R - b * kRowBlock : kRowBlock;
    auto w = [&](int i, int c) {
      return src_at(src, src_dtype, src_row_stride, b * kRowBlock + i, c);
    };
    switch (lay.format) {
      case WFormat::F32: {
        auto* p = reinterpret_cast<float*>(blk);
        for (int c = 0; c < C; ++c)
          for (int i = 0; i < nr; ++i) p[c * 16 + i] = w(i, c);
        break;
      }
      case WFormat::F16: {
        auto* p = reinterpret_cast<uint16_t*>(blk);
        for (int c = 0; c < C; ++c)
          for (int i = 0; i < nr; ++i) p[c * 16 + i] = f32_to_f16(w(i, c));
        break;
      }
      case WFormat::BF16: {
        auto* p = reinterpret_cast<uint16_t*>(blk);
        for (int c = 0; c < C; ++c)
          for (int i = 0; i < nr; ++i) p[(c / 2) * 32 + 2 * i + (c & 1)] = f32_to_bf16(w(i, c));
        break;
      }
      case WFormat::INT8: {
        auto* p = reinterpret_cast<int8_t*>(blk);
        auto* scales = reinterpret_cast<float*>(blk + 16 * static_cast<size_t>(g.kp));
        for (int i = 0; i < nr; ++i) {
          float amax = 0.f;
          for (int c = 0; c < C; ++c) amax = std::fmax(amax, std::fabs(w(i, c)));
          const float scale = amax / 127.f;
          scales[i] = scale;
          if (scale == 0.f) continue;
          for (int c = 0; c < C; ++c)
            p[c * 16 + i] = static_cast<int8_t>(quantize(w(i, c), scale, -127, 127));
        }
        break;
      }
      case WFormat::INT4:
      case WFormat::INT4Z:
      case WFormat::FP8: {
        const int gs = lay.group_size;
        for (int gi = 0; gi < g.groups; ++gi) {
          uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
          for (int i = 0; i < nr; ++i) {
            const int r = b * kRowBlock + i, c0 = gi * gs;
            const size_t at = static_cast<size_t>(r) * g.groups + gi;  // [R, G] scales / offsets
            auto wv = [&](int c) { return fp8_src ? 0.f : w(i, c0 + c); };
            auto raw = [&](int c) {
              return static_cast<const uint8_t*>(src)[size_t(r) * src_row_stride + c0 + c];
            };
            pack_group(lay.format, gs, grp, g.scale_off, i, wv, raw, fp8_src,
                       group_scales ? group_scales + at : nullptr,
                       group_offsets ? group_offsets + at : nullptr);
          }
          // NOTE: padded rows keep zero bytes: INT4/INT4Z nibbles 0 (q = -8) with scale 0 and
          // m 0, FP8 byte 0 (+0) with scale 0: value 0.
        }
        break;
      }
    }
  }
}

void unpack_matrix(const PackedLayout& lay, const void* packed, float* out) {
  const detail::Geom g = detail::geom(lay);
  const auto* in = static_cast<const uint8_t*>(packed);
  for (int r = 0; r < lay.rows; ++r) {
    const uint8_t* blk = in + static_cast<size_t>(r / kRowBlock) * g.block_bytes;
    const int i = r % kRowBlock;
    float* o = out + static_cast<size_t>(r) * lay.cols;
    for (int c = 0; c < lay.cols; ++c) {
      switch (lay.format) {
        case WFormat::F32: o[c] = reinterpret_cast<const float*>(blk)[c * 16 + i]; break;
        case WFormat::F16:
          o[c] = f16_to_f32(reinterpret_cast<const uint16_t*>(blk)[c * 16 + i]);
          break;
        case WFormat::BF16:
          o[c] = bf16_to_f32(
              reinterpret_cast<const uint16_t*>(blk)[(c / 2) * 32 + 2 * i + (c & 1)]);
          break;
        case WFormat::INT8: {
          const float s = reinterpret_cast<const float*>(blk + 16 * static_cast<size_t>(g.kp))[i];
          o[c] = static_cast<float>(reinterpret_cast<const int8_t*>(blk)[c * 16 + i]) * s;
          break;
        }
        case WFormat::INT4:
        case WFormat::INT4Z: {
          const int gs = lay.group_size, gi = c / gs, cc = c % gs;
          const uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
          const uint32_t lane = reinterpret_cast<const uint32_t*>(grp)[(cc / 8) * 16 + i];
          const int shift = 4 * ((cc % 8) / 2) + 16 * (cc & 1);
          const int q = static_cast<int>((lane >> shift) & 0xfu) - 8;
          const float* sc = reinterpret_cast<const float*>(grp + g.scale_off);
          o[c] = static_cast<float>(q) * sc[i];
          if (lay.format == WFormat::INT4Z) o[c] += sc[16 + i];  // q * s + m, two roundings
          break;
        }
        case WFormat::FP8: {
          const int gs = lay.group_size, gi = c / gs, cc = c % gs;
          const uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
          const float s = reinterpret_cast<const float*>(grp + g.scale_off)[i];
          o[c] = f16_to_f32(e4m3_half_bits(grp[16 * cc + i])) * s;  // = value * (s / 256)
          break;
        }
      }
    }
  }
}

}  // namespace twinfer
