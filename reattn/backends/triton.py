"""Triton backend: ``torch.library`` custom ops over ``reattn.kernels`` with autograd.

Layering (as flash-attention): raw kernels (``reattn.kernels``) -> custom ops with fake
implementations (so ``torch.compile`` traces through them without graph breaks) -> autograd
registration -> ``re_attention_triton``, called by ``reattn.re_attention`` only.

Saved for backward: q, k, v, the mixing / norm parameters and the logsumexp [B, H, Nq]; never a
[B, H, Nq, Nk] map. Eval-mode BatchNorm arrives already folded into the mixing (so its
gradients flow through the fold, in autograd).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from reattn.kernels.backward import re_attention_backward
from reattn.kernels.forward import re_attention_forward


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("reattn::triton_forward", mutates_args=(), device_types=("cuda", "cpu"))
def triton_forward(
    q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], scale: float, out_scale: float, norm: str, eps: float,
) -> Tuple[Tensor, Tensor]:
    """Fused forward: returns (out [B, H, Nq, D], logsumexp [B, H, Nq])."""
    return re_attention_forward(q, k, v, mix_weight, mix_bias, scale=scale, out_scale=out_scale, norm=norm,
                                norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)


@triton_forward.register_fake
def _(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, scale, out_scale, norm, eps):
    B, H, Nq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Nq), dtype=_lse_dtype(q))


@torch.library.custom_op("reattn::triton_backward", mutates_args=(), device_types=("cuda", "cpu"))
def triton_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], lse: Tensor, scale: float, out_scale: float,
    norm: str, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias).

    Parameter gradients come back in the parameters' dtypes; those of absent parameters are
    zeros (custom ops cannot return None) and are dropped by the autograd formula.
    """
    dq, dk, dv, dw, dc, dnw, dnb = re_attention_backward(
        grad_out.contiguous(), q, k, v, mix_weight, mix_bias, lse, scale=scale, out_scale=out_scale, norm=norm,
        norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)
    H = q.shape[1]

    def like(grad, param):
        if param is None:
            return q.new_zeros((H,), dtype=mix_weight.dtype)
        return grad.to(param.dtype)

    return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)


@triton_backward.register_fake
def _(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, lse, scale, out_scale, norm, eps):
    H = q.shape[1]

    def vec(param):
        return q.new_empty((H,), dtype=(param if param is not None else mix_weight).dtype)

    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix_weight),
            vec(mix_bias), vec(norm_weight), vec(norm_bias))


def _setup_context(ctx, inputs, output):
    q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, scale, out_scale, norm, eps = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, lse)
    ctx.options = (scale, out_scale, norm, eps)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, lse = ctx.saved_tensors
    scale, out_scale, norm, eps = ctx.options
    dq, dk, dv, dw, dc, dnw, dnb = triton_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   lse, scale, out_scale, norm, eps)
    return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
            dnb if norm_bias is not None else None, None, None, None, None)


triton_forward.register_autograd(_backward, setup_context=_setup_context)


def re_attention_triton(q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean,
                        running_var, eps, out_scale) -> Tensor:
    """Validated arguments in, O [B, H, Nq, D] out. Modes refused by ``reattn.backends`` never get here."""
    if norm == "batch":  # eval mode: an affine map per head, folded into the mixing
        from reattn.functional import fold_batchnorm_eval

        mix_weight, mix_bias = fold_batchnorm_eval(mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                                   running_var, eps)
        norm, norm_weight, norm_bias = "none", None, None
    out, _ = triton_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, scale, out_scale, norm, eps)
    return out
