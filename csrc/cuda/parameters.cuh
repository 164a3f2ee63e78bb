// The parameter work around the tensor-core programs, written once for the GPU and the host emulator
// (device.cuh): the fold every program forms in its prologue (FoldInputs), and the small steps that are
// one launch each (ParamGradsParams, MomentsCenterParams, BnMomentsParams, BnCoefficientsParams,
// RunningStatsParams in params.h).
//
// All used to be torch operations on [H]- and [H, H]-sized tensors: the fold 3 to 12 of them, the
// scalings, copies and conversions of the summed partials 4 to 6 more, each one a launch (a few
// microseconds of host time and a gap on the GPU) for a few hundred bytes of work: the fold is
// H^2 + 7H values, the gradients H^2 + 3H. The fold was then one launch per pass of its own; formed
// by each program instead (one value per thread or two, and a barrier) it costs no launch (static model,
// t_high: the launch took 2.1-2.3 us per pass; the prologue adds 1.0 us to the DeepViT-16b LayerNorm
// forward, whose 7 programs per SM each form it). The sum of the partials over the row
// pass's programs stays torch's (one launch, a reduction spread over the GPU; one block here would add
// its programs x (H^2 + 3H) float64 conversions on one SM: 4-11 us predicted at DeiT-S and DeepViT-16b).
//
// Numerics: every folded value is formed in float64 from the given parameters (whatever their
// storage type) and rounded once to fp32, the rounding the fp32 programs read anyway; each gradient
// is its float64 sum times a float64 factor, rounded once to its parameter's dtype.
#pragma once

#include <cmath>
#include <cstdint>

#include "device.cuh"
#include "params.h"

