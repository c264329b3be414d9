// Autograd kernel of deform_conv2d: saves the operands, calls the device kernels below the
// autograd key, and routes the backward through dcn_inspect::_deform_conv2d_backward.
// Double backward is not supported (the backward op refuses to be differentiated).
#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"

namespace dcn_inspect {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class DeformConv2dFunction : public torch::autograd::Function<DeformConv2dFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& weight,
      const Variable& offset,
      const Variable& mask,
      const Variable& bias,
      int64_t stride_h,
      int64_t stride_w,
      int64_t pad_h,
      int64_t pad_w,
      int64_t dilation_h,
      int64_t dilation_w,
      int64_t groups,
      int64_t offset_groups,
      bool use_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = deform_conv2d(
        input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, groups, offset_groups, use_mask);
    ctx->save_for_backward({input, weight, offset, mask, bias});
    ctx->saved_data["stride_h"] = stride_h;
    ctx->saved_data["stride_w"] = stride_w;
    ctx->saved_data["pad_h"] = pad_h;
    ctx->saved_data["pad_w"] = pad_w;
    ctx->saved_data["dilation_h"] = dilation_h;
    ctx->saved_data["dilation_w"] = dilation_w;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["offset_groups"] = offset_groups;
    ctx->saved_data["use_mask"] = use_mask;
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& offset = saved[2];
    const at::Tensor& mask = saved[3];
    const at::Tensor& bias = saved[4];
    const bool use_mask = ctx->saved_data["use_mask"].toBool();
    auto grads = _deform_conv2d_backward(
        grad_output[0], input, weight, offset, mask, bias, ctx->saved_data["stride_h"].toInt(),
        ctx->saved_data["stride_w"].toInt(), ctx->saved_data["pad_h"].toInt(),
        ctx->saved_data["pad_w"].toInt(), ctx->saved_data["dilation_h"].toInt(),
        ctx->saved_data["dilation_w"].toInt(), ctx->saved_data["groups"].toInt(),
        ctx->saved_data["offset_groups"].toInt(), use_mask);
    return {
        std::get<0>(grads),
        std::get<1>(grads),
        std::get<2>(grads),
        use_mask ? std::get<3>(grads) : Variable(),
        bias.numel() > 0 ? std::get<4>(grads) : Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
        Variable(),
    };
  }
};

// The backward op itself: computable, but not differentiable again.
class DeformConv2dBackwardFunction : public torch::autograd::Function<DeformConv2dBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& grad,
      const Variable& input,
      const Variable& weight,
      const Variable& offset,
      const Variable& mask,
      const Variable& bias,
      int64_t stride_h,
      int64_t stride_w,
      int64_t pad_h,
      int64_t pad_w,
      int64_t dilation_h,
      int64_t dilation_w,
      int64_t groups,
      int64_t offset_groups,
      bool use_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = _deform_conv2d_backward(
        grad, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, groups, offset_groups, use_mask);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads), std::get<4>(grads)};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "dcn_inspect: double backward of deform_conv2d is not supported");
  }
};

at::Tensor deform_conv2d_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  return DeformConv2dFunction::apply(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      groups, offset_groups, use_mask)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_conv2d_backward_autograd(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  auto result = DeformConv2dBackwardFunction::apply(
      grad, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_groups, use_mask);
  return {result[0], result[1], result[2], result[3], result[4]};
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, Autograd, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_conv2d"), TORCH_FN(deform_conv2d_autograd));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_conv2d_backward"),
      TORCH_FN(deform_conv2d_backward_autograd));
}

} // namespace ops
} // namespace dcn_inspect
