// CUDA launcher for the row-statistics pass (see csrc/cpu/row_stats.h for the math).
// Raw pointers and a stream only: no torch headers, so the .cu compiles in seconds.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace reattn {
namespace cuda {

struct Strides4 {
  int64_t b, h, n, d;
};

// dtype_code: 0 = float32, 1 = float64 (out in the same type). Returns the launch error.
cudaError_t row_logsumexp(int dtype_code, const void* q, Strides4 q_st, const void* k, Strides4 k_st,
                          void* out, int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace reattn
