// CUDA kernels of the resnet_fast ops. Pure CUDA: no torch headers (see bn_act_launchers.h).
//
// * Elementwise kernels (forward, grad_y) are grid-stride loops over packs of kVec
//   elements: 16-byte vector loads/stores when the layout keeps a pack inside one
//   row of channels (channels_last, C % kVec == 0) or inside one plane (NCHW,
//   H*W % kVec == 0) and every pointer is 16-byte aligned; kVec = 1 otherwise.
// * Reductions are two-level and deterministic: each block reduces one (split,
//   channel-group) tile into partials in a workspace, then one thread per channel
//   merges its partials in a fixed order (Welford/Chan for statistics).
// * int64 indexing throughout; fp32 accumulation for fp32/fp16/bf16, fp64 for fp64.
#ifdef RESNET_FAST_CUDA_HOST_SHIM
#include "cuda/host_shim.h"  // the same kernels as host C++, for CPU tests (see host_shim.h)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>

#include "bn_act.h"
#include "cuda/bn_act_launchers.h"
#include "cuda/launch.h"

namespace resnet_fast {
namespace cuda {
namespace {

constexpr int kElementwiseThreads = 256;
// Reduction blocks are kWarp x kRowsPerBlock threads.
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kReductionThreads = kWarp * kRowsPerBlock;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& pack) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

int multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
    cudaGetLastError();  // a failed query must not surface as the next kernel's launch error
    return 80;
  }
  return count;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned elementwise_blocks(int64_t work_items) {
  const int64_t wanted = ceil_div(std::max<int64_t>(work_items, 1), kElementwiseThreads);
  return static_cast<unsigned>(std::min<int64_t>(wanted, int64_t(multiprocessor_count()) * 16));
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Widest pack (16 bytes) the layout and the pointers allow, else 1.
template <typename T>
int pack_width(ActivationShape shape, const void* a, const void* b, const void* c, const void* d) {
  constexpr int kWide = 16 / sizeof(T);
  const int64_t run = shape.channels_last ? shape.channels : shape.spatial;
  if (run % kWide == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d)) return kWide;
  return 1;
}

// Channel of element `index` (a pack never straddles two channels in NCHW, nor two rows in channels_last).
template <bool kChannelsLast>
__device__ __forceinline__ int64_t channel_of(int64_t index, int64_t channels, int64_t spatial) {
  return kChannelsLast ? index % channels : (index / spatial) % channels;
}

// ------------------------------------------------------------------------------------------
// Forward: out = act(y * scale[c] + shift[c] + residual)

template <typename T, int kVec, bool kChannelsLast, bool kRelu, bool kResidual>
__global__ void bn_act_forward_kernel(const T* __restrict__ y, const typename AccOf<T>::type* __restrict__ scale,
                                      const typename AccOf<T>::type* __restrict__ shift,
                                      const T* __restrict__ residual, T* __restrict__ out, int64_t packs,
                                      int64_t channels, int64_t spatial) {
  using acc_t = typename AccOf<T>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t index = p * kVec;
    const int64_t c0 = channel_of<kChannelsLast>(index, channels, spatial);
    const Pack<T, kVec> yv = load_pack<T, kVec>(y + index);
    Pack<T, kVec> rv;
    if (kResidual) rv = load_pack<T, kVec>(residual + index);
    Pack<T, kVec> ov;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = kChannelsLast ? c0 + j : c0;
      const acc_t s = scale != nullptr ? scale[c] : acc_t(1);
      const acc_t r = kResidual ? to_acc(rv.v[j]) : acc_t(0);
      ov.v[j] = from_acc<T>(bn_act_apply<kRelu>(to_acc(yv.v[j]), s, shift[c], r));
    }
    store_pack<T, kVec>(out + index, ov);
  }
}

