// C entry points (for ctypes) of the CUDA kernels built as host C++ with csrc/cuda/host_shim.h.
//
// Linked with csrc/cuda/bn_act_kernels.cu into one shared library by tests/cuda_twin.py: the
// launchers are the real ones; ActivationShape and the enum are flattened into plain arguments.
// Also exposes the shim's controls (device size, thread schedule, launch log, errors), its half /
// bfloat16 conversions, and probe kernels that test the shim itself.
#include <cstdint>
#include <cstring>

#include "cuda/bn_act_launchers.h"
#include "cuda/host_shim.h"
#include "cuda/launch.h"

namespace resnet_fast {
namespace cuda {
namespace {

namespace shim = host_shim;

ActivationShape shape_of(int64_t batch, int64_t channels, int64_t spatial, int channels_last) {
  return ActivationShape{batch, channels, spatial, channels_last != 0};
}

DType dtype_of(int dtype) { return static_cast<DType>(dtype); }

cudaStream_t stream_of(void* stream) { return static_cast<cudaStream_t>(stream); }

// Counts the threads that ran and checks each sees coordinates inside its launch.
__global__ void probe_count_kernel(int64_t* count, int64_t* out_of_range) {
  ++*count;
  if (threadIdx.x >= blockDim.x || threadIdx.y >= blockDim.y || threadIdx.z >= blockDim.z || blockIdx.x >= gridDim.x ||
      blockIdx.y >= gridDim.y || blockIdx.z >= gridDim.z) {
    ++*out_of_range;
  }
}

constexpr int kProbeThreads = 64;

// out[block][0][t]: what thread t read from its neighbour's slot after the barrier (its neighbour's id);
// out[block][1][t]: a shared slot nobody writes (the poison); out[block][2][t]: the slot after a second
// round in which every thread overwrote its own slot (id + 1000 * block).
__global__ void probe_barrier_kernel(float* out, int diverge) {
  __shared__ float slots[kProbeThreads];
  __shared__ float unwritten[kProbeThreads];
  const int t = threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * 3 * kProbeThreads;
  slots[t] = float(t);
  if (diverge == 2) unwritten[t] = 0.0f;  // never taken: keeps g++ from folding the reads to the zero-initialised value
  if (diverge == 1 && t == kProbeThreads - 1) return;
  __syncthreads();
  const float neighbour = slots[(t + 1) % kProbeThreads];
  __syncthreads();
  slots[t] = float(t + 1000 * blockIdx.x);
  __syncthreads();
  out[base + t] = neighbour;
  out[base + kProbeThreads + t] = unwritten[t];
  out[base + 2 * kProbeThreads + t] = slots[t];
}

}  // namespace
}  // namespace cuda
}  // namespace resnet_fast

using namespace resnet_fast::cuda;

