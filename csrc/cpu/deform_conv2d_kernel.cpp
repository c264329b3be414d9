// The planar CPU path of deformable convolution v1/v2: deformable im2col + GEMM (the path
// deform_conv2d_cpu.cpp picks for few channels per offset group; see deform_conv2d_cpu.h).
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
// come from the bounded pool of cpu_common.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "cpu_common.h"
#include "deform_conv2d_cpu.h"

namespace dcn_inspect {
namespace ops {

namespace {

// Bilinear samples of every (image, offset group, kernel point) row of positions, stored
// structure-of-arrays so the im2col gather vectorises: for row r and corner q, index(r, q)[l]
// is the corner's index into the H*W plane and weight(r, q)[l] its weight (already
// multiplied by the mask). Corners that contribute nothing have weight 0 and index 0, so the
// gather needs no branch.
template <typename scalar_t>
struct SampleTable {
  int32_t* indices;  // [rows][4][L]
  scalar_t* weights;  // [rows][4][L]
  int64_t L;
  int32_t* index(int64_t row, int q) const { return indices + (row * 4 + q) * L; }
  scalar_t* weight(int64_t row, int q) const { return weights + (row * 4 + q) * L; }
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
    const SampleTable<scalar_t>& table) {
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t OG = g.offset_groups;
  const int64_t H = g.height;
  const int64_t W = g.width;
  const SampleLocator locator{g};
  at::parallel_for(0, count * OG * K, grain_for(16 * L), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {  // task = row = (b * OG + og) * K + k
      const int64_t b = task / (OG * K);
      const int64_t ogk = task - b * OG * K;  // og * K + k
      const int64_t k = ogk % K;
      const scalar_t* off_y = offset + (((first + b) * OG * K + ogk) * 2) * L;
      const scalar_t* off_x = off_y + L;
      const scalar_t* m = mask ? mask + ((first + b) * OG * K + ogk) * L : nullptr;
      int32_t* index[4] = {table.index(task, 0), table.index(task, 1), table.index(task, 2), table.index(task, 3)};
      scalar_t* weight[4] = {table.weight(task, 0), table.weight(task, 1), table.weight(task, 2), table.weight(task, 3)};
      for (int64_t l = 0; l < L; ++l) {
        for (int q = 0; q < 4; ++q) {
          index[q][l] = 0;
          weight[q][l] = 0;
        }
        scalar_t y, x;
        locator.locate(off_y, off_x, k, l, y, x);
        if (!(y > -1 && y < H && x > -1 && x < W)) {
          continue;
        }
        const scalar_t y0f = std::floor(y);
        const scalar_t x0f = std::floor(x);
        const int64_t y0 = static_cast<int64_t>(y0f);
        const int64_t x0 = static_cast<int64_t>(x0f);
        const scalar_t ly = y - y0f, lx = x - x0f;
        const scalar_t hy = 1 - ly, hx = 1 - lx;
        const scalar_t scale = m ? m[l] : scalar_t(1);
        const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
        if (top && left) {
          index[0][l] = static_cast<int32_t>(y0 * W + x0);
          weight[0][l] = hy * hx * scale;
        }
        if (top && right) {
          index[1][l] = static_cast<int32_t>(y0 * W + x0 + 1);
          weight[1][l] = hy * lx * scale;
        }
        if (bottom && left) {
          index[2][l] = static_cast<int32_t>((y0 + 1) * W + x0);
          weight[2][l] = ly * hx * scale;
        }
        if (bottom && right) {
          index[3][l] = static_cast<int32_t>((y0 + 1) * W + x0 + 1);
          weight[3][l] = ly * lx * scale;
        }
      }
    }
  });
}

// Positions per table block (32 bytes per float position: 8 KiB, L1-resident) and channels per
// task in im2col / col2im.
constexpr int64_t kPositionBlock = 256;
constexpr int64_t kChannelBlock = 16;

// Vectorised part of the im2col gather: col[t] = sum_q w_q[t] * plane[i_q[t]] for a prefix of
// [0, n); returns where the scalar loop has to continue. Hardware gathers where the compiler
// targets them (the auto-vectoriser declines to use them), nothing otherwise.
template <typename scalar_t>
inline int64_t gather_rows(
    const scalar_t*, const int32_t*, const int32_t*, const int32_t*, const int32_t*, const scalar_t*,
    const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t) {
  return 0;
}

#if defined(__AVX512F__)
template <>
inline int64_t gather_rows<float>(
    const float* plane, const int32_t* i0, const int32_t* i1, const int32_t* i2, const int32_t* i3,
    const float* w0, const float* w1, const float* w2, const float* w3, float* col, int64_t n) {
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    __m512 acc = _mm512_mul_ps(
        _mm512_loadu_ps(w0 + t), _mm512_i32gather_ps(_mm512_loadu_si512(i0 + t), plane, 4));
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + t), _mm512_i32gather_ps(_mm512_loadu_si512(i1 + t), plane, 4), acc);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + t), _mm512_i32gather_ps(_mm512_loadu_si512(i2 + t), plane, 4), acc);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + t), _mm512_i32gather_ps(_mm512_loadu_si512(i3 + t), plane, 4), acc);
    _mm512_storeu_ps(col + t, acc);
  }
  return t;
}
#elif defined(__AVX2__) && defined(__FMA__)
template <>
inline int64_t gather_rows<float>(
    const float* plane, const int32_t* i0, const int32_t* i1, const int32_t* i2, const int32_t* i3,
    const float* w0, const float* w1, const float* w2, const float* w3, float* col, int64_t n) {
  int64_t t = 0;
  auto idx = [](const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for (; t + 8 <= n; t += 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(w0 + t), _mm256_i32gather_ps(plane, idx(i0 + t), 4));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + t), _mm256_i32gather_ps(plane, idx(i1 + t), 4), acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + t), _mm256_i32gather_ps(plane, idx(i2 + t), 4), acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + t), _mm256_i32gather_ps(plane, idx(i3 + t), 4), acc);
    _mm256_storeu_ps(col + t, acc);
  }
  return t;
}
#endif

