// The Python module `twinfer.native._engine` (nanobind): each binding below says its arguments.
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size.
// Pointers are ints (torch's data_ptr()), dtypes are strings. Every call that computes or waits
// releases the GIL; C++ std::invalid_argument surfaces as ValueError, std::runtime_error as
// RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace twinfer {

long long read_sum_avx512(const void* p, size_t bytes);  // bandwidth_avx512.cpp
long long read_sum_avx2(const void* p, size_t bytes);    // bandwidth_avx2.cpp

namespace {

using Release = nb::call_guard<nb::gil_scoped_release>;

DType parse_dtype(const std::string& name, const char* what) {
  DType dt;
  if (!dtype_from_name(name, &dt))
    throw std::invalid_argument(std::string(what) + " dtype '" + name +
                                "' is not one of f32, bf16, f16, int32, int64");
  return dt;
}

WFormat parse_format(const std::string& name) {
  WFormat f;
  if (!wformat_from_name(name, &f))
    throw std::invalid_argument("weight format '" + name +
                                "' is not one of f32, bf16, f16, int8, int4, fp8, int4z");
  return f;
}

const void* ptr(uintptr_t p, const char* what) {
  if (p == 0) throw std::invalid_argument(std::string(what) + " pointer is 0 (null)");
  return reinterpret_cast<const void*>(p);
}

PackedLayout layout(const std::string& fmt, int rows, int cols, int group_size) {
  if (rows < 1 || cols < 1)
    throw std::invalid_argument("rows and cols must be >= 1 (got " + std::to_string(rows) + ", " +
                                std::to_string(cols) + ")");
  const WFormat f = parse_format(fmt);
  return packed_layout(f, rows, cols, is_grouped(f) ? group_size : 0);
}

WFormat weight_dtype(const std::string& name) {
  WFormat f;
  if (!weight_source_from_name(name, &f))
    throw std::invalid_argument("weight dtype '" + name + "' is not one of f32, bf16, f16, fp8");
  return f;
}

nb::dict cpu_features_dict() {
  const CpuFeatures f = detect_cpu_features();
  nb::dict d;
  d["avx2"] = f.avx2, d["fma"] = f.fma, d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f, d["avx512bw"] = f.avx512bw, d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq, d["avx512_bf16"] = f.avx512_bf16;
  d["avx512_vnni"] = f.avx512_vnni, d["amx_tile"] = f.amx_tile, d["amx_bf16"] = f.amx_bf16;
  d["amx_int8"] = f.amx_int8;
  d["isa"] = isa_name(best_isa(f));
  return d;
}

// Grouped formats: group_scales / group_offsets (0: none, the format derives them) are f32
// [rows, cols / group_size] (see pack_matrix).
void pack_unpack(const std::string& fmt, int rows, int cols, int group_size, uintptr_t src,
                 const std::string& src_dtype, uintptr_t out, uintptr_t group_scales,
                 uintptr_t group_offsets) {
  const PackedLayout lay = layout(fmt, rows, cols, group_size);
  Scratch<uint8_t> packed;
  packed.grow(lay.bytes);
  pack_matrix(lay, ptr(src, "src"), weight_dtype(src_dtype), cols, packed.data(),
              reinterpret_cast<const float*>(group_scales),
              reinterpret_cast<const float*>(group_offsets));
  unpack_matrix(lay, packed.data(), static_cast<float*>(const_cast<void*>(ptr(out, "out"))));
}

// y [n, rows] = x [n, cols] @ W^T, W packed first. x's bf16 copy goes along (x_bf16) so the
// bf16-consuming paths get tested; threads_split checks that a row split keeps the bits.
void matmul(const std::string& fmt, int rows, int cols, int group_size, uintptr_t w,
            const std::string& w_dtype, uintptr_t x, int n, uintptr_t y, const std::string& isa,
            int threads_split, bool x_bf16, uintptr_t group_scales, uintptr_t group_offsets) {
  const PackedLayout lay = layout(fmt, rows, cols, group_size);
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  if (threads_split < 1) throw std::invalid_argument("threads_split must be >= 1");
  const Isa use = resolve_isa(isa);
  Scratch<uint8_t> packed;
  packed.grow(lay.bytes);
  pack_matrix(lay, ptr(w, "w"), weight_dtype(w_dtype), cols, packed.data(),
              reinterpret_cast<const float*>(group_scales),
              reinterpret_cast<const float*>(group_offsets));
  const auto* xf = static_cast<const float*>(ptr(x, "x"));
  auto* yf = static_cast<float*>(const_cast<void*>(ptr(y, "y")));
  Scratch<uint16_t> xb;
  xb.grow(std::max<size_t>(size_t(n) * cols, 1));
  for (size_t i = 0; i < size_t(n) * cols; ++i) xb.data()[i] = f32_to_bf16(xf[i]);
  const Activations act{xf, x_bf16 ? xb.data() : nullptr, cols, n};
  for (int k = 0; k < threads_split; ++k) {
    const int r0 = int(int64_t(rows) * k / threads_split);
    const int r1 = int(int64_t(rows) * (k + 1) / threads_split);
    matmul_rows(use, lay, packed.data(), r0, r1, act, yf + r0, rows);
  }
}

// Best of `repeats` passes of every worker reading its own part of node-local buffers.
double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int repeats) {
  if (bytes < (size_t(1) << 20)) throw std::invalid_argument("bytes must be >= 1 MiB");
  if (repeats < 1) throw std::invalid_argument("repeats must be >= 1");
  const CpuFeatures f = detect_cpu_features();
  const bool z = f.avx512f, a2 = f.avx2;
  const int n = pool.num_threads();
  const size_t per_worker = (bytes / n + 4095) / 4096 * 4096;  // page multiples, 64-B aligned
  std::vector<NodeBuffer> bufs;
  for (int g = 0; g < pool.num_groups(); ++g) {
    bufs.emplace_back(per_worker * pool.group_size(g), pool.group_nodes()[g], true);
    first_touch(pool, g, bufs.back().data(), bufs.back().size());
  }
  std::vector<long long> sink(size_t(n) * 8);  // one cache line per worker
  auto read = [&](int w) {
    const auto* p = static_cast<const uint8_t*>(bufs[pool.group_of(w)].data()) +
                    per_worker * pool.rank_in_group(w);
    long long s = 0;
    if (z) {
      s = read_sum_avx512(p, per_worker);
    } else if (a2) {
      s = read_sum_avx2(p, per_worker);
    } else {
      const auto* q = reinterpret_cast<const long long*>(p);
      for (size_t i = 0; i < per_worker / 8; ++i) s += q[i];
    }
    sink[size_t(w) * 8] = s;
  };
  pool.run_fn(read);  // warm-up: TLB, spinning workers
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.run_fn(read);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count());
  }
  return double(per_worker) * n / best / 1e9;
}

