// Programs over a block of query rows, on tensor cores, register-resident and warp-synchronous:
// the fused Re-attention forward (one pass over the keys when a query block's key row fits in
// registers, every ViT length; otherwise a pass over key segments after the row statistics: the
// statistics kernel's, statistics.cuh, in the plain variants, a sweep of the program's own in the
// general one) and the backward's row pass (further below).
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
#include <type_traits>

#include "device.cuh"
#include "mixing.cuh"
#include "parameters.cuh"
#include "row_configs.h"
#include "params.h"
#include "philox.cuh"
#include "tiles.h"

namespace reattn {
namespace cuda {

template <typename E_, int kSlabs_, int kGroups_, int kHeads_, int kD_, int kDOut_, int kKeys_, int kVariant_>
struct RowConfig {
  using E = E_;
  static constexpr int kVariant = kVariant_;
  static constexpr bool kPlain = kVariant < kGeneral || kVariant == kPlainBackwardRows || kVariant == kPlainLayerBackwardRows;
  static constexpr bool kBackward =
      kVariant == kBackwardRows || kVariant == kPlainBackwardRows || kVariant == kPlainLayerBackwardRows;
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

  static constexpr bool kNarrowable = has_narrow_tail(kBackward, kD, kDOut);
  static constexpr bool kNarrow = false;  // RowProgram::kNarrowTail

  static REATTN_HD TileShape shape() { return TileShape{kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kBackward}; }
};

// Cfg whose program takes the narrow tail (RowProgram::kNarrowTail; tiles.h narrow_tail says where):
// the same tiles and layout, a kernel of its own.
template <class Cfg>
struct NarrowTail : Cfg {
  static_assert(Cfg::kNarrowable, "a narrow tail needs d = 16 (mod 32) columns, d_out = d, the forward");
  static constexpr bool kNarrow = true;
};

// run.template operator()<P>() for the forward program P a problem of head dim D takes in Cfg's shape:
// NarrowTail<Cfg> where D leaves the last 8 of its columns empty, else Cfg. The launcher
// (row_kernels.cuh launch_forward_shape) and the emulator (emulate.cpp run_forward) pick through it.
template <class Cfg, class Run>
inline auto with_forward_program(int D, Run&& run) {
  if constexpr (Cfg::kNarrowable) {
    if (narrow_tail(Cfg::shape(), D)) return run.template operator()<NarrowTail<Cfg>>();
  }
  return run.template operator()<Cfg>();
}

constexpr float kLog2e = 1.4426950408889634f;

// exp(S - m) = exp2((S - m) log2 e): the difference first, exact when S is near m, so a row whose
// scores all sit at a large finite mask fill (-1e9) gets exp(0) = 1 per key, as eager softmax
// does (folding m log2 e into one FMA would leave its rounding error, up to 64, in the exponent).
// A row with every key masked has m = -inf: subtract 0 instead.
REATTN_DEVICE float exp_shifted(float s, float m) { return dev::exp2_approx((s - (m == -INFINITY ? 0.0f : m)) * kLog2e); }

// One K tile of a statistics sweep, per row r of the thread: m[r] its running max of s, l[r] the sum of
// 2^((s - m) c), rescaled once per tile to the new max; -inf entries add 0, and a row with none
// finite keeps m = -inf, l = 0. kFold (the plain variants: raw products, c = scale log2 e, no mask
// fill): each entry one FMA, s c - m c. Otherwise (scores in natural units, c = log2 e) the
// difference s - m first, exact at a large mask fill (exp_shifted).
// kN8: the n8 tiles that hold a key (the others are not read).
template <bool kFold, int kN8 = kKeyTile / 8>
REATTN_DEVICE void sweep_tile(const float (&s)[kKeyTile / 8][4], float c, float (&m)[2], float (&l)[2]) {
  float tile_max[2] = {m[0], m[1]};
#pragma unroll
  for (int n = 0; n < kN8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) tile_max[e / 2] = dev::fmax_(tile_max[e / 2], s[n][e]);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // 2^((m - max) c) is 1 when the max did not move; skipped while no key is finite (m = -inf).
    if (m[r] != -INFINITY) l[r] *= dev::exp2_approx((m[r] - tile_max[r]) * c);
    m[r] = tile_max[r];
  }
  if constexpr (kFold) {
    const float mc[2] = {m[0] == -INFINITY ? 0.0f : m[0] * c, m[1] == -INFINITY ? 0.0f : m[1] * c};
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) l[e / 2] += dev::exp2_approx(s[n][e] * c - mc[e / 2]);
    }
  } else {
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) l[e / 2] += exp_shifted(s[n][e], m[e / 2]);
    }
  }
}

// The row statistics (m in natural units, l) of the thread's two fragment rows merged over the 4 threads of
// its quad, which hold the row's other keys: every thread of the quad then has the row's.
REATTN_DEVICE void merge_quad_statistics(float (&m)[2], float (&l)[2]) {
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
  }
}

// Whether every row of a 16-bit [B, H, N, D] output at `base` (strides st, in elements) is 4-byte aligned
// with unit column stride, so that each pair of columns (an even one and the next) goes as one 32-bit
// store: one test a program makes for all its rows (store_fragment_row).
REATTN_DEVICE bool rows_paired(const void* base, const Strides4& st) {
  return st.d == 1 && st.n % 2 == 0 && st.h % 2 == 0 && st.b % 2 == 0 && reinterpret_cast<uintptr_t>(base) % 4 == 0;
}

// store(std::true_type or std::false_type) as rows_paired(base, st) says: the test made once, outside the
// caller's loops over its rows, so each copy of them holds one store path (inside them, the static model's
// DeepViT-L-384 LayerNorm forward took +1.4 us t_high for the per-row tests).
template <class Store>
REATTN_DEVICE void with_rows_paired(const void* base, const Strides4& st, Store&& store) {
  if (rows_paired(base, st)) {
    store(std::true_type{});
  } else {
    store(std::false_type{});
  }
}

// Fragment row r (0: tile row gq, 1: gq + 8) of n8 accumulator tiles acc[kN8][4] to a 16-bit output row
// at `out`: columns d0 + 8 n + 2 tq and the next, stride_d elements apart, none at or past D. paired
// (rows_paired of the output, the same for every row): each pair as one 32-bit store, from one address
// where the row's kCols columns all exist; else each pair packed once and stored as its two 16-bit halves
// (an odd D's rows alternate in alignment, and a GPU faults on a misaligned 32-bit store). Tested per row,
// the alignment sent every warp of an odd D through both paths (static model, DeepViT-L-384 plain affine
// forward at D = 35: 206 warp instructions per head and row, 132 of them integer). The row program's O and
// dQ, the key pass's dK and dV.
template <typename E, int kN8, int kCols>
REATTN_DEVICE void store_fragment_row(E* out, const float (&acc)[kN8][4], int r, int tq, int d0, int D,
                                      int64_t stride_d, bool paired) {
  using Cv = dev::Convert<E>;
  if (paired && d0 + kCols <= D) {
#pragma unroll
    for (int n = 0; n < kN8; ++n) dev::store_pair(out + d0 + n * 8 + 2 * tq, Cv::pack(acc[n][2 * r], acc[n][2 * r + 1]));
    return;
  }
  if (!paired && stride_d == 1) {  // from the lane's first column, tested against the columns left
    E* at = out + d0 + 2 * tq;
    const int left = D - d0 - 2 * tq;
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
      const uint32_t v = Cv::pack(acc[n][2 * r], acc[n][2 * r + 1]);
      if (n * 8 < left) at[n * 8].bits = static_cast<uint16_t>(v & 0xffffu);
      if (n * 8 + 1 < left) at[n * 8 + 1].bits = static_cast<uint16_t>(v >> 16);
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < kN8; ++n) {
    const int d = d0 + n * 8 + 2 * tq;
    const uint32_t v = Cv::pack(acc[n][2 * r], acc[n][2 * r + 1]);
    if (paired) {
      if (d + 1 < D) {
        dev::store_pair(out + d, v);
      } else if (d < D) {
        out[d].bits = static_cast<uint16_t>(v & 0xffffu);
      }
    } else {
      if (d < D) out[d * stride_d].bits = static_cast<uint16_t>(v & 0xffffu);
      if (d + 1 < D) out[(d + 1) * stride_d].bits = static_cast<uint16_t>(v >> 16);
    }
  }
}

// Copies tiles [heads][kTileRows][kCols] of a [B, H, N, D] 16-bit input into shared memory rows of
// `row` elements, 16 bytes per cp.async (zeros past D, past n_rows and for heads past H). Thread t
// copies chunks t, t + kThreads, ... of the tile (kHeadChunks per head). Vector copies (kFixedRow)
// use the first kCopyThreads threads, the largest multiple of kHeadChunks (a head's chunks) that
// the block has: every chunk of such a thread has the same row and columns and only the head
// advances, by kHeadStep, so the thread's part of a tile (Lane) is the same in every tile, a
// program forms it once per input (make_lane) and each tile costs an address, an increment and a
// bounds test per chunk (decomposed per tile, the thread index cost ~25 integer instructions per
// tile and warp in the sm_90 SASS; nvcc forms it again from the thread index unless the program
// hides where it came from, dev::opaque). The idle threads cost nothing where it counts: a warp
// issues the same number of copies either way (d = 48, 256 threads: 6 warps x 4 copies per K tile
// in place of 8 x 3, each decomposed). Element-wise copies of unaligned rows (general variant)
// decompose each chunk. Offsets within a batch element are 32-bit (the host checks they fit).
//
// kIdleColumns (vector copies): a thread whose chunk lies wholly past the tile's real columns (D
// rounded up to 8, the rest of the row zero in memory) copies nothing, and the program zeroes those
// columns of its tile buffers once (zero_idle_columns; nothing else writes them). So only the
// tiles at the rows' edge take the edge path, not every tile of a head dim below kCols (d = 35 in
// 48 columns: the edge path's per-chunk selects and sizes, ~17 integer instructions a chunk with its
// loop unrolled by 3 in the segmented row pass).
//
// kTailHeads: the copies where a thread's chunks may end past H (the backward's: 12 heads in steps of 4 of 16)
// take all but their last chunk in one path (issue); the forward's tiles have every head, and its programs,
// compiled with that path beside the others, issued ~0.5% more instructions (static model).
template <typename E, int kTileRows, int kCols, int kThreads, int kMaxHeadsCopied, bool kVectorOnly,
          int kEdgeUnroll = 0, bool kIdleColumns = false, bool kTailHeads = false>
struct TileCopy {
  static constexpr int kRowChunks = kCols / 8;
  static constexpr int kHeadChunks = kTileRows * kRowChunks;
  static constexpr int kChunks = kMaxHeadsCopied * kHeadChunks;
  static constexpr bool kFixedRow = kVectorOnly && kHeadChunks <= kThreads;
  static constexpr int kCopyThreads = kFixedRow ? kThreads / kHeadChunks * kHeadChunks : kThreads;
  static constexpr int kPerThread = (kChunks + kCopyThreads - 1) / kCopyThreads;
  static constexpr int kHeadStep = kFixedRow ? kCopyThreads / kHeadChunks : 0;

  // A thread's part of every tile (kFixedRow): its first head hl0, the destination offset of its first
  // chunk and that chunk's source offset from the tile's corner (head h0, row r0, column d0), in
  // elements (rows of `row` elements; input strides sh, sn; unit column stride, as vector copies have).
  // A thread at or past kCopyThreads gets hl0 = kIdle: every head it would copy is past any tile's.
  static constexpr int kIdle = 1 << 20;
  // Its row and first column in the tile, as row * 256 + column (one register), serve the tiles at
  // an edge (sizes per chunk).
  struct Lane {
    int hl0 = 0, dst_off = 0, src_off = 0, rd = 0;
  };
  // cols: the tile's columns that exist (D - d0), read with kIdleColumns: a thread whose chunk lies
  // past them copies nothing (hl0 = kIdle).
  //
  // kIdleColumns, a row with one chunk fewer than kRowChunks real (d = 33 .. 40 in 48 columns: 5 of 6):
  // the copying threads take the rows' real chunks only, kHeadStep heads of kTileRows (kRowChunks - 1)
  // chunks at a time, so every lane of a copying warp copies. Spread over kRowChunks chunks, one lane in
  // kRowChunks of every copy was predicated off, its bytes still requested in the static model's count
  // (DeepViT-L-384's forward: 6 warps x 4 copies per K tile of 32 keys and 4 heads, each with 5 of 32
  // lanes idle, where 5 warps x 4 whole copies do). The heads a thread copies and its steps are the same
  // either way (kHeadStep, kPerThread); only fewer threads copy. Only in copies that have idle threads
  // already (kCopyThreads < kThreads, as every tile of the 48-column shapes): in the others (32 and 64
  // columns, d = 17 .. 24 or 49 .. 56 the narrower case) the second decomposition and the idle threads'
  // branch in issue() took the key pass of 32 columns past its 255 registers on sm_80 (8 and 24 bytes
  // of stack).
  REATTN_DEVICE static Lane make_lane(int row, int sh, int sn, int cols) {
    if constexpr (kFixedRow && kIdleColumns && kRowChunks > 1 && kCopyThreads != kThreads) {
      if ((cols + 7) / 8 == kRowChunks - 1) return lane_of<kRowChunks - 1>(row, sh, sn, cols);
    }
    return lane_of<kRowChunks>(row, sh, sn, cols);
  }
  // The lane of this thread where copies go kRc chunks per row (a compile-time divisor).
  template <int kRc>
  REATTN_DEVICE static Lane lane_of(int row, int sh, int sn, int cols) {
    Lane t;
    if constexpr (kFixedRow) {
      constexpr int kRcHead = kTileRows * kRc, kRcThreads = kHeadStep * kRcHead;
      const unsigned tid = static_cast<unsigned>(dev::thread_index());
      const int rem = static_cast<int>(tid % kRcHead), dc = rem % kRc, r = rem / kRc;
      const int hl = static_cast<int>(tid / kRcHead);
      const bool copies = (kRcThreads == kThreads || tid < static_cast<unsigned>(kRcThreads)) &&
                          (!kIdleColumns || dc * 8 < cols);
      t.hl0 = copies ? hl : kIdle;
      t.dst_off = (hl * kTileRows + r) * row + dc * 8;
      t.src_off = hl * sh + r * sn + dc * 8;
      t.rd = r * 256 + dc * 8;
    }
    return t;
  }

  REATTN_DEVICE static void issue(E* dst, int row, const E* src, int sh, int sn, int sd, int h0, int heads, int H,
                                  int r0, int n_rows, int d0, int D, bool vector) {
    issue(dst, make_lane(row, sh, sn, D - d0), row, src, sh, sn, sd, h0, heads, H, r0, n_rows, d0, D, vector);
  }
  // Zeroes the columns from the real ones (cols = D - d0, rounded up to 8) to kCols of `rows` rows of
  // `row` elements at dst (kIdleColumns: the columns no copy writes), as zero-filling copies that read
  // nothing (`any`: a global address, never read), landing with the caller's next cp.async group.
  REATTN_DEVICE static void zero_idle_columns(E* dst, int rows, int row, int cols, const E* any) {
    if constexpr (kIdleColumns) {
      const int first = (cols + 7) / 8;  // one idle chunk per row at d = 35 of 48 (a row per thread, no division)
      if (first >= kRowChunks) return;
      for (int r = dev::thread_index(); r < rows; r += kThreads) {
        for (int c = first; c < kRowChunks; ++c) dev::cp_async_16_or_zero(dst + r * row + c * 8, any, false);
      }
    }
  }
  // lane: make_lane(row, sh, sn, D - d0) of this thread (read in the kFixedRow copies only).
  // kRowsPastAny: the tile's rows at or past n_rows may hold anything (the forward's K tiles: its scores
  // of keys past Nk are set to -inf, not computed from them). With idle columns (every tile's row then
  // either copied whole or not at all), a thread whose row lies past n_rows copies nothing, and the
  // others take the whole-tile path: the last K tile issues the copies of its real rows alone, not
  // zero-filling copies of the rest (DeepViT-L-384's 577 keys: 1 real row of 32).
  template <bool kRowsPastAny = false>
  REATTN_DEVICE static void issue(E* dst, const Lane& lane, int row, const E* src, int sh, int sn, int sd, int h0,
                                  int heads, int H, int r0, int n_rows, int d0, int D, bool vector) {
    const int h_end = (h0 + heads < H ? h0 + heads : H) - h0;  // heads of this tile that exist
    if constexpr (kFixedRow) {
      // Idle threads leave first, by a branch: reaching the loops below they issued every copy predicated
      // off (ptxas if-converts the loops), so whole idle warps issued copies whose bytes the static model
      // counts as requested (DeepViT-L-384's forward: 8 warps issued 2 of the 4 copies per K tile where
      // 5 have chunks; with lane_of's narrower rows, 5,004 copies per program -> 3,474, L2 requests 295.7
      // -> 205.0 us, 1004.8 -> 863.5 us t_high). Only where threads idle at every width (make_lane).
      if constexpr (kCopyThreads != kThreads) {
        if (lane.hl0 == kIdle) return;
      }
      // One 32-bit offset (the host checks a batch element's offsets fit), then one widening add.
      const E* from = src + (h0 * sh + r0 * sn + d0 + lane.src_off);
      // The source address advances by a 64-bit byte step per chunk (two integer adds): formed as
      // from + k kHeadStep sh, each chunk cost a 32-bit multiply, a sign extension and a shift.
      const int64_t step = static_cast<int64_t>(kHeadStep) * sh * static_cast<int64_t>(sizeof(E));
      const char* from_k = reinterpret_cast<const char*>(from);
      constexpr bool kSkipPast = kRowsPastAny && kIdleColumns;
      if constexpr (kSkipPast) {
        if (r0 + lane.rd / 256 >= n_rows) return;
      }
      if (kSkipPast || (r0 + kTileRows <= n_rows && (kIdleColumns || d0 + kCols <= D))) {
        // Every row real and every column real or idle (a tile away from the edges): whole 16-byte
        // copies with no size arithmetic, and none for heads past H (a K tile's last round: only warps
        // of real heads read their rows, so they need no zeros) or by idle threads (hl0 = kIdle). One
        // branch for both: as two (columns all real, or some idle), ptxas if-converted them and issued
        // both branches' copies predicated (static model, ViT-B plain key pass: 16 copies per thread
        // and query chunk for 12, 229.5 against 219.5 us); a limit of 0 for idle threads here instead
        // of kIdle spilled its sm_80 build (8 bytes).
        // A thread whose every chunk's head exists (every thread, where the tile has all its heads) copies
        // with no test per chunk: a test per chunk made each copy a basic block of its own, which ptxas
        // pads with three never-executed LDS and a BSSY/BSYNC pair (static model, LayerNorm forwards:
        // DeepViT-16b 297.8 -> 295.4 us, ViT-B 444.3 -> 439.2).
        if (lane.hl0 + (kPerThread - 1) * kHeadStep < h_end) {
#pragma unroll
          for (int k = 0; k < kPerThread; ++k) {
            dev::cp_async_16_full(dst + lane.dst_off + k * kHeadStep * kTileRows * row, from_k);
            from_k += step;
          }
          return;
        }
        // All but the thread's last chunk real (12 heads in steps of 4 of 16, for every thread): those copies
        // with no test per chunk, as above; the per-chunk tests below cost each copy a branch, a compare and
        // a basic block's padding (static model, DeepViT-16b LayerNorm row pass: ~9% of its instructions
        // went to these copies). One compare (a test per count made ptxas branch through a jump table).
        if (kTailHeads && kPerThread > 1 && lane.hl0 + (kPerThread - 2) * kHeadStep < h_end) {
#pragma unroll
          for (int k = 0; k < kPerThread - 1; ++k) {
            dev::cp_async_16_full(dst + lane.dst_off + k * kHeadStep * kTileRows * row, from_k);
            from_k += step;
          }
          return;
        }
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          const int hl = lane.hl0 + k * kHeadStep;
          if (hl < h_end) dev::cp_async_16_full(dst + lane.dst_off + k * kHeadStep * kTileRows * row, from_k);
          from_k += step;
        }
        return;
      }
      // A tile at an edge (the last rows, or columns past D: every tile of a head dim below kCols).
      // A chunk is read whole or not at all: vector-loaded rows hold D rounded up to 8 columns, the
      // ones past D zero (ops.cpp vector_aligned), so no chunk needs a byte count (static model,
      // DeepViT-L-384 plain forward at D = 35: 262 -> 221 us, the count and its zero-fill address
      // arithmetic ~8 integer instructions per chunk).
      const int d = d0 + lane.rd % 256;
      const bool in = r0 + lane.rd / 256 < n_rows && d < D;
#pragma unroll(kEdgeUnroll > 0 ? kEdgeUnroll : kPerThread)
      for (int k = 0; k < kPerThread; ++k) {
        const int hl = lane.hl0 + k * kHeadStep;
        if (hl < heads) {
          const bool read = in && hl < h_end;
          dev::cp_async_16_or_zero(dst + lane.dst_off + k * kHeadStep * kTileRows * row,
                                   read ? from_k : reinterpret_cast<const char*>(src), read);
        }
        from_k += step;
      }
    } else {
      const unsigned tid0 = static_cast<unsigned>(dev::thread_index());
      for (unsigned c = tid0; c < static_cast<unsigned>(heads * kHeadChunks); c += kThreads) {
        const int hl = static_cast<int>(c / kHeadChunks), rem = static_cast<int>(c % kHeadChunks);
        const int rr = rem / kRowChunks, dc = rem % kRowChunks, n = r0 + rr, d = d0 + dc * 8;
        E* to = dst + (hl * kTileRows + rr) * row + dc * 8;
        const bool in = hl < h_end && n < n_rows;
        if (kVectorOnly || vector) {
          const int valid = in && d < D ? (D - d < 8 ? D - d : 8) : 0;
          dev::cp_async_16(to, valid > 0 ? src + (h0 + hl) * sh + n * sn + d : src, 2 * valid);
        } else {
          // Element by element (rows not 16-byte aligned), the chunk's 8 elements packed into one 16-byte
          // store. Of unit column stride (the forward's unpadded q, p.q_by_element: a test the block shares)
          // each element loads at an immediate offset from the chunk's first, under one compare against the
          // columns left: with a multiply and the row and column tests per element, each chunk cost ~106
          // integer warp instructions (static model, DeepViT-L-384 LayerNorm forward: 7,200 per block against
          // 2,760 for the padded copy's cp.async).
          const E* from = src + (h0 + hl) * sh + n * sn;
          dev::Words4 w;
          if (sd == 1) {
            const E* at = from + d;
            const int left = in ? D - d : 0;
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
              const uint32_t lo = e < left ? at[e].bits : 0u, hi = e + 1 < left ? at[e + 1].bits : 0u;
              w.w[e / 2] = lo | (hi << 16);
            }
          } else {
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
              const uint32_t lo = in && d + e < D ? from[(d + e) * sd].bits : 0u;
              const uint32_t hi = in && d + e + 1 < D ? from[(d + e + 1) * sd].bits : 0u;
              w.w[e / 2] = lo | (hi << 16);
            }
          }
          dev::store_16(to, w);
        }
      }
    }
  }
};

