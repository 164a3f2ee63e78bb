"""What the GPU-style fused backends (Triton, CUDA C++) share: one ladder over two sets of kernels.

Layering (as flash-attention): raw kernels (``reattn.kernels`` / ``reattn._C``), described by a
:class:`FusedKernels` -> ``torch.library`` custom ops ``reattn::<name>_forward`` /
``reattn::<name>_backward`` with fake implementations (``torch.compile`` traces through them) ->
autograd registration -> :func:`run_fused`, called by ``reattn.re_attention`` only.

Training-mode BatchNorm is orchestrated here. Locally, both backends run it in one sweep over the
keys (their kernels' ``forward_moments``; :func:`one_sweep_batchnorm`: the norm is applied after
the product by V). When the statistics are synchronized across processes (or for a backend without
``forward_moments``): a statistics sweep returns the per-head sums s1 = sum X and the Gram matrix
G = sum X X^T of X = P~ - shift over the unmasked entries (float64, no map written);
``reattn._batchnorm.gram_batch_statistics`` (docs/math.md, "BatchNorm statistics through the Gram
matrix"; also the cpu backend's) turns them into the batch mean and variance of M = W P~ + c; the
forward then normalizes with them, reading the logsumexp the sweep wrote. The backward likewise first sums dN xhat and dN per head (the backward-sums
sweep), then runs the main sweeps with dM = a dN + e xhat + f (:func:`backward_rows`).

Both sets of sums add up over processes, so BatchNorm synchronized across processes
(``sync_group``, ``nn.SyncBatchNorm`` semantics) is the same steps with an all-reduce between
them: H² + H + 1 numbers in the forward, 2H in the backward, never an Nq x Nk map. Custom ops
cannot take a process group, so the statistics and backward-sums sweeps are ops of their own
(``reattn::<name>_gram_sums`` / ``_bn_grad_sums``), the forward and backward ops accept the
global statistics / sums, and a ``torch.autograd.Function`` (``FusedOps.synced``) runs the steps
with the collectives between them, as the cpu backend's ``_SyncedBatchNorm`` does.

Saved for backward: q, k, v, the parameters, the mask and the dropout seed as given, the
logsumexp [B, H, Nq] and the [3, H] statistics (mean, variance, count); never a [B, H, Nq, Nk] map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from reattn._batchnorm import (accumulator_dtype, check_counts, fold_batchnorm_eval, gram_batch_statistics,
                               gram_shift, kept_entries, unmasked_count, update_running_stats)
from reattn._collectives import all_reduce_sum
from reattn._ops import define_op, register_autograd, register_fake


def batch_stats_rows(stats: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """[2, H] (mean, 1/sqrt(var + eps)) in the kernels' dtype from the [3, H] statistics (mean, var, count)."""
    return torch.stack([stats[0], torch.rsqrt(stats[1] + eps)]).to(dtype).contiguous()


def backward_rows(stats: Tensor, eps: float, norm_weight: Optional[Tensor], bn_sums: Tensor,
                  dtype: torch.dtype) -> Tensor:
    """[4, H] (mean, 1/std, e, f) in the kernels' dtype: what the training BatchNorm backward normalizes with.

    dM = a dN + e xhat + f with a = gamma / std, e = -a mean(dN xhat), f = -a mean(dN), the means
    over the entries the statistics ran over: ``bn_sums`` [2, H] (sum dN xhat, sum dN) and the
    count ``stats[2]`` must cover the same entries (this process's, or every process's summed).
    1/std is the forward's, rounded to ``dtype`` as the forward read it.
    """
    rows = batch_stats_rows(stats, eps, dtype).to(torch.float64)
    a = rows[1] if norm_weight is None else rows[1] * norm_weight.to(torch.float64)
    sums = bn_sums.to(torch.float64)
    e, f = -a * sums[0] / stats[2], -a * sums[1] / stats[2]
    return torch.cat([rows, e[None], f[None]]).to(dtype).contiguous()


