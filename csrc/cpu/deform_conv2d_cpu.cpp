// CPU entry points of deform_conv2d: argument checks, the choice of path (deform_conv2d_cpu.h)
// and its registration with the dispatcher.
//
// THE RULE (DCN_INSPECT_CONV_PATH unset or "auto"). Measured on this project's development
// machine, a 2-core Intel Xeon (Sapphire Rapids, AVX-512) VM, torch 2.13 with MKL 2024.2 and
// oneDNN 3.12; bench/ops.py --paths prints the same comparison on any machine.
//
// 1. Channels per offset group or per conv group below 8: planar. The channels-last gather
//    and scatter work on runs of channels; with runs of 4 their vectors are mostly empty and
//    the per-sample bookkeeping dominates. Ratios channels-last / planar, forward and
//    forward+backward (1 thread, N2 32x32 k3, min of 21 runs): 4 channels 0.94 / 1.13,
//    8 channels 0.76 / 0.84, 16 channels 0.75 / 0.32, 64 channels 0.84 / 0.63; 64 channels in
//    16 offset groups (runs of 4) 1.05 / 1.13, in 8 groups (runs of 8) 0.77 / 1.03.
// 2. Otherwise channels-last. Its GEMMs run on BLAS (at::mm: MKL) where oneDNN cannot take
//    them (not float32, oneDNN disabled; for the backward also one thread, where PyTorch
//    sends at::convolution_backward of a 1x1 convolution to its BLAS path). On Intel CPUs:
//    the forward on oneDNN (at::mkldnn_convolution of a 1x1 convolution over the columns)
//    when a conv group has at most 64 output channels and the batch at least 4096 output
//    positions, everything else on MKL. The GEMM engines timed alone on the columns (2 threads,
//    medians of 11, load average 1.4; ms, forward / backward GEMMs):
//                      MKL mm         oneDNN 1x1     F.conv2d (3x3, for scale)
//      S1             39.8 /  89.5   43.8 /  95.3   33.7 /  79.7
//      S3             35.8 /  87.0   36.8 /  86.9   30.7 /  69.9
//      S2             11.5 /  16.2    9.9 /  40.5    6.9 /  14.9
//      dcn-sample N1   0.22 /  0.37   0.26 /  0.56   0.28 /  0.62
//      dcn-sample N4   0.94 /  1.41   0.83 /  2.04   0.75 /  1.53
//    (S1: N1 512->512 38x63 dilation 2; S3: N2 256->256 64x64; S2: N8 64->64 56x56;
//    dcn-sample: 48->48 32x32 dilation 2.) On one thread (CPU time, medians of 9, forward
//    GEMM, oneDNN with a copy of its NHWC output to NCHW / MKL): S1 1.11, S3 1.05, S2 0.82,
//    dcn-sample N1 1.05, N8 0.79. With few output channels MKL spends as long packing the large
//    column matrix as multiplying (perf: sgemm_scopy 12.7 %, kernels 20.8 % of an S2 forward),
//    which oneDNN's brgemm reads in place. MKL is never slower in the backward (oneDNN 1.0-2.5x
//    its time on 2 threads, 1.1-2.1x on one). Issue
//    #15's proposal, a kh x kw stride-(kh, kw) oneDNN convolution over the samples laid out
//    [N, C, kh*Ho, kw*Wo], timed 1.21-1.28x MKL forward and 1.28-1.93x backward at S1 and S3.
//    At the large shapes planar and channels-last are closer than at small channel counts:
//    planar / cl-blas end to end on one thread (CPU time, medians of 5, forward / fwd+bwd):
//    S1 1.13 / 1.07, S2 1.36 / 1.00, S3 1.00 / 0.92, dcn-sample 1.49 / 1.21.
// 3. Any other CPU (AMD, ARM): the forward on oneDNN wherever it can take it (issue #15
//    measured MKL sgemm 1.3-2.7x slower than the oneDNN kernels for the same arithmetic on the
//    project's AMD EPYC machines), the backward on BLAS: since issue #24 the BLAS backward runs
//    its GEMMs single-threaded inside one parallel region by parts of output positions and
//    scatters each part's column gradient while it is in cache (deform_conv2d_channels_last.cpp,
//    blas_backward), where oneDNN's 1x1 convolution backward returns a new column gradient
//    that is copied and then scattered in separate passes. On a 2-core AMD EPYC (Zen 3) VM
//    shared with other processes (load average 7-12), 2 threads, wall clock, medians of 5
//    interleaved, native fwd+bwd / F.conv2d fwd+bwd, backward on BLAS / on oneDNN: S2
//    1.42-1.49 / 1.91-1.97, S3 1.02-1.22 / 1.57-1.67, S1 1.08-1.11 / 1.41-1.49. With the
//    cores less shared (load average 2-3; bench/ops.py --paths, 3 rounds) the two are close:
//    S2 1.38-1.54 / 1.23-1.33, S3 1.19-1.30 / 1.22-1.25, S1 0.82-1.10 / 0.93-1.03; BLAS was
//    kept for the worst case, which is what the goals of issue #24 bound.
//    The choice is fixed, never timed: a rule that timed the engines would let the
//    rounding of a result depend on the machine's load and on which calls came first, and the
//    tool promises byte-identical reruns. DCN_INSPECT_CONV_PATH=tune measures both
//    channels-last engines on each problem size's first four calls (blas, onednn, blas,
//    onednn, whole calls timed) and keeps the faster, for those who prefer speed to
//    bit-identical reruns; cl-blas or cl-onednn pin one engine.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "../checks.h"
#include "deform_conv2d_cpu.h"

