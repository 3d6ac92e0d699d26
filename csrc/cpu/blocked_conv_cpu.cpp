// Direct convolution on 8-channel blocks, (N, C/8, H, W, 8) -> (N, K/8, Ho, Wo, 8), for CPU float32
// inference: any square kernel, stride and zero padding (groups 1, dilation 1), with the folded-BN
// bias, the residual add and ReLU applied as each output tile is stored.
//
// Why: ResNet-50 spends over half its time in 1x1 convolutions, and on 8-channel blocks a 6-pixel x
// 8-channel slice of the input is one contiguous 192-byte run (on channels_last it is 6 rows C floats
// apart). Per ResNet-50 1x1 shape at batch 8 this kernel is 1.03-1.43x faster than oneDNN's
// channels_last convolution with the same post-ops (benchmarks/NOTES.md, CPU kernels 16).
//
// Each output tile is up to 6 pixels of one output row x 16 output channels (two blocks), held in
// 12 AVX2 registers while every valid kernel tap and input channel is added in; weights are packed
// once per layer (blocked_conv_weight) as (K/16 panels, kh, kw, C, 16). Work is split into tasks
// of (image, a run of output pixels whose input fits in L2, a group of panels that fits in L2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "blocked_layout.h"
#include "lane_select_vec.h"
#include "micro_kernel.h"
#include "parallel_tasks.h"

