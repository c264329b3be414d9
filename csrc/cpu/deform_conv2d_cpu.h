// The CPU implementations of deformable convolution and the rule that picks one per call.
//
// Two layouts of the sampled columns, and for one of them two GEMM engines:
//   planar          columns [C*K, images*L] gathered from NCHW planes with hardware gathers
//                   (deform_conv2d_kernel.cpp); GEMM at::mm (BLAS: MKL in the x86 wheels).
//   channels-last   columns [images*L, K*C]: each sample reads the C-vectors of its four
//                   corners from an NHWC copy of the input, contiguous loads instead of
//                   gathers, and the backward scatters whole channel vectors
//                   (deform_conv2d_channels_last.cpp). GEMM by either
//     blas          at::mm per image and group (MKL); the backward's calls single-threaded in
//                   one parallel region by parts of output positions, fused with the scatter, or
//     onednn        at::convolution / at::convolution_backward of a 1x1 convolution over the
//                   columns seen as an NHWC image [images, K*C, Ho, Wo] (oneDNN).
// deform_conv2d_cpu.cpp picks one per call (its comment holds the rule and the measurements
// behind it); DCN_INSPECT_CONV_PATH=planar|cl-blas|cl-onednn forces one (the tests run every
// path through it), =tune measures the two channels-last engines on the first calls.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../checks.h"

namespace dcn_inspect {
namespace ops {

// Arguments already checked (check_deform_conv2d_args, CPU tensors); any strides.
at::Tensor deform_conv2d_forward_planar(
    const DeformConvGeometry& g,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_planar(
    const DeformConvGeometry& g,
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias);

at::Tensor deform_conv2d_forward_channels_last(
    const DeformConvGeometry& g,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    bool onednn);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_channels_last(
    const DeformConvGeometry& g,
    const at::Tensor& grad,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const at::Tensor& mask,
    const at::Tensor& bias,
    bool onednn);

} // namespace ops
} // namespace dcn_inspect