StepIO step_io(uintptr_t hidden, const std::string& hidden_dt, uintptr_t ids,
               const std::string& ids_dt, uintptr_t weights, const std::string& weights_dt,
               uintptr_t out, int top_k) {
  StepIO io;
  io.hidden = ptr(hidden, "hidden");
  io.hidden_dt = parse_dtype(hidden_dt, "hidden");
  io.ids = ptr(ids, "ids");
  io.ids_dt = parse_dtype(ids_dt, "ids");
  io.weights = ptr(weights, "weights");
  io.weights_dt = parse_dtype(weights_dt, "weights");
  io.out = const_cast<void*>(ptr(out, "out"));
  io.top_k = top_k;
  return io;
}

nb::list shard_plan(const ExpertLayer& layer) {
  nb::list out;
  for (size_t g = 0; g < layer.shards().size(); ++g) {
    const ExpertShard& s = layer.shards()[g];
    nb::dict d;
    d["node"] = s.node, d["inner_begin"] = s.i0, d["inner_end"] = s.i1;
    d["hidden_begin"] = s.h0, d["hidden_end"] = s.h1;
    d["threads"] = layer.pool().group_size(static_cast<int>(g));
    d["bound"] = s.arena.bound();
    // Where the packed bytes live (GPU streaming copies the arena and reads it in place):
    // expert e's gate, up and down start at arena + e * stride + {0, up_off, down_off}.
    d["arena_ptr"] = reinterpret_cast<uintptr_t>(s.arena.data());
    d["arena_bytes"] = s.stride * static_cast<size_t>(layer.num_experts());
    d["stride"] = s.stride, d["up_off"] = s.up_off, d["down_off"] = s.down_off;
    out.append(d);
  }
  return out;
}

