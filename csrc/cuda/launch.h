// Launchers of the fused CUDA Re-attention programs: raw pointers and a stream, no torch headers
// (a .cu that includes torch/extension.h compiles ~15x slower). One translation unit per storage
// type instantiates the four programs: re_attention_{f16,bf16,f32,f64}.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "params.h"
#include "tiles.h"

namespace reattn {
namespace cuda {

// launch_<type>: runs program `kind` (ProgramKind) over the grid (B * plan.num_m, plan.num_chunks)
// with plan.shared_bytes of dynamic shared memory on `stream`; returns the launch error, if any.
// static_shared_<type>: the shared memory the compiled kernel reserves itself (1 KB on sm_90), which
// the plan's dynamic part must leave room for.
#define REATTN_DECLARE_LAUNCHERS(type)                                                  \
  cudaError_t launch_##type(int kind, const ReAttnParams& params, cudaStream_t stream); \
  cudaError_t static_shared_##type(int kind, size_t* bytes);

REATTN_DECLARE_LAUNCHERS(f16)
REATTN_DECLARE_LAUNCHERS(bf16)
REATTN_DECLARE_LAUNCHERS(f32)
REATTN_DECLARE_LAUNCHERS(f64)
#undef REATTN_DECLARE_LAUNCHERS

// The tensor-core forward (forward.cuh) with tile shape `shape` of row_configs.h, compiled
// variant `variant` (ForwardVariant).
cudaError_t launch_forward_bf16(int shape, int variant, const ReAttnParams& params, cudaStream_t stream);
cudaError_t launch_forward_f16(int shape, int variant, const ReAttnParams& params, cudaStream_t stream);
// The statistics kernel (statistics.cuh) of shape `shape` (row_configs.h statistics_shape_for): params.lse.
cudaError_t launch_statistics_bf16(const StatisticsShape& shape, const ReAttnParams& params, cudaStream_t stream);
cudaError_t launch_statistics_f16(const StatisticsShape& shape, const ReAttnParams& params, cudaStream_t stream);

// The tensor-core backward (rows.cuh, keys.cuh): row pass shape `rows`, key pass shape `keys` of
// backward_configs.h, both in their plain variants where `plain` (row_configs.h).
cudaError_t launch_backward_bf16(int rows, int keys, bool plain, const ReAttnParams& params, cudaStream_t stream);
cudaError_t launch_backward_f16(int rows, int keys, bool plain, const ReAttnParams& params, cudaStream_t stream);

// The element-wise steps of one-sweep training BatchNorm (head_affine.cuh); storage: StorageKind.
cudaError_t launch_head_affine(int storage, const HeadAffineParams& params, cudaStream_t stream);
cudaError_t launch_head_dot_sums(int storage, const HeadAffineParams& params, cudaStream_t stream);

// The parameter steps of parameters.cuh (one block each): the gradients' pieces, and training BatchNorm's
// centering shift, statistics from the one-sweep forward's moments, backward coefficients and running statistics.
cudaError_t launch_param_grads(const ParamGradsParams& params, cudaStream_t stream);
cudaError_t launch_moments_center(const MomentsCenterParams& params, cudaStream_t stream);
cudaError_t launch_bn_moments(const BnMomentsParams& params, cudaStream_t stream);
cudaError_t launch_bn_coefficients(const BnCoefficientsParams& params, cudaStream_t stream);
cudaError_t launch_running_stats(const RunningStatsParams& params, cudaStream_t stream);

constexpr int kMaxDevices = 64;  // per-device caches of the launchers

// The check kernels of device_checks.cuh (one block of 64 threads).
cudaError_t launch_device_check(int kind, const void* a, const void* b, float* out, bool bf16, cudaStream_t stream);

}  // namespace cuda
}  // namespace reattn