template <typename T, int kVec, bool kChannelsLast>
void forward_with_pack(const T* y, const void* scale, const void* shift, const T* residual, T* out,
                       ActivationShape shape, bool relu, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  const int64_t packs = shape.batch * shape.channels * shape.spatial / kVec;
  const unsigned blocks = elementwise_blocks(packs);
  auto s = static_cast<const acc_t*>(scale);
  auto b = static_cast<const acc_t*>(shift);
#define RESNET_FAST_LAUNCH_FORWARD(RELU, RES)                                                             \
  launch_kernel<bn_act_forward_kernel<T, kVec, kChannelsLast, RELU, RES>>(blocks, kElementwiseThreads, stream, \
                                                                          y, s, b, residual, out, packs,      \
                                                                          shape.channels, shape.spatial)
  if (relu && residual) RESNET_FAST_LAUNCH_FORWARD(true, true);
  else if (relu) RESNET_FAST_LAUNCH_FORWARD(true, false);
  else if (residual) RESNET_FAST_LAUNCH_FORWARD(false, true);
  else RESNET_FAST_LAUNCH_FORWARD(false, false);
#undef RESNET_FAST_LAUNCH_FORWARD
}

template <typename T>
void forward_typed(const void* y, const void* scale, const void* shift, const void* residual, void* out,
                   ActivationShape shape, bool relu, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);
  auto yt = static_cast<const T*>(y);
  auto rt = static_cast<const T*>(residual);
  auto ot = static_cast<T*>(out);
  const bool wide = pack_width<T>(shape, y, residual, out, nullptr) == kWide;
  if (shape.channels_last) {
    if (wide) forward_with_pack<T, kWide, true>(yt, scale, shift, rt, ot, shape, relu, stream);
    else forward_with_pack<T, 1, true>(yt, scale, shift, rt, ot, shape, relu, stream);
  } else {
    if (wide) forward_with_pack<T, kWide, false>(yt, scale, shift, rt, ot, shape, relu, stream);
    else forward_with_pack<T, 1, false>(yt, scale, shift, rt, ot, shape, relu, stream);
  }
}

// ------------------------------------------------------------------------------------------
// Per-channel reductions: a generic two-level scheme over "ops" that define a State.

template <typename T>
struct StatsOp {
  using acc_t = typename AccOf<T>::type;
  using State = WelfordState<acc_t>;
  const T* y;
  __device__ static State init() { return welford_init<acc_t>(); }
  __device__ void update(State& s, int64_t offset, int64_t) const { welford_update(s, to_acc(y[offset])); }
  __device__ static State merge(const State& a, const State& b) { return welford_merge(a, b); }
};

template <typename acc_t>
struct GradSums {
  acc_t sum_g;   // sum g                 -> grad_bias
  acc_t sum_gy;  // sum g * (y - mean)    -> grad_weight / invstd
};

template <typename T, bool kRelu>
struct GradSumsOp {
  using acc_t = typename AccOf<T>::type;
  using State = GradSums<acc_t>;
  const T* grad_out;
  const T* out;
  const T* y;
  const acc_t* mean;
  T* grad_residual;  // written with g during the reduction when not null
  __device__ static State init() { return State{acc_t(0), acc_t(0)}; }
  __device__ void update(State& s, int64_t offset, int64_t c) const {
    const acc_t g = bn_act_masked_grad<kRelu>(to_acc(grad_out[offset]), to_acc(out[offset]));
    s.sum_g += g;
    s.sum_gy += g * (to_acc(y[offset]) - mean[c]);
    if (grad_residual != nullptr) grad_residual[offset] = from_acc<T>(g);
  }
  __device__ static State merge(const State& a, const State& b) {
    return State{a.sum_g + b.sum_g, a.sum_gy + b.sum_gy};
  }
};

// Rows of one split: [split * rows / splits, (split + 1) * rows / splits).
__device__ __forceinline__ int64_t split_begin(int64_t split, int64_t splits, int64_t rows) {
  return rows * split / splits;
}

