// Host stand-in for the parts of the CUDA language and runtime that bn_act_kernels.cu uses.
//
// With -DRESNET_FAST_CUDA_HOST_SHIM the same kernel source compiles as host C++ (g++ -x c++), so
// the real kernel bodies and launchers run on the CPU: under tests against float64 references,
// and under AddressSanitizer / UBSan, on machines without a GPU (tests/cuda_twin.py builds it).
//
// Execution model: blocks run one after another on the calling thread; the threads of a block
// are fibers on that thread, each resumed in turn until it reaches __syncthreads() or returns,
// so a barrier is a real barrier and nothing can hang on a lost wake-up. (On x86-64 a fiber
// switch is a few instructions; ucontext's swapcontext, the fallback elsewhere, costs a system
// call per switch, which a 256-thread block with 9 barriers pays thousands of times.) The order in
// which the threads (and blocks) run between barriers is configurable: a kernel whose result
// depends on it has a race. __shared__ arrays are function statics, i.e. one copy shared by the
// threads of the running block; the test harness registers their addresses so every block starts
// with them poisoned (0xff bytes: NaN in every float type), as uninitialised shared memory would.
//
// Launches are checked like CUDA checks them (no zero-size grid or block, grid.y/z <= 65535,
// block.z <= 64, at most 1024 threads) and a rejected launch leaves cudaErrorInvalidConfiguration
// for cudaGetLastError, without running. Every launch is logged (kernel, grid, block, stream).
#pragma once

#ifndef RESNET_FAST_CUDA_HOST_SHIM
#error "host_shim.h is the host build of the CUDA kernels; compile with -DRESNET_FAST_CUDA_HOST_SHIM"
#endif

#if !defined(__x86_64__) && !defined(RESNET_FAST_SHIM_UCONTEXT)
#define RESNET_FAST_SHIM_UCONTEXT
#endif
#ifdef RESNET_FAST_SHIM_UCONTEXT
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
// __restrict__ is a g++ keyword already.

// ------------------------------------------------------------------------------------------
// Built-in vector types and thread coordinates

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct uint3 {
  unsigned x, y, z;
};

// Written by the launcher before each fiber resumes; kernels only read them.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