template <class Cfg>
struct RowProgram {
  using E = typename Cfg::E;
  using Cv = dev::Convert<E>;
  static constexpr int kSlabs = Cfg::kSlabs, kGroups = Cfg::kGroups, kHeads = Cfg::kHeads;
  static constexpr int kHeadsPad = Mixer<E, kGroups, kHeads, Cfg::kMaxHeads>::kHeadsPad;
  // Row sizes (elements) of the K, V and dM tiles, compile-time (row_layout computes the same).
  static constexpr int kKRow = padded_row(Cfg::kD), kVRow = padded_row(Cfg::kDOut), kMRow = padded_row(16);
  static constexpr int kMHead = head_stride(Cfg::kRows, kMRow, Cfg::kPlain);  // dM's head stride (backward)
  // The forward's plain affine and moments variants mix the heads on tensor cores (mix_in_place),
  // bf16 only: W' is split into two 16-bit operands, and fp16's range would not hold every W'.
  // LayerNorm's plain variant too (mix_in_place_layer): there the normalization is arithmetic on
  // the products' fragments within a quad of lanes, against H multiply-adds per entry and owned head
  // for the mixing plus the slab's exchange through shared memory (static model, per block: ViT-B
  // fp32 warp instructions 68,395 -> 24,907; DeiT-S 46,746 -> 27,658), per key segment where there
  // are several (each entry's norm is across heads alone; DeepViT-L-384: 346.8-1288.8 -> 208.1-1040.5 us).
  static constexpr bool kTensorLayer = Cfg::kVariant == kPlainLayer && Cfg::kMaxHeads < 16 &&
                                       std::is_same_v<typename Cfg::E, dev::Bf16>;
  static constexpr bool kTensorMix = ((Cfg::kVariant == kPlainAffine || Cfg::kVariant == kPlainMoments) &&
                                      Cfg::kMaxHeads <= 16 && std::is_same_v<typename Cfg::E, dev::Bf16>) ||
                                     kTensorLayer;
  // Likewise the plain backward row pass forms dP' = W'^T dM on tensor cores (tensor_grad_probs).
  static constexpr bool kTensorGrad = backward_tensor_mixing<E>(
      Cfg::kVariant == kPlainBackwardRows || Cfg::kVariant == kPlainLayerBackwardRows, Cfg::kMaxHeads);
  // And M for BatchNorm (tensor_mix). The segmented row pass takes it in its first sweep only and
  // keeps the per-thread Mixer in the second (tensor_batch_sweep): with tensor_mix in both sweeps
  // its sm_90 build needed 24 bytes of stack at 255 registers, also with the fragments loaded per
  // chunk (static model, DeepViT-L-384 training BatchNorm row pass: 669.3-2498.3 us with the Mixer
  // in both sweeps, 588.6-2395.7 as now, 513.7-2265.1 with the stack).
  static constexpr bool kTensorBatch = kTensorGrad;
  REATTN_DEVICE static bool tensor_batch_sweep(bool first) { return kTensorBatch && (Cfg::kOneSegment || first); }
  // LayerNorm's own row pass (grad_mixed_layer): the norm known at compile time, its mixing and the
  // sums across heads on tensor cores and within quads of lanes.
  static constexpr bool kLayerGrad = Cfg::kVariant == kPlainLayerBackwardRows;
  static_assert(!kLayerGrad || kTensorBatch, "LayerNorm's row pass: bf16, at most 16 heads");
  // The segmented row pass, at 255 registers, unrolls the copies' edge loop by 3 (every tile of d = 35
  // is an edge tile): fully unrolled, its bf16 sm_80 and fp16 sm_90 builds used 8 bytes of stack
  // (static model, DeepViT-L-384 plain row pass: 768 us with every thread copying, 558 fully unrolled,
  // 621 by 3). The one-segment row passes unroll fully (by 3, DeepViT-16b's took 157 -> 174 us).
  static constexpr int kEdgeUnroll = Cfg::kBackward && !Cfg::kOneSegment ? 3 : 0;
  // The ring's K and V tiles leave their columns past D to zeroes written once (TileCopy
  // kIdleColumns, zero_ring_columns): the plain variants, whose every tile row is kKRow elements with
  // kD columns (kD = kDOut in every shape they compile). Static model, DeepViT-L-384 (d = 35 in 48
  // columns, every tile an edge tile before): plain forward 210 -> 198 us; plain segmented row pass
  // 490-2053 -> 434-1978 us, no spill in its four builds (bf16/fp16, sm_80/sm_90; before the fold moved
  // into the programs it spilled 8 bytes at its 255 registers). Not the one-segment row passes, whose
  // shapes have no idle columns at the head dims they serve (DeepViT-16b's plain row pass took
  // 709.7 -> 725.0 us with the flag).
  static constexpr bool kIdleColumns =
      Cfg::kPlain && Cfg::kD == Cfg::kDOut && (!Cfg::kBackward || !Cfg::kOneSegment);
  using KeyCopy =
      TileCopy<E, kKeyTile, Cfg::kD, Cfg::kThreads, kGroups, Cfg::kPlain, kEdgeUnroll, kIdleColumns, Cfg::kBackward>;
  using ValueCopy =
      TileCopy<E, kValueTile, Cfg::kDOut, Cfg::kThreads, Cfg::kMaxHeads, Cfg::kPlain, kEdgeUnroll, kIdleColumns,
               Cfg::kBackward>;
  // The forward's K rows past Nk may hold anything (TileCopy kRowsPastAny; every score there is set
  // to -inf), so its last K tile copies only its real rows: static model, H100, plain affine forwards
  // DeiT-S 391.1 -> 386.0 us t_high, DeepViT-16b 278.1 -> 273.7, DeepViT-L-384 863.5 -> 848.3 (3,474 ->
  // 3,378 copies per program). Not the segmented shape of 64 columns, whose bf16 sm_80 build then took
  // 8 bytes of stack at 255 registers.
  // The forward's narrow tail (NarrowTail<Cfg>, where tiles.h narrow_tail holds): the last k16 step's
  // q.k over its first 8 columns by m16n8k8, and O += A V over one n8 output tile fewer. The columns
  // it skips are zeros (q and K past D) or never stored (O past D). At D = 35 (DeepViT-L-384) in 48
  // columns, per entry: q.k over 40 columns of 48 in both sweeps, A V over 40 of 48; per K tile one
  // ldmatrix.x4 fewer, per V chunk and head an ldmatrix.x2 for an x4 (static model, H100, plain affine
  // forward: 838.3 -> 809.8 us t_high). The staged q's last step is an ldmatrix.x2 and 40 of its
  // columns are staged (796.0 -> 791.7 with both); 5 n8 tiles of O are stored. A kernel of its own:
  // tested at run time per K tile and per head's A V, the branches cost ~4,200 control warp
  // instructions per block (838.3 -> 814.0 only), and both programs in one kernel took 255 registers
  // and 8-32 bytes of stack (ptxas, sm_90).
  static constexpr bool kNarrowTail = Cfg::kNarrow;
  static constexpr bool kKeysPastAny =
      !Cfg::kBackward && (Cfg::kOneSegment || KeyCopy::kCopyThreads != Cfg::kThreads);

  // The shared-memory layout: the launcher's (params.row_tiles) in the segmented programs, whose
  // offsets the compiler formed again from H and Nk at most uses (static model, DeepViT-L-384: plain
  // affine forward 848.3 -> 842.9 us t_high, plain row pass 428.8-1821.3 -> 415.6-1810.6); computed
  // here in the one-segment ones, which did not gain from the bank (their LayerNorm row pass at
  // DeepViT-16b took 196.6-879.7 -> 197.5-881.3 us with it, DeiT-S's forward 386.0 -> 386.2).
  using Layout = std::conditional_t<Cfg::kOneSegment, RowLayout, const RowLayout&>;
  static REATTN_DEVICE Layout layout_of(const ReAttnParams& params) {
    if constexpr (Cfg::kOneSegment) {
      return row_layout(Cfg::shape(), params.H, params.Nk);
    } else {
      return params.row_tiles;
    }
  }

  const ReAttnParams& p;
  Layout L;
  char* smem;
  int lane, warp, slab, group, gq, tq;  // gq = lane / 4 (fragment row), tq = lane % 4
  int64_t b;
  int m0, d0;            // first query row of the program, first output column
  int H, Nq, Nk, D;
  int rounds;            // score-phase rounds: ceil(H / groups)
  int seg_keys, segments;
  bool slab_active;      // some row of this warp's slab is a real query row
  bool exact;            // one segment: the softmax straight from registers
  bool plain;            // Cfg::kPlain: no mask, no dropout, scale > 0, aligned rows
  int issued, used;      // ring steps issued / consumed (step i lives in slot i % 2)
  int value_turn;        // summing_values: value chunks until the next one this row block sums
  const E* kbase;        // batch element b of k and v
  const E* vbase;
  // The K and V copies' per-thread parts (TileCopy::Lane), formed once in the forward (static model,
  // DeepViT-16b plain affine: integer warp instructions per block 25,065 -> 24,269, forward kernel
  // 61.9-298.0 -> 61.1-296.4 us); the backward's row pass, at its register limit, forms them per tile.
  static constexpr bool kKeepLanes = !Cfg::kBackward;
  typename KeyCopy::Lane key_lane;
  typename ValueCopy::Lane value_lane;
  // The forward's tensor-core mixing (mix_in_place): the thread's shared addresses at chunk column
  // 0 and their byte steps, formed once (make_mix_lane).
  struct MixLane {
    uint32_t src = 0;       // B's ldmatrix.trans row: P~ of head hl, row row0 + row_of (or the ones row)
    uint32_t src_col = 0;   // bytes per key column of src: 2 (0 for the ones row, which stays)
    uint32_t src_step = 0;  // bytes to the next load's rows (0 for the ones row)
    uint32_t dst = 0;       // the C entries of head gq, row row0, keys 2 tq, 2 tq + 1 (kTensorLayer: of
                            // key gq, row row0, head 2 tq)
    uint32_t row = 0;       // bytes per row of P~
    uint32_t head8 = 0;     // bytes from head gq to head gq + 8
    uint32_t a = 0;         // A's ldmatrix row: M of head group (chunk_tile)
    uint32_t a_head = 0;    // bytes from head g to head g + groups
    uint32_t head1 = 0;     // bytes from one head to the next (kTensorLayer without stmatrix)
    uint32_t out = 0;       // kTensorLayer with stmatrix: the lane's stored row at chunk column 0
    uint32_t out_col = 0;   // its bytes per key column (0 for the scratch row)
    uint32_t out_step = 0;  // its bytes to the next row (0 for the scratch row)
  };
  MixLane mix_lane;


  // Mode of this problem: compile-time in the plain variants, read from the parameters otherwise.
  REATTN_DEVICE bool layer() const {
    return Cfg::kVariant == kPlainLayer || (Cfg::kVariant == kGeneral && p.norm == kNormLayer);
  }
  REATTN_DEVICE bool counting() const {
    return Cfg::kVariant == kPlainMoments || (Cfg::kVariant == kGeneral && p.moments != nullptr);
  }
  REATTN_DEVICE bool vector() const { return Cfg::kPlain || p.vector_loads; }

  REATTN_DEVICE RowProgram(const ReAttnParams& params) : p(params), L(layout_of(params)), smem(dev::shared_memory()) {
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
    const int blocks_m = (Nq + Cfg::kRows - 1) / Cfg::kRows;
    b = dev::block_index_x() / blocks_m;
    m0 = (dev::block_index_x() % blocks_m) * Cfg::kRows;
    d0 = dev::block_index_y() * Cfg::kDOut;
    rounds = (H + kGroups - 1) / kGroups;
    seg_keys = segment_keys(Cfg::shape(), Nk);
    segments = segment_count(Cfg::shape(), Nk);
    exact = !Cfg::kBackward && (Cfg::kOneSegment || segments == 1);  // compile-time for one-segment shapes
    plain = Cfg::kPlain;
    slab_active = m0 + slab * 16 < Nq;
    issued = used = value_turn = 0;
    kbase = static_cast<const E*>(p.k) + b * p.k_st.b;
    vbase = static_cast<const E*>(p.v) + b * p.v_st.b;
    if constexpr (kKeepLanes) {
      // Opaque: else the compiler forms them again from the thread index at every tile.
      key_lane = KeyCopy::make_lane(kKRow, static_cast<int>(p.k_st.h), static_cast<int>(p.k_st.n), D);
      value_lane = ValueCopy::make_lane(kVRow, static_cast<int>(p.v_st.h), static_cast<int>(p.v_st.n), D - d0);
      key_lane = {dev::opaque(key_lane.hl0), dev::opaque(key_lane.dst_off), dev::opaque(key_lane.src_off),
                  dev::opaque(key_lane.rd)};
      value_lane = {dev::opaque(value_lane.hl0), dev::opaque(value_lane.dst_off), dev::opaque(value_lane.src_off),
                    dev::opaque(value_lane.rd)};
    }
    if constexpr (!Cfg::kBackward) {
      // Kept, not formed again from b and the batch strides at every K and V tile (64-bit multiply-adds;
      // static model, DeepViT-16b plain affine forward: -584 integer warp instructions per block; the
      // segmented forward formed them again per key segment: DeepViT-L-384 842.9 -> 840.7 us t_high).
      kbase = dev::opaque(kbase);
      vbase = dev::opaque(vbase);
    }
    if constexpr (kTensorMix) mix_lane = make_mix_lane();  // mix_in_place, mix_in_place_layer
  }

  template <typename U>
  REATTN_DEVICE U* at(size_t offset) const {
    return reinterpret_cast<U*>(smem + offset);
  }
  // P~'s head padding (tiles.h head_stride): the plain backward's and the tensor-core mixing's;
  // none elsewhere, where every expression below is the unpadded one (kept in that form: their
  // codegen is tight).
  static constexpr int kProbsPad = (Cfg::kBackward && Cfg::kPlain) || kTensorMix ? kHeadPadding : 0;
  REATTN_DEVICE int seg_start(int seg) const { return seg * Cfg::kKeys; }
  REATTN_DEVICE int seg_len(int seg) const {
    const int rest = Nk - seg_start(seg);
    return rest < seg_keys ? rest : seg_keys;
  }
  REATTN_DEVICE int key_tiles(int keys) const { return (keys + kKeyTile - 1) / kKeyTile; }
  REATTN_DEVICE int value_tiles(int keys) const { return (keys + kValueTile - 1) / kValueTile; }
  REATTN_DEVICE E* slot_tile(int slot) const { return at<E>(L.ring + slot * L.ring_slot); }

  // ---- the ring -------------------------------------------------------------------------------
  // Start of a ring step: this step's tile has landed and every warp is done with the previous
  // step, so the tile issued next may overwrite the slot the previous step read. Every call site
  // then issues the one tile that comes next (its kind known there) and returns this step's slot.
  REATTN_DEVICE int begin_step() {
    dev::cp_async_wait<0>();
    dev::sync_threads();
    return used++ & 1;
  }
  // K tile: heads round * groups .. + groups, keys key0 .. key0 + kKeyTile, all kD columns.
  REATTN_DEVICE void issue_keys(int round, int key0) {
    const int sh = static_cast<int>(p.k_st.h), sn = static_cast<int>(p.k_st.n);
    KeyCopy::template issue<kKeysPastAny>(slot_tile(issued++ & 1),
                                             !kKeepLanes ? KeyCopy::make_lane(kKRow, sh, sn, D) : key_lane, kKRow,
                   kbase, sh, sn, static_cast<int>(p.k_st.d), round * kGroups, kGroups, H, key0, Nk, 0, D, vector());
    dev::cp_async_commit();
  }
  // V tile: every head, keys key0 .. key0 + kValueTile, output columns d0 .. d0 + d_out.
  REATTN_DEVICE void issue_values(int key0) {
    const int sh = static_cast<int>(p.v_st.h), sn = static_cast<int>(p.v_st.n);
    ValueCopy::issue(slot_tile(issued++ & 1), !kKeepLanes ? ValueCopy::make_lane(kVRow, sh, sn, D - d0) : value_lane,
                     kVRow,
                     vbase, sh, sn, static_cast<int>(p.v_st.d), 0, H, H, key0, Nk, d0, D, vector());
    dev::cp_async_commit();
  }
  // Before the first tile: the ring's idle columns (kIdleColumns) zeroed, in both slots, with the
  // first tile's cp.async group. Rows of kKRow elements and D real columns, the K tiles' and the V
  // tiles' alike (a plain program's head dim fits its output columns: d0 = 0).
  REATTN_DEVICE void zero_ring_columns() {
    static_assert(!kIdleColumns || kKRow == kVRow, "one row size in the ring");
    const int rows = static_cast<int>(L.ring_slot / (kKRow * sizeof(E)));
    KeyCopy::zero_idle_columns(slot_tile(0), rows, kKRow, D, kbase);
    KeyCopy::zero_idle_columns(slot_tile(1), rows, kKRow, D, kbase);
  }
  // After the last K tile of a segment's score phase: its first V tile. After the last V tile: the
  // next segment's first K tile, or nothing.
  REATTN_DEVICE void issue_after_scores(int seg) {
    if constexpr (Cfg::kBackward) {
      issue_chunk(seg_start(seg), false);
    } else {
      issue_values(seg_start(seg));
    }
  }
  REATTN_DEVICE void issue_after_values(int seg) {
    if (!Cfg::kOneSegment && seg + 1 < segments) issue_keys(0, seg_start(seg + 1));
  }

