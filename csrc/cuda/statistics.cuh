// The softmax row statistics of long rows (more than 224 keys), per head, on tensor cores: the statistics kernel.
//
//   S_h = scale q_h k_h^T,  m = max_j S[i, j],  l = sum_j exp(S[i, j] - m)   ->   lse[b, h, i] = (m, log l)
//
// The fused forward over key segments (rows.cuh, Nk > 224: DeepViT-L-384's 577 keys) needs every row's
// statistics before its first segment. Swept inside it, they cost a pass over every head's keys per
// program of 32 query rows; here one program (batch element b, head h, kRows = 128 query rows) reads
// its head's keys once, and each warp holds 32 rows (two m16 tiles) against each K fragment it loads,
// so a K tile is read from shared memory 4 times per 128 rows where the sweep's warps read it 8 times.
// The forward then reads the statistics (ReAttnParams::stats_is_input, RowProgram::load_statistics).
//
// Per program: q fragments of its rows loaded once from global memory element by element (q's rows
// need not be 16-byte aligned: the segmented forward reads q unpadded); K tiles of 32 keys through a
// 2-slot cp.async ring in whole 16-byte chunks (K's rows 16-byte aligned, zero from D to the next
// multiple of 8: the plain variants' inputs, ops.cpp use_aligned_inputs); per tile the products
// m16n8k16 (the narrow tail's last step m16n8k8, as rows.cuh's), the running max and sum per row
// (sweep_tile: one FMA and exponential per entry, the raw products' max), and at the end the quad's
// merge (merge_quad_statistics). Only the plain problems: no mask (every row has a key), scale > 0.
#pragma once

#include <cstdint>

#include "device.cuh"
#include "params.h"
#include "rows.cuh"
#include "tiles.h"

namespace reattn {
namespace cuda {

// warps x tiles m16 tiles of query rows; d: the q.k columns (a multiple of 16); narrow: the last k16 step's
// first 8 columns alone (a head dim of at most d - 8).
template <typename E_, int kWarps_, int kTiles_, int kD_, int kNarrow_>
struct StatisticsConfig {
  using E = E_;
  static constexpr int kWarps = kWarps_, kTiles = kTiles_, kD = kD_;
  static constexpr bool kNarrow = kNarrow_ != 0;
  static constexpr StatisticsShape shape() { return StatisticsShape{kWarps, kTiles, kD, kNarrow}; }
  static constexpr int kThreads = 32 * kWarps, kRows = 16 * kTiles * kWarps;
  static constexpr int kKSteps = kD / 16;
  static constexpr int kTileN8 = kKeyTile / 8;
  static_assert(kD % 16 == 0 && (!kNarrow || kD % 32 == 16), "tile shape");
};

template <class Cfg>
struct StatisticsProgram {
  using E = typename Cfg::E;
  static constexpr int kRow = statistics_row(Cfg::shape());  // elements per shared row of a K tile

  const ReAttnParams& p;
  char* smem;
  int lane, warp, gq, tq;  // gq = lane / 4 (fragment row), tq = lane % 4
  int64_t b;
  int h, m0, Nq, Nk, D;
  int issued = 0;
  // The K copies' per-thread parts, formed once: thread t copies the 16-byte chunks t / 32 + kChunkLanes j
  // (j < kCopies) of tile row copy_row = t % 32, those that hold some of D's columns (copy_ok).
  static constexpr int kChunkLanes = Cfg::kThreads / kKeyTile;
  static constexpr int kCopies = (Cfg::kD / 8 + kChunkLanes - 1) / kChunkLanes;
  static_assert(Cfg::kThreads % kKeyTile == 0, "a whole number of threads per K tile row");
  int copy_row;
  int64_t row_bytes;
  const char* copy_src[kCopies];
  uint32_t copy_dst[kCopies];
  bool copy_ok[kCopies];

