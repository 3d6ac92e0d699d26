// CPU kernels of the resnet_fast ops (schemas in resnet_fast/ops/_library.py).
//
// Layouts: NCHW-contiguous (one channel = N runs of H*W contiguous elements)
// and channels_last (one pixel = a run of C contiguous channels). Every inner loop
// runs on at::vec::Vectorized of the accumulation type (AVX2 when setup.py compiles
// for it) with a scalar tail, both through the shared formulas of bn_act.h;
// bf16/fp16 widen to fp32 on load and round on store. Elementwise math is in
// at::opmath_type (fp32 for fp32/bf16/fp16, fp64 for fp64); reductions sum short
// blocks in that type and flush into fp64 (see kFlushVectors).
//
// Compiled once per ISA variant (cpu_isa.h; csrc/cpu/avx512/bn_act_cpu.cpp is the AVX-512 build, with
// 16-lane vectors); isa_dispatch_cpu.cpp registers the ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "bn_act.h"
#include "cpu_isa.h"
#include "lane_select_vec.h"

namespace resnet_fast {
namespace RESNET_FAST_ISA {
namespace {

using at::Tensor;

// Elements per parallel task: large enough to amortise scheduling, small enough to balance 2+ cores.
constexpr int64_t kGrainElements = 1 << 15;
// Elements per tensor in one NCHW channel block (64 KB of fp32): the backward's five tensors
// then take ~320 KB, inside a 512 KB (or larger) L2.
constexpr int64_t kCacheBlockElements = 1 << 14;
// Vector steps (NCHW) or rows (channels_last) a reduction sums in the accumulation type before
// flushing into fp64. The hot loop stays in fp32 vector registers, and with 16 values per lane
// the fp32 rounding stays near the fp64-accumulating stock path's (64 measurably did not, on
// channels whose mean is far from the pivot sample).
constexpr int64_t kFlushVectors = 16;

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
// Vector building blocks (at::vec: AVX2 when setup.py compiles for it, portable code otherwise)

template <typename T>
using acc_of = at::opmath_type<T>;
template <typename T>
using VecOf = at::vec::Vectorized<acc_of<T>>;

// Loads VecOf<T>::size() elements of T as the accumulation type (bf16/fp16 widen to fp32).
template <typename T>
inline VecOf<T> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, acc_of<T>>) {
    return VecOf<T>::loadu(p);
  } else {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// Stores a vector of the accumulation type as T (bf16/fp16 round to nearest even, like static_cast).
template <typename T>
inline void store_acc(T* p, const VecOf<T>& v) {
  if constexpr (std::is_same_v<T, acc_of<T>>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, VecOf<T>::size());
  }
}

// The lanes' sum in fp64. Called at every flush, i.e. at least once per NCHW plane, so for small
// planes (7x7, 14x14) its dependent fp64 adds are much of the reduction's time: 16 lanes (AVX-512)
// are first added in pairs (independent adds), leaving the 8-add chain of 8 lanes.
template <typename acc_t>
inline double sum_lanes(const at::vec::Vectorized<acc_t>& v) {
  constexpr int kLanes = at::vec::Vectorized<acc_t>::size();
  acc_t lanes[kLanes];
  v.store(lanes);
  double total = 0.0;
  if constexpr (kLanes > 8) {
    double pairs[kLanes / 2];
    for (int i = 0; i < kLanes / 2; ++i) {
      pairs[i] = static_cast<double>(lanes[i]) + static_cast<double>(lanes[i + kLanes / 2]);
    }
    for (double pair : pairs) total += pair;
  } else {
    for (acc_t lane : lanes) total += static_cast<double>(lane);
  }
  return total;
}

// A per-channel value as seen from a contiguous run of elements: constant along an NCHW run
// (one channel), consecutive along a channels_last run (one pixel's channels).
template <typename acc_t>
struct ChannelConstant {
  acc_t value;
  at::vec::Vectorized<acc_t> vec(int64_t) const { return at::vec::Vectorized<acc_t>(value); }
  acc_t at(int64_t) const { return value; }
};

template <typename acc_t>
struct ChannelRun {
  const acc_t* values;
  at::vec::Vectorized<acc_t> vec(int64_t i) const { return at::vec::Vectorized<acc_t>::loadu(values + i); }
  acc_t at(int64_t i) const { return values[i]; }
};

// Pair of per-channel sums (first, second) of a two-valued term over all of (N, H, W).
struct ChannelSums {
  double first = 0.0;
  double second = 0.0;
};

// Sums term(offset, centre) over the contiguous run [base, base + n) of one channel: two vector
// accumulator pairs (two independent add chains) in acc_t, flushed into fp64 every
// kFlushVectors steps and at the end, so no fp32 lane ever sums more than kFlushVectors values.
template <typename acc_t, typename Term>
ChannelSums run_sums(const Term& term, int64_t base, int64_t n, acc_t centre) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  const Vec centre_vec(centre);
  ChannelSums sums;
  Vec first0(acc_t(0)), second0(acc_t(0)), first1(acc_t(0)), second1(acc_t(0));
  auto flush = [&] {
    sums.first += sum_lanes(first0 + first1);
    sums.second += sum_lanes(second0 + second1);
    first0 = second0 = first1 = second1 = Vec(acc_t(0));
  };
  int64_t i = 0, steps = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    const auto [a0, b0] = term.vec(base + i, centre_vec);
    const auto [a1, b1] = term.vec(base + i + kWidth, centre_vec);
    first0 += a0;
    second0 += b0;
    first1 += a1;
    second1 += b1;
    if (++steps == kFlushVectors) {
      flush();
      steps = 0;
    }
  }
  for (; i + kWidth <= n; i += kWidth) {
    const auto [a0, b0] = term.vec(base + i, centre_vec);
    first0 += a0;
    second0 += b0;
  }
  flush();
  for (; i < n; ++i) {
    const auto [a, b] = term.at(base + i, centre);
    sums.first += static_cast<double>(a);
    sums.second += static_cast<double>(b);
  }
  return sums;
}

