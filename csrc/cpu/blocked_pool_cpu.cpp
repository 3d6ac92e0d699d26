// Max pooling from a channels_last activation into 8-channel blocks, (N, C, H, W) -> (N, C/8, Ho, Wo, 8):
// ResNet's stem max-pool and the change of layout for its residual stages in one pass, instead of
// a pool and then a copy. NaN propagates as in torch.nn.functional.max_pool2d.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "blocked_layout.h"
#include "micro_kernel.h"

namespace resnet_fast {
namespace RESNET_FAST_ISA {  // the baseline build only (cpu_isa.h): micro_kernel.h's names live there
namespace {

using at::Tensor;

Tensor max_pool_to_blocked_cpu(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  constexpr const char* op = "max_pool_to_blocked";
  TORCH_CHECK(x.dim() == 4 && x.size(1) % kChannelBlock == 0 && x.size(1) > 0, op,
              ": x must be (N, C, H, W) with C a positive multiple of ", kChannelBlock, ", got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(kernel >= 1 && stride >= 1 && padding >= 0 && 2 * padding <= kernel, op,
              ": need kernel >= 1, stride >= 1 and 0 <= padding <= kernel / 2, got kernel=", kernel, ", stride=",
              stride, ", padding=", padding);
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(height + 2 * padding >= kernel && width + 2 * padding >= kernel, op, ": the ", kernel, "x", kernel,
              " window does not fit the padded ", height, "x", width, " input");
  const int64_t out_h = (height + 2 * padding - kernel) / stride + 1;
  const int64_t out_w = (width + 2 * padding - kernel) / stride + 1;
  const int64_t blocks = channels / kChannelBlock;
  Tensor out = at::empty({batch, blocks, out_h, out_w, kChannelBlock}, x.options());
  if (out.numel() == 0) return out;
  const Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  const float* in = x_cl.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const int64_t out_plane = out_h * out_w * kChannelBlock;
  // One output row of one image per task: reads walk whole channels_last pixels.
  at::parallel_for(0, batch * out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / out_h, row = task % out_h;
      const int64_t row_begin = std::max<int64_t>(0, row * stride - padding);
      const int64_t row_end = std::min(height, row * stride - padding + kernel);
      for (int64_t col = 0; col < out_w; ++col) {
        const int64_t col_begin = std::max<int64_t>(0, col * stride - padding);
        const int64_t col_end = std::min(width, col * stride - padding + kernel);
        float* target = o + image * blocks * out_plane + (row * out_w + col) * kChannelBlock;
        for (int64_t block = 0; block < blocks; ++block) {
          Vec best(-std::numeric_limits<float>::infinity());
          for (int64_t r = row_begin; r < row_end; ++r) {
            const float* pixel = in + ((image * height + r) * width) * channels + block * kChannelBlock;
            for (int64_t c = col_begin; c < col_end; ++c) {
              best = at::vec::maximum(best, Vec::loadu(pixel + c * channels));
            }
          }
          best.store(target + block * out_plane);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace RESNET_FAST_ISA

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("max_pool_to_blocked", &RESNET_FAST_ISA::max_pool_to_blocked_cpu);
}

}  // namespace resnet_fast
