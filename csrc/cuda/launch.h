// Kernel launch for both builds of bn_act_kernels.cu: `<<<grid, block, 0, stream>>>` under nvcc,
// the host shim's checked, logged launch when the kernels are compiled as host C++ (host_shim.h).
#pragma once

#ifdef RESNET_FAST_CUDA_HOST_SHIM
#include "cuda/host_shim.h"
#else
#include <cuda_runtime.h>
#endif

namespace resnet_fast {
namespace cuda {

// kKernel<<<grid, block, 0, stream>>>(args...). As with <<<>>>, a failed launch is reported by
// cudaGetLastError(), which the caller checks.
template <auto kKernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
#ifdef RESNET_FAST_CUDA_HOST_SHIM
  auto body = [&] { kKernel(args...); };
  host_shim::launch(host_shim::kernel_name<kKernel>(), grid, block, stream, body);
#else
  kKernel<<<grid, block, 0, stream>>>(args...);
#endif
}

}  // namespace cuda
}  // namespace resnet_fast
