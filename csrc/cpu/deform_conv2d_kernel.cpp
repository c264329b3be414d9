// CPU kernels of deformable convolution v1/v2: deformable im2col + GEMM.
//
// Semantics (PAPER.md §1, torchvision/DCNv2): the sample for output (i, j), kernel point
// (a, b) sits at y = i*stride_h - pad_h + a*dilation_h + dy, x = j*stride_w - pad_w +
// b*dilation_w + dx; it is zero unless -1 < y < H and -1 < x < W, and inside that band each
// bilinear corner outside the map contributes zero. With a mask the sample is multiplied by
// the mask value. Offsets: channel 2*(g*K + k) is dy, the next dx; mask channel g*K + k.
//
// The batch is processed in chunks whose column buffer [C*K, chunk*L] fits the budget of
// checks.h. Sampling geometry is shared by the C / offset_groups channels of an offset group,
// so it is computed once per (image, offset group, kernel point, position) into a table of
// four corner indices and four (mask-scaled) weights, and im2col / col2im only gather or
// scatter, walking the table in blocks of positions that stay in L1 while a block of
// channels reuses them. Every parallel loop partitions its writes: im2col and col2im own a
// block of (image, channel) planes each, and the offset / mask gradients own one (image,
// offset group, block of positions) each, so the backward needs no atomics. Scratch buffers
// are kept per thread between calls: fresh large allocations are page-faulted in on every
// call, which costs as much as the gather itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace dcn_inspect {
namespace ops {

namespace {

// Bilinear sample of one (image, offset group, kernel point, position): corner indices into
// the H*W plane and weights (already multiplied by the mask). Corners that contribute
// nothing have weight 0 and index 0, so the gather needs no branch.
template <typename scalar_t>
struct Sample {
  int32_t index[4];
  scalar_t weight[4];
};

// Sampling location of kernel point k at output position l for the given image/offset group.
struct SampleLocator {
  const DeformConvGeometry& g;
  template <typename scalar_t>
  inline void locate(
      const scalar_t* offset_plane_y,
      const scalar_t* offset_plane_x,
      int64_t k,
      int64_t l,
      scalar_t& y,
      scalar_t& x) const {
    const int64_t i = l / g.out_w;
    const int64_t j = l - i * g.out_w;
    const int64_t a = k / g.kernel_w;
    const int64_t b = k - a * g.kernel_w;
    y = static_cast<scalar_t>(i * g.stride_h - g.pad_h + a * g.dilation_h) + offset_plane_y[l];
    x = static_cast<scalar_t>(j * g.stride_w - g.pad_w + b * g.dilation_w) + offset_plane_x[l];
  }
};

// Fills table[b][og][k][l] for the images [first, first + count) of the batch.
template <typename scalar_t>
void build_sample_table(
    const DeformConvGeometry& g,
    const scalar_t* offset,
    const scalar_t* mask,
    int64_t first,
    int64_t count,
    Sample<scalar_t>* table) {
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t OG = g.offset_groups;
  const int64_t H = g.height;
  const int64_t W = g.width;
  const SampleLocator locator{g};
  at::parallel_for(0, count * OG * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (OG * K);
      const int64_t ogk = task - b * OG * K;  // og * K + k
      const int64_t k = ogk % K;
      const scalar_t* off_y = offset + (((first + b) * OG * K + ogk) * 2) * L;
      const scalar_t* off_x = off_y + L;
      const scalar_t* m = mask ? mask + ((first + b) * OG * K + ogk) * L : nullptr;
      Sample<scalar_t>* out = table + task * L;
      for (int64_t l = 0; l < L; ++l) {
        Sample<scalar_t> s;
        for (int c = 0; c < 4; ++c) {
          s.index[c] = 0;
          s.weight[c] = 0;
        }
        scalar_t y, x;
        locator.locate(off_y, off_x, k, l, y, x);
        if (y > -1 && y < H && x > -1 && x < W) {
          const scalar_t y0f = std::floor(y);
          const scalar_t x0f = std::floor(x);
          const int64_t y0 = static_cast<int64_t>(y0f);
          const int64_t x0 = static_cast<int64_t>(x0f);
          const scalar_t ly = y - y0f, lx = x - x0f;
          const scalar_t hy = 1 - ly, hx = 1 - lx;
          const scalar_t scale = m ? m[l] : scalar_t(1);
          const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
          if (top && left) {
            s.index[0] = static_cast<int32_t>(y0 * W + x0);
            s.weight[0] = hy * hx * scale;
          }
          if (top && right) {
            s.index[1] = static_cast<int32_t>(y0 * W + x0 + 1);
            s.weight[1] = hy * lx * scale;
          }
          if (bottom && left) {
            s.index[2] = static_cast<int32_t>((y0 + 1) * W + x0);
            s.weight[2] = ly * hx * scale;
          }
          if (bottom && right) {
            s.index[3] = static_cast<int32_t>((y0 + 1) * W + x0 + 1);
            s.weight[3] = ly * lx * scale;
          }
        }
        out[l] = s;
      }
    }
  });
}

