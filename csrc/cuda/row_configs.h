// The instantiated tile shapes of the tensor-core forward and the rule that picks one. Plain C++
// (the host plans with it; row_kernels.cuh instantiates exactly these, in this order).
//
// Each shape is tuned for a family of problems (registers per thread ~ heads * d_out / 2 for O,
// keys / 2 for the scores; shared memory ~ H * 16 slabs * keys * 2 bytes for P~). A problem no
// shape serves (more heads, longer head dims, too little shared memory) runs the CUDA-core
// programs of programs.cuh instead.
#pragma once

#include <cstddef>

#include "tiles.h"

namespace reattn {
namespace cuda {

// index, slabs, groups, heads, d, d_out, keys. Registers per thread (sm_90, bf16, ptxas): 238,
// 214, 252, 246, 255, no spills. One segment (keys 224: every ViT length up to 224 tokens):
// 0 DeiT-S (H <= 6, D <= 64), 1 DeepViT-16b (H <= 12, D <= 32), 2 ViT-B (H <= 12, D <= 64).
// Several segments of 64 / 32 keys (two sweeps): 3 DeepViT-L-384 (H <= 12, D <= 48), 4 D <= 64.
#define REATTN_FORWARD_SHAPES(X) \
  X(0, 4, 2, 3, 64, 64, 224)     \
  X(1, 2, 4, 3, 32, 32, 224)     \
  X(2, 2, 4, 3, 64, 64, 224)     \
  X(3, 2, 4, 3, 48, 48, 64)      \
  X(4, 2, 4, 3, 64, 64, 32)

// What a compiled program handles; each shape is compiled in the four. The plain variants run
// problems without mask or dropout, with scale > 0 and 16-byte aligned rows, one norm each, so
// their loops hold only that norm's code; the general variant handles every feature with branches
// (masks, dropout, element-wise loads).
enum ForwardVariant : int { kPlainAffine = 0, kPlainLayer = 1, kPlainMoments = 2, kGeneral = 3 };
constexpr int kForwardVariants = 4;

// The backward's row pass (rows.cuh): a general variant (masks, dropout, element-wise loads, with
// branches) and a plain one for problems without mask or dropout whose rows are 16-byte aligned
// (its copies and score phase hold no mask, dropout or element-wise code). The norm is read at
// run time in both. The key pass (keys.cuh) takes the same choice.
constexpr int kBackwardRows = 4;
constexpr int kPlainBackwardRows = 5;
// The plain row pass for LayerNorm alone, in bf16 (one key segment or several): its mixing and norm
// run on tensor cores (rows.cuh grad_mixed_layer), with no other norm's code beside them.
constexpr int kPlainLayerBackwardRows = 6;

constexpr int kForwardShapeCount = 5;

inline TileShape forward_shape(int index) {
  static const TileShape shapes[] = {
#define REATTN_SHAPE_ENTRY(i, slabs, groups, heads, d, d_out, keys) TileShape{slabs, groups, heads, d, d_out, keys},
      REATTN_FORWARD_SHAPES(REATTN_SHAPE_ENTRY)
#undef REATTN_SHAPE_ENTRY
  };
  return shapes[index];
}

// The shape for H heads of dim D and Nk keys, or -1: every head fits the warps' output heads, the
// head dim one program's columns (D <= d_out = d), one-segment shapes only when the keys fit one
// segment, and the layout the device's shared memory. Among those: the fewest wasted head dims,
// then the most query rows per program (fewer re-reads of K and V), then the first listed.
inline int pick_forward_shape(int H, int D, int Nk, size_t shared_limit) {
  int best = -1;
  long best_cost = 0;
  for (int i = 0; i < kForwardShapeCount; ++i) {
    const TileShape s = forward_shape(i);
    if (H > s.max_heads() || D > s.d || D > s.d_out) continue;
    if (s.keys > 64 && Nk > s.keys) continue;
    if (row_layout(s, H, Nk).bytes > shared_limit) continue;
    const long cost = static_cast<long>(s.d - D) * 1000 - s.slabs;
    if (best < 0 || cost < best_cost) {
      best = i;
      best_cost = cost;
    }
  }
  return best;
}

// The statistics kernel's shapes (statistics.cuh), instantiated per 16-bit type: warps, tiles, d, narrow.
// 4 warps of 32 rows: each K fragment a warp loads serves two m16 tiles, and a program of 128 rows computes
// 640 rows for DeepViT-L-384's 577 (the forward's programs of 32 rows compute 608).
#define REATTN_STATISTICS_SHAPES(X) \
  X(4, 2, 48, 0)                    \
  X(4, 2, 48, 1)                    \
  X(4, 2, 64, 0)

// The statistics kernel that serves forward shape s at head dim D: the forward's q.k columns and narrow tail.
inline StatisticsShape statistics_shape_for(const TileShape& s, int D) { return StatisticsShape{4, 2, s.d, narrow_tail(s, D)}; }

// The fewest keys for which the plain forward over key segments takes the statistics kernel: past the one-segment
// shapes' 224. Below, where a GPU's shared memory holds no one-segment shape (sm_80 at ViT lengths), the kernel's
// 128-row blocks pad more rows (197 -> 256, against 224 in the forward's 32-row programs) and its exponentials
// stop overlapping the forward's shared-memory traffic: static model, A100, forward with it DeepViT-16b
// 145.9-665.3 -> 165.0-680.6 us, ViT-B 210.8-876.6 -> 220.7-898.0.
constexpr int kStatisticsKernelKeys = 225;

// Whether the plain forward of forward shape s over Nk keys reads its statistics from the statistics kernel:
// where it would sweep them itself (several key segments) over more than 224 keys, and that kernel is compiled
// for it.
inline bool takes_statistics_kernel(const TileShape& s, int D, int Nk) {
  if (segment_count(s, Nk) <= 1 || Nk < kStatisticsKernelKeys) return false;
  const StatisticsShape t = statistics_shape_for(s, D);
#define REATTN_STATISTICS_MATCH(kW, kT, kD, kN) \
  if (t.warps == kW && t.tiles == kT && t.d == kD && t.narrow == (kN != 0)) return true;
  REATTN_STATISTICS_SHAPES(REATTN_STATISTICS_MATCH)
#undef REATTN_STATISTICS_MATCH
  return false;
}

}  // namespace cuda
}  // namespace reattn
