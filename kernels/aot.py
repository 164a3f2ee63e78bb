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
