// The head mixing and the across-head reductions shared by the row programs (rows.cuh) and the key
// pass (keys.cuh). A warp owns heads group, group + groups, ... (at most kHeads of them) and holds,
// per 16 x 16 tile, the 8 fragment entries of the mma A layout: entry e sits at tile row
// gq + 8 ((e / 2) % 2) and column 2 tq + e % 2 + 8 (e / 4), the same for every head, so mixing
// across heads is per-thread arithmetic.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device.cuh"

namespace reattn {
namespace cuda {

// Whether a plain backward program (the row pass or the key pass) mixes the heads on tensor cores,
// W' split into bf16 hi + lo (fp16's range would not hold every W'). One rule for both passes: the key
// pass's dP' must round W' as the row pass's D does (Mixer::split_rounded).
template <typename E>
constexpr bool backward_tensor_mixing(bool plain, int max_heads) {
  return plain && max_heads <= 16 && std::is_same_v<E, dev::Bf16>;
}

template <typename E, int kGroups, int kHeads, int kMaxHeads>
struct Mixer {
  using Cv = dev::Convert<E>;
  static constexpr int kHeadsPad = kHeads <= 4 ? 4 : 8;  // weights per (head, group): float4 loads
  // With 8 groups the per-head loops stay rolled in their inner dimension: unrolled, the compiler
  // pipelines 16 heads' loads and runs out of registers.
  static constexpr int kUnroll = kGroups >= 8 ? 1 : kGroups;

  // acc[j] = bias[g_j] + sum_h W'[g_j, h] X_h over the H input heads of a [h][rows][row] buffer of
  // 16-bit values (tile: the lane's ldmatrix row address of head 0, head_stride elements apart);
  // weights [h][groups][kHeadsPad] hold W'[g_j][h] at [h][group][j]. mean (with_mean) adds
  // column_mean[h] X_h to mean (LayerNorm's mean over all output heads); own[j]: the raw X of head
  // g_j (its sign bits mark masked entries); clamp: negative stored values count as 0.
  static REATTN_DEVICE void mix(const E* tile, size_t head_stride, const float* weights, const float* bias,
                                const float* column_mean, float bias_mean, int H, int group,
                                float (&acc)[kHeads][8], float (&mean)[8], uint32_t (&own)[kHeads][4],
                                bool with_mean, bool clamp) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const float c = bias[group + kGroups * j];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = c;
#pragma unroll
      for (int r = 0; r < 4; ++r) own[j][r] = 0;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = bias_mean;
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
#pragma unroll kUnroll
      for (int rr = 0; rr < kGroups; ++rr) {
        const int h = j * kGroups + rr;
        if (h == 0 || h < H) {  // head 0 always exists: its FMAs take the bias as addend
          uint32_t pr[4];
          dev::ldmatrix_x4(pr, tile + h * head_stride);
          float pv[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            pv[e] = e & 1 ? Cv::high(pr[e / 2]) : Cv::low(pr[e / 2]);
            if (clamp) pv[e] = dev::fmax_(pv[e], 0.0f);
          }
          const float* w = weights + (h * kGroups + group) * kHeadsPad;
#pragma unroll
          for (int j2 = 0; j2 < kHeads; ++j2) {
            const float wj = w[j2];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[j2][e] += wj * pv[e];
          }
          if (with_mean) {
            const float wb = column_mean[h];
#pragma unroll
            for (int e = 0; e < 8; ++e) mean[e] += wb * pv[e];
          }
          if (rr == group) {
#pragma unroll
            for (int r = 0; r < 4; ++r) own[j][r] = pr[r];
          }
        }
      }
    }
  }

  // out[j] = sum_g W'[g, h_j] X_g for the warp's heads h_j (the transposed mixing of the backward),
  // weights_t [g][groups][kHeadsPad] = W'[g][h_j] at [g][group][j].
  static REATTN_DEVICE void mix_transposed(const E* tile, size_t head_stride, const float* weights_t, int H, int group,
                                           float (&out)[kHeads][8]) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
#pragma unroll
      for (int e = 0; e < 8; ++e) out[j][e] = 0.0f;
    }
