"""Eager PyTorch in the static model: the bytes and FLOPs each of its kernels moves, at the GPU's rates.

``OpCounter`` is a ``TorchDispatchMode`` that records every aten operation that launches a kernel
(views, ``empty`` and other metadata-only operations launch none) with the bytes it reads (its
tensor inputs' storage spans, each tensor once) and writes (its outputs'), and its FLOPs: matrix
products and convolutions exactly (2 per multiply-add, on tensor cores), element-wise and
reduction work as one FLOP per output element (on the FP32 units). Run on ``device="meta"``
tensors, a whole forward and backward of the eager official core (``reattn.reference``) costs
nothing, at any size.

Each operation is one kernel: ``t_low`` = max(bytes / HBM bandwidth, FLOPs / rate) and ``t_high``
= the sum plus the launch gap (``benchmarks.cost_model.eager_op_time``); a call's times are the
sums over its operations (kernels run one after another on a stream). Reading its inputs once is
optimistic for operations that make two passes (training BatchNorm's statistics, softmax over long
rows that miss L2): eager's figures lean fast, never slow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import cost_model
from benchmarks.kernel_model import tensor_footprint

_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_scaled_mm"}
_CONVS = {"convolution", "_convolution", "cudnn_convolution", "convolution_overrideable"}
_NO_KERNEL_PREFIXES = ("empty", "_unsafe_view", "_reshape_alias", "new_empty", "_empty", "lift_fresh", "detach", "alias", "_local_scalar_dense",
                       "sym_", "resize_", "set_", "_has_compatible_shallow_copy_type", "is_same_size")


@dataclass
class Op:
    name: str
    bytes_read: float
    bytes_written: float
    flops: float
    tensor: bool                 # matrix product (tensor cores)
    order: int = field(default_factory=time.perf_counter_ns)

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    def times(self, gpu: cost_model.GPU):
        return cost_model.eager_op_time(gpu, self.bytes, self.flops, self.tensor)


def _tensors(tree) -> List[torch.Tensor]:
    out = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return out


def _span(tensors) -> float:
    seen = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return float(sum(tensor_footprint(t) for t in seen.values()))


def _flops(name: str, args, out) -> tuple:
    """(FLOPs, on tensor cores?) of an aten op."""
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1], True
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], True
    if name in _CONVS:
        weight = args[1]
        o = out if isinstance(out, torch.Tensor) else out[0]
        per_output = weight.shape[1] * int(torch.tensor(weight.shape[2:]).prod()) if weight.dim() > 2 else weight.shape[1]
        return 2.0 * o.numel() * per_output, True
    if name == "convolution_backward":
        grad_out, inp, weight = args[0], args[1], args[2]
        per_output = weight.shape[1] * (int(torch.tensor(weight.shape[2:]).prod()) if weight.dim() > 2 else 1)
        return 4.0 * grad_out.numel() * per_output, True  # grad input + grad weight
    outs = _tensors(out)
    return float(sum(t.numel() for t in outs)), False


_FACTORY_PREFIXES = ("new_", "zeros", "ones", "full", "empty", "fill")
# In-place ops that overwrite their tensor without reading it (add_ and the like read it).
_OVERWRITE_SELF = ("copy_", "zero_")


class OpCounter(TorchDispatchMode):
    """Records the kernel-launching aten ops run inside it (``.ops``, in order)."""

    def __init__(self):
        super().__init__()
        self.ops: List[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        returns = schema.returns
        is_view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        outs = _tensors(out)
        if is_view or name.startswith(_NO_KERNEL_PREFIXES) or not outs and not schema.is_mutable:
            return out
        if outs and all(t.numel() == 0 for t in outs):  # nothing to compute: no kernel runs
            return out
        # Factories (new_zeros, zeros_like, ...) take a tensor for its dtype and device only: they read nothing.
        # An out= tensor (cat(..., out=t)) and the destination of copy_ / zero_ are written, not read.
        written = {a.name for a in schema.arguments if a.is_out}
        read_args = args[1:] if name in _OVERWRITE_SELF else args
        inputs = [] if name.startswith(_FACTORY_PREFIXES) or name.endswith("_like") else (
            _tensors(read_args) + _tensors({k: v for k, v in kwargs.items() if k not in written}))
        flops, tensor = _flops(name, args, out)
        self.ops.append(Op(name, _span(inputs), _span(_tensors(out)), flops, tensor))
        return out


def eager_call(B: int, H: int, N: int, D: int, norm: str, dtype=torch.bfloat16) -> Dict[str, List[Op]]:
    """{"fwd": ops, "bwd": ops} of the eager official core (``reattn.reference.re_attention_ref``) on meta tensors,
    with the norm mode's parameters as the module has them; the backward is autograd's."""
    from benchmarks.triton_side import meta_inputs, norm_arguments
    from reattn.reference import re_attention_ref

    q, k, v = meta_inputs(B, H, N, D, dtype, requires_grad=True)
    kw = norm_arguments(norm, H)
    for name in ("mix_weight", "mix_bias", "norm_weight", "norm_bias"):
        if kw.get(name) is not None:
            kw[name].requires_grad_(True)
    if kw["norm"] == "batch" and kw["training"]:
        kw["momentum"] = 0.1
    grad = torch.empty(B, H, N, D, device="meta", dtype=dtype)
    steps = {}
    with OpCounter() as counter:
        out = re_attention_ref(q, k, v, scale=D ** -0.5, **kw)
        steps["fwd"] = list(counter.ops)
        counter.ops.clear()
        out.backward(grad)
        steps["bwd"] = list(counter.ops)
    return steps
