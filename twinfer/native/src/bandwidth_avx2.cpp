// DRAM read bandwidth probe, AVX2: a streaming read-and-sum (compiled with the AVX2 flags; called
// only where cpuid says AVX2 is there).
//
// Shapes: none. NOTE: self-contained, like bandwidth_avx512.cpp.
#include <immintrin.h>

#include <cstddef>

namespace twinfer {

// Sums `bytes` (a multiple of 256, 64-byte aligned) as int32 lanes; the result only defeats the
// optimiser.
long long read_sum_avx2(const void* p, size_t bytes) {
  const auto* v = static_cast<const __m256i*>(p);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0, n = bytes / 32; i + 8 <= n; i += 8) {
    a0 = _mm256_add_epi32(a0, _mm256_load_si256(v + i));
    a1 = _mm256_add_epi32(a1, _mm256_load_si256(v + i + 1));
    a2 = _mm256_add_epi32(a2, _mm256_load_si256(v + i + 2));
    a3 = _mm256_add_epi32(a3, _mm256_load_si256(v + i + 3));
    a0 = _mm256_add_epi32(a0, _mm256_load_si256(v + i + 4));
    a1 = _mm256_add_epi32(a1, _mm256_load_si256(v + i + 5));
    a2 = _mm256_add_epi32(a2, _mm256_load_si256(v + i + 6));
    a3 = _mm256_add_epi32(a3, _mm256_load_si256(v + i + 7));
  }
  a0 = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
  alignas(32) int lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a0);
  long long s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

}  // namespace twinfer
