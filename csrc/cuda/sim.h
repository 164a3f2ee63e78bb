// The host emulator of the CUDA device code: every thread of a block is a host fiber with its own
// stack, so the device source runs unchanged with its registers as real per-thread state.
//
// The intrinsics of csrc/cuda/device.cuh call into this on the host. A warp-collective operation
// (mma.sync, ldmatrix, shfl.sync, __syncwarp) makes the calling lane yield; once all 32 lanes of its
// warp have reached it, the emulator computes the result from every lane's operands with the
// fragment layouts of the PTX ISA and resumes the lanes. A barrier (bar.sync / __syncthreads, and
// named barriers with a thread count) blocks a warp until every participating thread has arrived.
// cp.async copies land only when the issuing thread waits for their group (and the destination
// holds NaN bytes until then), so a missing wait reads garbage. Between barriers the warps run one
// after another, in an order the launch chooses (forward, reverse or shuffled): a race between
// warps changes the result with the order, which is how the tests catch it.
//
// Plain C++ (no CUDA toolkit); one block at a time per host thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace reattn {
namespace sim {

// How the warps (and the lanes within a warp) are ordered between two barriers.
enum class Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Launch {
  int grid[3] = {1, 1, 1};
  int threads = 32;          // per block, a multiple of 32
  size_t shared_bytes = 0;   // dynamic shared memory; filled with 0xff bytes (NaN) before each block
  Order order = Order::kForward;
  uint64_t seed = 0;         // for Order::kShuffled
};

// Runs `body` as every thread of every block of the grid. Throws std::runtime_error naming the
// block, warp and operation when the device code breaks a rule the hardware relies on (a warp
// collective reached by some lanes only, mismatched collective operands, an unaligned or out of
// range ldmatrix / cp.async address, copies still in flight at exit, a deadlock).
void launch(const Launch& launch, const std::function<void()>& body);

// ---- what the intrinsics call (only valid inside a running body) -----------------------------
// The compute capability whose code paths the emulated device code takes where they differ by
// architecture (sm_90's stmatrix): REATTN_SIM_ARCH at the launch (80 or 90), 90 if unset.
int arch();
int thread_index();
int block_threads();
int block_index(int axis);
int grid_blocks(int axis);
char* shared_memory();

void sync_threads();                       // bar.sync 0
void named_barrier(int id, int threads);   // bar.sync id, threads
void sync_warp();                          // __syncwarp()

enum class ShflMode : int { kIdx = 0, kXor = 1, kUp = 2, kDown = 3 };
uint32_t shfl(uint32_t value, ShflMode mode, int param);
uint32_t ballot(bool predicate);

enum class MmaType : int { kFloat16 = 0, kBFloat16 = 1 };
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
void mma_m16n8k16(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c);
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16
void ldmatrix(int matrices, bool trans, uint32_t* r, const void* row_address);
// movmatrix.sync.aligned.m8n8.trans.b16: lane l's row l/4, columns 2(l%4), 2(l%4)+1 of an 8x8 matrix -> the same
// entries of its transpose
uint32_t movmatrix_trans(uint32_t value);
// stmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (sm_90)
void stmatrix(int matrices, bool trans, const uint32_t* w, void* row_address);

// cp.async.cg.shared.global [dst], [src], 16, src_bytes (zero fill past src_bytes); ca for 4 / 8 bytes.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// A store of `bytes` to global memory at `address` (st.global.b32 and wider): fails the kernel unless the
// address is aligned to the store's size, as a GPU does ("misaligned address"); x86 would not notice.
void check_store_aligned(const void* address, int bytes);
// The same for a global load of `bytes` (ld.global.v4 and the like).
void check_load_aligned(const void* address, int bytes);

// Global atomics (one block at a time: a plain add).
void atomic_add(float* address, float value);
void atomic_add(double* address, double value);

// bf16 / fp16 bit conversions with round-to-nearest-even, as cvt.rn on the GPU.
uint16_t float_to_bf16(float x);
float bf16_to_float(uint16_t x);
uint16_t float_to_f16(float x);
float f16_to_float(uint16_t x);

}  // namespace sim
}  // namespace reattn
