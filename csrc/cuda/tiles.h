// Tile shapes and shared-memory layout of the tensor-core programs (forward.cuh). Plain C++: the
// host plans launches with it, the device code computes its buffer offsets with it, so the two
// cannot disagree.
//
// A program is one batch element, 16 * slabs query rows, every head, and `d_out` columns of the
// head dim of its output. Its warps form a grid of slabs (16 query rows) x groups: in the score
// phase warp (slab, group) computes the scores of heads group, group + groups, ... for its rows,
// the whole key segment in registers; in the mixing phase it owns the output heads group,
// group + groups, ... (at most `heads` of them) and their O accumulators.
#pragma once

#include <cstddef>

#ifndef REATTN_HD
#if defined(__CUDACC__)
#define REATTN_HD __host__ __device__ __forceinline__
#else
#define REATTN_HD inline
#endif
#endif

namespace reattn {
namespace cuda {

constexpr int kKeyTile = 32;    // keys per K-ring stage (score phase)
constexpr int kValueTile = 16;  // keys per V-ring stage (mixing phase): one k16 step of A V

// The compile-time shape of an instantiated program, as numbers the host can reason about.
struct TileShape {
  int slabs;   // query rows / 16
  int groups;  // warps per slab
  int heads;   // output heads one warp owns at most (H <= groups * heads)
  int d;       // head dim of the q.k products, padded to 16
  int d_out;   // output head-dim columns per program (multiple of 16)
  int keys;    // keys of one segment held in registers by the score phase (multiple of kKeyTile)

  REATTN_HD int warps() const { return slabs * groups; }
  REATTN_HD int threads() const { return 32 * slabs * groups; }
  REATTN_HD int rows() const { return 16 * slabs; }
  REATTN_HD int max_heads() const { return groups * heads; }
};

REATTN_HD size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Elements per shared-memory row of 16-bit values: whole 16-byte units, an odd number of them, so
// the 8 rows one ldmatrix (or a warp's cp.async) touches fall in 8 different bank groups.
REATTN_HD int padded_row(int elements) { return (((elements + 7) / 8) | 1) * 8; }

REATTN_HD int round_up16(int x) { return (x + 15) / 16 * 16; }

// Keys per segment and segments: one segment (the softmax exact from registers) when Nk fits.
REATTN_HD int segment_keys(const TileShape& s, int Nk) { return Nk <= s.keys ? round_up16(Nk) : s.keys; }
REATTN_HD int segment_count(const TileShape& s, int Nk) { return Nk <= s.keys ? 1 : (Nk + s.keys - 1) / s.keys; }

// Byte offsets into the program's dynamic shared memory.
struct ForwardLayout {
  size_t probs;     // E   [H][rows][p_row]              P~ of the key segment (sign bit set: masked)
  int p_row;
  size_t ring;      // 2 slots of ring_slot bytes: K tiles E [groups][kKeyTile][k_row] in the score
  size_t ring_slot; // phase, V tiles E [H][kValueTile][v_row] in the mixing phase; step i uses slot
  int k_row;        // i % 2 whatever its kind, so the next step's load never hits the current slot
  int v_row;
  size_t weights;   // f32 [max_heads][groups][4 or 8]   W'[g][h] at [h][g % groups][g / groups] (padded)
  size_t vectors;   // f32 [4][max_heads] + 2            c', LayerNorm tau gamma, tau beta, column means of W'; mean of c', 1/H
  size_t stats;     // f32 [H][rows][2]                  row max and log-sum (several segments)
  size_t exchange;  // f32 [slabs][groups][32][8]        LayerNorm partial sums across a slab's warps
  size_t moments;   // f32 [warps][2][heads]             BatchNorm moment partials
  size_t bytes;
};

REATTN_HD ForwardLayout forward_layout(const TileShape& s, int H, int Nk) {
  ForwardLayout L{};
  const size_t e = 2;  // bytes of a 16-bit element
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t offset = at;
    at = align128(at + bytes);
    return offset;
  };
  L.p_row = padded_row(segment_keys(s, Nk));
  L.probs = take(static_cast<size_t>(H) * s.rows() * L.p_row * e);
  L.k_row = padded_row(s.d);
  L.v_row = padded_row(s.d_out);
  const size_t k_tile = static_cast<size_t>(s.groups) * kKeyTile * L.k_row * e;
  const size_t v_tile = static_cast<size_t>(H) * kValueTile * L.v_row * e;
  L.ring_slot = align128(k_tile > v_tile ? k_tile : v_tile);
  L.ring = take(2 * L.ring_slot);
  L.weights = take(static_cast<size_t>(s.max_heads()) * s.groups * (s.heads <= 4 ? 4 : 8) * 4);
  L.vectors = take((4 * static_cast<size_t>(s.max_heads()) + 2) * 4);
  L.stats = take(segment_count(s, Nk) > 1 ? static_cast<size_t>(H) * s.rows() * 2 * 4 : 0);
  L.exchange = take(s.groups > 1 ? static_cast<size_t>(s.slabs) * s.groups * 32 * 8 * 4 : 0);
  L.moments = take(static_cast<size_t>(s.warps()) * 2 * s.heads * 4);
  L.bytes = at;
  return L;
}

}  // namespace cuda
}  // namespace reattn
