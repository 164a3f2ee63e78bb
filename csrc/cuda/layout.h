// Shared-memory layout of the fused programs: one function computes every buffer's offset, used
// by the programs (device and emulator) and by the host plan that sizes the launch, so the two
// cannot disagree. Plain C++; REATTN_HD comes from block.cuh when the programs include it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h"

#ifndef REATTN_HD
#define REATTN_HD inline
#endif

namespace reattn {
namespace cuda {

// Byte offsets into the program's shared memory; 0 = unused by this program kind. Element types:
// T = storage (fp16/bf16/fp32/fp64), Acc = accumulation (fp32, fp64 for fp64), E = bm * bn
// (block_m query rows x block_n keys).
struct SharedLayout {
  size_t q;        // T   [head_group][bm][head_dim_p]   query rows of the staged heads
  size_t dout;     // T   [head_group][bm][head_dim_p]   dO rows (backward)
  size_t k;        // T   [head_group][bn][head_dim_p]   key rows
  size_t v;        // T   [head_group][bn][head_dim_p or chunk_d]
  size_t scores;   // Acc [heads_p][E]   q k^T -> (forward) mixed M; (backward) P
  size_t mixed;    // Acc [heads_p][E]   (backward) M -> dN -> dP~
  size_t dattn;    // Acc [H][E]         (backward) dO v^T -> dN xhat
  size_t probs;    // T   [heads_p][E]   P~ (forward: then A)
  size_t attn;     // T   [H][E]         (backward) A -> dS
  size_t dmixed;   // T   [heads_p][E]   (backward) dM
  size_t flags;    // u8  [H][E]         bit 0: attended (valid, unmasked); bit 1: kept by dropout
  size_t out;      // Acc [H][bm][chunk_d]   O (forward) or dQ (backward) accumulator
  size_t stage;    // Acc [head_group][bn][chunk_d]   dK / dV tile before the atomic adds
  size_t w;        // T   [heads_p][heads_p]   mixing weight W[g, h]
  size_t wt;       // T   [heads_p][heads_p]   W^T (backward)
  size_t dw;       // Acc [heads_p][heads_p] (backward) dW accumulator
  size_t vec;      // Acc [7][H]   c, gamma, beta, batch mean, batch 1/std, e, f
  size_t lse;      // Acc [2][H][bm]   row statistics: max, then log-sum
  size_t row_a;    // Acc [H][bm]   running max (forward) / D = rowsum(P dP) (backward)
  size_t row_b;    // Acc [H][bm]   running sum (forward)
  size_t partial;  // Acc [3 H][kReduceLanes]   two-level reductions
  size_t sums;     // f64 [H][H] + [3][H]   statistics / parameter-gradient sums across tiles
  size_t bytes;    // total
};

REATTN_HD size_t align_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

// Hands out 128-byte aligned sections (WMMA needs 32-byte aligned tile pointers).
struct SectionAllocator {
  size_t at = 0;
  REATTN_HD size_t take(size_t bytes) {
    const size_t offset = at;
    at = align_up(at + bytes, 128);
    return offset;
  }
};

REATTN_HD SharedLayout shared_layout(int kind, const Plan& plan, int H, size_t t_size, size_t acc_size) {
  SharedLayout L{};
  SectionAllocator sections;
  const size_t hg = plan.head_group, dp = plan.head_dim_p, hp = plan.heads_p, dc = plan.chunk_d;
  const size_t bm = plan.block_m, bn = plan.block_n, E = bm * bn, h = H;
  const bool forward = kind == kForward, stats = kind == kGramSums;
  const bool backward = kind == kBackward || kind == kBnGradSums;
  L.q = sections.take(hg * bm * dp * t_size);
  L.dout = backward ? sections.take(hg * bm * dp * t_size) : 0;
  L.k = sections.take(hg * bn * dp * t_size);
  L.v = stats ? 0 : sections.take(hg * bn * (forward ? dc : dp) * t_size);
  L.scores = sections.take(hp * E * acc_size);
  L.mixed = backward ? sections.take(hp * E * acc_size) : 0;
  L.dattn = backward ? sections.take(h * E * acc_size) : 0;
  L.probs = stats ? 0 : sections.take(hp * E * t_size);
  L.attn = backward ? sections.take(h * E * t_size) : 0;
  L.dmixed = backward ? sections.take(hp * E * t_size) : 0;
  L.flags = stats ? 0 : sections.take(h * E);
  L.out = stats || kind == kBnGradSums ? 0 : sections.take(h * bm * dc * acc_size);
  L.stage = kind == kBackward ? sections.take(hg * bn * dc * acc_size) : 0;
  L.w = stats ? 0 : sections.take(hp * hp * t_size);
  L.wt = backward ? sections.take(hp * hp * t_size) : 0;
  L.dw = kind == kBackward ? sections.take(hp * hp * acc_size) : 0;
  L.vec = sections.take(7 * h * acc_size);
  L.lse = sections.take(2 * h * bm * acc_size);
  L.row_a = sections.take(h * bm * acc_size);
  L.row_b = forward || stats ? sections.take(h * bm * acc_size) : 0;
  L.partial = sections.take(3 * h * kReduceLanes * acc_size);
  L.sums = sections.take((h * h + 3 * h) * sizeof(double));
  L.bytes = sections.at;
  return L;
}

REATTN_HD int round_up(int x, int to) { return (x + to - 1) / to * to; }

// The launch plan of program `kind` for H heads of dim D and Nq query rows, or false when no
// layout fits `shared_limit` bytes. Preference: tensor cores (fp16/bf16 only: 16 x 16 tiles,
// dims padded to 16), then the whole head dim per program (every further chunk repeats all the
// score work), then all heads staged at once (fewer reloads of q/k/v); when nothing fits, CUDA-core
// products on smaller tiles (fp16/bf16 too: slower, but every H <= 32 and D <= 128 runs).
inline bool make_plan(int kind, int H, int D, int Nq, size_t t_size, size_t acc_size, bool tensor_cores,
                      size_t shared_limit, Plan* out) {
  static const int kTiles[][3] = {{16, 16, 16}, {16, 16, 1}, {16, 8, 1}, {8, 8, 1}, {8, 4, 1}, {4, 4, 1}};
  const bool chunked = kind == kForward || kind == kBackward;  // the others write no head-dim columns
  for (const auto& tile : kTiles) {
    Plan plan;
    plan.block_m = tile[0];
    plan.block_n = tile[1];
    plan.pad = tile[2];
    if (plan.pad == 16 && !tensor_cores) continue;
    plan.head_dim_p = round_up(D > 0 ? D : 1, plan.pad);
    plan.heads_p = round_up(H, plan.pad);
    plan.num_m = (Nq + plan.block_m - 1) / plan.block_m;
    for (int chunk = plan.head_dim_p;; chunk = round_up((chunk + 1) / 2, plan.pad)) {
      for (int group = H;; group = (group + 1) / 2) {
        plan.chunk_d = chunked ? chunk : plan.head_dim_p;
        plan.num_chunks = (plan.head_dim_p + plan.chunk_d - 1) / plan.chunk_d;
        plan.head_group = group;
        plan.shared_bytes = shared_layout(kind, plan, H, t_size, acc_size).bytes;
        if (plan.shared_bytes <= shared_limit) {
          *out = plan;
          return true;
        }
        if (group == 1) break;
      }
      if (!chunked || chunk == plan.pad) break;
    }
  }
  return false;
}

}  // namespace cuda
}  // namespace reattn