// NCHW: block (32, 8) reduces channel blockIdx.x over its split of the N*H*W positions.
template <typename Op>
__global__ void reduce_nchw_kernel(Op op, typename Op::State* __restrict__ partials, int64_t batch, int64_t channels,
                                   int64_t spatial) {
  using State = typename Op::State;
  __shared__ State shared[kReductionThreads];
  const int64_t c = blockIdx.x;
  const int64_t splits = gridDim.y, split = blockIdx.y;
  const int64_t positions = batch * spatial;
  const int64_t begin = split_begin(split, splits, positions), end = split_begin(split + 1, splits, positions);
  const int tid = threadIdx.y * kWarp + threadIdx.x;
  State state = Op::init();
  int64_t position = begin + tid;
  if (position < end) {
    // Walk (n, s) incrementally by the quotient and remainder of the step: no 64-bit division per
    // element, and a constant cost per step even on maps smaller than the step (1x1: 256 samples).
    const int64_t step_n = kReductionThreads / spatial, step_s = kReductionThreads % spatial;
    int64_t n = position / spatial, s = position % spatial;
    for (; position < end; position += kReductionThreads) {
      op.update(state, (n * channels + c) * spatial + s, c);
      n += step_n;
      s += step_s;
      if (s >= spatial) {
        s -= spatial;
        ++n;
      }
    }
  }
  shared[tid] = state;
  __syncthreads();
  for (int width = kReductionThreads / 2; width > 0; width /= 2) {
    if (tid < width) shared[tid] = Op::merge(shared[tid], shared[tid + width]);
    __syncthreads();
  }
  if (tid == 0) partials[split * channels + c] = shared[0];
}

