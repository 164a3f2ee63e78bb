"""Ahead-of-time compilation of the Re-attention kernels for a GPU target, without a GPU.

``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` runs the whole compiler (to cubin)
on a machine with no GPU and reports the shared memory a kernel needs; the tests use it to catch
kernels that would not fit an A100 (sm_80), an RTX 3090/4090-class GPU (sm_86/89) or an H100
(sm_90) at the launch configuration the heuristics pick. A job is compiled as a real launch: the
kernel's entry point runs on meta tensors under ``kernels.capture`` (so the launch rule sees the
target's shared memory) and the recorded launch is compiled with the JIT's own specialization of
its arguments (``compile_launch``: unit strides become constants, multiples of 16 get divisibility
hints), which changes the shared memory a kernel asks for. Run ``python -m reattn.kernels.aot '[job, ...]'`` (each job a JSON object, see
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

_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def capture_job(kernel: str, h: int, d: int, n: int, cap: int, dtype: str = "bf16", norm: str = "layer",
                mask: bool = True, dropout: bool = True, moments: bool = False, config: Optional[Dict[str, int]] = None,
                batch: int = 2):
    """The launch (``kernels.capture.Launch``) the kernel's entry point makes for a job on a GPU of sm_<cap>.

    Inputs are contiguous [batch, h, n, d] tensors on the meta device; the mask is a bool [batch, 1, n, n]
    (broadcast over heads), dropout draws p = 0.1 with an int64 seed, norms are affine, the mixing has
    a bias. The launch rule gets sm_<cap>'s shared memory limit through the capture.
    """
    import torch

    from .backward import re_attention_backward
    from .bn_stats import gram_sums
    from .capture import capture_launches
    from .forward import re_attention_forward
    from .launch import backward_config, forward_config

    if kernel not in ("forward", "bn_stats", "backward"):
        raise ValueError(f"kernel must be forward, bn_stats or backward, got {kernel!r}")
    tdtype = getattr(torch, _TORCH_DTYPES[dtype])
    acc = torch.float64 if tdtype == torch.float64 else torch.float32
    meta = dict(device="meta")
    q, k, v, do = (torch.empty(batch, h, n, d, dtype=tdtype, **meta) for _ in range(4))
    w, c, nw, nb = (torch.empty(*shape, dtype=acc, **meta) for shape in ((h, h), (h,), (h,), (h,)))
    attn_mask = torch.empty(batch, 1, n, n, dtype=torch.bool, **meta) if mask else None
    seed = torch.empty(1, dtype=torch.int64, **meta) if dropout else None
    p = 0.1 if dropout else 0.0
    lse = torch.empty(batch, h, n, dtype=acc, **meta)
    affine = dict(norm_weight=nw, norm_bias=nb) if norm != "none" else {}
    size = ELEMENT_SIZE[dtype]
    with capture_launches(cap) as launches:
        from .launch import device_shared_limit

        limit = device_shared_limit("cuda")
        if kernel == "backward":
            cfg = backward_config(n, n, d, h, interpret=False, shared_limit=limit, element_size=size)
        else:
            cfg = forward_config(n, n, d, h, interpret=False, shared_limit=limit, element_size=size,
                                 kernel=kernel)
        if config:
            cfg = dataclasses.replace(cfg, **config)
        common = dict(scale=d ** -0.5, attn_mask=attn_mask, dropout_p=p, seed=seed, config=cfg)
        if kernel == "forward":
            if moments:
                re_attention_forward(q, k, v, w, c, out=torch.empty(q.shape, dtype=acc, **meta), with_moments=True,
                                     **common)
            elif norm == "batch":  # given batch statistics, the logsumexp the statistics sweep wrote
                re_attention_forward(q, k, v, w, c, norm="batch", batch_stats=torch.empty(2, h, dtype=acc, **meta),
                                     lse=lse, lse_is_input=True, **affine, **common)
            else:
                re_attention_forward(q, k, v, w, c, norm=norm, **affine, **common)
        elif kernel == "bn_stats":
            common.pop("config")
            gram_sums(q, k, attn_mask, seed, scale=d ** -0.5, dropout_p=p, shift=1.0 / n, config=cfg)
        else:
            re_attention_backward(do, q, k, v, w, c, lse, norm=norm, **affine,
                                  batch_stats=torch.empty(4, h, dtype=acc, **meta) if norm == "batch" else None,
                                  **common)
    (launch,) = launches
    return launch


def compile_kernel(kernel: str, h: int, d: int, n: int, cap: int, dtype: str = "bf16", norm: str = "layer",
                   mask: bool = True, dropout: bool = True, moments: bool = False,
                   config: Optional[Dict[str, int]] = None) -> dict:
    """Compile one kernel ("forward", "bn_stats" or "backward") for sm_<cap> as a real launch would.

    The launch is the one the kernel's entry point makes (``capture_job``: the launch rule picks the
    configuration for sm_<cap>'s shared memory), compiled with the JIT's specialization of its
    arguments (``compile_launch``): what the GPU would be asked to run.

    norm: "none", "layer" or "batch" (training BatchNorm: given statistics; the backward's main sweep);
    mask: a bool mask; dropout on; moments: the forward's per-program BatchNorm sums (one-sweep
    training BatchNorm, norm "none"). config: fields of the launch configuration to override
    (BLOCK_N, BLOCK_D, num_warps, ...), to measure what another configuration would need.
    Returns the job with the launch config and ``shared`` (bytes of shared memory per program).
    """
    launch = capture_job(kernel, h, d, n, cap, dtype, norm, mask, dropout, moments, config)
    compiled = compile_launch(launch.kernel, launch.args, launch.kwargs, cap)
    const = launch.constexprs()
    result = dict(kernel=kernel, h=h, d=d, n=n, cap=cap, dtype=dtype, norm=norm, mask=mask, dropout=dropout)
    if moments:
        result["moments"] = True
    if config:
        result["config"] = dict(config)
    return dict(**result, shared=compiled.shared, num_warps=compiled.num_warps, num_stages=compiled.num_stages,
                BLOCK_M=const["BLOCK_M"], BLOCK_N=const["BLOCK_N"], BLOCK_D=const["BLOCK_D"], HP=const["HP"],
                D_CHUNKS=const["D_CHUNKS"])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m reattn.kernels.aot '[{\"kernel\": \"forward\", \"h\": 6, \"d\": 64, "
                         "\"n\": 197, \"cap\": 90}, ...]'")
    for job in json.loads(argv[0]):
        print("AOT " + json.dumps(compile_kernel(**job)), flush=True)



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


if __name__ == "__main__":
    main()
