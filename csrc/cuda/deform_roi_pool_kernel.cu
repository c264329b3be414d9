// CUDA deformable RoI pooling (mmcv deform_roi_pool semantics): forward and backward.
//
// Semantics are those of dcn_inspect/ops/reference.py: RoI corners map to the feature map as
// coord * spatial_scale - 0.5; bin (i, j) starts at start + (i, j) * bin size and shifts by
// gamma * offset * (RoI width, height) (offset [R, 2, ph, pw], channel 0 = x); each bin averages
// a grid of grid_h x grid_w samples (sampling_ratio, or ceil(roi_size / pooled) when 0) with
// count = max(grid_h * grid_w, 1); sampling is RoIAlign-style bilinear (zero outside
// [-1, H] x [-1, W], coordinates clamped into the map). Gradients are those autograd gives for
// the reference (the clamp branches pass no gradient to the coordinates).
#include "../checks.h"
#include "cuda_helpers.cuh"

#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace dcn_inspect {
namespace cuda {
namespace {

template <typename acc_t>
struct RoiAlignSample {
  bool valid;
  int64_t y0, x0, y1, x1;
  acc_t ly, lx, hy, hx;
  acc_t dy_pass, dx_pass; // 1 where the clamped coordinate still follows the sample position
};

template <typename acc_t>
__device__ __forceinline__ RoiAlignSample<acc_t> roi_align_sample(
    acc_t y, acc_t x, int64_t height, int64_t width) {
  RoiAlignSample<acc_t> s;
  s.valid = !(y < acc_t(-1) || y > static_cast<acc_t>(height) || x < acc_t(-1) ||
              x > static_cast<acc_t>(width));
  if (!s.valid) {
    return s;
  }
  acc_t yc = y < acc_t(0) ? acc_t(0) : y;
  acc_t xc = x < acc_t(0) ? acc_t(0) : x;
  s.dy_pass = y >= acc_t(0) ? acc_t(1) : acc_t(0);
  s.dx_pass = x >= acc_t(0) ? acc_t(1) : acc_t(0);
  int64_t y0 = static_cast<int64_t>(dcn_floor(yc));
  int64_t x0 = static_cast<int64_t>(dcn_floor(xc));
  if (y0 >= height - 1) {
    y0 = height - 1;
    yc = static_cast<acc_t>(y0);
    s.dy_pass = acc_t(0);
  }
  if (x0 >= width - 1) {
    x0 = width - 1;
    xc = static_cast<acc_t>(x0);
    s.dx_pass = acc_t(0);
  }
  s.y0 = y0;
  s.x0 = x0;
  s.y1 = y0 + 1 < height ? y0 + 1 : height - 1;
  s.x1 = x0 + 1 < width ? x0 + 1 : width - 1;
  s.ly = yc - static_cast<acc_t>(y0);
  s.lx = xc - static_cast<acc_t>(x0);
  s.hy = acc_t(1) - s.ly;
  s.hx = acc_t(1) - s.lx;
  return s;
}

// Per-RoI geometry, computed identically by the forward and backward kernels.
template <typename scalar_t, typename acc_t>
struct RoiGeometry {
  int64_t batch_index;
  acc_t start_x, start_y, roi_w, roi_h, bin_w, bin_h;
  int64_t grid_h, grid_w;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RoiGeometry<scalar_t, acc_t> roi_geometry(
    const scalar_t* roi, acc_t spatial_scale, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio) {
  RoiGeometry<scalar_t, acc_t> r;
  r.batch_index = static_cast<int64_t>(static_cast<acc_t>(roi[0]));
  r.start_x = dcn_mul_rn(static_cast<acc_t>(roi[1]), spatial_scale) - acc_t(0.5);
  r.start_y = dcn_mul_rn(static_cast<acc_t>(roi[2]), spatial_scale) - acc_t(0.5);
  r.roi_w = (dcn_mul_rn(static_cast<acc_t>(roi[3]), spatial_scale) - acc_t(0.5)) - r.start_x;
  r.roi_h = (dcn_mul_rn(static_cast<acc_t>(roi[4]), spatial_scale) - acc_t(0.5)) - r.start_y;
  r.bin_w = r.roi_w / static_cast<acc_t>(pooled_w);
  r.bin_h = r.roi_h / static_cast<acc_t>(pooled_h);
  r.grid_h = sampling_ratio > 0
      ? sampling_ratio
      : static_cast<int64_t>(::ceil(static_cast<double>(r.roi_h) / static_cast<double>(pooled_h)));
  r.grid_w = sampling_ratio > 0
      ? sampling_ratio
      : static_cast<int64_t>(::ceil(static_cast<double>(r.roi_w) / static_cast<double>(pooled_w)));
  return r;
}

// One thread per output element (r, c, ph, pw).
template <typename scalar_t>
__global__ void deform_roi_pool_forward_kernel(
    int64_t n,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ rois,
    const scalar_t* __restrict__ offset,
    bool has_offset,
    int64_t batch,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_h,
    int64_t pooled_w,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t sampling_ratio,
    at::opmath_type<scalar_t> gamma,
    scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  DCN_CUDA_KERNEL_LOOP(int64_t, index, n) {
    const int64_t pw = index % pooled_w;
    const int64_t ph = (index / pooled_w) % pooled_h;
    const int64_t c = (index / (pooled_w * pooled_h)) % channels;
    const int64_t r = index / (pooled_w * pooled_h * channels);
    const auto geo = roi_geometry<scalar_t, acc_t>(rois + r * 5, spatial_scale, pooled_h, pooled_w, sampling_ratio);
    if (geo.grid_h <= 0 || geo.grid_w <= 0 || geo.batch_index < 0 || geo.batch_index >= batch) {
      output[index] = static_cast<scalar_t>(0);
      continue;
    }
    acc_t bin_x = geo.start_x + static_cast<acc_t>(pw) * geo.bin_w;
    acc_t bin_y = geo.start_y + static_cast<acc_t>(ph) * geo.bin_h;
    if (has_offset) {
      const int64_t o = ((r * 2) * pooled_h + ph) * pooled_w + pw;
      bin_x += gamma * geo.roi_w * static_cast<acc_t>(offset[o]);
      bin_y += gamma * geo.roi_h * static_cast<acc_t>(offset[o + pooled_h * pooled_w]);
    }
    const scalar_t* plane = input + (geo.batch_index * channels + c) * height * width;
    acc_t sum = acc_t(0);
    for (int64_t iy = 0; iy < geo.grid_h; ++iy) {
      const acc_t y = bin_y + (static_cast<acc_t>(iy) + acc_t(0.5)) * geo.bin_h / static_cast<acc_t>(geo.grid_h);
      for (int64_t ix = 0; ix < geo.grid_w; ++ix) {
        const acc_t x = bin_x + (static_cast<acc_t>(ix) + acc_t(0.5)) * geo.bin_w / static_cast<acc_t>(geo.grid_w);
        const auto s = roi_align_sample<acc_t>(y, x, height, width);
        if (!s.valid) continue;
        sum += s.hy * s.hx * static_cast<acc_t>(plane[s.y0 * width + s.x0]) +
            s.hy * s.lx * static_cast<acc_t>(plane[s.y0 * width + s.x1]) +
            s.ly * s.hx * static_cast<acc_t>(plane[s.y1 * width + s.x0]) +
            s.ly * s.lx * static_cast<acc_t>(plane[s.y1 * width + s.x1]);
      }
    }
    const int64_t count = geo.grid_h * geo.grid_w > 1 ? geo.grid_h * geo.grid_w : 1;
    output[index] = static_cast<scalar_t>(sum / static_cast<acc_t>(count));
  }
}

// One thread per output element: scatters to grad_input (opmath buffer, atomicAdd) and writes
// its channel's contribution to the offset gradient, partial[r, c, 2, ph, pw]; the host sums
// the partials over channels (deterministic, no contention on the offset).
template <typename scalar_t>
__global__ void deform_roi_pool_backward_kernel(
    int64_t n,
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ rois,
    const scalar_t* __restrict__ offset,
    bool has_offset,
    int64_t batch,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_h,
    int64_t pooled_w,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t sampling_ratio,
    at::opmath_type<scalar_t> gamma,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    at::opmath_type<scalar_t>* __restrict__ offset_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  DCN_CUDA_KERNEL_LOOP(int64_t, index, n) {
    const int64_t pw = index % pooled_w;
    const int64_t ph = (index / pooled_w) % pooled_h;
    const int64_t c = (index / (pooled_w * pooled_h)) % channels;
    const int64_t r = index / (pooled_w * pooled_h * channels);
    const int64_t bins = pooled_h * pooled_w;
    acc_t* partial = has_offset ? offset_partial + ((r * channels + c) * 2) * bins + ph * pooled_w + pw : nullptr;
    const auto geo = roi_geometry<scalar_t, acc_t>(rois + r * 5, spatial_scale, pooled_h, pooled_w, sampling_ratio);
    if (geo.grid_h <= 0 || geo.grid_w <= 0 || geo.batch_index < 0 || geo.batch_index >= batch) {
      if (has_offset) {
        partial[0] = acc_t(0);
        partial[bins] = acc_t(0);
      }
      continue;
    }
    acc_t bin_x = geo.start_x + static_cast<acc_t>(pw) * geo.bin_w;
    acc_t bin_y = geo.start_y + static_cast<acc_t>(ph) * geo.bin_h;
    if (has_offset) {
      const int64_t o = ((r * 2) * pooled_h + ph) * pooled_w + pw;
      bin_x += gamma * geo.roi_w * static_cast<acc_t>(offset[o]);
      bin_y += gamma * geo.roi_h * static_cast<acc_t>(offset[o + bins]);
    }
    const int64_t count = geo.grid_h * geo.grid_w > 1 ? geo.grid_h * geo.grid_w : 1;
    const acc_t g = static_cast<acc_t>(grad_output[index]) / static_cast<acc_t>(count);
    const int64_t plane_offset = (geo.batch_index * channels + c) * height * width;
    const scalar_t* plane = input + plane_offset;
    acc_t* grad_plane = grad_input + plane_offset;
    acc_t grad_x = acc_t(0), grad_y = acc_t(0);
    for (int64_t iy = 0; iy < geo.grid_h; ++iy) {
      const acc_t y = bin_y + (static_cast<acc_t>(iy) + acc_t(0.5)) * geo.bin_h / static_cast<acc_t>(geo.grid_h);
      for (int64_t ix = 0; ix < geo.grid_w; ++ix) {
        const acc_t x = bin_x + (static_cast<acc_t>(ix) + acc_t(0.5)) * geo.bin_w / static_cast<acc_t>(geo.grid_w);
        const auto s = roi_align_sample<acc_t>(y, x, height, width);
        if (!s.valid) continue;
        const int64_t i00 = s.y0 * width + s.x0, i01 = s.y0 * width + s.x1;
        const int64_t i10 = s.y1 * width + s.x0, i11 = s.y1 * width + s.x1;
        if (g != acc_t(0)) {
          atomicAdd(grad_plane + i00, g * s.hy * s.hx);
          atomicAdd(grad_plane + i01, g * s.hy * s.lx);
          atomicAdd(grad_plane + i10, g * s.ly * s.hx);
          atomicAdd(grad_plane + i11, g * s.ly * s.lx);
        }
        if (has_offset) {
          const acc_t v00 = static_cast<acc_t>(plane[i00]), v01 = static_cast<acc_t>(plane[i01]);
          const acc_t v10 = static_cast<acc_t>(plane[i10]), v11 = static_cast<acc_t>(plane[i11]);
          grad_y += s.dy_pass * (s.hx * (v10 - v00) + s.lx * (v11 - v01));
          grad_x += s.dx_pass * (s.hy * (v01 - v00) + s.ly * (v11 - v10));
        }
      }
    }
    if (has_offset) {
      partial[0] = g * grad_x * gamma * geo.roi_w;
      partial[bins] = g * grad_y * gamma * geo.roi_h;
    }
  }
}

void check_roi_args(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_h,
    int64_t pooled_w,
    double spatial_scale,
    int64_t sampling_ratio) {
  TORCH_CHECK(input.is_cuda(), "dcn_inspect (CUDA): input must be a CUDA tensor");
  check_cuda_tensor(rois, input, "rois");
  if (offset.numel() > 0) {
    check_cuda_tensor(offset, input, "offset");
  }
  ops::check_deform_roi_pool_args(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio);
}

at::Tensor deform_roi_pool_forward_cuda(
    const at::Tensor& input_,
    const at::Tensor& rois_,
    const at::Tensor& offset_,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  check_roi_args(input_, rois_, offset_, pooled_height, pooled_width, spatial_scale, sampling_ratio);
  c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_offset = offset_.numel() > 0;
  const at::Tensor offset = has_offset ? offset_.contiguous() : offset_;
  const int64_t R = rois.size(0), C = input.size(1);
  at::Tensor output = at::empty({R, C, pooled_height, pooled_width}, input.options());
  const int64_t n = output.numel();
  if (n == 0) return output;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "dcn_inspect_deform_roi_pool_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        deform_roi_pool_forward_kernel<scalar_t><<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
            n, input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
            has_offset ? offset.const_data_ptr<scalar_t>() : nullptr, has_offset, input.size(0), C,
            input.size(2), input.size(3), pooled_height, pooled_width, static_cast<acc_t>(spatial_scale),
            sampling_ratio, static_cast<acc_t>(gamma), output.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_cuda(
    const at::Tensor& grad_,
    const at::Tensor& input_,
    const at::Tensor& rois_,
    const at::Tensor& offset_,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  check_roi_args(input_, rois_, offset_, pooled_height, pooled_width, spatial_scale, sampling_ratio);
  check_cuda_tensor(grad_, input_, "grad");
  const int64_t R = rois_.size(0), C = input_.size(1);
  TORCH_CHECK(
      grad_.dim() == 4 && grad_.size(0) == R && grad_.size(1) == C && grad_.size(2) == pooled_height &&
          grad_.size(3) == pooled_width,
      "deform_roi_pool backward: grad has shape ", grad_.sizes(), "; expected [", R, ", ", C, ", ",
      pooled_height, ", ", pooled_width, "]");
  c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_offset = offset_.numel() > 0;
  const at::Tensor offset = has_offset ? offset_.contiguous() : offset_;
  const at::ScalarType acc_type = opmath_scalar_type(input.scalar_type());

  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
  at::Tensor partial;
  if (has_offset) {
    partial = at::empty({R, C, 2, pooled_height, pooled_width}, input.options().dtype(acc_type));
  }
  const int64_t n = grad.numel();
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "dcn_inspect_deform_roi_pool_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          deform_roi_pool_backward_kernel<scalar_t><<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
              n, grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
              has_offset ? offset.const_data_ptr<scalar_t>() : nullptr, has_offset, input.size(0), C,
              input.size(2), input.size(3), pooled_height, pooled_width, static_cast<acc_t>(spatial_scale),
              sampling_ratio, static_cast<acc_t>(gamma), grad_input_acc.mutable_data_ptr<acc_t>(),
              has_offset ? partial.mutable_data_ptr<acc_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor grad_input = grad_input_acc.to(input.scalar_type());
  at::Tensor grad_offset;
  if (has_offset) {
    grad_offset = (C > 0 ? partial.sum(1) : at::zeros({R, 2, pooled_height, pooled_width}, partial.options()))
                      .to(input.scalar_type());
  } else {
    grad_offset = at::zeros_like(offset_);
  }
  return std::make_tuple(grad_input, grad_offset);
}

} // namespace
} // namespace cuda
} // namespace dcn_inspect

TORCH_LIBRARY_IMPL(dcn_inspect, CUDA, m) {
  m.impl("deform_roi_pool", TORCH_FN(dcn_inspect::cuda::deform_roi_pool_forward_cuda));
  m.impl("_deform_roi_pool_backward", TORCH_FN(dcn_inspect::cuda::deform_roi_pool_backward_cuda));
}
