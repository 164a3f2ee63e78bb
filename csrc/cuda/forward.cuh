// The fused Re-attention forward on tensor cores: register-resident, warp-synchronous, one pass
// over the keys when a query block's key row fits in registers (every ViT length), two otherwise.
//
//   S_h = scale q_h k_h^T (+ mask),  P_h = exp(S_h - m_h) / l_h,  P~ = P Z / (1 - p)
//   M_g = sum_h W[g, h] P~_h + c_g,  A_g = out_scale Norm(M)_g (0 where masked),  O_g = A_g V_g
//
// One program (thread block) = batch element b, 16 * slabs query rows, all H heads, d_out output
// columns (tiles.h). Its warps are a grid of slabs x groups; per key segment:
//
// score phase  Warp (slab, group) takes heads group, group + groups, ... in rounds. For each it
//              multiplies its 16 query rows (A fragments loaded from global memory) by the key
//              segment (K tiles streamed through a 2-stage cp.async ring, B fragments by ldmatrix)
//              with mma.sync m16n8k16, the segment's scores staying in registers. Row max and sum
//              are quad-shuffle reductions on the accumulator layout, so the softmax is exact in
//              registers (one segment) or uses the row statistics of a first sweep (several). P~
//              goes to shared memory in 16-bit, its sign bit marking masked entries.
// mixing phase Warp (slab, group) owns output heads group, group + groups, ...: per 16 keys it
//              loads P~ of every input head with ldmatrix straight into the A-fragment layout,
//              mixes in fp32 (H FMAs per output entry, per thread, no data movement), normalizes
//              (LayerNorm's mean from the column means of W, its variance from partial sums the
//              slab's warps exchange through shared memory), packs A into A fragments and
//              accumulates O_g += A_g V_g on tensor cores (V tiles through a second cp.async ring,
//              B fragments by ldmatrix .trans). O stays in registers until the end.
//
// Saved for the backward: the row statistics (m, log l) per (b, h, i): m the row max of S, l the
// sum of exp(S - m), so P = exp((S - m) - log l) exactly even when a large finite mask fill
// (-1e9, finfo.min) dominates every score of a row; a row with every key masked gets (+inf, 0).
//
// Norms: none and BatchNorm with given statistics are affine maps per output head, folded into W'
// and c' by the host (as are out_scale and 1 / (1 - p)); LayerNorm applies out_scale gamma, beta
// after normalizing. With moments (training BatchNorm in one sweep, norm none) the program writes
// X V in fp32 and per-program sums of X and X^2 per head over the attended entries.
#pragma once

#include <cstdint>

#include "device.cuh"
#include "params.h"
#include "philox.cuh"
#include "tiles.h"

namespace reattn {
namespace cuda {

template <typename E_, int kSlabs_, int kGroups_, int kHeads_, int kD_, int kDOut_, int kKeys_>
struct ForwardConfig {
  using E = E_;
  static constexpr int kSlabs = kSlabs_, kGroups = kGroups_, kHeads = kHeads_, kD = kD_, kDOut = kDOut_;
  static constexpr int kKeys = kKeys_;
  static constexpr int kWarps = kSlabs * kGroups, kThreads = 32 * kWarps, kRows = 16 * kSlabs;
  static constexpr int kMaxHeads = kGroups * kHeads;
  static constexpr int kKSteps = kD / 16;              // k16 steps of q . k
  static constexpr int kKeyTiles = kKeys / kKeyTile;   // K-ring tiles per segment
  static constexpr int kTileN8 = kKeyTile / 8;         // n8 score tiles per K tile
  static constexpr int kScoreN8 = kKeys / 8;           // n8 score tiles per segment
  static constexpr int kOutN8 = kDOut / 8;             // n8 output tiles
  // Programs that hold long key segments run only when the keys fit one segment (the host plans
  // so): their O accumulators are never live while the scores are, and the statistics sweep is
  // not compiled in.
  static constexpr bool kOneSegment = kKeys > 64;
  static_assert(kD % 16 == 0 && kDOut % 16 == 0 && kKeys % kKeyTile == 0, "tile shape");
  static REATTN_HD TileShape shape() { return TileShape{kSlabs, kGroups, kHeads, kD, kDOut, kKeys}; }
};

constexpr float kLog2e = 1.4426950408889634f;

// exp(S - m) = exp2((S - m) log2 e): the difference first, exact when S is near m, so a row whose
// scores all sit at a large finite mask fill (-1e9) gets exp(0) = 1 per key, as eager softmax
// does (folding m log2 e into one FMA would leave its rounding error, up to 64, in the exponent).
// A row with every key masked has m = -inf: subtract 0 instead.
REATTN_DEVICE float exp_shifted(float s, float m) { return dev::exp2_approx((s - (m == -INFINITY ? 0.0f : m)) * kLog2e); }

template <class Cfg>
struct ForwardProgram {
  using E = typename Cfg::E;
  using Cv = dev::Convert<E>;
  static constexpr int kSlabs = Cfg::kSlabs, kGroups = Cfg::kGroups, kHeads = Cfg::kHeads;

