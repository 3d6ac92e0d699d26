// Runs task(i) for i in [0, count) on torch's intra-op threads, each thread taking the next
// undone task as it finishes one. at::parallel_for gives each thread a fixed share instead, so a
// thread that is slowed (uneven tasks, a busy core) holds up the whole call.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace resnet_fast {

template <typename Task>
void parallel_tasks(int64_t count, const Task& task) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        task(i);
      }
    }
  });
}

}  // namespace resnet_fast