namespace resnet_fast {
namespace RESNET_FAST_ISA {  // the baseline build only (cpu_isa.h): micro_kernel.h's names live there
namespace {

using at::Tensor;
static_assert(Vec::size() == kChannelBlock, "one channel block is one float vector");
static_assert(kPanelColumns == 2 * kChannelBlock, "a weight panel covers two output channel blocks");

constexpr int64_t kInputChunkBytes = 128 << 10;  // input read by one task, kept in L2 across its panels
constexpr int64_t kPanelGroupBytes = 256 << 10;  // weights one task walks, kept in L2 across its tiles
// Tasks per call, whatever the thread count, so tiles (and with them each output's order of
// additions) do not depend on it: results are bitwise the same on any number of threads.
constexpr int64_t kMinTasks = 16;

// (K, C, kh, kw) -> (ceil(K / 16), kh, kw, C, 16), zero beyond K.
Tensor blocked_conv_weight_cpu(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
              "blocked_conv_weight: weight must be (K, C, k, k), got shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.is_floating_point(),
              "blocked_conv_weight: weight must be a floating-point CPU tensor, got ", weight.scalar_type(), " on ",
              weight.device());
  const int64_t out_channels = weight.size(0), panels = ceil_div(out_channels, kPanelColumns);
  // (K, C, kh, kw) -> (K, kh, kw, C), zero-padded to panels * 16 rows, then the 16 rows of a panel innermost.
  Tensor w = weight.to(at::kFloat).permute({0, 2, 3, 1});
  w = at::constant_pad_nd(w, {0, 0, 0, 0, 0, 0, 0, panels * kPanelColumns - out_channels});
  return w.view({panels, kPanelColumns, weight.size(2), weight.size(3), weight.size(1)})
      .permute({0, 2, 3, 4, 1})
      .contiguous();
}

struct Tap {
  int64_t input_offset;  // from the tile's image base
  int64_t panel_offset;  // from the panel's base
};

struct ConvShape {
  int64_t batch, in_blocks, out_blocks, height, width, out_height, out_width;
  int64_t kernel, stride, padding, panels;
  int64_t in_image_stride() const { return in_blocks * height * width * kChannelBlock; }
  int64_t out_image_stride() const { return out_blocks * out_height * out_width * kChannelBlock; }
  int64_t panel_floats() const { return kernel * kernel * in_blocks * kChannelBlock * kPanelColumns; }
};

struct Epilogue {
  const float* bias;      // 16 values of this panel
  const float* residual;  // same offsets as out, or null
  float* out;             // tile's first pixel, first output block
  int64_t out_block_stride;
  bool second_block;      // false for the last panel of K % 16 == 8 channels
};

// Independent sums per output vector: an FMA takes 4 cycles and two issue per cycle, so 8 chains
// keep both units busy. Tiles of 1-3 pixels (image edges, row ends) split their sums by lane.
template <int kRows>
constexpr int kChains = kRows == 1 ? 4 : (kRows <= 3 ? 2 : 1);

// out[r] = act(sum over taps and input channels + bias + residual) for kRows pixels of one output row.
template <int kRows, bool kResidual, bool kRelu>
void conv_tile(const float* input, int64_t input_pixel_step, int64_t input_block_stride, int64_t in_blocks,
               const Tap* taps, int64_t tap_count, const float* panel, const Epilogue& e) {
  constexpr int chains = kChains<kRows>;
  Vec acc[chains][kRows][2];
#pragma GCC unroll 4
  for (int c = 0; c < chains; ++c) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      acc[c][r][0] = Vec(0.f);
      acc[c][r][1] = Vec(0.f);
    }
  }
  for (int64_t t = 0; t < tap_count; ++t) {
    const float* tap_input = input + taps[t].input_offset;
    const float* tap_panel = panel + taps[t].panel_offset;
    for (int64_t block = 0; block < in_blocks; ++block) {
      const float* a = tap_input + block * input_block_stride;
      const float* b = tap_panel + block * kChannelBlock * kPanelColumns;
#pragma GCC unroll 8
      for (int lane = 0; lane < kChannelBlock; ++lane) {
        const Vec b0 = Vec::loadu(b + lane * kPanelColumns);
        const Vec b1 = Vec::loadu(b + lane * kPanelColumns + kChannelBlock);
#pragma GCC unroll 6
        for (int r = 0; r < kRows; ++r) {
          const Vec value(a[r * input_pixel_step + lane]);
          acc[lane % chains][r][0] = at::vec::fmadd(value, b0, acc[lane % chains][r][0]);
          acc[lane % chains][r][1] = at::vec::fmadd(value, b1, acc[lane % chains][r][1]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int c = 1; c < chains; ++c) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      acc[0][r][0] = acc[0][r][0] + acc[c][r][0];
      acc[0][r][1] = acc[0][r][1] + acc[c][r][1];
    }
  }
  const Vec bias0 = Vec::loadu(e.bias), bias1 = Vec::loadu(e.bias + kChannelBlock);
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    const int64_t offset = r * kChannelBlock;
    Vec v0 = acc[0][r][0] + bias0, v1 = acc[0][r][1] + bias1;
    if constexpr (kResidual) {
      v0 = v0 + Vec::loadu(e.residual + offset);
      if (e.second_block) v1 = v1 + Vec::loadu(e.residual + e.out_block_stride + offset);
    }
    if constexpr (kRelu) {
      v0 = LaneSelect<Vec>::relu_keep_nan(v0);
      v1 = LaneSelect<Vec>::relu_keep_nan(v1);
    }
    v0.store(e.out + offset);
    if (e.second_block) v1.store(e.out + e.out_block_stride + offset);
  }
}

template <bool kResidual, bool kRelu>
void conv_tile_rows(int64_t rows, const float* input, int64_t input_pixel_step, int64_t input_block_stride,
                    int64_t in_blocks, const Tap* taps, int64_t tap_count, const float* panel, const Epilogue& e) {
  switch (rows) {
#define RESNET_FAST_TILE_CASE(R)                                                                              \
  case R:                                                                                                     \
    return conv_tile<R, kResidual, kRelu>(input, input_pixel_step, input_block_stride, in_blocks, taps, tap_count, \
                                          panel, e);
    RESNET_FAST_TILE_CASE(1)
    RESNET_FAST_TILE_CASE(2)
    RESNET_FAST_TILE_CASE(3)
    RESNET_FAST_TILE_CASE(4)
    RESNET_FAST_TILE_CASE(5)
    RESNET_FAST_TILE_CASE(6)
#undef RESNET_FAST_TILE_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "conv_tile_rows: rows must be 1..6, got ", rows);
  }
}

// Output pixels [col_begin, col_end) of one output row, for one weight panel.
template <bool kResidual, bool kRelu>
void conv_row_span(const ConvShape& s, int64_t image, int64_t out_row, int64_t col_begin, int64_t col_end,
                   int64_t panel_index, const float* x, const float* weight, const float* bias,
                   const float* residual, float* out) {
  const int64_t in_plane = s.height * s.width * kChannelBlock;
  const int64_t out_plane = s.out_height * s.out_width * kChannelBlock;
  const int64_t in_blocks = s.in_blocks, channels = in_blocks * kChannelBlock;
  const float* panel = weight + panel_index * s.panel_floats();
  const float* image_input = x + image * s.in_image_stride();
  const int64_t out_base =
      image * s.out_image_stride() + 2 * panel_index * out_plane + out_row * s.out_width * kChannelBlock;
  const bool second_block = 2 * panel_index + 1 < s.out_blocks;
  // Columns whose every kernel tap is inside the image: the interior, tiled 6 pixels at a time.
  const int64_t interior_begin = std::min(ceil_div(s.padding, s.stride), s.out_width);
  const int64_t last_start = s.width + s.padding - s.kernel;  // input column of the last interior tap window
  const int64_t interior_end =
      std::clamp<int64_t>(last_start < 0 ? 0 : last_start / s.stride + 1, interior_begin, s.out_width);

  std::array<Tap, 49> taps;  // kernel <= 7
  auto gather_taps = [&](int64_t col) {  // the taps inside the image for output column col
    int64_t count = 0;
    for (int64_t ky = 0; ky < s.kernel; ++ky) {
      const int64_t in_row = out_row * s.stride - s.padding + ky;
      if (in_row < 0 || in_row >= s.height) continue;
      for (int64_t kx = 0; kx < s.kernel; ++kx) {
        const int64_t in_col = col * s.stride - s.padding + kx;
        if (in_col < 0 || in_col >= s.width) continue;
        taps[count++] = {(in_row * s.width + in_col) * kChannelBlock, (ky * s.kernel + kx) * channels * kPanelColumns};
      }
    }
    return count;
  };
  auto run = [&](int64_t col, int64_t rows, int64_t tap_count) {
    const int64_t offset = out_base + col * kChannelBlock;
    const Epilogue e{bias + panel_index * kPanelColumns, kResidual ? residual + offset : nullptr, out + offset,
                     out_plane, second_block};
    // Taps are relative to the tile's first pixel's input position, so the tile walks the input
    // stride * 8 floats per output pixel.
    conv_tile_rows<kResidual, kRelu>(rows, image_input, s.stride * kChannelBlock, in_plane, in_blocks, taps.data(),
                                     tap_count, panel, e);
  };
  int64_t col = col_begin;
  for (; col < std::min(col_end, interior_begin); ++col) run(col, 1, gather_taps(col));
  const int64_t tiled_end = std::min(col_end, interior_end);
  if (col < tiled_end) {
    const int64_t tap_count = gather_taps(col);  // the same taps, shifted, for every interior column
    // As few tiles as 6-pixel tiles need, with pixels spread evenly: 13 -> 5, 4, 4 rather than 6, 6, 1.
    const int64_t tiles = ceil_div(tiled_end - col, kPanelRows);
    const int64_t base = (tiled_end - col) / tiles;
    int64_t longer = (tiled_end - col) % tiles;
    while (col < tiled_end) {
      const int64_t rows = base + (longer-- > 0 ? 1 : 0);
      run(col, rows, tap_count);
      col += rows;
      for (int64_t t = 0; t < tap_count; ++t) taps[t].input_offset += rows * s.stride * kChannelBlock;
    }
  }
  for (; col < col_end; ++col) run(col, 1, gather_taps(col));
}

// Tasks: (image, a run of output pixels, a group of weight panels).
struct Schedule {
  int64_t pixels_per_chunk, chunks, panels_per_group, groups;
  // Walk every image's chunks for one panel group before the next group (weights read once, inputs
  // once per group) when the weights outweigh the inputs; else every group per chunk.
  bool groups_outer;
};

Schedule schedule_for(const ConvShape& s) {
  const int64_t out_pixels = s.out_height * s.out_width;
  const int64_t input_bytes_per_pixel = s.in_blocks * kChannelBlock * s.stride * s.stride * sizeof(float);
  int64_t per_chunk = std::min(std::max(kInputChunkBytes / input_bytes_per_pixel, kPanelRows), out_pixels);
  int64_t per_group = std::clamp<int64_t>(kPanelGroupBytes / (s.panel_floats() * sizeof(float)), 1, s.panels);
  // Smaller chunks, then smaller groups, until there are enough tasks to share between threads.
  while (s.batch * ceil_div(out_pixels, per_chunk) * ceil_div(s.panels, per_group) < kMinTasks) {
    if (per_chunk > 4 * kPanelRows) {
      per_chunk = ceil_div(per_chunk, 2);
    } else if (per_group > 1) {
      per_group = ceil_div(per_group, 2);
    } else {
      break;
    }
  }
  // Chunks of whole output rows, or (one flattened row) of whole tiles: no partial tile mid-image.
  if (s.out_height > 1 && per_chunk >= s.out_width) {
    per_chunk = per_chunk / s.out_width * s.out_width;
  } else if (s.out_height == 1 && per_chunk < out_pixels) {
    per_chunk = std::max(kPanelRows, per_chunk / kPanelRows * kPanelRows);
  }
  const int64_t groups = ceil_div(s.panels, per_group);
  const bool weights_larger = s.panels * s.panel_floats() > s.batch * s.in_image_stride();
  return {per_chunk, ceil_div(out_pixels, per_chunk), ceil_div(s.panels, groups), groups, weights_larger};
}

template <bool kResidual, bool kRelu>
void blocked_conv_kernel(const ConvShape& s, const float* x, const float* weight, const float* bias,
                         const float* residual, float* out) {
  const Schedule plan = schedule_for(s);
  const int64_t out_pixels = s.out_height * s.out_width;
  parallel_tasks(s.batch * plan.chunks * plan.groups, [&](int64_t task) {
    const int64_t group = plan.groups_outer ? task / (s.batch * plan.chunks) : task % plan.groups;
    const int64_t image_chunk = plan.groups_outer ? task % (s.batch * plan.chunks) : task / plan.groups;
    const int64_t chunk = image_chunk % plan.chunks, image = image_chunk / plan.chunks;
    const int64_t pixel_begin = chunk * plan.pixels_per_chunk;
    const int64_t pixel_end = std::min(out_pixels, pixel_begin + plan.pixels_per_chunk);
    const int64_t panel_end = std::min(s.panels, (group + 1) * plan.panels_per_group);
    for (int64_t panel = group * plan.panels_per_group; panel < panel_end; ++panel) {
      for (int64_t pixel = pixel_begin; pixel < pixel_end;) {
        const int64_t row = pixel / s.out_width, col = pixel % s.out_width;
        const int64_t span_end = std::min(s.out_width, col + (pixel_end - pixel));
        conv_row_span<kResidual, kRelu>(s, image, row, col, span_end, panel, x, weight, bias, residual, out);
        pixel += span_end - col;
      }
    }
  });
}

// The convolution's shape, after checking every argument the two ops share.
ConvShape checked_shape(const char* op, const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                        int64_t stride, int64_t padding) {
  check_blocked_activation(op, "x", x);
  TORCH_CHECK(packed_weight.dim() == 5 && packed_weight.size(1) == packed_weight.size(2) &&
                  packed_weight.size(3) == x.size(1) * kChannelBlock && packed_weight.size(4) == kPanelColumns,
              op, ": packed_weight must come from blocked_conv_weight for ", x.size(1) * kChannelBlock,
              " input channels (shape (panels, k, k, ", x.size(1) * kChannelBlock, ", ", kPanelColumns,
              ")), got shape ", packed_weight.sizes());
  TORCH_CHECK(packed_weight.device().is_cpu() && packed_weight.scalar_type() == at::kFloat &&
                  packed_weight.is_contiguous(),
              op, ": packed_weight must be a contiguous float32 CPU tensor");
  TORCH_CHECK(packed_weight.size(1) <= 7, op, ": kernels up to 7x7 are supported, got ", packed_weight.size(1));
  TORCH_CHECK(bias.dim() == 1 && bias.numel() % kChannelBlock == 0 &&
                  ceil_div(bias.numel(), kPanelColumns) == packed_weight.size(0),
              op, ": bias must have one value per output channel of packed_weight, a multiple of ", kChannelBlock,
              ", got shape ", bias.sizes());
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat, op, ": bias must be a float32 CPU tensor");
  TORCH_CHECK(stride >= 1 && padding >= 0, op, ": stride must be >= 1 and padding >= 0, got stride=", stride,
              ", padding=", padding);
  ConvShape s{x.size(0), x.size(1), bias.numel() / kChannelBlock, x.size(2), x.size(3), 0, 0,
              packed_weight.size(1), stride, padding, packed_weight.size(0)};
  TORCH_CHECK(s.height + 2 * padding >= s.kernel && s.width + 2 * padding >= s.kernel, op, ": the ", s.kernel, "x",
              s.kernel, " kernel does not fit the padded ", s.height, "x", s.width, " input");
  s.out_height = (s.height + 2 * padding - s.kernel) / stride + 1;
  s.out_width = (s.width + 2 * padding - s.kernel) / stride + 1;
  return s;
}

