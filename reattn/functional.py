"""The functional entry point: ``re_attention`` validates once, picks a backend and runs it."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from reattn._batchnorm import fold_batchnorm_eval, mask_heads
from reattn._checks import check_re_attention
from reattn._collectives import check_sync_group
from reattn.backends import Problem, in_functorch_transform, resolve_backend
from reattn.reference import re_attention_ref

__all__ = ["explain_backend", "fold_batchnorm_eval", "re_attention"]  # fold_batchnorm_eval: reattn._batchnorm's


def re_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix_weight: torch.Tensor,
    mix_bias: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    norm: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    out_scale: float = 1.0,
    dropout_p: float = 0.0,
    attn_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_attention: bool = False,
    sync_group=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Re-attention (DeepViT, arXiv 2103.11886): attention whose per-head maps are mixed across heads.

    .. code-block:: text

        P_h = dropout(softmax(scale * Q_h K_h^T + mask))      dropout only when training
        M_g = sum_h mix_weight[g, h] * P_h + mix_bias[g]       the official 1x1 Conv2d over heads
        A   = out_scale * Norm(M)                              none | BatchNorm2d(H) | LayerNorm over heads
        O_g = A_g V_g

    Args:
        q: [B, H, Nq, D] queries. float16, bfloat16, float32 or float64.
        k: [B, H, Nk, D] keys (Nk may differ from Nq, Nk >= 1).
        v: [B, H, Nk, D] values.
        mix_weight: [H, H], indexed [out g, in h] (a ``Conv2d(H, H, 1)`` weight viewed as [H, H]).
        mix_bias: [H] or None.
        scale: softmax scale; None means D ** -0.5.
        norm: "none"; "batch" = ``nn.BatchNorm2d(H)`` on the [B, H, Nq, Nk] map (official DeepViT);
            "layer" = ``nn.LayerNorm(H)`` across heads at every (b, i, j) (vit-pytorch's DeepViT).
        norm_weight, norm_bias: [H] affine parameters of the norm, or None.
        running_mean, running_var: [H] BatchNorm running statistics. With ``training=False`` they
            normalize; with ``training=True`` batch statistics normalize and these (if given) are
            updated in place with ``momentum``, the variance unbiased, exactly like nn.BatchNorm2d.
        training: batch statistics for norm="batch", and dropout on.
        momentum, eps: as in nn.BatchNorm2d (eps also for norm="layer").
        out_scale: multiplies A after the norm (official ``reatten_scale``).
        dropout_p: dropout probability on the softmax probabilities, before mixing (official order).
        attn_mask: bool (True = attend) broadcastable to [B, 1, Nq, Nk], or float added to the
            scores, broadcastable to [B, H, Nq, Nk] (cast to q's dtype). An entry is *masked* when
            the bool mask is False or the float mask is -inf there (for head g, for float masks).
            Masked entries get probability 0, their A is set to 0 after the norm (they contribute
            nothing to O) and they are left out of training-mode BatchNorm statistics. A query row
            with every key masked yields zeros, never NaN. LayerNorm across heads normalizes all H
            values of M at an entry (the mask then zeroes the masked heads' A). The official model
            has no mask: with attn_mask=None all of this is moot.
        backend: "auto" (the fastest backend available for the device), "eager" (this package's
            reference in plain PyTorch; materializes the maps), "triton", "cuda" or "cpu". An
            explicit backend that cannot run raises ValueError saying why; it never falls back.
        return_attention: also return A [B, H, Nq, Nk] (materialized; eager backend only).
        sync_group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``):
            with norm="batch" and training=True, the batch statistics are those of the union of
            every process's entries (``nn.SyncBatchNorm`` semantics, gradients included; every
            process must run the forward and the backward). Every backend; the Triton and CUDA
            ones need an attn_mask shared by the heads here, as they do for local training
            BatchNorm. Ignored in other modes; None (the default) keeps statistics local. See
            :mod:`reattn.distributed`.

    Returns:
        O [B, H, Nq, D] in q's dtype, or (O, A) with ``return_attention=True``.

    Raises:
        TypeError / ValueError naming the offending argument and its shape, dtype or device.
    """
    scale, momentum, eps, out_scale, dropout_p = check_re_attention(
        q, k, v, mix_weight, mix_bias, scale=scale, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
        running_mean=running_mean, running_var=running_var, training=training, momentum=momentum, eps=eps,
        out_scale=out_scale, dropout_p=dropout_p, attn_mask=attn_mask,
    )
    problem = _problem(q, k, v, mix_weight, mix_bias, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
                       training=training, dropout_p=dropout_p, attn_mask=attn_mask,
                       return_attention=return_attention, sync_group=sync_group)
    if problem.synced_stats:
        check_sync_group(sync_group)
    name = resolve_backend(backend, problem)
    options = dict(scale=scale, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, running_mean=running_mean,
                   running_var=running_var, training=training, momentum=momentum, eps=eps, out_scale=out_scale,
                   dropout_p=dropout_p, attn_mask=attn_mask,
                   sync_group=sync_group if problem.synced_stats else None)
    if name == "eager":
        return re_attention_ref(q, k, v, mix_weight, mix_bias, return_attention=return_attention, **options)
    return _fused_entry(name)(q, k, v, mix_weight, mix_bias, **options)


