"""Process-group collectives for synchronized BatchNorm statistics (``nn.SyncBatchNorm`` semantics).

Leaves of the package: ``torch.distributed`` only, nothing else of ``reattn``. The user-facing
description (what crosses the wire, which backend sums what) is :mod:`reattn.distributed`'s.
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
