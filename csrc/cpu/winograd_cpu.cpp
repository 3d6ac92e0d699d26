// Winograd F(2x2, 3x3) convolution for CPU float32 inference (3x3, stride 1, padding 1, groups 1),
// with the folded-BN bias, the residual add and ReLU applied as each output tile is stored.
//
// Why: with BatchNorm folded and the epilogue fused, the convolution's multiply-adds are the cost
// left, so going faster means fewer of them. F(2x2, 3x3) makes each 2x2 output tile from a 4x4 input
// patch with 16 instead of 36 multiply-adds per (input, output) channel pair. Its data transforms
// are additions only (the weight transform's halves are done once, in float64), so the result is
// as accurate as the direct convolution; F(4x4, 3x3) would save more but its float32 error is
// several times the stock path's, outside the project's tolerance rule.
//
// Per task (a chunk of tiles x a range of output-channel panels), all in a per-thread workspace:
//   1. input transform:  V[p] = B^T d B for each tile's 4x4 patch d, channels vectorised;
//   2. 16 matrix products M[p] (tiles x K) = V[p] (tiles x C) * U[p] (C x K), U = G g G^T
//      pre-packed once per layer (winograd_weight) in panels of kPanelColumns output channels;
//   3. output transform: out = act(A^T M A + bias + residual), stored channels_last.
//
// Compiled once per ISA variant (cpu_isa.h; csrc/cpu/avx512/winograd_cpu.cpp is the AVX-512 build):
// AVX2 works on 8-lane vectors with 16-column panels, AVX-512 on 16-lane vectors with 32-column
// panels, so a packed weight belongs to the variant that packed it (its last dimension says which).
// isa_dispatch_cpu.cpp registers the ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <vector>

#include "blocked_layout.h"
#include "cpu_isa.h"
#include "lane_select_vec.h"
#include "micro_kernel.h"
#include "parallel_tasks.h"

namespace resnet_fast {
namespace RESNET_FAST_ISA {
namespace {

using at::Tensor;
constexpr int64_t kPositions = 16;  // 4x4 transform-domain points, one matrix product each
constexpr const char* kIsaName = RESNET_FAST_ISA_NAME;
// Workspace per task (V and M, float) aimed at a per-core L2; larger channel counts get the
// minimum tile count instead, since the products then dominate the workspace traffic.
constexpr int64_t kWorkspaceBudgetBytes = 512 << 10;
// In tiles, not micro-kernel calls, so both ISA variants use the same workspace: with a 12-row
// AVX-512 tile, a floor of 8 calls (96 tiles) put V, M and the weights of a 64-channel layer past a
// 1 MB L2.
constexpr int64_t kMinTilesPerTask = 48;
constexpr int64_t kMaxTilesPerTask = 240;
static_assert(kMinTilesPerTask % kPanelRows == 0 && kMaxTilesPerTask % kPanelRows == 0,
              "task sizes are whole micro-kernel calls");

// The weight transform U = G g G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
// in float64, packed as (16 positions, K panels, C, kPanelColumns output channels), zero beyond K.
Tensor winograd_weight_cpu(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_weight: weight must be (K, C, 3, 3), got shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), "winograd_weight: weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK(weight.is_floating_point(), "winograd_weight: weight must be floating point, got ", weight.scalar_type());
  const int64_t out_channels = weight.size(0), in_channels = weight.size(1);
  const int64_t panels = ceil_div(out_channels, kPanelColumns);
  const Tensor g = weight.to(at::kDouble).contiguous();
  Tensor packed = at::zeros({kPositions, panels, in_channels, kPanelColumns}, weight.options().dtype(at::kFloat));
  const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  const double* g_data = g.const_data_ptr<double>();
  float* u = packed.mutable_data_ptr<float>();
  at::parallel_for(0, out_channels, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      for (int64_t c = 0; c < in_channels; ++c) {
        const double* kernel = g_data + (k * in_channels + c) * 9;
        double gk[4][3];  // G g
        for (int i = 0; i < 4; ++i) {
          for (int b = 0; b < 3; ++b) {
            gk[i][b] = G[i][0] * kernel[b] + G[i][1] * kernel[3 + b] + G[i][2] * kernel[6 + b];
          }
        }
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 4; ++j) {
            const double value = gk[i][0] * G[j][0] + gk[i][1] * G[j][1] + gk[i][2] * G[j][2];
            const int64_t p = i * 4 + j;
            u[((p * panels + k / kPanelColumns) * in_channels + c) * kPanelColumns + k % kPanelColumns] =
                static_cast<float>(value);
          }
        }
      }
    }
  });
  return packed;
}

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width;
  int64_t tiles_h, tiles_w, tiles;
  int64_t panels;  // weight panels of kPanelColumns output channels
  ActivationLayout in, out;  // channels_last or 8-channel blocks, for x and for out / residual
};