  // ---- score phase ------------------------------------------------------------------------------
  // A fragments of the warp's 16 rows of head h of a [B, H, Nq, D] input (q, or dO in the backward;
  // rows past Nq and columns past D are zero). With aligned rows (vector()) each register is one
  // 32-bit load from one of the thread's two rows (an odd D's last pair keeps its low half).
  REATTN_DEVICE void load_row_fragments(const void* src, const Strides4& st, int h,
                                        uint32_t (&f)[Cfg::kKSteps][4]) const {
    const int r0 = m0 + slab * 16 + gq;
    if constexpr (Cfg::kPlain) {
      // The plain variants' rows hold zeros from D to the next multiple of 8 (ops.cpp vector_aligned),
      // so a register is real or zero by its 8-column half, a test the warp shares, and 2 tq folds into
      // the thread's row address: each register is one load at an immediate offset. Offsets within the
      // batch element are 32-bit (the host checks they fit). Static model, DeepViT-16b plain affine
      // forward: ~73 integer instructions per warp and round on the general path below.
      const int d8 = (D + 7) & ~7;
      const E* batch = static_cast<const E*>(src) + b * st.b;
      const int sn = static_cast<int>(st.n), hs = h * static_cast<int>(st.h);
      const bool ok[2] = {r0 < Nq, r0 + 8 < Nq};
      const uint32_t* rows[2] = {reinterpret_cast<const uint32_t*>(batch + (hs + (ok[0] ? r0 : 0) * sn + 2 * tq)),
                                 reinterpret_cast<const uint32_t*>(batch + (hs + (ok[1] ? r0 + 8 : 0) * sn + 2 * tq))};
      if (!Cfg::kBackward && D == Cfg::kD) {
        // The forward's usual case, every column real: no column tests (static model, ViT-B plain
        // forward: 428.5 -> 427.4 us at t_high).
#pragma unroll
        for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r) f[kk][r] = ok[r & 1] ? rows[r & 1][kk * 8 + (r >> 1) * 4] : 0u;
        }
        return;
      }
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int c = kk * 16 + (r >> 1) * 8;
          f[kk][r] = ok[r & 1] && c < d8 ? rows[r & 1][c / 2] : 0u;
        }
      }
      return;
    }
    const E* base = static_cast<const E*>(src) + b * st.b + h * st.h;
    if (vector()) {
      const bool ok[2] = {r0 < Nq, r0 + 8 < Nq};
      const uint32_t* rows[2] = {reinterpret_cast<const uint32_t*>(base + (ok[0] ? r0 : 0) * st.n),
                                 reinterpret_cast<const uint32_t*>(base + (ok[1] ? r0 + 8 : 0) * st.n)};
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = kk * 16 + (r >> 1) * 8 + 2 * tq;
          uint32_t v = ok[r & 1] && d < D ? rows[r & 1][d / 2] : 0u;
          f[kk][r] = d + 1 < D ? v : v & 0xffffu;
        }
      }
    } else if constexpr (!Cfg::kPlain) {  // element by element (not compiled in the plain variants)
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = r0 + (r & 1) * 8;
          const int d = kk * 16 + (r >> 1) * 8 + 2 * tq;
          uint32_t v = 0;
          if (row < Nq && d < D) {
            const E* at_row = base + static_cast<int64_t>(row) * st.n;
            const uint32_t lo = at_row[d * st.d].bits;
            const uint32_t hi = d + 1 < D ? at_row[(d + 1) * st.d].bits : 0u;
            v = lo | (hi << 16);
          }
          f[kk][r] = v;
        }
      }
    }
  }
  // The block's rows of a [B, H, N, D] 16-bit input staged in shared memory, [H][rows][kKRow] at byte
  // offset `region` (the forward's q, the backward's dO, over key segments), zeros past Nq and D as
  // load_row_fragments gives. Copied once per program, element by element even in the plain
  // variants: the fixed-row copy made the (1, 8, 2, 64, 64, 64) row pass use 8 bytes of stack at 255
  // registers (ptxas, sm_80 and sm_90). The narrow tail's program stages the columns its q.k reads, kD - 8.
  // vector: the rows are read in whole 16-byte chunks (else element by element: the forward's q where
  // p.q_by_element, its rows unpadded at a D not a multiple of 8).
  using RowsCopy = TileCopy<E, Cfg::kRows, kNarrowTail ? Cfg::kD - 8 : Cfg::kD, Cfg::kThreads, Cfg::kMaxHeads, false>;
  REATTN_DEVICE void stage_rows(uint32_t region, const void* src, const Strides4& st, bool vector) const {
    RowsCopy::issue(at<E>(region), kKRow, static_cast<const E*>(src) + b * st.b, static_cast<int>(st.h),
                    static_cast<int>(st.n), static_cast<int>(st.d), 0, H, H, m0, Nq, 0, D, vector);
  }
  // The lane's ldmatrix row of head h there at head dim 0, as a shared address (each k16 step adds 32
  // bytes): row l % 16 of the warp's slab, columns 8 (l / 16) on, so ldmatrix's four matrices are the
  // A fragment's registers (rows 0-7 / 8-15, columns 0-7 / 8-15).
  REATTN_DEVICE uint32_t staged_row(uint32_t region, int h) const {
    return dev::smem_address(at<E>(region) + (static_cast<size_t>(h) * Cfg::kRows + slab * 16 + lane % 16) * kKRow +
                             (lane / 16) * 8);
  }

  // q of the block's rows in shared memory (the forward's segmented shapes): the statistics sweep
  // and every segment's score phase take a round's fragments again (rounds x (segments + 1) times a
  // program), and the registers cannot keep them across the mixing. Copied once per program with
  // the first K tile, zeros past Nq and D as load_row_fragments gives; each round then reads
  // kKSteps ldmatrix where it took a column-tested global load per register with its address
  // arithmetic (static model, DeepViT-L-384 plain forward at d = 35 in 48 columns: ~66 warp
  // instructions per round, 15,840 of 287,087 per block, and 338 KB of L2 requests against the
  // copy's 37 KB).
  static constexpr bool kQueriesShared = stages_queries(Cfg::kBackward, Cfg::kKeys);
  REATTN_DEVICE void load_queries(int h, uint32_t (&qf)[Cfg::kKSteps][4]) const {
    if constexpr (kQueriesShared) {
      const uint32_t row = staged_row(L.queries, h);
#pragma unroll
      for (int kk = 0; kk < (kNarrowTail ? Cfg::kKSteps - 1 : Cfg::kKSteps); ++kk) dev::ldmatrix_x4_at(qf[kk], row + kk * 32);
      if constexpr (kNarrowTail) {  // the last step's first 8 columns: the m16n8k8 A (score_tile)
        uint32_t a8[2];
        dev::ldmatrix_x2_at(a8, row + (Cfg::kKSteps - 1) * 32);
        qf[Cfg::kKSteps - 1][0] = a8[0];
        qf[Cfg::kKSteps - 1][1] = a8[1];
        qf[Cfg::kKSteps - 1][2] = qf[Cfg::kKSteps - 1][3] = 0u;  // unread
      }
    } else {
      load_row_fragments(p.q, p.q_st, h, qf);
    }
  }

  // s[n] = q k^T for the 4 n8 tiles of the K tile in `slot` (head lane hl of the round); the narrow
  // tail's last step over its first 8 columns alone, by m16n8k8 (kNarrowTail).
  // kN8 < kTileN8 (a tile whose keys all lie in its first kN8 n8 tiles): s[n] for n >= kN8 may be left
  // unfinished (the pairs of n8 tiles below round_up(kN8, 2) are computed; the narrow tail's last step
  // for n < kN8 only).
  template <int kN8 = Cfg::kTileN8>
  REATTN_DEVICE void score_tile(int slot, int hl, const uint32_t (&qf)[Cfg::kKSteps][4], float (*s)[4]) const {
    dev::mma_col_major<E, 1, Cfg::kKSteps, kN8, kNarrowTail>(
        reinterpret_cast<const uint32_t(&)[1][Cfg::kKSteps][4]>(qf),
        slot_tile(slot) + static_cast<size_t>(hl) * kKeyTile * kKRow, kKRow, lane,
        *reinterpret_cast<float(*)[1][Cfg::kTileN8][4]>(s));
  }

  // S = scale q.k (+ mask) of one entry, -inf where masked or past Nq / Nk; sets *masked.
  REATTN_DEVICE float masked_score(float raw, int h, int row, int key, bool* masked) const {
    if (row >= Nq || key >= Nk) {
      *masked = true;
      return -INFINITY;
    }
    float s = raw * static_cast<float>(p.scale);
    if (!Cfg::kPlain && p.mask_kind != kMaskNone) {
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

  // Max of the two fragment rows (gq, gq + 8) over the quad that shares them.
  REATTN_DEVICE static void quad_max(float (&m)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[r] = dev::fmax_(m[r], dev::shfl_xor(m[r], 1));
      m[r] = dev::fmax_(m[r], dev::shfl_xor(m[r], 2));
    }
  }
  REATTN_DEVICE static void quad_sum(float (&l)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] += dev::shfl_xor(l[r], 1);
      l[r] += dev::shfl_xor(l[r], 2);
    }
  }

  // Plain problems (no mask, no dropout, scale > 0): the raw products straight into exp2 with one
  // FMA each, exp2(raw c - m_raw c), c = scale log2 e, m_raw the row max of q.k (exact enough: no
  // score can sit at a large mask fill). Keys past the segment in its last K tile hold -inf
  // (score_phase); K tiles past the segment were never computed and are skipped here. kFull: the
  // segment fills every K tile (the caller tests that once per round), so the loops hold no test.
  // Returns the row statistics (max of S, sum) and leaves the unnormalized exponentials in s.
  template <bool kFull>
  REATTN_DEVICE void plain_softmax(float (&s)[Cfg::kScoreN8][4], int keys, int n8_end, float (&m)[2],
                                   float (&l)[2]) const {
    const int tiles = kFull ? Cfg::kKeyTiles : key_tiles(keys);
    m[0] = m[1] = -INFINITY;
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      if (kFull || n < Cfg::kTileN8 || n / Cfg::kTileN8 < tiles) {
        m[0] = dev::fmax_(m[0], dev::fmax_(s[n][0], s[n][1]));
        m[1] = dev::fmax_(m[1], dev::fmax_(s[n][2], s[n][3]));
      }
    }
    quad_max(m);
    const float c = static_cast<float>(p.scale) * kLog2e;
    const float shift[2] = {m[0] * c, m[1] * c};  // every row has a key: finite
    l[0] = l[1] = 0.0f;
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      if (kFull || n < Cfg::kTileN8 || n / Cfg::kTileN8 < tiles) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = dev::exp2_approx(s[n][e] * c - shift[e / 2]);
          l[e / 2] += s[n][e];
        }
      }
    }
    quad_sum(l);
    m[0] *= static_cast<float>(p.scale);
    m[1] *= static_cast<float>(p.scale);
  }

  // Row statistics of the segment's masked scores in registers: max m and sum l of exp(S - m).
  REATTN_DEVICE void row_stats(float (&s)[Cfg::kScoreN8][4], int n8_end, float (&m)[2], float (&l)[2]) const {
    m[0] = m[1] = -INFINITY;
#pragma unroll
    for (int n = 0; n < Cfg::kScoreN8; ++n) {
      if (n < n8_end) {
        m[0] = dev::fmax_(m[0], dev::fmax_(s[n][0], s[n][1]));
        m[1] = dev::fmax_(m[1], dev::fmax_(s[n][2], s[n][3]));
      }
    }
    quad_max(m);
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
    quad_sum(l);
  }

  // P~ of head h for the segment to shared memory, 16-bit, from exponentials e^(S - m) times inv_l;
  // masked entries as -0 (bit e of masks[n] for fragment entry e), dropped ones as +0. The n8 tiles
  // below kSureN8 are known to be below n8_end: no test (static model, DeepViT-16b LayerNorm forward,
  // with the one-segment softmax's whole tiles: 294.6 -> 293.8 us); none at or past kMaxN8 is.
  template <int kSureN8 = 0, int kMaxN8 = Cfg::kScoreN8>
  REATTN_DEVICE void store_probs(float (&s)[Cfg::kScoreN8][4], const uint32_t (&masks)[Cfg::kScoreN8], int h,
                                 int key0, int n8_end, const float (&inv_l)[2], bool general) const {
    E* probs = at<E>(L.probs) + (static_cast<size_t>(h) * Cfg::kRows + slab * 16 + gq) * L.p_row + h * kProbsPad + 2 * tq;
    const bool dropout = !Cfg::kPlain && general && p.seed != nullptr;
    const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
    const float threshold = static_cast<float>(p.dropout_p);
#pragma unroll
    for (int n = 0; n < kMaxN8; ++n) {
      if (n < kSureN8 || n < n8_end) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = s[n][e] * inv_l[e / 2];
        uint32_t lo, hi;
        if (general) {
          if (dropout) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = m0 + slab * 16 + gq + (e / 2) * 8, key = key0 + n * 8 + 2 * tq + (e & 1);
              // Dropped: 0 in the forward; the backward keeps -P (it needs P of dropped entries).
              if (v[e] != 0.0f && !dropout_keep(seed, b, H, h, row, key, threshold)) {
                v[e] = Cfg::kBackward ? -v[e] : 0.0f;
              }
            }
          }
          lo = Cv::pack(v[0], v[1]) | (masks[n] & 1u ? 0x8000u : 0u) | (masks[n] & 2u ? 0x80000000u : 0u);
          hi = Cv::pack(v[2], v[3]) | (masks[n] & 4u ? 0x8000u : 0u) | (masks[n] & 8u ? 0x80000000u : 0u);
          if (Cfg::kBackward && dropout) {  // a dropped -P that rounds to -0 would read as masked
            lo = keep_dropped(lo, v[0] < 0.0f, v[1] < 0.0f);
            hi = keep_dropped(hi, v[2] < 0.0f, v[3] < 0.0f);
          }
        } else {
          lo = Cv::pack(v[0], v[1]);
          hi = Cv::pack(v[2], v[3]);
        }
        *reinterpret_cast<uint32_t*>(probs + n * 8) = lo;
        *reinterpret_cast<uint32_t*>(probs + 8 * L.p_row + n * 8) = hi;
      }
    }
  }

  // Dropped entries of the backward stay distinguishable from masked ones (exactly -0): at least
  // the smallest negative subnormal.
  REATTN_DEVICE static uint32_t keep_dropped(uint32_t packed, bool lo_dropped, bool hi_dropped) {
    if (lo_dropped && (packed & 0xffffu) == 0x8000u) packed = (packed & 0xffff0000u) | 0x8001u;
    if (hi_dropped && (packed >> 16) == 0x8000u) packed = (packed & 0xffffu) | 0x80010000u;
    return packed;
  }

  // ---- statistics sweep (several segments) --------------------------------------------------------
  // Entries of a K tile's scores s [kTileN8][4] whose key (key0 + 8 n + 2 tq + (e & 1)) is at or past
  // `end` set to -inf (exp 0): keys past Nk or past the segment in the K tile that holds them.
  template <int kN8 = Cfg::kTileN8>
  REATTN_DEVICE void mask_keys_from(float (*s)[4], int key0, int end) const {
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (key0 + n * 8 + 2 * tq + (e & 1) >= end) s[n][e] = -INFINITY;
      }
    }
  }

  REATTN_DEVICE void statistics_sweep() {
    float* stats = at<float>(L.stats);
    const int tiles = key_tiles(Nk);
    const float scale = static_cast<float>(p.scale), c_log2 = scale * kLog2e;
    for (int round = 0; round < rounds; ++round) {
      const int h = round * kGroups + group;
      const bool active = slab_active && h < H;
      uint32_t qf[Cfg::kKSteps][4];
      if (active) load_queries(h, qf);
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
      for (int t = 0; t < tiles; ++t) {
        const int slot = begin_step();
        if (t + 1 < tiles) {
          issue_keys(round, (t + 1) * kKeyTile);
        } else if (round + 1 < rounds) {
          issue_keys(round + 1, 0);
        } else {
          issue_keys(0, 0);  // the first segment's score phase
        }
        if (!active) continue;
        float s[Cfg::kTileN8][4];
        if (Cfg::kPlain && Nk - t * kKeyTile <= 8) {
          // The last tile with at most 8 keys (DeepViT-L-384's 577th) takes its first n8 tile alone:
          // the full tile's products, maxima and exponentials of keys past Nk were issued (static
          // model: per round and warp 12 MUFU and ~6 products more).
          score_tile<1>(slot, group, qf, s);
          mask_keys_from<1>(s, t * kKeyTile, Nk);
          sweep_tile<true, 1>(s, c_log2, m, l);
          continue;
        }
        score_tile(slot, group, qf, s);
        // Online per tile: the tile's row max first, the running sum rescaled once to it, then one
        // exponential per entry (masked entries are -inf: exp 0), with no branch per entry.
        if constexpr (Cfg::kPlain) {
          // No mask and scale > 0: m tracks the raw products' max (rows past Nq: zero q, finite), keys
          // past Nk are -inf, and each entry is one FMA and exponential, 2^(raw c - m c).
          if ((t + 1) * kKeyTile > Nk) mask_keys_from(s, t * kKeyTile, Nk);
          sweep_tile<true>(s, c_log2, m, l);
        } else {
#pragma unroll
          for (int n = 0; n < Cfg::kTileN8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              bool masked;
              const int row = m0 + slab * 16 + gq + (e / 2) * 8, key = t * kKeyTile + n * 8 + 2 * tq + (e & 1);
              s[n][e] = masked_score(s[n][e], h, row, key, &masked);
            }
          }
          sweep_tile<false>(s, kLog2e, m, l);
        }
      }
      // The plain variant's max in natural units (scale > 0).
      if constexpr (Cfg::kPlain) {
        m[0] *= scale;
        m[1] *= scale;
      }
      if (!active) continue;
      merge_quad_statistics(m, l);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = slab * 16 + gq + r * 8;
        if (tq == 0) {  // as the given statistics of the backward: (m, log l), (0, 0) for a row without
                        // any key (its entries are -inf: P = 0 either way; rows past Nq: finite P)
          float* st = stats + (static_cast<size_t>(h) * Cfg::kRows + row) * 2;
          st[0] = m[r] == -INFINITY ? 0.0f : m[r];
          st[1] = l[r] > 0.0f ? dev::log2_approx(l[r]) / kLog2e : 0.0f;
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

  // The given row statistics (p.lse, [B, H, Nq, 2]: the statistics kernel's or the caller's) in the shared
  // rows the statistics sweep would fill, in its form: (0, 0) for a row without any key (given as (+inf, 0))
  // and for the rows past Nq, whose P nothing reads. The score phase's first ring step (a barrier) orders
  // these stores before its reads.
  REATTN_DEVICE void load_statistics() const {
    float* stats = at<float>(L.stats);
    const float* given = static_cast<const float*>(p.lse) + b * H * static_cast<int64_t>(Nq) * 2;
    for (int i = dev::thread_index(); i < H * Cfg::kRows; i += Cfg::kThreads) {
      const int h = i / Cfg::kRows, row = m0 + (i - h * Cfg::kRows);
      float m = 0.0f, log_l = 0.0f;
      if (row < Nq) {
        const float* g = given + (static_cast<int64_t>(h) * Nq + row) * 2;
        m = g[0] == INFINITY ? 0.0f : g[0];
        log_l = g[1];
      }
      stats[2 * i] = m;
      stats[2 * i + 1] = log_l;
    }
  }

  // P = 2^(raw c - shift) of the n8 tiles below kN8 and n8_end (finish_round's plain path).
  template <int kN8>
  REATTN_DEVICE static void plain_probs(float (&s)[Cfg::kScoreN8][4], float c, const float (&shift)[2],
                                        int n8_end = kN8) {
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
      if (n < n8_end) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dev::exp2_approx(s[n][e] * c - shift[e / 2]);
      }
    }
  }

  // Softmax of one round's scores and P~ to shared memory: exact from registers (one segment of
  // the forward), or P = exp((S - m) - log l) with the statistics (m, log l) in shared memory (the
  // forward's statistics sweep, or the backward's given ones).
  REATTN_DEVICE void finish_round(float (&s)[Cfg::kScoreN8][4], int h, int key0, int keys, int n8_end) {
    float inv_l[2];
    uint32_t masks[Cfg::kScoreN8];
    const bool exact_round = !Cfg::kBackward && (Cfg::kOneSegment || exact);
    if (Cfg::kPlain && exact_round) {
      float m[2], l[2];
      const bool full = key_tiles(keys) == Cfg::kKeyTiles;
      if (full) {
        plain_softmax<true>(s, keys, n8_end, m, l);
      } else {
        plain_softmax<false>(s, keys, n8_end, m, l);
      }
      inv_l[0] = dev::rcp_approx(l[0]);
      inv_l[1] = dev::rcp_approx(l[1]);
      write_stats(h, m, l);
      if (full) {  // the last K tile has a key: n8_end >= its first 16 keys' end
        store_probs<(Cfg::kKeyTiles - 1) * Cfg::kTileN8 + 2>(s, masks, h, key0, n8_end, inv_l, false);
      } else {
        store_probs(s, masks, h, key0, n8_end, inv_l, false);
      }
      return;
    }
    if constexpr (Cfg::kPlain && (Cfg::kBackward || Cfg::kVariant != kPlainMoments || kTensorMix)) {
      // No mask: P = 2^(raw c - (m + log l) log2 e), c = scale log2 e, one FMA per entry (no score
      // sits at a large mask fill, so m need not be subtracted first). Keys past the segment hold
      // -inf (P = 0); rows past Nq have zero q and finite statistics ((0, 0) given to the backward,
      // (0, log Nk) from the forward's plain sweep), so P is finite there, which nothing reads: the
      // backward's dN, hence dM, is zeroed by grad_mixed's bounds test, and the forward
      // never writes those rows (each row's mixing, norm and A V use that row alone). The forward's
      // segments (several: the statistics sweep's) take it too, with no mask bits in P~: V rows past
      // Nk are zero, so whatever A is there adds nothing (the one-segment path does the same). The
      // moments variant only with tensor-core mixing (mix_in_place, which counts the entries past Nq
      // and Nk by position): its per-thread mixing's sums of X skip masked entries by P~'s sign bits
      // (static model, DeepViT-L-384: the masked path's per-entry row and key tests and the bit
      // packing were ~30,000 of 240,000 integer warp instructions per block of the plain affine
      // forward; the moments forward 250.2 -> 203.8 us t_low on this path).
      const float* stats = at<float>(L.stats) + (static_cast<size_t>(h) * Cfg::kRows + slab * 16 + gq) * 2;
      const float c = static_cast<float>(p.scale) * kLog2e;
      const float shift[2] = {(stats[0] + stats[1]) * kLog2e, (stats[16] + stats[17]) * kLog2e};
      inv_l[0] = inv_l[1] = 1.0f;
      // The forward's last segment when it holds at most 16 keys (n8_end = 2: DeepViT-L-384's 577th
      // key after nine segments of 64) takes its two n8 tiles alone. Under the test per tile, the
      // other six tiles' exponentials, packs and stores were issued predicated off (per round and warp
      // ~24 MUFU, 24 FMA and 12 conversions). Static model, H100, with the statistics sweep's last tile
      // below: DeepViT-L-384 forwards, LayerNorm 813.6 -> 805.2 us t_high, plain affine 781.3 -> 773.3.
      if (!Cfg::kBackward && !Cfg::kOneSegment && n8_end <= 2) {
        plain_probs<2>(s, c, shift);
        store_probs<2, 2>(s, masks, h, key0, n8_end, inv_l, false);
        return;
      }
      plain_probs<Cfg::kScoreN8>(s, c, shift, n8_end);
      store_probs(s, masks, h, key0, n8_end, inv_l, false);
      return;
    }
    // Masked scores in natural units; then the exact subtraction S - m first (large mask fills).
    mask_scores(s, masks, h, key0, n8_end);
    if (exact_round) {
      float m[2], l[2];
      row_stats(s, n8_end, m, l);
      inv_l[0] = l[0] > 0.0f ? dev::rcp_approx(l[0]) : 0.0f;
      inv_l[1] = l[1] > 0.0f ? dev::rcp_approx(l[1]) : 0.0f;
      write_stats(h, m, l);
    } else {
      const float* stats = at<float>(L.stats) + (static_cast<size_t>(h) * Cfg::kRows + slab * 16 + gq) * 2;
      float m[2], log_l[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        m[r] = stats[r * 16];
        log_l[r] = stats[r * 16 + 1] * kLog2e;
        inv_l[r] = 1.0f;
      }
#pragma unroll
      for (int n = 0; n < Cfg::kScoreN8; ++n) {
        if (n < n8_end) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float mm = m[e / 2] == -INFINITY ? 0.0f : m[e / 2];
            s[n][e] = dev::exp2_approx((s[n][e] - mm) * kLog2e - log_l[e / 2]);
          }
        }
      }
    }
    store_probs(s, masks, h, key0, n8_end, inv_l, true);
  }

  // The K tiles of one round (score_phase). kFull (the forward's one-segment shapes when the segment
  // fills every K tile: Nk 193..224): the unrolled loop holds no per-tile test. With the tests nvcc kept
  // the tiles' predicates packed in a register and re-tested them with LOP3s (static model, DeepViT-16b
  // plain affine forward: 21,007 -> 17,471 integer and 6,204 -> 5,604 control warp instructions per
  // block), at the cost of a second copy of the loop's code.
  template <bool kFull>
  REATTN_DEVICE void score_tiles(int round, int key0, int keys, int tiles, bool active,
                                 const uint32_t (&qf)[Cfg::kKSteps][4], float (&s)[Cfg::kScoreN8][4]) {
    if constexpr (kFull) tiles = Cfg::kKeyTiles;
#pragma unroll
    for (int t = 0; t < Cfg::kKeyTiles; ++t) {
      float (*st)[4] = &s[t * Cfg::kTileN8];
      if (kFull || t < tiles) {
        const int slot = begin_step();
        if (t + 1 < tiles || round + 1 < rounds) {
          const bool same = t + 1 < tiles;
          issue_keys(same ? round : round + 1, key0 + (same ? t + 1 : 0) * kKeyTile);
        }
        if (active) {
          // The tail segment of several (finish_round): n8 tiles 2 and 3 are left unfinished, which the
          // one-segment softmax (exact, a segment of at most 16 keys) would read.
          if (!Cfg::kBackward && !Cfg::kOneSegment && !exact && keys <= 16) {
            score_tile<2>(slot, group, qf, st);
            mask_keys_from<2>(st, 0, keys);
          } else {
            score_tile(slot, group, qf, st);
            if (t == tiles - 1 && keys % kKeyTile != 0) mask_keys_from(st, t * kKeyTile, keys);
          }
        }
      }
    }
  }

  // Score phase of one segment: every round's scores, softmax (or the sweep's statistics), P~ to
  // shared memory. K tile t of a round fills s[4t .. 4t + 3] (the tile loop is unrolled so s stays
  // in registers); in the last tile the keys past the segment (zero-filled K rows) get -inf, and
  // tiles past the segment's keys stay unwritten: every reader stops at the segment's tiles. (A
  // -inf fill of every score register before the tiles, under a run-time test, compiled to 112
  // FSEL per warp and round whatever the test said: static model, DeepViT-16b plain affine forward,
  // 2,688 of 14,571 fp32 warp instructions per block.)
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
      if (!Cfg::kBackward && Cfg::kOneSegment && tiles == Cfg::kKeyTiles) {
        score_tiles<true>(round, key0, keys, tiles, active, qf, s);
      } else {
        score_tiles<false>(round, key0, keys, tiles, active, qf, s);
      }
      // After the segment's last K tile (its step's barrier passed), the first V tile can take the
      // other slot while the softmax runs.
      if (round + 1 == rounds) issue_after_scores(seg);
      // The backward: the entries' key indices (masks, dropout) recomputed per round, not kept live
      // from the first round across the next rounds' products.
      if (active) finish_round(s, h, Cfg::kBackward ? dev::opaque(key0) : key0, keys, n8_end);
    }
  }

  // ---- mixing -------------------------------------------------------------------------------------
  // Per-head parameter rows in shared memory (L.vectors): c' (forward; c in the backward), out_scale
  // gamma, out_scale beta, column means of W' (LayerNorm's mean); backward only: the norm's mean and
  // 1/std (BatchNorm), e and f of dM = gamma' rstd dN + e xhat + f. Then two scalars. The backward with
  // BatchNorm keeps batch_coefficients' a, shift, ee, ff (mixing.cuh) in the rows of gamma, beta, e, f.
  enum VectorRow : int { kBias = 0, kGamma = 1, kBeta = 2, kColumnMean = 3, kMean = 4, kRstd = 5, kE = 6, kF = 7 };
  REATTN_DEVICE const float* vec_row(int row) const { return at<float>(L.vectors) + row * Cfg::kMaxHeads; }
  REATTN_DEVICE float bias_mean() const { return at<float>(L.vectors)[kVectorRows * Cfg::kMaxHeads]; }
  REATTN_DEVICE float inv_heads() const { return at<float>(L.vectors)[kVectorRows * Cfg::kMaxHeads + 1]; }

  using Mix = Mixer<E, kGroups, kHeads, Cfg::kMaxHeads>;

  // The lane's ldmatrix row address of head 0 in a [h][rows][row] buffer, for a 16-column chunk.
  REATTN_DEVICE const E* chunk_tile(size_t buffer, int row, int col) const {
    return at<E>(buffer) + (static_cast<size_t>(slab) * 16 + lane % 16) * row + col + (lane / 16) * 8;
  }

  // M of the warp's output heads at its 8 fragment entries of a 16-key chunk (column chunk_col of
  // the segment's P~), LayerNorm's mean over all heads, the owned heads' raw P~ (Mixer::mix).
  REATTN_DEVICE void mix_probs(int chunk_col, float (&acc)[kHeads][8], float (&mean)[8], uint32_t (&own)[kHeads][4],
                               bool with_mean, bool clamp) const {
    Mix::mix(chunk_tile(L.probs, L.p_row, chunk_col), static_cast<size_t>(Cfg::kRows) * L.p_row + kProbsPad, at<float>(L.weights),
             vec_row(kBias), vec_row(kColumnMean), bias_mean(), H, group, acc, mean, own, with_mean, clamp);
  }

  // Sums over the output heads of the slab's warps (Mixer::group_sum): region 0 (8 floats per lane)
  // and region 1 (16) never serve the same chunk twice.
  REATTN_DEVICE void slab_sum(float (&x)[8]) const {
    constexpr int kStride = Cfg::kBackward ? 24 : 8;
    Mix::group_sum(at<float>(L.exchange) + static_cast<size_t>(slab) * kGroups * 32 * kStride, kStride, 1 + slab,
                   group, lane, x);
  }
  REATTN_DEVICE void slab_sum2(float (&x)[8], float (&y)[8]) const {
    Mix::group_sum2(at<float>(L.exchange) + static_cast<size_t>(slab) * kGroups * 32 * 24 + 8, 24, 1 + slab, group,
                    lane, x, y);
  }

  // LayerNorm across heads: acc -= mean (every warp has it from W's column means), rstd from the
  // centered squares summed over the slab's warps.
  REATTN_DEVICE void layer_center(float (&acc)[kHeads][8], const float (&mean)[8], float (&rstd)[8]) const {
    Mix::center_heads(acc, mean, H, group, inv_heads(), static_cast<float>(p.eps),
                      [&](float (&part)[8]) { slab_sum(part); }, rstd);
  }

  REATTN_DEVICE static bool masked_entry(const uint32_t (&own)[4], int e) { return Mix::masked(own, e); }
  REATTN_DEVICE int entry_row(int e) const { return m0 + slab * 16 + gq + ((e / 2) % 2) * 8; }
  REATTN_DEVICE static int entry_col(int tq_, int e) { return 2 * tq_ + (e & 1) + (e / 4) * 8; }

  // ---- the forward's mixing phase ----------------------------------------------------------------------
  // One 16-key chunk: mix, normalize, O += A V for the warp's output heads.
  // key0: the chunk's first key; chunk_col: its column in the segment's P~.
  REATTN_DEVICE void mix_chunk(int slot, int key0, int chunk_col, float (&o)[kHeads][Cfg::kOutN8][4],
                               float (&moments)[kHeads][2]) {
    constexpr bool general = !Cfg::kPlain;
    const bool layer = this->layer();
    float acc[kHeads][8];
    float mean[8];
    uint32_t own[kHeads][4];
    mix_probs(chunk_col, acc, mean, own, layer, false);
    if (layer) {
      float rstd[8];
      layer_center(acc, mean, rstd);
      const float* gamma = vec_row(kGamma);
      const float* beta = vec_row(kBeta);
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        const int g = group + kGroups * j < H ? group + kGroups * j : 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = acc[j][e] * rstd[e] * gamma[g] + beta[g];
      }
    }
    // Entry e of the A fragment: row gq + 8 (e / 2 % 2), key 2 tq + e % 2 + 8 (e / 4).
    const E* values = slot_tile(slot);
    const bool count = counting();
    const int row0 = m0 + slab * 16 + gq;
    const bool edge = count && (key0 + kValueTile > Nk || row0 - gq + 16 > Nq);  // moments: entries past Nq / Nk
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      if (g >= H) continue;
      float a[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) a[e] = general && masked_entry(own[j], e) ? 0.0f : acc[j][e];
      if (count) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const bool in = !edge || (entry_row(e) < Nq && key0 + entry_col(tq, e) < Nk);
          const float x = in ? a[e] : 0.0f;
          moments[j][0] += x;
          moments[j][1] += x * x;
        }
      }
      const uint32_t af[4] = {Cv::pack(a[0], a[1]), Cv::pack(a[2], a[3]), Cv::pack(a[4], a[5]), Cv::pack(a[6], a[7])};
      add_av(values, g, af, o[j]);
    }
  }

  // o += A_g V_g for the chunk: A fragments af (the warp's 16 rows x 16 keys), V_g of the chunk's
  // tile in `values`.
  REATTN_DEVICE void add_av(const E* values, int g, const uint32_t (&af)[4], float (&o)[Cfg::kOutN8][4]) const {
    const E* tile = values + static_cast<size_t>(g) * kValueTile * kVRow;  // V [key][d]
    if constexpr (kNarrowTail) {  // o's last n8 tile stays 0: its columns are past D
      dev::mma_row_major(af, tile, kVRow, lane, reinterpret_cast<float(&)[Cfg::kOutN8 - 1][4]>(o));
    } else {
      dev::mma_row_major(af, tile, kVRow, lane, o);
    }
  }
  // add_av for each owned head j (head group + kGroups j) that exists, its A fragments by load(j, af). Where
  // every owned head exists (warp-uniform) the loads go first and no head is tested: a test per head left
  // a NOP after each head's last product (static model, LayerNorm forwards: DeepViT-16b 295.3 -> 294.6 us).
  template <class Load>
  REATTN_DEVICE void add_owned_av(const E* values, float (&o)[kHeads][Cfg::kOutN8][4], const Load& load) const {
    if (group + kGroups * (kHeads - 1) < H) {
      uint32_t af[kHeads][4];
#pragma unroll
      for (int j = 0; j < kHeads; ++j) load(j, af[j]);
#pragma unroll
      for (int j = 0; j < kHeads; ++j) add_av(values, group + kGroups * j, af[j], o[j]);
      return;
    }
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      if (group + kGroups * j >= H) continue;
      uint32_t af[4];
      load(j, af);
      add_av(values, group + kGroups * j, af, o[j]);
    }
  }

  // ---- the forward's mixing on tensor cores (kTensorMix) ----------------------------------------------
  // For one query row i and 8 keys, M[:, i, k] = W' P~[:, i, k] + c' is a 16 x 16 by 16 x 8 product
  // (output heads x input heads by input heads x keys). A = [W' | c'] (input head H holds c',
  // heads past it are zero: weight_fragments), B = P~ of heads 0 .. H - 1 at one row, read by
  // ldmatrix.trans from the [h][rows][p_row] tiles (8 heads' rows of 16 bytes, 16 bytes apart in
  // banks through the head padding), then a row of ones as head H (the bias), then head 0 again
  // (finite, times zero). W' is fp32: it enters as hi + lo, two bf16 operands whose sum carries 16
  // of its bits, so M is as exact as the fp32 multiply-adds it replaces (exact products, fp32
  // sums). Two products per 128 entries of M, against H multiply-adds per entry and owned head
  // plus the unpacking of P~.
  static_assert(!kTensorMix || Cfg::kMaxHeads < 16, "head H of the products holds the bias");

  // A fragments of [W' | c'] split as hi + lo (Mixer::weight_fragments).
  REATTN_DEVICE void weight_fragments(uint32_t (&hi)[4], uint32_t (&lo)[4]) const {
    Mix::weight_fragments(at<float>(L.weights), vec_row(kBias), H, gq, tq, hi, lo);
  }
  // The backward's W' (kTransposed: W'^T) fragments from the table load_parameters fills (kTensorGrad).
  template <bool kTransposed>
  REATTN_DEVICE void table_fragments(uint32_t (&hi)[4], uint32_t (&lo)[4]) const {
    Mix::template table_fragments<kTransposed>(at<uint32_t>(L.weights_t), lane, hi, lo);
  }
  // The row of ones that B reads as head H: 8 values past the last head's tile (tiles.h reserves them).
  REATTN_DEVICE E* ones_row() const { return at<E>(L.probs) + static_cast<size_t>(H) * (Cfg::kRows * L.p_row + kProbsPad); }

  // M of the slab's 16 rows over the chunk's 16 keys, written over P~ in place (the warps of the
  // slab split its rows; each overwrites only entries it has read), then O += A V for the warp's
  // output heads, their A fragments read back by ldmatrix. Rows past Nq and keys past the segment
  // hold finite values (P~ there is finite) that meet only zero rows of V or unwritten output rows.
  // With moments (training BatchNorm's one sweep), the sums of M^2 over the real entries of output
  // head gq (moments[0][1]) and gq + 8 (moments[1][1]), from the fp32 products; the sums of M are
  // exact without a sweep (write_moments), so moments[.][0] stay zero. kEdge (moments only): the chunk
  // has entries past Nq or Nk, which count 0. The caller picks the copy by a warp-uniform branch; with
  // one copy and a run-time test the edge arithmetic ran in every chunk (static model, DeiT-S: the
  // moments forward 99.4 us t_low with one copy, 89.5 with two; plain_affine 82.3).
  static constexpr int kMixRowsPerWarp = 16 / kGroups;
  static_assert(16 % kGroups == 0, "the slab's rows split over its warps");
  // ldmatrix.trans rows (Mixer::trans_lane). Up to 7 heads (kNarrow: heads 0 .. 7 hold every input
  // head and the ones) two rows per load and m16n8k8 products.
  static constexpr bool kMixNarrow = Cfg::kMaxHeads < 8;
  static constexpr int kMixRowsPerLoad = kMixNarrow ? 2 : 1;
  static_assert(kMixRowsPerWarp % kMixRowsPerLoad == 0, "whole loads per warp");

  // mix_lane's addresses, hidden from nvcc (dev::opaque), which else forms them again from the
  // thread index and P~'s run-time row size at every chunk (static model, DeepViT-16b plain
  // affine forward: ~5 integer instructions per ldmatrix row, ~3 per A fragment).
  REATTN_DEVICE MixLane make_mix_lane() const {
    E* probs = at<E>(L.probs);
    const int hs = Cfg::kRows * L.p_row + kProbsPad;  // head stride (elements)
    const int row0 = slab * 16 + group * kMixRowsPerWarp;
    // kTensorLayer: matrix m = lane / 8 is (input heads 8 (m / 2) .., keys 8 (m % 2) ..), so the load is
    // the product's A fragment in register order (mix_in_place_layer), and stmatrix's rows are the same.
    const auto lane_src = kTensorLayer && !kMixNarrow
                              ? typename Mix::TransLane{(lane / 16) * 8 + lane % 8, 0, (lane / 8) % 2}
                              : Mix::template trans_lane<kMixNarrow>(lane);
    const int hl = lane_src.head, row_of = lane_src.row, octet = lane_src.octet;
    const bool ones = hl == H;
    MixLane m;
    m.src = dev::smem_address(ones ? ones_row() : probs + (hl < H ? hl : 0) * hs + (row0 + row_of) * L.p_row + octet * 8);
    m.src_col = ones ? 0u : 2u;
    m.src_step = ones ? 0u : static_cast<uint32_t>(kMixRowsPerLoad * L.p_row * 2);
    m.dst = dev::smem_address(kTensorLayer ? probs + 2 * tq * hs + row0 * L.p_row + gq
                                           : probs + gq * hs + row0 * L.p_row + 2 * tq);
    m.row = static_cast<uint32_t>(L.p_row * 2);
    m.head8 = static_cast<uint32_t>(8 * hs * 2);
    m.a = dev::smem_address(chunk_tile(L.probs, L.p_row, 0) + group * hs);
    m.a_head = static_cast<uint32_t>(kGroups * hs * 2);
    m.head1 = static_cast<uint32_t>(hs * 2);
    // stmatrix's row for the lane: the load's own row where its head is real, else one scratch row
    // that stays (head 0's padding, which nothing reads), for what the products hold past H.
    const bool real = hl < H;
    m.out = dev::smem_address(real ? probs + hl * hs + (row0 + row_of) * L.p_row + octet * 8
                                   : probs + static_cast<size_t>(Cfg::kRows) * L.p_row);
    m.out_col = real ? 2u : 0u;
    m.out_step = real ? static_cast<uint32_t>(kMixRowsPerLoad * L.p_row * 2) : 0u;
    auto hide = [](uint32_t x) { return static_cast<uint32_t>(dev::opaque(static_cast<int>(x))); };
    MixLane h{hide(m.src), hide(m.src_col), hide(m.src_step), hide(m.dst), hide(m.row), hide(m.head8),
              hide(m.a),   hide(m.a_head)};
    if constexpr (kTensorLayer) {
      if (dev::has_stmatrix()) {
        h.out = hide(m.out);
        h.out_col = hide(m.out_col);
        h.out_step = hide(m.out_step);
      } else {
        h.head1 = hide(m.head1);
      }
    }
    return h;
  }

  template <bool kEdge>
  REATTN_DEVICE void mix_in_place(int slot, int key0, int chunk_col, float (&o)[kHeads][Cfg::kOutN8][4],
                                  const uint32_t (&whi)[4], const uint32_t (&wlo)[4],
                                  float (&moments)[kHeads][2]) const {
    static_assert(kHeads >= 2, "moments[0], moments[1]: heads gq and gq + 8");
    constexpr int kRowsPerWarp = kMixRowsPerWarp;
    constexpr bool kNarrow = kMixNarrow;
    constexpr int kRowsPerLoad = kMixRowsPerLoad;
    const int row0 = slab * 16 + group * kRowsPerWarp;
    // Addresses from mix_lane: shared addresses advanced by byte steps. Formed from element pointers
    // instead, each chunk costs ~11 more integer instructions per warp (static model, DeepViT-L-384
    // plain affine and moments forwards: 1004.8 against 1016.3 and 1017.3 against 1028.5 us t_high).
    const MixLane& ml = mix_lane;
    const uint32_t col = static_cast<uint32_t>(chunk_col);
    uint32_t src = ml.src + col * ml.src_col;
    uint32_t dst = ml.dst + 2 * col;  // C entries: head gq (+ 8), keys 2 tq, + 1
    // Head gq + 8's entries from an address of their own, advanced as dst is: formed as dst + head8 at
    // each store, they cost an IMAD per store (static model, DeepViT-L-384 plain affine forward, with the
    // segmented forward's kept kbase and vbase: 842.9 -> 838.3 us t_high; DeepViT-16b 273.8 -> 272.7).
    uint32_t dst8 = dst + ml.head8;
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    constexpr bool kCount = Cfg::kVariant == kPlainMoments;
    static_assert(kCount || !kEdge, "edges matter to the moments only");
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; r += kRowsPerLoad) {
      uint32_t pb[4];
      dev::ldmatrix_x4_trans_at(pb, src);
#pragma unroll
      for (int t = 0; t < 2 * kRowsPerLoad; ++t) {  // tiles: (row r + t / 2, octet t % 2)
        float d[4];
        Mix::template split_product<kNarrow>(d, whi, wlo, pb, t, zero);
        if constexpr (kCount) {  // rows of W' past H are zero: so are their d
          constexpr int kValues = Cfg::kMaxHeads > 8 ? 4 : 2;
          if constexpr (!kEdge) {
#pragma unroll
            for (int e = 0; e < kValues; ++e) moments[e / 2][1] += d[e] * d[e];
          } else {  // the last chunk of a row or a slab past Nq: entries past Nq / Nk count 0
            const bool row_in = m0 + row0 + r + t / 2 < Nq;
            const int keys_left = Nk - (key0 + (t % 2) * 8 + 2 * tq);
#pragma unroll
            for (int e = 0; e < kValues; ++e) {
              const float x = row_in && e % 2 < keys_left ? d[e] : 0.0f;
              moments[e / 2][1] += x * x;
            }
          }
        }
        const uint32_t at_t = (t / 2) * ml.row + (t % 2) * 16;  // from dst (head gq) and dst8 (gq + 8)
        if (gq < H) dev::store_shared_b32(dst + at_t, Cv::pack(d[0], d[1]));
        if constexpr (Cfg::kMaxHeads > 8) {
          if (gq + 8 < H) dev::store_shared_b32(dst8 + at_t, Cv::pack(d[2], d[3]));
        }
      }
      src += ml.src_step;
      dst += kRowsPerLoad * ml.row;
      dst8 += kRowsPerLoad * ml.row;
    }
    Mix::slab_barrier(slab);  // M of the slab's every row
    const uint32_t mixed = ml.a + 2 * col;
    add_owned_av(slot_tile(slot), o, [&](int j, uint32_t (&af)[4]) { dev::ldmatrix_x4_at(af, mixed + j * ml.a_head); });
  }

  // ---- LayerNorm's tensor-core mixing (kTensorLayer) -----------------------------------------------
  // Per query row i and 16 keys, (M - mean)[:, i, keys]^T = P~[:, i, keys]^T [W' - 1 m^T | c' - mean(c')]^T
  // (m: the column means of W', so each output head's weights less their mean over the heads) is a
  // 16 x 16 by 16 x 8 product per 8 output heads: keys x input heads by input heads x output heads.
  // Its A is one ldmatrix.trans of P~ (16 keys of every input head, and the ones of head H) with the
  // lanes' rows ordered as the fragment's registers (make_mix_lane); its B, the A fragments of those
  // centered weights split as hi + lo (rows gq of output heads 0..7: hi[0], hi[2]; of 8..15: hi[1],
  // hi[3]; at most 7 heads, k = 8: hi[0] alone, one tile of output heads, two rows per load). A
  // thread's C entries are 2 keys (gq, gq + 8) x 4 output heads (2 tq, 2 tq + 1, + 8; narrow: 2), M
  // already less its mean over the heads (products exact, fp32 sums: as exact as M itself; output
  // heads past H are 0), so LayerNorm's variance is a sum of squares within the thread and its quad
  // (2 shuffle levels), with no test for heads past H. A / s = xhat + beta' / s (below) goes back
  // over P~ in 16 bits by one stmatrix.trans per row (narrow: per two rows; sm_90; 16-bit stores per
  // entry before it). Per row and 16 keys (wide): 4 products, 8 + 16 fp32 multiply-adds, 3 shuffles,
  // one reciprocal square root per lane, against 16 H multiply-adds per owned head for the mixing and
  // the slab's exchange of partial sums through shared memory (static model, LayerNorm forward
  // kernel, sm_90, H100: ViT-B 129.7-545.0 us -> 82.9-446.3, DeiT-S 108.7-458.9 -> 82.6-420.6).
  //
  // gamma' = out_scale gamma comes out of the entries: A = s (xhat + beta' / s) with s = layer_scale(g),
  // so each entry takes one multiply-add (xhat + beta' / s, stored in 16 bits) and O = s ((A / s) V) is
  // scaled once per output head at the end (scale_by_layer). The 16-bit rounding of xhat + beta' / s
  // is relative to |A| / |s|: the same error in O as rounding A itself (static model, LayerNorm
  // forwards: DeepViT-16b 300.0 -> 297.8 us, DeiT-S 420.8 -> 419.2, ViT-B 445.8 -> 444.3).
  struct LayerLane {
    float shift[2][2];  // beta' / s of output head 8 t + 2 tq + e
    float inv_h, eps;
  };

  // s for a head with gamma' = out_scale gamma and beta' = out_scale beta: gamma' with its magnitude
  // raised to at least 2^-24 |beta'| (and 2^-64), so beta' / s stays within 2^24 and is finite for
  // gamma' = 0. Where raised, A = gamma' xhat + beta' is beta' to within 2^-24 |beta'| sqrt(H)
  // (|xhat| <= sqrt(H)): below the 16-bit rounding of A. load_parameters keeps s and beta' / s in the
  // gamma and beta rows.
  REATTN_DEVICE static float layer_scale(float gamma, float beta) {
    const float floor = fmaxf(fabsf(beta) * 0x1p-24f, 0x1p-64f);
    return fabsf(gamma) >= floor ? gamma : copysignf(floor, gamma);
  }

  // O of each owned head times s (the LayerNorm forward's factored gamma': layer_fragments).
  REATTN_DEVICE void scale_by_layer(float (&o)[kHeads][Cfg::kOutN8][4]) const {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      const float s = g < H ? vec_row(kGamma)[g] : 0.0f;
#pragma unroll
      for (int n = 0; n < Cfg::kOutN8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][n][e] *= s;
      }
    }
  }

  REATTN_DEVICE void layer_fragments(uint32_t (&hi)[4], uint32_t (&lo)[4], LayerLane& ln) const {
    const float* weights = at<float>(L.weights);
    const float* bias = vec_row(kBias);
    const float* column_mean = vec_row(kColumnMean);
    const float mean_of_bias = bias_mean();
    Mix::template split_fragments<false>(gq, tq, hi, lo, [&](int g, int h) {
      if (g >= H || h > H) return 0.0f;
      return h < H ? weights[(h * kGroups + g % kGroups) * kHeadsPad + g / kGroups] - column_mean[h]
                   : bias[g] - mean_of_bias;
    });
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int g = 8 * t + 2 * tq + e;
        ln.shift[t][e] = g < H ? vec_row(kBeta)[g] : 0.0f;  // beta' / s (load_parameters)
      }
    }
    ln.inv_h = inv_heads();
    ln.eps = static_cast<float>(p.eps);
  }

  // A of the slab's 16 rows over the chunk's 16 keys, written over P~ in place (each warp its rows,
  // as mix_in_place), then O += (A / s) V for the warp's output heads. A = out_scale (gamma xhat +
  // beta), xhat = (M - mean) rstd across the H heads of each entry, rstd from the centered squares. Rows past
  // Nq and keys past the segment hold finite values (P~ there is finite; eps keeps rstd finite) that
  // meet only zero rows of V or unwritten output rows.
  REATTN_DEVICE void mix_in_place_layer(int slot, int chunk_col, float (&o)[kHeads][Cfg::kOutN8][4],
                                        const uint32_t (&whi)[4], const uint32_t (&wlo)[4],
                                        const LayerLane& ln) const {
    // Narrow (at most 7 heads): k = 8 input heads (the ones at H <= 7), one tile of 8 output heads, and
    // each load holds two rows (matrices (row m / 2, keys 8 (m % 2) ..)), so one stmatrix stores both.
    constexpr bool kNarrow = kMixNarrow;
    constexpr int kTiles = kNarrow ? 1 : 2, kRowsPerLoad = kMixRowsPerLoad;
    const MixLane& ml = mix_lane;
    const uint32_t col = static_cast<uint32_t>(chunk_col);
    const bool matrix_store = dev::has_stmatrix();  // compile-time on the GPU
    uint32_t src = ml.src + col * ml.src_col;
    uint32_t out = ml.out + col * ml.out_col;  // stmatrix: the lane's row
    uint32_t dst = ml.dst + 2 * col;           // else: key gq, head 2 tq of the warp's first row
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const bool odd = tq & 1;
    // Wide: two loads per step, both read before either row's stmatrix: a load after a store to shared
    // memory waits for it (ptxas cannot tell they do not overlap), so one row per step left the
    // products' latency to NOPs (static model, DeepViT-16b LayerNorm forward: 832 per block, 295.4 ->
    // 294.6 us).
    constexpr int kLoads = !kNarrow && kMixRowsPerWarp % 2 == 0 ? 2 : 1;
#pragma unroll
    for (int r = 0; r < kMixRowsPerWarp; r += kRowsPerLoad * kLoads) {
      // Wide: A (keys x input heads) = (keys gq, heads 2 tq), (gq + 8, 2 tq), (gq, 2 tq + 8), (gq + 8, 2 tq + 8).
      // Narrow: row u's A = pb[2 u] (keys gq, heads 2 tq), pb[2 u + 1] (keys gq + 8).
      uint32_t pb[kLoads][4];
#pragma unroll
      for (int l = 0; l < kLoads; ++l) dev::ldmatrix_x4_trans_at(pb[l], src + l * ml.src_step);
      uint32_t packed[kLoads][4];  // stmatrix's matrices: wide [2 t + k], narrow [2 u + k] (k: keys 8 k ..)
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
#pragma unroll
        for (int u = 0; u < kRowsPerLoad; ++u) {
          float c[kTiles][4];  // M - mean: [heads 8 t ..][(key gq, head 2 tq), (gq, 2 tq + 1), (gq + 8, 2 tq), (gq + 8, 2 tq + 1)]
          float sq[2] = {0.0f, 0.0f}, rstd[2];  // the thread's centered squares of key gq, gq + 8
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            Mix::template centered_tile<kNarrow>(pb[l], u, t, whi, wlo, zero, c[t]);
#pragma unroll
            for (int e = 0; e < 4; ++e) sq[e / 2] += c[t][e] * c[t][e];
          }
          Mix::pair_rstd(sq, ln.inv_h, ln.eps, odd, rstd);
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              packed[l][kNarrow ? 2 * u + k : 2 * t + k] =
                  Cv::pack(c[t][2 * k] * rstd[k] + ln.shift[t][0], c[t][2 * k + 1] * rstd[k] + ln.shift[t][1]);
            }
          }
          if (!matrix_store) {
#pragma unroll
            for (int t = 0; t < kTiles; ++t) {
              const uint32_t at_t = dst + (l * kRowsPerLoad + u) * ml.row + t * ml.head8;
              const uint32_t w0 = packed[l][kNarrow ? 2 * u : 2 * t], w1 = packed[l][kNarrow ? 2 * u + 1 : 2 * t + 1];
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                if (8 * t + 2 * tq + e < H) {
                  dev::store_shared_b16(at_t + e * ml.head1, w0 >> (16 * e));
                  dev::store_shared_b16(at_t + e * ml.head1 + 16, w1 >> (16 * e));
                }
              }
            }
          }
        }
      }
      if (matrix_store) {  // stored rows: heads (lane's head, row)
#pragma unroll
        for (int l = 0; l < kLoads; ++l) dev::stmatrix_x4_trans_at(out + l * ml.out_step, packed[l]);
      }
      src += kLoads * ml.src_step;
      out += kLoads * ml.out_step;
      dst += kLoads * kRowsPerLoad * ml.row;
    }
    Mix::slab_barrier(slab);  // A of the slab's every row
    const uint32_t mixed = ml.a + 2 * col;
    add_owned_av(slot_tile(slot), o, [&](int j, uint32_t (&af)[4]) { dev::ldmatrix_x4_at(af, mixed + j * ml.a_head); });
  }

  // ---- parameters --------------------------------------------------------------------------------------
  // The fold (fp32): W' [H][H] row-major (g, h), then per-head rows: forward c', out_scale gamma,
  // out_scale beta; backward c, gamma', beta', mean, rstd, e, f (parameters.cuh, fold_parameters),
  // formed in P~'s buffer (nothing writes P~ before the score phase's first barrier; at most
  // 4 (32 + 7) bytes per head against P~'s 16 rows of at least 16 keys, 512 bytes), then copied into
  // the layouts the programs read.
  REATTN_DEVICE void load_parameters() {
    float* f = at<float>(L.probs);
    fold_parameters<Cfg::kBackward>(p.fold, f, dev::thread_index(), Cfg::kThreads);
    dev::sync_threads();
    float* weights = at<float>(L.weights);
    float* weights_t = Cfg::kBackward ? at<float>(L.weights_t) : nullptr;
    float* vec = at<float>(L.vectors);
    constexpr int mh = Cfg::kMaxHeads;
    constexpr int kRows = Cfg::kBackward ? 7 : 3;  // per-head rows after W'
    for (int i = dev::thread_index(); i < mh * kGroups * kHeadsPad; i += Cfg::kThreads) {
      const int j = i % kHeadsPad, r = (i / kHeadsPad) % kGroups, a = i / (kHeadsPad * kGroups);
      const int b_ = r + kGroups * j;  // the warp-owned head of slot (r, j); a: the other head
      const bool ok = j < kHeads && b_ < H && a < H;
      weights[i] = ok ? f[b_ * H + a] : 0.0f;  // [h = a][group r][j]: W'[g_j][h]
      if (Cfg::kBackward && !kTensorGrad) weights_t[i] = ok ? f[a * H + b_] : 0.0f;  // [g = a][group r][j]: W'[g][h_j]
    }
    if constexpr (kTensorGrad) Mix::fill_fragment_table(f, H, dev::thread_index(), reinterpret_cast<uint32_t*>(weights_t));
    if constexpr (kLayerGrad) Mix::fill_layer_table(f, H, dev::thread_index(), at<uint32_t>(L.weights_t) + kLayerTable);
    if constexpr (kTensorBatch && !kLayerGrad) {  // the second warp, beside the first's fragment table
      if (p.norm == kNormBatch) Mix::fill_batch_table(f, H, dev::thread_index() - 32, at<uint32_t>(L.weights_t) + kLayerTable);
    }
    for (int i = dev::thread_index(); i < kVectorRows * mh + 2; i += Cfg::kThreads) {
      const int row = i / mh, h = i % mh;
      float v = 0.0f;
      if (row == kColumnMean && h < H) {  // column mean of W' (LayerNorm's mean of M)
        for (int g = 0; g < H; ++g) v += f[g * H + h];
        v /= H;
      } else if (row < kVectorRows && h < H) {
        const int from = row < kColumnMean ? row : row - 1;  // the folded rows skip the column means
        if (from < kRows) v = f[H * H + from * H + h];
        if (kTensorLayer && (row == kGamma || row == kBeta)) {  // s and beta' / s (layer_scale)
          const float beta = f[H * H + 2 * H + h], scale = layer_scale(f[H * H + H + h], beta);
          v = row == kGamma ? scale : beta / scale;
        }
        if (row == kRstd && from >= kRows) v = 1.0f;
        if (Cfg::kBackward && p.norm == kNormBatch && (row == kGamma || row == kBeta || row == kE || row == kF)) {
          const BatchCoefficients b = batch_coefficients(f, H, h, kTensorBatch);
          v = row == kGamma ? b.a : row == kBeta ? b.shift : row == kE ? b.ee : b.ff;
        }
        // Training BatchNorm where M mixes on tensor cores (M - c): the per-thread mixing of the
        // segmented pass's second sweep gives M - c too (c's row 0), and the mean's row holds mean - c
        // (batch_shift).
        if (kTensorBatch && p.norm == kNormBatch && row == kBias) v = 0.0f;
        if (kTensorBatch && p.norm == kNormBatch && row == kMean) v -= f[H * H + h];
      } else if (i == kVectorRows * mh) {  // the mean of c'
        for (int g = 0; g < H; ++g) v += f[H * H + g];
        v /= H;
      } else if (i == kVectorRows * mh + 1) {
        v = 1.0f / H;
      }
      vec[i] = v;
    }
  }

  REATTN_DEVICE void write_output(const float (&o)[kHeads][Cfg::kOutN8][4]) const {
    write_rows(o, p.out, p.o_st, p.out_is_acc);
  }

  // f(j, r, at_row) for each owned head j (group + kGroups j) and fragment row r (gq + 8 r) that exist,
  // at_row the row's element offset in a [B, H, Nq, D] tensor of strides st.
  template <class F>
  REATTN_DEVICE void for_each_row(const Strides4& st, F&& f) const {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      if (g >= H || !slab_active) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + slab * 16 + gq + r * 8;
        if (row >= Nq) continue;
        f(j, r, b * st.b + g * st.h + static_cast<int64_t>(row) * st.n);
      }
    }
  }

  // Accumulators o[j] of head group + groups j, fragment layout, to a [B, H, Nq, D] output (T or fp32;
  // 16-bit rows by store_fragment_row, paired or not for all rows alike). Past the narrow tail's 5 n8
  // tiles the columns are past D.
  REATTN_DEVICE void write_rows(const float (&o)[kHeads][Cfg::kOutN8][4], void* dst, const Strides4& st,
                                bool fp32) const {
    constexpr int kStoredN8 = kNarrowTail ? Cfg::kOutN8 - 1 : Cfg::kOutN8;
    if (!fp32) {
      with_rows_paired(dst, st, [&](auto paired) {
        for_each_row(st, [&](int j, int r, int64_t at_row) {
          store_fragment_row<E, kStoredN8, 8 * kStoredN8>(static_cast<E*>(dst) + at_row,
                                                          reinterpret_cast<const float(&)[kStoredN8][4]>(o[j]), r,
                                                          tq, d0, D, st.d, decltype(paired)::value);
        });
      });
      return;
    }
    for_each_row(st, [&](int j, int r, int64_t at_row) {
      float* out = static_cast<float*>(dst) + at_row;
      if (st.d == 1 && reinterpret_cast<uintptr_t>(out) % 8 == 0 && d0 + Cfg::kDOut <= D) {  // 8-byte pairs
#pragma unroll
        for (int n = 0; n < Cfg::kOutN8; ++n) {
          dev::store_8(out + d0 + n * 8 + 2 * tq, dev::bits(o[j][n][2 * r]), dev::bits(o[j][n][2 * r + 1]));
        }
        return;
      }
#pragma unroll
      for (int n = 0; n < Cfg::kOutN8; ++n) {
        const int d = d0 + n * 8 + 2 * tq;
        if (d < D) out[d * st.d] = o[j][n][2 * r];
        if (d + 1 < D) out[(d + 1) * st.d] = o[j][n][2 * r + 1];
      }
    });
  }

  // Per-program moment sums [2][H] (float64) at moments + program * 2H: this warp's sums reduced
  // over its lanes, then over the slabs (tensor-core mixing: over the quad, then over every warp;
  // each warp has mixed every head of its rows).
  // Tensor-core mixing (the plain variant: no mask, no dropout) forms the sum of M = W' P~ + c' over
  // the program's entries without summing them: every row of P sums to one over the keys, so it is
  // R (sum_h W'[g][h] + Nk c'_g) for R real rows, in float64 from the folded fp32 values. That is
  // the exact sum of what the reference computes; the summed fp32 products would add the rounding of
  // P~ (each row of the 16-bit P~ sums to one within ~2^-9), which no eager or float64 map has.
  REATTN_DEVICE void write_moments(float (&moments)[kHeads][2]) {
    constexpr int mh = Cfg::kMaxHeads;
    // Tensor-core mixing: moments[0], [1] hold heads gq, gq + 8 of every row the warp mixed, and
    // the [warps][2][max_heads] partials go to P~'s buffer (L.moments holds [warps][2][heads]) once
    // every warp is done reading it (they fit: one head's tile alone is rows x p_row >= 32 x 24
    // 16-bit values, 1,536 B; the partials take at most 8 x 2 x 15 floats, 960 B).
    float* part = at<float>(kTensorMix ? L.probs : L.moments);
    if constexpr (kTensorMix) {
      dev::sync_threads();
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float v = moments[half][1];
        v += dev::shfl_xor(v, 1);
        v += dev::shfl_xor(v, 2);
        const int g = gq + 8 * half;
        if (tq == 0 && g < mh) part[(warp * 2 + 1) * mh + g] = v;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          float v = moments[j][k];
          for (int off = 16; off > 0; off /= 2) v += dev::shfl_xor(v, off);
          if (lane == 0) part[(warp * 2 + k) * kHeads + j] = v;
        }
      }
    }
    dev::sync_threads();
    if (dev::block_index_y() != 0) return;
    double* out = p.moments + static_cast<int64_t>(dev::block_index_x()) * 2 * H;
    for (int i = dev::thread_index(); i < 2 * H; i += Cfg::kThreads) {
      const int k = i / H, g = i % H;
      double sum = 0.0;
      if constexpr (kTensorMix) {
        if (k == 0) {  // the folded W' and c' (load_parameters' copies)
          const float* weights = at<float>(L.weights);
          double row = static_cast<double>(vec_row(kBias)[g]) * Nk;
          for (int h = 0; h < H; ++h) row += weights[(h * kGroups + g % kGroups) * kHeadsPad + g / kGroups];
          sum = row * (Nq - m0 < Cfg::kRows ? Nq - m0 : Cfg::kRows);
        } else {
          for (int w = 0; w < Cfg::kWarps; ++w) sum += part[(w * 2 + 1) * mh + g];
        }
      } else {
        for (int s = 0; s < kSlabs; ++s) sum += part[((s * kGroups + g % kGroups) * 2 + k) * kHeads + g / kGroups];
      }
      out[i] = sum;
    }
  }

  // ---- U = sum_j V_j (training BatchNorm's one sweep without a mask: p.value_sums) --------------------
  // Every row block of a batch element streams every value chunk; row block r sums the chunks c with
  // c % row blocks == r over its head-dim columns. A thread owns the same column pairs in every chunk,
  // so its running sums sit in shared memory (L.exchange: only LayerNorm uses it) with no barrier
  // between its adds and its final store. Per summed chunk and thread: H d_out / (2 threads) pairs of
  // 16 loads and 32 adds, against the 2-byte read of every element of V that torch's sum would add
  // (DeiT-S: 38.7 MB); the blocks' rows are summed by the host ([B, H, row blocks, D], small).
  // The segmented shapes (DeepViT-L-384) in the plain moments variant only: with the statistics sweep in
  // their programs the sums' code in the chunk loop cost more issue slots (~4% more integer
  // instructions at 225 registers, static model) than the 17.7 MB read of V it saves; with the
  // statistics kernel's rows read instead they are bound by shared-memory traffic, and the sums take
  // torch's pass over V off the call (static model, H100, DeepViT-L-384 training-BatchNorm forward:
  // -4.4 us t_low, +2.4 t_high: the forward's +7.3 and the finish's +2.4 against the sum's 7.3).
  static constexpr bool kValueSums =
      !Cfg::kBackward && (Cfg::kVariant == kPlainMoments || (Cfg::kOneSegment && Cfg::kVariant == kGeneral));
  static_assert(!kValueSums || (kGroups > 1 && Cfg::kMaxHeads * Cfg::kDOut <= kSlabs * kGroups * 32 * 8 &&
                                Cfg::kDOut % 2 == 0),
                "U's sums live in the forward's exchange region, in column pairs");
  REATTN_DEVICE bool summing_values() const {
    if constexpr (kValueSums) {
      return p.value_sums != nullptr;
    } else {
      return false;
    }
  }
  REATTN_DEVICE int row_blocks() const { return (Nq + Cfg::kRows - 1) / Cfg::kRows; }

  REATTN_DEVICE void clear_value_sums() const {
    float* u = at<float>(L.exchange);
    for (int i = dev::thread_index(); i < H * Cfg::kDOut; i += Cfg::kThreads) u[i] = 0.0f;
  }

  // The chunk in `slot` (every head, 16 keys, the program's d_out columns; zeros past Nk and D).
  REATTN_DEVICE void add_value_sums(int slot) const {
    constexpr int kPairs = Cfg::kDOut / 2;
    const E* values = slot_tile(slot);
    float* u = at<float>(L.exchange);
    for (int i = dev::thread_index(); i < H * kPairs; i += Cfg::kThreads) {
      const int h = i / kPairs, d = 2 * (i - h * kPairs);
      const E* column = values + static_cast<size_t>(h) * kValueTile * kVRow + d;
      float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
      for (int k = 0; k < kValueTile; ++k) {
        const uint32_t w = *reinterpret_cast<const uint32_t*>(column + k * kVRow);
        s0 += Cv::low(w);
        s1 += Cv::high(w);
      }
      u[2 * i] += s0;
      u[2 * i + 1] += s1;
    }
  }

  REATTN_DEVICE void write_value_sums() const {
    constexpr int kPairs = Cfg::kDOut / 2;
    const int blocks = row_blocks(), block = m0 / Cfg::kRows;
    const float* u = at<float>(L.exchange);
    for (int i = dev::thread_index(); i < H * kPairs; i += Cfg::kThreads) {
      const int h = i / kPairs, d = 2 * (i - h * kPairs);
      float* out = p.value_sums + ((b * H + h) * blocks + block) * static_cast<int64_t>(D) + d0 + d;
      if (d0 + d < D) out[0] = u[2 * i];
      if (d0 + d + 1 < D) out[1] = u[2 * i + 1];
    }
  }

  // The tensor-core mixing's W' fragments, and LayerNorm's lane constants: from the parameters in shared
  // memory, the same in every key segment, so formed once per program. Per segment, the segmented
  // LayerNorm forward spent 189 warp instructions on them per warp and segment, 15,120 of ~246,000 per
  // block (static model, H100, DeepViT-L-384: LayerNorm forward 830.9 -> 813.5 us t_high, plain affine
  // 790.6 -> 781.2).
  struct MixFragments {
    uint32_t whi[4], wlo[4];
    LayerLane ln;
  };
  REATTN_DEVICE void mix_fragments(MixFragments& f) const {
    if constexpr (kTensorLayer) {
      layer_fragments(f.whi, f.wlo, f.ln);
    } else if constexpr (kTensorMix) {
      weight_fragments(f.whi, f.wlo);
    }
  }

  REATTN_DEVICE void mixing_phase(int seg, const MixFragments& f, float (&o)[kHeads][Cfg::kOutN8][4],
                                  float (&moments)[kHeads][2]) {
    const int chunks = value_tiles(seg_len(seg));
    const uint32_t (&whi)[4] = f.whi;
    const uint32_t (&wlo)[4] = f.wlo;
    const LayerLane& ln = f.ln;
    for (int c = 0; c < chunks; ++c) {
      const int slot = begin_step();
      if (c + 1 < chunks) {
        issue_values(seg_start(seg) + (c + 1) * kValueTile);
      } else {
        issue_after_values(seg);
      }
      if (summing_values()) {
        // Chunk n (over the segments) is this block's when n % row blocks == its row block: a countdown,
        // not a division by the run-time row-block count per chunk.
        if (value_turn == 0) {
          add_value_sums(slot);
          value_turn = row_blocks();
        }
        --value_turn;
      }
      if (slab_active) {
        if constexpr (kTensorLayer) {
          mix_in_place_layer(slot, c * kValueTile, o, whi, wlo, ln);
        } else if constexpr (kTensorMix) {
          const int key0 = seg_start(seg) + c * kValueTile;
          if constexpr (Cfg::kVariant == kPlainMoments) {
            if (key0 + kValueTile > Nk || m0 + slab * 16 + 16 > Nq) {  // entries past Nq / Nk: warp-uniform
              mix_in_place<true>(slot, key0, c * kValueTile, o, whi, wlo, moments);
            } else {
              mix_in_place<false>(slot, key0, c * kValueTile, o, whi, wlo, moments);
            }
          } else {
            mix_in_place<false>(slot, key0, c * kValueTile, o, whi, wlo, moments);
          }
        } else {
          mix_chunk(slot, seg_start(seg) + c * kValueTile, c * kValueTile, o, moments);
        }
      }
    }
  }

  REATTN_DEVICE static void clear(float (&o)[kHeads][Cfg::kOutN8][4]) {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
#pragma unroll
      for (int n = 0; n < Cfg::kOutN8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][n][e] = 0.0f;
      }
    }
  }

  REATTN_DEVICE void run_forward() {
    load_parameters();
    if constexpr (kTensorMix) {
      // The ones of head H, which the mixing's products read as the bias's input (ones_row): once per
      // program, before the first barrier past the parameters (nothing else writes there, and the fold's
      // scratch at the start of P~'s buffer, 4 (H^2 + 3 H) bytes, ends before them). Written per key
      // segment, they cost ~8 warp instructions per warp and segment.
      if (dev::thread_index() < 8) ones_row()[dev::thread_index()] = E{Cv::from_float(1.0f)};
    }
    if constexpr (kQueriesShared) {  // a cp.async group of its own, before the first K tile's
      stage_rows(L.queries, p.q, p.q_st, vector() && !p.q_by_element);
      dev::cp_async_commit();
    }
    zero_ring_columns();
    issue_keys(0, 0);
    if constexpr (kQueriesShared) {  // q landed (the K tile may still fly), for every warp
      dev::cp_async_wait<1>();
      dev::sync_threads();
    }
    float o[kHeads][Cfg::kOutN8][4];
    float moments[kHeads][2];
#pragma unroll
    for (int j = 0; j < kHeads; ++j) moments[j][0] = moments[j][1] = 0.0f;
    if (summing_values()) {
      clear_value_sums();
      value_turn = m0 / Cfg::kRows;  // chunks until this row block's first
    }
    MixFragments f;
    if constexpr (Cfg::kOneSegment) {
      score_phase(0);
      clear(o);
      mix_fragments(f);
      mixing_phase(0, f, o, moments);
    } else {
      if (!exact) {
        // The plain programs read given statistics: ops.cpp launches the statistics kernel (statistics.cuh)
        // before them, which reads each head's keys once per 128 query rows, where this sweep reads every
        // head's once per program of 32.
        if (Cfg::kPlain && p.stats_is_input) {
          load_statistics();
        } else {
          statistics_sweep();
        }
      }
      clear(o);
      mix_fragments(f);  // the parameters are in shared memory since the barrier after q's copy
      for (int seg = 0; seg < segments; ++seg) {
        score_phase(seg);
        mixing_phase(seg, f, o, moments);
      }
    }
    dev::cp_async_wait<0>();
    if constexpr (kTensorLayer) scale_by_layer(o);
    write_output(o);
    if (counting()) write_moments(moments);
    if (summing_values()) write_value_sums();
  }

  // ================================ backward: the row pass ================================================
  // Given the forward's row statistics, per program (batch element b, the block's query rows, every
  // head), with P~ of a key segment in shared memory as in the forward except that dropped entries
  // keep -P (sign bit set; exactly -0 still means masked). One segment (Nk <= keys): the score
  // phase runs once and both sweeps read its P~; segments of 64 keys (longer rows): each sweep
  // recomputes each segment's P~ from the given statistics before its chunks (one more q.k product
  // and exponential per entry, for a P~ buffer of 64 keys):
  //
  //   sweep 1, per 16-key chunk: the warps as output-head owners recompute M where the norm needs
  //     it, dA = dO V^T on tensor cores (dO A-fragments in registers, or by ldmatrix from shared
  //     memory with several segments; V^T B-fragments by ldmatrix),
  //     dN = dA where attended, dM by the norm's backward (LayerNorm: two sums across the slab's
  //     warps; its own bf16 variant instead has each warp form them per row from dN in shared memory,
  //     grad_mixed_layer), the parameter-gradient partials (dW, dc, dgamma, dbeta) in registers, and dM (16-bit)
  //     to shared memory; after a barrier, as input-head owners, dP' = W'^T dM (W' carries
  //     1 / (1 - p)) and D_h,i += sum_j P~' dP' (P~' the stored value clamped at 0).
  //   sweep 2: dM again, then dS = P (Z dP' - D) (P = |stored|, Z = stored >= 0) and
  //     dQ += scale dS K on tensor cores (K chunk tiles by ldmatrix .trans), dQ in registers.
  // D goes to global memory for the key pass (keys.cuh), which computes dK and dV without atomics;
  // the parameter-gradient partials go to [programs][H H + 3 H] (fp32; the host adds them in fp64).
  // stats_only (training BatchNorm's backward sums): sweep 1's sums of dN xhat and dN only.

  REATTN_DEVICE void load_grads(uint32_t (&df)[kHeads][Cfg::kKSteps][4]) const {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      load_row_fragments(p.grad_out, p.do_st, g < H ? g : 0, df[j]);
      if (g >= H) {
#pragma unroll
        for (int kk = 0; kk < Cfg::kKSteps; ++kk) df[j][kk][0] = df[j][kk][1] = df[j][kk][2] = df[j][kk][3] = 0u;
      }
    }
  }

  // dO of the block's rows in shared memory (several segments: the registers go to the score
  // phase and the accumulators) or in registers (one segment: df, loaded once).
  static constexpr bool kGradsShared = Cfg::kBackward && !Cfg::kOneSegment;

  // The lane's ldmatrix row of dO (in shared memory: several segments) of output head group + groups j
  // (staged_row; grad_fragment).
  REATTN_DEVICE uint32_t grad_row(int j) const {
    const int g = group + kGroups * j < H ? group + kGroups * j : 0;  // heads past H: dN is zeroed
    return staged_row(L.grads, g);
  }
  // A fragment (the warp's 16 rows x head dims 16 kk ..) of dO of output head group + groups j; `row`:
  // grad_row(j) (read with dO in shared memory only).
  REATTN_DEVICE void grad_fragment(const uint32_t (&df)[kHeads][Cfg::kKSteps][4], int j, int kk, uint32_t row,
                                   uint32_t (&a)[4]) const {
    if constexpr (kGradsShared) {
      dev::ldmatrix_x4_at(a, row + kk * 32);
    } else {
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = df[j][kk][r];
    }
  }

  // The forward's (m, log l) of the block's rows, every head, into shared memory.
  REATTN_DEVICE void load_given_stats() const {
    float* st = at<float>(L.stats);
    const float* in = static_cast<const float*>(p.lse);
    for (int i = dev::thread_index(); i < H * Cfg::kRows; i += Cfg::kThreads) {
      const int h = i / Cfg::kRows, r = i % Cfg::kRows, row = m0 + r;
      const bool ok = row < Nq;
      const int64_t at_row = ((b * H + h) * static_cast<int64_t>(Nq) + (ok ? row : 0)) * 2;
      st[2 * i] = ok ? in[at_row] : 0.0f;
      st[2 * i + 1] = ok ? in[at_row + 1] : 0.0f;
    }
  }

  // A chunk tile of 16 keys, every head: V [H][16][k_row] (both sweeps) or K [H][16][k_row] (the
  // second sweep's dQ += dS K), each a ring step of its own, so a slot holds one of them.
  REATTN_DEVICE void issue_chunk(int key0, bool keys) {
    const Strides4& st = keys ? p.k_st : p.v_st;
    ValueCopy::issue(slot_tile(issued++ & 1), kKRow, keys ? kbase : vbase, static_cast<int>(st.h),
                     static_cast<int>(st.n), static_cast<int>(st.d), 0, H, H, key0, Nk, 0, D, vector());
    dev::cp_async_commit();
  }

  static constexpr int kWarps = kSlabs * kGroups;
  static constexpr int kDwN8 = (Cfg::kMaxHeads + 7) / 8;  // n8 tiles of input heads in dw_products
  static constexpr int kDwRows = Cfg::kRows / kWarps;      // query rows per warp in dw_products
  static_assert(Cfg::kRows % kWarps == 0, "dw_products: whole rows per warp");
  // dw_products' accumulators: one per row where D comes from them (kTensorGrad), else one.
  static constexpr int kDwSlots = kTensorGrad ? kDwRows : 1;
  // write_partials keeps [warps][H][H] floats in dM's buffer (H (rows m_row + 8) 16-bit values).
  static_assert(!Cfg::kBackward || kWarps * Cfg::kMaxHeads * 2 <= Cfg::kRows * kMRow, "dW tiles exceed dM's buffer");
  static_assert(!kLayerGrad || kWarps * (Cfg::kMaxHeads + 3) * 2 <= Cfg::kRows * kMRow,
                "dW tiles and LayerNorm's sums exceed dM's buffer");
  struct Partials {
    float dw[kHeads][Cfg::kMaxHeads];  // sum dM_g P~'_h (the host applies 1 / (1 - p)); general variant
    float dw_rows[kDwSlots][kDwN8][4];  // plain variant: dw_products' accumulators
    float dc[kHeads], dgamma[kHeads], dbeta[kHeads];
    typename Mix::LayerGradSums layer;  // kLayerGrad: grad_mixed_layer's sums, in place of dc, dgamma, dbeta
  };

  // M - c of the slab's 16 rows over the chunk's 16 keys on tensor cores (kTensorBatch; BatchNorm,
  // whose mean and 1/std come from the forward; LayerNorm's statistics across heads keep the
  // per-thread Mixer), through dM's buffer (free until this chunk's dM): per query row i and 8
  // keys, W' P~[:, i, keys] is one product (A = W' as hi + lo, B = P~ of every head by
  // ldmatrix.trans), the slab's warps splitting its rows as tensor_grad_probs does. After the
  // slab's barrier each warp reads its output heads' values back in the A-fragment layout, rounded
  // to 16 bits (as eager's M is before its norm). The bias c stays out (batch_shift folds it into
  // dM's and dgamma's coefficients): as the product's C operand it costs a copy of c into every
  // accumulator. Each warp later overwrites only its own heads' values with their dM. Per chunk
  // and row: 2 products and a quarter load, against H multiply-adds per entry and owned head plus
  // the unpacking of P~. whi, wlo, c: the table's W' fragments and C = 0 (the sums call: acc = M - c),
  // or training BatchNorm's table's diag(ee) W' and C = ff (acc = ee (M - c) + ff, rounded to 16 bits
  // as M - c was), loaded once per sweep.
  REATTN_DEVICE void tensor_mix(int chunk_col, const uint32_t (&whi)[4], const uint32_t (&wlo)[4], const float (&c)[4],
                                 float (&acc)[kHeads][8]) const {
    constexpr bool kNarrow = Cfg::kMaxHeads <= 8;  // k = 8 input heads: W' columns 0 .. 7
    const int hs = Cfg::kRows * L.p_row + kProbsPad;  // P~'s head stride (elements)
    const int row0 = slab * 16 + group * (16 / kGroups);
    const auto lane_src = Mix::template trans_lane<kNarrow>(lane);
    const E* src = at<E>(L.probs) + (lane_src.head < H ? lane_src.head : 0) * hs + (row0 + lane_src.row) * L.p_row +
                   chunk_col + lane_src.octet * 8;
    E* dst = at<E>(L.dmixed) + gq * kMHead + row0 * kMRow + 2 * tq;
    Mix::template mix_through<kNarrow>(src, L.p_row, dst, kMRow, kMHead, chunk_tile(L.dmixed, kMRow, 0), whi, wlo, c, H, gq,
                                       group, slab, acc);
  }

  // BatchNorm: what grad_mixed's acc lacks of M - mu for head g (xhat = (acc - batch_shift) r): mu,
  // or with tensor_mix's values (M - c), mu - c (load_parameters keeps that in the mean's row).
  REATTN_DEVICE float batch_shift(int g) const { return vec_row(kMean)[g]; }

  // dA = dO V^T of the warp's output heads at their fragment entries of the chunk (V in ring slot
  // `slot`): B = V^T from V [key][d] without .trans, matrices (n8 tile i / 2, k half i % 2).
  REATTN_DEVICE void grad_attention(int slot, const uint32_t (&df)[kHeads][Cfg::kKSteps][4], float (&dn)[kHeads][8]) const {
    const E* values = slot_tile(slot);
    const int i = lane / 8;
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int g = group + kGroups * j;
      float c0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const E* vg = values + static_cast<size_t>(g < H ? g : 0) * kValueTile * kKRow;
      // Shared addresses formed once per head, each k16 step 32 bytes on (in the rolled loop, pointers
      // cost a 64-bit add and a generic-to-shared conversion per load).
      const uint32_t v_row = dev::smem_address(vg + ((i / 2) * 8 + lane % 8) * kKRow + (i % 2) * 8);
      const uint32_t g_row = kGradsShared ? grad_row(j) : 0u;
      // Unrolled, dO's fragments from shared memory too (several segments): rolled there, each k-step paid a
      // counter, a compare, a branch and its addresses (static model, sm_90, DeepViT-L-384 row pass: 548.8 ->
      // 519.8 us t_low with training BatchNorm, 530.2 -> 500.4 with LayerNorm, t_high -52 without a norm).
#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
        uint32_t vb[4];
        dev::ldmatrix_x4_at(vb, v_row + kk * 32);
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        uint32_t a[4];
        grad_fragment(df, j, kk, g_row, a);
        dev::mma_m16n8k16<E>(c0, a, b0, c0);
        dev::mma_m16n8k16<E>(c1, a, b1, c1);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dn[j][e] = c0[e];
        dn[j][4 + e] = c1[e];
      }
    }
  }

  // The warp's output heads' values at their fragment entries to dM's buffer, 16-bit, A-fragment order.
  REATTN_DEVICE void store_grad_tile(const float (&x)[kHeads][8]) const {
    Mix::store_fragments(at<E>(L.dmixed) + (static_cast<size_t>(slab) * 16 + gq) * kMRow + 2 * tq, kMRow, kMHead, H,
                         group, x);
  }

  // Output-head part of a chunk: dM of the warp's heads to shared memory (and the partial sums).
  REATTN_DEVICE void grad_mixed(int slot, int key0, int chunk_col, bool first, bool sums_only,
                                const uint32_t (&df)[kHeads][Cfg::kKSteps][4], const uint32_t (&whi)[4],
                                const uint32_t (&wlo)[4], const float (&wc)[4], const float (&bn)[3][kHeads],
                                Partials& part) {
    const int norm = p.norm;
    const bool layer = norm == kNormLayer, batch = norm == kNormBatch;
    const bool clamp = !Cfg::kPlain && p.seed != nullptr;
    float acc[kHeads][8];
    float mean[8], rstd[8];
    uint32_t masks[kHeads];
    {
      uint32_t own[kHeads][4];
      if (tensor_batch_sweep(first) && batch) {  // the plain variant: no masks, so `own` is not needed
        tensor_mix(chunk_col, whi, wlo, wc, acc);
      } else if (layer || batch) {
        mix_probs(chunk_col, acc, mean, own, layer, clamp);
      } else {  // norm none needs only the owned heads' masked bits (the plain variant: none)
        const E* probs = chunk_tile(L.probs, L.p_row, chunk_col);
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
          const int g = group + kGroups * j;
          if constexpr (!Cfg::kPlain) {
            dev::ldmatrix_x4(own[j], probs + static_cast<size_t>(g < H ? g : 0) * Cfg::kRows * L.p_row);  // general: unpadded
          }
          // The plain one-segment variant leaves acc unset (only LayerNorm and BatchNorm read it);
          // the segmented one keeps the zeros: without them its sm_80 build needs 8 bytes of stack.
          if constexpr (!Cfg::kPlain || !Cfg::kOneSegment) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[j][e] = 0.0f;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kHeads; ++j) masks[j] = Cfg::kPlain ? 0u : Mix::masked_bits(own[j]);
    }
    // LayerNorm: xhat in acc, over heads. BatchNorm keeps M (or M - c): xhat = (acc - batch_shift) r
    // enters dM and dgamma linearly, so the shift and r fold into their coefficients (dM below,
    // dgamma in write_partials); the full backward's tensor_mix has ee (M - c) + ff in acc. None: acc
    // unused.
    if (layer) {
      layer_center(acc, mean, rstd);
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] *= rstd[e];
      }
    }
    float dn[kHeads][8];
    grad_attention(slot, df, dn);
    // dN = dA where attended (masked: 0); out_scale is in gamma'. Entries past Nq or Nk count as
    // masked: tested only in the chunks that have them (a branch the whole warp takes alike).
    uint32_t outside = 0;
    if (key0 + kValueTile > Nk || m0 + slab * 16 + 16 > Nq) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (entry_row(e) >= Nq || key0 + entry_col(tq, e) >= Nk) outside |= 1u << e;
      }
    }
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      masks[j] |= outside;
      // The plain variant's usual chunk: nothing to zero (heads past H have zero dO fragments, load_grads).
      if (Cfg::kPlain && masks[j] == 0 && (!kGradsShared || group + kGroups * j < H)) continue;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (((masks[j] >> e) & 1u) || group + kGroups * j >= H) dn[j][e] = 0.0f;
      }
    }
    // dgamma += sum dN xhat (BatchNorm: sum dN acc, folded in write_partials), dbeta += sum dN (LayerNorm;
    // training BatchNorm's sums, sums_only: its full backward leaves them out, ops.cpp)
    if (first && (layer || (batch && sums_only))) {
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          part.dgamma[j] += dn[j][e] * acc[j][e];
          part.dbeta[j] += dn[j][e];
        }
      }
    }
    // dM, in place of dN: affine norms gamma' rstd dN + e xhat + f = a dN + ee acc + ff (where attended,
    // batch_coefficients; a dN + acc where tensor_mix folded ee, ff); LayerNorm
    // rstd (dxhat - mean dxhat - xhat mean(dxhat xhat)) with dxhat = gamma' dN, which is 0 for
    // entries past Nq / Nk.
    float (&dm)[kHeads][8] = dn;
    if (layer) {
      float s1[8], s2[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) s1[e] = s2[e] = 0.0f;
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        const int g = group + kGroups * j < H ? group + kGroups * j : 0;
        const float gamma = vec_row(kGamma)[g];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          dm[j][e] = gamma * dn[j][e];  // dxhat
          s1[e] += dm[j][e];
          s2[e] += dm[j][e] * acc[j][e];
        }
      }
      slab_sum2(s1, s2);
      const float inv_h = inv_heads();
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) dm[j][e] = rstd[e] * (dm[j][e] - s1[e] * inv_h - acc[j][e] * s2[e] * inv_h);
      }
    } else if (batch) {
      // tensor_mix folded ee and ff into acc (the full backward's table); the sums call's acc is M - c,
      // and so is the per-thread mixing's of the segmented pass's second sweep (load_parameters), which
      // reads ee and ff from shared memory: kept in registers there, its sm_90 build needed 24 bytes
      // of stack.
      const bool tensor = tensor_batch_sweep(first), folded = tensor && !sums_only;
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        const int g = group + kGroups * j < H ? group + kGroups * j : 0;
        const float a = kTensorBatch ? bn[0][j] : vec_row(kGamma)[g];  // batch_coefficients
        const float ee = tensor ? bn[1][j] : vec_row(kE)[g], ff = tensor ? bn[2][j] : vec_row(kF)[g];
        if (folded) {
#pragma unroll
          for (int e = 0; e < 8; ++e) dm[j][e] = a * dn[j][e] + acc[j][e];  // one multiply-add
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dm[j][e] = a * dn[j][e] + (ee * acc[j][e] + ff);  // two
        }
        // Masked entries get 0. Entries past Nq or Nk matter only to dc (the first sweep): dM
        // meets P~ = 0 past Nk in dW and dS, and rows past Nq are neither summed nor written.
        if (!Cfg::kPlain || (first && masks[j] != 0)) {
#pragma unroll
          for (int e = 0; e < 8; ++e) dm[j][e] = ((masks[j] >> e) & 1u) ? 0.0f : dm[j][e];
        }
      }
    } else {  // none: dM = gamma' dN = out_scale dN (ops.cpp's fold), already 0 where dN is
      const float a = static_cast<float>(p.out_scale);
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) dm[j][e] = a * dn[j][e];
      }
    }
    if (first) {
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) part.dc[j] += dm[j][e];
      }
      if (sums_only) return;
      // dW[g_j, h] += sum_e dM_g P~'_h: every input head's P~ once more (the general variant; the
      // plain one forms dW on tensor cores, dw_products).
      const E* probs = chunk_tile(L.probs, L.p_row, chunk_col);
