// Fused Re-attention on the CPU: forward and backward without any [B, H, Nq, Nk] tensor.
//
// Blocking. One task = (batch b, block of BM query rows), all heads, all keys: the task keeps the
// H x BM x Nk panel of scores / probabilities / mixed maps in per-thread scratch (allocated once per
// parallel chunk, sized by BM), so the softmax of a row is exact in one sweep (no online rescaling;
// each row's max and log-sum are saved for backward) and LayerNorm across heads is local. at::parallel_for runs
// over the B * ceil(Nq / BM) tasks; BM shrinks for long key sequences so the scratch stays a few MB.
//
// Products: Q K^T, A V, the head mixing W P (an [H, H] x [H, BM*Nk] product), dO V^T, A^T dO, dS K,
// dS^T Q and dM P^T are GEMMs on the panels: sgemm_/dgemm_ of the BLAS torch links (MKL in the x86
// wheels, found at load time; single-threaded inside our threads), else a portable loop.
// Element-wise work (softmax with a polynomial exp, mask, dropout, norms) is in vec_ops.cpp.
//
// Training-mode BatchNorm: one sweep. The norm is a per-head affine map of M, applied after the
// statistics are known, so it commutes with the product by V: the sweep accumulates per head the sum
// and sum of squares of X = M - c - center over the unmasked entries (center = the no-mask mean, sums
// reduced in double) and stores R' = X V and U = 1_unmasked V ([B, H, Nq, D]); a pass over those then
// gives R = Xhat V = rstd (R' - mean(X) U) and O = tau*gamma*R + tau*beta*U. R and U are saved: the
// backward gets sum(dN Xhat) = tau <dO, R>, sum(dN) = tau <dO, U> without another sweep (docs/math.md,
// "Through V and the norm").
//
// Statistics synchronized across processes (SyncBatchNorm semantics): gram_sums accumulates sums
// that add up over processes, the Gram-matrix sums of X = P~ - shift, shift = 1/Nk (H^2 + H + 1
// numbers, docs/math.md's formulation, which serves every W); the caller all-reduces them, turns them into mean and
// variance and runs the forward's main sweep with those (given_stats). The backward's two
// per-head sums (bn_grad_sums) are all-reduced the same way before its main sweep (sums_in).
//
// dK, dV: a task adds into per-chunk accumulators for its batch element; they are flushed (under a
// per-batch lock) into the caller's zeroed fp32/fp64 buffers when the chunk moves to another batch
// element. Chunks are contiguous task ranges, so there are at most B + threads flushes.
#include "re_attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "vec_ops.h"

namespace reattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// GEMM: row-major C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*, const int*);
using set_threads_fn = int (*)(int);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  set_threads_fn set_threads_local = nullptr;  // MKL only (its C interface: int by value)
};

const Blas& blas() {
  static const Blas found = [] {
    Blas b;
    const char* env = std::getenv("REATTN_CPU_BLAS");
    if (env != nullptr && std::strcmp(env, "0") == 0) return b;
    void* handle = nullptr;
    Dl_info info;
    // The library that defines at::get_num_threads (libtorch_cpu) links torch's BLAS.
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) != 0 && info.dli_fname != nullptr)
      handle = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    for (void* h : {handle, RTLD_DEFAULT}) {
      if (h == nullptr) continue;
      if (b.sgemm == nullptr) b.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "sgemm_"));
      if (b.dgemm == nullptr) b.dgemm = reinterpret_cast<dgemm_fn>(dlsym(h, "dgemm_"));
      if (b.set_threads_local == nullptr)
        b.set_threads_local = reinterpret_cast<set_threads_fn>(dlsym(h, "MKL_Set_Num_Threads_Local"));
    }
    if (b.sgemm == nullptr || b.dgemm == nullptr) b = Blas{};
    return b;
  }();
  return found;
}

