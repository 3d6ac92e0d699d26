// Plain C++ entry points of the CUDA kernels in bn_act_kernels.cu.
//
// Raw pointers, sizes and a layout flag only, so that the .cu file needs no torch
// headers (it compiles in seconds instead of minutes). bn_act_cuda.cpp checks the
// tensors, allocates outputs and workspaces, and calls one launcher per kernel,
// checking the launch after each. Per-channel vectors are in the accumulation
// type: float32, or float64 when the activations are float64.
//
// A launcher with nothing to do (C = 0, or no elements) launches nothing: CUDA rejects zero-size
// grids. An empty reduction (N*H*W = 0, C > 0) still writes its per-channel outputs, as the CPU
// kernels do: grad_weight = grad_bias = 0, and mean = var = 0 (Welford's empty state; the
// batch_stats op rejects that case before launching).
#pragma once

#ifdef RESNET_FAST_CUDA_HOST_SHIM
#include "cuda/host_shim.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstddef>
#include <cstdint>

namespace resnet_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A 4-d activation (N, C, H*W), NCHW-contiguous or channels_last-contiguous.
struct ActivationShape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  bool channels_last;
};

// out = act(y * scale[c] + shift[c] + residual). scale and residual may be null (1 and 0).
void launch_bn_act_forward(DType dtype, const void* y, const void* scale, const void* shift, const void* residual,
                           void* out, ActivationShape shape, bool relu, cudaStream_t stream);

// batch_stats in two kernels: per-(split, channel) Welford partials, then a per-channel merge.
int64_t reduction_splits(ActivationShape shape);
size_t batch_stats_workspace_bytes(DType dtype, ActivationShape shape);
void launch_batch_stats_partials(DType dtype, const void* y, void* workspace, ActivationShape shape,
                                 cudaStream_t stream);
void launch_batch_stats_finalize(DType dtype, const void* workspace, void* mean, void* var, ActivationShape shape,
                                 cudaStream_t stream);

// bn_act_backward in three kernels: per-(split, channel) sums of g and g*(y - mean) (writing
// grad_residual = g when it is not null), a per-channel merge into grad_weight, grad_bias and
// the grad_y coefficients, then the elementwise grad_y pass. weight may be null (1).
size_t bn_act_backward_workspace_bytes(DType dtype, ActivationShape shape);
void launch_bn_act_backward_partials(DType dtype, const void* grad_out, const void* out, const void* y,
                                     const void* mean, void* grad_residual, void* workspace, ActivationShape shape,
                                     bool relu, cudaStream_t stream);
void launch_bn_act_backward_finalize(DType dtype, void* workspace, const void* invstd, const void* weight,
                                     void* grad_weight, void* grad_bias, ActivationShape shape, cudaStream_t stream);
void launch_bn_act_backward_grad_y(DType dtype, const void* grad_out, const void* out, const void* grad_residual,
                                   const void* y, const void* mean, const void* workspace, void* grad_y,
                                   ActivationShape shape, bool relu, cudaStream_t stream);

}  // namespace cuda
}  // namespace resnet_fast
