// CUDA deformable convolution v1 / modulated v2: forward and backward.
//
// Semantics are those of dcn_inspect/ops/reference.py (PAPER.md §1): sampling location of
// output (i, j), kernel point (a, b): y = i*stride_h - pad_h + a*dilation_h + dy,
// x = j*stride_w - pad_w + b*dilation_w + dx; offset channel 2*(g*K + a*kw + b) = dy and the
// next = dx; a sample is zero unless -1 < y < H and -1 < x < W, and inside that band each
// bilinear corner outside the map contributes zero. The mask multiplies each sample.
//
// Forward: deformable im2col into a column buffer [C*K, nb*L] (nb images of a batch chunk,
// L = Hout*Wout, column index b*L + l), then one GEMM per group. Backward: grad_columns =
// W^T grad per group; col2im scatters to grad_input (atomicAdd into an opmath buffer); a
// per-(image, offset group, kernel point, position) kernel reduces over the group's channels
// to grad_offset / grad_mask; the columns are recomputed for grad_weight.
#include "../checks.h"
#include "cuda_helpers.cuh"

#include <torch/library.h>

#include <tuple>

namespace dcn_inspect {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t read_or_zero(
    const scalar_t* plane, index_t height, index_t width, index_t y, index_t x) {
  return (y >= 0 && y < height && x >= 0 && x < width)
      ? static_cast<acc_t>(plane[y * width + x])
      : acc_t(0);
}

// Bilinear value with the DCN border rule; the caller has checked -1 < y < H, -1 < x < W.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t bilinear_dcn(
    const scalar_t* plane, index_t height, index_t width, acc_t y, acc_t x) {
  const acc_t fy = dcn_floor(y);
  const acc_t fx = dcn_floor(x);
  const index_t y0 = static_cast<index_t>(fy);
  const index_t x0 = static_cast<index_t>(fx);
  const acc_t ly = y - fy, lx = x - fx;
  const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
  const acc_t v00 = read_or_zero<scalar_t, acc_t, index_t>(plane, height, width, y0, x0);
  const acc_t v01 = read_or_zero<scalar_t, acc_t, index_t>(plane, height, width, y0, x0 + 1);
  const acc_t v10 = read_or_zero<scalar_t, acc_t, index_t>(plane, height, width, y0 + 1, x0);
  const acc_t v11 = read_or_zero<scalar_t, acc_t, index_t>(plane, height, width, y0 + 1, x0 + 1);
  return hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11;
}

template <typename acc_t, typename index_t>
__device__ __forceinline__ bool in_band(acc_t y, acc_t x, index_t height, index_t width) {
  return y > acc_t(-1) && y < static_cast<acc_t>(height) && x > acc_t(-1) &&
      x < static_cast<acc_t>(width);
}

// columns[(c*K + k) * (nb*L) + b*L + l] = mask * bilinear(input[b, c], y, x).
// One thread per (c, b, out_y, out_x), looping over the K kernel points.
template <typename scalar_t, typename index_t>
__global__ void deformable_im2col_kernel(
    index_t n,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask,
    index_t height,
    index_t width,
    index_t kernel_h,
    index_t kernel_w,
    index_t pad_h,
    index_t pad_w,
    index_t stride_h,
    index_t stride_w,
    index_t dilation_h,
    index_t dilation_w,
    index_t batch_chunk,
    index_t channels,
    index_t offset_groups,
    index_t out_h,
    index_t out_w,
    bool use_mask,
    scalar_t* __restrict__ columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = out_h * out_w;
  const index_t K = kernel_h * kernel_w;
  const index_t channels_per_group = channels / offset_groups;
  DCN_CUDA_KERNEL_LOOP(index_t, index, n) {
    const index_t out_x = index % out_w;
    const index_t out_y = (index / out_w) % out_h;
    const index_t b = (index / L) % batch_chunk;
    const index_t c = index / (L * batch_chunk);
    const index_t grp = c / channels_per_group;
    const index_t l = out_y * out_w + out_x;

    const scalar_t* plane = input + (b * channels + c) * height * width;
    const scalar_t* off = offset + (b * offset_groups + grp) * 2 * K * L + l;
    const scalar_t* msk = use_mask ? mask + (b * offset_groups + grp) * K * L + l : nullptr;
    scalar_t* col = columns + (c * K) * (batch_chunk * L) + b * L + l;

    for (index_t a = 0; a < kernel_h; ++a) {
      for (index_t bb = 0; bb < kernel_w; ++bb) {
        const index_t k = a * kernel_w + bb;
        const acc_t y = static_cast<acc_t>(out_y * stride_h - pad_h + a * dilation_h) +
            static_cast<acc_t>(off[(2 * k) * L]);
        const acc_t x = static_cast<acc_t>(out_x * stride_w - pad_w + bb * dilation_w) +
            static_cast<acc_t>(off[(2 * k + 1) * L]);
        acc_t value = acc_t(0);
        if (in_band<acc_t, index_t>(y, x, height, width)) {
          value = bilinear_dcn<scalar_t, acc_t, index_t>(plane, height, width, y, x);
        }
        if (use_mask) {
          value *= static_cast<acc_t>(msk[k * L]);
        }
        col[k * (batch_chunk * L)] = static_cast<scalar_t>(value);
      }
    }
  }
}

