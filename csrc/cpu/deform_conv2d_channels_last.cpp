// Channels-last CPU deformable convolution: sampling over C-vectors, GEMM by BLAS or oneDNN.
//
// Semantics as deform_conv2d_kernel.cpp (PAPER.md §1, torchvision/DCNv2 border rule). The
// input is read as NHWC ([N, H, W, C]; no copy when it already is channels-last), so the four
// bilinear corners of a sample are four contiguous C-vectors: the gather is four vector loads
// and multiply-adds per channel vector instead of four hardware gathers per value, and the
// backward scatters whole channel vectors.
//
// Columns are [images * L, K * C] (one row per output position): in a row, conv group grp
// owns the block [grp * K * Cg, (grp + 1) * K * Cg), ordered (kernel point, channel), so the
// weight is permuted once to [O, kh, kw, Cg] and the forward GEMM of image b and group grp is
//   output[b, grp] [Og, L] = weight'[grp] [Og, K*Cg] x columns[b][:, grp block]^T,
// either by at::mm per image and group (BLAS) or by one 1x1 convolution over the chunk of
// images, the columns seen as an NHWC image [count, K*C, Ho, Wo] (oneDNN, whose brgemm reads
// that layout without the packing copy MKL makes of it). The backward regathers the columns,
// then on oneDNN computes the weight and column gradients of the chunk and makes one pass that
// scatters the column gradient into the input gradient and reduces the offset and mask
// gradients; on BLAS it does all of that in one parallel region by parts of output positions,
// each part scattering its column gradient block by block while it is in cache
// (blas_backward).
//
// Parallel loops partition their writes: the gather owns blocks of output positions; the
// oneDNN scatter pass owns (image, block of channels): it scatters into those channels of the
// NHWC input gradient alone, and writes its partial offset / mask sums to its own slot, reduced
// in a fixed order afterwards; a BLAS part owns its positions' offset / mask gradients, whole
// images of the input gradient or else its own copy of it, and its own weight-gradient sum,
// the copies and sums reduced in part order afterwards. No atomics: reruns give bit-identical
// results (the blocks and parts, and so the summation order, depend only on the shapes and the
// thread count).
#include "deform_conv2d_cpu.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace dcn_inspect {
namespace ops {

namespace {

// A run of channels [begin, end) inside one offset group and one conv group; in a column row,
// its channel `begin` at kernel point k sits at column + k * (C / groups).
struct Segment {
  int64_t begin, end, offset_group, group, column;
};

// The channel runs of the geometry, split further into pieces of at most max_length channels.
std::vector<Segment> channel_segments(const DeformConvGeometry& g, int64_t max_length) {
  const int64_t per_offset_group = g.channels / g.offset_groups;
  const int64_t per_group = g.channels / g.groups;
  std::vector<Segment> segments;
  for (int64_t c = 0; c < g.channels;) {
    const int64_t og = c / per_offset_group;
    const int64_t grp = c / per_group;
    const int64_t end = std::min({(og + 1) * per_offset_group, (grp + 1) * per_group, c + max_length});
    // conv group grp owns the block [grp * K * per_group, (grp + 1) * K * per_group) of a row,
    // ordered (kernel point, channel)
    segments.push_back({c, end, og, grp, grp * g.kernel_points() * per_group + (c - grp * per_group)});
    c = end;
  }
  return segments;
}

// Sampling positions without the offsets: pos_y[l] = i * stride_h - pad_h for l = i * Wo + j
// (pos_x likewise), ker_y[k] = a * dilation_h for k = a * kw + b (ker_x likewise).
template <typename scalar_t>
struct Grid {
  std::vector<scalar_t> pos_y, pos_x, ker_y, ker_x;

