// Fused Re-attention programs for float storage (see programs.cuh).
#include "kernels.cuh"

namespace reattn {
namespace cuda {

REATTN_DEFINE_LAUNCHERS(f32, float)

}  // namespace cuda
}  // namespace reattn
