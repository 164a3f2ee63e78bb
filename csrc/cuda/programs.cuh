// The fused Re-attention programs: forward, the Gram-sum sweep of training BatchNorm (kGramSums),
// backward (two sweeps) and the backward's BatchNorm sums (kBnGradSums). One program = one thread
// block = batch element b, BM query rows, every head, and `chunk_d` columns of the head dim of its
// output. The math is
// docs/math.md; the semantics are those of kernels/ (the Triton backend),
// entry for entry:
//
//   S = scale q k^T (+ mask; -inf where masked),  m = max_j S,  ll = log sum_j exp(S - m),
//   P = exp((S - m) - ll)
//   P~ = P Z / (1 - p)  (Z: Triton's Philox keyed by (seed, b, h, i, j)),  M = W P~ + c
//   A = out_scale * Norm(M), 0 where masked;  O = A V
//
// The forward sweeps the keys twice (m and ll, then O); they are an input when the Gram-sum sweep already
// wrote it (synchronized training BatchNorm). Local training BatchNorm runs the norm-none forward
// with p.moments: it also sums X and X^2 per head and writes X V in the accumulation type; the norm
// is applied to that afterwards (reattn/backends/_fused.py, one_sweep_batchnorm). Backward: a pre-pass for D = rowsum(P dP), then the main pass (dV, dS, dQ, dK, dW,
// dc, LayerNorm's dgamma/dbeta); a separate launch (kBnGradSums) first sums dN xhat and dN for
// training BatchNorm. dQ is owned by its program; dK, dV and parameter gradients are summed over
// programs with atomic adds. No [B, H, Nq, Nk] tensor is ever written.
//
// Written in the phase discipline of block.cuh so that csrc/cuda/emulate.cpp runs this very code
// on the CPU.
#pragma once

#include "block.cuh"
#include "layout.h"
#include "params.h"

namespace reattn {
namespace cuda {

enum class Sweep { kStats, kDelta, kMain };

template <typename T>
struct Program {
  using Acc = typename Storage<T>::acc;

  const ReAttnParams& p;
  const Plan& plan;
  SharedLayout L;
  char* smem;
  int64_t b;
  int m0;       // first query row
  int pid_d;    // head-dim chunk
  int d0;       // first head-dim column of the chunk
  int dcw;      // chunk width (padded; multiple of plan.pad)
  int H, HP, Dp;
  int BM, BN, E;  // query rows and keys per tile, entries of one head's tile
  bool tensor_cores;  // products on WMMA (fp16/bf16 with a 16-padded plan)
  int64_t q_key = -1, dout_key = -1, k_key = -1, v_key = -1;  // what the staging buffers hold

  REATTN_FN Program(const ReAttnParams& params, int kind, int64_t pid_m, int pid_chunk, char* shared)
      : p(params), plan(params.plan), L(shared_layout(kind, params.plan, params.H, sizeof(T), sizeof(Acc))),
        smem(shared), b(pid_m / params.plan.num_m),
        m0(static_cast<int>(pid_m % params.plan.num_m) * params.plan.block_m), pid_d(pid_chunk),
        d0(pid_chunk * params.plan.chunk_d), H(params.H), HP(params.plan.heads_p), Dp(params.plan.head_dim_p),
        BM(params.plan.block_m), BN(params.plan.block_n), E(params.plan.block_m * params.plan.block_n),
        tensor_cores(params.plan.pad == 16) {
    dcw = plan.chunk_d < Dp - d0 ? plan.chunk_d : Dp - d0;
  }

  template <typename U>
  REATTN_FN U* at(size_t offset) const {
    return reinterpret_cast<U*>(smem + offset);
  }
  REATTN_FN Acc* vec(int row) const { return at<Acc>(L.vec) + row * H; }  // 0 c, 1 gamma, 2 beta, 3 mean, 4 1/std, 5 e, 6 f
  REATTN_FN static T zero() { return Storage<T>::store(Acc(0)); }
  REATTN_FN bool has_dropout() const { return p.seed != nullptr; }
  REATTN_FN Acc drop_scale() const { return Acc(1) / (Acc(1) - static_cast<Acc>(p.dropout_p)); }