  explicit Grid(const DeformConvGeometry& g)
      : pos_y(g.positions()), pos_x(g.positions()), ker_y(g.kernel_points()), ker_x(g.kernel_points()) {
    for (int64_t l = 0; l < g.positions(); ++l) {
      pos_y[l] = static_cast<scalar_t>((l / g.out_w) * g.stride_h - g.pad_h);
      pos_x[l] = static_cast<scalar_t>((l % g.out_w) * g.stride_w - g.pad_w);
    }
    for (int64_t k = 0; k < g.kernel_points(); ++k) {
      ker_y[k] = static_cast<scalar_t>((k / g.kernel_w) * g.dilation_h);
      ker_x[k] = static_cast<scalar_t>((k % g.kernel_w) * g.dilation_w);
    }
  }
};

// The bilinear samples of kernel point k at the n output positions [l0, l0 + n), given their
// offsets dy[t], dx[t] (t = l - l0): corner pixels index[q][t] (-1: off the map, contributes
// nothing) and fractional parts ly[t], lx[t]. Outside the band -1 < y < H, -1 < x < W (NaN
// included) every corner is -1 and ly = lx = 0. Branch-free, so the loop vectorises (with
// -fno-trapping-math, which _native.py passes).
template <typename scalar_t>
inline void locate_samples(
    const DeformConvGeometry& g,
    const Grid<scalar_t>& grid,
    int64_t k,
    int64_t l0,
    int64_t n,
    const scalar_t* __restrict__ dy,
    const scalar_t* __restrict__ dx,
    int32_t* __restrict__ i0,
    int32_t* __restrict__ i1,
    int32_t* __restrict__ i2,
    int32_t* __restrict__ i3,
    scalar_t* __restrict__ ly,
    scalar_t* __restrict__ lx) {
  const scalar_t* __restrict__ py = grid.pos_y.data() + l0;
  const scalar_t* __restrict__ px = grid.pos_x.data() + l0;
  const scalar_t ky = grid.ker_y[k], kx = grid.ker_x[k];
  const int32_t H = static_cast<int32_t>(g.height), W = static_cast<int32_t>(g.width);
  const scalar_t Hf = static_cast<scalar_t>(g.height), Wf = static_cast<scalar_t>(g.width);
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t y = py[t] + ky + dy[t];
    const scalar_t x = px[t] + kx + dx[t];
    const bool inside = (y > -1) & (y < Hf) & (x > -1) & (x < Wf);
    const scalar_t ys = inside ? y : scalar_t(-2);  // keeps the conversions below in range
    const scalar_t xs = inside ? x : scalar_t(-2);
    // floor by truncation, corrected below zero (std::floor does not vectorise in GCC 12)
    const int32_t yt = static_cast<int32_t>(ys), xt = static_cast<int32_t>(xs);
    const int32_t y0 = yt - (ys < static_cast<scalar_t>(yt)), x0 = xt - (xs < static_cast<scalar_t>(xt));
    ly[t] = ys - static_cast<scalar_t>(y0);
    lx[t] = xs - static_cast<scalar_t>(x0);
    const bool top = y0 >= 0, bottom = inside & (y0 + 1 < H), left = x0 >= 0, right = inside & (x0 + 1 < W);
    const int32_t base = y0 * W + x0;
    i0[t] = (top & left) ? base : -1;
    i1[t] = (top & right) ? base + 1 : -1;
    i2[t] = (bottom & left) ? base + W : -1;
    i3[t] = (bottom & right) ? base + W + 1 : -1;
  }
}

// dst[c] = sum_q w_q * p_q[c]: one sampled channel vector.
template <typename scalar_t>
inline void lerp4(
    scalar_t* __restrict__ dst,
    const scalar_t* __restrict__ p0,
    const scalar_t* __restrict__ p1,
    const scalar_t* __restrict__ p2,
    const scalar_t* __restrict__ p3,
    scalar_t w0,
    scalar_t w1,
    scalar_t w2,
    scalar_t w3,
    int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = w0 * p0[c] + w1 * p1[c] + w2 * p2[c] + w3 * p3[c];
  }
}

// dst[c] += w * src[c]
template <typename scalar_t>
inline void axpy(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, scalar_t w, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    dst[c] += w * src[c];
  }
}

// Positions per gather task.
constexpr int64_t kGatherPositions = 32;

// The channel segments of each offset group: segments[first[og], first[og + 1]).
std::vector<int64_t> first_segments(const std::vector<Segment>& segments, int64_t offset_groups) {
  std::vector<int64_t> first(offset_groups + 1, static_cast<int64_t>(segments.size()));
  for (int64_t si = static_cast<int64_t>(segments.size()) - 1; si >= 0; --si) {
    first[segments[si].offset_group] = si;
  }
  for (int64_t og = offset_groups - 1; og >= 0; --og) {
    first[og] = std::min(first[og], first[og + 1]);
  }
  return first;
}

// The sample table of one gather block: per (offset group, kernel point) r, 4 corner indices
// and 4 weights of each of kGatherPositions positions.
template <typename scalar_t>
struct GatherTable {
  std::vector<int32_t> index;
  std::vector<scalar_t> weight;
  explicit GatherTable(const DeformConvGeometry& g)
      : index(g.offset_groups * g.kernel_points() * 4 * kGatherPositions),
        weight(g.offset_groups * g.kernel_points() * 4 * kGatherPositions) {}
};

// rows[t * KC + segment.column + k * Cg + (c - segment.begin)] = mask * bilinear(input[image],
// c) of kernel point k at position l0 + t, for the n <= kGatherPositions positions
// [l0, l0 + n) of one image. planes: that image's [H, W, C]; zeros: C zeros, read in place of
// the corners that are off the map.
template <typename scalar_t>
void gather_block(
    const DeformConvGeometry& g,
    const Grid<scalar_t>& grid,
    const std::vector<Segment>& segments,
    const std::vector<int64_t>& first_segment,
    const scalar_t* planes,
    const scalar_t* offset,
    const scalar_t* mask,
    const scalar_t* zeros,
    int64_t image,
    int64_t l0,
    int64_t n,
    scalar_t* rows,
    GatherTable<scalar_t>& table) {
  constexpr int64_t P = kGatherPositions;
  const int64_t C = g.channels, K = g.kernel_points(), L = g.positions(), OG = g.offset_groups;
  const int64_t Cg = C / g.groups, KC = K * C;
  scalar_t ly[P], lx[P];
  for (int64_t r = 0; r < OG * K; ++r) {  // r = og * K + k
    const int64_t plane = image * OG * K + r;  // offset / mask channel pair index
    int32_t* idx = table.index.data() + r * 4 * P;
    scalar_t* w = table.weight.data() + r * 4 * P;
    locate_samples<scalar_t>(
        g, grid, r % K, l0, n, offset + (2 * plane) * L + l0, offset + (2 * plane + 1) * L + l0, idx, idx + P,
        idx + 2 * P, idx + 3 * P, ly, lx);
    const scalar_t* m = mask ? mask + plane * L + l0 : nullptr;
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t s = m ? m[t] : scalar_t(1);
      const scalar_t hy = 1 - ly[t], hx = 1 - lx[t];
      w[t] = hy * hx * s;
      w[P + t] = hy * lx[t] * s;
      w[2 * P + t] = ly[t] * hx * s;
      w[3 * P + t] = ly[t] * lx[t] * s;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    scalar_t* row = rows + t * KC;
    for (int64_t og = 0; og < OG; ++og) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = og * K + k;
        const int32_t* idx = table.index.data() + r * 4 * P + t;
        const scalar_t* w = table.weight.data() + r * 4 * P + t;
        const scalar_t* p[4];
        for (int q = 0; q < 4; ++q) {
          p[q] = idx[q * P] >= 0 ? planes + int64_t(idx[q * P]) * C : zeros;
        }
        for (int64_t si = first_segment[og]; si < first_segment[og + 1]; ++si) {
          const Segment& s = segments[si];
          lerp4<scalar_t>(
              row + s.column + k * Cg, p[0] + s.begin, p[1] + s.begin, p[2] + s.begin, p[3] + s.begin, w[0], w[P],
              w[2 * P], w[3 * P], s.end - s.begin);
        }
      }
    }
  }
}

