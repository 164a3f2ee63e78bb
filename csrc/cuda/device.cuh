// The one layer between the fused kernels and the hardware: thread identity, barriers, warp
// shuffles, tensor-core mma.sync, ldmatrix, cp.async, fast math and 16-bit conversions.
//
// Under nvcc every function is inline PTX (or the CUDA intrinsic that emits it). In a plain C++
// build the same functions call the host emulator (sim.h), which runs each thread of a block as a
// fiber: the kernels are written once, register-resident and warp-synchronous, and the CPU test
// suite runs exactly that source.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define REATTN_DEVICE __device__ __forceinline__
#define REATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>

#include "sim.h"
#define REATTN_DEVICE inline
#define REATTN_HOST_DEVICE inline
#endif

namespace reattn {
namespace dev {

constexpr int kWarpSize = 32;

// 16-bit storage types of the tensor-core path: raw bits, converted explicitly.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// ---- identity -----------------------------------------------------------------------------
#if defined(__CUDACC__)
REATTN_DEVICE int thread_index() { return threadIdx.x; }
REATTN_DEVICE int block_threads() { return blockDim.x; }
REATTN_DEVICE int block_index_x() { return blockIdx.x; }
REATTN_DEVICE int block_index_y() { return blockIdx.y; }
REATTN_DEVICE char* shared_memory() {
  extern __shared__ __align__(128) char reattn_dynamic_shared[];
  return reattn_dynamic_shared;
}
#else
REATTN_DEVICE int thread_index() { return sim::thread_index(); }
REATTN_DEVICE int block_threads() { return sim::block_threads(); }
REATTN_DEVICE int block_index_x() { return sim::block_index(0); }
REATTN_DEVICE int block_index_y() { return sim::block_index(1); }
REATTN_DEVICE char* shared_memory() { return sim::shared_memory(); }
#endif
// x itself, but the compiler may no longer assume so (no instruction is emitted): what it derives
// from x after this point is recomputed there instead of being kept live (or spilled) from before,
// e.g. the addresses a long loop body computes from the thread's coordinates.
#if defined(__CUDACC__)
REATTN_DEVICE int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}
REATTN_DEVICE int64_t opaque(int64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}
template <typename T>
REATTN_DEVICE T* opaque(T* x) {
  asm volatile("" : "+l"(x));
  return x;
}
#else
REATTN_DEVICE int opaque(int x) { return x; }
REATTN_DEVICE int64_t opaque(int64_t x) { return x; }
template <typename T>
REATTN_DEVICE T* opaque(T* x) { return x; }
#endif
REATTN_DEVICE int lane_index() { return thread_index() % kWarpSize; }
REATTN_DEVICE int warp_index() { return thread_index() / kWarpSize; }

// ---- barriers -----------------------------------------------------------------------------
#if defined(__CUDACC__)
REATTN_DEVICE void sync_threads() { __syncthreads(); }
// bar.sync id, threads: the warps of a group meet without stopping the others (id 1..15).
REATTN_DEVICE void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
REATTN_DEVICE void sync_warp() { __syncwarp(); }
#else
REATTN_DEVICE void sync_threads() { sim::sync_threads(); }
REATTN_DEVICE void named_barrier(int id, int threads) { sim::named_barrier(id, threads); }
REATTN_DEVICE void sync_warp() { sim::sync_warp(); }
#endif

// ---- shuffles (full warp) -------------------------------------------------------------------
#if defined(__CUDACC__)
REATTN_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
REATTN_DEVICE uint32_t shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
REATTN_DEVICE float shfl_idx(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
REATTN_DEVICE uint32_t shfl_idx(uint32_t v, int src) { return __shfl_sync(0xffffffffu, v, src); }
REATTN_DEVICE uint32_t ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
#else
REATTN_DEVICE uint32_t shfl_xor(uint32_t v, int mask) { return sim::shfl(v, sim::ShflMode::kXor, mask); }
REATTN_DEVICE uint32_t shfl_idx(uint32_t v, int src) { return sim::shfl(v, sim::ShflMode::kIdx, src); }
REATTN_DEVICE float shfl_xor(float v, int mask) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = shfl_xor(u, mask);
  std::memcpy(&v, &u, 4);
  return v;
}
REATTN_DEVICE float shfl_idx(float v, int src) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = shfl_idx(u, src);
  std::memcpy(&v, &u, 4);
  return v;
}
REATTN_DEVICE uint32_t ballot(bool p) { return sim::ballot(p); }
#endif
REATTN_DEVICE double shfl_xor(double v, int mask) {
  uint64_t u;
  std::memcpy(&u, &v, 8);
  const uint32_t lo = shfl_xor(static_cast<uint32_t>(u), mask);
  const uint32_t hi = shfl_xor(static_cast<uint32_t>(u >> 32), mask);
  u = (static_cast<uint64_t>(hi) << 32) | lo;
  std::memcpy(&v, &u, 8);
  return v;
}

