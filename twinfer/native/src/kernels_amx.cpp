// AMX kernels (level amx): tdpbf16ps for BF16, INT8 and INT4 weights from 8-9 tokens up.
//
// Legend: R rows, C cols, Kp = C rounded up to 32, n tokens, RB = 16 rows per block (a B tile's
// N), token block = 16 tokens (an A tile's M), chunk = 32 cols (the tiles' K). One B tile = 16 rows
// x 32 cols = 1 KiB of bf16 pairs: the packed BF16 layout itself (pack.cpp), so BF16 B tiles load
// straight from the weights; INT8/INT4 chunks are widened to that layout (q is exact in bf16).
//
// Accuracy: a bf16 activation has a 2^-9 relative error, which alone would miss the 1e-3 bound,
// so x = hi + lo (both bf16; the residual is ~2^-17 |x|) and each chunk does two tile products
// C_hi += hi . B and C_lo += lo . B (the lo product is skipped for a token block whose x is exact
// in bf16, e.g. gate/up inputs of a bf16 model). Scales multiply the f32 sums afterwards: INT8 per
// row at the end, INT4 per group (the C tiles are flushed into f32 accumulators after each group).
//
// A row's result never depends on [r0, r1): every row block sees the same tile products in the
// same order whether it is processed alone or in a pair.
// NOTE: no std:: templates here (see kernels_impl.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 AVX-512 headers (PR105593)
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

#include "kernels_impl.h"

namespace twinfer::detail {

namespace {

// Fewer tokens than this run the AVX-512 kernel: a tile product costs the same for 1 or 16 tokens,
// and below these counts the AVX-512 FMAs keep up with DRAM (BF16) or beat the widening + tile
// work (INT8/INT4). Measured on a 2-core SPR VM at 1 GiB of weights (bench notes in the report).
int min_tokens(WFormat f) {
  switch (f) {
    case WFormat::BF16: return 9;
    case WFormat::INT8: return 8;
    case WFormat::INT4: return 8;
    // F32/F16: not exact in bf16. FP8 (exact in bf16) and INT4Z (its m * sum(x) term) could
    // widen like INT4 but have no AMX path yet: the AVX-512 kernel runs them at any n.
    default: return 1 << 30;
  }
}

constexpr int kSuperTB = 8;  // token blocks (of 16) per pass over the rows

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A growable 64-byte aligned buffer per thread (no exceptions: nullptr when out of memory).
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  uint8_t* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      if (p == nullptr) cap = 0;
    }
    return static_cast<uint8_t*>(p);
  }
};
thread_local Scratch t_x, t_w;

