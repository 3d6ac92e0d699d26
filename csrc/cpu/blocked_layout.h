// Where an activation's element (image, channel, row, col) lives, for the two CPU layouts the
// inference kernels read and write:
//   channels_last      (N, H, W, C):        channel c at offset c of its pixel;
//   8-channel blocks   (N, C/8, H, W, 8):   channel c in block c / 8, lane c % 8.
// Both are "pixel offset + channel offset", so a kernel written against this struct serves both.
// The blocked layout keeps 8 channels of consecutive pixels contiguous: a 6-pixel x 8-channel
// operand of the pointwise kernel is one 192-byte run instead of 6 rows C floats apart.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace resnet_fast {

constexpr int64_t kChannelBlock = 8;  // one AVX2 float vector

struct ActivationLayout {
  int64_t image_stride, row_stride, pixel_stride, block_stride;

  static ActivationLayout channels_last(int64_t channels, int64_t height, int64_t width) {
    return {height * width * channels, width * channels, channels, kChannelBlock};
  }
  static ActivationLayout blocked(int64_t channels, int64_t height, int64_t width) {
    return {channels * height * width, width * kChannelBlock, kChannelBlock, height * width * kChannelBlock};
  }

  int64_t pixel(int64_t image, int64_t row, int64_t col) const {
    return image * image_stride + row * row_stride + col * pixel_stride;
  }
  int64_t channel(int64_t c) const { return (c / kChannelBlock) * block_stride + c % kChannelBlock; }
};

// A float32 CPU tensor of shape (N, C/8, H, W, 8) with at least one channel block.
inline void check_blocked_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 5 && t.size(4) == kChannelBlock && t.size(1) > 0, op, ": ", name,
              " must be in 8-channel blocks, shape (N, C/8, H, W, 8) with C/8 >= 1, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// The residual of a blocked op, checked against the output's shape and made contiguous; an undefined
// tensor when there is none.
inline at::Tensor checked_blocked_residual(const char* op, const std::optional<at::Tensor>& residual,
                                           at::IntArrayRef out_shape) {
  if (!residual.has_value()) return {};
  check_blocked_activation(op, "residual", *residual);
  TORCH_CHECK(residual->sizes() == out_shape, op, ": residual shape ", residual->sizes(),
              " does not match the output shape ", out_shape);
  return residual->contiguous();
}

}  // namespace resnet_fast
