"""Triton backend: ``torch.library`` custom ops over ``reattn.kernels`` with autograd.

Layering (as flash-attention): raw kernels (``reattn.kernels``) -> custom ops with fake
implementations (so ``torch.compile`` traces through them without graph breaks) -> autograd
registration -> ``re_attention_triton``, called by ``reattn.re_attention`` only.

Saved for backward: q, k, v, the mixing / norm parameters, the mask and dropout seed as given,
the logsumexp [B, H, Nq] and, for training-mode BatchNorm, the [3, H] batch statistics (mean,
variance, count); never a [B, H, Nq, Nk] map. Eval-mode BatchNorm arrives already folded into
the mixing (so its gradients flow through the fold, in autograd). Dropout draws one int64 seed
from torch's generator on the tensors' device per call; forward and backward regenerate the
same pattern from it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from reattn.kernels.backward import re_attention_backward
from reattn.kernels.bn_stats import batch_statistics
from reattn.kernels.forward import accumulator_dtype, re_attention_forward

_KERNEL_NORMS = ("none", "layer", "batch")  # "batch" here = training mode (batch statistics)


def _batch_stats_rows(stats: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """[2, H] (mean, 1/sqrt(var + eps)) in the kernels' dtype from the saved [3, H] statistics."""
    return torch.stack([stats[0], torch.rsqrt(stats[1] + eps)]).to(dtype).contiguous()


@torch.library.custom_op("reattn::triton_forward", mutates_args=(), device_types=("cuda", "cpu"))
def triton_forward(
    q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float, out_scale: float,
    norm: str, eps: float, dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused forward: (out [B, H, Nq, D], logsumexp [B, H, Nq], batch statistics [3, H] float64).

    norm="batch" means training-mode BatchNorm: statistics from the Gram sweep (rows: mean,
    biased variance, count n repeated); for other norms the statistics are zeros.
    """
    H = q.shape[1]
    kw = dict(scale=scale, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed)
    stats = torch.zeros((3, H), dtype=torch.float64, device=q.device)
    if norm != "batch":
        out, lse = re_attention_forward(q, k, v, mix_weight, mix_bias, out_scale=out_scale, norm=norm,
                                        norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, **kw)
        return out, lse, stats
    mean, var, count, lse = batch_statistics(q, k, mix_weight, mix_bias, **kw)
    if attn_mask is not None and bool(count <= 1):  # without a mask, reattn._checks has ruled this out
        raise ValueError("re_attention: norm='batch' in training needs more than one unmasked value per head; "
                         f"unmasked count per head: {int(count)}")
    stats[0], stats[1], stats[2] = mean, var, count
    out, lse = re_attention_forward(q, k, v, mix_weight, mix_bias, out_scale=out_scale, norm="batch",
                                    norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
                                    batch_stats=_batch_stats_rows(stats, eps, accumulator_dtype(q)), lse=lse,
                                    lse_is_input=True, **kw)
    return out, lse, stats


@triton_forward.register_fake
def _(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps, dropout_p):
    B, H, Nq, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, H, Nq), dtype=accumulator_dtype(q)), q.new_empty((3, H), dtype=torch.float64))


@torch.library.custom_op("reattn::triton_backward", mutates_args=(), device_types=("cuda", "cpu"))
def triton_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor], seed: Optional[Tensor],
    lse: Tensor, stats: Tensor, scale: float, out_scale: float, norm: str, eps: float, dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias).

    Parameter gradients come back in the parameters' dtypes; those of absent parameters are
    zeros (custom ops cannot return None) and are dropped by the autograd formula.
    """
    batch = norm == "batch"
    dq, dk, dv, dw, dc, dnw, dnb = re_attention_backward(
        grad_out.contiguous(), q, k, v, mix_weight, mix_bias, lse, scale=scale, out_scale=out_scale, norm=norm,
        norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
        batch_stats=_batch_stats_rows(stats, eps, accumulator_dtype(q)) if batch else None,
        count=stats[2, 0] if batch else None)
    H = q.shape[1]

    def like(grad, param):
        if param is None:
            return q.new_zeros((H,), dtype=mix_weight.dtype)
        return grad.to(param.dtype)

    return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)


@triton_backward.register_fake
def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats, scale, out_scale,
      norm, eps, dropout_p):
    H = q.shape[1]

    def vec(param):
        return q.new_empty((H,), dtype=(param if param is not None else mix_weight).dtype)

    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix_weight),
            vec(mix_bias), vec(norm_weight), vec(norm_bias))


def _setup_context(ctx, inputs, output):
    q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps, dropout_p = inputs
    _, lse, stats = output
    ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats)
    ctx.options = (scale, out_scale, norm, eps, dropout_p)


def _backward(ctx, grad_out, grad_lse, grad_stats):
    q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, lse, stats = ctx.saved_tensors
    dq, dk, dv, dw, dc, dnw, dnb = triton_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   attn_mask, seed, lse, stats, *ctx.options)
    return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
            dnb if norm_bias is not None else None, None, None, None, None, None, None, None)


triton_forward.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed(device: torch.device) -> Tensor:
    """The int64 seed [1] one dropout call uses: drawn from torch's generator for ``device``.

    ``torch.manual_seed`` therefore makes fused dropout reproducible; with the seed, the pattern
    is ``reattn.kernels.dropout.dropout_keep_mask(seed, (B, H, Nq, Nk), p)``.
    """
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def re_attention_triton(q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean,
                        running_var, training, momentum, eps, out_scale, dropout_p, attn_mask) -> Tensor:
    """Validated arguments in, O [B, H, Nq, D] out. Modes refused by ``reattn.backends`` never get here.

    Training-mode BatchNorm updates ``running_mean``/``running_var`` in place (unbiased variance,
    ``momentum``), exactly as ``nn.BatchNorm2d``.
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
    out, _, stats = triton_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale,
                                   out_scale, norm, eps, dropout_p)
    if batch_training and running_mean is not None:
        with torch.no_grad():
            mean, var, count = stats[0], stats[1], stats[2]
            running_mean.mul_(1.0 - momentum).add_((mean * momentum).to(running_mean.dtype))
            running_var.mul_(1.0 - momentum).add_((var * (count / (count - 1)) * momentum).to(running_var.dtype))
    return out
