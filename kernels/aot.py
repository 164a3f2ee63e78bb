"""Ahead-of-time compilation of the Re-attention kernels for a GPU target, without a GPU.

``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` runs the whole compiler (to cubin)
on a machine with no GPU and reports the shared memory a kernel needs; the tests use it to catch
kernels that would not fit an A100 (sm_80) or H100 (sm_90) at the launch configuration the
heuristics pick. Run ``python -m reattn.kernels.aot '[job, ...]'`` (each job a JSON object, see
``compile_call``); it prints one ``AOT {json}`` line per compiled launch. Must not run under
``TRITON_INTERPRET=1`` (the interpreter has no compiler).

Nothing here imports ``reattn``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Dict, Optional

from .launch import SHARED_MEMORY_LIMIT  # noqa: F401  (the limits the compiles below check against)

# Bytes per element of the dtypes a job can name.
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}

CALLS = ("forward", "moments", "gram", "backward", "bn_grad_sums")


def capture_call(call: str, h: int, d: int, n: int, cap: int, dtype: str = "bf16", norm: str = "layer",
                 mask: bool = True, dropout: bool = True, b: int = 2):
    """The launches one entry point of the kernels makes for a problem, on sm_<cap> (``kernels.capture``).

    call: "forward", "moments" (training BatchNorm's one-sweep forward, as the backend calls it: the shift
    formed by the programs, ``center_keys``, and U summed where rows past n allow, ``value_sums``), "gram" (the
    statistics sweep), "backward" (both kernels) or "bn_grad_sums" (the backward's BatchNorm sums). norm: "none",
    "layer", "batch" (training BatchNorm with given statistics) or "batch-eval" (the forward folding eval
    BatchNorm from the running statistics); mask: a bool mask for all heads;
    dropout: p = 0.1. Tensors live on ``device="meta"``, so sizes cost nothing.
    """
    import torch

    from .backward import re_attention_backward, re_attention_bn_grad_sums
    from .capture import capture_launches
    from .forward import re_attention_forward
    from .gram import gram_sums

    if call not in CALLS:
        raise ValueError(f"call must be one of {CALLS}, got {call!r}")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    acc = torch.float64 if dt == torch.float64 else torch.float32
    meta = dict(device="meta")
    q = torch.empty(b, h, n, d, dtype=dt, **meta)
    k, v = torch.empty_like(q), torch.empty_like(q)
    w, c = torch.empty(h, h, **meta), torch.empty(h, **meta)
    eval_stats = {}
    if norm == "batch-eval":  # BatchNorm's per-head map from the running statistics, folded by the forward
        if call != "forward":
            raise ValueError(f"norm 'batch-eval' is the forward's alone, got call {call!r}")
        eval_stats, norm = dict(running_mean=torch.empty(h, **meta), running_var=torch.empty(h, **meta)), "batch"
    nw = torch.empty(h, **meta) if norm != "none" else None
    attn_mask = torch.empty(b, 1, n, n, dtype=torch.bool, **meta) if mask else None
    seed = torch.empty(1, dtype=torch.int64, **meta)
    p = 0.1 if dropout else 0.0
    stats = torch.empty(2, b, h, n, dtype=acc, **meta)
    kw = dict(scale=0.125, attn_mask=attn_mask, dropout_p=p, seed=seed)
    with capture_launches(cap=cap) as launches:
        if call == "forward":
            batch_stats = torch.empty(2, h, dtype=acc, **meta) if norm == "batch" and not eval_stats else None
            re_attention_forward(q, k, v, w, c, norm=norm, norm_weight=nw, norm_bias=nw, batch_stats=batch_stats,
                                 **eval_stats, **kw)
        elif call == "moments":  # as the Triton backend's one-sweep BatchNorm calls it: shift formed, U summed,
            # X V in q's dtype without a mask (kept for the backward), else in the accumulation dtype
            re_attention_forward(q, k, v, w, None, with_moments=True, value_sums=True, center_keys=n,
                                 out=torch.empty(q.shape, dtype=acc if mask else dt, **meta), **kw)
        elif call == "gram":
            gram_sums(q, k, attn_mask, seed, scale=0.125, dropout_p=p, shift=1.0 / n)
        elif call == "backward":
            re_attention_backward(q, q, k, v, w, c, stats, norm=norm, norm_weight=nw, norm_bias=nw,
                                  bn_coefficients=torch.empty(4, h, dtype=acc, **meta) if norm == "batch" else None,
                                  **kw)
        else:
            re_attention_bn_grad_sums(q, q, k, v, w, c, stats, norm_weight=nw, norm_bias=nw,
                                      batch_stats=torch.empty(2, h, dtype=acc, **meta), **kw)
    return launches


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """{"registers", "spill_bytes"} of a cubin's kernel, read by ``cuobjdump -res-usage`` (the triton wheel's)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}
    return dict(registers=usage.get("REG", 0), spill_bytes=max(usage.get("STACK", 0), usage.get("LOCAL", 0)))


