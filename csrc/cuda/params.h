// Arguments of the fused CUDA Re-attention programs and their launch plan. Plain C++ (no CUDA or
// torch headers): shared by the kernels (.cu), the host emulator and the torch glue.
//
// Tiles: a program owns one batch element, block_m query rows and every head (the head mixing
// needs all heads of a tile) and sweeps the keys block_n at a time. Everything it keeps lives in
// shared memory (see `SharedLayout`); the plan picks, per problem, how many heads are staged at
// once and how wide a head-dim chunk of the output one program owns, so the layout fits the
// device's shared memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tiles.h"

namespace reattn {
namespace cuda {

struct Strides4 {
  int64_t b, h, n, d;
};

// The storage types of q, k, v, as the launchers and the emulator take them.
enum StorageKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

constexpr int kThreads = 128;  // 4 warps per program
constexpr int kReduceLanes = 8;  // partial sums per row in the programs' two-level reductions
constexpr int kMaxHeads = 32;
constexpr int kMaxHeadDim = 128;

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskAdditive = 2 };
enum NormKind : int { kNormNone = 0, kNormLayer = 1, kNormBatch = 2 };  // kNormBatch: given batch statistics
enum ProgramKind : int { kForward = 0, kGramSums = 1, kBackward = 2, kBnGradSums = 3 };

// What one launch computes, decided on the host. Padded sizes are multiples of 16 for the
// tensor-core path (fp16/bf16) and unpadded otherwise.
struct Plan {
  int block_m = 16;    // query rows per program
  int block_n = 16;    // keys per tile (16 x 16 with tensor cores; smaller tiles only without)
  int pad = 1;         // 16 when the products run on tensor cores (fp16/bf16), else 1
  int head_dim_p = 0;  // D rounded up to pad
  int heads_p = 0;     // H rounded up to pad (rows of the head-mixing products)
  int head_group = 0;  // heads staged in shared memory at once (all H when they fit)
  int chunk_d = 0;     // output head-dim columns one program owns (multiple of pad)
  int num_chunks = 0;  // programs per (batch element, query block) along the head dim
  int num_m = 0;       // query blocks per batch element
  size_t shared_bytes = 0;
};

// One parameter as the caller gave it: any floating storage type (StorageKind), any strides in
// elements (an [H] vector: stride0; the [H, H] mixing weight: stride0 rows, stride1 columns).
// data null: the parameter is absent.
struct ParamRef {
  const void* data = nullptr;
  int storage = kFloat32;
  int64_t stride0 = 0, stride1 = 0;
};

// What the tensor-core programs fold the mixing and norm parameters from (parameters.cuh,
// fold_parameters): each program forms the folded fp32 values in shared memory before its work,
// each value in float64 from the given parameters and rounded once. Forward [H*H + 3H] = W' ([g][h]),
// c', then LayerNorm's out_scale gamma and out_scale beta (zeros otherwise); backward [H*H + 7H] =
// W / (1 - p), then per head c, gamma', beta', mean, rstd, e, f (parameters.cuh's forward_folded and
// backward_folded say how each mode fills them).
struct FoldInputs {
  int H = 0;
  int norm = kNormNone;
  double out_scale = 1.0;
  double keep = 1.0;  // 1 / (1 - dropout p); 1 without dropout
  ParamRef W, c, gamma, beta;
  // kNormBatch: [4, H] fp32, contiguous: mean, rstd, e, f (the forward reads the first two rows); or, null,
  // eval-mode BatchNorm in the forward from the running statistics as given (any dtype and stride):
  // mean = running_mean, rstd = 1 / sqrt(running_var + eps).
  const float* bn = nullptr;
  ParamRef running_mean, running_var;
  double eps = 1e-5;
  // One-sweep training BatchNorm's forward (norm none): where nonzero, c_g = center_scale sum_h W[g, h]
  // (-1 / Nk: the shift -center_g, weight_row_sum's sum) and c is not read: the shift formed by every
  // program's fold, where a launch of its own formed it before the forward (moments_center_program).
  double center_scale = 0.0;
};

struct ReAttnParams {
  int64_t B = 0;
  int H = 0, Nq = 0, Nk = 0, D = 0;

  // Inputs in the storage type T, any strides.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* grad_out = nullptr;
  Strides4 q_st{}, k_st{}, v_st{}, do_st{};

  // Mask as a [B, H, Nq, Nk] view by strides (0 on broadcast dims): uint8 (1 = attend) or additive
  // in the accumulation type (-inf = masked).
  int mask_kind = kMaskNone;
  const void* mask = nullptr;
  Strides4 mask_st{};

