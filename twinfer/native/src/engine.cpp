// MoEEngine: one MoE layer step = one pool job (ExpertLayer: expert_layer.cpp).
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size, S routed slots, n_e slots
// of expert e; [lo, hi) ranges are rows of the packed matrices.
// A step: the submitter does the bookkeeping (validate ids, count slots per loaded expert, order
// slots by ascending expert id, grow scratch), then one pool job runs four phases:
//   (0) gather:  x rows = hidden rows as f32 (+ bf16), rows split over all workers; barrier
//   (1) gate_up: act[s, i] = silu(gate_i . x_s) * (up_i . x_s); the workers of node n split node
//                n's I-slice of EVERY active expert (balance does not depend on the routing);
//                barrier
//   (2) down:    y[s, h] = down_h . act[s]; the workers of node n split its H-slice likewise;
//                barrier. (1) and (2) split in 16-row blocks and rotate the leftover blocks over
//                the experts (split_even's round), so 48 blocks on 14 threads balance over a step.
//   (3) reduce:  out[t, h] = sum over slots s of t in slot order (ascending expert id) of
//                w_s * y[s, h], accumulated in f32; worker w owns fixed columns: no atomics, one
//                summation order, so the bits depend neither on threads nor on nodes.
// Activations go to the kernels as f32 plus their bf16 rounding: bf16 kernels take the rounding as
// the high part and correct with f32 - high themselves, so accuracy stays f32-like; making the
// copy once per slot here saves every worker converting the same rows on every call.
// Tokens routed to no loaded expert get zeros; rows past num_tokens are never written.
#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace twinfer {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string str(int v) { return std::to_string(v); }

}  // namespace

// ---- MoEEngine: setup and the synchronous / async entry points ----------------------------------
MoEEngine::MoEEngine(ThreadPool& pool) : pool_(pool), isa_(resolve_isa("")) {
  workers_ = std::make_unique<Worker[]>(pool.num_threads());
}

MoEEngine::~MoEEngine() {
  stop_signals();
  pool_.wait();
}

int MoEEngine::add_layer(ExpertLayer* layer) {
  if (&layer->pool() != &pool_)
    throw std::invalid_argument("add_layer: the layer was built on another ThreadPool");
  std::lock_guard<std::mutex> lock(step_mu_);
  pool_.wait();  // a step in flight iterates layers_
  layers_.push_back(layer);
  return static_cast<int>(layers_.size()) - 1;
}

void MoEEngine::check_io(const StepIO& io, int num_tokens) const {
  if (!io.hidden || !io.ids || !io.weights || !io.out)
    throw std::invalid_argument("hidden, ids, weights and out pointers must be non-zero");
  if (io.hidden_dt != DType::F32 && io.hidden_dt != DType::BF16 && io.hidden_dt != DType::F16)
    throw std::invalid_argument("hidden dtype must be bf16, f16 or f32 (out has the same dtype)");
  if (io.ids_dt != DType::I32 && io.ids_dt != DType::I64)
    throw std::invalid_argument("ids dtype must be int32 or int64");
  if (io.weights_dt != DType::F32 && io.weights_dt != DType::BF16 && io.weights_dt != DType::F16)
    throw std::invalid_argument("weights dtype must be bf16, f16 or f32");
  if (io.top_k < 1) throw std::invalid_argument("top_k must be >= 1, got " + str(io.top_k));
  if (num_tokens < 0) throw std::invalid_argument("num_tokens must be >= 0");
}

void MoEEngine::forward(int layer, const StepIO& io, int num_tokens) {
  if (layer < 0 || layer >= num_layers())
    throw std::invalid_argument("layer id " + str(layer) + " is not one of the " +
                                str(num_layers()) + " added layers");
  check_io(io, num_tokens);
  std::string err;
  if (!launch(layer, io, num_tokens, /*strict=*/true, &err)) throw std::invalid_argument(err);
  pool_.wait();
}

void MoEEngine::bind_buffers(const StepIO& io, int max_tokens) {
  check_io(io, max_tokens);
  std::lock_guard<std::mutex> lock(step_mu_);
  pool_.wait();
  bound_ = io;
  max_tokens_ = max_tokens;
}

void MoEEngine::set_num_tokens(int n) {
  // Before bind_buffers any n is taken: the cap meets the bound size at submit / enqueue.
  if (n < 0 || (bound_.out && n > max_tokens_))
    throw std::invalid_argument("set_num_tokens(" + str(n) + "): the bound buffers hold " +
                                str(max_tokens_) + " tokens (bind_buffers' max_tokens)");
  active_tokens_.store(n, std::memory_order_relaxed);
}

