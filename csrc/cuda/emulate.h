// The host emulator of the fused CUDA programs: runs programs.cuh on the CPU, program after program,
// phase by phase (see block.cuh). For tests: the CPU test suite checks the CUDA backend's
// algorithm (indexing, masks, dropout, norms, every gradient, the launch plan) through it.
// Plain C++ (c10 half types only); no CUDA toolkit needed.
#pragma once

#include "params.h"

namespace reattn {
namespace cuda {

enum StorageKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Runs program `kind` over every (query block, head-dim chunk) of params.plan. Shared memory is
// refilled with NaN before each program, so a read of anything the program did not write shows.
// reverse_items: run every phase's items last to first (a phase whose items depend on each other
// gives a different answer).
void emulate_program(int storage, int kind, const ReAttnParams& params, bool reverse_items);

}  // namespace cuda
}  // namespace reattn