namespace reattn {
namespace cuda {

// Element `offset` of a parameter in its storage type, as float64. Decided by the kind's bits (2: 32 or
// 64 bits wide; 1: fp64 or bf16), not by comparisons with each kind: nvcc made a switch, and later a
// chain of comparisons inlined into the programs' prologue (sm_80), an indexed jump (BRX), which the
// static model's SASS emulator does not follow.
static_assert(kFloat16 == 0 && kBFloat16 == 1 && kFloat32 == 2 && kFloat64 == 3, "param_value reads the kinds' bits");
REATTN_DEVICE double param_value(const ParamRef& r, int64_t offset) {
  if (r.storage & 2) {
    if (r.storage & 1) return static_cast<const double*>(r.data)[offset];
    return static_cast<const float*>(r.data)[offset];
  }
  const uint16_t bits = static_cast<const uint16_t*>(r.data)[offset];
  return r.storage & 1 ? dev::Convert<dev::Bf16>::to_float(bits) : dev::Convert<dev::F16>::to_float(bits);
}

// Per-head parameter h, or `fill` where the parameter is absent.
REATTN_DEVICE double head_value(const ParamRef& r, int h, double fill) {
  return r.data == nullptr ? fill : param_value(r, static_cast<int64_t>(h) * r.stride0);
}

// x rounded to storage type `storage` (via fp32 for the 16-bit types, as torch converts float64).
REATTN_DEVICE void store_value(void* out, int storage, int64_t i, double x) {
  if (storage == kFloat64) {
    static_cast<double*>(out)[i] = x;
  } else if (storage == kFloat32) {
    static_cast<float*>(out)[i] = static_cast<float>(x);
  } else {
    const float f = static_cast<float>(x);
    static_cast<uint16_t*>(out)[i] =
        storage == kBFloat16 ? dev::Convert<dev::Bf16>::from_float(f) : dev::Convert<dev::F16>::from_float(f);
  }
}

// sum_h W[g, h] in float64, h in order, by any one thread: the fold's, bn_moments' and moments_center's sums of a
// row are the same number, so the shift the forward subtracted is the one the statistics add back.
REATTN_DEVICE double weight_row_sum(const ParamRef& W, int H, int g) {
  double s = 0.0;
  for (int h = 0; h < H; ++h) {
    s += param_value(W, static_cast<int64_t>(g) * W.stride0 + static_cast<int64_t>(h) * W.stride1);
  }
  return s;
}

// The same sum by one whole warp (H <= 32): lane h loads W[g, h] and 5 butterfly levels add them, so every lane
// gets it, in the same order on every run (head_dot_sums' kept_term_coefficients, one block's warp: H loads by one
// lane there took +4 to +6 us at DeiT-S and DeepViT-L-384, static model). It differs from weight_row_sum's by the
// float64 sum's order alone, which that use, unrounded next to R' rounded to 16 bits, does not see.
REATTN_DEVICE double mixing_row_sum(const ParamRef& W, int H, int g) {
  const int lane = dev::lane_index();
  double s = lane < H ? param_value(W, static_cast<int64_t>(g) * W.stride0 + static_cast<int64_t>(lane) * W.stride1)
                      : 0.0;
  for (int mask = dev::kWarpSize / 2; mask > 0; mask /= 2) s += dev::shfl_xor(s, mask);
  return s;
}

// x rounded to storage type `storage` and back (the value a kernel reading it in that type sees).
REATTN_DEVICE double rounded_to(int storage, double x) {
  return storage == kFloat32 ? static_cast<double>(static_cast<float>(x)) : x;
}

// 1 / sqrt(x) in float64 for x in fp32's normal range (a variance plus eps > 0): the fp32 reciprocal square root
// (relative error < 2^-22) refined by two Newton steps (error ~2^-53). A float64 square root and division are
// subroutines of ~100 instructions each: formed for every folded value of every program, they made eval-mode
// BatchNorm's one-launch inference slower than the norm-none forward by 10-43 us at DeiT-S (static model).
REATTN_DEVICE double rsqrt_refined(double x) {
  double r = dev::rsqrt_approx(static_cast<float>(x));
  for (int step = 0; step < 2; ++step) r = r * (1.5 - 0.5 * x * r * r);
  return r;
}

// Value i of the forward's folded parameters [H*H + 3H].
//   affine norms (none; BatchNorm with given statistics, A_g = out_scale (gamma_g (M_g - mean_g) rstd_g
//   + beta_g)): W' = alpha_g W / (1 - p) and c' = alpha_g c_g + out_scale (beta_g - gamma_g mean_g rstd_g)
//   with alpha_g = out_scale gamma_g rstd_g (none: gamma = 1, rstd = 1, mean = beta = 0); the last 2H zero.
//   Where center_scale is set (the one-sweep forward), c_g = center_scale sum_h W[g, h] (weight_row_sum).
//   LayerNorm: W' = W / (1 - p), c' = c, then out_scale gamma and out_scale beta (the norm's own affine).
//   BatchNorm's mean and rstd: the given rows, or (eval mode, bn null) the running statistics, rstd formed in
//   float64 as 1 / sqrt(running_var + eps) (rsqrt_refined).
REATTN_DEVICE double forward_folded(const FoldInputs& p, int i) {
  const int H = p.H, hh = H * H;
  const bool batch = p.norm == kNormBatch, layer = p.norm == kNormLayer;
  const int h = i < hh ? i / H : (i - hh) % H;  // the weight's row g, or the vector entry's head
  const int piece = i < hh ? -1 : (i - hh) / H;
  double alpha = layer ? 1.0 : p.out_scale, mean = 0.0, rstd = 1.0;
  if (batch) {
    const bool rows = p.bn != nullptr;
    mean = rows ? p.bn[h] : head_value(p.running_mean, h, 0.0);
    rstd = rows ? p.bn[H + h] : rsqrt_refined(head_value(p.running_var, h, 1.0) + p.eps);
    alpha *= head_value(p.gamma, h, 1.0) * rstd;
  }
  if (piece < 0) return alpha * p.keep * param_value(p.W, h * p.W.stride0 + static_cast<int64_t>(i - h * H) * p.W.stride1);
  if (piece == 0) {
    double c = alpha * (p.center_scale != 0.0 ? p.center_scale * weight_row_sum(p.W, H, h) : head_value(p.c, h, 0.0));
    if (batch) c += p.out_scale * (head_value(p.beta, h, 0.0) - head_value(p.gamma, h, 1.0) * mean * rstd);
    return c;
  }
  if (!layer) return 0.0;
  return piece == 1 ? p.out_scale * head_value(p.gamma, h, 1.0) : p.out_scale * head_value(p.beta, h, 0.0);
}

// Value i of the backward's folded parameters [H*H + 7H]: W / (1 - p), then per head c, gamma' =
// out_scale gamma (none: out_scale), beta' = out_scale beta (none: 0), and BatchNorm's given mean, rstd,
// e, f (other norms: 0, 1, 0, 0).
REATTN_DEVICE double backward_folded(const FoldInputs& p, int i) {
  const int H = p.H, hh = H * H;
  if (i < hh) {
    const int g = i / H;
    return p.keep * param_value(p.W, g * p.W.stride0 + static_cast<int64_t>(i - g * H) * p.W.stride1);
  }
  const int piece = (i - hh) / H, h = (i - hh) % H;
  if (piece >= 3) return p.norm == kNormBatch ? p.bn[(piece - 3) * H + h] : piece == 4 ? 1.0 : 0.0;
  // Pieces 0 to 2 by selects around one read, not a branch per piece: inlined into the backward passes'
  // prologue, such a chain became an indexed jump (BRX) in their sm_80 builds (see param_value).
  const ParamRef& r = piece == 0 ? p.c : piece == 1 ? p.gamma : p.beta;
  const double v = head_value(r, h, piece == 1 ? 1.0 : 0.0);
  const double scaled = p.norm == kNormNone ? (piece == 1 ? p.out_scale : 0.0) : p.out_scale * v;
  return piece == 0 ? v : scaled;
}

// Values in the fold: forward [H*H + 3H], backward [H*H + 7H].
REATTN_HD constexpr int folded_count(int H, bool backward) { return H * H + (backward ? 7 : 3) * H; }

// Every folded value to out (a program's shared memory), thread `thread` of `threads` forming every
// threads-th; the caller synchronizes the block before reading them.
template <bool kBackward>
REATTN_DEVICE void fold_parameters(const FoldInputs& p, float* out, int thread, int threads) {
  const int total = folded_count(p.H, kBackward);
  for (int i = thread; i < total; i += threads) {
    out[i] = static_cast<float>(kBackward ? backward_folded(p, i) : forward_folded(p, i));
  }
}

// One block of kParameterThreads threads stores every piece. The pieces' loop is unrolled: indexed by a
// runtime k, the parameter arrays were copied to the stack (128 B of local memory on sm_90).
REATTN_DEVICE void param_grads_program(const ParamGradsParams& p) {
#pragma unroll
  for (int k = 0; k < kMaxGradPieces; ++k) {
    if (k >= p.pieces) break;
    for (int i = dev::thread_index(); i < p.size[k]; i += kParameterThreads) {
      store_value(p.out[k], p.storage[k], i, p.total[p.begin[k] + i] * p.factor[k]);
    }
  }
}

// Warp w forms center_g for g = w, w + 8, ... (MomentsCenterParams); its lane 0 stores center_g and -center_g.
REATTN_DEVICE void moments_center_program(const MomentsCenterParams& p) {
  constexpr int kWarps = kParameterThreads / dev::kWarpSize;
  for (int g = dev::warp_index(); g < p.H; g += kWarps) {
    const double center = weight_row_sum(p.W, p.H, g) * p.inv_keys;
    if (dev::lane_index() == 0) {
      store_value(p.out, p.out_storage, g, center);
      store_value(p.out, p.out_storage, p.H + g, -center);
    }
  }
}

// Dynamic shared memory of bn_moments_program: the 2H float64 sums.
constexpr size_t bn_moments_shared(int H) { return 2 * static_cast<size_t>(H) * sizeof(double); }

// One warp's sum of the `count` values at offsets first, first + step, ...: lane l adds values l, l + 32, ...
// (offsets stepped by additions), then the butterfly gives every lane the sum, in a fixed order (deterministic).
// Eight loads are in flight before the first add needs one, the adds in the same order as one value at a time:
// one block walking ~1,000 rows one dependent load at a time took 20.8 us on an H200 (bn_moments at DeiT-S,
// 1,024 programs; the static model, which counts issue and bytes but not a chain of load latencies, said
// 0.5-2.9). Whole groups of eight load unconditionally (with a bound per load, ptxas issued each load just
// before its add again), then the rest one at a time.
template <typename Load>
REATTN_DEVICE double warp_strided_sum(int64_t count, int64_t first, int64_t step, Load&& load) {
  constexpr int kInFlight = 8;
  const int64_t lane_step = dev::kWarpSize * step;
  double s = 0.0;
  int64_t e = dev::lane_index(), offset = first + e * step;
  for (; e + (kInFlight - 1) * dev::kWarpSize < count; e += kInFlight * dev::kWarpSize) {
    double v[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k, offset += lane_step) v[k] = load(offset);
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) s += v[k];
  }
  for (; e < count; e += dev::kWarpSize, offset += lane_step) s += load(offset);
  for (int mask = dev::kWarpSize / 2; mask > 0; mask /= 2) s += dev::shfl_xor(s, mask);
  return s;
}

// Warp w sums the columns j = w, w + 8, ... of the moments [programs, 2H] (warp_strided_sum), then thread h
// forms head h's statistics and coefficients in float64 (BnMomentsParams), rounding only the coefficients, once.
REATTN_DEVICE void bn_moments_program(const BnMomentsParams& p) {
  constexpr int kWarps = kParameterThreads / dev::kWarpSize;
  const int columns = 2 * p.H;
  double* sums = reinterpret_cast<double*>(dev::shared_memory());  // [2][H]: sum X, sum X^2
  for (int j = dev::warp_index(); j < columns; j += kWarps) {
    const double s = warp_strided_sum(p.programs, j, columns, [&](int64_t i) { return p.moments[i]; });
    if (dev::lane_index() == 0) sums[j] = s;
  }
  dev::sync_threads();
  const int h = dev::thread_index();
  if (h >= p.H) return;
  const double n = p.count != nullptr ? *p.count : p.count_value;
  const double mean_x = sums[h] / n;
  const double spread = sums[p.H + h] / n - mean_x * mean_x;
  const double var = spread > 0.0 ? spread : 0.0;
  const double center = p.center.data != nullptr ? head_value(p.center, h, 0.0)
                        : p.inv_keys != 0.0     ? rounded_to(p.coefficient_storage, p.inv_keys * weight_row_sum(p.W, p.H, h))
                                                : 0.0;
  p.stats[h] = mean_x + center + head_value(p.c, h, 0.0);
  p.stats[p.H + h] = var;
  p.stats[2 * p.H + h] = n;
  const double rstd = 1.0 / std::sqrt(var + p.eps);
  const double alpha = p.out_scale * head_value(p.gamma, h, 1.0) * rstd;
  store_value(p.coefficients, p.coefficient_storage, h, alpha);
  store_value(p.coefficients, p.coefficient_storage, p.H + h, p.out_scale * head_value(p.beta, h, 0.0) - mean_x * alpha);
  store_value(p.coefficients, p.coefficient_storage, 2 * p.H + h, rstd);
  store_value(p.coefficients, p.coefficient_storage, 3 * p.H + h, -mean_x * rstd);
}

// Thread h updates head h's running statistics (RunningStatsParams). The update reads each buffer's entry
// before writing it, in float64, so its value is the same however the buffers' dtypes round.
REATTN_DEVICE void running_stats_program(const RunningStatsParams& p) {
  const int h = dev::thread_index();
  if (h >= p.H) return;
  const double mean = p.stats[h], var = p.stats[p.H + h], n = p.stats[2 * p.H + h];
  const double old_mean = head_value(ParamRef{p.mean, p.mean_storage, p.mean_stride, 0}, h, 0.0);
  const double old_var = head_value(ParamRef{p.var, p.var_storage, p.var_stride, 0}, h, 0.0);
  store_value(p.mean, p.mean_storage, static_cast<int64_t>(h) * p.mean_stride, old_mean + p.momentum * (mean - old_mean));
  store_value(p.var, p.var_storage, static_cast<int64_t>(h) * p.var_stride,
              old_var + p.momentum * (var * n / (n - 1.0) - old_var));
}


// Dynamic shared memory of bn_coefficients_program: the 2H float64 sums.
constexpr size_t bn_coefficients_shared(int H) { return 2 * static_cast<size_t>(H) * sizeof(double); }

// Warp w adds the parts of the sums' columns j = w, w + 8, ... (row j / H, head j % H; warp_strided_sum over the
// parts), then thread h writes head h's coefficients and, where wanted, its gradients of gamma and beta
// (BnCoefficientsParams).
REATTN_DEVICE void bn_coefficients_program(const BnCoefficientsParams& p) {
  constexpr int kWarps = kParameterThreads / dev::kWarpSize;
  double* sums = reinterpret_cast<double*>(dev::shared_memory());  // [2][H]: sum dN xhat, sum dN
  // float32 or float64 (not param_value's four storage branches per value)
  const bool f64 = p.sums_storage == kFloat64;
  auto value = [&](int64_t i) {
    return f64 ? static_cast<const double*>(p.sums)[i] : static_cast<double>(static_cast<const float*>(p.sums)[i]);
  };
  const int64_t parts = p.groups > 0 ? p.parts : 0;  // parts of no groups add nothing (and read nothing)
  for (int j = dev::warp_index(); j < 2 * p.H; j += kWarps) {
    // The part at `offset` (its first group), its groups added in order (a few: head_dot_sums' row blocks of one
    // head). Lanes take whole parts: an index split into part and group (a 64-bit division per value) cost the
    // launch most of its integer instructions.
    auto part = [&](int64_t offset) {
      double t = value(offset);
      for (int64_t g = 1; g < p.groups; ++g) t += value(offset + g * p.sums_group);
      return t;
    };
    const double s = warp_strided_sum(parts, (j / p.H) * p.sums_row + (j % p.H) * p.sums_head, p.sums_part, part);
    if (dev::lane_index() == 0) sums[j] = s;
  }
  dev::sync_threads();
  const int h = dev::thread_index();
  if (h >= p.H) return;
  const double n = p.stats[2 * p.H + h];
  const double rstd = rounded_to(p.coefficient_storage, 1.0 / std::sqrt(p.stats[p.H + h] + p.eps));
  const double a = head_value(p.gamma, h, 1.0) * rstd;
  store_value(p.coefficients, p.coefficient_storage, h, p.stats[h]);
  store_value(p.coefficients, p.coefficient_storage, p.H + h, rstd);
  store_value(p.coefficients, p.coefficient_storage, 2 * p.H + h, -a * sums[h] / n);
  store_value(p.coefficients, p.coefficient_storage, 3 * p.H + h, -a * sums[p.H + h] / n);
  if (p.grad_gamma != nullptr) store_value(p.grad_gamma, p.grad_gamma_storage, h, sums[h]);
  if (p.grad_beta != nullptr) store_value(p.grad_beta, p.grad_beta_storage, h, sums[p.H + h]);
}

}  // namespace cuda
}  // namespace reattn
