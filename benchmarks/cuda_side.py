"""The CUDA side of the static model: the programs of ``csrc/cuda`` as ``reattn/_C*.so`` holds them.

What a call launches is what ``csrc/cuda/ops.cpp`` would launch on the GPU, decided by the
extension's own planners (no copy of their rules here):

* bf16/fp16 problems that a tensor-core tile shape serves run the register-resident programs:
  the forward ``forward_kernel<RowConfig<...>>`` (``rows.cuh``; the shape from
  ``reattn._C.cuda_forward_tiles``, the compiled variant by ops.cpp's ``forward_variant_for``) and
  the deterministic backward, a row pass ``forward_kernel<RowConfig<..., kBackwardRows>>`` (D, dQ,
  the parameter-gradient partials) then a key pass ``key_kernel<KeyConfig<..., 0>>`` (``keys.cuh``:
  dK, dV; not launched for training BatchNorm's sums), shapes from ``reattn._C.cuda_backward_tiles``,
  both in their plain variants (``kPlainBackwardRows``, ``KeyConfig<..., 1>``) as ops.cpp's
  ``backward_plain_for`` decides;
* every other problem (fp32/fp64; shapes no tile serves, e.g. a backward with H > 16 or D > 64) and the
  statistics sweep run the CUDA-core programs ``re_attention_kernel<T, kind>`` (``programs.cuh``)
  with the plan of ``reattn._C.cuda_plan``.

The shared-memory limit each planner gets is what ops.cpp's ``device_shared_limit`` returns on the
GPU: the opt-in maximum of the arch minus the static shared memory of the CUDA-core program of that
kind (read from the cubin).

:func:`cuda_call` runs the CUDA backend's Python path (``reattn.backends._fused``, the same
sequence per norm mode as the Triton backend) over :func:`shim_ops`, whose raw kernels do on
``device="meta"`` tensors what ops.cpp does around each launch (allocations, zero fills, conversions,
the float64 sum of the partials: recorded by ``eager_model.OpCounter``) and record a :class:`Launch`
where ops.cpp launches (the tensor-core programs and the parameter steps of ``parameters.cuh`` around
them): the kernel (its
symbol in the cubin), grid, threads, dynamic shared memory, the parameter struct
(``ReAttnParams``, mirrored with ctypes from ``csrc/cuda/params.h``; its size is checked against
the compiled kernel's) and the tensors it reads and writes.

:func:`model_launch` takes the kernel's SASS from the extension's cubin for the arch (``cuobjdump
-xelf``), its resources (``cuobjdump -res-usage``), and counts what one thread block issues by
running the SASS in ``benchmarks.sass_exec`` on the launch's parameter bytes (the runtime loops of
these programs, over heads, key segments, 16-key chunks and query chunks, run as the code runs
them). The first block of the grid (whose rows or keys all exist) stands for every block: the
last block, with fewer real rows, issues as many or slightly fewer instructions, so the count leans
high. A program's work grows with one runtime length: the keys (forward and row pass: key segments;
CUDA-core programs: key tiles) or the queries (key pass: 16-row query chunks). When that length is
short (at most 3 units, or a row program's single key segment) the block is emulated at the real
size; otherwise at 2, 3 and 4 units (the last partial as in the real sweep) and extrapolated
linearly, which the model checks: if the 4th unit does not cost what the 3rd did, it emulates the
real size instead. A test compares the extrapolation with a full emulation.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pickle
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import kernel_model, sass, sass_exec

PROGRAM_THREADS = 128              # kThreads in csrc/cuda/params.h: the CUDA-core programs
PROGRAM_KINDS = {"forward": 0, "gram_sums": 1, "backward": 2, "bn_grad_sums": 3}
KIND_NAMES = {v: k for k, v in PROGRAM_KINDS.items()}
# ForwardVariant, kBackwardRows, kPlainBackwardRows and kPlainLayerBackwardRows of csrc/cuda/row_configs.h.
FORWARD_VARIANTS = {"plain_affine": 0, "plain_layer": 1, "plain_moments": 2, "general": 3}
BACKWARD_ROWS = 4
PLAIN_BACKWARD_ROWS = 5
PLAIN_LAYER_BACKWARD_ROWS = 6
KEY_TILE = 32  # csrc/cuda/tiles.h kKeyTile: keys per K tile of the statistics kernel's sweep
PARAM_OFFSET = sass_exec.PARAM_OFFSET
DTYPE_SYMBOL = {torch.bfloat16: "13__nv_bfloat16", torch.float16: "6__half", torch.float32: "f", torch.float64: "d"}
DTYPE_CXX = {torch.bfloat16: "reattn::dev::Bf16", torch.float16: "reattn::dev::F16"}  # E of the tensor-core programs
NORM_CODES = {"none": 0, "layer": 1, "batch": 2}
MASK_NONE = 0


# ---- csrc/cuda/params.h, mirrored ---------------------------------------------------------------------------
class Strides4(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("n", ctypes.c_int64), ("d", ctypes.c_int64)]


class Plan(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("block_m", "block_n", "pad", "head_dim_p", "heads_p", "head_group",
                                                  "chunk_d", "num_chunks", "num_m")] + [("shared_bytes",
                                                                                          ctypes.c_size_t)]


class KeyLayout(ctypes.Structure):
    """csrc/cuda/tiles.h's KeyLayout (ReAttnParams::key_tiles): the key pass's shared-memory offsets."""
    _fields_ = [(name, ctypes.c_int if name in ("row", "t_row") else ctypes.c_uint32)
                for name in ("keys", "values", "row", "ring", "ring_slot", "probs_t", "dmixed", "t_row", "weights",
                             "weights_t", "vectors", "exchange", "bytes")]


class RowLayout(ctypes.Structure):
    """csrc/cuda/tiles.h's RowLayout (ReAttnParams::row_tiles): the row programs' shared-memory offsets."""
    _fields_ = [(name, ctypes.c_int if name.endswith("_row") else ctypes.c_uint32)
                for name in ("probs", "p_row", "ring", "ring_slot", "k_row", "v_row", "weights", "vectors", "stats",
                             "exchange", "moments", "weights_t", "dmixed", "m_row", "delta", "sums", "grads",
                             "queries", "bytes")]


class ParamRef(ctypes.Structure):
    """csrc/cuda/params.h's ParamRef: a parameter as given (storage type, strides)."""
    _fields_ = [("data", ctypes.c_void_p), ("storage", ctypes.c_int), ("stride0", ctypes.c_int64),
                ("stride1", ctypes.c_int64)]


class FoldInputs(ctypes.Structure):
    """csrc/cuda/params.h's FoldInputs (ReAttnParams::fold): the parameters each tensor-core program folds."""
    _fields_ = [("H", ctypes.c_int), ("norm", ctypes.c_int), ("out_scale", ctypes.c_double), ("keep", ctypes.c_double),
                ("W", ParamRef), ("c", ParamRef), ("gamma", ParamRef), ("beta", ParamRef), ("bn", ctypes.c_void_p),
                ("running_mean", ParamRef), ("running_var", ParamRef), ("eps", ctypes.c_double),
                ("center_scale", ctypes.c_double)]


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
        ("out", ctypes.c_void_p), ("o_st", Strides4), ("lse", ctypes.c_void_p),
        ("stats_is_input", ctypes.c_bool), ("fold", FoldInputs), ("vector_loads", ctypes.c_bool),
        ("q_by_element", ctypes.c_bool),
        ("out_is_acc", ctypes.c_bool), ("moments", ctypes.c_void_p), ("value_sums", ctypes.c_void_p),
        ("shift", ctypes.c_double), ("s1", ctypes.c_void_p), ("gram", ctypes.c_void_p),
        ("dq", ctypes.c_void_p), ("dq_st", Strides4), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
        ("dW", ctypes.c_void_p), ("dc", ctypes.c_void_p), ("dgamma", ctypes.c_void_p), ("dbeta", ctypes.c_void_p),
        ("delta", ctypes.c_void_p), ("partials", ctypes.c_void_p), ("stats_only", ctypes.c_bool),
        ("dk_st", Strides4), ("dv_st", Strides4), ("key_tiles", KeyLayout), ("row_tiles", RowLayout),
        ("plan", Plan),
    ]


