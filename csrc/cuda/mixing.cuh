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

// Training BatchNorm's per-head coefficients in the backward programs (the row pass and the key pass), formed
// once per program from the folded rows (parameters.cuh backward_folded: after W', per head c, gamma', beta',
// mean, rstd, e, f) where every chunk used to form them again from 6 (row pass) to 11 (key pass) shared loads
// per owned head. acc holds M - c where the heads mix on tensor cores (minus_c), else M, so xhat = r acc + xs
// with xs = (c - mean) r, or -mean r:
//   the norm's output gamma' xhat + beta' = a acc + shift   (the key pass's A^T)
//   dM = gamma' r dN + e xhat + f = a dN + ee acc + ff
// with a = gamma' r, shift = gamma' xs + beta', ee = e r, ff = f + e xs.
struct BatchCoefficients {
  float a, shift, ee, ff;
};

REATTN_DEVICE BatchCoefficients batch_coefficients(const float* folded, int H, int h, bool minus_c) {
  const float* row = folded + H * H + h;  // row k of the per-head values at row[k * H]
  const float c = row[0], gamma = row[H], beta = row[2 * H], mean = row[3 * H], r = row[4 * H], e = row[5 * H],
              f = row[6 * H];
  const float xs = ((minus_c ? c : 0.0f) - mean) * r;
  return {gamma * r, gamma * xs + beta, e * r, f + e * xs};
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
  // column), filled by the block's first warp from row-major W'[g][h] (the fold itself, already
  // synchronized, not the layouts copied from it in the same phase); read after the block's next barrier.
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
  // Training BatchNorm's table (rows.cuh: after the fragment table, [3][32][4] words), filled likewise (by
  // the threads 0 .. 31 of `thread`, which the caller may offset to another warp): per
  // lane the fragments of diag(ee) W' (hi, lo) and C = ff of rows gq, gq, gq + 8, gq + 8, so that a product
  // of tensor_mix gives ee (M - c) + ff (batch_coefficients with minus_c), which dM = a dN + ee (M - c) + ff
  // takes whole: one multiply-add per entry instead of two.
  static constexpr int kBatchTableKinds = 3;
  static REATTN_DEVICE void fill_batch_table(const float* f, int H, int thread, uint32_t* table) {
    if (thread < 0 || thread >= 32) return;
    const int gq = thread / 4, tq = thread % 4;
    const auto ee = [&](int g) { return batch_coefficients(f, H, g, true).ee; };
    const auto ff = [&](int g) { return g < H ? batch_coefficients(f, H, g, true).ff : 0.0f; };
    uint32_t q[kBatchTableKinds][4];
    split_fragments<false>(gq, tq, q[0], q[1], [&](int g, int h) { return g < H && h < H ? ee(g) * f[g * H + h] : 0.0f; });
#pragma unroll
    for (int r = 0; r < 4; ++r) q[2][r] = dev::bits(ff(gq + 8 * (r / 2)));
#pragma unroll
    for (int k = 0; k < kBatchTableKinds; ++k) {
#pragma unroll
      for (int r = 0; r < 4; ++r) table[(k * 32 + thread) * 4 + r] = q[k][r];
    }
  }

  // The lane's entries of that table: diag(ee) W' (hi, lo) and C = ff, three 16-byte loads.
  static REATTN_DEVICE void batch_table_fragments(const uint32_t* table, int lane, uint32_t (&hi)[4], uint32_t (&lo)[4],
                                                  float (&c)[4]) {
    table_fragments<false>(table, lane, hi, lo);
    uint32_t w[4];
    dev::load_words(table + (2 * 32 + lane) * 4, w);
#pragma unroll
    for (int r = 0; r < 4; ++r) c[r] = dev::from_bits(w[r]);
  }

  // The lane's W' (kTransposed: W'^T) fragments from the fragment table: two 16-byte loads.
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
  // (the lane's trans_lane address, src_row elements per row) with C = c (the lane's entries: rows gq,
  // gq, gq + 8, gq + 8), each C fragment d handed to tile(row, col8, d) (row: 0 .. 16 / kGroups - 1
  // within the warp's rows; col8: the octet of columns).
  template <bool kNarrow, class F>
  static REATTN_DEVICE void split_tiles(const E* src, int src_row, const uint32_t (&hi)[4], const uint32_t (&lo)[4],
                                        const float (&c)[4], const F& tile) {
    constexpr int kPerWarp = 16 / kGroups;
    constexpr int kPerLoad = kNarrow ? 2 : 1;
    static_assert(16 % kGroups == 0 && kPerWarp % kPerLoad == 0, "whole loads per warp");
#pragma unroll
    for (int r = 0; r < kPerWarp; r += kPerLoad) {
      uint32_t b[4];
      dev::ldmatrix_x4_trans(b, src + r * src_row);
#pragma unroll
      for (int t = 0; t < 2 * kPerLoad; ++t) {  // tiles: (row r + t / 2, octet t % 2)
        float d[4];
        split_product<kNarrow>(d, hi, lo, b, t, c);
        tile(r + t / 2, t % 2, d);
      }
    }
  }

  // M - c (the key pass: M^T - c), or any rows-scaled W' with C = c, of a slab's 16 rows (keys) on tensor
  // cores, through a 16-bit [head][row][col] buffer (rows.cuh and keys.cuh tensor_mix): the warp's 16 /
  // kGroups rows, each one split_product per 8 columns of the W' fragments hi, lo and B from `src` (the lane's trans_lane
  // address, src_row elements per row); their C entries (heads gq, gq + 8) to `dst` (the lane's first
  // entry; dst_row per row, dst_head per head); the slab's barrier; then the warp's output heads' A
  // fragments back from `back` (the lane's ldmatrix row address of head 0), rounded to 16 bits.
  template <bool kNarrow>
  static REATTN_DEVICE void mix_through(const E* src, int src_row, E* dst, int dst_row, int dst_head, const E* back,
                                        const uint32_t (&hi)[4], const uint32_t (&lo)[4], const float (&c)[4], int H,
                                        int gq, int group, int slab, float (&acc)[kHeads][8]) {
    constexpr int kHalves = kNarrow ? 1 : 2;  // C rows gq and gq + 8
    split_tiles<kNarrow>(src, src_row, hi, lo, c, [&](int row, int col8, const float (&d)[4]) {
      E* at_t = dst + row * dst_row + col8 * 8;
#pragma unroll
      for (int half = 0; half < kHalves; ++half) {
        if (gq + 8 * half < H) *reinterpret_cast<uint32_t*>(at_t + half * 8 * dst_head) = Cv::pack(d[2 * half], d[2 * half + 1]);
      }
    });
    slab_barrier(slab);  // the slab's every row
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      uint32_t mr[4];
      dev::ldmatrix_x4(mr, back + static_cast<size_t>(g < H ? g : 0) * dst_head);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = e & 1 ? Cv::high(mr[e / 2]) : Cv::low(mr[e / 2]);
    }
  }

  // ---- LayerNorm across heads on tensor cores, for the backward's passes (rows.cuh grad_mixed_layer,
  // keys.cuh grad_mixed_layer) ------------------------------------------------------------------------
  // Per row i of a [head][row][col] tile column (the row pass: a query row, its columns keys; the key
  // pass: a key, its columns query rows) and 16 columns, (M - mean)^T = X^T [W' - 1 m^T]^T + (c - mean(c))
  // (X = P~ of every input head, m the column means of W') is one product per 8 output heads: A = X^T
  // by one ldmatrix.trans (layer_src's lanes), B = the centered weights' fragments split as hi + lo, C =
  // the centered bias. A thread's C entries are columns gq, gq + 8 of output heads 8 t + 2 tq, + 1, so
  // sums across heads are within the thread and its quad. Wide (9 to 16 heads): m16n8k16 on all 16
  // input heads (the bias as C leaves no head slot to it), one row per load; narrow (at most 8):
  // m16n8k8, two rows per load. Heads past H read head 0 (finite) against zero weights, gamma' and beta'.
  //
  // The table (u32 [kLayerTableKinds][32][4], filled by one warp from the fold, as fill_fragment_table):
  // per lane the centered weights' fragments (hi, lo: split_fragments of W'[g][h] less the
  // column mean of h, as the forward's kColumnMean, zero past H), the centered bias as C per tile of 8
  // output heads, gamma' and beta' of heads 2 tq, 2 tq + 1, 8 + 2 tq, 9 + 2 tq (zero past H).
  enum LayerTableKind : int { kCenteredHi = 0, kCenteredLo = 1, kCenteredBias = 2, kLayerGamma = 4, kLayerBeta = 5 };
  static constexpr int kLayerTableKinds = 6;
  static constexpr bool kLayerNarrow = kMaxHeads <= 8;
  static constexpr int kLayerTiles = kLayerNarrow ? 1 : 2, kLayerRowsPerLoad = kLayerNarrow ? 2 : 1;

  static REATTN_DEVICE void fill_layer_table(const float* f, int H, int thread, uint32_t* table) {
    if (thread >= 32) return;
    const int gq = thread / 4, tq = thread % 4;
    auto column_mean = [&](int h) {  // as load_parameters forms the forward's column means
      float v = 0.0f;
      for (int g = 0; g < H; ++g) v += f[g * H + h];
      return v / H;
    };
    float bias_mean = 0.0f;
    for (int g = 0; g < H; ++g) bias_mean += f[H * H + g];
    bias_mean /= H;
    uint32_t q[kLayerTableKinds][4];
    split_fragments<false>(gq, tq, q[kCenteredHi], q[kCenteredLo],
                           [&](int g, int h) { return g < H && h < H ? f[g * H + h] - column_mean(h) : 0.0f; });
    // folded rows after W': c, gamma', beta' (parameters.cuh)
    const auto row = [&](int r, int g) { return g < H ? f[H * H + r * H + g] - (r == 0 ? bias_mean : 0.0f) : 0.0f; };
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      q[kCenteredBias][r] = dev::bits(row(0, 2 * tq + r % 2));
      q[kCenteredBias + 1][r] = dev::bits(row(0, 8 + 2 * tq + r % 2));
      q[kLayerGamma][r] = dev::bits(row(1, 8 * (r / 2) + 2 * tq + r % 2));
      q[kLayerBeta][r] = dev::bits(row(2, 8 * (r / 2) + 2 * tq + r % 2));
    }
