// Autograd kernel of deform_roi_pool; gradients flow to input and offset (not to rois).
#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"

namespace dcn_inspect {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class DeformRoIPoolFunction : public torch::autograd::Function<DeformRoIPoolFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& rois,
      const Variable& offset,
      int64_t pooled_height,
      int64_t pooled_width,
      double spatial_scale,
      int64_t sampling_ratio,
      double gamma) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output =
        deform_roi_pool(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
    ctx->save_for_backward({input, rois, offset});
    ctx->saved_data["pooled_height"] = pooled_height;
    ctx->saved_data["pooled_width"] = pooled_width;
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["sampling_ratio"] = sampling_ratio;
    ctx->saved_data["gamma"] = gamma;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& offset = saved[2];
    auto grads = _deform_roi_pool_backward(
        grad_output[0], saved[0], saved[1], offset, ctx->saved_data["pooled_height"].toInt(),
        ctx->saved_data["pooled_width"].toInt(), ctx->saved_data["spatial_scale"].toDouble(),
        ctx->saved_data["sampling_ratio"].toInt(), ctx->saved_data["gamma"].toDouble());
    return {
        std::get<0>(grads),
        Variable(),
        offset.numel() > 0 ? std::get<1>(grads) : Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
    };
  }
};

class DeformRoIPoolBackwardFunction : public torch::autograd::Function<DeformRoIPoolBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext*,
      const Variable& grad,
      const Variable& input,
      const Variable& rois,
      const Variable& offset,
      int64_t pooled_height,
      int64_t pooled_width,
      double spatial_scale,
      int64_t sampling_ratio,
      double gamma) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = _deform_roi_pool_backward(
        grad, input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
    return {std::get<0>(grads), std::get<1>(grads)};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "dcn_inspect: double backward of deform_roi_pool is not supported");
  }
};

at::Tensor deform_roi_pool_autograd(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  return DeformRoIPoolFunction::apply(
      input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma)[0];
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_autograd(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  auto result = DeformRoIPoolBackwardFunction::apply(
      grad, input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  return {result[0], result[1]};
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, Autograd, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_roi_pool"), TORCH_FN(deform_roi_pool_autograd));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_roi_pool_backward"),
      TORCH_FN(deform_roi_pool_backward_autograd));
}

} // namespace ops
} // namespace dcn_inspect