class HeadAffineParams(ctypes.Structure):
    """csrc/cuda/params.h's HeadAffineParams: the element-wise steps of one-sweep training BatchNorm."""

    _fields_ = [
        ("B", ctypes.c_int64), ("H", ctypes.c_int), ("Nq", ctypes.c_int), ("D", ctypes.c_int), ("rows", ctypes.c_int),
        ("vector", ctypes.c_bool), ("r", ctypes.c_void_p), ("r_st", Strides4), ("r_is_acc", ctypes.c_bool),
        ("u", ctypes.c_void_p), ("u_st", Strides4), ("u_parts", ctypes.c_int), ("u_part_stride", ctypes.c_int64),
        ("u_sum", ctypes.c_void_p), ("grad", ctypes.c_void_p), ("grad_st", Strides4),
        ("coefficients", ctypes.c_void_p), ("out", ctypes.c_void_p), ("partials", ctypes.c_void_p),
        ("scale", ctypes.c_double), ("stats", ctypes.c_void_p), ("W", ParamRef), ("c", ParamRef),
        ("eps", ctypes.c_double), ("inv_keys", ctypes.c_double),
    ]


HEAD_AFFINE_THREADS = 256  # kHeadAffineThreads in params.h
PARAMETER_THREADS = 256    # kParameterThreads in params.h
STORAGE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # StorageKind


class ParamGradsParams(ctypes.Structure):
    """csrc/cuda/params.h's ParamGradsParams: param_grads_kernel's arguments (one block; B and Nq for the sampler)."""
    _fields_ = [("total", ctypes.c_void_p), ("pieces", ctypes.c_int), ("begin", ctypes.c_int * 4),
                ("size", ctypes.c_int * 4), ("storage", ctypes.c_int * 4), ("factor", ctypes.c_double * 4),
                ("out", ctypes.c_void_p * 4)]
    B = 1
    Nq = 1


class MomentsCenterParams(ctypes.Structure):
    """csrc/cuda/params.h's MomentsCenterParams: moments_center_kernel's arguments (one block)."""
    _fields_ = [("H", ctypes.c_int), ("W", ParamRef), ("inv_keys", ctypes.c_double), ("out", ctypes.c_void_p),
                ("out_storage", ctypes.c_int)]
    B = 1
    Nq = 1


class BnMomentsParams(ctypes.Structure):
    """csrc/cuda/params.h's BnMomentsParams: bn_moments_kernel's arguments (one block; B and Nq for the sampler)."""
    _fields_ = [("H", ctypes.c_int), ("programs", ctypes.c_int64), ("moments", ctypes.c_void_p),
                ("count", ctypes.c_void_p), ("count_value", ctypes.c_double), ("center", ParamRef), ("c", ParamRef),
                ("gamma", ParamRef), ("beta", ParamRef), ("W", ParamRef), ("inv_keys", ctypes.c_double),
                ("out_scale", ctypes.c_double), ("eps", ctypes.c_double),
                ("stats", ctypes.c_void_p), ("coefficients", ctypes.c_void_p), ("coefficient_storage", ctypes.c_int)]
    B = 1
    Nq = 1


class RunningStatsParams(ctypes.Structure):
    """csrc/cuda/params.h's RunningStatsParams: running_stats_kernel's arguments (one block)."""
    _fields_ = [("H", ctypes.c_int), ("stats", ctypes.c_void_p), ("mean", ctypes.c_void_p), ("var", ctypes.c_void_p),
                ("mean_storage", ctypes.c_int), ("var_storage", ctypes.c_int), ("mean_stride", ctypes.c_int64),
                ("var_stride", ctypes.c_int64), ("momentum", ctypes.c_double)]
    B = 1
    Nq = 1


