// matmul_rows: the dispatch to the per-ISA kernels, and the scalar reference kernel.
//
// Legend: R rows, C cols, n tokens, RB = 16 rows per packed block (layout: pack.cpp),
// y[t * ldy + (r - r0)] = dot(W[r, :], x_t) for r in [r0, r1), t in [0, n).
//
// NOTE: compiled with baseline flags: no intrinsics here, so this file (and the scalar path) runs
// on any x86-64. The scalar kernel sums each row in column order (per group for the grouped
// formats, then times the scale; INT4Z adds m * sum(x_g)), independent of [r0, r1) like every
// kernel. FP8 decodes in software with the same f16 trick as the SIMD kernels (pack.cpp).
#include <cstdlib>
#include <vector>

#include "kernels_impl.h"

namespace twinfer {

namespace {

using detail::kRowBlock;

float bf16_bits_to_f32(uint32_t h) {
  const uint32_t u = h << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

float f16_bits_to_f32(uint32_t h) {  // same as pack.cpp's, kept local (baseline file)
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    __builtin_memcpy(&u, &v, 4);
    u |= sign;
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// e4m3fn byte -> f32 value * 2^-8 (pack.cpp's "FP8 decoding").
float e4m3_scaled(uint8_t b) {
  return f16_bits_to_f32(
      static_cast<uint16_t>(static_cast<int16_t>(static_cast<uint16_t>(b) << 8) >> 1) & 0xBF80u);
}

// One row's dot product with one token, read straight from the packed block. `xsum`: the token's
// per-group sums of x (INT4Z only).
float dot_row(const PackedLayout& lay, const detail::Geom& g, const uint8_t* blk, int i,
              const float* x, const float* xsum) {
  const int C = lay.cols;
  float acc = 0.f;
  switch (lay.format) {
    case WFormat::F32: {
      const auto* p = reinterpret_cast<const float*>(blk);
      for (int c = 0; c < C; ++c) acc += p[c * 16 + i] * x[c];
      return acc;
    }
    case WFormat::F16: {
      const auto* p = reinterpret_cast<const uint16_t*>(blk);
      for (int c = 0; c < C; ++c) acc += f16_bits_to_f32(p[c * 16 + i]) * x[c];
      return acc;
    }
    case WFormat::BF16: {
      const auto* p = reinterpret_cast<const uint16_t*>(blk);
      for (int c = 0; c < C; ++c) acc += bf16_bits_to_f32(p[(c / 2) * 32 + 2 * i + (c & 1)]) * x[c];
      return acc;
    }
    case WFormat::INT8: {
      const auto* p = reinterpret_cast<const int8_t*>(blk);
      for (int c = 0; c < C; ++c) acc += static_cast<float>(p[c * 16 + i]) * x[c];
      return acc * reinterpret_cast<const float*>(blk + 16 * static_cast<size_t>(g.kp))[i];
    }
    case WFormat::INT4:
    case WFormat::INT4Z: {
      const int gs = lay.group_size;
      for (int gi = 0; gi < g.groups; ++gi) {
        const uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
        const auto* lanes = reinterpret_cast<const uint32_t*>(grp);
        const float* xg = x + gi * gs;
        float ga = 0.f;
        for (int c = 0; c < gs; ++c) {
          const uint32_t lane = lanes[(c / 8) * 16 + i];
          const int q = static_cast<int>((lane >> (4 * ((c % 8) / 2) + 16 * (c & 1))) & 0xfu) - 8;
          ga += static_cast<float>(q) * xg[c];
        }
        const float* sc = reinterpret_cast<const float*>(grp + g.scale_off);
        acc += ga * sc[i];
        if (lay.format == WFormat::INT4Z) acc += xsum[gi] * sc[16 + i];
      }
      return acc;
    }
    case WFormat::FP8: {
      const int gs = lay.group_size;
      for (int gi = 0; gi < g.groups; ++gi) {
        const uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
        const float* xg = x + gi * gs;
        float ga = 0.f;
        for (int c = 0; c < gs; ++c) ga += e4m3_scaled(grp[16 * c + i]) * xg[c];
        acc += ga * reinterpret_cast<const float*>(grp + g.scale_off)[i];
      }
      return acc;
    }
  }
  return 0.f;
}

}  // namespace

namespace detail {

// NOTE: the L2 streamer alone leaves DRAM idle while the FMAs of a line run; 2 KiB ahead kept
// enough misses in flight on the dev machine. Read once: the hot loops load a constant.
static int prefetch_from_env() {
  const char* v = std::getenv("TWINFER_PREFETCH_BYTES");
  const int n = v ? std::atoi(v) : 0;
  return n > 0 && n <= (1 << 16) ? (n + 63) / 64 * 64 : 2048;
}
const int g_prefetch_bytes = prefetch_from_env();

void matmul_scalar(const PackedLayout& lay, const void* packed, int r0, int r1,
                   const Activations& x, float* y, int ldy) {
  const Geom g = geom(lay);
  const auto* base = static_cast<const uint8_t*>(packed);
  std::vector<float> xsum;  // INT4Z: [n, G] sums of x per group, once per call
  if (lay.format == WFormat::INT4Z) {
    xsum.assign(static_cast<size_t>(x.n) * g.groups, 0.f);
    for (int t = 0; t < x.n; ++t)
      for (int c = 0; c < lay.cols; ++c)
        xsum[size_t(t) * g.groups + c / lay.group_size] += x.f32[size_t(t) * x.ld + c];
  }
  for (int r = r0; r < r1; ++r) {
    const uint8_t* blk = base + static_cast<size_t>(r / kRowBlock) * g.block_bytes;
    for (int t = 0; t < x.n; ++t)
      y[static_cast<size_t>(t) * ldy + (r - r0)] =
          dot_row(lay, g, blk, r % kRowBlock, x.f32 + static_cast<size_t>(t) * x.ld,
                  xsum.empty() ? nullptr : xsum.data() + static_cast<size_t>(t) * g.groups);
  }
}

}  // namespace detail

void matmul_rows(Isa isa, const PackedLayout& lay, const void* packed, int r0, int r1,
                 const Activations& x, float* y, int ldy) {
  if (r1 <= r0 || x.n <= 0) return;
  // NOTE: avx512 and avx512_bf16 share one kernel: its f32 FMAs on exactly widened weights are as
  // fast as vdpbf16ps with the hi/lo activation split that the 1e-3 accuracy needs. amx adds tile
  // kernels for BF16/INT8/INT4 from a few tokens up and falls back to the AVX-512 one otherwise
  // (always for F32/F16/FP8/INT4Z).
  switch (isa) {
    case Isa::Amx:
      if (detail::matmul_amx(lay, packed, r0, r1, x, y, ldy)) return;
      [[fallthrough]];
    case Isa::Avx512Bf16:
    case Isa::Avx512: detail::matmul_avx512(lay, packed, r0, r1, x, y, ldy); return;
    case Isa::Avx2: detail::matmul_avx2(lay, packed, r0, r1, x, y, ldy); return;
    case Isa::Scalar: break;
  }
  detail::matmul_scalar(lay, packed, r0, r1, x, y, ldy);
}

}  // namespace twinfer
