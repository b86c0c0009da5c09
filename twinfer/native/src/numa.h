// Node-local memory without libnuma, and the split of an expert's rows over NUMA nodes.
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size.
// Memory: mmap (anonymous) + madvise(MADV_HUGEPAGE) + mbind(MPOL_PREFERRED) via the raw syscall
// when the node exists in /sys/devices/system/node; otherwise (simulated topologies, containers
// without NUMA) the pages land where they are first touched, which the callers arrange to be a
// pool worker of that node.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace twinfer {

class ThreadPool;

bool numa_node_exists(int node);

// An anonymous mapping meant for one NUMA node. Pages are not touched here. Move-only.
class NodeBuffer {
 public:
  NodeBuffer() = default;
  // Throws std::bad_alloc when mmap fails. `bind`: place the pages on `node` with mbind when the
  // node exists; bound() says whether that happened.
  NodeBuffer(size_t bytes, int node, bool bind);
  ~NodeBuffer() { release(); }
  NodeBuffer(NodeBuffer&& o) noexcept { *this = std::move(o); }
  NodeBuffer& operator=(NodeBuffer&& o) noexcept;
  NodeBuffer(const NodeBuffer&) = delete;
  NodeBuffer& operator=(const NodeBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  int node() const { return node_; }
  bool bound() const { return bound_; }

 private:
  void release();
  void* map_ = nullptr;  // the whole mapping (data_ is 2 MiB aligned inside it when large)
  size_t map_bytes_ = 0;
  void* data_ = nullptr;
  size_t size_ = 0;
  int node_ = 0;
  bool bound_ = false;
};

// Faults in [p, p + bytes) from the workers of pool group `group` (each writes zeros to its own
// contiguous part), so unbound pages come from that node and big buffers fault in parallel.
void first_touch(ThreadPool& pool, int group, void* p, size_t bytes);

// Splits [0, total) into weights.size() consecutive parts proportional to `weights` (> 0).
// Parts are multiples of 16 and each at least 16 when total >= 16 * parts (the remainder of
// total % 16 goes to the last part); otherwise multiples of 1, each at least 1 when possible.
// Returns the parts.size() + 1 boundaries.
std::vector<int> split_proportional(int total, const std::vector<int>& weights);

// [begin, end) of part `k` of `parts` equal parts of [0, total), in units of 16 when every part
// gets one, else of 1; the last part also takes total % unit. The units % parts leftover units
// go to parts round * leftover, +1, ... (cyclic): successive rounds (experts of a step) hand them
// to different parts, so the sum over a step is balanced where a single split cannot be (e.g.
// 48 row blocks over 14 threads: 4 vs 3.43 blocks per thread for one expert, 98 % over eight).
std::pair<int, int> split_even(int total, int parts, int k, int round = 0);

}  // namespace twinfer
