// CPU kernels of deformable position-sensitive RoI pooling (R-FCN, the MSRA op's semantics,
// PAPER.md §2).
//
// RoI corners are rounded (half away from zero, C round()), the end is inclusive:
// start = round(x1) * scale - 0.5, width = max((round(x2) + 1) * scale - 0.5 - start, 0.1).
// Bin (ph, pw) of output channel ctop reads score map (ctop*G + gh)*G + gw, moves by
// trans * trans_std * (RoI width, height) (trans channel 2*class = x, 2*class + 1 = y, part
// cell (ph*part/P, pw*part/P)), and averages the sample_per_part^2 samples that fall inside
// [-0.5, W-0.5] x [-0.5, H-0.5], each clamped into the map and read bilinearly; count holds
// how many were averaged.
//
// Backward, race-free: one task per input channel scatters the input gradient, one task per
// (RoI, class) reduces the trans gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "../checks.h"

namespace dcn_inspect {
namespace ops {

namespace {

struct PSRoIConfig {
  double spatial_scale;
  int64_t output_dim, group_size, pooled_size, part_size, sample_per_part;
  double trans_std;
  int64_t num_classes;
  int64_t channels_each_class() const { return output_dim / num_classes; }
  int64_t part_of(int64_t p) const { return p * part_size / pooled_size; }
  int64_t group_of(int64_t p) const {
    return std::min<int64_t>(std::max<int64_t>(p * group_size / pooled_size, 0), group_size - 1);
  }
};

// Geometry of one RoI.
template <typename scalar_t>
struct PSRoI {
  int64_t batch_index;
  scalar_t start_x, start_y, roi_w, roi_h, bin_w, bin_h;

  PSRoI(const scalar_t* roi, int64_t batch, const PSRoIConfig& cfg) {
    batch_index = roi_batch_index(roi, batch, "deform_psroi_pool");
    const scalar_t scale = static_cast<scalar_t>(cfg.spatial_scale);
    const scalar_t half = static_cast<scalar_t>(0.5);
    start_x = static_cast<scalar_t>(std::round(roi[1])) * scale - half;
    start_y = static_cast<scalar_t>(std::round(roi[2])) * scale - half;
    const scalar_t end_x = (static_cast<scalar_t>(std::round(roi[3])) + 1) * scale - half;
    const scalar_t end_y = (static_cast<scalar_t>(std::round(roi[4])) + 1) * scale - half;
    roi_w = std::max<scalar_t>(end_x - start_x, static_cast<scalar_t>(0.1));
    roi_h = std::max<scalar_t>(end_y - start_y, static_cast<scalar_t>(0.1));
    bin_w = roi_w / static_cast<scalar_t>(cfg.pooled_size);
    bin_h = roi_h / static_cast<scalar_t>(cfg.pooled_size);
  }
};

// One sample of a bin: inside or not, clamped bilinear corners, and whether the value varies
// with x / y (not where the coordinate was clamped).
template <typename scalar_t>
struct PSSample {
  bool inside = false, varies_y = false, varies_x = false;
  int64_t index[4] = {0, 0, 0, 0};
  scalar_t ly = 0, lx = 0;

  PSSample(scalar_t y, scalar_t x, int64_t height, int64_t width) {
    if (height == 0 || width == 0) {
      return;
    }
    const scalar_t half = static_cast<scalar_t>(0.5);
    inside = x >= -half && x <= width - half && y >= -half && y <= height - half;
    if (!inside) {
      return;
    }
    varies_y = y >= 0 && y <= height - 1;
    varies_x = x >= 0 && x <= width - 1;
    y = std::min<scalar_t>(std::max<scalar_t>(y, 0), static_cast<scalar_t>(height - 1));
    x = std::min<scalar_t>(std::max<scalar_t>(x, 0), static_cast<scalar_t>(width - 1));
    const int64_t y0 = static_cast<int64_t>(std::floor(y));
    const int64_t x0 = static_cast<int64_t>(std::floor(x));
    const int64_t y1 = std::min<int64_t>(y0 + 1, height - 1);
    const int64_t x1 = std::min<int64_t>(x0 + 1, width - 1);
    ly = y - static_cast<scalar_t>(y0);
    lx = x - static_cast<scalar_t>(x0);
    index[0] = y0 * width + x0;
    index[1] = y0 * width + x1;
    index[2] = y1 * width + x0;
    index[3] = y1 * width + x1;
  }