std::vector<int64_t> output_shape(const ConvShape& s) {
  return {s.batch, s.out_blocks, s.out_height, s.out_width, kChannelBlock};
}

// out = act(conv(x) + bias + residual); residual may be out itself (each tile reads its residual
// before it stores there) or null.
void run_blocked_conv(const ConvShape& s, const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                      const float* residual, float* out, bool relu) {
  // 1x1, stride 1, no padding: the image is one row of H * W pixels, so tiles run across row ends.
  ConvShape run_shape = s;
  if (s.kernel == 1 && s.stride == 1 && s.padding == 0) {
    run_shape.width = run_shape.out_width = s.height * s.width;
    run_shape.height = run_shape.out_height = 1;
  }
  // Zero-padded to whole panels, so the last panel's second block reads defined values.
  Tensor bias_padded = bias.contiguous();
  if (bias.numel() != s.panels * kPanelColumns) {
    bias_padded = at::constant_pad_nd(bias, {0, s.panels * kPanelColumns - bias.numel()});
  }
  const Tensor x_c = x.contiguous();
  auto run = [&](auto residual_tag, auto relu_tag) {
    blocked_conv_kernel<decltype(residual_tag)::value, decltype(relu_tag)::value>(
        run_shape, x_c.const_data_ptr<float>(), packed_weight.const_data_ptr<float>(),
        bias_padded.const_data_ptr<float>(), residual, out);
  };
  if (relu) {
    residual ? run(std::true_type{}, std::true_type{}) : run(std::false_type{}, std::true_type{});
  } else {
    residual ? run(std::true_type{}, std::false_type{}) : run(std::false_type{}, std::false_type{});
  }
}

