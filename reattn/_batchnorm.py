"""BatchNorm over heads: the steps every backend shares, each in one place.

The heads are BatchNorm2d's channels and the [B, Nq, Nk] entries of a head its values. Eval mode is
a per-head affine map, folded into the head mixing (:func:`fold_batchnorm_eval`); training mode
normalizes with the batch statistics of the kept (unmasked) entries, which the fused backends get
from sums (:func:`gram_batch_statistics`, or :func:`moment_statistics` of their one-sweep moments),
and updates the running statistics as ``nn.BatchNorm2d`` does (:func:`update_running_stats`). The
kernels read the statistics as :func:`batch_stats` (forward) and :func:`bn_backward_coefficients`
(backward). The derivations are in docs/math.md. Pure tensor math: nothing here imports the rest
of ``reattn``.
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
from torch import Tensor

COUNT_MESSAGE = "re_attention: norm='batch' in training needs more than one unmasked value per head"


def accumulator_dtype(q: Tensor) -> torch.dtype:
    """dtype of the fused backends' softmax and BatchNorm statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def kept_entries(attn_mask: Tensor) -> Tensor:
    """Bool, True where ``attn_mask`` keeps an entry: a bool mask's True, a float mask's entries other than -inf."""
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")


def mask_heads(attn_mask: Optional[Tensor], H: int) -> int:
    """Hm: how many heads' sets of kept entries a mask defines (H for a float mask with a head dim > 1, else 1)."""
    return H if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] > 1 else 1


def gram_shift(n_keys: int) -> float:
    """The shift of X = P~ - shift: 1/Nk rounded to float32, exact in fp32 kernels and fp64 formulas.

    Without dropout or masks every row of P sums to 1, so s1 = 0 and the variance is a sum of
    squares rather than the difference of two nearly equal numbers (which fp32 would lose).
    Rounded with ``struct``, not a tensor, so torch.compile keeps it in its graph.
    """
    return struct.unpack("f", struct.pack("f", 1.0 / n_keys))[0]


def unmasked_count(attn_mask: Optional[Tensor], B: int, Nq: int, Nk: int,
                   device: Optional[torch.device] = None) -> Tensor:
    """Number n of (b, i, j) entries BatchNorm averages over (0-dim float64 tensor on the mask's device,
    or without a mask on ``device``, default the CPU).

    The mask must be the same for every head (bool masks always are; float masks must not have a
    head dimension > 1), because one n and one Gram matrix serve all heads.
    """
    if attn_mask is None:
        # Filled where it is used: a CPU tensor moved to a GPU is a pageable copy, which torch follows by
        # a stream synchronization (the H200's profile showed one per training-BatchNorm call), and a host
        # that waits for the GPU at every layer cannot queue the next one while the GPU works.
        return torch.full((), float(B * Nq * Nk), dtype=torch.float64, device=device)
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[1] != 1:
        raise ValueError("re_attention: training-mode BatchNorm in the fused kernels needs an attn_mask that is the "
                         f"same for every head (head dim 1), got shape {tuple(attn_mask.shape)}")
    return kept_entries(mask).expand(B, 1, Nq, Nk).sum(dtype=torch.float64)


def check_counts(count: Tensor, where: str = "") -> None:
    """Refuse training statistics over one value or none: ValueError when a head's ``count`` is <= 1.

    count: [H]. where: appended to the sentence, e.g. " over all processes".
    """
    if bool((count <= 1).any()):
        raise ValueError(f"{COUNT_MESSAGE}{where}; unmasked counts per head: {[int(c) for c in count.tolist()]}")