// The A tiles of token block tb, chunk k (cols 32k..32k+31): hi and lo, 16 rows of 64 B each, at
// ah / al (rows past n and cols past C are zero). Returns the OR of the lo bits (0: x exact in
// bf16).
// NOTE: A tiles are stored one after the other (tile (tb, k) at (tb * Kp/32 + k) KiB), not
// row-major: rows Kp * 2 bytes apart would fall in one L1 set (conflict misses on every load).
uint32_t split_chunk(const Activations& x, int cols, int tb, int k, uint8_t* ah, uint8_t* al) {
  __m512i any = _mm512_setzero_si512();
  const int c = 32 * k;
  const __m512i odd_words = _mm512_setr_epi32(0x00030001, 0x00070005, 0x000b0009, 0x000f000d,
                                              0x00130011, 0x00170015, 0x001b0019, 0x001f001d,
                                              0x00230021, 0x00270025, 0x002b0029, 0x002f002d,
                                              0x00330031, 0x00370035, 0x003b0039, 0x003f003d);
  for (int m = 0; m < 16; ++m) {
    const int t = 16 * tb + m;
    const int left = t < x.n ? cols - c : 0;
    const __mmask16 ma = left >= 16 ? 0xffff : (left > 0 ? (1u << left) - 1 : 0);
    const __mmask16 mb = left >= 32 ? 0xffff : (left > 16 ? (1u << (left - 16)) - 1 : 0);
    const float* xf = x.f32 + static_cast<size_t>(t) * x.ld + c;
    const __m512 a = _mm512_maskz_loadu_ps(ma, xf), b = _mm512_maskz_loadu_ps(mb, xf + 16);
    const __m512i ai = _mm512_castps_si512(a), bi = _mm512_castps_si512(b);
    if (_mm512_test_epi32_mask(_mm512_or_si512(ai, bi), _mm512_set1_epi32(0xffff)) == 0) {
      // Fast path: x exact in bf16 (gate/up inputs of a bf16 model): hi = the high halves, lo = 0.
      _mm512_store_si512(ah + 64 * m, _mm512_permutex2var_epi16(ai, odd_words, bi));
      _mm512_store_si512(al + 64 * m, _mm512_setzero_si512());
      continue;
    }
    __m512i hi;
    if (x.bf16 != nullptr)  // the engine's rounding; lo below makes up for any difference
      hi = _mm512_maskz_loadu_epi16((static_cast<__mmask32>(mb) << 16) | ma,
                                    x.bf16 + static_cast<size_t>(t) * x.ld + c);
    else
      hi = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // [a's 16 | b's 16]
    const __m512 ha = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)), 16));
    const __m512 hb = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)), 16));
    const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, hb), _mm512_sub_ps(a, ha));
    any = _mm512_or_si512(any, lo);
    _mm512_store_si512(ah + 64 * m, hi);
    _mm512_store_si512(al + 64 * m, lo);
  }
  return _mm512_test_epi32_mask(any, any);
}

// INT8 chunk k of a block (cols 32k.., lines of 16 int8) -> 16 bf16 pair lines (a B tile) at out.
void widen_int8(const uint8_t* blk, int k, uint8_t* out) {
  for (int j = 0; j < 16; ++j) {
    const uint8_t* p = blk + 16 * (32 * k + 2 * j);
    const __m512i a = _mm512_castps_si512(_mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
    const __m512i b = _mm512_castps_si512(_mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))));
    // q is exact in bf16: the f32's high half is its bf16; even col low, odd col high.
    const __m512i pair = _mm512_mask_blend_epi16(0xaaaaaaaa, _mm512_srli_epi32(a, 16), b);
    _mm512_store_si512(out + 64 * j, pair);
  }
}

// INT4 chunk k -> 16 bf16 pair lines at out (values q; scales stay in the packed block).
// vpermw reads 5 index bits and bit 4 is the next nibble, so the LUT (bf16 of u - 8) repeats.
void widen_int4(const uint8_t* blk, const Geom& g, int gs, int k, __m512i lut, uint8_t* out) {
  const int c = 32 * k;
  const uint8_t* line = blk + static_cast<size_t>(c / gs) * g.group_bytes + (c % gs) / 8 * 64;
  for (int l = 0; l < 4; ++l) {
    const __m512i v = _mm512_loadu_si512(line + 64 * l);
    _mm512_store_si512(out + 256 * l, _mm512_permutexvar_epi16(v, lut));
    for (int kk = 1; kk < 4; ++kk)  // pair kk: the nibbles at bits 4kk and 16 + 4kk
      _mm512_store_si512(out + 256 * l + 64 * kk,
                         _mm512_permutexvar_epi16(_mm512_srli_epi32(v, 4 * kk), lut));
  }
}

__m512i int4_bf16_lut() {
  alignas(64) uint16_t lut[32];
  for (int u = 0; u < 32; ++u) {
    const float v = static_cast<float>((u & 15) - 8);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    lut[u] = static_cast<uint16_t>(bits >> 16);
  }
  return _mm512_load_si512(lut);
}

