// CPU expert steps ordered on a CUDA stream: cuLaunchHostFunc from libcuda, found at run time.
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size.
// No CUDA headers or libraries at build time: the module must load on machines without CUDA, and
// must not pin a CUDA version. enqueue() puts a host function that starts the layer's step on the
// pool and returns at once (the GPU goes on with the shared experts); enqueue_wait() puts one
// that blocks the stream until the step is done. Under stream capture the host functions become
// graph nodes with our record pointer as their argument, so records live as long as the engine
// and are cached per (layer, num_tokens): every replay reuses the same one.
// NOTE: host functions must not call CUDA and must not throw: errors go to last_error().
#include <dlfcn.h>

#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>

#include "engine.h"

namespace twinfer {

namespace {

using CUresult = int;
using CUstream = void*;
using CUhostFn = void (*)(void*);
using LaunchHostFunc = CUresult (*)(CUstream, CUhostFn, void*);
using StreamValue32 = CUresult (*)(CUstream, uint64_t, uint32_t, unsigned);  // write / wait
constexpr unsigned kWaitEq = 0x1;  // CU_STREAM_WAIT_VALUE_EQ

struct Driver {
  LaunchHostFunc launch = nullptr;
  StreamValue32 write_value = nullptr, wait_value = nullptr;  // stream memory operations
  std::string error;
};

void* symbol(void* lib, const char* v2, const char* v1) {
  void* f = dlsym(lib, v2);
  return f ? f : dlsym(lib, v1);
}

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    // The process that uses CUDA (torch) has libcuda loaded already: take that one.
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
      const char* e = dlerror();
      out.error = std::string("enqueue needs the CUDA driver (libcuda.so.1), which could not be ") +
                  "loaded (" + (e ? e : "unknown error") +
                  "); without CUDA use submit()/wait() or forward()";
      return out;
    }
    out.launch = reinterpret_cast<LaunchHostFunc>(dlsym(lib, "cuLaunchHostFunc"));
    out.write_value = reinterpret_cast<StreamValue32>(
        symbol(lib, "cuStreamWriteValue32_v2", "cuStreamWriteValue32"));
    out.wait_value = reinterpret_cast<StreamValue32>(
        symbol(lib, "cuStreamWaitValue32_v2", "cuStreamWaitValue32"));
    if (!out.launch) out.error = "libcuda.so.1 has no cuLaunchHostFunc (CUDA driver too old)";
    return out;
  }();
  return d;
}

void host_start(void* arg) {
  auto* rec = static_cast<LaunchRecord*>(arg);
  rec->engine->start_async(rec->layer, rec->num_tokens);
}

void host_wait(void* arg) { static_cast<MoEEngine*>(arg)->wait_async(); }

// Start and wait in one host function: one stream-to-host round trip per layer instead of two,
// for layers with no GPU work to overlap (no shared experts, no device-resident experts).
void host_run(void* arg) {
  auto* rec = static_cast<LaunchRecord*>(arg);
  rec->engine->start_async(rec->layer, rec->num_tokens);
  rec->engine->wait_async();
}

void launch_or_throw(uintptr_t stream, CUhostFn fn, void* arg) {
  const Driver& d = driver();
  if (!d.launch) throw std::runtime_error(d.error);
  const CUresult r = d.launch(reinterpret_cast<CUstream>(stream), fn, arg);
  if (r != 0)
    throw std::runtime_error("cuLaunchHostFunc failed with CUresult " + std::to_string(r) +
                             " (is the stream valid and its context current?)");
}

void check(CUresult r, const char* what) {
  if (r != 0)
    throw std::runtime_error(std::string(what) + " failed with CUresult " + std::to_string(r) +
                             " (stream memory operations unsupported here? host functions work "
                             "everywhere)");
}

}  // namespace

LaunchRecord* MoEEngine::launch_record(int layer, int num_tokens) {
  if (!bound_.out) throw std::invalid_argument("enqueue: call bind_buffers first");
  if (layer < 0 || layer >= num_layers())
    throw std::invalid_argument("layer id " + std::to_string(layer) + " is not one of the " +
                                std::to_string(num_layers()) + " added layers");
  if (num_tokens < 0 || num_tokens > max_tokens_)
    throw std::invalid_argument("num_tokens " + std::to_string(num_tokens) +
                                " exceeds the bound buffers' " + std::to_string(max_tokens_) +
                                " tokens");
  std::lock_guard<std::mutex> lock(launch_mu_);
  auto& slot = launches_[{layer, num_tokens}];
  if (!slot) slot = std::make_unique<LaunchRecord>(LaunchRecord{this, layer, num_tokens});
  return slot.get();
}