// Positions per table block (32 bytes per float entry: 8 KiB, L1-resident) and channels per
// task in im2col / col2im.
constexpr int64_t kPositionBlock = 256;
constexpr int64_t kChannelBlock = 16;

// Calls body(b, og, c_begin, c_end) for blocks of channels of one offset group, in parallel.
template <typename F>
void parallel_over_channel_blocks(const DeformConvGeometry& g, int64_t count, const F& body) {
  const int64_t per_group = g.channels / g.offset_groups;
  const int64_t blocks = (per_group + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, count * g.offset_groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks;
      const int64_t og = (task / blocks) % g.offset_groups;
      const int64_t b = task / (blocks * g.offset_groups);
      const int64_t c_begin = og * per_group + block * kChannelBlock;
      body(b, og, c_begin, std::min(c_begin + kChannelBlock, (og + 1) * per_group));
    }
  });
}

// columns[c*K + k][b*L + l] = sampled (masked) input of image first+b, channel c.
template <typename scalar_t>
void deformable_im2col(
    const DeformConvGeometry& g,
    const scalar_t* input,
    const Sample<scalar_t>* table,
    int64_t first,
    int64_t count,
    scalar_t* columns) {
  const int64_t C = g.channels;
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t HW = g.height * g.width;
  const int64_t row_stride = count * L;
  parallel_over_channel_blocks(g, count, [&](int64_t b, int64_t og, int64_t c_begin, int64_t c_end) {
    const Sample<scalar_t>* samples = table + (b * g.offset_groups + og) * K * L;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t l0 = 0; l0 < L; l0 += kPositionBlock) {
        const int64_t n = std::min(kPositionBlock, L - l0);
        const Sample<scalar_t>* s = samples + k * L + l0;
        for (int64_t c = c_begin; c < c_end; ++c) {
          scalar_t* col = columns + (c * K + k) * row_stride + b * L + l0;
          if (HW == 0) {
            std::fill(col, col + n, scalar_t(0));
            continue;
          }
          const scalar_t* plane = input + ((first + b) * C + c) * HW;
          for (int64_t t = 0; t < n; ++t) {
            col[t] = s[t].weight[0] * plane[s[t].index[0]] + s[t].weight[1] * plane[s[t].index[1]] +
                s[t].weight[2] * plane[s[t].index[2]] + s[t].weight[3] * plane[s[t].index[3]];
          }
        }
      }
    }
  });
}

// grad_input[first+b][c] += scatter of columns[c*K + k][b*L + l] through the sample weights.
template <typename scalar_t>
void deformable_col2im(
    const DeformConvGeometry& g,
    const scalar_t* grad_columns,
    const Sample<scalar_t>* table,
    int64_t first,
    int64_t count,
    scalar_t* grad_input) {
  const int64_t C = g.channels;
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t HW = g.height * g.width;
  if (HW == 0) {
    return;
  }
  const int64_t row_stride = count * L;
  parallel_over_channel_blocks(g, count, [&](int64_t b, int64_t og, int64_t c_begin, int64_t c_end) {
    const Sample<scalar_t>* samples = table + (b * g.offset_groups + og) * K * L;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t l0 = 0; l0 < L; l0 += kPositionBlock) {
        const int64_t n = std::min(kPositionBlock, L - l0);
        const Sample<scalar_t>* s = samples + k * L + l0;
        for (int64_t c = c_begin; c < c_end; ++c) {
          const scalar_t* col = grad_columns + (c * K + k) * row_stride + b * L + l0;
          scalar_t* plane = grad_input + ((first + b) * C + c) * HW;
          for (int64_t t = 0; t < n; ++t) {
            const scalar_t v = col[t];
            plane[s[t].index[0]] += s[t].weight[0] * v;
            plane[s[t].index[1]] += s[t].weight[1] * v;
            plane[s[t].index[2]] += s[t].weight[2] * v;
            plane[s[t].index[3]] += s[t].weight[3] * v;
          }
        }
      }
    }
  });
}