def one_sweep_batchnorm(forward_moments: Callable, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor,
                        mix_bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                        attn_mask: Optional[Tensor], seed: Optional[Tensor], count: Tensor, *, scale: float,
                        out_scale: float, eps: float, dropout_p: float,
                        head_affine: Optional[Callable] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Training BatchNorm's forward with one sweep over the keys: (out, lse, stats [3, H] float64).

    The norm is a per-head affine map applied once the statistics are known, so it commutes with the
    product by V. With X = W P~ - shift (shift_g = sum_h W[g, h] / Nk, the mean of (W P)_g without mask
    or dropout, so X is centred and its sums cancel little), the kernel computes R' = X V (masked
    entries 0) and the sums of X and X^2; then mean(M) = mean(X) + shift + c, var(M) = var(X),
    R = Xhat V = rstd (R' - mean(X) U) with U = 1_unmasked V, and O = out_scale (gamma R + beta U):
    element-wise work on [B, H, Nq, D], no second sweep (the cpu kernel does the same).
    count: the entries per head (0-dim float64), as ``unmasked_count``. head_affine: the backend's
    fused finish (``FusedKernels.head_affine``), else torch's in-place passes.
    """
    acc = accumulator_dtype(q)
    Nk = k.shape[2]
    shift = mix_weight.detach().to(acc).sum(dim=1) / Nk
    r, lse, moments = forward_moments(q, k, v, mix_weight, -shift, attn_mask, seed, scale=scale, dropout_p=dropout_p)
    sums = moments.sum(dim=0, dtype=torch.float64)  # [2, H]
    mean_x = sums[0] / count
    var = (sums[1] / count - mean_x * mean_x).clamp_min(0.0)
    mean = mean_x + shift.to(torch.float64)
    if mix_bias is not None:
        mean = mean + mix_bias.detach().to(torch.float64)
    stats = torch.stack([mean, var, count.expand_as(mean).to(torch.float64)])
    if attn_mask is None:
        u = v.sum(dim=2, keepdim=True, dtype=acc)  # [B, H, 1, D]: every row sees every key
    else:
        keep = kept_entries(attn_mask)
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        u = torch.matmul(keep.to(acc), v.to(acc))  # [B or 1, H or 1, Nq or 1, D]: the mask's own size, at most
    rstd = torch.rsqrt(var + eps).to(acc)
    a = torch.full_like(rstd, out_scale) if norm_weight is None else out_scale * norm_weight.detach().to(acc)
    # O = alpha R' + beta U with alpha = rstd tau gamma, beta = tau beta_norm - mean(X) alpha (per head)
    alpha = rstd * a
    beta = -mean_x.to(acc) * alpha
    if norm_bias is not None:
        beta = beta + out_scale * norm_bias.detach().to(acc)
    if head_affine is not None:
        return head_affine(r, u, alpha, beta, q.dtype), lse, stats
    # In place on r (this function's own buffer): one [B, H, Nq, D] accumulation-dtype tensor at a time.
    out = r.mul_(alpha[None, :, None, None]).add_(beta[None, :, None, None] * u)
    return out.to(q.dtype), lse, stats


def eager_double_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor,
                          mix_bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                          attn_mask: Optional[Tensor], dropout_mask: Optional[Tensor], grad_grads: Tuple, *,
                          backend: str, scale: float, out_scale: float, norm: str, eps: float, dropout_p: float,
                          synced: bool) -> Tuple[Optional[Tensor], ...]:
    """The derivative of a fused backward op (double backward: ``create_graph=True``, gradient penalties, MAML).

    The fused backward kernels are not differentiable as such; their derivative is recomputed through the
    eager math (``reattn.reference``) on the same inputs, with the fused dropout pattern replayed
    (``dropout_mask``). Cost: one eager forward and two eager backwards, with the [B, H, Nq, Nk] maps
    materialized, as ``backend="eager"``; only when a graph of the gradients is asked for.
    norm: "none", "layer" or "batch" (training: eval BatchNorm reaches the ops folded into the mixing).
    grad_grads: the cotangents of the backward op's outputs (dq, dk, dv, d mix_weight, d mix_bias,
    d norm_weight, d norm_bias). Returns the gradients w.r.t. (grad_out, q, k, v, mix_weight, mix_bias,
    norm_weight, norm_bias); connected to their graphs when the caller builds one (third order).
    """
    if synced:
        raise RuntimeError(f"re_attention(..., backend={backend!r}, sync_group=...): double backward "
                           "(create_graph=True) through training BatchNorm synchronized across processes is not "
                           "supported; use backend='eager' for higher-order gradients")
    from reattn.reference import re_attention_ref

    inputs = (grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias)
    with torch.enable_grad():
        # Inputs already in a graph stay in it (higher orders reach them); the others become leaves.
        xs = [None if t is None else t if t.requires_grad else t.detach().requires_grad_(True) for t in inputs]
        out = re_attention_ref(*xs[1:6], scale=scale, norm=norm, norm_weight=xs[6], norm_bias=xs[7],
                               training=norm == "batch" or dropout_p > 0, eps=eps, out_scale=out_scale,
                               dropout_p=dropout_p, attn_mask=attn_mask, dropout_mask=dropout_mask)
        wrt = [(x, gg) for x, gg in zip(xs[1:], grad_grads) if x is not None]
        first = torch.autograd.grad(out, [x for x, _ in wrt], xs[0], create_graph=True, allow_unused=True)
        pairs = [(f, gg) for f, (_, gg) in zip(first, wrt) if f is not None and gg is not None]
        present = [x for x in xs if x is not None]
        if not pairs:
            return tuple(None for _ in inputs)
        grads = iter(torch.autograd.grad([f for f, _ in pairs], present, [gg.to(f.dtype) for f, gg in pairs],
                                         allow_unused=True, create_graph=torch.is_grad_enabled()))
    return tuple(None if x is None else next(grads) for x in xs)


@dataclass(frozen=True)
class FusedKernels:
    """The raw (autograd-free) kernels of one fused backend.

    forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *,
            scale, out_scale, norm, eps, dropout_p) -> (out [B, H, Nq, D], lse [B, H, Nq])
        norm: "none" | "layer" | "batch" (normalize with batch_stats [2, H]: mean, 1/std); lse
        given = read instead of computed.
    gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift) -> (lse, s1 [H], gram [H, H] float64)
    backward_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed,
                  lse, *, scale, out_scale, eps, dropout_p) -> [2, H] (sum dN xhat, sum dN)
        training BatchNorm's backward sums over this call's entries (batch_stats [2, H] as the
        forward's); they are also d_norm_weight and d_norm_bias, and add up over processes.
    backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *,
             scale, out_scale, norm, eps, dropout_p)
        -> (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias); norm "batch":
        batch_stats [4, H] from :func:`backward_rows` (the norm's own gradients are the sums, so
        the backward's d_norm_weight, d_norm_bias are not read then).
    forward_moments(q, k, v, mix_weight, mix_bias, attn_mask, seed, *, scale, dropout_p)
        -> (r [B, H, Nq, D] in the accumulation dtype, lse, moments [programs, 2, H]): optional, the
        norm-less forward O = X V of X = W P~ + mix_bias (masked entries 0) with per-program sums
        of X and X^2 over the unmasked entries; with it, local training BatchNorm runs in one
        sweep over the keys (:func:`one_sweep_batchnorm`) instead of the statistics sweep + forward.
    softmax_stats_shape(q) -> shape: what the forward saves per score row for the backward (its
        ``lse``): one logsumexp [B, H, Nq], or the row max and log-sum, e.g. [2, B, H, Nq]; each
        backend reads only its own.
    head_affine(r, u, alpha [H], beta [H], dtype) -> (alpha_h r + beta_h u).to(dtype): optional, the
        one-sweep BatchNorm's finish in one pass (else four torch passes over [B, H, Nq, D]).
    """

    forward: Callable
    gram_sums: Callable
    backward_sums: Callable
    backward: Callable
    forward_moments: Optional[Callable] = None
    softmax_stats_shape: Callable = lambda q: (q.shape[0], q.shape[1], q.shape[2])
    head_affine: Optional[Callable] = None


@dataclass(frozen=True)
class FusedOps:
    """The ``torch.library`` custom ops of one fused backend and its synchronized BatchNorm.

    forward: ``reattn::<name>_forward``, differentiable (autograd registered) unless given statistics.
    backward: ``reattn::<name>_backward``.
    gram_sums: ``reattn::<name>_gram_sums`` (the statistics sweep as sums that add up over processes).
    bn_grad_sums: ``reattn::<name>_bn_grad_sums`` (the backward's 2H sums, idem).
    synced: a ``torch.autograd.Function`` running training BatchNorm over a process group with
    these ops (``nn.SyncBatchNorm`` semantics); see :func:`run_fused`.
    python: the Python bodies of forward and backward, called below the dispatcher (the static
    model runs them on meta tensors to capture the kernels' launches).
    """

    forward: Any
    backward: Any
    gram_sums: Any
    bn_grad_sums: Any
    synced: Any
    python: Any = None


def define_fused_ops(name: str, kernels: FusedKernels, device_types: Tuple[str, ...]) -> FusedOps:
    """Register ``reattn::<name>_forward`` / ``_backward`` / ``_gram_sums`` / ``_bn_grad_sums`` over ``kernels``.

    The forward op returns (out [B, H, Nq, D], logsumexp [B, H, Nq], statistics [3, H] float64:
    training BatchNorm's mean, biased variance and count, or zeros); the backward op returns every
    gradient, zeros for absent parameters (custom ops cannot return None; autograd drops them).
    Training BatchNorm synchronized across processes runs the four ops in steps with all-reduces
    between them (custom ops cannot take a process group): ``FusedOps.synced``.
    """

    def forward(
        q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], scale: float, out_scale: float, norm: str, eps: float, dropout_p: float,
        lse_in: Optional[Tensor] = None, stats_in: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """lse_in (row statistics), stats_in [3, H] (norm "batch", both or neither): normalize with these
        statistics (of the batch over every process, from the gram_sums op) instead of computing
        them; lse and stats come back as copies."""
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        kw = dict(scale=scale, out_scale=out_scale, eps=eps, dropout_p=dropout_p)
        if (lse_in is None) != (stats_in is None) or (stats_in is not None and norm != "batch"):
            raise ValueError(f"reattn::{name}_forward: lse_in and stats_in go together, with norm='batch' only")
        if stats_in is not None:
            out, _ = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                     batch_stats_rows(stats_in, eps, accumulator_dtype(q)), attn_mask, seed, lse_in,
                                     norm="batch", **kw)
            return out, lse_in.clone(), stats_in.clone()
        stats = torch.zeros((3, H), dtype=torch.float64, device=q.device)
        if norm != "batch":
            out, lse = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, None, attn_mask, seed,
                                       None, norm=norm, **kw)
            return out, lse, stats
        count = unmasked_count(attn_mask, B, Nq, Nk).to(q.device)
        if kernels.forward_moments is not None:
            if attn_mask is not None:  # without a mask, reattn._checks has ruled this out
                check_counts(count)
            return one_sweep_batchnorm(kernels.forward_moments, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                       attn_mask, seed, count, head_affine=kernels.head_affine, **kw)
        shift = gram_shift(Nk)
        lse, s1, gram = kernels.gram_sums(q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p, shift=shift)
        if attn_mask is not None:  # without a mask, reattn._checks has ruled this out
            check_counts(count)
        stats[0], stats[1], stats[2] = gram_batch_statistics(mix_weight, mix_bias, s1, gram, count, shift)
        out, lse = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                   batch_stats_rows(stats, eps, accumulator_dtype(q)), attn_mask, seed, lse,
                                   norm="batch", **kw)
        return out, lse, stats

    forward_op = define_op(f"{name}_forward", forward, device_types)

    @register_fake(forward_op)
    def _(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps,
          dropout_p, lse_in=None, stats_in=None):
        H = q.shape[1]
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty(kernels.softmax_stats_shape(q), dtype=accumulator_dtype(q)),
                q.new_empty((3, H), dtype=torch.float64))

    def gram_sums(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float,
                  dropout_p: float, shift: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(lse (softmax statistics, FusedKernels.softmax_stats_shape), s1 [H], gram [H, H] float64): sums of X = P~ - shift over
        the unmasked entries."""
        return kernels.gram_sums(q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p, shift=shift)

    gram_sums_op = define_op(f"{name}_gram_sums", gram_sums, device_types)

    @register_fake(gram_sums_op)
    def _(q, k, attn_mask, seed, scale, dropout_p, shift):
        B, H, Nq, _ = q.shape
        return (q.new_empty(kernels.softmax_stats_shape(q), dtype=accumulator_dtype(q)),
                q.new_empty((H,), dtype=torch.float64), q.new_empty((H, H), dtype=torch.float64))

    def bn_grad_sums(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], lse: Tensor, stats: Tensor, scale: float, out_scale: float, eps: float,
        dropout_p: float,
    ) -> Tensor:
        """[2, H] float64: sum dN xhat and sum dN per head over this call's entries (training BatchNorm)."""
        sums = kernels.backward_sums(grad_out.contiguous(), q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                     batch_stats_rows(stats, eps, accumulator_dtype(q)), attn_mask, seed, lse,
                                     scale=scale, out_scale=out_scale, eps=eps, dropout_p=dropout_p)
        return sums.to(torch.float64)

    bn_grad_sums_op = define_op(f"{name}_bn_grad_sums", bn_grad_sums, device_types)

    @register_fake(bn_grad_sums_op)
    def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats, scale,
          out_scale, eps, dropout_p):
        return q.new_empty((2, q.shape[1]), dtype=torch.float64)

    def backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], lse: Tensor, stats: Tensor, scale: float, out_scale: float, norm: str, eps: float,
        dropout_p: float, bn_sums: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """bn_sums (norm "batch"): the bn_grad_sums op's sums of every process, added up, with stats
        the statistics of every process's entries; the norm's gradients then come back zero (the
        caller has them: its own sums). Without them this call's entries are the whole batch."""
        grad_out = grad_out.contiguous()
        acc = accumulator_dtype(q)
        kw = dict(scale=scale, out_scale=out_scale, eps=eps, dropout_p=dropout_p)
        rows, own = None, None
        if norm == "batch":
            if bn_sums is None:
                own = bn_sums = bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                             attn_mask, seed, lse, stats, **kw)
            rows = backward_rows(stats, eps, norm_weight, bn_sums, acc)
        elif bn_sums is not None:
            raise ValueError(f"reattn::{name}_backward: bn_sums belong to norm='batch', got norm={norm!r}")
        dq, dk, dv, dw, dc, dnw, dnb = kernels.backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight,
                                                        norm_bias, rows, attn_mask, seed, lse, norm=norm, **kw)
        if norm == "batch":
            # Copies: rows of one tensor would alias each other, which custom op outputs may not.
            dnw, dnb = (None, None) if own is None else (own[0].clone(), own[1].clone())
        H = q.shape[1]

        def like(grad, param):
            if param is None or grad is None:
                return q.new_zeros((H,), dtype=(param if param is not None else mix_weight).dtype)
            return grad.to(param.dtype)

        return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)

    backward_op = define_op(f"{name}_backward", backward, device_types)

    @register_fake(backward_op)
    def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats, scale,
          out_scale, norm, eps, dropout_p, bn_sums=None):
        H = q.shape[1]

        def vec(param):
            return q.new_empty((H,), dtype=(param if param is not None else mix_weight).dtype)

        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix_weight),
                vec(mix_bias), vec(norm_weight), vec(norm_bias))

    def setup_context(ctx, inputs, output):
        (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps,
         dropout_p, lse_in, stats_in) = inputs
        _, lse, stats = output
        ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats)
        ctx.options = (scale, out_scale, norm, eps, dropout_p)
        ctx.given_stats = stats_in is not None

    def autograd_backward(ctx, grad_out, grad_lse, grad_stats):
        if ctx.given_stats:
            # Given statistics stand for a batch spread over processes: their gradient terms need the
            # backward sums of every process, which only FusedOps.synced (holding the group) gathers.
            raise RuntimeError(f"reattn::{name}_forward with lse_in/stats_in is differentiated through "
                               f"re_attention(..., backend={name!r}, sync_group=...), not on its own")
        q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats = ctx.saved_tensors
        dq, dk, dv, dw, dc, dnw, dnb = backward_op(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   attn_mask, seed, lse, stats, *ctx.options)
        return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
                dnb if norm_bias is not None else None, None, None, None, None, None, None, None, None, None)

    register_autograd(forward_op, autograd_backward, setup_context=setup_context)

    def backward_setup_context(ctx, inputs, output):
        (grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats, scale,
         out_scale, norm, eps, dropout_p, bn_sums) = inputs
        ctx.save_for_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed)
        ctx.options = dict(scale=scale, out_scale=out_scale, norm=norm, eps=eps, dropout_p=dropout_p)
        ctx.synced = bn_sums is not None

    def double_backward(ctx, *grad_grads):
        grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed = ctx.saved_tensors
        keep = None
        if seed is not None:  # the kernels' dropout pattern (Triton's Philox stream, which cuda draws too)
            from reattn.kernels.dropout import dropout_keep_mask

            keep = dropout_keep_mask(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), ctx.options["dropout_p"])
        grads = eager_double_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, keep,
                                      grad_grads, backend=name, synced=ctx.synced, **ctx.options)
        return grads + (None,) * 10

    register_autograd(backward_op, double_backward, setup_context=backward_setup_context)
    synced = _synced_batchnorm(name, forward_op, backward_op, gram_sums_op, bn_grad_sums_op)
    return FusedOps(forward=forward_op, backward=backward_op, gram_sums=gram_sums_op, bn_grad_sums=bn_grad_sums_op,
                    synced=synced, python=dict(forward=forward, backward=backward))