nb::dict stats_dict(const MoEEngine& eng) {
  const MoEEngine::Stats s = eng.stats();
  nb::dict d;
  d["steps"] = s.steps;
  d["busy_ns"] = s.busy_ns;
  d["kernel_ns"] = s.kernel_ns;
  nb::list phases;
  for (uint64_t p : s.phase_ns) phases.append(p);
  d["phase_ns"] = phases;
  return d;
}

}  // namespace
}  // namespace twinfer

NB_MODULE(_engine, m) {
  using namespace twinfer;
  m.doc() = "twinfer's native CPU expert engine (thread pool, NUMA shards, kernels)";
  m.def("cpu_features", &cpu_features_dict);
  m.def("isa_names", [] {
    std::vector<std::string> names;
    for (int i = 0; i <= static_cast<int>(Isa::Amx); ++i) names.push_back(isa_name(Isa(i)));
    return names;
  });
  m.def("packed_bytes", [](const std::string& fmt, int rows, int cols, int group_size) {
    return layout(fmt, rows, cols, group_size).bytes;
  }, "fmt"_a, "rows"_a, "cols"_a, "group_size"_a = 128);
  m.def("pack_unpack", &pack_unpack, "fmt"_a, "rows"_a, "cols"_a, "group_size"_a, "src_ptr"_a,
        "src_dtype"_a, "out_f32_ptr"_a, "group_scales_ptr"_a = uintptr_t{0},
        "group_offsets_ptr"_a = uintptr_t{0}, Release());
  m.def("matmul", &matmul, "fmt"_a, "rows"_a, "cols"_a, "group_size"_a, "w_ptr"_a, "w_dtype"_a,
        "x_ptr"_a, "n"_a, "y_ptr"_a, "isa"_a = "", "threads_split"_a = 1, "x_bf16"_a = true,
        "group_scales_ptr"_a = uintptr_t{0}, "group_offsets_ptr"_a = uintptr_t{0}, Release());

  nb::class_<ThreadPool>(m, "ThreadPool")
      .def(nb::init<const std::vector<std::vector<int>>&, const std::vector<int>&, int>(),
           "cpus"_a, "nodes"_a, "spin_us"_a = 200)
      .def_prop_ro("num_threads", &ThreadPool::num_threads)
      .def_prop_ro("nodes", [](const ThreadPool& p) { return p.nodes(); })
      .def_prop_ro("cpus", [](const ThreadPool& p) { return p.cpus(); })
      .def_prop_rw("spin_us", &ThreadPool::spin_us, &ThreadPool::set_spin_us);

  nb::class_<ExpertLayer>(m, "ExpertLayer")
      .def("__init__",
           [](ExpertLayer* self, ThreadPool& pool, int num_experts, int hidden, int inner,
              const std::string& fmt, int group_size, bool bind_memory) {
             new (self) ExpertLayer(pool, num_experts, hidden, inner, parse_format(fmt),
                                    group_size, bind_memory);
           },
           "pool"_a, "num_experts"_a, "hidden"_a, "inner"_a, "fmt"_a, "group_size"_a = 128,
           "bind_memory"_a = true, nb::keep_alive<1, 2>())
      .def("load_expert",
           [](ExpertLayer& l, int e, uintptr_t w13, uintptr_t w2, const std::string& dt) {
             l.load_experts({e}, {ptr(w13, "w13")}, {ptr(w2, "w2")}, weight_dtype(dt));
           },
           "e"_a, "w13_ptr"_a, "w2_ptr"_a, "src_dtype"_a, Release())
      .def("load_experts",
           [](ExpertLayer& l, const std::vector<int>& experts, const std::vector<uintptr_t>& w13,
              const std::vector<uintptr_t>& w2, const std::string& dt,
              const std::vector<uintptr_t>& w13_scales, const std::vector<uintptr_t>& w2_scales,
              const std::vector<uintptr_t>& w13_offsets, const std::vector<uintptr_t>& w2_offsets) {
             const WFormat src = weight_dtype(dt);
             std::vector<const void*> a, b;
             for (uintptr_t p : w13) a.push_back(ptr(p, "w13"));
             for (uintptr_t p : w2) b.push_back(ptr(p, "w2"));
             auto floats = [](const std::vector<uintptr_t>& ps, const char* what) {
               std::vector<const float*> out;
               for (uintptr_t p : ps) out.push_back(static_cast<const float*>(ptr(p, what)));
               return out;
             };
             l.load_experts(experts, a, b, src, floats(w13_scales, "w13_scales"),
                            floats(w2_scales, "w2_scales"), floats(w13_offsets, "w13_offsets"),
                            floats(w2_offsets, "w2_offsets"));
           },
           "experts"_a, "w13_ptrs"_a, "w2_ptrs"_a, "src_dtype"_a,
           "w13_scale_ptrs"_a = std::vector<uintptr_t>{}, "w2_scale_ptrs"_a = std::vector<uintptr_t>{},
           "w13_offset_ptrs"_a = std::vector<uintptr_t>{},
           "w2_offset_ptrs"_a = std::vector<uintptr_t>{}, Release())
      .def_prop_ro("bytes", &ExpertLayer::bytes)
      .def_prop_ro("loaded", &ExpertLayer::loaded_list)
      .def_prop_ro("format", [](const ExpertLayer& l) { return wformat_name(l.format()); })
      .def_prop_ro("group_size", &ExpertLayer::group_size)
      .def_prop_ro("num_experts", &ExpertLayer::num_experts)
      .def_prop_ro("hidden", &ExpertLayer::hidden)
      .def_prop_ro("inner", &ExpertLayer::inner)
      .def("shard_plan", &shard_plan);

  nb::class_<MoEEngine>(m, "MoEEngine")
      .def(nb::init<ThreadPool&>(), "pool"_a, nb::keep_alive<1, 2>())
      .def("add_layer", &MoEEngine::add_layer, "layer"_a, nb::keep_alive<1, 2>(), Release())
      .def("forward",
           [](MoEEngine& e, int layer, uintptr_t hidden, const std::string& hidden_dt,
              uintptr_t ids, const std::string& ids_dt, uintptr_t weights,
              const std::string& weights_dt, uintptr_t out, int num_tokens, int top_k) {
             e.forward(layer, step_io(hidden, hidden_dt, ids, ids_dt, weights, weights_dt, out,
                                      top_k), num_tokens);
           },
           "layer_id"_a, "hidden_ptr"_a, "hidden_dtype"_a, "ids_ptr"_a, "ids_dtype"_a,
           "weights_ptr"_a, "weights_dtype"_a, "out_ptr"_a, "num_tokens"_a, "top_k"_a, Release())
      .def("bind_buffers",
           [](MoEEngine& e, uintptr_t hidden, const std::string& hidden_dt, uintptr_t ids,
              const std::string& ids_dt, uintptr_t weights, const std::string& weights_dt,
              uintptr_t out, int max_tokens, int top_k) {
             e.bind_buffers(step_io(hidden, hidden_dt, ids, ids_dt, weights, weights_dt, out,
                                    top_k), max_tokens);
           },
           "hidden_ptr"_a, "hidden_dtype"_a, "ids_ptr"_a, "ids_dtype"_a, "weights_ptr"_a,
           "weights_dtype"_a, "out_ptr"_a, "max_tokens"_a, "top_k"_a, Release())
      .def("set_num_tokens", &MoEEngine::set_num_tokens, "n"_a)
      .def("submit", &MoEEngine::submit, "layer_id"_a, "num_tokens"_a, Release())
      .def("wait", &MoEEngine::wait, Release())
      .def("enqueue", &MoEEngine::enqueue, "stream"_a, "layer_id"_a, "num_tokens"_a, Release())
      .def("enqueue_wait", &MoEEngine::enqueue_wait, "stream"_a, Release())
      .def("enqueue_run", &MoEEngine::enqueue_run, "stream"_a, "layer_id"_a, "num_tokens"_a,
           Release())
      .def("signals_available", &MoEEngine::signals_available)
      .def("bind_signals", &MoEEngine::bind_signals, "ready_ptr"_a, "done_ptr"_a, "spin_us"_a,
           Release())
      .def("enqueue_signal", &MoEEngine::enqueue_signal, "stream"_a, "layer_id"_a,
           "num_tokens"_a, Release())
      .def("last_error", &MoEEngine::take_error)
      .def("stats", &stats_dict)
      .def_prop_ro("isa", [](const MoEEngine& e) { return isa_name(e.isa()); })
      .def_prop_ro("num_layers", &MoEEngine::num_layers);

  m.def("measure_read_bandwidth", &measure_read_bandwidth, "pool"_a, "bytes"_a,
        "repeats"_a = 5, Release());
}
