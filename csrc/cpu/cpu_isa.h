// The CPU kernels that exist once per instruction set (ISA variant) and the run-time choice between them.
//
// winograd_cpu.cpp and bn_act_cpu.cpp are compiled twice: with the baseline flags (AVX2 + FMA + F16C,
// at::vec 8 float lanes) and, from the wrappers in csrc/cpu/avx512/, with the AVX-512 flags (at::vec 16
// float lanes; setup.py compiles csrc/cpu/<isa>/*.cpp with that ISA's flags). at::vec already lives in an
// inline namespace named after CPU_CAPABILITY; the package's own code of each build lives in
// resnet_fast::RESNET_FAST_ISA (resnet_fast::avx2, resnet_fast::avx512, or resnet_fast::portable when
// the baseline is at::vec's portable DEFAULT), so the two builds' inline functions and templates never
// share a symbol. Each variant fills a CpuKernelTable; isa_dispatch_cpu.cpp picks one table when the
// library loads (CPUID, the OS's saved register state, RESNET_FAST_CPU_ISA) and is the only place that
// registers these ops with the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#define RESNET_FAST_ISA avx512
#elif defined(CPU_CAPABILITY_AVX2)
#define RESNET_FAST_ISA avx2
#else
#define RESNET_FAST_ISA portable
#endif
#define RESNET_FAST_ISA_STR_IMPL(isa) #isa
#define RESNET_FAST_ISA_STR(isa) RESNET_FAST_ISA_STR_IMPL(isa)
#define RESNET_FAST_ISA_NAME RESNET_FAST_ISA_STR(RESNET_FAST_ISA)  // "avx2", "avx512" or "portable"

namespace resnet_fast {

// One ISA variant's kernels of the ops that have several (schemas in resnet_fast/ops/_library.py).
struct CpuKernelTable {
  using Tensor = at::Tensor;
  using OptionalTensor = std::optional<at::Tensor>;
  // winograd_cpu.cpp. The packed weight's panel width is the variant's (16 columns for AVX2, 32 for
  // AVX-512): a weight packed by one variant is rejected by the other's convolution.
  Tensor (*winograd_weight)(const Tensor& weight) = nullptr;
  int64_t winograd_panel_columns = 0;  // the last dimension of winograd_weight's result
  Tensor (*winograd_conv3x3)(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                             const OptionalTensor& residual, bool relu) = nullptr;
  Tensor (*winograd_conv3x3_blocked)(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                                     const OptionalTensor& residual, bool relu) = nullptr;
  // bn_act_cpu.cpp
  Tensor (*bn_act_forward)(const Tensor& y, const OptionalTensor& scale, const Tensor& shift,
                           const OptionalTensor& residual, bool relu) = nullptr;
  std::tuple<Tensor, Tensor> (*batch_stats)(const Tensor& y) = nullptr;
  std::tuple<Tensor, Tensor, Tensor> (*bn_act_train_forward)(const Tensor& y, const OptionalTensor& weight,
                                                             const OptionalTensor& bias,
                                                             const OptionalTensor& residual, double eps,
                                                             bool relu) = nullptr;
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*bn_act_backward)(const Tensor& grad_out, const Tensor& out,
                                                                const Tensor& y, const Tensor& mean,
                                                                const Tensor& invstd, const OptionalTensor& weight,
                                                                bool relu, bool residual_grad) = nullptr;
};

// Declares the functions through which the variant in namespace `isa` fills its table.
#define RESNET_FAST_DECLARE_CPU_VARIANT(isa)             \
  namespace isa {                                        \
  void add_winograd_kernels(CpuKernelTable& table);      \
  void add_bn_act_kernels(CpuKernelTable& table);        \
  }

// What build_info() reports about the variants (isa_dispatch_cpu.cpp).
struct CpuIsaInfo {
  std::vector<std::string> variants;  // compiled in, baseline first: {"avx2", "avx512"}
  std::string requested;              // RESNET_FAST_CPU_ISA as read at load ("auto" when unset)
  std::string active;                 // the variant the ops run; empty when the request cannot be met
  std::string error;                  // why not, in one sentence; empty when active is set
  bool cpu_has_avx512 = false;        // avx512f/bw/vl/dq in CPUID and zmm state saved by the OS
  int64_t winograd_panel_columns = 0; // of the active variant's packed Winograd weights
};

const CpuIsaInfo& cpu_isa_info();

}  // namespace resnet_fast
