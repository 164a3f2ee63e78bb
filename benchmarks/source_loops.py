"""The runtime loops a Triton kernel executes for one launch, read from its source.

For a launch (the jit function and its bound arguments), walk the kernel's Python source and the
``@triton.jit`` helpers it calls (their parameters bound from the call's arguments):

* ``for x in range(a, b, c)`` / ``tl.range(...)`` is a runtime loop: its trip count is evaluated
  from the launch's integer arguments and constexprs (``ceil((b - a) / c)``);
* ``for x in tl.static_range(n)`` is unrolled by Triton: its body is walked n times, so loops in
  it appear n times (as siblings) and no loop of its own exists in the compiled code;
* ``if`` on constexprs takes only the branch the constexprs select (the other is never compiled);
  ``if`` on runtime values compiles both branches: their loops are declared with ``runtime_if``;
* ``while`` loops and trip counts that depend on values unknown at launch raise ValueError.

Along the way it records which pointer arguments the launch reads and writes: the first argument
of ``tl.load`` / ``tl.store`` / ``tl.atomic_*`` traced back (through assignments and helper
arguments) to the kernel's parameters; ``accesses`` gives the unique bytes a launch moves.

The result is a forest of :class:`SourceLoop` with the file and line of each ``for`` and the call
sites it is inlined at, which is what the compiled code's line information names for the loop's
backward branch: ``benchmarks.static_model`` matches the two and refuses to model a kernel whose
compiled loops differ from its source loops.
"""
from __future__ import annotations

import ast
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

UNKNOWN = object()


@dataclass
class SourceLoop:
    file: str
    line: int
    trips: int
    calls: Tuple[Tuple[str, int], ...]      # call sites it is inlined at, innermost first
    children: List["SourceLoop"] = field(default_factory=list)
    text: str = ""
    runtime_if: bool = False                # inside an ``if`` on a runtime value

    @property
    def location(self) -> Tuple[Tuple[str, int], ...]:
        return ((self.file, self.line),) + self.calls

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


def _jit_functions():
    import triton

    return (triton.runtime.jit.JITFunction,)


_MEMORY_OPS = {"load": "read", "store": "write", "atomic_add": "atomic", "atomic_max": "atomic",
               "atomic_min": "atomic", "atomic_xchg": "atomic", "atomic_cas": "atomic", "atomic_and": "atomic",
               "atomic_or": "atomic", "atomic_xor": "atomic"}


