// __global__ entry points of the element-wise steps of one-sweep training BatchNorm
// (head_affine.cuh) for the four storage types, and their launchers.
#include "head_affine.cuh"
#include "launch.h"

namespace reattn {
namespace cuda {

// Outside the anonymous namespace: their symbols are the same in every build (the static model looks
// them up by name).
template <typename T>
__global__ void __launch_bounds__(kHeadAffineThreads) head_affine_kernel(const HeadAffineParams params) {
  head_affine_program<T>(params);
}

// With U staged (head_affine.cuh, stage_u_row) ptxas for sm_80 spilled a register of the fp32 and fp16 builds to
// stay at 40 (6 blocks per SM); there 5 blocks per SM (48 registers; the bf16 build took 46 before the staging).
// (A minimum of 1 block elsewhere is not the default: given it, ptxas took 64 to 70 registers on sm_90.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define REATTN_DOT_SUMS_BOUNDS __launch_bounds__(kHeadAffineThreads, 5)
#else
#define REATTN_DOT_SUMS_BOUNDS __launch_bounds__(kHeadAffineThreads)
#endif

template <typename T>
__global__ void REATTN_DOT_SUMS_BOUNDS head_dot_sums_kernel(const HeadAffineParams params) {
  head_dot_sums_program<T>(params);
}

namespace {

dim3 head_grid(const HeadAffineParams& p) {
  return dim3(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>((p.Nq + p.rows - 1) / p.rows));
}

template <typename T>
cudaError_t affine(const HeadAffineParams& p, cudaStream_t stream) {
  head_affine_kernel<T><<<head_grid(p), kHeadAffineThreads, head_affine_shared<T>(p.D, p.u_st.n == 0), stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dot_sums(const HeadAffineParams& p, cudaStream_t stream) {
  head_dot_sums_kernel<T><<<head_grid(p), kHeadAffineThreads, head_dot_sums_shared<T>(p.D, p.u_st.n == 0), stream>>>(p);
  return cudaGetLastError();
}

// f(T{}) for the storage type `storage` (StorageKind).
template <typename F>
cudaError_t with_storage(int storage, F&& f) {
  switch (storage) {
    case kFloat16:
      return f(__half{});
    case kBFloat16:
      return f(__nv_bfloat16{});
    case kFloat32:
      return f(float{});
    case kFloat64:
      return f(double{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_head_affine(int storage, const HeadAffineParams& p, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.Nq == 0 || p.D == 0) return cudaSuccess;
  return with_storage(storage, [&](auto t) { return affine<decltype(t)>(p, stream); });
}

cudaError_t launch_head_dot_sums(int storage, const HeadAffineParams& p, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.Nq == 0) return cudaSuccess;
  return with_storage(storage, [&](auto t) { return dot_sums<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace reattn
