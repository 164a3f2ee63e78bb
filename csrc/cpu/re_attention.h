// Fused Re-attention on the CPU, forward and backward (see docs/math.md and
// the comment at the top of re_attention.cpp for the blocking). Raw pointers only, no torch types.
#pragma once
#include <cstdint>

#include "row_stats.h"

namespace reattn {
namespace cpu {

enum NormKind : int { kNormNone = 0, kNormLayer = 1, kNormBatchTrain = 2 };

struct ReAttnParams {
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, D = 0;
  double scale = 1.0, out_scale = 1.0, eps = 1e-5;
  int norm = kNormNone;  // eval-mode BatchNorm arrives folded into the mixing as kNormNone
  // Mask as a [B, mask_heads, Nq, Nk] view (element strides, 0 on broadcast dims): bool (uint8, 1 = attend)
  // or additive in acc_t (-inf = masked). mask == nullptr: no mask.
  const void* mask = nullptr;
  bool mask_is_bool = false;
  int64_t mask_heads = 1;
  Strides4 mask_st{0, 0, 0, 0};
  double dropout_p = 0.0;  // > 0: dropout with the counter-based RNG keyed by (seed, b, h, i, j)
  uint64_t seed = 0;
};

// A [B, H, N, D] input: data and element strides.
struct View4 {
  const void* data;
  Strides4 st;
};

// Forward. W [H, H] row-major, c [H] (zeros when absent), gamma/beta [H] or null, all in acc_t.
// out: contiguous [B, H, Nq, D]; softmax_stats: contiguous [2, B, H, Nq], each score row's max m, then
// log l with l = sum_j exp(s_j - m) (m = -inf for a row whose every key is masked by -inf). Two numbers,
// not one logsumexp m + log l, which absorbs log l next to a large finite mask fill (vec::softmax_rows).
// kNormBatchTrain only: R = Xhat V and U = 1_unmasked V (contiguous [B, H, Nq, D], saved for backward),
// stats [3, H] = batch mean, biased variance, count of unmasked entries per head (if any count <= 1
// the function returns after computing stats, leaving out undefined: the caller raises).
// given_stats (kNormBatchTrain only): stats and softmax_stats are inputs, not outputs: the statistics of
// a batch larger than this call's (synchronized across processes from gram_sums' sums) and the
// softmax statistics gram_sums wrote. The forward then runs its main sweep only.
template <typename scalar_t, typename acc_t>
void re_attention_forward(const ReAttnParams& p, View4 q, View4 k, View4 v, const acc_t* W, const acc_t* c,
                          const acc_t* gamma, const acc_t* beta, scalar_t* out, acc_t* softmax_stats, acc_t* R,
                          acc_t* U, double* stats, bool given_stats = false);

// Training-mode BatchNorm statistics as Gram-matrix sums (docs/math.md), for
// statistics synchronized across processes: these sums add up over processes, mean and variance
// do not. With X = P~ - shift (shift = 1/Nk rounded to float) on the entries unmasked for mask head m
// and X = 0 elsewhere:
//   s1[m, h] = sum X_h,   gram[m, h, h'] = sum X_h X_h',   count[m] = number of unmasked entries,
// m in [0, mask_heads) (1 without a mask or with one shared by all heads; H for a per-head mask, as
// head g's statistics then run over its own entries). M_g - c_g - shift sum_h W[g, h] = (W X)_g, so
// mean and variance of M_g follow from W, c, shift and these sums. Also writes softmax_stats (as the forward).
// s1 [mask_heads, H], gram [mask_heads, H, H], count [mask_heads] are outputs (double, contiguous).
template <typename scalar_t, typename acc_t>
void gram_sums(const ReAttnParams& p, View4 q, View4 k, acc_t shift, acc_t* softmax_stats, double* s1,
               double* gram, double* count);

// The two per-head sums training-mode BatchNorm's backward needs, over this call's entries, with
// dN = out_scale dA the gradient w.r.t. the norm's output and y = Xhat, in double:
// sums[g] = sum dN_g y_g = out_scale <dO_g, R_g>, sums[H + g] = sum dN_g = out_scale <dO_g, U_g>.
template <typename scalar_t, typename acc_t>
void bn_grad_sums(const ReAttnParams& p, View4 dout, const acc_t* R, const acc_t* U, double* sums);

// Backward. dq: contiguous [B, H, Nq, D] in scalar_t; dk, dv: contiguous [B, H, Nk, D] in acc_t, zeroed
// by the caller; dW [H, H], dc, dgamma, dbeta [H] in double, zeroed by the caller.
// sums_in (kNormBatchTrain, may be null): bn_grad_sums' [2, H] summed over every process. Given, the
// norm backward uses them with stats' (global) count, and dgamma/dbeta get no BatchNorm contribution
// (they are this process's own sums, which the caller has); null, this call's own sums.
template <typename scalar_t, typename acc_t>
void re_attention_backward(const ReAttnParams& p, View4 dout, View4 q, View4 k, View4 v, const acc_t* W,
                           const acc_t* c, const acc_t* gamma, const acc_t* beta, const acc_t* softmax_stats,
                           const acc_t* R, const acc_t* U, const double* stats, scalar_t* dq, acc_t* dk, acc_t* dv,
                           double* dW, double* dc, double* dgamma, double* dbeta, const double* sums_in = nullptr);

// The dropout keep-mask the kernels use, materialized: out contiguous [B, H, Nq, Nk] (1 = keep).
void dropout_keep_mask(uint8_t* out, int64_t B, int64_t H, int64_t Nq, int64_t Nk, uint64_t seed, double p);

// Which GEMM the kernels call: "blas (sgemm_/dgemm_ from torch's BLAS)" or "portable fallback".
const char* gemm_backend_name();

// How many parallel chunks (threads with work) the last forward or backward main sweep used.
int last_parallel_chunks();

}  // namespace cpu
}  // namespace reattn