// Which tile (image, top-left output pixel) a flat tile index is.
struct TileOrigin {
  int64_t image, row, col;
};

inline TileOrigin tile_origin(const Geometry& geo, int64_t tile) {
  const int64_t per_image = geo.tiles_h * geo.tiles_w;
  const int64_t in_image = tile % per_image;
  return {tile / per_image, 2 * (in_image / geo.tiles_w), 2 * (in_image % geo.tiles_w)};
}

// Vec::size() channels from channel c on of one pixel (pixel: its first channel), count of them
// (fewer only at the end). channels_last has them contiguous; 8-channel blocks too for 8-lane vectors,
// while a 16-lane vector takes two blocks, H * W * 8 floats apart (unless H * W == 1).
inline Vec load_channels(const float* pixel, const ActivationLayout& layout, int64_t c, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(Vec::size() == 2 * kChannelBlock, "a 16-lane vector spans two channel blocks");
  if (layout.block_stride != kChannelBlock) {
    const float* low = pixel + layout.channel(c);
    if (count <= kChannelBlock) return Vec::loadu(low, count);
    const float* high = pixel + layout.channel(c + kChannelBlock);
    const __mmask8 high_lanes = static_cast<__mmask8>((1u << (count - kChannelBlock)) - 1);
    return _mm512_insertf32x8(_mm512_zextps256_ps512(_mm256_loadu_ps(low)), _mm256_maskz_loadu_ps(high_lanes, high),
                              1);
  }
#endif
  return load_partial(pixel + layout.channel(c), count);
}

inline void store_channels(float* pixel, const ActivationLayout& layout, int64_t c, const Vec& v, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if (layout.block_stride != kChannelBlock) {
    float* low = pixel + layout.channel(c);
    if (count <= kChannelBlock) return v.store(low, count);
    const __m512 value = v;
    const __mmask8 high_lanes = static_cast<__mmask8>((1u << (count - kChannelBlock)) - 1);
    _mm256_storeu_ps(low, _mm512_castps512_ps256(value));
    _mm256_mask_storeu_ps(pixel + layout.channel(c + kChannelBlock), high_lanes, _mm512_extractf32x8_ps(value, 1));
    return;
  }
#endif
  store_partial(pixel + layout.channel(c), v, count);
}

// V[p][t][0:C] for one tile: B^T d B over its 4x4 input patch (zeros outside the image).
void transform_input_tile(const float* x, const Geometry& geo, TileOrigin origin, float* v, int64_t position_stride) {
  const float* patch[4][4];
  for (int i = 0; i < 4; ++i) {
    const int64_t row = origin.row - 1 + i;
    for (int j = 0; j < 4; ++j) {
      const int64_t col = origin.col - 1 + j;
      const bool inside = row >= 0 && row < geo.height && col >= 0 && col < geo.width;
      patch[i][j] = inside ? x + geo.in.pixel(origin.image, row, col) : nullptr;
    }
  }
  for (int64_t c = 0; c < geo.in_channels; c += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), geo.in_channels - c);
    Vec d[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        d[i][j] = patch[i][j] ? load_channels(patch[i][j], geo.in, c, count) : Vec(0.f);
      }
    }
    // B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], applied to columns then rows.
    Vec t[4][4];
    for (int j = 0; j < 4; ++j) {
      t[0][j] = d[0][j] - d[2][j];
      t[1][j] = d[1][j] + d[2][j];
      t[2][j] = d[2][j] - d[1][j];
      t[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {
      float* row = v + (i * 4) * position_stride + c;
      store_partial(row, t[i][0] - t[i][2], count);
      store_partial(row + position_stride, t[i][1] + t[i][2], count);
      store_partial(row + 2 * position_stride, t[i][2] - t[i][1], count);
      store_partial(row + 3 * position_stride, t[i][1] - t[i][3], count);
    }
  }
}