void MoEEngine::submit(int layer, int num_tokens) {
  if (!bound_.out) throw std::invalid_argument("submit: call bind_buffers first");
  if (layer < 0 || layer >= num_layers())
    throw std::invalid_argument("layer id " + str(layer) + " is not one of the " +
                                str(num_layers()) + " added layers");
  if (num_tokens < 0 || num_tokens > max_tokens_)
    throw std::invalid_argument("num_tokens " + str(num_tokens) + " exceeds the bound buffers' " +
                                str(max_tokens_) + " tokens");
  start_async(layer, num_tokens);
}

void MoEEngine::wait() {
  wait_async();
  std::string err = take_error();
  if (!err.empty()) throw std::runtime_error(err);
}

void MoEEngine::start_async(int layer, int num_tokens) noexcept {
  std::string err;
  if (layer < 0 || layer >= num_layers() || !bound_.out) {
    record_error("async step: layer " + std::to_string(layer) + " unknown or no bound buffers");
    return;
  }
  const int n = std::min(num_tokens, active_tokens_.load(std::memory_order_relaxed));
  if (!launch(layer, bound_, n, /*strict=*/false, &err)) record_error(err);
}

void MoEEngine::wait_async() noexcept { pool_.wait(); }

void MoEEngine::record_error(const std::string& msg) {
  std::lock_guard<std::mutex> lock(err_mu_);
  if (error_.empty()) error_ = msg;  // the first error explains the rest
}

std::string MoEEngine::take_error() {
  std::lock_guard<std::mutex> lock(err_mu_);
  return std::exchange(error_, std::string());
}

MoEEngine::Stats MoEEngine::stats() const {
  Stats s;
  s.steps = steps_.load();
  s.busy_ns = busy_ns_.load();
  for (int i = 0; i < 3; ++i) s.phase_ns[i] = phase_ns_[i].load();
  for (int w = 0; w < pool_.num_threads(); ++w) s.kernel_ns += workers_[w].kernel_ns.load();
  return s;
}

// ---- one step -----------------------------------------------------------------------------------
bool MoEEngine::launch(int layer, const StepIO& io, int n, bool strict, std::string* err) noexcept {
  std::lock_guard<std::mutex> lock(step_mu_);
  pool_.wait();  // the previous step still reads the scratch this one is about to overwrite
  try {
    if (!prepare(layers_[layer], io, n, strict, err)) return false;
  } catch (const std::bad_alloc&) {
    *err = "out of memory growing the step's scratch buffers (" + std::to_string(n) + " tokens)";
    return false;
  }
  if (n == 0) return true;
  finishing_.store(pool_.num_threads(), std::memory_order_relaxed);
  pool_.start(&MoEEngine::job, this);
  return true;
}

bool MoEEngine::prepare(ExpertLayer* layer, const StepIO& io, int n, bool strict,
                        std::string* err) {
  t_start_ = now_ns();
  const int E = layer->num_experts(), H = layer->hidden(), I = layer->inner(), K = io.top_k;
  const size_t TK = size_t(n) * K;
  cur_ = layer;
  io_ = io;
  n_ = n;
  count_.grow(E);
  offset_.grow(E + 1);
  slot_expert_.grow(std::max<size_t>(TK, 1));
  std::fill(count_.data(), count_.data() + E, 0);
  const uint8_t* loaded = layer->loaded_flags();
  int* slot_e = slot_expert_.data();
  for (size_t j = 0; j < TK; ++j) {
    const int64_t e = io.ids_dt == DType::I64 ? static_cast<const int64_t*>(io.ids)[j]
                                              : static_cast<const int32_t*>(io.ids)[j];
    slot_e[j] = -1;
    if (e < 0 || e >= E) {
      const std::string msg = "expert id " + std::to_string(e) + " at token " +
                              std::to_string(j / K) + ", k " + std::to_string(j % K) +
                              " is outside [0, " + std::to_string(E) + ")";
      if (strict) {
        *err = msg;
        return false;
      }
      record_error(msg);  // async: the slot is dropped; wait() / last_error() report the first
      continue;
    }
    if (!loaded[e]) continue;  // "not here": contributes nothing
    slot_e[j] = static_cast<int>(e);
    ++count_.data()[e];
  }
  // Slots ordered by ascending expert id, then token, then k: the summation order of out.
  active_.clear();
  int S = 0;
  for (int e = 0; e < E; ++e) {
    offset_.data()[e] = S;
    if (count_.data()[e] > 0) active_.push_back(e);
    S += count_.data()[e];
  }
  offset_.data()[E] = S;
  S_ = S;
  slot_token_.grow(std::max(S, 1));
  slot_weight_.grow(std::max(S, 1));
  int* cursor = count_.data();  // reused: next free slot of each expert
  for (int e = 0; e < E; ++e) cursor[e] = offset_.data()[e];
  for (size_t j = 0; j < TK; ++j) {
    if (slot_e[j] < 0) continue;
    const int s = cursor[slot_e[j]]++;
    slot_token_.data()[s] = static_cast<int>(j / K);
    slot_weight_.data()[s] = load_f32(io.weights, io.weights_dt, j);
  }
  // Rows to gather: an expert with one slot reads its token's row [0, T) in place (decode: one
  // conversion instead of K); an expert with several reads its slots' rows T + s contiguously.
  const int rows = n + S;
  xs_f32_.grow(size_t(rows) * H);
  xs_bf16_.grow(size_t(rows) * H);
  gather_dst_.grow(rows);
  gather_src_.grow(rows);
  token_seen_.grow(std::max(n, 1));
  std::fill(token_seen_.data(), token_seen_.data() + n, uint8_t{0});
  int G = 0;
  for (int e : active_) {
    const int off = offset_.data()[e], end = offset_.data()[e + 1];
    for (int s = off; s < end; ++s) {
      const int t = slot_token_.data()[s];
      if (end - off == 1 && token_seen_.data()[t]) continue;
      if (end - off == 1) token_seen_.data()[t] = 1;
      gather_dst_.data()[G] = end - off == 1 ? t : n + s;
      gather_src_.data()[G++] = t;
    }
  }
  G_ = G;
  act_.grow(size_t(std::max(S, 1)) * I);
  up_.grow(size_t(std::max(S, 1)) * I);
  y_.grow(size_t(std::max(S, 1)) * H);
  act_bf16_.grow(size_t(std::max(S, 1)) * I);
  acc_.grow(size_t(std::max(n, 1)) * H);
  return true;
}