// Calls body(b, og, c_begin, c_end) for blocks of channels of one offset group, in parallel.
template <typename F>
void parallel_over_channel_blocks(const DeformConvGeometry& g, int64_t count, const F& body) {
  const int64_t per_group = g.channels / g.offset_groups;
  const int64_t blocks = (per_group + kChannelBlock - 1) / kChannelBlock;
  const int64_t work = g.kernel_points() * g.positions() * std::min(per_group, kChannelBlock) * 4;
  at::parallel_for(0, count * g.offset_groups * blocks, grain_for(work), [&](int64_t begin, int64_t end) {
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
    const SampleTable<scalar_t>& table,
    int64_t first,
    int64_t count,
    scalar_t* columns) {
  const int64_t C = g.channels;
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t HW = g.height * g.width;
  const int64_t row_stride = count * L;
  parallel_over_channel_blocks(g, count, [&](int64_t b, int64_t og, int64_t c_begin, int64_t c_end) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = (b * g.offset_groups + og) * K + k;
      for (int64_t l0 = 0; l0 < L; l0 += kPositionBlock) {
        const int64_t n = std::min(kPositionBlock, L - l0);
        const int32_t* __restrict__ i0 = table.index(row, 0) + l0;
        const int32_t* __restrict__ i1 = table.index(row, 1) + l0;
        const int32_t* __restrict__ i2 = table.index(row, 2) + l0;
        const int32_t* __restrict__ i3 = table.index(row, 3) + l0;
        const scalar_t* __restrict__ w0 = table.weight(row, 0) + l0;
        const scalar_t* __restrict__ w1 = table.weight(row, 1) + l0;
        const scalar_t* __restrict__ w2 = table.weight(row, 2) + l0;
        const scalar_t* __restrict__ w3 = table.weight(row, 3) + l0;
        for (int64_t c = c_begin; c < c_end; ++c) {
          scalar_t* __restrict__ col = columns + (c * K + k) * row_stride + b * L + l0;
          if (HW == 0) {
            std::fill(col, col + n, scalar_t(0));
            continue;
          }
          const scalar_t* __restrict__ plane = input + ((first + b) * C + c) * HW;
          const int64_t t0 = gather_rows<scalar_t>(plane, i0, i1, i2, i3, w0, w1, w2, w3, col, n);
          for (int64_t t = t0; t < n; ++t) {
            col[t] = w0[t] * plane[i0[t]] + w1[t] * plane[i1[t]] + w2[t] * plane[i2[t]] + w3[t] * plane[i3[t]];
          }
        }
      }
    }
  });
}

