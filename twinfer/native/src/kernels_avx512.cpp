// AVX-512 kernels (levels avx512 and avx512_bf16): f32 FMAs on exactly widened weights.
//
// Legend: R rows, C cols, n tokens, RB = 16 rows per packed block = the 16 f32 lanes of a zmm,
// TB tokens per pass over a block (<= 8), NA independent accumulators per token (latency hiding).
//
// For each row block (one contiguous stream, see pack.cpp) and each pass of TB tokens, a "step"
// loads one or two 64-byte lines, widens them into C vectors w[j] = W[16b..16b+15][c0 + j] as f32,
// and does TB x C FMAs acc[t] += w[j] * broadcast(x[t][c0 + j]). One decoded line feeds every token
// of the pass, so at TB = 8 a bf16 line costs 2 widening ops and 16 FMAs, and at n = 1 the loop
// is far below the DRAM time per line (it is bandwidth-bound; 4 accumulators break the FMA chain).
// Each row lives in one lane throughout, and the lane's arithmetic does not depend on [r0, r1):
// the row split never changes a bit.
// FP8: a 16-byte line (16 rows) is vpmovsxbw (ymm), vpsllw 7, vpand, vcvtph2ps (zmm) -> 16 f32 =
// value * 2^-8 (pack.cpp's "FP8 decoding"); the scale line holds s * 256. INT4Z: INT4's group dot
// times s, plus m * sum(x_g) (the sums once per call, per token and group).
//
// NOTE: compiled with -mavx512f/bw/vl/dq/bf16/vnni; only F/BW/VL/DQ instructions are used by hand,
// so the avx512 level (no BF16/VNNI) can run it. No std:: templates here (see kernels_impl.h).
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined (GCC PR105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdlib>

#include "kernels_impl.h"

namespace twinfer::detail {

namespace {

constexpr int kMaxTB = 8;
#define TW_INLINE inline __attribute__((always_inline))

// Decoders: step s of a region -> C column vectors for cols s*C .. s*C+C-1 of that region.
struct DecF32 {
  static constexpr int C = 4;
  static constexpr int kStepBytes = 256;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m512* w) const {
    const float* q = reinterpret_cast<const float*>(p + static_cast<size_t>(s) * 256);
    for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_ps(q + 16 * j);
  }
};

struct DecF16 {
  static constexpr int C = 4;
  static constexpr int kStepBytes = 128;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m512* w) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 128;
    for (int j = 0; j < 4; ++j)
      w[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * j)));
  }
};

struct DecBF16 {  // line = 16 pairs (even col low): shift gives the even col, and the odd one
  static constexpr int C = 4;
  static constexpr int kStepBytes = 128;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m512* w) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 128;
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (int l = 0; l < 2; ++l) {
      const __m512i v = _mm512_loadu_si512(q + 64 * l);
      w[2 * l] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      w[2 * l + 1] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
    }
  }
};

struct DecI8 {  // 4 lines of 16 int8 per 64 bytes
  static constexpr int C = 4;
  static constexpr int kStepBytes = 64;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m512* w) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 64;
    for (int j = 0; j < 4; ++j)
      w[j] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * j))));
  }
};

struct DecI4 {  // vpermps reads the low 4 bits of each lane: shift + LUT = 16 weights q as f32
  static constexpr int C = 8;
  static constexpr int kStepBytes = 64;
  const uint8_t* p;
  __m512 lut;  // lut[u] = u - 8
  TW_INLINE void operator()(int s, __m512* w) const {
    const __m512i v = _mm512_loadu_si512(p + static_cast<size_t>(s) * 64);
    w[0] = _mm512_permutexvar_ps(v, lut);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), lut);
    w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), lut);
    w[4] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), lut);
    w[5] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), lut);
    w[6] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), lut);
    w[7] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), lut);
  }
};

struct DecFP8 {  // 4 lines of 16 e4m3 bytes per 64 bytes: 4 ops per 16 weights, then the FMAs
  static constexpr int C = 4;
  static constexpr int kStepBytes = 64;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m512* w) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 64;
    const __m256i mask = _mm256_set1_epi16(static_cast<short>(0xBF80));
    for (int j = 0; j < 4; ++j) {
      const __m256i b =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * j)));
      w[j] = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(b, 7), mask));
    }
  }
};

// A growable 64-byte aligned buffer per thread (INT4Z's sums of x); nullptr when out of memory.
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = (n + 1023) & ~size_t(1023);
      p = static_cast<float*>(std::aligned_alloc(64, cap * sizeof(float)));
      if (p == nullptr) cap = 0;
    }
    return p;
  }
};
thread_local Scratch t_xsum;

