"""Ahead-of-time compilation of the Re-attention kernels for a GPU target, without a GPU.

``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` runs the whole compiler (to cubin)
on a machine with no GPU and reports the shared memory a kernel needs; the tests use it to catch
kernels that would not fit an A100 (sm_80) or H100 (sm_90) at the launch configuration the
heuristics pick. Run ``python -m reattn.kernels.aot '[job, ...]'`` (each job a JSON object, see
``compile_kernel``); it prints one ``AOT {json}`` line per job. Must not run under
``TRITON_INTERPRET=1`` (the interpreter has no compiler).

Nothing here imports ``reattn``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Dict, Optional

# Bytes per element of the dtypes a job can name.
ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}

# Shared memory per block (bytes) that a kernel may use, from the CUDA occupancy tables.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_FLOAT_ARGS = ("scale", "out_scale", "eps", "dropout_p", "shift")
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dqd", "stride_dkd",
                 "stride_dvd", "stride_lm", "stride_wh", "stride_c", "stride_nw", "stride_nb", "stride_mn")


def _pointer_types(kernel: str, dtype: str) -> Dict[str, str]:
    """Element type of every pointer argument: inputs in ``dtype``, statistics and reductions in fp32/fp64."""
    inputs = ("Q", "K", "V", "W", "C", "NW", "NB", "O", "DO", "DQ")
    types = dict.fromkeys(inputs, dtype)
    types.update(dict.fromkeys(("BN", "LSE", "MOM", "DK", "DV", "DW", "DC", "DNW", "DNB"), "fp32"))
    types.update(S1="fp64", GRAM="fp64", MASK="u8", SEED="i64")
    return types


def compile_kernel(kernel: str, h: int, d: int, n: int, cap: int, dtype: str = "bf16", norm: str = "layer",
                   mask: bool = True, dropout: bool = True, moments: bool = False,
                   config: Optional[Dict[str, int]] = None) -> dict:
    """Compile one kernel ("forward", "bn_stats" or "backward") for sm_<cap> at the heuristic's config.

    The heuristic gets sm_<cap>'s shared memory limit (``SHARED_MEMORY_LIMIT``; none for other caps).

    norm: "none", "layer" or "batch" (training BatchNorm); mask: bool mask on; dropout on;
    moments: the forward's per-program BatchNorm sums (one-sweep training BatchNorm, norm "none").
    config: fields of the launch configuration to override (BLOCK_N, BLOCK_D, num_warps, ...), to
    measure what another configuration would need.
    Returns the job with the launch config and ``shared`` (bytes of shared memory per program).
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from .common import MASK_BOOL, MASK_NONE, NORM_BATCH, NORM_LAYER, NORM_NONE
    from .launch import backward_config, forward_config

    limit = SHARED_MEMORY_LIMIT.get(cap)
    size = ELEMENT_SIZE[dtype]
    if kernel == "forward":
        from .forward import _re_attention_fwd_kernel as fn
        cfg = forward_config(n, n, d, h, interpret=False, shared_limit=limit, element_size=size)
    elif kernel == "bn_stats":
        from .bn_stats import _bn_stats_kernel as fn
        cfg = forward_config(n, n, d, h, interpret=False, shared_limit=limit, kernel="bn_stats",
                             element_size=size)
    elif kernel == "backward":
        from .backward import _re_attention_bwd_kernel as fn
        cfg = backward_config(n, n, d, h, interpret=False, shared_limit=limit, element_size=size)
    else:
        raise ValueError(f"kernel must be forward, bn_stats or backward, got {kernel!r}")
    if config:
        cfg = dataclasses.replace(cfg, **config)
    norm_id = {"none": NORM_NONE, "layer": NORM_LAYER, "batch": NORM_BATCH}[norm]
    flags = dict(HP=cfg.HP, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, HAS_MIX_BIAS=True,
                 NORM=norm_id, HAS_NORM_WEIGHT=norm != "none", HAS_NORM_BIAS=norm != "none",
                 MASK_KIND=MASK_BOOL if mask else MASK_NONE, HAS_DROPOUT=dropout, LSE_IS_INPUT=norm == "batch",
                 STATS_ONLY=False, MOMENTS=moments, D_CHUNKS=triton.cdiv(d, cfg.BLOCK_D), CDT=tl.float32,
                 DOT_LOWP=dtype in ("bf16", "fp16"), DOT_PRECISION="ieee")
    flags.update(dict.fromkeys(_UNIT_STRIDES, 1))  # what the JIT specializes for unit strides
    names = fn.arg_names
    const = {a: flags[a] for a in names if a in flags}
    pointers = _pointer_types(kernel, dtype)
    signature = {a: "constexpr" if a in const else "*" + pointers[a] if a in pointers
                 else "fp32" if a in _FLOAT_ARGS else "i32" for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a in pointers}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"no cubin for {kernel} at sm_{cap}")
    result = dict(kernel=kernel, h=h, d=d, n=n, cap=cap, dtype=dtype, norm=norm, mask=mask, dropout=dropout)
    if moments:
        result["moments"] = True
    if config:
        result["config"] = dict(config)
    return dict(**result, shared=compiled.metadata.shared, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, HP=cfg.HP,
                D_CHUNKS=flags["D_CHUNKS"])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m reattn.kernels.aot '[{\"kernel\": \"forward\", \"h\": 6, \"d\": 64, "
                         "\"n\": 197, \"cap\": 90}, ...]'")
    for job in json.loads(argv[0]):
        print("AOT " + json.dumps(compile_kernel(**job)), flush=True)


if __name__ == "__main__":
    main()


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


def compile_launch(kernel, args, kwargs, cap: int) -> CompiledLaunch:
    """Compile ``kernel`` for sm_<cap> with the arguments of a launch, specialized as the JIT would.

    ``args``/``kwargs`` are what ``kernel[grid](*args, **kwargs)`` receives (e.g. a record of
    ``kernels.capture.capture_launches``). Triton's on-disk cache makes a repeated compile cheap.
    """
    import hashlib

    import triton

    target, backend, signature, constexprs, attrs, options, specialization = jit_compile_inputs(
        kernel, args, kwargs, cap)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError(f"no cubin for {kernel.fn.__name__} at sm_{cap}")
    names = [p.name for p in kernel.params]
    spec = {n: (s[1] if isinstance(s, tuple) and len(s) > 1 and isinstance(s[1], str) else "")
            for n, s in zip(names, specialization) if signature.get(n) != "constexpr"}
    key = hashlib.sha256(repr((kernel.cache_key, sorted(signature.items()), sorted(map(repr, constexprs.items())),
                               sorted(map(repr, attrs.items())), sorted(options.__dict__.items(), key=str),
                               cap, triton.__version__)).encode()).hexdigest()[:32]
    named_constexprs = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    return CompiledLaunch(name=kernel.fn.__name__, cap=cap, cubin=cubin, ptx=compiled.asm.get("ptx", ""),
                          shared=int(compiled.metadata.shared),
                          num_warps=int(compiled.metadata.num_warps), num_stages=int(compiled.metadata.num_stages),
                          signature=dict(signature), constexprs=named_constexprs, specialization=spec, cache_key=key)