class BnCoefficientsParams(ctypes.Structure):
    """csrc/cuda/params.h's BnCoefficientsParams: bn_coefficients_kernel's arguments (one block)."""
    _fields_ = [("H", ctypes.c_int), ("stats", ctypes.c_void_p), ("sums", ctypes.c_void_p),
                ("sums_storage", ctypes.c_int), ("parts", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("sums_row", ctypes.c_int64), ("sums_part", ctypes.c_int64), ("sums_head", ctypes.c_int64),
                ("sums_group", ctypes.c_int64), ("gamma", ParamRef), ("eps", ctypes.c_double),
                ("coefficients", ctypes.c_void_p), ("coefficient_storage", ctypes.c_int),
                ("grad_gamma", ctypes.c_void_p), ("grad_beta", ctypes.c_void_p), ("grad_gamma_storage", ctypes.c_int),
                ("grad_beta_storage", ctypes.c_int)]
    B = 1
    Nq = 1


@dataclass
class Launch:
    """One kernel launch as ops.cpp makes it.

    program: "forward", "backward_rows", "backward_keys" (tensor-core programs), "head_affine",
    "head_dot_sums" (``head_affine.cuh``; params a :class:`HeadAffineParams`), "param_grads",
    "bn_moments", "bn_coefficients", "running_stats" (``parameters.cuh``; params its struct) or a CUDA-core
    program kind ("forward", "gram_sums", "backward", "bn_grad_sums") with ``core=True``.
    sweep: the runtime length the program's work grows with ("keys" or "queries") and ``unit`` its
    step (keys per segment or tile; 16 query rows)."""

    symbol: str                    # the kernel's (mangled) name in the cubin
    program: str
    core: bool                     # a CUDA-core program of programs.cuh
    params: ctypes.Structure       # ReAttnParams; HeadAffineParams or a parameter step's struct for the small steps
    dtype: torch.dtype
    grid: Tuple[int, int]
    threads: int
    dynamic_shared: int
    sweep: str
    unit: int
    one_segment: bool = False      # a row program whose keys fit one segment (emulated at the real Nk)
    touched: List[Tuple[torch.Tensor, set]] = field(default_factory=list)   # tensors and "read"/"write"/"atomic"
    order: int = 0

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def name(self) -> str:
        from benchmarks.gpu_timing import kernel_name

        return kernel_name(demangle(self.symbol))


# ---- the extension -------------------------------------------------------------------------------------------
def _C():
    from reattn._extension import _C as ext

    if ext is None or not hasattr(ext, "cuda_backward_tiles"):
        raise RuntimeError("reattn._C is not built (or predates the tensor-core programs' planners)")
    return ext


def extension_path() -> str:
    ext = _C()
    if not ext.build_info().get("cuda"):
        raise RuntimeError("reattn._C was built without CUDA: no cubin to model")
    return ext.__file__


def extension_toolchain() -> str:
    info = _C().build_info()
    version = f"CUDA {info['cuda_version']} " if info.get("cuda_version") else ""
    return f"reattn._C built with {version}for sm_{info.get('cuda_archs', '?')}"


@functools.lru_cache(maxsize=None)
def demangle(symbol: str) -> str:
    out = subprocess.run(["c++filt", symbol], capture_output=True, text=True).stdout.strip()
    return out or symbol


@functools.lru_cache(maxsize=None)
def _cubins(arch: int, library: str) -> Tuple[Tuple[bytes, Dict[str, sass.Resources]], ...]:
    """Every sm_<arch> cubin in the library with ``cuobjdump -res-usage``'s resources of its functions, by
    mangled name (fractions of a second: no disassembly)."""
    return tuple((cubin, sass.resource_usage(cubin)) for cubin in sass.extract_cubins(library, f"sm_{arch}"))


@functools.lru_cache(maxsize=None)
def _resources(arch: int, library: str) -> Dict[str, sass.Resources]:
    """The resources of every function of the library's sm_<arch> cubins, by mangled name."""
    return {name: res for _, resources in _cubins(arch, library) for name, res in resources.items()}


class _Disassembly(Mapping):
    """The library's sm_<arch> functions by mangled name, each disassembled (``sass.Function`` with its constant
    banks) when first asked for: one kernel takes ~1 s, all 77 of the extension ~30 s on the 2-core CI machine,
    and a model of one call reads two or three."""

    def __init__(self, arch: int, library: str):
        self._cubin_of = {name: cubin for cubin, resources in _cubins(arch, library) for name in resources}
        self._done: Dict[str, sass.Function] = {}

    def __getitem__(self, name: str) -> sass.Function:
        if name not in self._done:
            cubin = self._cubin_of[name]  # KeyError for a function the library does not have
            function = sass.disassemble(cubin, name)[name]
            function.banks = sass.constant_banks(cubin, name)
            self._done[name] = function
        return self._done[name]

    def __iter__(self):
        return iter(self._cubin_of)

    def __len__(self) -> int:
        return len(self._cubin_of)


@functools.lru_cache(maxsize=None)
def _functions(arch: int, library: str) -> Tuple[Mapping, Dict[str, sass.Resources]]:
    """The library's sm_<arch> functions (disassembled on first use) and every function's resources."""
    if not any("reattn4cuda" in name for name in _resources(arch, library)):
        raise RuntimeError(f"no sm_{arch} cubin with the fused programs in {library}")
    return _Disassembly(arch, library), _resources(arch, library)


def program_symbol(dtype: torch.dtype, kind: int) -> str:
    """The CUDA-core program ``re_attention_kernel<T, kind>``."""
    return f"_ZN6reattn4cuda19re_attention_kernelI{DTYPE_SYMBOL[dtype]}Li{kind}EEEvNS0_12ReAttnParamsE"


def _template_symbol(arch: int, kernel: str, config: str, args: Sequence[int], dtype: torch.dtype,
                     wrapper: str = "") -> str:
    """The mangled name of ``kernel<config<E, args...>>`` in the cubin (matched on the demangled names), or
    of ``kernel<wrapper<config<E, args...>>>`` (the forward's ``NarrowTail``, rows.cuh)."""
    functions = _resources(arch, extension_path())  # every function of the cubins, by mangled name
    want = (kernel, wrapper, config, DTYPE_CXX[dtype], tuple(int(a) for a in args))
    pattern = re.compile(r"reattn::cuda::(\w+)<(?:reattn::cuda::(\w+)<)?reattn::cuda::(\w+)<([\w:]+),\s*([-\d,\s]+)>\s*>")
    for symbol in functions:
        m = pattern.search(demangle(symbol))
        if m and (m.group(1), m.group(2) or "", m.group(3), m.group(4),
                  tuple(int(x) for x in m.group(5).split(","))) == want:
            return symbol
    shown = f"{config}<{want[3]}, {', '.join(map(str, args))}>"
    shown = f"{wrapper}<{shown}>" if wrapper else shown
    raise RuntimeError(f"no {kernel}<{shown}> in the sm_{arch} cubin: "
                       "the extension predates csrc/cuda/row_configs.h or backward_configs.h")


def shared_limit(arch: int, dtype: torch.dtype, kind: int) -> int:
    """What ops.cpp's device_shared_limit(q, kind) returns on the GPU: the opt-in maximum per block minus the
    static shared memory of the CUDA-core program ``re_attention_kernel<T, kind>``."""
    from reattn.kernels.aot import SHARED_MEMORY_LIMIT

    return SHARED_MEMORY_LIMIT[arch] - _resources(arch, extension_path())[program_symbol(dtype, kind)].shared_static


def forward_variant(p: ReAttnParams) -> int:
    """ops.cpp's forward_variant_for (general_variant off): the plain variants need no mask, no dropout,
    scale > 0 and 16-byte loads; then moments, LayerNorm or the affine norms."""
    if p.mask_kind != MASK_NONE or p.seed or p.scale <= 0.0 or not p.vector_loads:
        return FORWARD_VARIANTS["general"]
    if p.moments:
        return FORWARD_VARIANTS["plain_moments"]
    return FORWARD_VARIANTS["plain_layer" if p.norm == NORM_CODES["layer"] else "plain_affine"]


def norm_gradients(p: ReAttnParams, stats_only: bool) -> bool:
    """ops.cpp's norm_gradients: whether a backward call returns dgamma and dbeta (not training BatchNorm's full
    backward, whose norm gradients are its sums call's)."""
    return stats_only or p.norm != NORM_CODES["batch"]


def backward_plain(p: ReAttnParams, rows: dict) -> bool:
    """ops.cpp's backward_plain_for (general_variant off): the plain row and key passes need no mask, no dropout,
    16-byte loads and a row shape that has a plain variant (``rows``: cuda_backward_tiles' row pass)."""
    return p.mask_kind == MASK_NONE and not p.seed and bool(p.vector_loads) and bool(rows["has_plain"])


def backward_rows_variant(p: ReAttnParams, rows: dict, plain: bool, dtype: torch.dtype) -> int:
    """backward_configs.h's backward_rows_variant: LayerNorm's own plain row pass in bf16, else the plain or the
    general one (``plain``: the row shape has a plain variant, backward_plain)."""
    if not plain:
        return BACKWARD_ROWS
    if p.norm == NORM_CODES["layer"] and dtype == torch.bfloat16:
        return PLAIN_LAYER_BACKWARD_ROWS
    return PLAIN_BACKWARD_ROWS


def backward_keys_variant(p: ReAttnParams, plain: bool, dtype: torch.dtype) -> int:
    """backward_configs.h's backward_keys_variant: KeyConfig's last argument (general 0, plain 1, LayerNorm's own
    plain key pass in bf16 2)."""
    if not plain:
        return 0
    return 2 if p.norm == NORM_CODES["layer"] and dtype == torch.bfloat16 else 1


# ---- the shim: ops.cpp's work around each launch, on meta tensors ----------------------------------------------
_FAKE_BASE = 0x7F00_0000_0000


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.launches: List[Launch] = []
        self.pointers: Dict[str, int] = {}

    def pointer(self, t: Optional[torch.Tensor], role: str) -> Optional[int]:
        """A fake device address per parameter field (``role``), 16-byte aligned, null for an absent tensor: the
        programs only test pointers against null, and one address per field keeps equal launches
        byte-identical (so their emulations are shared)."""
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


def _core_parameters(p: ReAttnParams, touched: list) -> None:
    """ops.cpp's core_parameters: the given parameters contiguous in the accumulation type, for the CUDA-core
    programs (a kernel only where the dtype or layout changes)."""
    for field_, t in zip(("W", "c", "gamma", "beta"), p.given):
        if t is not None:
            t = t.detach().to(torch.float32).contiguous()
            setattr(p, field_, _RECORDER.pointer(t, field_))
            touched.append((t, {"read"}))


def _param_ref(t: Optional[torch.Tensor], role: str) -> ParamRef:
    if t is None:
        return ParamRef()
    return ParamRef(_RECORDER.pointer(t, role), STORAGE[t.dtype], t.stride(0), t.stride(1) if t.dim() > 1 else 0)


def _record_small(kernel: str, struct_name: str, q, params, grid: int, shared: int, touched) -> None:
    symbol = f"_ZN6reattn4cuda{len(kernel)}{kernel}ENS0_{len(struct_name)}{struct_name}E"
    _record(symbol, kernel.replace("_kernel", ""), False, q, params, touched, (grid, 1), PARAMETER_THREADS, shared,
            "queries", 1, one_segment=True)


def _fold_inputs(p: ReAttnParams, touched: list, bn_rows: Optional[torch.Tensor], running=(None, None)) -> None:
    """ops.cpp's fold_inputs: the parameters as given, which each tensor-core program folds (and reads); running:
    eval-mode BatchNorm's running mean and variance (the inference op), else None."""
    f = p.fold
    f.H, f.norm, f.out_scale = int(p.H), p.norm, p.out_scale
    f.keep = 1.0 / (1.0 - p.dropout_p) if p.seed else 1.0
    f.W, f.c, f.gamma, f.beta = (_param_ref(t, "given_" + r) for t, r in zip(p.given, ("W", "c", "gamma", "beta")))
    f.bn = _RECORDER.pointer(bn_rows, "bn") if bn_rows is not None else None
    f.running_mean, f.running_var = (_param_ref(t, "running_" + r) for t, r in zip(running, ("mean", "var")))
    f.eps = p.eps
    touched += [(t, {"read"}) for t in tuple(p.given) + tuple(running) if t is not None]


def _param_grads(q, partials: torch.Tensor, pieces) -> None:
    """ops.cpp's gradients from the row pass's partials: torch's float64 sum, then one launch of
    param_grads_kernel; pieces: (out tensor, first column, factor)."""
    total = partials.sum(0, dtype=torch.float64)
    g = ParamGradsParams()
    g.total = _RECORDER.pointer(total, "total")
    touched = [(total, {"read"})]
    for out, begin, factor in pieces:
        if out.numel() == 0:
            continue
        k = g.pieces
        g.pieces += 1
        g.begin[k], g.size[k], g.storage[k], g.factor[k] = begin, out.numel(), STORAGE[out.dtype], factor
        g.out[k] = _RECORDER.pointer(out, f"grad_out{k}")
        touched.append((out, {"write"}))
    _record_small("param_grads_kernel", "ParamGradsParams", q, g, 1, 0, touched)


def _tensor_cores(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _vector_loadable(t: torch.Tensor) -> bool:
    """ops.cpp's vector_loadable on a meta tensor: unit stride along D, 16-byte strides (the GPU allocator's
    base addresses are 16-byte aligned)."""
    e = t.element_size()
    return t.stride(3) == 1 and all((t.stride(d) * e) % 16 == 0 for d in range(3))


def _vector_aligned(p: ReAttnParams, touched: list, fields: Sequence[Tuple[str, str]], tensors,
                    queries_staged: bool = False) -> bool:
    """ops.cpp's use_aligned_inputs for the tensor-core programs: each input that is not ``_vector_loadable`` with
    D a multiple of 8 (or a view that ``reattn._C.cuda_padded_rows`` returned: :func:`_padded_rows`) is copied
    into rows padded to 8 elements, the padding zeroed (torch ops of the host, counted), and the program reads the
    copy's first D columns instead; ``fields`` names its pointer and strides fields in ``p``. queries_staged (the
    forward's program stages q, tiles.h stages_queries): q (the first) is read as it is, element by element
    (p.q_by_element). Returns ops.cpp's vector_loads (every input but such a q read in whole 8-element chunks)."""
    rec = _RECORDER
    loadable = True
    zeros = None  # one broadcast element for the call's inputs, as ops.cpp shares it
    p.q_by_element = False
    for n, ((pointer, strides), t) in enumerate(zip(fields, tensors)):
        D = t.shape[3]
        if _vector_loadable(t) and (D % 8 == 0 or _C().cuda_padded_view(t)):  # read as it is
            continue
        if n == 0 and queries_staged:
            p.q_by_element = True
            continue
        padded = torch.empty((*t.shape[:3], -(-D // 8) * 8), dtype=t.dtype, device=t.device)
        if sum((n - 1) * st for n, st in zip(padded.shape[1:], padded.stride()[1:])) >= 2 ** 31 - 1:
            loadable = False  # 32-bit offsets would not reach: the general variant's element-wise copies
            continue
        view = padded[..., :D]
        if padded.shape[3] > D:  # one pass: the input's columns, then zeros (a broadcast element)
            if zeros is None or zeros.shape[3] != padded.shape[3] - D or zeros.dtype != t.dtype:
                zeros = _padding_zeros(t, padded.shape[3] - D)
            torch.cat([t, zeros.expand(*t.shape[:3], -1)], dim=3, out=padded)
        else:
            view.copy_(t)
        setattr(p, pointer, rec.pointer(view, pointer))
        setattr(p, strides, _strides(view))
        for i, (x, kinds) in enumerate(touched):
            if x is t:
                touched[i] = (view, kinds)
    return loadable


_KEPT_ZEROS: Dict[Tuple[torch.dtype, int], torch.Tensor] = {}


def _padding_zeros(t: torch.Tensor, width: int) -> torch.Tensor:
    """ops.cpp's padding_zeros: the padding's broadcast element, made once per dtype and width and kept (a
    process's steady state: :func:`cuda_call` makes them before it counts)."""
    key = (t.dtype, width)
    if key not in _KEPT_ZEROS:
        _KEPT_ZEROS[key] = torch.zeros((1, 1, 1, width), dtype=t.dtype, device=t.device)
    return _KEPT_ZEROS[key]


def _prepare(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, seed, scale,
             dropout_p) -> Tuple[ReAttnParams, list]:
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
    # ops.cpp's Arguments::given: read by the fold (tensor-core programs) or converted by core_parameters
    p.given = tuple(None if t is None else t.detach() for t in (mix_weight, mix_bias, norm_weight, norm_bias)) \
        if mix_weight is not None else (None, None, None, None)
    p.mask_kind = MASK_NONE
    if dropout_p > 0.0:
        p.dropout_p = dropout_p
        p.seed = rec.pointer(seed, "seed")
    return p, touched


def _set_norm(p, norm, out_scale, eps, batch_stats, q) -> Optional[torch.Tensor]:
    p.norm = NORM_CODES[norm]
    p.out_scale, p.eps = out_scale, eps
    if norm != "batch" or batch_stats is None:  # eval-mode BatchNorm's inference: the running statistics instead
        return None
    rows = batch_stats.to(_acc(q.dtype))
    if rows.shape[0] == 2:
        rows = torch.cat([rows, torch.zeros_like(rows)])
    rows = rows.contiguous()
    p.bn = _RECORDER.pointer(rows, "bn")
    return rows


def _record(symbol: str, program: str, core: bool, q, p, touched, grid, threads, dynamic_shared, sweep, unit,
            one_segment=False) -> None:
    _RECORDER.launches.append(Launch(symbol, program, core, p, q.dtype, (int(grid[0]), int(grid[1])), int(threads),
                                     int(dynamic_shared), sweep, int(unit), one_segment, touched,
                                     time.perf_counter_ns()))


def _run_program(kind: int, q, p: ReAttnParams, touched) -> None:
    """ops.cpp's run(): a CUDA-core program with the extension's plan for the GPU's shared memory."""
    arch = _RECORDER.arch
    plan = _C().cuda_plan(kind, p.H, p.D, p.Nq, str(q.dtype).replace("torch.", ""),
                          shared_limit(arch, q.dtype, kind))
    p.plan = Plan(**{k: int(plan[k]) for k in ("block_m", "block_n", "pad", "head_dim_p", "heads_p", "head_group",
                                                "chunk_d", "num_chunks", "num_m", "shared_bytes")})
    _record(program_symbol(q.dtype, kind), KIND_NAMES[kind], True, q, p, touched,
            (int(p.B) * p.plan.num_m, p.plan.num_chunks), PROGRAM_THREADS, p.plan.shared_bytes, "keys",
            p.plan.block_n)


def _tiles(planner: str, kind: str, q, k, **options) -> Optional[dict]:
    """What ops.cpp's forward_shape_for / backward_shapes_for pick on the GPU (the extension's ``planner``,
    ``cuda_forward_tiles`` or ``cuda_backward_tiles``, with the shared memory the GPU leaves ``kind``; options:
    the planner's own, e.g. the backward's ``plain``), or None: no tensor-core shape (the CUDA-core programs
    run)."""
    if not _tensor_cores(q.dtype):
        return None
    B, H, Nq, D = q.shape
    tiles = getattr(_C(), planner)(H, D, Nq, k.shape[2], str(q.dtype).replace("torch.", ""),
                                   shared_limit(_RECORDER.arch, q.dtype, PROGRAM_KINDS[kind]), **options)
    return None if tiles is None else {key: dict(v) if isinstance(v, dict) else v for key, v in tiles.items()}


def _forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *, scale,
             out_scale, norm, eps, dropout_p, with_moments=False, out_is_acc=False, running=(None, None),
             center_keys=0):
    rec = _RECORDER
    tiles = _tiles("cuda_forward_tiles", "forward", q, k)
    if center_keys and tiles is None:  # ops.cpp: the CUDA-core programs take the shift from moments_center
        mix_bias = _moments_center(mix_weight, center_keys, _acc(q.dtype))[1]
    p, touched = _prepare(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, seed, scale, dropout_p)
    bn_rows = _set_norm(p, norm, out_scale, eps, batch_stats, q)
    if bn_rows is not None:
        touched.append((bn_rows, {"read"}))
    acc = _acc(q.dtype)
    B, H, Nq, D = q.shape
    given = lse is not None
    stats = lse if given else torch.empty((B, H, Nq, 2), dtype=acc, device=q.device)
    touched.append((stats, {"read"} if given else {"write"}))
    out = torch.empty(q.shape, dtype=acc if out_is_acc else q.dtype, device=q.device)
    p.out, p.o_st = rec.pointer(out, "out"), _strides(out)
    p.out_is_acc = out_is_acc
    touched.append((out, {"write"}))
    if tiles is not None:
        programs = B * -(-Nq // tiles["rows"])
        moments = torch.empty((programs if with_moments else 0, 2, H), dtype=torch.float64, device=q.device)
        value_sums = torch.empty((0, H, 1, D), dtype=acc, device=q.device)
        _fold_inputs(p, touched, bn_rows, running)
        p.fold.center_scale = -1.0 / center_keys if center_keys else 0.0
        p.lse = rec.pointer(stats, "lse")
        p.stats_is_input = given
        p.moments = rec.pointer(moments, "moments") if with_moments else None
        p.vector_loads = _vector_aligned(p, touched, (("q", "q_st"), ("k", "k_st"), ("v", "v_st")), (q, k, v),
                                         queries_staged=tiles["stages_queries"])
        if with_moments:
            touched.append((moments, {"write"}))
        variant = forward_variant(p)
        if with_moments and attn_mask is None and (tiles["keys"] > 64 or variant == FORWARD_VARIANTS["plain_moments"]):
            # ops.cpp: U's shares of the row blocks (one-segment shapes; the segmented ones' plain moments variant)
            value_sums = torch.empty((B, H, tiles["grid"][0], D), dtype=torch.float32, device=q.device)
            p.value_sums = rec.pointer(value_sums, "value_sums")
            touched.append((value_sums, {"write"}))
        statistics = tiles["statistics"]
        if statistics is not None and variant != FORWARD_VARIANTS["general"] and not given:
            # ops.cpp: the statistics kernel first (statistics.cuh; q and k as the forward reads them), whose rows
            # the forward then reads
            args = [statistics[k_] for k_ in ("warps", "tiles", "d")] + [int(statistics["narrow"])]
            _record(_template_symbol(rec.arch, "statistics_kernel", "StatisticsConfig", args, q.dtype), "statistics",
                    False, q, ReAttnParams.from_buffer_copy(p), [touched[0], touched[1], (stats, {"write"})],
                    (B * H * statistics["grid"], 1), statistics["threads"], statistics["shared_bytes"], "keys",
                    KEY_TILE)
            p.stats_is_input = True
        args = [tiles[k_] for k_ in ("slabs", "groups", "heads", "d", "d_out", "keys")] + [variant]
        symbol = _template_symbol(rec.arch, "forward_kernel", "RowConfig", args, q.dtype,
                                  "NarrowTail" if tiles["narrow"] else "")
        p.row_tiles = RowLayout(*tiles["layout"])  # as launch_forward_shape sets it
        _record(symbol, "forward", False, q, p, touched, (B * tiles["grid"][0], tiles["grid"][1]), tiles["threads"],
                tiles["shared_bytes"], "keys", tiles["keys"], one_segment=tiles["segments"] == 1)
    else:
        if running[0] is not None:
            raise NotImplementedError("eval-mode BatchNorm's inference on the CUDA-core programs (ops.cpp's "
                                      "eval_batch_rows) is not modelled")
        moments = torch.zeros((1 if with_moments else 0, 2, H), dtype=torch.float64, device=q.device)
        value_sums = torch.empty((0, H, 1, D), dtype=acc, device=q.device)
        p.lse, p.stats_is_input = rec.pointer(stats, "lse"), given
        p.moments = rec.pointer(moments, "moments") if with_moments else None
        if with_moments:
            touched.append((moments, {"atomic"}))
        _core_parameters(p, touched)
        _run_program(PROGRAM_KINDS["forward"], q, p, touched)
    return (out, stats, moments, value_sums) if with_moments else (out, stats)


def _gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift):
    rec = _RECORDER
    p, touched = _prepare(q, k, None, None, None, None, None, seed, scale, dropout_p)
    stats = torch.empty((q.shape[0], q.shape[1], q.shape[2], 2), dtype=_acc(q.dtype), device=q.device)
    s1 = torch.zeros((q.shape[1],), dtype=torch.float64, device=q.device)
    gram = torch.zeros((q.shape[1], q.shape[1]), dtype=torch.float64, device=q.device)
    p.lse, p.shift = rec.pointer(stats, "lse"), shift
    p.s1, p.gram = rec.pointer(s1, "s1"), rec.pointer(gram, "gram")
    touched += [(stats, {"write"}), (s1, {"atomic"}), (gram, {"atomic"})]
    _run_program(PROGRAM_KINDS["gram_sums"], q, p, touched)
    return stats, s1, gram


def _cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, seed, stats, scale,
                   out_scale, norm, eps, dropout_p, stats_only):
    rec = _RECORDER
    p, touched = _prepare(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, seed, scale, dropout_p)
    p.grad_out, p.do_st = rec.pointer(grad_out, "grad_out"), _strides(grad_out)
    touched.append((grad_out, {"read"}))
    bn_rows = _set_norm(p, norm, out_scale, eps, batch_stats, q)
    if bn_rows is not None:
        touched.append((bn_rows, {"read"}))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    f64 = dict(dtype=torch.float64, device=q.device)
    tiles = _tiles("cuda_backward_tiles", "backward", q, k)
    if tiles is not None:
        rows, keys = tiles["rows"], tiles["keys"]
        p.lse = rec.pointer(stats, "lse")
        _fold_inputs(p, touched, bn_rows)
        p.vector_loads = _vector_aligned(p, touched, (("q", "q_st"), ("k", "k_st"), ("v", "v_st"),
                                                      ("grad_out", "do_st")), (q, k, v, grad_out))
        p.stats_only = stats_only
        programs = B * -(-Nq // rows["rows"])
        partials = torch.empty((programs, H * H + 3 * H), dtype=torch.float32, device=q.device)
        p.partials = rec.pointer(partials, "partials")
        touched += [(stats, {"read"}), (partials, {"write"})]
        row_touched = list(touched)
        if not stats_only:
            delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
            dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
            dk = torch.empty((B, H, Nk, D), dtype=q.dtype, device=q.device)
            dv = torch.empty_like(dk)
            p.delta, p.dq, p.dq_st = rec.pointer(delta, "delta"), rec.pointer(dq, "dq"), _strides(dq)
            p.dk, p.dk_st, p.dv, p.dv_st = rec.pointer(dk, "dk"), _strides(dk), rec.pointer(dv, "dv"), _strides(dv)
            row_touched += [(delta, {"write"}), (dq, {"write"})]
        plain = backward_plain(p, rows)
        if not plain:  # ops.cpp picks the key shape again for the general variant (key_shape_compiled)
            keys = _tiles("cuda_backward_tiles", "backward", q, k, plain=False)["keys"]
        args = [rows[k_] for k_ in ("slabs", "groups", "heads", "d", "d_out", "keys")] + [
            backward_rows_variant(p, rows, plain, q.dtype)]
        p.row_tiles = RowLayout(*rows["layout"])  # as launch_forward_shape sets it
        _record(_template_symbol(rec.arch, "forward_kernel", "RowConfig", args, q.dtype), "backward_rows", False, q, p,
                row_touched, (B * rows["grid"][0], rows["grid"][1]), rows["threads"], rows["shared_bytes"], "keys",
                rows["keys"], one_segment=rows["segments"] == 1)
        if not stats_only:
            key_touched = [(t, kinds) for t, kinds in touched if t is not partials] + [
                (delta, {"read"}), (dk, {"write"}), (dv, {"write"})]
            args = [keys[k_] for k_ in ("kslabs", "groups", "heads", "d", "tiles")] + [
                backward_keys_variant(p, plain, q.dtype)]
            p.key_tiles = KeyLayout(*keys["layout"])  # as launch_key_shape sets it
            _record(_template_symbol(rec.arch, "key_kernel", "KeyConfig", args, q.dtype), "backward_keys", False, q,
                    p, key_touched, (B * keys["grid"][0], 1), keys["threads"], keys["shared_bytes"], "queries", 16)
        keep = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0

        def grad_for(param):
            if param is None or stats_only:
                return torch.empty((H,), **f64)
            return torch.empty(param.shape, dtype=param.dtype, device=q.device)

        dW, dc = (torch.empty((0,), **f64), torch.empty((0,), **f64)) if stats_only else (
            grad_for(p.given[0]), grad_for(p.given[1]))
        if norm_gradients(p, stats_only):
            dgamma, dbeta = grad_for(p.given[2]), grad_for(p.given[3])
        else:
            dgamma, dbeta = torch.empty((0,), **f64), torch.empty((0,), **f64)
        _param_grads(q, partials, ((dW, 0, keep), (dc, H * H, 1.0), (dgamma, H * H + H, out_scale),
                                    (dbeta, H * H + 2 * H, out_scale)))
        if stats_only:
            none = torch.empty((0,), dtype=q.dtype, device=q.device)
            return none, none, none, dW, dc, dgamma, dbeta
        return dq, dk, dv, dW, dc, dgamma, dbeta
    # The CUDA-core programs: dK, dV and the parameter gradients summed with atomics.
    p.lse = rec.pointer(stats, "lse")
    acc = _acc(q.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros((B, H, Nk, D), dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    dW, dc, dgamma, dbeta = torch.zeros((H, H), **f64), torch.zeros((H,), **f64), torch.zeros((H,), **f64), \
        torch.zeros((H,), **f64)
    p.dq, p.dq_st, p.dk, p.dv = rec.pointer(dq, "dq"), _strides(dq), rec.pointer(dk, "dk"), rec.pointer(dv, "dv")
    p.dW, p.dc, p.dgamma, p.dbeta = (rec.pointer(t, r) for t, r in zip((dW, dc, dgamma, dbeta),
                                                                       ("dW", "dc", "dgamma", "dbeta")))
    touched.append((stats, {"read"}))
    _core_parameters(p, touched)
    if stats_only:
        touched += [(dgamma, {"atomic"}), (dbeta, {"atomic"})]
    else:
        touched += [(dq, {"write"}), (dk, {"atomic"}), (dv, {"atomic"}), (dW, {"atomic"}), (dc, {"atomic"}),
                    (dgamma, {"atomic"}), (dbeta, {"atomic"})]
    _run_program(PROGRAM_KINDS["bn_grad_sums" if stats_only else "backward"], q, p, touched)
    if not norm_gradients(p, stats_only):
        dgamma, dbeta = torch.empty((0,), **f64), torch.empty((0,), **f64)
    return dq, dk.to(q.dtype), dv.to(q.dtype), dW, dc, dgamma, dbeta


def _backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse, *,
              scale, out_scale, norm, eps, dropout_p):
    dq, dk, dv, dw, dc, dnw, dnb = _cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                  batch_stats, seed, lse, scale, out_scale, norm, eps, dropout_p, False)
    return dq, dk, dv, dw, dc, dnw if norm == "layer" else None, dnb if norm == "layer" else None


def _bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, lse,
                   *, scale, out_scale, eps, dropout_p):
    *_, sum_dn_xhat, sum_dn = _cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                             batch_stats, seed, lse, scale, out_scale, "batch", eps, dropout_p, True)
    return torch.stack([sum_dn_xhat, sum_dn])


def _forward_moments(q, k, v, mix_weight, mix_bias, attn_mask, seed, *, scale, dropout_p, dtype, center_keys=0):
    """reattn.backends.cuda._forward_moments: U in the row blocks' shares where the programs summed V."""
    from reattn.backends.cuda import value_parts
    x_v, stats, moments, value_sums = _forward(q, k, v, mix_weight, mix_bias, None, None, None, attn_mask, seed, None,
                                               scale=scale, out_scale=1.0, norm="none", eps=1e-5,
                                               dropout_p=dropout_p, with_moments=True,
                                               out_is_acc=dtype != q.dtype, center_keys=center_keys)
    return x_v, stats, moments, value_parts(value_sums)


def _forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
                            attn_mask, *, scale, out_scale, eps):
    """reattn.backends.cuda._forward_eval_batchnorm: one forward whose programs fold the norm from the running
    statistics (the ladder's inference op, a call without gradients)."""
    out, _ = _forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, None, attn_mask, None, None, scale=scale,
                      out_scale=out_scale, norm="batch", eps=eps, dropout_p=0.0, running=(running_mean, running_var))
    return out


