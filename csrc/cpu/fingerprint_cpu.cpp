// Content fingerprint of CPU tensors, for the fold cache (resnet_fast/nn/fused.py).
//
// Version counters miss writes made through `.data` (it hands out a tensor with a counter of its own) and
// inference tensors have none, so the cache also keys on the bytes themselves. One pass over memory, two
// 64-bit Fletcher sums per lane: any single change alters the plain sum, and a reordering of words
// (channels permuted by a surgery script) alters the position-weighted one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace resnet_fast {
namespace {

using at::Tensor;

constexpr int kLanes = 8;
constexpr int64_t kChunkWords = int64_t(1) << 16;  // 256 KiB: fits L2, enough work per task
// One thread reads ~10 GB/s, near what memory gives two: below 4 MiB a fork-join costs more than it saves.
constexpr int64_t kChunksPerTask = 16;

uint64_t mix(uint64_t h, uint64_t v) {
  // splitmix64's finaliser over h ^ v: every input bit reaches every output bit.
  uint64_t z = h ^ (v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Fletcher sums of the `count` 32-bit words at `bytes` (count a multiple of kLanes), folded into one value.
// Words are read with memcpy (a plain load once compiled): bf16 data is only 2-byte aligned.
uint64_t chunk_fingerprint(const uint8_t* bytes, int64_t count) {
  uint64_t sum[kLanes] = {0}, weighted[kLanes] = {0};
  for (int64_t i = 0; i < count; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      uint32_t word;
      std::memcpy(&word, bytes + (i + l) * sizeof(uint32_t), sizeof(word));
      sum[l] += word;
      weighted[l] += sum[l];
    }
  }
  uint64_t h = 0;
  for (int l = 0; l < kLanes; ++l) h = mix(mix(h, sum[l]), weighted[l]);
  return h;
}

uint64_t bytes_fingerprint(const uint8_t* bytes, int64_t nbytes) {
  const int64_t block_words = nbytes / int64_t(sizeof(uint32_t)) / kLanes * kLanes;
  const int64_t chunks = (block_words + kChunkWords - 1) / kChunkWords;
  std::vector<uint64_t> per_chunk(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunkWords;
      per_chunk[c] = chunk_fingerprint(bytes + first * sizeof(uint32_t), std::min(kChunkWords, block_words - first));
    }
  });
  uint64_t h = mix(0, static_cast<uint64_t>(nbytes));
  for (const uint64_t v : per_chunk) h = mix(h, v);
  for (int64_t b = block_words * int64_t(sizeof(uint32_t)); b < nbytes; ++b) h = mix(h, bytes[b]);
  return h;
}

int64_t content_fingerprint_cpu(at::TensorList tensors) {
  uint64_t h = 0;
  for (const Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "content_fingerprint: tensors must be on the CPU, got one on ", t.device());
    // Dense tensors (contiguous or channels_last) are hashed where they lie; others through a copy.
    const Tensor dense = t.is_non_overlapping_and_dense() ? t : t.contiguous();
    const int64_t nbytes = dense.numel() * static_cast<int64_t>(dense.element_size());
    h = mix(h, nbytes == 0 ? 0 : bytes_fingerprint(static_cast<const uint8_t*>(dense.const_data_ptr()), nbytes));
  }
  return static_cast<int64_t>(h);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) { m.impl("content_fingerprint", &content_fingerprint_cpu); }

}  // namespace resnet_fast
