// The tensor-core backward for f16 storage (see rows.cuh, keys.cuh).
#include "backward_kernels.cuh"

namespace reattn {
namespace cuda {

cudaError_t launch_backward_f16(int rows, int keys, bool plain, const ReAttnParams& params, cudaStream_t stream) {
  return launch_backward<dev::F16>(rows, keys, plain, params, stream);
}

}  // namespace cuda
}  // namespace reattn
