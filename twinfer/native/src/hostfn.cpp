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

struct Driver {
  LaunchHostFunc launch = nullptr;
  std::string error;
};

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

}  // namespace twinfer
