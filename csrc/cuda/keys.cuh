// The backward's key pass on tensor cores: dK and dV without atomics. One program (thread block) =
// batch element b, 16 * kslabs * tiles keys, every head; it sweeps the queries 16 rows at a time
// with the block's K and V resident in shared memory and dK, dV accumulating in registers. Its warps
// are a grid of key slabs (16 * tiles keys) x groups; warp (slab, group) owns heads group,
// group + groups, ... for the slab's keys, each 16-key tile of them an m16 tile of its products
// (one load of the chunk's Q or dO fragments serves every tile: that is what tiles buy).
// Per 16-row query chunk (Q, dO, the rows' statistics and D through a 2-slot cp.async ring):
//
//   as input-head owners: S^T = K Q^T on tensor cores (K A-fragments, Q^T B-fragments by ldmatrix),
//     P^T = exp(S^T - m - log l) with the forward's row statistics, dropout and masks, to shared
//     memory (16-bit; -P where dropped, -0 where masked);
//   as output-head owners: M^T = W' P~^T + c (Mixer), A^T = Norm(M)^T, dA^T = V dO^T on tensor
//     cores, dV += A^T dO (A^T packed straight into A fragments), dM^T by the norm's backward (LayerNorm
//     across the group's warps; its own bf16 variant, grad_mixed_layer, per key on tensor cores and
//     within quads of lanes) to shared memory;
//   as input-head owners again: dP'^T = W'^T dM^T, dS^T = P (Z dP' - D) scale (D from the row pass,
//     rows.cuh), dK += dS^T Q.
//
// Transposing the scores (keys as the tile's rows) makes every product's A operand a fragment the
// thread already holds. The parameter gradients and D come from the row pass.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device.cuh"
#include "mixing.cuh"
#include "parameters.cuh"
#include "params.h"
#include "philox.cuh"
#include "rows.cuh"
#include "tiles.h"

namespace reattn {
namespace cuda {

// kPlain_: kKeysGeneral, kKeysPlain (no mask, no dropout, 16-byte aligned rows; row_configs.h) or
// kKeysPlainLayer (plain, LayerNorm, bf16: backward_configs.h backward_keys_variant).
template <typename E_, int kKSlabs_, int kGroups_, int kHeads_, int kD_, int kTiles_, int kPlain_>
struct KeyConfig {
  using E = E_;
  static constexpr int kKSlabs = kKSlabs_, kGroups = kGroups_, kHeads = kHeads_, kD = kD_, kTiles = kTiles_;
  static constexpr bool kPlain = kPlain_ != kKeysGeneral;
  static constexpr bool kLayer = kPlain_ == kKeysPlainLayer;
  static constexpr int kWarps = kKSlabs * kGroups, kThreads = 32 * kWarps, kKeys = 16 * kKSlabs * kTiles;
  static constexpr int kMaxHeads = kGroups * kHeads;
  static constexpr int kKSteps = kD / 16;
  static constexpr int kN8 = kD / 8;
  static_assert(kD % 16 == 0, "tile shape");
  static REATTN_HD KeyShape shape() { return KeyShape{kKSlabs, kGroups, kHeads, kD, kTiles}; }
};

template <class Cfg>
struct KeyProgram {
  using E = typename Cfg::E;
  using Cv = dev::Convert<E>;
  using Mix = Mixer<E, Cfg::kGroups, Cfg::kHeads, Cfg::kMaxHeads>;
  static constexpr int kGroups = Cfg::kGroups, kHeads = Cfg::kHeads, kTiles = Cfg::kTiles;
  static constexpr int kHeadsPad = Mix::kHeadsPad;
  // The plain bf16 variant forms dP'^T = W'^T dM^T on tensor cores (tensor_grad_keys), with W' split
  // into 16-bit hi + lo as the row pass's D and dP' take it (the same rule: backward_tensor_mixing).
  static constexpr bool kTensorGrad = backward_tensor_mixing<E>(Cfg::kPlain, Cfg::kMaxHeads);
  // LayerNorm's own key pass (grad_mixed_layer): its mixing and the sums across heads on tensor cores
  // and within quads of lanes, no other norm's code.
  static_assert(!Cfg::kLayer || kTensorGrad, "LayerNorm's key pass: bf16, at most 16 heads");
  static constexpr int kChunkRows = 16;
  // Row sizes (elements) of the shared-memory tiles, compile-time (key_layout computes the same).
  static constexpr int kRow = padded_row(Cfg::kD), kTRow = padded_row(16);
  // Head stride of P~^T and dM^T: tensor_grad_keys reads one entry of 8 heads at once (ldmatrix rows
  // a head apart), which the 16-byte padding spreads over the 8 bank groups (tiles.h head_stride).
  static constexpr int kHeadStride = head_stride(Cfg::kKeys, kTRow, kTensorGrad);
  using BlockCopy = TileCopy<E, Cfg::kKeys, Cfg::kD, Cfg::kThreads, Cfg::kMaxHeads, Cfg::kPlain, 0, false, true>;
  // The query chunks' Q and dO rows leave their columns past D to zeroes written once (TileCopy
  // kIdleColumns, zero_ring_columns) in the plain variants: every chunk of a head dim below kD (d = 35
  // in 48 columns) would take the copies' edge path. Static model, DeepViT-L-384 plain key pass:
  // 371-1586 -> 373-1556 us.
  using ChunkCopy = TileCopy<E, kChunkRows, Cfg::kD, Cfg::kThreads, Cfg::kMaxHeads, Cfg::kPlain, 0, Cfg::kPlain, true>;
  enum VectorRow : int { kBias = 0, kGamma = 1, kBeta = 2, kColumnMean = 3, kMean = 4, kRstd = 5, kE = 6, kF = 7 };

  const ReAttnParams& p;
  const KeyLayout& L;  // params.key_tiles
  char* smem;
  int lane, warp, slab, group, gq, tq;
  int64_t b;
  int n0;  // first key of the block
  int H, Nq, Nk, D;
  int issued, used;

  REATTN_DEVICE KeyProgram(const ReAttnParams& params) : p(params), L(params.key_tiles), smem(dev::shared_memory()) {
    H = p.H;
    Nq = p.Nq;
    Nk = p.Nk;
    D = p.D;
    const int tid = dev::thread_index();
    lane = tid % 32;
    warp = tid / 32;
    slab = warp / kGroups;
    group = warp % kGroups;
    gq = lane / 4;
    tq = lane % 4;
    const int blocks = (Nk + Cfg::kKeys - 1) / Cfg::kKeys;
    b = dev::block_index_x() / blocks;
    n0 = (dev::block_index_x() % blocks) * Cfg::kKeys;
    issued = used = 0;
  }

