// Python module of resnet_fast._C. The op kernels register themselves with the
// dispatcher (TORCH_LIBRARY_IMPL in cpu/ and cuda/) when the library is loaded;
// this file exposes how the library was built and the CPU activation pool.
#include <torch/extension.h>

#include "cpu/activation_pool.h"
#include "cpu/cpu_isa.h"

// Variadic so that an architecture list with commas ("8.0,9.0+PTX") stays one string.
#define RESNET_FAST_STRINGIFY_IMPL(...) #__VA_ARGS__
#define RESNET_FAST_STRINGIFY(...) RESNET_FAST_STRINGIFY_IMPL(__VA_ARGS__)

#ifndef RESNET_FAST_CUDA_ARCHS
#define RESNET_FAST_CUDA_ARCHS none
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef RESNET_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(RESNET_FAST_STRINGIFY(RESNET_FAST_CUDA_ARCHS));
#if defined(__AVX2__) && defined(__FMA__)
  info["cpu_isa"] = std::string("avx2+fma");  // the baseline every CPU kernel is compiled for
#else
  info["cpu_isa"] = std::string("baseline");
#endif
  // The kernels compiled once per instruction set (winograd_conv3x3*, bn_act_*, batch_stats) and
  // the one chosen at load by CPUID and RESNET_FAST_CPU_ISA (csrc/cpu/isa_dispatch_cpu.cpp).
  const resnet_fast::CpuIsaInfo& isa = resnet_fast::cpu_isa_info();
  pybind11::list variants;
  for (const std::string& name : isa.variants) variants.append(name);
  info["cpu_isa_variants"] = variants;
  info["cpu_isa_requested"] = isa.requested;
  info["cpu_isa_active"] = isa.active.empty() ? pybind11::object(pybind11::none()) : pybind11::str(isa.active);
  info["cpu_isa_error"] = isa.error.empty() ? pybind11::object(pybind11::none()) : pybind11::str(isa.error);
  info["cpu_has_avx512"] = isa.cpu_has_avx512;
  info["winograd_panel_columns"] = isa.winograd_panel_columns;
#ifdef _OPENMP
  info["cpu_parallel"] = std::string("openmp");  // at::parallel_for uses torch's OpenMP threads
#else
  info["cpu_parallel"] = std::string("none");  // at::parallel_for runs every kernel on one thread
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resnet_fast compiled kernels: bn_act_forward, batch_stats, bn_act_train_forward, bn_act_backward "
          "(torch.ops.resnet_fast)";
  m.def("build_info", &build_info,
        "How the extension was built and which CPU kernels run: {'cpu': bool, 'cuda': bool, 'cuda_archs': str, "
        "'cpu_isa': str, 'cpu_isa_variants': [str], 'cpu_isa_requested': str, 'cpu_isa_active': str | None, "
        "'cpu_isa_error': str | None, 'cpu_has_avx512': bool, 'winograd_panel_columns': int, 'cpu_parallel': str}");
  resnet_fast::bind_activation_pool(m);
}
