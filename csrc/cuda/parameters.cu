// __global__ entry points of the parameter steps (parameters.cuh) and their launchers.
#include "launch.h"
#include "parameters.cuh"

namespace reattn {
namespace cuda {

// Outside the anonymous namespace: their symbols are the same in every build (the static model looks
// them up by name).
__global__ void __launch_bounds__(kParameterThreads) param_grads_kernel(const ParamGradsParams params) {
  param_grads_program(params);
}

__global__ void __launch_bounds__(kParameterThreads) moments_center_kernel(const MomentsCenterParams params) {
  moments_center_program(params);
}

__global__ void __launch_bounds__(kParameterThreads) bn_moments_kernel(const BnMomentsParams params) {
  bn_moments_program(params);
}

__global__ void __launch_bounds__(kParameterThreads) bn_coefficients_kernel(const BnCoefficientsParams params) {
  bn_coefficients_program(params);
}

__global__ void __launch_bounds__(kParameterThreads) running_stats_kernel(const RunningStatsParams params) {
  running_stats_program(params);
}

cudaError_t launch_param_grads(const ParamGradsParams& p, cudaStream_t stream) {
  if (p.pieces == 0) return cudaSuccess;
  param_grads_kernel<<<1, kParameterThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_moments_center(const MomentsCenterParams& p, cudaStream_t stream) {
  if (p.H == 0) return cudaSuccess;
  moments_center_kernel<<<1, kParameterThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_bn_moments(const BnMomentsParams& p, cudaStream_t stream) {
  if (p.H == 0) return cudaSuccess;
  bn_moments_kernel<<<1, kParameterThreads, bn_moments_shared(p.H), stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_bn_coefficients(const BnCoefficientsParams& p, cudaStream_t stream) {
  if (p.H == 0) return cudaSuccess;
  bn_coefficients_kernel<<<1, kParameterThreads, bn_coefficients_shared(p.H), stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_running_stats(const RunningStatsParams& p, cudaStream_t stream) {
  if (p.H == 0) return cudaSuccess;
  running_stats_kernel<<<1, kParameterThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace reattn