// NCHW work is split into blocks of whole channels of about kCacheBlockElements elements per
// tensor: a block's reduction and its elementwise pass then run back to back while the block
// is still in L2, and each thread takes whole blocks.
int64_t channels_per_block(int64_t batch, int64_t spatial) {
  return std::max<int64_t>(1, kCacheBlockElements / std::max<int64_t>(1, batch * spatial));
}

template <typename F>
void for_each_channel_block(int64_t batch, int64_t channels, int64_t spatial, const F& body) {
  const int64_t block = channels_per_block(batch, spatial);
  at::parallel_for(0, channels, block, [&](int64_t begin, int64_t end) {
    for (int64_t block_begin = begin; block_begin < end; block_begin += block) {
      body(block_begin, std::min(end, block_begin + block));
    }
  });
}

// Calls body(base, channel) for every (H*W)-long plane of channels [channel_begin, channel_end),
// in memory order (sample outer, channel inner): long sequential runs even when H*W is small.
template <typename F>
void for_each_plane(int64_t channel_begin, int64_t channel_end, int64_t batch, int64_t channels, int64_t spatial,
                    const F& body) {
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = channel_begin; c < channel_end; ++c) body((n * channels + c) * spatial, c);
  }
}

// Per-channel sums of term over the channels [channel_begin, channel_end) of an NCHW tensor,
// written to sums[channel]. The order of additions is fixed (deterministic whatever the threads).
template <typename acc_t, typename Term>
void channel_block_sums(const Term& term, const acc_t* centre, int64_t channel_begin, int64_t channel_end,
                        int64_t batch, int64_t channels, int64_t spatial, ChannelSums* sums) {
  std::fill(sums + channel_begin, sums + channel_end, ChannelSums{});
  for_each_plane(channel_begin, channel_end, batch, channels, spatial, [&](int64_t base, int64_t c) {
    const ChannelSums plane = run_sums<acc_t>(term, base, spatial, centre[c]);
    sums[c].first += plane.first;
    sums[c].second += plane.second;
  });
}

