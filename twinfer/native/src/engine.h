// The CPU expert engine: one MoE layer's host experts (ExpertLayer) and the engine that runs a
// layer's routed tokens on the thread pool (MoEEngine).
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size, S routed slots (<= T*K,
// only slots whose expert is loaded), n_e slots of expert e.
//   hidden [T, H] bf16|f16|f32, ids [T, K] int32|int64, weights [T, K] bf16|f16|f32,
//   out [T, H] (hidden's dtype); per expert w13 [2I, H] (gate rows, then up rows), w2 [H, I].
// NUMA: shard n (node n) holds gate/up rows for its I-slice [i0, i1) and down rows for its
// H-slice [h0, h1) (all I columns), so every node reads only its own memory.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "kernels.h"
#include "numa.h"
#include "pool.h"

namespace twinfer {

// ---- dtypes -------------------------------------------------------------------------------------
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, I64 = 4 };

// Accepts "f32"/"float32"/"float", "bf16"/"bfloat16", "f16"/"float16"/"half", "int32", "int64",
// with or without a "torch." prefix.
bool dtype_from_name(std::string_view name, DType* out);
size_t dtype_bytes(DType dt);
const char* dtype_name(DType dt);
// Weight formats by name: f32, bf16, f16, int8, int4, fp8, int4z.
bool wformat_from_name(std::string_view name, WFormat* out);
const char* wformat_name(WFormat f);
WFormat wformat_of(DType dt);  // F32/BF16/F16 source dtypes
// A weight source dtype (pack_matrix's src_dtype): the float names of dtype_from_name, or "fp8" /
// "float8_e4m3fn" (e4m3fn bytes), with or without a "torch." prefix.
bool weight_source_from_name(std::string_view name, WFormat* out);

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}
inline uint16_t f32_to_f16(float ff) {  // round to nearest even (F. Giesen's float_to_half_rtne)
  uint32_t f = f32_bits(ff);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= (127u + 16u) << 23) {
    o = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < 113u << 23) {  // subnormal half: let the float adder do the rounding
    const float magic = bits_f32(((127u - 15u) + (23u - 10u) + 1u) << 23);
    o = f32_bits(bits_f32(f) + magic) - f32_bits(magic);
  } else {
    const uint32_t odd = (f >> 13) & 1u;
    f += ((15u - 127u) << 23) + 0xfffu + odd;
    o = f >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}
inline float load_f32(const void* p, DType dt, size_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::I32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case DType::I64: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
  }
  return 0.f;
}

// The isa to compute with: `requested` ("" = TWINFER_CPU_ISA if set, else the best this CPU
// runs). Throws std::invalid_argument for an unknown name or one above this CPU's best.
Isa resolve_isa(std::string_view requested);

// 64-byte aligned scratch that only grows: no allocation per step in steady state.
template <class T>
class Scratch {
 public:
  T* data() const { return p_.get(); }
  size_t capacity() const { return cap_; }
  void grow(size_t n) {
    if (n <= cap_) return;
    p_.reset(static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t{64})));
    cap_ = n;
  }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, Free> p_;
  size_t cap_ = 0;
};

// ---- one layer's experts ------------------------------------------------------------------------
struct ExpertShard {
  int node = 0;                        // NUMA node id (shard g belongs to pool group g)
  int i0 = 0, i1 = 0;                  // gate/up rows (I-slice)
  int h0 = 0, h1 = 0;                  // down rows (H-slice)
  PackedLayout gate, up, down;         // [i1-i0, H], [i1-i0, H], [h1-h0, I]
  size_t up_off = 0, down_off = 0;     // byte offsets inside one expert's block
  size_t stride = 0;                   // bytes per expert block (64-byte multiple)
  NodeBuffer arena;                    // E blocks; an expert's pages exist once it is loaded
};

// Worker w's fixed part of its node's shard, relative to the shard's slices: I rows [ia, ib),
// H columns [ha, hb) (the out columns it sums and writes). The matmuls rotate parts per expert
// (split_even's round), these are round 0.
struct WorkerPart {
  int ia = 0, ib = 0, ha = 0, hb = 0;
};