  template <typename U>
  REATTN_DEVICE U* at(size_t offset) const {
    return reinterpret_cast<U*>(smem + offset);
  }
  REATTN_DEVICE bool vector() const { return Cfg::kPlain || p.vector_loads; }
  REATTN_DEVICE const float* vec_row(int row) const { return at<float>(L.vectors) + row * Cfg::kMaxHeads; }
  REATTN_DEVICE E* slot_base(int slot) const { return at<E>(L.ring + slot * L.ring_slot); }
  // In a ring slot: Q [H][16][row], then dO [H][16][row], then the rows' statistics, fp32 [3][H][16]: m and
  // log l (the plain variants: (m + log l) log2 e, the exponent's offset, then nothing), then D. A row's
  // statistic at [k][h][row]: a thread's rows come in pairs (2 tq, 2 tq + 1), one 8-byte load each.
  REATTN_DEVICE E* slot_grads(int slot) const { return slot_base(slot) + H * kChunkRows * kRow; }
  REATTN_DEVICE float* slot_stats(int slot, int k) const {
    return reinterpret_cast<float*>(slot_base(slot) + 2 * H * kChunkRows * kRow) + k * H * kChunkRows;
  }
  enum StatRow : int { kStatM = 0, kStatLogL = 1, kStatD = 2 };
  // The statistic of rows r0 + 2 tq, r0 + 2 tq + 1 of head h (r0 = 0 or 8).
  REATTN_DEVICE void stat_pair(const float* st, int h, int r0, float& lo, float& hi) const {
    uint32_t w[2];
    dev::load_words(st + h * kChunkRows + r0 + 2 * tq, w);
    lo = dev::from_bits(w[0]);
    hi = dev::from_bits(w[1]);
  }

  // The first key (in the block) of the warp's tile t: tiles of one slab are adjacent.
  REATTN_DEVICE int tile_key(int t) const { return (slab * kTiles + t) * 16; }
  // Entry e of tile t, 16 x 16 (keys x rows): key gq + 8 ((e / 2) % 2), row 2 tq + e % 2 + 8 (e / 4).
  REATTN_DEVICE int entry_key(int t, int e) const { return n0 + tile_key(t) + gq + ((e / 2) % 2) * 8; }
  REATTN_DEVICE int entry_row(int e) const { return 2 * tq + (e & 1) + (e / 4) * 8; }
  // Which of the thread's 4 rows entry e is in (0 .. 3: rows 2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9).
  static REATTN_DEVICE int row_slot(int e) { return (e & 1) + 2 * (e / 4); }

  // ---- loads ---------------------------------------------------------------------------------
  REATTN_DEVICE void load_block() {
    const E* kb = static_cast<const E*>(p.k) + b * p.k_st.b;
    const E* vb = static_cast<const E*>(p.v) + b * p.v_st.b;
    BlockCopy::issue(at<E>(L.keys), kRow, kb, static_cast<int>(p.k_st.h), static_cast<int>(p.k_st.n),
                     static_cast<int>(p.k_st.d), 0, H, H, n0, Nk, 0, D, vector());
    BlockCopy::issue(at<E>(L.values), kRow, vb, static_cast<int>(p.v_st.h), static_cast<int>(p.v_st.n),
                     static_cast<int>(p.v_st.d), 0, H, H, n0, Nk, 0, D, vector());
  }

  // Before the first chunk: the columns past D of both slots' Q and dO rows zeroed (kIdleColumns),
  // landing with the first chunk's group.
  REATTN_DEVICE void zero_ring_columns() {
    const E* any = static_cast<const E*>(p.q) + b * p.q_st.b;
    ChunkCopy::zero_idle_columns(slot_base(0), 2 * H * kChunkRows, kRow, D, any);
    ChunkCopy::zero_idle_columns(slot_base(1), 2 * H * kChunkRows, kRow, D, any);
  }

  // The query chunk at r0: Q and dO rows (cp.async), the rows' statistics and D (plain loads: they
  // land at once, into a slot the previous step is done with).
  REATTN_DEVICE void issue_chunk(int r0) {
    const int slot = issued++ & 1;
    const E* qb = static_cast<const E*>(p.q) + b * p.q_st.b;
    const E* gb = static_cast<const E*>(p.grad_out) + b * p.do_st.b;
    ChunkCopy::issue(slot_base(slot), kRow, qb, static_cast<int>(p.q_st.h), static_cast<int>(p.q_st.n),
                     static_cast<int>(p.q_st.d), 0, H, H, r0, Nq, 0, D, vector());
    ChunkCopy::issue(slot_grads(slot), kRow, gb, static_cast<int>(p.do_st.h), static_cast<int>(p.do_st.n),
                     static_cast<int>(p.do_st.d), 0, H, H, r0, Nq, 0, D, vector());
    float* m = slot_stats(slot, kStatM);
    float* log_l = slot_stats(slot, kStatLogL);
    float* d = slot_stats(slot, kStatD);
    const float* stats = static_cast<const float*>(p.lse);
    for (int i = dev::thread_index(); i < H * kChunkRows; i += Cfg::kThreads) {
      const int h = i / kChunkRows, r = r0 + i % kChunkRows;
      const bool ok = r < Nq;
      const int64_t at_row = (b * H + h) * static_cast<int64_t>(Nq) + (ok ? r : 0);
      const float mi = ok ? stats[2 * at_row] : INFINITY, li = ok ? stats[2 * at_row + 1] : 0.0f;  // rows past Nq: P = 0
      if constexpr (Cfg::kPlain) {
        m[i] = (mi + li) * kLog2e;  // scores' offset, formed once per row (+inf past Nq)
      } else {
        m[i] = mi;
        log_l[i] = li;
      }
      d[i] = ok ? p.delta[at_row] : 0.0f;
    }
    dev::cp_async_commit();
  }

  REATTN_DEVICE int begin_step() {
    dev::cp_async_wait<0>();
    dev::sync_threads();
    return used++ & 1;
  }