Tensor blocked_conv_cpu(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                        const std::optional<Tensor>& residual, bool relu, int64_t stride, int64_t padding) {
  constexpr const char* op = "blocked_conv";
  const ConvShape s = checked_shape(op, x, packed_weight, bias, stride, padding);
  const std::vector<int64_t> out_shape = output_shape(s);
  const Tensor residual_c = checked_blocked_residual(op, residual, out_shape);
  Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  run_blocked_conv(s, x, packed_weight, bias, residual.has_value() ? residual_c.const_data_ptr<float>() : nullptr,
                   out.mutable_data_ptr<float>(), relu);
  return out;
}

// out = act(conv(x) + bias + out): the residual add written over the residual, which saves
// reading the output's cache lines from memory before they are stored (the residual's are read anyway).
void blocked_conv_add_cpu(const Tensor& x, const Tensor& packed_weight, const Tensor& bias, const Tensor& out,
                          bool relu, int64_t stride, int64_t padding) {
  constexpr const char* op = "blocked_conv_add_";
  const ConvShape s = checked_shape(op, x, packed_weight, bias, stride, padding);
  check_blocked_activation(op, "out", out);
  const std::vector<int64_t> out_shape = output_shape(s);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), op, ": out shape ", out.sizes(),
              " does not match the output shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(!out.is_same(x) && out.data_ptr() != x.data_ptr(), op, ": out must not be x");
  if (out.numel() == 0) return;
  run_blocked_conv(s, x, packed_weight, bias, out.const_data_ptr<float>(), out.mutable_data_ptr<float>(), relu);
}

}  // namespace
}  // namespace RESNET_FAST_ISA

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("blocked_conv_weight", &RESNET_FAST_ISA::blocked_conv_weight_cpu);
  m.impl("blocked_conv", &RESNET_FAST_ISA::blocked_conv_cpu);
  m.impl("blocked_conv_add_", &RESNET_FAST_ISA::blocked_conv_add_cpu);
}

}  // namespace resnet_fast