// ---- shared-memory addresses --------------------------------------------------------------
// The 32-bit address of a shared-memory location (what ldmatrix and st.shared take). A loop that
// keeps such addresses and advances them by byte steps costs one add per access; from element
// indices with a run-time row size nvcc forms each address again (index, multiply, base).
#if defined(__CUDACC__)
REATTN_DEVICE uint32_t smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
// st.shared.b32 at a shared address.
REATTN_DEVICE void store_shared_b32(uint32_t address, uint32_t bits) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(bits) : "memory");
}
// st.shared.b16 of the low 16 bits of `bits`.
REATTN_DEVICE void store_shared_b16(uint32_t address, uint32_t bits) {
  asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(address), "h"(static_cast<unsigned short>(bits)) : "memory");
}
#else
REATTN_DEVICE uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const char*>(p) - sim::shared_memory());
}
REATTN_DEVICE void store_shared_b32(uint32_t address, uint32_t bits) {
  char* at = sim::shared_memory() + address;
  sim::check_store_aligned(at, 4);
  std::memcpy(at, &bits, 4);
}
REATTN_DEVICE void store_shared_b16(uint32_t address, uint32_t bits) {
  char* at = sim::shared_memory() + address;
  sim::check_store_aligned(at, 2);
  const uint16_t low = static_cast<uint16_t>(bits);
  std::memcpy(at, &low, 2);
}
#endif

// stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 (sm_90): lane l's register i holds the elements (row
// l/4, cols 2(l%4), 2(l%4)+1) of 8 x 8 matrix i (an mma C fragment, packed to 16 bits); lanes
// 8i..8i+7 give the shared addresses where the 8 columns of matrix i land as rows of 16 bytes. One
// instruction for what is else 8 16-bit stores per thread and the moves that put each value in a
// register's low half. has_stmatrix(): whether the code being compiled (or emulated) has it.
#if defined(__CUDACC__)
REATTN_DEVICE constexpr bool has_stmatrix() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return true;
#else
  return false;
#endif
}
REATTN_DEVICE void stmatrix_x4_trans_at(uint32_t row, const uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(row), "r"(w[0]),
               "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
#else
  __trap();  // callers test has_stmatrix()
#endif
}
#else
REATTN_DEVICE bool has_stmatrix() { return sim::arch() >= 90; }
REATTN_DEVICE void stmatrix_x4_trans_at(uint32_t row, const uint32_t (&w)[4]) {
  sim::stmatrix(4, true, w, sim::shared_memory() + row);
}
#endif

// ---- tensor cores -----------------------------------------------------------------------------
// D = A B + C for a 16 x 16 A (row-major fragment), 16 x 8 B (column-major fragment) and fp32
// C, D: mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32. Fragment layouts: PTX
// ISA "Matrix Fragments for mma.m16n8k16 with floating point type" (see sim.cpp).
template <typename E>
REATTN_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]);

