// Per-element and per-channel math of the fused BatchNorm + residual + ReLU unit.
//
// Shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda), so the
// CPU tests exercise the exact formulas the GPU runs. No torch headers here:
// the .cu file that includes this must stay cheap to compile.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RESNET_FAST_HOST_DEVICE __host__ __device__
#else
#define RESNET_FAST_HOST_DEVICE
#endif

namespace resnet_fast {

// The two lane-wise selects of the math below; everything else is plain arithmetic. Scalar
// rules here; the CPU kernels specialise LaneSelect for at::vec::Vectorized, so the same
// formulas run on whole vectors there and on single elements on the GPU.
template <typename V>
struct LaneSelect {
  // torch.relu, NaN propagating (NaN < 0 is false, so NaN passes through).
  RESNET_FAST_HOST_DEVICE static V relu_keep_nan(V v) { return v < V(0) ? V(0) : v; }
  // torch's threshold_backward at 0: the grad where out > 0 or out is NaN, else 0 (out <= 0 -> 0).
  RESNET_FAST_HOST_DEVICE static V grad_where_positive(V grad, V out) { return out <= V(0) ? V(0) : grad; }
};

// Forward element: torch.relu(y * scale[c] + shift[c] + residual) (relu optional).
template <bool kRelu, typename acc_t>
RESNET_FAST_HOST_DEVICE inline acc_t bn_act_apply(acc_t y, acc_t scale, acc_t shift, acc_t residual) {
  const acc_t v = y * scale + shift + residual;
  return kRelu ? LaneSelect<acc_t>::relu_keep_nan(v) : v;
}

// Gradient reaching the pre-activation: grad_out * (out > 0) for ReLU, grad_out otherwise.
template <bool kRelu, typename acc_t>
RESNET_FAST_HOST_DEVICE inline acc_t bn_act_masked_grad(acc_t grad_out, acc_t out) {
  return kRelu ? LaneSelect<acc_t>::grad_where_positive(grad_out, out) : grad_out;
}

// Running (count, mean, M2) of Welford's algorithm; merged with Chan et al.'s formula.
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;     // sum of squared deviations from mean
  acc_t count;  // acc_t, not int: merges divide by it, and GPU partials stay in registers
};

template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline WelfordState<acc_t> welford_init() {
  return WelfordState<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline void welford_update(WelfordState<acc_t>& s, acc_t x) {
  s.count += acc_t(1);
  const acc_t delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
}

template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline WelfordState<acc_t> welford_merge(const WelfordState<acc_t>& a,
                                                                  const WelfordState<acc_t>& b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_fraction = b.count / count;
  WelfordState<acc_t> out;
  out.mean = a.mean + delta * b_fraction;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * b_fraction;
  out.count = count;
  return out;
}

// (count, sum(x - pivot), sum((x - pivot)^2)) -> Welford state. The CPU kernel
// accumulates shifted sums in float64 (pivot = one sample of the channel), which
// keeps E[x^2] - E[x]^2 free of cancellation unless |mean - pivot| >> std * 1e6.
template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline WelfordState<acc_t> welford_from_shifted_sums(double count, double pivot,
                                                                             double sum, double sum_sq) {
  WelfordState<acc_t> s = welford_init<acc_t>();
  if (count <= 0) return s;
  const double shifted_mean = sum / count;
  double m2 = sum_sq - shifted_mean * sum;
  s.mean = acc_t(pivot + shifted_mean);
  s.m2 = acc_t(m2 > 0 ? m2 : 0);  // rounding can make a constant channel's M2 slightly negative
  s.count = acc_t(count);
  return s;
}

// Biased variance (what BatchNorm normalises with): M2 / count.
template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline acc_t welford_biased_var(const WelfordState<acc_t>& s) {
  return s.count > acc_t(0) ? s.m2 / s.count : acc_t(0);
}

// BatchNorm with batch statistics as one multiply-add per element, y * scale + shift:
//   scale = weight / sqrt(var + eps), shift = bias - mean * scale.
template <typename acc_t>
struct BnAffine {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline BnAffine<acc_t> bn_train_affine(acc_t mean, acc_t var, acc_t weight, acc_t bias,
                                                               acc_t eps) {
  const acc_t scale = weight / std::sqrt(var + eps);
  return BnAffine<acc_t>{scale, bias - mean * scale};
}

// Per-channel coefficients of the BatchNorm backward with batch statistics.
//
// With g = masked grad, xhat = (y - mean) * invstd, M = N*H*W, k = weight * invstd:
//   grad_bias   = sum g
//   grad_weight = sum g * xhat = invstd * sum g * (y - mean)
//   grad_y      = k * (g - grad_bias / M - xhat * grad_weight / M)
//               = k * g + centered_coef * (y - mean) + constant_coef
// Keeping (y - mean) rather than y avoids cancellation when |mean| >> std.
template <typename acc_t>
struct BnBackwardCoefs {
  acc_t grad_coef;      // k
  acc_t centered_coef;  // -k * invstd * grad_weight / M
  acc_t constant_coef;  // -k * grad_bias / M
};

template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline BnBackwardCoefs<acc_t> bn_backward_coefs(acc_t weight, acc_t invstd,
                                                                        acc_t grad_weight, acc_t grad_bias,
                                                                        acc_t count) {
  const acc_t k = weight * invstd;
  const acc_t inv_count = count > acc_t(0) ? acc_t(1) / count : acc_t(0);
  BnBackwardCoefs<acc_t> c;
  c.grad_coef = k;
  c.centered_coef = -k * invstd * grad_weight * inv_count;
  c.constant_coef = -k * grad_bias * inv_count;
  return c;
}

// Backward element: grad_y from the masked grad g and the centred input y - mean.
template <typename acc_t>
RESNET_FAST_HOST_DEVICE inline acc_t bn_backward_apply(const BnBackwardCoefs<acc_t>& c, acc_t g,
                                                       acc_t y_centered) {
  return c.grad_coef * g + c.centered_coef * y_centered + c.constant_coef;
}

}  // namespace resnet_fast
