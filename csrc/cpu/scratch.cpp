// The bounded scratch pool of the CPU kernels (see cpu_common.h) and its two introspection
// ops, dcn_inspect::_scratch_bytes() and dcn_inspect::_release_scratch().
#include "cpu_common.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

namespace dcn_inspect {
namespace ops {

namespace {

struct Pool {
  std::mutex mutex;
  std::vector<at::Tensor> idle;  // byte tensors, 64-byte aligned by the CPU allocator

  int64_t idle_bytes() const {
    int64_t total = 0;
    for (const at::Tensor& t : idle) {
      total += t.numel();
    }
    return total;
  }
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: kernels may run during exit
  return *instance;
}

} // namespace

int64_t scratch_limit_bytes() {
  constexpr int64_t kDefaultMiB = 256;
  const char* env = std::getenv("DCN_INSPECT_SCRATCH_MIB");
  if (env == nullptr || *env == '\0') {
    return kDefaultMiB << 20;
  }
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  return (end != env && value >= 0) ? static_cast<int64_t>(value) << 20 : kDefaultMiB << 20;
}

int64_t scratch_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.idle_bytes();
}

int64_t release_scratch() {
  Pool& p = pool();
  std::vector<at::Tensor> freed;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    freed.swap(p.idle);
  }
  int64_t total = 0;
  for (const at::Tensor& t : freed) {
    total += t.numel();
  }
  return total;  // the tensors are freed here, outside the lock
}

void* ScratchLease::bytes(int64_t count) {
  count = std::max<int64_t>(count, 1);
  Pool& p = pool();
  at::Tensor chosen;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    // Best fit: the smallest idle buffer that is large enough.
    auto best = p.idle.end();
    for (auto it = p.idle.begin(); it != p.idle.end(); ++it) {
      if (it->numel() >= count && (best == p.idle.end() || it->numel() < best->numel())) {
        best = it;
      }
    }
    if (best != p.idle.end()) {
      chosen = std::move(*best);
      p.idle.erase(best);
    }
  }
  if (!chosen.defined()) {
    chosen = at::empty({count}, at::TensorOptions().dtype(at::kByte));
  }
  held_.push_back(chosen);
  return chosen.data_ptr();
}

ScratchLease::~ScratchLease() {
  if (held_.empty()) {
    return;
  }
  const int64_t limit = scratch_limit_bytes();
  Pool& p = pool();
  std::vector<at::Tensor> surplus;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    for (at::Tensor& t : held_) {
      p.idle.push_back(std::move(t));
    }
    // Over the bound: drop the largest idle buffers first.
    std::sort(p.idle.begin(), p.idle.end(), [](const at::Tensor& a, const at::Tensor& b) {
      return a.numel() < b.numel();
    });
    int64_t total = p.idle_bytes();
    while (!p.idle.empty() && total > limit) {
      total -= p.idle.back().numel();
      surplus.push_back(std::move(p.idle.back()));
      p.idle.pop_back();
    }
  }
  // surplus is freed here, outside the lock.
}

TORCH_LIBRARY_FRAGMENT(dcn_inspect, m) {
  m.def("_scratch_bytes() -> int", []() { return scratch_bytes(); });
  m.def("_release_scratch() -> int", []() { return release_scratch(); });
  m.def("_scratch_limit_bytes() -> int", []() { return scratch_limit_bytes(); });
}

} // namespace ops
} // namespace dcn_inspect
