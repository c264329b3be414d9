// CUDA deformable position-sensitive RoI pooling (R-FCN, the MSRA op): forward and backward.
//
// Semantics are those of dcn_inspect/ops/reference.py: RoI corners rounded (C round(): halves
// away from zero), start = round(x1) * scale - 0.5, size = max((round(x2) + 1) * scale - 0.5 -
// start, 0.1); output channel ctop of bin (ph, pw) reads score map (ctop * gs + gh) * gs + gw;
// trans [R, 2 * num_classes, part, part] (channel 2c = dx^, 2c + 1 = dy^) times trans_std and
// the RoI size shifts the bin; sample_per_part^2 samples per bin, a sample outside
// [-0.5, W - 0.5] x [-0.5, H - 0.5] is skipped, inside ones are clamped into the map and read
// bilinearly; output = sum / max(count, 1), and count is returned for the backward.
// Gradients are those autograd gives for the reference (no coordinate gradient where the
// clamp is active).
#include "../checks.h"
#include "cuda_helpers.cuh"

#include <torch/library.h>

#include <tuple>

namespace dcn_inspect {
namespace cuda {
namespace {

template <typename acc_t>
struct PsRoiBin {
  int64_t batch_index;
  int64_t channel; // input channel read by this output element
  int64_t trans_index; // index of dx^ in trans (dy^ follows after part*part), -1 when no trans
  acc_t roi_w, roi_h;
  acc_t wstart, hstart, sub_w, sub_h;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ PsRoiBin<acc_t> psroi_bin(
    int64_t r,
    int64_t ctop,
    int64_t ph,
    int64_t pw,
    const scalar_t* __restrict__ rois,
    const scalar_t* __restrict__ trans,
    bool has_trans,
    int64_t num_classes,
    acc_t spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    acc_t trans_std) {
  PsRoiBin<acc_t> b;
  const scalar_t* roi = rois + r * 5;
  b.batch_index = static_cast<int64_t>(static_cast<acc_t>(roi[0]));
  const acc_t x1 = static_cast<acc_t>(dcn_round_half_away(static_cast<double>(roi[1])));
  const acc_t y1 = static_cast<acc_t>(dcn_round_half_away(static_cast<double>(roi[2])));
  const acc_t x2 = static_cast<acc_t>(dcn_round_half_away(static_cast<double>(roi[3])));
  const acc_t y2 = static_cast<acc_t>(dcn_round_half_away(static_cast<double>(roi[4])));
  const acc_t start_x = dcn_mul_rn(x1, spatial_scale) - acc_t(0.5);
  const acc_t start_y = dcn_mul_rn(y1, spatial_scale) - acc_t(0.5);
  acc_t roi_w = (dcn_mul_rn(x2 + acc_t(1), spatial_scale) - acc_t(0.5)) - start_x;
  acc_t roi_h = (dcn_mul_rn(y2 + acc_t(1), spatial_scale) - acc_t(0.5)) - start_y;
  roi_w = roi_w < acc_t(0.1) ? acc_t(0.1) : roi_w;
  roi_h = roi_h < acc_t(0.1) ? acc_t(0.1) : roi_h;
  const acc_t bin_w = roi_w / static_cast<acc_t>(pooled_size);
  const acc_t bin_h = roi_h / static_cast<acc_t>(pooled_size);

  const int64_t part_h = ph * part_size / pooled_size;
  const int64_t part_w = pw * part_size / pooled_size;
  int64_t gh = ph * group_size / pooled_size;
  int64_t gw = pw * group_size / pooled_size;
  gh = gh < 0 ? 0 : (gh > group_size - 1 ? group_size - 1 : gh);
  gw = gw < 0 ? 0 : (gw > group_size - 1 ? group_size - 1 : gw);
  b.channel = (ctop * group_size + gh) * group_size + gw;

  acc_t trans_x = acc_t(0), trans_y = acc_t(0);
  b.trans_index = -1;
  if (has_trans) {
    const int64_t channels_each_class = output_dim / num_classes;
    const int64_t class_id = ctop / channels_each_class;
    b.trans_index = ((r * num_classes + class_id) * 2 * part_size + part_h) * part_size + part_w;
    trans_x = dcn_mul_rn(static_cast<acc_t>(trans[b.trans_index]), trans_std);
    trans_y = dcn_mul_rn(static_cast<acc_t>(trans[b.trans_index + part_size * part_size]), trans_std);
  }
  b.roi_w = roi_w;
  b.roi_h = roi_h;
  b.wstart = (dcn_mul_rn(static_cast<acc_t>(pw), bin_w) + start_x) + dcn_mul_rn(trans_x, roi_w);
  b.hstart = (dcn_mul_rn(static_cast<acc_t>(ph), bin_h) + start_y) + dcn_mul_rn(trans_y, roi_h);
  b.sub_w = bin_w / static_cast<acc_t>(sample_per_part);
  b.sub_h = bin_h / static_cast<acc_t>(sample_per_part);
  return b;
}

template <typename acc_t>
__device__ __forceinline__ bool psroi_inside(acc_t y, acc_t x, int64_t height, int64_t width) {
  return x >= acc_t(-0.5) && x <= static_cast<acc_t>(width) - acc_t(0.5) && y >= acc_t(-0.5) &&
      y <= static_cast<acc_t>(height) - acc_t(0.5);
}

template <typename acc_t>
__device__ __forceinline__ acc_t clamp_to(acc_t v, acc_t hi) {
  return v < acc_t(0) ? acc_t(0) : (v > hi ? hi : v);
}

// One thread per output element (r, ctop, ph, pw).
template <typename scalar_t>
__global__ void deform_psroi_pool_forward_kernel(
    int64_t n,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ rois,
    const scalar_t* __restrict__ trans,
    bool has_trans,
    int64_t num_classes,
    int64_t batch,
    int64_t channels,
    int64_t height,
    int64_t width,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    at::opmath_type<scalar_t> trans_std,
    scalar_t* __restrict__ output,
    scalar_t* __restrict__ count_out) {
  using acc_t = at::opmath_type<scalar_t>;
  DCN_CUDA_KERNEL_LOOP(int64_t, index, n) {
    const int64_t pw = index % pooled_size;
    const int64_t ph = (index / pooled_size) % pooled_size;
    const int64_t ctop = (index / (pooled_size * pooled_size)) % output_dim;
    const int64_t r = index / (pooled_size * pooled_size * output_dim);
    const auto b = psroi_bin<scalar_t, acc_t>(
        r, ctop, ph, pw, rois, trans, has_trans, num_classes, spatial_scale, output_dim, group_size,
        pooled_size, part_size, sample_per_part, trans_std);
    if (b.batch_index < 0 || b.batch_index >= batch || b.channel >= channels) {
      output[index] = static_cast<scalar_t>(0);
      count_out[index] = static_cast<scalar_t>(0);
      continue;
    }
    const scalar_t* plane = input + (b.batch_index * channels + b.channel) * height * width;
    const acc_t max_x = static_cast<acc_t>(width - 1), max_y = static_cast<acc_t>(height - 1);
    acc_t sum = acc_t(0);
    int64_t count = 0;
    for (int64_t ih = 0; ih < sample_per_part; ++ih) {
      const acc_t y = b.hstart + dcn_mul_rn(static_cast<acc_t>(ih), b.sub_h);
      for (int64_t iw = 0; iw < sample_per_part; ++iw) {
        const acc_t x = b.wstart + dcn_mul_rn(static_cast<acc_t>(iw), b.sub_w);
        if (!psroi_inside<acc_t>(y, x, height, width)) continue;
        const acc_t yc = clamp_to(y, max_y), xc = clamp_to(x, max_x);
        const int64_t y0 = static_cast<int64_t>(dcn_floor(yc));
        const int64_t x0 = static_cast<int64_t>(dcn_floor(xc));
        const int64_t y1 = y0 + 1 < height ? y0 + 1 : height - 1;
        const int64_t x1 = x0 + 1 < width ? x0 + 1 : width - 1;
        const acc_t ly = yc - static_cast<acc_t>(y0), lx = xc - static_cast<acc_t>(x0);
        sum += static_cast<acc_t>(plane[y0 * width + x0]) * (acc_t(1) - ly) * (acc_t(1) - lx) +
            static_cast<acc_t>(plane[y0 * width + x1]) * (acc_t(1) - ly) * lx +
            static_cast<acc_t>(plane[y1 * width + x0]) * ly * (acc_t(1) - lx) +
            static_cast<acc_t>(plane[y1 * width + x1]) * ly * lx;
        ++count;
      }
    }
    output[index] = static_cast<scalar_t>(count > 0 ? sum / static_cast<acc_t>(count) : acc_t(0));
    count_out[index] = static_cast<scalar_t>(static_cast<acc_t>(count));
  }
}

// One thread per output element: scatters grad / count to the input's four corners of every
// inside sample (atomicAdd into an opmath buffer) and adds the trans gradient (shared by all
// output channels of a class, hence atomicAdd into an opmath buffer too).
template <typename scalar_t>
__global__ void deform_psroi_pool_backward_kernel(
    int64_t n,
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ rois,
    const scalar_t* __restrict__ trans,
    const at::opmath_type<scalar_t>* __restrict__ count,
    bool has_trans,
    int64_t num_classes,
    int64_t batch,
    int64_t channels,
    int64_t height,
    int64_t width,
    at::opmath_type<scalar_t> spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    at::opmath_type<scalar_t> trans_std,
    at::opmath_type<scalar_t>* __restrict__ grad_input,
    at::opmath_type<scalar_t>* __restrict__ grad_trans) {
  using acc_t = at::opmath_type<scalar_t>;
  DCN_CUDA_KERNEL_LOOP(int64_t, index, n) {
    const acc_t cnt = count[index];
    if (!(cnt > acc_t(0))) continue;
    const acc_t g = static_cast<acc_t>(grad_output[index]) / cnt;
    const int64_t pw = index % pooled_size;
    const int64_t ph = (index / pooled_size) % pooled_size;
    const int64_t ctop = (index / (pooled_size * pooled_size)) % output_dim;
    const int64_t r = index / (pooled_size * pooled_size * output_dim);
    const auto b = psroi_bin<scalar_t, acc_t>(
        r, ctop, ph, pw, rois, trans, has_trans, num_classes, spatial_scale, output_dim, group_size,
        pooled_size, part_size, sample_per_part, trans_std);
    if (b.batch_index < 0 || b.batch_index >= batch || b.channel >= channels) continue;
    const int64_t plane_offset = (b.batch_index * channels + b.channel) * height * width;
    const scalar_t* plane = input + plane_offset;
    acc_t* grad_plane = grad_input + plane_offset;
    const acc_t max_x = static_cast<acc_t>(width - 1), max_y = static_cast<acc_t>(height - 1);
    acc_t grad_x = acc_t(0), grad_y = acc_t(0);
    for (int64_t ih = 0; ih < sample_per_part; ++ih) {
      const acc_t y = b.hstart + dcn_mul_rn(static_cast<acc_t>(ih), b.sub_h);
      for (int64_t iw = 0; iw < sample_per_part; ++iw) {
        const acc_t x = b.wstart + dcn_mul_rn(static_cast<acc_t>(iw), b.sub_w);
        if (!psroi_inside<acc_t>(y, x, height, width)) continue;
        const acc_t yc = clamp_to(y, max_y), xc = clamp_to(x, max_x);
        const int64_t y0 = static_cast<int64_t>(dcn_floor(yc));
        const int64_t x0 = static_cast<int64_t>(dcn_floor(xc));
        const int64_t y1 = y0 + 1 < height ? y0 + 1 : height - 1;
        const int64_t x1 = x0 + 1 < width ? x0 + 1 : width - 1;
        const acc_t ly = yc - static_cast<acc_t>(y0), lx = xc - static_cast<acc_t>(x0);
        const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
        const int64_t i00 = y0 * width + x0, i01 = y0 * width + x1;
        const int64_t i10 = y1 * width + x0, i11 = y1 * width + x1;
        if (g != acc_t(0)) {
          atomicAdd(grad_plane + i00, g * hy * hx);
          atomicAdd(grad_plane + i01, g * hy * lx);
          atomicAdd(grad_plane + i10, g * ly * hx);
          atomicAdd(grad_plane + i11, g * ly * lx);
        }
        if (has_trans) {
          const acc_t v00 = static_cast<acc_t>(plane[i00]), v01 = static_cast<acc_t>(plane[i01]);
          const acc_t v10 = static_cast<acc_t>(plane[i10]), v11 = static_cast<acc_t>(plane[i11]);
          // torch.clamp passes the gradient where min <= v <= max (inclusive).
          if (x >= acc_t(0) && x <= max_x) grad_x += hy * (v01 - v00) + ly * (v11 - v10);
          if (y >= acc_t(0) && y <= max_y) grad_y += hx * (v10 - v00) + lx * (v11 - v01);
        }
      }
    }
    if (has_trans) {
      const acc_t gx = g * grad_x * trans_std * b.roi_w;
      const acc_t gy = g * grad_y * trans_std * b.roi_h;
      if (gx != acc_t(0)) atomicAdd(grad_trans + b.trans_index, gx);
      if (gy != acc_t(0)) atomicAdd(grad_trans + b.trans_index + part_size * part_size, gy);
    }
  }
}

int64_t check_psroi_args(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& trans,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part) {
  TORCH_CHECK(input.is_cuda(), "dcn_inspect (CUDA): input must be a CUDA tensor");
  check_cuda_tensor(rois, input, "rois");
  if (trans.numel() > 0) {
    check_cuda_tensor(trans, input, "trans");
  }
  return ops::check_deform_psroi_pool_args(
      input, rois, trans, output_dim, group_size, pooled_size, part_size, sample_per_part);
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_forward_cuda(
    const at::Tensor& input_,
    const at::Tensor& rois_,
    const at::Tensor& trans_,
    double spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    double trans_std) {
  const int64_t num_classes =
      check_psroi_args(input_, rois_, trans_, output_dim, group_size, pooled_size, part_size, sample_per_part);
  c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_trans = trans_.numel() > 0;
  const at::Tensor trans = has_trans ? trans_.contiguous() : trans_;
  const int64_t R = rois.size(0);
  at::Tensor output = at::empty({R, output_dim, pooled_size, pooled_size}, input.options());
  at::Tensor count = at::empty({R, output_dim, pooled_size, pooled_size}, input.options());
  const int64_t n = output.numel();
  if (n == 0) return std::make_tuple(output, count);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "dcn_inspect_deform_psroi_pool_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        deform_psroi_pool_forward_kernel<scalar_t><<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
            n, input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
            has_trans ? trans.const_data_ptr<scalar_t>() : nullptr, has_trans, num_classes, input.size(0),
            input.size(1), input.size(2), input.size(3), static_cast<acc_t>(spatial_scale), output_dim,
            group_size, pooled_size, part_size, sample_per_part, static_cast<acc_t>(trans_std),
            output.mutable_data_ptr<scalar_t>(), count.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return std::make_tuple(output, count);
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_backward_cuda(
    const at::Tensor& grad_,
    const at::Tensor& input_,
    const at::Tensor& rois_,
    const at::Tensor& trans_,
    const at::Tensor& count_,
    double spatial_scale,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part,
    double trans_std) {
  const int64_t num_classes =
      check_psroi_args(input_, rois_, trans_, output_dim, group_size, pooled_size, part_size, sample_per_part);
  check_cuda_tensor(grad_, input_, "grad");
  const int64_t R = rois_.size(0);
  TORCH_CHECK(
      grad_.dim() == 4 && grad_.size(0) == R && grad_.size(1) == output_dim && grad_.size(2) == pooled_size &&
          grad_.size(3) == pooled_size,
      "deform_psroi_pool backward: grad has shape ", grad_.sizes(), "; expected [", R, ", ", output_dim, ", ",
      pooled_size, ", ", pooled_size, "]");
  TORCH_CHECK(
      count_.is_cuda() && count_.device() == input_.device() && count_.sizes() == grad_.sizes(),
      "deform_psroi_pool backward: count must be a CUDA tensor of shape ", grad_.sizes(), " on ",
      input_.device(), ", got ", count_.sizes(), " on ", count_.device());
  c10::cuda::CUDAGuard device_guard(input_.device());
  const at::ScalarType acc_type = opmath_scalar_type(input_.scalar_type());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor count = count_.to(acc_type).contiguous();
  const bool has_trans = trans_.numel() > 0;
  const at::Tensor trans = has_trans ? trans_.contiguous() : trans_;

  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
  at::Tensor grad_trans_acc = at::zeros(trans.sizes(), input.options().dtype(acc_type));
  const int64_t n = grad.numel();
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "dcn_inspect_deform_psroi_pool_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          deform_psroi_pool_backward_kernel<scalar_t><<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
              n, grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), rois.const_data_ptr<scalar_t>(),
              has_trans ? trans.const_data_ptr<scalar_t>() : nullptr, count.const_data_ptr<acc_t>(), has_trans,
              num_classes, input.size(0), input.size(1), input.size(2), input.size(3),
              static_cast<acc_t>(spatial_scale), output_dim, group_size, pooled_size, part_size, sample_per_part,
              static_cast<acc_t>(trans_std), grad_input_acc.mutable_data_ptr<acc_t>(),
              has_trans ? grad_trans_acc.mutable_data_ptr<acc_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return std::make_tuple(grad_input_acc.to(input.scalar_type()), grad_trans_acc.to(input.scalar_type()));
}

} // namespace
} // namespace cuda
} // namespace dcn_inspect

TORCH_LIBRARY_IMPL(dcn_inspect, CUDA, m) {
  m.impl("deform_psroi_pool", TORCH_FN(dcn_inspect::cuda::deform_psroi_pool_forward_cuda));
  m.impl("_deform_psroi_pool_backward", TORCH_FN(dcn_inspect::cuda::deform_psroi_pool_backward_cuda));
}
