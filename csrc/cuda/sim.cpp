// The host emulator of the CUDA device code (see sim.h): threads as fibers, warp collectives as
// rendezvous computed with the PTX ISA's fragment layouts, barriers, cp.async groups.
//
// References: NVIDIA, "Parallel Thread Execution ISA" (section numbers of version 9.0; the
// anchors are stable across versions, https://docs.nvidia.com/cuda/parallel-thread-execution/):
//   mma.m16n8k16 fragments: 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point
//     type" (#warp-level-matrix-fragment-mma-16816-float)
//   ldmatrix: 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix"
//     (#warp-level-matrix-instructions-ldmatrix)
//   shfl.sync, cp.async / cp.async.commit_group / cp.async.wait_group, bar.sync: the sections
//     "Data Movement and Conversion Instructions: shfl.sync", "...: cp.async" and "Parallel
//     Synchronization and Communication Instructions: bar, barrier"
#include "sim.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__linux__)
#define REATTN_SIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#ifdef REATTN_SIM_ASM_SWITCH
// A context switch saves the callee-saved registers of the System V x86-64 ABI on the current
// stack, stores the stack pointer, loads the other one and pops its registers: ~10 ns, against
// ~1 us for swapcontext (which makes a signal-mask system call each time).
extern "C" void reattn_sim_switch(void** save_sp, void* load_sp);
extern "C" void reattn_sim_start();
asm(R"(
  .text
  .p2align 4
  .globl reattn_sim_switch
  .hidden reattn_sim_switch
  .type reattn_sim_switch,@function
reattn_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size reattn_sim_switch,.-reattn_sim_switch
  .p2align 4
  .globl reattn_sim_start
  .hidden reattn_sim_start
  .type reattn_sim_start,@function
reattn_sim_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size reattn_sim_start,.-reattn_sim_start
)");
#endif

namespace reattn {
namespace sim {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kRunnable, kAtCollective, kAtBarrier, kExited };
enum class OpKind { kShfl, kBallot, kMma, kLdmatrix, kStmatrix, kMovmatrix, kSyncWarp };

const char* op_name(OpKind k) {
  switch (k) {
    case OpKind::kShfl:
      return "shfl.sync";
    case OpKind::kBallot:
      return "vote.ballot.sync";
    case OpKind::kMma:
      return "mma.sync.m16n8k16";
    case OpKind::kLdmatrix:
      return "ldmatrix";
    case OpKind::kStmatrix:
      return "stmatrix";
    case OpKind::kMovmatrix:
      return "movmatrix";
    default:
      return "__syncwarp";
  }
}

// A lane's operands of a warp collective; lives on the lane's stack while it waits.
struct Op {
  OpKind kind;
  uint32_t value = 0;
  int mode = 0, param = 0;
  uint32_t result = 0;
  int mma_type = 0;
  float* d = nullptr;
  const uint32_t* a = nullptr;
  const uint32_t* b = nullptr;
  const float* c = nullptr;
  int matrices = 0;
  bool trans = false;
  uint32_t* r = nullptr;
  const char* address = nullptr;
  const uint32_t* w = nullptr;  // stmatrix: the lane's registers
  char* store_address = nullptr;
};

struct Copy {
  char* dst;
  const char* src;
  int bytes, src_bytes;
};

struct Thread {
  int index = 0;
  State state = State::kRunnable;
  Op* op = nullptr;
  int barrier_id = 0, barrier_count = 0;
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
  char* stack = nullptr;
#ifdef REATTN_SIM_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct Runner {
  std::vector<Thread> threads;
  std::vector<char*> stacks;  // mmap'ed, each with a guard page below
  std::vector<char> shared;   // 128-byte aligned view in `smem`
  char* smem = nullptr;
  size_t shared_bytes = 0;
  int block[3] = {0, 0, 0};
  int grid[3] = {1, 1, 1};
  int arch = 90;
  const std::function<void()>* body = nullptr;
  std::string error;
  Thread* current = nullptr;
#ifdef REATTN_SIM_ASM_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif

