// Pieces shared by the CPU kernels: bounded scratch memory reused between calls, and grain
// sizes that keep tiny problems on the calling thread.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dcn_inspect {
namespace ops {

// Scratch memory reused between calls. A fresh large allocation is page-faulted in on every
// call (glibc serves it with mmap), which costs as much as the bilinear gather itself, so
// buffers go back to a process-wide pool after each call instead of being freed.
//
// Bounded: the pool keeps at most scratch_limit_bytes() of idle buffers (the environment
// variable DCN_INSPECT_SCRATCH_MIB, default 256 MiB; 0 keeps nothing); a call that needed
// more frees the surplus, largest buffers first, when it returns. Thread-safe: concurrent
// calls never share a buffer (each takes an idle one or allocates its own). Released:
// release_scratch() frees every idle buffer (Python: dcn_inspect.ops.release_scratch()), and
// scratch_bytes() reports what the pool holds (dcn-inspect doctor shows it).
int64_t scratch_limit_bytes();
int64_t scratch_bytes();
int64_t release_scratch();

// The buffers one kernel call holds; they return to the pool when it is destroyed. Pointers
// are 64-byte aligned and valid for the lifetime of this object; the memory is uninitialised.
class ScratchLease {
 public:
  ScratchLease() = default;
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  ~ScratchLease();

  void* bytes(int64_t count);
  template <typename T>
  T* get(int64_t count) {
    return static_cast<T*>(bytes(count * static_cast<int64_t>(sizeof(T))));
  }

 private:
  std::vector<at::Tensor> held_;
};

// Grain size for at::parallel_for over items of `work_per_item` units (about one multiply-add
// each): chunks of at least kMinParallelWork units, so a problem smaller than that runs on the
// calling thread. Waking the OpenMP team costs tens of microseconds, and milliseconds when the
// cores are shared with other processes (issue #15: a 3x6x5x4 batch took 18.6 ms with grain 1
// against 4.6 ms for the pure-PyTorch reference).
constexpr int64_t kMinParallelWork = int64_t(1) << 15;

inline int64_t grain_for(int64_t work_per_item) {
  const int64_t per = work_per_item > 0 ? work_per_item : 1;
  return (kMinParallelWork + per - 1) / per;
}

} // namespace ops
} // namespace dcn_inspect