  // ---- staging: [heads][rows][cols] tiles of a [B, H, N, D] input, zero outside ------------
  template <typename Exec>
  REATTN_FN void stage(const Exec& ex, T* dst, const void* src, Strides4 st, int h0, int hg, int64_t r0, int rows,
                       int64_t n_rows, int c0, int cols) const {
    const T* base = static_cast<const T*>(src) + b * st.b;
    ex.for_each(hg * rows * cols, [&](int item) {
      const int c = item % cols;
      const int r = (item / cols) % rows;
      const int hl = item / (cols * rows);
      const int64_t row = r0 + r;
      const int col = c0 + c;
      dst[item] = (row < n_rows && col < p.D) ? base[(h0 + hl) * st.h + row * st.n + col * st.d] : zero();
    });
  }

  // Whole-head-dim rows [r0, r0 + rows) of heads [h0, h0 + hg) into `dst`, unless `held` says the
  // buffer already holds `key` (everything stays put when all heads fit).
  template <typename Exec>
  REATTN_FN void stage_once(const Exec& ex, int64_t key, int64_t* held, size_t dst, const void* src, Strides4 st,
                            int h0, int hg, int64_t r0, int rows, int64_t n_rows) {
    if (*held == key) return;
    stage(ex, at<T>(dst), src, st, h0, hg, r0, rows, n_rows, 0, Dp);
    *held = key;
  }
  REATTN_FN static int64_t tile_key(int n0, int h0) { return static_cast<int64_t>(n0) * (kMaxHeads + 1) + h0; }
  template <typename Exec>
  REATTN_FN void stage_q(const Exec& ex, int h0, int hg) {
    stage_once(ex, h0, &q_key, L.q, p.q, p.q_st, h0, hg, m0, BM, p.Nq);
  }
  template <typename Exec>
  REATTN_FN void stage_dout(const Exec& ex, int h0, int hg) {
    stage_once(ex, h0, &dout_key, L.dout, p.grad_out, p.do_st, h0, hg, m0, BM, p.Nq);
  }
  template <typename Exec>
  REATTN_FN void stage_k(const Exec& ex, int n0, int h0, int hg) {
    stage_once(ex, tile_key(n0, h0), &k_key, L.k, p.k, p.k_st, h0, hg, n0, BN, p.Nk);
  }
  // Backward: full rows of V (for dO V^T). Forward stages only the chunk's columns (see av_tile).
  template <typename Exec>
  REATTN_FN void stage_v(const Exec& ex, int n0, int h0, int hg) {
    stage_once(ex, tile_key(n0, h0), &v_key, L.v, p.v, p.v_st, h0, hg, n0, BN, p.Nk);
  }
  REATTN_FN int group_size(int h0) const { return plan.head_group < H - h0 ? plan.head_group : H - h0; }

  // ---- parameters ---------------------------------------------------------------------------
  template <typename Exec>
  REATTN_FN void load_parameters(const Exec& ex, bool transpose_too) {
    const Acc* W = static_cast<const Acc*>(p.W);
    T* w = at<T>(L.w);
    T* wt = transpose_too ? at<T>(L.wt) : nullptr;
    ex.for_each(HP * HP, [&](int item) {
      const int g = item / HP, h = item % HP;
      const bool real = g < H && h < H;
      w[item] = real ? Storage<T>::store(W[g * H + h]) : zero();
      if (wt != nullptr) wt[item] = real ? Storage<T>::store(W[h * H + g]) : zero();
    });
    const Acc* c = static_cast<const Acc*>(p.c);
    const Acc* gamma = static_cast<const Acc*>(p.gamma);
    const Acc* beta = static_cast<const Acc*>(p.beta);
    const Acc* bn = static_cast<const Acc*>(p.bn);
    ex.for_each(7 * H, [&](int item) {
      const int row = item / H, h = item % H;
      Acc value = 0;
      if (row == 0 && c != nullptr) value = c[h];
      if (row == 1) value = gamma != nullptr ? gamma[h] : Acc(1);
      if (row == 2 && beta != nullptr) value = beta[h];
      if (row >= 3 && bn != nullptr) value = bn[(row - 3) * H + h];
      at<Acc>(L.vec)[item] = value;
    });
  }

  // ---- scores ---------------------------------------------------------------------------------
  // S for entry (h, i, j) from the raw product q.k: scaled, masked, -inf outside the problem.
  struct Score {
    Acc value;
    bool attended;
  };
  REATTN_FN Score masked_score(Acc raw, int h, int64_t i, int64_t j) const {
    if (i >= p.Nq || j >= p.Nk) return {-r_inf<Acc>(), false};
    Acc s = raw * static_cast<Acc>(p.scale);
    if (p.mask_kind != kMaskNone) {
      const int64_t offset = b * p.mask_st.b + h * p.mask_st.h + i * p.mask_st.n + j * p.mask_st.d;
      if (p.mask_kind == kMaskBool) {
        if (static_cast<const uint8_t*>(p.mask)[offset] == 0) return {-r_inf<Acc>(), false};
      } else {
        const Acc add = static_cast<const Acc*>(p.mask)[offset];
        if (add == -r_inf<Acc>()) return {-r_inf<Acc>(), false};
        s += add;
      }
    }
    return {s, true};
  }

