// Tile shapes and shared-memory layout of the tensor-core row programs (rows.cuh: the forward and
// the backward's row pass). Plain C++: the host plans launches with it, the device code computes
// its buffer offsets with it, so the two cannot disagree.
//
// A program is one batch element, 16 * slabs query rows, every head, and `d_out` columns of the
// head dim of its output. Its warps form a grid of slabs (16 query rows) x groups: in the score
// phase warp (slab, group) computes the scores of heads group, group + groups, ... for its rows,
// the whole key segment in registers; in the mixing phase it owns the output heads group,
// group + groups, ... (at most `heads` of them) and their O accumulators.
#pragma once

#include <cstddef>
#include <cstdint>

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
  bool backward = false;  // the backward's row pass (its buffers below)

  REATTN_HD int warps() const { return slabs * groups; }
  REATTN_HD int threads() const { return 32 * slabs * groups; }
  REATTN_HD int rows() const { return 16 * slabs; }
  REATTN_HD int max_heads() const { return groups * heads; }
};

// The forward's narrow tail (rows.cuh RowProgram::kNarrowTail): a shape whose head-dim columns end
// in a half-filled k16 step (d = 16 mod 32) has a second forward program, run where D leaves the last
// 8 of its d columns empty.
constexpr REATTN_HD bool has_narrow_tail(bool backward, int d, int d_out) { return !backward && d % 32 == 16 && d_out == d; }
REATTN_HD bool narrow_tail(const TileShape& s, int D) { return has_narrow_tail(s.backward, s.d, s.d_out) && D <= s.d - 8; }

REATTN_HD size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Elements per shared-memory row of 16-bit values: whole 16-byte units, an odd number of them, so
// the 8 rows one ldmatrix (or a warp's cp.async) touches fall in 8 different bank groups.
constexpr REATTN_HD int padded_row(int elements) { return (((elements + 7) / 8) | 1) * 8; }

REATTN_HD int round_up16(int x) { return (x + 15) / 16 * 16; }

// Keys per segment and segments: one segment (the softmax exact from registers) when Nk fits.
REATTN_HD int segment_keys(const TileShape& s, int Nk) { return Nk <= s.keys ? round_up16(Nk) : s.keys; }
REATTN_HD int segment_count(const TileShape& s, int Nk) { return Nk <= s.keys ? 1 : (Nk + s.keys - 1) / s.keys; }
// Whether a row program stages its block's q rows in shared memory (rows.cuh kQueriesShared): the forward's
// segmented shapes (at most 64 keys a segment), which read them again in every segment. They copy q's rows
// element by element where they are not 16-byte aligned, so the host pads k and v alone for them (ops.cpp
// forward_stages_queries).
REATTN_HD constexpr bool stages_queries(bool backward, int keys) { return !backward && keys <= 64; }

// Byte offsets into the program's dynamic shared memory (32-bit: a block has at most 227 KB; fewer
// registers when the compiler keeps them live).
struct RowLayout {
  uint32_t probs;     // E   [H][head_stride]: [rows][p_row]  P~ of the key segment (sign bit set: masked)
  int p_row;
  uint32_t ring;      // 2 slots of ring_slot bytes; step i uses slot i % 2 whatever it holds: K tiles
  uint32_t ring_slot; // E [groups][kKeyTile][k_row] in the score phase, V tiles E [H][kValueTile][v_row]
  int k_row;        // in the mixing phase (backward: V or K chunk tiles [H][kValueTile][k_row], one
  int v_row;        // per step), so the next step's load never hits the current slot
  uint32_t weights;   // f32 [max_heads][groups][4 or 8]   W'[g][h] at [h][g % groups][g / groups] (padded)
  uint32_t vectors;   // f32 [kVectorRows][max_heads] + 2  per-head parameters (RowProgram), mean of c', 1/H
  uint32_t stats;     // f32 [H][rows][2]                  row max and log-sum (given, or the statistics sweep's)
  uint32_t exchange;  // f32 [slabs][groups][32][8 or 24]  LayerNorm partial sums across a slab's warps
  uint32_t moments;   // f32 [warps][2][heads]             BatchNorm moment partials (forward)
  // Backward only:
  uint32_t weights_t; // f32 [max_heads][groups][4 or 8]   W'[g][h] at [g][h % groups][h / groups]; the
                      // plain bf16 variant: u32 [4][32][4], per lane the mma A fragments of W' (hi, lo)
                      // and W'^T (hi, lo), then LayerNorm's (mixing.cuh fill_layer_table): at least
                      // kLayerFragmentTableBytes
  uint32_t dmixed;    // E   [H][head_stride]: [rows][m_row]  dM of the current 16-key chunk
  int m_row;
  uint32_t delta;     // f32 [H][rows]                     D = sum_j P~ dP' per row
  uint32_t sums;      // f32 [warps][heads][max_heads + 3] parameter-gradient partials
  uint32_t grads;     // E   [H][rows][k_row]              (several segments) dO of the block's rows
  // Forward only:
  uint32_t queries;   // E   [H][rows][k_row]              (several segments) q of the block's rows
  uint32_t bytes;
};

