// Registers the fused CUDA Re-attention ops (and their host emulator) on reattn._C.
#pragma once

// As csrc/bindings.cpp: ATen and the pybind11 casters, not <torch/extension.h> (ops.cpp 61 -> 24 s together with -g0).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

namespace reattn {
namespace cuda_ops {

void register_ops(pybind11::module& m);

}  // namespace cuda_ops
}  // namespace reattn