  // Parameters in the accumulation type, contiguous; null = absent. bn (kNormBatch): [4, H] =
  // batch mean, 1 / sqrt(var + eps), and the backward's e, f of dM = a dN + e xhat + f.
  const void* W = nullptr;
  const void* c = nullptr;
  const void* gamma = nullptr;
  const void* beta = nullptr;
  const void* bn = nullptr;
  int norm = kNormNone;

  double scale = 1.0, out_scale = 1.0, eps = 1e-5, dropout_p = 0.0;
  const int64_t* seed = nullptr;  // on the device; null = no dropout

  // Forward: out in T (any strides). lse: the row statistics [B, H, Nq, 2] = (row max m, log-sum
  // log sum_j exp(S - m)) in the accumulation type, contiguous, P = exp((S - m) - log-sum); every
  // program writes them (forward, statistics sweep, the statistics kernel), or reads them (backward;
  // forward when stats_is_input: the plain variants' segmented programs take them as given).
  void* out = nullptr;
  Strides4 o_st{};
  void* lse = nullptr;
  bool stats_is_input = false;
  // Tensor-core programs: the parameters as given, which each program folds (FoldInputs).
  FoldInputs fold;
  // q, k, v rows are 16-byte aligned with unit stride along D: 16-byte cp.async loads.
  bool vector_loads = false;
  // The forward's programs that stage q (tiles.h stages_queries) copy its rows element by element: q is
  // not padded for them (ops.cpp use_aligned_inputs), and vector_loads then speaks for k and v alone.
  bool q_by_element = false;
  // Forward with norm none, for training BatchNorm in one sweep: out in the accumulation type
  // instead of T, and moments ([2, H] float64, zeroed by the caller) += the sums of X = W P~ + c
  // (the bf16 tensor-core forward forms them from rows of P that sum to one: rows.cuh, write_moments)
  // and of X^2 over the attended entries (each (b, query block) adds once, from its first d-chunk).
  // The tensor-core forward writes each program's sums instead: [programs][2][H], not added.
  bool out_is_acc = false;
  double* moments = nullptr;
  // With moments and without a mask (one-segment tensor-core forward): [B, H, row blocks, D] fp32, row block r's
  // sums over V of the value chunks c (16 keys each) with c % row blocks == r, for U = sum_j V_j (the
  // host adds the blocks' rows). Null: not summed.
  float* value_sums = nullptr;

  // Gram-sum sweep (kGramSums): float64 sums of X = P~ - shift over unmasked entries.
  double shift = 0.0;
  double* s1 = nullptr;    // [H]
  double* gram = nullptr;  // [H, H]

  // Backward: dq in T (any strides), dk/dv contiguous [B, H, Nk, D] in the accumulation type and
  // parameter gradients in float64, all summed atomically (zeroed by the caller).
  void* dq = nullptr;
  Strides4 dq_st{};
  void* dk = nullptr;
  void* dv = nullptr;
  double* dW = nullptr;
  double* dc = nullptr;
  double* dgamma = nullptr;  // kBnGradSums: sum(dN xhat) per head
  double* dbeta = nullptr;   // kBnGradSums: sum(dN) per head

  // Tensor-core backward (rows.cuh, keys.cuh): the row pass writes D [B, H, Nq] (fp32) for the key
  // pass and its per-program parameter-gradient sums [programs][H*H + 3H] (fp32: dW (g, h), dc,
  // dgamma, dbeta; training BatchNorm's sums of dN xhat and dN in dgamma, dbeta) for the host to
  // add in float64; stats_only: only those sums.
  float* delta = nullptr;
  float* partials = nullptr;
  bool stats_only = false;
  // The key pass writes dK, dV in T (any strides).
  Strides4 dk_st{}, dv_st{};
  // The key pass's shared-memory layout, key_layout(its shape, H) (tiles.h), set by its launcher:
  // the program reads the offsets from the parameter bank instead of recomputing them from H
  // (which, at 255 registers, the compiler did at every use: ~14K instructions per program).
  KeyLayout key_tiles{};
  // The row programs' (forward and the backward's row pass) shared-memory layout, row_layout(their
  // shape, H, Nk), set by their launcher for the same reason: recomputed from H and Nk, the segmented
  // programs formed its offsets again at most uses (DeepViT-L-384 forward: ~2,400 alignment masks
  // among ~81,000 integer instructions per program). Read by the segmented programs (rows.cuh layout_of).
  RowLayout row_tiles{};

