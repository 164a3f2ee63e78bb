"""What the GPU-style fused backends (Triton, CUDA C++) share: one ladder over two sets of kernels.

Layering (as flash-attention): raw kernels (``reattn.kernels`` / ``reattn._C``), described by a
:class:`FusedKernels` -> ``torch.library`` custom ops ``reattn::<name>_forward`` /
``reattn::<name>_backward`` with fake implementations (``torch.compile`` traces through them) ->
autograd registration -> :func:`run_fused`, called by ``reattn.re_attention`` only.

Training-mode BatchNorm is orchestrated here, identically for both backends: a statistics sweep
returns the per-head sums s1 = sum X and the Gram matrix G = sum X X^T of X = P~ - shift over the
unmasked entries (float64, no map written); ``reattn.distributed.gram_batch_statistics`` (the
formula of shared/design/reattention-math.md, also the cpu backend's) turns them into the batch
mean and variance of M = W P~ + c; the forward then normalizes with them, reading the logsumexp
the sweep wrote.

Saved for backward: q, k, v, the parameters, the mask and the dropout seed as given, the
logsumexp [B, H, Nq] and the [3, H] statistics (mean, variance, count); never a [B, H, Nq, Nk] map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from reattn.distributed import gram_batch_statistics


def accumulator_dtype(q: Tensor) -> torch.dtype:
    """dtype of the logsumexp and statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def gram_shift(n_keys: int) -> float:
    """The shift kappa of X = P~ - kappa: 1/Nk rounded to float32, exact in fp32 kernels and fp64 formulas.

    Without dropout or masks every row of P sums to 1, so s1 = 0 and the variance is a sum of
    squares rather than the difference of two nearly equal numbers (which fp32 would lose).
    """
    return torch.tensor(1.0 / n_keys, dtype=torch.float32).item()


def unmasked_count(attn_mask: Optional[Tensor], B: int, Nq: int, Nk: int) -> Tensor:
    """Number n of (b, i, j) entries BatchNorm averages over (0-dim float64 tensor on the mask's device).

    The mask must be the same for every head (bool masks always are; float masks must not have a
    head dimension > 1), because one n and one Gram matrix serve all heads.
    """
    if attn_mask is None:
        return torch.tensor(float(B * Nq * Nk), dtype=torch.float64)
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[1] != 1:
        raise ValueError("re_attention: training-mode BatchNorm in the fused kernels needs an attn_mask that is the "
                         f"same for every head (head dim 1), got shape {tuple(attn_mask.shape)}")
    kept = mask if mask.dtype == torch.bool else mask != float("-inf")
    return kept.expand(B, 1, Nq, Nk).sum(dtype=torch.float64)


