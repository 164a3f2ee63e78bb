// See vec_ops.h. Plain loops written so that GCC vectorizes them (fixed-width lane accumulators
// instead of floating-point reductions, a polynomial exp without libm calls), compiled once per ISA
// with target_clones and dispatched when the library loads. No torch headers in this file.
#include "vec_ops.h"

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define REATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define REATTN_CLONES
#endif
#define REATTN_INLINE inline __attribute__((always_inline))

namespace reattn {
namespace cpu {
namespace vec {
namespace {

constexpr int kLanes = 16;

// exp for float without libm: Cephes' expf polynomial, 2^n assembled from bits; exact 0 below -87.3
// (so -inf, the masked score, gives 0), relative error ~1e-7 elsewhere.
REATTN_INLINE float exp_approx(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const float n = t - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

REATTN_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename T>
REATTN_INLINE T lane_sum(const T* a, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l];
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += a[j];
  return s;
}

template <typename T>
REATTN_INLINE T lane_dot(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Max over the non-NaN entries, in 32-byte GCC vectors: the lane-array form that vectorizes the sums
// stayed a scalar compare chain for max (measured: ~30% of the forward at DeepViT-16b with the
// NaN-aware select, vmaxss after dropping it). Callers needing NaN to win check has_nan where it
// matters (a row whose max is -inf).
template <typename T>
REATTN_INLINE T lane_max(const T* a, int64_t n) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int w = 32 / sizeof(T);
  const T lowest = -std::numeric_limits<T>::infinity();
  V acc0, acc1;
  for (int l = 0; l < w; ++l) acc0[l] = acc1[l] = lowest;
  int64_t j = 0;
  for (; j + 2 * w <= n; j += 2 * w) {
    V x0, x1;
    std::memcpy(&x0, a + j, sizeof(V));
    std::memcpy(&x1, a + j + w, sizeof(V));
    acc0 = x0 > acc0 ? x0 : acc0;
    acc1 = x1 > acc1 ? x1 : acc1;
  }
  acc0 = acc1 > acc0 ? acc1 : acc0;
  T m = lowest;
  for (int l = 0; l < w; ++l) m = acc0[l] > m ? acc0[l] : m;
  for (; j < n; ++j) m = a[j] > m ? a[j] : m;
  return m;
}

template <typename T>
REATTN_INLINE bool has_nan(const T* a, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (a[j] != a[j]) return true;
  return false;
}

// x = exp(x - m), returning the sum of the new x (one pass instead of two).
template <typename T>
REATTN_INLINE T exp_sub_sum(T* x, int64_t n, T m) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_approx(x[j + l] - m);
      x[j + l] = e;
      acc[l] += e;
    }
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) {
    x[j] = exp_approx(x[j] - m);
    s += x[j];
  }
  return s;
}

REATTN_INLINE uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

REATTN_INLINE bool keep_of(uint64_t seed, uint64_t index, uint32_t threshold) {
  const uint64_t h = mix64(seed ^ mix64(index * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull));
  return static_cast<uint32_t>(h >> 32) >= threshold;
}

}  // namespace

template <typename T>
REATTN_CLONES void softmax_rows(T* s, int64_t rows, int64_t n, T* row_max, T* row_log_sum) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * n;
    const T m = lane_max(x, n);
    // A NaN score makes the row NaN (as torch's softmax): with a finite max, exp(NaN - m) puts NaN in
    // the total; with a -inf max (every other key masked) it must be looked for.
    if (m == -kInf && has_nan(x, n)) {
      for (int64_t j = 0; j < n; ++j) x[j] = std::numeric_limits<T>::quiet_NaN();
      row_max[r] = row_log_sum[r] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    if (m == -kInf) {  // every key masked: zeros, never NaN
      for (int64_t j = 0; j < n; ++j) x[j] = 0;
      row_max[r] = -kInf;
      row_log_sum[r] = -kInf;
      continue;
    }
    const T total = exp_sub_sum(x, n, m);
    const T inv = T(1) / total;
    for (int64_t j = 0; j < n; ++j) x[j] *= inv;
    row_max[r] = m;
    row_log_sum[r] = std::log(total);
  }
}

template <typename T>
REATTN_CLONES void exp_sub_rows(T* s, int64_t rows, int64_t n, const T* row_max, const T* row_log_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * n;
    const T m = row_max[r], log_l = row_log_sum[r];
    if (m == -std::numeric_limits<T>::infinity()) {
      for (int64_t j = 0; j < n; ++j) x[j] = 0;
      continue;
    }
    for (int64_t j = 0; j < n; ++j) x[j] = exp_approx((x[j] - m) - log_l);
  }
}