void MoEEngine::job(void* ctx, int w) {
  auto* self = static_cast<MoEEngine*>(ctx);
  self->phase_gather(w);
  self->pool_.barrier();
  if (w == 0) self->t_gather_ = now_ns();
  self->phase_gate_up(w);
  self->pool_.barrier();
  if (w == 0) self->t_gate_up_ = now_ns();
  self->phase_down(w);
  self->pool_.barrier();
  self->phase_reduce(w);
  if (self->finishing_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    // The last worker out books the step (t_gather_/t_gate_up_ were written before a barrier).
    const int64_t t = now_ns();
    self->steps_.fetch_add(1, std::memory_order_relaxed);
    self->busy_ns_.fetch_add(t - self->t_start_, std::memory_order_relaxed);
    self->phase_ns_[0].fetch_add(self->t_gather_ - self->t_start_, std::memory_order_relaxed);
    self->phase_ns_[1].fetch_add(self->t_gate_up_ - self->t_gather_, std::memory_order_relaxed);
    self->phase_ns_[2].fetch_add(t - self->t_gate_up_, std::memory_order_relaxed);
  }
}

void MoEEngine::add_kernel_time(int w, int64_t ns) {
  // One writer per counter: a relaxed load + store, no locked add on the hot path.
  auto& c = workers_[w].kernel_ns;
  c.store(c.load(std::memory_order_relaxed) + uint64_t(ns), std::memory_order_relaxed);
}

void MoEEngine::phase_gather(int w) {
  const int H = cur_->hidden(), W = pool_.num_threads();
  const int j0 = int(int64_t(G_) * w / W), j1 = int(int64_t(G_) * (w + 1) / W);
  for (int j = j0; j < j1; ++j) {
    const size_t src = size_t(gather_src_.data()[j]) * H;
    float* xf = xs_f32_.data() + size_t(gather_dst_.data()[j]) * H;
    uint16_t* xb = xs_bf16_.data() + size_t(gather_dst_.data()[j]) * H;
    switch (io_.hidden_dt) {
      case DType::BF16: {
        const uint16_t* h = static_cast<const uint16_t*>(io_.hidden) + src;
        std::memcpy(xb, h, size_t(H) * 2);
        for (int c = 0; c < H; ++c) xf[c] = bf16_to_f32(h[c]);
        break;
      }
      case DType::F16: {
        const uint16_t* h = static_cast<const uint16_t*>(io_.hidden) + src;
        for (int c = 0; c < H; ++c) xf[c] = f16_to_f32(h[c]);
        for (int c = 0; c < H; ++c) xb[c] = f32_to_bf16(xf[c]);
        break;
      }
      default:
        std::memcpy(xf, static_cast<const float*>(io_.hidden) + src, size_t(H) * 4);
        for (int c = 0; c < H; ++c) xb[c] = f32_to_bf16(xf[c]);
    }
  }
}