// ------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with round-to-nearest-even conversions

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace resnet_fast {
namespace cuda {
namespace host_shim {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace host_shim
}  // namespace cuda
}  // namespace resnet_fast

inline float __half2float(__half h) {
  using namespace resnet_fast::cuda::host_shim;
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * bits_float(0x33800000u);
    return bits_float(float_bits(magnitude) | sign);
  }
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  using namespace resnet_fast::cuda::host_shim;
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t out;
  if (u >= 0x47800000u) {  // |f| >= 65536 rounds to inf in any case; NaN stays NaN
    out = u > 0x7f800000u ? 0x7fffu : 0x7c00u;
  } else if (u < 0x38800000u) {
    // Subnormal or zero: adding 0.5 lines the 10 mantissa bits up with the bottom of a float
    // mantissa, and the float addition itself rounds to nearest even.
    out = float_bits(bits_float(u) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + odd;  // rebias; ties go to the even mantissa
    out = u >> 13;                                   // a carry may round up to inf, as it should
  }
  return __half{static_cast<uint16_t>(out | sign)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return resnet_fast::cuda::host_shim::bits_float(uint32_t(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  using namespace resnet_fast::cuda::host_shim;
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  return __nv_bfloat16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// ------------------------------------------------------------------------------------------
// Runtime API subset

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
};

namespace resnet_fast {
namespace cuda {
namespace host_shim {

enum class Schedule : int { kAscending = 0, kDescending = 1, kShuffled = 2 };

struct LaunchRecord {
  std::string kernel;
  dim3 grid;
  dim3 block;
  cudaStream_t stream;
  cudaError_t error;
};

// ---- fibers: a stack each, and a switch between two saved contexts

#ifdef RESNET_FAST_SHIM_UCONTEXT

struct Context {
  ucontext_t context;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }

inline void make_context(Context& context, char* stack, size_t size, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = size;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

#else

// The callee-saved state of the System V x86-64 ABI (rbx, rbp, r12-r15, MXCSR, x87 control
// word) is pushed on the current stack, whose pointer is saved; then the other stack's is loaded
// and popped. Everything else a call may clobber anyway. Weak: both translation units define it.
extern "C" void resnet_fast_shim_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .weak resnet_fast_shim_switch_stack
  .hidden resnet_fast_shim_switch_stack
  .type resnet_fast_shim_switch_stack, @function
resnet_fast_shim_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size resnet_fast_shim_switch_stack, .-resnet_fast_shim_switch_stack
  .popsection
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_context(Context& from, Context& to) { resnet_fast_shim_switch_stack(&from.sp, to.sp); }

// A stack that the first switch "returns" from into entry(), aligned as if entry had been called.
inline void make_context(Context& context, char* stack, size_t size, void (*entry)()) {
  uint64_t* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15));
  *--sp = 0;  // entry's return address: it never returns
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12-r15
  uint32_t mxcsr;
  uint16_t control_word;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(control_word));
  --sp;
  std::memcpy(sp, &mxcsr, sizeof(mxcsr));
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &control_word, sizeof(control_word));
  context.sp = sp;
}

#endif

struct Fiber {
  enum class State { kRunnable, kAtBarrier, kDone };
  Context context;
  std::unique_ptr<char[]> stack;
  State state = State::kRunnable;
  uint3 index{0, 0, 0};
};

constexpr size_t kFiberStackBytes = size_t(64) << 10;

struct Runtime {
  std::mutex launch_mutex;  // one launch at a time: coordinates and __shared__ are process-wide
  // device the tests pretend to have; <= 0 makes the device queries fail
  int multiprocessor_count = 132;
  cudaError_t last_error = cudaSuccess;
  std::string last_error_message;
  Schedule schedule = Schedule::kAscending;
  uint64_t seed = 0;
  std::vector<LaunchRecord> launches;
  std::vector<std::pair<void*, size_t>> shared_regions;  // poisoned at the start of every block

  // the running launch
  Context scheduler_context;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
};

inline Runtime runtime_state;

inline void set_error(cudaError_t error, std::string message) {
  runtime_state.last_error = error;
  runtime_state.last_error_message = std::move(message);
}

// AddressSanitizer has to be told when the stack changes under it.
inline void start_switch(void** fake_stack, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

inline void finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
#else
  (void)fake_stack, (void)old_bottom, (void)old_size;
#endif
}

inline void fiber_main() {
  Runtime& rt = runtime_state;
  finish_switch(nullptr, &rt.scheduler_stack_bottom, &rt.scheduler_stack_size);
  rt.body(rt.body_arg);
  rt.current->state = Fiber::State::kDone;
  start_switch(nullptr, rt.scheduler_stack_bottom, rt.scheduler_stack_size);  // this fiber's stack is finished
  switch_context(rt.current->context, rt.scheduler_context);
}

inline void resume(Fiber& fiber) {
  Runtime& rt = runtime_state;
  rt.current = &fiber;
  threadIdx = fiber.index;
  void* fake_stack = nullptr;
  start_switch(&fake_stack, fiber.stack.get(), kFiberStackBytes);
  switch_context(rt.scheduler_context, fiber.context);
  finish_switch(fake_stack, nullptr, nullptr);
  rt.current = nullptr;
}

inline void barrier() {
  Runtime& rt = runtime_state;
  Fiber* fiber = rt.current;
  if (fiber == nullptr) {
    set_error(cudaErrorLaunchFailure, "__syncthreads() called outside a kernel");
    return;
  }
  fiber->state = Fiber::State::kAtBarrier;
  void* fake_stack = nullptr;
  start_switch(&fake_stack, rt.scheduler_stack_bottom, rt.scheduler_stack_size);
  switch_context(fiber->context, rt.scheduler_context);
  finish_switch(fake_stack, &rt.scheduler_stack_bottom, &rt.scheduler_stack_size);
}

// The order in which the threads of a block run up to the next barrier (a new one each time).
inline void order_for(std::vector<size_t>& order, std::mt19937_64& rng) {
  for (size_t t = 0; t < order.size(); ++t) order[t] = t;
  switch (runtime_state.schedule) {
    case Schedule::kAscending: break;
    case Schedule::kDescending: std::reverse(order.begin(), order.end()); break;
    case Schedule::kShuffled: std::shuffle(order.begin(), order.end(), rng); break;
  }
}

inline void run_block(const dim3& block, std::mt19937_64& rng, const char* kernel) {
  Runtime& rt = runtime_state;
  for (const auto& region : rt.shared_regions) std::memset(region.first, 0xff, region.second);
  const size_t threads = size_t(block.x) * block.y * block.z;
  if (rt.fibers.size() < threads) rt.fibers.resize(threads);
  std::vector<size_t> order(threads);
  for (size_t t = 0; t < threads; ++t) {
    Fiber& fiber = rt.fibers[t];
    if (!fiber.stack) fiber.stack.reset(new char[kFiberStackBytes]);
#if defined(__SANITIZE_ADDRESS__)
    // The frames a finished fiber left behind keep their redzones; this stack starts afresh.
    __asan_unpoison_memory_region(fiber.stack.get(), kFiberStackBytes);
#endif
    make_context(fiber.context, fiber.stack.get(), kFiberStackBytes, fiber_main);
    fiber.state = Fiber::State::kRunnable;
    fiber.index = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y),
                        unsigned(t / (size_t(block.x) * block.y))};
  }
  for (;;) {
    order_for(order, rng);
    size_t waiting = 0, done = 0;
    for (size_t t : order) {
      Fiber& fiber = rt.fibers[t];
      if (fiber.state == Fiber::State::kDone) continue;
      fiber.state = Fiber::State::kRunnable;
      resume(fiber);
    }
    for (size_t t = 0; t < threads; ++t) {
      if (rt.fibers[t].state == Fiber::State::kAtBarrier) ++waiting;
      else ++done;
    }
    if (waiting == 0) break;
    if (done != 0) {
      // Threads that returned while others wait at a barrier: undefined behaviour in CUDA.
      set_error(cudaErrorLaunchFailure, std::string(kernel) + ": __syncthreads() not reached by every thread of " +
                                            "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
                                            ", " + std::to_string(blockIdx.z) + ")");
    }
  }
}

inline bool valid_configuration(const dim3& grid, const dim3& block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 && grid.z <= 65535 &&
         block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
         threads <= 1024;
}

// "resnet_fast::cuda::{anonymous}::bn_act_forward_kernel<float, 4, false, true, true>"
template <auto kKernel>
std::string kernel_name() {
  const std::string pretty = __PRETTY_FUNCTION__;
  const std::string key = "kKernel = ";
  const size_t begin = pretty.find(key);
  if (begin == std::string::npos) return pretty;
  const size_t end = pretty.find_first_of(";]", begin);
  return pretty.substr(begin + key.size(), end - begin - key.size());
}

template <typename Body>
void launch(std::string kernel, dim3 grid, dim3 block, cudaStream_t stream, Body& body) {
  Runtime& rt = runtime_state;
  const std::lock_guard<std::mutex> lock(rt.launch_mutex);
  const bool valid = valid_configuration(grid, block);
  rt.launches.push_back(LaunchRecord{kernel, grid, block, stream, valid ? cudaSuccess : cudaErrorInvalidConfiguration});
  if (!valid) {
    set_error(cudaErrorInvalidConfiguration, kernel + " with grid " + std::to_string(grid.x) + "x" +
                                                 std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " +
                                                 std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                                                 std::to_string(block.z));
    return;
  }
  rt.body = [](void* arg) { (*static_cast<Body*>(arg))(); };
  rt.body_arg = &body;
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(rt.seed);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  // Block order only matters to kernels that race between blocks; permute it when it is affordable.
  if (rt.schedule != Schedule::kAscending && blocks <= (uint64_t(1) << 20)) {
    order.resize(blocks);
    for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
    if (rt.schedule == Schedule::kDescending) std::reverse(order.begin(), order.end());
    else std::shuffle(order.begin(), order.end(), rng);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = order.empty() ? i : order[i];
    blockIdx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    run_block(block, rng, kernel.c_str());
  }
  threadIdx = uint3{0, 0, 0};
  blockIdx = uint3{0, 0, 0};
}

}  // namespace host_shim
}  // namespace cuda
}  // namespace resnet_fast

inline void __syncthreads() { resnet_fast::cuda::host_shim::barrier(); }

inline cudaError_t cudaGetDevice(int* device) {
  if (resnet_fast::cuda::host_shim::runtime_state.multiprocessor_count <= 0) {
    resnet_fast::cuda::host_shim::set_error(cudaErrorNoDevice, "no CUDA-capable device is detected");
    return cudaErrorNoDevice;
  }
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  using resnet_fast::cuda::host_shim::runtime_state;
  if (device != 0 || runtime_state.multiprocessor_count <= 0) {
    resnet_fast::cuda::host_shim::set_error(cudaErrorNoDevice, "no CUDA-capable device is detected");
    return cudaErrorNoDevice;
  }
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = runtime_state.multiprocessor_count; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
  }
  resnet_fast::cuda::host_shim::set_error(cudaErrorInvalidValue, "invalid argument");
  return cudaErrorInvalidValue;
}

inline cudaError_t cudaPeekAtLastError() { return resnet_fast::cuda::host_shim::runtime_state.last_error; }

inline cudaError_t cudaGetLastError() {
  using resnet_fast::cuda::host_shim::runtime_state;
  const cudaError_t error = runtime_state.last_error;
  runtime_state.last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}