void MoEEngine::enqueue(uintptr_t stream, int layer, int num_tokens) {
  launch_or_throw(stream, &host_start, launch_record(layer, num_tokens));
}

void MoEEngine::enqueue_run(uintptr_t stream, int layer, int num_tokens) {
  launch_or_throw(stream, &host_run, launch_record(layer, num_tokens));
}

void MoEEngine::enqueue_wait(uintptr_t stream) { launch_or_throw(stream, &host_wait, this); }

// ---- stream signals ------------------------------------------------------------------------
// NOTE: a host function costs a round trip through a CUDA driver thread that the GPU wakes with
// an interrupt: ~100 us a layer on the H100 host (a VM), more than the layer's int4 expert work.
// Here the stream writes a word into pinned memory (cuStreamWriteValue32, after the staging
// copies in stream order) that a listener thread polls; the listener runs the step and answers
// in a second word the stream waits on (cuStreamWaitValue32), then the stream clears the answer.
// The words never repeat a stale match: the stream clears `answered` before its next write to
// `ready`, and the listener clears `ready` before it answers. Both are stream operations, so
// CUDA-graph capture records them like the copies around them.
bool MoEEngine::signals_available() const {
  const Driver& d = driver();
  return d.write_value && d.wait_value;
}

void MoEEngine::bind_signals(uintptr_t ready, uintptr_t done, int spin_us) {
  if (!ready || !done || ready == done)
    throw std::invalid_argument("bind_signals: two distinct pinned words are needed");
  stop_signals();
  ready_ = reinterpret_cast<std::atomic<uint32_t>*>(ready);
  answered_ = reinterpret_cast<std::atomic<uint32_t>*>(done);
  ready_->store(0);
  answered_->store(0);
  listen_spin_us_ = spin_us;
  stop_listener_.store(false);
  listener_ = std::thread([this] { listen(); });
}

void MoEEngine::stop_signals() {
  if (!listener_.joinable()) return;
  stop_listener_.store(true);
  listener_.join();
}

void MoEEngine::enqueue_signal(uintptr_t stream, int layer, int num_tokens) {
  if (!ready_) throw std::invalid_argument("enqueue_signal: call bind_signals first");
  launch_record(layer, num_tokens);  // validates layer and tokens
  if (num_tokens >= (1 << 19) || layer >= 4095)
    throw std::invalid_argument("enqueue_signal: at most 2^19 tokens and 4095 layers");
  const Driver& d = driver();
  if (!d.write_value || !d.wait_value)
    throw std::runtime_error(d.error.empty() ? "the CUDA driver has no stream memory operations"
                                             : d.error);
  const uint32_t code = (uint32_t(num_tokens) << 12) | uint32_t(layer + 1);
  auto s = reinterpret_cast<CUstream>(stream);
  check(d.write_value(s, reinterpret_cast<uint64_t>(ready_), code, 0), "cuStreamWriteValue32");
  check(d.wait_value(s, reinterpret_cast<uint64_t>(answered_), code, kWaitEq),
        "cuStreamWaitValue32");
  check(d.write_value(s, reinterpret_cast<uint64_t>(answered_), 0, 0), "cuStreamWriteValue32");
}

void MoEEngine::listen() {
  using Clock = std::chrono::steady_clock;
  auto last = Clock::now();
  for (uint32_t i = 1; !stop_listener_.load(std::memory_order_relaxed); ++i) {
    const uint32_t code = ready_->load(std::memory_order_acquire);
    if (code == 0) {
      cpu_relax();
      // Spin while steps come (the GPU's part of a layer is ~50 us), then poll every 50 us:
      // the GPU cannot wake a sleeper, so an idle engine costs one late first layer.
      if ((i & 255) == 0 && Clock::now() - last > std::chrono::microseconds(listen_spin_us_))
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      continue;
    }
    ready_->store(0, std::memory_order_relaxed);
    start_async(int(code & 0xfff) - 1, int(code >> 12));
    wait_async();
    answered_->store(code, std::memory_order_release);
    last = Clock::now();
  }
}

}  // namespace twinfer
