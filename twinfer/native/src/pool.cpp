// The persistent thread pool: spin-then-sleep workers, generation counters, spinning barriers.
//
// Shapes: none (see pool.h). Memory order: job_fn_/job_ctx_ are published by the seq_cst store of
// gen_ and retired by the seq_cst store of done_; sleepers_/waiters_ pair with them Dekker-style
// (store own flag, then load the other's), so a wake-up is never lost and never costs a syscall
// when nobody sleeps.
#include "pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace twinfer {

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

void futex_wait(std::atomic<uint32_t>* a, uint32_t expected) {
  // Returns at once if *a != expected (EAGAIN) or on a spurious wake; callers loop.
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* a) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
          nullptr, 0);
}

// spin_wait_note: every spin loop yields now and then. On its own core a yield returns at once
// (~0.3 us, and only every few microseconds); where a worker shares a core with the submitter
// (threads == cores) it hands the core over instead of spinning out a whole time slice / spin_us.

void SpinBarrier::arrive_and_wait() {
  if (n_ <= 1) return;
  const uint32_t ph = phase_.load(std::memory_order_acquire);
  if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    count_.store(0, std::memory_order_relaxed);  // published by the phase release below
    phase_.store(ph + 1, std::memory_order_release);
    return;
  }
  for (int i = 1; phase_.load(std::memory_order_acquire) == ph; ++i) {
    cpu_relax();
    if ((i & 63) == 0) sched_yield();
  }
}

namespace {

using Clock = std::chrono::steady_clock;

// The cpus this process may run on (the affinity mask it was started with).
std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> out;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}

}  // namespace

ThreadPool::ThreadPool(const std::vector<std::vector<int>>& cpus, const std::vector<int>& nodes,
                       int spin_us)
    : n_(static_cast<int>(cpus.size())), cpus_(cpus), nodes_(nodes) {
  if (n_ < 1) throw std::invalid_argument("ThreadPool needs at least one worker (cpus is empty)");
  if (nodes.size() != cpus.size())
    throw std::invalid_argument("ThreadPool: cpus has " + std::to_string(cpus.size()) +
                                " entries but nodes has " + std::to_string(nodes.size()) +
                                "; give one NUMA node per worker");
  const std::vector<int> allowed = allowed_cpus();
  for (int w = 0; w < n_; ++w) {
    if (nodes[w] < 0)
      throw std::invalid_argument("ThreadPool: worker " + std::to_string(w) + " has NUMA node " +
                                  std::to_string(nodes[w]) + "; node ids are >= 0");
    for (int c : cpus[w])
      if (!std::binary_search(allowed.begin(), allowed.end(), c))
        throw std::invalid_argument(
            "ThreadPool: worker " + std::to_string(w) + " is pinned to cpu " + std::to_string(c) +
            ", which this process may not use (allowed: " + std::to_string(allowed.size()) +
            " cpus, see os.sched_getaffinity(0))");
  }
  set_spin_us(spin_us);
  // NOTE: with a worker on every core the submitter has no core of its own: its spinning would
  // take a worker's core (and CFS does not honour a yield against a thread far ahead in
  // vruntime, so steps stretched by milliseconds). Then it sleeps at once instead.
  submitter_spins_ = n_ < static_cast<int>(allowed.size());

  group_nodes_ = nodes;
  std::sort(group_nodes_.begin(), group_nodes_.end());
  group_nodes_.erase(std::unique(group_nodes_.begin(), group_nodes_.end()), group_nodes_.end());
  group_workers_.resize(group_nodes_.size());
  group_of_.resize(n_);
  rank_.resize(n_);
  for (int w = 0; w < n_; ++w) {
    const int g = static_cast<int>(
        std::lower_bound(group_nodes_.begin(), group_nodes_.end(), nodes[w]) -
        group_nodes_.begin());
    group_of_[w] = g;
    rank_[w] = static_cast<int>(group_workers_[g].size());
    group_workers_[g].push_back(w);
  }
  group_barriers_ = std::make_unique<SpinBarrier[]>(group_nodes_.size());
  for (size_t g = 0; g < group_nodes_.size(); ++g)
    group_barriers_[g].init(static_cast<int>(group_workers_[g].size()));
  all_barrier_.init(n_);

  threads_.reserve(n_);
  for (int w = 0; w < n_; ++w) threads_.emplace_back([this, w] { worker_main(w); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(submit_mu_);
    wait_done(gen_.load());
    stop_ = true;
    remaining_.store(n_);
    gen_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&gen_);
  }
  for (auto& t : threads_) t.join();
}