extern "C" {

// An address in this library, to locate its symbols (the __shared__ arrays) from `nm` output.
void twin_anchor() {}

void twin_reset() {
  auto& rt = shim::runtime_state;
  rt.multiprocessor_count = 132;
  rt.last_error = cudaSuccess;
  rt.last_error_message.clear();
  rt.schedule = shim::Schedule::kAscending;
  rt.seed = 0;
  rt.launches.clear();
}

void twin_set_multiprocessor_count(int count) { shim::runtime_state.multiprocessor_count = count; }

void twin_set_schedule(int schedule, uint64_t seed) {
  shim::runtime_state.schedule = static_cast<shim::Schedule>(schedule);
  shim::runtime_state.seed = seed;
}

void twin_set_shared_regions(const uint64_t* addresses, const uint64_t* sizes, int count) {
  auto& regions = shim::runtime_state.shared_regions;
  regions.clear();
  for (int i = 0; i < count; ++i) {
    regions.emplace_back(reinterpret_cast<void*>(static_cast<uintptr_t>(addresses[i])), static_cast<size_t>(sizes[i]));
  }
}

int twin_get_last_error() { return cudaGetLastError(); }

const char* twin_last_error_message() { return shim::runtime_state.last_error_message.c_str(); }

const char* twin_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int twin_launch_count() { return static_cast<int>(shim::runtime_state.launches.size()); }

const char* twin_launch_kernel(int i) { return shim::runtime_state.launches.at(i).kernel.c_str(); }

// grid x, y, z, block x, y, z
void twin_launch_dims(int i, unsigned* dims) {
  const auto& launch = shim::runtime_state.launches.at(i);
  const unsigned values[6] = {launch.grid.x,  launch.grid.y,  launch.grid.z,
                              launch.block.x, launch.block.y, launch.block.z};
  std::memcpy(dims, values, sizeof(values));
}

void* twin_launch_stream(int i) { return shim::runtime_state.launches.at(i).stream; }

int twin_launch_error(int i) { return shim::runtime_state.launches.at(i).error; }

// ---- the launchers of bn_act_launchers.h

void twin_bn_act_forward(int dtype, const void* y, const void* scale, const void* shift, const void* residual,
                         void* out, int64_t batch, int64_t channels, int64_t spatial, int channels_last, int relu,
                         void* stream) {
  launch_bn_act_forward(dtype_of(dtype), y, scale, shift, residual, out,
                        shape_of(batch, channels, spatial, channels_last), relu != 0, stream_of(stream));
}

int64_t twin_reduction_splits(int64_t batch, int64_t channels, int64_t spatial, int channels_last) {
  return reduction_splits(shape_of(batch, channels, spatial, channels_last));
}

uint64_t twin_batch_stats_workspace_bytes(int dtype, int64_t batch, int64_t channels, int64_t spatial,
                                          int channels_last) {
  return batch_stats_workspace_bytes(dtype_of(dtype), shape_of(batch, channels, spatial, channels_last));
}

void twin_batch_stats_partials(int dtype, const void* y, void* workspace, int64_t batch, int64_t channels,
                               int64_t spatial, int channels_last, void* stream) {
  launch_batch_stats_partials(dtype_of(dtype), y, workspace, shape_of(batch, channels, spatial, channels_last),
                              stream_of(stream));
}

void twin_batch_stats_finalize(int dtype, const void* workspace, void* mean, void* var, int64_t batch,
                               int64_t channels, int64_t spatial, int channels_last, void* stream) {
  launch_batch_stats_finalize(dtype_of(dtype), workspace, mean, var, shape_of(batch, channels, spatial, channels_last),
                              stream_of(stream));
}

uint64_t twin_bn_act_backward_workspace_bytes(int dtype, int64_t batch, int64_t channels, int64_t spatial,
                                              int channels_last) {
  return bn_act_backward_workspace_bytes(dtype_of(dtype), shape_of(batch, channels, spatial, channels_last));
}

void twin_bn_act_backward_partials(int dtype, const void* grad_out, const void* out, const void* y, const void* mean,
                                   void* grad_residual, void* workspace, int64_t batch, int64_t channels,
                                   int64_t spatial, int channels_last, int relu, void* stream) {
  launch_bn_act_backward_partials(dtype_of(dtype), grad_out, out, y, mean, grad_residual, workspace,
                                  shape_of(batch, channels, spatial, channels_last), relu != 0, stream_of(stream));
}

void twin_bn_act_backward_finalize(int dtype, void* workspace, const void* invstd, const void* weight,
                                   void* grad_weight, void* grad_bias, int64_t batch, int64_t channels,
                                   int64_t spatial, int channels_last, void* stream) {
  launch_bn_act_backward_finalize(dtype_of(dtype), workspace, invstd, weight, grad_weight, grad_bias,
                                  shape_of(batch, channels, spatial, channels_last), stream_of(stream));
}

void twin_bn_act_backward_grad_y(int dtype, const void* grad_out, const void* out, const void* grad_residual,
                                 const void* y, const void* mean, const void* workspace, void* grad_y, int64_t batch,
                                 int64_t channels, int64_t spatial, int channels_last, int relu, void* stream) {
  launch_bn_act_backward_grad_y(dtype_of(dtype), grad_out, out, grad_residual, y, mean, workspace, grad_y,
                                shape_of(batch, channels, spatial, channels_last), relu != 0, stream_of(stream));
}

// ---- the shim's conversions

void twin_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).bits;
}

void twin_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}

void twin_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).bits;
}

void twin_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}

// ---- probes of the shim itself

int twin_probe_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, int64_t* count,
                      int64_t* out_of_range) {
  launch_kernel<probe_count_kernel>(dim3(gx, gy, gz), dim3(bx, by, bz), nullptr, count, out_of_range);
  return cudaGetLastError();
}

// out holds blocks * 3 * 64 floats.
int twin_probe_barrier(unsigned blocks, int diverge, float* out) {
  launch_kernel<probe_barrier_kernel>(dim3(blocks), dim3(kProbeThreads), nullptr, out, diverge);
  return cudaGetLastError();
}

int twin_probe_threads() { return kProbeThreads; }

}  // extern "C"