#pragma unroll
      for (int h = 0; h < Cfg::kMaxHeads; ++h) {
        if (!Cfg::kPlain && h < H) {
          uint32_t pr[4];
          dev::ldmatrix_x4(pr, probs + static_cast<size_t>(h) * Cfg::kRows * L.p_row + h * kProbsPad);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float pv = clamped(e & 1 ? Cv::high(pr[e / 2]) : Cv::low(pr[e / 2]));
#pragma unroll
            for (int j = 0; j < kHeads; ++j) part.dw[j][h] += dm[j][e] * pv;
          }
        }
      }
    }
    store_grad_tile(dm);
  }

  // ---- LayerNorm's backward on tensor cores (kLayerGrad) ------------------------------------------------
  // Per chunk: the warps, as output-head owners, write dN (dA = dO V^T, 16-bit as eager's dA is; 0 past
  // Nq and Nk) to dM's buffer; after the slab's barrier each warp takes its rows of the slab and per row
  // and 16 keys (mixing.cuh, "LayerNorm across heads on tensor cores"):
  //   M - mean from P~ on tensor cores and rstd from a quad's sum of squares (as the forward's
  //     mix_in_place_layer, which the stored A came from);
  //   dN^T of every head by one ldmatrix.trans of the same lanes' rows (its registers in C's order);
  //   dM = rstd (dxhat - s1 / H - xhat s2 / H), the sums within the quad, back over dN by one
  //     stmatrix.trans (sm_90; 16-bit stores on sm_80);
  //   in the first sweep dc, dgamma, dbeta as sums per lane and output head (write_partials adds them).
  // Against the general row pass's LayerNorm (H multiply-adds per entry and owned head for M, and two
  // exchanges of partial sums through shared memory per chunk), per row and 16 keys: 4 products and the
  // head sums' one or two (Mixer::layer_grad), 2 loads, one store, 7 shuffles and one reciprocal square
  // root per lane.
  static constexpr int kLayerTable = 4 * 32 * 4;  // words of the fragment table before LayerNorm's (BatchNorm's)

  using LayerGradLane = typename Mix::LayerLane;
  // One-segment shapes whose [rows][keys] of fp32 fit the exchange region (unused by this variant: its
  // sums stay within quads of lanes) keep each entry's rstd from the first sweep for the second
  // (grad_mixed_layer): per row an 8-byte store by one lane of each quad and an 8-byte load, against the
  // second sweep's sum of squares, 3 shuffles and reciprocal square root. At D <= 32 only, where the
  // pass is bound by instruction issue; at D = 64 shared-memory traffic bounds it and the cache's adds
  // to it (static model, H100: DeepViT-16b row pass 208.3 -> 202.0 us, ViT-B 260.6 -> 266.5).
  static constexpr bool kRstdCache =
      kLayerGrad && kGroups > 1 && Cfg::kD <= 32 && Cfg::kRows * Cfg::kKeys <= kSlabs * kGroups * 32 * 24;

  REATTN_DEVICE void grad_mixed_layer(int slot, int key0, int chunk_col, bool first,
                                      const uint32_t (&df)[kHeads][Cfg::kKSteps][4], const LayerGradLane& lg,
                                      const typename Mix::LayerSums& sf, typename Mix::LayerGradSums& sums) const {
    {  // dN of the warp's output heads; 0 past Nq and Nk (the chunks that have such entries: warp-uniform)
      float dn[kHeads][8];
      grad_attention(slot, df, dn);
      if (key0 + kValueTile > Nk || m0 + slab * 16 + 16 > Nq) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (entry_row(e) >= Nq || key0 + entry_col(tq, e) >= Nk) {
#pragma unroll
            for (int j = 0; j < kHeads; ++j) dn[j][e] = 0.0f;
          }
        }
      }
      store_grad_tile(dn);
    }
    Mix::slab_barrier(slab);  // dN of the slab's every head
    constexpr int kPerLoad = Mix::kLayerRowsPerLoad, kPerWarp = 16 / kGroups;
    static_assert(16 % kGroups == 0 && kPerWarp % kPerLoad == 0, "whole loads per warp");
    const float inv_h = inv_heads(), eps = static_cast<float>(p.eps);
    // Heads past H read head 0 and store to one scratch row (head 0's padding of dM's buffer, never read).
    const auto ls = Mix::layer_src(lane);
    const int row0 = slab * 16 + group * kPerWarp;
    const int hc = ls.head < H ? ls.head : 0;
    const int hs = Cfg::kRows * L.p_row + kProbsPad;  // P~'s head stride (elements)
    const uint32_t src = dev::smem_address(at<E>(L.probs) + hc * hs + (row0 + ls.row) * L.p_row + chunk_col + ls.octet * 8);
    const uint32_t grad = dev::smem_address(at<E>(L.dmixed) + hc * kMHead + (row0 + ls.row) * kMRow + ls.octet * 8);
    const bool real = ls.head < H;
    const uint32_t out = real ? grad : dev::smem_address(at<E>(L.dmixed) + Cfg::kRows * kMRow);
    const uint32_t entry = dev::smem_address(at<E>(L.dmixed) + row0 * kMRow + gq);
    const bool odd = tq & 1;
    // The rows' rstd of the lane's columns gq, gq + 8 at [row][chunk column + 2 gq ..] (kRstdCache).
    float* cached = at<float>(L.exchange) + row0 * Cfg::kKeys + chunk_col + 2 * gq;
    Mix::template layer_rows<kPerWarp, true>(
        src, kPerLoad * L.p_row * 2, grad, out, real, entry, kMRow * 2, kMHead * 2, H, tq,
        [&](const uint32_t (&x)[4], const uint32_t (&g)[4], int u, int r, uint32_t (&packed)[4]) {
          float c[Mix::kLayerTiles][4], rstd[2];
          if (!kRstdCache || first) {
            Mix::layer_center(x, u, lg, inv_h, eps, odd, c, rstd);
            if (kRstdCache && tq == 0) dev::store_8(cached + r * Cfg::kKeys, dev::bits(rstd[0]), dev::bits(rstd[1]));
          } else {  // the first sweep's, without the sums of squares, 3 shuffles and a reciprocal square root
            Mix::layer_centered(x, u, lg, c);
            uint32_t w[2];
            dev::load_words(cached + r * Cfg::kKeys, w);
            rstd[0] = dev::from_bits(w[0]);
            rstd[1] = dev::from_bits(w[1]);
          }
          if (first) {
            Mix::template layer_grad<true>(c, rstd, g, u, lg, sf, inv_h, packed, sums);
          } else {
            Mix::template layer_grad<false>(c, rstd, g, u, lg, sf, inv_h, packed, sums);
          }
        });
  }

  // dW partials and D on tensor cores (plain variant, first sweep). For query row i of the block,
  // X_i[g][h] = sum_k dM_g[i][k] P~_h[i][k] over the chunk's 16 keys is one m16n8k16 product: A = dM
  // [output heads][keys], B = P~ [keys][input heads], both read by ldmatrix from their [head][row]
  // tiles in shared memory (rows 8 heads apart: hence the 16-byte padding of tiles.h's head_stride).
  // Each warp keeps X_i of its rows i = warp, warp + warps, ... summed over the chunks. After the
  // sweep, dW = sum_i X_i (write_partials) and
  //   D_h,i = sum_k P~_h dP'_h = sum_k P~_h sum_g W'[g, h] dM_g = sum_g W'[g, h] X_i[g][h]
  // (delta_from_products), so the first sweep needs no dP' at all. Heads past H read head 0; those
  // rows and columns of X are never used. Per chunk and row: 1-2 products and 2 ldmatrix instead
  // of H multiply-adds per entry and owned head, and no unpacking of P~. dM enters as the 16-bit
  // value stored for the mixing (eager's dW product rounds its operands likewise); the sums are
  // fp32 (the mma accumulators).
  REATTN_DEVICE void dw_products(int chunk_col, float (&x)[kDwSlots][kDwN8][4]) const {
    const E* dmixed = at<E>(L.dmixed);
    const E* probs = at<E>(L.probs) + chunk_col;
    const int ga = lane % 16 < H ? lane % 16 : 0;  // A: lanes 0-15 rows g at keys 0-7, 16-31 at keys 8-15
    const int quarter = lane / 8;                   // B: matrix `quarter` = heads (quarter / 2) 8 .., keys (quarter % 2) 8
    const int hb = (kDwN8 == 1 ? 0 : (quarter / 2) * 8) + lane % 8;
    const E* a_row = dmixed + static_cast<size_t>(ga) * kMHead + (lane / 16) * 8;
    const E* b_row = probs + static_cast<size_t>(hb < H ? hb : 0) * (Cfg::kRows * L.p_row + kProbsPad) + (quarter % 2) * 8;
#pragma unroll
    for (int t = 0; t < kDwRows; ++t) {
      const int i = warp + t * kWarps;
      if (m0 + i >= Nq) break;  // rows past Nq: nothing (and whole slabs past Nq hold no dM)
      float (&c)[kDwN8][4] = x[kDwSlots == 1 ? 0 : t];
      uint32_t a[4];
      dev::ldmatrix_x4(a, a_row + i * kMRow);
      if constexpr (kDwN8 == 1) {
        uint32_t b[2];
        dev::ldmatrix_x2(b, b_row + i * L.p_row);
        dev::mma_m16n8k16<E>(c[0], a, b, c[0]);
      } else {
        uint32_t b[4];
        dev::ldmatrix_x4(b, b_row + i * L.p_row);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        dev::mma_m16n8k16<E>(c[0], a, b0, c[0]);
        dev::mma_m16n8k16<E>(c[1], a, b1, c[1]);
      }
    }
  }

  // W'[g][h] from L.weights ([h][g % groups][g / groups]) as the second sweep's products take it
  // (Mixer::split_rounded); 0 past H.
  REATTN_DEVICE float split_weight(int g, int h) const {
    return g < H && h < H ? Mix::split_rounded(at<float>(L.weights)[(h * kGroups + g % kGroups) * kHeadsPad + g / kGroups])
                          : 0.0f;
  }

  // D_h,i = sum_g W'[g, h] X_i[g][h] from dw_products' accumulators (the C fragment: entry r of n8
  // tile n is g = gq + 8 (r / 2), h = 8 n + 2 tq + r % 2): products per thread, then the sum over the
  // 8 lanes of a column (gq). To shared memory (the second sweep) and global memory (the key pass);
  // rows past Nq get 0.
  REATTN_DEVICE void delta_from_products(const float (&x)[kDwSlots][kDwN8][4]) const {
    float* delta = at<float>(L.delta);
#pragma unroll
    for (int t = 0; t < kDwRows; ++t) {
      const int i = warp + t * kWarps;
#pragma unroll
      for (int n = 0; n < kDwN8; ++n) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int h = 8 * n + 2 * tq + k;
          float v = split_weight(gq, h) * x[t][n][k];
          if constexpr (Cfg::kMaxHeads > 8) v += split_weight(gq + 8, h) * x[t][n][2 + k];
          v += dev::shfl_xor(v, 4);
          v += dev::shfl_xor(v, 8);
          v += dev::shfl_xor(v, 16);
          if (gq == 0 && h < H) {
            delta[h * Cfg::kRows + i] = v;
            if (m0 + i < Nq) p.delta[(b * H + h) * static_cast<int64_t>(Nq) + m0 + i] = v;
          }
        }
      }
    }
  }

  // P~' of a stored value: negative ones (dropped entries, masked -0) count as 0. The plain
  // variant stores none.
  REATTN_DEVICE static float clamped(float stored) { return Cfg::kPlain ? stored : dev::fmax_(stored, 0.0f); }

  // Input-head part of a chunk: dP' = W'^T dM for the warp's heads h_j; sweep 1 adds P~' dP' to the
  // row partials of D, sweep 2 forms dS and dQ += scale dS K.
  REATTN_DEVICE void grad_probs(int slot, int chunk_col, bool first, float (&dpart)[kHeads][2],
                                float (&dq)[kHeads][Cfg::kOutN8][4]) const {
    float dp[kHeads][8];
    Mix::mix_transposed(chunk_tile(L.dmixed, kMRow, 0), static_cast<size_t>(kMHead),
                        at<float>(L.weights_t), H, group, dp);
    const E* probs = chunk_tile(L.probs, L.p_row, chunk_col);
    const float* delta = at<float>(L.delta);
    const E* keys = slot_tile(slot);  // the second sweep's K chunk (unused in the first)
    const float scale = static_cast<float>(p.scale);
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int h = group + kGroups * j;
      if (h >= H) continue;
      uint32_t pr[4];
      dev::ldmatrix_x4(pr, probs + static_cast<size_t>(h) * Cfg::kRows * L.p_row + h * kProbsPad);
      if (first) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float pv = clamped(e & 1 ? Cv::high(pr[e / 2]) : Cv::low(pr[e / 2]));
          dpart[j][(e / 2) % 2] += pv * dp[j][e];
        }
        continue;
      }
      const float dr[2] = {delta[h * Cfg::kRows + slab * 16 + gq], delta[h * Cfg::kRows + slab * 16 + gq + 8]};
      float ds[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float sv = e & 1 ? Cv::high(pr[e / 2]) : Cv::low(pr[e / 2]);
        ds[e] = Mix::template score_grad<Cfg::kPlain>(sv, dp[j][e], dr[(e / 2) % 2], scale);
      }
      const uint32_t af[4] = {Cv::pack(ds[0], ds[1]), Cv::pack(ds[2], ds[3]), Cv::pack(ds[4], ds[5]),
                              Cv::pack(ds[6], ds[7])};
      dev::mma_row_major(af, keys + static_cast<size_t>(h) * kValueTile * kKRow, kKRow, lane, dq[j]);  // K [key][d]
    }
  }

  // The second sweep's input-head part on tensor cores (kTensorGrad). For one query row i and 8 keys,
  // dP'[:, i, k] = W'^T dM[:, i, k] is a 16 x 16 by 16 x 8 product (input heads x output heads by
  // output heads x keys): A = W'^T as hi + lo (weight_fragments, as in the forward's mix_in_place),
  // B = dM of heads 0 .. H - 1 at one row by ldmatrix.trans (8 heads' rows 16 bytes apart in banks:
  // tiles.h's head padding), heads past H reading head 0 against zero columns of W'^T. Up to 8
  // heads the products are m16n8k8 and one load serves two rows. The C fragment holds dP' of heads
  // gq (and gq + 8) at keys 2 tq, 2 tq + 1: with P~ and D read at the same entries,
  // dS = P~ (dP' - D) is written over P~ in place (the slab's warps split its rows; each overwrites
  // only entries it has read; scale multiplies dQ once, at the end). After the slab's barrier,
  // dQ += dS K for the warp's heads, the A fragments read back by ldmatrix. Per chunk and row: 4
  // products, a load and 2 operations per entry of heads below H, against H multiply-adds per entry
  // and owned head plus the unpacking of dM.
  REATTN_DEVICE void tensor_grad_probs(int slot, int chunk_col, float (&dq)[kHeads][Cfg::kOutN8][4]) const {
    // W'^T fragments from the table, per chunk (not live across the sweep, at 255 registers).
    uint32_t whi[4], wlo[4];
    table_fragments<true>(whi, wlo);
    constexpr int kRowsPerWarp = 16 / kGroups;
    static_assert(16 % kGroups == 0, "the slab's rows split over its warps");
    constexpr bool kNarrow = Cfg::kMaxHeads <= 8;  // k = 8 output heads: W'^T columns 0 .. 7
    E* probs = at<E>(L.probs);
    const int hs = Cfg::kRows * L.p_row + kProbsPad;  // P~'s head stride (elements)
    const int row0 = slab * 16 + group * kRowsPerWarp;
    // ldmatrix.trans rows (Mixer::trans_lane: narrow, two rows per load).
    const auto lane_src = Mix::template trans_lane<kNarrow>(lane);
    const int hl = lane_src.head, row_of = lane_src.row, octet = lane_src.octet;
    const E* src = at<E>(L.dmixed) + (hl < H ? hl : 0) * kMHead + (row0 + row_of) * kMRow + octet * 8;
    // C entries: head gq (+ 8), keys 2 tq, + 1 (Mixer::half_heads: a head past H stores nothing).
    constexpr int kHalves = kNarrow ? 1 : 2;
    const auto hh = Mix::half_heads(gq, H, hs);
    E* dst = probs + row0 * L.p_row + chunk_col + 2 * tq;
    // D of the warp's rows (input heads gq, gq + 8), loaded before the stores of dS: after them nvcc
    // loaded it again per 8 keys (static model, DeepViT-16b row pass: 2% of its shared-memory bytes).
    float dl[kRowsPerWarp][kHalves];
#pragma unroll
    for (int half = 0; half < kHalves; ++half) {
      const float* delta = at<float>(L.delta) + (hh.real[half] ? gq + 8 * half : 0) * Cfg::kRows + row0;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) dl[r][half] = delta[r];
    }
    const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    Mix::template split_tiles<kNarrow>(src, kMRow, whi, wlo, zero, [&](int row, int col8, const float (&d)[4]) {
#pragma unroll
      for (int half = 0; half < kHalves; ++half) {
        uint32_t* entry = reinterpret_cast<uint32_t*>(dst + hh.at[half] + row * L.p_row + col8 * 8);
        const uint32_t out = Mix::grad_scores(*entry, d, half, dl[row][half], dl[row][half]);
        if (hh.real[half]) *entry = out;
      }
    });
    Mix::slab_barrier(slab);  // dS of the slab's every row
    const E* keys = slot_tile(slot);
    const E* ds = chunk_tile(L.probs, L.p_row, chunk_col);
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int h = group + kGroups * j;
      if (h >= H) continue;
      uint32_t af[4];
      dev::ldmatrix_x4(af, ds + h * hs);
      dev::mma_row_major(af, keys + static_cast<size_t>(h) * kValueTile * kKRow, kKRow, lane, dq[j]);  // K [key][d]
    }
  }

  // The partial sums of the block: warp sums over lanes, then over slabs, to
  // partials + program * (H H + 3 H) = [dW (g, h)][dc][dgamma][dbeta].
  // The plain variant's dW: each warp's mma tiles to [warps][H][H] floats in dM's buffer (free
  // between the sweeps), summed over the warps in order (no atomics: deterministic).
  REATTN_DEVICE void write_partials(Partials& part) {
    constexpr int mh = Cfg::kMaxHeads;
    if (p.norm == kNormBatch) {  // sum dN xhat = r (sum dN acc - batch_shift sum dN): the sweep summed dN acc
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        const int g = group + kGroups * j < H ? group + kGroups * j : 0;
        part.dgamma[j] = vec_row(kRstd)[g] * (part.dgamma[j] - batch_shift(g) * part.dbeta[j]);
      }
    }
    float* sums = at<float>(L.sums) + static_cast<size_t>(warp) * kHeads * (mh + 3);
