"""The CUDA side of the static model: the programs of ``csrc/cuda`` as ``reattn/_C*.so`` holds them.

The plumbing the CUDA programs' authors replace when the programs change is small and lives here:

* :func:`cuda_call` runs the CUDA backend's Python path (``reattn.backends._fused``: the same
  sequence per norm mode as the Triton backend) over :data:`SHIM`, a ``FusedKernels`` whose raw
  kernels do on ``device="meta"`` tensors what ``csrc/cuda/ops.cpp`` does around each launch (its
  allocations, zero fills, conversions: recorded by ``eager_model.OpCounter``) and record a
  :class:`Launch` where ops.cpp calls ``run(...)``: the program kind, the launch plan
  (``reattn._C.cuda_plan``, what the extension computes for the GPU's shared memory), the grid
  (B x plan.num_m, plan.num_chunks), 128 threads, the kernel parameter struct (``ReAttnParams``,
  mirrored with ctypes from ``csrc/cuda/params.h``; its size is checked against the compiled
  kernel's) and the tensors it reads and writes;
* :func:`model_launch` finds the program's cubin in the extension (``cuobjdump -xelf``), its
  resources (``cuobjdump -res-usage``) and counts what one thread block issues by running the SASS
  in ``benchmarks.sass_exec`` on the launch's parameter bytes.

Counting by emulation is exact for the code's control flow, but costs time per simulated block, so
the model emulates one program per distinct kind of program of a launch (the first query block,
whose rows all exist, for every query block; the first and a later head-dim chunk) with the key
sweep shortened to two and three key tiles (Nk = r + block_n and r + 2 block_n, r = Nk mod block_n
or block_n) and extrapolates linearly in the number of key tiles: every full key tile after the
first costs the same (the first differs: a sweep of one tile leaves it staged for the next sweep).
A test compares the extrapolation with a full emulation of a 4-tile sweep.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import cost_model, kernel_model, sass, sass_exec

THREADS = 128                      # kThreads in csrc/cuda/params.h
PROGRAM_KINDS = {"forward": 0, "batch_stats": 1, "backward": 2, "backward_stats": 3}
KIND_NAMES = {v: k for k, v in PROGRAM_KINDS.items()}
PARAM_OFFSET = sass_exec.PARAM_OFFSET
DTYPE_SYMBOL = {torch.bfloat16: "13__nv_bfloat16", torch.float16: "6__half", torch.float32: "f", torch.float64: "d"}
NORM_CODES = {"none": 0, "layer": 1, "batch": 2}
MASK_NONE = 0


# ---- csrc/cuda/params.h, mirrored ---------------------------------------------------------------------------
class Strides4(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("n", ctypes.c_int64), ("d", ctypes.c_int64)]


class Plan(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("block_m", "block_n", "pad", "head_dim_p", "heads_p", "head_group",
                                                  "chunk_d", "num_chunks", "num_m")] + [("shared_bytes",
                                                                                          ctypes.c_size_t)]


class ReAttnParams(ctypes.Structure):
    _fields_ = [
        ("B", ctypes.c_int64), ("H", ctypes.c_int), ("Nq", ctypes.c_int), ("Nk", ctypes.c_int), ("D", ctypes.c_int),
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("grad_out", ctypes.c_void_p),
        ("q_st", Strides4), ("k_st", Strides4), ("v_st", Strides4), ("do_st", Strides4),
        ("mask_kind", ctypes.c_int), ("mask", ctypes.c_void_p), ("mask_st", Strides4),
        ("W", ctypes.c_void_p), ("c", ctypes.c_void_p), ("gamma", ctypes.c_void_p), ("beta", ctypes.c_void_p),
        ("bn", ctypes.c_void_p), ("norm", ctypes.c_int),
        ("scale", ctypes.c_double), ("out_scale", ctypes.c_double), ("eps", ctypes.c_double),
        ("dropout_p", ctypes.c_double), ("seed", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("o_st", Strides4), ("lse", ctypes.c_void_p), ("lse_is_input", ctypes.c_bool),
        ("out_is_acc", ctypes.c_bool), ("moments", ctypes.c_void_p),
        ("shift", ctypes.c_double), ("s1", ctypes.c_void_p), ("gram", ctypes.c_void_p),
        ("dq", ctypes.c_void_p), ("dq_st", Strides4), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
        ("dW", ctypes.c_void_p), ("dc", ctypes.c_void_p), ("dgamma", ctypes.c_void_p), ("dbeta", ctypes.c_void_p),
        ("plan", Plan),
    ]


@dataclass
class Launch:
    """One launch of a fused CUDA program, as ops.cpp's ``run(...)`` makes it."""

    kind: int
    params: ReAttnParams
    dtype: torch.dtype
    touched: List[Tuple[torch.Tensor, set]] = field(default_factory=list)   # tensors and "read"/"write"/"atomic"
    order: int = 0

    @property
    def grid(self) -> Tuple[int, int]:
        return (int(self.params.B) * self.params.plan.num_m, self.params.plan.num_chunks)

    @property
    def programs(self) -> int:
        g = self.grid
        return g[0] * g[1]

    @property
    def name(self) -> str:
        return f"re_attention_kernel<{str(self.dtype).replace('torch.', '')}, {KIND_NAMES[self.kind]}>"