  ~Runner() {
    for (char* s : stacks) munmap(s - page(), kStackBytes + page());
  }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
};

thread_local Runner* g_runner = nullptr;

Runner& runner() {
  if (g_runner == nullptr || g_runner->current == nullptr) {
    throw std::logic_error("reattn sim: a device intrinsic was called outside an emulated kernel");
  }
  return *g_runner;
}

std::string where(const Runner& r, const Thread& t) {
  std::ostringstream s;
  s << "block (" << r.block[0] << ", " << r.block[1] << ", " << r.block[2] << "), thread " << t.index << " (warp "
    << t.index / kWarp << ", lane " << t.index % kWarp << ")";
  return s.str();
}

// ---- fibers -------------------------------------------------------------------------------
void yield_to_scheduler(Runner& r, Thread& t) {
#ifdef REATTN_SIM_ASM_SWITCH
  reattn_sim_switch(&t.sp, r.scheduler_sp);
#else
  swapcontext(&t.context, &r.scheduler);
#endif
}

void resume(Runner& r, Thread& t) {
  r.current = &t;
#ifdef REATTN_SIM_ASM_SWITCH
  reattn_sim_switch(&r.scheduler_sp, t.sp);
#else
  swapcontext(&r.scheduler, &t.context);
#endif
  r.current = nullptr;
}

// Reports an error from inside a fiber: the scheduler throws it once the fiber has yielded.
[[noreturn]] void fail_in_fiber(Runner& r, Thread& t, const std::string& message) {
  if (r.error.empty()) r.error = message + " (" + where(r, t) + ")";
  t.state = State::kExited;
  yield_to_scheduler(r, t);
  std::abort();  // never resumed
}

void fiber_main(Thread* t) {
  Runner& r = *g_runner;
  (*r.body)();
  if (!t->open_group.empty() || !t->groups.empty()) {
    fail_in_fiber(r, *t, "reattn sim: a thread exited with cp.async copies not waited for");
  }
  t->state = State::kExited;
  yield_to_scheduler(r, *t);
  std::abort();
}

#ifndef REATTN_SIM_ASM_SWITCH
void fiber_main_uc(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Thread*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void start_fiber(Runner& r, Thread& t) {
#ifdef REATTN_SIM_ASM_SWITCH
  uintptr_t* sp = reinterpret_cast<uintptr_t*>(t.stack + kStackBytes);  // 16-byte aligned top
  *--sp = reinterpret_cast<uintptr_t>(&reattn_sim_start);                  // ret target
  *--sp = 0;                                                                 // rbp
  *--sp = 0;                                                                 // rbx
  *--sp = reinterpret_cast<uintptr_t>(&t);                                   // r12: argument
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);                          // r13: entry
  *--sp = 0;                                                                 // r14
  *--sp = 0;                                                                 // r15
  t.sp = sp;
#else
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = t.stack;
  t.context.uc_stack.ss_size = kStackBytes;
  t.context.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&t);
  makecontext(&t.context, reinterpret_cast<void (*)()>(&fiber_main_uc), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
#endif
  (void)r;
}

// ---- ordering -------------------------------------------------------------------------------
uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void fill_order(std::vector<int>& order, int n, Order kind, uint64_t& rng) {
  order.resize(n);
  for (int i = 0; i < n; ++i) order[i] = kind == Order::kReverse ? n - 1 - i : i;
  if (kind == Order::kShuffled) {
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[static_cast<int>(splitmix(rng) % (i + 1))]);
  }
}

// ---- warp collectives -------------------------------------------------------------------------
float element(int type, uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half == 0 ? reg & 0xffffu : reg >> 16);
  return type == static_cast<int>(MmaType::kBFloat16) ? bf16_to_float(bits) : f16_to_float(bits);
}

void check_same(Runner& r, int warp, Op* const* ops, bool ok, const char* what) {
  if (!ok) {
    std::ostringstream s;
    s << "reattn sim: the lanes of warp " << warp << " reached " << op_name(ops[0]->kind) << " with different "
      << what << " (block " << r.block[0] << ", " << r.block[1] << ", " << r.block[2] << ")";
    throw std::runtime_error(s.str());
  }
}