#pragma unroll
    for (int j = 0; j < (kLayerGrad ? 0 : kHeads); ++j) {  // kLayerGrad: the owners' dc, dgamma, dbeta stay unused
#pragma unroll
      for (int k = Cfg::kPlain ? mh : 0; k < mh + 3; ++k) {
        float v = k < mh ? part.dw[j][k] : k == mh ? part.dc[j] : k == mh + 1 ? part.dgamma[j] : part.dbeta[j];
        for (int off = 16; off > 0; off /= 2) v += dev::shfl_xor(v, off);
        if (lane == 0) sums[j * (mh + 3) + k] = v;
      }
    }
    dev::sync_threads();  // also: every warp is past the sweep's last chunk, so dM's buffer is free
    if constexpr (Cfg::kPlain) {
      float* tiles = at<float>(L.dmixed);  // [warps][H][H] (fits: the static_assert above)
#pragma unroll
      for (int n = 0; n < kDwN8; ++n) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int g = gq + 8 * (r / 2), h = n * 8 + 2 * tq + r % 2;  // the mma C fragment's entry
          float v = 0.0f;
#pragma unroll
          for (int t = 0; t < kDwSlots; ++t) v += part.dw_rows[t][n][r];
          if (g < H && h < H) tiles[(warp * H + g) * H + h] = v;
        }
      }
      if constexpr (kLayerGrad) {  // then [warps][dc, dgamma, dbeta][H]: heads 8 t + 2 tq + e summed over gq
        float* layer = tiles + kWarps * H * H + warp * 3 * H;
#pragma unroll
        for (int k = 0; k < 3; ++k) {
#pragma unroll
          for (int t = 0; t < 2; ++t) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float v = part.layer[k][t][e] + part.layer[k][t][e + 2];  // C rows gq and gq + 8
              for (int off = 16; off >= 4; off /= 2) v += dev::shfl_xor(v, off);
              const int g = 8 * t + 2 * tq + e;
              if (gq == 0 && g < H) layer[k * H + g] = v;
            }
          }
        }
      }
      dev::sync_threads();
    }
    float* out = p.partials + static_cast<int64_t>(dev::block_index_x()) * (H * H + 3 * H);
    const float* all = at<float>(L.sums);
    for (int i = dev::thread_index(); i < H * H + 3 * H; i += Cfg::kThreads) {
      const int g = i < H * H ? i / H : (i - H * H) % H;
      const int k = i < H * H ? i % H : mh + (i - H * H) / H;
      float v = 0.0f;
      if (Cfg::kPlain && i < H * H) {
        const float* tiles = at<float>(L.dmixed);
        for (int w = 0; w < kWarps; ++w) v += tiles[w * H * H + i];
      } else if (kLayerGrad) {
        const float* layer = at<float>(L.dmixed) + kWarps * H * H;
        for (int w = 0; w < kWarps; ++w) v += layer[w * 3 * H + i - H * H];
      } else {
        for (int s = 0; s < kSlabs; ++s) v += all[((s * kGroups + g % kGroups) * kHeads + g / kGroups) * (mh + 3) + k];
      }
      out[i] = v;
    }
  }

  // The thread's coordinates, which the compiler may no longer assume unchanged (dev::opaque): what
  // derives from them is recomputed after this point, not kept live from before.
  REATTN_DEVICE void forget_coordinates() {
    lane = dev::opaque(lane);
    gq = dev::opaque(gq);
    tq = dev::opaque(tq);
    slab = dev::opaque(slab);
    group = dev::opaque(group);
  }

  // The ring step after a segment's last chunk (issued after its work: every warp is past that
  // chunk's first step, so the other slot is free): the next segment's first K tile (its score
  // phase), the second sweep's start, or nothing. Outside the chunk loop, which has no registers
  // to spare for the K tiles' addresses.
  REATTN_DEVICE void issue_after_segment(int seg, bool again) {
    if (!Cfg::kOneSegment && seg + 1 < segments) {
      issue_keys(0, seg_start(seg + 1));
    } else if (again) {
      if (Cfg::kOneSegment) {
        issue_chunk(0, false);  // P~ stays in shared memory: the second sweep starts with its V chunk
      } else {
        issue_keys(0, 0);  // the second sweep's first score phase
      }
    }
  }

  // One sweep over the keys (the first: D and the partial sums; the second: dQ), segment by
  // segment: the segment's score phase (one-segment shapes: only in the first sweep; P~ stays in
  // shared memory), then its 16-key chunks. Ring steps per chunk: the first sweep's V chunk (then a
  // barrier for dM); the second sweep's V chunk, then its K chunk, whose step's barrier is dM's.
  REATTN_DEVICE void backward_sweep(bool first, bool sums_only, uint32_t (&df)[kHeads][Cfg::kKSteps][4],
                                    Partials& part, float (&dpart)[kHeads][2], float (&dq)[kHeads][Cfg::kOutN8][4]) {
    const bool again = first && !sums_only;  // a second sweep follows
    const int segs = Cfg::kOneSegment ? 1 : segments;
    LayerGradLane layer_lane;
    typename Mix::LayerSums layer_sums;
    for (int seg = 0; seg < segs; ++seg) {
      if constexpr (!Cfg::kOneSegment) {
        // Recompute the thread's addresses per segment rather than keep (or spill) them from
        // before the loop, across its score phase.
        forget_coordinates();
        m0 = dev::opaque(m0);
        b = dev::opaque(b);
        kbase = dev::opaque(kbase);
        vbase = dev::opaque(vbase);
      }
      if (!Cfg::kOneSegment || first) {
        score_phase(seg);  // its last K step issues the segment's first V chunk
        if (!kGradsShared && slab_active) load_grads(df);  // after the scores: not live beside them
      }
      if constexpr (kLayerGrad) {  // past the barriers after load_parameters
        layer_lane = Mix::template layer_lane<false>(at<uint32_t>(L.weights_t) + kLayerTable, lane);
        layer_sums = Mix::layer_sums(layer_lane, lane);
      }
      // Training BatchNorm on tensor cores: W' (hi, lo; the full backward: diag(ee) W' and C = ff) of
      // tensor_mix and the owned heads' a, ee, ff (batch_coefficients) in registers for the whole sweep,
      // past the barriers after load_parameters, where every chunk loaded them again (2 16-byte and 6
      // 4-byte shared loads per warp at ViT-B: ~20% of the pass's shared traffic over norm none's).
      // 12 + 3 kHeads registers, unused with other norms.
      uint32_t whi[4] = {0u, 0u, 0u, 0u}, wlo[4] = {0u, 0u, 0u, 0u};
      float wc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, bn[3][kHeads] = {};
      if constexpr (kTensorBatch) {
        if (p.norm == kNormBatch) {
          if (sums_only) {
            table_fragments<false>(whi, wlo);
          } else {  // fill_batch_table's diag(ee) W' and ff
            Mix::batch_table_fragments(at<uint32_t>(L.weights_t) + kLayerTable, lane, whi, wlo, wc);
          }
#pragma unroll
          for (int j = 0; j < kHeads; ++j) {
            const int g = group + kGroups * j < H ? group + kGroups * j : 0;
            bn[0][j] = vec_row(kGamma)[g];
            bn[1][j] = vec_row(kE)[g];
            bn[2][j] = vec_row(kF)[g];
          }
        }
      }
      const int chunks = value_tiles(seg_len(seg));
      for (int c = 0; c < chunks; ++c) {
        if constexpr (!Cfg::kOneSegment) forget_coordinates();  // likewise per chunk
        const int key0 = seg_start(seg) + c * kValueTile;
        const int slot = begin_step();
        if (!first) {
          issue_chunk(key0, true);
        } else if (c + 1 < chunks) {
          issue_chunk(key0 + kValueTile, false);
        }
        if constexpr (kLayerGrad) {
          if (slab_active) grad_mixed_layer(slot, key0, c * kValueTile, first, df, layer_lane, layer_sums, part.layer);
        } else {
          if (slab_active) grad_mixed(slot, key0, c * kValueTile, first, sums_only, df, whi, wlo, wc, bn, part);
        }
        if (sums_only) continue;
        int keys_slot = slot;
        if (first) {
          dev::sync_threads();  // dM of every output head
          if constexpr (Cfg::kPlain) dw_products(c * kValueTile, part.dw_rows);
          if constexpr (kTensorGrad) continue;  // D from the same products: no dP' in this sweep
        } else {
          keys_slot = begin_step();  // the K chunk, and dM of every output head
          if (c + 1 < chunks) issue_chunk(key0 + kValueTile, false);
        }
        if constexpr (kTensorGrad) {
          if (slab_active) tensor_grad_probs(keys_slot, c * kValueTile, dq);
        } else {
          if (slab_active) grad_probs(keys_slot, c * kValueTile, first, dpart, dq);
        }
      }
      issue_after_segment(seg, again);
    }
  }

  // D per (head, row): the quad's partials, to shared memory and to global memory (key pass).
  REATTN_DEVICE void finish_delta(float (&dpart)[kHeads][2]) const {
    float* delta = at<float>(L.delta);
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      const int h = group + kGroups * j;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float v = dpart[j][r];
        v += dev::shfl_xor(v, 1);
        v += dev::shfl_xor(v, 2);
        const int row = slab * 16 + gq + r * 8;
        if (tq == 0 && h < H && slab_active) {
          delta[h * Cfg::kRows + row] = v;
          if (m0 + row < Nq) p.delta[(b * H + h) * static_cast<int64_t>(Nq) + m0 + row] = v;
        }
      }
    }
  }

  REATTN_DEVICE void run_backward() {
    load_parameters();
    load_given_stats();
    const bool sums_only = p.stats_only;
    if constexpr (kGradsShared) {  // lands with the first K tile (one cp.async group)
      stage_rows(L.grads, p.grad_out, p.do_st, vector());
    }
    zero_ring_columns();
    issue_keys(0, 0);  // the first score phase's first K tile
    uint32_t df[kHeads][Cfg::kKSteps][4];  // one segment: dO fragments of the owned heads (after the scores)
    float dq[kHeads][Cfg::kOutN8][4];
    {
      float dpart[kHeads][2];
      Partials part;
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        dpart[j][0] = dpart[j][1] = part.dc[j] = part.dgamma[j] = part.dbeta[j] = 0.0f;
#pragma unroll
        for (int h = 0; h < Cfg::kMaxHeads; ++h) part.dw[j][h] = 0.0f;
      }
      if constexpr (kLayerGrad) {
#pragma unroll
        for (int k = 0; k < 3; ++k) {
#pragma unroll
          for (int t = 0; t < 2; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) part.layer[k][t][e] = 0.0f;
          }
        }
      }
      if constexpr (Cfg::kPlain) {
#pragma unroll
        for (int t = 0; t < kDwSlots; ++t) {
#pragma unroll
          for (int n = 0; n < kDwN8; ++n) part.dw_rows[t][n][0] = part.dw_rows[t][n][1] = part.dw_rows[t][n][2] = part.dw_rows[t][n][3] = 0.0f;
        }
      }
      backward_sweep(true, sums_only, df, part, dpart, dq);
      if (!sums_only) {
        if constexpr (kTensorGrad) {
          delta_from_products(part.dw_rows);
        } else {
          finish_delta(dpart);
        }
      }
      write_partials(part);  // before the second sweep: its registers are free for dQ
    }
    if (sums_only) {
      dev::cp_async_wait<0>();
      return;
    }
    clear(dq);
    {
      float dpart[kHeads][2];
      Partials unused;
      backward_sweep(false, false, df, unused, dpart, dq);
    }
    dev::cp_async_wait<0>();
    if constexpr (kTensorGrad) dev::scale_accumulators(dq, static_cast<float>(p.scale));  // dS went unscaled
    write_rows(dq, p.dq, p.dq_st, false);
  }

  REATTN_DEVICE void run() {
    if constexpr (Cfg::kBackward) {
      run_backward();
    } else {
      run_forward();
    }
  }
};

}  // namespace cuda
}  // namespace reattn