# ---- the extension -------------------------------------------------------------------------------------------
def extension_path() -> str:
    from reattn._extension import _C

    if _C is None or not hasattr(_C, "cuda_plan"):
        raise RuntimeError("reattn._C is not built (or predates the CUDA programs)")
    if not _C.build_info().get("cuda"):
        raise RuntimeError("reattn._C was built without CUDA: no cubin to model")
    return _C.__file__


def extension_toolchain() -> str:
    from reattn._extension import _C

    info = _C.build_info()
    return f"reattn._C built with CUDA {info.get('cuda_version', '?')} for sm_{info.get('cuda_archs', '?')}"


@functools.lru_cache(maxsize=None)
def _functions(arch: int, library: str) -> Tuple[Dict[str, sass.Function], Dict[str, sass.Resources]]:
    functions, resources = {}, {}
    for cubin in sass.extract_cubins(library, f"sm_{arch}"):
        fns = sass.disassemble(cubin)
        if any("re_attention_kernel" in name for name in fns):
            for name, fn in fns.items():
                fn.banks = sass.constant_banks(cubin, name)
            functions.update(fns)
            resources.update(sass.resource_usage(cubin))
    if not functions:
        raise RuntimeError(f"no sm_{arch} cubin with the fused programs in {library}")
    return functions, resources


def kernel_symbol(dtype: torch.dtype, kind: int) -> str:
    return f"_ZN6reattn4cuda19re_attention_kernelI{DTYPE_SYMBOL[dtype]}Li{kind}EEEvNS0_12ReAttnParamsE"


def shared_limit(arch: int, static: int) -> int:
    """What ops.cpp's device_shared_limit returns on the GPU: the opt-in maximum minus the static reservation."""
    from reattn.kernels.aot import SHARED_MEMORY_LIMIT

    return SHARED_MEMORY_LIMIT[arch] - static


# ---- the shim: ops.cpp's work around each launch, on meta tensors ----------------------------------------------
_FAKE_BASE = 0x7F00_0000_0000


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.launches: List[Launch] = []
        self.pointers: Dict[int, int] = {}

    def pointer(self, t: Optional[torch.Tensor], role: str) -> Optional[int]:
        """A fake device address per parameter field (``role``), null for an absent tensor: the programs only
        test pointers against null, and one address per field keeps equal launches byte-identical."""
        if t is None:
            return None
        if role not in self.pointers:
            self.pointers[role] = _FAKE_BASE + (len(self.pointers) + 1) * (1 << 36)
        return self.pointers[role]


_RECORDER: Optional[_Recorder] = None