// Bilinear corners of one sample for the offset / mask gradients: indices, 0/1 validity and
// the fractional parts. Samples outside the band have no valid corner and in_band false.
template <typename scalar_t>
struct GradSample {
  int32_t index[4];
  scalar_t valid[4];
  scalar_t ly, lx;
  bool in_band;
};

// Gradients of the offsets (and mask) for images [first, first + count).
// grad_columns holds dLoss/d(column) where column = mask * bilinear(input). One task owns one
// (image, offset group, block of positions) for all kernel points and walks the group's
// channels once, so each input plane is read while it is hot for every kernel point.
template <typename scalar_t>
void deformable_offset_mask_grad(
    const DeformConvGeometry& g,
    const scalar_t* input,
    const scalar_t* offset,
    const scalar_t* mask,
    const scalar_t* grad_columns,
    int64_t first,
    int64_t count,
    scalar_t* grad_offset,
    scalar_t* grad_mask) {
  constexpr int64_t kBlock = 64;
  const int64_t C = g.channels;
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t OG = g.offset_groups;
  const int64_t H = g.height;
  const int64_t W = g.width;
  const int64_t HW = H * W;
  const int64_t channels_per_offset_group = C / OG;
  const int64_t row_stride = count * L;
  const int64_t blocks = (L + kBlock - 1) / kBlock;
  const SampleLocator locator{g};
  at::parallel_for(0, count * OG * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<GradSample<scalar_t>> samples(K * kBlock);
    std::vector<scalar_t> acc(3 * K * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks;
      const int64_t og = (task / blocks) % OG;
      const int64_t b = task / (blocks * OG);
      const int64_t l_begin = block * kBlock;
      const int64_t n = std::min(kBlock, L - l_begin);
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t offset_base = (((first + b) * OG + og) * K + k) * 2 * L;
        for (int64_t t = 0; t < n; ++t) {
          GradSample<scalar_t>& s = samples[k * kBlock + t];
          scalar_t y, x;
          locator.locate(offset + offset_base, offset + offset_base + L, k, l_begin + t, y, x);
          for (int q = 0; q < 4; ++q) {
            s.index[q] = 0;
            s.valid[q] = 0;
          }
          s.ly = s.lx = 0;
          s.in_band = HW > 0 && y > -1 && y < H && x > -1 && x < W;
          if (!s.in_band) {
            continue;
          }
          const scalar_t y0f = std::floor(y);
          const scalar_t x0f = std::floor(x);
          const int64_t y0 = static_cast<int64_t>(y0f);
          const int64_t x0 = static_cast<int64_t>(x0f);
          s.ly = y - y0f;
          s.lx = x - x0f;
          const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
          if (top && left) {
            s.index[0] = static_cast<int32_t>(y0 * W + x0);
            s.valid[0] = 1;
          }
          if (top && right) {
            s.index[1] = static_cast<int32_t>(y0 * W + x0 + 1);
            s.valid[1] = 1;
          }
          if (bottom && left) {
            s.index[2] = static_cast<int32_t>((y0 + 1) * W + x0);
            s.valid[2] = 1;
          }
          if (bottom && right) {
            s.index[3] = static_cast<int32_t>((y0 + 1) * W + x0 + 1);
            s.valid[3] = 1;
          }
        }
      }
      if (HW > 0) {
        for (int64_t ci = 0; ci < channels_per_offset_group; ++ci) {
          const int64_t c = og * channels_per_offset_group + ci;
          const scalar_t* plane = input + ((first + b) * C + c) * HW;
          for (int64_t k = 0; k < K; ++k) {
            const scalar_t* col = grad_columns + (c * K + k) * row_stride + b * L + l_begin;
            const GradSample<scalar_t>* s = samples.data() + k * kBlock;
            scalar_t* acc_y = acc.data() + k * kBlock;
            scalar_t* acc_x = acc_y + K * kBlock;
            scalar_t* acc_m = acc_x + K * kBlock;
            for (int64_t t = 0; t < n; ++t) {
              const scalar_t v00 = s[t].valid[0] * plane[s[t].index[0]];
              const scalar_t v01 = s[t].valid[1] * plane[s[t].index[1]];
              const scalar_t v10 = s[t].valid[2] * plane[s[t].index[2]];
              const scalar_t v11 = s[t].valid[3] * plane[s[t].index[3]];
              const scalar_t ly = s[t].ly, lx = s[t].lx;
              const scalar_t hy = 1 - ly, hx = 1 - lx;
              const scalar_t gc = col[t];
              acc_y[t] += gc * (hx * (v10 - v00) + lx * (v11 - v01));
              acc_x[t] += gc * (hy * (v01 - v00) + ly * (v11 - v10));
              acc_m[t] += gc * (hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11));
            }
          }
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t ogk = og * K + k;
        scalar_t* gy = grad_offset + (((first + b) * OG * K + ogk) * 2) * L + l_begin;
        scalar_t* gx = gy + L;
        const int64_t mask_base = ((first + b) * OG * K + ogk) * L + l_begin;
        const GradSample<scalar_t>* s = samples.data() + k * kBlock;
        const scalar_t* acc_y = acc.data() + k * kBlock;
        const scalar_t* acc_x = acc_y + K * kBlock;
        const scalar_t* acc_m = acc_x + K * kBlock;
        for (int64_t t = 0; t < n; ++t) {
          const scalar_t scale = mask ? mask[mask_base + t] : scalar_t(1);
          gy[t] = s[t].in_band ? scale * acc_y[t] : scalar_t(0);
          gx[t] = s[t].in_band ? scale * acc_x[t] : scalar_t(0);
          if (grad_mask) {
            grad_mask[mask_base + t] = s[t].in_band ? acc_m[t] : scalar_t(0);
          }
        }
      }
    }
  });
}

