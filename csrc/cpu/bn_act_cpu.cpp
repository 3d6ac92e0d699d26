// CPU kernels of the resnet_fast ops (schemas in resnet_fast/ops/_library.py).
//
// Layouts: NCHW-contiguous (one channel = N runs of H*W contiguous elements)
// and channels_last (one pixel = a run of C contiguous channels; loops run
// along C so they vectorise). Inner loops are plain loops over a fixed lane
// count that the compiler vectorises (AVX2+FMA when setup.py enables it);
// dtype conversions (bf16/fp16 <-> fp32) are inlined into those loops.
// Elementwise math is in at::opmath_type (fp32 for fp32/bf16/fp16, fp64 for fp64);
// reductions accumulate in fp64 lanes (fp32 lanes measurably lost digits against
// the stock path's cascade sums, and the reductions stay memory-bound either way).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bn_act.h"

namespace resnet_fast {
namespace {

using at::Tensor;

// Elements per parallel task: large enough to amortise scheduling, small enough to balance 2+ cores.
constexpr int64_t kGrainElements = 1 << 15;
// Lanes of the independent accumulators the compiler turns into vector registers.
constexpr int kLanes = 16;
// Values per lane summed in the accumulation type before flushing into fp64.
constexpr int64_t kFlushPerLane = 64;

enum class Layout { kNchw, kChannelsLast };

at::MemoryFormat memory_format_of(Layout layout) {
  return layout == Layout::kNchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

// The working layout of y: NCHW if contiguous (also when C == 1 or H*W == 1, where
// both layouts are the same bytes), channels_last if that is contiguous, else NCHW after a copy.
Layout layout_of(const Tensor& y) {
  if (y.is_contiguous()) return Layout::kNchw;
  if (y.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  return Layout::kNchw;
}

Tensor in_layout(const Tensor& t, Layout layout) { return t.contiguous(memory_format_of(layout)); }

void check_activation(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d (N, C, H, W), got ", t.dim(), "-d of shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_like_y(const char* op, const char* name, const Tensor& t, const Tensor& y) {
  TORCH_CHECK(t.sizes() == y.sizes(), op, ": ", name, " shape ", t.sizes(), " does not match y shape ", y.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  TORCH_CHECK(t.device() == y.device(), op, ": ", name, " is on ", t.device(), " but y is on ", y.device());
}

// A per-channel vector (scale, shift, mean, invstd, weight) as a contiguous acc-type vector of length C.
Tensor per_channel(const char* op, const char* name, const Tensor& t, const Tensor& y, at::ScalarType acc_type) {
  const int64_t channels = y.size(1);
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, op, ": ", name, " must be a vector with one value per channel (",
              channels, "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == y.device(), op, ": ", name, " is on ", t.device(), " but y is on ", y.device());
  return t.to(acc_type).contiguous();
}

at::ScalarType acc_type_of(const Tensor& y) { return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename F>
void dispatch_bool(bool value, F&& body) {
  if (value) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

int64_t grain_for(int64_t elements_per_item) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item)); }

// Splits [0, rows) into chunks for the channels_last reductions, at most one per thread
// (each chunk keeps C-long partial sums; the merge afterwards is serial and fixed-order).
int64_t reduction_chunks(int64_t rows, int64_t channels) {
  const int64_t by_size = std::max<int64_t>(1, rows * channels / kGrainElements);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), std::min(by_size, rows)));
}

// --------------------------------------------------------------------------------------------
// bn_act_forward: out = act(y * scale[c] + shift[c] + residual)

template <typename T, typename acc_t, bool kRelu, bool kResidual>
void bn_act_forward_kernel(const T* y, const acc_t* scale, const acc_t* shift, const T* residual, T* out,
                           int64_t batch, int64_t channels, int64_t spatial, Layout layout) {
  if (layout == Layout::kNchw) {
    at::parallel_for(0, batch * channels, grain_for(spatial), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const acc_t s = scale[c], b = shift[c];
        const int64_t base = plane * spatial;
        const T* yp = y + base;
        const T* rp = kResidual ? residual + base : nullptr;
        T* op = out + base;
        for (int64_t i = 0; i < spatial; ++i) {
          const acc_t r = kResidual ? static_cast<acc_t>(rp[i]) : acc_t(0);
          op[i] = static_cast<T>(bn_act_apply<kRelu>(static_cast<acc_t>(yp[i]), s, b, r));
        }
      }
    });
  } else {
    at::parallel_for(0, batch * spatial, grain_for(channels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * channels;
        const T* yp = y + base;
        const T* rp = kResidual ? residual + base : nullptr;
        T* op = out + base;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t r = kResidual ? static_cast<acc_t>(rp[c]) : acc_t(0);
          op[c] = static_cast<T>(bn_act_apply<kRelu>(static_cast<acc_t>(yp[c]), scale[c], shift[c], r));
        }
      }
    });
  }
}