def _synced_batchnorm(name, forward_op, backward_op, gram_sums_op, bn_grad_sums_op):
    """The ``torch.autograd.Function`` of training BatchNorm over a process group, for one backend's ops.

    Forward: this process's Gram sums (s1 [H], gram [H, H], count: H² + H + 1 float64 numbers) ->
    all-reduce -> global mean and variance (``gram_batch_statistics``) -> the forward op with those
    statistics and the sweep's logsumexp. Backward: this process's sum dN xhat, sum dN (2H numbers)
    -> all-reduce -> the backward op with the global sums and count, whose dM then uses the means
    over every process's entries. The norm's own gradients are this process's sums (its share;
    DDP adds them up), as ``nn.SyncBatchNorm``'s. ``apply(group, (scale, out_scale, eps,
    dropout_p), q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed)`` returns
    (out [B, H, Nq, D], stats [3, H]: global mean, biased variance and count, for the running stats).
    Every process of the group must run the forward and the backward (collectives on both sides).
    """

    class SyncedBatchNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, group, options, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed):
            scale, out_scale, eps, dropout_p = options
            B, _, Nq, _ = q.shape
            Nk = k.shape[2]
            shift = gram_shift(Nk)
            count = unmasked_count(attn_mask, B, Nq, Nk).to(q.device)
            lse, s1, gram = gram_sums_op(q, k, attn_mask, seed, scale, dropout_p, shift)
            s1, gram, count = all_reduce_sum([s1, gram, count], group)
            # After the all-reduce every process sees the same count: all refuse alike, and none is
            # left waiting in a collective the others skipped.
            check_counts(count, " over all processes")
            mean, var, n = gram_batch_statistics(mix_weight, mix_bias, s1, gram, count, shift)
            stats = torch.stack([mean, var, n])
            out, lse, stats = forward_op(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale,
                                         out_scale, "batch", eps, dropout_p, lse, stats)
            ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats)
            ctx.group, ctx.options = group, options
            ctx.mark_non_differentiable(stats)
            return out, stats

        @staticmethod
        def backward(ctx, grad_out, grad_stats):
            q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats = ctx.saved_tensors
            scale, out_scale, eps, dropout_p = ctx.options
            own = bn_grad_sums_op(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                                  lse, stats, scale, out_scale, eps, dropout_p)
            (total,) = all_reduce_sum([own], ctx.group)  # every process runs this: a collective
            dq, dk, dv, dw, dc, _, _ = backward_op(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   attn_mask, seed, lse, stats, scale, out_scale, "batch", eps,
                                                   dropout_p, total)
            dnw = None if norm_weight is None else own[0].to(norm_weight.dtype)
            dnb = None if norm_bias is None else own[1].to(norm_bias.dtype)
            return (None, None, dq, dk, dv, dw, dc if mix_bias is not None else None, dnw, dnb, None, None)

    SyncedBatchNorm.__name__ = SyncedBatchNorm.__qualname__ = f"{name.capitalize()}SyncedBatchNorm"
    return SyncedBatchNorm


