"""The Triton side of the static model: what a call launches, compiled and counted as on the GPU.

``fused_call(problem, norm, cap)`` runs the Triton backend's own Python path for one call of
``reattn.re_attention`` (``reattn.backends._fused.run_fused`` and the bodies of its custom ops, the
same sequence of kernels per norm mode: the forward; training BatchNorm's one-sweep forward and the
element-wise finish; the backward-sums sweep and the backward) on ``device="meta"`` tensors, under
``kernels.capture.capture_launches`` (which records the Triton launches) and
``benchmarks.eager_model.OpCounter`` (which records the torch operations between them). Nothing
here names a kernel: whatever the kernels' entry points launch is what gets modelled.

``model_launch(launch, cap)`` compiles a recorded launch as Triton's JIT would for sm_<cap>
(``kernels.aot.compile_launch``), reads the SASS, matches its loops to the source's runtime loops
(``benchmarks.source_loops``: same nesting, each backward branch at its ``for`` line) and counts.
"""
from __future__ import annotations

import types
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks import kernel_model, sass
from benchmarks.source_loops import SourceLoop, analyze

_COMPILED: Dict[Tuple, object] = {}


class LoopMismatch(ValueError):
    """The compiled kernel's loops are not the source's runtime loops (see ``describe``)."""


def _flatten(forest) -> List:
    out = []
    for top in forest:
        out.extend(top.walk())
    return out


def _shape(forest) -> List:
    return [(_shape(node.children)) for node in forest]


def _describe_sass(forest) -> str:
    lines = []
    for loop in _flatten(forest):
        where = " <- ".join(f"{f.split('/')[-1]}:{n}" for f, n in loop.location[:3])
        lines.append(f"{'  ' * loop.depth}[{loop.head:#x}, {loop.tail:#x}] at {where}")
    return "\n".join(lines) or "(none)"


def _describe_source(forest: List[SourceLoop]) -> str:
    lines = []

    def walk(nodes, depth):
        for n in nodes:
            where = " <- ".join(f"{f.split('/')[-1]}:{line}" for f, line in n.location[:3])
            lines.append(f"{'  ' * depth}{where} x{n.trips}: {n.text}")
            walk(n.children, depth + 1)

    walk(forest, 0)
    return "\n".join(lines) or "(none)"


def match_loops(function: sass.Function, source: List[SourceLoop]) -> Dict[Tuple[int, int], SourceLoop]:
    """SASS loop -> source loop, or LoopMismatch: same tree, and each backward branch's line is its ``for``."""
    compiled = function.loops
    if _shape(compiled) != _shape(source):
        raise LoopMismatch(f"{function.name}: the compiled loops\n{_describe_sass(compiled)}\ndo not have the "
                           f"nesting of the source's runtime loops\n{_describe_source(source)}")
    result = {}
    for c, s in zip(_flatten(compiled), _flatten(source)):
        if not c.location or c.location[0] != (s.file, s.line):
            raise LoopMismatch(f"{function.name}: the loop [{c.head:#x}, {c.tail:#x}] closes at "
                               f"{c.location[:1]}, the source loop in its place is {s.file}:{s.line}\n"
                               f"compiled:\n{_describe_sass(compiled)}\nsource:\n{_describe_source(source)}")
        result[(c.head, c.tail)] = s
    return result


def compile_cached(launch, cap: int):
    """kernels.aot.compile_launch, memoized per process by the JIT's own specialization key."""
    from reattn.kernels.aot import compile_launch, jit_compile_inputs

    target, backend, signature, constexprs, attrs, options, _ = jit_compile_inputs(launch.kernel, launch.args,
                                                                                   launch.kwargs, cap)
    key = (launch.kernel.cache_key, cap, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items(), key=str)))
    if key not in _COMPILED:
        compiled = compile_launch(launch.kernel, launch.args, launch.kwargs, cap)
        functions = sass.disassemble(compiled.cubin)
        resources = sass.resource_usage(compiled.cubin)
        _COMPILED[key] = (compiled, functions, resources)
    return _COMPILED[key]


def model_launch(launch, cap: int, backend: str, phase: str) -> kernel_model.KernelModel:
    """The static model of one recorded Triton launch compiled for sm_<cap>."""
    compiled, functions, resources = compile_cached(launch, cap)
    function = functions[compiled.name]
    res = resources[compiled.name]
    bound = launch.bound()
    loops, accesses = analyze(launch.kernel, bound)
    matched = match_loops(function, loops)
    trips = {key: float(s.trips) for key, s in matched.items()}
    sources = {key: f"{s.file.split('/')[-1]}:{s.line}" for key, s in matched.items()}
    warps = compiled.num_warps
    multiplicity = kernel_model.uniform_multiplicity(function, trips, warps)
    work, kinds = kernel_model.work_from_sass(function, multiplicity)
    touched = [(bound[name], kinds_) for name, kinds_ in accesses.items() if isinstance(bound.get(name), torch.Tensor)]
    return kernel_model.KernelModel(
        backend=backend, name=compiled.name, phase=phase, arch=cap, programs=launch.programs, threads=32 * warps,
        registers=res.registers, spill_bytes=sass.spill_bytes(res, function),
        shared_bytes=compiled.shared + res.shared_static, work=work, hbm_bytes=kernel_model.unique_bytes(touched),
        loops=kernel_model.loop_reports(function, trips, sources), tensor_kinds=kinds)