// xsum[t * G + g] = sum of x[t][g gs .. g gs + gs - 1], in a fixed order (16 lanes, then lanes).
void group_sums(const Activations& x, int cols, int gs, float* xsum) {
  const int groups = cols / gs;
  for (int t = 0; t < x.n; ++t)
    for (int gi = 0; gi < groups; ++gi) {
      const float* xg = x.f32 + static_cast<size_t>(t) * x.ld + gi * gs;
      __m512 a = _mm512_loadu_ps(xg);
      for (int c = 16; c < gs; c += 16) a = _mm512_add_ps(a, _mm512_loadu_ps(xg + c));
      xsum[static_cast<size_t>(t) * groups + gi] = _mm512_reduce_add_ps(a);
    }
}

// acc[t][j % NA] += w[j] * x[t][c0 + j] over steps [s0, s1). kTail: x past `cols` reads as 0 (the
// packed padding is 0 too; x itself has only `cols` values).
template <int TB, int NA, bool kTail, class Dec>
TW_INLINE void dot_steps(const Dec& dec, int s0, int s1, const float* x, size_t ldx, int cols,
                         __m512 (&acc)[TB][NA]) {
  for (int s = s0; s < s1; ++s) {
    // NOTE: the L2 streamer alone leaves DRAM idle while the FMAs of a line run (n = 8: 1.6x
    // slower than this); 2 KiB ahead into L1 keeps enough misses in flight.
    const char* ahead = reinterpret_cast<const char*>(dec.p) + size_t(s) * Dec::kStepBytes;
    for (int l = 0; l < Dec::kStepBytes; l += 64) _mm_prefetch(ahead + l + g_prefetch_bytes, _MM_HINT_T0);
    __m512 w[Dec::C];
    dec(s, w);
    const int c0 = s * Dec::C;
#pragma GCC unroll 8
    for (int j = 0; j < Dec::C; ++j) {
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const float* xt = x + static_cast<size_t>(t) * ldx + c0 + j;
        const float xv = kTail ? (c0 + j < cols ? *xt : 0.f) : *xt;
        acc[t][j % NA] = _mm512_fmadd_ps(w[j], _mm512_set1_ps(xv), acc[t][j % NA]);
      }
    }
  }
}

template <int TB, int NA>
TW_INLINE void zero(__m512 (&acc)[TB][NA]) {
  for (int t = 0; t < TB; ++t)
    for (int a = 0; a < NA; ++a) acc[t][a] = _mm512_setzero_ps();
}

template <int NA>
TW_INLINE __m512 reduce(const __m512 (&a)[NA]) {  // fixed order: the bits do not depend on rows
  if constexpr (NA == 4) return _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
  else if constexpr (NA == 2) return _mm512_add_ps(a[0], a[1]);
  else return a[0];
}

template <int TB, int NA, class Dec>
TW_INLINE void run_plain(const Dec& dec, const float* x, size_t ldx, int cols,
                         __m512 (&acc)[TB][NA]) {
  const int full = cols / Dec::C;
  dot_steps<TB, NA, false>(dec, 0, full, x, ldx, cols, acc);
  if (full * Dec::C < cols) dot_steps<TB, NA, true>(dec, full, full + 1, x, ldx, cols, acc);
}

// out[t] = the block's 16 rows for token t of this pass. `xsum`: INT4Z's per-group sums of x
// for the pass's first token ([TB, G]), else unused.
template <int TB>
void block_tokens(const PackedLayout& lay, const Geom& g, const uint8_t* blk, const float* x,
                  size_t ldx, const float* xsum, __m512* out) {
  constexpr int NA = TB == 1 ? 4 : (TB <= 4 ? 2 : 1);
  const int cols = lay.cols;
  __m512 acc[TB][NA];
  zero(acc);
  switch (lay.format) {
    case WFormat::F32: run_plain(DecF32{blk}, x, ldx, cols, acc); break;
    case WFormat::F16: run_plain(DecF16{blk}, x, ldx, cols, acc); break;
    case WFormat::BF16: run_plain(DecBF16{blk}, x, ldx, cols, acc); break;
    case WFormat::INT8: {
      run_plain(DecI8{blk}, x, ldx, cols, acc);
      const __m512 scale = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + 16 * size_t(g.kp)));
      for (int t = 0; t < TB; ++t) out[t] = _mm512_mul_ps(reduce<NA>(acc[t]), scale);
      return;
    }
    case WFormat::INT4:
    case WFormat::INT4Z:
    case WFormat::FP8: {
      const bool fp8 = lay.format == WFormat::FP8, z = lay.format == WFormat::INT4Z;
      const int gs = lay.group_size, spg = fp8 ? gs / DecFP8::C : gs / DecI4::C;
      const __m512 lut = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f,
                                        2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
      __m512 yv[TB];
      for (int t = 0; t < TB; ++t) yv[t] = _mm512_setzero_ps();
      for (int gi = 0; gi < g.groups; ++gi) {
        const uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
        zero(acc);
        if (fp8) dot_steps<TB, NA, false>(DecFP8{grp}, 0, spg, x + gi * gs, ldx, cols, acc);
        else dot_steps<TB, NA, false>(DecI4{grp, lut}, 0, spg, x + gi * gs, ldx, cols, acc);
        const float* sp = reinterpret_cast<const float*>(grp + g.scale_off);
        const __m512 scale = _mm512_loadu_ps(sp);
        for (int t = 0; t < TB; ++t) yv[t] = _mm512_fmadd_ps(reduce<NA>(acc[t]), scale, yv[t]);
        if (z) {  // + m * sum(x_g)
          const __m512 m = _mm512_loadu_ps(sp + 16);
          for (int t = 0; t < TB; ++t)
            yv[t] = _mm512_fmadd_ps(
                _mm512_set1_ps(xsum[static_cast<size_t>(t) * g.groups + gi]), m, yv[t]);
        }
      }
      for (int t = 0; t < TB; ++t) out[t] = yv[t];
      return;
    }
  }
  for (int t = 0; t < TB; ++t) out[t] = reduce<NA>(acc[t]);
}

