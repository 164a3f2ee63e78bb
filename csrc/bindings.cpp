// The one registration point of reattn._C. Torch types live here only; kernels take raw pointers.
// ATen and torch's pybind11 casters for at::Tensor, not <torch/extension.h>: that one also pulls in
// torch/all.h (autograd, nn, optim), which with -g0 took this file's compile from 39 to 23 s.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "cpu/re_attention.h"
#include "cpu/row_stats.h"
#include "cuda/ops.h"

#ifdef REATTN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/row_stats.h"
#endif

#define REATTN_STR_(...) #__VA_ARGS__
#define REATTN_STR(...) REATTN_STR_(__VA_ARGS__)

namespace {

void check_qk(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 4, "row_logsumexp: q must be [B, H, Nq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "row_logsumexp: k must be [B, H, Nk, D], got ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "row_logsumexp: q ", q.sizes(), " and k ", k.sizes(), " must agree on B, H and D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "row_logsumexp: q is ", q.scalar_type(), " but k is ",
              k.scalar_type());
  TORCH_CHECK(q.device() == k.device(), "row_logsumexp: q is on ", q.device(), " but k is on ", k.device());
  TORCH_CHECK(k.size(2) >= 1, "row_logsumexp: k needs at least one key, got Nk = 0");
}

template <typename S>
S strides_of(const at::Tensor& t) {
  return S{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

at::Tensor row_logsumexp_cpu(const at::Tensor& q, const at::Tensor& k, double scale) {
  using reattn::cpu::Strides4;
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  const auto out_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, H, Nq}, q.options().dtype(out_dtype));
  switch (q.scalar_type()) {
    case at::kFloat:
      reattn::cpu::row_logsumexp<float, float>(q.data_ptr<float>(), strides_of<Strides4>(q), k.data_ptr<float>(),
                                               strides_of<Strides4>(k), out.data_ptr<float>(), B, H, Nq, Nk, D,
                                               scale);
      break;
    case at::kDouble:
      reattn::cpu::row_logsumexp<double, double>(q.data_ptr<double>(), strides_of<Strides4>(q),
                                                 k.data_ptr<double>(), strides_of<Strides4>(k),
                                                 out.data_ptr<double>(), B, H, Nq, Nk, D, scale);
      break;
    case at::kBFloat16:
      reattn::cpu::row_logsumexp<c10::BFloat16, float>(
          q.data_ptr<c10::BFloat16>(), strides_of<Strides4>(q), k.data_ptr<c10::BFloat16>(),
          strides_of<Strides4>(k), out.data_ptr<float>(), B, H, Nq, Nk, D, scale);
      break;
    default:
      TORCH_CHECK(false, "row_logsumexp on CPU supports float32, float64 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

#ifdef REATTN_WITH_CUDA
at::Tensor row_logsumexp_cuda(const at::Tensor& q, const at::Tensor& k, double scale) {
  using reattn::cuda::Strides4;
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "row_logsumexp on CUDA supports float32 and float64, got ", q.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  at::Tensor out = at::empty({B, H, Nq}, q.options());
  const cudaError_t err = reattn::cuda::row_logsumexp(
      q.scalar_type() == at::kFloat ? 0 : 1, q.data_ptr(), strides_of<Strides4>(q), k.data_ptr(),
      strides_of<Strides4>(k), out.data_ptr(), B, H, Nq, Nk, D, scale, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "row_logsumexp: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}
#endif

at::Tensor row_logsumexp(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_qk(q, k);
  if (q.is_cuda()) {
#ifdef REATTN_WITH_CUDA
    return row_logsumexp_cuda(q, k, scale);
#else
    TORCH_CHECK(false, "row_logsumexp: reattn._C was built without CUDA (CPU-only torch at build time)");
#endif
  }
  TORCH_CHECK(q.is_cpu(), "row_logsumexp: unsupported device ", q.device());
  return row_logsumexp_cpu(q, k, scale);
}


// ---- Fused Re-attention on the CPU (csrc/cpu/re_attention.cpp) --------------------------------

using reattn::cpu::ReAttnParams;
using reattn::cpu::View4;

at::ScalarType acc_type_of(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

View4 view_of(const at::Tensor& t) {
  return View4{t.data_ptr(), reattn::cpu::Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// Parameters as contiguous acc-typed tensors (kept alive by the caller's locals).
at::Tensor acc_param(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->detach().to(acc).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

ReAttnParams make_params(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& mask_in,
                         at::Tensor& mask_keep, double scale, double out_scale, int64_t norm, double eps,
                         double dropout_p, int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "re_attention_cpu: q and k must be 4-D");
  TORCH_CHECK(q.is_cpu(), "re_attention_cpu: tensors must be on the CPU, got ", q.device());
  TORCH_CHECK(norm >= 0 && norm <= 2, "re_attention_cpu: norm code must be 0 (none), 1 (layer) or 2 (batch, train)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "re_attention_cpu: dropout_p must be in [0, 1)");
  ReAttnParams p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Nq = q.size(2);
  p.D = q.size(3);
  p.Nk = k.size(2);
  p.scale = scale;
  p.out_scale = out_scale;
  p.eps = eps;
  p.norm = static_cast<int>(norm);
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  if (mask_in.has_value() && mask_in->defined()) {
    at::Tensor m = *mask_in;
    TORCH_CHECK(m.dim() <= 4, "re_attention_cpu: attn_mask must have at most 4 dims, got ", m.sizes());
    while (m.dim() < 4) m = m.unsqueeze(0);
    if (m.scalar_type() == at::kBool) {
      TORCH_CHECK(m.size(1) == 1, "re_attention_cpu: a bool attn_mask must broadcast to [B, 1, Nq, Nk]");
      p.mask_is_bool = true;
    } else {
      m = m.to(acc_type_of(q));
    }
    const int64_t heads = m.size(1);
    TORCH_CHECK(heads == 1 || heads == p.H, "re_attention_cpu: attn_mask head dim must be 1 or H");
    m = m.expand({p.B, heads, p.Nq, p.Nk});
    mask_keep = m;
    p.mask = m.data_ptr();
    p.mask_heads = heads;
    p.mask_st = reattn::cpu::Strides4{m.stride(0), m.stride(1), m.stride(2), m.stride(3)};
  }
  return p;
}

// float16 and bfloat16 inputs compute in float32 (loads upcast, stores round), float64 in float64.
void check_cpu_dtype(const at::Tensor& q) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "re_attention_cpu supports float32, float64, bfloat16 and float16, got ", t);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w) {
  check_qk(q, k);
  TORCH_CHECK(v.sizes() == k.sizes(), "re_attention_cpu: v ", v.sizes(), " must have the shape of k ", k.sizes());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "re_attention_cpu: q and v dtypes differ");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == q.size(1) && w.size(1) == q.size(1),
              "re_attention_cpu: mix_weight must be [H, H], got ", w.sizes());
  check_cpu_dtype(q);
}

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Returns (out [B,H,Nq,D], softmax_stats [2,B,H,Nq] (row max, log-sum; acc dtype), R, U ([B,H,Nq,D] acc dtype
// for norm 2, else empty), stats [3,H] double).
// softmax_in and stats_in (norm 2 only, both or neither): statistics given by the caller (synchronized across
// processes, from re_attention_cpu_gram_sums' softmax statistics and all-reduced sums); the returned
// softmax_stats and stats are copies of them (a custom op may not return its inputs).
std::vector<at::Tensor> re_attention_cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& mix_weight,
                                                 const c10::optional<at::Tensor>& mix_bias,
                                                 const c10::optional<at::Tensor>& norm_weight,
                                                 const c10::optional<at::Tensor>& norm_bias,
                                                 const c10::optional<at::Tensor>& attn_mask, double scale,
                                                 double out_scale, int64_t norm, double eps, double dropout_p,
                                                 int64_t seed, const c10::optional<at::Tensor>& softmax_in,
                                                 const c10::optional<at::Tensor>& stats_in) {
  check_qkv(q, k, v, mix_weight);
  const bool given_stats = given(stats_in);
  TORCH_CHECK(given_stats == given(softmax_in),
              "re_attention_cpu: softmax_in and stats_in come together (both or neither)");
  TORCH_CHECK(!given_stats || norm == reattn::cpu::kNormBatchTrain,
              "re_attention_cpu: given statistics (softmax_in, stats_in) need norm code 2 (batch, train)");
  at::Tensor mask_keep;
  const ReAttnParams p = make_params(q, k, attn_mask, mask_keep, scale, out_scale, norm, eps, dropout_p, seed);
  const auto acc = acc_type_of(q);
  at::Tensor W = mix_weight.detach().to(acc).contiguous();
  at::Tensor c = acc_param(mix_bias, acc);
  if (!c.defined()) c = at::zeros({p.H}, q.options().dtype(acc));
  at::Tensor gamma = acc_param(norm_weight, acc), beta = acc_param(norm_bias, acc);
  at::Tensor out = at::empty({p.B, p.H, p.Nq, p.D}, q.options());
  at::Tensor softmax_stats = at::empty({2, p.B, p.H, p.Nq}, q.options().dtype(acc));
  const bool bn = norm == reattn::cpu::kNormBatchTrain;
  at::Tensor R = at::empty({bn ? p.B : 0, p.H, p.Nq, p.D}, q.options().dtype(acc));
  at::Tensor U = at::empty_like(R);
  at::Tensor stats = at::zeros({3, p.H}, q.options().dtype(at::kDouble));
  if (given_stats) {
    TORCH_CHECK(softmax_in->scalar_type() == acc && softmax_in->numel() == 2 * p.B * p.H * p.Nq,
                "re_attention_cpu: softmax_in must be the statistics sweep's [2, B, H, Nq] in the accumulation dtype");
    TORCH_CHECK(stats_in->numel() == 3 * p.H, "re_attention_cpu: stats_in must be [3, H], got ", stats_in->sizes());
    softmax_stats.copy_(softmax_in->reshape({2, p.B, p.H, p.Nq}));
    stats.copy_(stats_in->reshape({3, p.H}));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "re_attention_cpu_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    reattn::cpu::re_attention_forward<scalar_t, acc_t>(
        p, view_of(q), view_of(k), view_of(v), W.data_ptr<acc_t>(), c.data_ptr<acc_t>(), ptr_or_null<acc_t>(gamma),
        ptr_or_null<acc_t>(beta), out.data_ptr<scalar_t>(), softmax_stats.data_ptr<acc_t>(),
        bn ? R.data_ptr<acc_t>() : nullptr, bn ? U.data_ptr<acc_t>() : nullptr, stats.data_ptr<double>(),
        given_stats);
  });
  // Counts <= 1 leave out undefined: the caller refuses them (reattn._batchnorm.check_counts).
  return {out, softmax_stats, R, U, stats};
}

// Training-mode BatchNorm statistics as sums that add up over processes (see gram_sums):
// returns (softmax_stats [2,B,H,Nq] acc dtype, s1 [Hm,H], gram [Hm,H,H], count [Hm] float64) with Hm the mask's
// head count (1 without a mask). shift: 1/Nk rounded to float, exactly representable in the accumulation dtype.
std::vector<at::Tensor> re_attention_cpu_gram_sums(const at::Tensor& q, const at::Tensor& k,
                                                   const c10::optional<at::Tensor>& attn_mask, double scale,
                                                   double dropout_p, int64_t seed, double shift) {
  check_qk(q, k);
  check_cpu_dtype(q);
  at::Tensor mask_keep;
  const ReAttnParams p = make_params(q, k, attn_mask, mask_keep, scale, 1.0, reattn::cpu::kNormBatchTrain, 0.0,
                                     dropout_p, seed);
  const auto acc = acc_type_of(q);
  const int64_t Hm = p.mask != nullptr ? p.mask_heads : 1;
  const auto dopts = q.options().dtype(at::kDouble);
  at::Tensor softmax_stats = at::empty({2, p.B, p.H, p.Nq}, q.options().dtype(acc));
  at::Tensor s1 = at::empty({Hm, p.H}, dopts), gram = at::empty({Hm, p.H, p.H}, dopts), count = at::empty({Hm}, dopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "re_attention_cpu_gram_sums", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    reattn::cpu::gram_sums<scalar_t, acc_t>(p, view_of(q), view_of(k), static_cast<acc_t>(shift),
                                            softmax_stats.data_ptr<acc_t>(), s1.data_ptr<double>(),
                                            gram.data_ptr<double>(), count.data_ptr<double>());
  });
  return {softmax_stats, s1, gram, count};
}

// The backward's per-head sums over this call's entries: [2, H] float64, rows sum(dN * Xhat) and sum(dN), with
// dN = out_scale * dA the gradient w.r.t. the norm's output.
at::Tensor re_attention_cpu_bn_grad_sums(const at::Tensor& grad_out, const at::Tensor& R, const at::Tensor& U,
                                         double out_scale) {
  TORCH_CHECK(grad_out.dim() == 4, "re_attention_cpu: grad_out must be [B, H, Nq, D], got ", grad_out.sizes());
  TORCH_CHECK(R.sizes() == grad_out.sizes() && U.sizes() == R.sizes() && R.is_contiguous() && U.is_contiguous() &&
                  R.scalar_type() == acc_type_of(grad_out) && U.scalar_type() == R.scalar_type(),
              "re_attention_cpu: R and U must be the forward's [B, H, Nq, D] tensors, got ", R.sizes(), " and ",
              U.sizes(), " for grad_out ", grad_out.sizes());
  ReAttnParams p;
  p.B = grad_out.size(0);
  p.H = grad_out.size(1);
  p.Nq = grad_out.size(2);
  p.D = grad_out.size(3);
  p.out_scale = out_scale;
  at::Tensor sums = at::empty({2, p.H}, grad_out.options().dtype(at::kDouble));
  const auto dtype = grad_out.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "re_attention_cpu_bn_grad_sums", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    reattn::cpu::bn_grad_sums<scalar_t, acc_t>(p, view_of(grad_out), R.data_ptr<acc_t>(), U.data_ptr<acc_t>(),
                                               sums.data_ptr<double>());
  });
  return sums;
}

// Returns (dq, dk, dv in q's dtype; d_mix_weight [H,H], d_mix_bias, d_norm_weight, d_norm_bias [H] in float64).
// bn_grad_sums (norm 2): re_attention_cpu_bn_grad_sums' [2, H] summed over every process; then d_norm_weight and
// d_norm_bias come back zero (the caller has them: its own sums).
std::vector<at::Tensor> re_attention_cpu_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mix_weight, const c10::optional<at::Tensor>& mix_bias,
    const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
    const c10::optional<at::Tensor>& attn_mask, const at::Tensor& softmax_stats, const at::Tensor& R,
    const at::Tensor& U,
    const at::Tensor& stats, double scale, double out_scale, int64_t norm, double eps, double dropout_p,
    int64_t seed, const c10::optional<at::Tensor>& bn_grad_sums) {
  check_qkv(q, k, v, mix_weight);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "re_attention_cpu: grad_out must match q in shape and dtype");
  at::Tensor mask_keep;
  const ReAttnParams p = make_params(q, k, attn_mask, mask_keep, scale, out_scale, norm, eps, dropout_p, seed);
  const auto acc = acc_type_of(q);
  const bool bn = norm == reattn::cpu::kNormBatchTrain;
  TORCH_CHECK(softmax_stats.scalar_type() == acc && softmax_stats.is_contiguous() &&
                  softmax_stats.numel() == 2 * p.B * p.H * p.Nq,
              "re_attention_cpu: softmax_stats must be the forward's contiguous [2, B, H, Nq] statistics");
  TORCH_CHECK(!bn || (R.is_contiguous() && U.is_contiguous() && R.numel() == p.B * p.H * p.Nq * p.D &&
                      R.scalar_type() == acc && U.sizes() == R.sizes() && U.scalar_type() == acc),
              "re_attention_cpu: R and U must be the forward's [B, H, Nq, D] tensors for norm='batch' training");
  at::Tensor stats_c = stats.to(at::kDouble).contiguous();
  TORCH_CHECK(stats_c.numel() == 3 * p.H, "re_attention_cpu: stats must be [3, H]");
  at::Tensor sums_c;
  if (given(bn_grad_sums)) {
    TORCH_CHECK(bn, "re_attention_cpu: bn_grad_sums need norm code 2 (batch, train)");
    sums_c = bn_grad_sums->to(at::kDouble).contiguous();
    TORCH_CHECK(sums_c.numel() == 2 * p.H, "re_attention_cpu: bn_grad_sums must be [2, H], got ",
                bn_grad_sums->sizes());
  }
  at::Tensor W = mix_weight.detach().to(acc).contiguous();
  at::Tensor c = acc_param(mix_bias, acc);
  if (!c.defined()) c = at::zeros({p.H}, q.options().dtype(acc));
  at::Tensor gamma = acc_param(norm_weight, acc), beta = acc_param(norm_bias, acc);
  at::Tensor dq = at::empty({p.B, p.H, p.Nq, p.D}, q.options());
  at::Tensor dk = at::zeros({p.B, p.H, p.Nk, p.D}, q.options().dtype(acc));
  at::Tensor dv = at::zeros_like(dk);
  const auto dopts = q.options().dtype(at::kDouble);
  at::Tensor dW = at::zeros({p.H, p.H}, dopts), dc = at::zeros({p.H}, dopts), dg = at::zeros({p.H}, dopts),
             db = at::zeros({p.H}, dopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "re_attention_cpu_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    reattn::cpu::re_attention_backward<scalar_t, acc_t>(
        p, view_of(grad_out), view_of(q), view_of(k), view_of(v), W.data_ptr<acc_t>(), c.data_ptr<acc_t>(),
        ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), softmax_stats.data_ptr<acc_t>(),
        bn ? R.data_ptr<acc_t>() : nullptr, bn ? U.data_ptr<acc_t>() : nullptr, stats_c.data_ptr<double>(),
        dq.data_ptr<scalar_t>(), dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>(), dW.data_ptr<double>(),
        dc.data_ptr<double>(), dg.data_ptr<double>(), db.data_ptr<double>(), ptr_or_null<double>(sums_c));
  });
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type()), dW, dc, dg, db};
}