#if defined(__CUDACC__)
template <>
REATTN_DEVICE void mma_m16n8k16<Bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                      const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
template <>
REATTN_DEVICE void mma_m16n8k16<F16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                     const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
#else
template <>
REATTN_DEVICE void mma_m16n8k16<Bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                      const float (&c)[4]) {
  sim::mma_m16n8k16(sim::MmaType::kBFloat16, d, a, b, c);
}
template <>
REATTN_DEVICE void mma_m16n8k16<F16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                     const float (&c)[4]) {
  sim::mma_m16n8k16(sim::MmaType::kFloat16, d, a, b, c);
}
#endif

// D = A B + C for a 16 x 8 A and 8 x 8 B: mma.sync.aligned.m16n8k8.row.col.f32.{bf16,f16}.{bf16,f16}.f32.
// Its fragments are the first halves of m16n8k16's (A: rows gq and gq + 8 at columns 2 tq, + 1;
// B: rows 2 tq, + 1 at column gq), so the emulator runs it as m16n8k16 with zero second halves.
template <typename E>
REATTN_DEVICE void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[2], uint32_t b, const float (&c)[4]);

#if defined(__CUDACC__)
template <>
REATTN_DEVICE void mma_m16n8k8<Bf16>(float (&d)[4], const uint32_t (&a)[2], uint32_t b, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
template <>
REATTN_DEVICE void mma_m16n8k8<F16>(float (&d)[4], const uint32_t (&a)[2], uint32_t b, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#else
template <typename E>
REATTN_DEVICE void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[2], uint32_t b, const float (&c)[4]) {
  const uint32_t a16[4] = {a[0], a[1], 0u, 0u}, b16[2] = {b, 0u};
  mma_m16n8k16<E>(d, a16, b16, c);
}
#endif

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: lanes 8i..8i+7 pass the 16-byte row
// addresses of matrix i; register i of lane l gets its row l/4, columns 2(l%4), 2(l%4)+1 (.trans:
// of the transposed matrix).
#if defined(__CUDACC__)
REATTN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
REATTN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
REATTN_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}
REATTN_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}
// The same at shared addresses (smem_address).
REATTN_DEVICE void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
}
REATTN_DEVICE void ldmatrix_x2_at(uint32_t (&r)[2], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(row));
}
REATTN_DEVICE void ldmatrix_x4_trans_at(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
}
#else
REATTN_DEVICE void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t row) {
  sim::ldmatrix(4, false, r, sim::shared_memory() + row);
}
REATTN_DEVICE void ldmatrix_x2_at(uint32_t (&r)[2], uint32_t row) {
  sim::ldmatrix(2, false, r, sim::shared_memory() + row);
}
REATTN_DEVICE void ldmatrix_x4_trans_at(uint32_t (&r)[4], uint32_t row) {
  sim::ldmatrix(4, true, r, sim::shared_memory() + row);
}
REATTN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) { sim::ldmatrix(4, false, r, row); }
REATTN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { sim::ldmatrix(4, true, r, row); }
REATTN_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) { sim::ldmatrix(2, false, r, row); }
REATTN_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { sim::ldmatrix(2, true, r, row); }
#endif

// movmatrix.sync.aligned.m8n8.trans.b16: an 8x8 matrix of 16-bit values that the warp holds as ldmatrix
// gives it (lane l: row l/4, columns 2(l%4), 2(l%4)+1, low half first), transposed across the lanes'
// registers: lane l gets row l/4, columns 2(l%4), 2(l%4)+1 of the transpose, what ldmatrix.trans of the
// same rows would have loaded. No shared memory: one register-to-register instruction (MOVM).
#if defined(__CUDACC__)
REATTN_DEVICE uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
#else
REATTN_DEVICE uint32_t movmatrix_trans(uint32_t x) { return sim::movmatrix_trans(x); }
#endif