#pragma unroll
    for (int k = 0; k < kLayerTableKinds; ++k) {
#pragma unroll
      for (int r = 0; r < 4; ++r) table[(k * 32 + thread) * 4 + r] = q[k][r];
    }
  }

  struct LayerLane {
    uint32_t hi[4], lo[4];
    float bias[2][4], gamma[4], beta[4];
  };
  // gamma' of the lane's heads (2 tq, 2 tq + 1; 8 + 2 tq, 9 + 2 tq) as the B fragments of layer_grad's
  // products, split as hi + lo (as W'): hi, lo of its head sums (gamma' in every column), diag_hi,
  // diag_lo of diag(gamma') per tile of 8 heads (m16n8k8: the lane's entries (k 2 tq + e, n gq) are
  // gamma' where 2 tq + e = gq, else 0). Formed from a LayerLane where the caller has registers for
  // them (the key pass: after its dV products, not across them). identity: the 8 x 8 identity as such a
  // B fragment, so a product with it turns 16-bit A words into their fp32 values in C's layout, added to C
  // (layer_grad's sums).
  struct LayerSums {
    uint32_t hi[2], lo[2], diag_hi[2], diag_lo[2], identity;
  };
  static REATTN_DEVICE LayerSums layer_sums(const LayerLane& lg, int lane) {
    const int gq = lane / 4, tq = lane % 4;
    LayerSums sf;
    sf.identity = Cv::pack(gq == 2 * tq ? 1.0f : 0.0f, gq == 2 * tq + 1 ? 1.0f : 0.0f);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const float pair[2] = {lg.gamma[2 * t], lg.gamma[2 * t + 1]};
      split_pair(pair, sf.hi[t], sf.lo[t]);
      const float diag[2] = {gq == 2 * tq ? pair[0] : 0.0f, gq == 2 * tq + 1 ? pair[1] : 0.0f};
      split_pair(diag, sf.diag_hi[t], sf.diag_lo[t]);
    }
    return sf;
  }
  // The lane's table entries (beta': kBeta only).
  template <bool kBeta>
  static REATTN_DEVICE LayerLane layer_lane(const uint32_t* table, int lane) {
    table += lane * 4;
    LayerLane lg;
    uint32_t w[4];
    dev::load_words(table + kCenteredHi * 128, lg.hi);
    dev::load_words(table + kCenteredLo * 128, lg.lo);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      if (t < kLayerTiles) dev::load_words(table + (kCenteredBias + t) * 128, w);
#pragma unroll
      for (int r = 0; r < 4; ++r) lg.bias[t][r] = t < kLayerTiles ? dev::from_bits(w[r]) : 0.0f;
    }
    dev::load_words(table + kLayerGamma * 128, w);
