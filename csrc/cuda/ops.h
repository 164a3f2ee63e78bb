// Registers the fused CUDA Re-attention ops (and their host emulator) on reattn._C.
#pragma once

#include <torch/extension.h>

namespace reattn {
namespace cuda_ops {

void register_ops(pybind11::module& m);

}  // namespace cuda_ops
}  // namespace reattn
