// ExpertLayer: one MoE layer's host experts, packed once and sharded over the pool's NUMA nodes;
// plus the dtype names and the isa choice shared by the engine and the bindings.
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size.
// Per expert and node shard n: gate [i1-i0, H], up [i1-i0, H] (the node's I-slice) and down
// [h1-h0, I] (the node's H-slice, all I columns), packed by the kernels' pack_matrix into one
// 64-byte aligned block of the shard's arena. Gate and up are two matrices, not one of 2(i1-i0)
// rows: in w13 they are I rows apart, and pack_matrix takes a single row stride.
#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "engine.h"

namespace twinfer {

namespace {

size_t align64(size_t n) { return (n + 63) / 64 * 64; }

PackedLayout layout_or_empty(WFormat fmt, int rows, int cols, int group) {
  if (rows > 0) return packed_layout(fmt, rows, cols, is_grouped(fmt) ? group : 0);
  PackedLayout lay;  // a node with no rows of this matrix (tiny shapes): nothing to pack
  lay.format = fmt;
  lay.cols = cols;
  lay.group_size = is_grouped(fmt) ? group : 0;
  return lay;
}

std::string str(int v) { return std::to_string(v); }

}  // namespace

// ---- dtypes and the isa -------------------------------------------------------------------------
bool dtype_from_name(std::string_view name, DType* out) {
  if (name.substr(0, 6) == "torch.") name.remove_prefix(6);
  static const std::pair<std::string_view, DType> kNames[] = {
      {"f32", DType::F32},  {"float32", DType::F32}, {"float", DType::F32},
      {"bf16", DType::BF16}, {"bfloat16", DType::BF16}, {"f16", DType::F16},
      {"float16", DType::F16}, {"half", DType::F16},  {"int32", DType::I32},
      {"i32", DType::I32},  {"int64", DType::I64},   {"i64", DType::I64},  {"long", DType::I64}};
  for (const auto& [n, d] : kNames)
    if (n == name) return *out = d, true;
  return false;
}

size_t dtype_bytes(DType dt) {
  switch (dt) {
    case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::I64: return 8;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  static const char* kNames[] = {"f32", "bf16", "f16", "int32", "int64"};
  return kNames[static_cast<int>(dt)];
}

bool wformat_from_name(std::string_view name, WFormat* out) {
  static const std::pair<std::string_view, WFormat> kNames[] = {
      {"f32", WFormat::F32}, {"bf16", WFormat::BF16}, {"f16", WFormat::F16},
      {"int8", WFormat::INT8}, {"int4", WFormat::INT4}, {"fp8", WFormat::FP8},
      {"int4z", WFormat::INT4Z}};
  for (const auto& [n, f] : kNames)
    if (n == name) return *out = f, true;
  return false;
}

const char* wformat_name(WFormat f) {
  static const char* kNames[] = {"f32", "bf16", "f16", "int8", "int4", "fp8", "int4z"};
  return kNames[static_cast<int>(f)];
}

WFormat wformat_of(DType dt) {
  return dt == DType::F32 ? WFormat::F32 : dt == DType::F16 ? WFormat::F16 : WFormat::BF16;
}

bool weight_source_from_name(std::string_view name, WFormat* out) {
  std::string_view bare = name.substr(0, 6) == "torch." ? name.substr(6) : name;
  if (bare == "fp8" || bare == "float8_e4m3fn" || bare == "f8e4m3")
    return *out = WFormat::FP8, true;
  DType dt;
  if (!dtype_from_name(name, &dt) || dt == DType::I32 || dt == DType::I64) return false;
  return *out = wformat_of(dt), true;
}

Isa resolve_isa(std::string_view requested) {
  // NOTE: best_isa() already applies TWINFER_CPU_ISA as a cap; a requested level above the
  // result means the CPU lacks it, which must be an error, not a silent downgrade.
  const Isa best = best_isa(detect_cpu_features());
  std::string name(requested);
  std::string source = "isa";
  if (name.empty()) {
    const char* env = std::getenv("TWINFER_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    name = env;
    source = "TWINFER_CPU_ISA";
  }
  Isa isa;
  if (!isa_from_name(name.c_str(), &isa))
    throw std::invalid_argument(source + "=" + name +
                                " is not one of scalar, avx2, avx512, avx512_bf16, amx");
  if (static_cast<int>(isa) > static_cast<int>(best))
    throw std::invalid_argument(source + "=" + name + " but this CPU runs at most " +
                                isa_name(best) + "; choose " + isa_name(best) + " or lower");
  return isa;
}

// ---- ExpertLayer --------------------------------------------------------------------------------
ExpertLayer::ExpertLayer(ThreadPool& pool, int num_experts, int hidden, int inner, WFormat fmt,
                         int group_size, bool bind_memory)
    : pool_(pool), E_(num_experts), H_(hidden), I_(inner), fmt_(fmt),
      group_(is_grouped(fmt) ? group_size : 0) {
  if (E_ < 1 || H_ < 1 || I_ < 1)
    throw std::invalid_argument("ExpertLayer: num_experts, hidden and inner must be >= 1 (got " +
                                str(E_) + ", " + str(H_) + ", " + str(I_) + ")");
  const int groups = pool.num_groups();
  std::vector<int> weights(groups);
  for (int g = 0; g < groups; ++g) weights[g] = pool.group_size(g);
  const std::vector<int> ib = split_proportional(I_, weights), hb = split_proportional(H_, weights);
  shards_.resize(groups);
  for (int g = 0; g < groups; ++g) {
    ExpertShard& s = shards_[g];
    s.node = pool.group_nodes()[g];
    s.i0 = ib[g], s.i1 = ib[g + 1], s.h0 = hb[g], s.h1 = hb[g + 1];
    // packed_layout throws std::invalid_argument on a bad group size: the error the user sees.
    s.gate = layout_or_empty(fmt, s.i1 - s.i0, H_, group_size);
    s.up = s.gate;
    s.down = layout_or_empty(fmt, s.h1 - s.h0, I_, group_size);
    s.up_off = align64(s.gate.bytes);
    s.down_off = s.up_off + align64(s.up.bytes);
    s.stride = s.down_off + align64(s.down.bytes);
    expert_bytes_ += s.gate.bytes + s.up.bytes + s.down.bytes;
    // NOTE: one reservation per (layer, node) for all E experts: untouched pages cost no RAM,
    // so a layer holding only some experts pays only for those (up to a huge page at the seams).
    s.arena = NodeBuffer(s.stride * static_cast<size_t>(E_), s.node, bind_memory);
  }
  parts_.resize(pool.num_threads());
  for (int w = 0; w < pool.num_threads(); ++w) {
    const ExpertShard& s = shards_[pool.group_of(w)];
    const int m = pool.group_size(pool.group_of(w)), r = pool.rank_in_group(w);
    const auto [ia, ibb] = split_even(s.i1 - s.i0, m, r);
    const auto [ha, hbb] = split_even(s.h1 - s.h0, m, r);
    parts_[w] = WorkerPart{ia, ibb, ha, hbb};
  }
  loaded_.assign(E_, 0);
}

void ExpertLayer::load_experts(const std::vector<int>& experts,
                               const std::vector<const void*>& w13,
                               const std::vector<const void*>& w2, WFormat src,
                               const std::vector<const float*>& w13_scales,
                               const std::vector<const float*>& w2_scales,
                               const std::vector<const float*>& w13_offsets,
                               const std::vector<const float*>& w2_offsets) {
  const std::string fmt = wformat_name(fmt_);
  if (w13.size() != experts.size() || w2.size() != experts.size())
    throw std::invalid_argument("load_experts: experts, w13 and w2 need one entry each");
  const bool grid = !w13_scales.empty() || !w2_scales.empty();
  const bool offs = !w13_offsets.empty() || !w2_offsets.empty();
  if (grid && (!is_grouped(fmt_) || w13_scales.size() != experts.size() ||
               w2_scales.size() != experts.size()))
    throw std::invalid_argument(
        "load_experts: group scales need an int4, int4z or fp8 layer (this one is " + fmt +
        ") and one w13 and one w2 entry per expert");
  if (offs && (fmt_ != WFormat::INT4Z || !grid || w13_offsets.size() != experts.size() ||
               w2_offsets.size() != experts.size()))
    throw std::invalid_argument(
        "load_experts: group offsets need an int4z layer (this one is " + fmt +
        "), group scales, and one w13 and one w2 entry per expert");
  for (int e : experts)
    if (e < 0 || e >= E_)
      throw std::invalid_argument("load_expert: expert " + str(e) + " is outside [0, " +
                                  str(E_) + ")");
  if (src != WFormat::F32 && src != WFormat::BF16 && src != WFormat::F16 && src != WFormat::FP8)
    throw std::invalid_argument("load_expert: src_dtype must be f32, bf16, f16 or fp8");
  if (src == WFormat::FP8 && fmt_ != WFormat::FP8)
    throw std::invalid_argument("load_expert: fp8 weights load only into an fp8 layer (this one "
                                "is " + fmt + "); pass float weights to quantize to " + fmt);
  if (src == WFormat::FP8 && !grid)
    throw std::invalid_argument("load_expert: fp8 weights need their group scales (w13 [2I, H/" +
                                str(group_) + "], w2 [H, I/" + str(group_) + "] f32 per expert)");
  const size_t eb = src == WFormat::F32 ? 4 : src == WFormat::FP8 ? 1 : 2;
  std::mutex mu;
  std::string err;
  // The workers of each shard's node pack its matrices (3 per expert, dealt round-robin): the
  // first touch is then on that node, and packing (load time) runs on every core.
  auto pack = [&](int w) {
    const int g = pool_.group_of(w), m = pool_.group_size(g), r = pool_.rank_in_group(w);
    const ExpertShard& s = shards_[g];
    for (size_t task = r; task < 3 * experts.size(); task += m) {
      const size_t j = task / 3;
      auto* blk = static_cast<uint8_t*>(s.arena.data()) + s.stride * experts[j];
      const auto* a = static_cast<const uint8_t*>(w13[j]);
      const auto* b = static_cast<const uint8_t*>(w2[j]);
      // A shard's rows of the group scales / offsets, as of the weights (gate and up I rows apart).
      const size_t gh = grid ? size_t(H_ / group_) : 0, gi = grid ? size_t(I_ / group_) : 0;
      const float* sa = grid ? w13_scales[j] : nullptr;
      const float* sb = grid ? w2_scales[j] : nullptr;
      const float* ma = offs ? w13_offsets[j] : nullptr;
      const float* mb = offs ? w2_offsets[j] : nullptr;
      auto rows = [](const float* p, size_t row, size_t n) { return p ? p + row * n : nullptr; };
      try {
        if (task % 3 == 0 && s.gate.rows > 0)
          pack_matrix(s.gate, a + size_t(s.i0) * H_ * eb, src, H_, blk, rows(sa, s.i0, gh),
                      rows(ma, s.i0, gh));
        if (task % 3 == 1 && s.up.rows > 0)
          pack_matrix(s.up, a + size_t(I_ + s.i0) * H_ * eb, src, H_, blk + s.up_off,
                      rows(sa, I_ + s.i0, gh), rows(ma, I_ + s.i0, gh));
        if (task % 3 == 2 && s.down.rows > 0)
          pack_matrix(s.down, b + size_t(s.h0) * I_ * eb, src, I_, blk + s.down_off,
                      rows(sb, s.h0, gi), rows(mb, s.h0, gi));
      } catch (const std::exception& ex) {  // never let an exception out of a worker
        std::lock_guard<std::mutex> lock(mu);
        err = ex.what();
      }
    }
  };
  pool_.run_fn(pack);
  if (!err.empty()) throw std::invalid_argument("load_expert: " + err);
  for (int e : experts) {
    if (!loaded_[e]) bytes_ += expert_bytes_;
    loaded_[e] = 1;
  }
}

std::vector<int> ExpertLayer::loaded_list() const {
  std::vector<int> out;
  for (int e = 0; e < E_; ++e)
    if (loaded_[e]) out.push_back(e);
  return out;
}

}  // namespace twinfer
