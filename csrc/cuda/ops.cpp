// Torch-facing side of the fused CUDA Re-attention programs: argument checks with readable
// messages, output allocation, the launch plan, and the launch on the tensors' current CUDA stream
// (no synchronization, no host allocation beyond torch's allocator: CUDA-graph capturable).
//
// CPU tensors run the same programs in the host emulator (csrc/cuda/emulate.h) instead: that is how
// the CPU test suite checks this backend's algorithm. The CUDA part is compiled only when the build
// has CUDA (REATTN_WITH_CUDA); the emulator always is.
#include "ops.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <string>

#include "emulate.h"
#include "backward_configs.h"
#include "row_configs.h"
#include "layout.h"
#include "params.h"

#ifdef REATTN_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launch.h"
#endif

namespace reattn {
namespace cuda_ops {
namespace {

using namespace reattn::cuda;

// The emulator sizes the CUDA-core programs' layouts for sm_80's 163 KB per block, the stricter of
// the default targets, and the tensor-core forward's for an H100 (227 KB, less the 1 KB the
// compiler reserves).
constexpr size_t kEmulatedSharedLimit = 166912;
constexpr size_t kEmulatedTensorCoreSharedLimit = 232448 - 1024;

// The StorageKind of dtype t; `op`: `what` (the tensor or argument it is the dtype of) must be one of the four.
int storage_of(at::ScalarType t, const char* op = "reattn cuda", const char* what = "q, k, v") {
  switch (t) {
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    case at::kFloat:
      return kFloat32;
    case at::kDouble:
      return kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", what, " must be float16, bfloat16, float32 or float64, got ", t);
  }
  return -1;
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
bool tensor_cores(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

Strides4 strides_of(const at::Tensor& t) { return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& v) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, H, Nq, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be [B, H, Nk, D], got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op, ": q ",
                    q.sizes(), " and k ", k.sizes(), " must agree on B, H and D");
  if (v.has_value()) {
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), op, ": v ", v->sizes(), " must have the shape of k ", k.sizes());
    TORCH_CHECK_TYPE(v->scalar_type() == q.scalar_type(), op, ": v is ", v->scalar_type(), " but q is ",
                     q.scalar_type());
    TORCH_CHECK_VALUE(v->device() == q.device(), op, ": v is on ", v->device(), " but q on ", q.device());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k is ", k.scalar_type(), " but q is ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device(), " but q on ", q.device());
  storage_of(q.scalar_type());
  TORCH_CHECK_VALUE(q.is_cuda() || q.is_cpu(), op, ": tensors must be on a CUDA device (or on the CPU for the ",
                    "emulator), got ", q.device());
#ifndef REATTN_WITH_CUDA
  TORCH_CHECK_VALUE(!q.is_cuda(), op, ": reattn._C was built without CUDA (the torch at build time had none); ",
                    "rebuild with a CUDA torch and toolkit");
#endif
  TORCH_CHECK_VALUE(q.size(1) >= 1 && q.size(1) <= kMaxHeads, op, ": supports 1 to ", kMaxHeads, " heads, got ",
                    q.size(1));
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": supports head dims 1 to ", kMaxHeadDim,
                    ", got ", q.size(3));
  TORCH_CHECK_VALUE(k.size(2) >= 1, op, ": needs at least one key, got Nk = 0");
  TORCH_CHECK_VALUE(q.size(2) <= std::numeric_limits<int>::max() && k.size(2) <= std::numeric_limits<int>::max(),
                    op, ": sequence lengths must fit in int32");
}

// A parameter as given (checked: shape, device, floating point), or undefined when absent.
at::Tensor parameter(const char* op, const char* name, const c10::optional<at::Tensor>& t, at::IntArrayRef shape,
                     const at::Tensor& q) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q on ", q.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be floating point, got ",
                   t->scalar_type());
  return t->detach();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Everything the programs read; `keep` holds the tensors made for the call. `given`: the parameters
// W, c, gamma, beta as the caller passed them (undefined when absent): the tensor-core programs fold
// them as given (fold_inputs), the CUDA-core programs read them contiguous in the accumulation type
// (core_parameters).
struct Arguments {
  ReAttnParams p;
  std::vector<at::Tensor> keep;
  std::array<at::Tensor, 4> given;
  std::array<at::Tensor, 2> running;  // eval-mode BatchNorm's running mean and variance as given (else undefined)
};

// The parameters as the CUDA-core programs read them (ReAttnParams::W, c, gamma, beta).
void core_parameters(Arguments& a, const at::Tensor& q) {
  std::array<const void**, 4> fields{&a.p.W, &a.p.c, &a.p.gamma, &a.p.beta};
  for (int i = 0; i < 4; ++i) {
    if (!a.given[i].defined()) continue;
    a.keep.push_back(a.given[i].to(acc_of(q.scalar_type())).contiguous());
    *fields[i] = a.keep.back().data_ptr();
  }
}

Arguments prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& v,
                  const c10::optional<at::Tensor>& mix_weight, const c10::optional<at::Tensor>& mix_bias,
                  const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                  const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& seed, double scale,
                  double dropout_p) {
  check_inputs(op, q, k, v);
  Arguments a;
  ReAttnParams& p = a.p;
  p.B = q.size(0);
  p.H = static_cast<int>(q.size(1));
  p.Nq = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.Nk = static_cast<int>(k.size(2));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  if (v.has_value()) {
    p.v = v->data_ptr();
    p.v_st = strides_of(*v);
  }
  p.scale = scale;
  const int64_t H = p.H;
  if (mix_weight.has_value()) {
    a.given = {parameter(op, "mix_weight", mix_weight, {H, H}, q), parameter(op, "mix_bias", mix_bias, {H}, q),
               parameter(op, "norm_weight", norm_weight, {H}, q), parameter(op, "norm_bias", norm_bias, {H}, q)};
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    at::Tensor m = *attn_mask;
    TORCH_CHECK_VALUE(m.dim() <= 4, op, ": attn_mask must have at most 4 dims, got shape ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), op, ": attn_mask is on ", m.device(), " but q on ", q.device());
    while (m.dim() < 4) m = m.unsqueeze(0);
    const std::vector<int64_t> full{p.B, H, p.Nq, p.Nk};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK_VALUE(m.size(d) == 1 || m.size(d) == full[d], op, ": attn_mask ", attn_mask->sizes(),
                        " does not broadcast to [B, H, Nq, Nk] = ", at::IntArrayRef(full));
    }
    if (m.scalar_type() == at::kBool) {
      m = m.view(at::kByte);
      p.mask_kind = kMaskBool;
    } else {
      TORCH_CHECK_TYPE(at::isFloatingType(m.scalar_type()), op, ": attn_mask must be bool or floating point, got ",
                       m.scalar_type());
      // Added in q's dtype, as the eager reference adds it, then read in the accumulation type.
      m = m.to(q.scalar_type()).to(acc_of(q.scalar_type()));
      p.mask_kind = kMaskAdditive;
    }
    m = m.expand(full);
    p.mask = m.data_ptr();
    p.mask_st = strides_of(m);
    a.keep.push_back(m);
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->defined() && seed->numel() == 1 &&
                          seed->scalar_type() == at::kLong && seed->device() == q.device(),
                      op, ": dropout needs seed, an int64 tensor of one element on ", q.device());
    p.dropout_p = dropout_p;
    p.seed = seed->data_ptr<int64_t>();
  }
  return a;
}

// [4, H] rows mean, 1/std, e, f in the accumulation type, from `stats` ([2, H] or [4, H]).
at::Tensor batch_rows(const char* op, const c10::optional<at::Tensor>& stats, const at::Tensor& q) {
  const int64_t H = q.size(1);
  TORCH_CHECK_VALUE(stats.has_value() && stats->defined(), op, ": norm='batch' needs batch_stats");
  TORCH_CHECK_VALUE(stats->dim() == 2 && (stats->size(0) == 2 || stats->size(0) == 4) && stats->size(1) == H, op,
                    ": batch_stats must be [2, H] (mean, 1/std) or [4, H] (+ the backward's e, f), got ",
                    stats->sizes());
  TORCH_CHECK_VALUE(stats->device() == q.device(), op, ": batch_stats is on ", stats->device());
  at::Tensor rows = stats->to(acc_of(q.scalar_type()));
  if (rows.size(0) == 2) rows = at::cat({rows, at::zeros_like(rows)});
  return rows.contiguous();
}

#ifdef REATTN_WITH_CUDA
// The storage type's launchers (launch.h).
struct Launchers {
  cudaError_t (*launch)(int, const ReAttnParams&, cudaStream_t);
  cudaError_t (*static_shared)(int, size_t*);
};

Launchers launchers_for(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return {launch_f16, static_shared_f16};
    case at::kBFloat16:
      return {launch_bf16, static_shared_bf16};
    case at::kFloat:
      return {launch_f32, static_shared_f32};
    default:
      return {launch_f64, static_shared_f64};
  }
}

// Dynamic shared memory a program may take on q's GPU: the per-block opt-in maximum minus what the
// compiled kernel reserves itself. Both are fixed per device and kernel: queried once, cached.
size_t device_shared_limit(const at::Tensor& q, int kind) {
  static std::atomic<int> optin[kMaxDevices] = {};
  static std::atomic<long> reserved_bytes[kMaxDevices][4][4] = {};  // [device][storage][kind], +1 when known
  const int device = q.get_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "reattn cuda: device index ", device, " out of range");
  int limit = optin[device].load(std::memory_order_relaxed);
  if (limit == 0) {
    const cudaError_t err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    TORCH_CHECK(err == cudaSuccess, "reattn cuda: cannot query shared memory: ", cudaGetErrorString(err));
    optin[device].store(limit, std::memory_order_relaxed);
  }
  std::atomic<long>& cached = reserved_bytes[device][storage_of(q.scalar_type())][kind];
  long reserved = cached.load(std::memory_order_relaxed) - 1;
  if (reserved < 0) {
    const c10::cuda::CUDAGuard guard(q.device());
    size_t bytes = 0;
    const cudaError_t err = launchers_for(q.scalar_type()).static_shared(kind, &bytes);
    TORCH_CHECK(err == cudaSuccess, "reattn cuda: cannot read the kernel's attributes: ", cudaGetErrorString(err));
    reserved = static_cast<long>(bytes);
    cached.store(reserved + 1, std::memory_order_relaxed);
  }
  return static_cast<size_t>(limit) - static_cast<size_t>(reserved);
}
#endif

Plan plan_for(const char* op, int kind, int64_t H, int64_t D, int64_t Nq, at::ScalarType dtype, size_t limit) {
  Plan plan;
  const size_t t_size = c10::elementSize(dtype), acc_size = c10::elementSize(acc_of(dtype));
  TORCH_CHECK_VALUE(make_plan(kind, static_cast<int>(H), static_cast<int>(D), static_cast<int>(Nq), t_size,
                              acc_size, tensor_cores(dtype), limit, &plan),
                    op, ": no tile layout for H = ", H, ", D = ", D, " in ", dtype, " fits ", limit,
                    " bytes of shared memory");
  return plan;
}