// channels_last: block (32, 8) reduces channels [32 * blockIdx.x, +32) over its split of rows;
// a warp reads 32 consecutive channels of one row (coalesced).
template <typename Op>
__global__ void reduce_channels_last_kernel(Op op, typename Op::State* __restrict__ partials, int64_t rows,
                                            int64_t channels) {
  using State = typename Op::State;
  __shared__ State shared[kRowsPerBlock][kWarp];
  const int64_t c = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t splits = gridDim.y, split = blockIdx.y;
  const int64_t begin = split_begin(split, splits, rows), end = split_begin(split + 1, splits, rows);
  State state = Op::init();
  if (c < channels) {
    for (int64_t row = begin + threadIdx.y; row < end; row += kRowsPerBlock) {
      op.update(state, row * channels + c, c);
    }
  }
  shared[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  for (int width = kRowsPerBlock / 2; width > 0; width /= 2) {
    if (threadIdx.y < width) {
      shared[threadIdx.y][threadIdx.x] = Op::merge(shared[threadIdx.y][threadIdx.x], shared[threadIdx.y + width][threadIdx.x]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < channels) partials[split * channels + c] = shared[0][threadIdx.x];
}

template <typename Op>
void launch_reduce(Op op, typename Op::State* partials, ActivationShape shape, cudaStream_t stream) {
  const int64_t splits = reduction_splits(shape);
  const dim3 threads(kWarp, kRowsPerBlock);
  if (shape.channels_last) {
    const dim3 blocks(static_cast<unsigned>(ceil_div(shape.channels, kWarp)), static_cast<unsigned>(splits));
    launch_kernel<reduce_channels_last_kernel<Op>>(blocks, threads, stream, op, partials,
                                                   shape.batch * shape.spatial, shape.channels);
  } else {
    const dim3 blocks(static_cast<unsigned>(shape.channels), static_cast<unsigned>(splits));
    launch_kernel<reduce_nchw_kernel<Op>>(blocks, threads, stream, op, partials, shape.batch, shape.channels,
                                          shape.spatial);
  }
}

template <typename acc_t>
__global__ void batch_stats_finalize_kernel(const WelfordState<acc_t>* __restrict__ partials, acc_t* __restrict__ mean,
                                            acc_t* __restrict__ var, int64_t splits, int64_t channels) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  WelfordState<acc_t> state = welford_init<acc_t>();
  for (int64_t split = 0; split < splits; ++split) state = welford_merge(state, partials[split * channels + c]);
  mean[c] = state.mean;
  var[c] = welford_biased_var(state);
}

template <typename acc_t>
__global__ void bn_act_backward_finalize_kernel(const GradSums<acc_t>* __restrict__ partials,
                                                BnBackwardCoefs<acc_t>* __restrict__ coefs,
                                                const acc_t* __restrict__ invstd, const acc_t* __restrict__ weight,
                                                acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias,
                                                int64_t splits, int64_t channels, acc_t count) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  acc_t sum_g = 0, sum_gy = 0;
  for (int64_t split = 0; split < splits; ++split) {
    sum_g += partials[split * channels + c].sum_g;
    sum_gy += partials[split * channels + c].sum_gy;
  }
  const acc_t gw = count > acc_t(0) ? sum_gy * invstd[c] : acc_t(0);  // no rows: 0 whatever invstd is
  grad_bias[c] = sum_g;
  grad_weight[c] = gw;
  coefs[c] = bn_backward_coefs<acc_t>(weight != nullptr ? weight[c] : acc_t(1), invstd[c], gw, sum_g, count);
}

// grad_y = k * g + centered_coef * (y - mean) + constant_coef; g from grad_residual when it was written.
template <typename T, int kVec, bool kChannelsLast, bool kRelu, bool kFromResidual>
__global__ void bn_act_backward_grad_y_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                              const T* __restrict__ grad_residual, const T* __restrict__ y,
                                              const typename AccOf<T>::type* __restrict__ mean,
                                              const BnBackwardCoefs<typename AccOf<T>::type>* __restrict__ coefs,
                                              T* __restrict__ grad_y, int64_t packs, int64_t channels,
                                              int64_t spatial) {
  using acc_t = typename AccOf<T>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t index = p * kVec;
    const int64_t c0 = channel_of<kChannelsLast>(index, channels, spatial);
    const Pack<T, kVec> yv = load_pack<T, kVec>(y + index);
    Pack<T, kVec> gv, ov;
    if (kFromResidual) {
      gv = load_pack<T, kVec>(grad_residual + index);
    } else {
      gv = load_pack<T, kVec>(grad_out + index);
      ov = load_pack<T, kVec>(out + index);
    }
    Pack<T, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t c = kChannelsLast ? c0 + j : c0;
      const acc_t g = kFromResidual ? to_acc(gv.v[j]) : bn_act_masked_grad<kRelu>(to_acc(gv.v[j]), to_acc(ov.v[j]));
      result.v[j] = from_acc<T>(bn_backward_apply(coefs[c], g, to_acc(yv.v[j]) - mean[c]));
    }
    store_pack<T, kVec>(grad_y + index, result);
  }
}

template <typename T, int kVec, bool kChannelsLast>
void grad_y_with_pack(const T* grad_out, const T* out, const T* grad_residual, const T* y, const void* mean,
                      const void* coefs, T* grad_y, ActivationShape shape, bool relu, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  const int64_t packs = shape.batch * shape.channels * shape.spatial / kVec;
  const unsigned blocks = elementwise_blocks(packs);
  auto m = static_cast<const acc_t*>(mean);
  auto k = static_cast<const BnBackwardCoefs<acc_t>*>(coefs);
#define RESNET_FAST_LAUNCH_GRAD_Y(RELU, FROM_RES)                                                              \
  launch_kernel<bn_act_backward_grad_y_kernel<T, kVec, kChannelsLast, RELU, FROM_RES>>(                          \
      blocks, kElementwiseThreads, stream, grad_out, out, grad_residual, y, m, k, grad_y, packs, shape.channels, \
      shape.spatial)
  if (grad_residual) RESNET_FAST_LAUNCH_GRAD_Y(false, true);  // the mask is already in g
  else if (relu) RESNET_FAST_LAUNCH_GRAD_Y(true, false);
  else RESNET_FAST_LAUNCH_GRAD_Y(false, false);
#undef RESNET_FAST_LAUNCH_GRAD_Y
}