// Writes the rows of block b that fall in [r0, r1) for `tb` tokens starting at token t0.
void store_block(const __m512* out, int tb, int b, int r0, int r1, float* y, int ldy, int t0) {
  const int first = b * kRowBlock;
  const int lo = first > r0 ? first : r0;
  const int hi = first + kRowBlock < r1 ? first + kRowBlock : r1;
  if (lo == first && hi == first + kRowBlock) {
    for (int t = 0; t < tb; ++t)
      _mm512_storeu_ps(y + static_cast<size_t>(t0 + t) * ldy + (first - r0), out[t]);
    return;
  }
  const __mmask16 sel = static_cast<__mmask16>(((1u << (hi - lo)) - 1u) << (lo - first));
  const __mmask16 low = static_cast<__mmask16>((1u << (hi - lo)) - 1u);
  for (int t = 0; t < tb; ++t)
    _mm512_mask_storeu_ps(y + static_cast<size_t>(t0 + t) * ldy + (lo - r0), low,
                          _mm512_maskz_compress_ps(sel, out[t]));
}

}  // namespace

void matmul_avx512(const PackedLayout& lay, const void* packed, int r0, int r1,
                   const Activations& x, float* y, int ldy) {
  const Geom g = geom(lay);
  const auto* base = static_cast<const uint8_t*>(packed);
  const size_t ldx = static_cast<size_t>(x.ld);
  float* xsum = nullptr;
  if (lay.format == WFormat::INT4Z) {
    xsum = t_xsum.get(static_cast<size_t>(x.n) * g.groups);
    if (xsum == nullptr) {  // out of memory (n x G floats!): the scalar kernel, same math
      matmul_scalar(lay, packed, r0, r1, x, y, ldy);
      return;
    }
    group_sums(x, lay.cols, lay.group_size, xsum);
  }
  for (int b = r0 / kRowBlock; b * kRowBlock < r1; ++b) {
    const uint8_t* blk = base + static_cast<size_t>(b) * g.block_bytes;
    // NOTE: token passes re-read the block from L2 (a block is 16 x C weights, <= 64 KiB of bf16
    // at C = 2048), so only the first pass touches DRAM.
    for (int t0 = 0; t0 < x.n; t0 += kMaxTB) {
      const int tb = x.n - t0 < kMaxTB ? x.n - t0 : kMaxTB;
      const float* xt = x.f32 + static_cast<size_t>(t0) * ldx;
      __m512 out[kMaxTB];
      const float* xs = xsum ? xsum + static_cast<size_t>(t0) * g.groups : nullptr;
      switch (tb) {
        case 1: block_tokens<1>(lay, g, blk, xt, ldx, xs, out); break;
        case 2: block_tokens<2>(lay, g, blk, xt, ldx, xs, out); break;
        case 3: block_tokens<3>(lay, g, blk, xt, ldx, xs, out); break;
        case 4: block_tokens<4>(lay, g, blk, xt, ldx, xs, out); break;
        case 5: block_tokens<5>(lay, g, blk, xt, ldx, xs, out); break;
        case 6: block_tokens<6>(lay, g, blk, xt, ldx, xs, out); break;
        case 7: block_tokens<7>(lay, g, blk, xt, ldx, xs, out); break;
        default: block_tokens<8>(lay, g, blk, xt, ldx, xs, out); break;
      }
      store_block(out, tb, b, r0, r1, y, ldy, t0);
    }
  }
}

}  // namespace twinfer::detail