void run(const char* op, int kind, const at::Tensor& q, ReAttnParams& p, int64_t shared_limit, bool reverse_items) {
  if (!q.is_cuda()) {
    const size_t limit = shared_limit > 0 ? static_cast<size_t>(shared_limit) : kEmulatedSharedLimit;
    p.plan = plan_for(op, kind, p.H, p.D, p.Nq, q.scalar_type(), limit);
    emulate_program(storage_of(q.scalar_type()), kind, p, reverse_items);
    return;
  }
#ifdef REATTN_WITH_CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  const size_t limit = shared_limit > 0 ? static_cast<size_t>(shared_limit) : device_shared_limit(q, kind);
  p.plan = plan_for(op, kind, p.H, p.D, p.Nq, q.scalar_type(), limit);
  const cudaError_t err = launchers_for(q.scalar_type()).launch(kind, p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
#endif
}

// One launch of a small step (the parameter steps, the element-wise passes, the device checks): in the emulator
// for tensors on the CPU, else on `on`'s GPU with its error raised. `launch(stream)` returns the launcher's
// cudaError_t; a generic lambda, so a build without CUDA never instantiates it (launch.h is not included there).
template <typename Emulate, typename Launch>
void emulate_or_launch(const char* op, const at::Tensor& on, Emulate&& emulate, Launch&& launch) {
  if (on.is_cpu()) {
    emulate();
    return;
  }
#ifdef REATTN_WITH_CUDA
  const c10::cuda::CUDAGuard guard(on.device());
  const cudaError_t err = launch(c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
#else
  TORCH_CHECK_VALUE(false, op, ": reattn._C was built without CUDA");
#endif
}

int norm_code(const char* op, const std::string& norm) {
  if (norm == "none") return kNormNone;
  if (norm == "layer") return kNormLayer;
  if (norm == "batch") return kNormBatch;
  TORCH_CHECK_VALUE(false, op, ": norm must be 'none', 'layer' or 'batch' (training statistics), got '", norm, "'");
  return -1;
}

// The norm of a forward or backward: its code, out_scale, eps and (BatchNorm) the statistics rows, or, where
// `running` holds eval-mode BatchNorm's running statistics, none: the tensor-core programs fold those as given
// (FoldInputs), the CUDA-core ones get rows from them (eval_batch_rows).
void set_norm(const char* op, Arguments& a, const at::Tensor& q, const std::string& norm, double out_scale,
              double eps, const c10::optional<at::Tensor>& batch_stats) {
  a.p.norm = norm_code(op, norm);
  a.p.out_scale = out_scale;
  a.p.eps = eps;
  if (a.p.norm == kNormBatch && !a.running[0].defined()) {
    a.keep.push_back(batch_rows(op, batch_stats, q));
    a.p.bn = a.keep.back().data_ptr();
  }
}

// Eval-mode BatchNorm's rows for the CUDA-core programs: mean, 1 / sqrt(var + eps) (formed in float64), e = f = 0.
void eval_batch_rows(Arguments& a, const at::Tensor& q) {
  const at::Tensor mean = a.running[0].to(at::kDouble), rstd = (a.running[1].to(at::kDouble) + a.p.eps).rsqrt();
  a.keep.push_back(at::cat({mean.unsqueeze(0), rstd.unsqueeze(0), at::zeros({2, a.p.H}, mean.options())})
                       .to(acc_of(q.scalar_type()))
                       .contiguous());
  a.p.bn = a.keep.back().data_ptr();
}

void poison(at::Tensor& t) { t.fill_(std::numeric_limits<double>::quiet_NaN()); }

// The emulator's warp order between barriers (sim::Order): forward, reversed, or shuffled with shuffle_seed.
int emulator_order(bool reverse_items, int64_t shuffle_seed) { return shuffle_seed != 0 ? 2 : reverse_items ? 1 : 0; }

// Row statistics [B, H, Nq, 2] (max, log-sum) of a [B, H, Nq] logsumexp L: (L, 0) describes the
// same probabilities exp(S - L).
at::Tensor stats_from_lse(const at::Tensor& lse) { return at::stack({lse, at::zeros_like(lse)}, -1); }

ParamRef param_ref(const at::Tensor& t) {
  ParamRef r;
  if (!t.defined()) return r;
  r.data = t.data_ptr();
  r.storage = storage_of(t.scalar_type());
  r.stride0 = t.stride(0);
  r.stride1 = t.dim() > 1 ? t.stride(1) : 0;
  return r;
}

// What the tensor-core programs fold the parameters from (FoldInputs; each program forms the folded
// fp32 values in its prologue, parameters.cuh fold_parameters), from the parameters as given (any
// floating dtype and strides):
//   forward, affine norms (none; BatchNorm with given statistics, A_g = out_scale (gamma_g (M_g - mean_g)
//   rstd_g + beta_g)): out_scale, the norm and dropout's 1 / (1 - p) fold into W' and c'; LayerNorm folds
//   only 1 / (1 - p) and keeps out_scale gamma, out_scale beta for after the norm.
//   backward: W / (1 - p), then per head c, gamma', beta', mean, rstd, e, f with A = gamma' xhat + beta' and
//   dM = gamma' rstd dN + e xhat + f (none: gamma' = out_scale, xhat = M; BatchNorm: xhat = (M - mean) rstd
//   with the given rows; LayerNorm: gamma' = out_scale gamma).
FoldInputs fold_inputs(const Arguments& a) {
  const ReAttnParams& p = a.p;
  FoldInputs f;
  f.H = p.H;
  f.norm = p.norm;
  f.out_scale = p.out_scale;
  f.keep = p.seed != nullptr ? 1.0 / (1.0 - p.dropout_p) : 1.0;
  f.W = param_ref(a.given[0]);
  f.c = param_ref(a.given[1]);
  f.gamma = param_ref(a.given[2]);
  f.beta = param_ref(a.given[3]);
  f.bn = p.norm == kNormBatch ? static_cast<const float*>(p.bn) : nullptr;
  f.running_mean = param_ref(a.running[0]);
  f.running_var = param_ref(a.running[1]);
  f.eps = p.eps;
  return f;
}

// 16-byte cp.async loads need unit stride along D and rows, heads and batches 16-byte aligned.
bool vector_loadable(const at::Tensor& t) {
  const int64_t e = static_cast<int64_t>(t.element_size());
  return t.stride(3) == 1 && (t.stride(2) * e) % 16 == 0 && (t.stride(1) * e) % 16 == 0 &&
         (t.stride(0) * e) % 16 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The compiled variant of the tensor-core forward for this problem (forward.cuh, ForwardVariant):
// plain ones need no mask, no dropout, scale > 0 and 16-byte aligned rows. general_variant forces
// the general one (tests compare the two).
int forward_variant_for(const ReAttnParams& p, bool general_variant) {
  if (general_variant || p.mask_kind != kMaskNone || p.seed != nullptr || p.scale <= 0.0 || !p.vector_loads) {
    return kGeneral;
  }
  if (p.moments != nullptr) return kPlainMoments;
  return p.norm == kNormLayer ? kPlainLayer : kPlainAffine;
}

// Whether the tensor-core backward with row shape `rows` runs its plain variants (row_configs.h): no
// mask, no dropout, 16-byte aligned rows and a row shape that has one; general_variant forces the
// general ones (tests compare the two).
bool backward_plain_for(const ReAttnParams& p, int rows, bool general_variant) {
  return !general_variant && p.mask_kind == kMaskNone && p.seed == nullptr && p.vector_loads &&
         backward_rows_have_plain(rows);
}

// The tensor-core programs address a batch element's slice with 32-bit offsets.
bool batch_offsets_fit_int32(const at::Tensor& t) {
  int64_t last = 0;
  for (int d = 1; d < 4; ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
  return last < std::numeric_limits<int32_t>::max();
}

// The tensor-core programs move rows in 16-byte cp.async copies where every input allows it
// (vector_loadable); otherwise, e.g. at a head dim of 35 (70-byte rows), their general variants copy
// element by element, and the plain variants (no mask or dropout code) cannot run. Predicted by the
// static model (H100, bf16, DeepViT-L-384, norm none) when the copies came in: forward program 1,047 us
// general on the inputs, 525 us plain on copies whose host work (the copies) takes ~46 us (the plain
// program is 198 us since).
// The plain variants read whole 8-element chunks (csrc/cuda/rows.cuh TileCopy): the columns from D up to
// the next multiple of 8 must hold zeros (finite: K's meet q's zero columns in q . k).
// An uninitialized [B, H, N, D rounded up to 8] tensor for zero_padded_rows.
at::Tensor padded_like(const at::Tensor& t) {
  return at::empty({t.size(0), t.size(1), t.size(2), (t.size(3) + 7) / 8 * 8}, t.options());
}

// The padding's broadcast element: zeros [1, 1, 1, width] of t's dtype on t's device, made once per (device,
// dtype, width) and kept for the process (nothing writes them), so a call's copies take no fill of their own
// (a launch: static model, 2 us t_high a call). Made afresh, not kept, while the device's current stream
// captures a CUDA graph (whose pool would own the memory). The first fill is waited for, so that a later call
// on another stream reads it filled.
at::Tensor padding_zeros(const at::Tensor& t, int64_t width) {
#ifdef REATTN_WITH_CUDA
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
      return at::zeros({1, 1, 1, width}, t.options());
    }
  }
#endif
  static std::mutex mutex;
  // Never freed: the tensors must outlive the allocator at exit.
  static auto* kept = new std::map<std::tuple<int, int, int, int64_t>, at::Tensor>();
  const auto key = std::make_tuple(static_cast<int>(t.device().type()), static_cast<int>(t.get_device()),
                                   static_cast<int>(t.scalar_type()), width);
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = kept->find(key);
  if (it == kept->end()) {
    const c10::InferenceMode normal(false);  // an ordinary tensor, usable in and out of inference mode
    it = kept->emplace(key, at::zeros({1, 1, 1, width}, t.options().requires_grad(false))).first;
#ifdef REATTN_WITH_CUDA
    if (t.is_cuda()) c10::cuda::getCurrentCUDAStream().synchronize();
#endif
  }
  return it->second;
}

// The view of the first D columns of `padded` (padded_like(t)) once its rows hold t's, padded with zeros:
// one read of the input and one write of the padded rows. `zeros`: the padding's broadcast element
// (padding_zeros), taken by the first input that needs it and shared by the others.
at::Tensor zero_padded_rows(const at::Tensor& t, at::Tensor padded, at::Tensor& zeros) {
  const int64_t D = t.size(3), padded_d = padded.size(3);
  at::Tensor view = padded.narrow(3, 0, D);
  if (padded_d > D) {
    // One pass writes whole rows, the zeros (a broadcast element) after the input's columns: a separate
    // fill of the padding would write 2 of every 16 bytes in a pass of its own (static model,
    // DeepViT-L-384: 46 -> 77 us for the forward's three copies).
    if (!zeros.defined() || zeros.size(3) != padded_d - D || zeros.scalar_type() != t.scalar_type() ||
        zeros.device() != t.device()) {
      zeros = padding_zeros(t, padded_d - D);
    }
    at::cat_out(padded, {t, zeros.expand({t.size(0), t.size(1), t.size(2), -1})}, 3);
  } else {
    view.copy_(t);
  }
  return view;
}

// The views padded_rows (reattn::cuda_padded_rows) returned and whose storage still lives: the ladder's
// autograd pads k and v (and q, unless the forward stages it) of a head dim that is not a multiple of 8
// once, in the forward, and saves those views for the backward, which then reads them as they are instead
// of copying them again (static model,
// DeepViT-L-384 backward: three of its four copies, ~30 us). Only these views count as padded with zeros:
// the columns past D of anyone else's rows may hold anything. Each entry holds its storage weakly (a weak
// reference keeps the StorageImpl object, so its address is not reused while recorded) with the view's
// data pointer and geometry; entries whose storage is gone are dropped at the next record.
struct PaddedView {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
};

std::mutex& padded_views_mutex() {
  static std::mutex m;
  return m;
}

std::vector<PaddedView>& padded_views() {
  static std::vector<PaddedView> views;
  return views;
}

void record_padded_view(const at::Tensor& view) {
  const std::lock_guard<std::mutex> lock(padded_views_mutex());
  std::vector<PaddedView>& views = padded_views();
  views.erase(std::remove_if(views.begin(), views.end(), [](const PaddedView& e) { return e.storage.expired(); }),
              views.end());
  views.push_back({view.storage().getWeakStorageImpl(), view.data_ptr(), view.sizes().vec(), view.strides().vec()});
}

// Whether `t` is (the same view as) one padded_rows returned, its columns past D zero.
bool is_padded_view(const at::Tensor& t) {
  if (t.dim() != 4 || !t.has_storage() || t.size(3) % 8 == 0) return false;
  const c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  const std::lock_guard<std::mutex> lock(padded_views_mutex());
  for (const PaddedView& e : padded_views()) {
    if (e.storage._unsafe_get_target() == storage && !e.storage.expired() && e.data == t.data_ptr() &&
        t.sizes().equals(e.sizes) && t.strides().equals(e.strides)) {
      return true;
    }
  }
  return false;
}

// reattn::cuda_padded_rows: each [B, H, N, D] tensor as zero_padded_rows' view, recorded (is_padded_view).
std::vector<at::Tensor> padded_rows(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> views;
  at::Tensor zeros;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(3) % 8 != 0, "reattn cuda_padded_rows: tensors[", i,
                      "] must be [B, H, N, D] with D not a multiple of 8 (nothing to pad), got ", t.sizes());
    views.push_back(zero_padded_rows(t, padded_like(t), zeros));
    record_padded_view(views.back());
  }
  return views;
}