// columns[(b * L + l) * KC + ...] = gather_block's rows of every position of the images
// [first, first + count). input_nhwc: [N, H, W, C].
template <typename scalar_t>
void gather_columns(
    const DeformConvGeometry& g,
    const Grid<scalar_t>& grid,
    const std::vector<Segment>& segments,
    const scalar_t* input_nhwc,
    const scalar_t* offset,
    const scalar_t* mask,
    const scalar_t* zeros,
    int64_t first,
    int64_t count,
    scalar_t* columns) {
  constexpr int64_t P = kGatherPositions;
  const int64_t L = g.positions(), KC = g.kernel_points() * g.channels, HWC = g.height * g.width * g.channels;
  const int64_t blocks = (L + P - 1) / P;
  const std::vector<int64_t> first_segment = first_segments(segments, g.offset_groups);
  at::parallel_for(0, count * blocks, grain_for(P * KC), [&](int64_t begin, int64_t end) {
    GatherTable<scalar_t> table(g);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t l0 = (task - b * blocks) * P;
      gather_block<scalar_t>(
          g, grid, segments, first_segment, input_nhwc + (first + b) * HWC, offset, mask, zeros, first + b, l0,
          std::min(L, l0 + P) - l0, columns + (b * L + l0) * KC, table);
    }
  });
}

// What the backward needs about one sample, per (image, offset group, kernel point, position).
template <typename scalar_t>
struct GradEntry {
  int32_t index[4];  // corner pixels, -1: off the map (all -1 outside the band)
  scalar_t ly, lx, mask;
};

template <typename scalar_t>
void build_grad_entries(
    const DeformConvGeometry& g,
    const Grid<scalar_t>& grid,
    const scalar_t* offset,
    const scalar_t* mask,
    int64_t first,
    int64_t count,
    GradEntry<scalar_t>* entries) {
  constexpr int64_t P = 64;
  const int64_t K = g.kernel_points(), L = g.positions(), OG = g.offset_groups;
  at::parallel_for(0, count * OG * K, grain_for(16 * L), [&](int64_t begin, int64_t end) {
    int32_t index[4][P];
    scalar_t ly[P], lx[P];
    for (int64_t row = begin; row < end; ++row) {  // row = (b * OG + og) * K + k
      const int64_t k = row % K;
      const int64_t plane = first * OG * K + row;
      const scalar_t* dy = offset + (2 * plane) * L;
      const scalar_t* dx = dy + L;
      const scalar_t* m = mask ? mask + plane * L : nullptr;
      GradEntry<scalar_t>* out = entries + row * L;
      for (int64_t l0 = 0; l0 < L; l0 += P) {
        const int64_t n = std::min(P, L - l0);
        locate_samples<scalar_t>(
            g, grid, k, l0, n, dy + l0, dx + l0, index[0], index[1], index[2], index[3], ly, lx);
        for (int64_t t = 0; t < n; ++t) {
          GradEntry<scalar_t>& e = out[l0 + t];
          for (int q = 0; q < 4; ++q) {
            e.index[q] = index[q][t];
          }
          e.ly = ly[t];
          e.lx = lx[t];
          e.mask = m ? m[l0 + t] : scalar_t(1);
        }
      }
    }
  });
}