def moment_statistics(s1: Tensor, s2: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance per head from the sum ``s1`` and sum of squares ``s2`` of ``count`` values.

    The variance is clamped at 0 (the difference of two rounded numbers can dip below it). It is
    accurate when the values are centred, their mean small against their spread: the fused
    backends sum values shifted by the no-mask mean (docs/math.md, "Training BatchNorm in one sweep").
    """
    mean = s1 / count
    return mean, (s2 / count - mean * mean).clamp_min(0.0)


def kept_term_coefficients(stats: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor], eps: float,
                           n_keys: int) -> Tuple[Tensor, Tensor]:
    """(rstd, -mean(X) rstd) per head, float64 [H] each: R = xhat V = rstd X V + (-mean(X) rstd) U from the terms
    the fused one-sweep forward keeps (X V, U) and its statistics.

    stats: [3, H] float64 (mean of M = W P~ + c, biased variance, count). The forward summed X = W P~ - center
    with center_g = sum_h W[g, h] / n_keys, so mean(X) = mean - center - c; rstd = 1 / sqrt(var + eps).
    """
    center = mix_weight.detach().to(torch.float64).sum(dim=1) / n_keys
    mean_x = stats[0] - center
    if mix_bias is not None:
        mean_x = mean_x - mix_bias.detach().to(torch.float64)
    rstd = torch.rsqrt(stats[1] + eps)
    return rstd, -mean_x * rstd


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor,
                         momentum: float) -> None:
    """``nn.BatchNorm2d``'s update, in place: running <- (1 - momentum) running + momentum batch.

    mean, var (biased) and count per head ([H], or count 0-dim); the running variance gets the
    unbiased var * n / (n - 1). No gradient flows into the running statistics.
    """
    with torch.no_grad():  # lerp_: one op where mul_ and add_ took two (each a launch on a GPU)
        unbiased = var * count / (count - 1)
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def fold_batchnorm_eval(
    mix_weight: Tensor,
    mix_bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Fold an eval-mode BatchNorm over heads into the head mixing.

    BN_eval(W P + c) = diag(alpha) W P + (alpha c + delta) with alpha = gamma / sqrt(var + eps) and
    delta = beta - alpha * mean, so ``re_attention(..., norm="batch", training=False)`` equals
    ``re_attention(..., W', c', norm="none")`` with the returned ``(W' [H, H], c' [H])``, masks
    included (masked entries are zeroed after the norm either way). Differentiable: gradients
    reach every argument through autograd. dtype: compute the fold (and so its backward) in this
    dtype; the fused backends pass their float32 accumulation type, so half-precision parameters
    and their gradients are rounded once, at the end, rather than at every step of the fold.
    """
    if dtype is not None:
        mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var = (
            None if t is None else t.to(dtype)
            for t in (mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var))
    # delta + alpha c = beta + alpha (c - mean): six elementwise ops with every parameter (one launch each on a
    # GPU, where the fold runs before every forward), not nine.
    alpha = torch.rsqrt(running_var + eps)
    if norm_weight is not None:
        alpha = alpha * norm_weight
    shifted = -running_mean if mix_bias is None else mix_bias - running_mean
    bias = alpha * shifted if norm_bias is None else torch.addcmul(norm_bias, alpha, shifted)
    return alpha[:, None] * mix_weight, bias


def gram_batch_statistics(
    mix_weight: Tensor, mix_bias: Optional[Tensor], s1: Tensor, gram: Tensor, count: Tensor, shift: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-head mean, biased variance and count of M = W P̃ + c from Gram-matrix sums (float64).

    ``s1`` [Hm, H] = Σ X, ``gram`` [Hm, H, H] = Σ X Xᵀ and ``count`` [Hm] with X = P̃ - ``shift``
    (:func:`gram_shift`) over the unmasked entries (zero on masked ones), summed over every process:
    Hm = 1 when all heads share the entries, Hm = H when head g's statistics run over its own
    entries (row g). Since M_g - c_g - shift Σ_h W[g, h] = (W X)_g on those entries,

        mean_g = c_g + shift Σ_h W[g, h] + (W s1)_g / n_g
        var_g  = (W G Wᵀ)_gg / n_g - ((W s1)_g / n_g)²          (clamped at 0)

    Without masks or dropout every row of P sums to one, so s1 ≈ 0 and the variance is a sum of
    squares rather than a difference of two close numbers. Returns (mean [H], var [H], count [H]).
    Call it with the weights the kernel used (same dtype rounding); counts <= 1 give meaningless
    (inf / NaN) statistics, which the caller refuses (:func:`check_counts`).
    """
    w = mix_weight.to(torch.float64)
    H = w.shape[0]
    s1 = s1.to(torch.float64).expand(H, H)            # row g: the sums over head g's entries
    gram = gram.to(torch.float64).expand(H, H, H)
    n = count.to(torch.float64).expand(H)
    w_s1 = (w * s1).sum(dim=1) / n
    mean = shift * w.sum(dim=1) + w_s1
    if mix_bias is not None:
        mean = mean + mix_bias.to(torch.float64)
    var = torch.einsum("gh,ghk,gk->g", w, gram, w) / n - w_s1 * w_s1
    return mean, var.clamp_min(0.0), n.clone()


def batch_stats(stats: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """The kernels' forward statistics [2, H] = (mean, 1/sqrt(var + eps)) in ``dtype`` (the accumulation
    dtype) from the [3, H] float64 statistics (mean, biased variance, count); 1/sqrt in float64, rounded once."""
    return torch.stack([stats[0], torch.rsqrt(stats[1] + eps)]).to(dtype).contiguous()


def bn_backward_coefficients(stats: Tensor, eps: float, norm_weight: Optional[Tensor], bn_grad_sums: Tensor,
                             dtype: torch.dtype) -> Tensor:
    """[4, H] (mean, 1/std, e, f) in ``dtype``: what training BatchNorm's backward kernels normalize with.

    dM = a dN + e xhat + f with a = gamma / std, e = -a mean(dN xhat), f = -a mean(dN) (docs/math.md,
    "Through V and the norm"), the means over the entries the statistics ran over: ``bn_grad_sums``
    [2, H] (sum dN xhat, sum dN) and the count ``stats[2]`` must cover the same entries (this
    process's, or every process's summed). 1/std is the forward's, rounded to ``dtype`` as the
    forward read it (:func:`batch_stats`); e and f are formed in float64.
    """
    rows = batch_stats(stats, eps, dtype).to(torch.float64)
    a = rows[1] if norm_weight is None else rows[1] * norm_weight.to(torch.float64)
    sums = bn_grad_sums.to(torch.float64)
    e, f = -a * sums[0] / stats[2], -a * sums[1] / stats[2]
    return torch.cat([rows, e[None], f[None]]).to(dtype).contiguous()