def _problem(q, k, v, mix_weight, mix_bias, *, norm, norm_weight, norm_bias, training, dropout_p, attn_mask,
             return_attention, sync_group) -> Problem:
    """What the backends need to know about a call (validated arguments)."""
    return Problem(q.device, heads=q.shape[1], head_dim=q.shape[3], norm=norm,
                   batchnorm_training=norm == "batch" and training, dropout=training and dropout_p > 0,
                   masked=attn_mask is not None, return_attention=return_attention, dtype=q.dtype,
                   mask_per_head=mask_heads(attn_mask, q.shape[1]) > 1,
                   mask_requires_grad=attn_mask is not None and attn_mask.requires_grad,
                   synced_stats=sync_group is not None and norm == "batch" and training,
                   n_queries=q.shape[2], n_keys=k.shape[2], functorch=in_functorch_transform(),
                   needs_grad=torch.is_grad_enabled() and any(
                       t is not None and t.requires_grad
                       for t in (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias)))


def explain_backend(*args, **kwargs):
    """Which backend ``re_attention(*args, **kwargs)`` would run, and why: a ``reattn.backends.BackendChoice``
    (``.backend`` and ``.reasons``, one sentence per backend considered; ``print()`` it).

    Takes exactly ``re_attention``'s arguments. On CUDA tensors ``backend="auto"`` picks a fused backend
    only where a recorded GPU measurement shows it faster than eager in the call's regime
    (``reattn.backends.measured``); the reasons say which measurement decided, or that none exists.
    Nothing runs. Raises what ``re_attention`` raises for bad arguments, and ValueError for an explicit
    backend that cannot run the call.
    """
    import inspect

    from reattn.backends import choose_backend

    bound = inspect.signature(re_attention).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    check_re_attention(a["q"], a["k"], a["v"], a["mix_weight"], a["mix_bias"], scale=a["scale"], norm=a["norm"],
                       norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], running_mean=a["running_mean"],
                       running_var=a["running_var"], training=a["training"], momentum=a["momentum"], eps=a["eps"],
                       out_scale=a["out_scale"], dropout_p=a["dropout_p"], attn_mask=a["attn_mask"])
    problem = _problem(a["q"], a["k"], a["v"], a["mix_weight"], a["mix_bias"], norm=a["norm"],
                       norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], training=a["training"],
                       dropout_p=a["dropout_p"], attn_mask=a["attn_mask"], return_attention=a["return_attention"],
                       sync_group=a["sync_group"])
    return choose_backend(a["backend"], problem)


def _fused_entry(name: str):
    """The validated-arguments entry point of fused backend ``name`` (imported on first use)."""
    if name == "triton":
        from reattn.backends.triton import re_attention_triton

        return re_attention_triton
    if name == "cuda":
        from reattn.backends.cuda import re_attention_cuda

        return re_attention_cuda
    if name == "cpu":
        from reattn.backends.cpu import re_attention_cpu

        return re_attention_cpu
    raise AssertionError(f"backend {name!r} resolved but has no implementation")  # resolve_backend prevents it
