"""CPU backend: ``torch.library`` custom ops over the fused C++ kernel in ``reattn._C`` with autograd.

Layering (as the Triton backend): C++ kernels (``csrc/cpu/re_attention.cpp``) -> custom ops with
fake implementations (``torch.compile`` traces through them) -> autograd registration ->
``re_attention_cpu``, called by ``reattn.re_attention`` only.

Every mode: norm none / BatchNorm eval (folded into the mixing here, so its gradients flow through
the fold in autograd) / BatchNorm train (batch statistics in the kernel; the running statistics are
updated here, in place, like ``nn.BatchNorm2d``) / LayerNorm across heads; masks; dropout with a
counter-based RNG keyed by (seed, b, h, i, j), the seed drawn from torch's CPU generator, so backward
replays it and ``dropout_keep_mask`` shows it.

Saved for backward: q, k, v, the parameters, the mask, the softmax statistics [2, B, H, Nq] (each score
row's max m and log l, l = sum_j exp(s_j - m): two numbers, because one logsumexp m + log l absorbs
log l next to a large finite mask fill such as -1e9 or finfo.min, and exp(s - lse) would then weight
every key of a fully masked row 1 instead of 1/Nk) and, for training BatchNorm, R = Xhat V and
U = 1_unmasked V ([B, H, Nq, D]) and the [3, H] statistics; never a [B, H, Nq, Nk] map.

Training BatchNorm synchronized across processes (``sync_group``, ``nn.SyncBatchNorm`` semantics) runs
the same kernels in separate steps with two all-reduces between them (:class:`_SyncedBatchNorm`):

* forward: ``cpu_bn_gram`` (the statistics sweep, as sums that add up over processes: the Gram matrix
  of P~ - 1/Nk, its row sums and the count, H² + H + 1 numbers; see ``reattn.distributed``) ->
  all-reduce -> mean and variance -> ``cpu_forward`` with those statistics (its main sweep only);
* backward: ``cpu_bn_grad_sums`` (sum dA and sum dA·Xhat per head, from dO, R and U) -> all-reduce
  (2H numbers) -> ``cpu_backward`` with the global sums.

Nothing of size Nq·Nk crosses processes. Without ``sync_group`` the single ``cpu_forward`` call
computes its statistics itself (its own sweep over local moments), as before: no extra work.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from reattn._batchnorm import (accumulator_dtype, check_counts, fold_batchnorm_eval, gram_batch_statistics, gram_shift,
                               update_running_stats)
from reattn._collectives import all_reduce_sum
from reattn._extension import _C
from reattn._ops import define_op, register_autograd, register_fake
from reattn.backends._fused import draw_dropout_seed, eager_double_backward

NORM_CODES = {"none": 0, "layer": 1, "batch": 2}  # "batch" reaches the kernel only in training


def _forward_kernel(
    q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, out_scale: float, norm: int, eps: float,
    dropout_p: float, seed: Optional[Tensor], softmax_in: Optional[Tensor] = None,
    stats_in: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (out [B, H, Nq, D], softmax_stats [2, B, H, Nq], R, U, stats [3, H] float64).

    R, U are [B, H, Nq, D] for norm code 2 (training BatchNorm) and empty otherwise; stats holds
    the batch mean, biased variance and unmasked count per head (zeros unless norm code 2).
    softmax_stats: each score row's max and log-sum (accumulation dtype). softmax_in, stats_in (norm
    code 2, both or neither): normalize with these statistics (of the batch over every process, from
    ``cpu_bn_gram``) instead of computing them; they come back as copies. Autograd through this op
    is for the local case only: ``_SyncedBatchNorm`` differentiates the other.
    """
    out, softmax_stats, R, U, stats = _C.re_attention_cpu_forward(
        q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale, out_scale, norm, eps, dropout_p,
        _seed_value(seed), softmax_in, stats_in)
    return out, softmax_stats, R, U, stats


cpu_forward = define_op("cpu_forward", _forward_kernel, ("cpu",))


@register_fake(cpu_forward)
def _(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale, out_scale, norm, eps, dropout_p,
      seed, softmax_in=None, stats_in=None):
    B, H, Nq, D = q.shape
    acc = accumulator_dtype(q)
    saved = (B if norm == 2 else 0, H, Nq, D)
    return (q.new_empty((B, H, Nq, D)), q.new_empty((2, B, H, Nq), dtype=acc), q.new_empty(saved, dtype=acc),
            q.new_empty(saved, dtype=acc), q.new_empty((3, H), dtype=torch.float64))