// Per-channel sums of term(offset, centre) over a channels_last tensor viewed as (rows, C):
// one chunk of rows per thread with C-long acc_t partials flushed into fp64 every
// kFlushVectors rows, then a serial fixed-order merge of the chunks (deterministic).
template <typename acc_t, typename Term>
void channel_sums_channels_last(const Term& term, const acc_t* centre, int64_t rows, int64_t channels,
                                std::vector<ChannelSums>& sums) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  const int64_t chunks = reduction_chunks(rows, channels);
  std::vector<ChannelSums> chunk_sums(chunks * channels);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> block_first(channels), block_second(channels);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row_begin = rows * chunk / chunks, row_end = rows * (chunk + 1) / chunks;
      ChannelSums* totals = chunk_sums.data() + chunk * channels;
      for (int64_t block = row_begin; block < row_end; block += kFlushVectors) {
        std::fill(block_first.begin(), block_first.end(), acc_t(0));
        std::fill(block_second.begin(), block_second.end(), acc_t(0));
        acc_t* __restrict__ first = block_first.data();
        acc_t* __restrict__ second = block_second.data();
        const int64_t block_end = std::min(row_end, block + kFlushVectors);
        for (int64_t row = block; row < block_end; ++row) {
          const int64_t base = row * channels;
          int64_t c = 0;
          for (; c + kWidth <= channels; c += kWidth) {
            const auto [a, b] = term.vec(base + c, Vec::loadu(centre + c));
            (Vec::loadu(first + c) + a).store(first + c);
            (Vec::loadu(second + c) + b).store(second + c);
          }
          for (; c < channels; ++c) {
            const auto [a, b] = term.at(base + c, centre[c]);
            first[c] += a;
            second[c] += b;
          }
        }
        for (int64_t c = 0; c < channels; ++c) {
          totals[c].first += static_cast<double>(first[c]);
          totals[c].second += static_cast<double>(second[c]);
        }
      }
    }
  });
  sums.assign(channels, ChannelSums{});
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < channels; ++c) {
      sums[c].first += chunk_sums[chunk * channels + c].first;
      sums[c].second += chunk_sums[chunk * channels + c].second;
    }
  }
}

// --------------------------------------------------------------------------------------------
// bn_act_forward: out = act(y * scale[c] + shift[c] + residual)

template <bool kRelu, bool kResidual, typename T, typename Param>
inline void bn_act_forward_run(const T* __restrict__ y, const T* __restrict__ residual, T* __restrict__ out,
                               int64_t n, const Param& scale, const Param& shift) {
  using acc_t = acc_of<T>;
  using Vec = VecOf<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec r = kResidual ? load_acc(residual + i) : Vec(acc_t(0));
    store_acc(out + i, bn_act_apply<kRelu>(load_acc(y + i), scale.vec(i), shift.vec(i), r));
  }
  for (; i < n; ++i) {
    const acc_t r = kResidual ? static_cast<acc_t>(residual[i]) : acc_t(0);
    out[i] = static_cast<T>(bn_act_apply<kRelu>(static_cast<acc_t>(y[i]), scale.at(i), shift.at(i), r));
  }
}