template <typename T>
REATTN_CLONES void add_inplace(T* x, const T* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] += y[j];
}

template <typename T>
REATTN_CLONES void zero_masked(T* x, const T* madd, int64_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) x[j] = madd[j] == ninf ? T(0) : x[j];
}

template <typename T>
REATTN_CLONES void unmasked_indicator(T* out, const T* madd, int64_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) out[j] = madd[j] == ninf ? T(0) : T(1);
}

template <typename T>
REATTN_CLONES void dropout_apply(T* x, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold, T scale) {
  for (int64_t j = 0; j < n; ++j) x[j] = keep_of(seed, base + static_cast<uint64_t>(j), threshold) ? x[j] * scale : T(0);
}

bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) { return keep_of(seed, index, threshold); }

void dropout_keep_row(uint8_t* out, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold) {
  for (int64_t j = 0; j < n; ++j) out[j] = keep_of(seed, base + static_cast<uint64_t>(j), threshold) ? 1 : 0;
}

template <typename T>
REATTN_CLONES void affine(T* x, int64_t n, T a, T b) {
  for (int64_t j = 0; j < n; ++j) x[j] = a * x[j] + b;
}

template <typename T>
REATTN_CLONES void layernorm_heads_fwd(T* m, T* y, T* rstd, T* mu, int64_t H, int64_t E, const T* gamma,
                                       const T* beta, T tau, T eps) {
  const T inv_h = T(1) / static_cast<T>(H);
  for (int64_t e = 0; e < E; ++e) mu[e] = 0;
  for (int64_t g = 0; g < H; ++g) {
    const T* mg = m + g * E;
    for (int64_t e = 0; e < E; ++e) mu[e] += mg[e];
  }
  for (int64_t e = 0; e < E; ++e) {
    mu[e] *= inv_h;
    rstd[e] = 0;
  }
  for (int64_t g = 0; g < H; ++g) {  // two-pass variance, like F.layer_norm
    const T* mg = m + g * E;
    for (int64_t e = 0; e < E; ++e) {
      const T d = mg[e] - mu[e];
      rstd[e] += d * d;
    }
  }
  for (int64_t e = 0; e < E; ++e) rstd[e] = T(1) / std::sqrt(rstd[e] * inv_h + eps);
  for (int64_t g = 0; g < H; ++g) {
    T* mg = m + g * E;
    T* yg = y + g * E;
    const T a = tau * (gamma ? gamma[g] : T(1));
    const T b = tau * (beta ? beta[g] : T(0));
    for (int64_t e = 0; e < E; ++e) {
      const T yy = (mg[e] - mu[e]) * rstd[e];
      yg[e] = yy;
      mg[e] = a * yy + b;
    }
  }
}

template <typename T>
REATTN_CLONES void layernorm_heads_bwd(T* da, const T* y, const T* rstd, T* t1, T* t2, int64_t H, int64_t E,
                                       const T* gamma, T tau, T* dgamma, T* dbeta) {
  const T inv_h = T(1) / static_cast<T>(H);
  for (int64_t e = 0; e < E; ++e) t1[e] = t2[e] = 0;
  for (int64_t g = 0; g < H; ++g) {
    T* dg = da + g * E;
    const T* yg = y + g * E;
    dgamma[g] += tau * lane_dot(dg, yg, E);
    dbeta[g] += tau * lane_sum(dg, E);
    const T c = tau * (gamma ? gamma[g] : T(1));
    for (int64_t e = 0; e < E; ++e) {
      const T dy = c * dg[e];
      dg[e] = dy;  // da now holds dy
      t1[e] += dy;
      t2[e] += dy * yg[e];
    }
  }
  for (int64_t g = 0; g < H; ++g) {
    T* dg = da + g * E;
    const T* yg = y + g * E;
    for (int64_t e = 0; e < E; ++e) dg[e] = rstd[e] * (dg[e] - inv_h * t1[e] - yg[e] * inv_h * t2[e]);
  }
}

