"""Eager Re-attention in the official order of operations: the truth and the eager baseline.

This materializes the [B, H, Nq, Nk] maps several times, exactly like the official DeepViT
module (matmul -> softmax -> dropout -> 1x1 Conv2d over heads -> BatchNorm2d -> scale -> matmul),
so it is both the reference every fused backend is tested against and the baseline the
benchmarks compare with. It assumes validated arguments (see ``reattn.functional``).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from reattn._batchnorm import COUNT_MESSAGE, check_counts, kept_entries, moment_statistics, update_running_stats
from reattn._collectives import all_reduce_sum


def masked_entries(attn_mask: Optional[torch.Tensor], shape: torch.Size) -> Optional[torch.Tensor]:
    """Bool [B, H, Nq, Nk] (expanded view), True where an entry is masked; None without a mask.

    Bool masks mark kept entries with True; float masks mask an entry with -inf.
    """
    if attn_mask is None:
        return None
    return (~kept_entries(attn_mask)).expand(shape)


def _normalize_with_batch_stats(m, mean, var, count, weight, bias, running_mean, running_var, momentum, eps):
    """BatchNorm2d's training output from per-head batch statistics, and its running-stat update.

    mean, var (biased) and count are [H]; the running variance gets the unbiased var * n / (n - 1).
    """
    H = m.shape[1]
    out = (m - mean.to(m.dtype).view(1, H, 1, 1)) * torch.rsqrt(var + eps).to(m.dtype).view(1, H, 1, 1)
    if weight is not None:
        out = out * weight.to(m.dtype).view(1, H, 1, 1)
    if bias is not None:
        out = out + bias.to(m.dtype).view(1, H, 1, 1)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out


def _masked_batch_norm_train(
    m: torch.Tensor, masked: torch.Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float
) -> torch.Tensor:
    """BatchNorm2d training semantics over the unmasked entries of each head (channel)."""
    H = m.shape[1]
    count = (~masked).sum(dim=(0, 2, 3))
    if torch.compiler.is_compiling():
        # In the graph (a Python branch on the data would break it): raises at run time, a RuntimeError.
        torch._assert_async((count > 1).all(), COUNT_MESSAGE)
    else:
        check_counts(count)
    n = count.to(m.dtype)
    mean = m.masked_fill(masked, 0).sum(dim=(0, 2, 3)) / n
    centered = (m - mean.view(1, H, 1, 1)).masked_fill(masked, 0)
    var = centered.square().sum(dim=(0, 2, 3)) / n
    return _normalize_with_batch_stats(m, mean, var, n, weight, bias, running_mean, running_var, momentum, eps)


def _synced_batch_norm_train(
    m: torch.Tensor, masked: Optional[torch.Tensor], weight, bias, running_mean, running_var, momentum: float,
    eps: float, group,
) -> torch.Tensor:
    """BatchNorm2d training semantics with statistics over every process of ``group`` (SyncBatchNorm).

    Each process reduces its (unmasked) entries to per-head sums of M and M² and a count, in
    float64; one differentiable all-reduce of these 3H numbers gives the statistics of the union
    of all processes' entries, and its backward carries every process's gradient to every input.
    """
    H = m.shape[1]
    wide = m.to(torch.float64)
    if masked is None:
        count = torch.full((H,), float(m.numel() // H), dtype=torch.float64, device=m.device)
    else:
        wide = wide.masked_fill(masked, 0)
        count = (~masked).sum(dim=(0, 2, 3)).to(torch.float64)
    total, total_sq, count = all_reduce_sum(
        [wide.sum(dim=(0, 2, 3)), wide.square().sum(dim=(0, 2, 3)), count], group)
    check_counts(count, " over all processes")
    mean, var = moment_statistics(total, total_sq, count)
    return _normalize_with_batch_stats(m, mean, var, count, weight, bias, running_mean, running_var, momentum, eps)


def re_attention_ref(
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
    dropout_mask: Optional[torch.Tensor] = None,
    return_attention: bool = False,
    sync_group=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Eager Re-attention; same arguments as :func:`reattn.re_attention` (no validation here).

    Extra, for tests and analysis:
      dropout_mask: bool [B, H, Nq, Nk], True = keep. Replaces the draw from torch's RNG so a
        fused backend's dropout pattern can be replayed here.
      return_attention: also return the post-norm, post-scale map A [B, H, Nq, Nk].

    Computes in q's dtype (parameters are cast to it), like the official module under the same
    dtype. Returns O [B, H, Nq, D] (and A).
    """
    H, D = q.shape[1], q.shape[-1]
    if scale is None:
        scale = D ** -0.5
    dtype = q.dtype
    attn = (q @ k.transpose(-2, -1)) * scale
    masked = masked_entries(attn_mask, attn.shape)
    if masked is None:
        attn = attn.softmax(dim=-1)
    else:
        if attn_mask.dtype != torch.bool:
            # A finite fill is an ordinary score: a score plus a fill near the dtype's range (finfo.min,
            # -65504 in float16) saturates at finfo.min instead of overflowing to -inf, which would leave
            # a row of -inf scores (NaN) that the mask never meant; -inf entries are masked just below.
            fill = attn_mask.to(dtype)
            summed = attn + fill
            overflow = summed.isneginf() & attn.isfinite() & fill.isfinite()
            attn = summed.masked_fill(overflow, torch.finfo(dtype).min)
        attn = attn.masked_fill(masked, float("-inf"))
        # A row with no key left would softmax to NaN; give it finite scores, then zero it below.
        attn = attn.masked_fill(masked.all(dim=-1, keepdim=True), 0.0)
        attn = attn.softmax(dim=-1).masked_fill(masked, 0.0)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            attn = F.dropout(attn, dropout_p, training=True)
        else:
            attn = attn * dropout_mask.to(dtype) / (1.0 - dropout_p)

    # The official 1x1 Conv2d over heads: M_g = sum_h W[g, h] P_h + c_g.
    bias = None if mix_bias is None else mix_bias.to(dtype)
    if attn.numel() == 0:  # (Nq = 0 or B = 0: conv2d refuses an empty spatial size; the same map, empty)
        attn = torch.einsum("gh,bhij->bgij", mix_weight.to(dtype), attn)
        attn = attn if bias is None else attn + bias.view(1, H, 1, 1)
    else:
        attn = F.conv2d(attn, mix_weight.to(dtype).view(H, H, 1, 1), bias)

    if norm == "batch":
        if training and sync_group is not None:
            attn = _synced_batch_norm_train(attn, masked, norm_weight, norm_bias, running_mean, running_var,
                                            momentum, eps, sync_group)
        elif training and masked is not None:
            attn = _masked_batch_norm_train(attn, masked, norm_weight, norm_bias, running_mean, running_var,
                                            momentum, eps)
        else:
            weight, nbias = norm_weight, norm_bias
            if running_mean is not None:  # torch's batch_norm takes one dtype for weight, bias and running
                # statistics (any with a half input): mixed precision keeps the statistics in float32
                weight, nbias = (None if t is None else t.to(running_mean.dtype) for t in (weight, nbias))
            attn = F.batch_norm(attn, running_mean, running_var, weight, nbias, training, momentum, eps)
    elif norm == "layer":
        # vit-pytorch: Rearrange('b h i j -> b i j h'), LayerNorm(heads), Rearrange back.
        weight = None if norm_weight is None else norm_weight.to(dtype)
        nbias = None if norm_bias is None else norm_bias.to(dtype)
        attn = F.layer_norm(attn.permute(0, 2, 3, 1), (H,), weight, nbias, eps).permute(0, 3, 1, 2)
    attn = attn * out_scale
    if masked is not None:
        attn = attn.masked_fill(masked, 0.0)
    out = attn @ v
    return (out, attn) if return_attention else out