// Per-thread scratch memory kept between calls (slot: which buffer). The returned tensor is
// a view of the first numel elements; it must not escape the kernel.
at::Tensor scratch(int slot, int64_t numel, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, 4> cache;
  at::Tensor& buffer = cache.at(slot);
  if (!buffer.defined() || buffer.numel() < numel || buffer.scalar_type() != options.dtype()) {
    buffer = at::Tensor();  // release the old buffer before allocating the new one
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel);
}

enum ScratchSlot { kColumns = 0, kTable = 1, kStaged = 2 };

template <typename scalar_t>
Sample<scalar_t>* sample_table(int64_t entries) {
  const int64_t bytes = entries * static_cast<int64_t>(sizeof(Sample<scalar_t>));
  return reinterpret_cast<Sample<scalar_t>*>(scratch(kTable, bytes, at::TensorOptions().dtype(at::kByte)).data_ptr());
}

int64_t column_bytes_per_image(const DeformConvGeometry& g, const at::Tensor& input) {
  return g.channels * g.kernel_points() * g.positions() * static_cast<int64_t>(input.element_size());
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.numel() == 0 || t.device().is_cpu(), "deform_conv2d: ", name, " must be a CPU tensor");
}

at::Tensor deform_conv2d_forward_kernel(
    const at::Tensor& input_,
    const at::Tensor& weight_,
    const at::Tensor& offset_,
    const at::Tensor& mask_,
    const at::Tensor& bias_,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  check_cpu(input_, "input");
  check_cpu(weight_, "weight");
  check_cpu(offset_, "offset");
  check_cpu(mask_, "mask");
  check_cpu(bias_, "bias");
  const DeformConvGeometry g = check_deform_conv2d_args(
      input_, weight_, offset_, mask_, bias_, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_groups, use_mask);
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = use_mask ? mask_.contiguous() : at::Tensor();
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0) {
    return output;
  }
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t out_per_group = g.out_channels / g.groups;
  const int64_t col_rows_per_group = g.channels / g.groups * K;
  const at::Tensor weight_groups = weight.view({g.groups, out_per_group, col_rows_per_group});
  const int64_t chunk = images_per_chunk(g.batch, column_bytes_per_image(g, input));

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    Sample<scalar_t>* table = sample_table<scalar_t>(chunk * g.offset_groups * K * L);
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      build_sample_table<scalar_t>(
          g, offset.data_ptr<scalar_t>(), use_mask ? mask.data_ptr<scalar_t>() : nullptr, first,
          count, table);
      const at::Tensor cols = scratch(kColumns, g.channels * K * count * L, input.options());
      deformable_im2col<scalar_t>(g, input.data_ptr<scalar_t>(), table, first, count, cols.data_ptr<scalar_t>());
      const at::Tensor cols_groups = cols.view({g.groups, col_rows_per_group, count * L});
      if (count == 1) {
        const at::Tensor out_groups = output[first].view({g.groups, out_per_group, L});
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor out_slice = out_groups[grp];
          at::mm_out(out_slice, weight_groups[grp], cols_groups[grp]);
        }
      } else {
        // GEMM output is [O, count*L]; the batch dimension goes in front when copied out.
        const at::Tensor staged =
            scratch(kStaged, g.out_channels * count * L, input.options()).view({g.groups, out_per_group, count * L});
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor out_slice = staged[grp];
          at::mm_out(out_slice, weight_groups[grp], cols_groups[grp]);
        }
        output.narrow(0, first, count)
            .view({count, g.out_channels, L})
            .copy_(staged.view({g.out_channels, count, L}).transpose(0, 1));
      }
    }
  });
  if (bias_.numel() > 0) {
    output.add_(bias_.contiguous().view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
deform_conv2d_backward_kernel(
    const at::Tensor& grad_,
    const at::Tensor& input_,
    const at::Tensor& weight_,
    const at::Tensor& offset_,
    const at::Tensor& mask_,
    const at::Tensor& bias_,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups,
    bool use_mask) {
  check_cpu(grad_, "grad");
  check_cpu(input_, "input");
  check_cpu(weight_, "weight");
  check_cpu(offset_, "offset");
  check_cpu(mask_, "mask");
  check_cpu(bias_, "bias");
  const DeformConvGeometry g = check_deform_conv2d_args(
      input_, weight_, offset_, mask_, bias_, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_groups, use_mask);
  TORCH_CHECK(
      grad_.dim() == 4 && grad_.size(0) == g.batch && grad_.size(1) == g.out_channels &&
          grad_.size(2) == g.out_h && grad_.size(3) == g.out_w,
      "deform_conv2d backward: grad has shape ", grad_.sizes(), "; expected [", g.batch, ", ",
      g.out_channels, ", ", g.out_h, ", ", g.out_w, "]");
  TORCH_CHECK(grad_.scalar_type() == input_.scalar_type(), "deform_conv2d backward: grad dtype differs");
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = use_mask ? mask_.contiguous() : at::Tensor();

  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = use_mask ? at::zeros_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_bias = bias_.numel() > 0 ? grad.sum({0, 2, 3}) : at::empty({0}, input.options());
  if (g.batch == 0) {
    return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  }

  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t out_per_group = g.out_channels / g.groups;
  const int64_t col_rows_per_group = g.channels / g.groups * K;
  const at::Tensor weight_groups = weight.view({g.groups, out_per_group, col_rows_per_group});
  const at::Tensor grad_weight_groups = grad_weight.view({g.groups, out_per_group, col_rows_per_group});
  const int64_t chunk = images_per_chunk(g.batch, column_bytes_per_image(g, input));

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    Sample<scalar_t>* table = sample_table<scalar_t>(chunk * g.offset_groups * K * L);
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      build_sample_table<scalar_t>(
          g, offset.data_ptr<scalar_t>(), use_mask ? mask.data_ptr<scalar_t>() : nullptr, first,
          count, table);
      const at::Tensor columns = scratch(kColumns, g.channels * K * count * L, input.options());
      deformable_im2col<scalar_t>(g, input.data_ptr<scalar_t>(), table, first, count, columns.data_ptr<scalar_t>());
      // grad of this chunk's output laid out [O, count*L] like the GEMM output.
      const at::Tensor grad_chunk = count == 1
          ? grad[first].view({g.out_channels, L})
          : grad.narrow(0, first, count).view({count, g.out_channels, L}).transpose(0, 1).contiguous().view(
                {g.out_channels, count * L});
      const at::Tensor grad_groups = grad_chunk.view({g.groups, out_per_group, count * L});
      const at::Tensor col_groups = columns.view({g.groups, col_rows_per_group, count * L});
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        at::Tensor grad_weight_slice = grad_weight_groups[grp];
        grad_weight_slice.addmm_(grad_groups[grp], col_groups[grp].t());
        // The columns are not needed any more: reuse their storage for their gradient.
        at::Tensor col_slice = col_groups[grp];
        at::mm_out(col_slice, weight_groups[grp].t(), grad_groups[grp]);
      }
      const scalar_t* grad_columns = columns.data_ptr<scalar_t>();
      deformable_col2im<scalar_t>(
          g, grad_columns, table, first, count, grad_input.data_ptr<scalar_t>());
      deformable_offset_mask_grad<scalar_t>(
          g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
          use_mask ? mask.data_ptr<scalar_t>() : nullptr, grad_columns, first, count,
          grad_offset.data_ptr<scalar_t>(), use_mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
    }
  });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_conv2d"), TORCH_FN(deform_conv2d_forward_kernel));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_conv2d_backward"),
      TORCH_FN(deform_conv2d_backward_kernel));
}

} // namespace ops
} // namespace dcn_inspect