def _backward_kernel(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor], softmax_stats: Tensor,
    R: Tensor, U: Tensor, stats: Tensor, scale: float, out_scale: float, norm: int, eps: float, dropout_p: float,
    seed: Optional[Tensor], bn_sums: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias).

    Parameter gradients come back in the parameters' dtypes; those of absent parameters are zeros
    (custom ops cannot return None) and are dropped by the autograd formula. bn_sums (norm code 2):
    ``cpu_bn_grad_sums`` summed over every process; the norm's gradients then come back zero (the
    caller has them: out_scale times its own sums).
    """
    dq, dk, dv, dw, dc, dnw, dnb = _C.re_attention_cpu_backward(
        grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, softmax_stats, R, U, stats,
        scale, out_scale, norm, eps, dropout_p, _seed_value(seed), bn_sums)

    def like(grad, param):
        return grad.to(mix_weight.dtype if param is None else param.dtype)

    return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)


cpu_backward = define_op("cpu_backward", _backward_kernel, ("cpu",))


@register_fake(cpu_backward)
def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, softmax_stats, R, U, stats, scale,
      out_scale, norm, eps, dropout_p, seed, bn_sums=None):
    H = q.shape[1]

    def vec(param):
        return q.new_empty((H,), dtype=(param if param is not None else mix_weight).dtype)

    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(mix_weight),
            vec(mix_bias), vec(norm_weight), vec(norm_bias))


def _setup_context(ctx, inputs, output):
    (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale, out_scale, norm, eps, dropout_p,
     seed, softmax_in, stats_in) = inputs
    _, softmax_stats, R, U, stats = output
    ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, R,
                          U, stats)
    ctx.options = (scale, out_scale, norm, eps, dropout_p)
    ctx.given_stats = stats_in is not None


def _backward(ctx, grad_out, grad_softmax, grad_r, grad_u, grad_stats):
    if ctx.given_stats:
        # Given statistics stand for a batch spread over processes: their gradient terms need the
        # backward's sums of every process, which only _SyncedBatchNorm (holding the group) gathers.
        raise RuntimeError("reattn::cpu_forward with softmax_in/stats_in is differentiated through "
                           "re_attention(..., backend='cpu', sync_group=...), not on its own")
    q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, R, U, stats = \
        ctx.saved_tensors
    scale, out_scale, norm, eps, dropout_p = ctx.options
    dq, dk, dv, dw, dc, dnw, dnb = cpu_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                attn_mask, softmax_stats, R, U, stats, scale, out_scale, norm, eps,
                                                dropout_p, seed)
    return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
            dnb if norm_bias is not None else None, None, None, None, None, None, None, None, None, None)


register_autograd(cpu_forward, _backward, setup_context=_setup_context)

NORM_NAMES = {code: name for name, code in NORM_CODES.items()}


def _backward_setup_context(ctx, inputs, output):
    (grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, softmax_stats, R, U, stats, scale,
     out_scale, norm, eps, dropout_p, seed, bn_sums) = inputs
    ctx.save_for_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed)
    ctx.options = dict(scale=scale, out_scale=out_scale, norm=NORM_NAMES[norm], eps=eps, dropout_p=dropout_p)
    ctx.synced = bn_sums is not None


def _double_backward(ctx, *grad_grads):
    grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed = ctx.saved_tensors
    keep = None if seed is None else dropout_keep_mask(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                                                       ctx.options["dropout_p"])
    grads = eager_double_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, keep,
                                  grad_grads, backend="cpu", synced=ctx.synced, **ctx.options)
    return grads + (None,) * 12


register_autograd(cpu_backward, _double_backward, setup_context=_backward_setup_context)


def _bn_gram_kernel(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: float, dropout_p: float,
                seed: Optional[Tensor], kappa: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training BatchNorm statistics sweep as sums that add up over processes.

    Returns (softmax_stats [2, B, H, Nq] in the accumulation dtype, s1 [Hm, H], gram [Hm, H, H], count [Hm]
    float64): with X = P~ - kappa on the entries unmasked for mask head m and 0 elsewhere,
    s1[m] = Σ X, gram[m] = Σ X Xᵀ over heads, count[m] = the unmasked entries. Hm is the mask's head
    count (1 without a mask or with one shared by the heads, else H: head g's statistics then run over
    its own entries). ``reattn.distributed.gram_batch_statistics`` turns them into mean and variance.
    """
    softmax_stats, s1, gram, count = _C.re_attention_cpu_bn_gram(q, k, attn_mask, scale, dropout_p,
                                                                 _seed_value(seed), kappa)
    return softmax_stats, s1, gram, count


cpu_bn_gram = define_op("cpu_bn_gram", _bn_gram_kernel, ("cpu",))


def _mask_heads(attn_mask: Optional[Tensor], H: int) -> int:
    return H if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] > 1 else 1


@register_fake(cpu_bn_gram)
def _(q, k, attn_mask, scale, dropout_p, seed, kappa):
    B, H, Nq, _ = q.shape
    Hm = _mask_heads(attn_mask, H)
    f64 = dict(dtype=torch.float64)
    return (q.new_empty((2, B, H, Nq), dtype=accumulator_dtype(q)), q.new_empty((Hm, H), **f64),
            q.new_empty((Hm, H, H), **f64), q.new_empty((Hm,), **f64))


def _bn_grad_sums_kernel(grad_out: Tensor, R: Tensor, U: Tensor) -> Tensor:
    """[2, H] float64: Σ dA and Σ dA·Xhat per head over this call's entries (<dO, U> and <dO, R>)."""
    return _C.re_attention_cpu_bn_grad_sums(grad_out, R, U)