/// out[n,c,h,w] = act(y[n,c,h,w] * scale[c] + shift[c] + residual[n,c,h,w]).
///
/// Equivalent PyTorch:
///   out = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + (residual or 0)
///   out = torch.relu(out) if relu else out
/// scale None means 1. The output has y's dtype and memory format.
Tensor bn_act_forward_cpu(const Tensor& y_in, const std::optional<Tensor>& scale_in, const Tensor& shift_in,
                          const std::optional<Tensor>& residual_in, bool relu) {
  constexpr const char* op = "bn_act_forward";
  check_activation(op, "y", y_in);
  const Layout layout = layout_of(y_in);
  const Tensor y = in_layout(y_in, layout);
  const auto acc_type = acc_type_of(y);
  const Tensor shift = per_channel(op, "shift", shift_in, y, acc_type);
  const Tensor scale = scale_in.has_value() ? per_channel(op, "scale", *scale_in, y, acc_type)
                                            : at::ones({y.size(1)}, y.options().dtype(acc_type));
  Tensor residual;
  if (residual_in.has_value()) {
    check_like_y(op, "residual", *residual_in, y);
    residual = in_layout(*residual_in, layout);
  }
  Tensor out = at::empty_like(y, y.options(), memory_format_of(layout));
  if (y.numel() == 0) return out;
  const int64_t batch = y.size(0), channels = y.size(1), spatial = y.size(2) * y.size(3);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_bool(relu, [&](auto relu_tag) {
      dispatch_bool(residual.defined(), [&](auto residual_tag) {
        bn_act_forward_kernel<scalar_t, acc_t, decltype(relu_tag)::value, decltype(residual_tag)::value>(
            y.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
            residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
            batch, channels, spatial, layout);
      });
    });
  });
  return out;
}

// --------------------------------------------------------------------------------------------
// batch_stats: per-channel mean and biased variance over (N, H, W)

// Adds sum(x - pivot) and sum((x - pivot)^2) of a contiguous run to fp64 totals.
template <typename T, typename acc_t>
inline void accumulate_shifted_run(const T* x, int64_t n, double pivot, double& sum, double& sum_sq) {
  int64_t i = 0;
  while (i < n) {
    const int64_t block_end = std::min(n, i + kFlushPerLane * kLanes);
    double lane_sum[kLanes] = {}, lane_sq[kLanes] = {};
    for (; i + kLanes <= block_end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const double v = static_cast<double>(static_cast<acc_t>(x[i + j])) - pivot;
        lane_sum[j] += v;
        lane_sq[j] += v * v;
      }
    }
    for (; i < block_end; ++i) {
      const double v = static_cast<double>(static_cast<acc_t>(x[i])) - pivot;
      lane_sum[0] += v;
      lane_sq[0] += v * v;
    }
    for (int j = 0; j < kLanes; ++j) {
      sum += lane_sum[j];
      sum_sq += lane_sq[j];
    }
  }
}

