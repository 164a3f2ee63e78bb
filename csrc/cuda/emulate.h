// The host emulator of the fused CUDA programs: runs programs.cuh on the CPU, block after block,
// every thread a fiber of the device-code emulator (sim.h). For tests: the CPU test suite checks the CUDA backend's
// algorithm (indexing, masks, dropout, norms, every gradient, the launch plan) through it.
// Plain C++ (c10 half types only); no CUDA toolkit needed.
#pragma once

#include "params.h"
#include "tiles.h"

namespace reattn {
namespace cuda {

// Runs program `kind` over every (query block, head-dim chunk) of params.plan. Shared memory is
// refilled with NaN before each program, so a read of anything the program did not write shows.
// reverse_items: run the warps (and the lanes of each warp) last to first between barriers (a race
// between them gives a different answer).
void emulate_program(int storage, int kind, const ReAttnParams& params, bool reverse_items);

// Runs the tensor-core forward (forward.cuh) with tile shape `shape` of row_configs.h and
// variant `variant` (ForwardVariant) over its grid; storage kFloat16 or kBFloat16. order:
// sim::Order of the warps between barriers.
void emulate_forward(int storage, int shape, int variant, const ReAttnParams& params, int order, uint64_t seed);

// Runs the statistics kernel (statistics.cuh) of shape `shape` (row_configs.h statistics_shape_for) over its
// grid: params.lse.
void emulate_statistics(int storage, const StatisticsShape& shape, const ReAttnParams& params, int order,
                        uint64_t seed);

// Runs the tensor-core backward: the row pass with shape `rows`, then (unless params.stats_only)
// the key pass with shape `keys` (backward_configs.h), both in their plain variants where `plain`.
void emulate_backward(int storage, int rows, int keys, bool plain, const ReAttnParams& params, int order,
                      uint64_t seed);

// Runs head_affine_program / head_dot_sums_program (head_affine.cuh) over their grid.
void emulate_head_affine(int storage, const HeadAffineParams& params, int order, uint64_t seed);
void emulate_head_dot_sums(int storage, const HeadAffineParams& params, int order, uint64_t seed);

// Runs the parameter steps of parameters.cuh, one block each.
void emulate_param_grads(const ParamGradsParams& params, int order, uint64_t seed);
void emulate_moments_center(const MomentsCenterParams& params, int order, uint64_t seed);
void emulate_bn_moments(const BnMomentsParams& params, int order, uint64_t seed);
void emulate_bn_coefficients(const BnCoefficientsParams& params, int order, uint64_t seed);
void emulate_running_stats(const RunningStatsParams& params, int order, uint64_t seed);

// Runs a check kernel of device_checks.cuh (kind: checks::CheckKind) in the emulator, warps and
// lanes ordered by `order` (sim::Order); throws what the emulator refuses.
void emulate_device_check(int kind, const void* a, const void* b, float* out, bool bf16, int order, uint64_t seed);

}  // namespace cuda
}  // namespace reattn