#pragma unroll kUnroll
    for (int g = 0; g < kMaxHeads; ++g) {
      if (g < H) {
        uint32_t mr[4];
        dev::ldmatrix_x4(mr, tile + g * head_stride);
        float mv[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) mv[e] = e & 1 ? Cv::high(mr[e / 2]) : Cv::low(mr[e / 2]);
        const float* w = weights_t + (g * kGroups + group) * kHeadsPad;
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
          const float wj = w[j];
#pragma unroll
          for (int e = 0; e < 8; ++e) out[j][e] += wj * mv[e];
        }
      }
    }
  }

  // The forward's A fragments (mma m16n8k16, rows gq, gq + 8, columns 2 tq .., 8 + 2 tq ..) of
  // [W' | c'] (rows: output heads g, columns: input heads h, c' at h = H) split as hi + lo, from
  // weights [h][groups][kHeadsPad] (W'[g][h] at [h][g % groups][g / groups]). Zero past H. W' is
  // fp32: hi + lo carries 16 of its bits, so products on tensor cores are as exact as fp32
  // multiply-adds of split_rounded(W'). (The backward's come from its fragment table, below.)
  static REATTN_DEVICE void weight_fragments(const float* weights, const float* bias, int H, int gq, int tq,
                                             uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    split_fragments<false>(gq, tq, hi, lo, [&](int g, int h) {
      return g >= H ? 0.0f : h < H ? weights[(h * kGroups + g % kGroups) * kHeadsPad + g / kGroups]
                         : h == H ? bias[g] : 0.0f;
    });
  }

  // The backward's fragment table ([4][32][4] words: per lane hi and lo of W', then of W'^T; no bias
  // column), filled by the block's first warp from row-major W'[g][h] (the folded parameters in
  // global memory, so no barrier after the shared copy is needed); read after the block's next barrier.
  static REATTN_DEVICE void fill_fragment_table(const float* w, int H, int thread, uint32_t* table) {
    if (thread >= 32) return;
    const auto at = [&](int g, int h) { return g < H && h < H ? w[g * H + h] : 0.0f; };
    uint32_t q[4][4];
    split_fragments<false>(thread / 4, thread % 4, q[0], q[1], at);
    split_fragments<true>(thread / 4, thread % 4, q[2], q[3], at);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
      for (int r = 0; r < 4; ++r) table[(t * 32 + thread) * 4 + r] = q[t][r];
    }
  }
  // The lane's W' (kTransposed: W'^T) fragments from that table: two 16-byte loads.
  template <bool kTransposed>
  static REATTN_DEVICE void table_fragments(const uint32_t* table, int lane, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
    table += (kTransposed ? 2 : 0) * 32 * 4;
    dev::load_words(table + lane * 4, hi);
    dev::load_words(table + (32 + lane) * 4, lo);
  }

  // The fragments of the matrix whose entry (g, h) is w(g, h) (output head g, input head h), split.
  template <bool kTransposed, class F>
  static REATTN_DEVICE void split_fragments(int gq, int tq, uint32_t (&hi)[4], uint32_t (&lo)[4], const F& w) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = gq + 8 * (r % 2), col = 2 * tq + 8 * (r / 2);
      float x[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) x[k] = kTransposed ? w(col + k, row) : w(row, col + k);
      split_pair(x, hi[r], lo[r]);
    }
  }

  // The tensor-core mixings (rows.cuh mix_in_place, tensor_mix, tensor_grad_probs; keys.cuh
  // tensor_mix, tensor_grad_keys) are one product per row (or key) of the split weights' A fragments
  // and B = one head-major tile column read by ldmatrix.trans from [head][row][col] tiles. Narrow
  // (k = 8 heads), a matrix m = lane / 8 is one 8 x 8 tile, (row m / 2, column octet m % 2): two rows
  // per load; wide (k = 16), (head block m % 2, octet m / 2): one row per load. The lane's head (not
  // yet clamped to H), row offset and octet:
  struct TransLane {
    int head, row, octet;
  };
  template <bool kNarrow>
  static REATTN_DEVICE TransLane trans_lane(int lane) {
    const int m = lane / 8;
    return TransLane{kNarrow ? lane % 8 : (m % 2) * 8 + lane % 8, kNarrow ? m / 2 : 0, kNarrow ? m % 2 : m / 2};
  }
  // d = (hi + lo) B + c for tile t of such a load b (tiles: (row t / 2, octet t % 2) narrow, octet t
  // wide): m16n8k8 on b[t] with W' columns 0 .. 7, or m16n8k16 on b[2t], b[2t + 1].
  template <bool kNarrow>
  static REATTN_DEVICE void split_product(float (&d)[4], const uint32_t (&hi)[4], const uint32_t (&lo)[4],
                                          const uint32_t (&b)[4], int t, const float (&c)[4]) {
    if constexpr (kNarrow) {
      const uint32_t hi8[2] = {hi[0], hi[1]}, lo8[2] = {lo[0], lo[1]};
      dev::mma_m16n8k8<E>(d, hi8, b[t], c);
      dev::mma_m16n8k8<E>(d, lo8, b[t], d);
    } else {
      const uint32_t bf[2] = {b[2 * t], b[2 * t + 1]};
      dev::mma_m16n8k16<E>(d, hi, bf, c);
      dev::mma_m16n8k16<E>(d, lo, bf, d);
    }
  }

  // The warp's 16 / kGroups rows of a slab: split_product for every tile of the loads from `src`
  // (the lane's trans_lane address, src_row elements per row), each C fragment d handed to
  // tile(row, col8, d) (row: 0 .. 16 / kGroups - 1 within the warp's rows; col8: the octet of columns).
  template <bool kNarrow, class F>
  static REATTN_DEVICE void split_tiles(const E* src, int src_row, const uint32_t (&hi)[4], const uint32_t (&lo)[4],
                                        const F& tile) {
    constexpr int kPerWarp = 16 / kGroups;
    constexpr int kPerLoad = kNarrow ? 2 : 1;
    static_assert(16 % kGroups == 0 && kPerWarp % kPerLoad == 0, "whole loads per warp");
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < kPerWarp; r += kPerLoad) {
      uint32_t b[4];
      dev::ldmatrix_x4_trans(b, src + r * src_row);
#pragma unroll
      for (int t = 0; t < 2 * kPerLoad; ++t) {  // tiles: (row r + t / 2, octet t % 2)
        float d[4];
        split_product<kNarrow>(d, hi, lo, b, t, zero);
        tile(r + t / 2, t % 2, d);
      }
    }
  }

  // M - c (the key pass: M^T - c) of a slab's 16 rows (keys) on tensor cores, through a 16-bit
  // [head][row][col] buffer (rows.cuh and keys.cuh tensor_mix): the warp's 16 / kGroups rows, each one
  // split_product per 8 columns of the W' fragments hi, lo and B from `src` (the lane's trans_lane
  // address, src_row elements per row); their C entries (heads gq, gq + 8) to `dst` (the lane's first
  // entry; dst_row per row, dst_head per head); the slab's barrier; then the warp's output heads' A
  // fragments back from `back` (the lane's ldmatrix row address of head 0), rounded to 16 bits.
  template <bool kNarrow>
  static REATTN_DEVICE void mix_through(const E* src, int src_row, E* dst, int dst_row, int dst_head, const E* back,
                                        const uint32_t (&hi)[4], const uint32_t (&lo)[4], int H, int gq, int group,
                                        int slab, float (&acc)[kHeads][8]) {
    constexpr int kHalves = kNarrow ? 1 : 2;  // C rows gq and gq + 8
    split_tiles<kNarrow>(src, src_row, hi, lo, [&](int row, int col8, const float (&d)[4]) {
      E* at_t = dst + row * dst_row + col8 * 8;
#pragma unroll
      for (int half = 0; half < kHalves; ++half) {
        if (gq + 8 * half < H) *reinterpret_cast<uint32_t*>(at_t + half * 8 * dst_head) = Cv::pack(d[2 * half], d[2 * half + 1]);
      }
    });
    if constexpr (kGroups > 1) {
      dev::named_barrier(1 + slab, 32 * kGroups);  // the slab's every row
    } else {
      dev::sync_warp();
    }
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      uint32_t mr[4];
      dev::ldmatrix_x4(mr, back + static_cast<size_t>(g < H ? g : 0) * dst_head);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = e & 1 ? Cv::high(mr[e / 2]) : Cv::low(mr[e / 2]);
    }
  }

  // Two fp32 values as two packed 16-bit pairs hi, lo with hi + lo carrying 16 bits of each.
  static REATTN_DEVICE void split_pair(const float (&x)[2], uint32_t& hi, uint32_t& lo) {
    hi = Cv::pack(x[0], x[1]);
    lo = Cv::pack(x[0] - Cv::low(hi), x[1] - Cv::high(hi));
  }

  // w as the tensor-core products take it: hi + lo, two 16-bit values (16 significant bits in
  // bf16). The plain bf16 backward uses W' so rounded in D (rows.cuh) and in dP' of both passes,
  // which keeps dP' - D exactly 0 where the two agree in exact arithmetic (one key: dS = 0).
  static REATTN_DEVICE float split_rounded(float w) {
    const float hi = Cv::low(Cv::pack(w, 0.0f));
    return hi + Cv::low(Cv::pack(w - hi, 0.0f));
  }

  // Sums x at each entry over the warps of a group of kGroups warps (the owners of every head of
  // the same entries): partials through `region` ([kGroups][32][stride] floats), a named barrier.
  // A region is written again only after the caller's next block barrier.
  static REATTN_DEVICE void group_sum(float* region, int stride, int barrier, int group, int lane, float (&x)[8]) {
    if (kGroups == 1) return;
#pragma unroll
    for (int e = 0; e < 8; ++e) region[(group * 32 + lane) * stride + e] = x[e];
    dev::named_barrier(barrier, 32 * kGroups);
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = 0.0f;
#pragma unroll
    for (int r = 0; r < kGroups; ++r) {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] += region[(r * 32 + lane) * stride + e];
    }
  }
  static REATTN_DEVICE void group_sum2(float* region, int stride, int barrier, int group, int lane, float (&x)[8],
                                       float (&y)[8]) {
    if (kGroups == 1) return;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      region[(group * 32 + lane) * stride + e] = x[e];
      region[(group * 32 + lane) * stride + 8 + e] = y[e];
    }
    dev::named_barrier(barrier, 32 * kGroups);
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = y[e] = 0.0f;
#pragma unroll
    for (int r = 0; r < kGroups; ++r) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        x[e] += region[(r * 32 + lane) * stride + e];
        y[e] += region[(r * 32 + lane) * stride + 8 + e];
      }
    }
  }

  // dS = P (Z dP' - D) scale of one entry from its stored P~ (the backward's row and key passes): P =
  // |stored|, kept (Z = 1) unless the sign is set with a nonzero value (dropped; masked entries are -0,
  // so P = 0). The plain variants store no negative value: every entry kept.
  template <bool kPlain>
  static REATTN_DEVICE float score_grad(float stored, float dp, float delta, float scale) {
    if constexpr (kPlain) {
      return stored * (dp - delta) * scale;
    } else {
      return dev::fabs_(stored) * ((stored >= 0.0f ? dp : 0.0f) - delta) * scale;
    }
  }

  // Masked: exactly -0 (0x8000). A set sign bit on a nonzero value is the backward's dropped entry.
  static REATTN_DEVICE bool masked(const uint32_t (&own)[4], int e) {
    return ((own[e / 2] >> (e & 1 ? 16 : 0)) & 0xffffu) == 0x8000u;
  }
  // The 8 entries' masked flags as bits 0..7 (one register instead of the raw four).
  static REATTN_DEVICE uint32_t masked_bits(const uint32_t (&own)[4]) {
    uint32_t bits = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) bits |= masked(own, e) ? 1u << e : 0u;
    return bits;
  }
};

}  // namespace cuda
}  // namespace reattn
