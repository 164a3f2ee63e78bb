// Fused Re-attention programs for double storage (see programs.cuh).
#include "kernels.cuh"

namespace reattn {
namespace cuda {

REATTN_DEFINE_LAUNCHERS(f64, double)

}  // namespace cuda
}  // namespace reattn