template <bool kRelu, bool kResidual, typename T>
void bn_act_forward_kernel(const T* y, const acc_of<T>* scale, const acc_of<T>* shift, const T* residual, T* out,
                           int64_t batch, int64_t channels, int64_t spatial, Layout layout) {
  using acc_t = acc_of<T>;
  if (layout == Layout::kNchw) {
    at::parallel_for(0, batch * channels, grain_for(spatial), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels, base = plane * spatial;
        bn_act_forward_run<kRelu, kResidual>(y + base, kResidual ? residual + base : nullptr, out + base, spatial,
                                             ChannelConstant<acc_t>{scale[c]}, ChannelConstant<acc_t>{shift[c]});
      }
    });
  } else {
    at::parallel_for(0, batch * spatial, grain_for(channels), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * channels;
        bn_act_forward_run<kRelu, kResidual>(y + base, kResidual ? residual + base : nullptr, out + base, channels,
                                             ChannelRun<acc_t>{scale}, ChannelRun<acc_t>{shift});
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
    using acc_t = acc_of<scalar_t>;
    dispatch_bool(relu, [&](auto relu_tag) {
      dispatch_bool(residual.defined(), [&](auto residual_tag) {
        bn_act_forward_kernel<decltype(relu_tag)::value, decltype(residual_tag)::value, scalar_t>(
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

// (y - pivot, (y - pivot)^2): the shifted moments whose sums give mean and variance.
template <typename T>
struct ShiftedMoments {
  const T* y;
  std::pair<VecOf<T>, VecOf<T>> vec(int64_t offset, const VecOf<T>& pivot) const {
    const VecOf<T> v = load_acc(y + offset) - pivot;
    return {v, v * v};
  }
  std::pair<acc_of<T>, acc_of<T>> at(int64_t offset, acc_of<T> pivot) const {
    const acc_of<T> v = static_cast<acc_of<T>>(y[offset]) - pivot;
    return {v, v * v};
  }
};

// Mean and biased variance of a channel from its shifted sums (count samples, shifted by pivot).
template <typename acc_t>
std::pair<acc_t, acc_t> channel_stats(int64_t count, acc_t pivot, const ChannelSums& sums) {
  const auto state = welford_from_shifted_sums<double>(static_cast<double>(count), static_cast<double>(pivot),
                                                       sums.first, sums.second);
  return {static_cast<acc_t>(state.mean), static_cast<acc_t>(welford_biased_var(state))};
}

// Shifting by one sample of the channel keeps sum_sq - sum^2/n free of catastrophic cancellation.
template <typename T>
acc_of<T> channel_pivot(const T* y, int64_t channel, int64_t spatial, Layout layout) {
  return static_cast<acc_of<T>>(layout == Layout::kNchw ? y[channel * spatial] : y[channel]);
}

// Per-channel mean and biased variance of y into mean/var; then on_channels(begin, end) for each
// range of channels whose statistics are final: in NCHW each cache block right after its
// reduction (while the block is still in cache), in channels_last all channels at once.
template <typename T, typename OnChannels>
void batch_stats_kernel(const T* y, acc_of<T>* mean, acc_of<T>* var, int64_t batch, int64_t channels,
                        int64_t spatial, Layout layout, const OnChannels& on_channels) {
  using acc_t = acc_of<T>;
  const int64_t count = batch * spatial;
  const ShiftedMoments<T> term{y};
  std::vector<acc_t> pivot(channels);
  for (int64_t c = 0; c < channels; ++c) pivot[c] = channel_pivot(y, c, spatial, layout);
  std::vector<ChannelSums> sums(channels);
  if (layout == Layout::kNchw) {
    for_each_channel_block(batch, channels, spatial, [&](int64_t begin, int64_t end) {
      channel_block_sums<acc_t>(term, pivot.data(), begin, end, batch, channels, spatial, sums.data());
      for (int64_t c = begin; c < end; ++c) std::tie(mean[c], var[c]) = channel_stats(count, pivot[c], sums[c]);
      on_channels(begin, end);
    });
    return;
  }
  channel_sums_channels_last<acc_t>(term, pivot.data(), count, channels, sums);
  for (int64_t c = 0; c < channels; ++c) std::tie(mean[c], var[c]) = channel_stats(count, pivot[c], sums[c]);
  on_channels(0, channels);
}

// y checked and in its working layout, for the ops that take batch statistics of it.
struct StatisticsInput {
  Tensor y;
  Layout layout;
  at::ScalarType acc_type;
  int64_t batch, channels, spatial;
};

StatisticsInput statistics_input(const char* op, const Tensor& y_in) {
  check_activation(op, "y", y_in);
  const Layout layout = layout_of(y_in);
  Tensor y = in_layout(y_in, layout);
  const int64_t batch = y.size(0), channels = y.size(1), spatial = y.size(2) * y.size(3);
  TORCH_CHECK(batch * spatial > 0, op, ": y has no elements per channel (shape ", y.sizes(),
              "); batch statistics need at least one");
  const auto acc_type = acc_type_of(y);
  return {std::move(y), layout, acc_type, batch, channels, spatial};
}

/// Per-channel mean and biased variance over (N, H, W), one read of y.
///
/// Equivalent PyTorch:
///   var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
/// Returned as float32 (float64 for float64 y).
std::tuple<Tensor, Tensor> batch_stats_cpu(const Tensor& y_in) {
  const auto [y, layout, acc_type, batch, channels, spatial] = statistics_input("batch_stats", y_in);
  Tensor mean = at::empty({channels}, y.options().dtype(acc_type));
  Tensor var = at::empty({channels}, y.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "batch_stats_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    batch_stats_kernel<scalar_t>(y.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                 var.mutable_data_ptr<acc_t>(), batch, channels, spatial, layout,
                                 [](int64_t, int64_t) {});
  });
  return {mean, var};
}

// --------------------------------------------------------------------------------------------
// bn_act_train_forward: batch statistics, then out = act(batch_norm(y) + residual)

template <bool kRelu, bool kResidual, typename T>
void bn_act_train_forward_kernel(const T* y, const acc_of<T>* weight, const acc_of<T>* bias, const T* residual,
                                 T* out, acc_of<T>* mean, acc_of<T>* var, acc_of<T> eps, int64_t batch,
                                 int64_t channels, int64_t spatial, Layout layout) {
  using acc_t = acc_of<T>;
  std::vector<acc_t> scale(channels), shift(channels);
  // NCHW: each channel block is normalised right after its statistics, still in cache, so y is read
  // from memory once. channels_last: a channel is spread over the whole tensor, so the statistics
  // are a full pass of their own before the elementwise pass.
  batch_stats_kernel<T>(y, mean, var, batch, channels, spatial, layout, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto affine = bn_train_affine<acc_t>(mean[c], var[c], weight ? weight[c] : acc_t(1),
                                                 bias ? bias[c] : acc_t(0), eps);
      scale[c] = affine.scale;
      shift[c] = affine.shift;
    }
    if (layout == Layout::kNchw) {
      for_each_plane(begin, end, batch, channels, spatial, [&](int64_t base, int64_t c) {
        bn_act_forward_run<kRelu, kResidual>(y + base, kResidual ? residual + base : nullptr, out + base, spatial,
                                             ChannelConstant<acc_t>{scale[c]}, ChannelConstant<acc_t>{shift[c]});
      });
    } else {
      bn_act_forward_kernel<kRelu, kResidual, T>(y, scale.data(), shift.data(), residual, out, batch, channels,
                                                 spatial, layout);
    }
  });
}

/// Batch statistics of y, then out = act(batch_norm(y) + residual): the training forward in one op.
///
/// Equivalent PyTorch:
///   var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False)
///   out = F.batch_norm(y, None, None, weight, bias, training=True, eps=eps) + (residual or 0)
///   out = torch.relu(out) if relu else out
/// Returns (out, mean, var): out in y's dtype and memory format, mean and biased var in
/// float32 (float64 for float64 y). weight None means 1, bias None means 0.
std::tuple<Tensor, Tensor, Tensor> bn_act_train_forward_cpu(const Tensor& y_in,
                                                            const std::optional<Tensor>& weight_in,
                                                            const std::optional<Tensor>& bias_in,
                                                            const std::optional<Tensor>& residual_in, double eps,
                                                            bool relu) {
  constexpr const char* op = "bn_act_train_forward";
  const auto [y, layout, acc_type, batch, channels, spatial] = statistics_input(op, y_in);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  Tensor weight, bias, residual;
  if (weight_in.has_value()) weight = per_channel(op, "weight", *weight_in, y, acc_type);
  if (bias_in.has_value()) bias = per_channel(op, "bias", *bias_in, y, acc_type);
  if (residual_in.has_value()) {
    check_like_y(op, "residual", *residual_in, y);
    residual = in_layout(*residual_in, layout);
  }
  Tensor out = at::empty_like(y, y.options(), memory_format_of(layout));
  Tensor mean = at::empty({channels}, y.options().dtype(acc_type));
  Tensor var = at::empty({channels}, y.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bn_act_train_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    dispatch_bool(relu, [&](auto relu_tag) {
      dispatch_bool(residual.defined(), [&](auto residual_tag) {
        bn_act_train_forward_kernel<decltype(relu_tag)::value, decltype(residual_tag)::value, scalar_t>(
            y.const_data_ptr<scalar_t>(), weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr,
            bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
            residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
            mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), static_cast<acc_t>(eps), batch, channels,
            spatial, layout);
      });
    });
  });
  return {out, mean, var};
}

// --------------------------------------------------------------------------------------------
// bn_act_backward

// (g, g * (y - mean)) with g the masked grad: the sums give grad_bias and grad_weight / invstd.
// With kStoreResidual, g is also written to grad_residual (it is that gradient).
template <bool kRelu, bool kStoreResidual, typename T>
struct MaskedGradMoments {
  const T* grad_out;
  const T* out;
  const T* y;
  T* grad_residual;
  std::pair<VecOf<T>, VecOf<T>> vec(int64_t offset, const VecOf<T>& mean) const {
    const VecOf<T> g = bn_act_masked_grad<kRelu>(load_acc(grad_out + offset), load_acc(out + offset));
    if constexpr (kStoreResidual) store_acc(grad_residual + offset, g);
    return {g, g * (load_acc(y + offset) - mean)};
  }
  std::pair<acc_of<T>, acc_of<T>> at(int64_t offset, acc_of<T> mean) const {
    using acc_t = acc_of<T>;
    const acc_t g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(grad_out[offset]), static_cast<acc_t>(out[offset]));
    if constexpr (kStoreResidual) grad_residual[offset] = static_cast<T>(g);
    return {g, g * (static_cast<acc_t>(y[offset]) - mean)};
  }
};

