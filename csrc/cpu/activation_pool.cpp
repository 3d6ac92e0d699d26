// A pool of CPU buffers that outlives one pass of a model, so that the next pass of the same
// shapes reuses them instead of asking malloc. glibc hands large freed blocks back to the
// kernel (munmap, heap trim), and each 4 KiB page of the next allocation then costs a page
// fault on first touch: ~15k faults of 4-5 us in one ResNet-50 batch-8 pass on the 2-core
// machines measured (benchmarks/NOTES.md), i.e. 10-15 % of the pass.
//
// torch's CPU allocator is wrapped once, on first use, by PoolingAllocator: an allocation of
// at least kMinPooledBytes made on a thread inside a pool's scope is served from that pool;
// everything else goes to the wrapped allocator unchanged. Blocks are reused by exact size (a
// network's activations repeat their sizes every pass). A block freed outside the scope (a
// returned output, dropped later) still goes back to its pool, and blocks that a whole pass
// did not use are given back when the pass ends, so a new input shape does not keep the old
// shape's buffers alive.
#include "activation_pool.h"

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fast {
namespace {

// glibc's default mmap threshold: smaller blocks come from the heap and rarely fault.
constexpr size_t kMinPooledBytes = size_t{128} << 10;

class ActivationPool;

// One block lent to a tensor: the wrapped allocator's DataPtr and the pool it goes back to.
struct Lease {
  std::shared_ptr<ActivationPool> pool;
  c10::DataPtr block;
  size_t nbytes = 0;
};

// One mutex for every pool and the lease table: only blocks >= kMinPooledBytes pass through
// here (a few hundred per ResNet pass), so contention is not worth finer locks. Both are never
// destroyed: tensors freed during interpreter or library teardown still reach release_block.
std::mutex& g_mutex = *new std::mutex;
std::unordered_map<void*, Lease>& g_leases = *new std::unordered_map<void*, Lease>;  // data -> lease
// torch's allocator before ours was installed; published before ours, read by any thread after.
std::atomic<c10::Allocator*> g_upstream{nullptr};
thread_local ActivationPool* t_active_pool = nullptr;

c10::Allocator* upstream() { return g_upstream.load(std::memory_order_acquire); }

void release_block(void* data);

class ActivationPool : public std::enable_shared_from_this<ActivationPool> {
 public:
  // A block of `nbytes` from the cache or the wrapped allocator, lent until its tensor dies.
  c10::DataPtr lend(size_t nbytes) {
    c10::DataPtr block;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      auto bucket = cached_.find(nbytes);
      if (bucket != cached_.end() && !bucket->second.empty()) {
        block = std::move(bucket->second.back().block);
        bucket->second.pop_back();
        cached_bytes_ -= nbytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (!block) {
      block = upstream()->allocate(nbytes);  // outside the lock: may take milliseconds
    }
    void* data = block.get();
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      lent_bytes_ += nbytes;
      g_leases[data] = Lease{shared_from_this(), std::move(block), nbytes};
    }
    return c10::DataPtr(data, data, &release_block, c10::Device(c10::DeviceType::CPU));
  }

  // Called with g_mutex held. Returns the block when the pool is closed (the caller frees it).
  c10::DataPtr take_back(c10::DataPtr block, size_t nbytes) {
    lent_bytes_ -= nbytes;
    if (closed_) {
      return block;
    }
    cached_[nbytes].push_back(Cached{std::move(block), pass_});
    cached_bytes_ += nbytes;
    return c10::DataPtr();
  }

  void begin_scope() {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (open_scopes_++ == 0) {
      ++pass_;
    }
  }

  // Ends a scope; when the last open scope of a pass ends, returns the blocks the pass did not use.
  std::vector<c10::DataPtr> end_scope() {
    std::lock_guard<std::mutex> lock(g_mutex);
    std::vector<c10::DataPtr> idle;
    if (--open_scopes_ > 0) {
      return idle;
    }
    for (auto bucket = cached_.begin(); bucket != cached_.end();) {
      auto& blocks = bucket->second;
      size_t kept = 0;
      for (auto& cached : blocks) {
        if (cached.last_pass < pass_) {
          idle.push_back(std::move(cached.block));
          cached_bytes_ -= bucket->first;
        } else {
          blocks[kept++] = std::move(cached);
        }
      }
      blocks.resize(kept);
      bucket = blocks.empty() ? cached_.erase(bucket) : std::next(bucket);
    }
    return idle;
  }

  // Every cached block, for the caller to free outside the lock; `close` also stops caching.
  std::vector<c10::DataPtr> drain(bool close) {
    std::lock_guard<std::mutex> lock(g_mutex);
    closed_ = closed_ || close;
    std::vector<c10::DataPtr> blocks;
    for (auto& bucket : cached_) {
      for (auto& cached : bucket.second) {
        blocks.push_back(std::move(cached.block));
      }
    }
    cached_.clear();
    cached_bytes_ = 0;
    return blocks;
  }

  pybind11::dict stats() {
    std::lock_guard<std::mutex> lock(g_mutex);
    pybind11::dict out;
    out["cached_bytes"] = cached_bytes_;
    out["lent_bytes"] = lent_bytes_;
    out["hits"] = hits_;
    out["misses"] = misses_;
    out["passes"] = pass_;
    return out;
  }

 private:
  struct Cached {
    c10::DataPtr block;
    uint64_t last_pass;  // the pass in which the block was last given back
  };
  std::unordered_map<size_t, std::vector<Cached>> cached_;
  size_t cached_bytes_ = 0;
  size_t lent_bytes_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
  uint64_t pass_ = 0;
  int open_scopes_ = 0;
  bool closed_ = false;
};

// The deleter of every pooled block, and the raw deleter of the wrapping allocator: oneDNN's
// scratchpad goes through raw_allocate / raw_deallocate, so pointers the wrapped allocator
// made (allocated outside a scope, or before installation) arrive here too.
void release_block(void* data) {
  Lease lease;  // destroyed after the lock is released: it may hold the pool's last reference
  c10::DataPtr to_free;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto found = g_leases.find(data);
    if (found != g_leases.end()) {
      lease = std::move(found->second);
      g_leases.erase(found);
      to_free = lease.pool->take_back(std::move(lease.block), lease.nbytes);
    }
  }
  if (!lease.pool) {
    upstream()->raw_deleter()(data);
  }
}

class PoolingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    ActivationPool* pool = t_active_pool;
    if (pool != nullptr && nbytes >= kMinPooledBytes) {
      return pool->lend(nbytes);
    }
    return upstream()->allocate(nbytes);
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return upstream()->raw_deleter() != nullptr ? &release_block : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolingAllocator& pooling_allocator() {
  // Never destroyed: tensors may outlive every pool, and their deleter is release_block.
  static PoolingAllocator& allocator = *new PoolingAllocator;
  return allocator;
}

// Wraps torch's CPU allocator, once per process. False if another allocator of higher
// priority is installed (the pool then does nothing).
bool install_pooling_allocator() {
  static const bool installed = [] {
    g_upstream.store(c10::GetCPUAllocator(), std::memory_order_release);
    // A single aligned pointer store in torch's table: threads that allocate meanwhile see the
    // old or the new allocator, and both serve every request.
    c10::SetCPUAllocator(&pooling_allocator(), /*priority=*/0);
    return c10::GetCPUAllocator() == &pooling_allocator();
  }();
  return installed;
}

// Whether torch's CPU allocator is the pooling one now (without installing it).
bool pooling_allocator_active() { return upstream() != nullptr && c10::GetCPUAllocator() == &pooling_allocator(); }

// The Python-visible pool: closing it (or its garbage collection) frees the cached blocks;
// blocks still lent out are freed when their tensors die.
class PoolHandle {
 public:
  PoolHandle() : pool_(std::make_shared<ActivationPool>()) {}
  ~PoolHandle() { pool_->drain(/*close=*/true); }
  PoolHandle(const PoolHandle&) = delete;
  PoolHandle& operator=(const PoolHandle&) = delete;

  const std::shared_ptr<ActivationPool>& pool() const { return pool_; }

  void release() { pool_->drain(/*close=*/false); }

  pybind11::dict stats() const {
    pybind11::dict out = pool_->stats();
    out["installed"] = pooling_allocator_active();
    return out;
  }

 private:
  std::shared_ptr<ActivationPool> pool_;
};

// `with pool.scope():` makes the pool serve this thread's large CPU allocations; scopes nest
// (the previous pool is restored on exit) and may be open on several threads at once.
class PoolScope {
 public:
  explicit PoolScope(const PoolHandle& handle) : pool_(handle.pool()) {}

  PoolScope& enter() {
    TORCH_CHECK(!entered_, "an ActivationPool scope can be entered once");
    entered_ = true;
    if (install_pooling_allocator()) {
      pool_->begin_scope();
      previous_ = t_active_pool;
      t_active_pool = pool_.get();
      active_ = true;
    }
    return *this;
  }

  void exit() {
    if (!active_) {
      return;
    }
    active_ = false;
    t_active_pool = previous_;
    pool_->end_scope();  // the idle blocks it returns are freed here, outside the lock
  }

 private:
  std::shared_ptr<ActivationPool> pool_;
  ActivationPool* previous_ = nullptr;
  bool entered_ = false;
  bool active_ = false;
};

}  // namespace

void bind_activation_pool(pybind11::module& module) {
  namespace py = pybind11;
  py::class_<PoolHandle>(module, "ActivationPool",
                         "CPU buffers of a model's passes kept for the next pass (see resnet_fast.ops.activation_pool)")
      .def(py::init<>())
      .def("scope", [](const PoolHandle& handle) { return PoolScope(handle); },
           "Context manager: this thread's CPU allocations of >= 128 KiB come from the pool")
      .def("release", &PoolHandle::release, "Free every cached block (blocks in use are kept by their tensors)")
      .def("stats", &PoolHandle::stats,
           "{'cached_bytes', 'lent_bytes', 'hits', 'misses', 'passes', 'installed'}");
  py::class_<PoolScope>(module, "ActivationPoolScope")
      .def("__enter__", &PoolScope::enter, py::return_value_policy::reference)
      .def("__exit__", [](PoolScope& scope, const py::args&) { scope.exit(); });
  module.attr("ACTIVATION_POOL_MIN_BYTES") = kMinPooledBytes;
}

}  // namespace resnet_fast