// Whether the programs read t's rows in whole 16-byte chunks as they are: loadable, and D a multiple of 8
// or t a padded view (is_padded_view), its columns past D zero.
bool chunks_as_is(const at::Tensor& t) { return vector_loadable(t) && (t.size(3) % 8 == 0 || is_padded_view(t)); }

// What the programs read of `t`: t itself where chunks_as_is, else zero_padded_rows' view, its copy kept
// alive by `keep`; t again where the copy's offsets would not fit 32 bits. `chunks`: whether that is read
// in whole 16-byte chunks (all but the last case).
at::Tensor vector_aligned(const at::Tensor& t, std::vector<at::Tensor>& keep, at::Tensor& zeros, bool& chunks) {
  chunks = true;
  if (chunks_as_is(t)) return t;
  const at::Tensor padded = padded_like(t);
  chunks = batch_offsets_fit_int32(padded);
  if (!chunks) return t;
  keep.push_back(padded);
  return zero_padded_rows(t, padded, zeros);
}

// Points the parameters' q, k, v (and dO, when given) at vector_aligned versions of them; returns
// whether every one is then read in whole chunks (p.vector_loads). queries_staged: the forward's program
// stages q (tiles.h stages_queries), which then reads q as it is where q would need a copy, element by
// element (p.q_by_element; vector_loads then speaks for k and v).
bool use_aligned_inputs(Arguments& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor* grad_out, bool queries_staged = false) {
  ReAttnParams& p = a.p;
  at::Tensor zeros;
  bool chunks[4] = {true, true, true, true};
  p.q_by_element = queries_staged && !chunks_as_is(q);
  const at::Tensor qa = p.q_by_element ? q : vector_aligned(q, a.keep, zeros, chunks[0]),
                   ka = vector_aligned(k, a.keep, zeros, chunks[1]), va = vector_aligned(v, a.keep, zeros, chunks[2]);
  p.q = qa.data_ptr();
  p.q_st = strides_of(qa);
  p.k = ka.data_ptr();
  p.k_st = strides_of(ka);
  p.v = va.data_ptr();
  p.v_st = strides_of(va);
  if (grad_out != nullptr) {
    const at::Tensor ga = vector_aligned(*grad_out, a.keep, zeros, chunks[3]);
    p.grad_out = ga.data_ptr();
    p.do_st = strides_of(ga);
  }
  return chunks[0] && chunks[1] && chunks[2] && chunks[3];
}

// The shared memory a tensor-core program of `kind` (kForward, kBackward) may take: shared_limit if given,
// else what `like`'s GPU allows (device_shared_limit), else (the emulator) an H100's.
size_t tensor_core_shared_limit(const at::Tensor& like, int64_t shared_limit, int kind) {
  if (shared_limit > 0) return static_cast<size_t>(shared_limit);
#ifdef REATTN_WITH_CUDA
  if (like.is_cuda()) return device_shared_limit(like, kind);
#endif
  return kEmulatedTensorCoreSharedLimit;
}

// The tensor-core shape for this forward on q's device (or the emulator), or -1.
int forward_shape_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const ReAttnParams& p,
                      int64_t shared_limit) {
  if (!tensor_cores(q.scalar_type())) return -1;
  if (!batch_offsets_fit_int32(q) || !batch_offsets_fit_int32(k) || !batch_offsets_fit_int32(v)) return -1;
  return pick_forward_shape(p.H, p.D, p.Nk, tensor_core_shared_limit(q, shared_limit, kForward));
}

// reattn::cuda_forward_stages_queries: whether cuda_forward's tensor-core program for H heads of head dim D, Nk
// keys and dtype on GPU `device` (-1: the emulator) stages q's rows (tiles.h stages_queries), reading them
// unpadded: the ladder then pads k and v alone where D is not a multiple of 8, and the backward pads q for
// itself (use_aligned_inputs). Plain numbers, so that torch.compile can take the answer as a constant.
bool forward_stages_queries(int64_t H, int64_t D, int64_t Nk, const std::string& dtype, int64_t device) {
  if (dtype != "float16" && dtype != "bfloat16") return false;
  if (H < 1 || H > kMaxHeads || D < 1 || D > kMaxHeadDim || Nk < 1) return false;
  at::TensorOptions on = at::TensorOptions().dtype(dtype == "float16" ? at::kHalf : at::kBFloat16);
#ifdef REATTN_WITH_CUDA
  if (device >= 0) on = on.device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
#endif
  const size_t limit = tensor_core_shared_limit(at::empty({0}, on), 0, kForward);
  const int shape = pick_forward_shape(static_cast<int>(H), static_cast<int>(D), static_cast<int>(Nk), limit);
  return shape >= 0 && stages_queries(false, forward_shape(shape).keys);
}

at::Tensor moments_center(const at::Tensor& mix_weight, int64_t n_keys, at::ScalarType dtype, bool reverse_items,
                          int64_t shuffle_seed);

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& mix_weight, const c10::optional<at::Tensor>& mix_bias,
                                const c10::optional<at::Tensor>& norm_weight,
                                const c10::optional<at::Tensor>& norm_bias,
                                const c10::optional<at::Tensor>& batch_stats,
                                const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& seed,
                                const c10::optional<at::Tensor>& stats_in, double scale, double out_scale,
                                const std::string& norm, double eps, double dropout_p, bool with_moments,
                                bool out_is_acc, int64_t shared_limit, bool reverse_items, bool poison_outputs, bool programs_only,
                                int64_t shuffle_seed, bool general_variant,
                                const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, int64_t center_keys) {
  const char* op = "reattn cuda_forward";
  Arguments a = prepare(op, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, dropout_p);
  ReAttnParams& p = a.p;
  const bool eval_batch = running_mean.has_value() && running_mean->defined();
  if (eval_batch || (running_var.has_value() && running_var->defined())) {
    TORCH_CHECK_VALUE(eval_batch && running_var.has_value() && running_var->defined(), op,
                      ": running_mean and running_var go together");
    TORCH_CHECK_VALUE(norm == "batch" && !(batch_stats.has_value() && batch_stats->defined()) && !with_moments &&
                          !(stats_in.has_value() && stats_in->defined()),
                      op, ": running_mean and running_var are eval-mode BatchNorm's statistics: norm 'batch', "
                      "without batch_stats, stats or with_moments");
    a.running[0] = parameter(op, "running_mean", running_mean, {p.H}, q);
    a.running[1] = parameter(op, "running_var", running_var, {p.H}, q);
  }
  set_norm(op, a, q, norm, out_scale, eps, batch_stats);
  const auto acc = acc_of(q.scalar_type());
  TORCH_CHECK_VALUE(!with_moments || norm == "none", op, ": with_moments needs norm 'none', got '", norm, "'");
  TORCH_CHECK_VALUE(!out_is_acc || with_moments, op, ": out_is_acc goes with with_moments (X V kept in the ",
                    "accumulation type)");
  // center_keys: the one-sweep forward's shift, -center_g = -sum_h W[g, h] / center_keys as the mixing bias, formed
  // by the tensor-core programs' fold (no launch of its own) or, for the CUDA-core programs, by moments_center.
  TORCH_CHECK_VALUE(center_keys >= 0 && (center_keys == 0 || (with_moments && !a.given[1].defined())), op,
                    ": center_keys (the shift's keys, >= 1) goes with with_moments and no mix_bias, got ", center_keys);
  const int shape = programs_only ? -1 : forward_shape_for(q, k, v, p, shared_limit);
  at::Tensor stats;
  const bool given = stats_in.has_value() && stats_in->defined();
  if (given) {
    stats = *stats_in;
    const bool lse_form = stats.dim() == 3;
    TORCH_CHECK_VALUE((lse_form ? stats.sizes() == at::IntArrayRef({p.B, p.H, p.Nq})
                                : stats.sizes() == at::IntArrayRef({p.B, p.H, p.Nq, 2})) &&
                          stats.scalar_type() == acc && stats.is_contiguous() && stats.device() == q.device(),
                      op, ": stats must be contiguous [B, H, Nq, 2] (max, log-sum) or [B, H, Nq] (logsumexp) ", acc,
                      " on ", q.device(), ", got ", stats.sizes(), " ", stats.scalar_type());
    if (lse_form) stats = stats_from_lse(stats);
  } else {
    stats = at::empty({p.B, p.H, p.Nq, 2}, q.options().dtype(acc));
  }
  // with_moments: out = X V, in the accumulation type where out_is_acc (where the caller's mean(X) U need not be
  // small against it: a mask), else in q's dtype.
  at::Tensor out = at::empty({p.B, p.H, p.Nq, p.D}, out_is_acc ? q.options().dtype(acc) : q.options());
  if (poison_outputs) {
    poison(out);
    if (!given) poison(stats);
  }
  p.out = out.data_ptr();
  p.o_st = strides_of(out);
  p.out_is_acc = out_is_acc;
  at::Tensor moments;
  // with_moments without a mask: the tensor-core programs' shares of U = sum_j V_j, else empty (the caller sums V).
  at::Tensor value_sums = at::empty({0, p.H, 1, p.D}, q.options().dtype(acc));
  if (shape >= 0) {
    const TileShape s = forward_shape(shape);
    const int64_t row_blocks = (p.Nq + s.rows() - 1) / s.rows(), programs = p.B * row_blocks;
    // Each program writes its own sums (no atomics): the caller adds them up in float64.
    moments = at::empty({with_moments ? programs : 0, 2, p.H}, q.options().dtype(at::kDouble));
    const int order = emulator_order(reverse_items, shuffle_seed);
    p.fold = fold_inputs(a);
    if (center_keys > 0) p.fold.center_scale = -1.0 / static_cast<double>(center_keys);
    p.lse = stats.data_ptr();
    p.stats_is_input = given;
    p.moments = with_moments ? moments.data_ptr<double>() : nullptr;
    p.vector_loads = use_aligned_inputs(a, q, k, v, nullptr, stages_queries(false, s.keys));
    const int variant = forward_variant_for(p, general_variant);
    // One-segment shapes, and the segmented ones' plain moments variant (rows.cuh, kValueSums).
    if (with_moments && p.mask_kind == kMaskNone && (s.keys > 64 || variant == kPlainMoments)) {
      value_sums = at::empty({p.B, p.H, row_blocks, p.D}, q.options().dtype(at::kFloat));
      p.value_sums = value_sums.data_ptr<float>();
    }
    if (poison_outputs) {
      poison(moments);
      poison(value_sums);
    }
    // A plain problem over key segments of more than 224 keys (row_configs.h takes_statistics_kernel) takes its
    // row statistics from the statistics kernel first (statistics.cuh), which the forward's programs then read
    // (rows.cuh load_statistics) instead of sweeping every head's keys themselves.
    const bool statistics_first = variant != kGeneral && !given && takes_statistics_kernel(s, p.D, p.Nk);
    const StatisticsShape statistics = statistics_shape_for(s, p.D);
    if (!q.is_cuda()) {
      if (statistics_first) {
        emulate_statistics(storage_of(q.scalar_type()), statistics, p, order, static_cast<uint64_t>(shuffle_seed));
        p.stats_is_input = true;
      }
      emulate_forward(storage_of(q.scalar_type()), shape, variant, p, order, static_cast<uint64_t>(shuffle_seed));
    } else {
#ifdef REATTN_WITH_CUDA
      const c10::cuda::CUDAGuard guard(q.device());
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const bool bf16 = q.scalar_type() == at::kBFloat16;
      if (statistics_first) {
        const cudaError_t err = bf16 ? launch_statistics_bf16(statistics, p, stream)
                                     : launch_statistics_f16(statistics, p, stream);
        TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
        p.stats_is_input = true;
      }
      const cudaError_t err = bf16 ? launch_forward_bf16(shape, variant, p, stream)
                                   : launch_forward_f16(shape, variant, p, stream);
      TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
#endif
    }
  } else {
    p.lse = stats.data_ptr();
    p.stats_is_input = given;
    moments = at::zeros({with_moments ? 1 : 0, 2, p.H}, q.options().dtype(at::kDouble));
    p.moments = with_moments ? moments.data_ptr<double>() : nullptr;
    if (eval_batch) eval_batch_rows(a, q);
    if (with_moments && q.is_cuda()) {
      at::globalContext().alertNotDeterministic(
          "reattn cuda_forward with moments on the CUDA-core programs (fp32 / fp64, or no tensor-core plan) adds "
          "them with atomics");
    }
    if (center_keys > 0) a.given[1] = moments_center(mix_weight, center_keys, acc, reverse_items, shuffle_seed)[1];
    core_parameters(a, q);
    run(op, kForward, q, p, shared_limit, reverse_items);
  }
  if (with_moments) return {out, stats, moments, value_sums};
  return {out, stats};
}

