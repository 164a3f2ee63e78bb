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
  Gram matrix G = Σ X Xᵀ [H, H] of X = P̃ - shift (shift = 1/Nk), the sum s = Σ X [H] and the count n
  over the unmasked entries, which add up over processes where mean and variance do not; one
  all-reduce of these H² + H + 1 numbers (H times as many with a per-head float mask, whose heads
  each have their own entries) gives μ = c + shift W1 + W s/n and σ² = diag(W G Wᵀ)/n - (W s/n)²
  (:func:`gram_batch_statistics`; docs/math.md, "BatchNorm statistics through the Gram matrix").
  Its backward all-reduces the two per-head sums the BatchNorm backward needs, Σ dN·x̂ and Σ dN
  (2H numbers), exactly what ``nn.SyncBatchNorm``'s backward all-reduces, before its main sweep.

The GPU backends (Triton, CUDA C++) synchronize the same way (``reattn.backends._ladder``): their
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

from typing import Any

from torch import nn

# The collectives and the Gram-sum statistics live in the package's leaves (the backends use them);
# they are re-exported here, where users look for them.
from reattn._batchnorm import gram_batch_statistics
from reattn._collectives import (all_reduce_sum, check_sync_group, default_group, group_size, is_initialized,
                                 module_sync_group)
from reattn.module import ReAttention

__all__ = ["all_reduce_sum", "check_sync_group", "convert_sync_reattention", "default_group", "gram_batch_statistics",
           "group_size", "is_initialized", "module_sync_group"]


def convert_sync_reattention(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every :class:`reattn.ReAttention` in ``module`` synchronize its BatchNorm statistics.

    The analogue of ``nn.SyncBatchNorm.convert_sync_batchnorm``: sets ``sync_stats=True`` and
    ``process_group`` (None: the world) on each ReAttention (in place; parameters, buffers and
    state_dict are unchanged) and returns ``module``. Other BatchNorm layers of the model are left
    alone: use ``nn.SyncBatchNorm.convert_sync_batchnorm`` for those (ReAttention also
    synchronizes when that function has turned its ``var_norm`` into an ``nn.SyncBatchNorm``).
    """
    for sub in module.modules():
        if isinstance(sub, ReAttention):
            sub.sync_stats = True
            sub.process_group = process_group
    return module