  // The fold (fp32): W' [H][H] (g, h), then c, gamma', beta', mean, rstd, e, f per head (parameters.cuh,
  // fold_parameters), formed in P~^T's buffer (written by the first chunk's scores, after a barrier; at
  // most 4 (32 + 7) bytes per head against its 16 keys of at least 16 rows, 512 bytes).
  REATTN_DEVICE void load_parameters() {
    float* f = at<float>(L.probs_t);
    fold_parameters<true>(p.fold, f, dev::thread_index(), Cfg::kThreads);
    dev::sync_threads();
    float* weights = at<float>(L.weights);
    float* weights_t = at<float>(L.weights_t);
    float* vec = at<float>(L.vectors);
    constexpr int mh = Cfg::kMaxHeads;
    for (int i = dev::thread_index(); i < mh * kGroups * kHeadsPad; i += Cfg::kThreads) {
      const int j = i % kHeadsPad, r = (i / kHeadsPad) % kGroups, a = i / (kHeadsPad * kGroups);
      const int owned = r + kGroups * j;
      const bool ok = j < kHeads && owned < H && a < H;
      weights[i] = ok ? f[owned * H + a] : 0.0f;
      if constexpr (!kTensorGrad) weights_t[i] = ok ? f[a * H + owned] : 0.0f;
    }
    if constexpr (kTensorGrad) Mix::fill_fragment_table(f, H, dev::thread_index(), reinterpret_cast<uint32_t*>(weights_t));
    if constexpr (Cfg::kLayer) Mix::fill_layer_table(f, H, dev::thread_index(), at<uint32_t>(L.weights_t) + kLayerTable);
    for (int i = dev::thread_index(); i < kVectorRows * mh + 2; i += Cfg::kThreads) {
      const int row = i / mh, h = i % mh;
      float v = 0.0f;
      if (row == kColumnMean && h < H) {
        for (int g = 0; g < H; ++g) v += f[g * H + h];
        v /= H;
      } else if (row < kVectorRows && h < H) {
        v = f[H * H + (row < kColumnMean ? row : row - 1) * H + h];
        if (p.norm == kNormBatch && (row == kGamma || row == kBeta || row == kE || row == kF)) {
          const BatchCoefficients b = batch_coefficients(f, H, h, kTensorGrad);
          v = row == kGamma ? b.a : row == kBeta ? b.shift : row == kE ? b.ee : b.ff;
        }
      } else if (i == kVectorRows * mh) {
        for (int g = 0; g < H; ++g) v += f[H * H + g];
        v /= H;
      } else if (i == kVectorRows * mh + 1) {
        v = 1.0f / H;
      }
      vec[i] = v;
    }
  }