def _strides(t: torch.Tensor) -> Strides4:
    return Strides4(*t.stride())


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param(t):
    """ops.cpp's parameter(): detach().to(acc).contiguous() (a kernel only when the dtype changes)."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _plan(kind: int, H: int, D: int, Nq: int, dtype: torch.dtype, arch: int) -> Plan:
    from reattn._extension import _C

    functions, resources = _functions(arch, extension_path())
    static = resources[kernel_symbol(dtype, kind)].shared_static
    plan = _C.cuda_plan(kind, H, D, Nq, str(dtype).replace("torch.", ""), shared_limit(arch, static))
    return Plan(**{k: int(plan[k]) for k in ("block_m", "block_n", "pad", "head_dim_p", "heads_p", "head_group",
                                              "chunk_d", "num_chunks", "num_m", "shared_bytes")})


def _prepare(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, seed, scale, dropout_p) -> Tuple[ReAttnParams, list]:
    rec = _RECORDER
    p = ReAttnParams()
    p.B, p.H, p.Nq, p.D = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    p.Nk = k.shape[2]
    p.q, p.k = rec.pointer(q, "q"), rec.pointer(k, "k")
    p.q_st, p.k_st = _strides(q), _strides(k)
    touched = [(q, {"read"}), (k, {"read"})]
    if v is not None:
        p.v, p.v_st = rec.pointer(v, "v"), _strides(v)
        touched.append((v, {"read"}))
    p.scale = scale
    if mix_weight is not None:
        params = [_param(t) for t in (mix_weight, mix_bias, norm_weight, norm_bias)]
        p.W, p.c, p.gamma, p.beta = (rec.pointer(t, r) for t, r in zip(params, ("W", "c", "gamma", "beta")))
        touched += [(t, {"read"}) for t in params if t is not None]
    p.mask_kind = MASK_NONE
    if dropout_p > 0.0:
        p.dropout_p = dropout_p
        p.seed = rec.pointer(seed, "seed")
    return p, touched


def _run(kind: int, q: torch.Tensor, p: ReAttnParams, touched) -> None:
    p.plan = _plan(kind, p.H, p.D, p.Nq, q.dtype, _RECORDER.arch)
    import time

    _RECORDER.launches.append(Launch(kind, p, q.dtype, touched, time.perf_counter_ns()))


def _set_norm(p, touched, norm, out_scale, eps, batch_stats, q):
    p.norm = NORM_CODES[norm]
    p.out_scale, p.eps = out_scale, eps
    if norm == "batch":
        rows = batch_stats.to(_acc(q.dtype))
        if rows.shape[0] == 2:
            rows = torch.cat([rows, torch.zeros_like(rows)])
        rows = rows.contiguous()
        p.bn = _RECORDER.pointer(rows, "bn")
        touched.append((rows, {"read"}))


def _forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *, scale,
             out_scale, norm, eps, dropout_p, with_moments=False):
    p, touched = _prepare(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, seed, scale, dropout_p)
    _set_norm(p, touched, norm, out_scale, eps, batch_stats, q)
    acc = _acc(q.dtype)
    if lse is not None:
        p.lse_is_input = True
        touched.append((lse, {"read"}))
    else:
        lse = torch.empty((q.shape[0], q.shape[1], q.shape[2]), dtype=acc, device=q.device)
        touched.append((lse, {"write"}))
    out = torch.empty(q.shape, dtype=acc if with_moments else q.dtype, device=q.device)
    moments = torch.zeros((2 if with_moments else 0, q.shape[1]), dtype=torch.float64, device=q.device)
    p.out, p.o_st, p.lse = _RECORDER.pointer(out, "out"), _strides(out), _RECORDER.pointer(lse, "lse")
    p.out_is_acc = with_moments
    p.moments = _RECORDER.pointer(moments, "moments") if with_moments else None
    touched.append((out, {"write"}))
    if with_moments:
        touched.append((moments, {"atomic"}))
    _run(PROGRAM_KINDS["forward"], q, p, touched)
    return (out, lse, moments) if with_moments else (out, lse)


def _gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift):
    p, touched = _prepare(q, k, None, None, None, None, None, seed, scale, dropout_p)
    lse = torch.empty((q.shape[0], q.shape[1], q.shape[2]), dtype=_acc(q.dtype), device=q.device)
    s1 = torch.zeros((q.shape[1],), dtype=torch.float64, device=q.device)
    gram = torch.zeros((q.shape[1], q.shape[1]), dtype=torch.float64, device=q.device)
    p.lse, p.shift = _RECORDER.pointer(lse, "lse"), shift
    p.s1, p.gram = _RECORDER.pointer(s1, "s1"), _RECORDER.pointer(gram, "gram")
    touched += [(lse, {"write"}), (s1, {"atomic"}), (gram, {"atomic"})]
    _run(PROGRAM_KINDS["batch_stats"], q, p, touched)
    return lse, s1, gram


def _cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, seed, lse, scale,
                   out_scale, norm, eps, dropout_p, stats_only):
    p, touched = _prepare(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, seed, scale, dropout_p)
    p.grad_out, p.do_st = _RECORDER.pointer(grad_out, "grad_out"), _strides(grad_out)
    touched += [(grad_out, {"read"}), (lse, {"read"})]
    _set_norm(p, touched, norm, out_scale, eps, batch_stats, q)
    acc = _acc(q.dtype)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros((B, H, Nk, D), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    f64 = dict(dtype=torch.float64, device=q.device)
    dW, dc, dgamma, dbeta = torch.zeros((H, H), **f64), torch.zeros((H,), **f64), torch.zeros((H,), **f64), \
        torch.zeros((H,), **f64)
    rec = _RECORDER
    p.lse = rec.pointer(lse, "lse")
    p.dq, p.dq_st, p.dk, p.dv = rec.pointer(dq, "dq"), _strides(dq), rec.pointer(dk, "dk"), rec.pointer(dv, "dv")
    p.dW, p.dc, p.dgamma, p.dbeta = (rec.pointer(t, r) for t, r in zip((dW, dc, dgamma, dbeta),
                                                                       ("dW", "dc", "dgamma", "dbeta")))
    if stats_only:
        touched += [(dgamma, {"atomic"}), (dbeta, {"atomic"})]
    else:
        touched += [(dq, {"write"}), (dk, {"atomic"}), (dv, {"atomic"}), (dW, {"atomic"}), (dc, {"atomic"}),
                    (dgamma, {"atomic"}), (dbeta, {"atomic"})]
    _run(PROGRAM_KINDS["backward_stats" if stats_only else "backward"], q, p, touched)
    return dq, dk.to(q.dtype), dv.to(q.dtype), dW, dc, dgamma, dbeta


def _backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *,
              scale, out_scale, norm, eps, dropout_p):
    dq, dk, dv, dw, dc, dnw, dnb = _cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                  batch_stats, seed, lse, scale, out_scale, norm, eps, dropout_p, False)
    return dq, dk, dv, dw, dc, dnw if norm == "layer" else None, dnb if norm == "layer" else None


def _backward_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse,
                   *, scale, out_scale, eps, dropout_p):
    *_, sum_dn_xhat, sum_dn = _cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                             batch_stats, seed, lse, scale, out_scale, "batch", eps, dropout_p, True)
    return torch.stack([sum_dn_xhat, sum_dn])


def _forward_moments(q, k, v, mix_weight, mix_bias, attn_mask, seed, *, scale, dropout_p):
    x_v, lse, moments = _forward(q, k, v, mix_weight, mix_bias, None, None, None, attn_mask, seed, None, scale=scale,
                                 out_scale=1.0, norm="none", eps=1e-5, dropout_p=dropout_p, with_moments=True)
    return x_v, lse, moments[None]


@functools.lru_cache(maxsize=None)
def shim_ops():
    """The CUDA backend's ops over the shim (``reattn::static_model_cuda_*``, registered once per process)."""
    from reattn.backends._fused import FusedKernels, define_fused_ops

    kernels = FusedKernels(forward=_forward, gram_sums=_gram_sums, backward_sums=_backward_sums, backward=_backward,
                           forward_moments=_forward_moments)
    # No device implementation: the static model calls the ops' Python bodies (FusedOps.python) directly.
    return define_fused_ops("static_model_cuda", kernels, ())