// One BLAS thread inside our parallel chunks (MKL would otherwise thread tiny products).
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (blas().set_threads_local != nullptr) previous = blas().set_threads_local(1);
  }
  ~SingleThreadedBlas() {
    if (blas().set_threads_local != nullptr) blas().set_threads_local(previous);
  }
};

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, same flags.
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (blas().sgemm != nullptr) return blas().sgemm(&tB, &tA, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    if (blas().dgemm != nullptr) return blas().dgemm(&tB, &tA, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
  vec::gemm_fallback<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------

// Parallel chunks (threads that got tasks) of the last forward / backward main sweep, for tests.
std::atomic<int> g_last_chunks{0};

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

int64_t pick_block_rows(const ReAttnParams& p) {
  // Six H x BM x Nk panels (backward) within ~6 MB of scratch per thread, BM in [1, 32]; smaller
  // blocks when there would be fewer than 4 tasks per thread.
  const int64_t budget = (6ll << 20) / (6 * 4);
  int64_t bm = std::max<int64_t>(1, std::min<int64_t>(32, budget / std::max<int64_t>(1, p.H * p.Nk)));
  const int64_t threads = at::get_num_threads();
  while (bm > 8 && p.B * ((p.Nq + bm - 1) / bm) < 4 * threads) bm /= 2;
  return std::min<int64_t>(bm, std::max<int64_t>(1, p.Nq));
}

// A [rows, D] matrix of one head, in acc_t: a pointer into the input when it already is acc_t with a
// unit inner stride, else converted into scratch.
template <typename scalar_t, typename acc_t>
struct HeadRows {
  const acc_t* ptr = nullptr;
  int64_t ld = 0;
};

template <typename scalar_t, typename acc_t>
HeadRows<scalar_t, acc_t> head_rows(View4 t, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t D,
                                    acc_t* scratch) {
  const scalar_t* base = static_cast<const scalar_t*>(t.data) + b * t.st.b + h * t.st.h + row0 * t.st.n;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if ((t.st.d == 1 || D == 1) && (rows == 1 || t.st.n >= D)) return {base, rows == 1 ? D : t.st.n};
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) scratch[r * D + d] = static_cast<acc_t>(base[r * t.st.n + d * t.st.d]);
  return {scratch, D};
}

template <typename acc_t>
void build_mask(const ReAttnParams& p, int64_t b, int64_t i0, int64_t bm, acc_t* madd) {
  const int64_t Nk = p.Nk;
  for (int64_t hm = 0; hm < p.mask_heads; ++hm)
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t off = b * p.mask_st.b + hm * p.mask_st.h + (i0 + r) * p.mask_st.n;
      acc_t* out = madd + (hm * bm + r) * Nk;
      if (p.mask_is_bool) {
        const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
        for (int64_t j = 0; j < Nk; ++j) out[j] = m[j * p.mask_st.d] ? acc_t(0) : kNegInf<acc_t>;
      } else {
        const acc_t* m = static_cast<const acc_t*>(p.mask) + off;
        for (int64_t j = 0; j < Nk; ++j) out[j] = m[j * p.mask_st.d];
      }
    }
}

template <typename scalar_t, typename acc_t>
void store_rows(scalar_t* out, const acc_t* src, int64_t rows, int64_t D) {
  for (int64_t x = 0; x < rows * D; ++x) out[x] = static_cast<scalar_t>(src[x]);
}

// Scratch that outlives a call. Each thread keeps its buffers between calls, so the per-chunk panels
// (hundreds of KB each) are not mapped and zero-filled by the OS on every call: measured at
// DeepViT-16b (B=8, fp32, one thread), page faults were ~10% of the forward's samples with std::vector
// scratch. A chunk takes its buffers in the same order on every call, so a thread's k-th buffer comes
// back at the size it had; contents are undefined. A thread holds at most its largest call's scratch
// (a few MB; pick_block_rows bounds it). Nested use in one thread (not expected) gets fresh buffers.
class Scratch {
 public:
  Scratch() : state_(thread_state()) {
    if (state_.busy) {
      own_ = std::make_unique<std::vector<Block>>();
      blocks_ = own_.get();
    } else {
      state_.busy = true;
      blocks_ = &state_.blocks;
    }
  }
  ~Scratch() {
    if (!own_) state_.busy = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  T* take(int64_t n) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    if (next_ == blocks_->size()) blocks_->emplace_back();
    Block& block = (*blocks_)[next_++];
    if (block.bytes < bytes) {
      block.data.reset(new char[bytes]);
      block.bytes = bytes;
    }
    return reinterpret_cast<T*>(block.data.get());
  }

 private:
  struct Block {
    std::unique_ptr<char[]> data;
    size_t bytes = 0;
  };
  struct State {
    std::vector<Block> blocks;
    bool busy = false;
  };
  static State& thread_state() {
    thread_local State state;
    return state;
  }
  State& state_;
  std::unique_ptr<std::vector<Block>> own_;
  std::vector<Block>* blocks_ = nullptr;
  size_t next_ = 0;
};

// Per-chunk state shared by forward and backward: the current batch element's K and V per head, and
// with column_sums the column sums of each head's V (U = 1 V without a mask).
template <typename scalar_t, typename acc_t>
struct KVCache {
  const ReAttnParams& p;
  View4 k, v;
  acc_t *kbuf, *vbuf, *vsum;
  std::vector<HeadRows<scalar_t, acc_t>> kh, vh;
  int64_t b = -1;
  KVCache(const ReAttnParams& p_, View4 k_, View4 v_, Scratch& scratch, bool column_sums = false)
      : p(p_),
        k(k_),
        v(v_),
        kbuf(scratch.take<acc_t>(p_.H * p_.Nk * p_.D)),
        vbuf(scratch.take<acc_t>(p_.H * p_.Nk * p_.D)),
        vsum(column_sums ? scratch.take<acc_t>(p_.H * p_.D) : nullptr),
        kh(p_.H),
        vh(p_.H) {}
  void load(int64_t b_) {
    if (b_ == b) return;
    b = b_;
    const int64_t stride = p.Nk * p.D;
    for (int64_t h = 0; h < p.H; ++h) {
      kh[h] = head_rows<scalar_t, acc_t>(k, b, h, 0, p.Nk, p.D, kbuf + h * stride);
      vh[h] = head_rows<scalar_t, acc_t>(v, b, h, 0, p.Nk, p.D, vbuf + h * stride);
      if (vsum == nullptr) continue;
      acc_t* col = vsum + h * p.D;
      std::fill(col, col + p.D, acc_t(0));
      for (int64_t j = 0; j < p.Nk; ++j)
        for (int64_t d = 0; d < p.D; ++d) col[d] += vh[h].ptr[j * vh[h].ld + d];
    }
  }
};

