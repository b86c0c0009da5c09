// CPU feature detection: which kernel ISA levels this CPU and OS can run.
//
// A feature counts only when the CPU has it (cpuid) AND the OS saves its register state (xgetbv:
// XCR0 bits 1-2 for ymm, 5-7 for zmm/opmask, 17-18 for AMX tiles). On Linux the AMX tile data
// state must also be requested per process (arch_prctl ARCH_REQ_XCOMP_PERM) before the first tile
// instruction, else the kernel kills the process; amx_* are reported only once that succeeded.
//
// Env TWINFER_CPU_ISA=<scalar|avx2|avx512|avx512_bf16|amx> caps best_isa(): tests and benchmarks
// of the fallback paths run on a big CPU. A name above what the CPU has does not raise here (the
// engine compares it with best_isa and raises); an unknown name is ignored.
#include <cstdlib>
#include <cstring>

#include "kernels_impl.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define TWINFER_X86 1
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace twinfer {

namespace {

#ifdef TWINFER_X86
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (__get_cpuid_max(0, nullptr) < leaf) return r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

// NOTE: inline asm rather than _xgetbv(): the intrinsic needs -mxsave on this baseline-flags file.
unsigned long long xgetbv0() {
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bit(unsigned v, int i) { return (v >> i) & 1u; }
#endif

}  // namespace

namespace detail {

bool request_amx_permission() {
#if defined(TWINFER_X86) && defined(__linux__)
  // NOTE: the permission is per process and sticky; the static makes the syscall happen once and
  // is thread-safe (magic statics).
  static const bool granted = [] {
    constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    unsigned long long perm = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0) return false;
    return ((perm >> kXfeatureXtiledata) & 1ull) != 0;
  }();
  return granted;
#else
  return false;  // other OSes: no AMX path (their permission models are not handled here)
#endif
}

}  // namespace detail

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#ifdef TWINFER_X86
  const Regs l1 = cpuid(1, 0);
  if (!bit(l1.c, 27)) return f;  // no OSXSAVE: no xgetbv, so no AVX state either
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;                 // xmm + ymm
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask + zmm0-15 hi + zmm16-31
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;         // XTILECFG + XTILEDATA
  const Regs l7 = cpuid(7, 0);
  const Regs l71 = cpuid(7, 1);
  if (os_avx) {
    f.fma = bit(l1.c, 12);
    f.f16c = bit(l1.c, 29);
    f.avx2 = bit(l7.b, 5);
  }
  if (os_avx512) {
    f.avx512f = bit(l7.b, 16);
    f.avx512dq = bit(l7.b, 17);
    f.avx512bw = bit(l7.b, 30);
    f.avx512vl = bit(l7.b, 31);
    f.avx512_vnni = bit(l7.c, 11);
    f.avx512_bf16 = bit(l71.a, 5);
  }
  if (os_amx && (bit(l7.d, 24) || bit(l7.d, 22) || bit(l7.d, 25)) &&
      detail::request_amx_permission()) {
    f.amx_bf16 = bit(l7.d, 22);
    f.amx_tile = bit(l7.d, 24);
    f.amx_int8 = bit(l7.d, 25);
  }
#endif
  return f;
}

Isa best_isa(const CpuFeatures& f) {
  // Each level needs everything its kernel file is compiled with (see kernels.cpp).
  Isa best = Isa::Scalar;
  if (f.avx2 && f.fma && f.f16c) {
    best = Isa::Avx2;
    if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) {
      best = Isa::Avx512;
      if (f.avx512_bf16 && f.avx512_vnni) {
        best = Isa::Avx512Bf16;
        if (f.amx_tile && f.amx_bf16) best = Isa::Amx;
      }
    }
  }
  Isa cap;
  const char* env = std::getenv("TWINFER_CPU_ISA");
  if (env != nullptr && *env != '\0' && isa_from_name(env, &cap) &&
      static_cast<int>(cap) < static_cast<int>(best))
    best = cap;
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Amx: return "amx";
  }
  return "unknown";
}

bool isa_from_name(const char* name, Isa* out) {
  if (name == nullptr) return false;
  for (int i = 0; i <= static_cast<int>(Isa::Amx); ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (std::strcmp(name, isa_name(isa)) == 0) {
      if (out != nullptr) *out = isa;
      return true;
    }
  }
  return false;
}

}  // namespace twinfer