// out pixels of one tile, channels [k_begin, k_end): act(A^T M A + bias + residual),
// A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. m points at M[0][t][k_begin].
template <bool kRelu, bool kResidual>
void transform_output_tile(const float* m, int64_t position_stride, const Geometry& geo, TileOrigin origin,
                           int64_t k_begin, int64_t k_end, const float* bias, const float* residual, float* out) {
  const bool second_row = origin.row + 1 < geo.height, second_col = origin.col + 1 < geo.width;
  const int64_t pixel = geo.out.pixel(origin.image, origin.row, origin.col);
  for (int64_t k = k_begin; k < k_end; k += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), k_end - k);
    const float* mk = m + (k - k_begin);
    Vec s[2][4];
    for (int j = 0; j < 4; ++j) {
      const Vec m0 = load_partial(mk + j * position_stride, count);
      const Vec m1 = load_partial(mk + (4 + j) * position_stride, count);
      const Vec m2 = load_partial(mk + (8 + j) * position_stride, count);
      const Vec m3 = load_partial(mk + (12 + j) * position_stride, count);
      s[0][j] = m0 + m1 + m2;
      s[1][j] = m1 - m2 - m3;
    }
    const Vec b = load_partial(bias + k, count);
    for (int i = 0; i < 2; ++i) {
      if (i == 1 && !second_row) break;
      const Vec y[2] = {s[i][0] + s[i][1] + s[i][2], s[i][1] - s[i][2] - s[i][3]};
      for (int j = 0; j < 2; ++j) {
        if (j == 1 && !second_col) break;
        const int64_t offset = pixel + i * geo.out.row_stride + j * geo.out.pixel_stride;
        Vec value = y[j] + b;
        if constexpr (kResidual) value = value + load_channels(residual + offset, geo.out, k, count);
        if constexpr (kRelu) value = LaneSelect<Vec>::relu_keep_nan(value);
        store_channels(out + offset, geo.out, k, value, count);
      }
    }
  }
}

// Splits the tiles into chunks and, when there are fewer chunks than threads, the output
// channels into panel ranges, so every thread has work.
struct Schedule {
  int64_t tiles_per_chunk, chunks, panel_splits;
};

Schedule schedule_for(const Geometry& geo) {
  const int64_t threads = at::get_num_threads();
  const int64_t bytes_per_tile = kPositions * (geo.in_channels + geo.panels * kPanelColumns) * sizeof(float);
  int64_t per_chunk = std::clamp(kWorkspaceBudgetBytes / bytes_per_tile, kMinTilesPerTask, kMaxTilesPerTask);
  // Whole chunks for every thread, balanced, in multiples of the micro-kernel's rows.
  int64_t chunks = ceil_div(geo.tiles, per_chunk);
  chunks = ceil_div(chunks, threads) * threads;
  per_chunk = ceil_div(ceil_div(geo.tiles, chunks), kPanelRows) * kPanelRows;
  chunks = ceil_div(geo.tiles, per_chunk);
  const int64_t panel_splits = chunks >= threads ? 1 : std::min(geo.panels, ceil_div(threads, chunks));
  return {per_chunk, chunks, panel_splits};
}

