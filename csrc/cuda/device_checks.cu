// The check kernels of device_checks.cuh compiled for the GPU (the emulator runs the same source).
#include <cuda_runtime_api.h>

#include "device_checks.cuh"
#include "launch.h"

namespace reattn {
namespace checks {

__global__ void __launch_bounds__(kCheckThreads) device_check_kernel(const CheckParams p, bool bf16) {
  run_check(p, bf16);
}

}  // namespace checks

namespace cuda {

cudaError_t launch_device_check(int kind, const void* a, const void* b, float* out, bool bf16, cudaStream_t stream) {
  checks::CheckParams p;
  p.kind = kind;
  p.a = a;
  p.b = b;
  p.out = out;
  checks::device_check_kernel<<<1, checks::kCheckThreads, checks::kCheckShared, stream>>>(p, bf16);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace reattn