// grad_y over a contiguous run; g is read back from grad_residual when the reduction wrote it
// (one tensor read instead of two), otherwise recomputed from grad_out and out.
template <bool kRelu, bool kFromResidual, typename T, typename Param>
inline void grad_y_run(const T* __restrict__ grad_out, const T* __restrict__ out, const T* __restrict__ grad_residual,
                       const T* __restrict__ y, T* __restrict__ grad_y, int64_t n, const Param& grad_coef,
                       const Param& centered_coef, const Param& constant_coef, const Param& mean) {
  using acc_t = acc_of<T>;
  using Vec = VecOf<T>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec g;
    if constexpr (kFromResidual) {
      g = load_acc(grad_residual + i);
    } else {
      g = bn_act_masked_grad<kRelu>(load_acc(grad_out + i), load_acc(out + i));
    }
    const BnBackwardCoefs<Vec> coefs{grad_coef.vec(i), centered_coef.vec(i), constant_coef.vec(i)};
    store_acc(grad_y + i, bn_backward_apply(coefs, g, load_acc(y + i) - mean.vec(i)));
  }
  for (; i < n; ++i) {
    acc_t g;
    if constexpr (kFromResidual) {
      g = static_cast<acc_t>(grad_residual[i]);
    } else {
      g = bn_act_masked_grad<kRelu>(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i]));
    }
    const BnBackwardCoefs<acc_t> coefs{grad_coef.at(i), centered_coef.at(i), constant_coef.at(i)};
    grad_y[i] = static_cast<T>(bn_backward_apply(coefs, g, static_cast<acc_t>(y[i]) - mean.at(i)));
  }
}