def _head_params(like: torch.Tensor) -> HeadAffineParams:
    """ops.cpp's head_params: the shape and the rows of a block (``reattn._C.cuda_head_rows``)."""
    p = HeadAffineParams()
    p.B, p.H, p.Nq, p.D = like.shape
    p.u_parts = 1  # params.h's default (ctypes zero-fills)
    p.rows = _C().cuda_head_rows(p.Nq, p.D)
    return p


def _vector_items(dtype: torch.dtype, D: int, tensors) -> bool:
    """ops.cpp's vector_items on meta tensors: fp32 accumulation, D a multiple of one 16-byte item of dtype and
    every (tensor, strides)'s rows 16-byte aligned (the GPU allocator's base addresses are)."""
    if _acc(dtype) != torch.float32 or D % (16 // dtype.itemsize):
        return False
    return all(st.b * t.element_size() % 16 == 0 and st.h * t.element_size() % 16 == 0 and
               st.n * t.element_size() % 16 == 0 for t, st in tensors)


def _staged_u_bytes(dtype: torch.dtype, p: HeadAffineParams) -> int:
    """head_affine.cuh's staged_u_bytes: U's row of D columns and vector_columns - 1 more (wrapped), in the
    accumulation dtype (vector_columns: one 16-byte item of dtype where that is fp32, else 1)."""
    acc = _acc(dtype)
    columns = 16 // dtype.itemsize if acc == torch.float32 else 1
    return (p.D + columns - 1) * acc.itemsize


def _head_symbol(kernel: str, dtype: torch.dtype) -> str:
    return f"_ZN6reattn4cuda{len(kernel)}{kernel}I{DTYPE_SYMBOL[dtype]}EEvNS0_16HeadAffineParamsE"


def _record_head(kernel: str, dtype: torch.dtype, p: HeadAffineParams, touched, shared: int) -> None:
    # Every block owns `rows` rows of one head: the first block (all its rows exist) is emulated whole.
    _record(_head_symbol(kernel, dtype), kernel.replace("_kernel", ""), False, SimpleNamespace(dtype=dtype), p,
            touched, (int(p.B) * p.H, -(-int(p.Nq) // p.rows)), HEAD_AFFINE_THREADS, shared, "queries", p.rows,
            one_segment=True)


def _head_affine(r, u, alpha, beta, dtype, u_sum=None):
    """reattn.backends.cuda._head_affine and ops.cpp's head_affine (with u_sum: u is U in parts, added and stored)."""
    from reattn.backends.cuda import coefficient_rows
    rec = _RECORDER
    coefficients = coefficient_rows((alpha, beta), u.dtype)
    p = _head_params(r)
    out = torch.empty(r.shape, dtype=dtype, device=r.device)
    p.r, p.r_st, p.r_is_acc = rec.pointer(r, "r"), _strides(r), r.dtype == u.dtype
    p.u = rec.pointer(u, "u")
    touched = [(r, {"read"}), (u, {"read"}), (coefficients, {"read"}), (out, {"write"})]
    if u_sum is not None:
        b, h, n, _ = u.stride()
        p.u_st, p.u_parts, p.u_part_stride = Strides4(b, h, 0, 1), u.shape[2], n
        p.u_sum = rec.pointer(u_sum, "u_sum")
        p.vector = _vector_items(dtype, p.D, ((r, p.r_st), (u, Strides4(b, h, n, 1)), (u_sum, _strides(u_sum))))
        touched.append((u_sum, {"write"}))
    else:
        p.u_st = _strides(u.expand(r.shape))
        p.vector = _vector_items(dtype, p.D, ((r, p.r_st), (u, p.u_st)))
    p.coefficients, p.out = rec.pointer(coefficients, "coefficients"), rec.pointer(out, "out")
    # head_affine.cuh's head_affine_shared: U's row staged in shared memory where it is one per (b, h)
    _record_head("head_affine_kernel", dtype, p, touched, _staged_u_bytes(dtype, p) if p.u_st.n == 0 else 0)
    return out


def _moments_center(mix_weight, n_keys, dtype):
    """ops.cpp's moments_center (for the CUDA-core forward's center_keys): one launch of moments_center_kernel."""
    H = mix_weight.shape[0]
    rows = torch.empty((2, H), dtype=dtype, device=mix_weight.device)
    b = MomentsCenterParams()
    b.H, b.inv_keys = H, 1.0 / n_keys
    b.W = _param_ref(mix_weight, "center_W")
    b.out, b.out_storage = _RECORDER.pointer(rows, "center"), STORAGE[dtype]
    _record_small("moments_center_kernel", "MomentsCenterParams", mix_weight, b, 1, 0,
                  [(mix_weight, {"read"}), (rows, {"write"})])
    return rows[0], rows[1]


def _bn_moments(moments, count, center, mix_bias, norm_weight, norm_bias, *, out_scale, eps, dtype, mix_weight=None,
                n_keys=0):
    """reattn.backends.cuda._bn_moments and ops.cpp's bn_moments: one launch of bn_moments_kernel."""
    H = moments.shape[2]
    stats = torch.empty((3, H), dtype=torch.float64, device=moments.device)
    coefficients = torch.empty((4, H), dtype=dtype, device=moments.device)
    b = BnMomentsParams()
    b.H, b.programs = H, moments.shape[0]
    b.moments = _RECORDER.pointer(moments, "moments")
    if isinstance(count, torch.Tensor):
        b.count = _RECORDER.pointer(count, "count")
    else:  # without a mask: the number itself (reattn.backends.cuda._bn_moments)
        b.count, b.count_value = None, float(count)
    given = (center, mix_bias, norm_weight, norm_bias)
    b.center, b.c, b.gamma, b.beta = (_param_ref(t, "bn_" + r) for t, r in zip(given, ("center", "c", "gamma", "beta")))
    b.W = _param_ref(mix_weight if center is None else None, "bn_W")
    b.inv_keys = 1.0 / n_keys if center is None else 0.0
    b.out_scale, b.eps = out_scale, eps
    b.stats, b.coefficients = _RECORDER.pointer(stats, "stats"), _RECORDER.pointer(coefficients, "coefficients")
    b.coefficient_storage = STORAGE[dtype]
    touched = [(moments, {"read"})] + ([(count, {"read"})] if isinstance(count, torch.Tensor) else []) + [
        (t, {"read"}) for t in given + (mix_weight if center is None else None,) if t is not None] + [
        (stats, {"write"}), (coefficients, {"write"})]
    _record_small("bn_moments_kernel", "BnMomentsParams", moments, b, 1, 2 * H * 8, touched)
    return stats, coefficients


def _bn_coefficients(stats, sums, norm_weight, norm_bias, *, eps, dtype, own_grads):
    """reattn.backends.cuda._bn_coefficients and ops.cpp's bn_coefficients: one launch of bn_coefficients_kernel."""
    stats = stats.contiguous()
    H = stats.shape[1]
    parts = sums.view(2, 1, H, 1) if sums.dim() == 2 else sums
    coefficients = torch.empty((4, H), dtype=dtype, device=stats.device)
    b = BnCoefficientsParams()
    b.H, b.eps = H, eps
    b.stats, b.sums = _RECORDER.pointer(stats, "bn_stats"), _RECORDER.pointer(sums, "bn_sums")
    b.sums_storage, b.parts, b.groups = STORAGE[sums.dtype], parts.shape[1], parts.shape[3]
    b.sums_row, b.sums_part, b.sums_head, b.sums_group = parts.stride()
    b.gamma = _param_ref(norm_weight, "bn_gamma")
    b.coefficients, b.coefficient_storage = _RECORDER.pointer(coefficients, "bn_coefficients"), STORAGE[dtype]
    touched = [(stats, {"read"}), (sums, {"read"}), (coefficients, {"write"})] + (
        [(norm_weight, {"read"})] if norm_weight is not None else [])
    grads = []
    for param, name in ((norm_weight, "gamma"), (norm_bias, "beta")):
        if not own_grads or param is None:
            grads.append(None)
            continue
        g = torch.empty((H,), dtype=param.dtype, device=stats.device)
        setattr(b, "grad_" + name, _RECORDER.pointer(g, "bn_grad_" + name))
        setattr(b, f"grad_{name}_storage", STORAGE[param.dtype])
        touched.append((g, {"write"}))
        grads.append(g)
    _record_small("bn_coefficients_kernel", "BnCoefficientsParams", stats, b, 1, 2 * H * 8, touched)
    return (coefficients, *grads)


def _update_running_stats(running_mean, running_var, stats, momentum):
    """reattn.backends.cuda._update_running_stats and ops.cpp's update_running_stats: one launch of
    running_stats_kernel."""
    b = RunningStatsParams()
    b.H, b.momentum = stats.shape[1], momentum
    b.stats = _RECORDER.pointer(stats, "running_stats_batch")
    b.mean, b.var = _RECORDER.pointer(running_mean, "running_mean"), _RECORDER.pointer(running_var, "running_var")
    b.mean_storage, b.var_storage = STORAGE[running_mean.dtype], STORAGE[running_var.dtype]
    b.mean_stride, b.var_stride = running_mean.stride(0), running_var.stride(0)
    touched = [(stats, {"read"}), (running_mean, {"read", "write"}), (running_var, {"read", "write"})]
    _record_small("running_stats_kernel", "RunningStatsParams", stats, b, 1, 0, touched)


def _head_dot_sums(grad, r, u, stats, mix_weight, mix_bias, *, scale, eps, n_keys, summed=True):
    """reattn.backends.cuda._head_dot_sums and ops.cpp's head_dot_sums."""
    rec = _RECORDER
    p = _head_params(grad)
    acc = _acc(grad.dtype)
    partials = torch.empty((2, p.B, p.H, -(-p.Nq // p.rows)), dtype=acc, device=grad.device)
    p.scale, p.eps, p.inv_keys = scale, eps, 1.0 / n_keys
    p.grad, p.grad_st = rec.pointer(grad, "grad"), _strides(grad)
    p.r, p.r_st = rec.pointer(r, "r"), _strides(r)
    p.u, p.u_st = rec.pointer(u, "u"), _strides(u.expand(grad.shape))
    p.vector = _vector_items(grad.dtype, p.D, ((grad, p.grad_st), (r, p.r_st), (u, p.u_st)))
    p.stats = rec.pointer(stats, "head_stats")
    p.W, p.c = _param_ref(mix_weight, "head_W"), _param_ref(mix_bias, "head_c")
    p.partials = rec.pointer(partials, "partials")
    warps = HEAD_AFFINE_THREADS // 32
    touched = [(grad, {"read"}), (r, {"read"}), (u, {"read"}), (stats, {"read"}), (mix_weight, {"read"}),
               (partials, {"write"})] + ([(mix_bias, {"read"})] if mix_bias is not None else [])
    # head_affine.cuh's head_dot_sums_shared: the warps' sums, then U's row staged where it is one per (b, h)
    staged = _staged_u_bytes(grad.dtype, p) if p.u_st.n == 0 else 0
    _record_head("head_dot_sums_kernel", grad.dtype, p, touched, 2 * warps * acc.itemsize + staged)
    return partials.sum(dim=(1, 3), dtype=torch.float64) if summed else partials


def _padded_rows(tensors):
    """reattn.backends.cuda._padded_rows: ops.cpp's padded_rows itself on the meta tensors (its copies are torch ops,
    counted; the views it records are what :func:`_vector_aligned` reads as they are)."""
    return _C().cuda_padded_rows(list(tensors))


@functools.lru_cache(maxsize=None)
def shim_ops():
    """The CUDA backend's ops over the shim (``reattn::static_model_cuda_*``, registered once per process)."""
    from reattn.backends._fused import FusedKernels, FusedRawOps
    from reattn.backends._ladder import OpLadder

    kernels = FusedKernels(forward=_forward, gram_sums=_gram_sums, bn_grad_sums=_bn_grad_sums, backward=_backward,
                           forward_moments=_forward_moments, head_affine=_head_affine,
                           centers_in_forward=True, head_dot_sums=_head_dot_sums, bn_moments=_bn_moments, bn_coefficients=_bn_coefficients,
                           update_running_stats=_update_running_stats,
                           forward_eval_batchnorm=_forward_eval_batchnorm, padded_rows=_padded_rows,
                           forward_stages_queries=lambda q, k: _C().cuda_forward_stages_queries(
                               q.shape[1], q.shape[3], k.shape[2], str(q.dtype)[6:]),
                           softmax_stats_shape=lambda q: (*q.shape[:3], 2))
    # No device implementation: the static model calls the ladder's Python bodies (OpLadder.*_impl) directly.
    return OpLadder(FusedRawOps(kernels), forward="reattn::static_model_cuda_forward",
                    backward="reattn::static_model_cuda_backward", gram_sums="reattn::static_model_cuda_gram_sums",
                    bn_grad_sums="reattn::static_model_cuda_bn_grad_sums",
                    running_stats="reattn::static_model_cuda_update_running_stats",
                    eval_batchnorm="reattn::static_model_cuda_forward_eval_batchnorm",
                    padded_rows="reattn::static_model_cuda_padded_rows", device_types=())


def cuda_call(B: int, H: int, N: int, D: int, norm: str, arch: int, dtype=torch.bfloat16) -> Dict[str, list]:
    """{"fwd": [...], "bwd": [...]}: the CUDA backend's launches (:class:`Launch`) and torch ops of one call."""
    global _RECORDER
    from benchmarks import triton_side
    from benchmarks.eager_model import OpCounter

    ops = shim_ops()
    if D % 8:  # the padding's zeros, kept by ops.cpp (and its mirror here) from a process's first call on
        row = torch.empty((1, 1, 1, D), dtype=dtype, device="meta")
        _C().cuda_padded_rows([row])
        _padding_zeros(row, -D % 8)
    _RECORDER = recorder = _Recorder(arch)
    try:
        with OpCounter() as counter:
            return triton_side.run_call(ops, B, H, N, D, norm, dtype, counter,
                                        lambda: triton_side._drain(recorder.launches))
    finally:
        _RECORDER = None


# ---- the model of one launch ------------------------------------------------------------------------------------
def _check_param_size(symbol: str, arch: int, library: str, struct: type = ReAttnParams) -> None:
    text = _res_usage_text(arch, library)
    m = re.search(re.escape(symbol) + r":\s*\n\s*REG:\d+.*?CONSTANT\[0\]:(\d+)", text)
    if m and int(m.group(1)) - PARAM_OFFSET[arch] != ctypes.sizeof(struct):
        raise RuntimeError(f"{struct.__name__} mirror is {ctypes.sizeof(struct)} bytes but {symbol} takes "
                           f"{int(m.group(1)) - PARAM_OFFSET[arch]}: update benchmarks/cuda_side.py from params.h")


@functools.lru_cache(maxsize=None)
def _res_usage_text(arch: int, library: str) -> str:
    return subprocess.run([sass.tool("cuobjdump"), "-res-usage", "-arch", f"sm_{arch}", library], capture_output=True,
                          text=True).stdout


CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "reattn-static-model")


@functools.lru_cache(maxsize=None)
def _emulate(symbol: str, arch: int, const: bytes, threads: int, grid: Tuple[int, int], ctaid: Tuple[int, int],
             shared: int) -> sass_exec.Counts:
    """sass_exec.run_block, cached on disk by the code, the parameters and the emulator's source."""
    functions, _ = _functions(arch, extension_path())
    function = functions[symbol]
    key = hashlib.sha256()
    key.update("\n".join(f"{i.address} {i.text}" for i in function.instructions).encode())
    key.update(repr((symbol, arch, grid, ctaid, shared, threads)).encode())
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
    counts = sass_exec.run_block(function, const, threads, (ctaid[0], ctaid[1], 0), (grid[0], grid[1], 1), shared,
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


def _sample_grid(launch: Launch) -> Tuple[int, int]:
    """The launch's grid for one batch element (programs per batch element along x, head-dim chunks along y):
    neither the row programs' nor the key pass's grid depends on the length the model shortens."""
    return launch.grid[0] // max(int(launch.params.B), 1), launch.grid[1]


def _run_at(launch: Launch, arch: int, ctaid: Tuple[int, int], length: Optional[int]) -> sass_exec.Counts:
    """The block at ``ctaid`` of the launch with B = 1 (a program reads only its batch element) and the swept
    length (Nk or Nq) set to ``length`` (None: the real one)."""
    q = type(launch.params).from_buffer_copy(bytes(launch.params))
    q.B = 1
    if length is not None:
        if launch.sweep == "keys":
            q.Nk = length
        else:
            q.Nq = length
    grid = _sample_grid(launch)
    const = sass_exec.constant_bank(bytes(q), arch, launch.threads, grid)
    return _emulate(launch.symbol, arch, const, launch.threads, grid, ctaid, launch.dynamic_shared)


@dataclass
class ProgramCounts:
    """Warp-instructions per address of the launch's average program, and how they were obtained."""

    issued: Dict[int, float]
    generic: Dict[int, float]
    diag: sass_exec.Counts
    method: str                    # "full" or "extrapolated from N units"


def program_counts(launch: Launch, arch: int) -> ProgramCounts:
    """See the module doc: the first block (per head-dim chunk kind), at the real length or extrapolated."""
    p = launch.params
    length = int(p.Nk) if launch.sweep == "keys" else int(p.Nq)
    units = -(-length // launch.unit)
    r = length - (units - 1) * launch.unit
    chunks = launch.grid[1]
    c_samples = [(0, 1.0 / chunks)] + ([(1, (chunks - 1) / chunks)] if chunks > 1 else [])
    total: Dict[int, float] = {}
    generic: Dict[int, float] = {}
    diag = sass_exec.Counts()
    methods = set()

    def accumulate(runs_and_weights, weight):
        for field_, out in (("issued", total), ("generic_global", generic)):
            for counts, w in runs_and_weights:
                for a, n in getattr(counts, field_).items():
                    out[a] = out.get(a, 0.0) + weight * w * n

    for chunk, wc in c_samples:
        if launch.one_segment or units <= 4:
            full = _run_at(launch, arch, (0, chunk), None)
            diag.add(full)
            accumulate([(full, 1.0)], wc)
            methods.add("full")
            continue
        c2, c3, c4 = (_run_at(launch, arch, (0, chunk), r + n * launch.unit) for n in (1, 2, 3))
        step3 = {a: c3.issued.get(a, 0) - c2.issued.get(a, 0) for a in set(c2.issued) | set(c3.issued)}
        step4 = {a: c4.issued.get(a, 0) - c3.issued.get(a, 0) for a in set(c3.issued) | set(c4.issued)}
        if any(step3.get(a, 0) != step4.get(a, 0) for a in set(step3) | set(step4)):
            full = _run_at(launch, arch, (0, chunk), None)  # not linear in the units: count the real size
            diag.add(full)
            accumulate([(full, 1.0)], wc)
            methods.add("full (not linear in the swept length)")
            continue
        for c in (c2, c3, c4):
            diag.add(c)
        # n units = c2 + (n - 2) (c3 - c2)
        accumulate([(c2, 1.0 - (units - 2)), (c3, float(units - 2))], wc)
        methods.add(f"extrapolated from 2-4 {'key' if launch.sweep == 'keys' else 'query'} units of {launch.unit} "
                    f"to {units}")
    return ProgramCounts(total, generic, diag, "; ".join(sorted(methods)))


def model_launch(launch: Launch, arch: int) -> kernel_model.KernelModel:
    library = extension_path()
    functions, resources = _functions(arch, library)
    function = functions[launch.symbol]
    res = resources[launch.symbol]
    _check_param_size(launch.symbol, arch, library, type(launch.params))
    counts = program_counts(launch, arch)
    work, kinds = kernel_model.work_from_sass(function, counts.issued, counts.generic)
    diag = counts.diag
    notes = [f"counted by emulating the first block ({counts.method})"]
    if launch.core and _tensor_cores(launch.dtype):
        notes.insert(0, f"CUDA-core fallback: the planner has no tensor-core tile shape for this problem within "
                        f"sm_{arch}'s shared memory")
    if diag.unknown_branches:
        notes.append(f"{sum(diag.unknown_branches.values()):g} branch decisions on unknown values taken as not taken")
    if diag.unmodelled:
        notes.append("no semantics for " + ", ".join(sorted(diag.unmodelled)))
    warps = -(-launch.threads // 32)
    loops = emulated_loops(function, counts.issued, warps)
    return kernel_model.KernelModel(
        backend="cuda", name=launch.name, phase="", arch=arch, programs=launch.programs, threads=launch.threads,
        registers=res.registers, spill_bytes=sass.spill_bytes(res, function),
        shared_bytes=launch.dynamic_shared + res.shared_static, work=work,
        hbm_bytes=kernel_model.unique_bytes(launch.touched), loops=loops, tensor_kinds=kinds, note="; ".join(notes))


def emulated_loops(function: sass.Function, multiplicity: Dict[int, float],
                   warps: int) -> List[kernel_model.LoopReport]:
    """Each SASS loop with the trips per entry the emulation found (issues of its head / issues of the instruction
    that falls into it) and its body per iteration by class. Loops that overlap without nesting (the compiler's
    layout of these programs can make them) are listed flat, by back edge, with their whole range as body."""
    try:
        loops = function.all_loops()
        nested = True
    except ValueError:
        nested = False
        edges: Dict[int, int] = {}
        for ins in function.instructions:
            if ins.base == "BRA" and ins.target is not None and ins.target < ins.address:
                edges[ins.target] = max(edges.get(ins.target, 0), ins.address)
        loops = [sass.Loop(head, tail, ()) for head, tail in sorted(edges.items())]
    index = {ins.address: i for i, ins in enumerate(function.instructions)}
    reports = []
    for loop in loops:
        before = index[loop.head] - 1
        entries = multiplicity.get(function.instructions[before].address, 0.0) if before >= 0 else float(warps)
        trips = multiplicity.get(loop.head, 0.0) / entries if entries else 0.0
        inner = [c for c in loop.walk() if c is not loop] if nested else []
        body = [ins for ins in function.instructions
                if loop.contains(ins.address) and not any(c.contains(ins.address) for c in inner)]
        where = " <- ".join(f"{os.path.basename(f)}:{n}" for f, n in loop.location[:2])
        reports.append(kernel_model.LoopReport(loop.head, loop.tail, loop.depth if nested else 0, where, trips,
                                               dict(sass.class_counts(body))))
    return reports