namespace dcn_inspect {
namespace ops {

namespace {

enum class ConvPath { kPlanar, kChannelsLastBlas, kChannelsLastOneDNN };

const char* conv_path_name(ConvPath path) {
  switch (path) {
    case ConvPath::kPlanar:
      return "planar";
    case ConvPath::kChannelsLastBlas:
      return "cl-blas";
    case ConvPath::kChannelsLastOneDNN:
      return "cl-onednn";
  }
  return "?";
}

bool is_intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// The forward calls oneDNN directly; the backward goes through at::convolution_backward,
// which PyTorch sends to its own BLAS path when it runs on one thread.
bool onednn_can_take(at::ScalarType dtype, bool backward) {
  return dtype == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
      (!backward || at::get_num_threads() > 1);
}

// Everything that decides how fast each engine is on a call.
using TuneKey = std::array<int64_t, 14>;

TuneKey tune_key(const DeformConvGeometry& g, at::ScalarType dtype, bool backward) {
  return {backward, static_cast<int64_t>(dtype), g.batch, g.channels, g.out_channels, g.kernel_h,
          g.kernel_w, g.out_h, g.out_w, g.height * g.width, g.groups, g.offset_groups, g.use_mask,
          at::get_num_threads()};
}

// The measurements of DCN_INSPECT_CONV_PATH=tune (and of the rule's third case).
class Tuner {
 public:
  static constexpr int kTrials = 4;  // blas, onednn, blas, onednn

  ConvPath next(const TuneKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Entry& e = entries_[key];
    if (e.calls < kTrials) {
      return e.calls % 2 == 0 ? ConvPath::kChannelsLastBlas : ConvPath::kChannelsLastOneDNN;
    }
    return e.best[0] <= e.best[1] ? ConvPath::kChannelsLastBlas : ConvPath::kChannelsLastOneDNN;
  }

  void record(const TuneKey& key, ConvPath path, double seconds) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entries_[key];
    if (e.calls < kTrials) {
      double& best = e.best[path == ConvPath::kChannelsLastBlas ? 0 : 1];
      best = std::min(best, seconds);
      ++e.calls;
    }
  }