std::vector<at::Tensor> gram_sums(const at::Tensor& q, const at::Tensor& k,
                                   const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& seed,
                                   double scale, double dropout_p, double shift, int64_t shared_limit,
                                   bool reverse_items) {
  const char* op = "reattn cuda_gram_sums";
  if (q.is_cuda()) {
    at::globalContext().alertNotDeterministic("reattn cuda_gram_sums adds the Gram sums with atomics");
  }
  Arguments a = prepare(op, q, k, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, attn_mask,
                        seed, scale, dropout_p);
  ReAttnParams& p = a.p;
  at::Tensor stats = at::empty({p.B, p.H, p.Nq, 2}, q.options().dtype(acc_of(q.scalar_type())));
  at::Tensor s1 = at::zeros({p.H}, q.options().dtype(at::kDouble));
  at::Tensor gram = at::zeros({p.H, p.H}, q.options().dtype(at::kDouble));
  p.lse = stats.data_ptr();
  p.shift = shift;
  p.s1 = s1.data_ptr<double>();
  p.gram = gram.data_ptr<double>();
  run(op, kGramSums, q, p, shared_limit, reverse_items);
  return {stats, s1, gram};
}

// Whether a backward call returns the norm's own gradients (dgamma, dbeta): not training BatchNorm's full
// backward, whose norm gradients are the sums of its stats_only call (or of head_dot_sums), which the
// caller has (reattn/backends/_fused.py); the row pass then skips those sums (rows.cuh grad_mixed).
bool norm_gradients(const ReAttnParams& p, bool stats_only) { return stats_only || p.norm != kNormBatch; }

// The tensor-core backward's shapes (row pass, key pass in its plain variant) for this problem, or false.
bool backward_shapes_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
                         const ReAttnParams& p, int64_t shared_limit, int* rows, int* keys) {
  if (!tensor_cores(q.scalar_type())) return false;
  for (const at::Tensor* t : {&q, &k, &v, &grad_out}) {
    if (!batch_offsets_fit_int32(*t)) return false;
  }
  return pick_backward_shapes(p.H, p.D, p.Nk, tensor_core_shared_limit(q, shared_limit, kBackward), rows, keys, kKeysPlain,
                              q.scalar_type() == at::kBFloat16);
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& mix_weight,
                                 const c10::optional<at::Tensor>& mix_bias,
                                 const c10::optional<at::Tensor>& norm_weight,
                                 const c10::optional<at::Tensor>& norm_bias,
                                 const c10::optional<at::Tensor>& batch_stats,
                                 const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& seed,
                                 const at::Tensor& stats, double scale, double out_scale, const std::string& norm,
                                 double eps, double dropout_p, bool stats_only, int64_t shared_limit,
                                 bool reverse_items, bool poison_outputs, bool programs_only, int64_t shuffle_seed,
                                 bool general_variant) {
  const char* op = "reattn cuda_backward";
  Arguments a = prepare(op, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, dropout_p);
  ReAttnParams& p = a.p;
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                        grad_out.device() == q.device(),
                    op, ": grad_out must match q (", q.sizes(), " ", q.scalar_type(), "), got ", grad_out.sizes(),
                    " ", grad_out.scalar_type());
  p.grad_out = grad_out.data_ptr();
  p.do_st = strides_of(grad_out);
  set_norm(op, a, q, norm, out_scale, eps, batch_stats);
  const auto acc = acc_of(q.scalar_type());
  TORCH_CHECK_VALUE((stats.sizes() == at::IntArrayRef({p.B, p.H, p.Nq, 2}) ||
                     stats.sizes() == at::IntArrayRef({p.B, p.H, p.Nq})) &&
                        stats.scalar_type() == acc && stats.is_contiguous() && stats.device() == q.device(),
                    op, ": stats must be the forward's contiguous [B, H, Nq, 2] ", acc, " row statistics");
  const auto f64 = q.options().dtype(at::kDouble);
  const int64_t H = p.H;
  int rows = -1, keys = -1;
  if (!programs_only && backward_shapes_for(q, k, v, grad_out, p, shared_limit, &rows, &keys)) {
    // Deterministic: D, dQ and the parameter-gradient partials per program from the row pass, dK
    // and dV from the key pass, no atomics; the partials are added here in float64.
    const at::Tensor row_stats = stats.dim() == 4 ? stats : stats_from_lse(stats);
    p.lse = row_stats.data_ptr();
    const int order = emulator_order(reverse_items, shuffle_seed);
    p.fold = fold_inputs(a);
    p.vector_loads = use_aligned_inputs(a, q, k, v, &grad_out);
    p.stats_only = stats_only;
    const bool plain = backward_plain_for(p, rows, general_variant);
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    const int key_variant = backward_keys_variant(plain, p.norm == kNormLayer, bf16);
    if (!key_shape_compiled(key_variant, keys, bf16)) {  // a shape of the plain variants only: pick again
      keys = pick_key_shape(static_cast<int>(p.H), static_cast<int>(p.D), tensor_core_shared_limit(q, shared_limit, kBackward),
                            key_variant, bf16);
      TORCH_CHECK(keys >= 0, op, ": no key-pass shape for the variant (backward_configs.h)");
    }
    const TileShape rs = backward_row_shape(rows);
    const int64_t programs = p.B * ((p.Nq + rs.rows() - 1) / rs.rows());
    at::Tensor partials = at::empty({programs, H * H + 3 * H}, q.options().dtype(at::kFloat));
    at::Tensor delta, dq, dk, dv;
    if (!stats_only) {  // the sums alone allocate nothing else
      delta = at::empty({p.B, H, p.Nq}, q.options().dtype(at::kFloat));
      dq = at::empty({p.B, H, p.Nq, p.D}, q.options());
      dk = at::empty({p.B, H, p.Nk, p.D}, q.options());
      dv = at::empty_like(dk);
      if (poison_outputs) {
        poison(dq);
        poison(dk);
        poison(dv);
        poison(delta);
      }
      p.delta = delta.data_ptr<float>();
      p.dq = dq.data_ptr();
      p.dq_st = strides_of(dq);
      p.dk = dk.data_ptr();
      p.dk_st = strides_of(dk);
      p.dv = dv.data_ptr();
      p.dv_st = strides_of(dv);
    }
    if (poison_outputs) poison(partials);
    p.partials = partials.data_ptr<float>();
    if (!q.is_cuda()) {
      emulate_backward(storage_of(q.scalar_type()), rows, keys, plain, p, order, static_cast<uint64_t>(shuffle_seed));
    } else {
#ifdef REATTN_WITH_CUDA
      const c10::cuda::CUDAGuard guard(q.device());
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const cudaError_t err = q.scalar_type() == at::kBFloat16 ? launch_backward_bf16(rows, keys, plain, p, stream)
                                                               : launch_backward_f16(rows, keys, plain, p, stream);
      TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
#endif
    }
    // The aligned copies are dead once the programs are enqueued (the caching allocator hands their
    // memory only to later work on this stream): freed before the float64 sum, whose converted copy
    // of the partials would otherwise sit on top of them at the call's peak.
    a.keep.clear();
    // The partials summed in float64 (torch's reduction), then every gradient in one launch
    // (param_grads_kernel), each in its parameter's dtype (float64 where the parameter is absent, and for
    // the sums alone): dW = sum dM P~ = sum dM P~' / (1 - p); the norm's sums carry out_scale
    // (dN = out_scale dA).
    const at::Tensor total = partials.sum(0, /*keepdim=*/false, at::kDouble);
    const double keep = p.seed != nullptr ? 1.0 / (1.0 - p.dropout_p) : 1.0;
    auto grad_for = [&](const at::Tensor& param) {
      return param.defined() && !stats_only ? at::empty(param.sizes(), q.options().dtype(param.scalar_type()))
                                            : at::empty({H}, f64);
    };
    at::Tensor dW = stats_only ? at::empty({0}, f64) : grad_for(a.given[0]);
    at::Tensor dc = stats_only ? at::empty({0}, f64) : grad_for(a.given[1]);
    const bool norm_grads = norm_gradients(p, stats_only);
    at::Tensor dgamma = norm_grads ? grad_for(a.given[2]) : at::empty({0}, f64);
    at::Tensor dbeta = norm_grads ? grad_for(a.given[3]) : at::empty({0}, f64);
    ParamGradsParams grads;
    grads.total = total.data_ptr<double>();
    auto piece = [&](at::Tensor& out, int64_t begin, double factor) {
      if (out.numel() == 0) return;
      const int k = grads.pieces++;
      grads.begin[k] = static_cast<int>(begin);
      grads.size[k] = static_cast<int>(out.numel());
      grads.storage[k] = storage_of(out.scalar_type());
      grads.factor[k] = factor;
      grads.out[k] = out.data_ptr();
    };
    piece(dW, 0, keep);
    piece(dc, H * H, 1.0);
    piece(dgamma, H * H + H, out_scale);
    piece(dbeta, H * H + 2 * H, out_scale);
    emulate_or_launch(
        op, q, [&] { emulate_param_grads(grads, order, static_cast<uint64_t>(shuffle_seed)); },
        [&](auto stream) { return launch_param_grads(grads, stream); });
    if (stats_only) {
      const at::Tensor none = at::empty({0}, q.options());
      return {none, none, none, dW, dc, dgamma, dbeta};
    }
    return {dq, dk, dv, dW, dc, dgamma, dbeta};
  }
  // The CUDA-core programs add dK, dV and the parameter gradients with atomics: on a GPU their
  // order (so the last bits) varies from run to run. torch decides whether that is an error.
  if (q.is_cuda()) {
    at::globalContext().alertNotDeterministic(
        "reattn cuda_backward on the CUDA-core programs (fp32 / fp64, or a problem without a tensor-core "
        "backward plan: H > 16, D > 64, or tiles that do not fit the GPU's shared memory) sums dK, dV with "
        "atomics");
  }
  const at::Tensor row_stats = stats.dim() == 4 ? stats : stats_from_lse(stats);
  p.lse = row_stats.data_ptr();
  at::Tensor dq = at::empty({p.B, p.H, p.Nq, p.D}, q.options());
  at::Tensor dk = at::zeros({p.B, p.H, p.Nk, p.D}, q.options().dtype(acc));
  at::Tensor dv = at::zeros_like(dk);
  at::Tensor dW = at::zeros({p.H, p.H}, f64), dc = at::zeros({p.H}, f64), dgamma = at::zeros({p.H}, f64),
             dbeta = at::zeros({p.H}, f64);
  if (poison_outputs) poison(dq);
  p.dq = dq.data_ptr();
  p.dq_st = strides_of(dq);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dW = dW.data_ptr<double>();
  p.dc = dc.data_ptr<double>();
  p.dgamma = dgamma.data_ptr<double>();
  p.dbeta = dbeta.data_ptr<double>();
  core_parameters(a, q);
  run(op, stats_only ? kBnGradSums : kBackward, q, p, shared_limit, reverse_items);
  if (!norm_gradients(p, stats_only)) dgamma = dbeta = at::empty({0}, f64);  // the programs' sums not returned
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type()), dW, dc, dgamma, dbeta};
}

