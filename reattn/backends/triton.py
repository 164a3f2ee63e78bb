"""Triton backend: the kernels of ``reattn.kernels`` on the shared op ladder (``_ladder.OpLadder``).

Its ops are ``reattn::triton_forward``, ``reattn::triton_backward``, ``reattn::triton_gram_sums``,
``reattn::triton_bn_grad_sums``, ``reattn::triton_update_running_stats`` and
``reattn::triton_forward_eval_batchnorm`` (eval-mode BatchNorm without gradients: the programs fold the norm
from the running statistics, where the ladder's fold takes six torch ops; see ``_ladder`` for what they return
and save: never a [B, H, Nq, Nk] map). On CPU tensors they run in Triton's interpreter (``TRITON_INTERPRET=1``).
Local training BatchNorm runs in one sweep over the keys (``_fused.one_sweep_batchnorm`` over the
forward kernel's per-program moments, the programs forming the map's shift themselves: ``center_keys``) and,
without a mask, keeps X V for the backward, whose BatchNorm
sums are then one pass over dO and X V (``kernels.affine.head_dot_sums``); the synchronized path keeps the
Gram-sum statistics sweep and the backward's sums sweep, whose sums add up over processes.
"""
from __future__ import annotations

import torch

from reattn._batchnorm import kept_term_coefficients
from reattn.backends._fused import FusedKernels, FusedRawOps
from reattn.backends._ladder import OpLadder, draw_dropout_seed
from reattn.kernels.affine import head_affine, head_dot_sums
from reattn.kernels.backward import re_attention_backward, re_attention_bn_grad_sums
from reattn.kernels.batchnorm import KeptTermParts, bn_coefficients, bn_moments, update_running_stats
from reattn.kernels.forward import re_attention_forward, softmax_stats_shape
from reattn.kernels.gram import gram_sums

__all__ = ["TRITON_OPS", "draw_dropout_seed", "re_attention_triton", "triton_backward", "triton_forward"]


def _forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, softmax_stats, *,
             scale, out_scale, norm, eps, dropout_p):
    return re_attention_forward(q, k, v, mix_weight, mix_bias, scale=scale, out_scale=out_scale, norm=norm,
                                norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, batch_stats=batch_stats,
                                attn_mask=attn_mask, dropout_p=dropout_p, seed=seed, softmax_stats=softmax_stats,
                                stats_given=softmax_stats is not None)


def _forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
                            attn_mask, *, scale, out_scale, eps):
    # Eval-mode BatchNorm for inference: the programs fold the norm from the running statistics as given.
    out, _ = re_attention_forward(q, k, v, mix_weight, mix_bias, scale=scale, out_scale=out_scale, norm="batch",
                                  norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, running_mean=running_mean,
                                  running_var=running_var, attn_mask=attn_mask)
    return out


def _backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, bn_coefficients, attn_mask, seed,
              softmax_stats, *, scale, out_scale, norm, eps, dropout_p):
    # norm "batch": the [4, H] coefficients (mean, 1/std, e, f), so only the main sweeps run.
    return re_attention_backward(grad_out, q, k, v, mix_weight, mix_bias, softmax_stats, scale=scale,
                                 out_scale=out_scale, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
                                 eps=eps, bn_coefficients=bn_coefficients, attn_mask=attn_mask, dropout_p=dropout_p,
                                 seed=seed)


def _bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed,
                  softmax_stats, *, scale, out_scale, eps, dropout_p):
    return re_attention_bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, softmax_stats, scale=scale,
                                         out_scale=out_scale, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
                                         batch_stats=batch_stats, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed)


def _head_dot_sums(grad, r, u, stats, mix_weight, mix_bias, *, scale, eps, n_keys, summed=True):
    # The sums over the kept r = X V and U, then R = xhat V's by linearity: rstd sum grad . r - mean(X) rstd sum grad . u.
    # summed=False (the ladder's request where the backend has bn_coefficients): the blocks' parts with what the last
    # steps need, which bn_coefficients finishes in its launch (no torch op on [H] tensors).
    if not summed:
        return KeptTermParts(head_dot_sums(grad, r, u, summed=False), mix_weight.detach(),
                             None if mix_bias is None else mix_bias.detach(), scale, n_keys)
    sums = head_dot_sums(grad, r, u) * scale
    rstd, shift = kept_term_coefficients(stats, mix_weight, mix_bias, eps, n_keys)
    return torch.stack([rstd * sums[0] + shift * sums[1], sums[1]])


def _forward_moments(q, k, v, mix_weight, mix_bias, attn_mask, seed, *, scale, dropout_p, dtype,
                     center_keys=0):
    # R' = X V in `dtype`: q's where the caller keeps it, else the accumulation dtype (it subtracts mean(X) U).
    # center_keys: X = W P~ - center, the programs forming center = sum_h W[g, h] / center_keys.
    # U = sum_j V_j from the launch where its rows past Nq can carry it (kernels.forward.sums_values; else None:
    # the caller sums V).
    r = torch.empty(q.shape, dtype=dtype, device=q.device)
    return re_attention_forward(q, k, v, mix_weight, mix_bias, scale=scale, norm="none", attn_mask=attn_mask,
                                dropout_p=dropout_p, seed=seed, out=r, with_moments=True, value_sums=True,
                                center_keys=center_keys)


TRITON_KERNELS = FusedKernels(forward=_forward, gram_sums=gram_sums, bn_grad_sums=_bn_grad_sums, backward=_backward,
                              forward_moments=_forward_moments, softmax_stats_shape=softmax_stats_shape,
                              head_affine=head_affine, centers_in_forward=True, head_dot_sums=_head_dot_sums,
                              bn_moments=bn_moments, bn_coefficients=bn_coefficients,
                              update_running_stats=update_running_stats, forward_eval_batchnorm=_forward_eval_batchnorm)
TRITON_OPS = OpLadder(FusedRawOps(TRITON_KERNELS), forward="reattn::triton_forward",
                      backward="reattn::triton_backward", gram_sums="reattn::triton_gram_sums",
                      bn_grad_sums="reattn::triton_bn_grad_sums", running_stats="reattn::triton_update_running_stats",
                      eval_batchnorm="reattn::triton_forward_eval_batchnorm",
                      device_types=("cuda", "cpu"))
triton_forward, triton_backward = TRITON_OPS.forward, TRITON_OPS.backward
re_attention_triton = TRITON_OPS.run  # reattn.re_attention with backend="triton" (validated arguments)