// One pass over the column gradient of the images [first, first + count):
//   grad_input (NHWC) += mask * bilinear weight * grad_column, scattered per channel vector;
//   partial[segment][b][k][l] = sums over the segment's channels of grad_column times the
//   derivatives of the sample by y and x, and times the (unmasked) sample itself.
template <typename scalar_t>
void scatter_columns(
    const DeformConvGeometry& g,
    const std::vector<Segment>& segments,
    const scalar_t* input_nhwc,
    const scalar_t* grad_columns,
    const GradEntry<scalar_t>* entries,
    const scalar_t* zeros,
    int64_t first,
    int64_t count,
    scalar_t* grad_input_nhwc,
    scalar_t* partial) {
  const int64_t C = g.channels, K = g.kernel_points(), L = g.positions(), OG = g.offset_groups;
  const int64_t HW = g.height * g.width, KC = K * C, Cg = C / g.groups;
  const int64_t S = static_cast<int64_t>(segments.size());
  const int64_t work = K * L * (C / S + 16);
  at::parallel_for(0, count * S, grain_for(work), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / S;
      const int64_t si = task - b * S;
      const Segment& s = segments[si];
      const int64_t n = s.end - s.begin;
      const int64_t image = first + b;
      const scalar_t* planes = input_nhwc + image * HW * C + s.begin;
      scalar_t* grad_planes = grad_input_nhwc + image * HW * C + s.begin;
      const scalar_t* zero = zeros + s.begin;
      scalar_t* sums = partial + (si * count + b) * K * L * 3;
      const GradEntry<scalar_t>* rows = entries + (b * OG + s.offset_group) * K * L;
      // A segment that is only part of its group's channels reads the column gradient in
      // pieces one row (K*C values) apart, a stride the hardware prefetchers do not follow.
      const bool prefetch = n < Cg;
      for (int64_t l = 0; l < L; ++l) {
        const scalar_t* grad_row = grad_columns + (b * L + l) * KC;
        for (int64_t k = 0; k < K; ++k) {
          if (prefetch && l + 1 < L) {
            const char* next = reinterpret_cast<const char*>(grad_row + KC + s.column + k * Cg);
            for (int64_t byte = 0; byte < n * static_cast<int64_t>(sizeof(scalar_t)); byte += 64) {
              __builtin_prefetch(next + byte, 0, 0);
            }
          }
          const GradEntry<scalar_t>& e = rows[k * L + l];
          scalar_t* out = sums + (k * L + l) * 3;
          if ((e.index[0] & e.index[1] & e.index[2] & e.index[3]) < 0) {  // every corner off the map
            out[0] = out[1] = out[2] = 0;
            continue;
          }
          const scalar_t* __restrict__ gc = grad_row + s.column + k * Cg;
          const scalar_t* __restrict__ v00 = e.index[0] >= 0 ? planes + int64_t(e.index[0]) * C : zero;
          const scalar_t* __restrict__ v01 = e.index[1] >= 0 ? planes + int64_t(e.index[1]) * C : zero;
          const scalar_t* __restrict__ v10 = e.index[2] >= 0 ? planes + int64_t(e.index[2]) * C : zero;
          const scalar_t* __restrict__ v11 = e.index[3] >= 0 ? planes + int64_t(e.index[3]) * C : zero;
          const scalar_t ly = e.ly, lx = e.lx, hy = 1 - ly, hx = 1 - lx;
          scalar_t sy = 0, sx = 0, sm = 0;
#pragma omp simd reduction(+ : sy, sx, sm)
          for (int64_t c = 0; c < n; ++c) {
            const scalar_t a = v00[c], bb = v01[c], cc = v10[c], d = v11[c], gcc = gc[c];
            sy += gcc * (hx * (cc - a) + lx * (d - bb));
            sx += gcc * (hy * (bb - a) + ly * (d - cc));
            sm += gcc * (hy * (hx * a + lx * bb) + ly * (hx * cc + lx * d));
          }
          out[0] = sy;
          out[1] = sx;
          out[2] = sm;
          const scalar_t weight[4] = {hy * hx * e.mask, hy * lx * e.mask, ly * hx * e.mask, ly * lx * e.mask};
          for (int q = 0; q < 4; ++q) {
            if (e.index[q] >= 0) {
              axpy<scalar_t>(grad_planes + int64_t(e.index[q]) * C, gc, weight[q], n);
            }
          }
        }
      }
    }
  });
}

// Positions per scatter block of the BLAS backward: the block's sample table stays in L1.
constexpr int64_t kScatterPositions = 32;

// The backward of n <= kScatterPositions positions [l0, l0 + n) of one image, from their rows
// of the column gradient (row t at grad_rows + t * K*C, all channels):
//   grad_image (NHWC, this image) += mask * bilinear weight * grad_column, per channel vector;
//   grad_offset / grad_mask of these positions = sums over the offset group's channels of the
//   column gradient times the sample's derivatives by y and x (times the mask) and times the
//   unmasked sample. The positions are the caller's alone, so the sums are written directly.
template <typename scalar_t>
void scatter_block(
    const DeformConvGeometry& g,
    const Grid<scalar_t>& grid,
    const std::vector<Segment>& segments,
    const std::vector<int64_t>& first_segment,
    const scalar_t* planes,
    const scalar_t* grad_rows,
    const scalar_t* offset,
    const scalar_t* mask,
    const scalar_t* zeros,
    int64_t image,
    int64_t l0,
    int64_t n,
    scalar_t* grad_image,
    scalar_t* grad_offset,
    scalar_t* grad_mask) {
  constexpr int64_t P = kScatterPositions;
  const int64_t C = g.channels, K = g.kernel_points(), L = g.positions(), OG = g.offset_groups;
  const int64_t KC = K * C, Cg = C / g.groups;
  int32_t index[4][P];
  scalar_t ly[P], lx[P];
  for (int64_t og = 0; og < OG; ++og) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t plane = (image * OG + og) * K + k;  // offset / mask channel pair index
      locate_samples<scalar_t>(
          g, grid, k, l0, n, offset + (2 * plane) * L + l0, offset + (2 * plane + 1) * L + l0, index[0], index[1],
          index[2], index[3], ly, lx);
      const scalar_t* m = mask ? mask + plane * L + l0 : nullptr;
      scalar_t* gy = grad_offset + (2 * plane) * L + l0;
      scalar_t* gx = gy + L;
      scalar_t* gm = grad_mask ? grad_mask + plane * L + l0 : nullptr;
      for (int64_t t = 0; t < n; ++t) {
        const int32_t i00 = index[0][t], i01 = index[1][t], i10 = index[2][t], i11 = index[3][t];
        if ((i00 & i01 & i10 & i11) < 0) {  // every corner off the map
          gy[t] = gx[t] = 0;
          if (gm) {
            gm[t] = 0;
          }
          continue;
        }
        const scalar_t s = m ? m[t] : scalar_t(1);
        const scalar_t y = ly[t], x = lx[t], hy = 1 - y, hx = 1 - x;
        const scalar_t weight[4] = {hy * hx * s, hy * x * s, y * hx * s, y * x * s};
        const int32_t corner[4] = {i00, i01, i10, i11};
        const scalar_t* grad_row = grad_rows + t * KC;
        scalar_t sy = 0, sx = 0, sm = 0;
        for (int64_t si = first_segment[og]; si < first_segment[og + 1]; ++si) {
          const Segment& seg = segments[si];
          const int64_t len = seg.end - seg.begin;
          const scalar_t* __restrict__ gc = grad_row + seg.column + k * Cg;
          const scalar_t* __restrict__ v00 = (i00 >= 0 ? planes + int64_t(i00) * C : zeros) + seg.begin;
          const scalar_t* __restrict__ v01 = (i01 >= 0 ? planes + int64_t(i01) * C : zeros) + seg.begin;
          const scalar_t* __restrict__ v10 = (i10 >= 0 ? planes + int64_t(i10) * C : zeros) + seg.begin;
          const scalar_t* __restrict__ v11 = (i11 >= 0 ? planes + int64_t(i11) * C : zeros) + seg.begin;
          scalar_t ssy = 0, ssx = 0, ssm = 0;
#pragma omp simd reduction(+ : ssy, ssx, ssm)
          for (int64_t c = 0; c < len; ++c) {
            const scalar_t a = v00[c], bb = v01[c], cc = v10[c], d = v11[c], gcc = gc[c];
            ssy += gcc * (hx * (cc - a) + x * (d - bb));
            ssx += gcc * (hy * (bb - a) + y * (d - cc));
            ssm += gcc * (hy * (hx * a + x * bb) + y * (hx * cc + x * d));
          }
          sy += ssy;
          sx += ssx;
          sm += ssm;
          for (int q = 0; q < 4; ++q) {
            if (corner[q] >= 0) {
              axpy<scalar_t>(grad_image + int64_t(corner[q]) * C + seg.begin, gc, weight[q], len);
            }
          }
        }
        gy[t] = s * sy;
        gx[t] = s * sx;
        if (gm) {
          gm[t] = sm;
        }
      }
    }
  }
}