// ReAttnParams::row_tiles as the row launchers set it (tiles.h order), for the static model's emulation.
pybind11::tuple row_layout_tuple(const RowLayout& l) {
  return pybind11::make_tuple(l.probs, l.p_row, l.ring, l.ring_slot, l.k_row, l.v_row, l.weights, l.vectors, l.stats,
                              l.exchange, l.moments, l.weights_t, l.dmixed, l.m_row, l.delta, l.sums, l.grads,
                              l.queries, l.bytes);
}

// The tensor-core forward's tile shape for a problem, or None (the CUDA-core programs run).
pybind11::object forward_tiles(int64_t H, int64_t D, int64_t Nq, int64_t Nk, const std::string& dtype,
                               int64_t shared_limit) {
  const char* op = "reattn cuda_forward_tiles";
  TORCH_CHECK_VALUE(H >= 1 && H <= kMaxHeads && D >= 1 && D <= kMaxHeadDim && Nq >= 0 && Nk >= 1, op,
                    ": H must be in [1, ", kMaxHeads, "], D in [1, ", kMaxHeadDim, "], Nk >= 1");
  TORCH_CHECK_VALUE(dtype == "float16" || dtype == "bfloat16" || dtype == "float32" || dtype == "float64", op,
                    ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  if (dtype != "float16" && dtype != "bfloat16") return pybind11::none();
  const size_t limit = shared_limit > 0 ? static_cast<size_t>(shared_limit) : kEmulatedTensorCoreSharedLimit;
  const int index = pick_forward_shape(static_cast<int>(H), static_cast<int>(D), static_cast<int>(Nk), limit);
  if (index < 0) return pybind11::none();
  const TileShape s = forward_shape(index);
  pybind11::dict out;
  out["shape"] = index;
  out["slabs"] = s.slabs;
  out["groups"] = s.groups;
  out["heads"] = s.heads;
  out["d"] = s.d;
  out["d_out"] = s.d_out;
  out["keys"] = s.keys;
  out["threads"] = s.threads();
  out["rows"] = s.rows();
  out["segments"] = segment_count(s, static_cast<int>(Nk));
  const RowLayout rl = row_layout(s, static_cast<int>(H), static_cast<int>(Nk));
  out["shared_bytes"] = rl.bytes;
  out["layout"] = row_layout_tuple(rl);
  out["grid"] = pybind11::make_tuple((Nq + s.rows() - 1) / s.rows(), (D + s.d_out - 1) / s.d_out);
  out["narrow"] = narrow_tail(s, static_cast<int>(D));  // launches forward_kernel<NarrowTail<RowConfig<...>>>
  out["stages_queries"] = stages_queries(false, s.keys);  // reads q unpadded (use_aligned_inputs)
  // The plain variants' statistics kernel, launched first (cuda_forward), or None.
  if (takes_statistics_kernel(s, static_cast<int>(D), static_cast<int>(Nk))) {
    const StatisticsShape t = statistics_shape_for(s, static_cast<int>(D));
    pybind11::dict statistics;
    statistics["warps"] = t.warps;
    statistics["tiles"] = t.tiles;
    statistics["d"] = t.d;
    statistics["narrow"] = t.narrow;
    statistics["threads"] = t.threads();
    statistics["rows"] = t.rows();
    statistics["shared_bytes"] = statistics_bytes(t);
    statistics["grid"] = (Nq + t.rows() - 1) / t.rows();  // programs per (batch element, head)
    out["statistics"] = statistics;
  } else {
    out["statistics"] = pybind11::none();
  }
  return out;
}

// The tensor-core backward's shapes for a problem: {"rows": the row pass's shape, "keys": the key
// pass's}, each with its launch (threads, shared bytes, grid per batch element), or None (the
// CUDA-core programs run it).
pybind11::object backward_tiles(int64_t H, int64_t D, int64_t Nq, int64_t Nk, const std::string& dtype,
                                int64_t shared_limit, bool plain) {
  const char* op = "reattn cuda_backward_tiles";
  TORCH_CHECK_VALUE(H >= 1 && H <= kMaxHeads && D >= 1 && D <= kMaxHeadDim && Nq >= 0 && Nk >= 1, op,
                    ": H must be in [1, ", kMaxHeads, "], D in [1, ", kMaxHeadDim, "], Nk >= 1");
  TORCH_CHECK_VALUE(dtype == "float16" || dtype == "bfloat16" || dtype == "float32" || dtype == "float64", op,
                    ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  if (dtype != "float16" && dtype != "bfloat16") return pybind11::none();
  const size_t limit = shared_limit > 0 ? static_cast<size_t>(shared_limit) : kEmulatedTensorCoreSharedLimit;
  int rows = -1, keys = -1;
  // The key variant: plain (LayerNorm's own in bf16 takes the same shapes) or general.
  if (!pick_backward_shapes(static_cast<int>(H), static_cast<int>(D), static_cast<int>(Nk), limit, &rows, &keys,
                            plain ? kKeysPlain : kKeysGeneral, dtype == "bfloat16")) {
    return pybind11::none();
  }
  const TileShape r = backward_row_shape(rows);
  pybind11::dict row_pass;
  row_pass["shape"] = rows;
  row_pass["has_plain"] = backward_rows_have_plain(rows);
  row_pass["slabs"] = r.slabs;
  row_pass["groups"] = r.groups;
  row_pass["heads"] = r.heads;
  row_pass["d"] = r.d;
  row_pass["d_out"] = r.d_out;
  row_pass["keys"] = r.keys;
  row_pass["threads"] = r.threads();
  row_pass["rows"] = r.rows();
  row_pass["segments"] = segment_count(r, static_cast<int>(Nk));
  const RowLayout rl = row_layout(r, static_cast<int>(H), static_cast<int>(Nk));
  row_pass["shared_bytes"] = rl.bytes;
  row_pass["layout"] = row_layout_tuple(rl);
  row_pass["grid"] = pybind11::make_tuple((Nq + r.rows() - 1) / r.rows(), (D + r.d_out - 1) / r.d_out);
  const KeyShape k = key_shape(keys);
  pybind11::dict key_pass;
  key_pass["shape"] = keys;
  key_pass["kslabs"] = k.kslabs;
  key_pass["groups"] = k.groups;
  key_pass["heads"] = k.heads;
  key_pass["d"] = k.d;
  key_pass["tiles"] = k.tiles;
  key_pass["threads"] = k.threads();
  key_pass["keys"] = k.keys();
  const KeyLayout kl = key_layout(k, static_cast<int>(H));
  key_pass["shared_bytes"] = kl.bytes;
  // ReAttnParams::key_tiles as the launcher sets it (params.h order), for the static model's emulation.
  key_pass["layout"] = pybind11::make_tuple(kl.keys, kl.values, kl.row, kl.ring, kl.ring_slot, kl.probs_t, kl.dmixed,
                                            kl.t_row, kl.weights, kl.weights_t, kl.vectors, kl.exchange, kl.bytes);
  key_pass["grid"] = pybind11::make_tuple((Nk + k.keys() - 1) / k.keys(), 1);
  pybind11::dict out;
  out["rows"] = row_pass;
  out["keys"] = key_pass;
  return out;
}

pybind11::dict plan(int64_t kind, int64_t H, int64_t D, int64_t Nq, const std::string& dtype, int64_t shared_limit) {
  const char* op = "reattn cuda_plan";
  at::ScalarType t = at::kFloat;
  if (dtype == "float16") {
    t = at::kHalf;
  } else if (dtype == "bfloat16") {
    t = at::kBFloat16;
  } else if (dtype == "float64") {
    t = at::kDouble;
  } else {
    TORCH_CHECK_VALUE(dtype == "float32", op, ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  }
  TORCH_CHECK_VALUE(kind >= kForward && kind <= kBnGradSums, op, ": kind must be 0 (forward), 1 (gram_sums: "
                    "the Gram-sum sweep), 2 (backward) or 3 (bn_grad_sums: the BatchNorm backward's sums), got ",
                    kind);
  TORCH_CHECK_VALUE(H >= 1 && H <= kMaxHeads && D >= 1 && D <= kMaxHeadDim && Nq >= 0, op, ": H must be in [1, ",
                    kMaxHeads, "] and D in [1, ", kMaxHeadDim, "], got H = ", H, ", D = ", D);
  const Plan p = plan_for(op, static_cast<int>(kind), H, D, Nq, t,
                          static_cast<size_t>(shared_limit > 0 ? shared_limit : kEmulatedSharedLimit));
  pybind11::dict out;
  out["block_m"] = p.block_m;
  out["block_n"] = p.block_n;
  out["pad"] = p.pad;
  out["head_dim_p"] = p.head_dim_p;
  out["heads_p"] = p.heads_p;
  out["head_group"] = p.head_group;
  out["chunk_d"] = p.chunk_d;
  out["num_chunks"] = p.num_chunks;
  out["num_m"] = p.num_m;
  out["shared_bytes"] = p.shared_bytes;
  out["threads"] = kThreads;
  return out;
}

// ---- one-sweep training BatchNorm's element-wise steps (head_affine.cuh) -------------------------------------

// Rows per block of head_affine and head_dot_sums: about 16384 elements (64 per thread: 8 vector items of a
// 16-bit type), split evenly over the blocks along Nq (no short last block), and at most 65535 blocks along Nq
// (grid.y). A warp issues ~160 instructions before its first item (the head and row indices, four tensors'
// addresses, the coefficients) and ~40 per item: at 4096 elements a block, two thirds of what DeiT-S's
// head_affine issued was that prologue (static model); at 16384 it is about a third.
int64_t head_rows_per_block(int64_t Nq, int64_t D) {
  const int64_t target = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((Nq + target - 1) / target, 65535));
  return std::max<int64_t>(1, (Nq + blocks - 1) / blocks);
}

void check_unit_stride(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name, " needs a unit stride over the head dim, ",
                    "got strides ", t.strides());
}

// u broadcast to [B, H, Nq, D] by strides (0 on its size-1 dims), checked.
Strides4 broadcast_strides(const char* op, const char* name, const at::Tensor& u, at::IntArrayRef shape,
                           at::ScalarType acc, const at::Device& device) {
  TORCH_CHECK_VALUE(u.dim() == 4, op, ": ", name, " must be 4-D, broadcastable to ", shape, ", got ", u.sizes());
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(u.size(i) == shape[i] || (u.size(i) == 1 && i < 3), op, ": ", name, " ", u.sizes(),
                      " does not broadcast to ", shape, " (over B, H and Nq only)");
  }
  TORCH_CHECK_TYPE(u.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", u.scalar_type());
  TORCH_CHECK_VALUE(u.device() == device, op, ": ", name, " is on ", u.device(), " but the output on ", device);
  check_unit_stride(op, name, u);
  return strides_of(u.expand(shape));
}

// Whether every row of t (strides st, in elements) starts 16-byte aligned: HeadAffineParams::vector.
bool rows_16_byte_aligned(const at::Tensor& t, const Strides4& st) {
  const int64_t size = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && st.b * size % 16 == 0 && st.h * size % 16 == 0 &&
         st.n * size % 16 == 0;
}

// HeadAffineParams::vector: items of one 16-byte access of T (16 / sizeof(T) columns) where the accumulation
// type is fp32, D is a multiple of the item and every tensor's rows start 16-byte aligned.
bool vector_items(at::ScalarType dtype, int64_t D, std::initializer_list<std::pair<const at::Tensor*, Strides4>> rows) {
  if (acc_of(dtype) != at::kFloat || D % (16 / c10::elementSize(dtype)) != 0) return false;
  for (const auto& [t, st] : rows) {
    if (!rows_16_byte_aligned(*t, st)) return false;
  }
  return true;
}

HeadAffineParams head_params(const at::Tensor& like) {
  HeadAffineParams p;
  p.B = like.size(0);
  p.H = static_cast<int>(like.size(1));
  p.Nq = static_cast<int>(like.size(2));
  p.D = static_cast<int>(like.size(3));
  p.rows = static_cast<int>(head_rows_per_block(p.Nq, p.D));
  return p;
}

void check_head_shape(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be [B, H, Nq, D], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_cuda() || t.is_cpu(), op, ": ", name, " must be on a CUDA device (or on the CPU for the ",
                    "emulator), got ", t.device());
  TORCH_CHECK_VALUE(t.size(1) >= 1 && t.size(2) <= std::numeric_limits<int>::max() &&
                        t.size(3) <= std::numeric_limits<int>::max() &&
                        t.size(0) * t.size(1) <= std::numeric_limits<int>::max(),
                    op, ": ", name, " ", t.sizes(), " needs H >= 1, Nq and D in int32 and B * H in int32");
}

