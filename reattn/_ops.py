"""How reattn defines its ``torch.library`` ops: schema from the Python signature, one implementation per device.

``torch.library.custom_op`` does the same but wraps every implementation in ``torch._dynamo.disable``,
which imports ``torch._dynamo`` (and with it sympy and parts of inductor) on the first call of any such
op, compiled or not: measured on the 2-core dev machine, 1.1-2.6 s and about 150 MB of RSS added to
the first fused call of a process. An op defined on a ``Library`` and implemented per dispatch key
runs without that import; ``torch.compile`` still treats it as one opaque node, through its fake
implementation (``torch.library.register_fake``), and autograd comes from
``torch.library.register_autograd``, exactly as for ``custom_op``. ``torch.library.opcheck`` checks
these ops (schema, fake implementation, aliasing) in the tests.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.library import Library, infer_schema

LIBRARY = Library("reattn", "FRAGMENT")
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def define_op(name: str, fn: Callable, device_types: Sequence[str],
              mutates_args: Sequence[str] = ()) -> torch._ops.OpOverload:
    """Define ``reattn::<name>`` with ``fn``'s annotated signature (a functional op, unless ``mutates_args``
    names the arguments it writes in place) and ``fn`` as its implementation on each of ``device_types``;
    return the op (``torch.ops.reattn.<name>``)."""
    LIBRARY.define(name + infer_schema(fn, mutates_args=tuple(mutates_args)))
    for device in device_types:
        LIBRARY.impl(name, fn, DISPATCH_KEYS[device])
    return getattr(torch.ops.reattn, name).default


def register_fake(op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` gives ``op``'s output shapes and dtypes (FakeTensorMode, torch.compile)."""
    def register(fn: Callable) -> Callable:
        torch.library.register_fake(op, fn, lib=LIBRARY)
        return fn
    return register


def register_autograd(op: torch._ops.OpOverload, backward: Callable, *, setup_context: Callable) -> None:
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=LIBRARY)