void ThreadPool::worker_main(int w) {
  if (!cpus_[w].empty()) {
    // Pin first, so every page this worker faults (first touch) comes from its node.
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c : cpus_[w]) CPU_SET(c, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);  // ids were checked in the ctor
  }
  char name[16];
  snprintf(name, sizeof(name), "twinfer-moe%d", w);
  pthread_setname_np(pthread_self(), name);

  uint32_t seen = 0;
  for (;;) {
    seen = await_job(seen);
    if (stop_) return;
    job_fn_(job_ctx_, w);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      done_.store(seen, std::memory_order_seq_cst);
      if (waiters_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&done_);
    }
  }
}

uint32_t ThreadPool::await_job(uint32_t seen) {
  uint32_t g = gen_.load(std::memory_order_acquire);
  if (g != seen) return g;
  const int spin = spin_us();
  if (spin > 0) {
    const auto deadline = Clock::now() + std::chrono::microseconds(spin);
    for (int i = 1;; ++i) {
      cpu_relax();
      g = gen_.load(std::memory_order_acquire);
      if (g != seen) return g;
      if ((i & 63) == 0) {
        if (Clock::now() >= deadline) break;
        sched_yield();  // see spin_wait_note
      }
    }
  }
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  while ((g = gen_.load(std::memory_order_seq_cst)) == seen) futex_wait(&gen_, seen);
  sleepers_.fetch_sub(1, std::memory_order_relaxed);
  return g;
}

void ThreadPool::start(JobFn fn, void* ctx) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  const uint32_t g = gen_.load(std::memory_order_relaxed);
  wait_done(g);  // an earlier job (maybe another submitter's) must be over before its fields go
  job_fn_ = fn;
  job_ctx_ = ctx;
  remaining_.store(n_, std::memory_order_relaxed);
  gen_.store(g + 1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&gen_);
}

void ThreadPool::wait() { wait_done(gen_.load(std::memory_order_acquire)); }

bool ThreadPool::idle() const {
  return done_.load(std::memory_order_acquire) == gen_.load(std::memory_order_acquire);
}

void ThreadPool::wait_done(uint32_t target) {
  // NOTE: generations only grow, so "done_ == target" cannot be skipped over: a later job can
  // only start after this one is done (start() waits under the submit lock).
  auto finished = [&] {
    return static_cast<int32_t>(done_.load(std::memory_order_acquire) - target) >= 0;
  };
  if (finished()) return;
  const int spin = submitter_spins_ ? spin_us() : 0;
  if (spin > 0) {
    const auto deadline = Clock::now() + std::chrono::microseconds(spin);
    for (int i = 1;; ++i) {
      cpu_relax();
      if (finished()) return;
      if ((i & 63) == 0) {
        if (Clock::now() >= deadline) break;
        sched_yield();  // see spin_wait_note
      }
    }
  }
  waiters_.fetch_add(1, std::memory_order_seq_cst);
  for (;;) {
    const uint32_t d = done_.load(std::memory_order_seq_cst);
    if (static_cast<int32_t>(d - target) >= 0) break;
    futex_wait(&done_, d);
  }
  waiters_.fetch_sub(1, std::memory_order_relaxed);
}

}  // namespace twinfer
