"""Training-mode BatchNorm statistics across processes: SyncBatchNorm semantics for Re-attention.

Re-attention's official norm is ``nn.BatchNorm2d(H)`` over the [B, H, Nq, Nk] maps. With data
parallel training each process holds B/R images; ``nn.SyncBatchNorm`` semantics mean that the
statistics (mean, biased variance for normalizing, unbiased variance for the running estimate)
are those of the union of every process's entries, and that gradients flow through them to every
process, exactly as if one process had run the concatenated batch.

What crosses the wire is tiny and does not depend on the sequence length:

* the eager backend all-reduces, per head, the sum of M, the sum of M² and the entry count
  (3H numbers, accumulated in float64), and autograd carries the gradients back through them;
* the fused CPU backend (``backend="cpu"``) never forms M: its statistics sweep accumulates the
  Gram matrix G = Σ X Xᵀ [H, H] of X = P̃ - κ (κ = 1/Nk), the sum s = Σ X [H] and the count n
  over the unmasked entries, which add up over processes where mean and variance do not; one
  all-reduce of these H² + H + 1 numbers (H times as many with a per-head float mask, whose heads
  each have their own entries) gives μ = c + κ W1 + W s/n and σ² = diag(W G Wᵀ)/n - (W s/n)²
  (:func:`gram_batch_statistics`; the design note ``reattention-math.md``). Its backward all-reduces
  the two per-head sums the BatchNorm backward needs, Σ dA and Σ dA·x̂ (2H numbers), exactly what
  ``nn.SyncBatchNorm``'s backward all-reduces, before its main sweep.

The GPU backends (Triton, CUDA C++) synchronize the same way (``reattn.backends._fused``): their
statistics sweeps return the same Gram sums, with one mask for all heads (the Hm = 1 case of
:func:`gram_batch_statistics`; a per-head mask with training BatchNorm is refused with a reason,
synchronized or not), and their backward's first sweep the same two sums per head.

The interface:

* ``re_attention(..., sync_group=group)`` / ``re_attention_ref(..., sync_group=group)``: with
  ``norm="batch"`` and ``training=True`` the statistics are synchronized over ``group`` (a
  ``torch.distributed`` process group, e.g. ``torch.distributed.group.WORLD``); in other modes
  the argument is ignored, like ``nn.SyncBatchNorm`` in eval mode.
* ``ReAttention(..., sync_stats=True, process_group=None)``, or
  :func:`convert_sync_reattention` on a whole model, or ``nn.SyncBatchNorm.convert_sync_batchnorm``
  (which turns ``var_norm`` into an ``nn.SyncBatchNorm``; ReAttention notices and synchronizes
  over that module's process group). Like ``nn.SyncBatchNorm``, a module synchronizes only in
  training mode, when ``torch.distributed`` is initialized and the group has more than one process.
* :func:`all_reduce_sum`: one differentiable all-reduce (SUM) of several tensors packed into one
  buffer; its backward all-reduces the gradients, which is what makes input gradients exact.

Every process of the group must call the forward *and* the backward (collectives on both sides),
as with ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import nn


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and its default process group exists."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def default_group() -> Any:
    """The default (world) process group; ``torch.distributed`` must be initialized."""
    return _dist().group.WORLD


def group_size(group: Any = None) -> int:
    """Number of processes in ``group`` (None: the world); 1 when torch.distributed is not initialized."""
    if not is_initialized():
        return 1
    dist = _dist()
    return dist.get_world_size(group if group is not None else dist.group.WORLD)


def check_sync_group(group: Any) -> None:
    """Raise a ValueError saying why ``group`` cannot synchronize statistics, if it cannot."""
    if not is_initialized():
        raise ValueError(
            "re_attention: sync_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (or pass sync_group=None for local statistics)"
        )
    if group is None:
        raise ValueError("re_attention: sync_group=None means no synchronization; pass a process group")


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x; backward: dx = Σ_ranks dy (every rank's loss reaches every rank's x)."""

    @staticmethod
    def forward(ctx, group, tensor):  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        _dist().all_reduce(out, op=_dist().ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return None, _AllReduceSum.apply(ctx.group, grad)


def all_reduce_sum(tensors: Sequence[torch.Tensor], group: Any) -> List[torch.Tensor]:
    """Sum each tensor over the processes of ``group`` in one differentiable collective.

    The tensors are flattened into one buffer of their common dtype and device (one all-reduce,
    however many tensors), summed across processes and split back into their shapes. Gradients
    of the results are all-reduced in the backward, exactly like ``nn.SyncBatchNorm``'s.
    With a single process (or ``torch.distributed`` not initialized) it returns the tensors.
    """
    tensors = list(tensors)
    if group_size(group) == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    summed = _AllReduceSum.apply(group, flat)
    out, start = [], 0
    for t in tensors:
        out.append(summed[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def gram_batch_statistics(
    mix_weight: torch.Tensor, mix_bias: Optional[torch.Tensor], s1: torch.Tensor, gram: torch.Tensor,
    count: torch.Tensor, kappa: float,
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """Per-head mean, biased variance and count of M = W P̃ + c from Gram-matrix sums (float64).

    ``s1`` [Hm, H] = Σ X, ``gram`` [Hm, H, H] = Σ X Xᵀ and ``count`` [Hm] with X = P̃ - ``kappa``
    over the unmasked entries (zero on masked ones), summed over every process: Hm = 1 when all
    heads share the entries, Hm = H when head g's statistics run over its own entries (row g).
    Since M_g - c_g - κ Σ_h W[g, h] = (W X)_g on those entries,

        mean_g = c_g + κ Σ_h W[g, h] + (W s1)_g / n_g
        var_g  = (W G Wᵀ)_gg / n_g - ((W s1)_g / n_g)²          (clamped at 0)

    Without masks or dropout every row of P sums to one, so s1 ≈ 0 and the variance is a sum of
    squares rather than a difference of two close numbers. Returns (mean [H], var [H], count [H]).
    Call it with the weights the kernel used (same dtype rounding); counts <= 1 give meaningless
    (inf / NaN) statistics, which the caller refuses.
    """
    w = mix_weight.to(torch.float64)
    H = w.shape[0]
    s1 = s1.to(torch.float64).expand(H, H)            # row g: the sums over head g's entries
    gram = gram.to(torch.float64).expand(H, H, H)
    n = count.to(torch.float64).expand(H)
    w_s1 = (w * s1).sum(dim=1) / n
    mean = kappa * w.sum(dim=1) + w_s1
    if mix_bias is not None:
        mean = mean + mix_bias.to(torch.float64)
    var = torch.einsum("gh,ghk,gk->g", w, gram, w) / n - w_s1 * w_s1
    return mean, var.clamp_min(0.0), n.clone()


def module_sync_group(sync_stats: bool, process_group: Any, norm_module: Optional[nn.Module]) -> Any:
    """The group a module in training mode synchronizes over, or None for local statistics.

    Follows ``nn.SyncBatchNorm.forward``: synchronize when asked (``sync_stats`` or a
    ``nn.SyncBatchNorm`` norm module), torch.distributed is initialized and the group has more
    than one process.
    """
    if isinstance(norm_module, nn.SyncBatchNorm):
        sync_stats = True
        process_group = process_group if process_group is not None else norm_module.process_group
    if not sync_stats or not is_initialized():
        return None
    group = process_group if process_group is not None else default_group()
    return group if group_size(group) > 1 else None


def convert_sync_reattention(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`reattn.ReAttention` in ``module`` synchronize its BatchNorm statistics.

    The analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``: sets ``sync_stats=True`` and
    ``process_group`` (None: the world) on each ReAttention (in place; parameters, buffers and
    state_dict are unchanged) and returns ``module``. Other BatchNorm layers of the model are left
    alone: use ``nn.SyncBatchNorm.convert_sync_batchnorm`` for those (ReAttention also
    synchronizes when that function has turned its ``var_norm`` into an ``nn.SyncBatchNorm``).
    """
    from reattn.module import ReAttention

    for sub in module.modules():
        if isinstance(sub, ReAttention):
            sub.sync_stats = True
            sub.process_group = process_group
    return module