class ExpertLayer {
 public:
  ExpertLayer(ThreadPool& pool, int num_experts, int hidden, int inner, WFormat fmt,
              int group_size, bool bind_memory);
  // Per expert experts[j]: w13[j] [2I, H], w2[j] [H, I] contiguous, src F32/BF16/F16 or FP8
  // (e4m3fn bytes: fp8 layers, scales required).
  // Packs on the workers of each shard's node (first touch there). Throws std::invalid_argument.
  // NOTE: load before stepping: a load and a step are both pool jobs and never overlap, but a
  // step's submitter reads the loaded flags without a lock.
  // w13_scales / w2_scales (grouped layers: int4, int4z, fp8; optional except for fp8 bytes):
  // per expert, f32 group scales of w13 [2I, H/gs] and w2 [H, I/gs] of weights already on the
  // format's grid; w13_offsets / w2_offsets (int4z, with scales; optional) their m, same shapes
  // (see pack_matrix's group_scales / group_offsets).
  void load_experts(const std::vector<int>& experts, const std::vector<const void*>& w13,
                    const std::vector<const void*>& w2, WFormat src,
                    const std::vector<const float*>& w13_scales = {},
                    const std::vector<const float*>& w2_scales = {},
                    const std::vector<const float*>& w13_offsets = {},
                    const std::vector<const float*>& w2_offsets = {});
  ExpertLayer(const ExpertLayer&) = delete;
  ExpertLayer& operator=(const ExpertLayer&) = delete;

  ThreadPool& pool() const { return pool_; }
  int num_experts() const { return E_; }
  int hidden() const { return H_; }
  int inner() const { return I_; }
  WFormat format() const { return fmt_; }
  int group_size() const { return group_; }
  size_t bytes() const { return bytes_; }
  bool loaded(int e) const { return loaded_[e] != 0; }
  const uint8_t* loaded_flags() const { return loaded_.data(); }
  std::vector<int> loaded_list() const;
  const std::vector<ExpertShard>& shards() const { return shards_; }
  const WorkerPart& part(int w) const { return parts_[w]; }

  const uint8_t* gate(int s, int e) const { return block(s, e); }
  const uint8_t* up(int s, int e) const { return block(s, e) + shards_[s].up_off; }
  const uint8_t* down(int s, int e) const { return block(s, e) + shards_[s].down_off; }

 private:
  const uint8_t* block(int s, int e) const {
    return static_cast<const uint8_t*>(shards_[s].arena.data()) + shards_[s].stride * e;
  }

  ThreadPool& pool_;
  int E_, H_, I_;
  WFormat fmt_;
  int group_;
  std::vector<ExpertShard> shards_;  // one per pool group (node), ascending node id
  std::vector<WorkerPart> parts_;    // per worker
  std::vector<uint8_t> loaded_;
  size_t bytes_ = 0, expert_bytes_ = 0;
};

// ---- the engine ---------------------------------------------------------------------------------
// One step's buffers (raw pointers from torch's data_ptr()).
struct StepIO {
  const void* hidden = nullptr;
  DType hidden_dt = DType::BF16;
  const void* ids = nullptr;
  DType ids_dt = DType::I64;
  const void* weights = nullptr;
  DType weights_dt = DType::F32;
  void* out = nullptr;
  int top_k = 0;
};

class MoEEngine;
struct LaunchRecord {  // a host function's argument: lives as long as the engine (graph replays)
  MoEEngine* engine;
  int layer;
  int num_tokens;
};

class MoEEngine {
 public:
  explicit MoEEngine(ThreadPool& pool);  // throws std::invalid_argument (TWINFER_CPU_ISA)
  ~MoEEngine();
  MoEEngine(const MoEEngine&) = delete;
  MoEEngine& operator=(const MoEEngine&) = delete;