def cuda_call(B: int, H: int, N: int, D: int, norm: str, arch: int, dtype=torch.bfloat16) -> Dict[str, list]:
    """{"fwd": [...], "bwd": [...]}: the CUDA backend's launches (:class:`Launch`) and torch ops of one call."""
    global _RECORDER
    from benchmarks import triton_side
    from benchmarks.eager_model import OpCounter

    ops = shim_ops()
    _RECORDER = recorder = _Recorder(arch)
    try:
        with OpCounter() as counter:
            return triton_side.run_call(ops, B, H, N, D, norm, dtype, counter,
                                        lambda: triton_side._drain(recorder.launches))
    finally:
        _RECORDER = None


# ---- the model of one launch ------------------------------------------------------------------------------------
def _const_bank(params: ReAttnParams, arch: int, grid: Tuple[int, int]) -> bytes:
    return sass_exec.constant_bank(bytes(params), arch, THREADS, grid)


def _check_param_size(function_name: str, resources: sass.Resources, arch: int, library: str) -> None:
    text = subprocess.run([sass.tool("cuobjdump"), "-res-usage", "-arch", f"sm_{arch}", library], capture_output=True,
                          text=True).stdout
    m = re.search(re.escape(function_name) + r":\s*\n\s*REG:\d+.*?CONSTANT\[0\]:(\d+)", text)
    if m and int(m.group(1)) - PARAM_OFFSET[arch] != ctypes.sizeof(ReAttnParams):
        raise RuntimeError(f"ReAttnParams mirror is {ctypes.sizeof(ReAttnParams)} bytes but {function_name} takes "
                           f"{int(m.group(1)) - PARAM_OFFSET[arch]}: update benchmarks/cuda_side.py from params.h")


CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "reattn-static-model")