// dst[i] += parts[0][i] + parts[1][i] + ... (each part `size` elements), in part order.
template <typename scalar_t>
void add_parts(const scalar_t* partial, int64_t parts, int64_t size, scalar_t* dst) {
  at::parallel_for(0, size, grain_for(parts), [&](int64_t begin, int64_t end) {
    for (int64_t part = 0; part < parts; ++part) {
      const scalar_t* __restrict__ src = partial + part * size;
      scalar_t* __restrict__ out = dst;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        out[i] += src[i];
      }
    }
  });
}

// Rows of the column gradient computed per GEMM call of the BLAS backward: about 1 MiB, so the
// scatter that follows reads them from cache; at least 256, so BLAS's packing of the weight
// stays small against the multiplication.
int64_t gemm_block_rows(const DeformConvGeometry& g, int64_t element_size) {
  const int64_t rows = (int64_t(1) << 20) / (g.kernel_points() * g.channels * element_size);
  return std::max<int64_t>(256, rows / 32 * 32);
}

// The backward of the images [first, first + count) on BLAS, in one parallel region of
// `parts` fixed ranges of column rows (b * L + l), one per thread, cut at image boundaries. For
// each image in its range a part gathers its rows of the columns (gather_block), adds their
// weight gradient,
//   weight_partial[part] [O, K*Cg] += grad[b, grp] [Og, n] x columns[rows, grp block] [n, K*Cg],
// then, block by block, overwrites the rows with the column gradient grad[b, grp]^T x
// weight'[grp] and scatters them at once (scatter_block) while they are in cache. The BLAS
// calls run single-threaded inside the region: one fork and join instead of one per call (on
// shared cores every join waits for the slowest thread). Writes are partitioned: offset and
// mask gradients by position; the input gradient by image when the parts hold whole images,
// else into each part's own zeroed copy of the chunk's input gradient (input_partial); the
// copies and the weight partials are then added to grad_input_nhwc / grad_weight_cols in part
// order. The parts depend only on the shapes and the thread count: reruns are bit-identical.
template <typename scalar_t>
void blas_backward(
    const DeformConvGeometry& g,
    const Grid<scalar_t>& grid,
    const std::vector<Segment>& segments,
    const at::Tensor& grad,
    const at::Tensor& weight_cols,
    const scalar_t* input_nhwc,
    const scalar_t* offset,
    const scalar_t* mask,
    const scalar_t* zeros,
    int64_t first,
    int64_t count,
    int64_t parts,
    scalar_t* columns,
    scalar_t* weight_partial,
    scalar_t* input_partial,
    scalar_t* grad_weight_cols,
    scalar_t* grad_input_nhwc,
    scalar_t* grad_offset,
    scalar_t* grad_mask) {
  const int64_t L = g.positions(), KC = g.kernel_points() * g.channels, HWC = g.height * g.width * g.channels;
  const int64_t Og = g.out_channels / g.groups, KCg = KC / g.groups;
  const int64_t rows = count * L;
  const int64_t block = gemm_block_rows(g, sizeof(scalar_t));
  const std::vector<int64_t> first_segment = first_segments(segments, g.offset_groups);
  const at::TensorOptions options = grad.options();
  const scalar_t* grad_data = grad.data_ptr<scalar_t>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t r0 = rows * part / parts, r1 = rows * (part + 1) / parts;
      const at::Tensor partial = at::from_blob(weight_partial + part * g.out_channels * KCg, {g.out_channels, KCg}, options);
      scalar_t* own = input_partial ? input_partial + part * count * HWC : nullptr;  // else whole images
      if (own) {
        std::memset(own, 0, sizeof(scalar_t) * count * HWC);
      }
      GatherTable<scalar_t> table(g);
      for (int64_t b = r0 / L; b < count && b * L < r1; ++b) {
        const int64_t la = std::max(r0 - b * L, int64_t(0)), lb = std::min(r1 - b * L, L);
        if (lb <= la) {
          continue;
        }
        const scalar_t* planes = input_nhwc + (first + b) * HWC;
        for (int64_t l0 = la; l0 < lb; l0 += kGatherPositions) {
          gather_block<scalar_t>(
              g, grid, segments, first_segment, planes, offset, mask, zeros, first + b, l0,
              std::min(lb, l0 + kGatherPositions) - l0, columns + (b * L + l0) * KC, table);
        }
        const at::Tensor grad_out = at::from_blob(
            const_cast<scalar_t*>(grad_data) + (first + b) * g.out_channels * L, {g.groups, Og, L}, options);
        const at::Tensor cols = at::from_blob(columns + b * L * KC, {L, KC}, options);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor partial_slice = partial.narrow(0, grp * Og, Og);
          partial_slice.addmm_(grad_out[grp].narrow(1, la, lb - la), cols.narrow(0, la, lb - la).narrow(1, grp * KCg, KCg));
        }
        scalar_t* grad_image = own ? own + b * HWC : grad_input_nhwc + (first + b) * HWC;
        for (int64_t l0 = la; l0 < lb; l0 += block) {
          const int64_t n = std::min(lb, l0 + block) - l0;
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            at::Tensor cols_slice = cols.narrow(0, l0, n).narrow(1, grp * KCg, KCg);
            at::mm_out(cols_slice, grad_out[grp].narrow(1, l0, n).t(), weight_cols.narrow(0, grp * Og, Og));
          }
          for (int64_t t0 = l0; t0 < l0 + n; t0 += kScatterPositions) {
            scatter_block<scalar_t>(
                g, grid, segments, first_segment, planes, columns + (b * L + t0) * KC, offset, mask, zeros, first + b,
                t0, std::min(l0 + n, t0 + kScatterPositions) - t0, grad_image, grad_offset, grad_mask);
          }
        }
      }
    }
  });
  add_parts<scalar_t>(weight_partial, parts, g.out_channels * KCg, grad_weight_cols);
  if (input_partial) {
    add_parts<scalar_t>(input_partial, parts, count * HWC, grad_input_nhwc + first * HWC);
  }
}