#pragma unroll
    for (int r = 0; r < 4; ++r) lg.gamma[r] = dev::from_bits(w[r]);
    if constexpr (kBeta) dev::load_words(table + kLayerBeta * 128, w);
#pragma unroll
    for (int r = 0; r < 4; ++r) lg.beta[r] = kBeta ? dev::from_bits(w[r]) : 0.0f;
    return lg;
  }

  // The lane's ldmatrix / stmatrix row: wide, matrix m = lane / 8 is (heads 8 (m / 2) .., columns
  // 8 (m % 2) ..), so the registers are the A fragment (columns x input heads) and a C tile's pairs in
  // order ([2 t + k]: tile t, columns gq + 8 k); narrow, (row m / 2, columns 8 (m % 2) ..) of heads 0 .. 7
  // ([2 u + k]: row u of the load).
  static REATTN_DEVICE TransLane layer_src(int lane) {
    return kLayerNarrow ? trans_lane<true>(lane) : TransLane{(lane / 16) * 8 + lane % 8, 0, (lane / 8) % 2};
  }
  static REATTN_DEVICE int layer_word(int t, int u, int k) { return kLayerNarrow ? 2 * u + k : 2 * t + k; }

  // M - mean of row u of load x, [tile][(column gq, head 8 t + 2 tq), (gq, + 1), (gq + 8, 2 tq), (gq + 8, + 1)],
  // and rstd of columns gq, gq + 8: the sum of squares over the quad, each lane pair splitting the two
  // columns (odd lanes take gq + 8) so each lane takes one reciprocal square root (3 shuffles, 1 MUFU).
  static REATTN_DEVICE void layer_center(const uint32_t (&x)[4], int u, const LayerLane& lg, float inv_h, float eps,
                                         bool odd, float (&c)[kLayerTiles][4], float (&rstd)[2]) {
    layer_centered(x, u, lg, c);
    float sq[2] = {0.0f, 0.0f};
#pragma unroll
    for (int t = 0; t < kLayerTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sq[e / 2] += c[t][e] * c[t][e];
    }
    pair_rstd(sq, inv_h, eps, odd, rstd);
  }

  // M - mean of row u of load x alone (no rstd): for a caller that kept the row's rstd from an earlier
  // layer_center of the same row (the key pass's third step).
  static REATTN_DEVICE void layer_centered(const uint32_t (&x)[4], int u, const LayerLane& lg,
                                           float (&c)[kLayerTiles][4]) {
#pragma unroll
    for (int t = 0; t < kLayerTiles; ++t) centered_tile<kLayerNarrow>(x, u, t, lg.hi, lg.lo, lg.bias[t], c[t]);
  }

  // Tile t (output heads 8 t ..) of row u of the transposed centered product (LayerNorm's forward,
  // rows.cuh mix_in_place_layer, and layer_center): c = x^T (hi + lo)^T + c_in. kNarrow: m16n8k8 on
  // x[2 u], x[2 u + 1] with columns 0 .. 7 of the weights; else m16n8k16 on all of x.
  template <bool kNarrow>
  static REATTN_DEVICE void centered_tile(const uint32_t (&x)[4], int u, int t, const uint32_t (&hi)[4],
                                          const uint32_t (&lo)[4], const float (&c_in)[4], float (&c)[4]) {
    if constexpr (kNarrow) {
      const uint32_t a[2] = {x[2 * u], x[2 * u + 1]};
      dev::mma_m16n8k8<E>(c, a, hi[0], c_in);
      dev::mma_m16n8k8<E>(c, a, lo[0], c);
    } else {
      const uint32_t bh[2] = {hi[t], hi[t + 2]}, bl[2] = {lo[t], lo[t + 2]};
      dev::mma_m16n8k16<E>(c, x, bh, c_in);
      dev::mma_m16n8k16<E>(c, x, bl, c);
    }
  }

  // rstd of columns gq, gq + 8 from the thread's sums of centered squares sq: the sums over the quad, each
  // lane pair first splitting the two columns (even lanes keep gq, odd ones gq + 8), so each lane takes
  // one reciprocal square root and the pair swaps them: 3 shuffles and one MUFU instead of 4 and 2.
  static REATTN_DEVICE void pair_rstd(const float (&sq)[2], float inv_h, float eps, bool odd, float (&rstd)[2]) {
    float mine = odd ? sq[1] : sq[0];
    mine += dev::shfl_xor(odd ? sq[0] : sq[1], 1);
    mine += dev::shfl_xor(mine, 2);
    const float r_mine = dev::rsqrt_approx_ftz(mine * inv_h + eps);
    const float r_other = dev::shfl_xor(r_mine, 1);
    rstd[0] = odd ? r_other : r_mine;
    rstd[1] = odd ? r_mine : r_other;
  }

  // A = gamma' xhat + beta' of row u, packed as stmatrix takes it (words layer_word(t, u, k)).
  static REATTN_DEVICE void layer_output(const float (&c)[kLayerTiles][4], const float (&rstd)[2], int u,
                                         const LayerLane& lg, uint32_t (&packed)[4]) {
#pragma unroll
    for (int t = 0; t < kLayerTiles; ++t) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float a[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) a[e] = (c[t][2 * k + e] * rstd[k]) * lg.gamma[2 * t + e] + lg.beta[2 * t + e];
        packed[layer_word(t, u, k)] = Cv::pack(a[0], a[1]);
      }
    }
  }

  // dM = rstd (dxhat - s1 / H - xhat s2 / H) of row u from dN (words g of a load by the same lanes),
  // dxhat = gamma' dN, s1 = sum dxhat and s2 = sum dxhat xhat over the heads, written as
  // rstd dxhat - a - (M - mean) b with a = rstd s1 / H, b = rstd^3 (s2 / rstd) / H, so xhat itself is
  // formed only for the sums (kSums: [dc, dgamma, dbeta][t][e] += dM, dN xhat, dN of C entry e of tile t:
  // column gq + 8 (e / 2), head 8 t + 2 tq + e % 2).
  // s1 is linear in the 16-bit dN, so it is one product on tensor cores: A = dN^T (the words g, as
  // centered_tile's x), B = gamma' (sf: hi + lo) in every column, so C holds s1 of columns gq, gq + 8 in
  // every lane of the quad, with no shuffles or selects. s2 (dxhat times the fp32 M - mean) is summed over
  // the quad by 4 shuffles (splitting the two columns between lane pairs would save one shuffle per sum
  // and cost 4 selects).
  enum LayerSum : int { kSumDc = 0, kSumDgamma = 1, kSumDbeta = 2 };  // sums[kind][t][e]
  using LayerGradSums = float[3][2][4];  // layer_grad's sums, [LayerSum][tile][C entry]
  template <bool kSums>
  static REATTN_DEVICE void layer_grad(const float (&c)[kLayerTiles][4], const float (&rstd)[2], const uint32_t (&g)[4],
                                       int u, const LayerLane& lg, const LayerSums& sf, float inv_h,
                                       uint32_t (&packed)[4], LayerGradSums& sums) {
    float s1[4];
    {
      const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if constexpr (kLayerNarrow) {  // k = 16: dN^T twice, against gamma' hi (heads 0 .. 7) then lo
        const uint32_t a[4] = {g[2 * u], g[2 * u + 1], g[2 * u], g[2 * u + 1]};
        const uint32_t b[2] = {sf.hi[0], sf.lo[0]};
        dev::mma_m16n8k16<E>(s1, a, b, zero);
      } else {
        const uint32_t bh[2] = {sf.hi[0], sf.hi[1]}, bl[2] = {sf.lo[0], sf.lo[1]};
        dev::mma_m16n8k16<E>(s1, g, bh, zero);
        dev::mma_m16n8k16<E>(s1, g, bl, s1);
      }
    }
    // dxhat = gamma' dN as dN^T diag(gamma') per tile of 8 heads on tensor cores (hi + lo: two m16n8k8
    // products in C's layout, the centered c's), against an unpacking and a multiply per entry. Every
    // pass forms dM alike (the same gamma' split, as s1's), so the row pass's D and both passes' dP' come
    // from the same dM. The sums take dN in fp32 from a product with the identity (exact) and add dN
    // into theirs by another (one product each, against an unpacking or an add per entry).
    float dx[kLayerTiles][4], s2[2];
    {
      const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int t = 0; t < kLayerTiles; ++t) {
        const uint32_t a[2] = {g[layer_word(t, u, 0)], g[layer_word(t, u, 1)]};
        dev::mma_m16n8k8<E>(dx[t], a, sf.diag_hi[t], zero);
        dev::mma_m16n8k8<E>(dx[t], a, sf.diag_lo[t], dx[t]);
        if constexpr (kSums) {
          float dn[4];
          dev::mma_m16n8k8<E>(dn, a, sf.identity, zero);
          dev::mma_m16n8k8<E>(sums[kSumDbeta][t], a, sf.identity, sums[kSumDbeta][t]);
#pragma unroll
          for (int e = 0; e < 4; ++e) sums[kSumDgamma][t][e] += dn[e] * (c[t][e] * rstd[e / 2]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kLayerTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s2[e / 2] = t == 0 && e % 2 == 0 ? dx[t][e] * c[t][e] : s2[e / 2] + dx[t][e] * c[t][e];
      }
    }
    float a[2], b[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      s2[k] += dev::shfl_xor(s2[k], 1);
      s2[k] += dev::shfl_xor(s2[k], 2);
      const float ri = rstd[k] * inv_h;
      a[k] = ri * s1[2 * k];  // C rows gq (entries 0, 1) and gq + 8 (2, 3)
      b[k] = ri * rstd[k] * rstd[k] * s2[k];
    }
#pragma unroll
    for (int t = 0; t < kLayerTiles; ++t) {
      float dm[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dm[e] = (rstd[e / 2] * dx[t][e] - a[e / 2]) - c[t][e] * b[e / 2];
        // In fp32: dM rounded to 16 bits first (as the products take it) made dc's error twice eager's
        // and more in the tests (random rounding errors of every entry, summed).
        if constexpr (kSums) sums[kSumDc][t][e] += dm[e];
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) packed[layer_word(t, u, k)] = Cv::pack(dm[2 * k], dm[2 * k + 1]);
    }
  }

  // The warp's kPerWarp rows of a slab, kLayerRowsPerLoad per load: X^T from `src` (the lane's layer_src row
  // address; src_step bytes per load) and with kGrad the gradients from `grad` (the lane's row, clamped to
  // a real head, of a [head][row][col] buffer: row_bytes, head_bytes); row(x, g, u, r, packed) forms row u's
  // words (r: the row's index among the warp's kPerWarp), which go back over `grad`'s rows by stmatrix.trans (out: `grad`, or one scratch row where the
  // lane's head is past H: real false), or without stmatrix by 16-bit stores from `entry` (column gq of
  // head 0 at the warp's first row).
  template <int kPerWarp, bool kGrad, class F>
  static REATTN_DEVICE void layer_rows(uint32_t src, uint32_t src_step, uint32_t grad, uint32_t out, bool real,
                                       uint32_t entry, uint32_t row_bytes, uint32_t head_bytes, int H, int tq,
                                       const F& row) {
    constexpr int kPerLoad = kLayerRowsPerLoad;
    static_assert(kPerWarp % kPerLoad == 0, "whole loads per warp");
    const uint32_t out_step = real ? kPerLoad * row_bytes : 0u;
    const bool matrix_store = dev::has_stmatrix();  // compile-time on the GPU
#pragma unroll
    for (int r = 0; r < kPerWarp; r += kPerLoad) {
      uint32_t x[4], g[4] = {0u, 0u, 0u, 0u}, packed[4];
      dev::ldmatrix_x4_trans_at(x, src);
      if constexpr (kGrad) dev::ldmatrix_x4_trans_at(g, grad);
#pragma unroll
      for (int u = 0; u < kPerLoad; ++u) {
        row(x, g, u, r + u, packed);
        if (!matrix_store) layer_store_b16(entry + u * row_bytes, head_bytes, packed, u, H, tq);
      }
      if (matrix_store) dev::stmatrix_x4_trans_at(out, packed);
      src += src_step;
      grad += kPerLoad * row_bytes;
      out += out_step;
      entry += kPerLoad * row_bytes;
    }
  }

  // The stores of a load's words without stmatrix (sm_80): 16-bit per entry of the real heads;
  // row_u: the address of (head 0, row u of the load, column gq); head_bytes: bytes per head.
  static REATTN_DEVICE void layer_store_b16(uint32_t row_u, uint32_t head_bytes, const uint32_t (&packed)[4], int u,
                                            int H, int tq) {
#pragma unroll
    for (int t = 0; t < kLayerTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int g = 8 * t + 2 * tq + e;
        if (g < H) {
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            dev::store_shared_b16(row_u + g * head_bytes + 16 * k, packed[layer_word(t, u, k)] >> (16 * e));
          }
        }
      }
    }
  }

  // The warp's output heads' values x[j] (head group + kGroups j, fragment entries e: row gq + 8 ((e / 2) % 2),
  // column 2 tq + e % 2 + 8 (e / 4)) as 16-bit pairs to a [head][row][col] buffer; out: the lane's entry
  // (row gq, column 2 tq) of head 0; row, head: elements per row and per head. Heads past H: none.
  static REATTN_DEVICE void store_fragments(E* out, int row, size_t head, int H, int group, const float (&x)[kHeads][8]) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      if (g >= H) continue;
      E* at_g = out + static_cast<size_t>(g) * head;
      *reinterpret_cast<uint32_t*>(at_g) = Cv::pack(x[j][0], x[j][1]);
      *reinterpret_cast<uint32_t*>(at_g + 8 * row) = Cv::pack(x[j][2], x[j][3]);
      *reinterpret_cast<uint32_t*>(at_g + 8) = Cv::pack(x[j][4], x[j][5]);
      *reinterpret_cast<uint32_t*>(at_g + 8 * row + 8) = Cv::pack(x[j][6], x[j][7]);
    }
  }

  // The C rows of a product over heads (rows.cuh tensor_grad_probs, keys.cuh tensor_grad_keys: input heads
  // gq, gq + 8 per half) in [head][...] tiles head_stride elements apart: whether each half's head is real,
  // and its offset from head 0's. A head past H takes head 0's: it reads there and stores nothing (a
  // predicated store, where a test around the whole update cost a branch and a convergence barrier per
  // entry pair: static model, DeepViT-16b LayerNorm key pass, ~8% of its hottest block).
  struct HalfHeads {
    bool real[2];
    int at[2];
  };
  static REATTN_DEVICE HalfHeads half_heads(int gq, int H, int head_stride) {
    HalfHeads hh;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      hh.real[half] = gq + 8 * half < H;
      hh.at[half] = (hh.real[half] ? gq + 8 * half : 0) * head_stride;
    }
    return hh;
  }
  // dS = P (dP' - D) of a stored pair of P~ (pv) and C entries 2 half, 2 half + 1 of dP' (d), packed. In
  // bf16 the pair's dP' - D is rounded to bf16 and multiplied by P~ as a bf16 pair, rounded once more (3
  // instructions a pair fewer than unpacking P~ and multiplying in fp32): two roundings of dS (relative
  // error up to 2^-7) for one, where eager's bf16 dP is itself rounded before D is subtracted. fp16 keeps
  // the fp32 product: dP' - D may exceed fp16's range where dS does not.
  static REATTN_DEVICE uint32_t grad_scores(uint32_t pv, const float (&d)[4], int half, float d0, float d1) {
    if constexpr (std::is_same_v<E, dev::Bf16>) {
      return Cv::mul(pv, Cv::pack(d[2 * half] - d0, d[2 * half + 1] - d1));
    } else {
      return Cv::pack(Cv::low(pv) * (d[2 * half] - d0), Cv::high(pv) * (d[2 * half + 1] - d1));
    }
  }

  // LayerNorm across heads with the per-thread mixer (the general variants of both passes): acc -= mean
  // over the warp's real heads, and rstd = 1 / sqrt(mean square + eps) per entry, the sums of squares
  // over the group's warps by `group_sum(part)` (the caller's exchange region and barrier).
  template <class GroupSum>
  static REATTN_DEVICE void center_heads(float (&acc)[kHeads][8], const float (&mean)[8], int H, int group, float inv_h,
                                         float eps, const GroupSum& group_sum, float (&rstd)[8]) {
    float part[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) part[e] = 0.0f;
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      if (group + kGroups * j < H) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          acc[j][e] -= mean[e];
          part[e] += acc[j][e] * acc[j][e];
        }
      }
    }
    group_sum(part);