void run_collective(Runner& r, int warp, Op* const* ops) {
  const OpKind kind = ops[0]->kind;
  for (int l = 1; l < kWarp; ++l) check_same(r, warp, ops, ops[l]->kind == kind, "instructions");
  switch (kind) {
    case OpKind::kSyncWarp:
      return;
    case OpKind::kShfl: {
      // shfl.sync with a full member mask and width 32: lane l reads lane src(l), or keeps its own
      // value when src(l) falls outside the warp (up / down).
      uint32_t values[kWarp];
      for (int l = 0; l < kWarp; ++l) values[l] = ops[l]->value;
      for (int l = 0; l < kWarp; ++l) {
        check_same(r, warp, ops, ops[l]->mode == ops[0]->mode, "shuffle modes");
        const int p = ops[l]->param;
        int src = l;
        switch (static_cast<ShflMode>(ops[l]->mode)) {
          case ShflMode::kIdx:
            src = p & (kWarp - 1);
            break;
          case ShflMode::kXor:
            src = l ^ (p & (kWarp - 1));
            break;
          case ShflMode::kUp:
            src = l - p >= 0 ? l - p : l;
            break;
          case ShflMode::kDown:
            src = l + p < kWarp ? l + p : l;
            break;
        }
        ops[l]->result = values[src];
      }
      return;
    }
    case OpKind::kBallot: {
      uint32_t mask = 0;
      for (int l = 0; l < kWarp; ++l) mask |= (ops[l]->value ? 1u : 0u) << l;
      for (int l = 0; l < kWarp; ++l) ops[l]->result = mask;
      return;
    }
    case OpKind::kMma: {
      // m16n8k16, row-major A (16 x 16), column-major B (16 x 8), f32 C/D (16 x 8). With
      // groupID = lane >> 2 and t = lane % 4 (PTX ISA 9.7.14.5.8):
      //   A: a0,a1 (row g, cols 2t, 2t+1)   a2,a3 (row g+8, same cols)
      //      a4,a5 (row g, cols 2t+8, 2t+9) a6,a7 (row g+8, same cols)   [two per 32-bit register, low half first]
      //   B: b0,b1 (rows 2t, 2t+1, col g)   b2,b3 (rows 2t+8, 2t+9, col g)
      //   C, D: c0,c1 (row g, cols 2t, 2t+1) c2,c3 (row g+8, same cols)
      float A[16][16], B[16][8], C[16][8];
      const int type = ops[0]->mma_type;
      for (int l = 0; l < kWarp; ++l) {
        check_same(r, warp, ops, ops[l]->mma_type == type, "element types");
        const int g = l >> 2, t = l & 3;
        const uint32_t* a = ops[l]->a;
        const uint32_t* b = ops[l]->b;
        const float* c = ops[l]->c;
        for (int h = 0; h < 2; ++h) {
          A[g][2 * t + h] = element(type, a[0], h);
          A[g + 8][2 * t + h] = element(type, a[1], h);
          A[g][2 * t + 8 + h] = element(type, a[2], h);
          A[g + 8][2 * t + 8 + h] = element(type, a[3], h);
          B[2 * t + h][g] = element(type, b[0], h);
          B[2 * t + 8 + h][g] = element(type, b[1], h);
          C[g][2 * t + h] = c[h];
          C[g + 8][2 * t + h] = c[2 + h];
        }
      }
      // The products of two 16-bit floats are exact in fp32; they are added in k order.
      float D[16][8];
      for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 8; ++n) {
          float acc = C[m][n];
          for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
          D[m][n] = acc;
        }
      }
      for (int l = 0; l < kWarp; ++l) {
        const int g = l >> 2, t = l & 3;
        float* d = ops[l]->d;
        d[0] = D[g][2 * t];
        d[1] = D[g][2 * t + 1];
        d[2] = D[g + 8][2 * t];
        d[3] = D[g + 8][2 * t + 1];
      }
      return;
    }
    case OpKind::kLdmatrix: {
      // m8n8 matrices of 16-bit elements (PTX ISA 9.7.14.5.15): lanes 8i..8i+7 give the row
      // addresses of matrix i (16 bytes each, 16-byte aligned, in shared memory); lane l receives
      // in register i the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, or with .trans
      // those of its transpose, i.e. (rows 2(l%4), 2(l%4)+1, col l/4) as stored.
      const int n = ops[0]->matrices;
      const bool trans = ops[0]->trans;
      uint16_t M[4][8][8];
      for (int l = 0; l < kWarp; ++l) {
        check_same(r, warp, ops, ops[l]->matrices == n && ops[l]->trans == trans, "shapes");
      }
      for (int i = 0; i < n; ++i) {
        for (int row = 0; row < 8; ++row) {
          const char* p = ops[8 * i + row]->address;
          const uintptr_t u = reinterpret_cast<uintptr_t>(p);
          if (p < r.smem || p + 16 > r.smem + r.shared_bytes || (u & 15) != 0) {
            std::ostringstream s;
            s << "reattn sim: ldmatrix row address of lane " << 8 * i + row << " in warp " << warp
              << (p < r.smem || p + 16 > r.smem + r.shared_bytes ? " lies outside shared memory"
                                                                 : " is not 16-byte aligned")
              << " (offset " << static_cast<long long>(p - r.smem) << " of " << r.shared_bytes << " bytes; block "
              << r.block[0] << ", " << r.block[1] << ", " << r.block[2] << ")";
            throw std::runtime_error(s.str());
          }
          std::memcpy(M[i][row], p, 16);
        }
      }
      for (int l = 0; l < kWarp; ++l) {
        const int row = l >> 2, col = 2 * (l & 3);
        for (int i = 0; i < n; ++i) {
          const uint16_t lo = trans ? M[i][col][row] : M[i][row][col];
          const uint16_t hi = trans ? M[i][col + 1][row] : M[i][row][col + 1];
          ops[l]->r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      return;
    }
    case OpKind::kMovmatrix: {
      // movmatrix.sync.aligned.m8n8.trans.b16 (PTX ISA 9.7.14.5.17, "movmatrix"): lane l holds row l/4,
      // columns 2(l%4), 2(l%4)+1 of an 8x8 matrix of 16-bit elements (low half first) and receives the same
      // entries of its transpose: (row 2(l%4), col l/4) low, (row 2(l%4)+1, col l/4) high.
      uint16_t M[8][8];
      for (int l = 0; l < kWarp; ++l) {
        const int row = l >> 2, col = 2 * (l & 3);
        M[row][col] = static_cast<uint16_t>(ops[l]->value & 0xffffu);
        M[row][col + 1] = static_cast<uint16_t>(ops[l]->value >> 16);
      }
      for (int l = 0; l < kWarp; ++l) {
        const int row = l >> 2, col = 2 * (l & 3);
        ops[l]->result = static_cast<uint32_t>(M[col][row]) | (static_cast<uint32_t>(M[col + 1][row]) << 16);
      }
      return;
    }
    case OpKind::kStmatrix: {
      // The inverse of ldmatrix (PTX ISA 9.7.14.5.16, stmatrix, sm_90): lane l gives in register i the
      // elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i; lanes 8i..8i+7 give the addresses of
      // its 8 rows as stored (16 bytes each, 16-byte aligned, in shared memory), with .trans those of
      // its transpose (stored row j = column j). Lanes whose addresses coincide: the last one's row lands.
      const int n = ops[0]->matrices;
      const bool trans = ops[0]->trans;
      uint16_t M[4][8][8];
      for (int l = 0; l < kWarp; ++l) {
        check_same(r, warp, ops, ops[l]->matrices == n && ops[l]->trans == trans, "shapes");
        const int row = l >> 2, col = 2 * (l & 3);
        for (int i = 0; i < n; ++i) {
          const uint32_t v = ops[l]->w[i];
          M[i][row][col] = static_cast<uint16_t>(v & 0xffffu);
          M[i][row][col + 1] = static_cast<uint16_t>(v >> 16);
        }
      }
      for (int i = 0; i < n; ++i) {
        for (int row = 0; row < 8; ++row) {
          char* p = ops[8 * i + row]->store_address;
          const uintptr_t u = reinterpret_cast<uintptr_t>(p);
          if (p < r.smem || p + 16 > r.smem + r.shared_bytes || (u & 15) != 0) {
            std::ostringstream s;
            s << "reattn sim: stmatrix row address of lane " << 8 * i + row << " in warp " << warp
              << (p < r.smem || p + 16 > r.smem + r.shared_bytes ? " lies outside shared memory"
                                                                 : " is not 16-byte aligned")
              << " (offset " << static_cast<long long>(p - r.smem) << " of " << r.shared_bytes << " bytes; block "
              << r.block[0] << ", " << r.block[1] << ", " << r.block[2] << ")";
            throw std::runtime_error(s.str());
          }
          uint16_t stored[8];
          for (int c = 0; c < 8; ++c) stored[c] = trans ? M[i][c][row] : M[i][row][c];
          std::memcpy(p, stored, 16);
        }
      }
      return;
    }
  }
}