// acc[t][n] += A_t B_n over the n8 tiles n < kN8 of B, a [16][8 kN8] tile of 16-bit values stored
// row-major (`row` elements apart, its k rows the products' k) and read by ldmatrix.trans: matrix
// i = lane / 8 is (k half i % 2, n8 tile n + i / 2). A_t: m16n8k16 A fragments of kTiles 16-row tiles,
// each B load serving every tile (the key pass's warps of two 16-key tiles read Q and dO once for both).
// (O += A V, dQ += dS K, dK += dS^T Q, dV += A^T dO.)
// An odd kN8 takes its last tile by ldmatrix.x2.trans (matrices 0 and 1 of the same lane addresses).
template <typename E, int kTiles, int kN8>
REATTN_DEVICE void mma_row_major(const uint32_t (&a)[kTiles][4], const E* tile, int row, int lane,
                                 float (&acc)[kTiles][kN8][4]) {
  const int i = lane / 8;
  const E* at = tile + ((i % 2) * 8 + lane % 8) * row + (i / 2) * 8;
#pragma unroll
  for (int n = 0; n + 1 < kN8; n += 2) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, at + n * 8);
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      mma_m16n8k16<E>(acc[t][n], a[t], b0, acc[t][n]);
      mma_m16n8k16<E>(acc[t][n + 1], a[t], b1, acc[t][n + 1]);
    }
  }
  if constexpr (kN8 % 2 != 0) {
    uint32_t b[2];
    ldmatrix_x2_trans(b, at + (kN8 - 1) * 8);
#pragma unroll
    for (int t = 0; t < kTiles; ++t) mma_m16n8k16<E>(acc[t][kN8 - 1], a[t], b, acc[t][kN8 - 1]);
  }
}
// One A fragment (one 16-row tile).
template <typename E, int kN8>
REATTN_DEVICE void mma_row_major(const uint32_t (&a)[4], const E* tile, int row, int lane, float (&acc)[kN8][4]) {
  mma_row_major(reinterpret_cast<const uint32_t(&)[1][4]>(a), tile, row, lane, reinterpret_cast<float(&)[1][kN8][4]>(acc));
}

// acc[t][n] = A_t B_n, from zero, over the n8 tiles n of B, a [16 kSteps][8 kN8] tile of 16-bit values stored
// column-major, [n][k] (`row` elements apart: the rows of K for B = K^T), read by ldmatrix without .trans: matrix
// i = lane / 8 is (n8 tile n + i / 2, k half i % 2). A_t: m16n8k16 A fragments of kTiles 16-row tiles over the
// kSteps k16 steps, each B load serving every tile. (q.k: the forward's rows, the statistics kernel's tiles.)
// The pairs of n8 tiles below round_up(kN8, 2) are computed, the others left as they are. kNarrow: the last
// step is its first 8 columns alone, m16n8k8 for n < kN8 (one ldmatrix.x4: kAccN8 <= 4), whose A is the k16
// A's first two registers (rows gq and gq + 8, columns 2 tq and 2 tq + 1).
template <typename E, int kTiles, int kSteps, int kN8, bool kNarrow, int kAccN8>
REATTN_DEVICE void mma_col_major(const uint32_t (&a)[kTiles][kSteps][4], const E* tile, int row, int lane,
                                 float (&acc)[kTiles][kAccN8][4]) {
  static_assert((kN8 + 1) / 2 * 2 <= kAccN8, "the computed pairs of n8 tiles fit acc");
  static_assert(!kNarrow || kAccN8 <= 4, "the narrow step's B: one ldmatrix.x4");
  constexpr int kWideSteps = kNarrow ? kSteps - 1 : kSteps;
  const int i = lane / 8;
#pragma unroll
  for (int n = 0; n < kN8; n += 2) {
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][n][e] = acc[t][n + 1][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kWideSteps; ++kk) {
      uint32_t b[4];
      ldmatrix_x4(b, tile + ((n + i / 2) * 8 + lane % 8) * row + kk * 16 + (i % 2) * 8);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        mma_m16n8k16<E>(acc[t][n], a[t][kk], b0, acc[t][n]);
        mma_m16n8k16<E>(acc[t][n + 1], a[t][kk], b1, acc[t][n + 1]);
      }
    }
  }
  if constexpr (kNarrow) {
    uint32_t b[4];
    ldmatrix_x4(b, tile + (i * 8 + lane % 8) * row + kWideSteps * 16);
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const uint32_t a8[2] = {a[t][kWideSteps][0], a[t][kWideSteps][1]};
#pragma unroll
      for (int n = 0; n < kN8; ++n) mma_m16n8k8<E>(acc[t][n], a8, b[n], acc[t][n]);
    }
  }
}