template <typename T, typename acc_t>
void batch_stats_kernel(const T* y, acc_t* mean, acc_t* var, int64_t batch, int64_t channels, int64_t spatial,
                        Layout layout) {
  const int64_t count = batch * spatial;
  // Shifting by one sample of the channel keeps sum_sq - sum^2/n free of catastrophic cancellation.
  std::vector<double> pivot(channels), sum(channels, 0.0), sum_sq(channels, 0.0);
  for (int64_t c = 0; c < channels; ++c) {
    pivot[c] = static_cast<double>(static_cast<acc_t>(layout == Layout::kNchw ? y[c * spatial] : y[c]));
  }
  if (layout == Layout::kNchw) {
    at::parallel_for(0, channels, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s = 0.0, q = 0.0;
        for (int64_t n = 0; n < batch; ++n) {
          accumulate_shifted_run<T, acc_t>(y + (n * channels + c) * spatial, spatial, pivot[c], s, q);
        }
        sum[c] = s;
        sum_sq[c] = q;
      }
    });
  } else {
    const int64_t rows = count;
    const int64_t chunks = reduction_chunks(rows, channels);
    std::vector<double> chunk_sum(chunks * channels, 0.0), chunk_sq(chunks * channels, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<double> block_sum(channels), block_sq(channels);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t row_begin = rows * chunk / chunks, row_end = rows * (chunk + 1) / chunks;
        double* total_sum = chunk_sum.data() + chunk * channels;
        double* total_sq = chunk_sq.data() + chunk * channels;
        for (int64_t block = row_begin; block < row_end; block += kFlushPerLane) {
          std::fill(block_sum.begin(), block_sum.end(), 0.0);
          std::fill(block_sq.begin(), block_sq.end(), 0.0);
          double* __restrict__ bs = block_sum.data();
          double* __restrict__ bq = block_sq.data();
          const double* __restrict__ pv = pivot.data();
          const int64_t block_end = std::min(row_end, block + kFlushPerLane);
          for (int64_t row = block; row < block_end; ++row) {
            const T* __restrict__ yp = y + row * channels;
            for (int64_t c = 0; c < channels; ++c) {
              const double v = static_cast<double>(static_cast<acc_t>(yp[c])) - pv[c];
              bs[c] += v;
              bq[c] += v * v;
            }
          }
          for (int64_t c = 0; c < channels; ++c) {
            total_sum[c] += bs[c];
            total_sq[c] += bq[c];
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t c = 0; c < channels; ++c) {
        sum[c] += chunk_sum[chunk * channels + c];
        sum_sq[c] += chunk_sq[chunk * channels + c];
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    const auto state = welford_from_shifted_sums<double>(static_cast<double>(count), pivot[c], sum[c], sum_sq[c]);
    mean[c] = static_cast<acc_t>(state.mean);
    var[c] = static_cast<acc_t>(welford_biased_var(state));
  }
}

/// Per-channel mean and biased variance over (N, H, W), one read of y.
///
/// Equivalent PyTorch:
///   var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
/// Returned as float32 (float64 for float64 y).
std::tuple<Tensor, Tensor> batch_stats_cpu(const Tensor& y_in) {
  constexpr const char* op = "batch_stats";
  check_activation(op, "y", y_in);
  const Layout layout = layout_of(y_in);
  const Tensor y = in_layout(y_in, layout);
  const auto acc_type = acc_type_of(y);
  const int64_t batch = y.size(0), channels = y.size(1), spatial = y.size(2) * y.size(3);
  TORCH_CHECK(batch * spatial > 0, op, ": y has no elements per channel (shape ", y.sizes(),
              "); batch statistics need at least one");
  Tensor mean = at::empty({channels}, y.options().dtype(acc_type));
  Tensor var = at::empty({channels}, y.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "batch_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats_kernel<scalar_t, acc_t>(y.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                        var.mutable_data_ptr<acc_t>(), batch, channels, spatial, layout);
  });
  return {mean, var};
}

// --------------------------------------------------------------------------------------------
// bn_act_backward

// Adds sum(g) and sum(g * (y - mean)) of a contiguous run (g = masked grad) to fp64 totals,
// writing g to grad_residual when it is not null. Lanes sum kFlushPerLane values in acc_t
// (vector registers) before flushing into fp64; __restrict__ and one loop body (mask, sums,
// store) keep the loop branch-free and vectorised.
template <typename T, typename acc_t, bool kRelu, bool kStoreResidual>
inline void accumulate_grad_run(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ y,
                                T* __restrict__ grad_residual, int64_t n, acc_t mean, double& sum_g,
                                double& sum_gy) {
  int64_t i = 0;
  while (i < n) {
    const int64_t block_end = std::min(n, i + kFlushPerLane * kLanes);
    acc_t lane_g[kLanes] = {}, lane_gy[kLanes] = {};
    for (; i + kLanes <= block_end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(grad_out[i + j]), static_cast<acc_t>(out[i + j]));
        lane_g[j] += g;
        lane_gy[j] += g * (static_cast<acc_t>(y[i + j]) - mean);
        if (kStoreResidual) grad_residual[i + j] = static_cast<T>(g);
      }
    }
    for (; i < block_end; ++i) {
      const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i]));
      lane_g[0] += g;
      lane_gy[0] += g * (static_cast<acc_t>(y[i]) - mean);
      if (kStoreResidual) grad_residual[i] = static_cast<T>(g);
    }
    for (int j = 0; j < kLanes; ++j) {
      sum_g += static_cast<double>(lane_g[j]);
      sum_gy += static_cast<double>(lane_gy[j]);
    }
  }
}

// grad_y over a contiguous run of one channel; g comes from grad_residual when it was written
// (one read instead of two), otherwise it is recomputed from grad_out and out.
template <typename T, typename acc_t, bool kRelu>
inline void grad_y_run(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ grad_residual,
                       const T* __restrict__ y, T* __restrict__ grad_y, int64_t n, const BnBackwardCoefs<acc_t>& coefs,
                       acc_t mean) {
  if (grad_residual != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      grad_y[i] = static_cast<T>(
          bn_backward_apply(coefs, static_cast<acc_t>(grad_residual[i]), static_cast<acc_t>(y[i]) - mean));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i]));
      grad_y[i] = static_cast<T>(bn_backward_apply(coefs, g, static_cast<acc_t>(y[i]) - mean));
    }
  }
}