template <typename T>
void grad_y_typed(const void* grad_out, const void* out, const void* grad_residual, const void* y, const void* mean,
                  const void* coefs, void* grad_y, ActivationShape shape, bool relu, cudaStream_t stream) {
  constexpr int kWide = 16 / sizeof(T);
  auto go = static_cast<const T*>(grad_out);
  auto o = static_cast<const T*>(out);
  auto gr = static_cast<const T*>(grad_residual);
  auto yt = static_cast<const T*>(y);
  auto gy = static_cast<T*>(grad_y);
  const bool wide = pack_width<T>(shape, grad_residual ? grad_residual : grad_out, grad_residual ? nullptr : out, y,
                                  grad_y) == kWide;
  if (shape.channels_last) {
    if (wide) grad_y_with_pack<T, kWide, true>(go, o, gr, yt, mean, coefs, gy, shape, relu, stream);
    else grad_y_with_pack<T, 1, true>(go, o, gr, yt, mean, coefs, gy, shape, relu, stream);
  } else {
    if (wide) grad_y_with_pack<T, kWide, false>(go, o, gr, yt, mean, coefs, gy, shape, relu, stream);
    else grad_y_with_pack<T, 1, false>(go, o, gr, yt, mean, coefs, gy, shape, relu, stream);
  }
}

// Calls body(T{}) with the element type of dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& body) {
  switch (dtype) {
    case DType::kFloat32: body(float{}); break;
    case DType::kFloat16: body(__half{}); break;
    case DType::kBFloat16: body(__nv_bfloat16{}); break;
    case DType::kFloat64: body(double{}); break;
  }
}

size_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace

int64_t reduction_splits(ActivationShape shape) {
  const int64_t rows = shape.batch * shape.spatial;
  const int64_t channel_blocks = shape.channels_last ? ceil_div(shape.channels, kWarp) : shape.channels;
  // Enough blocks to fill the GPU a few times over, each with at least ~8 rows per thread.
  const int64_t wanted = ceil_div(int64_t(multiprocessor_count()) * 8, std::max<int64_t>(channel_blocks, 1));
  const int64_t by_rows = std::max<int64_t>(1, rows / (shape.channels_last ? kRowsPerBlock * 8 : kReductionThreads * 8));
  return std::max<int64_t>(1, std::min<int64_t>({wanted, by_rows, 65535}));
}

size_t batch_stats_workspace_bytes(DType dtype, ActivationShape shape) {
  return static_cast<size_t>(reduction_splits(shape) * shape.channels) * 3 * acc_bytes(dtype);
}

void launch_bn_act_forward(DType dtype, const void* y, const void* scale, const void* shift, const void* residual,
                           void* out, ActivationShape shape, bool relu, cudaStream_t stream) {
  if (shape.batch * shape.channels * shape.spatial == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    forward_typed<decltype(tag)>(y, scale, shift, residual, out, shape, relu, stream);
  });
}

void launch_batch_stats_partials(DType dtype, const void* y, void* workspace, ActivationShape shape,
                                 cudaStream_t stream) {
  if (shape.channels == 0 || shape.batch * shape.spatial == 0) return;  // finalize then merges no partials
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Op = StatsOp<T>;
    launch_reduce(Op{static_cast<const T*>(y)}, static_cast<typename Op::State*>(workspace), shape, stream);
  });
}