#pragma unroll
    for (int e = 0; e < 8; ++e) rstd[e] = dev::rsqrt_approx(part[e] * inv_h + eps);
  }

  // The barrier of a slab's kGroups warps (named barrier 1 + slab; one warp: a warp sync).
  static REATTN_DEVICE void slab_barrier(int slab) {
    if constexpr (kGroups > 1) {
      dev::named_barrier(1 + slab, 32 * kGroups);
    } else {
      dev::sync_warp();
    }
  }

  // Two fp32 values as two packed 16-bit pairs hi, lo with hi + lo carrying 16 bits of each.
  static REATTN_DEVICE void split_pair(const float (&x)[2], uint32_t& hi, uint32_t& lo) {
    hi = Cv::pack(x[0], x[1]);
    lo = Cv::pack(x[0] - Cv::low(hi), x[1] - Cv::high(hi));
  }

  // w as the tensor-core products take it: hi + lo, two 16-bit values (16 significant bits in
  // bf16). The plain bf16 backward uses W' so rounded in D (rows.cuh) and in dP' of both passes, so
  // dP' - D differs from 0 only by fp32 rounding where the two agree in exact arithmetic (one key: the
  // emulator gives |dQ| ~1e-6 for O(1) inputs, where float64 gives 0; D and dP' sum in other orders).
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