def compile_call(call: str, h: int, d: int, n: int, cap: int, dtype: str = "bf16", norm: str = "layer",
                 mask: bool = True, dropout: bool = True) -> list:
    """Compile every launch of one call (``capture_call``) for sm_<cap> as the JIT would (``compile_launch``).

    Returns one dict per launch: the job, the kernel's name, its tiles and launch options, the
    shared memory it asks for, registers, spill bytes and the compile's ``cache_key`` (which
    ``launch_keys`` recomputes without compiling).
    """
    job = dict(call=call, h=h, d=d, n=n, cap=cap, dtype=dtype, norm=norm, mask=mask, dropout=dropout)
    results = []
    for launch in capture_call(call, h, d, n, cap, dtype, norm, mask, dropout):
        compiled = compile_launch(launch.kernel, launch.args, launch.kwargs, cap)
        # A kernel without slots or head-dim chunks (the softmax statistics kernel: one head per program,
        # the whole head dim) reports HP = G = D_CHUNKS = 1.
        tiles = {"HP": 1, "G": 1, "D_CHUNKS": 1}
        tiles.update({k: v for k, v in launch.constexprs().items()
                      if k in ("HP", "G", "BLOCK_M", "BLOCK_N", "BLOCK_D", "STATS_BLOCK_N", "D_CHUNKS")})
        results.append(dict(job, kernel=launch.name, grid=list(launch.grid), **tiles, **launch.options(),
                            shared=compiled.shared, **resource_usage(compiled.cubin), cache_key=compiled.cache_key))
    return results


def launch_keys(call: str, h: int, d: int, n: int, cap: int, dtype: str = "bf16", norm: str = "layer",
                mask: bool = True, dropout: bool = True) -> list:
    """The ``cache_key`` of every launch of one call (as ``compile_call`` reports them), without compiling:
    a recorded compile whose key differs is stale (the kernel source, its launch or Triton changed)."""
    return [compile_key(launch.kernel, launch.args, launch.kwargs, cap)
            for launch in capture_call(call, h, d, n, cap, dtype, norm, mask, dropout)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m reattn.kernels.aot '[{\"call\": \"forward\", \"h\": 6, \"d\": 64, "
                         "\"n\": 197, \"cap\": 90}, ...]'")
    for job in json.loads(argv[0]):
        for result in compile_call(**job):
            print("AOT " + json.dumps(result), flush=True)


@dataclasses.dataclass
class CompiledLaunch:
    """A Triton kernel compiled for a target as the JIT compiles it for a launch."""

    name: str              # the kernel's function name
    cap: int               # compute capability of the target (80, 86, 90, ...)
    cubin: bytes
    ptx: str
    shared: int            # bytes of shared memory per program (Triton's metadata: what the launch asks for)
    num_warps: int
    num_stages: int
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    specialization: Dict[str, str]   # argument -> JIT specialization ("D": divisible by 16, "": none)
    cache_key: str         # hash of the kernel source (with its jit callees), specialization, options, target


def jit_compile_inputs(kernel, args, kwargs, cap: int):
    """(target, backend, signature, constexprs, attrs, options) exactly as ``kernel[grid](*args, **kwargs)``
    would compile on a GPU of compute capability ``cap`` (Triton >= 3.4's ``JITFunction.run``, reused).

    The JIT specializes each argument (``native_specialize_impl``): a tensor whose address is a
    multiple of 16 gets ``tt.divisibility = 16``; an integer equal to 1 becomes a constant; an integer
    that is a multiple of 16 gets a divisibility hint. Meta tensors have address 0, like the aligned
    blocks of torch's caching allocator.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (3.9)
        if hasattr(knobs.compilation, name):
            kw[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    return target, backend, signature, constexprs, attrs, options, specialization


def _cache_key(kernel, signature, constexprs, attrs, options, cap: int) -> str:
    """Hash of the kernel source (with its jit callees), specialization, options, target and Triton version."""
    import hashlib

    import triton

    # Options name libdevice by its path inside the environment's triton; the file is Triton's own
    # (the version is hashed), so only its name counts: the same compile has one key in every clone.
    opts = {k: (tuple((name, os.path.basename(path)) for name, path in v) if k == "extern_libs" else v)
            for k, v in options.__dict__.items()}
    return hashlib.sha256(repr((kernel.cache_key, sorted(signature.items()), sorted(map(repr, constexprs.items())),
                                sorted(map(repr, attrs.items())), sorted(opts.items(), key=str),
                                cap, triton.__version__)).encode()).hexdigest()[:32]


def compile_key(kernel, args, kwargs, cap: int) -> str:
    """``compile_launch(...).cache_key`` without compiling."""
    _, _, signature, constexprs, attrs, options, _ = jit_compile_inputs(kernel, args, kwargs, cap)
    return _cache_key(kernel, signature, constexprs, attrs, options, cap)


def compile_launch(kernel, args, kwargs, cap: int) -> CompiledLaunch:
    """Compile ``kernel`` for sm_<cap> with the arguments of a launch, specialized as the JIT would.

    ``args``/``kwargs`` are what ``kernel[grid](*args, **kwargs)`` receives (e.g. a record of
    ``kernels.capture.capture_launches``). Triton's on-disk cache makes a repeated compile cheap.
    """
    import triton

    target, backend, signature, constexprs, attrs, options, specialization = jit_compile_inputs(
        kernel, args, kwargs, cap)
    key = _cache_key(kernel, signature, constexprs, attrs, options, cap)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError(f"no cubin for {kernel.fn.__name__} at sm_{cap}")
    names = [p.name for p in kernel.params]
    spec = {n: (s[1] if isinstance(s, tuple) and len(s) > 1 and isinstance(s[1], str) else "")
            for n, s in zip(names, specialization) if signature.get(n) != "constexpr"}
    named_constexprs = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    return CompiledLaunch(name=kernel.fn.__name__, cap=cap, cubin=cubin, ptx=compiled.asm.get("ptx", ""),
                          shared=int(compiled.metadata.shared),
                          num_warps=int(compiled.metadata.num_warps), num_stages=int(compiled.metadata.num_stages),
                          signature=dict(signature), constexprs=named_constexprs, specialization=spec, cache_key=key)


if __name__ == "__main__":
    main()