// Everything the backward needs about one row of samples (image, offset group, kernel point),
// structure-of-arrays over positions: corner indices, 0/1 corner validity (all 0 outside the
// band, which zeroes every gradient of the sample), fractional parts and mask value.
template <typename scalar_t>
struct GradTable {
  int32_t* indices;  // [rows][4][L]
  scalar_t* valids;  // [rows][4][L]
  scalar_t* fractions;  // [rows][3][L]: ly, lx, mask
  int64_t L;
  int32_t* index(int64_t row, int q) const { return indices + (row * 4 + q) * L; }
  scalar_t* valid(int64_t row, int q) const { return valids + (row * 4 + q) * L; }
  scalar_t* ly(int64_t row) const { return fractions + (row * 3 + 0) * L; }
  scalar_t* lx(int64_t row) const { return fractions + (row * 3 + 1) * L; }
  scalar_t* mask(int64_t row) const { return fractions + (row * 3 + 2) * L; }
};

// Fills the backward table for the images [first, first + count).
template <typename scalar_t>
void build_grad_table(
    const DeformConvGeometry& g,
    const scalar_t* offset,
    const scalar_t* mask,
    int64_t first,
    int64_t count,
    const GradTable<scalar_t>& table) {
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t OG = g.offset_groups;
  const int64_t H = g.height;
  const int64_t W = g.width;
  const SampleLocator locator{g};
  at::parallel_for(0, count * OG * K, grain_for(16 * L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (OG * K);
      const int64_t ogk = row - b * OG * K;
      const int64_t k = ogk % K;
      const scalar_t* off_y = offset + (((first + b) * OG * K + ogk) * 2) * L;
      const scalar_t* off_x = off_y + L;
      const scalar_t* m = mask ? mask + ((first + b) * OG * K + ogk) * L : nullptr;
      int32_t* index[4] = {table.index(row, 0), table.index(row, 1), table.index(row, 2), table.index(row, 3)};
      scalar_t* valid[4] = {table.valid(row, 0), table.valid(row, 1), table.valid(row, 2), table.valid(row, 3)};
      scalar_t* ly = table.ly(row);
      scalar_t* lx = table.lx(row);
      scalar_t* scale = table.mask(row);
      for (int64_t l = 0; l < L; ++l) {
        for (int q = 0; q < 4; ++q) {
          index[q][l] = 0;
          valid[q][l] = 0;
        }
        ly[l] = lx[l] = 0;
        scale[l] = m ? m[l] : scalar_t(1);
        scalar_t y, x;
        locator.locate(off_y, off_x, k, l, y, x);
        if (!(H * W > 0 && y > -1 && y < H && x > -1 && x < W)) {
          continue;
        }
        const scalar_t y0f = std::floor(y);
        const scalar_t x0f = std::floor(x);
        const int64_t y0 = static_cast<int64_t>(y0f);
        const int64_t x0 = static_cast<int64_t>(x0f);
        ly[l] = y - y0f;
        lx[l] = x - x0f;
        const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
        if (top && left) {
          index[0][l] = static_cast<int32_t>(y0 * W + x0);
          valid[0][l] = 1;
        }
        if (top && right) {
          index[1][l] = static_cast<int32_t>(y0 * W + x0 + 1);
          valid[1][l] = 1;
        }
        if (bottom && left) {
          index[2][l] = static_cast<int32_t>((y0 + 1) * W + x0);
          valid[2][l] = 1;
        }
        if (bottom && right) {
          index[3][l] = static_cast<int32_t>((y0 + 1) * W + x0 + 1);
          valid[3][l] = 1;
        }
      }
    }
  });
}