constexpr int kVectorRows = 8;
constexpr size_t kFragmentTableBytes = 4 * 32 * 4 * 4;
// LayerNorm's table after it (mixing.cuh fill_layer_table: u32 [6][32][4]), in both backward passes.
constexpr size_t kLayerFragmentTableBytes = kFragmentTableBytes + 6 * 32 * 4 * 4;

// Elements from one head's [rows][row] tile of P~ or dM to the next. The plain backward row pass
// and the forward's tensor-core mixing read one entry of every head at once (ldmatrix rows 8 heads
// apart: the dW products and mix_in_place of rows.cuh). rows * row elements is a multiple of 128
// bytes, which would put those 8 rows in one bank group; 8 more elements (16 bytes) spread them
// over all 8. The layout reserves them for every program: max_heads of them, plus 8 elements for
// P~ (the forward's row of ones, rows.cuh ones_row). That is a compile-time size: an H-dependent
// one costs the general variant's sm_80 build, at 255 registers, 8 bytes of stack. The general
// variant, which has no such reads, keeps the unpadded stride (padded, its sm_90 build needs 16
// bytes of stack).
constexpr int kHeadPadding = 8;
constexpr REATTN_HD int head_stride(int rows, int row, bool padded) { return rows * row + (padded ? kHeadPadding : 0); }

REATTN_HD RowLayout row_layout(const TileShape& s, int H, int Nk) {
  RowLayout L{};
  const size_t e = 2;  // bytes of a 16-bit element
  const size_t mh = static_cast<size_t>(s.max_heads());
  const size_t pad = s.heads <= 4 ? 4 : 8;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const uint32_t offset = static_cast<uint32_t>(at);
    at = align128(at + bytes);
    return offset;
  };
  L.p_row = padded_row(segment_keys(s, Nk));
  L.probs = take((static_cast<size_t>(H) * s.rows() * L.p_row + (s.max_heads() + 1) * kHeadPadding) * e);
  L.k_row = padded_row(s.d);
  L.v_row = padded_row(s.d_out);
  const size_t k_tile = static_cast<size_t>(s.groups) * kKeyTile * L.k_row * e;
  const size_t v_tile = static_cast<size_t>(H) * kValueTile * (s.backward ? L.k_row : L.v_row) * e;
  L.ring_slot = static_cast<uint32_t>(align128(k_tile > v_tile ? k_tile : v_tile));
  L.ring = take(2 * L.ring_slot);
  L.weights = take(mh * s.groups * pad * 4);
  L.vectors = take((kVectorRows * mh + 2) * 4);
  L.stats = take(s.backward || segment_count(s, Nk) > 1 ? static_cast<size_t>(H) * s.rows() * 2 * 4 : 0);
  L.exchange = take(s.groups > 1 ? static_cast<size_t>(s.slabs) * s.groups * 32 * (s.backward ? 24 : 8) * 4 : 0);
  L.moments = take(s.backward ? 0 : static_cast<size_t>(s.warps()) * 2 * s.heads * 4);
  L.m_row = padded_row(kValueTile);
  const size_t weights_t = mh * s.groups * pad * 4;
  L.weights_t = take(!s.backward ? 0 : weights_t > kLayerFragmentTableBytes ? weights_t : kLayerFragmentTableBytes);
  L.dmixed = take(s.backward ? (static_cast<size_t>(H) * s.rows() * L.m_row + s.max_heads() * kHeadPadding) * e : 0);
  L.delta = take(s.backward ? static_cast<size_t>(H) * s.rows() * 4 : 0);
  L.sums = take(s.backward ? static_cast<size_t>(s.warps()) * s.heads * (mh + 3) * 4 : 0);
  L.grads = take(s.backward && s.keys <= 64 ? static_cast<size_t>(H) * s.rows() * L.k_row * e : 0);
  L.queries = take(!s.backward && s.keys <= 64 ? static_cast<size_t>(H) * s.rows() * L.k_row * e : 0);
  L.bytes = at;
  return L;
}