template <typename T, typename acc_t, bool kRelu>
void bn_act_backward_kernel(const T* grad_out, const T* out, const T* y, const acc_t* mean, const acc_t* invstd,
                            const acc_t* weight, T* grad_y, acc_t* grad_weight, acc_t* grad_bias, T* grad_residual,
                            int64_t batch, int64_t channels, int64_t spatial, Layout layout) {
  const int64_t count = batch * spatial;
  if (layout == Layout::kNchw) {
    // One channel at a time, reduction then grad_y: the channel's N*H*W elements are
    // still in cache for the second pass when they fit (e.g. 8x56x56 fp32 x 3 tensors ~ 300 KB).
    at::parallel_for(0, channels, grain_for(count), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum_g = 0.0, sum_gy = 0.0;
        for (int64_t n = 0; n < batch; ++n) {
          const int64_t base = (n * channels + c) * spatial;
          if (grad_residual != nullptr) {
            accumulate_grad_run<T, acc_t, kRelu, true>(grad_out + base, out + base, y + base, grad_residual + base,
                                                       spatial, mean[c], sum_g, sum_gy);
          } else {
            accumulate_grad_run<T, acc_t, kRelu, false>(grad_out + base, out + base, y + base, nullptr, spatial,
                                                        mean[c], sum_g, sum_gy);
          }
        }
        grad_bias[c] = static_cast<acc_t>(sum_g);
        grad_weight[c] = static_cast<acc_t>(sum_gy * static_cast<double>(invstd[c]));
        const auto coefs = bn_backward_coefs<acc_t>(weight ? weight[c] : acc_t(1), invstd[c], grad_weight[c],
                                                    grad_bias[c], static_cast<acc_t>(count));
        for (int64_t n = 0; n < batch; ++n) {
          const int64_t base = (n * channels + c) * spatial;
          grad_y_run<T, acc_t, kRelu>(grad_out + base, out + base, grad_residual ? grad_residual + base : nullptr,
                                      y + base, grad_y + base, spatial, coefs, mean[c]);
        }
      }
    });
    return;
  }

  // channels_last: per-chunk partial sums along C, a fixed-order merge, then an elementwise pass.
  const int64_t rows = count;
  const int64_t chunks = reduction_chunks(rows, channels);
  std::vector<double> chunk_g(chunks * channels, 0.0), chunk_gy(chunks * channels, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> block_g(channels), block_gy(channels);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row_begin = rows * chunk / chunks, row_end = rows * (chunk + 1) / chunks;
      double* total_g = chunk_g.data() + chunk * channels;
      double* total_gy = chunk_gy.data() + chunk * channels;
      for (int64_t block = row_begin; block < row_end; block += kFlushPerLane) {
        std::fill(block_g.begin(), block_g.end(), acc_t(0));
        std::fill(block_gy.begin(), block_gy.end(), acc_t(0));
        acc_t* __restrict__ bg = block_g.data();
        acc_t* __restrict__ bgy = block_gy.data();
        const int64_t block_end = std::min(row_end, block + kFlushPerLane);
        for (int64_t row = block; row < block_end; ++row) {
          const int64_t base = row * channels;
          const T* __restrict__ gp = grad_out + base;
          const T* __restrict__ op = out + base;
          const T* __restrict__ yp = y + base;
          const acc_t* __restrict__ mp = mean;
          if (grad_residual != nullptr) {
            T* __restrict__ rp = grad_residual + base;
            for (int64_t c = 0; c < channels; ++c) {
              const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(gp[c]), static_cast<acc_t>(op[c]));
              bg[c] += g;
              bgy[c] += g * (static_cast<acc_t>(yp[c]) - mp[c]);
              rp[c] = static_cast<T>(g);
            }
          } else {
            for (int64_t c = 0; c < channels; ++c) {
              const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(gp[c]), static_cast<acc_t>(op[c]));
              bg[c] += g;
              bgy[c] += g * (static_cast<acc_t>(yp[c]) - mp[c]);
            }
          }
        }
        for (int64_t c = 0; c < channels; ++c) {
          total_g[c] += static_cast<double>(bg[c]);
          total_gy[c] += static_cast<double>(bgy[c]);
        }
      }
    }
  });
  std::vector<acc_t> grad_coef(channels), centered_coef(channels), constant_coef(channels);
  for (int64_t c = 0; c < channels; ++c) {
    double sum_g = 0.0, sum_gy = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      sum_g += chunk_g[chunk * channels + c];
      sum_gy += chunk_gy[chunk * channels + c];
    }
    grad_bias[c] = static_cast<acc_t>(sum_g);
    grad_weight[c] = static_cast<acc_t>(sum_gy * static_cast<double>(invstd[c]));
    const auto coefs = bn_backward_coefs<acc_t>(weight ? weight[c] : acc_t(1), invstd[c], grad_weight[c],
                                                grad_bias[c], static_cast<acc_t>(count));
    grad_coef[c] = coefs.grad_coef;
    centered_coef[c] = coefs.centered_coef;
    constant_coef[c] = coefs.constant_coef;
  }
  at::parallel_for(0, rows, grain_for(channels), [&](int64_t begin, int64_t end) {
    const acc_t* __restrict__ k = grad_coef.data();
    const acc_t* __restrict__ kc = centered_coef.data();
    const acc_t* __restrict__ k0 = constant_coef.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * channels;
      const T* __restrict__ yp = y + base;
      T* __restrict__ gyp = grad_y + base;
      if (grad_residual != nullptr) {
        const T* __restrict__ gp = grad_residual + base;
        for (int64_t c = 0; c < channels; ++c) {
          gyp[c] = static_cast<T>(k[c] * static_cast<acc_t>(gp[c]) + kc[c] * (static_cast<acc_t>(yp[c]) - mean[c]) + k0[c]);
        }
      } else {
        const T* __restrict__ gp = grad_out + base;
        const T* __restrict__ op = out + base;
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(gp[c]), static_cast<acc_t>(op[c]));
          gyp[c] = static_cast<T>(k[c] * g + kc[c] * (static_cast<acc_t>(yp[c]) - mean[c]) + k0[c]);
        }
      }
    }
  });
}

