// The one registration point of reattn._C. Torch types live here only; kernels take raw pointers.
#include <torch/extension.h>

#include "cpu/row_stats.h"

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
  m.def("build_info", &build_info, "How this extension was built: cuda, cuda_archs, openmp, torch_version.");
  m.def("parallel_thread_count", &reattn::cpu::parallel_thread_count, pybind11::arg("n_tasks"),
        "Distinct threads that ran at::parallel_for over n_tasks chunks (checks the OpenMP build).");
}