// grad_offset / grad_mask of the chunk from the per-segment sums, in a fixed order.
template <typename scalar_t>
void reduce_partial(
    const DeformConvGeometry& g,
    const std::vector<Segment>& segments,
    const scalar_t* partial,
    const GradEntry<scalar_t>* entries,
    int64_t first,
    int64_t count,
    scalar_t* grad_offset,
    scalar_t* grad_mask) {
  const int64_t K = g.kernel_points(), L = g.positions(), OG = g.offset_groups;
  const std::vector<int64_t> first_segment = first_segments(segments, OG);
  at::parallel_for(0, count * OG * K, grain_for(L * 4), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (b * OG + og) * K + k
      const int64_t k = row % K;
      const int64_t og = (row / K) % OG;
      const int64_t b = row / (K * OG);
      const int64_t plane = first * OG * K + row;
      scalar_t* gy = grad_offset + (2 * plane) * L;
      scalar_t* gx = gy + L;
      scalar_t* gm = grad_mask ? grad_mask + plane * L : nullptr;
      const GradEntry<scalar_t>* e = entries + row * L;
      for (int64_t l = 0; l < L; ++l) {
        scalar_t sy = 0, sx = 0, sm = 0;
        for (int64_t si = first_segment[og]; si < first_segment[og + 1]; ++si) {
          const scalar_t* p = partial + ((si * count + b) * K * L + k * L + l) * 3;
          sy += p[0];
          sx += p[1];
          sm += p[2];
        }
        gy[l] = e[l].mask * sy;
        gx[l] = e[l].mask * sx;
        if (gm) {
          gm[l] = sm;
        }
      }
    }
  });
}

// Channels per task of the backward pass: a task reads its channels of the column gradient
// row by row, so long segments stream it (measured at S1/S3 on one thread: 512 channels took
// half the time of 64, and a third of 16); just enough tasks to give every thread one.
int64_t backward_segment_length(const DeformConvGeometry& g, int64_t count) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t per_image = std::max<int64_t>(1, (threads + count - 1) / count);
  const int64_t length = (g.channels + per_image - 1) / per_image;
  return std::max<int64_t>(16, (length + 15) / 16 * 16);
}

// Parts of blas_backward: one per thread, while each keeps at least 256 column rows.
int64_t gemm_parts(const DeformConvGeometry& g, int64_t count) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  return std::max<int64_t>(1, std::min<int64_t>(threads, count * g.positions() / 256));
}

// out[s][r] = in[r][s] for the rows [r0, r1) of an image with `rows` rows and `cols` columns,
// 32 columns at a time so the source lines stay in L1. Kept out of line with restrict
// pointers: inlined into the parallel_for lambda, GCC kept the pointers on the stack and ran
// it four times slower.
template <typename scalar_t>
__attribute__((noinline)) void transpose_rows(
    const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  constexpr int64_t kTile = 32;
  for (int64_t s0 = 0; s0 < cols; s0 += kTile) {
    const int64_t s1 = std::min(cols, s0 + kTile);
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t* __restrict__ src = in + s;
      scalar_t* __restrict__ dst = out + s * rows;
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) {
        dst[r] = src[r * cols];
      }
    }
  }
}

// dst[b][s][r] = src[b][r][s] for b < batches, r < rows, s < cols (PyTorch's strided copy
// takes ~8x longer for NHWC -> NCHW).
template <typename scalar_t>
void transpose_batched(const scalar_t* src, scalar_t* dst, int64_t batches, int64_t rows, int64_t cols) {
  constexpr int64_t kRows = 32;
  const int64_t row_tiles = (rows + kRows - 1) / kRows;
  at::parallel_for(0, batches * row_tiles, grain_for(kRows * cols), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_tiles;
      const int64_t r0 = (task - b * row_tiles) * kRows;
      transpose_rows<scalar_t>(src + b * rows * cols, dst + b * rows * cols, rows, cols, r0, std::min(rows, r0 + kRows));
    }
  });
}

