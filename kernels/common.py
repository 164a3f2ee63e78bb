"""Small ``@triton.jit`` helpers shared by the Re-attention kernels.

Nothing here imports ``reattn``; only triton.
"""
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, acc, LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` for 2-D or batched 3-D tiles.

    LOWP: cast both operands to LOWP_DTYPE (fp16/bf16) so the product runs on tensor cores
    with an fp32 accumulator (GPU only: bf16 ``tl.dot`` is wrong in Triton's interpreter).
    Otherwise the operands are used as given (fp32 or fp64) with ``input_precision=PRECISION``
    ("ieee" for exact fp32, "tf32" when the caller allows it).
    """
    if LOWP:
        return tl.dot(a.to(LOWP_DTYPE), b.to(LOWP_DTYPE), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)