# ---- what a call of the Triton backend launches --------------------------------------------------------------
def meta_inputs(B: int, H: int, N: int, D: int, dtype=torch.bfloat16, requires_grad: bool = False):
    """q, k, v as the microbenchmark makes them (contiguous [B, H, N, D]) on the meta device."""
    make = lambda: torch.empty(B, H, N, D, device="meta", dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(), make(), make()


def norm_arguments(norm: str, H: int, dtype=torch.float32) -> dict:
    """re_attention's norm arguments for a norm mode, parameters as the module has them (meta, float32)."""
    p = lambda: torch.empty(H, device="meta", dtype=dtype)  # noqa: E731
    args = dict(mix_weight=torch.empty(H, H, device="meta", dtype=dtype), mix_bias=p())
    if norm == "none":
        return dict(args, norm="none", training=False)
    if norm == "layer":
        return dict(args, norm="layer", norm_weight=p(), norm_bias=p(), training=False)
    if norm in ("batch-eval", "batch-train"):
        return dict(args, norm="batch", norm_weight=p(), norm_bias=p(), running_mean=p(), running_var=p(),
                    training=norm == "batch-train")
    raise ValueError(f"norm must be none, batch-eval, batch-train or layer, got {norm!r}")


def run_call(ops, B: int, H: int, N: int, D: int, norm: str, dtype, counter, drain) -> Dict[str, list]:
    """{"fwd": [...], "bwd": [...]}: one call of a fused backend's Python path on meta tensors, below its
    custom-op layer: ``run_fused`` with the forward op's body, then the backward op's body with what the
    forward saved (as ``reattn.backends._fused``'s autograd does). ``drain()`` returns (and forgets) the
    launches recorded so far; ``counter`` (an ``eager_model.OpCounter``) the torch operations."""
    from reattn.backends._fused import run_fused

    q, k, v = meta_inputs(B, H, N, D, dtype)
    kw = norm_arguments(norm, H)
    mix_weight, mix_bias = kw.pop("mix_weight"), kw.pop("mix_bias")
    options = dict(scale=D ** -0.5, norm=kw.pop("norm"), norm_weight=kw.pop("norm_weight", None),
                   norm_bias=kw.pop("norm_bias", None), running_mean=kw.pop("running_mean", None),
                   running_var=kw.pop("running_var", None), training=kw.pop("training"), momentum=0.1, eps=1e-5,
                   out_scale=1.0, dropout_p=0.0, attn_mask=None)
    recorded = {}

    def forward(*args):
        recorded["args"] = args
        out = ops.forward._init_fn(*args)
        recorded["out"] = out
        return out

    steps: Dict[str, list] = {}
    run_fused(types.SimpleNamespace(forward=forward), q, k, v, mix_weight, mix_bias, **options)
    steps["fwd"] = _merge(drain(), counter)
    (q_, k_, v_, w_, c_, nw_, nb_, mask_, seed_, scale_, out_scale_, norm_, eps_, p_) = recorded["args"][:14]
    _, lse, stats = recorded["out"]
    grad_out = torch.empty(B, H, N, D, device="meta", dtype=dtype)
    ops.backward._init_fn(grad_out, q_, k_, v_, w_, c_, nw_, nb_, mask_, seed_, lse, stats, scale_, out_scale_, norm_,
                          eps_, p_)
    steps["bwd"] = _merge(drain(), counter)
    return steps


def fused_call(ops, B: int, H: int, N: int, D: int, norm: str, cap: int, dtype=torch.bfloat16):
    """{"fwd": [...], "bwd": [...]} of the call's steps in order: captured Triton launches
    (``kernels.capture.Launch``) and torch operations (``eager_model.Op``), for ``ops`` (a backend's
    ``FusedOps``) run below its custom-op layer on meta tensors."""
    from benchmarks.eager_model import OpCounter
    from reattn.kernels.capture import capture_launches

    with capture_launches(cap) as launches, OpCounter() as counter:
        return run_call(ops, B, H, N, D, norm, dtype, counter, lambda: _drain(launches))


def _drain(launches: list) -> list:
    out = list(launches)
    launches.clear()
    return out


def _merge(launches: list, counter) -> list:
    """The launches and the torch ops recorded since the last call, in the order they happened (ops forgotten)."""
    events = sorted([(l_.order, 0, l_) for l_ in launches] + [(op.order, 1, op) for op in counter.ops],
                    key=lambda e: (e[0], e[1]))
    counter.ops.clear()
    return [e for _, _, e in events]


def _interleave(launches, counter) -> list:
    """The launches and torch ops recorded since the last call, in order (and forget them)."""
    return _merge(_drain(launches), counter)
