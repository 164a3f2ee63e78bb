"""CPU backend: ``torch.library`` custom ops over the fused C++ kernel in ``reattn._C`` with autograd.

Layering (as the Triton backend): C++ kernels (``csrc/cpu/re_attention.cpp``) -> custom ops with
fake implementations (``torch.compile`` traces through them) -> autograd registration ->
``re_attention_cpu``, called by ``reattn.re_attention`` only.

Every mode: norm none / BatchNorm eval (folded into the mixing here, so its gradients flow through
the fold in autograd) / BatchNorm train (batch statistics in the kernel; the running statistics are
updated here, in place, like ``nn.BatchNorm2d``) / LayerNorm across heads; masks; dropout with a
counter-based RNG keyed by (seed, b, h, i, j), the seed drawn from torch's CPU generator, so backward
replays it and ``dropout_keep_mask`` shows it.

Saved for backward: q, k, v, the parameters, the mask, the logsumexp [B, H, Nq] and, for training
BatchNorm, R = Xhat V and U = 1_unmasked V ([B, H, Nq, D]) and the [3, H] statistics; never a
[B, H, Nq, Nk] map.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from reattn._extension import _C

NORM_CODES = {"none": 0, "layer": 1, "batch": 2}  # "batch" reaches the kernel only in training


def _acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("reattn::cpu_forward", mutates_args=(), device_types="cpu")
def cpu_forward(
    q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, out_scale: float, norm: int, eps: float,
    dropout_p: float, seed: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused forward: (out [B, H, Nq, D], lse [B, H, Nq], R, U, stats [3, H] float64).

    R, U are [B, H, Nq, D] for norm code 2 (training BatchNorm) and empty otherwise; stats holds
    the batch mean, biased variance and unmasked count per head (zeros unless norm code 2).
    """
    out, lse, R, U, stats = _C.re_attention_cpu_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                        attn_mask, scale, out_scale, norm, eps, dropout_p, seed)
    return out, lse, R, U, stats


@cpu_forward.register_fake
def _(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale, out_scale, norm, eps, dropout_p,
      seed):
    B, H, Nq, D = q.shape
    acc = _acc_dtype(q)
    saved = (B if norm == 2 else 0, H, Nq, D)
    return (q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=acc), q.new_empty(saved, dtype=acc),
            q.new_empty(saved, dtype=acc), q.new_empty((3, H), dtype=torch.float64))


@torch.library.custom_op("reattn::cpu_backward", mutates_args=(), device_types="cpu")
def cpu_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor], lse: Tensor, R: Tensor,
    U: Tensor, stats: Tensor, scale: float, out_scale: float, norm: int, eps: float, dropout_p: float, seed: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias).

    Parameter gradients come back in the parameters' dtypes; those of absent parameters are zeros
    (custom ops cannot return None) and are dropped by the autograd formula.
    """
    dq, dk, dv, dw, dc, dnw, dnb = _C.re_attention_cpu_backward(
        grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, lse, R, U, stats, scale,
        out_scale, norm, eps, dropout_p, seed)

    def like(grad, param):
        return grad.to(mix_weight.dtype if param is None else param.dtype)

    return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)


@cpu_backward.register_fake
def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, lse, R, U, stats, scale, out_scale,
      norm, eps, dropout_p, seed):
    H = q.shape[1]

    def vec(param):
        return q.new_empty((H,), dtype=(param if param is not None else mix_weight).dtype)

    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(mix_weight),
            vec(mix_bias), vec(norm_weight), vec(norm_bias))


def _setup_context(ctx, inputs, output):
    (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale, out_scale, norm, eps, dropout_p,
     seed) = inputs
    _, lse, R, U, stats = output
    ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, lse, R, U, stats)
    ctx.options = (scale, out_scale, norm, eps, dropout_p, seed)


def _backward(ctx, grad_out, grad_lse, grad_r, grad_u, grad_stats):
    q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, lse, R, U, stats = ctx.saved_tensors
    scale, out_scale, norm, eps, dropout_p, seed = ctx.options
    dq, dk, dv, dw, dc, dnw, dnb = cpu_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                attn_mask, lse, R, U, stats, scale, out_scale, norm, eps, dropout_p,
                                                seed)
    return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
            dnb if norm_bias is not None else None, None, None, None, None, None, None, None)


cpu_forward.register_autograd(_backward, setup_context=_setup_context)


def dropout_keep_mask(seed: int, shape, p: float) -> Tensor:
    """The kernel's dropout keep-mask (bool [B, H, Nq, Nk], True = keep) for ``seed``: for tests and replay."""
    B, H, Nq, Nk = shape
    return _C.dropout_keep_mask(seed, B, H, Nq, Nk, p)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


def re_attention_cpu(q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean,
                     running_var, training, momentum, eps, out_scale, dropout_p, attn_mask,
                     seed: Optional[int] = None) -> Tensor:
    """Validated arguments in, O [B, H, Nq, D] out (``reattn.re_attention`` with backend="cpu")."""
    if norm == "batch" and not training:  # eval mode: an affine map per head, folded into the mixing
        from reattn.functional import fold_batchnorm_eval

        mix_weight, mix_bias = fold_batchnorm_eval(mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                                   running_var, eps)
        norm, norm_weight, norm_bias = "none", None, None
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed()
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        # The reference adds the mask cast to q's dtype; the kernel reads it in its accumulation type.
        attn_mask = attn_mask.to(q.dtype).to(_acc_dtype(q))
    out, _, _, _, stats = cpu_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, scale,
                                      out_scale, NORM_CODES[norm], eps, p, seed or 0)
    if norm == "batch":
        count = stats[2]
        if bool((count <= 1).any()):
            raise ValueError(
                "re_attention: norm='batch' in training needs more than one unmasked value per head; "
                f"unmasked counts per head: {[int(c) for c in count.tolist()]}")
        if running_mean is not None:
            with torch.no_grad():
                mean, var = stats[0], stats[1]
                unbiased = var * count / (count - 1)
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out