template <bool kRelu, bool kResidualGrad, typename T>
void bn_act_backward_kernel(const T* grad_out, const T* out, const T* y, const acc_of<T>* mean,
                            const acc_of<T>* invstd, const acc_of<T>* weight, T* grad_y, acc_of<T>* grad_weight,
                            acc_of<T>* grad_bias, T* grad_residual, int64_t batch, int64_t channels, int64_t spatial,
                            Layout layout) {
  using acc_t = acc_of<T>;
  const int64_t count = batch * spatial;
  const MaskedGradMoments<kRelu, kResidualGrad, T> term{grad_out, out, y, grad_residual};
  auto coefs_from_sums = [&](int64_t c, const ChannelSums& sums) {
    grad_bias[c] = static_cast<acc_t>(sums.first);
    grad_weight[c] = static_cast<acc_t>(sums.second * static_cast<double>(invstd[c]));
    return bn_backward_coefs<acc_t>(weight ? weight[c] : acc_t(1), invstd[c], grad_weight[c], grad_bias[c],
                                    static_cast<acc_t>(count));
  };

  if (layout == Layout::kNchw) {
    // One channel block at a time, reduction then grad_y, while the block is still in cache.
    std::vector<ChannelSums> sums(channels);
    for_each_channel_block(batch, channels, spatial, [&](int64_t begin, int64_t end) {
      channel_block_sums<acc_t>(term, mean, begin, end, batch, channels, spatial, sums.data());
      std::vector<BnBackwardCoefs<acc_t>> coefs(end - begin);
      for (int64_t c = begin; c < end; ++c) coefs[c - begin] = coefs_from_sums(c, sums[c]);
      for_each_plane(begin, end, batch, channels, spatial, [&](int64_t base, int64_t c) {
        const auto& k = coefs[c - begin];
        grad_y_run<kRelu, kResidualGrad>(grad_out + base, out + base, kResidualGrad ? grad_residual + base : nullptr,
                                         y + base, grad_y + base, spatial, ChannelConstant<acc_t>{k.grad_coef},
                                         ChannelConstant<acc_t>{k.centered_coef},
                                         ChannelConstant<acc_t>{k.constant_coef}, ChannelConstant<acc_t>{mean[c]});
      });
    });
    return;
  }

  std::vector<ChannelSums> sums;
  channel_sums_channels_last<acc_t>(term, mean, count, channels, sums);
  std::vector<acc_t> grad_coef(channels), centered_coef(channels), constant_coef(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const auto coefs = coefs_from_sums(c, sums[c]);
    grad_coef[c] = coefs.grad_coef;
    centered_coef[c] = coefs.centered_coef;
    constant_coef[c] = coefs.constant_coef;
  }
  at::parallel_for(0, count, grain_for(channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * channels;
      grad_y_run<kRelu, kResidualGrad>(grad_out + base, out + base, kResidualGrad ? grad_residual + base : nullptr,
                                       y + base, grad_y + base, channels, ChannelRun<acc_t>{grad_coef.data()},
                                       ChannelRun<acc_t>{centered_coef.data()}, ChannelRun<acc_t>{constant_coef.data()},
                                       ChannelRun<acc_t>{mean});
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
    using acc_t = acc_of<scalar_t>;
    dispatch_bool(relu, [&](auto relu_tag) {
      dispatch_bool(residual_grad, [&](auto residual_grad_tag) {
        bn_act_backward_kernel<decltype(relu_tag)::value, decltype(residual_grad_tag)::value, scalar_t>(
            grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
            weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr, grad_y.mutable_data_ptr<scalar_t>(),
            grad_weight.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(),
            residual_grad ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr, batch, channels, spatial, layout);
      });
    });
  });
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

void add_bn_act_kernels(CpuKernelTable& table) {
  table.bn_act_forward = &bn_act_forward_cpu;
  table.batch_stats = &batch_stats_cpu;
  table.bn_act_train_forward = &bn_act_train_forward_cpu;
  table.bn_act_backward = &bn_act_backward_cpu;
}

}  // namespace RESNET_FAST_ISA
}  // namespace resnet_fast