at::Tensor head_affine(const at::Tensor& r, const at::Tensor& u, const at::Tensor& coefficients, at::ScalarType dtype,
                       const c10::optional<at::Tensor>& u_sum, bool reverse_items, bool poison_outputs,
                       int64_t shuffle_seed) {
  const char* op = "reattn cuda_head_affine";
  check_head_shape(op, "r", r);
  const int storage = storage_of(dtype, op, "dtype");
  const auto acc = acc_of(dtype);
  TORCH_CHECK_TYPE(r.scalar_type() == acc || r.scalar_type() == dtype, op, ": r must be ", dtype, " or ", acc,
                   " (its accumulation type), got ", r.scalar_type());
  HeadAffineParams p = head_params(r);
  TORCH_CHECK_VALUE(coefficients.sizes() == at::IntArrayRef({2, p.H}) && coefficients.scalar_type() == acc &&
                        coefficients.is_contiguous() && coefficients.device() == r.device(),
                    op, ": coefficients must be a contiguous [2, H] = [2, ", p.H, "] ", acc, " tensor (alpha, beta) on ",
                    r.device(), ", got ", coefficients.sizes(), " ", coefficients.scalar_type());
  check_unit_stride(op, "r", r);
  p.r = r.data_ptr();
  p.r_st = strides_of(r);
  p.r_is_acc = r.scalar_type() == acc;
  p.u = u.data_ptr();
  const bool summing = u_sum.has_value() && u_sum->defined();
  if (summing) {
    // u: U in parts [B, H, parts, D] (the forward programs' shares), added here and stored to u_sum [B, H, 1, D].
    TORCH_CHECK_VALUE(u.dim() == 4 && u.size(0) == p.B && u.size(1) == p.H && u.size(2) >= 1 &&
                          u.size(2) <= std::numeric_limits<int>::max() && u.size(3) == p.D,
                      op, ": with u_sum, u must be U in parts [B, H, parts, D] = [", p.B, ", ", p.H, ", parts, ", p.D,
                      "], got ", u.sizes());
    const Strides4 parts = broadcast_strides(op, "u", u, u.sizes(), acc, r.device());  // its dtype, device, strides
    TORCH_CHECK_VALUE(u_sum->sizes() == at::IntArrayRef({p.B, p.H, 1, p.D}) && u_sum->scalar_type() == acc &&
                          u_sum->is_contiguous() && u_sum->device() == r.device(),
                      op, ": u_sum must be a contiguous [B, H, 1, D] = [", p.B, ", ", p.H, ", 1, ", p.D, "] ", acc,
                      " tensor on ", r.device(), ", got ", u_sum->sizes(), " ", u_sum->scalar_type(), " on ",
                      u_sum->device());
    p.u_st = Strides4{parts.b, parts.h, 0, 1};
    p.u_parts = static_cast<int>(u.size(2));
    p.u_part_stride = parts.n;
    p.u_sum = u_sum->data_ptr();
    p.vector = vector_items(dtype, p.D, {{&r, p.r_st}, {&u, parts}, {&*u_sum, strides_of(*u_sum)}});
  } else {
    p.u_st = broadcast_strides(op, "u", u, r.sizes(), acc, r.device());
    p.vector = vector_items(dtype, p.D, {{&r, p.r_st}, {&u, p.u_st}});
  }
  p.coefficients = coefficients.data_ptr();
  at::Tensor out = at::empty(r.sizes(), r.options().dtype(dtype));
  if (poison_outputs) poison(out);
  p.out = out.data_ptr();
  emulate_or_launch(
      op, r,
      [&] {
        emulate_head_affine(storage, p, emulator_order(reverse_items, shuffle_seed),
                            static_cast<uint64_t>(shuffle_seed));
      },
      [&](auto stream) { return launch_head_affine(storage, p, stream); });
  return out;
}

// The one-sweep forward's centering shift [2, H] = (center, -center) in dtype (MomentsCenterParams,
// moments_center_kernel): one launch where torch's sum, division and negation took three.
at::Tensor moments_center(const at::Tensor& mix_weight, int64_t n_keys, at::ScalarType dtype, bool reverse_items,
                          int64_t shuffle_seed) {
  const char* op = "reattn cuda_moments_center";
  TORCH_CHECK_VALUE(mix_weight.dim() == 2 && mix_weight.size(0) == mix_weight.size(1) && mix_weight.size(0) >= 1 &&
                        mix_weight.size(0) <= kMaxHeads,
                    op, ": mix_weight must be [H, H] with H in [1, ", kMaxHeads, "], got ", mix_weight.sizes());
  TORCH_CHECK_VALUE(mix_weight.is_cuda() || mix_weight.is_cpu(), op, ": mix_weight must be on a CUDA device (or on ",
                    "the CPU for the emulator), got ", mix_weight.device());
  TORCH_CHECK_VALUE(n_keys >= 1, op, ": n_keys must be at least 1, got ", n_keys);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": dtype must be float32 or float64 (an accumulation type), got ", dtype);
  const int64_t H = mix_weight.size(0);
  const at::Tensor W = parameter(op, "mix_weight", mix_weight, {H, H}, mix_weight);
  MomentsCenterParams p;
  p.H = static_cast<int>(H);
  p.W = param_ref(W);
  p.inv_keys = 1.0 / static_cast<double>(n_keys);
  at::Tensor out = at::empty({2, H}, W.options().dtype(dtype));
  p.out = out.data_ptr();
  p.out_storage = storage_of(dtype);
  emulate_or_launch(
      op, W,
      [&] { emulate_moments_center(p, emulator_order(reverse_items, shuffle_seed), static_cast<uint64_t>(shuffle_seed)); },
      [&](auto stream) { return launch_moments_center(p, stream); });
  return out;
}

// Training BatchNorm's statistics and coefficients from the one-sweep forward's moments (BnMomentsParams,
// bn_moments_kernel): one launch where the float64 arithmetic on [H]-sized tensors took ~25 torch ops.
std::vector<at::Tensor> bn_moments(const at::Tensor& moments, const c10::optional<at::Tensor>& count,
                                   const c10::optional<at::Tensor>& center, const c10::optional<at::Tensor>& mix_bias,
                                   const c10::optional<at::Tensor>& norm_weight,
                                   const c10::optional<at::Tensor>& norm_bias, double out_scale, double eps,
                                   at::ScalarType dtype, double count_value, bool reverse_items,
                                   int64_t shuffle_seed, const c10::optional<at::Tensor>& mix_weight, int64_t n_keys) {
  const char* op = "reattn cuda_bn_moments";
  TORCH_CHECK_VALUE(moments.dim() == 3 && moments.size(1) == 2 && moments.scalar_type() == at::kDouble &&
                        moments.is_contiguous(),
                    op, ": moments must be a contiguous float64 [programs, 2, H] tensor, got ", moments.sizes(), " ",
                    moments.scalar_type());
  const int64_t H = moments.size(2);
  TORCH_CHECK_VALUE(H >= 1 && H <= kMaxHeads, op, ": H must be in [1, ", kMaxHeads, "], got ", H);
  const bool count_given = count.has_value() && count->defined();
  if (count_given) {
    TORCH_CHECK_VALUE(count->numel() == 1 && count->scalar_type() == at::kDouble &&
                          count->device() == moments.device(),
                      op, ": count must be one float64 value on ", moments.device(), ", got ", count->sizes(), " ",
                      count->scalar_type(), " on ", count->device());
  } else {
    TORCH_CHECK_VALUE(count_value > 1.0, op, ": without a count tensor, count_value must be the entries per head "
                      "(more than 1), got ", count_value);
  }
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": the coefficients' dtype must be float32 or float64 (an accumulation type), got ", dtype);
  const at::Tensor like = moments.select(1, 0);  // for parameter()'s device check
  BnMomentsParams p;
  p.H = static_cast<int>(H);
  p.programs = moments.size(0);
  p.moments = moments.data_ptr<double>();
  p.count = count_given ? count->data_ptr<double>() : nullptr;
  p.count_value = count_value;
  const bool center_given = center.has_value() && center->defined();
  TORCH_CHECK_VALUE(center_given != (mix_weight.has_value() && mix_weight->defined() && n_keys > 0), op,
                    ": give either center (the shift the forward took off X) or mix_weight and n_keys >= 1 (the "
                    "forward formed center = sum_h W[g, h] / n_keys itself), not both or neither");
  const at::Tensor given_center = parameter(op, "center", center, {H}, like);
  const at::Tensor W = parameter(op, "mix_weight", mix_weight, {H, H}, like);
  p.W = param_ref(W);
  p.inv_keys = center_given ? 0.0 : 1.0 / static_cast<double>(n_keys);
  const at::Tensor c = parameter(op, "mix_bias", mix_bias, {H}, like);
  const at::Tensor gamma = parameter(op, "norm_weight", norm_weight, {H}, like);
  const at::Tensor beta = parameter(op, "norm_bias", norm_bias, {H}, like);
  p.center = param_ref(given_center);
  p.c = param_ref(c);
  p.gamma = param_ref(gamma);
  p.beta = param_ref(beta);
  p.out_scale = out_scale;
  p.eps = eps;
  at::Tensor stats = at::empty({3, H}, moments.options());
  at::Tensor coefficients = at::empty({4, H}, moments.options().dtype(dtype));
  p.stats = stats.data_ptr<double>();
  p.coefficients = coefficients.data_ptr();
  p.coefficient_storage = storage_of(dtype);
  emulate_or_launch(
      op, moments,
      [&] { emulate_bn_moments(p, emulator_order(reverse_items, shuffle_seed), static_cast<uint64_t>(shuffle_seed)); },
      [&](auto stream) { return launch_bn_moments(p, stream); });
  return {stats, coefficients};
}

// H of training BatchNorm's statistics [3, H] (mean, biased variance, count; contiguous float64), checked.
int64_t batch_stats_heads(const char* op, const at::Tensor& stats) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 3 && stats.scalar_type() == at::kDouble &&
                        stats.is_contiguous(),
                    op, ": stats must be a contiguous float64 [3, H] tensor (mean, biased variance, count), got ",
                    stats.sizes(), " ", stats.scalar_type());
  const int64_t H = stats.size(1);
  TORCH_CHECK_VALUE(H >= 1 && H <= kMaxHeads, op, ": H must be in [1, ", kMaxHeads, "], got ", H);
  return H;
}