  // out[h][i * BN + j] = rows_h,i . keys_h,j over the whole head dim, head group by head group;
  // stage(h0, hg) brings the group's rows and key-tile rows into `rows` and `keys`.
  template <typename Exec, typename Stage>
  REATTN_FN void products_with_key_tile(const Exec& ex, Stage stage, size_t rows, size_t keys, Acc* out) {
    for (int h0 = 0; h0 < H; h0 += plan.head_group) {
      const int hg = group_size(h0);
      stage(h0, hg);
      block_gemm<RowMajor, ColMajor>(ex, tensor_cores, GemmShape{hg, BM, BN, Dp}, at<T>(rows), Dp, BM * Dp,
                                     at<T>(keys), Dp, BN * Dp, out + h0 * E, BN, E, false);
    }
  }

  // scores[h][i * BN + j] = q_h,i . k_h,j for the key tile at n0 (rows h < H).
  template <typename Exec>
  REATTN_FN void scores_tile(const Exec& ex, int n0) {
    products_with_key_tile(ex, [&](int h0, int hg) {
      stage_q(ex, h0, hg);
      stage_k(ex, n0, h0, hg);
    }, L.q, L.k, at<Acc>(L.scores));
  }

  // The row statistics per (h, i): the row max m and the log-sum ll = log sum_j exp(S - m), with an online
  // maximum, so that P = exp((S - m) - ll). Kept apart, not as one logsumexp L = m + ll: next to a large
  // finite score (a padding fill such as finfo.min) L rounds to m and exp(S - L) would weigh every key 1
  // instead of 1/l. A row without any key gets (+inf, 0): every P is exp(-inf) = 0. L.lse holds m for the
  // H * BM rows, then ll; the global statistics [B, H, Nq, 2] (the tensor-core programs' format).
  template <typename Exec>
  REATTN_FN void row_statistics(const Exec& ex, bool write_global) {
    Acc* run_max = at<Acc>(L.row_a);
    Acc* run_sum = at<Acc>(L.row_b);
    Acc* scores = at<Acc>(L.scores);
    ex.for_each(H * BM, [&](int row) {
      run_max[row] = -r_inf<Acc>();
      run_sum[row] = 0;
    });
    for (int n0 = 0; n0 < p.Nk; n0 += BN) {
      scores_tile(ex, n0);
      ex.for_each(H * BM, [&](int row) {
        const int h = row / BM, il = row % BM;
        Acc* s = scores + h * E + il * BN;
        Acc tile_max = -r_inf<Acc>();
        for (int jl = 0; jl < BN; ++jl) {
          s[jl] = masked_score(s[jl], h, m0 + il, n0 + jl).value;
          tile_max = s[jl] > tile_max ? s[jl] : tile_max;
        }
        const Acc old_max = run_max[row];
        const Acc new_max = old_max > tile_max ? old_max : tile_max;
        // Nothing seen yet: subtract 0, not -inf, so exp() gives 0 rather than NaN.
        const Acc ref = new_max == -r_inf<Acc>() ? Acc(0) : new_max;
        Acc sum = run_sum[row] * r_exp(old_max - ref);
        for (int jl = 0; jl < BN; ++jl) sum += r_exp(s[jl] - ref);
        run_max[row] = new_max;
        run_sum[row] = sum;
      });
    }
    Acc* row_max = at<Acc>(L.lse);
    Acc* log_sum = row_max + H * BM;
    Acc* stats_out = static_cast<Acc*>(p.lse);
    ex.for_each(H * BM, [&](int row) {
      const int h = row / BM, il = row % BM;
      const bool any = run_sum[row] > 0;
      row_max[row] = any ? run_max[row] : r_inf<Acc>();
      log_sum[row] = any ? r_log(run_sum[row]) : Acc(0);
      if (write_global && m0 + il < p.Nq) {
        Acc* out = stats_out + 2 * ((b * H + h) * p.Nq + m0 + il);
        out[0] = row_max[row];
        out[1] = log_sum[row];
      }
    });
  }

