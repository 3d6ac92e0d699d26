// CUDA registrations of the resnet_fast ops: checks, allocation, stream, launches.
// The kernels are in bn_act_kernels.cu (no torch headers there; see bn_act_launchers.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/bn_act_launchers.h"

namespace resnet_fast {
namespace {

using at::Tensor;

cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_type_of(const Tensor& y) { return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// NCHW when contiguous (also when both layouts coincide), channels_last when that is contiguous, else an NCHW copy.
bool is_channels_last(const Tensor& y) { return !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast); }

at::MemoryFormat memory_format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_activation(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d (N, C, H, W), got ", t.dim(), "-d of shape ", t.sizes());
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_like_y(const char* op, const char* name, const Tensor& t, const Tensor& y) {
  TORCH_CHECK(t.sizes() == y.sizes(), op, ": ", name, " shape ", t.sizes(), " does not match y shape ", y.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  TORCH_CHECK(t.device() == y.device(), op, ": ", name, " is on ", t.device(), " but y is on ", y.device());
}

Tensor per_channel(const char* op, const char* name, const Tensor& t, const Tensor& y) {
  const int64_t channels = y.size(1);
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, op, ": ", name, " must be a vector with one value per channel (",
              channels, "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == y.device(), op, ": ", name, " is on ", t.device(), " but y is on ", y.device());
  return t.to(acc_type_of(y)).contiguous();
}

cuda::ActivationShape shape_of(const Tensor& y, bool channels_last) {
  return cuda::ActivationShape{y.size(0), y.size(1), y.size(2) * y.size(3), channels_last};
}

/// out = act(y * scale[c] + shift[c] + residual); see bn_act_cpu.cpp for the PyTorch equivalent.
Tensor bn_act_forward_cuda(const Tensor& y_in, const std::optional<Tensor>& scale_in, const Tensor& shift_in,
                           const std::optional<Tensor>& residual_in, bool relu) {
  constexpr const char* op = "bn_act_forward";
  check_activation(op, "y", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const bool channels_last = is_channels_last(y_in);
  const Tensor y = y_in.contiguous(memory_format_of(channels_last));
  const Tensor shift = per_channel(op, "shift", shift_in, y);
  Tensor scale, residual;
  if (scale_in.has_value()) scale = per_channel(op, "scale", *scale_in, y);
  if (residual_in.has_value()) {
    check_like_y(op, "residual", *residual_in, y);
    residual = residual_in->contiguous(memory_format_of(channels_last));
  }
  Tensor out = at::empty_like(y, y.options(), memory_format_of(channels_last));
  if (y.numel() == 0) return out;
  cuda::launch_bn_act_forward(dtype_of(y), y.const_data_ptr(), scale.defined() ? scale.const_data_ptr() : nullptr,
                              shift.const_data_ptr(), residual.defined() ? residual.const_data_ptr() : nullptr,
                              out.mutable_data_ptr(), shape_of(y, channels_last), relu,
                              at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

/// var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), unbiased=False), Welford + Chan merge.
std::tuple<Tensor, Tensor> batch_stats_cuda(const Tensor& y_in) {
  constexpr const char* op = "batch_stats";
  check_activation(op, "y", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const bool channels_last = is_channels_last(y_in);
  const Tensor y = y_in.contiguous(memory_format_of(channels_last));
  TORCH_CHECK(y.size(0) * y.size(2) * y.size(3) > 0, op, ": y has no elements per channel (shape ", y.sizes(),
              "); batch statistics need at least one");
  const auto shape = shape_of(y, channels_last);
  const auto dtype = dtype_of(y);
  const auto acc_options = y.options().dtype(acc_type_of(y));
  Tensor mean = at::empty({y.size(1)}, acc_options);
  Tensor var = at::empty({y.size(1)}, acc_options);
  Tensor workspace = at::empty({static_cast<int64_t>(cuda::batch_stats_workspace_bytes(dtype, shape))},
                               y.options().dtype(at::kByte));
  const auto stream = at::cuda::getCurrentCUDAStream();
  cuda::launch_batch_stats_partials(dtype, y.const_data_ptr(), workspace.mutable_data_ptr(), shape, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::launch_batch_stats_finalize(dtype, workspace.const_data_ptr(), mean.mutable_data_ptr(),
                                    var.mutable_data_ptr(), shape, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

/// Batch statistics, then act(batch_norm(y) + residual); see bn_act_cpu.cpp for the PyTorch equivalent.
/// Composed of the two kernels above with the per-channel affine computed by ATen (C elements).
std::tuple<Tensor, Tensor, Tensor> bn_act_train_forward_cuda(const Tensor& y, const std::optional<Tensor>& weight_in,
                                                             const std::optional<Tensor>& bias_in,
                                                             const std::optional<Tensor>& residual, double eps,
                                                             bool relu) {
  constexpr const char* op = "bn_act_train_forward";
  check_activation(op, "y", y);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const c10::cuda::CUDAGuard guard(y.device());
  Tensor weight, bias;
  if (weight_in.has_value()) weight = per_channel(op, "weight", *weight_in, y);
  if (bias_in.has_value()) bias = per_channel(op, "bias", *bias_in, y);
  auto [mean, var] = batch_stats_cuda(y);
  // Same formula as bn_train_affine in bn_act.h: scale = weight / sqrt(var + eps), shift = bias - mean * scale.
  Tensor scale = at::sqrt(var + eps).reciprocal_();
  if (weight.defined()) scale.mul_(weight);
  Tensor shift = -mean * scale;
  if (bias.defined()) shift.add_(bias);
  return {bn_act_forward_cuda(y, scale, shift, residual, relu), mean, var};
}

/// Fused backward of BN (batch statistics) + residual + ReLU; see bn_act_cpu.cpp for the PyTorch equivalent.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward_cuda(const Tensor& grad_out_in, const Tensor& out_in,
                                                                const Tensor& y_in, const Tensor& mean_in,
                                                                const Tensor& invstd_in,
                                                                const std::optional<Tensor>& weight_in, bool relu,
                                                                bool residual_grad) {
  constexpr const char* op = "bn_act_backward";
  check_activation(op, "y", y_in);
  check_like_y(op, "grad_out", grad_out_in, y_in);
  check_like_y(op, "out", out_in, y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const bool channels_last = is_channels_last(y_in);
  const auto format = memory_format_of(channels_last);
  const Tensor y = y_in.contiguous(format);
  const Tensor grad_out = grad_out_in.contiguous(format);
  const Tensor out = out_in.contiguous(format);
  const Tensor mean = per_channel(op, "mean", mean_in, y);
  const Tensor invstd = per_channel(op, "invstd", invstd_in, y);
  Tensor weight;
  if (weight_in.has_value()) weight = per_channel(op, "weight", *weight_in, y);

  const auto shape = shape_of(y, channels_last);
  const auto dtype = dtype_of(y);
  const auto acc_options = y.options().dtype(acc_type_of(y));
  Tensor grad_y = at::empty_like(y, y.options(), format);
  Tensor grad_weight = at::empty({y.size(1)}, acc_options);
  Tensor grad_bias = at::empty({y.size(1)}, acc_options);
  Tensor grad_residual = residual_grad ? at::empty_like(y, y.options(), format) : y.new_empty({0});
  if (shape.batch * shape.spatial == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_y, grad_weight, grad_bias, grad_residual};
  }
  Tensor workspace = at::empty({static_cast<int64_t>(cuda::bn_act_backward_workspace_bytes(dtype, shape))},
                               y.options().dtype(at::kByte));
  const auto stream = at::cuda::getCurrentCUDAStream();
  void* grad_residual_ptr = residual_grad ? grad_residual.mutable_data_ptr() : nullptr;
  cuda::launch_bn_act_backward_partials(dtype, grad_out.const_data_ptr(), out.const_data_ptr(), y.const_data_ptr(),
                                        mean.const_data_ptr(), grad_residual_ptr, workspace.mutable_data_ptr(), shape,
                                        relu, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::launch_bn_act_backward_finalize(dtype, workspace.mutable_data_ptr(), invstd.const_data_ptr(),
                                        weight.defined() ? weight.const_data_ptr() : nullptr,
                                        grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(), shape, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::launch_bn_act_backward_grad_y(dtype, grad_out.const_data_ptr(), out.const_data_ptr(), grad_residual_ptr,
                                      y.const_data_ptr(), mean.const_data_ptr(), workspace.const_data_ptr(),
                                      grad_y.mutable_data_ptr(), shape, relu, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward_cuda);
  m.impl("batch_stats", &batch_stats_cuda);
  m.impl("bn_act_train_forward", &bn_act_train_forward_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
}

}  // namespace resnet_fast