  REATTN_DEVICE explicit StatisticsProgram(const ReAttnParams& params) : p(params), smem(dev::shared_memory()) {
    Nq = p.Nq;
    Nk = p.Nk;
    D = p.D;
    const int tid = dev::thread_index();
    lane = tid % 32;
    warp = tid / 32;
    gq = lane / 4;
    tq = lane % 4;
    const int blocks_m = (Nq + Cfg::kRows - 1) / Cfg::kRows;
    const int64_t bh = dev::block_index_x() / blocks_m;
    m0 = static_cast<int>(dev::block_index_x() - bh * blocks_m) * Cfg::kRows;
    b = bh / p.H;
    h = static_cast<int>(bh - b * p.H);
    // Row 0 of head h of batch element b of k.
    const char* keys =
        static_cast<const char*>(p.k) + (b * p.k_st.b + h * p.k_st.h) * static_cast<int64_t>(sizeof(E));
    row_bytes = p.k_st.n * static_cast<int64_t>(sizeof(E));
    copy_row = tid % kKeyTile;
    const int chunks = (D + 7) / 8;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      const int chunk = tid / kKeyTile + kChunkLanes * j;
      copy_ok[j] = chunk < chunks;
      copy_src[j] = keys + copy_row * row_bytes + chunk * 16;
      copy_dst[j] = static_cast<uint32_t>((copy_row * kRow + chunk * 8) * sizeof(E));
    }
  }

  REATTN_DEVICE E* slot_tile(int slot) const {
    return reinterpret_cast<E*>(smem + slot * statistics_slot_bytes(Cfg::shape()));
  }

  // Columns from D's 8-column chunks to d, in both slots, zero (the copies never write them, and q's zero
  // columns would meet NaN there); none in the narrow tail's, whose products stop at d - 8.
  REATTN_DEVICE void zero_idle_columns() const {
    const int first = (D + 7) / 8, chunks = (Cfg::kNarrow ? Cfg::kD - 8 : Cfg::kD) / 8 - first;
    if (chunks <= 0) return;
    for (int i = dev::thread_index(); i < 2 * kKeyTile * chunks; i += Cfg::kThreads) {
      const int row = i / chunks, chunk = first + (i - row * chunks);
      uint32_t* dst = reinterpret_cast<uint32_t*>(slot_tile(row / kKeyTile) + (row % kKeyTile) * kRow + chunk * 8);
      dst[0] = dst[1] = dst[2] = dst[3] = 0u;
    }
  }

  // K tile: keys key0 .. key0 + 32 of the head (rows past Nk not copied: their scores are set to -inf), D's
  // 16-byte chunks, into the next ring slot.
  REATTN_DEVICE void issue_keys(int key0) {
    char* tile = reinterpret_cast<char*>(slot_tile(issued++ & 1));
    const int64_t offset = key0 * row_bytes;
    const bool real = key0 + copy_row < Nk;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      if (real && copy_ok[j]) dev::cp_async_16_full(tile + copy_dst[j], copy_src[j] + offset);
    }
    dev::cp_async_commit();
  }