  template <typename Exec>
  REATTN_FN void load_row_statistics(const Exec& ex) {
    const Acc* stats_in = static_cast<const Acc*>(p.lse);
    Acc* row_max = at<Acc>(L.lse);
    Acc* log_sum = row_max + H * BM;
    ex.for_each(H * BM, [&](int row) {
      const int h = row / BM, il = row % BM;
      const bool real = m0 + il < p.Nq;
      const Acc* in = stats_in + 2 * ((b * H + h) * p.Nq + (real ? m0 + il : 0));
      row_max[row] = real ? in[0] : r_inf<Acc>();
      log_sum[row] = real ? in[1] : Acc(0);
    });
  }

  // From raw scores: P = exp((S - m) - ll), dropout, attended/kept flags. What is kept where depends on
  // the program: forward -> probs = P~; statistics -> scores = P~ - shift (0 where not attended);
  // backward -> scores = P and probs = P~. probs rows H..HP-1 are zero for the mixing product.
  template <typename Exec>
  REATTN_FN void probs_tile(const Exec& ex, int n0, int kind) {
    Acc* scores = at<Acc>(L.scores);
    T* probs = kind == kGramSums ? nullptr : at<T>(L.probs);
    uint8_t* flags = kind == kGramSums ? nullptr : at<uint8_t>(L.flags);
    const Acc* row_max = at<Acc>(L.lse);
    const Acc* log_sum = row_max + H * BM;
    const bool dropout = has_dropout();
    const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
    const float threshold = static_cast<float>(p.dropout_p);
    const Acc keep_scale = drop_scale();
    const Acc shift = static_cast<Acc>(p.shift);
    ex.for_each((probs != nullptr ? HP : H) * E, [&](int item) {
      const int h = item / E, e = item % E;
      if (h >= H) {
        probs[item] = zero();
        return;
      }
      const int il = e / BN, jl = e % BN;
      const int64_t i = m0 + il, j = n0 + jl;
      const Score s = masked_score(scores[item], h, i, j);
      const bool attended = s.attended;
      const Acc prob = r_exp((s.value - row_max[h * BM + il]) - log_sum[h * BM + il]);
      Acc dropped = prob;
      uint8_t flag = attended ? 1 : 0;
      if (dropout) {
        const bool keep = attended && dropout_keep(seed, b, H, h, i, j, threshold);
        flag |= keep ? 2 : 0;
        dropped = keep ? prob * keep_scale : Acc(0);
      }
      if (kind == kGramSums) {
        scores[item] = attended ? dropped - shift : Acc(0);
        return;
      }
      flags[item] = flag;
      if (kind != kForward) scores[item] = prob;
      probs[item] = Storage<T>::store(dropped);
    });
  }

  // out[HP][E] = W [HP][HP] @ probs [HP][E]: the head mixing as one matrix product.
  template <typename Exec>
  REATTN_FN void mix_tile(const Exec& ex, const T* w, const T* in, Acc* out) {
    block_gemm<RowMajor, RowMajor>(ex, tensor_cores, GemmShape{1, HP, E, HP}, w, HP, 0, in, E, 0, out, E, 0, false);
  }

  // LayerNorm across heads at entry e of a [H][E] map of M (without c): mean and 1/std.
  REATTN_FN void layer_stats(const Acc* mixed, int e, Acc* mean, Acc* rstd) const {
    const Acc* c = vec(0);
    Acc sum = 0;
    for (int h = 0; h < H; ++h) sum += mixed[h * E + e] + c[h];
    const Acc mu = sum / H;
    Acc sq = 0;
    for (int h = 0; h < H; ++h) {
      const Acc x = mixed[h * E + e] + c[h] - mu;
      sq += x * x;
    }
    *mean = mu;
    *rstd = Acc(1) / r_sqrt(sq / H + static_cast<Acc>(p.eps));
  }

  // xhat of head h at entry e (M + c normalized: LayerNorm stats given, or batch statistics).
  REATTN_FN Acc normalized(const Acc* mixed, int h, int e, Acc ln_mean, Acc ln_rstd) const {
    const Acc x = mixed[h * E + e] + vec(0)[h];
    if (p.norm == kNormLayer) return (x - ln_mean) * ln_rstd;
    if (p.norm == kNormBatch) return (x - vec(3)[h]) * vec(4)[h];
    return x;
  }

  REATTN_FN Acc affine(Acc xhat, int h) const {
    return p.norm == kNormNone ? xhat : xhat * vec(1)[h] + vec(2)[h];
  }