  const ReAttnParams& p;
  ForwardLayout L;
  char* smem;
  int lane, warp, slab, group, gq, tq;  // gq = lane / 4 (fragment row), tq = lane % 4
  int64_t b;
  int m0, d0;            // first query row of the program, first output column
  int H, Nq, Nk, D;
  int rounds;            // score-phase rounds: ceil(H / groups)
  int seg_keys, segments;
  bool slab_active;      // some row of this warp's slab is a real query row
  bool exact;            // one segment: the softmax straight from registers
  // Load cursor: which ring step is issued next (see issue_next).
  int c_stage, c_seg, c_round, c_tile;
  int issued, used;  // ring steps issued / consumed (step i lives in slot i % 2)

  REATTN_DEVICE ForwardProgram(const ReAttnParams& params)
      : p(params), smem(dev::shared_memory()) {
    H = p.H;
    Nq = p.Nq;
    Nk = p.Nk;
    D = p.D;
    L = forward_layout(Cfg::shape(), H, Nk);
    const int tid = dev::thread_index();
    lane = tid % 32;
    warp = tid / 32;
    slab = warp / kGroups;
    group = warp % kGroups;
    gq = lane / 4;
    tq = lane % 4;
    const int blocks_m = (Nq + Cfg::kRows - 1) / Cfg::kRows;
    b = dev::block_index_x() / blocks_m;
    m0 = (dev::block_index_x() % blocks_m) * Cfg::kRows;
    d0 = dev::block_index_y() * Cfg::kDOut;
    rounds = (H + kGroups - 1) / kGroups;
    seg_keys = segment_keys(Cfg::shape(), Nk);
    segments = segment_count(Cfg::shape(), Nk);
    exact = segments == 1;
    slab_active = m0 + slab * 16 < Nq;
    issued = used = 0;
  }

  template <typename U>
  REATTN_DEVICE U* at(size_t offset) const {
    return reinterpret_cast<U*>(smem + offset);
  }
  REATTN_DEVICE int seg_start(int seg) const { return seg * Cfg::kKeys; }
  REATTN_DEVICE int seg_len(int seg) const {
    const int rest = Nk - seg_start(seg);
    return rest < seg_keys ? rest : seg_keys;
  }
  REATTN_DEVICE int key_tiles(int keys) const { return (keys + kKeyTile - 1) / kKeyTile; }
  REATTN_DEVICE int value_tiles(int keys) const { return (keys + kValueTile - 1) / kValueTile; }

  // ---- loads ---------------------------------------------------------------------------------
  // A 16-byte chunk (8 elements along d) of row `row` of head h of a [B, H, N, D] input into
  // shared memory: zeros past D or past n_rows.
  REATTN_DEVICE void copy_chunk(E* dst, const void* src, const Strides4& st, int h, int row, int n_rows, int d) const {
    const E* base = static_cast<const E*>(src) + b * st.b + h * st.h;
    if (p.vector_loads) {
      const int valid = row < n_rows && d < D ? (D - d < 8 ? D - d : 8) : 0;
      const E* from = base + (valid > 0 ? static_cast<int64_t>(row) * st.n + d : 0);
      dev::cp_async_16(dst, from, 2 * valid);
    } else {  // rows not 16-byte aligned: element by element (the copy lands at once)
      for (int k = 0; k < 8; ++k) {
        const bool ok = row < n_rows && d + k < D;
        dst[k].bits = ok ? base[static_cast<int64_t>(row) * st.n + (d + k) * st.d].bits : uint16_t(0);
      }
    }
  }