// Writes C (16 tokens x 16 rows, f32) of block b / token block tb to y, rows in [r0, r1).
void store_tile(const float* c, int b, int tb, int n, int r0, int r1, float* y, int ldy) {
  const int first = b * kRowBlock;
  const int lo = first > r0 ? first : r0;
  const int hi = first + kRowBlock < r1 ? first + kRowBlock : r1;
  const __mmask16 sel = static_cast<__mmask16>(((1u << (hi - lo)) - 1u) << (lo - first));
  const __mmask16 low = static_cast<__mmask16>((1u << (hi - lo)) - 1u);
  for (int m = 0; m < 16 && tb * 16 + m < n; ++m)
    _mm512_mask_storeu_ps(y + static_cast<size_t>(tb * 16 + m) * ldy + (lo - r0), low,
                          _mm512_maskz_compress_ps(sel, _mm512_load_ps(c + 16 * m)));
}

}  // namespace

bool matmul_amx(const PackedLayout& lay, const void* packed, int r0, int r1, const Activations& x,
                float* y, int ldy) {
  if (x.n < min_tokens(lay.format) || !request_amx_permission()) return false;
  const Geom g = geom(lay);
  const int kp = g.kp, nchunk = kp / 32, ntb = (x.n + 15) / 16;
  const int nsb = ntb < kSuperTB ? ntb : kSuperTB;  // token blocks held at a time
  const size_t xbytes = static_cast<size_t>(nsb) * nchunk * 1024, wbytes = size_t(nchunk) * 1024;
  const bool widen = lay.format != WFormat::BF16;
  uint8_t* xs = t_x.get(2 * xbytes + nsb);  // <= 8 KiB x Kp/32 (+ 2 KiB x Kp/32 for widen)
  uint8_t* wb = widen ? t_w.get(2 * wbytes) : nullptr;
  if (xs == nullptr || (widen && wb == nullptr)) return false;
  uint8_t* xh = xs;
  uint8_t* xl = xs + xbytes;
  uint8_t* lo_flag = xs + 2 * xbytes;  // per token block: x not exact in bf16
  const __m512i lut = int4_bf16_lut();
  // A segment is what the C tiles sum before their f32 flush: one INT4 group, else the whole row.
  const int cps = lay.format == WFormat::INT4 ? lay.group_size / 32 : nchunk;
  const int nseg = nchunk / cps;

  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  alignas(64) float ct[4][256];
  alignas(64) float yacc[2][256];
  const auto* base = static_cast<const uint8_t*>(packed);
  const int bfirst = r0 / kRowBlock, blast = (r1 - 1) / kRowBlock;
  // Row blocks go in pairs: tiles C0/C1 = block 0 times hi/lo, C2/C3 = block 1, B0 = 4, B1 = 5,
  // A hi = 6, A lo = 7. Each A tile feeds two products and each B tile two: 4 tile loads per 4
  // tdpbf16ps (one block alone would need 3 per 2), which keeps L2 from being the limit.
  // Operands are made on first use, right before their tile loads, so the vector work overlaps
  // the tile products: A tiles (hi/lo split) during the first pair, widened INT8/INT4 B tiles
  // during the first token block of each pair (once per token super-block).
  // Tokens go in super-blocks of kSuperTB token blocks: their A tiles (<= 1 MiB at Kp = 2048) stay
  // in L2 while every row pair streams by; more tokens would re-read A from DRAM for every pair.
  for (int tb0 = 0; tb0 < ntb; tb0 += kSuperTB) {
    const int tb1 = tb0 + kSuperTB < ntb ? tb0 + kSuperTB : ntb;
    for (int b = bfirst; b <= blast; b += 2) {
      const bool first_pair = b == bfirst;
      const int nrb = b + 1 <= blast ? 2 : 1;
      const uint8_t* blk[2] = {base + static_cast<size_t>(b) * g.block_bytes,
                               base + static_cast<size_t>(b + nrb - 1) * g.block_bytes};
      const uint8_t* bw[2] = {widen ? wb : blk[0], widen ? wb + wbytes : blk[1]};
      // NOTE: while this pair computes, the next pair's packed bytes are prefetched into L2, a
      // slice per chunk: the next pair's tile loads / widening then hit L2, not DRAM.
      const int nnext = blast - b - 1 >= 2 ? 2 : (blast - b - 1 > 0 ? blast - b - 1 : 0);
      const char* pf = reinterpret_cast<const char*>(base) + size_t(b + 2) * g.block_bytes;
      const size_t pf_lines = nnext * g.block_bytes / 64, pf_per_chunk = pf_lines / nchunk + 1;
      for (int tb = tb0; tb < tb1; ++tb) {
        uint8_t* ah = xh + static_cast<size_t>(tb - tb0) * nchunk * 1024;
        uint8_t* al = xl + static_cast<size_t>(tb - tb0) * nchunk * 1024;
        // The first pair always multiplies lo (it is being made): adding zero products is exact.
        const bool lo = first_pair || lo_flag[tb - tb0];
        uint32_t lo_any = 0;
        for (int seg = 0; seg < nseg; ++seg) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int k = seg * cps; k < (seg + 1) * cps; ++k) {
            const size_t off = 1024 * static_cast<size_t>(k);
            if (first_pair)
              lo_any |= split_chunk(x, lay.cols, tb, k, ah + off, al + off);
            if (tb == tb0) {
              for (size_t l = k * pf_per_chunk; l < (k + 1) * pf_per_chunk && l < pf_lines; ++l)
                _mm_prefetch(pf + 64 * l, _MM_HINT_T1);
              for (int j = 0; j < nrb && widen; ++j) {
                if (lay.format == WFormat::INT8) widen_int8(blk[j], k, wb + j * wbytes + off);
                else widen_int4(blk[j], g, lay.group_size, k, lut, wb + j * wbytes + off);
              }
            }
            _tile_loadd(6, ah + off, 64);
            _tile_loadd(4, bw[0] + off, 64);
            _tile_dpbf16ps(0, 6, 4);
            if (lo) {
              _tile_loadd(7, al + off, 64);
              _tile_dpbf16ps(1, 7, 4);
            }
            if (nrb == 2) {
              _tile_loadd(5, bw[1] + off, 64);
              _tile_dpbf16ps(2, 6, 5);
              if (lo) _tile_dpbf16ps(3, 7, 5);
            }
          }
          _tile_stored(0, ct[0], 64);
          _tile_stored(1, ct[1], 64);
          _tile_stored(2, ct[2], 64);
          _tile_stored(3, ct[3], 64);
          for (int j = 0; j < nrb; ++j) {
            // Scale: INT4 per group (the segment's scale line), INT8 per row, BF16 none.
            const float* sp = nullptr;
            if (lay.format == WFormat::INT4)
              sp = reinterpret_cast<const float*>(blk[j] + size_t(seg) * g.group_bytes +
                                                  lay.group_size / 8 * 64);
            else if (lay.format == WFormat::INT8)
              sp = reinterpret_cast<const float*>(blk[j] + 16 * static_cast<size_t>(kp));
            const __m512 sc = sp != nullptr ? _mm512_loadu_ps(sp) : _mm512_set1_ps(1.f);
            for (int m = 0; m < 16; ++m) {
              __m512 v = _mm512_load_ps(ct[2 * j] + 16 * m);
              if (lo) v = _mm512_add_ps(v, _mm512_load_ps(ct[2 * j + 1] + 16 * m));
              const __m512 prev = seg == 0 ? _mm512_setzero_ps() : _mm512_load_ps(yacc[j] + 16 * m);
              _mm512_store_ps(yacc[j] + 16 * m, sp != nullptr ? _mm512_fmadd_ps(v, sc, prev) : v);
            }
          }
        }
        if (first_pair) lo_flag[tb - tb0] = lo_any != 0;
        for (int j = 0; j < nrb; ++j) store_tile(yacc[j], b + j, tb, x.n, r0, r1, y, ldy);
      }
    }
  }
  _tile_release();
  return true;
}

}  // namespace twinfer::detail