// grad_input[b, c] += mask * corner weight * grad_columns, for every valid corner.
// One thread per grad_columns element ((c*K + k) * nb + b) * L + l.
template <typename scalar_t, typename index_t>
__global__ void deformable_col2im_kernel(
    index_t n,
    const scalar_t* __restrict__ grad_columns,
    const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask,
    index_t height,
    index_t width,
    index_t kernel_h,
    index_t kernel_w,
    index_t pad_h,
    index_t pad_w,
    index_t stride_h,
    index_t stride_w,
    index_t dilation_h,
    index_t dilation_w,
    index_t batch_chunk,
    index_t channels,
    index_t offset_groups,
    index_t out_h,
    index_t out_w,
    bool use_mask,
    at::opmath_type<scalar_t>* __restrict__ grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = out_h * out_w;
  const index_t K = kernel_h * kernel_w;
  const index_t channels_per_group = channels / offset_groups;
  DCN_CUDA_KERNEL_LOOP(index_t, index, n) {
    const index_t l = index % L;
    const index_t b = (index / L) % batch_chunk;
    const index_t k = (index / (L * batch_chunk)) % K;
    const index_t c = index / (L * batch_chunk * K);
    const index_t grp = c / channels_per_group;
    const index_t out_x = l % out_w;
    const index_t out_y = l / out_w;
    const index_t a = k / kernel_w;
    const index_t bb = k % kernel_w;

    const scalar_t* off = offset + (b * offset_groups + grp) * 2 * K * L;
    const acc_t y = static_cast<acc_t>(out_y * stride_h - pad_h + a * dilation_h) +
        static_cast<acc_t>(off[(2 * k) * L + l]);
    const acc_t x = static_cast<acc_t>(out_x * stride_w - pad_w + bb * dilation_w) +
        static_cast<acc_t>(off[(2 * k + 1) * L + l]);
    if (!in_band<acc_t, index_t>(y, x, height, width)) {
      continue;
    }
    acc_t g = static_cast<acc_t>(grad_columns[index]);
    if (use_mask) {
      g *= static_cast<acc_t>(mask[((b * offset_groups + grp) * K + k) * L + l]);
    }
    if (g == acc_t(0)) {
      continue;
    }
    const acc_t fy = dcn_floor(y);
    const acc_t fx = dcn_floor(x);
    const index_t y0 = static_cast<index_t>(fy);
    const index_t x0 = static_cast<index_t>(fx);
    const acc_t ly = y - fy, lx = x - fx;
    const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
    acc_t* plane = grad_input + (b * channels + c) * height * width;
    const bool y0_ok = y0 >= 0;
    const bool y1_ok = y0 + 1 < height;
    const bool x0_ok = x0 >= 0;
    const bool x1_ok = x0 + 1 < width;
    if (y0_ok && x0_ok) atomicAdd(plane + y0 * width + x0, g * hy * hx);
    if (y0_ok && x1_ok) atomicAdd(plane + y0 * width + x0 + 1, g * hy * lx);
    if (y1_ok && x0_ok) atomicAdd(plane + (y0 + 1) * width + x0, g * ly * hx);
    if (y1_ok && x1_ok) atomicAdd(plane + (y0 + 1) * width + x0 + 1, g * ly * lx);
  }
}