  // ---- reductions -----------------------------------------------------------------------------
  // sums[r] += sum_e value(r, e) for r < rows (rows <= 3 H), two levels: kReduceLanes partial sums per row.
  template <typename Exec, typename Value>
  REATTN_FN void reduce_rows(const Exec& ex, int rows, double* sums, Value value) {
    Acc* partial = at<Acc>(L.partial);
    ex.for_each(rows * kReduceLanes, [&](int item) {
      const int r = item / kReduceLanes, lane = item % kReduceLanes;
      Acc s = 0;
      for (int e = lane; e < E; e += kReduceLanes) s += value(r, e);
      partial[item] = s;
    });
    ex.for_each(rows, [&](int r) {
      Acc s = 0;
      for (int lane = 0; lane < kReduceLanes; ++lane) s += partial[r * kReduceLanes + lane];
      sums[r] += static_cast<double>(s);
    });
  }

  // ================================ forward ==================================================
  template <typename Exec>
  REATTN_FN void forward(const Exec& ex) {
    load_parameters(ex, false);
    if (p.stats_is_input) {
      load_row_statistics(ex);
    } else {
      row_statistics(ex, pid_d == 0);
    }
    Acc* acc = at<Acc>(L.out);
    ex.for_each(H * BM * dcw, [&](int item) { acc[item] = 0; });
    double* moments = at<double>(L.sums);  // [2][H]: sum X, sum X^2 of this program's attended entries
    if (p.moments != nullptr) ex.for_each(2 * H, [&](int item) { moments[item] = 0; });
    for (int n0 = 0; n0 < p.Nk; n0 += BN) {
      scores_tile(ex, n0);
      probs_tile(ex, n0, kForward);
      mix_tile(ex, at<T>(L.w), at<T>(L.probs), at<Acc>(L.scores));
      attention_tile(ex);
      if (p.moments != nullptr) map_moments(ex, moments);
      av_tile(ex, n0);
    }
    if (p.moments != nullptr && pid_d == 0)
      ex.for_each(2 * H, [&](int item) { global_atomic_add(p.moments + item, moments[item]); });
    ex.for_each(H * BM * dcw, [&](int item) {
      const int dl = item % dcw, il = (item / dcw) % BM, h = item / (dcw * BM);
      const int64_t i = m0 + il;
      const int d = d0 + dl;
      if (i >= p.Nq || d >= p.D) return;
      const int64_t offset = b * p.o_st.b + h * p.o_st.h + i * p.o_st.n + d * p.o_st.d;
      if (p.out_is_acc)
        static_cast<Acc*>(p.out)[offset] = acc[item];
      else
        static_cast<T*>(p.out)[offset] = Storage<T>::store(acc[item]);
    });
  }

  // moments[h] += sum X_h, moments[H + h] += sum X_h^2 over the tile's attended entries, X = M + c in
  // the accumulation type (norm none: what attention_tile scaled and stored for the product by V).
  template <typename Exec>
  REATTN_FN void map_moments(const Exec& ex, double* moments) {
    const Acc* mixed = at<Acc>(L.scores);
    const uint8_t* flags = at<uint8_t>(L.flags);
    reduce_rows(ex, 2 * H, moments, [&](int r, int e) {
      const int h = r < H ? r : r - H;
      const Acc x = (flags[h * E + e] & 1) ? normalized(mixed, h, e, Acc(0), Acc(1)) : Acc(0);
      return r < H ? x : x * x;
    });
  }

  // probs <- A = out_scale * Norm(M), 0 where not attended (M in scores).
  template <typename Exec>
  REATTN_FN void attention_tile(const Exec& ex) {
    const Acc* mixed = at<Acc>(L.scores);
    T* attn = at<T>(L.probs);
    const uint8_t* flags = at<uint8_t>(L.flags);
    const Acc out_scale = static_cast<Acc>(p.out_scale);
    ex.for_each(E, [&](int e) {
      Acc ln_mean = 0, ln_rstd = 1;
      if (p.norm == kNormLayer) layer_stats(mixed, e, &ln_mean, &ln_rstd);
      for (int h = 0; h < H; ++h) {
        const Acc a = affine(normalized(mixed, h, e, ln_mean, ln_rstd), h) * out_scale;
        attn[h * E + e] = (flags[h * E + e] & 1) ? Storage<T>::store(a) : zero();
      }
    });
  }

