"""Tolerances from error analysis, shared by the tests (never a number one machine happened to produce).

A floating-point result computed through reductions of total length n (dot products, sums over keys,
queries, heads, the batch) has, under the probabilistic model of rounding errors (Higham and Mary,
"A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019: rounding errors
independent with mean zero), a relative error of at most lambda * sqrt(n) * u with probability at
least 1 - 2 exp(-lambda^2 / 2) per result, where u is the unit roundoff of the arithmetic. With
lambda = 8 that probability is 1 - 2.5e-14: a bound no CPU model, BLAS or thread count exceeds by
chance, scaled by the magnitudes of the quantity itself (its largest reference entry, or the sum of
the absolute values of the terms when the exact result cancels to about zero).

Low precision follows FlashAttention's rule on top: a kernel may be up to twice as far from the
float64 truth as the eager path run in the same dtype, whose error is dominated by rounding every
intermediate map to bf16/fp16 (``within_twice_eager``).
"""
from __future__ import annotations

import math

import torch

LAMBDA = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand (float64 2^-53, float32 2^-24, bfloat16 2^-8, float16 2^-11)."""
    return {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
            torch.float16: 2.0 ** -11}[dtype]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic the fused kernels compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_bound(dtype: torch.dtype, n: int, magnitude: float) -> float:
    """lambda sqrt(n) u magnitude: the probabilistic bound on the error of a result of reduction length n."""
    return LAMBDA * math.sqrt(max(n, 1)) * unit_roundoff(dtype) * magnitude


def reduction_length(B: int, H: int, Nq: int, Nk: int, D: int) -> int:
    """Total reduction length along the op's chains: scores (D), softmax and A V (Nk), the head mixing
    and LayerNorm (H), dK/dV (Nq), and the batch statistics / parameter gradients (B Nq Nk)."""
    return D + Nk + H + Nq + B * Nq * Nk


def twice_eager_bound(eager_err: float, dtype: torch.dtype, n: int, magnitude: float) -> float:
    """FlashAttention's rule, 2 x eager's error, plus what any kernel must be allowed on top:
    - the result's one rounding to ``dtype`` (u magnitude): eager's error may by chance be below a
      rounding of the result, and twice it then below what a kernel that computes exactly and stores
      in ``dtype`` achieves;
    - the accumulation's own rounding bound, which alone governs float32, where the kernel and eager
      make errors of the same size and their ratio is a matter of chance."""
    return (2.0 * eager_err + unit_roundoff(dtype) * magnitude
            + rounding_bound(accumulation_dtype(dtype), n, magnitude))


def within_twice_eager(kernel_err: float, eager_err: float, dtype: torch.dtype, n: int, magnitude: float) -> bool:
    return kernel_err <= twice_eager_bound(eager_err, dtype, n, magnitude)


def mix_bias_term_size(q, k, v, mix_weight, mix_bias, grad_out, **naive_kwargs) -> float:
    """max_g sum_e |dM_g,e| in float64: the size of the terms of d mix_bias_g = sum_e dM_g,e.

    Training BatchNorm removes any per-head constant, so d mix_bias is exactly 0 and its computed value
    is rounding noise whose bound scales with the terms it sums, not with the (zero) result."""
    from tests._naive import naive_re_attention

    record = {}
    w = mix_weight.detach().double().requires_grad_(True)
    out, _, _ = naive_re_attention(q.detach(), k.detach(), v.detach(), w,
                                   None if mix_bias is None else mix_bias.detach(), record=record, **naive_kwargs)
    (dM,) = torch.autograd.grad(out, record["M"], grad_out.double())
    return dM.abs().sum(dim=(0, 2, 3)).max().item()