// Vectorised part of the fused backward for a prefix of the block: updates the offset / mask
// sums and writes the four scatter contributions to contrib[q][t]; returns the prefix length
// (0 where no hardware gather is targeted). The scatter itself stays scalar: two positions of
// a vector may hit the same input pixel.
template <typename scalar_t>
inline int64_t coord_vectorized(
    const int32_t* const*, const scalar_t* const*, const scalar_t*, const scalar_t*, const scalar_t*,
    const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*, scalar_t (*)[kPositionBlock], int64_t) {
  return 0;
}

#if defined(__AVX512F__)
template <>
inline int64_t coord_vectorized<float>(
    const int32_t* const* index, const float* const* valid, const float* fy, const float* fx, const float* fm,
    const float* col, const float* plane, float* acc_y, float* acc_x, float* acc_m,
    float (*contrib)[kPositionBlock], int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    __m512 v[4];
    for (int q = 0; q < 4; ++q) {
      v[q] = _mm512_mul_ps(
          _mm512_loadu_ps(valid[q] + t), _mm512_i32gather_ps(_mm512_loadu_si512(index[q] + t), plane, 4));
    }
    const __m512 ly = _mm512_loadu_ps(fy + t), lx = _mm512_loadu_ps(fx + t);
    const __m512 hy = _mm512_sub_ps(one, ly), hx = _mm512_sub_ps(one, lx);
    const __m512 gc = _mm512_loadu_ps(col + t);
    // d/dy = hx*(v10 - v00) + lx*(v11 - v01); d/dx = hy*(v01 - v00) + ly*(v11 - v10)
    const __m512 dy = _mm512_fmadd_ps(hx, _mm512_sub_ps(v[2], v[0]), _mm512_mul_ps(lx, _mm512_sub_ps(v[3], v[1])));
    const __m512 dx = _mm512_fmadd_ps(hy, _mm512_sub_ps(v[1], v[0]), _mm512_mul_ps(ly, _mm512_sub_ps(v[3], v[2])));
    const __m512 top = _mm512_fmadd_ps(hx, v[0], _mm512_mul_ps(lx, v[1]));
    const __m512 bottom = _mm512_fmadd_ps(hx, v[2], _mm512_mul_ps(lx, v[3]));
    const __m512 value = _mm512_fmadd_ps(hy, top, _mm512_mul_ps(ly, bottom));
    _mm512_storeu_ps(acc_y + t, _mm512_fmadd_ps(gc, dy, _mm512_loadu_ps(acc_y + t)));
    _mm512_storeu_ps(acc_x + t, _mm512_fmadd_ps(gc, dx, _mm512_loadu_ps(acc_x + t)));
    _mm512_storeu_ps(acc_m + t, _mm512_fmadd_ps(gc, value, _mm512_loadu_ps(acc_m + t)));
    const __m512 gm = _mm512_mul_ps(gc, _mm512_loadu_ps(fm + t));
    const __m512 gy_top = _mm512_mul_ps(gm, hy), gy_bottom = _mm512_mul_ps(gm, ly);
    _mm512_storeu_ps(contrib[0] + t, _mm512_mul_ps(_mm512_loadu_ps(valid[0] + t), _mm512_mul_ps(gy_top, hx)));
    _mm512_storeu_ps(contrib[1] + t, _mm512_mul_ps(_mm512_loadu_ps(valid[1] + t), _mm512_mul_ps(gy_top, lx)));
    _mm512_storeu_ps(contrib[2] + t, _mm512_mul_ps(_mm512_loadu_ps(valid[2] + t), _mm512_mul_ps(gy_bottom, hx)));
    _mm512_storeu_ps(contrib[3] + t, _mm512_mul_ps(_mm512_loadu_ps(valid[3] + t), _mm512_mul_ps(gy_bottom, lx)));
  }
  return t;
}
#endif

