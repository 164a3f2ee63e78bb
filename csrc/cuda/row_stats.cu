#include "row_stats.h"

#include <cmath>

namespace reattn {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // one warp per query row

// One warp per (b, h, i) row. Lanes split the keys; each lane keeps an online (max, sum) pair,
// then the warp merges them with shuffles: exact logsumexp in one sweep over K.
template <typename T>
__global__ void row_logsumexp_kernel(const T* __restrict__ q, Strides4 q_st, const T* __restrict__ k,
                                     Strides4 k_st, T* __restrict__ out, int64_t B, int64_t H, int64_t Nq,
                                     int64_t Nk, int64_t D, T scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= B * H * Nq) return;
  const int64_t i = row % Nq;
  const int64_t h = (row / Nq) % H;
  const int64_t b = row / (Nq * H);
  const T* q_ptr = q + b * q_st.b + h * q_st.h + i * q_st.n;
  const T* k_head = k + b * k_st.b + h * k_st.h;
  T m = -INFINITY;
  T s = 0;
  for (int64_t j = lane; j < Nk; j += kWarp) {
    const T* k_ptr = k_head + j * k_st.n;
    T x = 0;
    for (int64_t d = 0; d < D; ++d) x += q_ptr[d * q_st.d] * k_ptr[d * k_st.d];
    x *= scale;
    if (x > m) {
      s = s * exp(m - x) + T(1);
      m = x;
    } else {
      s += exp(x - m);
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T m_other = __shfl_xor_sync(0xffffffffu, m, offset);
    const T s_other = __shfl_xor_sync(0xffffffffu, s, offset);
    const T m_new = max(m, m_other);
    // A lane that saw no key has m = -inf and s = 0: guard exp(-inf - -inf) = NaN.
    const T a = (m == -INFINITY) ? T(0) : s * exp(m - m_new);
    const T c = (m_other == -INFINITY) ? T(0) : s_other * exp(m_other - m_new);
    m = m_new;
    s = a + c;
  }
  if (lane == 0) out[row] = m + log(s);
}

template <typename T>
cudaError_t launch(const void* q, Strides4 q_st, const void* k, Strides4 k_st, void* out, int64_t B, int64_t H,
                   int64_t Nq, int64_t Nk, int64_t D, double scale, cudaStream_t stream) {
  const int64_t rows = B * H * Nq;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  row_logsumexp_kernel<T><<<static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, 0, stream>>>(
      static_cast<const T*>(q), q_st, static_cast<const T*>(k), k_st, static_cast<T*>(out), B, H, Nq, Nk, D,
      static_cast<T>(scale));
  return cudaGetLastError();
}

}  // namespace

cudaError_t row_logsumexp(int dtype_code, const void* q, Strides4 q_st, const void* k, Strides4 k_st,
                          void* out, int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale,
                          cudaStream_t stream) {
  if (dtype_code == 0) return launch<float>(q, q_st, k, k_st, out, B, H, Nq, Nk, D, scale, stream);
  if (dtype_code == 1) return launch<double>(q, q_st, k, k_st, out, B, H, Nq, Nk, D, scale, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace reattn
