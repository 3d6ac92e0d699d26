// Chooses the ISA variant of the CPU kernels (cpu_isa.h) once, when the library loads, and registers
// the ops that have variants with the dispatcher, each forwarding through the chosen table.
//
// The AVX-512 variant runs when it was compiled in, CPUID reports avx512f, avx512bw, avx512vl and
// avx512dq, and the OS saves the opmask and zmm registers on context switches (XCR0, read with
// xgetbv); otherwise the baseline. RESNET_FAST_CPU_ISA=auto|avx2|avx512 (read once, at load) overrides:
// avx2 forces the baseline, avx512 demands the AVX-512 variant. A request this CPU or build cannot
// meet never falls back silently and never crashes: every op with variants then raises a RuntimeError
// saying why, and build_info() reports it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define RESNET_FAST_X86 1
#endif

#include "cpu_isa.h"

namespace resnet_fast {

RESNET_FAST_DECLARE_CPU_VARIANT(RESNET_FAST_ISA)  // the baseline, compiled with this file's flags
#ifdef RESNET_FAST_CPU_VARIANT_AVX512
RESNET_FAST_DECLARE_CPU_VARIANT(avx512)
#endif

namespace {

using at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

constexpr const char* kEnvVar = "RESNET_FAST_CPU_ISA";
// Test seam: 1 makes the detection report a CPU without AVX-512 (tests of the error on an AVX-512 machine).
constexpr const char* kTestHideAvx512Var = "RESNET_FAST_CPU_ISA_TEST_HIDE_AVX512";

#ifdef RESNET_FAST_X86
// XCR0 bits 1, 2 (SSE, AVX state), 5, 6, 7 (opmask, upper halves of zmm0-15, zmm16-31).
constexpr unsigned kAvx512StateMask = 0xE6;

bool os_saves_avx512_state() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  if (!(ecx & bit_OSXSAVE)) return false;  // xgetbv is unavailable without OSXSAVE
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  return (xcr0_low & kAvx512StateMask) == kAvx512StateMask;
}
#endif

bool detect_avx512() {
  const char* hide = std::getenv(kTestHideAvx512Var);
  if (hide != nullptr && std::string(hide) == "1") return false;
#ifdef RESNET_FAST_X86
  __builtin_cpu_init();  // this may run from a static constructor, before libgcc's own
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && os_saves_avx512_state();
#else
  return false;
#endif
}

struct Selection {
  CpuIsaInfo info;
  CpuKernelTable baseline, avx512;
  const CpuKernelTable* active = nullptr;
};

std::string lowercase_trimmed(const char* value) {
  std::string s;
  for (const char* p = value; *p; ++p) {
    if (!std::isspace(static_cast<unsigned char>(*p))) s += static_cast<char>(std::tolower(static_cast<unsigned char>(*p)));
  }
  return s;
}

Selection make_selection() {
  Selection s;
  RESNET_FAST_ISA::add_winograd_kernels(s.baseline);
  RESNET_FAST_ISA::add_bn_act_kernels(s.baseline);
  s.info.variants.push_back(RESNET_FAST_ISA_NAME);
  bool have_avx512_variant = false;
#ifdef RESNET_FAST_CPU_VARIANT_AVX512
  avx512::add_winograd_kernels(s.avx512);
  avx512::add_bn_act_kernels(s.avx512);
  s.info.variants.push_back("avx512");
  have_avx512_variant = true;
#endif
  s.info.cpu_has_avx512 = detect_avx512();
  const char* env = std::getenv(kEnvVar);
  s.info.requested = (env == nullptr || lowercase_trimmed(env).empty()) ? "auto" : lowercase_trimmed(env);
  const std::string& requested = s.info.requested;
  const std::string baseline_name = RESNET_FAST_ISA_NAME;
  auto use_baseline = [&] {
    s.active = &s.baseline;
    s.info.active = baseline_name;
  };
  auto use_avx512 = [&] {
    s.active = &s.avx512;
    s.info.active = "avx512";
  };
  if (requested == "auto") {
    (have_avx512_variant && s.info.cpu_has_avx512) ? use_avx512() : use_baseline();
  } else if (requested == "avx2" || requested == baseline_name) {
    if (requested == "avx2" && baseline_name != "avx2") {
      s.info.error = std::string(kEnvVar) + "=avx2, but this build of resnet_fast._C has no AVX2 kernels "
                     "(it was built for at::vec's portable code); use auto";
    } else {
      use_baseline();
    }
  } else if (requested == "avx512") {
    if (!have_avx512_variant) {
      s.info.error = std::string(kEnvVar) + "=avx512, but this build of resnet_fast._C has no AVX-512 kernels "
                     "(built with RESNET_FAST_CPU_AVX512=0 or for a non-x86-64 CPU); unset it or use auto or " +
                     baseline_name;
    } else if (!s.info.cpu_has_avx512) {
      s.info.error = std::string(kEnvVar) + "=avx512, but this CPU cannot run AVX-512 code (it needs avx512f, "
                     "avx512bw, avx512vl and avx512dq, and an OS that saves the zmm registers); unset it or use "
                     "auto or " + baseline_name;
    } else {
      use_avx512();
    }
  } else {
    s.info.error = std::string(kEnvVar) + " must be auto, avx2 or avx512, got '" + requested + "'";
  }
  if (s.active != nullptr) s.info.winograd_panel_columns = s.active->winograd_panel_columns;
  return s;
}

const Selection& selection() {
  static const Selection s = make_selection();
  return s;
}

// Reads the environment and CPUID when the library loads, not at the first op call.
[[maybe_unused]] const bool kSelectedAtLoad = (selection(), true);

const CpuKernelTable& kernels(const char* op) {
  const Selection& s = selection();
  TORCH_CHECK(s.active != nullptr, op, ": ", s.info.error);
  return *s.active;
}

Tensor winograd_weight(const Tensor& weight) { return kernels("winograd_weight").winograd_weight(weight); }

Tensor winograd_conv3x3(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                        const OptionalTensor& residual, bool relu) {
  return kernels("winograd_conv3x3").winograd_conv3x3(x, packed_weight, bias, residual, relu);
}

Tensor winograd_conv3x3_blocked(const Tensor& x, const Tensor& packed_weight, const Tensor& bias,
                                const OptionalTensor& residual, bool relu) {
  return kernels("winograd_conv3x3_blocked").winograd_conv3x3_blocked(x, packed_weight, bias, residual, relu);
}

Tensor bn_act_forward(const Tensor& y, const OptionalTensor& scale, const Tensor& shift,
                      const OptionalTensor& residual, bool relu) {
  return kernels("bn_act_forward").bn_act_forward(y, scale, shift, residual, relu);
}

std::tuple<Tensor, Tensor> batch_stats(const Tensor& y) { return kernels("batch_stats").batch_stats(y); }

std::tuple<Tensor, Tensor, Tensor> bn_act_train_forward(const Tensor& y, const OptionalTensor& weight,
                                                        const OptionalTensor& bias, const OptionalTensor& residual,
                                                        double eps, bool relu) {
  return kernels("bn_act_train_forward").bn_act_train_forward(y, weight, bias, residual, eps, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(const Tensor& grad_out, const Tensor& out,
                                                           const Tensor& y, const Tensor& mean, const Tensor& invstd,
                                                           const OptionalTensor& weight, bool relu,
                                                           bool residual_grad) {
  return kernels("bn_act_backward").bn_act_backward(grad_out, out, y, mean, invstd, weight, relu, residual_grad);
}

}  // namespace

const CpuIsaInfo& cpu_isa_info() { return selection().info; }

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("winograd_weight", &winograd_weight);
  m.impl("winograd_conv3x3", &winograd_conv3x3);
  m.impl("winograd_conv3x3_blocked", &winograd_conv3x3_blocked);
  m.impl("bn_act_forward", &bn_act_forward);
  m.impl("batch_stats", &batch_stats);
  m.impl("bn_act_train_forward", &bn_act_train_forward);
  m.impl("bn_act_backward", &bn_act_backward);
}

}  // namespace resnet_fast
