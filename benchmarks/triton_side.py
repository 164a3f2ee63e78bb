"""The Triton side of the static model: what a call launches, compiled and counted as on the GPU.

``fused_call(problem, norm, cap)`` runs the Triton backend's own Python path for one call of
``reattn.re_attention`` (``reattn.backends._ladder.OpLadder.run`` and the bodies of its custom ops, the
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

import os
import re
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
        # File names compared by basename: line information records the path the source was loaded from.
        if not c.location or (os.path.basename(c.location[0][0]), c.location[0][1]) != (os.path.basename(s.file),
                                                                                          s.line):
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


def model_launch(launch, cap: int, backend: str, phase: str, method: str = "auto") -> kernel_model.KernelModel:
    """The static model of one recorded Triton launch compiled for sm_<cap>.

    method: "loops" (per-iteration counts times the source loops' trip counts; LoopMismatch when the
    compiled loops are not the source's), "emulate" (``benchmarks.sass_exec`` runs sample programs),
    or "auto": "loops", and "emulate" where the compiler restructured the loops (unrolled with a
    remainder, versioned a loop on a runtime condition), which the note says.
    """
    compiled, functions, resources = compile_cached(launch, cap)
    function = functions[compiled.name]
    res = resources[compiled.name]
    bound = launch.bound()
    loops, accesses = analyze(launch.kernel, bound)
    warps = compiled.num_warps
    note = ""
    try:
        if method == "emulate":
            raise LoopMismatch("emulation asked for")
        matched = match_loops(function, loops)
        trips = {key: float(s.trips) for key, s in matched.items()}
        sources = {key: f"{os.path.basename(s.file)}:{s.line}" for key, s in matched.items()}
        multiplicity = kernel_model.uniform_multiplicity(function, trips, warps)
        reports = kernel_model.loop_reports(function, trips, sources)
    except LoopMismatch as error:
        if method == "loops":
            raise
        multiplicity = emulated_multiplicity(launch, compiled, function, cap)
        reports = emulated_loop_reports(function, multiplicity, warps)
        note = "counted by emulation: " + str(error).splitlines()[0][:200]
    work, kinds = kernel_model.work_from_sass(function, multiplicity)
    touched = [(bound[name], kinds_) for name, kinds_ in accesses.items() if isinstance(bound.get(name), torch.Tensor)]
    return kernel_model.KernelModel(
        backend=backend, name=compiled.name, phase=phase, arch=cap, programs=launch.programs, threads=32 * warps,
        registers=res.registers, spill_bytes=sass.spill_bytes(res, function),
        shared_bytes=compiled.shared + res.shared_static, work=work, hbm_bytes=kernel_model.unique_bytes(touched),
        loops=reports, tensor_kinds=kinds, note=note)


# ---- counting by emulation ---------------------------------------------------------------------------------------
_PTX_PARAM = re.compile(r"\.param\s+\.(u64|s64|b64|u32|s32|b32|f32|f64|u16|s16|b16|u8|s8|b8|pred)\b")


def param_bytes(launch, compiled) -> bytes:
    """The kernel parameter buffer of a launch: the runtime arguments in the order of the PTX entry's
    parameters (constexprs and arguments the JIT turned into constants are not parameters), then the
    extra pointers Triton appends (scratch buffers), each aligned to its size. Tensors get distinct fake
    addresses (aligned, non-null)."""
    import struct

    entry = compiled.ptx[compiled.ptx.index(".entry"):]
    entry = entry[:entry.index(")")]
    types = _PTX_PARAM.findall(entry)
    names = [p.name for p in launch.kernel.params]
    bound = launch.bound()
    runtime = [n for n in names if compiled.signature.get(n) != "constexpr"]
    pointers: Dict[int, int] = {}
    buf = bytearray()
    for i, ty in enumerate(types):
        size = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4, "u16": 2, "s16": 2,
                "b16": 2, "u8": 1, "s8": 1, "b8": 1, "pred": 1}[ty]
        while len(buf) % size:
            buf.append(0)
        value = bound[runtime[i]] if i < len(runtime) else None
        if value is None or isinstance(value, torch.Tensor):
            key = id(value) if value is not None else -i
            raw = pointers.setdefault(key, 0x7F00_0000_0000 + (len(pointers) + 1) * (1 << 36)).to_bytes(8, "little")
        elif ty == "f32":
            raw = struct.pack("<f", float(value))
        elif ty == "f64":
            raw = struct.pack("<d", float(value))
        else:
            raw = (int(value) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        buf += raw[:size]
    return bytes(buf)


def emulated_multiplicity(launch, compiled, function, cap: int) -> Dict[int, float]:
    """Warp-instructions per address of an average program: the first and the last program of the grid
    emulated (``benchmarks.sass_exec``) and weighted (the last stands for the partial tiles at the edges)."""
    from benchmarks import sass_exec

    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    const = sass_exec.constant_bank(param_bytes(launch, compiled), cap, 32 * compiled.num_warps, grid)
    programs = launch.programs
    banks = sass.constant_banks(compiled.cubin, compiled.name)
    first = sass_exec.run_block(function, const, 32 * compiled.num_warps, (0, 0, 0), grid, compiled.shared, cap,
                                banks=banks)
    samples = [(first, 1.0)]
    if programs > 1:
        last = sass_exec.run_block(function, const, 32 * compiled.num_warps, tuple(g - 1 for g in grid), grid,
                                   compiled.shared, cap, banks=banks)
        samples = [(first, (programs - 1) / programs), (last, 1.0 / programs)]
    total: Dict[int, float] = {}
    for counts, weight in samples:
        for address, n in counts.issued.items():
            total[address] = total.get(address, 0.0) + weight * n
    return total


def emulated_loop_reports(function, multiplicity, warps) -> List[kernel_model.LoopReport]:
    reports = []
    for loop in function.all_loops():
        head = multiplicity.get(loop.head, 0.0)
        enclosing = loop.parent
        entries = multiplicity.get(enclosing.head, float(warps)) if enclosing else float(warps)
        where = " <- ".join(f"{os.path.basename(f)}:{n}" for f, n in loop.location[:2])
        reports.append(kernel_model.LoopReport(loop.head, loop.tail, loop.depth, where,
                                               head / entries if entries else 0.0, {}))
    return reports


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


class _OpBodies:
    """A backend's ``OpLadder`` whose ops are their Python bodies (``*_impl``: no dispatcher, no autograd), as
    ``self`` of ``OpLadder.run``: the given bodies replace the ops of the same names (None: no such op), and
    every other attribute is the ladder's own."""

    def __init__(self, ops, **bodies):
        self._ops = ops
        self.__dict__.update(bodies)

    def __getattr__(self, name):
        return getattr(self._ops, name)


def run_call(ops, B: int, H: int, N: int, D: int, norm: str, dtype, counter, drain) -> Dict[str, list]:
    """{"fwd": [...], "bwd": [...]}: one call of a fused backend's Python path on meta tensors, below its
    custom-op layer: ``OpLadder.run`` with the forward op's body (and the padded_rows op's, where the backend
    pads rows ahead of it), then the backward op's body with what the forward saved (as the ladder's
    autograd does: the padded views); with eval-mode BatchNorm on a backend that has its
    inference op, also "infer": the call without gradients (that op). ``ops``: a backend's
    ``reattn.backends._ladder.OpLadder``.
    ``drain()`` returns (and forgets) the launches recorded so far; ``counter`` (an
    ``eager_model.OpCounter``) the torch operations."""
    from reattn.backends._ladder import OpLadder

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
        out = ops.forward_impl(*args)
        recorded["out"] = out
        return out

    steps: Dict[str, list] = {}
    if norm == "batch-eval" and ops.forward_eval_batchnorm is not None:
        # The call without gradients (inference: "infer", the static model's fwd rows) takes eval-mode
        # BatchNorm's own op; the call with gradients below folds the norm in autograd.
        OpLadder.run(_OpBodies(ops, forward=None, update_running_stats=None,
                               forward_eval_batchnorm=ops.eval_batchnorm_impl),
                     q, k, v, mix_weight, mix_bias, **options)
        steps["infer"] = _merge(drain(), counter)
    # The forward with gradients (its saved tensors feed the backward): eval-mode BatchNorm through the ladder's
    # fold, not the inference op (forward_eval_batchnorm) a call without gradients runs.
    OpLadder.run(_OpBodies(ops, forward=forward, update_running_stats=ops.running_stats_impl,
                           forward_eval_batchnorm=None,
                           padded_rows=None if ops.padded_rows is None else ops.padded_rows_impl),
                 q, k, v, mix_weight, mix_bias, **options)
    steps["fwd"] = _merge(drain(), counter)
    (q_, k_, v_, w_, c_, nw_, nb_, mask_, seed_, scale_, out_scale_, norm_, eps_, p_) = recorded["args"][:14]
    _, softmax_stats, stats, R, U = recorded["out"]
    grad_out = torch.empty(B, H, N, D, device="meta", dtype=dtype)
    ops.backward_impl(grad_out, q_, k_, v_, w_, c_, nw_, nb_, mask_, seed_, softmax_stats, stats, R, U, scale_,
                      out_scale_, norm_, eps_, p_)
    steps["bwd"] = _merge(drain(), counter)
    return steps


def fused_call(ops, B: int, H: int, N: int, D: int, norm: str, cap: int, dtype=torch.bfloat16):
    """{"fwd": [...], "bwd": [...]} of the call's steps in order: captured Triton launches
    (``kernels.capture.Launch``) and torch operations (``eager_model.Op``), for ``ops`` (a backend's
    ``OpLadder``) run below its custom-op layer on meta tensors."""
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