  scalar_t weight(int q) const {
    const scalar_t wy = (q < 2) ? 1 - ly : ly;
    const scalar_t wx = (q % 2 == 0) ? 1 - lx : lx;
    return wy * wx;
  }
  scalar_t value(const scalar_t* plane) const {
    return (1 - ly) * (1 - lx) * plane[index[0]] + (1 - ly) * lx * plane[index[1]] +
        ly * (1 - lx) * plane[index[2]] + ly * lx * plane[index[3]];
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

// Visits the samples of bin (ph, pw) of output channel ctop of RoI r.
template <typename scalar_t, typename F>
void for_each_sample(
    const PSRoIConfig& cfg,
    const PSRoI<scalar_t>& roi,
    const scalar_t* trans,
    int64_t r,
    int64_t ctop,
    int64_t ph,
    int64_t pw,
    int64_t height,
    int64_t width,
    const F& visit) {
  scalar_t trans_x = 0, trans_y = 0;
  if (trans) {
    const int64_t class_id = ctop / cfg.channels_each_class();
    const int64_t part = cfg.part_size;
    const int64_t cell = cfg.part_of(ph) * part + cfg.part_of(pw);
    const scalar_t* t = trans + (r * cfg.num_classes + class_id) * 2 * part * part;
    trans_x = t[cell] * static_cast<scalar_t>(cfg.trans_std);
    trans_y = t[part * part + cell] * static_cast<scalar_t>(cfg.trans_std);
  }
  const scalar_t wstart = static_cast<scalar_t>(pw) * roi.bin_w + roi.start_x + trans_x * roi.roi_w;
  const scalar_t hstart = static_cast<scalar_t>(ph) * roi.bin_h + roi.start_y + trans_y * roi.roi_h;
  const scalar_t spp = static_cast<scalar_t>(cfg.sample_per_part);
  for (int64_t ih = 0; ih < cfg.sample_per_part; ++ih) {
    const scalar_t y = hstart + static_cast<scalar_t>(ih) * (roi.bin_h / spp);
    for (int64_t iw = 0; iw < cfg.sample_per_part; ++iw) {
      const scalar_t x = wstart + static_cast<scalar_t>(iw) * (roi.bin_w / spp);
      const PSSample<scalar_t> s(y, x, height, width);
      if (s.inside) {
        visit(s);
      }
    }
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  check_cpu_tensor(t, "deform_psroi_pool", name);
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_forward_kernel(
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
  check_cpu(input_, "input");
  check_cpu(rois_, "rois");
  check_cpu(trans_, "trans");
  const int64_t num_classes = check_deform_psroi_pool_args(
      input_, rois_, trans_, output_dim, group_size, pooled_size, part_size, sample_per_part);
  const PSRoIConfig cfg{spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
                        trans_std, num_classes};
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_trans = trans_.numel() > 0;
  const at::Tensor trans = has_trans ? trans_.contiguous() : at::Tensor();
  const int64_t R = rois.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t P = pooled_size;
  at::Tensor output = at::zeros({R, output_dim, P, P}, input.options());
  at::Tensor count = at::zeros({R, output_dim, P, P}, input.options());
  if (R == 0) {
    return {output, count};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_psroi_pool_forward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* roi_data = rois.data_ptr<scalar_t>();
    const scalar_t* tr = has_trans ? trans.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.data_ptr<scalar_t>();
    scalar_t* cnt = count.data_ptr<scalar_t>();
    at::parallel_for(0, R * output_dim * P * P, 16, [&](int64_t begin, int64_t end) {
      for (int64_t index = begin; index < end; ++index) {
        const int64_t pw = index % P;
        const int64_t ph = (index / P) % P;
        const int64_t ctop = (index / (P * P)) % output_dim;
        const int64_t r = index / (P * P * output_dim);
        const PSRoI<scalar_t> roi(roi_data + r * 5, input.size(0), cfg);
        const int64_t channel = (ctop * group_size + cfg.group_of(ph)) * group_size + cfg.group_of(pw);
        const scalar_t* plane = in + (roi.batch_index * C + channel) * H * W;
        scalar_t sum = 0;
        int64_t n = 0;
        for_each_sample(cfg, roi, tr, r, ctop, ph, pw, H, W, [&](const PSSample<scalar_t>& s) {
          sum += s.value(plane);
          ++n;
        });
        out[index] = n == 0 ? scalar_t(0) : sum / static_cast<scalar_t>(n);
        cnt[index] = static_cast<scalar_t>(n);
      }
    });
  });
  return {output, count};
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_backward_kernel(
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
  check_cpu(grad_, "grad");
  check_cpu(input_, "input");
  check_cpu(rois_, "rois");
  check_cpu(trans_, "trans");
  check_cpu(count_, "count");
  const int64_t num_classes = check_deform_psroi_pool_args(
      input_, rois_, trans_, output_dim, group_size, pooled_size, part_size, sample_per_part);
  const PSRoIConfig cfg{spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
                        trans_std, num_classes};
  const int64_t R = rois_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3);
  const int64_t P = pooled_size;
  for (const at::Tensor* t : {&grad_, &count_}) {
    TORCH_CHECK(
        t->dim() == 4 && t->size(0) == R && t->size(1) == output_dim && t->size(2) == P && t->size(3) == P,
        "deform_psroi_pool backward: grad and count must have shape [", R, ", ", output_dim, ", ", P, ", ", P,
        "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == input_.scalar_type(), "deform_psroi_pool backward: dtype differs from input");
  }
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor count = count_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const bool has_trans = trans_.numel() > 0;
  const at::Tensor trans = has_trans ? trans_.contiguous() : at::Tensor();
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_trans = has_trans ? at::zeros_like(trans) : at::empty({0}, input.options());
  if (R == 0) {
    return {grad_input, grad_trans};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_psroi_pool_backward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* roi_data = rois.data_ptr<scalar_t>();
    const scalar_t* tr = has_trans ? trans.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* cnt = count.data_ptr<scalar_t>();
    scalar_t* g_in = grad_input.data_ptr<scalar_t>();
    const int64_t batch = input.size(0);
    const int64_t GG = group_size * group_size;

    // Input gradient: input channel (ctop, gh, gw) is read only by output channel ctop's bins
    // (ph, pw) with group (gh, gw), so one task per input channel owns grad_input[:, channel].
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t channel = begin; channel < end; ++channel) {
        const int64_t ctop = channel / GG;
        const int64_t gh = (channel / group_size) % group_size;
        const int64_t gw = channel % group_size;
        for (int64_t r = 0; r < R; ++r) {
          const PSRoI<scalar_t> roi(roi_data + r * 5, batch, cfg);
          scalar_t* plane = g_in + (roi.batch_index * C + channel) * H * W;
          for (int64_t ph = 0; ph < P; ++ph) {
            if (cfg.group_of(ph) != gh) continue;
            for (int64_t pw = 0; pw < P; ++pw) {
              if (cfg.group_of(pw) != gw) continue;
              const int64_t index = ((r * output_dim + ctop) * P + ph) * P + pw;
              if (cnt[index] <= 0) continue;
              const scalar_t go = g[index] / cnt[index];
              for_each_sample(cfg, roi, tr, r, ctop, ph, pw, H, W, [&](const PSSample<scalar_t>& s) {
                for (int q = 0; q < 4; ++q) {
                  plane[s.index[q]] += go * s.weight(q);
                }
              });
            }
          }
        }
      }
    });

    if (!has_trans) {
      return;
    }
    // Trans gradient: one task per (RoI, class) owns grad_trans[r, 2*class : 2*class + 2].
    scalar_t* g_tr = grad_trans.data_ptr<scalar_t>();
    const int64_t part = part_size;
    at::parallel_for(0, R * num_classes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / num_classes;
        const int64_t class_id = task % num_classes;
        const PSRoI<scalar_t> roi(roi_data + r * 5, batch, cfg);
        scalar_t* gx = g_tr + (r * num_classes + class_id) * 2 * part * part;
        scalar_t* gy = gx + part * part;
        const int64_t per_class = cfg.channels_each_class();
        for (int64_t ctop = class_id * per_class; ctop < (class_id + 1) * per_class; ++ctop) {
          for (int64_t ph = 0; ph < P; ++ph) {
            for (int64_t pw = 0; pw < P; ++pw) {
              const int64_t index = ((r * output_dim + ctop) * P + ph) * P + pw;
              if (cnt[index] <= 0) continue;
              const scalar_t go = g[index] / cnt[index];
              const int64_t channel = (ctop * group_size + cfg.group_of(ph)) * group_size + cfg.group_of(pw);
              const scalar_t* plane = in + (roi.batch_index * C + channel) * H * W;
              scalar_t dx = 0, dy = 0;
              for_each_sample(cfg, roi, tr, r, ctop, ph, pw, H, W, [&](const PSSample<scalar_t>& s) {
                dx += s.d_dx(plane);
                dy += s.d_dy(plane);
              });
              const int64_t cell = cfg.part_of(ph) * part + cfg.part_of(pw);
              gx[cell] += go * dx * static_cast<scalar_t>(trans_std) * roi.roi_w;
              gy[cell] += go * dy * static_cast<scalar_t>(trans_std) * roi.roi_h;
            }
          }
        }
      }
    });
  });
  return {grad_input, grad_trans};
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_psroi_pool"), TORCH_FN(deform_psroi_pool_forward_kernel));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_psroi_pool_backward"),
      TORCH_FN(deform_psroi_pool_backward_kernel));
}

} // namespace ops
} // namespace dcn_inspect