  // ---- the chunk ---------------------------------------------------------------------------------
  // S^T, P^T for the warp's input heads, to shared memory [h][key][row] as the row pass stores P:
  // P where kept, -P where dropped (at least the smallest negative subnormal), exactly -0 where
  // masked; the mixing reads it clamped at 0 (P~ up to 1 / (1 - p), which W' carries).
  REATTN_DEVICE void scores(int slot, int r0) const {
    const E* qtile = slot_base(slot);
    const float* st_m = slot_stats(slot, kStatM);
    const float* st_log_l = slot_stats(slot, kStatLogL);
    const E* keys = at<E>(L.keys);
    E* probs_t = at<E>(L.probs_t);
    const bool dropout = p.seed != nullptr;
    const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
    const float threshold = static_cast<float>(p.dropout_p);
    const float scale = static_cast<float>(p.scale);
    const int i = lane / 8;
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int h = group + kGroups * j;
      if (h >= H) continue;
      float c[kTiles][2][4] = {};
      // The lanes' ldmatrix rows as shared addresses, 32 bytes (16 head dims) per k-step. B = Q^T from
      // Q [row][d] without .trans: matrices (n8 tile i / 2 of rows, k half i % 2).
      uint32_t k_at = dev::smem_address(keys + (static_cast<size_t>(h) * Cfg::kKeys + tile_key(0) + lane % 16) * kRow +
                                        (lane / 16) * 8);
      uint32_t q_at = dev::smem_address(qtile + (static_cast<size_t>(h) * kChunkRows + (i / 2) * 8 + lane % 8) * kRow +
                                        (i % 2) * 8);
      // Unrolled (static model, sm_90: t_high -11 us at DeiT-S, -24 at DeepViT-L-384, t_low unchanged), but in
      // LayerNorm's variant, which unrolled took 16 bytes of stack on sm_80 (ptxas, two heads of two tiles at
      // D = 32). Stepped addresses: formed from kk, each load cost ~3 integer instructions per step.
#pragma unroll(Cfg::kLayer ? 1 : Cfg::kKSteps)
      for (int kk = 0; kk < Cfg::kKSteps; ++kk, k_at += 32, q_at += 32) {
        uint32_t qb[4];
        dev::ldmatrix_x4_at(qb, q_at);
        const uint32_t b0[2] = {qb[0], qb[1]}, b1[2] = {qb[2], qb[3]};
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          uint32_t a[4];
          dev::ldmatrix_x4_at(a, k_at + t * 16 * kRow * static_cast<uint32_t>(sizeof(E)));
          dev::mma_m16n8k16<E>(c[t][0], a, b0, c[t][0]);
          dev::mma_m16n8k16<E>(c[t][1], a, b1, c[t][1]);
        }
      }
      // The row statistics of the thread's 4 rows (entry_row(e), e = 0, 1, 4, 5; row_slot: 2 tq, 2 tq + 1,
      // then + 8), loaded once for every tile: between the tiles' P~^T stores the compiler loads them again.
      // The plain variants' m is the exponent's offset (m + log l) log2 e (issue_chunk), and log l unread.
      float m[4], log_l[4] = {};
      stat_pair(st_m, h, 0, m[0], m[1]);
      stat_pair(st_m, h, 8, m[2], m[3]);
      if constexpr (!Cfg::kPlain) {
        stat_pair(st_log_l, h, 0, log_l[0], log_l[1]);
        stat_pair(st_log_l, h, 8, log_l[2], log_l[3]);
      }
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = c[t][0][e];
          v[4 + e] = c[t][1][e];
        }
        if constexpr (Cfg::kPlain) {
          // No mask, no dropout: P = 2^(raw c cs - (m + log l) log2 e), cs = scale log2 e (one FMA; m holds
          // the offset). Rows past Nq have an offset of +inf (P = 0); keys past Nk (zero K rows) get a finite
          // P that only their own dK and dV rows, never written, and entries whose dN is zeroed (grad_mixed) see.
          const float cs = scale * kLog2e;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int r = row_slot(e);
            v[e] = dev::exp2_approx(v[e] * cs - m[r]);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int key = entry_key(t, e), rl = entry_row(e), row = r0 + rl;
            const float rs[2] = {m[row_slot(e)], log_l[row_slot(e)]};
            float s = v[e] * scale;
            bool out = key >= Nk || row >= Nq;
            if (!out && p.mask_kind != kMaskNone) {
              const int64_t offset = b * p.mask_st.b + h * p.mask_st.h + row * p.mask_st.n + key * p.mask_st.d;
              if (p.mask_kind == kMaskBool) {
                out = static_cast<const uint8_t*>(p.mask)[offset] == 0;
              } else {
                const float add = static_cast<const float*>(p.mask)[offset];
                out = add == -INFINITY;
                s += add;
              }
            }
            // P = exp((S - m) - log l): the difference first (large finite mask fills stay exact).
            float pv = out ? 0.0f : dev::exp2_approx((s - rs[0]) * kLog2e - rs[1] * kLog2e);
            if (dropout && pv != 0.0f && !dropout_keep(seed, b, H, h, row, key, threshold)) pv = -pv;
            v[e] = out ? -0.0f : pv;
          }
        }
        uint32_t packed[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          packed[r] = Cv::pack(v[2 * r], v[2 * r + 1]);
          if constexpr (!Cfg::kPlain) {  // a dropped -P rounding to -0 would read as masked
            if (v[2 * r] < 0.0f && (packed[r] & 0xffffu) == 0x8000u) packed[r] = (packed[r] & 0xffff0000u) | 0x8001u;
            if (v[2 * r + 1] < 0.0f && (packed[r] >> 16) == 0x8000u) packed[r] = (packed[r] & 0xffffu) | 0x80010000u;
          }
        }
        E* to = probs_t + static_cast<size_t>(h) * kHeadStride + (tile_key(t) + gq) * kTRow + 2 * tq;
        *reinterpret_cast<uint32_t*>(to) = packed[0];
        *reinterpret_cast<uint32_t*>(to + 8 * kTRow) = packed[1];
        *reinterpret_cast<uint32_t*>(to + 8) = packed[2];
        *reinterpret_cast<uint32_t*>(to + 8 * kTRow + 8) = packed[3];
      }
    }
  }

  // The W' (kTransposed: W'^T) fragments from the table load_parameters fills (kTensorGrad).
  template <bool kTransposed>
  REATTN_DEVICE void table_fragments(uint32_t (&hi)[4], uint32_t (&lo)[4]) const {
    Mix::template table_fragments<kTransposed>(at<uint32_t>(L.weights_t), lane, hi, lo);
  }

  // M^T - c of the warp's tile t (16 keys) on tensor cores (kTensorGrad; norms other than LayerNorm,
  // whose mean and variance across heads the per-thread Mixer forms), through dM^T's buffer (free
  // until this chunk's dM^T): per key k and 8 query rows, W' P~^T[:, k, rows] is one product (A = W'
  // as hi + lo, B = P~^T of every head by ldmatrix.trans), the slab's warps splitting the tile's keys
  // as tensor_grad_keys does. After the slab's barrier each warp reads its output heads' values back
  // in the A-fragment layout (16-bit). The bias c stays out (grad_mixed folds it into the
  // coefficients of xhat): as the product's C operand it costs a copy of c into every accumulator.
  REATTN_DEVICE void tensor_mix(int t, const uint32_t (&whi)[4], const uint32_t (&wlo)[4], float (&acc)[kHeads][8]) const {
    constexpr bool kNarrow = Cfg::kMaxHeads <= 8;  // k = 8 input heads: W' columns 0 .. 7
    const int key0 = tile_key(t) + group * (16 / kGroups);
    const auto lane_src = Mix::template trans_lane<kNarrow>(lane);
    const E* src = at<E>(L.probs_t) + (lane_src.head < H ? lane_src.head : 0) * kHeadStride +
                   (key0 + lane_src.row) * kTRow + lane_src.octet * 8;
    E* dmixed = at<E>(L.dmixed);
    const E* back = dmixed + (static_cast<size_t>(tile_key(t)) + lane % 16) * kTRow + (lane / 16) * 8;
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    Mix::template mix_through<kNarrow>(src, kTRow, dmixed + gq * kHeadStride + key0 * kTRow + 2 * tq, kTRow, kHeadStride,
                                       back, whi, wlo, zero, H, gq, group, slab, acc);
  }

  // The norm's output gamma' xhat + beta' = gamma acc + beta for output head g, given what grad_mixed's acc
  // holds: LayerNorm, xhat itself; none, M or M - c (tensor_mix: the bias back in beta); BatchNorm, the
  // program's batch_coefficients (a, shift), formed once.
  REATTN_DEVICE void norm_affine(int g, bool layer, bool batch, float& gamma, float& beta) const {
    gamma = vec_row(kGamma)[g];
    beta = vec_row(kBeta)[g];
    if (!batch && kTensorGrad && !layer) beta += gamma * vec_row(kBias)[g];
  }

  // dV += A^T dO (with_dv; af: A^T's fragments of every tile) and dN^T = V dO^T of head g (the warp's owned
  // head j) at the thread's fragment entries of every tile, from one load of dO. Per k-step of dN^T (16 head
  // dims, two n8 tiles of dV), ldmatrix.trans reads dO [row][d] as dV's B fragments (rows as k) and movmatrix
  // transposes those in registers into dN^T's (B = dO^T, head dims as k): where each product read dO from
  // shared memory for itself, the second read is 4 register moves per k-step (static model, sm_90, DeepViT-16b
  // LayerNorm key pass: shared-memory bytes -3.3%, 140.7 -> 135.9 us t_low). A = V [key][d] (the tiles' keys)
  // by ldmatrix, each dO fragment serving every tile.
  REATTN_DEVICE void grad_values(const uint32_t (&af)[kTiles][4], bool with_dv, const E* values, const E* dg, int g,
                                 int j, float (&dv)[kTiles][Cfg::kN8][4], float (&dn)[kTiles][kHeads][8]) const {
    static_assert(Cfg::kN8 == 2 * Cfg::kKSteps, "two n8 tiles of dV per k-step of dN^T");
    const int i = lane / 8;
    float c[kTiles][2][4] = {};
    // ldmatrix.trans's rows: matrix i = (row half i % 2, head dims 8 (2 kk + i / 2)); V's as in scores.
    const E* d_at = dg + ((i % 2) * 8 + lane % 8) * kRow + (i / 2) * 8;
    uint32_t v_at = dev::smem_address(values + (static_cast<size_t>(g) * Cfg::kKeys + tile_key(0) + lane % 16) * kRow +
                                      (lane / 16) * 8);
#pragma unroll
    for (int kk = 0; kk < Cfg::kKSteps; ++kk, v_at += 32) {
      uint32_t b[4];  // dO^T of (rows 0-7, dims 16 kk + 0-7), (rows 8-15, same), (rows 0-7, dims + 8-15), (rows 8-15, same)
      dev::ldmatrix_x4_trans(b, d_at + kk * 16);
      if (with_dv) {
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          dev::mma_m16n8k16<E>(dv[t][2 * kk], af[t], b0, dv[t][2 * kk]);
          dev::mma_m16n8k16<E>(dv[t][2 * kk + 1], af[t], b1, dv[t][2 * kk + 1]);
        }
      }
      // dO^T's B fragments of this k-step: n8 tile rows 0-7 from the matrices of rows 0-7, rows 8-15 likewise.
      const uint32_t g0[2] = {dev::movmatrix_trans(b[0]), dev::movmatrix_trans(b[2])};
      const uint32_t g1[2] = {dev::movmatrix_trans(b[1]), dev::movmatrix_trans(b[3])};
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        uint32_t va[4];
        dev::ldmatrix_x4_at(va, v_at + t * 16 * kRow * static_cast<uint32_t>(sizeof(E)));
        dev::mma_m16n8k16<E>(c[t][0], va, g0, c[t][0]);
        dev::mma_m16n8k16<E>(c[t][1], va, g1, c[t][1]);
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dn[t][j][e] = c[t][0][e];
        dn[t][j][4 + e] = c[t][1][e];
      }
    }
  }

  // The warp's output heads' values at their fragment entries of tile t to dM^T's buffer, 16-bit,
  // A-fragment order.
  REATTN_DEVICE void store_grad_tile(int t, const float (&x)[kHeads][8]) const {
    Mix::store_fragments(at<E>(L.dmixed) + (static_cast<size_t>(tile_key(t)) + gq) * kTRow + 2 * tq, kTRow,
                         kHeadStride, H, group, x);
  }

  // Output-head part: A^T, dA^T = V dO^T, dV += A^T dO, dM^T to shared memory, for every tile.
  REATTN_DEVICE void grad_mixed(int slot, int r0, const float (&coef)[4][kHeads],
                                float (&dv)[kHeads][kTiles][Cfg::kN8][4]) const {
    // The plain bf16 variant never sees LayerNorm (its own variant, kKeysPlainLayer, takes it: ops.cpp).
    const bool layer = !kTensorGrad && p.norm == kNormLayer, batch = p.norm == kNormBatch;
    const float bias_mean = at<float>(L.vectors)[kVectorRows * Cfg::kMaxHeads];
    const float inv_h = at<float>(L.vectors)[kVectorRows * Cfg::kMaxHeads + 1];
    const size_t head_stride = kHeadStride;
    float acc[kTiles][kHeads][8], mean[8], rstd[kTiles][8];
    uint32_t masks[kTiles][kHeads];
    if (kTensorGrad && !layer) {  // affine norms: M^T on tensor cores (the plain variant has no masks)
      uint32_t whi[4], wlo[4];
      table_fragments<false>(whi, wlo);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        tensor_mix(t, whi, wlo, acc[t]);
#pragma unroll
        for (int j = 0; j < kHeads; ++j) masks[t][j] = 0u;
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      if (!(kTensorGrad && !layer)) {
        const E* ptile = at<E>(L.probs_t) + (static_cast<size_t>(tile_key(t)) + lane % 16) * kTRow + (lane / 16) * 8;
        uint32_t own[kHeads][4];
        Mix::mix(ptile, head_stride, at<float>(L.weights), vec_row(kBias), vec_row(kColumnMean), bias_mean, H, group,
                 acc[t], mean, own, layer, !Cfg::kPlain && p.seed != nullptr);
#pragma unroll
        for (int j = 0; j < kHeads; ++j) masks[t][j] = Cfg::kPlain ? 0u : Mix::masked_bits(own[j]);
      }
      if (layer) {
        // Each tile its own region of the exchange (a tile's sums may still be read while the next
        // tile's are written).
        float* region = at<float>(L.exchange) + static_cast<size_t>(slab * kTiles + t) * kGroups * 32 * 24;
        Mix::center_heads(acc[t], mean, H, group, inv_h, static_cast<float>(p.eps),
                          [&](float (&part)[8]) { Mix::group_sum(region, 24, 1 + slab, group, lane, part); }, rstd[t]);
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[t][j][e] *= rstd[t][e];  // xhat
        }
      }  // BatchNorm and none: xhat is affine in acc, folded into A^T's and dM's coefficients (norm_affine)
    }
    const E* grads = slot_grads(slot);
    const E* values = at<E>(L.values);
    // Entries past Nk or Nq count as masked: tested only in the chunks that have them (the block's
    // last keys, the last query chunk; a branch the whole warp takes alike).
    uint32_t outside[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      outside[t] = 0u;
      if (n0 + tile_key(t) + 16 > Nk || r0 + kChunkRows > Nq) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (entry_key(t, e) >= Nk || r0 + entry_row(e) >= Nq) outside[t] |= 1u << e;
        }
      }
    }
    float dn[kTiles][kHeads][8];
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      const int gg = g < H ? g : 0;
      if (Cfg::kPlain && g >= H) {  // a head past H (warp-uniform): dN = 0, no products
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
#pragma unroll
          for (int e = 0; e < 8; ++e) dn[t][j][e] = 0.0f;
        }
        continue;
      }
      // A^T = gamma' xhat + beta' (0 where masked), dV += A^T dO.
      const float gamma = coef[0][j], beta = coef[1][j];  // norm_affine, formed before the sweep
      uint32_t af[kTiles][4];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        float a[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] = ((masks[t][j] >> e) & 1u) ? 0.0f : gamma * acc[t][j][e] + beta;