  Plan plan{};
};


// The element-wise steps of one-sweep training BatchNorm over [B, H, Nq, D] (head_affine.cuh;
// docs/math.md, "Training BatchNorm in one sweep"). A block owns `rows` query rows of one (b, h):
// grid (B * H, ceil(Nq / rows)), kHeadAffineThreads threads. Every input has unit stride along D.
//   head_affine:   out = alpha[h] R' + beta[h] U (in T)
//   head_dot_sums: partials[k][(b H + h) grid_y + block_y] = scale (sum dO . R, sum dO . U)[k] over the block's
//                  rows, R = xhat V = rstd[h] (R' - mean(X)[h] U) formed from the kept R' (rstd and mean(X) from
//                  the statistics and the mixing parameters, per block)
struct HeadAffineParams {
  int64_t B = 0;
  int H = 0, Nq = 0, D = 0;
  int rows = 0;
  // Items of 16 / sizeof(T) columns (8 of a 16-bit T, 4 of fp32) by 16-byte accesses: fp32
  // accumulation, D a multiple of the item, every row start of every tensor 16-byte aligned; else one
  // (or, for a 16-bit T, the flat walk where its conditions hold: head_affine.cuh for_each_group).
  bool vector = false;
  // R' = X V (X = W P~ - center): head_affine reads it in the accumulation type (r_is_acc) or in T,
  // head_dot_sums in T. Any strides.
  const void* r = nullptr;
  Strides4 r_st{};
  bool r_is_acc = true;
  // U = (unmasked keys) V in the accumulation type, broadcast by strides (0 on broadcast dims).
  const void* u = nullptr;
  Strides4 u_st{};
  // head_affine where u_sum is set: U is one row per (b, h) (u_st.n == 0) given as u_parts parts u_part_stride
  // apart (the forward programs' shares over their row blocks), added in order, and the blocks of the first rows
  // write the sum to u_sum, [B, H, 1, D] contiguous in the accumulation type (the U the backward keeps).
  int u_parts = 1;
  int64_t u_part_stride = 0;
  void* u_sum = nullptr;
  // head_dot_sums: dO in T, any strides.
  const void* grad = nullptr;
  Strides4 grad_st{};
  // head_affine: [2, H] in the accumulation type, contiguous: alpha, beta.
  const void* coefficients = nullptr;
  // head_affine: contiguous [B, H, Nq, D] in T.
  void* out = nullptr;
  // head_dot_sums: [2, B * H, grid_y] in the accumulation type (sum grad . R, then sum grad . U, of each
  // block times `scale`: one reduction over the last two dims gives [2, H]).
  void* partials = nullptr;
  double scale = 1.0;
  // head_dot_sums: the forward's statistics [3, H] float64 (mean of M, biased variance, count), the mixing
  // weight W and bias c as given and 1 / Nk (the keys): center = sum_h W[g, h] / Nk (the shift the forward
  // took off X), mean(X) = mean - center - c, rstd = 1 / sqrt(var + eps).
  const double* stats = nullptr;
  ParamRef W, c;
  double eps = 1e-5;
  double inv_keys = 1.0;
};

constexpr int kHeadAffineThreads = 256;

// ---- the parameter steps around the tensor-core programs (parameters.cuh) ---------------------------

// param_grads_program: the parameter gradients from `total` [H*H + 3H] float64 (the row pass's partials
// summed over its programs): each piece k (total[begin[k] .. begin[k] + size[k])) times factor[k], stored
// contiguously in out[k] in its storage type (StorageKind).
constexpr int kMaxGradPieces = 4;
struct ParamGradsParams {
  const double* total = nullptr;
  int pieces = 0;
  int begin[kMaxGradPieces] = {};
  int size[kMaxGradPieces] = {};
  int storage[kMaxGradPieces] = {};
  double factor[kMaxGradPieces] = {};
  void* out[kMaxGradPieces] = {};
};

// moments_center_program: the shift the one-sweep forward takes off the mixed map before summing its moments
// (docs/math.md, "Training BatchNorm in one sweep"): center_g = sum_h W[g, h] / Nk, the mean of (W P)_g when every
// row of P sums to one (no mask or dropout), so the moments' sums of X = W P~ - center cancel little. Formed in
// float64 (weight_row_sum, as the tensor-core programs' fold and bn_moments form it; head_dot_sums'
// kept_term_coefficients sums it by a warp's butterfly, mixing_row_sum) and rounded once; out [2, H] contiguous
// in out_storage: center, then -center (the CUDA-core forward's mixing bias; the tensor-core programs form it in
// their fold, FoldInputs::center_scale).
struct MomentsCenterParams {
  int H = 0;
  ParamRef W;             // [H, H] as given
  double inv_keys = 1.0;  // 1 / Nk
  void* out = nullptr;
  int out_storage = kFloat32;
};

// bn_moments_program: training BatchNorm's statistics and per-head coefficients from the one-sweep
// forward's per-program moments (docs/math.md, "Training BatchNorm in one sweep"). The forward summed
// X = W P~ - center (center as given here) and X^2 per program; with n = count, mean(X) = sum X / n,
// var = sum X^2 / n - mean(X)^2 (clamped at 0), and the norm's output out_scale (gamma xhat + beta) is
// alpha R' + beta' U with alpha = out_scale gamma rstd, beta' = out_scale beta - mean(X) alpha, while
// R = xhat V = rstd R' - mean(X) rstd U.
struct BnMomentsParams {
  int H = 0;
  int64_t programs = 0;
  const double* moments = nullptr;  // [programs, 2, H], contiguous
  const double* count = nullptr;    // the entries each head's statistics run over (one value), or null:
  double count_value = 0.0;         // then this one (known on the host without a mask: B Nq Nk)
  ParamRef center, c, gamma, beta;  // center: [H] the shift of X; c, gamma, beta as given (null: absent)
  // Where center is null and inv_keys nonzero: center_g = inv_keys sum_h W[g, h] (weight_row_sum), rounded to
  // coefficient_storage, the value the forward's fold subtracted (FoldInputs::center_scale).
  ParamRef W;
  double inv_keys = 0.0;
  double out_scale = 1.0;
  double eps = 1e-5;
  double* stats = nullptr;          // [3, H]: mean of M = W P~ + c, biased variance, count
  void* coefficients = nullptr;     // [4, H] in coefficient_storage: alpha, beta', rstd, -mean(X) rstd
  int coefficient_storage = kFloat32;
};

// bn_coefficients_program: training BatchNorm's backward coefficients [4, H] (mean, rstd, e, f) from the
// statistics and the backward sums (docs/math.md, "Through V and the norm"): rstd = 1/sqrt(var + eps)
// rounded to the coefficients' type as the forward's batch rows round it, a = gamma rstd, e = -a sum(dN xhat) / n,
// f = -a sum(dN) / n, formed in float64 and rounded once. The sums come as parts [2, parts, H, groups] (any
// strides, float32 or float64: head_dot_sums' per-block partials, or [2, 1, H, 1] summed) added in float64 in a
// fixed order; where gradients are given, the summed rows are also the norm's own gradients (d gamma = sum dN xhat,
// d beta = sum dN), each rounded once to its parameter's type.
struct BnCoefficientsParams {
  int H = 0;
  const double* stats = nullptr;  // [3, H]: mean, biased variance, count
  const void* sums = nullptr;     // [2, parts, H, groups]: sum dN xhat, sum dN over the same entries, in parts
  int sums_storage = kFloat64;
  int64_t parts = 1, groups = 1;
  int64_t sums_row = 0, sums_part = 0, sums_head = 0, sums_group = 0;  // strides in elements
  ParamRef gamma;                 // as given (null: absent)
  double eps = 1e-5;
  void* coefficients = nullptr;   // [4, H] in coefficient_storage
  int coefficient_storage = kFloat32;
  void* grad_gamma = nullptr;     // [H] in grad_gamma_storage (null: not wanted)
  void* grad_beta = nullptr;      // [H] in grad_beta_storage (null: not wanted)
  int grad_gamma_storage = kFloat32, grad_beta_storage = kFloat32;
};

// running_stats_program: nn.BatchNorm2d's update of the running statistics, in place, from training
// BatchNorm's stats [3, H] (mean, biased variance, count n): running_mean += momentum (mean - running_mean),
// running_var += momentum (var n / (n - 1) - running_var), each formed in float64 and rounded once to its
// buffer's type (torch's update takes 7 ops: the unbiased variance's 3, two conversions, two lerps).
struct RunningStatsParams {
  int H = 0;
  const double* stats = nullptr;  // [3, H], contiguous
  void* mean = nullptr;           // [H] in mean_storage, stride mean_stride
  void* var = nullptr;            // [H] in var_storage, stride var_stride
  int mean_storage = kFloat32, var_storage = kFloat32;
  int64_t mean_stride = 1, var_stride = 1;
  double momentum = 0.1;
};

constexpr int kParameterThreads = 256;  // threads of the one block of each parameter step (parameters.cuh)

}  // namespace cuda
}  // namespace reattn
