// The register-blocked matrix-product kernel of the CPU Winograd convolution (winograd_cpu.cpp):
// kPanelRows rows x 2 vectors of float32 output per call, the panel layout its packed weights follow.
// AVX2: 6 rows x 16 columns; AVX-512: 8 rows x 32 columns. Per ISA variant (cpu_isa.h): everything
// here is in resnet_fast::RESNET_FAST_ISA.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "cpu_isa.h"

namespace resnet_fast {
namespace RESNET_FAST_ISA {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kPanelColumns = 2 * Vec::size();  // output channels per weight panel
#if defined(CPU_CAPABILITY_AVX512)
// Rows per call: 8 x 2 accumulators + 2 weight vectors + 1 broadcast = 19 of AVX-512's 32 registers;
// 16 independent FMA chains cover two 512-bit FMA units' latency. 12 rows (27 registers) were no
// faster on Zen 4, whose AVX-512 FMAs are double-pumped 256-bit ones (benchmarks/NOTES.md), and
// pad partial chunks more.
constexpr int64_t kPanelRows = 8;
#else
// Rows per call: 6 x 2 accumulators + 2 weight vectors + 1 broadcast = 15 of AVX2's 16 registers.
constexpr int64_t kPanelRows = 6;
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// c[r][0:kPanelColumns] = sum_d a[r * lda + d] * panel[d][0:kPanelColumns] for kPanelRows rows of `a`
// and one weight panel of depth x kPanelColumns contiguous floats; c rows are ldc floats apart.
//
// The accumulators are locals indexed only by unrolled constants, so they stay in registers
// (indexing them at run time spills them to the stack), and the rows are addressed as one base
// plus multiples of lda rather than through an array of row pointers: in a one-core harness on
// L1-resident data ~92 GFLOP/s of the core's ~96, against ~73 with the pointer array
// (benchmarks/NOTES.md, CPU kernels 14).
inline void micro_kernel(const float* a, int64_t lda, const float* panel, int64_t depth, float* c, int64_t ldc) {
  Vec acc[kPanelRows][2];
#pragma GCC unroll 16
  for (int r = 0; r < kPanelRows; ++r) {
    acc[r][0] = Vec(0.f);
    acc[r][1] = Vec(0.f);
  }
  for (int64_t d = 0; d < depth; ++d) {
    const Vec b0 = Vec::loadu(panel + d * kPanelColumns);
    const Vec b1 = Vec::loadu(panel + d * kPanelColumns + Vec::size());
#pragma GCC unroll 16
    for (int r = 0; r < kPanelRows; ++r) {
      const Vec value(a[r * lda + d]);
      acc[r][0] = at::vec::fmadd(value, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(value, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kPanelRows; ++r) {
    acc[r][0].store(c + r * ldc);
    acc[r][1].store(c + r * ldc + Vec::size());
  }
}

inline Vec load_partial(const float* p, int64_t count) {
  return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count);
}

inline void store_partial(float* p, const Vec& v, int64_t count) {
  if (count == Vec::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

}  // namespace RESNET_FAST_ISA
}  // namespace resnet_fast