// Sums of x - center over the unmasked entries, in blocks of 256 in T, then double: ~1e-7 relative per
// block for float, no drift over millions. kWrite: also store x - center back (0 where masked).
template <bool kWrite, typename T>
REATTN_INLINE void centered_moments(T* x, const T* madd, int64_t n, T center, double* s1, double* s2, double* count) {
  constexpr int64_t kBlock = 256;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = n - j0 < kBlock ? n - j0 : kBlock;
    T a1[kLanes] = {}, a2[kLanes] = {}, ac[kLanes] = {};
    T* xb = x + j0;
    const T* mb = madd == nullptr ? nullptr : madd + j0;
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const T keep = mb == nullptr || mb[j + l] != ninf ? T(1) : T(0);
        const T d = (xb[j + l] - center) * keep;
        if constexpr (kWrite) xb[j + l] = d;
        a1[l] += d;
        a2[l] += d * d;
        ac[l] += keep;
      }
    T b1 = 0, b2 = 0, bc = 0;
    for (int l = 0; l < kLanes; ++l) {
      b1 += a1[l];
      b2 += a2[l];
      bc += ac[l];
    }
    for (; j < len; ++j) {
      const T keep = mb == nullptr || mb[j] != ninf ? T(1) : T(0);
      const T d = (xb[j] - center) * keep;
      if constexpr (kWrite) xb[j] = d;
      b1 += d;
      b2 += d * d;
      bc += keep;
    }
    *s1 += b1;
    *s2 += b2;
    *count += bc;
  }
}

template <typename T>
REATTN_CLONES void moments(const T* x, const T* madd, int64_t n, T center, double* s1, double* s2, double* count) {
  centered_moments<false>(const_cast<T*>(x), madd, n, center, s1, s2, count);  // reads only
}

template <typename T>
REATTN_CLONES void center_moments(T* x, const T* madd, int64_t n, T center, double* s1, double* s2, double* count) {
  centered_moments<true>(x, madd, n, center, s1, s2, count);
}

template <typename T>
REATTN_CLONES void bn_apply(T* m, T* y, int64_t n, T mu, T rstd, T a, T e) {
  for (int64_t j = 0; j < n; ++j) {
    const T yy = (m[j] - mu) * rstd;
    y[j] = yy;
    m[j] = a * yy + e;
  }
}

template <typename T>
REATTN_CLONES void bn_backward(T* da, const T* y, int64_t n, T k1, T k2, T k3) {
  for (int64_t j = 0; j < n; ++j) da[j] = k1 * da[j] + k2 * y[j] + k3;
}

template <typename T>
REATTN_CLONES void softmax_bwd_rows(const T* p, T* dp, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* pr = p + r * n;
    T* dr = dp + r * n;
    const T d = lane_dot(pr, dr, n);
    for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - d);
  }
}

template <typename T>
REATTN_CLONES T dot(const T* a, const T* b, int64_t n) {
  return lane_dot(a, b, n);
}

template <typename T>
REATTN_CLONES T sum(const T* a, int64_t n) {
  return lane_sum(a, n);
}

template <typename T>
REATTN_CLONES void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                                 const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) ci[j] = 0;
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      const T av = alpha * (ta ? a[kk * lda + i] : a[i * lda + kk]);
      if (!tb) {
        const T* bk = b + kk * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += av * bk[j];
      } else {
        for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j * ldb + kk];
      }
    }
  }
}

#define REATTN_INSTANTIATE(T)                                                                                   \
  template void softmax_rows<T>(T*, int64_t, int64_t, T*, T*);                                                \
  template void exp_sub_rows<T>(T*, int64_t, int64_t, const T*, const T*);                                    \
  template void add_inplace<T>(T*, const T*, int64_t);                                                        \
  template void zero_masked<T>(T*, const T*, int64_t);                                                        \
  template void unmasked_indicator<T>(T*, const T*, int64_t);                                                 \
  template void dropout_apply<T>(T*, int64_t, uint64_t, uint64_t, uint32_t, T);                               \
  template void affine<T>(T*, int64_t, T, T);                                                                 \
  template void layernorm_heads_fwd<T>(T*, T*, T*, T*, int64_t, int64_t, const T*, const T*, T, T);           \
  template void layernorm_heads_bwd<T>(T*, const T*, const T*, T*, T*, int64_t, int64_t, const T*, T, T*, T*); \
  template void moments<T>(const T*, const T*, int64_t, T, double*, double*, double*);                        \
  template void center_moments<T>(T*, const T*, int64_t, T, double*, double*, double*);                       \
  template void bn_apply<T>(T*, T*, int64_t, T, T, T, T);                                                     \
  template void bn_backward<T>(T*, const T*, int64_t, T, T, T);                                               \
  template void softmax_bwd_rows<T>(const T*, T*, int64_t, int64_t);                                          \
  template T dot<T>(const T*, const T*, int64_t);                                                             \
  template T sum<T>(const T*, int64_t);                                                                       \
  template void gemm_fallback<T>(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*,       \
                                 int64_t, T, T*, int64_t);

REATTN_INSTANTIATE(float)
REATTN_INSTANTIATE(double)

}  // namespace vec
}  // namespace cpu
}  // namespace reattn
