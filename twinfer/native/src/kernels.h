// The contract between the CPU expert engine (thread pool, tasks, NUMA shards) and its kernels.
//
// A weight matrix has `rows` output rows of `cols` inputs: y[r] = dot(W[r, :], x). The engine
// only allocates and keeps the packed bytes (on a NUMA node); their layout belongs to the kernels.
// Every kernel computes a row with the same summation order whatever [r0, r1) it is given, so the
// result does not depend on how rows are split across threads or nodes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace twinfer {

// Instruction-set levels, best last. Kernels for a level run only where detect_cpu_features()
// says the CPU (and the OS) supports them.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;  // AMX: also OS permission granted
};

CpuFeatures detect_cpu_features();  // cpuid + xgetbv; on Linux asks arch_prctl for AMX state
Isa best_isa(const CpuFeatures& f);
const char* isa_name(Isa isa);  // "scalar", "avx2", "avx512", "avx512_bf16", "amx"
bool isa_from_name(const char* name, Isa* out);

// Weight formats. F32/BF16/F16 keep the values; INT8 is symmetric per row (scale = absmax / 127).
// The grouped formats scale per group of `group_size` consecutive inputs of a row, group_size in
// {32, 64, 128}: INT4 symmetric (W = q * s, q in [-8, 7], s = absmax / 7); INT4Z asymmetric
// (W = q * s + m, q in [-8, 7], from min/max: s = (max - min) / 15, m = min + 8 s), which keeps a
// checkpoint's zero points (W = (u - z) * s, u in [0, 15]: m = (8 - z) * s); FP8 e4m3fn values
// (W = v * s, s = absmax / 448, or a block-FP8 checkpoint's block scale). See pack.cpp.
// FP8 is also a source dtype of pack_matrix (raw e4m3fn bytes; their scales are then required).
enum class WFormat : int { F32 = 0, BF16 = 1, F16 = 2, INT8 = 3, INT4 = 4, FP8 = 5, INT4Z = 6 };

// Whether a format scales per group of group_size inputs (INT4, INT4Z, FP8). pack.cpp.
// NOTE: not inline: the ISA files include this header (see kernels_impl.h).
bool is_grouped(WFormat f);

struct PackedLayout {
  WFormat format = WFormat::BF16;
  int rows = 0;
  int cols = 0;
  int group_size = 0;  // grouped formats only, else 0
  size_t bytes = 0;    // total packed bytes (values + scales)
};

// Sizes of a packed matrix, so the engine can allocate node-local memory (64-byte aligned) first.
// Throws std::invalid_argument on a bad shape / group size (cols % group_size != 0, etc.).
PackedLayout packed_layout(WFormat format, int rows, int cols, int group_size);

// Packs (and for INT8/INT4/INT4Z/FP8 quantizes) `rows` x `cols` source values into `dst`.
// `src` row r starts at src + r * src_row_stride elements; src_dtype is F32, BF16, F16 or FP8
// (raw e4m3fn bytes: FP8 layouts only, with group_scales; copied bit for bit).
// Grouped formats only: `group_scales` (f32, row r's groups at group_scales + r * cols /
// group_size) gives each group's scale instead of the absmax / min-max rule, and INT4Z's
// `group_offsets` (same shape, needs group_scales) each group's m, so weights already on a grid
// (a checkpoint's q * s (+ m)) pack losslessly: q = round((w - m) / s) recovers q exactly.
// Throws std::invalid_argument on a source / scales combination the format cannot take.
void pack_matrix(const PackedLayout& lay, const void* src, WFormat src_dtype,
                 size_t src_row_stride, void* dst, const float* group_scales = nullptr,
                 const float* group_offsets = nullptr);

// The values the kernels compute with, as float32 [rows x cols] (tests and references).
void unpack_matrix(const PackedLayout& lay, const void* packed, float* out);

// Activations of n tokens: row t is f32 + t * ld (always set) and bf16 + t * ld (bit patterns of
// the same values rounded to bf16, may be null). Kernels accumulate in float32.
struct Activations {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  int ld = 0;
  int n = 0;
};

// For rows r in [r0, r1) and tokens t in [0, x.n):  y[t * ldy + (r - r0)] = dot(W[r, :], x_t).
// One thread; disjoint outputs are thread-safe. `isa` at most best_isa(detect_cpu_features()).
void matmul_rows(Isa isa, const PackedLayout& lay, const void* packed, int r0, int r1,
                 const Activations& x, float* y, int ldy);

}  // namespace twinfer