cpu_bn_grad_sums = define_op("cpu_bn_grad_sums", _bn_grad_sums_kernel, ("cpu",))


@register_fake(cpu_bn_grad_sums)
def _(grad_out, R, U):
    return grad_out.new_empty((2, grad_out.shape[1]), dtype=torch.float64)


class _SyncedBatchNorm(torch.autograd.Function):
    """Training BatchNorm with ``nn.SyncBatchNorm`` semantics: statistics over every process of a group.

    Forward: local Gram sums -> all-reduce (H² + H + 1 numbers, Hm times that for a per-head mask) ->
    global mean and variance -> the main sweep. Backward: local Σ dA, Σ dA·Xhat -> all-reduce (2H
    numbers) -> the main backward sweep, whose norm backward then uses the means over every process's
    entries: dM = (τγ/σ)(dA - mean(dA) - Xhat mean(dA Xhat)). The norm's own parameter gradients are
    τ times this process's sums (each process's share; DDP adds them up), as SyncBatchNorm's.
    Returns (out, stats [3, H]: global mean, biased variance and count, for the running statistics).
    """

    @staticmethod
    def forward(ctx, group, options, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed):
        scale, out_scale, eps, dropout_p = options
        acc = accumulator_dtype(q)
        # The shift of X = P~ - kappa, exact in float32 and float64, so the kernel (acc_t) and
        # gram_batch_statistics (float64) subtract the same number.
        kappa = gram_shift(k.shape[2])
        softmax_stats, s1, gram, count = cpu_bn_gram(q, k, attn_mask, scale, dropout_p, seed, kappa)
        s1, gram, count = all_reduce_sum([s1, gram, count], group)
        mean, var, count = gram_batch_statistics(
            mix_weight.detach().to(acc), None if mix_bias is None else mix_bias.detach().to(acc), s1, gram, count,
            kappa)
        check_counts(count, " over all processes")
        stats = torch.stack([mean, var, count])
        out, softmax_stats, R, U, stats = cpu_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask,
                                                      scale, out_scale, NORM_CODES["batch"], eps, dropout_p, seed,
                                                      softmax_stats, stats)
        ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, R,
                              U, stats)
        ctx.group, ctx.options = group, options
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, R, U, stats = \
            ctx.saved_tensors
        scale, out_scale, eps, dropout_p = ctx.options
        own = cpu_bn_grad_sums(grad_out, R, U)
        (total,) = all_reduce_sum([own], ctx.group)  # every process runs this: a collective
        dq, dk, dv, dw, dc, _, _ = cpu_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                attn_mask, softmax_stats, R, U, stats, scale, out_scale,
                                                NORM_CODES["batch"], eps, dropout_p, seed, total)
        dnw = None if norm_weight is None else (out_scale * own[1]).to(norm_weight.dtype)
        dnb = None if norm_bias is None else (out_scale * own[0]).to(norm_bias.dtype)
        return (None, None, dq, dk, dv, dw, dc if mix_bias is not None else None, dnw, dnb, None, None)


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


def _seed_value(seed: Optional[Tensor]) -> int:
    """The kernel's seed from the ops' int64 seed tensor (None: no dropout)."""
    return 0 if seed is None else int(seed.reshape(-1)[0].item())


def re_attention_cpu(q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean,
                     running_var, training, momentum, eps, out_scale, dropout_p, attn_mask,
                     seed: Optional[Tensor] = None, sync_group=None) -> Tensor:
    """Validated arguments in, O [B, H, Nq, D] out (``reattn.re_attention`` with backend="cpu").

    sync_group: a process group over which training BatchNorm's statistics (and their gradients)
    are synchronized; ignored in other modes (``reattn.re_attention`` passes it only then).
    """
    if norm == "batch" and not training:  # eval mode: an affine map per head, folded into the mixing
        mix_weight, mix_bias = fold_batchnorm_eval(mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                                   running_var, eps, dtype=accumulator_dtype(q))
        norm, norm_weight, norm_bias = "none", None, None
    p = float(dropout_p) if training else 0.0
    # A tensor, not a Python int: drawing it needs no .item(), so torch.compile keeps dropout in its
    # graph; the ops read the value inside.
    seed = (draw_dropout_seed(_CPU) if seed is None else torch.as_tensor(seed, dtype=torch.int64).reshape(1)) \
        if p > 0.0 else None
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        # The reference adds the mask cast to q's dtype; the kernel reads it in its accumulation type.
        attn_mask = attn_mask.to(q.dtype).to(accumulator_dtype(q))
    if norm == "batch" and sync_group is not None:
        out, stats = _SyncedBatchNorm.apply(sync_group, (scale, out_scale, eps, p), q, k, v, mix_weight, mix_bias,
                                            norm_weight, norm_bias, attn_mask, seed)
    else:
        out, _, _, _, stats = cpu_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale,
                                          out_scale, NORM_CODES[norm], eps, p, seed)
    if norm == "batch" and running_mean is not None:  # the op has refused counts <= 1 (synced: _SyncedBatchNorm)
        update_running_stats(running_mean, running_var, stats[0], stats[1], stats[2], momentum)
    return out