// Waits at a warp collective: the scheduler runs it once every lane of the warp is here.
void collective(Op& op) {
  Runner& r = runner();
  Thread& t = *r.current;
  t.op = &op;
  t.state = State::kAtCollective;
  yield_to_scheduler(r, t);
}

void land(Copy& c) {
  std::memcpy(c.dst, c.src, c.src_bytes);
  std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
}

// ---- the scheduler ------------------------------------------------------------------------------
// Runs the lanes of one warp until each is at a barrier or has exited, computing the warp's
// collectives on the way. Returns whether any lane ran.
bool run_warp(Runner& r, int warp, const std::vector<int>& lane_order) {
  bool ran = false;
  Thread* lanes = &r.threads[warp * kWarp];
  for (;;) {
    for (int l : lane_order) {
      Thread& t = lanes[l];
      if (t.state != State::kRunnable) continue;
      resume(r, t);
      ran = true;
      if (!r.error.empty()) throw std::runtime_error(r.error);
    }
    int at_op = 0;
    for (int l = 0; l < kWarp; ++l) at_op += lanes[l].state == State::kAtCollective;
    if (at_op == 0) break;
    if (at_op != kWarp) {
      OpKind kind = OpKind::kSyncWarp;
      for (int l = 0; l < kWarp; ++l) {
        if (lanes[l].state == State::kAtCollective) kind = lanes[l].op->kind;
      }
      std::ostringstream s;
      s << "reattn sim: only " << at_op << " of 32 lanes of warp " << warp << " reached " << op_name(kind)
        << " (the others are at a barrier or have exited; block " << r.block[0] << ", " << r.block[1] << ", "
        << r.block[2] << ")";
      throw std::runtime_error(s.str());
    }
    Op* ops[kWarp];
    for (int l = 0; l < kWarp; ++l) ops[l] = lanes[l].op;
    run_collective(r, warp, ops);
    for (int l = 0; l < kWarp; ++l) {
      lanes[l].op = nullptr;
      lanes[l].state = State::kRunnable;
    }
  }
  return ran;
}