  int add_layer(ExpertLayer* layer);
  // Synchronous step; throws std::invalid_argument on bad input (nothing computed then).
  void forward(int layer, const StepIO& io, int num_tokens);
  void bind_buffers(const StepIO& io, int max_tokens);
  void set_num_tokens(int n);
  void submit(int layer, int num_tokens);  // async on the bound buffers
  void wait();                             // throws std::runtime_error if the step failed
  void enqueue(uintptr_t stream, int layer, int num_tokens);  // hostfn.cpp
  void enqueue_wait(uintptr_t stream);                        // hostfn.cpp
  void enqueue_run(uintptr_t stream, int layer, int num_tokens);  // both in one host function
  // Stream signals (hostfn.cpp): the stream writes a word in pinned memory that a listener thread
  // polls, and waits for the listener's answer in another: no host function, no interrupt.
  bool signals_available() const;  // the driver has the stream memory operations
  void bind_signals(uintptr_t ready, uintptr_t done, int spin_us);  // starts the listener
  void enqueue_signal(uintptr_t stream, int layer, int num_tokens);

  // Host-function bodies: never throw, errors go to last_error.
  void start_async(int layer, int num_tokens) noexcept;
  void wait_async() noexcept;

  std::string take_error();
  struct Stats {
    uint64_t steps = 0, busy_ns = 0, phase_ns[3] = {0, 0, 0};
    uint64_t kernel_ns = 0;  // summed over workers: divide by threads * busy_ns for the share
  };
  Stats stats() const;
  ThreadPool& pool() const { return pool_; }
  Isa isa() const { return isa_; }
  int num_layers() const { return static_cast<int>(layers_.size()); }

 private:
  LaunchRecord* launch_record(int layer, int num_tokens);  // cached per (layer, tokens)
  void listen();       // the listener thread's loop (hostfn.cpp)
  void stop_signals();  // joins the listener
  void check_io(const StepIO& io, int num_tokens) const;
  bool launch(int layer, const StepIO& io, int n, bool strict, std::string* err) noexcept;
  bool prepare(ExpertLayer* layer, const StepIO& io, int n, bool strict, std::string* err);
  void record_error(const std::string& msg);
  static void job(void* ctx, int w);
  void phase_gather(int w);
  void phase_gate_up(int w);
  void phase_down(int w);
  void phase_reduce(int w);
  void add_kernel_time(int w, int64_t ns);

  ThreadPool& pool_;
  Isa isa_;
  std::vector<ExpertLayer*> layers_;
  std::mutex step_mu_;  // prepare + start of one step at a time
  std::mutex err_mu_;
  std::string error_;

  // async path
  StepIO bound_;
  int max_tokens_ = 0;
  std::atomic<int> active_tokens_{INT32_MAX};
  std::mutex launch_mu_;
  std::map<std::pair<int, int>, std::unique_ptr<LaunchRecord>> launches_;  // (layer, tokens)
  std::atomic<uint32_t>* ready_ = nullptr;  // pinned: (tokens << 12) | (layer + 1), 0 = none
  std::atomic<uint32_t>* answered_ = nullptr;  // pinned: the code of the step done, 0 = none
  int listen_spin_us_ = 0;
  std::atomic<bool> stop_listener_{false};
  std::thread listener_;

  // ---- the step in flight (written by prepare before the job starts) ----
  ExpertLayer* cur_ = nullptr;
  StepIO io_;
  int n_ = 0, S_ = 0, G_ = 0;
  std::vector<int> active_;                // experts with slots, ascending id
  Scratch<int> count_, offset_, slot_expert_, slot_token_;
  Scratch<float> slot_weight_;
  Scratch<float> xs_f32_, act_, up_, y_, acc_;  // [T + S, H], [S, I], [S, I], [S, H], [T, H]
  Scratch<uint16_t> xs_bf16_, act_bf16_;   // [T + S, H], [S, I]
  Scratch<int> gather_dst_, gather_src_;   // [G]: xs row <- hidden row
  Scratch<uint8_t> token_seen_;            // [T]
  struct alignas(64) Worker {
    std::atomic<uint64_t> kernel_ns{0};  // time inside matmul_rows (written by its worker)
  };
  std::unique_ptr<Worker[]> workers_;
  std::atomic<int> finishing_{0};
  int64_t t_start_ = 0, t_gather_ = 0, t_gate_up_ = 0;

  std::atomic<uint64_t> steps_{0}, busy_ns_{0}, phase_ns_[3] = {};
};

}  // namespace twinfer
