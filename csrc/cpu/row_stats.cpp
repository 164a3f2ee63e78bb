#include "row_stats.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace reattn {
namespace cpu {

template <typename scalar_t, typename acc_t>
void row_logsumexp(const scalar_t* q, Strides4 q_st, const scalar_t* k, Strides4 k_st, acc_t* out,
                   int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D, double scale) {
  const int64_t rows = B * H * Nq;
  // A row costs Nk * D multiply-adds; aim for chunks of ~32k of them per task.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Nk * D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_row(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % Nq;
      const int64_t h = (row / Nq) % H;
      const int64_t b = row / (Nq * H);
      const scalar_t* q_ptr = q + b * q_st.b + h * q_st.h + i * q_st.n;
      // Upcast (and pre-scale) the query once: accumulation is in acc_t whatever the input type.
      for (int64_t d = 0; d < D; ++d) q_row[d] = static_cast<acc_t>(q_ptr[d * q_st.d]) * static_cast<acc_t>(scale);
      const scalar_t* k_head = k + b * k_st.b + h * k_st.h;
      // Online logsumexp: running max m and sum s of exp(x - m).
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      acc_t s = 0;
      for (int64_t j = 0; j < Nk; ++j) {
        const scalar_t* k_ptr = k_head + j * k_st.n;
        acc_t x = 0;
        for (int64_t d = 0; d < D; ++d) x += q_row[d] * static_cast<acc_t>(k_ptr[d * k_st.d]);
        if (x > m) {
          s = s * std::exp(m - x) + 1;
          m = x;
        } else {
          s += std::exp(x - m);
        }
      }
      out[row] = m + std::log(s);
    }
  });
}

template void row_logsumexp<float, float>(const float*, Strides4, const float*, Strides4, float*, int64_t,
                                          int64_t, int64_t, int64_t, int64_t, double);
template void row_logsumexp<double, double>(const double*, Strides4, const double*, Strides4, double*,
                                            int64_t, int64_t, int64_t, int64_t, int64_t, double);
template void row_logsumexp<c10::BFloat16, float>(const c10::BFloat16*, Strides4, const c10::BFloat16*,
                                                  Strides4, float*, int64_t, int64_t, int64_t, int64_t,
                                                  int64_t, double);

int parallel_thread_count(int64_t n_tasks) {
  std::mutex lock;
  std::set<std::thread::id> seen;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    // Enough work per chunk that one thread cannot drain the whole range before others start.
    volatile double sink = 0;
    for (int64_t t = begin; t < end; ++t)
      for (int r = 0; r < 200000; ++r) sink = sink + std::sqrt(static_cast<double>(r + t));
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int>(seen.size());
}

}  // namespace cpu
}  // namespace reattn
