// __global__ entry points of the tensor-core backward (rows.cuh's row pass, keys.cuh's key pass),
// one per shape of backward_configs.h, and their launcher; instantiated per 16-bit type by
// backward_{bf16,f16}.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <type_traits>

#include "backward_configs.h"
#include "keys.cuh"
#include "row_kernels.cuh"

namespace reattn {
namespace cuda {

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) key_kernel(const ReAttnParams params) {
  KeyProgram<Cfg>(params).run();
}

template <class Cfg>
cudaError_t launch_key_shape(const ReAttnParams& params, cudaStream_t stream) {
  static size_t granted[kMaxDevices] = {};
  const KeyShape s = Cfg::shape();
  ReAttnParams p = params;
  p.key_tiles = key_layout(s, p.H);
  const size_t bytes = p.key_tiles.bytes;
  auto kernel = key_kernel<Cfg>;
  const cudaError_t err = reserve_shared(kernel, bytes, granted);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.B * ((p.Nk + s.keys() - 1) / s.keys())));
  kernel<<<grid, s.threads(), bytes, stream>>>(p);
  return cudaGetLastError();
}

// The row pass with shape `rows`, then (unless params.stats_only) the key pass with shape `keys`,
// each in its plain variant where `plain` (no mask, no dropout, aligned rows: ops.cpp decides).
template <typename E, int kVariant, int kKeyPlain>
cudaError_t launch_backward_variant(int rows, int keys, const ReAttnParams& p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  switch (rows) {
#define REATTN_SHAPE_CASE(i, slabs, groups, heads, d, d_out, k) \
  case i:                                                        \
    if constexpr (backward_rows_compiled(kVariant, i, std::is_same_v<E, dev::Bf16>)) { \
      err = launch_forward_shape<RowConfig<E, slabs, groups, heads, d, d_out, k, kVariant>>(p, stream); \
    } \
    break;
    REATTN_BACKWARD_ROW_SHAPES(REATTN_SHAPE_CASE)
#undef REATTN_SHAPE_CASE
    default:
      break;
  }
  if (err != cudaSuccess || p.stats_only) return err;
  if constexpr (kKeyPlain == kKeysPlainLayer && !std::is_same_v<E, dev::Bf16>) {
    return cudaErrorInvalidValue;  // compiled for bf16 only (never chosen otherwise)
  } else {
    switch (keys) {
#define REATTN_SHAPE_CASE(i, kslabs, groups, heads, d, tiles)                                   \
  case i:                                                                                        \
    if constexpr (key_shape_compiled(kKeyPlain, i, std::is_same_v<E, dev::Bf16>)) {              \
      return launch_key_shape<KeyConfig<E, kslabs, groups, heads, d, tiles, kKeyPlain>>(p, stream); \
    }                                                                                            \
    return cudaErrorInvalidValue;
      REATTN_KEY_SHAPES(REATTN_SHAPE_CASE)
#undef REATTN_SHAPE_CASE
      default:
        return cudaErrorInvalidValue;
    }
  }
}

template <typename E>
cudaError_t launch_backward(int rows, int keys, bool plain, const ReAttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Nq == 0) return cudaSuccess;
  constexpr bool bf16 = std::is_same_v<E, dev::Bf16>;
  const bool layer = p.norm == kNormLayer;
  const int row_variant = backward_rows_variant(rows, plain, layer, bf16);
  const int key_variant = backward_keys_variant(plain, layer, bf16);
  if (row_variant == kPlainLayerBackwardRows) {
    return launch_backward_variant<E, kPlainLayerBackwardRows, kKeysPlainLayer>(rows, keys, p, stream);
  }
  if (key_variant == kKeysPlainLayer) return launch_backward_variant<E, kPlainBackwardRows, kKeysPlainLayer>(rows, keys, p, stream);
  if (row_variant == kPlainBackwardRows) return launch_backward_variant<E, kPlainBackwardRows, kKeysPlain>(rows, keys, p, stream);
  return launch_backward_variant<E, kBackwardRows, kKeysGeneral>(rows, keys, p, stream);
}

}  // namespace cuda
}  // namespace reattn