// Releases the barriers every participant has reached. Returns whether any was released.
bool release_barriers(Runner& r) {
  int alive = 0;
  for (const Thread& t : r.threads) alive += t.state != State::kExited;
  bool released = false;
  for (int id = 0; id < 16; ++id) {
    int arrived = 0, count = -1;
    bool mixed = false;
    for (const Thread& t : r.threads) {
      if (t.state != State::kAtBarrier || t.barrier_id != id) continue;
      ++arrived;
      if (count >= 0 && count != t.barrier_count) mixed = true;
      count = t.barrier_count;
    }
    if (arrived == 0) continue;
    if (mixed) {
      throw std::runtime_error("reattn sim: threads wait at barrier " + std::to_string(id) +
                               " with different thread counts");
    }
    const int needed = count == 0 ? alive : count;
    if (arrived > needed) {
      throw std::runtime_error("reattn sim: " + std::to_string(arrived) + " threads arrived at barrier " +
                               std::to_string(id) + " of " + std::to_string(needed));
    }
    if (arrived < needed) continue;
    for (Thread& t : r.threads) {
      if (t.state == State::kAtBarrier && t.barrier_id == id) t.state = State::kRunnable;
    }
    released = true;
  }
  return released;
}

void run_block(Runner& r, const Launch& launch, uint64_t block_linear) {
  const int n = launch.threads;
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.index = i;
    t.state = State::kRunnable;
    t.op = nullptr;
    t.open_group.clear();
    t.groups.clear();
    start_fiber(r, t);
  }
  if (r.shared_bytes > 0) std::memset(r.smem, 0xff, r.shared_bytes);
  const int warps = n / kWarp;
  uint64_t rng = launch.seed * 0x2545F4914F6CDD1Dull + block_linear;
  std::vector<int> warp_order, lane_order;
  for (;;) {
    fill_order(warp_order, warps, launch.order, rng);
    bool progress = false;
    for (int w : warp_order) {
      fill_order(lane_order, kWarp, launch.order, rng);
      progress |= run_warp(r, w, lane_order);
    }
    bool all_exited = true;
    for (const Thread& t : r.threads) all_exited &= t.state == State::kExited;
    if (all_exited) return;
    progress |= release_barriers(r);
    if (!progress) {
      std::ostringstream s;
      s << "reattn sim: deadlock in block (" << r.block[0] << ", " << r.block[1] << ", " << r.block[2]
        << "): threads wait at barriers nobody else reaches";
      for (const Thread& t : r.threads) {
        if (t.state == State::kAtBarrier) {
          s << " (thread " << t.index << " at barrier " << t.barrier_id << ")";
          break;
        }
      }
      throw std::runtime_error(s.str());
    }
  }
}