def draw_dropout_seed(device: torch.device) -> Tensor:
    """The int64 seed [1] one dropout call uses: drawn from torch's generator for ``device``.

    ``torch.manual_seed`` therefore makes fused dropout reproducible; the Triton and CUDA kernels
    draw the same keep-mask from it (Triton's Philox, keyed by (seed, b, h, i, j)), which
    ``reattn.kernels.dropout.dropout_keep_mask(seed, (B, H, Nq, Nk), p)`` materializes.
    """
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def run_fused(ops: FusedOps, q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean,
              running_var, training, momentum, eps, out_scale, dropout_p, attn_mask, sync_group=None) -> Tensor:
    """Validated arguments in, O [B, H, Nq, D] out, through the ops from :func:`define_fused_ops`.

    Eval-mode BatchNorm is folded into the mixing (its gradients flow through the fold, in
    autograd); training-mode BatchNorm updates ``running_mean``/``running_var`` in place (unbiased
    variance, ``momentum``), exactly as ``nn.BatchNorm2d``. sync_group: a process group over which
    training BatchNorm's statistics (and their gradients) are synchronized (``ops.synced``);
    ignored in other modes (``reattn.re_attention`` passes it only then).
    """
    batch_training = norm == "batch" and training
    if norm == "batch" and not batch_training:  # eval mode: an affine map per head, folded into the mixing
        mix_weight, mix_bias = fold_batchnorm_eval(mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                                   running_var, eps, dtype=accumulator_dtype(q))
        norm, norm_weight, norm_bias = "none", None, None
    if not (training and dropout_p > 0.0):
        dropout_p, seed = 0.0, None
    else:
        seed = draw_dropout_seed(q.device)
    if batch_training and sync_group is not None:
        out, stats = ops.synced.apply(sync_group, (scale, out_scale, eps, dropout_p), q, k, v, mix_weight, mix_bias,
                                      norm_weight, norm_bias, attn_mask, seed)
    else:
        out, _, stats = ops.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale,
                                    out_scale, norm, eps, dropout_p)
    if batch_training and running_mean is not None:
        update_running_stats(running_mean, running_var, stats[0], stats[1], stats[2], momentum)
    return out