  // A fragments of m16 tile t of the warp (rows m0 + 16 (kTiles warp + t) + gq, + 8): columns 16 kk + 8 (r / 2)
  // + 2 tq and the next; zero past D and Nq.
  REATTN_DEVICE void load_queries(uint32_t (&qf)[Cfg::kTiles][Cfg::kKSteps][4]) const {
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_st.b + h * p.q_st.h;
#pragma unroll
    for (int t = 0; t < Cfg::kTiles; ++t) {
      const int r0 = m0 + 16 * (Cfg::kTiles * warp + t) + gq;
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = r0 + (r & 1) * 8, col = 16 * kk + 8 * (r >> 1) + 2 * tq;
          const uint16_t* at = q + row * p.q_st.n + col * p.q_st.d;
          const uint32_t lo = row < Nq && col < D ? at[0] : 0u;
          const uint32_t hi = row < Nq && col + 1 < D ? at[p.q_st.d] : 0u;
          qf[t][kk][r] = lo | (hi << 16);
        }
      }
    }
  }

  // s[t][n] = q k^T of m16 tile t and the 4 n8 tiles of the K tile in `slot`: each B fragment loaded once for
  // the warp's kTiles m16 tiles (dev::mma_col_major). kN8 < kTileN8 (a tile whose keys all lie in its first kN8
  // n8 tiles): the pairs of n8 tiles below round_up(kN8, 2) are computed (the narrow tail's last step for
  // n < kN8 only), the others left unset.
  template <int kN8 = Cfg::kTileN8>
  REATTN_DEVICE void score_tile(int slot, const uint32_t (&qf)[Cfg::kTiles][Cfg::kKSteps][4],
                                float (&s)[Cfg::kTiles][Cfg::kTileN8][4]) const {
    dev::mma_col_major<E, Cfg::kTiles, Cfg::kKSteps, kN8, Cfg::kNarrow>(qf, slot_tile(slot), kRow, lane, s);
  }

  REATTN_DEVICE void run() {
    uint32_t qf[Cfg::kTiles][Cfg::kKSteps][4];
    zero_idle_columns();
    issue_keys(0);
    load_queries(qf);
    float m[Cfg::kTiles][2], l[Cfg::kTiles][2];
#pragma unroll
    for (int t = 0; t < Cfg::kTiles; ++t) {
      m[t][0] = m[t][1] = -INFINITY;
      l[t][0] = l[t][1] = 0.0f;
    }
    const float c = static_cast<float>(p.scale) * kLog2e;
    const int tiles = (Nk + kKeyTile - 1) / kKeyTile;
    for (int k = 0; k < tiles; ++k) {
      // Tile k landed and every warp is done with tile k - 1, whose slot the next copy overwrites.
      dev::cp_async_wait<0>();
      dev::sync_threads();
      if (k + 1 < tiles) issue_keys((k + 1) * kKeyTile);
      float s[Cfg::kTiles][Cfg::kTileN8][4];
      const int key0 = k * kKeyTile;
      if (Nk - key0 <= 8) {
        // A last tile of at most 8 keys (DeepViT-L-384's 577th) takes its first n8 tile alone.
        score_tile<1>(k & 1, qf, s);
#pragma unroll
        for (int t = 0; t < Cfg::kTiles; ++t) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (key0 + 2 * tq + (e & 1) >= Nk) s[t][0][e] = -INFINITY;
          }
          sweep_tile<true, 1>(s[t], c, m[t], l[t]);
        }
        continue;
      }
      score_tile(k & 1, qf, s);
#pragma unroll
      for (int t = 0; t < Cfg::kTiles; ++t) {
        if (key0 + kKeyTile > Nk) {  // keys past Nk: -inf (exp 0)
#pragma unroll
          for (int n = 0; n < Cfg::kTileN8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if (key0 + n * 8 + 2 * tq + (e & 1) >= Nk) s[t][n][e] = -INFINITY;
            }
          }
        }
        sweep_tile<true>(s[t], c, m[t], l[t]);
      }
    }
    // (m, log l) in natural units, as rows.cuh write_stats: every row has a key (Nk >= 1, no mask).
    float* out = static_cast<float*>(p.lse) + (b * p.H + h) * static_cast<int64_t>(Nq) * 2;
#pragma unroll
    for (int t = 0; t < Cfg::kTiles; ++t) {
      m[t][0] *= static_cast<float>(p.scale);
      m[t][1] *= static_cast<float>(p.scale);
      merge_quad_statistics(m[t], l[t]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + 16 * (Cfg::kTiles * warp + t) + gq + 8 * r;
        if (tq == 0 && row < Nq) {
          out[2 * row] = m[t][r];
          out[2 * row + 1] = dev::log2_approx(l[t][r]) / kLog2e;
        }
      }
    }
  }
};

}  // namespace cuda
}  // namespace reattn