// ---- asynchronous copies global -> shared -------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], 16, src_bytes: 16 bytes, the ones past src_bytes zero
// (src_bytes = 0 fills zeros without reading). Both addresses 16-byte aligned. The copies of a
// thread form groups (commit); wait<N> returns once at most N of its newest groups are in flight.
// Other threads see the data only after a barrier that follows the wait.
#if defined(__CUDACC__)
REATTN_DEVICE void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// The same copy with all 16 bytes read (no src_bytes operand, so no zero-fill arithmetic around it).
REATTN_DEVICE void cp_async_16_full(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src) : "memory");
}
// The same 16 bytes, all of them read (read true) or all zero, reading nothing (cp.async's ignore-src
// predicate): no byte count to form per copy where whole 16-byte chunks are known to be readable.
REATTN_DEVICE void cp_async_16_or_zero(void* dst, const void* src, bool read) {
  asm volatile(
      "{\n .reg .pred ignore;\n setp.eq.u32 ignore, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, ignore;\n}\n" ::
          "r"(smem_address(dst)),
      "l"(src), "r"(static_cast<uint32_t>(read))
      : "memory");
}
REATTN_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
REATTN_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
REATTN_DEVICE void cp_async_16(void* dst, const void* src, int src_bytes) { sim::cp_async(dst, src, 16, src_bytes); }
REATTN_DEVICE void cp_async_16_full(void* dst, const void* src) { sim::cp_async(dst, src, 16, 16); }
REATTN_DEVICE void cp_async_16_or_zero(void* dst, const void* src, bool read) {
  sim::cp_async(dst, src, 16, read ? 16 : 0);
}
REATTN_DEVICE void cp_async_commit() { sim::cp_async_commit(); }
template <int N>
REATTN_DEVICE void cp_async_wait() {
  sim::cp_async_wait(N);
}
#endif

// ---- global stores -------------------------------------------------------------------------------
// Two 16-bit values as one 32-bit store; the address must be 4-byte aligned (the emulator checks).
#if defined(__CUDACC__)
REATTN_DEVICE void store_pair(void* address, uint32_t bits) { *static_cast<uint32_t*>(address) = bits; }
#else
REATTN_DEVICE void store_pair(void* address, uint32_t bits) {
  sim::check_store_aligned(address, 4);
  std::memcpy(address, &bits, 4);
}
#endif

