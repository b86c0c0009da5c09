// Declarations shared by the kernel files (pack.cpp, kernels*.cpp, cpu_features.cpp); not part of
// the engine contract (that is kernels.h).
//
// Legend: R rows (outputs), C cols (inputs), Kp = C rounded up to 32, RB = 16 rows per packed
// block, n tokens, G = C / group_size (groups per row of the grouped formats INT4/INT4Z/FP8).
//
// NOTE: the kernel files are compiled with different -m flags. Any inline function or template
// instantiated in two of them could be emitted once with AVX-512 code and picked by the linker for
// all callers (an illegal instruction on an AVX2-only CPU). So this header holds plain declarations
// and constants only, and the ISA files keep their helpers in anonymous namespaces and use no
// std:: templates that are not fully inlined.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace twinfer::detail {

constexpr int kRowBlock = 16;  // rows per packed block: one zmm of f32 lanes, one AMX tile's N
constexpr int kColPad = 32;    // cols padded to this: one AMX bf16 k-chunk (64 bytes of bf16)

// Where things are in a packed matrix (see pack.cpp for the byte layout of a block).
struct Geom {
  int nb = 0;              // row blocks = ceil(R / 16); the last one is zero-padded
  int kp = 0;              // cols rounded up to 32 (padding values are zero)
  size_t block_bytes = 0;  // bytes of one row block (a multiple of 64)
  int groups = 0;          // grouped formats: groups per row
  size_t group_bytes = 0;  // grouped formats: bytes of one group in a block (values + scale lines)
  size_t scale_off = 0;    // grouped formats: the group's scale line (INT4Z: then its m line)
};

Geom geom(const PackedLayout& lay);  // pack.cpp; assumes a layout from packed_layout()

// Per-ISA implementations of matmul_rows (same contract). The AMX one returns false when it does
// not take the case (format without an AMX path: F32/F16/FP8/INT4Z, too few tokens, no buffer):
// the caller then runs the AVX-512 one.
void matmul_scalar(const PackedLayout& lay, const void* packed, int r0, int r1,
                   const Activations& x, float* y, int ldy);
void matmul_avx2(const PackedLayout& lay, const void* packed, int r0, int r1,
                 const Activations& x, float* y, int ldy);
void matmul_avx512(const PackedLayout& lay, const void* packed, int r0, int r1,
                   const Activations& x, float* y, int ldy);
bool matmul_amx(const PackedLayout& lay, const void* packed, int r0, int r1, const Activations& x,
                float* y, int ldy);

// Asks the OS (once per process) for the AMX tile state; true when granted. cpu_features.cpp.
bool request_amx_permission();

// Software prefetch distance of the streaming kernels, in bytes ahead of the line being decoded
// (default 2048; TWINFER_PREFETCH_BYTES overrides it at load, for tuning on a new machine).
extern const int g_prefetch_bytes;

}  // namespace twinfer::detail