template <bool kRelu, bool kResidual>
void winograd_kernel(const float* x, const float* u, const float* bias, const float* residual, float* out,
                     const Geometry& geo, const Schedule& plan) {
  const int64_t rows = plan.tiles_per_chunk;  // a multiple of kPanelRows
  const int64_t max_panels = ceil_div(geo.panels, plan.panel_splits);
  const int64_t v_size = kPositions * rows * geo.in_channels;
  const int64_t m_stride = max_panels * kPanelColumns;  // M row length
  parallel_tasks(plan.chunks * plan.panel_splits, [&](int64_t task) {
    // Kept per thread across calls: a fresh multi-megabyte buffer per call costs page faults.
    thread_local std::vector<float> workspace;
    workspace.resize(std::max<size_t>(workspace.size(), v_size + kPositions * rows * m_stride));
    float* v = workspace.data();
    float* m = v + v_size;
    const int64_t chunk = task / plan.panel_splits, split = task % plan.panel_splits;
    const int64_t first_tile = chunk * rows;
    const int64_t tiles = std::min(rows, geo.tiles - first_tile);
    const int64_t panel_begin = split * max_panels, panel_end = std::min(geo.panels, panel_begin + max_panels);
    if (panel_begin >= panel_end) return;
    const int64_t k_begin = panel_begin * kPanelColumns;
    const int64_t k_end = std::min(geo.out_channels, panel_end * kPanelColumns);

    const int64_t v_position_stride = rows * geo.in_channels;
    for (int64_t t = 0; t < tiles; ++t) {
      transform_input_tile(x, geo, tile_origin(geo, first_tile + t), v + t * geo.in_channels, v_position_stride);
    }
    // Rows past the last tile feed only discarded products; zeros keep them finite.
    for (int64_t p = 0; p < kPositions; ++p) {
      std::fill(v + p * v_position_stride + tiles * geo.in_channels, v + (p + 1) * v_position_stride, 0.f);
    }

    const int64_t m_position_stride = rows * m_stride;
    const int64_t used_rows = ceil_div(tiles, kPanelRows) * kPanelRows;
    for (int64_t p = 0; p < kPositions; ++p) {
      for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
        const float* b = u + (p * geo.panels + panel) * geo.in_channels * kPanelColumns;
        for (int64_t r = 0; r < used_rows; r += kPanelRows) {
          micro_kernel(v + p * v_position_stride + r * geo.in_channels, geo.in_channels, b, geo.in_channels,
                        m + p * m_position_stride + r * m_stride + (panel - panel_begin) * kPanelColumns, m_stride);
        }
      }
    }

    for (int64_t t = 0; t < tiles; ++t) {
      transform_output_tile<kRelu, kResidual>(m + t * m_stride, m_position_stride, geo,
                                              tile_origin(geo, first_tile + t), k_begin, k_end, bias, residual,
                                              out);
    }
  });
}

void check_weight_and_bias(const char* op, int64_t in_channels, const Tensor& packed_weight, const Tensor& bias) {
  TORCH_CHECK(packed_weight.dim() == 4 && packed_weight.size(0) == kPositions &&
                  packed_weight.size(2) == in_channels && packed_weight.size(3) == kPanelColumns,
              op, ": packed_weight must come from winograd_weight for ", in_channels, " input channels (shape (",
              kPositions, ", panels, ", in_channels, ", ", kPanelColumns, "), the panel width of the ",
              kIsaName, " kernels this process runs), got shape ", packed_weight.sizes());
  TORCH_CHECK(packed_weight.device().is_cpu() && packed_weight.scalar_type() == at::kFloat &&
                  packed_weight.is_contiguous(),
              op, ": packed_weight must be a contiguous float32 CPU tensor");
  TORCH_CHECK(bias.dim() == 1 && ceil_div(bias.numel(), kPanelColumns) == packed_weight.size(1), op,
              ": bias must have one value per output channel of packed_weight, got shape ", bias.sizes());
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat, op, ": bias must be a float32 CPU tensor");
}

Geometry geometry_for(int64_t batch, int64_t in_channels, int64_t height, int64_t width, const Tensor& packed_weight,
                      const Tensor& bias) {
  Geometry g{batch, in_channels, bias.numel(), height, width, 0, 0, 0, packed_weight.size(1), {}, {}};
  g.tiles_h = ceil_div(g.height, 2);
  g.tiles_w = ceil_div(g.width, 2);
  g.tiles = g.batch * g.tiles_h * g.tiles_w;
  return g;
}