// 8- and 16-byte global loads and stores, as 32-bit words; the address must be aligned to
// the access's size (the emulator checks: a GPU faults, x86 would not notice).
struct Words4 {
  uint32_t w[4];
};
#if defined(__CUDACC__)
REATTN_DEVICE Words4 load_16(const void* address) {
  const uint4 v = __ldg(static_cast<const uint4*>(address));
  return Words4{{v.x, v.y, v.z, v.w}};
}
REATTN_DEVICE void load_8(const void* address, uint32_t (&w)[2]) {
  const uint2 v = __ldg(static_cast<const uint2*>(address));
  w[0] = v.x;
  w[1] = v.y;
}
REATTN_DEVICE void store_8(void* address, uint32_t lo, uint32_t hi) {
  *static_cast<uint2*>(address) = make_uint2(lo, hi);
}
REATTN_DEVICE uint32_t bits(float x) { return __float_as_uint(x); }
REATTN_DEVICE float from_bits(uint32_t b) { return __uint_as_float(b); }
REATTN_DEVICE void store_16(void* address, const Words4& v) {
  *static_cast<uint4*>(address) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
}
// A 16-byte load that may be shared memory (one LDS.128 there; load_16 is for global memory).
REATTN_DEVICE void load_words(const void* address, uint32_t (&w)[4]) {
  const uint4 v = *static_cast<const uint4*>(address);
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}
// Likewise 8 bytes (one LDS.64; load_8 is for global memory).
REATTN_DEVICE void load_words(const void* address, uint32_t (&w)[2]) {
  const uint2 v = *static_cast<const uint2*>(address);
  w[0] = v.x, w[1] = v.y;
}
#else
REATTN_DEVICE Words4 load_16(const void* address) {
  sim::check_load_aligned(address, 16);
  Words4 v;
  std::memcpy(v.w, address, 16);
  return v;
}
REATTN_DEVICE void load_8(const void* address, uint32_t (&w)[2]) {
  sim::check_load_aligned(address, 8);
  std::memcpy(w, address, 8);
}
REATTN_DEVICE void store_8(void* address, uint32_t lo, uint32_t hi) {
  sim::check_store_aligned(address, 8);
  const uint32_t w[2] = {lo, hi};
  std::memcpy(address, w, 8);
}
REATTN_DEVICE uint32_t bits(float x) {
  uint32_t r;
  std::memcpy(&r, &x, 4);
  return r;
}
REATTN_DEVICE float from_bits(uint32_t b) {
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}
REATTN_DEVICE void store_16(void* address, const Words4& v) {
  sim::check_store_aligned(address, 16);
  std::memcpy(address, v.w, 16);
}
REATTN_DEVICE void load_words(const void* address, uint32_t (&w)[4]) {
  sim::check_load_aligned(address, 16);
  std::memcpy(w, address, 16);
}
REATTN_DEVICE void load_words(const void* address, uint32_t (&w)[2]) {
  sim::check_load_aligned(address, 8);
  std::memcpy(w, address, 8);
}
#endif

// ---- math ---------------------------------------------------------------------------------------
#if defined(__CUDACC__)
// ex2.approx.ftz.f32 (MUFU.EX2): relative error 2^-22 over the range that matters; exp2(-inf) = 0.
REATTN_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
REATTN_DEVICE float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// rcp.approx.ftz.f32 (MUFU.RCP): at most 1 ulp from 1/x, a subnormal argument counts as 0. For the
// forward's 1 / l (l >= 1: the row maximum's own term), where __frcp_rn's correctly rounded reciprocal
// took a Newton step and a branch to its slow path around the MUFU (~10 instructions a call).
REATTN_DEVICE float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
REATTN_DEVICE float rsqrt_approx(float x) { return rsqrtf(x); }
// rsqrt.approx.ftz: a subnormal argument counts as 0 (result +inf), without rsqrtf's subnormal
// scaling (a compare and two multiplies per call). For LayerNorm's variance + eps (eps >= FLT_MIN in
// any real use) in the forward's tensor-core mixing; the other callers keep rsqrtf (with this one
// nvcc laid out the backward row pass differently: +2% integer instructions at DeepViT-16b).
REATTN_DEVICE float rsqrt_approx_ftz(float x) {
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
REATTN_DEVICE float fmax_(float a, float b) { return fmaxf(a, b); }
REATTN_DEVICE float fabs_(float a) { return fabsf(a); }
REATTN_DEVICE uint32_t mul_hi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
#else
REATTN_DEVICE float exp2_approx(float x) { return std::exp2(x); }
REATTN_DEVICE float log2_approx(float x) { return std::log2(x); }
REATTN_DEVICE float rcp_approx(float x) { return 1.0f / x; }
REATTN_DEVICE float rsqrt_approx(float x) { return 1.0f / std::sqrt(x); }
REATTN_DEVICE float rsqrt_approx_ftz(float x) {
  return std::fabs(x) < 1.17549435e-38f ? 1.0f / std::copysign(0.0f, x) : 1.0f / std::sqrt(x);
}
REATTN_DEVICE float fmax_(float a, float b) { return std::fmax(a, b); }
REATTN_DEVICE float fabs_(float a) { return std::fabs(a); }
REATTN_DEVICE uint32_t mul_hi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
#endif

// x *= s for every entry of a [heads][n8 tiles][4] array of mma accumulators.
template <int kHeads, int kN8>
REATTN_DEVICE void scale_accumulators(float (&x)[kHeads][kN8][4], float s) {
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[j][n][e] *= s;
    }
  }
}