// src viewed as [batches, rows, cols], transposed to [batches, cols, rows] and returned with
// shape `sizes`: in scratch memory when a lease is given (the tensor must not outlive it),
// else in a new tensor. No copy when rows or cols is 1.
at::Tensor transposed(
    const at::Tensor& src_,
    int64_t batches,
    int64_t rows,
    int64_t cols,
    at::IntArrayRef sizes,
    ScratchLease* scratch = nullptr) {
  const at::Tensor src = src_.contiguous();
  if (rows == 1 || cols == 1) {
    return src.view(sizes);
  }
  at::Tensor dst = scratch ? at::from_blob(scratch->bytes(src.nbytes()), sizes, src.options())
                           : at::empty(sizes, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "dcn_inspect_transpose", [&] {
    transpose_batched<scalar_t>(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), batches, rows, cols);
  });
  return dst;
}

// The input as a contiguous [N, H, W, C] tensor: a view when it is channels-last already, else
// a transposed copy in scratch memory.
at::Tensor input_as_nhwc(const at::Tensor& input, ScratchLease& scratch) {
  const at::Tensor nhwc = input.permute({0, 2, 3, 1});
  if (nhwc.is_contiguous()) {
    return nhwc;
  }
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  return transposed(input, N, C, H * W, {N, H, W, C}, &scratch);
}

// Whether at::mkldnn_convolution can run a convolution of this dtype here.
bool onednn_takes(at::ScalarType dtype) {
  return dtype == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// The columns of `count` images seen as an NHWC image [count, K*C, Ho, Wo] (for oneDNN).
at::Tensor columns_as_image(void* columns, const DeformConvGeometry& g, int64_t count, const at::TensorOptions& options) {
  const int64_t KC = g.kernel_points() * g.channels;
  return at::from_blob(
      columns, {count, KC, g.out_h, g.out_w}, {g.positions() * KC, 1, g.out_w * KC, KC}, options);
}

// The weight permuted to the column order, [O, kh, kw, Cg] viewed as [O, K*Cg], in scratch.
at::Tensor columns_weight(const at::Tensor& weight, ScratchLease& scratch) {
  const int64_t O = weight.size(0), Cg = weight.size(1), K = weight.size(2) * weight.size(3);
  return transposed(weight, O, Cg, K, {O, K * Cg}, &scratch);
}

// A zero-filled tensor in scratch memory.
at::Tensor scratch_zeros(ScratchLease& scratch, at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t size : sizes) {
    numel *= size;
  }
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  void* data = scratch.bytes(bytes);
  std::memset(data, 0, static_cast<size_t>(bytes));
  return at::from_blob(data, sizes, options);
}

} // namespace