void prepare(Runner& r, const Launch& launch) {
  if (launch.threads <= 0 || launch.threads % kWarp != 0 || launch.threads > 1024) {
    throw std::invalid_argument("reattn sim: threads per block must be a multiple of 32 in [32, 1024], got " +
                                std::to_string(launch.threads));
  }
  const size_t page = Runner::page();
  while (r.stacks.size() < static_cast<size_t>(launch.threads)) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("reattn sim: cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    r.stacks.push_back(static_cast<char*>(m) + page);
  }
  r.threads.assign(launch.threads, Thread{});
  for (int i = 0; i < launch.threads; ++i) r.threads[i].stack = r.stacks[i];
  r.shared.assign(launch.shared_bytes + 128, 0);
  const uintptr_t base = reinterpret_cast<uintptr_t>(r.shared.data());
  r.smem = r.shared.data() + ((128 - base % 128) % 128);
  r.shared_bytes = launch.shared_bytes;
  for (int a = 0; a < 3; ++a) r.grid[a] = launch.grid[a];
}

}  // namespace

void launch(const Launch& launch, const std::function<void()>& body) {
  if (g_runner != nullptr && g_runner->current != nullptr) {
    throw std::logic_error("reattn sim: launch from inside an emulated kernel");
  }
  thread_local std::unique_ptr<Runner> owned;
  if (!owned) owned = std::make_unique<Runner>();
  Runner& r = *owned;
  g_runner = &r;
  prepare(r, launch);
  const char* arch = std::getenv("REATTN_SIM_ARCH");
  r.arch = arch != nullptr && *arch != '\0' ? std::atoi(arch) : 90;
  r.body = &body;
  r.error.clear();
  uint64_t linear = 0;
  for (int z = 0; z < launch.grid[2]; ++z) {
    for (int y = 0; y < launch.grid[1]; ++y) {
      for (int x = 0; x < launch.grid[0]; ++x, ++linear) {
        r.block[0] = x;
        r.block[1] = y;
        r.block[2] = z;
        run_block(r, launch, linear);
      }
    }
  }
}

int arch() { return runner().arch; }
int thread_index() { return runner().current->index; }
int block_threads() { return static_cast<int>(runner().threads.size()); }
int block_index(int axis) { return runner().block[axis]; }
int grid_blocks(int axis) { return runner().grid[axis]; }
char* shared_memory() { return runner().smem; }

void sync_threads() { named_barrier(0, 0); }

void named_barrier(int id, int threads) {
  Runner& r = runner();
  Thread& t = *r.current;
  if (id < 0 || id >= 16 || threads < 0 || threads % kWarp != 0) {
    fail_in_fiber(r, t, "reattn sim: bar.sync needs an id in [0, 16) and a thread count that is a multiple of 32");
  }
  t.barrier_id = id;
  t.barrier_count = threads;
  t.state = State::kAtBarrier;
  yield_to_scheduler(r, t);
}

void sync_warp() {
  Op op{OpKind::kSyncWarp};
  collective(op);
}

