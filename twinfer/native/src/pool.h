// A persistent, core-pinned thread pool for the CPU expert engine.
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size (the pool has none).
//
// One job = fn(ctx, worker) on every worker at once; inside a job, workers meet at spinning
// barriers (pool-wide, or among the workers of one NUMA node). Between jobs a worker spins
// `spin_us` on the job generation counter, then sleeps on a futex. A decode step runs one job per
// MoE layer, each 0.1-1 ms, so start + finish must cost a few microseconds: spinning workers see a
// new job within ~100 ns, and the submitter only makes a syscall when some worker sleeps.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace twinfer {

// Futex on a 32-bit atomic (Linux): sleep while *a == expected; wake every sleeper.
void futex_wait(std::atomic<uint32_t>* a, uint32_t expected);
void futex_wake_all(std::atomic<uint32_t>* a);
void cpu_relax();

// A barrier for a fixed group of threads, reused phase after phase (sense by phase counter).
// NOTE: spins with pause and yields every 64 pauses: phases last microseconds, but a pool sharing
// its cores with other threads must not burn a whole time slice waiting for a descheduled member.
class SpinBarrier {
 public:
  void init(int n) { n_ = n; }
  void arrive_and_wait();

 private:
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<uint32_t> phase_{0};
  int n_ = 1;
};

class ThreadPool {
 public:
  using JobFn = void (*)(void* ctx, int worker);

  // One worker per entry: pinned to the cpu set cpus[w] (empty = not pinned), on NUMA node
  // nodes[w]. Throws std::invalid_argument on cpu ids this process may not use.
  ThreadPool(const std::vector<std::vector<int>>& cpus, const std::vector<int>& nodes,
             int spin_us);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return n_; }
  const std::vector<int>& nodes() const { return nodes_; }
  const std::vector<std::vector<int>>& cpus() const { return cpus_; }
  // Workers grouped by node: group g holds node group_nodes()[g] (ascending node ids).
  int num_groups() const { return static_cast<int>(group_nodes_.size()); }
  const std::vector<int>& group_nodes() const { return group_nodes_; }
  const std::vector<int>& group_workers(int g) const { return group_workers_[g]; }
  int group_of(int w) const { return group_of_[w]; }
  int rank_in_group(int w) const { return rank_[w]; }
  int group_size(int g) const { return static_cast<int>(group_workers_[g].size()); }

  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }
  void set_spin_us(int us) { spin_us_.store(us < 0 ? 0 : us, std::memory_order_relaxed); }

  // Starts fn on every worker and returns; waits first for an earlier job still running.
  void start(JobFn fn, void* ctx);
  // Blocks until the last started job has finished: spins spin_us, then sleeps.
  void wait();
  bool idle() const;
  void run(JobFn fn, void* ctx) {
    start(fn, ctx);
    wait();
  }
  template <class F>
  void run_fn(F& f) {
    run([](void* c, int w) { (*static_cast<F*>(c))(w); }, &f);
  }

  // Only inside a job: every worker of the pool / of worker w's node must call it.
  void barrier() { all_barrier_.arrive_and_wait(); }
  void node_barrier(int w) { group_barriers_[group_of_[w]].arrive_and_wait(); }

 private:
  void worker_main(int w);
  uint32_t await_job(uint32_t seen);
  void wait_done(uint32_t target);

  int n_ = 0;
  std::vector<std::vector<int>> cpus_;
  std::vector<int> nodes_, group_nodes_, group_of_, rank_;
  std::vector<std::vector<int>> group_workers_;
  std::vector<std::thread> threads_;
  std::unique_ptr<SpinBarrier[]> group_barriers_;
  SpinBarrier all_barrier_;
  std::mutex submit_mu_;  // one submitter at a time (Python thread, CUDA host-function thread)

  JobFn job_fn_ = nullptr;  // written before gen_ is bumped (release), read after (acquire)
  void* job_ctx_ = nullptr;
  bool stop_ = false;
  bool submitter_spins_ = true;  // false when the workers fill every cpu of this process
  std::atomic<int> spin_us_{200};
  alignas(64) std::atomic<uint32_t> gen_{0};      // generation of the last started job
  alignas(64) std::atomic<uint32_t> done_{0};     // generation of the last finished job
  alignas(64) std::atomic<int> remaining_{0};     // workers still in the current job
  alignas(64) std::atomic<int> sleepers_{0};      // workers asleep on gen_
  alignas(64) std::atomic<int> waiters_{0};       // submitters asleep on done_
};

}  // namespace twinfer