at::Tensor dropout_keep_mask(int64_t seed, int64_t B, int64_t H, int64_t Nq, int64_t Nk, double p) {
  TORCH_CHECK(B >= 0 && H >= 0 && Nq >= 0 && Nk >= 0, "dropout_keep_mask: negative size");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_keep_mask: p must be in [0, 1)");
  at::Tensor out = at::empty({B, H, Nq, Nk}, at::TensorOptions().dtype(at::kBool));
  reattn::cpu::dropout_keep_mask(reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), B, H, Nq, Nk,
                                 static_cast<uint64_t>(seed), p);
  return out;
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef REATTN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(REATTN_STR(REATTN_CUDA_ARCHS));
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = std::string(REATTN_STR(REATTN_TORCH_VERSION));
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reattn compiled kernels (CPU part always; CUDA part when built against a CUDA torch)";
  m.def("row_logsumexp", &row_logsumexp, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("scale"),
        "L[b,h,i] = logsumexp_j(scale * q[b,h,i] . k[b,h,j]) for q [B,H,Nq,D], k [B,H,Nk,D]; "
        "fp32 accumulation (fp64 for fp64 inputs).");
  m.def("re_attention_cpu_forward", &re_attention_cpu_forward, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("mix_weight"), pybind11::arg("mix_bias"), pybind11::arg("norm_weight"),
        pybind11::arg("norm_bias"), pybind11::arg("attn_mask"), pybind11::arg("scale"), pybind11::arg("out_scale"),
        pybind11::arg("norm"), pybind11::arg("eps"), pybind11::arg("dropout_p"), pybind11::arg("seed"),
        pybind11::arg("softmax_in") = pybind11::none(), pybind11::arg("stats_in") = pybind11::none(),
        "Fused CPU Re-attention forward (norm 0 none, 1 layer, 2 batch train): [out, softmax_stats [2,B,H,Nq] "
        "(row max, log-sum), R, U, stats]; with softmax_in and stats_in (norm 2) it normalizes with those "
        "statistics (no statistics sweep).");
  m.def("re_attention_cpu_gram_sums", &re_attention_cpu_gram_sums, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("attn_mask"), pybind11::arg("scale"), pybind11::arg("dropout_p"), pybind11::arg("seed"),
        pybind11::arg("shift"),
        "Training BatchNorm statistics sweep as sums that add up over processes: [softmax_stats, s1 [Hm,H], "
        "gram [Hm,H,H] of X = P~ - shift over unmasked entries, count [Hm]].");
  m.def("re_attention_cpu_bn_grad_sums", &re_attention_cpu_bn_grad_sums, pybind11::arg("grad_out"),
        pybind11::arg("R"), pybind11::arg("U"), pybind11::arg("out_scale"),
        "The BatchNorm backward's per-head sums over this call's entries: [2, H] = [sum dN*Xhat, sum dN], "
        "dN = out_scale * dA.");
  m.def("re_attention_cpu_backward", &re_attention_cpu_backward, pybind11::arg("grad_out"), pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mix_weight"), pybind11::arg("mix_bias"),
        pybind11::arg("norm_weight"), pybind11::arg("norm_bias"), pybind11::arg("attn_mask"),
        pybind11::arg("softmax_stats"),
        pybind11::arg("R"), pybind11::arg("U"), pybind11::arg("stats"), pybind11::arg("scale"),
        pybind11::arg("out_scale"), pybind11::arg("norm"), pybind11::arg("eps"), pybind11::arg("dropout_p"),
        pybind11::arg("seed"), pybind11::arg("bn_grad_sums") = pybind11::none(),
        "Fused CPU Re-attention backward: [dq, dk, dv, dW, dc, dgamma, dbeta]; bn_grad_sums (norm 2): the "
        "BatchNorm sums over every process (dgamma, dbeta then come back zero).");
  m.def("dropout_keep_mask", &dropout_keep_mask, pybind11::arg("seed"), pybind11::arg("B"), pybind11::arg("H"),
        pybind11::arg("Nq"), pybind11::arg("Nk"), pybind11::arg("p"),
        "The CPU kernel's dropout keep-mask (True = keep) for a seed, as a bool [B, H, Nq, Nk] tensor.");
  m.def("cpu_gemm_backend", &reattn::cpu::gemm_backend_name, "Which GEMM the fused CPU kernel calls.");
  m.def("cpu_last_parallel_chunks", &reattn::cpu::last_parallel_chunks,
        "Threads that got work in the fused CPU kernel's last forward or backward sweep.");
  reattn::cuda_ops::register_ops(m);
  m.def("build_info", &build_info, "How this extension was built: cuda, cuda_archs, openmp, torch_version.");
  m.def("parallel_thread_count", &reattn::cpu::parallel_thread_count, pybind11::arg("n_tasks"),
        "Distinct threads that ran at::parallel_for over n_tasks chunks (checks the OpenMP build).");
}
