// CPU kernels of deformable RoI pooling (mmcv DeformRoIPool semantics, PAPER.md §2).
//
// RoI corners map to the feature map as coord * spatial_scale - 0.5 (no rounding); bin
// (i, j) moves by gamma * offset * (RoI width, height), offset channel 0 = x, 1 = y; each bin
// averages a grid of sampling_ratio^2 bilinear samples (ceil(roi_size / pooled) per side when
// sampling_ratio is 0) with the RoIAlign border rule: zero outside [-1, H] x [-1, W], else
// coordinates clamped into the map.
//
// Backward, race-free: the input gradient is scattered by one task per channel (every RoI
// and bin of that channel), the offset gradient is reduced by one task per (RoI, bin).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace dcn_inspect {
namespace ops {

namespace {

// One bilinear sample under the RoIAlign border rule: the four corner indices (possibly
// repeated at the clamped border), their weights, and whether the value still varies with y
// and x (it does not where the coordinate was clamped).
template <typename scalar_t>
struct AlignSample {
  int64_t index[4] = {0, 0, 0, 0};
  scalar_t weight[4] = {0, 0, 0, 0};
  scalar_t ly = 0, lx = 0;
  bool varies_y = false, varies_x = false;

  AlignSample(scalar_t y, scalar_t x, int64_t height, int64_t width) {
    if (height == 0 || width == 0 || !(y >= -1 && y <= height && x >= -1 && x <= width)) {
      return;
    }
    varies_y = y >= 0;
    varies_x = x >= 0;
    y = std::max<scalar_t>(y, 0);
    x = std::max<scalar_t>(x, 0);
    int64_t y0 = std::min<int64_t>(static_cast<int64_t>(std::floor(y)), height - 1);
    int64_t x0 = std::min<int64_t>(static_cast<int64_t>(std::floor(x)), width - 1);
    if (y0 >= height - 1) {
      y = static_cast<scalar_t>(y0);
      varies_y = false;
    }
    if (x0 >= width - 1) {
      x = static_cast<scalar_t>(x0);
      varies_x = false;
    }
    const int64_t y1 = std::min<int64_t>(y0 + 1, height - 1);
    const int64_t x1 = std::min<int64_t>(x0 + 1, width - 1);
    ly = y - static_cast<scalar_t>(y0);
    lx = x - static_cast<scalar_t>(x0);
    const scalar_t hy = 1 - ly, hx = 1 - lx;
    index[0] = y0 * width + x0;
    index[1] = y0 * width + x1;
    index[2] = y1 * width + x0;
    index[3] = y1 * width + x1;
    weight[0] = hy * hx;
    weight[1] = hy * lx;
    weight[2] = ly * hx;
    weight[3] = ly * lx;
  }

  scalar_t value(const scalar_t* plane) const {
    return weight[0] * plane[index[0]] + weight[1] * plane[index[1]] + weight[2] * plane[index[2]] +
        weight[3] * plane[index[3]];
  }
  scalar_t d_dy(const scalar_t* plane) const {
    if (!varies_y) return 0;
    return (1 - lx) * (plane[index[2]] - plane[index[0]]) + lx * (plane[index[3]] - plane[index[1]]);
  }
  scalar_t d_dx(const scalar_t* plane) const {
    if (!varies_x) return 0;
    return (1 - ly) * (plane[index[1]] - plane[index[0]]) + ly * (plane[index[3]] - plane[index[2]]);
  }
};

// Geometry of one RoI: start, size, bin size and the sampling grid.
template <typename scalar_t>
struct RoiBins {
  int64_t batch_index;
  scalar_t start_x, start_y, roi_w, roi_h, bin_w, bin_h;
  int64_t grid_h, grid_w;
  scalar_t count;

  RoiBins(const scalar_t* roi, int64_t batch, int64_t pooled_h, int64_t pooled_w, double spatial_scale,
          int64_t sampling_ratio) {
    batch_index = roi_batch_index(roi, batch, "deform_roi_pool");
    const scalar_t scale = static_cast<scalar_t>(spatial_scale);
    start_x = roi[1] * scale - static_cast<scalar_t>(0.5);
    start_y = roi[2] * scale - static_cast<scalar_t>(0.5);
    roi_w = roi[3] * scale - static_cast<scalar_t>(0.5) - start_x;
    roi_h = roi[4] * scale - static_cast<scalar_t>(0.5) - start_y;
    bin_w = roi_w / static_cast<scalar_t>(pooled_w);
    bin_h = roi_h / static_cast<scalar_t>(pooled_h);
    // Adaptive grid as in the reference: ceil computed in double.
    grid_h = sampling_ratio > 0 ? sampling_ratio
                                : static_cast<int64_t>(std::ceil(static_cast<double>(roi_h) / pooled_h));
    grid_w = sampling_ratio > 0 ? sampling_ratio
                                : static_cast<int64_t>(std::ceil(static_cast<double>(roi_w) / pooled_w));
    count = static_cast<scalar_t>(std::max<int64_t>(grid_h * grid_w, 1));
  }