at::Tensor deform_conv2d_forward_channels_last(
    const DeformConvGeometry& g,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset_,
    const at::Tensor& mask_,
    const at::Tensor& bias,
    bool onednn) {
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0) {
    return output;
  }
  ScratchLease scratch;
  const at::Tensor input_nhwc = input_as_nhwc(input, scratch);
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = g.use_mask ? mask_.contiguous() : at::Tensor();
  const at::Tensor weight_cols = columns_weight(weight, scratch);  // [O, K*Cg]
  const int64_t K = g.kernel_points(), L = g.positions(), KC = K * g.channels;
  const int64_t Og = g.out_channels / g.groups, KCg = KC / g.groups;
  const int64_t chunk = images_per_chunk(g.batch, KC * L * static_cast<int64_t>(input.element_size()));
  const std::vector<Segment> segments = channel_segments(g, g.channels);
  const bool has_bias = bias.numel() > 0;

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_channels_last", [&] {
    const Grid<scalar_t> grid(g);
    scalar_t* columns = scratch.get<scalar_t>(chunk * L * KC);
    scalar_t* zeros = scratch.get<scalar_t>(g.channels);
    std::fill(zeros, zeros + g.channels, scalar_t(0));
    for (int64_t first = 0; first < g.batch; first += chunk) {
      const int64_t count = std::min(chunk, g.batch - first);
      gather_columns<scalar_t>(
          g, grid, segments, input_nhwc.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
          g.use_mask ? mask.data_ptr<scalar_t>() : nullptr, zeros, first, count, columns);
      if (onednn) {
        const at::Tensor image = columns_as_image(columns, g, count, input.options());
        const at::Tensor weight_image = weight_cols.view({g.out_channels, KCg, 1, 1});
        const c10::optional<at::Tensor> bias_opt = has_bias ? c10::optional<at::Tensor>(bias) : c10::nullopt;
        // oneDNN directly: at::convolution would send a single-threaded 1x1 convolution to
        // PyTorch's BLAS path instead. Its output is NHWC; transposed into place below.
        const at::Tensor result = onednn_takes(input.scalar_type())
            ? at::mkldnn_convolution(image, weight_image, bias_opt, {0, 0}, {1, 1}, {1, 1}, g.groups)
            : at::convolution(image, weight_image, bias_opt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, g.groups);
        at::Tensor out = output.narrow(0, first, count);
        if (result.is_contiguous(at::MemoryFormat::ChannelsLast) && !result.is_contiguous()) {
          transpose_batched<scalar_t>(result.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), count, L, g.out_channels);
        } else {
          out.copy_(result);
        }
        continue;
      }
      for (int64_t b = 0; b < count; ++b) {
        const at::Tensor cols = at::from_blob(columns + b * L * KC, {L, KC}, input.options());
        const at::Tensor out = output[first + b].view({g.groups, Og, L});
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          at::Tensor out_slice = out[grp];
          at::mm_out(out_slice, weight_cols.narrow(0, grp * Og, Og), cols.narrow(1, grp * KCg, KCg).t());
        }
      }
    }
  });
  if (has_bias && !onednn) {
    output.add_(bias.view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_channels_last(
    const DeformConvGeometry& g,
    const at::Tensor& grad_,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset_,
    const at::Tensor& mask_,
    const at::Tensor& bias,
    bool onednn) {
  ScratchLease scratch;
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input_nhwc = input_as_nhwc(input, scratch);
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = g.use_mask ? mask_.contiguous() : at::Tensor();
  const at::Tensor weight_cols = columns_weight(weight, scratch);  // [O, K*Cg]
  const at::Tensor grad_input_nhwc = scratch_zeros(scratch, input_nhwc.sizes(), input.options());
  const at::Tensor grad_weight_cols = scratch_zeros(scratch, weight_cols.sizes(), input.options());
  at::Tensor grad_offset = at::empty_like(offset);  // every element is written below
  at::Tensor grad_mask = g.use_mask ? at::empty_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_bias = bias.numel() > 0 ? grad.sum({0, 2, 3}) : at::empty({0}, input.options());
  const int64_t K = g.kernel_points(), L = g.positions(), KC = K * g.channels;
  const int64_t Og = g.out_channels / g.groups, KCg = KC / g.groups;
  const int64_t Cg = g.channels / g.groups;
  if (g.batch > 0) {
    const int64_t chunk = images_per_chunk(g.batch, KC * L * static_cast<int64_t>(input.element_size()));
    const std::vector<Segment> gather_segments = channel_segments(g, g.channels);
    // oneDNN: the column gradient of the whole chunk, then one scatter pass over it by
    // (image, channel segment). BLAS: both in blas_backward, by parts of rows.
    const std::vector<Segment> segments =
        onednn ? channel_segments(g, backward_segment_length(g, chunk)) : gather_segments;
    const int64_t S = static_cast<int64_t>(segments.size());
    const int64_t parts = onednn ? 0 : gemm_parts(g, chunk);
    // BLAS parts share an image unless each holds whole images of every chunk.
    const bool parts_share_images = !onednn && (chunk % parts != 0 || (g.batch % chunk) % parts != 0);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_channels_last", [&] {
      const Grid<scalar_t> grid(g);
      scalar_t* columns = scratch.get<scalar_t>(chunk * L * KC);
      scalar_t* zeros = scratch.get<scalar_t>(g.channels);
      std::fill(zeros, zeros + g.channels, scalar_t(0));
      GradEntry<scalar_t>* entries = onednn ? scratch.get<GradEntry<scalar_t>>(chunk * g.offset_groups * K * L) : nullptr;
      scalar_t* partial = onednn ? scratch.get<scalar_t>(S * chunk * K * L * 3) : nullptr;
      scalar_t* weight_partial = onednn ? nullptr : scratch.get<scalar_t>(parts * g.out_channels * KCg);
      scalar_t* input_partial =
          parts_share_images ? scratch.get<scalar_t>(parts * chunk * g.height * g.width * g.channels) : nullptr;
      for (int64_t first = 0; first < g.batch; first += chunk) {
        const int64_t count = std::min(chunk, g.batch - first);
        if (!onednn) {
          std::memset(weight_partial, 0, sizeof(scalar_t) * parts * g.out_channels * KCg);
          blas_backward<scalar_t>(
              g, grid, segments, grad, weight_cols, input_nhwc.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
              g.use_mask ? mask.data_ptr<scalar_t>() : nullptr, zeros, first, count, parts, columns, weight_partial,
              input_partial, grad_weight_cols.data_ptr<scalar_t>(), grad_input_nhwc.data_ptr<scalar_t>(),
              grad_offset.data_ptr<scalar_t>(), g.use_mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
          continue;
        }
        gather_columns<scalar_t>(
            g, grid, gather_segments, input_nhwc.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
            g.use_mask ? mask.data_ptr<scalar_t>() : nullptr, zeros, first, count, columns);
        const at::Tensor image = columns_as_image(columns, g, count, input.options());
        auto grads = at::convolution_backward(
            grad.narrow(0, first, count), image, weight_cols.view({g.out_channels, KCg, 1, 1}), c10::nullopt,
            {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, g.groups, {true, true, false});
        grad_weight_cols.add_(std::get<1>(grads).view({g.out_channels, KCg}));
        image.copy_(std::get<0>(grads));  // the columns are not needed any more: their gradient replaces them
        build_grad_entries<scalar_t>(
            g, grid, offset.data_ptr<scalar_t>(), g.use_mask ? mask.data_ptr<scalar_t>() : nullptr, first, count,
            entries);
        scatter_columns<scalar_t>(
            g, segments, input_nhwc.data_ptr<scalar_t>(), columns, entries, zeros, first, count,
            grad_input_nhwc.data_ptr<scalar_t>(), partial);
        reduce_partial<scalar_t>(
            g, segments, partial, entries, first, count, grad_offset.data_ptr<scalar_t>(),
            g.use_mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
      }
    });
  }
  // Back to the caller's layouts: the input's memory format, the weight's [O, Cg, kh, kw].
  const int64_t N = g.batch, C = g.channels, HW = g.height * g.width;
  const at::Tensor grad_input = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
      ? grad_input_nhwc.clone().permute({0, 3, 1, 2})
      : transposed(grad_input_nhwc, N, HW, C, {N, C, g.height, g.width});
  const at::Tensor grad_weight =
      transposed(grad_weight_cols, g.out_channels, K, Cg, {g.out_channels, Cg, g.kernel_h, g.kernel_w});
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

} // namespace ops
} // namespace dcn_inspect