  // out accumulator [H][BM][dcw] += A [H][BM][BN] @ V[:, n0 : n0 + BN, d0 : d0 + dcw].
  template <typename Exec>
  REATTN_FN void av_tile(const Exec& ex, int n0) {
    for (int h0 = 0; h0 < H; h0 += plan.head_group) {
      const int hg = group_size(h0);
      stage(ex, at<T>(L.v), p.v, p.v_st, h0, hg, n0, BN, p.Nk, d0, dcw);
      block_gemm<RowMajor, RowMajor>(ex, tensor_cores, GemmShape{hg, BM, dcw, BN}, at<T>(L.probs) + h0 * E, BN, E,
                                     at<T>(L.v), dcw, BN * dcw, at<Acc>(L.out) + h0 * BM * dcw, dcw,
                                     BM * dcw, true);
    }
  }

  // ============================ BatchNorm statistics =========================================
  // s1[h] = sum X_h, gram[h, h'] = sum X_h X_h' over unmasked entries, X = P~ - shift; writes the row statistics.
  template <typename Exec>
  REATTN_FN void batch_statistics(const Exec& ex) {
    row_statistics(ex, true);
    double* gram = at<double>(L.sums);
    double* s1 = gram + H * H;
    ex.for_each(H * H + H, [&](int item) { gram[item] = 0; });
    const Acc* x = at<Acc>(L.scores);
    for (int n0 = 0; n0 < p.Nk; n0 += BN) {
      scores_tile(ex, n0);
      probs_tile(ex, n0, kGramSums);
      // Exact fp32 (fp64) products, never tensor cores: the variance of near-uniform maps is small.
      ex.for_each(H * H, [&](int item) {
        const int g = item / H, h = item % H;
        if (h < g) return;  // symmetric: the upper triangle, mirrored below
        Acc sum = 0;
        for (int e = 0; e < E; ++e) sum += x[g * E + e] * x[h * E + e];
        gram[item] += static_cast<double>(sum);
      });
      reduce_rows(ex, H, s1, [&](int h, int e) { return x[h * E + e]; });
    }
    ex.for_each(H * H, [&](int item) {
      const int g = item / H, h = item % H;
      global_atomic_add(p.gram + item, h >= g ? gram[item] : gram[h * H + g]);
    });
    ex.for_each(H, [&](int h) { global_atomic_add(p.s1 + h, s1[h]); });
  }

  // ================================ backward =================================================
  template <typename Exec>
  REATTN_FN void backward(const Exec& ex, bool stats_only) {
    load_parameters(ex, true);
    load_row_statistics(ex);
    double* sums = at<double>(L.sums);  // [H][H] unused here; then dc, dgamma, dbeta
    double* dc_sum = sums + H * H;
    Acc* delta = at<Acc>(L.row_a);
    ex.for_each(H * BM, [&](int row) { delta[row] = 0; });
    ex.for_each(3 * H, [&](int item) { dc_sum[item] = 0; });
    if (stats_only) {
      for (int n0 = 0; n0 < p.Nk; n0 += BN) gradient_tile(ex, n0, Sweep::kStats);
      ex.for_each(H, [&](int h) {
        global_atomic_add(p.dgamma + h, dc_sum[H + h]);
        global_atomic_add(p.dbeta + h, dc_sum[2 * H + h]);
      });
      return;
    }
    for (int n0 = 0; n0 < p.Nk; n0 += BN) gradient_tile(ex, n0, Sweep::kDelta);
    Acc* dq = at<Acc>(L.out);
    Acc* dw = at<Acc>(L.dw);
    ex.for_each(H * BM * dcw, [&](int item) { dq[item] = 0; });
    ex.for_each(HP * HP, [&](int item) { dw[item] = 0; });
    for (int n0 = 0; n0 < p.Nk; n0 += BN) gradient_tile(ex, n0, Sweep::kMain);

    T* dq_out = static_cast<T*>(p.dq);
    ex.for_each(H * BM * dcw, [&](int item) {
      const int dl = item % dcw, il = (item / dcw) % BM, h = item / (dcw * BM);
      const int64_t i = m0 + il;
      const int d = d0 + dl;
      if (i < p.Nq && d < p.D) {
        dq_out[b * p.dq_st.b + h * p.dq_st.h + i * p.dq_st.n + d * p.dq_st.d] = Storage<T>::store(dq[item]);
      }
    });
    if (pid_d != 0) return;  // every chunk computed the same parameter gradients: the first adds them
    ex.for_each(H * H, [&](int item) {
      global_atomic_add(p.dW + item, static_cast<double>(dw[(item / H) * HP + item % H]));
    });
    ex.for_each(H, [&](int h) {
      global_atomic_add(p.dc + h, dc_sum[h]);
      if (p.norm == kNormLayer) {
        if (p.dgamma != nullptr) global_atomic_add(p.dgamma + h, dc_sum[H + h]);
        if (p.dbeta != nullptr) global_atomic_add(p.dbeta + h, dc_sum[2 * H + h]);
      }
    });
  }

