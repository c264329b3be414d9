// Schema registration of the dcn_inspect deformable ops and their dispatcher entry points.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dcn_inspect {
namespace ops {

at::Tensor deform_conv2d(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcn_inspect::deform_conv2d", "")
                       .typed<decltype(deform_conv2d)>();
  return op.call(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
      dilation_h, dilation_w, groups, offset_groups, use_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_deform_conv2d_backward(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcn_inspect::_deform_conv2d_backward", "")
                       .typed<decltype(_deform_conv2d_backward)>();
  return op.call(
      grad, input, weight, offset, mask, bias, stride_h, stride_w, pad_h,
      pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask);
}

at::Tensor deform_roi_pool(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcn_inspect::deform_roi_pool", "")
                       .typed<decltype(deform_roi_pool)>();
  return op.call(
      input, rois, offset, pooled_height, pooled_width, spatial_scale,
      sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> _deform_roi_pool_backward(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcn_inspect::_deform_roi_pool_backward", "")
                       .typed<decltype(_deform_roi_pool_backward)>();
  return op.call(
      grad, input, rois, offset, pooled_height, pooled_width, spatial_scale,
      sampling_ratio, gamma);
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcn_inspect::deform_psroi_pool", "")
                       .typed<decltype(deform_psroi_pool)>();
  return op.call(
      input, rois, trans, spatial_scale, output_dim, group_size, pooled_size,
      part_size, sample_per_part, trans_std);
}

std::tuple<at::Tensor, at::Tensor> _deform_psroi_pool_backward(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcn_inspect::_deform_psroi_pool_backward", "")
                       .typed<decltype(_deform_psroi_pool_backward)>();
  return op.call(
      grad, input, rois, trans, count, spatial_scale, output_dim, group_size,
      pooled_size, part_size, sample_per_part, trans_std);
}

} // namespace ops
} // namespace dcn_inspect

TORCH_LIBRARY(dcn_inspect, m) {
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int groups, int offset_groups, bool use_mask) -> Tensor");
  m.def(
      "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
      "Tensor mask, Tensor bias, int stride_h, int stride_w, int pad_h, int pad_w, "
      "int dilation_h, int dilation_w, int groups, int offset_groups, bool use_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "deform_roi_pool(Tensor input, Tensor rois, Tensor offset, int pooled_height, "
      "int pooled_width, float spatial_scale, int sampling_ratio, float gamma) -> Tensor");
  m.def(
      "_deform_roi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor offset, "
      "int pooled_height, int pooled_width, float spatial_scale, int sampling_ratio, "
      "float gamma) -> (Tensor, Tensor)");
  m.def(
      "deform_psroi_pool(Tensor input, Tensor rois, Tensor trans, float spatial_scale, "
      "int output_dim, int group_size, int pooled_size, int part_size, int sample_per_part, "
      "float trans_std) -> (Tensor, Tensor)");
  m.def(
      "_deform_psroi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor trans, "
      "Tensor count, float spatial_scale, int output_dim, int group_size, int pooled_size, "
      "int part_size, int sample_per_part, float trans_std) -> (Tensor, Tensor)");
}