  bool empty() const { return grid_h <= 0 || grid_w <= 0; }

  // Top-left of bin (ph, pw) including its offset.
  void bin_origin(const scalar_t* offset, int64_t rois_index, int64_t pooled_h, int64_t pooled_w,
                  int64_t ph, int64_t pw, double gamma, scalar_t& y, scalar_t& x) const {
    y = start_y + static_cast<scalar_t>(ph) * bin_h;
    x = start_x + static_cast<scalar_t>(pw) * bin_w;
    if (offset) {
      const scalar_t* off = offset + rois_index * 2 * pooled_h * pooled_w + ph * pooled_w + pw;
      x += static_cast<scalar_t>(gamma) * roi_w * off[0];
      y += static_cast<scalar_t>(gamma) * roi_h * off[pooled_h * pooled_w];
    }
  }

  scalar_t sample_y(scalar_t origin_y, int64_t iy) const {
    return origin_y + (static_cast<scalar_t>(iy) + static_cast<scalar_t>(0.5)) * bin_h / static_cast<scalar_t>(grid_h);
  }
  scalar_t sample_x(scalar_t origin_x, int64_t ix) const {
    return origin_x + (static_cast<scalar_t>(ix) + static_cast<scalar_t>(0.5)) * bin_w / static_cast<scalar_t>(grid_w);
  }
};

void check_cpu(const at::Tensor& t, const char* name) {
  check_cpu_tensor(t, "deform_roi_pool", name);
}

at::Tensor deform_roi_pool_forward_kernel(
    const at::Tensor& input_,
    const at::Tensor& rois_,
    const at::Tensor& offset_,
    int64_t pooled_h,
    int64_t pooled_w,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  check_cpu(input_, "input");
  check_cpu(rois_, "rois");
  check_cpu(offset_, "offset");
  check_deform_roi_pool_args(input_, rois_, offset_, pooled_h, pooled_w, spatial_scale, sampling_ratio);
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_offset = offset_.numel() > 0;
  const at::Tensor offset = has_offset ? offset_.contiguous() : at::Tensor();
  const int64_t R = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor output = at::zeros({R, C, pooled_h, pooled_w}, input.options());
  // An empty map has nothing to sample: every bin is zero (and the planes have no storage).
  if (R == 0 || C == 0 || H * W == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_roi_pool_forward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* roi_data = rois.data_ptr<scalar_t>();
    const scalar_t* off = has_offset ? offset.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w;
    // One task per (RoI, bin): the samples are located once and read for every channel.
    at::parallel_for(0, R * bins, 1, [&](int64_t begin, int64_t end) {
      std::vector<AlignSample<scalar_t>> samples;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / bins;
        const int64_t ph = (task % bins) / pooled_w;
        const int64_t pw = task % pooled_w;
        const RoiBins<scalar_t> roi(roi_data + r * 5, input.size(0), pooled_h, pooled_w, spatial_scale, sampling_ratio);
        if (roi.empty()) {
          continue;
        }
        scalar_t origin_y, origin_x;
        roi.bin_origin(off, r, pooled_h, pooled_w, ph, pw, gamma, origin_y, origin_x);
        samples.clear();
        for (int64_t iy = 0; iy < roi.grid_h; ++iy) {
          const scalar_t y = roi.sample_y(origin_y, iy);
          for (int64_t ix = 0; ix < roi.grid_w; ++ix) {
            samples.emplace_back(y, roi.sample_x(origin_x, ix), H, W);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* plane = in + (roi.batch_index * C + c) * H * W;
          scalar_t sum = 0;
          for (const auto& s : samples) {
            sum += s.value(plane);
          }
          out[(r * C + c) * bins + ph * pooled_w + pw] = sum / roi.count;
        }
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_kernel(
    const at::Tensor& grad_,
    const at::Tensor& input_,
    const at::Tensor& rois_,
    const at::Tensor& offset_,
    int64_t pooled_h,
    int64_t pooled_w,
    double spatial_scale,
    int64_t sampling_ratio,
    double gamma) {
  check_cpu(grad_, "grad");
  check_cpu(input_, "input");
  check_cpu(rois_, "rois");
  check_cpu(offset_, "offset");
  check_deform_roi_pool_args(input_, rois_, offset_, pooled_h, pooled_w, spatial_scale, sampling_ratio);
  const int64_t R = rois_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  TORCH_CHECK(
      grad_.dim() == 4 && grad_.size(0) == R && grad_.size(1) == C && grad_.size(2) == pooled_h &&
          grad_.size(3) == pooled_w,
      "deform_roi_pool backward: grad has shape ", grad_.sizes(), "; expected [", R, ", ", C, ", ",
      pooled_h, ", ", pooled_w, "]");
  TORCH_CHECK(grad_.scalar_type() == input_.scalar_type(), "deform_roi_pool backward: grad dtype differs");
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_offset = offset_.numel() > 0;
  const at::Tensor offset = has_offset ? offset_.contiguous() : at::Tensor();
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_offset = has_offset ? at::zeros_like(offset) : at::empty({0}, input.options());
  if (R == 0 || C == 0 || H * W == 0) {
    return {grad_input, grad_offset};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_roi_pool_backward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* roi_data = rois.data_ptr<scalar_t>();
    const scalar_t* off = has_offset ? offset.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* g_in = grad_input.data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w;
    const int64_t batch = input.size(0);

    // Input gradient: one task per channel owns grad_input[:, c].
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t r = 0; r < R; ++r) {
          const RoiBins<scalar_t> roi(roi_data + r * 5, batch, pooled_h, pooled_w, spatial_scale, sampling_ratio);
          if (roi.empty()) {
            continue;
          }
          scalar_t* plane = g_in + (roi.batch_index * C + c) * H * W;
          for (int64_t ph = 0; ph < pooled_h; ++ph) {
            for (int64_t pw = 0; pw < pooled_w; ++pw) {
              const scalar_t go = g[(r * C + c) * bins + ph * pooled_w + pw] / roi.count;
              scalar_t origin_y, origin_x;
              roi.bin_origin(off, r, pooled_h, pooled_w, ph, pw, gamma, origin_y, origin_x);
              for (int64_t iy = 0; iy < roi.grid_h; ++iy) {
                const scalar_t y = roi.sample_y(origin_y, iy);
                for (int64_t ix = 0; ix < roi.grid_w; ++ix) {
                  const AlignSample<scalar_t> s(y, roi.sample_x(origin_x, ix), H, W);
                  for (int q = 0; q < 4; ++q) {
                    plane[s.index[q]] += go * s.weight[q];
                  }
                }
              }
            }
          }
        }
      }
    });

    if (!has_offset) {
      return;
    }
    // Offset gradient: one task per (RoI, bin) reduces over channels and samples.
    scalar_t* g_off = grad_offset.data_ptr<scalar_t>();
    at::parallel_for(0, R * bins, 1, [&](int64_t begin, int64_t end) {
      std::vector<AlignSample<scalar_t>> samples;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / bins;
        const int64_t ph = (task % bins) / pooled_w;
        const int64_t pw = task % pooled_w;
        const RoiBins<scalar_t> roi(roi_data + r * 5, batch, pooled_h, pooled_w, spatial_scale, sampling_ratio);
        if (roi.empty()) {
          continue;
        }
        scalar_t origin_y, origin_x;
        roi.bin_origin(off, r, pooled_h, pooled_w, ph, pw, gamma, origin_y, origin_x);
        samples.clear();
        for (int64_t iy = 0; iy < roi.grid_h; ++iy) {
          const scalar_t y = roi.sample_y(origin_y, iy);
          for (int64_t ix = 0; ix < roi.grid_w; ++ix) {
            samples.emplace_back(y, roi.sample_x(origin_x, ix), H, W);
          }
        }
        scalar_t acc_y = 0, acc_x = 0;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* plane = in + (roi.batch_index * C + c) * H * W;
          const scalar_t go = g[(r * C + c) * bins + ph * pooled_w + pw] / roi.count;
          scalar_t dy = 0, dx = 0;
          for (const auto& s : samples) {
            dy += s.d_dy(plane);
            dx += s.d_dx(plane);
          }
          acc_y += go * dy;
          acc_x += go * dx;
        }
        g_off[r * 2 * bins + ph * pooled_w + pw] = static_cast<scalar_t>(gamma) * roi.roi_w * acc_x;
        g_off[r * 2 * bins + bins + ph * pooled_w + pw] = static_cast<scalar_t>(gamma) * roi.roi_h * acc_y;
      }
    });
  });
  return {grad_input, grad_offset};
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_roi_pool"), TORCH_FN(deform_roi_pool_forward_kernel));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_roi_pool_backward"),
      TORCH_FN(deform_roi_pool_backward_kernel));
}

} // namespace ops
} // namespace dcn_inspect