/// Backward of out = act(weight[c] * (y - mean[c]) * invstd[c] + bias[c] + residual) with batch statistics.
///
/// Equivalent PyTorch (M = N*H*W, sums over dims (0, 2, 3)):
///   g = grad_out * (out > 0) if relu else grad_out
///   xhat = (y - mean) * invstd
///   grad_bias = g.sum((0, 2, 3)); grad_weight = (g * xhat).sum((0, 2, 3))
///   grad_y = weight * invstd * (g - grad_bias / M - xhat * grad_weight / M)
///   grad_residual = g if residual_grad else torch.empty(0)
/// One reduction pass (which also writes grad_residual) and one elementwise pass.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward_cpu(const Tensor& grad_out_in, const Tensor& out_in,
                                                               const Tensor& y_in, const Tensor& mean_in,
                                                               const Tensor& invstd_in,
                                                               const std::optional<Tensor>& weight_in, bool relu,
                                                               bool residual_grad) {
  constexpr const char* op = "bn_act_backward";
  check_activation(op, "y", y_in);
  check_like_y(op, "grad_out", grad_out_in, y_in);
  check_like_y(op, "out", out_in, y_in);
  const Layout layout = layout_of(y_in);
  const Tensor y = in_layout(y_in, layout);
  const Tensor grad_out = in_layout(grad_out_in, layout);
  const Tensor out = in_layout(out_in, layout);
  const auto acc_type = acc_type_of(y);
  const Tensor mean = per_channel(op, "mean", mean_in, y, acc_type);
  const Tensor invstd = per_channel(op, "invstd", invstd_in, y, acc_type);
  Tensor weight;
  if (weight_in.has_value()) weight = per_channel(op, "weight", *weight_in, y, acc_type);

  const int64_t batch = y.size(0), channels = y.size(1), spatial = y.size(2) * y.size(3);
  Tensor grad_y = at::empty_like(y, y.options(), memory_format_of(layout));
  Tensor grad_weight = at::empty({channels}, y.options().dtype(acc_type));
  Tensor grad_bias = at::empty({channels}, y.options().dtype(acc_type));
  Tensor grad_residual = residual_grad ? at::empty_like(y, y.options(), memory_format_of(layout)) : y.new_empty({0});
  if (batch * spatial == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_y, grad_weight, grad_bias, grad_residual};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_bool(relu, [&](auto relu_tag) {
      bn_act_backward_kernel<scalar_t, acc_t, decltype(relu_tag)::value>(
          grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
          weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr, grad_y.mutable_data_ptr<scalar_t>(),
          grad_weight.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(),
          residual_grad ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr, batch, channels, spatial, layout);
    });
  });
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("batch_stats", &batch_stats_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace resnet_fast
