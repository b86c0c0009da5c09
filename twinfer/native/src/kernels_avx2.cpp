// AVX2 + FMA + F16C kernels (level avx2): the AVX-512 scheme on 8-lane registers.
//
// Legend: R rows, C cols, n tokens, RB = 16 rows per packed block = two ymm halves h = 0, 1
// (rows 16b..16b+7, 16b+8..16b+15), TB tokens per pass (<= 4: 16 ymm registers), NA accumulators.
//
// A step widens a 64/128-byte slice of the block into C columns x 2 halves of f32 and does
// TB x C x 2 FMAs with broadcasts of x[t][c]. Rows stay in their lanes: the row split never
// changes a bit. INT4 has no 16-entry permute on ymm, so a nibble is shift, and, -8, convert.
// FP8: a 16-byte line (16 rows) is vpmovsxbw, vpsllw 7, vpand -> 16 halves = value * 2^-8
// (pack.cpp's "FP8 decoding"), two vcvtph2ps -> 2 x 8 f32; the scale line holds s * 256.
// INT4Z: INT4's group dot times s, plus m * sum(x_g) (the sums once per call, per token and group).
// NOTE: no std:: templates here (see kernels_impl.h).
#include <immintrin.h>

#include <cstdlib>

#include "kernels_impl.h"

namespace twinfer::detail {

namespace {

constexpr int kMaxTB = 4;
#define TW_INLINE inline __attribute__((always_inline))

struct DecF32 {
  static constexpr int C = 4;
  static constexpr int kStepBytes = 256;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m256 (*w)[2]) const {
    const float* q = reinterpret_cast<const float*>(p + static_cast<size_t>(s) * 256);
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h) w[j][h] = _mm256_loadu_ps(q + 16 * j + 8 * h);
  }
};

struct DecF16 {
  static constexpr int C = 4;
  static constexpr int kStepBytes = 128;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m256 (*w)[2]) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 128;
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h)
        w[j][h] = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * j + 16 * h)));
  }
};

struct DecBF16 {
  static constexpr int C = 4;
  static constexpr int kStepBytes = 128;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m256 (*w)[2]) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 128;
    const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * l + 32 * h));
        w[2 * l][h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        w[2 * l + 1][h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
      }
  }
};

struct DecI8 {
  static constexpr int C = 4;
  static constexpr int kStepBytes = 64;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m256 (*w)[2]) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 64;
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h)
        w[j][h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16 * j + 8 * h))));
  }
};

struct DecI4 {
  static constexpr int C = 8;
  static constexpr int kStepBytes = 64;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m256 (*w)[2]) const {
    static constexpr int kShift[8] = {0, 16, 4, 20, 8, 24, 12, 28};  // col j's nibble (pack.cpp)
    const __m256i nib = _mm256_set1_epi32(0xf), eight = _mm256_set1_epi32(8);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(p + static_cast<size_t>(s) * 64 + 32 * h));
      for (int j = 0; j < 8; ++j)
        w[j][h] = _mm256_cvtepi32_ps(_mm256_sub_epi32(
            _mm256_and_si256(_mm256_srli_epi32(v, kShift[j]), nib), eight));
    }
  }
};

struct DecFP8 {  // 4 lines of 16 e4m3 bytes per 64 bytes
  static constexpr int C = 4;
  static constexpr int kStepBytes = 64;
  const uint8_t* p;
  TW_INLINE void operator()(int s, __m256 (*w)[2]) const {
    const uint8_t* q = p + static_cast<size_t>(s) * 64;
    const __m256i mask = _mm256_set1_epi16(static_cast<short>(0xBF80));
    for (int j = 0; j < 4; ++j) {
      const __m256i b =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * j)));
      const __m256i h = _mm256_and_si256(_mm256_slli_epi16(b, 7), mask);
      w[j][0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
      w[j][1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
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

// xsum[t * G + g] = sum of x[t][g gs .. g gs + gs - 1], in a fixed order (8 lanes, then lanes).
void group_sums(const Activations& x, int cols, int gs, float* xsum) {
  const int groups = cols / gs;
  for (int t = 0; t < x.n; ++t)
    for (int gi = 0; gi < groups; ++gi) {
      const float* xg = x.f32 + static_cast<size_t>(t) * x.ld + gi * gs;
      __m256 a = _mm256_loadu_ps(xg);
      for (int c = 8; c < gs; c += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xg + c));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      xsum[static_cast<size_t>(t) * groups + gi] = _mm_cvtss_f32(h);
    }
}

template <int TB, int NA, bool kTail, class Dec>
TW_INLINE void dot_steps(const Dec& dec, int s0, int s1, const float* x, size_t ldx, int cols,
                         __m256 (&acc)[TB][NA][2]) {
  for (int s = s0; s < s1; ++s) {
    // NOTE: as in the AVX-512 kernel: 2 KiB ahead into L1 keeps DRAM busy during the FMAs.
    const char* ahead = reinterpret_cast<const char*>(dec.p) + size_t(s) * Dec::kStepBytes;
    for (int l = 0; l < Dec::kStepBytes; l += 64) _mm_prefetch(ahead + l + g_prefetch_bytes, _MM_HINT_T0);
    __m256 w[Dec::C][2];
    dec(s, w);
    const int c0 = s * Dec::C;
#pragma GCC unroll 8
    for (int j = 0; j < Dec::C; ++j) {
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) {
        const float* xt = x + static_cast<size_t>(t) * ldx + c0 + j;
        const __m256 xv = _mm256_set1_ps(kTail ? (c0 + j < cols ? *xt : 0.f) : *xt);
        for (int h = 0; h < 2; ++h)
          acc[t][j % NA][h] = _mm256_fmadd_ps(w[j][h], xv, acc[t][j % NA][h]);
      }
    }
  }
}

