// Shape and argument checks shared by the CPU and CUDA kernels of the deformable ops.
//
// The Python wrappers validate every argument first (dcn_inspect/ops/_validate.py) and raise
// OpsArgumentError; these TORCH_CHECKs are the second line of defence for direct
// torch.ops.dcn_inspect.* calls, so that no shape can make a kernel read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

namespace dcn_inspect {
namespace ops {

// Everything a deformable convolution kernel needs to know about its operands.
struct DeformConvGeometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, offset_groups;
  bool use_mask;

  int64_t kernel_points() const { return kernel_h * kernel_w; }
  int64_t positions() const { return out_h * out_w; }
};

inline DeformConvGeometry check_deform_conv2d_args(
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
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: input must be 4-D, got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "deform_conv2d: weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(offset.dim() == 4, "deform_conv2d: offset must be 4-D, got ", offset.sizes());
  TORCH_CHECK(
      weight.scalar_type() == input.scalar_type() && offset.scalar_type() == input.scalar_type(),
      "deform_conv2d: input, weight and offset must share a dtype");
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1, "deform_conv2d: stride must be >= 1");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "deform_conv2d: padding must be >= 0");
  TORCH_CHECK(dilation_h >= 1 && dilation_w >= 1, "deform_conv2d: dilation must be >= 1");
  DeformConvGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.dilation_w = dilation_w;
  g.groups = groups;
  g.offset_groups = offset_groups;
  g.use_mask = use_mask;
  TORCH_CHECK(
      g.out_channels >= 1 && weight.size(1) >= 1 && g.kernel_h >= 1 && g.kernel_w >= 1,
      "deform_conv2d: weight has an empty dimension: ", weight.sizes());
  TORCH_CHECK(groups >= 1 && offset_groups >= 1, "deform_conv2d: groups and offset_groups must be >= 1");
  TORCH_CHECK(
      g.channels == weight.size(1) * groups,
      "deform_conv2d: input channels (", g.channels, ") != weight.size(1) (", weight.size(1),
      ") * groups (", groups, ")");
  TORCH_CHECK(
      g.out_channels % groups == 0,
      "deform_conv2d: out channels (", g.out_channels, ") not divisible by groups (", groups, ")");
  TORCH_CHECK(
      g.channels % offset_groups == 0,
      "deform_conv2d: input channels (", g.channels, ") not divisible by offset_groups (",
      offset_groups, ")");
  g.out_h = (g.height + 2 * pad_h - dilation_h * (g.kernel_h - 1) - 1) / stride_h + 1;
  g.out_w = (g.width + 2 * pad_w - dilation_w * (g.kernel_w - 1) - 1) / stride_w + 1;
  TORCH_CHECK(
      g.height + 2 * pad_h - dilation_h * (g.kernel_h - 1) - 1 >= 0 &&
          g.width + 2 * pad_w - dilation_w * (g.kernel_w - 1) - 1 >= 0,
      "deform_conv2d: input ", g.height, "x", g.width, " is too small for the kernel");
  TORCH_CHECK(
      offset.size(0) == g.batch && offset.size(1) == 2 * offset_groups * g.kernel_points() &&
          offset.size(2) == g.out_h && offset.size(3) == g.out_w,
      "deform_conv2d: offset has shape ", offset.sizes(), "; expected [", g.batch, ", ",
      2 * offset_groups * g.kernel_points(), ", ", g.out_h, ", ", g.out_w, "]");
  if (use_mask) {
    TORCH_CHECK(mask.scalar_type() == input.scalar_type(), "deform_conv2d: mask dtype differs from input");
    TORCH_CHECK(
        mask.dim() == 4 && mask.size(0) == g.batch &&
            mask.size(1) == offset_groups * g.kernel_points() && mask.size(2) == g.out_h &&
            mask.size(3) == g.out_w,
        "deform_conv2d: mask has shape ", mask.sizes(), "; expected [", g.batch, ", ",
        offset_groups * g.kernel_points(), ", ", g.out_h, ", ", g.out_w, "]");
  }
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == input.scalar_type(), "deform_conv2d: bias dtype differs from input");
    TORCH_CHECK(
        bias.dim() == 1 && bias.size(0) == g.out_channels,
        "deform_conv2d: bias has shape ", bias.sizes(), "; expected [", g.out_channels, "]");
  }
  TORCH_CHECK(
      g.height * g.width < std::numeric_limits<int32_t>::max(),
      "deform_conv2d: input plane of ", g.height, "x", g.width, " is too large");
  return g;
}

inline void check_rois_arg(const at::Tensor& input, const at::Tensor& rois, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D, got ", input.sizes());
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5, op, ": rois must have shape [R, 5], got ", rois.sizes());
  TORCH_CHECK(rois.scalar_type() == input.scalar_type(), op, ": rois dtype differs from input");
}