 private:
  struct Entry {
    int calls = 0;
    std::array<double, 2> best = {
        std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
  };
  std::mutex mutex_;
  std::map<TuneKey, Entry> entries_;
};

Tuner& tuner() {
  static Tuner* instance = new Tuner();
  return *instance;
}

struct ConvPlan {
  ConvPath path;
  bool tuning;  // time the call and tell the tuner
  TuneKey key;
};

ConvPlan plan_conv(const DeformConvGeometry& g, at::ScalarType dtype, bool backward) {
  const TuneKey key = tune_key(g, dtype, backward);
  const char* forced = std::getenv("DCN_INSPECT_CONV_PATH");
  const std::string mode = (forced != nullptr && *forced != '\0') ? forced : "auto";
  if (mode == "planar") return {ConvPath::kPlanar, false, key};
  if (mode == "cl-blas") return {ConvPath::kChannelsLastBlas, false, key};
  if (mode == "cl-onednn") return {ConvPath::kChannelsLastOneDNN, false, key};
  TORCH_CHECK(
      mode == "auto" || mode == "tune",
      "DCN_INSPECT_CONV_PATH must be auto, planar, cl-blas, cl-onednn or tune, got '", mode, "'");
  if (mode == "auto") {
    const int64_t run = std::min(g.channels / g.offset_groups, g.channels / g.groups);
    if (run < 8) {
      return {ConvPath::kPlanar, false, key};
    }
    if (!onednn_can_take(dtype, backward)) {
      return {ConvPath::kChannelsLastBlas, false, key};
    }
    if (is_intel_cpu()) {
      const bool few_outputs_many_positions =
          g.out_channels / g.groups <= 64 && g.batch * g.positions() >= 4096;
      return {!backward && few_outputs_many_positions ? ConvPath::kChannelsLastOneDNN : ConvPath::kChannelsLastBlas,
              false, key};
    }
    return {backward ? ConvPath::kChannelsLastBlas : ConvPath::kChannelsLastOneDNN, false, key};
  }
  return {tuner().next(key), true, key};
}

void check_cpu(const at::Tensor& t, const char* name) {
  check_cpu_tensor(t, "deform_conv2d", name);
}

DeformConvGeometry checked_geometry(
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
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  check_cpu(offset, "offset");
  check_cpu(mask, "mask");
  check_cpu(bias, "bias");
  return check_deform_conv2d_args(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups, use_mask);
}

// Runs fn() under the plan, timing it for the tuner when the plan asks.
template <typename F>
auto run_planned(const ConvPlan& plan, const F& fn) -> decltype(fn()) {
  if (!plan.tuning) {
    return fn();
  }
  const auto start = std::chrono::steady_clock::now();
  auto result = fn();
  tuner().record(plan.key, plan.path, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return result;
}

at::Tensor deform_conv2d_forward_kernel(
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
  const DeformConvGeometry g = checked_geometry(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups, use_mask);
  const ConvPlan plan = plan_conv(g, input.scalar_type(), /*backward=*/false);
  return run_planned(plan, [&] {
    if (plan.path == ConvPath::kPlanar) {
      return deform_conv2d_forward_planar(g, input, weight, offset, mask, bias);
    }
    return deform_conv2d_forward_channels_last(
        g, input, weight, offset, mask, bias.numel() > 0 ? bias.contiguous() : bias,
        plan.path == ConvPath::kChannelsLastOneDNN);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_kernel(
    const at::Tensor& grad,
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
  check_cpu(grad, "grad");
  const DeformConvGeometry g = checked_geometry(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups, use_mask);
  check_deform_conv2d_grad(grad, g);
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "deform_conv2d backward: grad dtype differs");
  const ConvPlan plan = plan_conv(g, input.scalar_type(), /*backward=*/true);
  return run_planned(plan, [&] {
    if (plan.path == ConvPath::kPlanar) {
      return deform_conv2d_backward_planar(g, grad, input, weight, offset, mask, bias);
    }
    return deform_conv2d_backward_channels_last(
        g, grad, input, weight, offset, mask, bias, plan.path == ConvPath::kChannelsLastOneDNN);
  });
}

// The path the next call with these arguments takes (tests, bench/ops.py); "tune:<path>"
// while the tuner is still measuring or has measured this problem size.
std::string deform_conv2d_cpu_path(
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
    bool use_mask,
    bool backward) {
  const DeformConvGeometry g = checked_geometry(
      input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups, use_mask);
  const ConvPlan plan = plan_conv(g, input.scalar_type(), backward);
  return std::string(plan.tuning ? "tune:" : "") + conv_path_name(plan.path);
}

} // namespace

TORCH_LIBRARY_IMPL(dcn_inspect, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("dcn_inspect::deform_conv2d"), TORCH_FN(deform_conv2d_forward_kernel));
  m.impl(
      TORCH_SELECTIVE_NAME("dcn_inspect::_deform_conv2d_backward"),
      TORCH_FN(deform_conv2d_backward_kernel));
}

TORCH_LIBRARY_FRAGMENT(dcn_inspect, m) {
  m.def(
      "_deform_conv2d_cpu_path(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int groups, int offset_groups, bool use_mask, bool backward) -> str",
      &deform_conv2d_cpu_path);
}

} // namespace ops
} // namespace dcn_inspect