  // K tile: heads round*groups .. +groups, keys key0 .. key0 + kKeyTile, all kD columns.
  REATTN_DEVICE E* slot_tile(int slot) const { return at<E>(L.ring + slot * L.ring_slot); }

  REATTN_DEVICE void issue_keys(int round, int key0, int slot) const {
    E* ring = slot_tile(slot);
    constexpr int kChunksPerRow = Cfg::kD / 8;
    constexpr int kChunks = kGroups * kKeyTile * kChunksPerRow;
    for (int c = dev::thread_index(); c < kChunks; c += Cfg::kThreads) {
      const int dc = c % kChunksPerRow, row = (c / kChunksPerRow) % kKeyTile, hl = c / (kChunksPerRow * kKeyTile);
      const int h = round * kGroups + hl;
      E* dst = ring + (hl * kKeyTile + row) * L.k_row + dc * 8;
      copy_chunk(dst, p.k, p.k_st, h < H ? h : 0, key0 + row, h < H ? Nk : 0, dc * 8);
    }
  }

  // V tile: every head, keys key0 .. key0 + kValueTile, output columns d0 .. d0 + d_out.
  REATTN_DEVICE void issue_values(int key0, int slot) const {
    E* ring = slot_tile(slot);
    constexpr int kChunksPerRow = Cfg::kDOut / 8;
    const int chunks = H * kValueTile * kChunksPerRow;
    for (int c = dev::thread_index(); c < chunks; c += Cfg::kThreads) {
      const int dc = c % kChunksPerRow, row = (c / kChunksPerRow) % kValueTile, h = c / (kChunksPerRow * kValueTile);
      copy_chunk(ring + (h * kValueTile + row) * L.v_row + dc * 8, p.v, p.v_st, h, key0 + row, Nk, d0 + dc * 8);
    }
  }

  // The ring steps in the order the program consumes them: (several segments) a statistics sweep
  // of K tiles over all keys per round; then per segment the K tiles of each round and the V tiles.
  REATTN_DEVICE void cursor_start() {
    c_stage = exact ? 1 : 0;
    c_seg = c_round = c_tile = 0;
  }
  REATTN_DEVICE void cursor_advance() {
    if (c_stage == 0) {
      if (++c_tile < key_tiles(Nk)) return;
      c_tile = 0;
      if (++c_round < rounds) return;
      c_round = 0;
      c_stage = 1;
    } else if (c_stage == 1) {
      if (++c_tile < key_tiles(seg_len(c_seg))) return;
      c_tile = 0;
      if (++c_round < rounds) return;
      c_round = 0;
      c_stage = 2;
    } else if (c_stage == 2) {
      if (++c_tile < value_tiles(seg_len(c_seg))) return;
      c_tile = 0;
      if (++c_seg < segments) {
        c_stage = 1;
        return;
      }
      c_stage = 3;
    }
  }
  REATTN_DEVICE void issue_next() {
    if (c_stage == 0) {
      issue_keys(c_round, c_tile * kKeyTile, issued++ & 1);
    } else if (c_stage == 1) {
      issue_keys(c_round, seg_start(c_seg) + c_tile * kKeyTile, issued++ & 1);
    } else if (c_stage == 2) {
      issue_values(seg_start(c_seg) + c_tile * kValueTile, issued++ & 1);
    } else {
      return;  // nothing left to load
    }
    dev::cp_async_commit();
    cursor_advance();
  }
  // Start of a ring step: this step's tile has landed and every warp is done with the previous
  // step, so the next tile may overwrite the slot the previous step read. Returns the step's slot.
  REATTN_DEVICE int begin_step() {
    dev::cp_async_wait<0>();
    dev::sync_threads();
    issue_next();
    return used++ & 1;
  }

