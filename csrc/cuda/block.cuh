// The execution model of the fused CUDA programs, written so the same source also runs on the host.
//
// A program (one thread block) is a sequence of *phases*. A phase is `ex.for_each(n, f)`: work
// items 0..n-1 spread over the block's threads, then a block barrier. Items of one phase must
// not read what another item of the same phase writes; everything a phase needs was written by
// an earlier phase. The host build of these headers runs in the emulator of sim.h (csrc/cuda/
// emulate.cpp), every thread a fiber, with the warps in either order between barriers.
//
// Matrix products go through `block_gemm`: WMMA tensor cores for fp16/bf16 operands on the GPU,
// one output element per item everywhere else (fp32/fp64 on the GPU, every type on the host).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "device.cuh"
#include "params.h"
#include "philox.cuh"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define REATTN_HD __host__ __device__ __forceinline__
#define REATTN_FN __device__ __forceinline__
#else
#define REATTN_HD inline
#define REATTN_FN inline
#endif

namespace reattn {
namespace cuda {

constexpr int kWarpSize = 32;

// ---- storage types: load as the accumulation type, store rounded to nearest ----------------
// torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__,
// so conversions are spelled out per type.
template <typename T>
struct Storage;

template <>
struct Storage<float> {
  using acc = float;
  static REATTN_HD float load(float x) { return x; }
  static REATTN_HD float store(float x) { return x; }
};

template <>
struct Storage<double> {
  using acc = double;
  static REATTN_HD double load(double x) { return x; }
  static REATTN_HD double store(double x) { return x; }
};

#if defined(__CUDACC__)
template <>
struct Storage<__half> {
  using acc = float;
  static REATTN_FN float load(__half x) { return __half2float(x); }
  static REATTN_FN __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Storage<__nv_bfloat16> {
  using acc = float;
  static REATTN_FN float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static REATTN_FN __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
#endif

// fp16/bf16 operands take the tensor-core path of block_gemm on the GPU.
template <typename T>
struct UsesTensorCores : std::false_type {};
#if defined(__CUDACC__)
template <>
struct UsesTensorCores<__half> : std::true_type {};
template <>
struct UsesTensorCores<__nv_bfloat16> : std::true_type {};
#endif

// ---- math that spells the same on host and device -------------------------------------------
REATTN_HD float r_exp(float x) { return expf(x); }
REATTN_HD double r_exp(double x) { return exp(x); }
REATTN_HD float r_log(float x) { return logf(x); }
REATTN_HD double r_log(double x) { return log(x); }
REATTN_HD float r_sqrt(float x) { return sqrtf(x); }
REATTN_HD double r_sqrt(double x) { return sqrt(x); }
template <typename A>
REATTN_HD A r_inf() {
  return static_cast<A>(INFINITY);
}

// ---- block execution ----------------------------------------------------------------------
// Items spread over the block's threads, then a barrier. The same code runs on the GPU and in the
// host emulator (sim.h), which runs every thread as a fiber and orders the warps between barriers
// forwards, backwards or shuffled: a phase whose items depend on each other changes its result.
struct BlockExec {
  template <typename F>
  REATTN_FN void for_each(int n, F&& f) const {
    for (int item = dev::thread_index(); item < n; item += dev::block_threads()) f(item);
    dev::sync_threads();
  }
};

// Global atomics: every program of a launch adds its partial sums.
template <typename A>
REATTN_FN void global_atomic_add(A* address, A value) {
  dev::atomic_add(address, value);
}

// ---- matrix products on shared-memory tiles -----------------------------------------------
// Element (r, c) of a RowMajor matrix with leading dimension ld sits at r * ld + c; of a
// ColMajor one at r + c * ld.
struct RowMajor {};
struct ColMajor {};

template <typename L>
REATTN_HD int64_t element_offset(int r, int c, int ld) {
  if constexpr (std::is_same_v<L, RowMajor>) {
    return static_cast<int64_t>(r) * ld + c;
  } else {
    return r + static_cast<int64_t>(c) * ld;
  }
}

struct GemmShape {
  int batch, M, N, K;
};

// C[z] (M x N, row-major, Acc) = (accumulate ? C[z] : 0) + A[z] (M x K) @ B[z] (K x N), z < batch.
// Batch z's operands start at A + z * a_batch, B + z * b_batch, C + z * c_batch.
template <typename LA, typename LB, typename T, typename Acc, typename Exec>
REATTN_FN void scalar_gemm(const Exec& ex, GemmShape s, const T* A, int lda, int64_t a_batch, const T* B, int ldb,
                           int64_t b_batch, Acc* C, int ldc, int64_t c_batch, bool accumulate) {
  ex.for_each(s.batch * s.M * s.N, [&](int item) {
    const int n = item % s.N;
    const int m = (item / s.N) % s.M;
    const int z = item / (s.N * s.M);
    const T* a = A + z * a_batch;
    const T* b = B + z * b_batch;
    Acc* c = C + z * c_batch + static_cast<int64_t>(m) * ldc + n;
    Acc sum = accumulate ? *c : Acc(0);
    for (int kk = 0; kk < s.K; ++kk) {
      sum += static_cast<Acc>(Storage<T>::load(a[element_offset<LA>(m, kk, lda)])) *
             static_cast<Acc>(Storage<T>::load(b[element_offset<LB>(kk, n, ldb)]));
    }
    *c = sum;
  });
}

#if defined(__CUDACC__)
template <typename L>
struct WmmaLayout {
  using type = nvcuda::wmma::row_major;
};
template <>
struct WmmaLayout<ColMajor> {
  using type = nvcuda::wmma::col_major;
};

// Tensor cores: each warp owns 16 x 16 output tiles in turn. M, N, K multiples of 16; every
// operand pointer 32-byte aligned and every leading dimension a multiple of 16 elements (the
// shared-memory layout guarantees both). fp32 accumulation.
template <typename LA, typename LB, typename T>
__device__ __forceinline__ void wmma_gemm(GemmShape s, const T* A, int lda, int64_t a_batch, const T* B, int ldb,
                                          int64_t b_batch, float* C, int ldc, int64_t c_batch, bool accumulate) {
  using namespace nvcuda;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int tiles_m = s.M / 16, tiles_n = s.N / 16;
  const int tiles = s.batch * tiles_m * tiles_n;
  for (int t = warp; t < tiles; t += warps) {
    const int tn = t % tiles_n;
    const int tm = (t / tiles_n) % tiles_m;
    const int z = t / (tiles_n * tiles_m);
    float* c = C + z * c_batch + static_cast<int64_t>(tm) * 16 * ldc + tn * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
    for (int kk = 0; kk < s.K; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, typename WmmaLayout<LA>::type> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, typename WmmaLayout<LB>::type> b;
      wmma::load_matrix_sync(a, A + z * a_batch + element_offset<LA>(tm * 16, kk, lda), lda);
      wmma::load_matrix_sync(b, B + z * b_batch + element_offset<LB>(kk, tn * 16, ldb), ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
  }
  __syncthreads();
}
#endif

// tensor_cores: the plan padded every dim to 16 for WMMA (fp16/bf16 only; ignored otherwise).
template <typename LA, typename LB, typename T, typename Acc, typename Exec>
REATTN_FN void block_gemm(const Exec& ex, bool tensor_cores, GemmShape s, const T* A, int lda, int64_t a_batch,
                          const T* B, int ldb, int64_t b_batch, Acc* C, int ldc, int64_t c_batch, bool accumulate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (UsesTensorCores<T>::value) {
    if (tensor_cores) {
      wmma_gemm<LA, LB, T>(s, A, lda, a_batch, B, ldb, b_batch, C, ldc, c_batch, accumulate);
      return;
    }
  }
#endif
  scalar_gemm<LA, LB, T, Acc>(ex, s, A, lda, a_batch, B, ldb, b_batch, C, ldc, c_batch, accumulate);
}

}  // namespace cuda
}  // namespace reattn
