// Fused Re-attention programs for __nv_bfloat16 storage (see programs.cuh).
#include "kernels.cuh"

namespace reattn {
namespace cuda {

REATTN_DEFINE_LAUNCHERS(bf16, __nv_bfloat16)

}  // namespace cuda
}  // namespace reattn