// One task's inputs: K/V of batch b in the cache, every head's query rows [i0, i0 + bm) (views or
// copies into qbuf, row stride `rows_cap`) and the mask block. Returns the mask block, or null.
template <typename scalar_t, typename acc_t>
const acc_t* load_query_block(const ReAttnParams& p, View4 q, KVCache<scalar_t, acc_t>& kv, int64_t b, int64_t i0,
                              int64_t bm, int64_t rows_cap, acc_t* qbuf, HeadRows<scalar_t, acc_t>* qh,
                              acc_t* madd) {
  kv.load(b);
  for (int64_t h = 0; h < p.H; ++h) qh[h] = head_rows<scalar_t, acc_t>(q, b, h, i0, bm, p.D, qbuf + h * rows_cap * p.D);
  if (!p.mask) return nullptr;
  build_mask(p, b, i0, bm, madd);
  return madd;
}

// Scores -> probabilities for all heads of a task: P [H, bm, Nk]. With stats_in, P = exp((S - m) - log l)
// from the saved softmax statistics (backward); else a fresh softmax writing stats_out. Both are
// [2, B, H, Nq]: the row max m, then log l (see vec::softmax_rows for why they are two numbers).
template <typename scalar_t, typename acc_t>
void probabilities(const ReAttnParams& p, int64_t b, int64_t i0, int64_t bm, const HeadRows<scalar_t, acc_t>* qh,
                   const KVCache<scalar_t, acc_t>& kv, const acc_t* madd, acc_t* P, acc_t* stats_out,
                   const acc_t* stats_in) {
  const int64_t E = bm * p.Nk;
  const int64_t plane = p.B * p.H * p.Nq;
  for (int64_t h = 0; h < p.H; ++h) {
    acc_t* Ph = P + h * E;
    gemm<acc_t>(false, true, bm, p.Nk, p.D, static_cast<acc_t>(p.scale), qh[h].ptr, qh[h].ld, kv.kh[h].ptr,
                kv.kh[h].ld, acc_t(0), Ph, p.Nk);
    if (madd != nullptr) vec::add_inplace<acc_t>(Ph, madd + (p.mask_heads > 1 ? h : 0) * E, E);
    const int64_t row = (b * p.H + h) * p.Nq + i0;
    if (stats_in != nullptr)
      vec::exp_sub_rows<acc_t>(Ph, bm, p.Nk, stats_in + row, stats_in + plane + row);
    else
      vec::softmax_rows<acc_t>(Ph, bm, p.Nk, stats_out + row, stats_out + plane + row);
  }
}

template <typename acc_t>
void apply_dropout(const ReAttnParams& p, int64_t b, int64_t i0, int64_t bm, acc_t* X) {
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p.dropout_p));
  for (int64_t h = 0; h < p.H; ++h)
    for (int64_t r = 0; r < bm; ++r) {
      const uint64_t base = static_cast<uint64_t>(((b * p.H + h) * p.Nq + i0 + r) * p.Nk);
      vec::dropout_apply<acc_t>(X + (h * bm + r) * p.Nk, p.Nk, p.seed, base, threshold, keep_scale);
    }
}

template <typename acc_t>
const acc_t* mask_of_head(const ReAttnParams& p, const acc_t* madd, int64_t g, int64_t E) {
  return madd == nullptr ? nullptr : madd + (p.mask_heads > 1 ? g : 0) * E;
}

// Training BatchNorm's statistics per head as the kernels read them, in acc_t: mean (including c) and
// rstd = 1/sqrt(var + eps), from stats [3, H] (mean, biased variance, count) in double.
template <typename acc_t>
struct BatchStats {
  std::vector<acc_t> mean, rstd;
};

template <typename acc_t>
BatchStats<acc_t> batch_stats(const ReAttnParams& p, const double* stats) {
  BatchStats<acc_t> s{std::vector<acc_t>(p.H), std::vector<acc_t>(p.H)};
  for (int64_t g = 0; g < p.H; ++g) {
    s.mean[g] = static_cast<acc_t>(stats[g]);
    s.rstd[g] = static_cast<acc_t>(1.0 / std::sqrt(stats[p.H + g] + p.eps));
  }
  return s;
}

