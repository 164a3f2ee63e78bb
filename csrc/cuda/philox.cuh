// Dropout's random stream: Triton's Philox, bit for bit, so the CUDA and Triton backends drop
// the same entries for the same seed. Shared by every CUDA program (device and emulator).
#pragma once

#include <cstdint>

#include "device.cuh"

#if defined(__CUDACC__)
#define REATTN_HD __host__ __device__ __forceinline__
#elif !defined(REATTN_HD)
#define REATTN_HD inline
#endif

namespace reattn {
namespace cuda {

// ---- dropout: Triton's Philox, bit for bit ------------------------------------------------
// Z[b, h, i, j] = (u >= p), u the (j % 4)-th word of tl.philox(seed; j / 4, i, b * H + h, 0) (ten
// rounds) through tl.random.uint_to_uniform_float: one Philox evaluation serves four consecutive
// keys, as in kernels/common.py's _dropout_keep, so the CUDA and Triton backends drop the same
// entries for the same seed.
REATTN_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Word `word` (0-3) of Philox4x32-10 at counter (c0, c1, c2, c3) and key seed.
REATTN_HD uint32_t philox_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, int word) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  // Rolled on sm_8x: unrolled there, the ten rounds' temporaries cost the register-bound general
  // forward variant (32-key segments) a spill; on sm_90 rolling it does (ptxas, CUDA 13).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#pragma unroll 1
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mul_hi_u32(0xCD9E8D57u, old_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(0xD2511F53u, old_c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old_c2;
    c3 = 0xD2511F53u * old_c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return word == 0 ? c0 : word == 1 ? c1 : word == 2 ? c2 : c3;
}

// Keep P[b, h, i, j]? u >= p with u uniform in [0, 1), both in fp32 as Triton compares them.
REATTN_HD bool dropout_keep(uint64_t seed, int64_t b, int H, int h, int64_t i, int64_t j, float p) {
  const uint32_t word = philox_word(seed, static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i),
                                    static_cast<uint32_t>(b * H + h), 0u, static_cast<int>(j & 3));
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f >= p;
}

}  // namespace cuda
}  // namespace reattn
