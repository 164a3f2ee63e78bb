// Host build of the fused CUDA programs (see emulate.h). The device code paths that do not exist
// here are WMMA (replaced by the same products element by element, same fp32 accumulation) and
// hardware atomics (the programs run one at a time).
#include "emulate.h"

#include <stdexcept>
#include <string>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "block.cuh"
#include "device_checks.cuh"
#include "head_affine.cuh"
#include "parameters.cuh"
#include "rows.cuh"
#include "row_configs.h"
#include "backward_configs.h"
#include "keys.cuh"
#include "sim.h"
#include "statistics.cuh"

namespace reattn {
namespace cuda {

// c10's half types round to nearest even, like __float2half_rn / __float2bfloat16_rn.
template <>
struct Storage<c10::Half> {
  using acc = float;
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float x) { return c10::Half(x); }
};

template <>
struct Storage<c10::BFloat16> {
  using acc = float;
  static float load(c10::BFloat16 x) { return static_cast<float>(x); }
  static c10::BFloat16 store(float x) { return c10::BFloat16(x); }
};

}  // namespace cuda
}  // namespace reattn

#include "programs.cuh"

namespace reattn {
namespace cuda {
namespace {

template <typename T>
void run(int kind, const ReAttnParams& params, bool reverse_items) {
  sim::Launch launch;
  launch.grid[0] = static_cast<int>(params.B * params.plan.num_m);
  launch.grid[1] = params.plan.num_chunks;
  launch.threads = kThreads;
  launch.shared_bytes = params.plan.shared_bytes;  // NaN bytes before each block
  launch.order = reverse_items ? sim::Order::kReverse : sim::Order::kForward;
  if (launch.grid[0] == 0) return;
  const BlockExec ex;
  sim::launch(launch, [&] {
    Program<T> program(params, kind, dev::block_index_x(), dev::block_index_y(), dev::shared_memory());
    if (kind == kForward) {
      program.forward(ex);
    } else if (kind == kGramSums) {
      program.batch_statistics(ex);
    } else {
      program.backward(ex, kind == kBnGradSums);
    }
  });
}

}  // namespace

namespace {

template <class Cfg>
void run_forward_program(const ReAttnParams& given, int order, uint64_t seed) {
  const TileShape s = Cfg::shape();
  ReAttnParams params = given;
  params.row_tiles = row_layout(s, params.H, params.Nk);  // as launch_forward_shape sets it
  sim::Launch launch;
  launch.grid[0] = static_cast<int>(params.B * ((params.Nq + s.rows() - 1) / s.rows()));
  launch.grid[1] = (params.D + s.d_out - 1) / s.d_out;
  launch.threads = s.threads();
  launch.shared_bytes = params.row_tiles.bytes;
  launch.order = static_cast<sim::Order>(order);
  launch.seed = seed;
  if (launch.grid[0] == 0) return;
  sim::launch(launch, [&] { RowProgram<Cfg>(params).run(); });
}

// Cfg's program or its narrow-tail one, as launch_forward_shape picks (with_forward_program).
template <class Cfg>
void run_forward(const ReAttnParams& params, int order, uint64_t seed) {
  with_forward_program<Cfg>(static_cast<int>(params.D),
                            [&]<class P>() { run_forward_program<P>(params, order, seed); });
}

template <typename E, int kSlabs, int kGroups, int kHeads, int kD, int kDOut, int kKeys>
void forward_variant(int variant, const ReAttnParams& params, int order, uint64_t seed) {
  switch (variant) {
    case kPlainAffine:
      return run_forward<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kPlainAffine>>(params, order, seed);
    case kPlainLayer:
      return run_forward<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kPlainLayer>>(params, order, seed);
    case kPlainMoments:
      return run_forward<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kPlainMoments>>(params, order, seed);
    case kGeneral:
      return run_forward<RowConfig<E, kSlabs, kGroups, kHeads, kD, kDOut, kKeys, kGeneral>>(params, order, seed);
    default:
      throw std::invalid_argument("emulate_forward: unknown variant");
  }
}

template <typename E>
void forward_shape(int shape, int variant, const ReAttnParams& params, int order, uint64_t seed) {
  switch (shape) {
#define REATTN_SHAPE_CASE(i, slabs, groups, heads, d, d_out, keys) \
  case i:                                                           \
    return forward_variant<E, slabs, groups, heads, d, d_out, keys>(variant, params, order, seed);
    REATTN_FORWARD_SHAPES(REATTN_SHAPE_CASE)
#undef REATTN_SHAPE_CASE
    default:
      throw std::invalid_argument("emulate_forward: unknown tile shape");
  }
}

}  // namespace

namespace {

// The statistics kernel of shape s over its grid, as launch_statistics runs it.
template <typename E>
void run_statistics(const StatisticsShape& s, const ReAttnParams& params, int order, uint64_t seed) {
  sim::Launch launch;
  launch.grid[0] = static_cast<int>(params.B * params.H * ((params.Nq + s.rows() - 1) / s.rows()));
  launch.threads = s.threads();
  launch.shared_bytes = statistics_bytes(s);
  launch.order = static_cast<sim::Order>(order);
  launch.seed = seed;
  if (launch.grid[0] == 0) return;
#define REATTN_STATISTICS_CASE(kW, kT, kD, kN)                                                        \
  if (s.warps == kW && s.tiles == kT && s.d == kD && s.narrow == (kN != 0)) {                            \
    sim::launch(launch, [&] { StatisticsProgram<StatisticsConfig<E, kW, kT, kD, kN>>(params).run(); }); \
    return;                                                                                           \
  }
  REATTN_STATISTICS_SHAPES(REATTN_STATISTICS_CASE)
#undef REATTN_STATISTICS_CASE
  throw std::invalid_argument("emulate_statistics: shape not compiled");
}

}  // namespace

void emulate_statistics(int storage, const StatisticsShape& shape, const ReAttnParams& params, int order,
                        uint64_t seed) {
  if (storage == kBFloat16) return run_statistics<dev::Bf16>(shape, params, order, seed);
  if (storage == kFloat16) return run_statistics<dev::F16>(shape, params, order, seed);
  throw std::invalid_argument("emulate_statistics: the statistics kernel takes float16 or bfloat16");
}

void emulate_forward(int storage, int shape, int variant, const ReAttnParams& params, int order, uint64_t seed) {
  if (storage == kBFloat16) return forward_shape<dev::Bf16>(shape, variant, params, order, seed);
  if (storage == kFloat16) return forward_shape<dev::F16>(shape, variant, params, order, seed);
  throw std::invalid_argument("emulate_forward: the tensor-core forward takes float16 or bfloat16");
}

namespace {

template <class Cfg>
void run_keys(const ReAttnParams& given, int order, uint64_t seed) {
  const KeyShape s = Cfg::shape();
  ReAttnParams params = given;
  params.key_tiles = key_layout(s, params.H);  // as launch_key_shape sets it
  sim::Launch launch;
  launch.grid[0] = static_cast<int>(params.B * ((params.Nk + s.keys() - 1) / s.keys()));
  launch.threads = s.threads();
  launch.shared_bytes = params.key_tiles.bytes;
  launch.order = static_cast<sim::Order>(order);
  launch.seed = seed;
  if (launch.grid[0] == 0) return;
  sim::launch(launch, [&] { KeyProgram<Cfg>(params).run(); });
}

template <typename E, int kVariant, int kKeyPlain>
void backward_shapes(int rows, int keys, const ReAttnParams& params, int order, uint64_t seed) {
  switch (rows) {
#define REATTN_SHAPE_CASE(i, slabs, groups, heads, d, d_out, k)                                  \
  case i:                                                                                         \
    if constexpr (backward_rows_compiled(kVariant, i, std::is_same_v<E, dev::Bf16>)) {             \
      run_forward<RowConfig<E, slabs, groups, heads, d, d_out, k, kVariant>>(params, order, seed); \
      break;                                                                                        \
    }                                                                                               \
    throw std::invalid_argument("emulate_backward: row shape not compiled in that variant");
    REATTN_BACKWARD_ROW_SHAPES(REATTN_SHAPE_CASE)
#undef REATTN_SHAPE_CASE
    default:
      throw std::invalid_argument("emulate_backward: unknown row shape");
  }
  if (params.stats_only) return;
  if constexpr (kKeyPlain == kKeysPlainLayer && !std::is_same_v<E, dev::Bf16>) {
    throw std::invalid_argument("emulate_backward: LayerNorm's key pass is compiled for bfloat16 only");
  } else {
    switch (keys) {
#define REATTN_SHAPE_CASE(i, kslabs, groups, heads, d, tiles)                                  \
  case i:                                                                                       \
    if constexpr (key_shape_compiled(kKeyPlain, i, std::is_same_v<E, dev::Bf16>)) {             \
      return run_keys<KeyConfig<E, kslabs, groups, heads, d, tiles, kKeyPlain>>(params, order, seed); \
    }                                                                                           \
    throw std::invalid_argument("emulate_backward: key shape not compiled in that variant");
      REATTN_KEY_SHAPES(REATTN_SHAPE_CASE)
#undef REATTN_SHAPE_CASE
      default:
        throw std::invalid_argument("emulate_backward: unknown key shape");
    }
  }
}

template <typename E>
void backward_variant(int rows, int keys, bool plain, const ReAttnParams& params, int order, uint64_t seed) {
  constexpr bool bf16 = std::is_same_v<E, dev::Bf16>;
  const bool layer = params.norm == kNormLayer;
  const int row_variant = backward_rows_variant(rows, plain, layer, bf16);
  const int key_variant = backward_keys_variant(plain, layer, bf16);
  if (row_variant == kPlainLayerBackwardRows) {
    return backward_shapes<E, kPlainLayerBackwardRows, kKeysPlainLayer>(rows, keys, params, order, seed);
  }
  if (key_variant == kKeysPlainLayer) return backward_shapes<E, kPlainBackwardRows, kKeysPlainLayer>(rows, keys, params, order, seed);
  if (row_variant == kPlainBackwardRows) return backward_shapes<E, kPlainBackwardRows, kKeysPlain>(rows, keys, params, order, seed);
  return backward_shapes<E, kBackwardRows, kKeysGeneral>(rows, keys, params, order, seed);
}

}  // namespace

void emulate_backward(int storage, int rows, int keys, bool plain, const ReAttnParams& params, int order,
                      uint64_t seed) {
  if (storage == kBFloat16) return backward_variant<dev::Bf16>(rows, keys, plain, params, order, seed);
  if (storage == kFloat16) return backward_variant<dev::F16>(rows, keys, plain, params, order, seed);
  throw std::invalid_argument("emulate_backward: the tensor-core backward takes float16 or bfloat16");
}

namespace {

sim::Launch head_launch(const HeadAffineParams& p, size_t shared_bytes, int order, uint64_t seed) {
  sim::Launch launch;
  launch.grid[0] = static_cast<int>(p.B * p.H);
  launch.grid[1] = (p.Nq + p.rows - 1) / p.rows;
  launch.threads = kHeadAffineThreads;
  launch.shared_bytes = shared_bytes;
  launch.order = static_cast<sim::Order>(order);
  launch.seed = seed;
  return launch;
}

// f(T{}) for the storage type `storage` (StorageKind).
template <typename F>
void with_storage(const char* what, int storage, F&& f) {
  switch (storage) {
    case kFloat16:
      return f(c10::Half{});
    case kBFloat16:
      return f(c10::BFloat16{});
    case kFloat32:
      return f(float{});
    case kFloat64:
      return f(double{});
    default:
      throw std::invalid_argument(std::string(what) + ": unknown storage type");
  }
}

}  // namespace

void emulate_head_affine(int storage, const HeadAffineParams& p, int order, uint64_t seed) {
  if (p.B * p.H == 0 || p.Nq == 0 || p.D == 0) return;
  with_storage("emulate_head_affine", storage, [&](auto t) {
    using T = decltype(t);
    sim::launch(head_launch(p, head_affine_shared<T>(p.D, p.u_st.n == 0), order, seed),
                [&] { head_affine_program<T>(p); });
  });
}

void emulate_head_dot_sums(int storage, const HeadAffineParams& p, int order, uint64_t seed) {
  if (p.B * p.H == 0 || p.Nq == 0) return;
  with_storage("emulate_head_dot_sums", storage, [&](auto t) {
    using T = decltype(t);
    sim::launch(head_launch(p, head_dot_sums_shared<T>(p.D, p.u_st.n == 0), order, seed),
                [&] { head_dot_sums_program<T>(p); });
  });
}

namespace {

// One block of kParameterThreads threads (parameters.cuh's steps).
sim::Launch parameter_launch(int order, uint64_t seed) {
  sim::Launch launch;
  launch.threads = kParameterThreads;
  launch.order = static_cast<sim::Order>(order);
  launch.seed = seed;
  return launch;
}

}  // namespace

void emulate_param_grads(const ParamGradsParams& p, int order, uint64_t seed) {
  if (p.pieces > 0) sim::launch(parameter_launch(order, seed), [&] { param_grads_program(p); });
}

void emulate_moments_center(const MomentsCenterParams& p, int order, uint64_t seed) {
  if (p.H > 0) sim::launch(parameter_launch(order, seed), [&] { moments_center_program(p); });
}

void emulate_bn_coefficients(const BnCoefficientsParams& p, int order, uint64_t seed) {
  if (p.H == 0) return;
  sim::Launch launch = parameter_launch(order, seed);
  launch.shared_bytes = bn_coefficients_shared(p.H);
  sim::launch(launch, [&] { bn_coefficients_program(p); });
}

void emulate_running_stats(const RunningStatsParams& p, int order, uint64_t seed) {
  if (p.H > 0) sim::launch(parameter_launch(order, seed), [&] { running_stats_program(p); });
}

void emulate_bn_moments(const BnMomentsParams& p, int order, uint64_t seed) {
  if (p.H == 0) return;
  sim::Launch launch = parameter_launch(order, seed);
  launch.shared_bytes = bn_moments_shared(p.H);
  sim::launch(launch, [&] { bn_moments_program(p); });
}

void emulate_device_check(int kind, const void* a, const void* b, float* out, bool bf16, int order, uint64_t seed) {
  checks::CheckParams p;
  p.kind = kind;
  p.a = a;
  p.b = b;
  p.out = out;
  sim::Launch launch;
  launch.threads = checks::kCheckThreads;
  launch.shared_bytes = checks::kCheckShared;
  launch.order = static_cast<sim::Order>(order);
  launch.seed = seed;
  sim::launch(launch, [&] { checks::run_check(p, bf16); });
}

void emulate_program(int storage, int kind, const ReAttnParams& params, bool reverse_items) {
  if (kind < kForward || kind > kBnGradSums) throw std::invalid_argument("emulate_program: unknown program kind");
  with_storage("emulate_program", storage, [&](auto t) { run<decltype(t)>(kind, params, reverse_items); });
}

}  // namespace cuda
}  // namespace reattn