// Training BatchNorm's backward coefficients [4, H] (mean, rstd, e, f) in `dtype` from the statistics
// [3, H] and the backward sums (BnCoefficientsParams, bn_coefficients_kernel): one launch where
// reattn._batchnorm.bn_backward_coefficients takes ~15 torch ops. sums: [2, H] float64, or parts
// [2, parts, H, groups] in float32 or float64 (head_dot_sums' per-block partials, unsummed) that the kernel adds
// in float64. own_grads: the summed rows are also this call's gradients of norm_weight and norm_bias (returned in
// their dtypes, one rounding each; empty for an absent parameter), where the sum and two conversions took three
// more launches; else both empty.
std::vector<at::Tensor> bn_coefficients(const at::Tensor& stats, const at::Tensor& sums,
                                        const c10::optional<at::Tensor>& norm_weight,
                                        const c10::optional<at::Tensor>& norm_bias, double eps, at::ScalarType dtype,
                                        bool own_grads, bool reverse_items, int64_t shuffle_seed) {
  const char* op = "reattn cuda_bn_coefficients";
  const int64_t H = batch_stats_heads(op, stats);
  const bool summed = sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == H && sums.scalar_type() == at::kDouble;
  const bool parts = sums.dim() == 4 && sums.size(0) == 2 && sums.size(2) == H &&
                     (sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble);
  TORCH_CHECK_VALUE((summed || parts) && sums.device() == stats.device(), op, ": sums must be float64 [2, ", H,
                    "] or float32/float64 parts [2, parts, ", H, ", groups] on ", stats.device(), ", got ",
                    sums.sizes(), " ", sums.scalar_type(), " on ", sums.device());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": the coefficients' dtype must be float32 or float64 (an accumulation type), got ", dtype);
  const at::Tensor gamma = parameter(op, "norm_weight", norm_weight, {H}, stats);
  const at::Tensor beta = parameter(op, "norm_bias", norm_bias, {H}, stats);
  const at::Tensor view = summed ? sums.view({2, 1, H, 1}) : sums;
  BnCoefficientsParams p;
  p.H = static_cast<int>(H);
  p.stats = stats.data_ptr<double>();
  p.sums = view.data_ptr();
  p.sums_storage = storage_of(view.scalar_type());
  p.parts = view.size(1);
  p.groups = view.size(3);
  p.sums_row = view.stride(0);
  p.sums_part = view.stride(1);
  p.sums_head = view.stride(2);
  p.sums_group = view.stride(3);
  p.gamma = param_ref(gamma);
  p.eps = eps;
  at::Tensor coefficients = at::empty({4, H}, stats.options().dtype(dtype));
  p.coefficients = coefficients.data_ptr();
  p.coefficient_storage = storage_of(dtype);
  // A parameter's gradient in its dtype, or empty (absent, or not wanted).
  auto grad_of = [&](const at::Tensor& param, void*& out, int& storage) {
    if (!own_grads || !param.defined()) return at::empty({0}, stats.options());
    at::Tensor g = at::empty({H}, stats.options().dtype(param.scalar_type()));
    out = g.data_ptr();
    storage = storage_of(param.scalar_type());
    return g;
  };
  const at::Tensor grad_gamma = grad_of(gamma, p.grad_gamma, p.grad_gamma_storage);
  const at::Tensor grad_beta = grad_of(beta, p.grad_beta, p.grad_beta_storage);
  emulate_or_launch(
      op, stats,
      [&] {
        emulate_bn_coefficients(p, emulator_order(reverse_items, shuffle_seed), static_cast<uint64_t>(shuffle_seed));
      },
      [&](auto stream) { return launch_bn_coefficients(p, stream); });
  return {coefficients, grad_gamma, grad_beta};
}

// nn.BatchNorm2d's update of the running statistics, in place, from training BatchNorm's stats [3, H]
// (RunningStatsParams, running_stats_kernel): one launch where torch's update took 7 ops.
void update_running_stats(at::Tensor running_mean, at::Tensor running_var, const at::Tensor& stats, double momentum,
                          bool reverse_items, int64_t shuffle_seed) {
  const char* op = "reattn cuda_update_running_stats";
  const int64_t H = batch_stats_heads(op, stats);
  const auto check_buffer = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == H, op, ": ", name, " must have shape [", H, "], got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == stats.device(), op, ": ", name, " is on ", t.device(), " but stats on ",
                      stats.device());
    storage_of(t.scalar_type(), op, name);
  };
  check_buffer("running_mean", running_mean);
  check_buffer("running_var", running_var);
  RunningStatsParams p;
  p.H = static_cast<int>(H);
  p.stats = stats.data_ptr<double>();
  p.mean = running_mean.data_ptr();
  p.var = running_var.data_ptr();
  p.mean_storage = storage_of(running_mean.scalar_type());
  p.var_storage = storage_of(running_var.scalar_type());
  p.mean_stride = running_mean.stride(0);
  p.var_stride = running_var.stride(0);
  p.momentum = momentum;
  emulate_or_launch(
      op, stats,
      [&] { emulate_running_stats(p, emulator_order(reverse_items, shuffle_seed), static_cast<uint64_t>(shuffle_seed)); },
      [&](auto stream) { return launch_running_stats(p, stream); });
}

at::Tensor head_dot_sums(const at::Tensor& grad, const at::Tensor& r, const at::Tensor& u, const at::Tensor& stats,
                         const at::Tensor& mix_weight, const c10::optional<at::Tensor>& mix_bias, double eps,
                         int64_t n_keys, double scale, bool summed, bool reverse_items, bool poison_outputs,
                         int64_t shuffle_seed) {
  const char* op = "reattn cuda_head_dot_sums";
  check_head_shape(op, "grad", grad);
  const int storage = storage_of(grad.scalar_type(), op, "grad");
  const auto acc = acc_of(grad.scalar_type());
  TORCH_CHECK_VALUE(r.sizes() == grad.sizes(), op, ": r must have grad's shape ", grad.sizes(), ", got ", r.sizes());
  TORCH_CHECK_TYPE(r.scalar_type() == grad.scalar_type(), op, ": r is ", r.scalar_type(), " but grad is ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(r.device() == grad.device(), op, ": r is on ", r.device(), " but grad on ", grad.device());
  HeadAffineParams p = head_params(grad);
  TORCH_CHECK_VALUE(p.H <= kMaxHeads, op, ": H must be at most ", kMaxHeads, " (a lane per head), got ", p.H);
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({3, p.H}) && stats.scalar_type() == at::kDouble &&
                        stats.is_contiguous() && stats.device() == grad.device(),
                    op, ": stats must be a contiguous float64 [3, H] = [3, ", p.H, "] tensor (mean, biased variance, ",
                    "count) on ", grad.device(), ", got ", stats.sizes(), " ", stats.scalar_type(), " on ",
                    stats.device());
  TORCH_CHECK_VALUE(n_keys >= 1 && n_keys <= std::numeric_limits<int>::max(), op,
                    ": n_keys must be a positive int32, got ", n_keys);
  const at::Tensor like = stats.select(0, 0);  // for parameter()'s device check
  const at::Tensor w = parameter(op, "mix_weight", mix_weight, {p.H, p.H}, like);
  const at::Tensor c = parameter(op, "mix_bias", mix_bias, {p.H}, like);
  check_unit_stride(op, "grad", grad);
  check_unit_stride(op, "r", r);
  p.grad = grad.data_ptr();
  p.grad_st = strides_of(grad);
  p.r = r.data_ptr();
  p.r_st = strides_of(r);
  p.u = u.data_ptr();
  p.u_st = broadcast_strides(op, "u", u, grad.sizes(), acc, grad.device());
  p.vector = vector_items(grad.scalar_type(), p.D, {{&grad, p.grad_st}, {&r, p.r_st}, {&u, p.u_st}});
  p.stats = stats.data_ptr<double>();
  p.W = param_ref(w);
  p.c = param_ref(c);
  p.eps = eps;
  p.inv_keys = 1.0 / static_cast<double>(n_keys);
  const int64_t num_m = (p.Nq + p.rows - 1) / p.rows;
  p.scale = scale;
  at::Tensor partials = at::empty({2, p.B, p.H, num_m}, grad.options().dtype(acc));
  if (poison_outputs) poison(partials);
  p.partials = partials.data_ptr();
  emulate_or_launch(
      op, grad,
      [&] {
        emulate_head_dot_sums(storage, p, emulator_order(reverse_items, shuffle_seed),
                              static_cast<uint64_t>(shuffle_seed));
      },
      [&](auto stream) { return launch_head_dot_sums(storage, p, stream); });
  // The blocks' partial sums added in float64: [2, H] = scale (sum grad . R, sum grad . u) per head, one op;
  // unsummed for cuda_bn_coefficients, which adds them in its launch.
  if (!summed) return partials;
  return partials.sum({1, 3}, /*keepdim=*/false, at::kDouble);
}

at::Tensor device_check(int64_t kind, const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t order,
                        int64_t seed) {
  const char* op = "reattn cuda_device_check";
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 9, op, ": unknown check kind ", kind);
  TORCH_CHECK_VALUE(kind != 7 || a.is_cpu(), op, ": the misaligned-store check faults a GPU; it runs in the emulator");
  TORCH_CHECK_VALUE(order >= 0 && order <= 2, op, ": order must be 0 (forward), 1 (reverse) or 2 (shuffled)");
  const bool mma = kind <= 1;
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  if (mma) {
    TORCH_CHECK_TYPE(a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf, op,
                     ": the mma checks take bfloat16 or float16 operands");
    TORCH_CHECK_VALUE(a.sizes() == at::IntArrayRef({16, 32}) && a.is_contiguous(), op, ": a must be a contiguous [16, 32]");
    TORCH_CHECK_VALUE(b.has_value() && b->scalar_type() == a.scalar_type() && b->is_contiguous() &&
                          b->numel() == 512 && b->device() == a.device(),
                      op, ": b must be a contiguous [32, 16] or [16, 32] tensor like a");
  } else if (kind == 8) {
    TORCH_CHECK_TYPE(a.scalar_type() == at::kBFloat16, op, ": the bf16 product check takes bfloat16 operands");
    TORCH_CHECK_VALUE(a.numel() == 64 && a.is_contiguous(), op, ": a must be 64 contiguous bfloat16 values");
    TORCH_CHECK_VALUE(b.has_value() && b->scalar_type() == at::kBFloat16 && b->numel() == 64 && b->is_contiguous() &&
                          b->device() == a.device(),
                      op, ": b must be 64 contiguous bfloat16 values like a");
  } else if (kind == 9) {
    TORCH_CHECK_TYPE(a.scalar_type() == at::kBFloat16, op, ": the movmatrix check takes a bfloat16 matrix");
    TORCH_CHECK_VALUE(a.numel() == 64 && a.is_contiguous(), op, ": a must be a contiguous 8 x 8 bfloat16 matrix");
  } else {
    TORCH_CHECK_VALUE(a.scalar_type() == at::kFloat && a.numel() == 32 && a.is_contiguous(), op,
                      ": a must be 32 contiguous floats");
  }
  at::Tensor out = at::full({mma ? 256 : 64}, std::numeric_limits<float>::quiet_NaN(),
                            a.options().dtype(at::kFloat));
  const void* bp = b.has_value() ? b->data_ptr() : nullptr;
  emulate_or_launch(
      op, a,
      [&] {
        emulate_device_check(static_cast<int>(kind), a.data_ptr(), bp, out.data_ptr<float>(), bf16,
                             static_cast<int>(order), static_cast<uint64_t>(seed));
      },
      [&](auto stream) {
        return launch_device_check(static_cast<int>(kind), a.data_ptr(), bp, out.data_ptr<float>(), bf16, stream);
      });
  return out;
}

}  // namespace