void launch_batch_stats_finalize(DType dtype, const void* workspace, void* mean, void* var, ActivationShape shape,
                                 cudaStream_t stream) {
  if (shape.channels == 0) return;
  // No rows: the partials kernel did not run, so there is nothing to merge (Welford's empty state).
  const int64_t splits = shape.batch * shape.spatial == 0 ? 0 : reduction_splits(shape);
  const unsigned blocks = static_cast<unsigned>(ceil_div(shape.channels, kElementwiseThreads));
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    launch_kernel<batch_stats_finalize_kernel<acc_t>>(
        blocks, kElementwiseThreads, stream, static_cast<const WelfordState<acc_t>*>(workspace),
        static_cast<acc_t*>(mean), static_cast<acc_t*>(var), splits, shape.channels);
  };
  if (dtype == DType::kFloat64) run(double{});
  else run(float{});
}

size_t bn_act_backward_workspace_bytes(DType dtype, ActivationShape shape) {
  // partials (2 per split and channel), then the grad_y coefficients (3 per channel)
  return static_cast<size_t>(reduction_splits(shape) * shape.channels * 2 + shape.channels * 3) * acc_bytes(dtype);
}

void launch_bn_act_backward_partials(DType dtype, const void* grad_out, const void* out, const void* y,
                                     const void* mean, void* grad_residual, void* workspace, ActivationShape shape,
                                     bool relu, cudaStream_t stream) {
  if (shape.channels == 0 || shape.batch * shape.spatial == 0) return;  // finalize then merges no partials
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    auto run = [&](auto relu_tag) {
      using Op = GradSumsOp<T, decltype(relu_tag)::value>;
      Op op{static_cast<const T*>(grad_out), static_cast<const T*>(out), static_cast<const T*>(y),
            static_cast<const acc_t*>(mean), static_cast<T*>(grad_residual)};
      launch_reduce(op, static_cast<typename Op::State*>(workspace), shape, stream);
    };
    if (relu) run(std::true_type{});
    else run(std::false_type{});
  });
}

void launch_bn_act_backward_finalize(DType dtype, void* workspace, const void* invstd, const void* weight,
                                     void* grad_weight, void* grad_bias, ActivationShape shape, cudaStream_t stream) {
  if (shape.channels == 0) return;
  const int64_t splits = reduction_splits(shape);
  // No rows: the partials kernel did not run, so there is nothing to merge (zero sums).
  const int64_t merged = shape.batch * shape.spatial == 0 ? 0 : splits;
  const unsigned blocks = static_cast<unsigned>(ceil_div(shape.channels, kElementwiseThreads));
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    auto partials = static_cast<GradSums<acc_t>*>(workspace);
    auto coefs = reinterpret_cast<BnBackwardCoefs<acc_t>*>(partials + splits * shape.channels);
    launch_kernel<bn_act_backward_finalize_kernel<acc_t>>(
        blocks, kElementwiseThreads, stream, partials, coefs, static_cast<const acc_t*>(invstd),
        static_cast<const acc_t*>(weight), static_cast<acc_t*>(grad_weight), static_cast<acc_t*>(grad_bias), merged,
        shape.channels, static_cast<acc_t>(shape.batch * shape.spatial));
  };
  if (dtype == DType::kFloat64) run(double{});
  else run(float{});
}

void launch_bn_act_backward_grad_y(DType dtype, const void* grad_out, const void* out, const void* grad_residual,
                                   const void* y, const void* mean, const void* workspace, void* grad_y,
                                   ActivationShape shape, bool relu, cudaStream_t stream) {
  if (shape.batch * shape.channels * shape.spatial == 0) return;
  const int64_t splits = reduction_splits(shape);
  auto coefs_of = [&](auto acc_tag) -> const void* {
    using acc_t = decltype(acc_tag);
    return static_cast<const GradSums<acc_t>*>(workspace) + splits * shape.channels;
  };
  const void* coefs = dtype == DType::kFloat64 ? coefs_of(double{}) : coefs_of(float{});
  dispatch_dtype(dtype, [&](auto tag) {
    grad_y_typed<decltype(tag)>(grad_out, out, grad_residual, y, mean, coefs, grad_y, shape, relu, stream);
  });
}

}  // namespace cuda
}  // namespace resnet_fast
