// Row statistics of attention scores: L[b,h,i] = logsumexp_j(scale * <q[b,h,i,:], k[b,h,j,:]>).
// This is pass 1 of the fused Re-attention forward (see docs/math.md):
// the exact softmax P = exp(S - L) can then be recomputed tile by tile in pass 2.
//
// Raw pointers and strides only (no torch types) so this header stays cheap to include.
#pragma once
#include <cstdint>

namespace reattn {
namespace cpu {

struct Strides4 {
  int64_t b, h, n, d;
};

// q: [B, H, Nq, D] with strides q_st; k: [B, H, Nk, D] with strides k_st;
// out: contiguous [B, H, Nq] in acc_t (float for float/bfloat16 inputs, double for double).
template <typename scalar_t, typename acc_t>
void row_logsumexp(const scalar_t* q, Strides4 q_st, const scalar_t* k, Strides4 k_st, acc_t* out,
                   int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale);

// Runs at::parallel_for over n_tasks one-element chunks and returns how many distinct threads
// executed them: proves the extension was compiled and linked with OpenMP.
int parallel_thread_count(int64_t n_tasks);

}  // namespace cpu
}  // namespace reattn
