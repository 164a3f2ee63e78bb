// Fused Re-attention programs for __half storage (see programs.cuh).
#include "kernels.cuh"

namespace reattn {
namespace cuda {

REATTN_DEFINE_LAUNCHERS(f16, __half)

}  // namespace cuda
}  // namespace reattn
