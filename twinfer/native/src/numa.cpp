// Node-local allocation (mmap + THP + mbind syscall) and shard planning.
//
// Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size.
#include "numa.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>

#include "pool.h"

namespace twinfer {

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// <linux/mempolicy.h> values, spelled out so no libnuma headers are needed.
constexpr int kMpolPreferred = 1;
constexpr int kMaxNodes = 1024;

}  // namespace

bool numa_node_exists(int node) {
  if (node < 0 || node >= kMaxNodes) return false;
  const std::string path = "/sys/devices/system/node/node" + std::to_string(node);
  return access(path.c_str(), F_OK) == 0;
}

NodeBuffer::NodeBuffer(size_t bytes, int node, bool bind) : size_(bytes), node_(node) {
  if (bytes == 0) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t rounded = (bytes + page - 1) / page * page;
  // NOTE: a big buffer starts on a 2 MiB boundary so THP can back all of it with huge pages
  // (TLB misses cost real bandwidth when streaming GBs of weights); the slack is unmapped again.
  const bool huge = bytes >= kHugePage;
  map_bytes_ = huge ? rounded + kHugePage : rounded;
  map_ = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw std::bad_alloc();
  }
  auto* base = static_cast<uint8_t*>(map_);
  auto* start = base;
  if (huge) {
    start = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1));
    const size_t head = static_cast<size_t>(start - base);
    const size_t tail = map_bytes_ - head - rounded;
    if (head) munmap(base, head);
    if (tail) munmap(start + rounded, tail);
    map_ = start;
    map_bytes_ = rounded;
    madvise(start, rounded, MADV_HUGEPAGE);  // best effort: THP may be off ("never")
  }
  data_ = start;
  if (bind && numa_node_exists(node)) {
    // PREFERRED, not BIND: a full node then spills to another node (slower) instead of getting
    // the server OOM-killed. The pages are not faulted yet, so the policy decides their home.
    unsigned long mask[kMaxNodes / (8 * sizeof(unsigned long))] = {};
    mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
    bound_ = syscall(SYS_mbind, data_, map_bytes_, kMpolPreferred, mask, kMaxNodes + 1, 0) == 0;
  }
}

NodeBuffer& NodeBuffer::operator=(NodeBuffer&& o) noexcept {
  if (this != &o) {
    release();
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    node_ = o.node_;
    bound_ = o.bound_;
  }
  return *this;
}

void NodeBuffer::release() {
  if (map_) munmap(map_, map_bytes_);
  map_ = nullptr;
  data_ = nullptr;
  map_bytes_ = size_ = 0;
}

void first_touch(ThreadPool& pool, int group, void* p, size_t bytes) {
  const int members = pool.group_size(group);
  auto touch = [&](int w) {
    if (pool.group_of(w) != group) return;
    const int r = pool.rank_in_group(w);
    // Parts on 4 KiB boundaries, so no page is faulted by two workers.
    const size_t pages = (bytes + 4095) / 4096;
    const size_t b = pages * r / members * 4096;
    const size_t e = std::min(bytes, pages * (r + 1) / members * 4096);
    if (b < e) std::memset(static_cast<uint8_t*>(p) + b, 0, e - b);
  };
  pool.run_fn(touch);
}

std::vector<int> split_proportional(int total, const std::vector<int>& weights) {
  const int n = static_cast<int>(weights.size());
  std::vector<int> bounds(n + 1, 0);
  if (n == 0) return bounds;
  const int unit = total >= 16 * n ? 16 : 1;
  const int units = total / unit;
  const int min_units = units >= n ? 1 : 0;
  double wsum = 0;
  for (int w : weights) wsum += w;
  // Floor of the ideal share (at least the minimum), then hand out / take back single units
  // where the count is furthest from the ideal.
  std::vector<double> ideal(n);
  std::vector<int> got(n);
  int sum = 0;
  for (int i = 0; i < n; ++i) {
    ideal[i] = units * weights[i] / wsum;
    got[i] = std::max(min_units, static_cast<int>(ideal[i]));
    sum += got[i];
  }
  while (sum != units) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      if (sum > units && got[i] <= min_units) continue;
      const double gap = sum < units ? ideal[i] - got[i] : got[i] - ideal[i];
      if (best < 0 || gap > (sum < units ? ideal[best] - got[best] : got[best] - ideal[best]))
        best = i;
    }
    got[best] += sum < units ? 1 : -1;
    sum += sum < units ? 1 : -1;
  }
  for (int i = 0; i < n; ++i) bounds[i + 1] = bounds[i] + got[i] * unit;
  bounds[n] = total;  // the last part takes total % unit
  return bounds;
}

std::pair<int, int> split_even(int total, int parts, int k, int round) {
  const int unit = total >= 16 * parts ? 16 : 1;
  const int units = total / unit;
  const int base = units / parts, extra = units % parts;
  const int rho = static_cast<int>(int64_t(round) * extra % parts);
  // Leftover units among parts [0, i): the parts [rho, rho + extra) (cyclic) hold one each.
  auto extras_before = [&](int i) {
    if (rho + extra <= parts) return std::clamp(i - rho, 0, extra);
    return std::min(i, rho + extra - parts) + std::clamp(i - rho, 0, parts - rho);
  };
  const int b = (k * base + extras_before(k)) * unit;
  const int e = k == parts - 1 ? total : ((k + 1) * base + extras_before(k + 1)) * unit;
  return {b, e};
}

}  // namespace twinfer