// ---- 16-bit conversions (round to nearest even) ----------------------------------------------
template <typename E>
struct Convert;

template <>
struct Convert<Bf16> {
#if defined(__CUDACC__)
  static REATTN_DEVICE uint32_t pack(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static REATTN_DEVICE float to_float(uint16_t bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }
  static REATTN_DEVICE uint16_t from_float(float x) { return static_cast<uint16_t>(pack(x, 0.0f) & 0xffffu); }
  // The pairs' products a b, rounded once: fma.rn.bf16x2 with a -0 addend (sm_80+), which keeps a zero
  // product's sign.
  static REATTN_DEVICE uint32_t mul(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
    return r;
  }
#else
  static REATTN_DEVICE uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(sim::float_to_bf16(lo)) | (static_cast<uint32_t>(sim::float_to_bf16(hi)) << 16);
  }
  static REATTN_DEVICE float to_float(uint16_t bits) { return sim::bf16_to_float(bits); }
  static REATTN_DEVICE uint16_t from_float(float x) { return sim::float_to_bf16(x); }
  // Two bf16 values' product is exact in fp32 (8-bit significands) outside fp32's subnormal range, so rounding
  // it is the fma's one rounding (a product below 2^-126 would be rounded twice here).
  static REATTN_DEVICE uint32_t mul(uint32_t a, uint32_t b) { return pack(low(a) * low(b), high(a) * high(b)); }
#endif
  static REATTN_DEVICE float low(uint32_t r) { return to_float(static_cast<uint16_t>(r & 0xffffu)); }
  static REATTN_DEVICE float high(uint32_t r) { return to_float(static_cast<uint16_t>(r >> 16)); }
};

template <>
struct Convert<F16> {
#if defined(__CUDACC__)
  static REATTN_DEVICE uint32_t pack(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static REATTN_DEVICE float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static REATTN_DEVICE uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
#else
  static REATTN_DEVICE uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(sim::float_to_f16(lo)) | (static_cast<uint32_t>(sim::float_to_f16(hi)) << 16);
  }
  static REATTN_DEVICE float to_float(uint16_t bits) { return sim::f16_to_float(bits); }
  static REATTN_DEVICE uint16_t from_float(float x) { return sim::float_to_f16(x); }
#endif
  static REATTN_DEVICE float low(uint32_t r) { return to_float(static_cast<uint16_t>(r & 0xffffu)); }
  static REATTN_DEVICE float high(uint32_t r) { return to_float(static_cast<uint16_t>(r >> 16)); }
};

// ---- global atomics (parameter-gradient and statistics sums) ---------------------------------
#if defined(__CUDACC__)
REATTN_DEVICE void atomic_add(float* p, float v) { atomicAdd(p, v); }
REATTN_DEVICE void atomic_add(double* p, double v) { atomicAdd(p, v); }
#else
REATTN_DEVICE void atomic_add(float* p, float v) { sim::atomic_add(p, v); }
REATTN_DEVICE void atomic_add(double* p, double v) { sim::atomic_add(p, v); }
#endif

}  // namespace dev
}  // namespace reattn