// Recompute the mixed and normalized map of a task from P~ [H, E]: A (masked entries 0) into Mb,
// the normalized y into Y (layer / batch), per-entry rstd into rstd_e (layer).
template <typename acc_t>
void mix_and_norm(const ReAttnParams& p, const acc_t* W, const acc_t* c, const acc_t* gamma, const acc_t* beta,
                  const BatchStats<acc_t>* bn, const acc_t* Pd, const acc_t* madd, int64_t E, acc_t* Mb, acc_t* Y,
                  acc_t* rstd_e, acc_t* mu_e) {
  const int64_t H = p.H;
  const acc_t tau = static_cast<acc_t>(p.out_scale);
  gemm<acc_t>(false, false, H, E, H, acc_t(1), W, H, Pd, E, acc_t(0), Mb, E);
  if (p.norm == kNormNone) {
    for (int64_t g = 0; g < H; ++g) vec::affine<acc_t>(Mb + g * E, E, tau, tau * c[g]);
  } else if (p.norm == kNormLayer) {
    for (int64_t g = 0; g < H; ++g) vec::affine<acc_t>(Mb + g * E, E, acc_t(1), c[g]);
    vec::layernorm_heads_fwd<acc_t>(Mb, Y, rstd_e, mu_e, H, E, gamma, beta, tau, static_cast<acc_t>(p.eps));
  } else {
    for (int64_t g = 0; g < H; ++g) {
      const acc_t a = tau * (gamma ? gamma[g] : acc_t(1)), e = tau * (beta ? beta[g] : acc_t(0));
      vec::bn_apply<acc_t>(Mb + g * E, Y + g * E, E, bn->mean[g] - c[g], bn->rstd[g], a, e);
    }
  }
  if (madd != nullptr)
    for (int64_t g = 0; g < H; ++g) {
      vec::zero_masked<acc_t>(Mb + g * E, mask_of_head(p, madd, g, E), E);
      if (p.norm == kNormBatchTrain) vec::zero_masked<acc_t>(Y + g * E, mask_of_head(p, madd, g, E), E);
    }
}

struct Tasks {
  int64_t bm, per_batch, count;
  explicit Tasks(const ReAttnParams& p) : bm(pick_block_rows(p)) {
    per_batch = (p.Nq + bm - 1) / bm;
    count = p.B * per_batch;
  }
};