inline void check_deform_roi_pool_args(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& offset,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    int64_t sampling_ratio) {
  check_rois_arg(input, rois, "deform_roi_pool");
  TORCH_CHECK(pooled_height >= 1 && pooled_width >= 1, "deform_roi_pool: pooled size must be >= 1");
  TORCH_CHECK(spatial_scale > 0, "deform_roi_pool: spatial_scale must be > 0");
  (void)sampling_ratio;  // <= 0 means adaptive (mmcv 0, torchvision -1)
  if (offset.numel() > 0) {
    TORCH_CHECK(offset.scalar_type() == input.scalar_type(), "deform_roi_pool: offset dtype differs from input");
    TORCH_CHECK(
        offset.dim() == 4 && offset.size(0) == rois.size(0) && offset.size(1) == 2 &&
            offset.size(2) == pooled_height && offset.size(3) == pooled_width,
        "deform_roi_pool: offset has shape ", offset.sizes(), "; expected [", rois.size(0), ", 2, ",
        pooled_height, ", ", pooled_width, "]");
  }
}

// Returns the number of classes carried by trans (1 without trans).
inline int64_t check_deform_psroi_pool_args(
    const at::Tensor& input,
    const at::Tensor& rois,
    const at::Tensor& trans,
    int64_t output_dim,
    int64_t group_size,
    int64_t pooled_size,
    int64_t part_size,
    int64_t sample_per_part) {
  check_rois_arg(input, rois, "deform_psroi_pool");
  TORCH_CHECK(
      output_dim >= 1 && group_size >= 1 && pooled_size >= 1 && part_size >= 1 && sample_per_part >= 1,
      "deform_psroi_pool: output_dim, group_size, pooled_size, part_size and sample_per_part must be >= 1");
  TORCH_CHECK(
      input.size(1) == output_dim * group_size * group_size,
      "deform_psroi_pool: input has ", input.size(1), " channels; expected output_dim * group_size^2 = ",
      output_dim * group_size * group_size);
  if (trans.numel() == 0) {
    return 1;
  }
  TORCH_CHECK(trans.scalar_type() == input.scalar_type(), "deform_psroi_pool: trans dtype differs from input");
  TORCH_CHECK(
      trans.dim() == 4 && trans.size(0) == rois.size(0) && trans.size(1) % 2 == 0 &&
          trans.size(2) == part_size && trans.size(3) == part_size,
      "deform_psroi_pool: trans has shape ", trans.sizes(), "; expected [", rois.size(0),
      ", 2*num_classes, ", part_size, ", ", part_size, "]");
  const int64_t num_classes = trans.size(1) / 2;
  TORCH_CHECK(
      output_dim % num_classes == 0, "deform_psroi_pool: output_dim (", output_dim,
      ") is not divisible by the number of classes (", num_classes, ")");
  return num_classes;
}

// RoI batch index, checked against the batch size so a bad row can never index out of bounds.
template <typename scalar_t>
inline int64_t roi_batch_index(const scalar_t* roi, int64_t batch, const char* op) {
  const double value = static_cast<double>(roi[0]);
  TORCH_CHECK(
      value >= 0 && value < static_cast<double>(batch), op, ": roi batch index ", value,
      " is outside [0, ", batch - 1, "]");
  return static_cast<int64_t>(value);
}

// Bytes of im2col column buffer a deformable convolution may hold at once; the batch is
// processed in chunks that fit. DCN_INSPECT_COLUMN_BUDGET (bytes) overrides the default, so
// tests can force chunks of a single image.
inline int64_t column_budget_bytes() {
  constexpr int64_t kDefaultBudget = int64_t(64) << 20;
  const char* env = std::getenv("DCN_INSPECT_COLUMN_BUDGET");
  if (env == nullptr || *env == '\0') {
    return kDefaultBudget;
  }
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  return (end != env && value > 0) ? static_cast<int64_t>(value) : kDefaultBudget;
}

// Number of images per chunk: as many as fit in the column budget, at least one.
inline int64_t images_per_chunk(int64_t batch, int64_t column_bytes_per_image) {
  const int64_t fit = column_budget_bytes() / std::max<int64_t>(column_bytes_per_image, 1);
  return std::max<int64_t>(1, std::min<int64_t>(batch, fit));
}

// An operand of a CPU kernel must live on the CPU (an empty tensor, e.g. an absent mask or
// bias, may live anywhere). ``op`` names the operator in the message.
inline void check_cpu_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

// The gradient of deform_conv2d's output, [N, out_channels, out_h, out_w] of the forward's
// geometry (``Geometry``: DeformConvGeometry, or a backend's copy with the same fields).
template <typename Geometry>
void check_deform_conv2d_grad(const at::Tensor& grad, const Geometry& g) {
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == g.batch && grad.size(1) == g.out_channels &&
          grad.size(2) == g.out_h && grad.size(3) == g.out_w,
      "deform_conv2d backward: grad has shape ", grad.sizes(), "; expected [", g.batch, ", ",
      g.out_channels, ", ", g.out_h, ", ", g.out_w, "]");
}

} // namespace ops
} // namespace dcn_inspect