uint32_t shfl(uint32_t value, ShflMode mode, int param) {
  Op op{OpKind::kShfl};
  op.value = value;
  op.mode = static_cast<int>(mode);
  op.param = param;
  collective(op);
  return op.result;
}

uint32_t ballot(bool predicate) {
  Op op{OpKind::kBallot};
  op.value = predicate ? 1u : 0u;
  collective(op);
  return op.result;
}

void mma_m16n8k16(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  Op op{OpKind::kMma};
  op.mma_type = static_cast<int>(type);
  float out[4];
  op.d = out;
  op.a = a;
  op.b = b;
  op.c = c;
  collective(op);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

void ldmatrix(int matrices, bool trans, uint32_t* r, const void* row_address) {
  Op op{OpKind::kLdmatrix};
  op.matrices = matrices;
  op.trans = trans;
  op.r = r;
  op.address = static_cast<const char*>(row_address);
  collective(op);
}

uint32_t movmatrix_trans(uint32_t value) {
  Op op{OpKind::kMovmatrix};
  op.value = value;
  collective(op);
  return op.result;
}

void stmatrix(int matrices, bool trans, const uint32_t* w, void* row_address) {
  Runner& r = runner();
  if (r.arch < 90) fail_in_fiber(r, *r.current, "reattn sim: stmatrix needs sm_90 (emulating sm_" + std::to_string(r.arch) + ")");
  Op op{OpKind::kStmatrix};
  op.matrices = matrices;
  op.trans = trans;
  op.w = w;
  op.store_address = static_cast<char*>(row_address);
  collective(op);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Runner& r = runner();
  Thread& t = *r.current;
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  if (bytes != 4 && bytes != 8 && bytes != 16) fail_in_fiber(r, t, "reattn sim: cp.async copies 4, 8 or 16 bytes");
  if (src_bytes < 0 || src_bytes > bytes) fail_in_fiber(r, t, "reattn sim: cp.async src-size must be in [0, cp-size]");
  if (d < r.smem || d + bytes > r.smem + r.shared_bytes) {
    fail_in_fiber(r, t, "reattn sim: cp.async destination lies outside shared memory");
  }
  if (reinterpret_cast<uintptr_t>(d) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(s) % bytes != 0)) {
    fail_in_fiber(r, t, "reattn sim: cp.async addresses must be aligned to the copy size (" + std::to_string(bytes) +
                            " bytes)");
  }
  // Until the wait that lands it, the destination holds NaN bytes: reading it early shows.
  std::memset(d, 0xff, bytes);
  t.open_group.push_back(Copy{d, s, bytes, src_bytes});
}

void check_store_aligned(const void* address, int bytes) {
  if (reinterpret_cast<uintptr_t>(address) % bytes != 0) {
    Runner& r = runner();
    fail_in_fiber(r, *r.current, "reattn sim: a " + std::to_string(bytes) + "-byte global store at an address that is "
                  "not a multiple of " + std::to_string(bytes) + " (misaligned address on a GPU)");
  }
}

void check_load_aligned(const void* address, int bytes) {
  if (reinterpret_cast<uintptr_t>(address) % bytes != 0) {
    Runner& r = runner();
    fail_in_fiber(r, *r.current, "reattn sim: a " + std::to_string(bytes) + "-byte global load at an address that is "
                  "not a multiple of " + std::to_string(bytes) + " (misaligned address on a GPU)");
  }
}

void cp_async_commit() {
  Thread& t = *runner().current;
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending_groups) {
  Thread& t = *runner().current;
  while (static_cast<int>(t.groups.size()) > pending_groups) {
    for (Copy& c : t.groups.front()) land(c);
    t.groups.erase(t.groups.begin());
  }
}

void atomic_add(float* address, float value) { *address += value; }
void atomic_add(double* address, double value) { *address += value; }

uint16_t float_to_bf16(float x) { return c10::BFloat16(x).x; }
float bf16_to_float(uint16_t x) { return static_cast<float>(c10::BFloat16(x, c10::BFloat16::from_bits())); }
uint16_t float_to_f16(float x) { return c10::Half(x).x; }
float f16_to_float(uint16_t x) { return static_cast<float>(c10::Half(x, c10::Half::from_bits())); }

}  // namespace sim
}  // namespace reattn