// The per-head center of training BatchNorm's moments: sum_h W[g, h] / Nk, the exact mean of (W P)_g
// without mask or dropout, so the centred values' sums cancel little.
template <typename acc_t>
std::vector<acc_t> moment_center(const ReAttnParams& p, const acc_t* W) {
  std::vector<acc_t> center(p.H);
  for (int64_t g = 0; g < p.H; ++g) {
    acc_t w = 0;
    for (int64_t h = 0; h < p.H; ++h) w += W[g * p.H + h];
    center[g] = w / static_cast<acc_t>(p.Nk);
  }
  return center;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void re_attention_forward(const ReAttnParams& p, View4 q, View4 k, View4 v, const acc_t* W, const acc_t* c,
                          const acc_t* gamma, const acc_t* beta, scalar_t* out, acc_t* softmax_stats, acc_t* R,
                          acc_t* U, double* stats, bool given_stats) {
  const Tasks tasks(p);
  const int64_t H = p.H, Nk = p.Nk, D = p.D;
  const bool softmax_given = given_stats && p.norm == kNormBatchTrain;  // gram_sums wrote them
  // Training BatchNorm with its own statistics: one sweep. The norm is a per-head affine map of M, so
  // it commutes with the product by V: the sweep stores R' = (X masked) V with X = M - c - center and
  // U = 1_unmasked V while summing the moments of X; once the statistics are known,
  // R = Xhat V = rstd (R' - mean(X) U) and O = tau gamma R + tau beta U, an O(B H Nq D) pass. Xhat
  // differs from X by a per-head constant only, so this is the eager (M - mean) rstd up to rounding.
  const bool one_sweep_bn = p.norm == kNormBatchTrain && !given_stats;
  BatchStats<acc_t> bn;
  if (softmax_given) {
    for (int64_t g = 0; g < H; ++g)
      if (stats[2 * H + g] <= 1) return;
    bn = batch_stats<acc_t>(p, stats);
  }
  const std::vector<acc_t> center = one_sweep_bn ? moment_center(p, W) : std::vector<acc_t>();
  std::vector<double> s1(H, 0.0), s2(H, 0.0), cnt(H, 0.0);
  std::mutex lock;
  const acc_t tau = static_cast<acc_t>(p.out_scale);
  g_last_chunks = 0;
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    ++g_last_chunks;
    SingleThreadedBlas single;
    const int64_t cap = H * tasks.bm * Nk;
    const bool need_y = p.norm != kNormNone && !one_sweep_bn;
    Scratch scratch;
    KVCache<scalar_t, acc_t> kv(p, k, v, scratch, /*column_sums=*/p.norm == kNormBatchTrain && !p.mask);
    acc_t* qbuf = scratch.take<acc_t>(H * tasks.bm * D);
    acc_t* P = scratch.take<acc_t>(cap);
    acc_t* Mb = scratch.take<acc_t>(cap);
    acc_t* Y = need_y ? scratch.take<acc_t>(cap) : nullptr;
    acc_t* madd = p.mask ? scratch.take<acc_t>(p.mask_heads * tasks.bm * Nk) : nullptr;
    acc_t* rstd_e = scratch.take<acc_t>(tasks.bm * Nk);
    acc_t* mu_e = scratch.take<acc_t>(tasks.bm * Nk);
    acc_t* ob = scratch.take<acc_t>(tasks.bm * D);
    std::vector<HeadRows<scalar_t, acc_t>> qh(H);
    std::vector<double> l1(H, 0.0), l2(H, 0.0), lc(H, 0.0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tasks.per_batch, i0 = (t % tasks.per_batch) * tasks.bm;
      const int64_t bm = std::min(tasks.bm, p.Nq - i0), E = bm * Nk;
      const acc_t* md = load_query_block(p, q, kv, b, i0, bm, tasks.bm, qbuf, qh.data(), madd);
      if (softmax_given)  // exp((S - m) - log l) needs no row reductions; the backward recomputes P the same way
        probabilities(p, b, i0, bm, qh.data(), kv, md, P, static_cast<acc_t*>(nullptr),
                      static_cast<const acc_t*>(softmax_stats));
      else
        probabilities(p, b, i0, bm, qh.data(), kv, md, P, softmax_stats, static_cast<const acc_t*>(nullptr));
      if (p.dropout_p > 0) apply_dropout(p, b, i0, bm, P);
      if (one_sweep_bn) {
        gemm<acc_t>(false, false, H, E, H, acc_t(1), W, H, P, E, acc_t(0), Mb, E);
        for (int64_t g = 0; g < H; ++g) {
          vec::center_moments<acc_t>(Mb + g * E, mask_of_head(p, md, g, E), E, center[g], &l1[g], &l2[g],
                                     &lc[g]);
        }
      } else {
        mix_and_norm(p, W, c, gamma, beta, &bn, P, md, E, Mb, Y, rstd_e, mu_e);
      }
      for (int64_t g = 0; g < H; ++g) {
        const int64_t row = (b * H + g) * p.Nq + i0;
        scalar_t* o = out + row * D;
        if (p.norm != kNormBatchTrain) {
          gemm<acc_t>(false, false, bm, D, Nk, acc_t(1), Mb + g * E, Nk, kv.vh[g].ptr, kv.vh[g].ld, acc_t(0),
                      ob, D);
          store_rows(o, ob, bm, D);
          continue;
        }
        acc_t* Rg = R + row * D;
        acc_t* Ug = U + row * D;
        const acc_t* normed = one_sweep_bn ? Mb + g * E : Y + g * E;  // X masked, or Xhat
        gemm<acc_t>(false, false, bm, D, Nk, acc_t(1), normed, Nk, kv.vh[g].ptr, kv.vh[g].ld, acc_t(0), Rg, D);
        if (md != nullptr) {  // U = 1_unmasked V, the indicator built in P's (no longer needed) panel
          acc_t* ind = P + g * E;
          vec::unmasked_indicator<acc_t>(ind, mask_of_head(p, md, g, E), E);
          gemm<acc_t>(false, false, bm, D, Nk, acc_t(1), ind, Nk, kv.vh[g].ptr, kv.vh[g].ld, acc_t(0), Ug, D);
        } else {
          for (int64_t r = 0; r < bm; ++r) std::copy(kv.vsum + g * D, kv.vsum + (g + 1) * D, Ug + r * D);
        }
        if (one_sweep_bn) continue;  // O once the statistics are known
        const acc_t a = tau * (gamma ? gamma[g] : acc_t(1)), e = tau * (beta ? beta[g] : acc_t(0));
        for (int64_t x = 0; x < bm * D; ++x) ob[x] = a * Rg[x] + e * Ug[x];
        store_rows(o, ob, bm, D);
      }
    }
    if (!one_sweep_bn) return;
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t g = 0; g < H; ++g) {
      s1[g] += l1[g];
      s2[g] += l2[g];
      cnt[g] += lc[g];
    }
  });
  if (!one_sweep_bn) return;
  std::vector<acc_t> mean_x(H);
  for (int64_t g = 0; g < H; ++g) {
    const double n = cnt[g], m = s1[g] / n;
    mean_x[g] = static_cast<acc_t>(m);
    stats[g] = m + static_cast<double>(center[g]) + static_cast<double>(c[g]);
    stats[H + g] = std::max(0.0, s2[g] / n - m * m);
    stats[2 * H + g] = n;
  }
  for (int64_t g = 0; g < H; ++g)
    if (cnt[g] <= 1) return;
  bn = batch_stats<acc_t>(p, stats);
  at::parallel_for(0, p.B * H * p.Nq, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t begin,
                                                                                                 int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = (row / p.Nq) % H;
      const acc_t rs = bn.rstd[g], mx = mean_x[g];
      const acc_t a = tau * (gamma ? gamma[g] : acc_t(1)), e = tau * (beta ? beta[g] : acc_t(0));
      acc_t* Rr = R + row * D;
      const acc_t* Ur = U + row * D;
      scalar_t* o = out + row * D;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t r = rs * (Rr[d] - mx * Ur[d]);
        Rr[d] = r;
        o[d] = static_cast<scalar_t>(a * r + e * Ur[d]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void gram_sums(const ReAttnParams& p, View4 q, View4 k, acc_t shift, acc_t* softmax_stats, double* s1,
               double* gram, double* count) {
  const Tasks tasks(p);
  const int64_t H = p.H, Nk = p.Nk, D = p.D;
  const int64_t Hm = p.mask ? p.mask_heads : 1;  // one set of sums per distinct mask head
  std::fill(s1, s1 + Hm * H, 0.0);
  std::fill(gram, gram + Hm * H * H, 0.0);
  std::fill(count, count + Hm, 0.0);
  // The Gram products run over at most kGramChunk entries in acc_t, then add into double. Measured with
  // torch's sgemm on softmax rows (H=6, a task of 32 rows x 197 keys) against double: one product over
  // the whole task 1.2e-7 relative to sqrt(G_hh G_h'h'), 1024-entry pieces 3.8e-8; the pieces also keep
  // the error from growing with the key count.
  constexpr int64_t kGramChunk = 1024;
  std::mutex lock;
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single;
    const int64_t cap = H * tasks.bm * Nk;
    Scratch scratch;
    KVCache<scalar_t, acc_t> kv(p, k, k, scratch);  // V is not needed: K stands in for it
    acc_t* qbuf = scratch.take<acc_t>(H * tasks.bm * D);
    acc_t* P = scratch.take<acc_t>(cap);
    acc_t* X = scratch.take<acc_t>(cap);
    acc_t* Gt = scratch.take<acc_t>(H * H);
    acc_t* madd = p.mask ? scratch.take<acc_t>(p.mask_heads * tasks.bm * Nk) : nullptr;
    std::vector<HeadRows<scalar_t, acc_t>> qh(H);
    std::vector<double> s1_l(Hm * H, 0.0), gram_l(Hm * H * H, 0.0), count_l(Hm, 0.0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tasks.per_batch, i0 = (t % tasks.per_batch) * tasks.bm;
      const int64_t bm = std::min(tasks.bm, p.Nq - i0), E = bm * Nk;
      const acc_t* md = load_query_block(p, q, kv, b, i0, bm, tasks.bm, qbuf, qh.data(), madd);
      probabilities(p, b, i0, bm, qh.data(), kv, md, P, softmax_stats, static_cast<const acc_t*>(nullptr));
      if (p.dropout_p > 0) apply_dropout(p, b, i0, bm, P);
      for (int64_t m = 0; m < Hm; ++m) {
        const acc_t* mm = md == nullptr ? nullptr : md + m * E;
        for (int64_t h = 0; h < H; ++h) {
          double unused = 0, cnt = 0;
          // s1 over the unmasked entries in 256-entry blocks of acc_t, then double (as the forward's moments).
          vec::moments<acc_t>(P + h * E, mm, E, shift, &s1_l[m * H + h], &unused, &cnt);
          if (h == 0) count_l[m] += cnt;
          acc_t* xh = X + h * E;
          std::copy(P + h * E, P + (h + 1) * E, xh);
          vec::affine<acc_t>(xh, E, acc_t(1), -shift);
          if (mm != nullptr) vec::zero_masked<acc_t>(xh, mm, E);  // masked entries are not in the batch
        }
        for (int64_t e0 = 0; e0 < E; e0 += kGramChunk) {
          const int64_t len = std::min(kGramChunk, E - e0);
          gemm<acc_t>(false, true, H, H, len, acc_t(1), X + e0, E, X + e0, E, acc_t(0), Gt, H);
          for (int64_t x = 0; x < H * H; ++x) gram_l[m * H * H + x] += static_cast<double>(Gt[x]);
        }
      }
    }
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t x = 0; x < Hm * H; ++x) s1[x] += s1_l[x];
    for (int64_t x = 0; x < Hm * H * H; ++x) gram[x] += gram_l[x];
    for (int64_t m = 0; m < Hm; ++m) count[m] += count_l[m];
  });
}