void MoEEngine::phase_gate_up(int w) {
  const int g = pool_.group_of(w), H = cur_->hidden(), I = cur_->inner();
  const int m = pool_.group_size(g), r = pool_.rank_in_group(w);
  const ExpertShard& sh = cur_->shards()[g];
  int64_t kernel_ns = 0;
  for (size_t j = 0; j < active_.size(); ++j) {
    const int e = active_[j];
    const auto [ia, ib] = split_even(sh.i1 - sh.i0, m, r, static_cast<int>(j));
    if (ib <= ia) continue;
    const int off = offset_.data()[e], ne = offset_.data()[e + 1] - off;
    const size_t row = ne == 1 ? size_t(slot_token_.data()[off]) : size_t(n_) + off;
    Activations x;
    x.f32 = xs_f32_.data() + row * H;
    x.bf16 = xs_bf16_.data() + row * H;
    x.ld = H;
    x.n = ne;
    const int c0 = sh.i0 + ia, width = ib - ia;
    float* g_out = act_.data() + size_t(off) * I + c0;
    float* u_out = up_.data() + size_t(off) * I + c0;
    const int64_t t0 = now_ns();
    matmul_rows(isa_, sh.gate, cur_->gate(g, e), ia, ib, x, g_out, I);
    matmul_rows(isa_, sh.up, cur_->up(g, e), ia, ib, x, u_out, I);
    kernel_ns += now_ns() - t0;
    for (int t = 0; t < ne; ++t) {
      float* a = g_out + size_t(t) * I;
      const float* u = u_out + size_t(t) * I;
      uint16_t* ab = act_bf16_.data() + size_t(off + t) * I + c0;
      for (int i = 0; i < width; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * u[i];  // SiLU, f32
      for (int i = 0; i < width; ++i) ab[i] = f32_to_bf16(a[i]);
    }
  }
  add_kernel_time(w, kernel_ns);
}

void MoEEngine::phase_down(int w) {
  const int g = pool_.group_of(w), H = cur_->hidden(), I = cur_->inner();
  const int m = pool_.group_size(g), r = pool_.rank_in_group(w);
  const ExpertShard& sh = cur_->shards()[g];
  int64_t kernel_ns = 0;
  for (size_t j = 0; j < active_.size(); ++j) {
    const int e = active_[j];
    const auto [ha, hb] = split_even(sh.h1 - sh.h0, m, r, static_cast<int>(j));
    if (hb <= ha) continue;
    const int off = offset_.data()[e];
    Activations x;
    x.f32 = act_.data() + size_t(off) * I;
    x.bf16 = act_bf16_.data() + size_t(off) * I;
    x.ld = I;
    x.n = offset_.data()[e + 1] - off;
    float* y = y_.data() + size_t(off) * H + sh.h0 + ha;
    const int64_t t0 = now_ns();
    matmul_rows(isa_, sh.down, cur_->down(g, e), ha, hb, x, y, H);
    kernel_ns += now_ns() - t0;
  }
  add_kernel_time(w, kernel_ns);
}

void MoEEngine::phase_reduce(int w) {
  // Fixed columns per worker: out[t, c] sums its slots in slot order (= ascending expert id).
  const int g = pool_.group_of(w), H = cur_->hidden();
  const ExpertShard& sh = cur_->shards()[g];
  const WorkerPart& p = cur_->part(w);
  const int c0 = sh.h0 + p.ha, width = p.hb - p.ha;
  if (width <= 0) return;
  float* acc = acc_.data();
  for (int t = 0; t < n_; ++t) std::fill_n(acc + size_t(t) * H + c0, width, 0.f);
  for (int s = 0; s < S_; ++s) {
    const float wt = slot_weight_.data()[s];
    float* dst = acc + size_t(slot_token_.data()[s]) * H + c0;
    const float* src = y_.data() + size_t(s) * H + c0;
    for (int i = 0; i < width; ++i) dst[i] += wt * src[i];
  }
  for (int t = 0; t < n_; ++t) {  // this worker's columns of out, in the hidden dtype
    const float* a = acc + size_t(t) * H + c0;
    const size_t o = size_t(t) * H + c0;
    switch (io_.hidden_dt) {
      case DType::BF16: {
        uint16_t* d = static_cast<uint16_t*>(io_.out) + o;
        for (int i = 0; i < width; ++i) d[i] = f32_to_bf16(a[i]);
        break;
      }
      case DType::F16: {
        uint16_t* d = static_cast<uint16_t*>(io_.out) + o;
        for (int i = 0; i < width; ++i) d[i] = f32_to_f16(a[i]);
        break;
      }
      default: std::memcpy(static_cast<float*>(io_.out) + o, a, size_t(width) * 4);
    }
  }
}

}  // namespace twinfer