  // ---- score phase ------------------------------------------------------------------------------
  // A fragments of the warp's 16 query rows of head h (rows past Nq and columns past D are zero).
  REATTN_DEVICE void load_queries(int h, uint32_t (&qf)[Cfg::kKSteps][4]) const {
    const E* base = static_cast<const E*>(p.q) + b * p.q_st.b + h * p.q_st.h;
    const int r0 = m0 + slab * 16 + gq;
#pragma unroll
    for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = r0 + (r & 1) * 8;
        const int d = kk * 16 + (r >> 1) * 8 + 2 * tq;
        uint32_t v = 0;
        if (row < Nq) {
          const E* at_row = base + static_cast<int64_t>(row) * p.q_st.n;
          const uint32_t lo = d < D ? at_row[d * p.q_st.d].bits : 0u;
          const uint32_t hi = d + 1 < D ? at_row[(d + 1) * p.q_st.d].bits : 0u;
          v = lo | (hi << 16);
        }
        qf[kk][r] = v;
      }
    }
  }

  // s[n] += q k^T for the 4 n8 tiles of K tile `slot` (head lane hl of the round), n8 tiles from
  // `first_n8` of the segment on; tiles at or past `n8_end` are left alone.
  REATTN_DEVICE void score_tile(int slot, int hl, const uint32_t (&qf)[Cfg::kKSteps][4], float (*s)[4], int first_n8,
                                int n8_end) const {
    const E* tile = slot_tile(slot) + static_cast<size_t>(hl) * kKeyTile * L.k_row;
#pragma unroll
    for (int n = 0; n < Cfg::kTileN8; n += 2) {
      if (first_n8 + n >= n8_end) break;
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = s[n + 1][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
        // Matrices (n8 tile n + i / 2, k half i % 2) stored [key][d]: B = K^T without .trans.
        const int i = lane / 8;
        uint32_t kb[4];
        dev::ldmatrix_x4(kb, tile + ((n + i / 2) * 8 + lane % 8) * L.k_row + kk * 16 + (i % 2) * 8);
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        dev::mma_m16n8k16<E>(s[n], qf[kk], b0, s[n]);
        dev::mma_m16n8k16<E>(s[n + 1], qf[kk], b1, s[n + 1]);
      }
    }
  }

  // The score S = scale q.k (+ mask) of fragment entry e of n8 tile n (segment-relative key col),
  // -inf where masked or past Nk. Sets *masked.
  REATTN_DEVICE float masked_score(float raw, int h, int row, int key, bool* masked) const {
    if (row >= Nq || key >= Nk) {
      *masked = true;
      return -INFINITY;
    }
    float s = raw * static_cast<float>(p.scale);
    if (p.mask_kind != kMaskNone) {
      const int64_t offset = b * p.mask_st.b + h * p.mask_st.h + row * p.mask_st.n + key * p.mask_st.d;
      if (p.mask_kind == kMaskBool) {
        if (static_cast<const uint8_t*>(p.mask)[offset] == 0) {
          *masked = true;
          return -INFINITY;
        }
      } else {
        const float add = static_cast<const float*>(p.mask)[offset];
        if (add == -INFINITY) {
          *masked = true;
          return -INFINITY;
        }
        s += add;
      }
    }
    *masked = false;
    return s;
  }

