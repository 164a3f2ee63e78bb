"""CPU backend: the fused C++ kernel of ``reattn._C`` (``csrc/cpu/re_attention.cpp``) on the shared op ladder.

Its ops are ``reattn::cpu_forward``, ``reattn::cpu_backward``, ``reattn::cpu_gram_sums`` and
``reattn::cpu_bn_grad_sums`` (``_ladder.OpLadder``: custom ops, fakes, autograd, entry point).
Every mode: norm none / BatchNorm eval (folded into the mixing by the ladder) / BatchNorm train
(statistics in the kernel's one sweep) / LayerNorm across heads; masks, per-head float masks
included in training BatchNorm (each head's statistics over its own kept entries); dropout with a
counter-based RNG keyed by (seed, b, h, i, j), the seed drawn from torch's CPU generator, so the
backward replays it and :func:`dropout_keep_mask` shows it.

The softmax statistics are [2, B, H, Nq]: each score row's max m and log l, l = sum_j exp(s_j - m).
Two numbers, because one logsumexp m + log l absorbs log l next to a large finite mask fill such as
-1e9 or finfo.min, and exp(s - lse) would then weight every key of a fully masked row 1 instead of
1/Nk. Training BatchNorm's forward keeps R = xhat V and U = keep V ([B, H, Nq, D]): the backward sums
are then two dot products with dO, no sweep over the keys (docs/math.md, "Through V and the norm").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from reattn._batchnorm import accumulator_dtype, check_counts
from reattn._extension import _C
from reattn.backends._ladder import OpLadder, RawOps, draw_dropout_seed

NORM_CODES = {"none": 0, "layer": 1, "batch": 2}  # the kernel's; "batch" reaches it only in training


def _seed_value(seed: Optional[Tensor]) -> int:
    """The kernel's seed from the ops' int64 seed tensor (None: no dropout)."""
    return 0 if seed is None else int(seed.reshape(-1)[0].item())


def _kernel_mask(attn_mask: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """The mask as the kernel reads it: bool as given; a float mask cast to q's dtype (as the reference
    adds it), then to the accumulation dtype the kernel reads."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask.to(q.dtype).to(accumulator_dtype(q))


class CpuRawOps(RawOps):
    """The C++ kernel behind the ladder's raw-op signature (see ``_ladder.RawOps``)."""

    keeps_bn_terms = True

    def softmax_stats_shape(self, q: Tensor) -> Tuple[int, ...]:
        B, H, Nq, _ = q.shape
        return (2, B, H, Nq)

    def dropout_keep_mask(self, seed, shape: Tuple[int, int, int, int], p: float) -> Tensor:
        return dropout_keep_mask(seed, shape, p)

    def forward(self, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, *, scale, out_scale,
                norm, eps, dropout_p, softmax_in=None, stats_in=None):
        out, softmax_stats, R, U, stats = _C.re_attention_cpu_forward(
            q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, _kernel_mask(attn_mask, q), scale, out_scale,
            NORM_CODES[norm], eps, dropout_p, _seed_value(seed), softmax_in, stats_in)
        if norm == "batch" and stats_in is None:  # given statistics: the caller checked every process's counts
            check_counts(stats[2])  # inside the op, so torch.compile needs no data-dependent branch outside it
        return out, softmax_stats, stats, R, U

    def gram_sums(self, q, k, attn_mask, seed, *, scale, dropout_p, shift):
        return tuple(_C.re_attention_cpu_gram_sums(q, k, _kernel_mask(attn_mask, q), scale, dropout_p,
                                                   _seed_value(seed), shift))

    def bn_grad_sums(self, grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                     softmax_stats, stats, R, U, *, scale, out_scale, eps, dropout_p):
        return _C.re_attention_cpu_bn_grad_sums(grad_out, R, U, out_scale)

    def backward(self, grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                 softmax_stats, stats, R, U, *, scale, out_scale, norm, eps, dropout_p, bn_grad_sums=None):
        return tuple(_C.re_attention_cpu_backward(
            grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, _kernel_mask(attn_mask, q),
            softmax_stats, R, U, stats, scale, out_scale, NORM_CODES[norm], eps, dropout_p, _seed_value(seed),
            bn_grad_sums))


CPU_OPS = OpLadder(CpuRawOps(), forward="reattn::cpu_forward", backward="reattn::cpu_backward",
                   gram_sums="reattn::cpu_gram_sums", bn_grad_sums="reattn::cpu_bn_grad_sums", device_types=("cpu",))
cpu_forward, cpu_backward = CPU_OPS.forward, CPU_OPS.backward
cpu_gram_sums, cpu_bn_grad_sums = CPU_OPS.gram_sums, CPU_OPS.bn_grad_sums
re_attention_cpu = CPU_OPS.run  # reattn.re_attention with backend="cpu" (validated arguments)


def dropout_keep_mask(seed, shape, p: float) -> Tensor:
    """The kernel's dropout keep-mask (bool [B, H, Nq, Nk], True = keep) for ``seed`` (an int or the
    int64 tensor the ops take): for tests and replay."""
    B, H, Nq, Nk = shape
    return _C.dropout_keep_mask(int(seed), B, H, Nq, Nk, p)


_CPU = torch.device("cpu")


def draw_seed() -> int:
    """The seed one dropout call draws (``draw_dropout_seed`` on the CPU generator), as an int (for
    ``dropout_keep_mask`` in tests)."""
    return int(draw_dropout_seed(_CPU).item())
