// Shared helpers of the dcn_inspect CUDA kernels: launch geometry, grid-stride loops and
// small device math wrappers. Kernels accumulate in at::opmath_type<scalar_t> (float for
// float16 / bfloat16 / float32, double for float64); gradients that are scattered with
// atomicAdd go to opmath buffers and are cast to the input dtype afterwards, so no half
// precision atomics are needed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace dcn_inspect {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loops cover any element count; capping the grid keeps launches legal.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned int blocks_for(int64_t n, int threads = kThreadsPerBlock) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// 32-bit indices are used only when every index, including the grid-stride increment
// past the end, stays far below INT32_MAX.
inline bool fits_int32(int64_t n) {
  return n <= (int64_t(std::numeric_limits<int32_t>::max()) >> 1);
}

#define DCN_CUDA_KERNEL_LOOP(index_t, i, n)                                              \
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<index_t>(blockDim.x) * gridDim.x)

__device__ __forceinline__ float dcn_floor(float v) { return floorf(v); }
__device__ __forceinline__ double dcn_floor(double v) { return ::floor(v); }
// Products rounded on their own (no FMA contraction), so RoI geometry matches the CPU
// reference bit for bit where it feeds ceil / round.
__device__ __forceinline__ float dcn_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double dcn_mul_rn(double a, double b) { return __dmul_rn(a, b); }
// C round(): halves away from zero, computed in double as sign(v) * floor(|v| + 0.5), exactly
// as the reference does for the PS RoI corners.
__device__ __forceinline__ double dcn_round_half_away(double v) {
  const double r = ::floor(::fabs(v) + 0.5);
  return v < 0.0 ? -r : r;
}

inline void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "dcn_inspect (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(
      t.device() == ref.device(), "dcn_inspect (CUDA): ", name, " is on ", t.device(),
      " but input is on ", ref.device());
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(), "dcn_inspect (CUDA): ", name, " has dtype ",
      t.scalar_type(), " but input has ", ref.scalar_type());
}

inline at::ScalarType opmath_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

} // namespace cuda
} // namespace dcn_inspect
