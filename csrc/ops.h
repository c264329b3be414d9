// Dispatcher entry points of the dcn_inspect deformable ops.
//
// The schemas are registered once in ops.cpp (TORCH_LIBRARY(dcn_inspect, m)); the compute
// kernels live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL(dcn_inspect, CPU|CUDA, m)) and the
// autograd wrappers in autograd/ (TORCH_LIBRARY_IMPL(dcn_inspect, Autograd, m)). These
// functions call through the dispatcher, so the autograd kernels can redispatch to the
// device kernels below them. Absent optional tensors (mask, bias, offset, trans) are
// passed as empty tensors (numel() == 0).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

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
    bool use_mask);

// Returns (grad_input, grad_weight, grad_offset, grad_mask, grad_bias).
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
    bool use_mask);

at::Tensor deform_roi_pool(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma);

// Returns (grad_input, grad_offset).
std::tuple<at::Tensor, at::Tensor> _deform_roi_pool_backward(
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma);

// Returns (output, count): count is the number of samples averaged per output element.
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
    double trans_std);

// Returns (grad_input, grad_trans).
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
    double trans_std);

} // namespace ops
} // namespace dcn_inspect
