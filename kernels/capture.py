"""Dry-run launch capture: what a real call of the Triton kernels would launch, without a GPU.

Under ``capture_launches(cap=90)`` every launch through ``kernels.launch.run_on_device`` is
recorded instead of run, ``launch.device_shared_limit`` answers the target GPU's shared memory per
block and ``launch.interpreting()`` is False, so the kernels' Python entry points pick exactly the
configuration, grid and arguments they would pick on that GPU. Call them with tensors on
``device="meta"``: full problem sizes cost nothing, and the records keep the tensors' shapes,
strides and dtypes, which is all the JIT's specialization looks at (a meta tensor's address is 0,
aligned like the caching allocator's blocks). ``kernels.aot.compile_launch`` then compiles a record
for the target as the JIT would.

    with capture_launches(cap=90) as launches:
        re_attention_forward(q, k, v, w, c, scale=0.125)        # q, k, v on device="meta"
    launches[0].kernel, launches[0].grid, launches[0].constexprs()

Capture sits below the ``torch.library`` custom ops (calling those with meta tensors runs their
fake implementations, which launch nothing): call the raw kernels (``reattn.backends.triton``'s
``FusedKernels``) or the Python bodies of the ops. Nothing here imports ``reattn``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import launch as _launch
from .launch import SHARED_MEMORY_LIMIT

# Launch options of a Triton launch (the rest of the keyword arguments are constexprs).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Launch:
    """One recorded Triton launch: the jit function, its grid and arguments as the caller passed them."""

    kernel: Any                  # the triton.JITFunction
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    tag: str = ""                # set by the caller: which step of a call this launch is
    order: int = field(default_factory=time.perf_counter_ns)  # when it was recorded (orders it among other events)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def _parameters(self):
        import inspect

        return inspect.signature(self.kernel.fn).parameters

    def bound(self) -> Dict[str, Any]:
        """Every argument of the kernel by name (positional and keyword, constexprs included)."""
        names = list(self._parameters())
        values = dict(zip(names, self.args))
        values.update({k: v for k, v in self.kwargs.items() if k in names})
        return values

    def constexprs(self) -> Dict[str, Any]:
        """The constexpr arguments (annotated ``tl.constexpr``), by name."""
        params = self._parameters()
        return {k: v for k, v in self.bound().items() if "constexpr" in str(params[k].annotation)}

    def options(self) -> Dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k in LAUNCH_OPTIONS}

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


@dataclass
class _Recorder:
    cap: int
    shared_limit: Optional[int]
    launches: List[Launch] = field(default_factory=list)
    tag: str = ""

    def record(self, kernel, grid, args, kwargs) -> None:
        if callable(grid):
            raise TypeError("capture_launches: callable grids are not supported (reattn passes tuples)")
        self.launches.append(Launch(kernel, tuple(int(g) for g in grid), tuple(args), dict(kwargs), self.tag))


@contextlib.contextmanager
def capture_launches(cap: int = 90, shared_limit: Optional[int] = None) -> Iterator[List[Launch]]:
    """Record (not run) every Triton launch in the block, as on a GPU of compute capability ``cap``.

    shared_limit: the target's shared memory per block; default ``SHARED_MEMORY_LIMIT[cap]``.
    Yields the list the launches are appended to. Not reentrant, not thread-safe (one global hook).
    """
    if _launch.CAPTURE is not None:
        raise RuntimeError("capture_launches is already active")
    recorder = _Recorder(cap, SHARED_MEMORY_LIMIT.get(cap) if shared_limit is None else shared_limit)
    _launch.CAPTURE = recorder
    try:
        yield recorder.launches
    finally:
        _launch.CAPTURE = None


@contextlib.contextmanager
def tagged(tag: str) -> Iterator[None]:
    """Label the launches recorded inside the block (e.g. "forward", "backward") while capturing."""
    recorder = _launch.CAPTURE
    if recorder is None:
        yield
        return
    previous, recorder.tag = recorder.tag, tag
    try:
        yield
    finally:
        recorder.tag = previous
