"""Small Triton kernels with known loop structure, for the static model's tests."""
import triton
import triton.language as tl


@triton.jit
def _halve_plus_one(acc, M):
    for _ in range(0, M):  # a runtime loop inside a helper, inlined into the caller's loop
        acc = acc * 0.5 + 1.0
    return acc


@triton.jit
def toy_loops_kernel(X, Y, N, M, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, SCALE: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):  # runtime loop: ceil(N / BLOCK) trips
        offs = start + tl.arange(0, BLOCK)
        for c in tl.static_range(CHUNKS):  # unrolled: no loop of its own
            acc += tl.load(X + pid * N * CHUNKS + c * N + offs, mask=offs < N, other=0.0)
        acc = _halve_plus_one(acc, M)
    if SCALE:
        acc = acc * 2.0
    tl.store(Y + pid * BLOCK + tl.arange(0, BLOCK), acc)