// Runs the kernel; x, residual and out follow geo.in / geo.out. No input channels: out = act(bias + residual).
void run_winograd(const float* x, const Tensor& packed_weight, const Tensor& bias, const float* residual, float* out,
                  const Geometry& geo, bool relu) {
  const Tensor bias_c = bias.contiguous();
  auto run = [&](auto relu_tag, auto residual_tag) {
    winograd_kernel<decltype(relu_tag)::value, decltype(residual_tag)::value>(
        x, packed_weight.const_data_ptr<float>(), bias_c.const_data_ptr<float>(), residual, out, geo,
        schedule_for(geo));
  };
  if (relu) {
    residual ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
  } else {
    residual ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
  }
}

Tensor winograd_conv3x3_cpu(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                            const std::optional<Tensor>& residual, bool relu) {
  constexpr const char* op = "winograd_conv3x3";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  check_weight_and_bias(op, x.size(1), packed_weight, bias);
  Geometry geo = geometry_for(x.size(0), x.size(1), x.size(2), x.size(3), packed_weight, bias);
  geo.in = ActivationLayout::channels_last(geo.in_channels, geo.height, geo.width);
  geo.out = ActivationLayout::channels_last(geo.out_channels, geo.height, geo.width);
  Tensor residual_cl;
  if (residual.has_value()) {
    const Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == at::IntArrayRef({geo.batch, geo.out_channels, geo.height, geo.width}), op,
                ": residual shape ", r.sizes(), " does not match the output shape ",
                at::IntArrayRef({geo.batch, geo.out_channels, geo.height, geo.width}));
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kFloat, op,
                ": residual must be a float32 CPU tensor, got ", r.scalar_type(), " on ", r.device());
    residual_cl = r.contiguous(at::MemoryFormat::ChannelsLast);
  }
  const Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  Tensor out = at::empty({geo.batch, geo.out_channels, geo.height, geo.width},
                         x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  if (geo.in_channels == 0) {
    // No input channels: the convolution is zero, the output is act(bias + residual).
    Tensor value = bias.view({1, -1, 1, 1}).expand_as(out);
    if (residual.has_value()) value = value + residual_cl;
    out.copy_(relu ? value.relu() : value);
    return out;
  }
  run_winograd(x_cl.const_data_ptr<float>(), packed_weight, bias,
               residual.has_value() ? residual_cl.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(),
               geo, relu);
  return out;
}

// The same convolution on 8-channel blocks: x (N, C/8, H, W, 8) -> (N, K/8, H, W, 8).
Tensor winograd_conv3x3_blocked_cpu(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                                    const std::optional<Tensor>& residual, bool relu) {
  constexpr const char* op = "winograd_conv3x3_blocked";
  check_blocked_activation(op, "x", x);
  check_weight_and_bias(op, x.size(1) * kChannelBlock, packed_weight, bias);
  TORCH_CHECK(bias.numel() % kChannelBlock == 0, op, ": the output channels (", bias.numel(),
              ") must be a multiple of ", kChannelBlock);
  Geometry geo = geometry_for(x.size(0), x.size(1) * kChannelBlock, x.size(2), x.size(3), packed_weight, bias);
  geo.in = ActivationLayout::blocked(geo.in_channels, geo.height, geo.width);
  geo.out = ActivationLayout::blocked(geo.out_channels, geo.height, geo.width);
  const std::vector<int64_t> out_shape{geo.batch, geo.out_channels / kChannelBlock, geo.height, geo.width,
                                       kChannelBlock};
  const Tensor residual_c = checked_blocked_residual(op, residual, out_shape);
  const Tensor x_c = x.contiguous();
  Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  run_winograd(x_c.const_data_ptr<float>(), packed_weight, bias,
               residual.has_value() ? residual_c.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(),
               geo, relu);
  return out;
}

}  // namespace

void add_winograd_kernels(CpuKernelTable& table) {
  table.winograd_weight = &winograd_weight_cpu;
  table.winograd_panel_columns = kPanelColumns;
  table.winograd_conv3x3 = &winograd_conv3x3_cpu;
  table.winograd_conv3x3_blocked = &winograd_conv3x3_blocked_cpu;
}

}  // namespace RESNET_FAST_ISA
}  // namespace resnet_fast
