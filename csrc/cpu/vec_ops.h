// Element-wise and small reduction kernels of the fused CPU Re-attention (csrc/cpu/re_attention.cpp).
//
// No torch headers here on purpose: vec_ops.cpp compiles every function for AVX-512, AVX2 and the
// baseline ISA (GCC target_clones, picked at load time by the CPU), which is only safe when no
// inline function shared with other translation units is compiled with the wider ISA.
// T is float (float32 and bfloat16 inputs) or double. Arrays are contiguous unless a stride is given.
#pragma once
#include <cstdint>

namespace reattn {
namespace cpu {
namespace vec {

// Row softmax in place over rows x n (leading dim n), writing each row's softmax statistics as two
// numbers: row_max[r] = m = max_j s[r, j] and row_log_sum[r] = log l, l = sum_j exp(s[r, j] - m).
// They stay two numbers because m + log l, one logsumexp, absorbs log l when |m| is large: a row whose
// every score carries a finite mask fill such as -1e9 has m + log(Nk) == m in float32, and
// exp(s - (m + log l)) would then weight every key 1 instead of 1/Nk. Fully masked rows (every entry
// -inf) become zeros with m = -inf.
template <typename T>
void softmax_rows(T* s, int64_t rows, int64_t n, T* row_max, T* row_log_sum);

// s[r, j] = exp((s[r, j] - m[r]) - log l[r]): the exact probabilities again from the saved statistics
// (s - m is exact where the scores share m's magnitude; zeros where m = -inf).
template <typename T>
void exp_sub_rows(T* s, int64_t rows, int64_t n, const T* row_max, const T* row_log_sum);

// x += y.
template <typename T>
void add_inplace(T* x, const T* y, int64_t n);

// x = 0 where madd == -inf (masked), unchanged elsewhere.
template <typename T>
void zero_masked(T* x, const T* madd, int64_t n);

// out = 1 where madd != -inf, else 0.
template <typename T>
void unmasked_indicator(T* out, const T* madd, int64_t n);

// Counter-based dropout: x[j] *= keep(seed, base + j) ? scale : 0.
template <typename T>
void dropout_apply(T* x, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold, T scale);
// The keep decision itself (1 = keep), bit-identical to dropout_apply's.
bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold);
void dropout_keep_row(uint8_t* out, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold);

// x = a * x + b.
template <typename T>
void affine(T* x, int64_t n, T a, T b);

// LayerNorm across H heads at each of E entries. m [H, E]: in M, out A = tau*(gamma*y + beta).
// y [H, E] out, rstd [E] out, mu [E] scratch. gamma/beta may be null (1 / 0).
template <typename T>
void layernorm_heads_fwd(T* m, T* y, T* rstd, T* mu, int64_t H, int64_t E, const T* gamma, const T* beta, T tau,
                         T eps);

// Backward of layernorm_heads_fwd. da [H, E]: in dA, out dM. dgamma/dbeta [H] accumulate
// (sum of tau*dA*y and tau*dA). t1, t2 [E] scratch.
template <typename T>
void layernorm_heads_bwd(T* da, const T* y, const T* rstd, T* t1, T* t2, int64_t H, int64_t E, const T* gamma,
                         T tau, T* dgamma, T* dbeta);

// Accumulate sum(x - center), sum((x - center)^2) and the count over unmasked entries (madd may be null).
template <typename T>
void moments(const T* x, const T* madd, int64_t n, T center, double* s1, double* s2, double* count);

// x = x - center on unmasked entries, 0 on masked ones (madd may be null), accumulating sum(x), sum(x^2)
// and the count of unmasked entries as moments does: moments' three passes in one.
template <typename T>
void center_moments(T* x, const T* madd, int64_t n, T center, double* s1, double* s2, double* count);

// BatchNorm with known statistics: y = (m - mu) * rstd; m = a * y + e.
template <typename T>
void bn_apply(T* m, T* y, int64_t n, T mu, T rstd, T a, T e);

// dM = k1 * dA + k2 * y + k3 (in place over da).
template <typename T>
void bn_backward(T* da, const T* y, int64_t n, T k1, T k2, T k3);

// Softmax backward per row: dp = p * (dp - sum_j p * dp).
template <typename T>
void softmax_bwd_rows(const T* p, T* dp, int64_t rows, int64_t n);

template <typename T>
T dot(const T* a, const T* b, int64_t n);
template <typename T>
T sum(const T* a, int64_t n);

// Portable GEMM (used when no BLAS is found): row-major C[m, n] = alpha * op(A) op(B) + beta * C.
template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                   int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace vec
}  // namespace cpu
}  // namespace reattn