#pragma unroll
        for (int r = 0; r < 4; ++r) af[t][r] = Cv::pack(a[2 * r], a[2 * r + 1]);
      }
      grad_values(af, g < H, values, grads + static_cast<size_t>(gg) * kChunkRows * kRow, gg, j, dv[j], dn);
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        masks[t][j] |= outside[t];
        if (Cfg::kPlain && masks[t][j] == 0 && g < H) continue;  // the plain variant's usual chunk
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (((masks[t][j] >> e) & 1u) || g >= H) dn[t][j][e] = 0.0f;
        }
      }
    }
    float (&dm)[kTiles][kHeads][8] = dn;  // dM in place of dN
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      if (layer) {
        float* region = at<float>(L.exchange) + static_cast<size_t>(slab * kTiles + t) * kGroups * 32 * 24;
        float s1[8], s2[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) s1[e] = s2[e] = 0.0f;
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
          const int g = group + kGroups * j < H ? group + kGroups * j : 0;
          const float gamma = vec_row(kGamma)[g];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            dm[t][j][e] = gamma * dn[t][j][e];
            s1[e] += dm[t][j][e];
            s2[e] += dm[t][j][e] * acc[t][j][e];
          }
        }
        Mix::group_sum2(region + 8, 24, 1 + slab, group, lane, s1, s2);
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            dm[t][j][e] = rstd[t][e] * (dm[t][j][e] - s1[e] * inv_h - acc[t][j][e] * s2[e] * inv_h);
          }
        }
      } else if (batch) {
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
          const float a = coef[0][j], ee = coef[2][j], ff = coef[3][j];  // batch_coefficients
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            // Masked entries get 0. The plain variant's only "masked" entries lie past Nk or Nq, where dM
            // meets only its own entry's dS^T (the mixing is across heads): keys past Nk feed dK rows
            // never written, rows past Nq have P = 0. So no per-entry test there (as the row pass).
            const bool masked = !Cfg::kPlain && ((masks[t][j] >> e) & 1u);
            dm[t][j][e] = masked ? 0.0f : a * dn[t][j][e] + (ee * acc[t][j][e] + ff);
          }
        }
      } else {  // none: dM = gamma' dN = out_scale dN (ops.cpp's fold), already 0 where dN is
        const float a = static_cast<float>(p.out_scale);
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
#pragma unroll
          for (int e = 0; e < 8; ++e) dm[t][j][e] = a * dn[t][j][e];
        }
      }
      store_grad_tile(t, dm[t]);
    }
  }

  // ---- LayerNorm on tensor cores (kLayerKeys) --------------------------------------------------------
  // Per query chunk and tile, with its 16 keys split over the slab's warps (mixing.cuh, "LayerNorm
  // across heads on tensor cores", with keys for rows and the chunk's query rows for columns):
  //   1. per key, M^T - mean from P~^T on tensor cores, rstd from a quad's sum of squares, and
  //      A^T = gamma' xhat + beta' of every head over dM^T's buffer by one stmatrix.trans;
  //   2. after the slab's barrier, as output-head owners: A^T fragments by ldmatrix, dV += A^T dO,
  //      dN^T = V dO^T (0 past Nk and Nq) over A^T (16-bit, as eager's dA);
  //   3. after the slab's barrier, per key again: M^T - mean (rstd kept in registers from step 1),
  //      dN^T of every head by ldmatrix.trans, dM^T = rstd (dxhat - s1 / H - xhat s2 / H) over dN^T by
  //      stmatrix.trans.
  // Against the general key pass's LayerNorm (H multiply-adds per entry and owned head for M, two
  // exchanges of partial sums through shared memory): per key and chunk 8 products and the head sums'
  // one or two (Mixer::layer_grad), 3 loads, 2 stores, 7 shuffles and one reciprocal square root per lane.
  static constexpr int kLayerTable = 4 * 32 * 4;  // words of the fragment table before LayerNorm's

  // Steps 1 (kGrad false) and 3 (true) for the warp's keys of tile t; lg: the lane's table entries, loaded
  // once per chunk (static model, ViT-B key kernel: loaded per step 272.7 us t_low, per chunk 257.9).
  // Step 1 keeps each key's rstd (of the lane's columns gq, gq + 8) in rstd_keys, step 3 takes it from
  // there: the same value, without the sums of squares, 3 shuffles and a reciprocal square root again.
  static constexpr int kLayerKeysPerWarp = 16 / kGroups;
  template <bool kGrad>
  REATTN_DEVICE void layer_keys(int t, const typename Mix::LayerLane& lg, const typename Mix::LayerSums& sf,
                                float (&rstd_keys)[kLayerKeysPerWarp][2]) const {
    constexpr int kPerLoad = Mix::kLayerRowsPerLoad, kPerWarp = kLayerKeysPerWarp;
    static_assert(16 % kGroups == 0 && kPerWarp % kPerLoad == 0, "whole loads per warp");
    const float inv_h = at<float>(L.vectors)[kVectorRows * Cfg::kMaxHeads + 1], eps = static_cast<float>(p.eps);
    // Heads past H read head 0 and store to one scratch row (head 0's padding of dM^T's buffer, never read).
    const auto ls = Mix::layer_src(lane);
    const int key0 = tile_key(t) + group * kPerWarp;
    const int hc = ls.head < H ? ls.head : 0;
    const uint32_t src = dev::smem_address(at<E>(L.probs_t) + hc * kHeadStride + (key0 + ls.row) * kTRow + ls.octet * 8);
    const uint32_t grad = dev::smem_address(at<E>(L.dmixed) + hc * kHeadStride + (key0 + ls.row) * kTRow + ls.octet * 8);
    const bool real = ls.head < H;
    const uint32_t out = real ? grad : dev::smem_address(at<E>(L.dmixed) + Cfg::kKeys * kTRow);
    const uint32_t entry = dev::smem_address(at<E>(L.dmixed) + key0 * kTRow + gq);
    const bool odd = tq & 1;
    Mix::template layer_rows<kPerWarp, kGrad>(
        src, kPerLoad * kTRow * 2, grad, out, real, entry, kTRow * 2, kHeadStride * 2, H, tq,
        [&](const uint32_t (&x)[4], const uint32_t (&g)[4], int u, int r, uint32_t (&packed)[4]) {
          float c[Mix::kLayerTiles][4];
          if constexpr (kGrad) {
            Mix::layer_centered(x, u, lg, c);
            typename Mix::LayerGradSums unused;
            Mix::template layer_grad<false>(c, rstd_keys[r], g, u, lg, sf, inv_h, packed, unused);
          } else {
            Mix::layer_center(x, u, lg, inv_h, eps, odd, c, rstd_keys[r]);
            Mix::layer_output(c, rstd_keys[r], u, lg, packed);
          }
        });
  }

  // Steps 1 to 3 for every tile (dM^T of every head is in dM^T's buffer after the caller's barrier).
  REATTN_DEVICE void grad_mixed_layer(int slot, int r0, float (&dv)[kHeads][kTiles][Cfg::kN8][4]) const {
    const auto lg = Mix::template layer_lane<true>(at<uint32_t>(L.weights_t) + kLayerTable, lane);
    float rstd_keys[kTiles][kLayerKeysPerWarp][2];  // step 1's, for step 3
#pragma unroll
    for (int t = 0; t < kTiles; ++t) layer_keys<false>(t, lg, typename Mix::LayerSums{}, rstd_keys[t]);
    Mix::slab_barrier(slab);  // A^T of the slab's every head
    const E* grads = slot_grads(slot);
    const E* values = at<E>(L.values);
    const E* atile = at<E>(L.dmixed) + (static_cast<size_t>(tile_key(0)) + lane % 16) * kTRow + (lane / 16) * 8;
    float dn[kTiles][kHeads][8];
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      const int gg = g < H ? g : 0;
      if (g >= H) {  // warp-uniform: dN = 0 (not stored), no products
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
#pragma unroll
          for (int e = 0; e < 8; ++e) dn[t][j][e] = 0.0f;
        }
        continue;
      }
      uint32_t af[kTiles][4];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) dev::ldmatrix_x4(af[t], atile + static_cast<size_t>(gg) * kHeadStride + t * 16 * kTRow);
      grad_values(af, true, values, grads + static_cast<size_t>(gg) * kChunkRows * kRow, gg, j, dv[j], dn);
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      if (n0 + tile_key(t) + 16 > Nk || r0 + kChunkRows > Nq) {  // entries past Nk or Nq: the warp alike
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (entry_key(t, e) >= Nk || r0 + entry_row(e) >= Nq) {
#pragma unroll
            for (int j = 0; j < kHeads; ++j) dn[t][j][e] = 0.0f;
          }
        }
      }
    }
    dev::sync_warp();  // the lanes' A^T reads before dN^T goes over them
