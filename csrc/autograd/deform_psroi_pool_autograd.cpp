// Autograd kernel of deform_psroi_pool; gradients flow to input and trans (not to rois). The
// sample count returned next to the output is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"

namespace dcn_inspect {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class DeformPSRoIPoolFunction : public torch::autograd::Function<DeformPSRoIPoolFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& input,
      const Variable& rois,
      const Variable& trans,
      double spatial_scale,
      int64_t output_dim,
      int64_t group_size,
      int64_t pooled_size,
      int64_t part_size,
      int64_t sample_per_part,
      double trans_std) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto result = deform_psroi_pool(
        input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
        trans_std);
    const at::Tensor& output = std::get<0>(result);
    const at::Tensor& count = std::get<1>(result);
    ctx->save_for_backward({input, rois, trans, count});
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["output_dim"] = output_dim;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["pooled_size"] = pooled_size;
    ctx->saved_data["part_size"] = part_size;
    ctx->saved_data["sample_per_part"] = sample_per_part;
    ctx->saved_data["trans_std"] = trans_std;
    ctx->mark_non_differentiable({count});
    return {output, count};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_output) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& trans = saved[2];
    auto grads = _deform_psroi_pool_backward(
        grad_output[0], saved[0], saved[1], trans, saved[3], ctx->saved_data["spatial_scale"].toDouble(),
        ctx->saved_data["output_dim"].toInt(), ctx->saved_data["group_size"].toInt(),
        ctx->saved_data["pooled_size"].toInt(), ctx->saved_data["part_size"].toInt(),
        ctx->saved_data["sample_per_part"].toInt(), ctx->saved_data["trans_std"].toDouble());
    return {
        std::get<0>(grads),
        Variable(),
        trans.numel() > 0 ? std::get<1>(grads) : Variable(),
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

class DeformPSRoIPoolBackwardFunction : public torch::autograd::Function<DeformPSRoIPoolBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext*,
      const Variable& grad,
      const Variable& input,
      const Variable& rois,
      const Variable& trans,
      const Variable& count,
      double spatial_scale,
      int64_t output_dim,
      int64_t group_size,
      int64_t pooled_size,
      int64_t part_size,
      int64_t sample_per_part,
      double trans_std) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = _deform_psroi_pool_backward(
        grad, input, rois, trans, count, spatial_scale, output_dim, group_size, pooled_size, part_size,
        sample_per_part, trans_std);
    return {std::get<0>(grads), std::get<1>(grads)};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "dcn_inspect: double backward of deform_psroi_pool is not supported");
  }
};

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_autograd(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& trans,
    double spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    double trans_std) {
  auto result = DeformPSRoIPoolFunction::apply(
      input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
      trans_std);
  return {result[0], result[1]};
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_backward_autograd(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& trans,
    const at::Tensor& count,
    double spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    double trans_std) {
  auto result = DeformPSRoIPoolBackwardFunction::apply(
      grad, input, rois, trans, count, spatial_scale, output_dim, group_size, pooled_size, part_size,
      sample_per_part, trans_std);
  return {result[0], result[1]};
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, Autograd, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_psroi_pool"), TORCH_FN(deform_psroi_pool_autograd));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_psroi_pool_backward"),
      TORCH_FN(deform_psroi_pool_backward_autograd));
}

} // namespace ops
} // namespace dcn_inspect