  // dattn[h][e] = dO_h,i . v_h,j for the key tile at n0.
  template <typename Exec>
  REATTN_FN void dattn_tile(const Exec& ex, int n0) {
    products_with_key_tile(ex, [&](int h0, int hg) {
      stage_dout(ex, h0, hg);
      stage_v(ex, n0, h0, hg);
    }, L.dout, L.v, at<Acc>(L.dattn));
  }

  // One key tile of a backward sweep.
  template <typename Exec>
  REATTN_FN void gradient_tile(const Exec& ex, int n0, Sweep sweep) {
    scores_tile(ex, n0);
    dattn_tile(ex, n0);
    probs_tile(ex, n0, kBackward);
    Acc* mixed = at<Acc>(L.mixed);
    mix_tile(ex, at<T>(L.w), at<T>(L.probs), mixed);
    norm_backward_tile(ex, n0);
    double* dc_sum = at<double>(L.sums) + H * H;
    const Acc* dn_xhat = at<Acc>(L.dattn);
    const Acc* dn = mixed;
    if (sweep == Sweep::kStats) {  // sum(dN xhat), sum(dN) per head: rows H..3H-1 of the sums
      reduce_rows(ex, 2 * H, dc_sum + H, [&](int r, int e) { return r < H ? dn_xhat[r * E + e] : dn[(r - H) * E + e]; });
      return;
    }
    const T* dmixed = at<T>(L.dmixed);
    if (sweep == Sweep::kMain) {
      const int rows = p.norm == kNormLayer ? 3 * H : H;
      reduce_rows(ex, rows, dc_sum, [&](int r, int e) {
        if (r < H) return static_cast<Acc>(Storage<T>::load(dmixed[r * E + e]));
        return r < 2 * H ? dn_xhat[(r - H) * E + e] : dn[(r - 2 * H) * E + e];
      });
    }
    // dP~ = W^T dM, into mixed (dN is no longer needed).
    mix_tile(ex, at<T>(L.wt), dmixed, mixed);
    const Acc* prob = at<Acc>(L.scores);
    const uint8_t* flags = at<uint8_t>(L.flags);
    const bool dropout = has_dropout();
    const Acc keep_scale = drop_scale();
    Acc* delta = at<Acc>(L.row_a);
    if (sweep == Sweep::kDelta) {  // D_h,i += sum_j P dP with dP = dP~ Z / (1 - p)
      ex.for_each(H * BM, [&](int row) {
        const int h = row / BM, il = row % BM;
        Acc sum = 0;
        for (int jl = 0; jl < BN; ++jl) {
          const int item = h * E + il * BN + jl;
          const Acc z = dropout ? ((flags[item] & 2) ? keep_scale : Acc(0)) : Acc(1);
          sum += prob[item] * mixed[item] * z;
        }
        delta[row] += sum;
      });
      return;
    }
    // dW[g, h] += sum_e dM_g P~_h.
    block_gemm<RowMajor, ColMajor>(ex, tensor_cores, GemmShape{1, HP, HP, E}, dmixed, E, 0, at<T>(L.probs), E, 0, at<Acc>(L.dw), HP,
                                   0, true);
    // dV_h = A_h^T dO_h (the chunk's columns).
    for (int h0 = 0; h0 < H; h0 += plan.head_group) {
      const int hg = group_size(h0);
      stage_dout(ex, h0, hg);
      block_gemm<ColMajor, RowMajor>(ex, tensor_cores, GemmShape{hg, BN, dcw, BM}, at<T>(L.attn) + h0 * E, BN, E,
                                     at<T>(L.dout) + d0, Dp, BM * Dp, at<Acc>(L.stage), dcw, BN * dcw, false);
      add_key_tile(ex, static_cast<Acc*>(p.dv), n0, h0, hg);
    }
    // dS = P (dP - D) scale, into attn (A is no longer needed).
    T* ds = at<T>(L.attn);
    const Acc scale = static_cast<Acc>(p.scale);
    ex.for_each(H * E, [&](int item) {
      const int h = item / E, il = (item % E) / BN;
      const Acc z = dropout ? ((flags[item] & 2) ? keep_scale : Acc(0)) : Acc(1);
      ds[item] = Storage<T>::store(prob[item] * (mixed[item] * z - delta[h * BM + il]) * scale);
    });
    for (int h0 = 0; h0 < H; h0 += plan.head_group) {
      const int hg = group_size(h0);
      stage_k(ex, n0, h0, hg);  // dQ_h += dS_h K_h
      block_gemm<RowMajor, RowMajor>(ex, tensor_cores, GemmShape{hg, BM, dcw, BN}, ds + h0 * E, BN, E,
                                     at<T>(L.k) + d0, Dp, BN * Dp, at<Acc>(L.out) + h0 * BM * dcw, dcw,
                                     BM * dcw, true);
      stage_q(ex, h0, hg);  // dK_h = dS_h^T Q_h
      block_gemm<ColMajor, RowMajor>(ex, tensor_cores, GemmShape{hg, BN, dcw, BM}, ds + h0 * E, BN, E,
                                     at<T>(L.q) + d0, Dp, BM * Dp, at<Acc>(L.stage), dcw, BN * dcw, false);
      add_key_tile(ex, static_cast<Acc*>(p.dk), n0, h0, hg);
    }
  }

