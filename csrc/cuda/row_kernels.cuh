// __global__ entry points of the tensor-core forward (forward.cuh), one per tile shape of
// row_configs.h, and their launcher; instantiated per 16-bit type by forward_{bf16,f16}.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "rows.cuh"
#include "row_configs.h"
#include "launch.h"
#include "statistics.cuh"

namespace reattn {
namespace cuda {

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) forward_kernel(const ReAttnParams params) {
  RowProgram<Cfg>(params).run();
}

// Opts the kernel into `bytes` of dynamic shared memory on the current device, once per device
// and size (cudaFuncSetAttribute is a driver call: not on every launch).
template <typename Kernel>
cudaError_t reserve_shared(Kernel kernel, size_t bytes, size_t (&granted)[kMaxDevices]) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (bytes <= 48 * 1024 || bytes <= granted[device]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) granted[device] = bytes;
  return err;
}

template <class Cfg>
cudaError_t launch_forward_program(const ReAttnParams& params, cudaStream_t stream) {
  static size_t granted[kMaxDevices] = {};
  const TileShape s = Cfg::shape();
  ReAttnParams p = params;
  p.row_tiles = row_layout(s, p.H, p.Nk);
  const size_t bytes = p.row_tiles.bytes;
  auto kernel = forward_kernel<Cfg>;
  const cudaError_t err = reserve_shared(kernel, bytes, granted);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.B * ((p.Nq + s.rows() - 1) / s.rows())),
                  static_cast<unsigned>((p.D + s.d_out - 1) / s.d_out));
  kernel<<<grid, s.threads(), bytes, stream>>>(p);
  return cudaGetLastError();
}

// Cfg's program, or its narrow-tail one where D leaves the last 8 of its columns empty (with_forward_program).
template <class Cfg>
cudaError_t launch_forward_shape(const ReAttnParams& params, cudaStream_t stream) {
  return with_forward_program<Cfg>(static_cast<int>(params.D),
                                   [&]<class P>() { return launch_forward_program<P>(params, stream); });
}

template <typename E, int kSlabs, int kGroups, int kHeads, int kD, int kDOut, int kKeys>
cudaError_t launch_forward_variant(int variant, const ReAttnParams& p, cudaStream_t stream) {
  switch (variant) {
    case kPlainAffine:
      return launch_forward_shape<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kPlainAffine>>(p, stream);
    case kPlainLayer:
      return launch_forward_shape<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kPlainLayer>>(p, stream);
    case kPlainMoments:
      return launch_forward_shape<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kPlainMoments>>(p, stream);
    case kGeneral:
      return launch_forward_shape<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kGeneral>>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) statistics_kernel(const ReAttnParams params) {
  StatisticsProgram<Cfg>(params).run();
}

// The statistics kernel of shape s (row_configs.h REATTN_STATISTICS_SHAPES) over p's (b, h, 128-row block)s,
// writing p.lse. Its ring (< 48 KB) needs no opt-in.
template <typename E>
cudaError_t launch_statistics(const StatisticsShape& s, const ReAttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Nq == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.B * p.H * ((p.Nq + s.rows() - 1) / s.rows())));
#define REATTN_STATISTICS_CASE(kW, kT, kD, kN)                                                      \
  if (s.warps == kW && s.tiles == kT && s.d == kD && s.narrow == (kN != 0)) {                          \
    statistics_kernel<StatisticsConfig<E, kW, kT, kD, kN>><<<grid, s.threads(), statistics_bytes(s), stream>>>(p); \
    return cudaGetLastError();                                                                      \
  }
  REATTN_STATISTICS_SHAPES(REATTN_STATISTICS_CASE)
#undef REATTN_STATISTICS_CASE
  return cudaErrorInvalidValue;
}

template <typename E>
cudaError_t launch_forward(int shape, int variant, const ReAttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Nq == 0) return cudaSuccess;
  switch (shape) {
#define REATTN_SHAPE_CASE(i, slabs, groups, heads, d, d_out, keys) \
  case i:                                                           \
    return launch_forward_variant<E, slabs, groups, heads, d, d_out, keys>(variant, p, stream);
    REATTN_FORWARD_SHAPES(REATTN_SHAPE_CASE)
#undef REATTN_SHAPE_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace reattn