void register_ops(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cuda_forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mix_weight"),
        py::arg("mix_bias"), py::arg("norm_weight"), py::arg("norm_bias"), py::arg("batch_stats"),
        py::arg("attn_mask"), py::arg("seed"), py::arg("stats"), py::arg("scale"), py::arg("out_scale"),
        py::arg("norm"), py::arg("eps"), py::arg("dropout_p"), py::arg("with_moments") = false,
        py::arg("out_is_acc") = false, py::arg("shared_limit") = 0, py::arg("reverse_items") = false, py::arg("poison_outputs") = false,
        py::arg("programs_only") = false, py::arg("shuffle_seed") = 0, py::arg("general_variant") = false,
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(), py::arg("center_keys") = 0,
        "Fused CUDA Re-attention forward: [out [B,H,Nq,D], stats [B,H,Nq,2]] with the row statistics (max of "
        "S, log of sum exp(S - max)); with_moments (norm 'none'): out = X V (in the accumulation dtype where "
        "out_is_acc) and a third output, moments [programs, 2, H] float64 (per-program sums of X = W P~ + c and X^2 over the attended "
        "entries, for one-sweep training BatchNorm) and a fourth, value_sums: without a mask, on the one-segment "
        "tensor-core programs, [B, H, row blocks, D] fp32 whose sum over dim 2 is U = sum_j V_j [B, H, 1, D], else empty "
        "[0, H, 1, D]. norm 'batch' = training statistics given as batch_stats "
        "[2,H] (mean, 1/std), or eval-mode BatchNorm given as running_mean and running_var [H] (any float dtype; "
        "rstd = 1/sqrt(running_var + eps), folded by the programs); stats given ([B,H,Nq,2], or a [B,H,Nq] "
        "logsumexp) = read, not computed. center_keys (with_moments, no mix_bias): the mixing bias is "
        "-sum_h W[g, h] / center_keys (the one-sweep shift; cuda_bn_moments takes mix_weight and n_keys then), "
        "formed by the programs. fp16/bf16 "
        "run the tensor-core forward where a tile shape fits (programs_only: the CUDA-core programs; "
        "general_variant: its general compiled variant even where a plain one applies). CPU "
        "tensors run the emulator, warps in reverse (reverse_items) or shuffled (shuffle_seed != 0) order.");
  m.def("cuda_gram_sums", &gram_sums, py::arg("q"), py::arg("k"), py::arg("attn_mask"), py::arg("seed"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("shift"), py::arg("shared_limit") = 0,
        py::arg("reverse_items") = false,
        "Training BatchNorm sums without the maps: [stats [B,H,Nq,2], s1 [H], gram [H,H]] of X = P~ - shift over "
        "unmasked entries (float64).");
  m.def("cuda_backward", &backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("mix_weight"), py::arg("mix_bias"), py::arg("norm_weight"), py::arg("norm_bias"),
        py::arg("batch_stats"), py::arg("attn_mask"), py::arg("seed"), py::arg("stats"), py::arg("scale"),
        py::arg("out_scale"), py::arg("norm"), py::arg("eps"), py::arg("dropout_p"), py::arg("stats_only"),
        py::arg("shared_limit") = 0, py::arg("reverse_items") = false, py::arg("poison_outputs") = false,
        py::arg("programs_only") = false, py::arg("shuffle_seed") = 0, py::arg("general_variant") = false,
        "Fused CUDA Re-attention backward: [dq, dk, dv, dW, dc, dgamma, dbeta] (parameter gradients in their "
        "parameters' dtypes on the tensor-core path, float64 where a parameter is absent and on the CUDA-core one). "
        "stats_only: only dgamma = sum(dN xhat) and dbeta = sum(dN), for training BatchNorm (the others empty on "
        "the tensor-core path); without it, norm 'batch' returns dgamma and dbeta empty (they are those sums). "
        "fp16/bf16 run the deterministic tensor-core backward (a row pass and a key "
        "pass, no atomics) where its shapes fit, else (and with programs_only) the CUDA-core programs; without "
        "mask or dropout, on 16-byte aligned rows, its plain variants (general_variant: the general ones).");
  m.def("cuda_padded_rows", &padded_rows, py::arg("tensors"),
        "Each [B, H, N, D] tensor (D not a multiple of 8) as a view of its first D columns in a copy whose rows are "
        "padded with zeros to a multiple of 8 elements, one pass each. cuda_forward and cuda_backward read these "
        "views (while their storage lives) in 16-byte chunks as they are, where another tensor of that head dim "
        "is copied first.");
  m.def("cuda_forward_stages_queries", &forward_stages_queries, py::arg("H"), py::arg("D"), py::arg("Nk"),
        py::arg("dtype"), py::arg("device") = -1,
        "Whether cuda_forward's tensor-core program for H heads of head dim D, Nk keys and dtype ('bfloat16', ...) "
        "on GPU `device` (-1: the emulator, an H100's shared memory) stages q's rows in shared memory and reads "
        "them unpadded at any D (the segmented shapes): the ladder then pads k and v alone (cuda_padded_rows), "
        "and cuda_backward pads q for itself."); 
  m.def("cuda_padded_view", &is_padded_view, py::arg("t"),
        "Whether t is a view cuda_padded_rows returned (its columns past D zero), which the programs read "
        "without a copy.");
  m.def("cuda_head_affine", &head_affine, py::arg("r"), py::arg("u"), py::arg("coefficients"), py::arg("dtype"),
        py::arg("u_sum") = py::none(), py::arg("reverse_items") = false, py::arg("poison_outputs") = false,
        py::arg("shuffle_seed") = 0,
        "One-sweep training BatchNorm's finish: out = (alpha[h] r + beta[h] u).to(dtype) [B,H,Nq,D]. r [B,H,Nq,D] "
        "in dtype or its accumulation type; u (broadcastable to r) and coefficients [2, H] (alpha, beta) in the "
        "accumulation type. With u_sum (a contiguous [B, H, 1, D] tensor of the accumulation type), u is U in parts "
        "[B, H, parts, D] (the forward's shares): they are added in order, U is applied to every row and written to "
        "u_sum. CPU tensors run the emulator.");
  m.def("cuda_moments_center", &moments_center, py::arg("mix_weight"), py::arg("n_keys"), py::arg("dtype"),
        py::arg("reverse_items") = false, py::arg("shuffle_seed") = 0,
        "The one-sweep training BatchNorm forward's centering shift: [2, H] in dtype (float32 or float64) = (center, "
        "-center), center_g = sum_h mix_weight[g, h] / n_keys formed in float64 and rounded once. One launch.");
  m.def("cuda_bn_moments", &bn_moments, py::arg("moments"), py::arg("count"), py::arg("center"), py::arg("mix_bias"),
        py::arg("norm_weight"), py::arg("norm_bias"), py::arg("out_scale"), py::arg("eps"), py::arg("dtype"),
        py::arg("count_value") = 0.0, py::arg("reverse_items") = false, py::arg("shuffle_seed") = 0,
        py::arg("mix_weight") = py::none(), py::arg("n_keys") = 0,
        "Training BatchNorm's statistics from the one-sweep forward's moments [programs, 2, H] (float64 sums of "
        "X = W P~ - center and X^2 per program; center as given, or None with mix_weight and n_keys where the "
        "forward formed it (cuda_forward's center_keys); count: the entries per head, one float64 value, or None "
        "and count_value): [stats [3, H] float64 (mean of "
        "W P~ + mix_bias, biased variance, count), coefficients [4, H] in dtype (alpha, beta, rstd, -mean(X) rstd: "
        "the norm's output is alpha X V + beta U, xhat V = rstd X V - mean(X) rstd U)]. One launch.");
  m.def("cuda_bn_coefficients", &bn_coefficients, py::arg("stats"), py::arg("sums"), py::arg("norm_weight"),
        py::arg("norm_bias"), py::arg("eps"), py::arg("dtype"), py::arg("own_grads") = false,
        py::arg("reverse_items") = false, py::arg("shuffle_seed") = 0,
        "Training BatchNorm's backward coefficients [4, H] in dtype (mean, rstd, e, f; rstd rounded to dtype as "
        "the forward reads it, e = -gamma rstd sum(dN xhat) / n, f = -gamma rstd sum(dN) / n) from stats [3, H] "
        "float64 (mean, biased variance, count) and sums (sum dN xhat, sum dN): [2, H] float64, or parts "
        "[2, parts, H, groups] float32/float64 added in float64 (cuda_head_dot_sums(summed=False)). Returns "
        "[coefficients, d norm_weight, d norm_bias]: with own_grads the sums in the parameters' dtypes (empty "
        "for an absent one), else both empty. One launch.");
  m.def("cuda_update_running_stats", &update_running_stats, py::arg("running_mean"), py::arg("running_var"),
        py::arg("stats"), py::arg("momentum"), py::arg("reverse_items") = false, py::arg("shuffle_seed") = 0,
        "nn.BatchNorm2d's update of running_mean and running_var [H] (any floating dtype and stride), in place, "
        "from training BatchNorm's stats [3, H] float64 (mean, biased variance, count n): running += momentum "
        "(batch - running), the variance unbiased by n / (n - 1), each formed in float64 and rounded once. One "
        "launch.");
  m.def("cuda_head_dot_sums", &head_dot_sums, py::arg("grad"), py::arg("r"), py::arg("u"), py::arg("stats"),
        py::arg("mix_weight"), py::arg("mix_bias"), py::arg("eps"), py::arg("n_keys"), py::arg("scale") = 1.0,
        py::arg("summed") = true, py::arg("reverse_items") = false, py::arg("poison_outputs") = false,
        py::arg("shuffle_seed") = 0,
        "One-sweep training BatchNorm's backward sums: [2, H] float64 = per head, scale times the sums over "
        "(b, i, d) of grad * R and of grad * u, R = xhat V = rstd (r - mean(X) u) from the kept r = X V "
        "(X = W P~ - center, center = sum_h W[g, h] / n_keys; stats [3, H] float64: mean of W P~ + mix_bias, "
        "biased variance, count; rstd = 1/sqrt(var + eps)). grad, r [B,H,Nq,D] in one dtype; u broadcastable "
        "to them, in its accumulation type. summed=False: the blocks' partial sums [2, B, H, row blocks] in the "
        "accumulation type instead (what cuda_bn_coefficients adds up).");
  m.def("cuda_device_check", &device_check, py::arg("kind"), py::arg("a"), py::arg("b") = py::none(),
        py::arg("order") = 0, py::arg("seed") = 0,
        "Runs a check kernel of csrc/cuda/device_checks.cuh (CPU tensors: in the emulator, warps ordered by "
        "`order`); returns its float32 output (NaN where it wrote nothing).");
  m.def("cuda_forward_tiles", &forward_tiles, py::arg("H"), py::arg("D"), py::arg("Nq"), py::arg("Nk"),
        py::arg("dtype"), py::arg("shared_limit") = 0,
        "The tensor-core forward's tile shape for a problem (grid = (query blocks per batch element, head-dim "
        "chunks)), or None when the CUDA-core programs run it; shared_limit 0 = an H100's 227 KB.");
  m.def("cuda_backward_tiles", &backward_tiles, py::arg("H"), py::arg("D"), py::arg("Nq"), py::arg("Nk"),
        py::arg("dtype"), py::arg("shared_limit") = 0, py::arg("plain") = true,
        "The tensor-core backward's shapes for a problem: {'rows': row pass, 'keys': key pass} (grid = programs "
        "per batch element), or None when the CUDA-core programs run it; shared_limit 0 = an H100's 227 KB; "
        "plain: the key pass's shape for its plain variants (no mask, no dropout, 16-byte rows), else for its "
        "general one (a shape may serve the plain variants only: backward_configs.h key_shape_compiled).");
  m.def("cuda_plan", &plan, py::arg("kind"), py::arg("H"), py::arg("D"), py::arg("Nq"), py::arg("dtype"),
        py::arg("shared_limit") = 0,
        "The launch plan (tile layout and grid) of a fused CUDA program; shared_limit 0 = sm_80's 163 KB.");
  m.def("cuda_head_rows", &head_rows_per_block, py::arg("Nq"), py::arg("D"),
        "Query rows per block of cuda_head_affine and cuda_head_dot_sums (grid = (B * H, ceil(Nq / rows))).");
}

}  // namespace cuda_ops
}  // namespace reattn