  // Row statistics of the warp's two fragment rows (gq, gq + 8) from the segment's scores in
  // registers: max m and sum l of exp(S - m), reduced over the quad that shares the rows.
  REATTN_DEVICE void row_stats(float (&s)[Cfg::kScoreN8][4], int n8_end, float (&m)[2], float (&l)[2]) const {
    m[0] = m[1] = -INFINITY;
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      if (n < n8_end) {
        m[0] = dev::fmax_(m[0], dev::fmax_(s[n][0], s[n][1]));
        m[1] = dev::fmax_(m[1], dev::fmax_(s[n][2], s[n][3]));
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[r] = dev::fmax_(m[r], dev::shfl_xor(m[r], 1));
      m[r] = dev::fmax_(m[r], dev::shfl_xor(m[r], 2));
    }
    l[0] = l[1] = 0.0f;
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      if (n < n8_end) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp_shifted(s[n][e], m[e / 2]);
          l[e / 2] += s[n][e];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] += dev::shfl_xor(l[r], 1);
      l[r] += dev::shfl_xor(l[r], 2);
    }
  }

  // Writes P~ of head h for the segment to shared memory (16-bit; masked entries as -0) from
  // unnormalized exponentials e^(S - m) times inv_l, or (given statistics) from the scores.
  REATTN_DEVICE void store_probs(float (&s)[Cfg::kScoreN8][4], uint32_t (&masks)[Cfg::kScoreN8], int h, int key0,
                                 int n8_end, const float (&inv_l)[2]) const {
    E* probs = at<E>(L.probs) + (static_cast<size_t>(h) * Cfg::kRows + slab * 16) * L.p_row;
    const bool dropout = p.seed != nullptr;
    const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
    const float threshold = static_cast<float>(p.dropout_p);
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      if (n < n8_end) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = s[n][e] * inv_l[e / 2];
          if (dropout && v[e] != 0.0f) {
            const int row = m0 + slab * 16 + gq + (e / 2) * 8, key = key0 + n * 8 + 2 * tq + (e & 1);
            if (!dropout_keep(seed, b, H, h, row, key, threshold)) v[e] = 0.0f;
          }
        }
        // Masked entries keep their sign bit: -0 (bit e of masks[n] for fragment entry e).
        const uint32_t lo = Cv::pack(v[0], v[1]) | (masks[n] & 1u ? 0x8000u : 0u) | (masks[n] & 2u ? 0x80000000u : 0u);
        const uint32_t hi = Cv::pack(v[2], v[3]) | (masks[n] & 4u ? 0x8000u : 0u) | (masks[n] & 8u ? 0x80000000u : 0u);
        *reinterpret_cast<uint32_t*>(probs + gq * L.p_row + n * 8 + 2 * tq) = lo;
        *reinterpret_cast<uint32_t*>(probs + (gq + 8) * L.p_row + n * 8 + 2 * tq) = hi;
      }
    }
  }

  // Scale and mask the segment's raw scores in place; bit e of masks[n]: entry e is masked.
  REATTN_DEVICE void mask_scores(float (&s)[Cfg::kScoreN8][4], uint32_t (&masks)[Cfg::kScoreN8], int h, int key0,
                                 int n8_end) const {
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      masks[n] = 0;
      if (n < n8_end) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          bool masked;
          const int row = m0 + slab * 16 + gq + (e / 2) * 8, key = key0 + n * 8 + 2 * tq + (e & 1);
          s[n][e] = masked_score(s[n][e], h, row, key, &masked);
          if (masked) masks[n] |= 1u << e;
        }
      }
    }
  }

  // ---- statistics sweep (several segments) --------------------------------------------------------
  REATTN_DEVICE void statistics_sweep() {
    float* stats = at<float>(L.stats);
    for (int round = 0; round < rounds; ++round) {
      const int h = round * kGroups + group;
      const bool active = slab_active && h < H;
      uint32_t qf[Cfg::kKSteps][4];
      if (active) load_queries(h, qf);
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
      const int tiles = key_tiles(Nk);
      for (int t = 0; t < tiles; ++t) {
        const int slot = begin_step();
        if (!active) continue;
        float s[Cfg::kTileN8][4];
        const int n8_end = (round_up16(Nk) - t * kKeyTile) / 8;
        score_tile(slot, group, qf, s, 0, n8_end);
#pragma unroll
        for (int n = 0; n < Cfg::kTileN8; ++n) {
          if (n >= n8_end) break;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            bool masked;
            const int r = e / 2;
            const int row = m0 + slab * 16 + gq + r * 8, key = t * kKeyTile + n * 8 + 2 * tq + (e & 1);
            const float x = masked_score(s[n][e], h, row, key, &masked);
            if (masked) continue;
            if (x > m[r]) {  // online: rescale the running sum to the new max
              l[r] = l[r] * exp_shifted(m[r], x) + 1.0f;
              m[r] = x;
            } else {
              l[r] += exp_shifted(x, m[r]);
            }
          }
        }
      }
      if (!active) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int off = 1; off <= 2; off *= 2) {
          const float mo = dev::shfl_xor(m[r], off), lo = dev::shfl_xor(l[r], off);
          const float mn = dev::fmax_(m[r], mo);
          const float a = m[r] == -INFINITY ? 0.0f : l[r] * exp_shifted(m[r], mn);
          const float c = mo == -INFINITY ? 0.0f : lo * exp_shifted(mo, mn);
          m[r] = mn;
          l[r] = a + c;
        }
        const int row = slab * 16 + gq + r * 8;
        if (tq == 0) {
          float* st = stats + (static_cast<size_t>(h) * Cfg::kRows + row) * 2;
          st[0] = m[r];
          st[1] = l[r];
        }
      }
      write_stats(h, m, l);
    }
  }

  // Global row statistics [B, H, Nq, 2] = (m, log l); (+inf, 0) for a row without any key.
  REATTN_DEVICE void write_stats(int h, const float (&m)[2], const float (&l)[2]) const {
    if (tq != 0 || dev::block_index_y() != 0 || p.stats_is_input) return;
    float* out = static_cast<float*>(p.lse);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + slab * 16 + gq + r * 8;
      if (row >= Nq) continue;
      float* st = out + ((b * H + h) * static_cast<int64_t>(Nq) + row) * 2;
      const bool empty = m[r] == -INFINITY;
      st[0] = empty ? INFINITY : m[r];
      st[1] = empty ? 0.0f : dev::log2_approx(l[r]) / kLog2e;
    }
  }

  // Score phase of one segment: every round's scores, statistics (or the sweep's), P~ to shared memory.
  REATTN_DEVICE void score_phase(int seg) {
    const int key0 = seg_start(seg);
    const int keys = seg_len(seg);
    const int n8_end = round_up16(keys) / 8;
    const int tiles = key_tiles(keys);
    for (int round = 0; round < rounds; ++round) {
      const int h = round * kGroups + group;
      const bool active = slab_active && h < H;
      uint32_t qf[Cfg::kKSteps][4];
      if (active) load_queries(h, qf);
      float s[Cfg::kScoreN8][4];
#pragma unroll
      for (int t = 0; t < Cfg::kKeyTiles; ++t) {
        if (t < tiles) {
          const int slot = begin_step();
          if (active) score_tile(slot, group, qf, &s[t * Cfg::kTileN8], t * Cfg::kTileN8, n8_end);
        }
      }
      if (!active) continue;
      uint32_t masks[Cfg::kScoreN8];
      mask_scores(s, masks, h, key0, n8_end);
      float inv_l[2];
      if (exact) {
        float m[2], l[2];
        row_stats(s, n8_end, m, l);
        inv_l[0] = l[0] > 0.0f ? dev::rcp_approx(l[0]) : 0.0f;
        inv_l[1] = l[1] > 0.0f ? dev::rcp_approx(l[1]) : 0.0f;
        write_stats(h, m, l);
      } else {
        // P = exp(S - m) / l with the sweep's statistics.
        const float* stats = at<float>(L.stats) + (static_cast<size_t>(h) * Cfg::kRows + slab * 16 + gq) * 2;
        float m[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          m[r] = stats[r * 16];
          const float l = stats[r * 16 + 1];
          inv_l[r] = l > 0.0f ? dev::rcp_approx(l) : 0.0f;
        }
#pragma unroll
        for (int n = 0; n < Cfg::kScoreN8; ++n) {
          if (n < n8_end) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = exp_shifted(s[n][e], m[e / 2]);
          }
        }
      }
      store_probs(s, masks, h, key0, n8_end, inv_l);
    }
  }

  // ---- mixing phase -------------------------------------------------------------------------------
  REATTN_DEVICE static float unpack(uint32_t r, int half) { return half ? Cv::high(r) : Cv::low(r); }

  // One 16-key chunk: mix, normalize, O += A V for the warp's output heads.
  REATTN_DEVICE void mix_chunk(int slot, int chunk, float (&o)[kHeads][Cfg::kOutN8][4], float (&moments)[kHeads][2]) {
    const float* weights = at<float>(L.weights);
    const float* vec = at<float>(L.vectors);
    const int mh = Cfg::kMaxHeads;
    float acc[kHeads][8];
    float mean[8];
    uint32_t own[kHeads][4];  // P~ of each owned head (for its masked bits)
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const float c = vec[group + kGroups * j];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = c;
#pragma unroll
      for (int r = 0; r < 4; ++r) own[j][r] = 0;
    }
    const bool layer = p.norm == kNormLayer;
    const float c_mean = vec[4 * mh];  // mean of c' (after the column means)
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = c_mean;
    const E* probs = at<E>(L.probs) + (static_cast<size_t>(slab) * 16 + lane % 16) * L.p_row + chunk * 16 + (lane / 16) * 8;
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
#pragma unroll
      for (int rr = 0; rr < kGroups; ++rr) {
        const int h = j * kGroups + rr;
        if (h < H) {
          uint32_t pr[4];
          dev::ldmatrix_x4(pr, probs + static_cast<size_t>(h) * Cfg::kRows * L.p_row);
          float pv[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) pv[e] = unpack(pr[e / 2], e & 1);
          const float* w = weights + (h * kGroups + group) * kHeads;
#pragma unroll
          for (int j2 = 0; j2 < kHeads; ++j2) {
            const float wj = w[j2];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[j2][e] += wj * pv[e];
          }
          if (layer) {
            const float wb = vec[3 * mh + h];
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
    if (layer) layer_norm(acc, mean);
    // Entry e of the A fragment: row gq + 8 (e / 2 % 2), key 2 tq + e % 2 + 8 (e / 4).
    const int row0 = m0 + slab * 16 + gq;
    const E* values = slot_tile(slot);
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      if (g >= H) continue;
      float a[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool masked = (own[j][e / 2] >> (e & 1 ? 31 : 15)) & 1u;
        a[e] = masked ? 0.0f : acc[j][e];
        if (p.moments != nullptr && !masked && row0 + ((e / 2) % 2) * 8 < Nq) {
          moments[j][0] += a[e];
          moments[j][1] += a[e] * a[e];
        }
      }
      const uint32_t af[4] = {Cv::pack(a[0], a[1]), Cv::pack(a[2], a[3]), Cv::pack(a[4], a[5]), Cv::pack(a[6], a[7])};
      const E* vg = values + static_cast<size_t>(g) * kValueTile * L.v_row;
#pragma unroll
      for (int n = 0; n < Cfg::kOutN8; n += 2) {
        // Matrices (k half i % 2, n8 tile n + i / 2) stored [key][d]: .trans gives B fragments.
        const int i = lane / 8;
        uint32_t vb[4];
        dev::ldmatrix_x4_trans(vb, vg + ((i % 2) * 8 + lane % 8) * L.v_row + (n + i / 2) * 8);
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        dev::mma_m16n8k16<E>(o[j][n], af, b0, o[j][n]);
        dev::mma_m16n8k16<E>(o[j][n + 1], af, b1, o[j][n + 1]);
      }
    }
  }

  // LayerNorm across heads at each of the thread's 8 entries: the mean comes from the column means
  // of W' (every warp has all input heads), the variance from partial sums over each warp's own
  // output heads, added across the slab's warps through shared memory.
  // The exchange buffer is reused by the next chunk only after the next ring step's block barrier.
  REATTN_DEVICE void layer_norm(float (&acc)[kHeads][8], const float (&mean)[8]) {
    const float* vec = at<float>(L.vectors);
    const int mh = Cfg::kMaxHeads;
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
    if (kGroups > 1) {
      float* ex = at<float>(L.exchange) + static_cast<size_t>(slab) * kGroups * 32 * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) ex[(group * 32 + lane) * 8 + e] = part[e];
      dev::named_barrier(1 + slab, 32 * kGroups);
#pragma unroll
      for (int e = 0; e < 8; ++e) part[e] = 0.0f;
#pragma unroll
      for (int r = 0; r < kGroups; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) part[e] += ex[(r * 32 + lane) * 8 + e];
      }
    }
    float rstd[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) rstd[e] = dev::rsqrt_approx(part[e] / H + static_cast<float>(p.eps));
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      const float gamma = vec[mh + (g < H ? g : 0)], beta = vec[2 * mh + (g < H ? g : 0)];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = acc[j][e] * rstd[e] * gamma + beta;
    }
  }

  // ---- the program --------------------------------------------------------------------------------
  REATTN_DEVICE void load_parameters() {
    // folded: W' [H][H] row-major (g, h), then c', tau gamma, tau beta [H] each (fp32).
    const float* f = static_cast<const float*>(p.folded);
    float* weights = at<float>(L.weights);
    float* vec = at<float>(L.vectors);
    const int mh = Cfg::kMaxHeads;
    for (int i = dev::thread_index(); i < mh * kGroups * kHeads; i += Cfg::kThreads) {
      const int j = i % kHeads, r = (i / kHeads) % kGroups, h = i / (kHeads * kGroups);
      const int g = r + kGroups * j;
      weights[i] = g < H && h < H ? f[g * H + h] : 0.0f;
    }
    for (int i = dev::thread_index(); i <= 4 * mh; i += Cfg::kThreads) {
      const int row = i / mh, h = i % mh;
      float v = 0.0f;
      if (row < 3 && h < H) {
        v = f[H * H + row * H + h];
      } else if (row == 3 && h < H) {  // column mean of W' (LayerNorm's mean of M)
        for (int g = 0; g < H; ++g) v += f[g * H + h];
        v /= H;
      } else if (row == 4) {  // the mean of c'
        for (int g = 0; g < H; ++g) v += f[H * H + g];
        v /= H;
      }
      vec[i] = v;
    }
  }

  REATTN_DEVICE void write_output(const float (&o)[kHeads][Cfg::kOutN8][4]) const {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      if (g >= H || !slab_active) continue;
#pragma unroll
      for (int n = 0; n < Cfg::kOutN8; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = m0 + slab * 16 + gq + r * 8;
          const int d = d0 + n * 8 + 2 * tq;
          if (row >= Nq) continue;
          const int64_t at_row = b * p.o_st.b + g * p.o_st.h + static_cast<int64_t>(row) * p.o_st.n;
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            if (d + k >= D) continue;
            const float v = o[j][n][2 * r + k];
            if (p.out_is_acc) {
              static_cast<float*>(p.out)[at_row + (d + k) * p.o_st.d] = v;
            } else {
              static_cast<E*>(p.out)[at_row + (d + k) * p.o_st.d].bits = Cv::from_float(v);
            }
          }
        }
      }
    }
  }

  // Per-program moment sums [2][H] (float64) at moments + program * 2H: this warp's sums reduced
  // over its lanes, then over the slabs.
  REATTN_DEVICE void write_moments(float (&moments)[kHeads][2]) {
    float* part = at<float>(L.moments);
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float v = moments[j][k];
        for (int off = 16; off > 0; off /= 2) v += dev::shfl_xor(v, off);
        if (lane == 0) part[(warp * 2 + k) * kHeads + j] = v;
      }
    }
    dev::sync_threads();
    if (dev::block_index_y() != 0) return;
    double* out = p.moments + static_cast<int64_t>(dev::block_index_x()) * 2 * H;
    for (int i = dev::thread_index(); i < 2 * H; i += Cfg::kThreads) {
      const int k = i / H, g = i % H;
      double sum = 0.0;
      for (int s = 0; s < kSlabs; ++s) sum += part[((s * kGroups + g % kGroups) * 2 + k) * kHeads + g / kGroups];
      out[i] = sum;
    }
  }

  REATTN_DEVICE void mixing_phase(int seg, float (&o)[kHeads][Cfg::kOutN8][4], float (&moments)[kHeads][2]) {
    const int chunks = value_tiles(seg_len(seg));
    for (int c = 0; c < chunks; ++c) {
      const int slot = begin_step();
      if (slab_active) mix_chunk(slot, c, o, moments);
    }
  }

  REATTN_DEVICE static void clear(float (&o)[kHeads][Cfg::kOutN8][4], float (&moments)[kHeads][2]) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      moments[j][0] = moments[j][1] = 0.0f;
#pragma unroll
      for (int n = 0; n < Cfg::kOutN8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][n][e] = 0.0f;
      }
    }
  }

  REATTN_DEVICE void run() {
    load_parameters();
    cursor_start();
    issue_next();
    float o[kHeads][Cfg::kOutN8][4];
    float moments[kHeads][2];
    if constexpr (Cfg::kOneSegment) {
      score_phase(0);
      clear(o, moments);
      mixing_phase(0, o, moments);
    } else {
      if (!exact) statistics_sweep();
      clear(o, moments);
      for (int seg = 0; seg < segments; ++seg) {
        score_phase(seg);
        mixing_phase(seg, o, moments);
      }
    }
    dev::cp_async_wait<0>();
    write_output(o);
    if (p.moments != nullptr) write_moments(moments);
  }
};

}  // namespace cuda
}  // namespace reattn
