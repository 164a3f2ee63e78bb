// The instantiated tile shapes of the tensor-core backward: its row pass (rows.cuh, D, dQ and the
// parameter-gradient partials) and its key pass (keys.cuh, dK and dV), and the rule that picks
// them. Plain C++ (the host plans with it; backward_kernels.cuh instantiates exactly these).
//
// The row pass keeps a key segment's P~ in shared memory (a whole row up to 224 keys; longer rows
// in segments of 64, the score phase once per sweep and segment) with a 2-slot ring of 16-key
// chunk tiles beside it (V, and in the second sweep K, each a step of its own), so its query
// blocks are small (16 or 32 rows); registers hold dO and dQ fragments of at most two or three
// heads per warp. The key pass holds dK and dV of two heads of one 16-key tile per warp (three in
// shape 4: 12 heads with no idle head slots, 32 keys per program; one head of two tiles in shape 5,
// two heads of two tiles in shape 6).
// A problem no pair of shapes serves runs the CUDA-core programs of programs.cuh.
#pragma once

#include <cstddef>

#include "row_configs.h"
#include "tiles.h"

namespace reattn {
namespace cuda {

// index, slabs, groups, heads, d, d_out, keys. One segment (Nk <= 224): H <= 8 and D <= 64
// (DeiT-S); H <= 16 and D <= 64 (ViT-B); H <= 16 and D <= 32 (DeepViT-16b). Segments of 64 keys
// (any Nk; the score phase once per sweep and segment; dO staged in shared memory): H <= 12 and
// D <= 48 (DeepViT-L-384); H <= 16 and D <= 64 (ViT-B at 384 px).
#define REATTN_BACKWARD_ROW_SHAPES(X) \
  X(0, 2, 4, 2, 64, 64, 224)          \
  X(1, 1, 8, 2, 64, 64, 224)          \
  X(2, 1, 8, 2, 32, 32, 224)          \
  X(3, 2, 4, 3, 48, 48, 64)           \
  X(4, 1, 8, 2, 64, 64, 64)

// index, kslabs, groups, heads, d, tiles (16-key tiles per warp). A warp of two tiles (shape 5: one
// head, 32 keys, one slab) reads each query chunk's Q and dO fragments once for both tiles, where two
// slabs of one tile (shape 0) read them twice: per key and chunk about a fifth less shared-memory
// traffic in the key pass (static model, DeiT-S). Its dK and dV take the registers of two heads of one
// tile; its exchange region (LayerNorm's general variant) is per tile, which keeps it off an A100
// (shape 0 serves it there). Shape 6, two heads of two tiles at D = 32 (DeepViT-16b), fits 255
// registers only in bf16's plain variants (key_shape_compiled; the general and fp16 variants, whose
// grad_mixed keeps LayerNorm's per-head state, took 32-120 bytes of stack, ptxas sm_80 and sm_90); elsewhere
// shape 4 (H <= 12, D <= 32) serves, picked over shape 2: 32 keys per program halve the per-key cost
// of staging each query chunk.
#define REATTN_KEY_SHAPES(X) \
  X(0, 2, 4, 2, 64, 1)       \
  X(1, 1, 8, 2, 64, 1)       \
  X(2, 1, 8, 2, 32, 1)       \
  X(3, 1, 8, 2, 48, 1)       \
  X(4, 2, 4, 3, 32, 1)       \
  X(5, 1, 8, 1, 64, 2)       \
  X(6, 1, 8, 2, 32, 2)

constexpr int kBackwardRowShapeCount = 5;

// Whether row shape `index` has a plain variant (row_configs.h). Shape 4 has none: compiled plain,
// its row pass used 8 bytes of stack at 255 registers on sm_80 (ptxas, CUDA 13), which its general
// variant does not; its problems run the general variants of both passes.
constexpr bool backward_rows_have_plain(int index) { return index != 4; }

// Whether row shape `index` is compiled in `variant` (bf16: the 16-bit type is bfloat16).
constexpr bool backward_rows_compiled(int variant, int index, bool bf16) {
  return variant == kBackwardRows ||
         (backward_rows_have_plain(index) &&
          (variant == kPlainBackwardRows || (variant == kPlainLayerBackwardRows && bf16)));
}

// The row pass's variant for a problem: the general one unless `plain` (no mask, no dropout, aligned
// rows: ops.cpp decides), and LayerNorm's own where it is compiled.
constexpr int backward_rows_variant(int index, bool plain, bool layer_norm, bool bf16) {
  return !plain ? kBackwardRows
         : layer_norm && backward_rows_compiled(kPlainLayerBackwardRows, index, bf16) ? kPlainLayerBackwardRows
                                                                                       : kPlainBackwardRows;
}

// The key pass's variants (KeyConfig's last argument, keys.cuh): general, plain, and LayerNorm's own
// plain one (bf16, every key shape).
constexpr int kKeysGeneral = 0;
constexpr int kKeysPlain = 1;
constexpr int kKeysPlainLayer = 2;
constexpr int backward_keys_variant(bool plain, bool layer_norm, bool bf16) {
  return !plain ? kKeysGeneral : layer_norm && bf16 ? kKeysPlainLayer : kKeysPlain;
}
constexpr int kKeyShapeCount = 7;

// Whether key shape `index` is compiled in `variant` (bf16: the 16-bit type is bfloat16): shape 6 in
// bf16's plain variants only.
constexpr bool key_shape_compiled(int variant, int index, bool bf16) {
  return index != 6 || (bf16 && variant != kKeysGeneral);
}

inline TileShape backward_row_shape(int index) {
  static const TileShape shapes[] = {
#define REATTN_SHAPE_ENTRY(i, slabs, groups, heads, d, d_out, keys) TileShape{slabs, groups, heads, d, d_out, keys, true},
      REATTN_BACKWARD_ROW_SHAPES(REATTN_SHAPE_ENTRY)
#undef REATTN_SHAPE_ENTRY
  };
  return shapes[index];
}

inline KeyShape key_shape(int index) {
  static const KeyShape shapes[] = {
#define REATTN_SHAPE_ENTRY(i, kslabs, groups, heads, d, tiles) KeyShape{kslabs, groups, heads, d, tiles},
      REATTN_KEY_SHAPES(REATTN_SHAPE_ENTRY)
#undef REATTN_SHAPE_ENTRY
  };
  return shapes[index];
}

// The key pass's shape for H heads of dim D in its `variant` (bf16: the 16-bit type), or -1, within
// the shared memory limit: the fewest wasted head dims, then the most keys, then the most tiles per
// warp.
inline int pick_key_shape(int H, int D, size_t shared_limit, int variant, bool bf16) {
  int keys = -1;
  long best = 0;
  for (int i = 0; i < kKeyShapeCount; ++i) {
    const KeyShape s = key_shape(i);
    if (!key_shape_compiled(variant, i, bf16) || H > s.max_heads() || D > s.d || key_layout(s, H).bytes > shared_limit) {
      continue;
    }
    // Per key, a warp of two tiles reads the chunks' Q and dO half as often as a slab of one.
    const long cost = static_cast<long>(s.d - D) * 1000 - 2 * (s.keys() / 16) - s.tiles;
    if (keys < 0 || cost < best) {
      keys = i;
      best = cost;
    }
  }
  return keys;
}

// Both passes' shapes for H heads of dim D, Nk keys, or false, within the shared memory limit: for
// the row pass one segment first (its score phase runs once), then the fewest wasted head dims,
// then the most rows per program; for the key pass pick_key_shape's in `key_variant` (the plain
// one by default: a caller that learns the variant from the row shape picks the key shape again
// where that one is not compiled in it).
inline bool pick_backward_shapes(int H, int D, int Nk, size_t shared_limit, int* rows, int* keys,
                                 int key_variant = kKeysPlain, bool bf16 = true) {
  *rows = -1;
  long best = 0;
  for (int i = 0; i < kBackwardRowShapeCount; ++i) {
    const TileShape s = backward_row_shape(i);
    if (H > s.max_heads() || D > s.d || (s.keys > 64 && Nk > s.keys) || row_layout(s, H, Nk).bytes > shared_limit) {
      continue;
    }
    // One segment first (the score phase once), then the fewest wasted head dims, the most rows.
    const long cost = (s.keys > 64 ? 0 : 100000) + static_cast<long>(s.d - D) * 1000 - s.slabs;
    if (*rows < 0 || cost < best) {
      *rows = i;
      best = cost;
    }
  }
  *keys = pick_key_shape(H, D, shared_limit, key_variant, bf16);
  return *rows >= 0 && *keys >= 0;
}

}  // namespace cuda
}  // namespace reattn