class _Walker:
    def __init__(self):
        import triton
        import triton.language as tl

        self.accesses: Dict[str, set] = {}
        self.base_ns = {"tl": tl, "triton": triton, "range": range, "min": min, "max": max, "int": int, "len": len,
                        "math": math}

    def walk_function(self, jit, env: Dict[str, Any], calls: Tuple[Tuple[str, int], ...], runtime_if: bool,
                      depth: int = 0) -> List[SourceLoop]:
        if depth > 20:
            raise ValueError("source_loops: call depth over 20 (recursion?)")
        fn = jit.fn
        lines, first = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        fdef = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        file = os.path.realpath(inspect.getsourcefile(fn))
        ctx = dict(file=file, offset=first - 1, globals=fn.__globals__, source=lines)
        return self.block(fdef.body, dict(env), ctx, calls, runtime_if, depth)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, node, env, ctx):
        try:
            code = compile(ast.Expression(node), "<source_loops>", "eval")
            ns = dict(ctx["globals"])
            ns.update(self.base_ns)
            ns.update({k: v for k, v in env.items() if v is not UNKNOWN})
            unknown = {k for k, v in env.items() if v is UNKNOWN}
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if names & unknown:
                return UNKNOWN
            return eval(code, ns)  # noqa: S307 - the kernel's own source, evaluated on launch values
        except Exception:
            return UNKNOWN

    def is_jit(self, node, env, ctx):
        if not isinstance(node, ast.Call):
            return None
        target = self.evaluate(node.func, env, ctx)
        if target is not UNKNOWN and isinstance(target, _jit_functions()):
            return target
        return None

    def bind(self, callee, call, env, ctx):
        params = [p.name for p in callee.params]
        values: Dict[str, Any] = {}
        origins: Dict[str, frozenset] = {}
        for name, arg in zip(params, call.args):
            values[name] = self.evaluate(arg, env, ctx)
            origins[name] = self.origin(arg, env)
        for kw in call.keywords:
            if kw.arg is not None:
                values[kw.arg] = self.evaluate(kw.value, env, ctx)
                origins[kw.arg] = self.origin(kw.value, env)
        for p in callee.params:
            if p.name not in values:
                values[p.name] = p.default if p.has_default else UNKNOWN
        values["__ptr__"] = origins
        return values

    @staticmethod
    def origin(node, env) -> frozenset:
        """Kernel pointer parameters an expression is derived from (names in it, traced through assignments)."""
        table = env.get("__ptr__", {})
        result = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in table:
                result |= table[n.id]
        return frozenset(result)

    def record_access(self, call, env, ctx):
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else None
        if name not in _MEMORY_OPS or not call.args:
            return
        if isinstance(func.value, ast.Name) and func.value.id in ("tl", "triton"):
            target = call.args[0]
        else:  # a tensor descriptor / block pointer method: desc.load(...), desc.store(...)
            target = func.value
        for param in self.origin(target, env):
            self.accesses.setdefault(param, set()).add(_MEMORY_OPS[name])

    # -- statements -------------------------------------------------------------------------------
    def calls_in(self, node, env, ctx, calls, runtime_if, depth) -> List[SourceLoop]:
        """Loops of the jit helpers called inside an expression or simple statement, in source order."""
        found: List[SourceLoop] = []
        nodes = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
        nodes.sort(key=lambda n: (n.lineno, n.col_offset))
        for call in nodes:
            self.record_access(call, env, ctx)
            callee = self.is_jit(call, env, ctx)
            if callee is not None:
                site = (ctx["file"], ctx["offset"] + call.lineno)
                found += self.walk_function(callee, self.bind(callee, call, env, ctx), (site,) + calls, runtime_if,
                                            depth + 1)
        return found

    def assign(self, targets, value_node, env, ctx):
        value = self.evaluate(value_node, env, ctx)
        origin = self.origin(value_node, env)
        table = dict(env.get("__ptr__", {}))
        for target in targets:
            for n in ast.walk(target):
                if isinstance(n, ast.Name):
                    if origin:
                        table[n.id] = origin
                    else:
                        table.pop(n.id, None)
        env["__ptr__"] = table
        for target in targets:
            if isinstance(target, ast.Name):
                env[target.id] = value
            elif isinstance(target, (ast.Tuple, ast.List)):
                for i, elt in enumerate(target.elts):
                    if isinstance(elt, ast.Name):
                        try:
                            env[elt.id] = value[i] if value is not UNKNOWN else UNKNOWN
                        except Exception:
                            env[elt.id] = UNKNOWN

    def block(self, body, env, ctx, calls, runtime_if, depth) -> List[SourceLoop]:
        loops: List[SourceLoop] = []
        for stmt in body:
            if isinstance(stmt, ast.For):
                loops += self.for_loop(stmt, env, ctx, calls, runtime_if, depth)
            elif isinstance(stmt, ast.While):
                raise ValueError(f"source_loops: while loop at {ctx['file']}:{ctx['offset'] + stmt.lineno} "
                                 "(trip count unknown before the launch)")
            elif isinstance(stmt, ast.If):
                cond = self.evaluate(stmt.test, env, ctx)
                loops += self.calls_in(stmt.test, env, ctx, calls, runtime_if, depth)
                if cond is UNKNOWN:
                    loops += self.block(stmt.body, env, ctx, calls, True, depth)
                    loops += self.block(stmt.orelse, env, ctx, calls, True, depth)
                else:
                    loops += self.block(stmt.body if cond else stmt.orelse, env, ctx, calls, runtime_if, depth)
            elif isinstance(stmt, ast.Assign):
                loops += self.calls_in(stmt.value, env, ctx, calls, runtime_if, depth)
                self.assign(stmt.targets, stmt.value, env, ctx)
            elif isinstance(stmt, ast.AnnAssign):
                if stmt.value is not None:
                    loops += self.calls_in(stmt.value, env, ctx, calls, runtime_if, depth)
                    self.assign([stmt.target], stmt.value, env, ctx)
            elif isinstance(stmt, ast.AugAssign):
                loops += self.calls_in(stmt.value, env, ctx, calls, runtime_if, depth)
                if isinstance(stmt.target, ast.Name):
                    env[stmt.target.id] = UNKNOWN
            elif isinstance(stmt, (ast.Expr, ast.Return)):
                if stmt.value is not None:
                    loops += self.calls_in(stmt.value, env, ctx, calls, runtime_if, depth)
            elif isinstance(stmt, (ast.With,)):
                loops += self.block(stmt.body, env, ctx, calls, runtime_if, depth)
            elif isinstance(stmt, (ast.Pass, ast.Break, ast.Continue, ast.Assert, ast.FunctionDef)):
                continue
            else:
                loops += self.calls_in(stmt, env, ctx, calls, runtime_if, depth)
        return loops

    def for_loop(self, stmt, env, ctx, calls, runtime_if, depth) -> List[SourceLoop]:
        it = stmt.iter
        line = ctx["offset"] + stmt.lineno
        where = f"{ctx['file']}:{line}"
        if not isinstance(it, ast.Call):
            raise ValueError(f"source_loops: loop at {where} is not over range/tl.range/tl.static_range")
        func = self.evaluate(it.func, env, ctx)
        import triton.language as tl

        args = [self.evaluate(a, env, ctx) for a in it.args]
        var = stmt.target.id if isinstance(stmt.target, ast.Name) else None
        if func is tl.static_range:
            if any(a is UNKNOWN for a in args):
                raise ValueError(f"source_loops: tl.static_range bounds at {where} are not constexprs")
            loops: List[SourceLoop] = []
            for value in range(*args):
                inner = dict(env)
                if var:
                    inner[var] = value
                loops += self.block(stmt.body, inner, ctx, calls, runtime_if, depth)
            return loops
        if func is range or func is tl.range:
            bounds = args if len(args) != 1 else [0, args[0]]
            if len(bounds) == 2:
                bounds = bounds + [1]
            if any(a is UNKNOWN for a in bounds[:3]):
                raise ValueError(f"source_loops: trip count of the loop at {where} is unknown at launch "
                                 f"(range{tuple('?' if a is UNKNOWN else a for a in args)})")
            start, stop, step = (int(x) for x in bounds[:3])
            trips = max(0, -(-(stop - start) // step)) if step > 0 else max(0, -(-(start - stop) // -step))
            inner = dict(env)
            if var:
                inner[var] = UNKNOWN
            text = ctx["source"][stmt.lineno - 1].strip()
            return [SourceLoop(ctx["file"], line, trips, calls, self.block(stmt.body, inner, ctx, calls, runtime_if,
                                                                          depth), text, runtime_if)]
        raise ValueError(f"source_loops: loop at {where} iterates {ast.unparse(it)}; expected range, tl.range or "
                         "tl.static_range")


def analyze(kernel, bound: Dict[str, Any]) -> Tuple[List[SourceLoop], Dict[str, set]]:
    """(runtime loops, {pointer parameter: {"read", "write", "atomic"}}) of ``kernel`` (a
    ``triton.JITFunction``) for a launch with arguments ``bound`` (by name).

    Tensor arguments are unknown values; integers, floats and constexprs are known.
    """
    import torch

    env: Dict[str, Any] = {}
    origins = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            env[name] = UNKNOWN
            origins[name] = frozenset([name])
        else:
            env[name] = value
    env["__ptr__"] = origins
    walker = _Walker()
    loops = walker.walk_function(kernel, env, (), False)
    return loops, walker.accesses


def source_loops(kernel, bound: Dict[str, Any]) -> List[SourceLoop]:
    """Runtime loops of ``kernel`` for a launch with arguments ``bound`` (see :func:`analyze`)."""
    return analyze(kernel, bound)[0]