// grad_offset (dy, dx) and grad_mask of one (b, offset group, kernel point, position),
// reduced over the channels of the offset group. With channel_split == 1 one thread does the
// whole reduction and stores the results; with channel_split = S > 1, S threads each reduce a
// contiguous slice of the channels and atomicAdd into zeroed opmath buffers (more threads in
// flight when K * L is small and the groups have many channels). Thread index:
// ((((s * nb + b) * G + grp) * K + k) * L + l), so neighbouring threads read neighbouring
// grad_columns entries.
template <typename scalar_t, typename index_t>
__global__ void deformable_col2im_coord_kernel(
    index_t n,
    const scalar_t* __restrict__ grad_columns,
    const scalar_t* __restrict__ input,
    const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask,
    index_t height,
    index_t width,
    index_t kernel_h,
    index_t kernel_w,
    index_t pad_h,
    index_t pad_w,
    index_t stride_h,
    index_t stride_w,
    index_t dilation_h,
    index_t dilation_w,
    index_t batch_chunk,
    index_t channels,
    index_t offset_groups,
    index_t out_h,
    index_t out_w,
    bool use_mask,
    index_t channel_split,
    scalar_t* __restrict__ grad_offset,
    scalar_t* __restrict__ grad_mask,
    at::opmath_type<scalar_t>* __restrict__ grad_offset_acc,
    at::opmath_type<scalar_t>* __restrict__ grad_mask_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t L = out_h * out_w;
  const index_t K = kernel_h * kernel_w;
  const index_t channels_per_group = channels / offset_groups;
  const index_t channels_per_slice = (channels_per_group + channel_split - 1) / channel_split;
  const index_t plane_size = height * width;
  const index_t per_slice = batch_chunk * offset_groups * K * L;
  DCN_CUDA_KERNEL_LOOP(index_t, index, n) {
    const index_t l = index % L;
    const index_t k = (index / L) % K;
    const index_t grp = (index / (L * K)) % offset_groups;
    const index_t b = (index / (L * K * offset_groups)) % batch_chunk;
    const index_t slice = index / per_slice;
    const index_t out_x = l % out_w;
    const index_t out_y = l / out_w;
    const index_t a = k / kernel_w;
    const index_t bb = k % kernel_w;

    const index_t off_base = (b * offset_groups + grp) * 2 * K * L;
    const acc_t y = static_cast<acc_t>(out_y * stride_h - pad_h + a * dilation_h) +
        static_cast<acc_t>(offset[off_base + (2 * k) * L + l]);
    const acc_t x = static_cast<acc_t>(out_x * stride_w - pad_w + bb * dilation_w) +
        static_cast<acc_t>(offset[off_base + (2 * k + 1) * L + l]);
    const index_t mask_index = ((b * offset_groups + grp) * K + k) * L + l;
    const acc_t m = use_mask ? static_cast<acc_t>(mask[mask_index]) : acc_t(1);

    acc_t grad_y = acc_t(0), grad_x = acc_t(0), grad_m = acc_t(0);
    const index_t c_first = slice * channels_per_slice;
    index_t c_last = c_first + channels_per_slice;
    c_last = c_last < channels_per_group ? c_last : channels_per_group;
    if (c_first < c_last && in_band<acc_t, index_t>(y, x, height, width)) {
      const acc_t fy = dcn_floor(y);
      const acc_t fx = dcn_floor(x);
      const index_t y0 = static_cast<index_t>(fy);
      const index_t x0 = static_cast<index_t>(fx);
      const acc_t ly = y - fy, lx = x - fx;
      const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
      const bool y0_ok = y0 >= 0;
      const bool y1_ok = y0 + 1 < height;
      const bool x0_ok = x0 >= 0;
      const bool x1_ok = x0 + 1 < width;
      const index_t i00 = y0 * width + x0;
      const index_t col_stride = batch_chunk * L;
      const index_t c_begin = grp * channels_per_group + c_first;
      const scalar_t* gcol = grad_columns + (c_begin * K + k) * col_stride + b * L + l;
      const scalar_t* plane = input + (b * channels + c_begin) * plane_size;
      for (index_t c = 0; c < c_last - c_first; ++c) {
        const acc_t g = static_cast<acc_t>(gcol[c * K * col_stride]);
        const scalar_t* p = plane + c * plane_size;
        const acc_t v00 = (y0_ok && x0_ok) ? static_cast<acc_t>(p[i00]) : acc_t(0);
        const acc_t v01 = (y0_ok && x1_ok) ? static_cast<acc_t>(p[i00 + 1]) : acc_t(0);
        const acc_t v10 = (y1_ok && x0_ok) ? static_cast<acc_t>(p[i00 + width]) : acc_t(0);
        const acc_t v11 = (y1_ok && x1_ok) ? static_cast<acc_t>(p[i00 + width + 1]) : acc_t(0);
        grad_y += g * (hx * (v10 - v00) + lx * (v11 - v01));
        grad_x += g * (hy * (v01 - v00) + ly * (v11 - v10));
        if (use_mask) {
          grad_m += g * (hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11);
        }
      }
    }
    if (channel_split == 1) {
      grad_offset[off_base + (2 * k) * L + l] = static_cast<scalar_t>(grad_y * m);
      grad_offset[off_base + (2 * k + 1) * L + l] = static_cast<scalar_t>(grad_x * m);
      if (use_mask) {
        grad_mask[mask_index] = static_cast<scalar_t>(grad_m);
      }
    } else {
      if (grad_y != acc_t(0)) atomicAdd(grad_offset_acc + off_base + (2 * k) * L + l, grad_y * m);
      if (grad_x != acc_t(0)) atomicAdd(grad_offset_acc + off_base + (2 * k + 1) * L + l, grad_x * m);
      if (use_mask && grad_m != acc_t(0)) atomicAdd(grad_mask_acc + mask_index, grad_m);
    }
  }
}