  // dst[b, h0 + hl, n0 + j, d0 + d] += stage[hl][j][d] (contiguous [B, H, Nk, D] in Acc), atomically.
  template <typename Exec>
  REATTN_FN void add_key_tile(const Exec& ex, Acc* dst, int n0, int h0, int hg) const {
    const Acc* tile = at<Acc>(L.stage);
    ex.for_each(hg * BN * dcw, [&](int item) {
      const int dl = item % dcw, jl = (item / dcw) % BN, hl = item / (dcw * BN);
      const int64_t j = n0 + jl;
      const int d = d0 + dl;
      if (j < p.Nk && d < p.D) global_atomic_add(dst + ((b * H + h0 + hl) * p.Nk + j) * p.D + d, tile[item]);
    });
  }

  // Per entry (i, j), all heads: A (into attn), dN = out_scale dO.v where attended, dM (into
  // dmixed), and for the reductions dN xhat (into dattn) and dN (into mixed, over M).
  template <typename Exec>
  REATTN_FN void norm_backward_tile(const Exec& ex, int n0) {
    Acc* mixed = at<Acc>(L.mixed);
    Acc* dattn = at<Acc>(L.dattn);
    T* attn = at<T>(L.attn);
    T* dmixed = at<T>(L.dmixed);
    const uint8_t* flags = at<uint8_t>(L.flags);
    const Acc out_scale = static_cast<Acc>(p.out_scale);
    ex.for_each(E, [&](int e) {
      const bool in_problem = m0 + e / BN < p.Nq && n0 + e % BN < p.Nk;
      Acc ln_mean = 0, ln_rstd = 1, mean_dx = 0, mean_dx_xhat = 0;
      if (p.norm == kNormLayer) {  // LayerNorm's backward needs two means across the heads first
        layer_stats(mixed, e, &ln_mean, &ln_rstd);
        for (int h = 0; h < H; ++h) {
          const Acc dn = (flags[h * E + e] & 1) ? dattn[h * E + e] * out_scale : Acc(0);
          const Acc dxhat = dn * vec(1)[h];
          mean_dx += dxhat;
          mean_dx_xhat += dxhat * normalized(mixed, h, e, ln_mean, ln_rstd);
        }
        mean_dx /= H;
        mean_dx_xhat /= H;
      }
      for (int h = 0; h < H; ++h) {
        const int item = h * E + e;
        const bool attended = flags[item] & 1;
        const Acc xhat = normalized(mixed, h, e, ln_mean, ln_rstd);
        const Acc dn = attended ? dattn[item] * out_scale : Acc(0);
        attn[item] = attended ? Storage<T>::store(affine(xhat, h) * out_scale) : zero();
        Acc dm = dn;
        if (p.norm == kNormLayer) {
          // A masked head's M still enters the other heads' LayerNorm: its gradient stays.
          dm = in_problem ? ln_rstd * (dn * vec(1)[h] - mean_dx - xhat * mean_dx_xhat) : Acc(0);
        } else if (p.norm == kNormBatch) {
          dm = attended ? vec(1)[h] * vec(4)[h] * dn + vec(5)[h] * xhat + vec(6)[h] : Acc(0);
        }
        dmixed[item] = Storage<T>::store(dm);
        dattn[item] = dn * xhat;
        mixed[item] = dn;
      }
      for (int h = H; h < HP; ++h) dmixed[h * E + e] = zero();
    });
  }
};

}  // namespace cuda
}  // namespace reattn