#pragma unroll
    for (int t = 0; t < kTiles; ++t) store_grad_tile(t, dn[t]);
    Mix::slab_barrier(slab);  // dN^T of the slab's every head
    const auto sf = Mix::layer_sums(lg, lane);  // here, not across the dV products (sm_80: 8 bytes of stack)
#pragma unroll
    for (int t = 0; t < kTiles; ++t) layer_keys<true>(t, lg, sf, rstd_keys[t]);
  }

  // Input-head part: dP'^T = W'^T dM^T, dS^T = P (Z dP' - D) scale, dK += dS^T Q, for every tile.
  REATTN_DEVICE void grad_keys(int slot, float (&dk)[kHeads][kTiles][Cfg::kN8][4]) const {
    float dp[kTiles][kHeads][8];
    const E* mtile = at<E>(L.dmixed) + (static_cast<size_t>(tile_key(0)) + lane % 16) * kTRow + (lane / 16) * 8;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      Mix::mix_transposed(mtile + t * 16 * kTRow, kHeadStride, at<float>(L.weights_t), H, group, dp[t]);
    }
    const float* st = slot_stats(slot, kStatD);
    const E* qtile = slot_base(slot);
    const E* ptile = at<E>(L.probs_t) + (static_cast<size_t>(tile_key(0)) + lane % 16) * kTRow + (lane / 16) * 8;
    const float scale = static_cast<float>(p.scale);
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int h = group + kGroups * j;
      if (h >= H) continue;
      float d[4];  // D of the thread's 4 rows (row_slot: 2 tq, 2 tq + 1, then + 8)
      stat_pair(st, h, 0, d[0], d[1]);
      stat_pair(st, h, 8, d[2], d[3]);
      uint32_t af[kTiles][4];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        uint32_t pk[4];
        dev::ldmatrix_x4(pk, ptile + static_cast<size_t>(h) * kHeadStride + t * 16 * kTRow);
        float ds[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float pv = e & 1 ? Cv::high(pk[e / 2]) : Cv::low(pk[e / 2]);
          ds[e] = Mix::template score_grad<Cfg::kPlain>(pv, dp[t][j][e], d[row_slot(e)], scale);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) af[t][r] = Cv::pack(ds[2 * r], ds[2 * r + 1]);
      }
      dev::mma_row_major(af, qtile + static_cast<size_t>(h) * kChunkRows * kRow, kRow, lane, dk[j]);  // Q [row][d]
    }
  }

  // Input-head part on tensor cores (kTensorGrad), as the row pass's second sweep (rows.cuh
  // tensor_grad_probs) with keys for query rows: for one key k and 8 query rows,
  // dP'^T[:, k, rows] = W'^T dM^T[:, k, rows] is one product (A = W'^T as hi + lo, B = dM^T of every
  // head at key k by ldmatrix.trans; m16n8k8 up to 8 heads, one load serving two keys). Its C
  // fragment holds heads gq (and gq + 8) at rows 2 tq, 2 tq + 1 (+ 8): dS^T = P~^T (dP' - D) (scale: on dK)
  // goes over P~^T in place (the slab's warps split its keys), then after the slab's barrier
  // dK += dS^T Q for the warp's heads, the A fragments read back by ldmatrix.
  REATTN_DEVICE void tensor_grad_keys(int slot, const uint32_t (&whi)[4], const uint32_t (&wlo)[4],
                                      float (&dk)[kHeads][kTiles][Cfg::kN8][4]) const {
    constexpr int kKeysPerWarp = 16 / kGroups;
    static_assert(16 % kGroups == 0, "the slab's keys split over its warps");
    constexpr bool kNarrow = Cfg::kMaxHeads <= 8;  // k = 8 output heads: W'^T columns 0 .. 7
    constexpr int kHalves = kNarrow ? 1 : 2;  // C rows gq and gq + 8
    E* probs_t = at<E>(L.probs_t);
    // ldmatrix.trans rows (Mixer::trans_lane: narrow, two keys per load).
    const auto lane_src = Mix::template trans_lane<kNarrow>(lane);
    const int hl = lane_src.head, key_of = lane_src.row, octet = lane_src.octet;
    // D of heads gq (+ 8) at the thread's rows 2 tq, 2 tq + 1, 8 + 2 tq, 9 + 2 tq (rows past Nq: 0).
    const float* st = slot_stats(slot, kStatD);
    float dl[kHalves][4];
#pragma unroll
    for (int half = 0; half < kHalves; ++half) {
      const int h = gq + 8 * half < H ? gq + 8 * half : 0;
      stat_pair(st, h, 0, dl[half][0], dl[half][1]);
      stat_pair(st, h, 8, dl[half][2], dl[half][3]);
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int key0 = tile_key(t) + group * kKeysPerWarp;  // the warp's first key of tile t in the block
      const E* src = at<E>(L.dmixed) + (hl < H ? hl : 0) * kHeadStride + (key0 + key_of) * kTRow + octet * 8;
      // C entries: head gq (+ 8), rows 2 tq, + 1 (Mixer::half_heads: a head past H stores nothing).
      const auto hh = Mix::half_heads(gq, H, kHeadStride);
      E* dst = probs_t + key0 * kTRow + 2 * tq;
      const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      Mix::template split_tiles<kNarrow>(src, kTRow, whi, wlo, zero, [&](int key, int col8, const float (&d)[4]) {
#pragma unroll
        for (int half = 0; half < kHalves; ++half) {
          uint32_t* entry = reinterpret_cast<uint32_t*>(dst + hh.at[half] + key * kTRow + col8 * 8);
          const float* dr = dl[half] + 2 * col8;
          const uint32_t out = Mix::grad_scores(*entry, d, half, dr[0], dr[1]);
          if (hh.real[half]) *entry = out;
        }
      });
    }
    Mix::slab_barrier(slab);  // dS^T of the slab's every key
    const E* qtile = slot_base(slot);
    const E* ds = probs_t + (static_cast<size_t>(tile_key(0)) + lane % 16) * kTRow + (lane / 16) * 8;
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int h = group + kGroups * j;
      if (h >= H) continue;
      uint32_t af[kTiles][4];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) dev::ldmatrix_x4(af[t], ds + static_cast<size_t>(h) * kHeadStride + t * 16 * kTRow);
      dev::mma_row_major(af, qtile + static_cast<size_t>(h) * kChunkRows * kRow, kRow, lane, dk[j]);  // Q [row][d]
    }
  }

  // Accumulators of head group + groups j, keys of the warp's tiles, to a [B, H, Nk, D] output in T
  // (store_fragment_row, rows.cuh).
  // The alignment test (with_rows_paired) outside the loops, so each copy of them holds one store path.
  REATTN_DEVICE void write_keys(const float (&acc)[kHeads][kTiles][Cfg::kN8][4], void* dst, const Strides4& st) const {
    with_rows_paired(dst, st, [&](auto paired) {
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        const int h = group + kGroups * j;
        if (h >= H) continue;
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key = n0 + tile_key(t) + gq + r * 8;
            if (key >= Nk) continue;
            E* out = static_cast<E*>(dst) + b * st.b + h * st.h + static_cast<int64_t>(key) * st.n;
            store_fragment_row<E, Cfg::kN8, Cfg::kD>(out, acc[j][t], r, tq, 0, D, st.d, decltype(paired)::value);
          }
        }
      }
    });
  }

  REATTN_DEVICE void run() {
    load_parameters();
    load_block();
    zero_ring_columns();
    issue_chunk(0);  // the block's K and V land with the first chunk's group
    float dk[kHeads][kTiles][Cfg::kN8][4], dv[kHeads][kTiles][Cfg::kN8][4];
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int n = 0; n < Cfg::kN8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dk[j][t][n][e] = dv[j][t][n][e] = 0.0f;
        }
      }
    }
    uint32_t whi[4] = {0u, 0u, 0u, 0u}, wlo[4] = {0u, 0u, 0u, 0u};  // W'^T (kTensorGrad)
    if constexpr (kTensorGrad) {
      dev::sync_threads();  // the fragment table in shared memory
      table_fragments<true>(whi, wlo);
    }
    // The owned heads' A^T coefficients (norm_affine) and BatchNorm's ee, ff (batch_coefficients) in registers
    // for the sweep, where every chunk loaded them again (2 to 4 shared loads per owned head).
    float coef[4][kHeads] = {};
    if constexpr (!Cfg::kLayer) {
      if constexpr (!kTensorGrad) dev::sync_threads();  // the vector rows (else synchronized above)
      const bool layer = p.norm == kNormLayer, batch = p.norm == kNormBatch;
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        const int g = group + kGroups * j < H ? group + kGroups * j : 0;
        norm_affine(g, layer, batch, coef[0][j], coef[1][j]);
        coef[2][j] = batch ? vec_row(kE)[g] : 0.0f;
        coef[3][j] = batch ? vec_row(kF)[g] : 0.0f;
      }
    }
    const int chunks = (Nq + kChunkRows - 1) / kChunkRows;
    for (int c = 0; c < chunks; ++c) {
      const int slot = begin_step();
      if (c + 1 < chunks) issue_chunk((c + 1) * kChunkRows);
      scores(slot, c * kChunkRows);
      dev::sync_threads();  // P~^T of every head
      if constexpr (Cfg::kLayer) {
        grad_mixed_layer(slot, c * kChunkRows, dv);
      } else {
        grad_mixed(slot, c * kChunkRows, coef, dv);
      }
      dev::sync_threads();  // dM^T of every head
      if constexpr (kTensorGrad) {
        tensor_grad_keys(slot, whi, wlo, dk);
      } else {
        grad_keys(slot, dk);
      }
    }
    dev::cp_async_wait<0>();
    if constexpr (kTensorGrad) {  // dS^T went unscaled
#pragma unroll
      for (int j = 0; j < kHeads; ++j) dev::scale_accumulators(dk[j], static_cast<float>(p.scale));
    }
    write_keys(dk, p.dk, p.dk_st);
    write_keys(dv, p.dv, p.dv_st);
  }
};

}  // namespace cuda
}  // namespace reattn
