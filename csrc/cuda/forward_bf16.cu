// The tensor-core forward for bf16 storage (see forward.cuh).
#include "row_kernels.cuh"

namespace reattn {
namespace cuda {

cudaError_t launch_forward_bf16(int shape, int variant, const ReAttnParams& params, cudaStream_t stream) {
  return launch_forward<dev::Bf16>(shape, variant, params, stream);
}

cudaError_t launch_statistics_bf16(const StatisticsShape& shape, const ReAttnParams& params, cudaStream_t stream) {
  return launch_statistics<dev::Bf16>(shape, params, stream);
}

}  // namespace cuda
}  // namespace reattn
