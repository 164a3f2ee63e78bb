// Small kernels that pin down the semantics of device.cuh: the CPU tests run them in the emulator
// and compare with plain matrix products; on a GPU the same kernels run compiled, so the emulator's
// reading of the PTX ISA is checked against the hardware.
#pragma once

#include "device.cuh"

namespace reattn {
namespace checks {

enum CheckKind : int {
  kMmaRowMajorB = 0,    // out [16, 16] = A [16, 32] @ B [32, 16], B stored row-major: ldmatrix .trans
  kMmaTransposedB = 1,  // out [16, 16] = A [16, 32] @ B^T, B given as [16, 32]: ldmatrix
  kShuffles = 2,        // out [64]: xor-butterfly sum of a [32] in every lane, then a rotation by one lane
  kRace = 3,            // out [32]: warp 1 reads what warp 0 writes to shared memory without a barrier
  kBarrier = 4,         // kRace with the barrier: any warp order gives out = a
  kMissingWait = 5,     // out [32]: cp.async data read before the wait (NaN in the emulator)
  kDivergent = 6,       // half a warp reaches a shuffle (the emulator refuses)
  kMisalignedStore = 7, // a 32-bit store of a 16-bit pair at an address 2 bytes off (the emulator refuses, as a
                        // GPU faults: never run it on a GPU)
  kBf16Products = 8,    // out [64]: lane l's bf16 pairs a[2l..2l+1] times b[2l..2l+1] by Convert<Bf16>::mul
  kMovmatrix = 9,       // out [64]: lane l's pair a[2l..2l+1] of a row-major 8x8 bf16 matrix through movmatrix.trans:
                        // out = the transpose, row-major
};

struct CheckParams {
  int kind = 0;
  const void* a = nullptr;  // 16-bit elements (mma checks) or float
  const void* b = nullptr;
  float* out = nullptr;
};

constexpr int kCheckThreads = 64;
constexpr int kCheckShared = 4096;

template <typename E>
REATTN_DEVICE void mma_check(const CheckParams& p) {
  const int lane = dev::lane_index();
  if (dev::warp_index() != 0) return;
  char* smem = dev::shared_memory();
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);  // [16][32]
  uint16_t* sb = sa + 16 * 32;                        // [32][16] or [16][32]
  const uint16_t* A = static_cast<const uint16_t*>(p.a);
  const uint16_t* B = static_cast<const uint16_t*>(p.b);
  for (int c = lane; c < 128; c += dev::kWarpSize) {  // 2 x 1024 bytes in 16-byte chunks
    if (c < 64) {
      dev::cp_async_16(sa + c * 8, A + c * 8, 16);
    } else {
      dev::cp_async_16(sb + (c - 64) * 8, B + (c - 64) * 8, 16);
    }
  }
  dev::cp_async_commit();
  dev::cp_async_wait<0>();
  dev::sync_warp();
  const bool transposed = p.kind == kMmaTransposedB;
  float acc[2][4] = {};
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t a[4];
    dev::ldmatrix_x4(a, sa + (lane % 16) * 32 + kk * 16 + (lane / 16) * 8);
    uint32_t b4[4];
    const int i = lane / 8, row = lane % 8;
    if (transposed) {  // matrices (n-tile i / 2, k-half i % 2), stored [n][k]
      dev::ldmatrix_x4(b4, sb + ((i / 2) * 8 + row) * 32 + kk * 16 + (i % 2) * 8);
    } else {  // the same matrices stored [k][n], loaded transposed
      dev::ldmatrix_x4_trans(b4, sb + (kk * 16 + (i % 2) * 8 + row) * 16 + (i / 2) * 8);
    }
    for (int nt = 0; nt < 2; ++nt) {
      const uint32_t b[2] = {b4[2 * nt], b4[2 * nt + 1]};
      dev::mma_m16n8k16<E>(acc[nt], a, b, acc[nt]);
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 2; ++nt) {
    p.out[g * 16 + nt * 8 + 2 * t] = acc[nt][0];
    p.out[g * 16 + nt * 8 + 2 * t + 1] = acc[nt][1];
    p.out[(g + 8) * 16 + nt * 8 + 2 * t] = acc[nt][2];
    p.out[(g + 8) * 16 + nt * 8 + 2 * t + 1] = acc[nt][3];
  }
}

REATTN_DEVICE void run_check(const CheckParams& p, bool bf16) {
  const int lane = dev::lane_index(), warp = dev::warp_index();
  const float* a = static_cast<const float*>(p.a);
  float* shared = reinterpret_cast<float*>(dev::shared_memory());
  switch (p.kind) {
    case kMmaRowMajorB:
    case kMmaTransposedB:
      if (bf16) {
        mma_check<dev::Bf16>(p);
      } else {
        mma_check<dev::F16>(p);
      }
      return;
    case kShuffles: {
      if (warp != 0) return;
      float x = a[lane];
      for (int m = 16; m > 0; m /= 2) x += dev::shfl_xor(x, m);
      p.out[lane] = x;
      p.out[32 + lane] = dev::shfl_idx(a[lane], (lane + 1) % 32);
      return;
    }
    case kRace:
    case kBarrier:
      if (warp == 0) shared[lane] = a[lane];
      if (p.kind == kBarrier) dev::sync_threads();
      if (warp == 1) p.out[lane] = shared[lane];
      return;
    case kMissingWait:
      if (warp != 0) return;
      if (lane < 8) dev::cp_async_16(shared + 4 * lane, a + 4 * lane, 16);
      dev::cp_async_commit();
      dev::sync_warp();
      p.out[lane] = shared[lane];  // no cp.async.wait_group before this read
      dev::cp_async_wait<0>();
      return;
    case kDivergent:
      if (warp == 0 && lane < 16) p.out[lane] = dev::shfl_xor(a[lane], 1);
      return;
    case kBf16Products: {
      if (warp != 0) return;
      using Cv = dev::Convert<dev::Bf16>;
      const uint32_t r = Cv::mul(static_cast<const uint32_t*>(p.a)[lane], static_cast<const uint32_t*>(p.b)[lane]);
      p.out[2 * lane] = Cv::low(r);
      p.out[2 * lane + 1] = Cv::high(r);
      return;
    }
    case kMovmatrix: {
      if (warp != 0) return;
      using Cv = dev::Convert<dev::Bf16>;
      const uint32_t r = dev::movmatrix_trans(static_cast<const uint32_t*>(p.a)[lane]);
      p.out[2 * lane] = Cv::low(r);
      p.out[2 * lane + 1] = Cv::high(r);
      return;
    }
    case kMisalignedStore:
      if (warp == 0 && lane == 0) dev::store_pair(reinterpret_cast<char*>(p.out) + 2, 0u);
      return;
    default:
      return;
  }
}

}  // namespace checks
}  // namespace reattn