template <typename scalar_t, typename acc_t>
void bn_grad_sums(const ReAttnParams& p, View4 dout, const acc_t* R, const acc_t* U, double* sums) {
  // With dN = tau dA and dA = dO V^T summed over a row's kept keys: sum(dN y) = tau <dO, R>,
  // sum(dN) = tau <dO, U> per head, over all (b, i, d): O(B H Nq D), no sweep over keys.
  // One head per task: every sum is added in the same order whatever the thread count (deterministic).
  const int64_t H = p.H, Nq = p.Nq, D = p.D;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      double s_u = 0, s_r = 0;
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t i = 0; i < Nq; ++i) {
          const scalar_t* o =
              static_cast<const scalar_t*>(dout.data) + b * dout.st.b + g * dout.st.h + i * dout.st.n;
          const int64_t row = ((b * H + g) * Nq + i) * D;
          double a1 = 0, a2 = 0;
          for (int64_t d = 0; d < D; ++d) {
            const double x = static_cast<double>(o[d * dout.st.d]);
            a1 += x * static_cast<double>(U[row + d]);
            a2 += x * static_cast<double>(R[row + d]);
          }
          s_u += a1;
          s_r += a2;
        }
      sums[g] = p.out_scale * s_r;
      sums[H + g] = p.out_scale * s_u;
    }
  });
}