// One pass over (channel, kernel point, position) of the column gradient computes both
//   grad_input  (col2im: scatter of mask * bilinear weight * grad_column), and
//   grad_offset / grad_mask (sum over the group's channels of grad_column times the
//   derivative of the bilinear sample w.r.t. y, x, and the sample itself),
// reading each corner value once. Tasks own blocks of (image, channel) planes, so the scatter
// is race-free; the offset / mask sums run over channels of several tasks and go to one
// accumulator per thread, reduced at the end.
// grad_columns holds dLoss/d(column) where column = mask * bilinear(input).
template <typename scalar_t>
void deformable_col2im_coord(
    const DeformConvGeometry& g,
    const scalar_t* input,
    const scalar_t* grad_columns,
    const GradTable<scalar_t>& table,
    int64_t first,
    int64_t count,
    scalar_t* grad_input,
    scalar_t* grad_offset,
    scalar_t* grad_mask,
    ScratchLease& scratch) {
  const int64_t C = g.channels;
  const int64_t K = g.kernel_points();
  const int64_t L = g.positions();
  const int64_t OG = g.offset_groups;
  const int64_t HW = g.height * g.width;
  const int64_t row_stride = count * L;
  const int64_t rows = count * OG * K;
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  // [threads][3][rows * L]: d/dy, d/dx, d/dmask sums per thread.
  scalar_t* const partial_sums = scratch.get<scalar_t>(threads * 3 * rows * L);
  std::fill(partial_sums, partial_sums + threads * 3 * rows * L, scalar_t(0));
  if (HW > 0) {
    parallel_over_channel_blocks(g, count, [&](int64_t b, int64_t og, int64_t c_begin, int64_t c_end) {
      const int64_t thread = std::min<int64_t>(at::get_thread_num(), threads - 1);
      scalar_t* acc_base = partial_sums + thread * 3 * rows * L;
      scalar_t contrib[4][kPositionBlock];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = (b * OG + og) * K + k;
        for (int64_t l0 = 0; l0 < L; l0 += kPositionBlock) {
          const int64_t n = std::min(kPositionBlock, L - l0);
          const int32_t* __restrict__ i0 = table.index(row, 0) + l0;
          const int32_t* __restrict__ i1 = table.index(row, 1) + l0;
          const int32_t* __restrict__ i2 = table.index(row, 2) + l0;
          const int32_t* __restrict__ i3 = table.index(row, 3) + l0;
          const scalar_t* __restrict__ a0 = table.valid(row, 0) + l0;
          const scalar_t* __restrict__ a1 = table.valid(row, 1) + l0;
          const scalar_t* __restrict__ a2 = table.valid(row, 2) + l0;
          const scalar_t* __restrict__ a3 = table.valid(row, 3) + l0;
          const scalar_t* __restrict__ fy = table.ly(row) + l0;
          const scalar_t* __restrict__ fx = table.lx(row) + l0;
          const scalar_t* __restrict__ fm = table.mask(row) + l0;
          const int32_t* index[4] = {i0, i1, i2, i3};
          const scalar_t* valid[4] = {a0, a1, a2, a3};
          scalar_t* __restrict__ acc_y = acc_base + row * L + l0;
          scalar_t* __restrict__ acc_x = acc_y + rows * L;
          scalar_t* __restrict__ acc_m = acc_x + rows * L;
          for (int64_t c = c_begin; c < c_end; ++c) {
            const scalar_t* __restrict__ col = grad_columns + (c * K + k) * row_stride + b * L + l0;
            const scalar_t* __restrict__ plane = input + ((first + b) * C + c) * HW;
            scalar_t* __restrict__ grad_plane = grad_input + ((first + b) * C + c) * HW;
            const int64_t nv = coord_vectorized<scalar_t>(
                index, valid, fy, fx, fm, col, plane, acc_y, acc_x, acc_m, contrib, n);
            for (int q = 0; q < 4; ++q) {
              const int32_t* iq = index[q];
              const scalar_t* cq = contrib[q];
              for (int64_t t = 0; t < nv; ++t) {
                grad_plane[iq[t]] += cq[t];
              }
            }
            for (int64_t t = nv; t < n; ++t) {
              const scalar_t ly = fy[t], lx = fx[t];
              const scalar_t hy = 1 - ly, hx = 1 - lx;
              const scalar_t gc = col[t];
              const scalar_t v00 = a0[t] * plane[i0[t]];
              const scalar_t v01 = a1[t] * plane[i1[t]];
              const scalar_t v10 = a2[t] * plane[i2[t]];
              const scalar_t v11 = a3[t] * plane[i3[t]];
              acc_y[t] += gc * (hx * (v10 - v00) + lx * (v11 - v01));
              acc_x[t] += gc * (hy * (v01 - v00) + ly * (v11 - v10));
              acc_m[t] += gc * (hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11));
              const scalar_t gm = gc * fm[t];
              grad_plane[i0[t]] += a0[t] * hy * hx * gm;
              grad_plane[i1[t]] += a1[t] * hy * lx * gm;
              grad_plane[i2[t]] += a2[t] * ly * hx * gm;
              grad_plane[i3[t]] += a3[t] * ly * lx * gm;
            }
          }
        }
      }
    });
  }
  // Reduce the per-thread sums into the offset / mask gradients.
  at::parallel_for(0, rows, grain_for(threads * L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (OG * K);
      const int64_t ogk = row - b * OG * K;
      scalar_t* gy = grad_offset + (((first + b) * OG * K + ogk) * 2) * L;
      scalar_t* gx = gy + L;
      scalar_t* gmask = grad_mask ? grad_mask + ((first + b) * OG * K + ogk) * L : nullptr;
      const scalar_t* scale = table.mask(row);
      for (int64_t l = 0; l < L; ++l) {
        scalar_t sy = 0, sx = 0, sm = 0;
        for (int64_t thread = 0; thread < threads; ++thread) {
          const scalar_t* acc = partial_sums + thread * 3 * rows * L + row * L + l;
          sy += acc[0];
          sx += acc[rows * L];
          sm += acc[2 * rows * L];
        }
        gy[l] = scale[l] * sy;
        gx[l] = scale[l] * sx;
        if (gmask) {
          gmask[l] = sm;
        }
      }
    }
  });
}

