// Host build of the fused CUDA programs (see emulate.h). The device code paths that do not exist
// here are WMMA (replaced by the same products element by element, same fp32 accumulation) and
// hardware atomics (the programs run one at a time).
#include "emulate.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "block.cuh"

namespace reattn {
namespace cuda {

// c10's half types round to nearest even, like __float2half_rn / __float2bfloat16_rn.
template <>
struct Storage<c10::Half> {
  using acc = float;
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float x) { return c10::Half(x); }
};

template <>
struct Storage<c10::BFloat16> {
  using acc = float;
  static float load(c10::BFloat16 x) { return static_cast<float>(x); }
  static c10::BFloat16 store(float x) { return c10::BFloat16(x); }
};

}  // namespace cuda
}  // namespace reattn

#include "programs.cuh"

namespace reattn {
namespace cuda {
namespace {

template <typename T>
void run(int kind, const ReAttnParams& params, bool reverse_items) {
  const HostExec ex{reverse_items};
  // double storage: 8-byte alignment for every section (offsets are multiples of 128).
  std::vector<double> shared((params.plan.shared_bytes + sizeof(double) - 1) / sizeof(double));
  char* bytes = reinterpret_cast<char*>(shared.data());
  const int64_t programs = params.B * params.plan.num_m;
  for (int64_t pid_m = 0; pid_m < programs; ++pid_m) {
    for (int pid_d = 0; pid_d < params.plan.num_chunks; ++pid_d) {
      std::memset(bytes, 0xff, params.plan.shared_bytes);  // all-ones bytes: NaN in every float type
      Program<T> program(params, kind, pid_m, pid_d, bytes);
      if (kind == kForward) {
        program.forward(ex);
      } else if (kind == kBatchStats) {
        program.batch_statistics(ex);
      } else {
        program.backward(ex, kind == kBackwardStats);
      }
    }
  }
}

}  // namespace

void emulate_program(int storage, int kind, const ReAttnParams& params, bool reverse_items) {
  if (kind < kForward || kind > kBackwardStats) throw std::invalid_argument("emulate_program: unknown program kind");
  switch (storage) {
    case kFloat16:
      return run<c10::Half>(kind, params, reverse_items);
    case kBFloat16:
      return run<c10::BFloat16>(kind, params, reverse_items);
    case kFloat32:
      return run<float>(kind, params, reverse_items);
    case kFloat64:
      return run<double>(kind, params, reverse_items);
    default:
      throw std::invalid_argument("emulate_program: unknown storage type");
  }
}

}  // namespace cuda
}  // namespace reattn