@functools.lru_cache(maxsize=None)
def _emulate(symbol: str, arch: int, const: bytes, grid: Tuple[int, int], ctaid: Tuple[int, int],
             shared: int) -> sass_exec.Counts:
    """sass_exec.run_block, cached on disk by the code, the parameters and the emulator's source."""
    import hashlib
    import pickle

    functions, _ = _functions(arch, extension_path())
    function = functions[symbol]
    key = hashlib.sha256()
    key.update("\n".join(f"{i.address} {i.text}" for i in function.instructions).encode())
    key.update(repr((symbol, arch, grid, ctaid, shared, THREADS)).encode())
    key.update(const)
    for bank, data in sorted(getattr(function, "banks", {}).items()):
        key.update(bytes([bank]) + data)
    with open(sass_exec.__file__, "rb") as f:
        key.update(f.read())
    path = os.path.join(CACHE_DIR, "emulation", key.hexdigest()[:40] + ".pkl")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError):
        pass
    counts = sass_exec.run_block(function, const, THREADS, (ctaid[0], ctaid[1], 0), (grid[0], grid[1], 1), shared,
                                 arch, banks=getattr(function, "banks", None))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(counts, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return counts


def program_counts(launch: Launch, arch: int) -> Tuple[Dict[int, float], sass_exec.Counts, Dict[int, float]]:
    """Warp-instructions per address of the launch's average program (see the module doc), and the emulator's
    counts of the programs it ran (for their unknown-branch and unmodelled diagnostics)."""
    p = launch.params
    plan = p.plan
    symbol = kernel_symbol(launch.dtype, launch.kind)
    tiles = -(-int(p.Nk) // plan.block_n)
    r = int(p.Nk) - (tiles - 1) * plan.block_n
    num_m, chunks = plan.num_m, plan.num_chunks
    # Programs differ only in which of their rows and columns exist: the first query block (all rows real)
    # stands for every block (the last one, with fewer real rows, does slightly less: the count leans high).
    m_samples = [(0, 1.0)]
    c_samples = [(0, 1.0 / chunks)] + ([(1, (chunks - 1) / chunks)] if chunks > 1 else [])
    total: Dict[int, float] = {}
    generic: Dict[int, float] = {}
    diag = sass_exec.Counts()
    # Nk for the runs: the sweep itself when it has at most 3 key tiles, else 2 and 3 tiles (the last
    # partial as in the real sweep), extrapolated. Not 1 and 2: with one tile the second sweep finds it
    # still staged (stage_once), which a longer sweep never does.
    lengths = (int(p.Nk),) if tiles <= 3 else (r + plan.block_n, r + 2 * plan.block_n)
    for m_block, wm in m_samples:
        for chunk, wc in c_samples:
            runs = []
            for nk in lengths:
                q = ReAttnParams.from_buffer_copy(bytes(p))
                q.Nk = nk
                q.B = 1
                const = _const_bank(q, arch, (num_m, chunks))
                counts = _emulate(symbol, arch, const, (num_m, chunks), (m_block, chunk), int(plan.shared_bytes))
                runs.append(counts)
                diag.add(counts)
            weight = wm * wc
            for field_, out in (("issued", total), ("generic_global", generic)):
                if len(runs) == 1:
                    for a, n in getattr(runs[0], field_).items():
                        out[a] = out.get(a, 0.0) + weight * n
                else:
                    c2, c3 = (getattr(r_, field_) for r_ in runs)
                    for a in set(c2) | set(c3):
                        n = c2.get(a, 0) + (tiles - 2) * (c3.get(a, 0) - c2.get(a, 0))
                        out[a] = out.get(a, 0.0) + weight * n
    return total, diag, generic


def model_launch(launch: Launch, arch: int) -> kernel_model.KernelModel:
    library = extension_path()
    functions, resources = _functions(arch, library)
    symbol = kernel_symbol(launch.dtype, launch.kind)
    function = functions[symbol]
    res = resources[symbol]
    _check_param_size(symbol, res, arch, library)
    multiplicity, diag, generic = program_counts(launch, arch)
    work, kinds = kernel_model.work_from_sass(function, multiplicity, generic)
    notes = []
    if diag.unknown_branches:
        notes.append(f"{sum(diag.unknown_branches.values())} branch decisions on unknown values taken as not taken")
    if diag.unmodelled:
        notes.append("no semantics for " + ", ".join(sorted(diag.unmodelled)))
    loops = []
    for loop in function.all_loops():
        entries = multiplicity.get(loop.head, 0.0)
        back = multiplicity.get(loop.tail, 0.0)
        loops.append(kernel_model.LoopReport(loop.head, loop.tail, loop.depth, "", back, {}))
    return kernel_model.KernelModel(
        backend="cuda", name=launch.name, phase="", arch=arch, programs=launch.programs, threads=THREADS,
        registers=res.registers, spill_bytes=sass.spill_bytes(res, function),
        shared_bytes=int(launch.params.plan.shared_bytes) + res.shared_static, work=work,
        hbm_bytes=kernel_model.unique_bytes(launch.touched), loops=loops, tensor_kinds=kinds, note="; ".join(notes))