template <typename scalar_t>
SampleTable<scalar_t> sample_table(ScratchLease& scratch, int64_t rows, int64_t positions) {
  const int64_t entries = rows * 4 * positions;
  const int64_t index_bytes = (entries * static_cast<int64_t>(sizeof(int32_t)) + 63) / 64 * 64;
  const int64_t bytes = index_bytes + entries * static_cast<int64_t>(sizeof(scalar_t));
  uint8_t* base = scratch.get<uint8_t>(bytes);
  return SampleTable<scalar_t>{
      reinterpret_cast<int32_t*>(base), reinterpret_cast<scalar_t*>(base + index_bytes), positions};
}

template <typename scalar_t>
GradTable<scalar_t> grad_table(ScratchLease& scratch, int64_t rows, int64_t positions) {
  const int64_t index_bytes = (rows * 4 * positions * static_cast<int64_t>(sizeof(int32_t)) + 63) / 64 * 64;
  const int64_t bytes = index_bytes + rows * 7 * positions * static_cast<int64_t>(sizeof(scalar_t));
  uint8_t* base = scratch.get<uint8_t>(bytes);
  scalar_t* values = reinterpret_cast<scalar_t*>(base + index_bytes);
  return GradTable<scalar_t>{
      reinterpret_cast<int32_t*>(base), values, values + rows * 4 * positions, positions};
}

int64_t column_bytes_per_image(const DeformConvGeometry& g, const at::Tensor& input) {
  return g.channels * g.kernel_points() * g.positions() * static_cast<int64_t>(input.element_size());
}

} // namespace

