// __global__ entry points of the fused programs and their launcher, instantiated once per storage
// type by re_attention_{f16,bf16,f32,f64}.cu.
#pragma once

#include "launch.h"
#include "programs.cuh"

namespace reattn {
namespace cuda {

template <typename T, int Kind>
__global__ void __launch_bounds__(kThreads, 1) re_attention_kernel(const ReAttnParams params) {
  const BlockExec ex;
  Program<T> program(params, Kind, dev::block_index_x(), dev::block_index_y(), dev::shared_memory());
  if constexpr (Kind == kForward) {
    program.forward(ex);
  } else if constexpr (Kind == kGramSums) {
    program.batch_statistics(ex);
  } else {
    program.backward(ex, Kind == kBnGradSums);
  }
}

template <typename T, int Kind>
cudaError_t launch_kind(const ReAttnParams& params, cudaStream_t stream) {
  auto kernel = re_attention_kernel<T, Kind>;
  const size_t bytes = params.plan.shared_bytes;
  if (bytes > 48 * 1024) {  // above the default: opt in (the plan checked the device's limit)
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(params.B * params.plan.num_m), static_cast<unsigned>(params.plan.num_chunks));
  kernel<<<grid, kThreads, bytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename T, int Kind>
cudaError_t static_shared_kind(size_t* bytes) {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, re_attention_kernel<T, Kind>);
  *bytes = attributes.sharedSizeBytes;
  return err;
}

template <typename T>
cudaError_t launch_program(int kind, const ReAttnParams& params, cudaStream_t stream) {
  if (params.B == 0 || params.plan.num_m == 0) return cudaSuccess;
  switch (kind) {
    case kForward:
      return launch_kind<T, kForward>(params, stream);
    case kGramSums:
      return launch_kind<T, kGramSums>(params, stream);
    case kBackward:
      return launch_kind<T, kBackward>(params, stream);
    case kBnGradSums:
      return launch_kind<T, kBnGradSums>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t static_shared(int kind, size_t* bytes) {
  switch (kind) {
    case kForward:
      return static_shared_kind<T, kForward>(bytes);
    case kGramSums:
      return static_shared_kind<T, kGramSums>(bytes);
    case kBackward:
      return static_shared_kind<T, kBackward>(bytes);
    case kBnGradSums:
      return static_shared_kind<T, kBnGradSums>(bytes);
    default:
      return cudaErrorInvalidValue;
  }
}

// The entry points of one storage type (see launch.h).
#define REATTN_DEFINE_LAUNCHERS(name, type)                                             \
  cudaError_t launch_##name(int kind, const ReAttnParams& params, cudaStream_t stream) { \
    return launch_program<type>(kind, params, stream);                                  \
  }                                                                                     \
  cudaError_t static_shared_##name(int kind, size_t* bytes) { return static_shared<type>(kind, bytes); }

}  // namespace cuda
}  // namespace reattn