struct ConvGeometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, offset_groups;
  bool use_mask;
  int64_t chunk; // images per chunk
};

ConvGeometry check_and_geometry(
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
  TORCH_CHECK(input.is_cuda(), "dcn_inspect (CUDA): input must be a CUDA tensor");
  check_cuda_tensor(weight, input, "weight");
  check_cuda_tensor(offset, input, "offset");
  if (use_mask) {
    check_cuda_tensor(mask, input, "mask");
  }
  if (bias.numel() > 0) {
    check_cuda_tensor(bias, input, "bias");
  }
  // Shapes and arguments: the checks shared with the CPU kernels (csrc/checks.h).
  const ops::DeformConvGeometry s = ops::check_deform_conv2d_args(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      groups, offset_groups, use_mask);
  ConvGeometry g;
  g.batch = s.batch;
  g.channels = s.channels;
  g.height = s.height;
  g.width = s.width;
  g.out_channels = s.out_channels;
  g.kernel_h = s.kernel_h;
  g.kernel_w = s.kernel_w;
  g.out_h = s.out_h;
  g.out_w = s.out_w;
  g.stride_h = s.stride_h;
  g.stride_w = s.stride_w;
  g.pad_h = s.pad_h;
  g.pad_w = s.pad_w;
  g.dilation_h = s.dilation_h;
  g.dilation_w = s.dilation_w;
  g.groups = s.groups;
  g.offset_groups = s.offset_groups;
  g.use_mask = s.use_mask;
  // Images per batch chunk: as many as the column budget (DCN_INSPECT_COLUMN_BUDGET bytes,
  // shared with the CPU kernels) holds, at least one.
  const int64_t column_bytes_per_image =
      g.channels * g.kernel_h * g.kernel_w * g.out_h * g.out_w * static_cast<int64_t>(input.element_size());
  g.chunk = ops::images_per_chunk(std::max<int64_t>(g.batch, 1), column_bytes_per_image);
  return g;
}

bool use_int32(const ConvGeometry& g, int64_t chunk) {
  const int64_t K = g.kernel_h * g.kernel_w;
  const int64_t L = g.out_h * g.out_w;
  const int64_t columns = g.channels * K * chunk * L;
  const int64_t input_elems = g.batch * g.channels * g.height * g.width;
  const int64_t offset_elems = g.batch * 2 * g.offset_groups * K * L;
  return fits_int32(columns) && fits_int32(input_elems) && fits_int32(offset_elems);
}