template <typename scalar_t, typename acc_t>
void re_attention_backward(const ReAttnParams& p, View4 dout, View4 q, View4 k, View4 v, const acc_t* W,
                           const acc_t* c, const acc_t* gamma, const acc_t* beta, const acc_t* softmax_stats,
                           const acc_t* R, const acc_t* U, const double* stats, scalar_t* dq, acc_t* dk, acc_t* dv,
                           double* dW, double* dc, double* dgamma, double* dbeta, const double* sums_in) {
  const Tasks tasks(p);
  const int64_t H = p.H, Nk = p.Nk, D = p.D, Nq = p.Nq;
  const acc_t tau = static_cast<acc_t>(p.out_scale);
  BatchStats<acc_t> bn;
  std::vector<acc_t> k1(H), k2(H), k3(H);
  if (p.norm == kNormBatchTrain) {
    bn = batch_stats<acc_t>(p, stats);
    std::vector<double> own;
    if (sums_in == nullptr) {
      own.resize(2 * H);
      bn_grad_sums<scalar_t, acc_t>(p, dout, R, U, own.data());
    }
    const double* sums = sums_in != nullptr ? sums_in : own.data();
    // dM = a dN + e y + f with a = gamma rstd, e = -a sum(dN y) / n, f = -a sum(dN) / n (docs/math.md);
    // here per unit of dA (dN = tau dA): k1 = tau a, k2 = e, k3 = f.
    for (int64_t g = 0; g < H; ++g) {
      const double n = stats[2 * H + g], sum_dn_y = sums[g], sum_dn = sums[H + g];
      const double a = (gamma ? static_cast<double>(gamma[g]) : 1.0) * static_cast<double>(bn.rstd[g]);
      k1[g] = static_cast<acc_t>(p.out_scale * a);
      k2[g] = static_cast<acc_t>(-a * sum_dn_y / n);
      k3[g] = static_cast<acc_t>(-a * sum_dn / n);
      if (sums_in == nullptr) {  // given global sums, the caller has its own share
        dgamma[g] += sum_dn_y;
        dbeta[g] += sum_dn;
      }
    }
  }
  std::unique_ptr<std::mutex[]> batch_locks(new std::mutex[p.B]);
  std::mutex lock;
  g_last_chunks = 0;
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    ++g_last_chunks;
    SingleThreadedBlas single;
    const int64_t cap = H * tasks.bm * Nk;
    const bool need_y = p.norm != kNormNone;
    const bool dropout = p.dropout_p > 0;
    Scratch scratch;
    KVCache<scalar_t, acc_t> kv(p, k, v, scratch);
    acc_t* qbuf = scratch.take<acc_t>(H * tasks.bm * D);
    acc_t* obuf = scratch.take<acc_t>(H * tasks.bm * D);
    acc_t* P = scratch.take<acc_t>(cap);
    acc_t* Pd = dropout ? scratch.take<acc_t>(cap) : nullptr;
    acc_t* Mb = scratch.take<acc_t>(cap);
    acc_t* Y = need_y ? scratch.take<acc_t>(cap) : nullptr;
    acc_t* dA = scratch.take<acc_t>(cap);
    acc_t* dP = scratch.take<acc_t>(cap);
    acc_t* madd = p.mask ? scratch.take<acc_t>(p.mask_heads * tasks.bm * Nk) : nullptr;
    acc_t* rstd_e = scratch.take<acc_t>(tasks.bm * Nk);
    acc_t* t1 = scratch.take<acc_t>(tasks.bm * Nk);
    acc_t* t2 = scratch.take<acc_t>(tasks.bm * Nk);
    acc_t* ob = scratch.take<acc_t>(tasks.bm * D);
    acc_t* dk_l = scratch.take<acc_t>(H * Nk * D);
    acc_t* dv_l = scratch.take<acc_t>(H * Nk * D);
    std::vector<acc_t> dW_l(H * H, acc_t(0)), dc_l(H, acc_t(0)), dg_l(H, acc_t(0)), db_l(H, acc_t(0));
    std::vector<HeadRows<scalar_t, acc_t>> qh(H), oh(H);
    int64_t acc_b = -1;
    auto flush = [&]() {
      if (acc_b < 0) return;
      std::lock_guard<std::mutex> guard(batch_locks[acc_b]);
      acc_t* dkb = dk + acc_b * H * Nk * D;
      acc_t* dvb = dv + acc_b * H * Nk * D;
      for (int64_t x = 0; x < H * Nk * D; ++x) {
        dkb[x] += dk_l[x];
        dvb[x] += dv_l[x];
      }
    };
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tasks.per_batch, i0 = (t % tasks.per_batch) * tasks.bm;
      const int64_t bm = std::min(tasks.bm, Nq - i0), E = bm * Nk;
      if (b != acc_b) {
        flush();
        acc_b = b;
        std::fill(dk_l, dk_l + H * Nk * D, acc_t(0));
        std::fill(dv_l, dv_l + H * Nk * D, acc_t(0));
      }
      const acc_t* md = load_query_block(p, q, kv, b, i0, bm, tasks.bm, qbuf, qh.data(), madd);
      for (int64_t h = 0; h < H; ++h)
        oh[h] = head_rows<scalar_t, acc_t>(dout, b, h, i0, bm, D, obuf + h * tasks.bm * D);
      probabilities(p, b, i0, bm, qh.data(), kv, md, P, static_cast<acc_t*>(nullptr), softmax_stats);
      const acc_t* pd = P;
      if (dropout) {
        std::copy(P, P + H * E, Pd);
        apply_dropout(p, b, i0, bm, Pd);
        pd = Pd;
      }
      mix_and_norm(p, W, c, gamma, beta, &bn, pd, md, E, Mb, Y, rstd_e, t1);
      for (int64_t g = 0; g < H; ++g) {
        acc_t* dAg = dA + g * E;
        gemm<acc_t>(false, true, bm, Nk, D, acc_t(1), oh[g].ptr, oh[g].ld, kv.vh[g].ptr, kv.vh[g].ld, acc_t(0), dAg,
                    Nk);
        if (md) vec::zero_masked<acc_t>(dAg, mask_of_head(p, md, g, E), E);
        gemm<acc_t>(true, false, Nk, D, bm, acc_t(1), Mb + g * E, Nk, oh[g].ptr, oh[g].ld, acc_t(1),
                    dv_l + g * Nk * D, D);
      }
      if (p.norm == kNormNone) {
        for (int64_t g = 0; g < H; ++g) vec::affine<acc_t>(dA + g * E, E, tau, acc_t(0));
      } else if (p.norm == kNormLayer) {
        vec::layernorm_heads_bwd<acc_t>(dA, Y, rstd_e, t1, t2, H, E, gamma, tau,
                                        dg_l.data(), db_l.data());
      } else {
        for (int64_t g = 0; g < H; ++g) {
          vec::bn_backward<acc_t>(dA + g * E, Y + g * E, E, k1[g], k2[g], k3[g]);
          if (md) vec::zero_masked<acc_t>(dA + g * E, mask_of_head(p, md, g, E), E);
        }
      }
      // dA now holds dM.
      gemm<acc_t>(false, true, H, H, E, acc_t(1), dA, E, pd, E, acc_t(1), dW_l.data(), H);
      for (int64_t g = 0; g < H; ++g) dc_l[g] += vec::sum<acc_t>(dA + g * E, E);
      gemm<acc_t>(true, false, H, E, H, acc_t(1), W, H, dA, E, acc_t(0), dP, E);
      if (dropout) apply_dropout(p, b, i0, bm, dP);
      vec::softmax_bwd_rows<acc_t>(P, dP, H * bm, Nk);  // dP now holds dS
      const acc_t s = static_cast<acc_t>(p.scale);
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* dSh = dP + h * E;
        gemm<acc_t>(false, false, bm, D, Nk, s, dSh, Nk, kv.kh[h].ptr, kv.kh[h].ld, acc_t(0), ob, D);
        store_rows(dq + ((b * H + h) * Nq + i0) * D, ob, bm, D);
        gemm<acc_t>(true, false, Nk, D, bm, s, dSh, Nk, qh[h].ptr, qh[h].ld, acc_t(1), dk_l + h * Nk * D, D);
      }
    }
    flush();
    std::lock_guard<std::mutex> guard(lock);
    for (int64_t x = 0; x < H * H; ++x) dW[x] += static_cast<double>(dW_l[x]);
    for (int64_t g = 0; g < H; ++g) {
      dc[g] += static_cast<double>(dc_l[g]);
      dgamma[g] += static_cast<double>(dg_l[g]);
      dbeta[g] += static_cast<double>(db_l[g]);
    }
  });
}