at::Tensor deform_conv2d_forward_planar(
    const DeformConvGeometry& g,
    const at::Tensor& input_,
    const at::Tensor& weight_,
    const at::Tensor& offset_,
    const at::Tensor& mask_,
    const at::Tensor& bias_) {
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const bool use_mask = g.use_mask;
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
  ScratchLease scratch;

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    const SampleTable<scalar_t> table = sample_table<scalar_t>(scratch, chunk * g.offset_groups * K, L);
    scalar_t* const columns = scratch.get<scalar_t>(g.channels * K * chunk * L);
    scalar_t* const staged = chunk > 1 ? scratch.get<scalar_t>(g.out_channels * chunk * L) : nullptr;
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      build_sample_table<scalar_t>(
          g, offset.data_ptr<scalar_t>(), use_mask ? mask.data_ptr<scalar_t>() : nullptr, first,
          count, table);
      deformable_im2col<scalar_t>(g, input.data_ptr<scalar_t>(), table, first, count, columns);
      const at::Tensor cols_groups =
          at::from_blob(columns, {g.groups, col_rows_per_group, count * L}, input.options());
      if (count == 1) {
        const at::Tensor out_groups = output[first].view({g.groups, out_per_group, L});
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor out_slice = out_groups[grp];
          at::mm_out(out_slice, weight_groups[grp], cols_groups[grp]);
        }
      } else {
        // GEMM output is [O, count*L]; the batch dimension goes in front when copied out.
        const at::Tensor staged_groups =
            at::from_blob(staged, {g.groups, out_per_group, count * L}, input.options());
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor out_slice = staged_groups[grp];
          at::mm_out(out_slice, weight_groups[grp], cols_groups[grp]);
        }
        output.narrow(0, first, count)
            .view({count, g.out_channels, L})
            .copy_(staged_groups.view({g.out_channels, count, L}).transpose(0, 1));
      }
    }
  });
  if (bias_.numel() > 0) {
    output.add_(bias_.contiguous().view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_planar(
    const DeformConvGeometry& g,
    const at::Tensor& grad_,
    const at::Tensor& input_,
    const at::Tensor& weight_,
    const at::Tensor& offset_,
    const at::Tensor& mask_,
    const at::Tensor& bias_) {
  const bool use_mask = g.use_mask;
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
  ScratchLease scratch;

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    const SampleTable<scalar_t> table = sample_table<scalar_t>(scratch, chunk * g.offset_groups * K, L);
    const GradTable<scalar_t> grad_table_ = grad_table<scalar_t>(scratch, chunk * g.offset_groups * K, L);
    scalar_t* const columns = scratch.get<scalar_t>(g.channels * K * chunk * L);
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      build_sample_table<scalar_t>(
          g, offset.data_ptr<scalar_t>(), use_mask ? mask.data_ptr<scalar_t>() : nullptr, first,
          count, table);
      deformable_im2col<scalar_t>(g, input.data_ptr<scalar_t>(), table, first, count, columns);
      // grad of this chunk's output laid out [O, count*L] like the GEMM output.
      const at::Tensor grad_chunk = count == 1
          ? grad[first].view({g.out_channels, L})
          : grad.narrow(0, first, count).view({count, g.out_channels, L}).transpose(0, 1).contiguous().view(
                {g.out_channels, count * L});
      const at::Tensor grad_groups = grad_chunk.view({g.groups, out_per_group, count * L});
      const at::Tensor col_groups = at::from_blob(columns, {g.groups, col_rows_per_group, count * L}, input.options());
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        at::Tensor grad_weight_slice = grad_weight_groups[grp];
        grad_weight_slice.addmm_(grad_groups[grp], col_groups[grp].t());
        // The columns are not needed any more: reuse their storage for their gradient.
        at::Tensor col_slice = col_groups[grp];
        at::mm_out(col_slice, weight_groups[grp].t(), grad_groups[grp]);
      }
      build_grad_table<scalar_t>(
          g, offset.data_ptr<scalar_t>(), use_mask ? mask.data_ptr<scalar_t>() : nullptr, first, count, grad_table_);
      deformable_col2im_coord<scalar_t>(
          g, input.data_ptr<scalar_t>(), columns, grad_table_, first, count, grad_input.data_ptr<scalar_t>(),
          grad_offset.data_ptr<scalar_t>(), use_mask ? grad_mask.data_ptr<scalar_t>() : nullptr, scratch);
    }
  });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

} // namespace ops
} // namespace dcn_inspect