template <typename scalar_t, typename index_t>
void im2col_launch(
    const ConvGeometry& g,
    int64_t cur,
    const scalar_t* in_ptr,
    const scalar_t* off_ptr,
    const scalar_t* mask_ptr,
    scalar_t* col_ptr,
    cudaStream_t stream) {
  const int64_t n = g.channels * cur * g.out_h * g.out_w;
  deformable_im2col_kernel<scalar_t, index_t><<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
      n, in_ptr, off_ptr, mask_ptr, g.height, g.width, g.kernel_h, g.kernel_w, g.pad_h, g.pad_w,
      g.stride_h, g.stride_w, g.dilation_h, g.dilation_w, cur, g.channels, g.offset_groups, g.out_h,
      g.out_w, g.use_mask, col_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void col2im_launch(
    const ConvGeometry& g,
    int64_t cur,
    int64_t channel_split,
    const scalar_t* gcol_ptr,
    const scalar_t* in_ptr,
    const scalar_t* off_ptr,
    const scalar_t* mask_ptr,
    at::opmath_type<scalar_t>* gin_ptr,
    scalar_t* goff_ptr,
    scalar_t* gmask_ptr,
    at::opmath_type<scalar_t>* goff_acc_ptr,
    at::opmath_type<scalar_t>* gmask_acc_ptr,
    cudaStream_t stream) {
  const int64_t K = g.kernel_h * g.kernel_w;
  const int64_t L = g.out_h * g.out_w;
  const int64_t n_col = g.channels * K * cur * L;
  const int64_t n_coord = channel_split * cur * g.offset_groups * K * L;
  deformable_col2im_kernel<scalar_t, index_t><<<blocks_for(n_col), kThreadsPerBlock, 0, stream>>>(
      n_col, gcol_ptr, off_ptr, mask_ptr, g.height, g.width, g.kernel_h, g.kernel_w, g.pad_h, g.pad_w,
      g.stride_h, g.stride_w, g.dilation_h, g.dilation_w, cur, g.channels, g.offset_groups, g.out_h,
      g.out_w, g.use_mask, gin_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  deformable_col2im_coord_kernel<scalar_t, index_t><<<blocks_for(n_coord), kThreadsPerBlock, 0, stream>>>(
      n_coord, gcol_ptr, in_ptr, off_ptr, mask_ptr, g.height, g.width, g.kernel_h, g.kernel_w, g.pad_h,
      g.pad_w, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w, cur, g.channels, g.offset_groups,
      g.out_h, g.out_w, g.use_mask, channel_split, goff_ptr, gmask_ptr, goff_acc_ptr, gmask_acc_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Threads per (image, offset group, kernel point, position) in the grad_offset / grad_mask
// reduction: enough to fill the GPU when K * L is small, at least 16 channels each.
int64_t coord_channel_split(const ConvGeometry& g) {
  constexpr int64_t kTargetThreads = int64_t(1) << 18;
  constexpr int64_t kMinChannelsPerThread = 16;
  const int64_t base = std::max<int64_t>(1, g.chunk * g.offset_groups * g.kernel_h * g.kernel_w * g.out_h * g.out_w);
  const int64_t channels_per_group = g.channels / g.offset_groups;
  const int64_t wanted = (kTargetThreads + base - 1) / base;
  const int64_t most = std::max<int64_t>(1, channels_per_group / kMinChannelsPerThread);
  return std::max<int64_t>(1, std::min(wanted, most));
}

// columns (a [C*K, cur*L] view) <- deformable im2col of images [b0, b0 + cur).
void launch_im2col(
    const ConvGeometry& g,
    const at::Tensor& input,
    const at::Tensor& offset,
    const at::Tensor& mask,
    int64_t b0,
    int64_t cur,
    at::Tensor& columns) {
  const int64_t L = g.out_h * g.out_w;
  const int64_t K = g.kernel_h * g.kernel_w;
  if (g.channels * cur * L == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool small = use_int32(g, cur);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "dcn_inspect_deformable_im2col", [&] {
        const scalar_t* in_ptr = input.const_data_ptr<scalar_t>() + b0 * g.channels * g.height * g.width;
        const scalar_t* off_ptr = offset.const_data_ptr<scalar_t>() + b0 * 2 * g.offset_groups * K * L;
        const scalar_t* mask_ptr =
            g.use_mask ? mask.const_data_ptr<scalar_t>() + b0 * g.offset_groups * K * L : nullptr;
        scalar_t* col_ptr = columns.mutable_data_ptr<scalar_t>();
        if (small) {
          im2col_launch<scalar_t, int32_t>(g, cur, in_ptr, off_ptr, mask_ptr, col_ptr, stream);
        } else {
          im2col_launch<scalar_t, int64_t>(g, cur, in_ptr, off_ptr, mask_ptr, col_ptr, stream);
        }
      });
}

at::Tensor deform_conv2d_forward_cuda(
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
  const ConvGeometry g = check_and_geometry(
      input_, weight_, offset_, mask_, bias_, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_groups, use_mask);
  c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = use_mask ? mask_.contiguous() : mask_;

  const int64_t K = g.kernel_h * g.kernel_w;
  const int64_t L = g.out_h * g.out_w;
  const int64_t group_out = g.out_channels / groups;
  const int64_t group_ck = (g.channels / groups) * K;

  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0 || output.numel() == 0) {
    return output;
  }
  if (g.channels == 0) {
    output.zero_();
  } else {
    const at::Tensor weight_g = weight.view({groups, group_out, group_ck});
    at::Tensor column_storage = at::empty({g.channels * K * g.chunk * L}, input.options());
    at::Tensor out_storage;
    if (g.chunk > 1) {
      out_storage = at::empty({g.out_channels * g.chunk * L}, input.options());
    }
    for (int64_t b0 = 0; b0 < g.batch; b0 += g.chunk) {
      const int64_t cur = std::min(g.chunk, g.batch - b0);
      at::Tensor columns = column_storage.narrow(0, 0, g.channels * K * cur * L).view({g.channels * K, cur * L});
      launch_im2col(g, input, offset, mask, b0, cur, columns);
      // GEMM result [Cout, cur*L]; for a single image it is the output slice itself.
      at::Tensor result = cur == 1
          ? output.select(0, b0).view({g.out_channels, L})
          : out_storage.narrow(0, 0, g.out_channels * cur * L).view({g.out_channels, cur * L});
      for (int64_t grp = 0; grp < groups; ++grp) {
        at::Tensor out_g = result.narrow(0, grp * group_out, group_out);
        at::mm_out(out_g, weight_g.select(0, grp), columns.narrow(0, grp * group_ck, group_ck));
      }
      if (cur > 1) {
        output.narrow(0, b0, cur)
            .view({cur, g.out_channels, L})
            .copy_(result.view({g.out_channels, cur, L}).transpose(0, 1));
      }
    }
  }
  if (bias_.numel() > 0) {
    output.add_(bias_.view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
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
  const ConvGeometry g = check_and_geometry(
      input_, weight_, offset_, mask_, bias_, stride_h, stride_w, pad_h, pad_w, dilation_h,
      dilation_w, groups, offset_groups, use_mask);
  check_cuda_tensor(grad_, input_, "grad");
  ops::check_deform_conv2d_grad(grad_, g);
  c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = use_mask ? mask_.contiguous() : mask_;

  const int64_t K = g.kernel_h * g.kernel_w;
  const int64_t L = g.out_h * g.out_w;
  const int64_t group_out = g.out_channels / groups;
  const int64_t group_ck = (g.channels / groups) * K;
  const at::ScalarType acc_type = opmath_scalar_type(input.scalar_type());
  const bool same_acc = acc_type == input.scalar_type();

  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
  at::Tensor grad_weight_acc = at::zeros({groups, group_out, group_ck}, input.options().dtype(acc_type));
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = at::zeros_like(mask_);
  const int64_t channel_split = coord_channel_split(g);
  at::Tensor grad_offset_acc, grad_mask_acc;
  if (channel_split > 1) {
    grad_offset_acc = at::zeros(offset.sizes(), input.options().dtype(acc_type));
    if (use_mask) {
      grad_mask_acc = at::zeros(mask.sizes(), input.options().dtype(acc_type));
    }
  }

  if (g.batch > 0 && g.channels > 0 && L > 0 && g.out_channels > 0) {
    const at::Tensor weight_g = weight.view({groups, group_out, group_ck});
    at::Tensor column_storage = at::empty({g.channels * K * g.chunk * L}, input.options());
    at::Tensor grad_out_storage;
    if (g.chunk > 1) {
      grad_out_storage = at::empty({g.out_channels * g.chunk * L}, input.options());
    }
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t b0 = 0; b0 < g.batch; b0 += g.chunk) {
      const int64_t cur = std::min(g.chunk, g.batch - b0);
      at::Tensor columns = column_storage.narrow(0, 0, g.channels * K * cur * L).view({g.channels * K, cur * L});
      at::Tensor grad_out;
      if (cur == 1) {
        grad_out = grad.select(0, b0).view({g.out_channels, L});
      } else {
        grad_out = grad_out_storage.narrow(0, 0, g.out_channels * cur * L).view({g.out_channels, cur * L});
        grad_out.view({g.out_channels, cur, L}).copy_(grad.narrow(0, b0, cur).view({cur, g.out_channels, L}).transpose(0, 1));
      }

      // grad_columns = W_g^T @ grad_out_g, written into the column buffer.
      for (int64_t grp = 0; grp < groups; ++grp) {
        at::Tensor col_g = columns.narrow(0, grp * group_ck, group_ck);
        at::mm_out(col_g, weight_g.select(0, grp).t(), grad_out.narrow(0, grp * group_out, group_out));
      }

      const bool small = use_int32(g, cur);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::ScalarType::Half, at::ScalarType::BFloat16, input.scalar_type(), "dcn_inspect_deformable_col2im", [&] {
            using acc_t = at::opmath_type<scalar_t>;
            const scalar_t* gcol_ptr = columns.const_data_ptr<scalar_t>();
            const scalar_t* in_ptr = input.const_data_ptr<scalar_t>() + b0 * g.channels * g.height * g.width;
            const scalar_t* off_ptr = offset.const_data_ptr<scalar_t>() + b0 * 2 * g.offset_groups * K * L;
            const scalar_t* mask_ptr =
                use_mask ? mask.const_data_ptr<scalar_t>() + b0 * g.offset_groups * K * L : nullptr;
            acc_t* gin_ptr = grad_input_acc.mutable_data_ptr<acc_t>() + b0 * g.channels * g.height * g.width;
            scalar_t* goff_ptr = grad_offset.mutable_data_ptr<scalar_t>() + b0 * 2 * g.offset_groups * K * L;
            scalar_t* gmask_ptr =
                use_mask ? grad_mask.mutable_data_ptr<scalar_t>() + b0 * g.offset_groups * K * L : nullptr;
            acc_t* goff_acc_ptr = channel_split > 1
                ? grad_offset_acc.mutable_data_ptr<acc_t>() + b0 * 2 * g.offset_groups * K * L
                : nullptr;
            acc_t* gmask_acc_ptr = channel_split > 1 && use_mask
                ? grad_mask_acc.mutable_data_ptr<acc_t>() + b0 * g.offset_groups * K * L
                : nullptr;
            if (small) {
              col2im_launch<scalar_t, int32_t>(
                  g, cur, channel_split, gcol_ptr, in_ptr, off_ptr, mask_ptr, gin_ptr, goff_ptr, gmask_ptr,
                  goff_acc_ptr, gmask_acc_ptr, stream);
            } else {
              col2im_launch<scalar_t, int64_t>(
                  g, cur, channel_split, gcol_ptr, in_ptr, off_ptr, mask_ptr, gin_ptr, goff_ptr, gmask_ptr,
                  goff_acc_ptr, gmask_acc_ptr, stream);
            }
          });

      // Recompute the columns for grad_weight: grad_W_g += grad_out_g @ columns_g^T.
      launch_im2col(g, input, offset, mask, b0, cur, columns);
      for (int64_t grp = 0; grp < groups; ++grp) {
        at::Tensor gw = grad_weight_acc.select(0, grp);
        const at::Tensor go = grad_out.narrow(0, grp * group_out, group_out);
        const at::Tensor cols = columns.narrow(0, grp * group_ck, group_ck).t();
        if (same_acc) {
          gw.addmm_(go, cols);
        } else {
          gw.add_(at::mm(go, cols));
        }
      }
    }
  }

  if (channel_split > 1) {
    grad_offset.copy_(grad_offset_acc);
    if (use_mask) {
      grad_mask.copy_(grad_mask_acc);
    }
  }
  at::Tensor grad_input = same_acc ? grad_input_acc : grad_input_acc.to(input.scalar_type());
  at::Tensor grad_weight = grad_weight_acc.view(weight.sizes());
  if (!same_acc) {
    grad_weight = grad_weight.to(input.scalar_type());
  }
  at::Tensor grad_bias;
  if (bias_.numel() > 0) {
    grad_bias = grad.sum({0, 2, 3}, false, acc_type).to(input.scalar_type());
  } else {
    grad_bias = at::zeros_like(bias_);
  }
  return std::make_tuple(grad_input, grad_weight, grad_offset, grad_mask, grad_bias);
}

} // namespace
} // namespace cuda
} // namespace dcn_inspect

TORCH_LIBRARY_IMPL(dcn_inspect, CUDA, m) {
  m.impl("deform_conv2d", TORCH_FN(dcn_inspect::cuda::deform_conv2d_forward_cuda));
  m.impl("_deform_conv2d_backward", TORCH_FN(dcn_inspect::cuda::deform_conv2d_backward_cuda));
}