template <int TB, int NA>
TW_INLINE void zero(__m256 (&acc)[TB][NA][2]) {
  for (int t = 0; t < TB; ++t)
    for (int a = 0; a < NA; ++a) acc[t][a][0] = acc[t][a][1] = _mm256_setzero_ps();
}

template <int NA>
TW_INLINE __m256 reduce(const __m256 (&a)[NA][2], int h) {
  if constexpr (NA == 2) return _mm256_add_ps(a[0][h], a[1][h]);
  else return a[0][h];
}

template <int TB, int NA, class Dec>
TW_INLINE void run_plain(const Dec& dec, const float* x, size_t ldx, int cols,
                         __m256 (&acc)[TB][NA][2]) {
  const int full = cols / Dec::C;
  dot_steps<TB, NA, false>(dec, 0, full, x, ldx, cols, acc);
  if (full * Dec::C < cols) dot_steps<TB, NA, true>(dec, full, full + 1, x, ldx, cols, acc);
}

// out[t * 16 + i] = row 16b + i for token t of this pass.
// `xsum`: INT4Z's per-group sums of x for the pass's first token ([TB, G]), else unused.
template <int TB>
void block_tokens(const PackedLayout& lay, const Geom& g, const uint8_t* blk, const float* x,
                  size_t ldx, const float* xsum, float* out) {
  constexpr int NA = TB == 1 ? 2 : 1;
  const int cols = lay.cols;
  __m256 acc[TB][NA][2];
  zero(acc);
  switch (lay.format) {
    case WFormat::F32: run_plain(DecF32{blk}, x, ldx, cols, acc); break;
    case WFormat::F16: run_plain(DecF16{blk}, x, ldx, cols, acc); break;
    case WFormat::BF16: run_plain(DecBF16{blk}, x, ldx, cols, acc); break;
    case WFormat::INT8: {
      run_plain(DecI8{blk}, x, ldx, cols, acc);
      const float* sc = reinterpret_cast<const float*>(blk + 16 * static_cast<size_t>(g.kp));
      for (int t = 0; t < TB; ++t)
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_ps(out + t * 16 + 8 * h,
                           _mm256_mul_ps(reduce<NA>(acc[t], h), _mm256_loadu_ps(sc + 8 * h)));
      return;
    }
    case WFormat::INT4:
    case WFormat::INT4Z:
    case WFormat::FP8: {
      const bool fp8 = lay.format == WFormat::FP8, z = lay.format == WFormat::INT4Z;
      const int gs = lay.group_size, spg = fp8 ? gs / DecFP8::C : gs / DecI4::C;
      for (int i = 0; i < TB * 16; ++i) out[i] = 0.f;
      for (int gi = 0; gi < g.groups; ++gi) {
        const uint8_t* grp = blk + static_cast<size_t>(gi) * g.group_bytes;
        const float* sc = reinterpret_cast<const float*>(grp + g.scale_off);
        zero(acc);
        if (fp8) dot_steps<TB, NA, false>(DecFP8{grp}, 0, spg, x + gi * gs, ldx, cols, acc);
        else dot_steps<TB, NA, false>(DecI4{grp}, 0, spg, x + gi * gs, ldx, cols, acc);
        // NOTE: the running sums live in `out` (L1): 16 ymm are too few to keep them in registers.
        for (int t = 0; t < TB; ++t)
          for (int h = 0; h < 2; ++h) {
            float* o = out + t * 16 + 8 * h;
            __m256 v = _mm256_fmadd_ps(reduce<NA>(acc[t], h), _mm256_loadu_ps(sc + 8 * h),
                                       _mm256_loadu_ps(o));
            if (z)  // + m * sum(x_g)
              v = _mm256_fmadd_ps(_mm256_set1_ps(xsum[static_cast<size_t>(t) * g.groups + gi]),
                                  _mm256_loadu_ps(sc + 16 + 8 * h), v);
            _mm256_storeu_ps(o, v);
          }
      }
      return;
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + t * 16 + 8 * h, reduce<NA>(acc[t], h));
}

}  // namespace

void matmul_avx2(const PackedLayout& lay, const void* packed, int r0, int r1,
                 const Activations& x, float* y, int ldy) {
  const Geom g = geom(lay);
  const auto* base = static_cast<const uint8_t*>(packed);
  const size_t ldx = static_cast<size_t>(x.ld);
  alignas(32) float out[kMaxTB * kRowBlock];
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
    const int first = b * kRowBlock;
    const int lo = first > r0 ? first : r0;
    const int hi = first + kRowBlock < r1 ? first + kRowBlock : r1;
    for (int t0 = 0; t0 < x.n; t0 += kMaxTB) {
      const int tb = x.n - t0 < kMaxTB ? x.n - t0 : kMaxTB;
      const float* xt = x.f32 + static_cast<size_t>(t0) * ldx;
      const float* xs = xsum ? xsum + static_cast<size_t>(t0) * g.groups : nullptr;
      switch (tb) {
        case 1: block_tokens<1>(lay, g, blk, xt, ldx, xs, out); break;
        case 2: block_tokens<2>(lay, g, blk, xt, ldx, xs, out); break;
        case 3: block_tokens<3>(lay, g, blk, xt, ldx, xs, out); break;
        default: block_tokens<4>(lay, g, blk, xt, ldx, xs, out); break;
      }
      for (int t = 0; t < tb; ++t) {
        float* yt = y + static_cast<size_t>(t0 + t) * ldy + (lo - r0);
        for (int r = lo; r < hi; ++r) yt[r - lo] = out[t * 16 + (r - first)];
      }
    }
  }
}

}  // namespace twinfer::detail