void dropout_keep_mask(uint8_t* out, int64_t B, int64_t H, int64_t Nq, int64_t Nk, uint64_t seed, double p) {
  const uint32_t threshold = dropout_threshold(p);
  at::parallel_for(0, B * H * Nq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      vec::dropout_keep_row(out + row * Nk, Nk, seed, static_cast<uint64_t>(row * Nk), threshold);
  });
}

int last_parallel_chunks() { return g_last_chunks.load(); }

const char* gemm_backend_name() {
  return blas().sgemm != nullptr ? "blas (sgemm_/dgemm_ of the BLAS torch links)" : "portable fallback";
}

#define REATTN_INSTANTIATE_RA(S, A)                                                                             \
  template void re_attention_forward<S, A>(const ReAttnParams&, View4, View4, View4, const A*, const A*,      \
                                           const A*, const A*, S*, A*, A*, A*, double*, bool);                 \
  template void gram_sums<S, A>(const ReAttnParams&, View4, View4, A, A*, double*, double*, double*);         \
  template void bn_grad_sums<S, A>(const ReAttnParams&, View4, const A*, const A*, double*);                 \
  template void re_attention_backward<S, A>(const ReAttnParams&, View4, View4, View4, View4, const A*,        \
                                            const A*, const A*, const A*, const A*, const A*, const A*,        \
                                            const double*, S*, A*, A*, double*, double*, double*, double*,     \
                                            const double*);

REATTN_INSTANTIATE_RA(float, float)
REATTN_INSTANTIATE_RA(double, double)
REATTN_INSTANTIATE_RA(c10::BFloat16, float)
REATTN_INSTANTIATE_RA(c10::Half, float)

}  // namespace cpu
}  // namespace reattn