def batch_stats_rows(stats: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """[2, H] (mean, 1/sqrt(var + eps)) in the kernels' dtype from the [3, H] statistics (mean, var, count)."""
    return torch.stack([stats[0], torch.rsqrt(stats[1] + eps)]).to(dtype).contiguous()


@dataclass(frozen=True)
class FusedKernels:
    """The raw (autograd-free) kernels of one fused backend.

    forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *,
            scale, out_scale, norm, eps, dropout_p) -> (out [B, H, Nq, D], lse [B, H, Nq])
        norm: "none" | "layer" | "batch" (normalize with batch_stats [2, H]: mean, 1/std); lse
        given = read instead of computed.
    gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift) -> (lse, s1 [H], gram [H, H] float64)
    backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, count, attn_mask,
             seed, lse, *, scale, out_scale, norm, eps, dropout_p)
        -> (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias); count: the number of
        entries the batch statistics average over (0-dim tensor; no host synchronization).
    """

    forward: Callable
    gram_sums: Callable
    backward: Callable


def define_fused_ops(name: str, kernels: FusedKernels, device_types: Tuple[str, ...]):
    """Register ``reattn::<name>_forward`` / ``reattn::<name>_backward`` over ``kernels``, with autograd.

    Returns ``(forward_op, backward_op)``. The forward op returns (out [B, H, Nq, D], logsumexp
    [B, H, Nq], statistics [3, H] float64: training BatchNorm's mean, biased variance and count, or
    zeros); the backward op returns every gradient, zeros for absent parameters (custom ops cannot
    return None; autograd drops them).
    """

    def forward(
        q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], scale: float, out_scale: float, norm: str, eps: float, dropout_p: float,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        kw = dict(scale=scale, out_scale=out_scale, eps=eps, dropout_p=dropout_p)
        stats = torch.zeros((3, H), dtype=torch.float64, device=q.device)
        if norm != "batch":
            out, lse = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, None, attn_mask, seed,
                                       None, norm=norm, **kw)
            return out, lse, stats
        count = unmasked_count(attn_mask, B, Nq, Nk).to(q.device)
        shift = gram_shift(Nk)
        lse, s1, gram = kernels.gram_sums(q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p, shift=shift)
        if attn_mask is not None and bool(count <= 1):  # without a mask, reattn._checks has ruled this out
            raise ValueError("re_attention: norm='batch' in training needs more than one unmasked value per head; "
                             f"unmasked count per head: {int(count)}")
        stats[0], stats[1], stats[2] = gram_batch_statistics(mix_weight, mix_bias, s1, gram, count, shift)
        out, lse = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                   batch_stats_rows(stats, eps, accumulator_dtype(q)), attn_mask, seed, lse,
                                   norm="batch", **kw)
        return out, lse, stats

    forward_op = torch.library.custom_op(f"reattn::{name}_forward", forward, mutates_args=(),
                                         device_types=device_types)

    @forward_op.register_fake
    def _(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps,
          dropout_p):
        B, H, Nq, _ = q.shape
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                q.new_empty((B, H, Nq), dtype=accumulator_dtype(q)), q.new_empty((3, H), dtype=torch.float64))

    def backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], lse: Tensor, stats: Tensor, scale: float, out_scale: float, norm: str, eps: float,
        dropout_p: float,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        batch = norm == "batch"
        dq, dk, dv, dw, dc, dnw, dnb = kernels.backward(
            grad_out.contiguous(), q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
            batch_stats_rows(stats, eps, accumulator_dtype(q)) if batch else None, stats[2, 0] if batch else None,
            attn_mask, seed, lse, scale=scale, out_scale=out_scale, norm=norm, eps=eps, dropout_p=dropout_p)
        H = q.shape[1]

        def like(grad, param):
            if param is None or grad is None:
                return q.new_zeros((H,), dtype=mix_weight.dtype)
            return grad.to(param.dtype)

        return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)

    backward_op = torch.library.custom_op(f"reattn::{name}_backward", backward, mutates_args=(),
                                          device_types=device_types)

    @backward_op.register_fake
    def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats, scale,
          out_scale, norm, eps, dropout_p):
        H = q.shape[1]

        def vec(param):
            return q.new_empty((H,), dtype=(param if param is not None else mix_weight).dtype)

        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix_weight),
                vec(mix_bias), vec(norm_weight), vec(norm_bias))

    def setup_context(ctx, inputs, output):
        (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps,
         dropout_p) = inputs
        _, lse, stats = output
        ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats)
        ctx.options = (scale, out_scale, norm, eps, dropout_p)

    def autograd_backward(ctx, grad_out, grad_lse, grad_stats):
        q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats = ctx.saved_tensors
        dq, dk, dv, dw, dc, dnw, dnb = backward_op(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   attn_mask, seed, lse, stats, *ctx.options)
        return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
                dnb if norm_bias is not None else None, None, None, None, None, None, None, None)

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op, backward_op


def draw_dropout_seed(device: torch.device) -> Tensor:
    """The int64 seed [1] one dropout call uses: drawn from torch's generator for ``device``.

    ``torch.manual_seed`` therefore makes fused dropout reproducible; the Triton and CUDA kernels
    draw the same keep-mask from it (Triton's Philox, keyed by (seed, b, h, i, j)), which
    ``reattn.kernels.dropout.dropout_keep_mask(seed, (B, H, Nq, Nk), p)`` materializes.
    """
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def run_fused(forward_op, q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean,
              running_var, training, momentum, eps, out_scale, dropout_p, attn_mask) -> Tensor:
    """Validated arguments in, O [B, H, Nq, D] out, through ``forward_op`` from :func:`define_fused_ops`.

    Eval-mode BatchNorm is folded into the mixing (its gradients flow through the fold, in
    autograd); training-mode BatchNorm updates ``running_mean``/``running_var`` in place (unbiased
    variance, ``momentum``), exactly as ``nn.BatchNorm2d``.
    """
    batch_training = norm == "batch" and training
    if norm == "batch" and not batch_training:  # eval mode: an affine map per head, folded into the mixing
        from reattn.functional import fold_batchnorm_eval

        mix_weight, mix_bias = fold_batchnorm_eval(mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                                   running_var, eps)
        norm, norm_weight, norm_bias = "none", None, None
    if not (training and dropout_p > 0.0):
        dropout_p, seed = 0.0, None
    else:
        seed = draw_dropout_seed(q.device)
    out, _, stats = forward_op(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale,
                               out_scale, norm, eps, dropout_p)
    if batch_training and running_mean is not None:
        with torch.no_grad():
            mean, var, count = stats[0], stats[1], stats[2]
            running_mean.mul_(1.0 - momentum).add_((mean * momentum).to(running_mean.dtype))
            running_var.mul_(1.0 - momentum).add_((var * (count / (count - 1)) * momentum).to(running_var.dtype))
    return out
