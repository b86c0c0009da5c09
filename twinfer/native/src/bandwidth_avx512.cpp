// DRAM read bandwidth probe, AVX-512: a streaming read-and-sum (compiled with the AVX-512 flags;
// called only where cpuid says AVX-512F is there).
//
// Shapes: none. NOTE: self-contained (no shared inline helpers), so no AVX-512 copy of a common
// function can be picked by the linker for baseline callers.
#include <immintrin.h>

#include <cstddef>

namespace twinfer {

// Sums `bytes` (a multiple of 256, 64-byte aligned) as int32 lanes; the result only defeats the
// optimiser. Four independent accumulators keep four lines in flight per iteration.
long long read_sum_avx512(const void* p, size_t bytes) {
  const auto* v = static_cast<const __m512i*>(p);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0, n = bytes / 64; i + 4 <= n; i += 4) {
    a0 = _mm512_add_epi32(a0, _mm512_load_si512(v + i));
    a1 = _mm512_add_epi32(a1, _mm512_load_si512(v + i + 1));
    a2 = _mm512_add_epi32(a2, _mm512_load_si512(v + i + 2));
    a3 = _mm512_add_epi32(a3, _mm512_load_si512(v + i + 3));
  }
  a0 = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
  // NOTE: a store, not _mm512_reduce_add_epi32, whose GCC 12 header warns (-Wuninitialized).
  alignas(64) int lanes[16];
  _mm512_store_si512(lanes, a0);
  long long s = 0;
  for (int i = 0; i < 16; ++i) s += lanes[i];
  return s;
}

}  // namespace twinfer