// The statistics kernel (statistics.cuh): one head of one batch element, warps x tiles m16 tiles of query rows
// (16 warps tiles rows), d columns of q.k; narrow: the last k16 step's first 8 columns alone. Its shared memory
// is a 2-slot ring of K tiles [kKeyTile][statistics_row].
struct StatisticsShape {
  int warps;
  int tiles;
  int d;
  bool narrow;

  REATTN_HD int threads() const { return 32 * warps; }
  REATTN_HD int rows() const { return 16 * warps * tiles; }
};

constexpr REATTN_HD int statistics_row(const StatisticsShape& s) { return padded_row(s.d); }
REATTN_HD size_t statistics_slot_bytes(const StatisticsShape& s) { return align128(kKeyTile * statistics_row(s) * 2); }
REATTN_HD size_t statistics_bytes(const StatisticsShape& s) { return 2 * statistics_slot_bytes(s); }

// The backward's key pass (keys.cuh): 16 * kslabs keys per program, warps kslabs x groups.
struct KeyShape {
  int kslabs;
  int groups;
  int heads;
  int d;
  int tiles;  // 16-key tiles per warp (keys.cuh): the slab's keys, 16 tiles

  REATTN_HD int warps() const { return kslabs * groups; }
  REATTN_HD int threads() const { return 32 * kslabs * groups; }
  REATTN_HD int keys() const { return 16 * kslabs * tiles; }
  REATTN_HD int max_heads() const { return groups * heads; }
};

struct KeyLayout {
  uint32_t keys;      // E   [H][keys][row]          the block's K
  uint32_t values;    // E   [H][keys][row]          the block's V
  int row;
  uint32_t ring;      // 2 slots: Q E [H][16][row], dO E [H][16][row], f32 [3][H][16] (m, log l, D; keys.cuh)
  uint32_t ring_slot;
  uint32_t probs_t;   // E   [H][keys][t_row]        P~^T of the current query chunk
  uint32_t dmixed;    // E   [H][keys][t_row]        dM^T of the current query chunk
  int t_row;
  uint32_t weights;   // f32 [max_heads][groups][4 or 8]   W'[g][h]
  uint32_t weights_t; // f32 [max_heads][groups][4 or 8]   W'[g][h] transposed; the plain bf16 variant:
                      // the fragment tables of RowLayout::weights_t (at least kLayerFragmentTableBytes)
  uint32_t vectors;   // f32 [kVectorRows][max_heads] + 2
  uint32_t exchange;  // f32 [kslabs tiles][groups][32][24] LayerNorm sums across the group's warps
  uint32_t bytes;
};

REATTN_HD KeyLayout key_layout(const KeyShape& s, int H) {
  KeyLayout L{};
  const size_t e = 2, h = static_cast<size_t>(H), mh = static_cast<size_t>(s.max_heads());
  const size_t pad = s.heads <= 4 ? 4 : 8;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const uint32_t offset = static_cast<uint32_t>(at);
    at = align128(at + bytes);
    return offset;
  };
  L.row = padded_row(s.d);
  L.keys = take(h * s.keys() * L.row * e);
  L.values = take(h * s.keys() * L.row * e);
  L.ring_slot = static_cast<uint32_t>(align128(2 * h * 16 * L.row * e + h * 16 * 3 * 4));
  L.ring = take(2 * L.ring_slot);
  L.t_row = padded_row(16);
  // Head padding (head_stride) for the plain variant's tensor-core products (keys.cuh).
  L.probs_t = take((h * s.keys() * L.t_row + mh * kHeadPadding) * e);
  L.dmixed = take((h * s.keys() * L.t_row + mh * kHeadPadding) * e);
  L.weights = take(mh * s.groups * pad * 4);
  L.weights_t = take(mh * s.groups * pad * 4 > kLayerFragmentTableBytes ? mh * s.groups * pad * 4 : kLayerFragmentTableBytes);
  L.vectors = take((kVectorRows * mh + 2) * 4);
  L.exchange = take(s.groups > 1 ? static_cast<size_t>(s.kslabs) * s.tiles * s.groups * 32 * 24 * 4 : 0);
  L.bytes = static_cast<uint32_t>(at);
  return L;
}

}  // namespace cuda
}  // namespace reattn
