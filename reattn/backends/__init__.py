"""Backend registry: which implementations of ``re_attention`` exist and which can run a problem.

``backend="auto"`` is the only place that chooses; an explicit backend that cannot run raises a
ValueError saying why and never falls back to another one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from reattn._extension import emulating, extension_error_message
# The kernels' limits live with their launch rules (a stdlib-only module: importable without triton).
from reattn.kernels.launch import MAX_HEAD_DIM, MAX_HEADS, interpreting

BACKENDS = ("eager", "triton", "cuda", "cpu")
BACKEND_CHOICES = ("auto",) + BACKENDS


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can run a call."""

    device: torch.device
    heads: int = 1
    head_dim: int = 1
    norm: str = "none"
    batchnorm_training: bool = False
    dropout: bool = False
    masked: bool = False
    mask_per_head: bool = False       # attn_mask has a head dimension > 1 (float masks only)
    mask_requires_grad: bool = False
    return_attention: bool = False
    needs_grad: bool = False
    dtype: Optional[torch.dtype] = None  # q's dtype; None = not known (a backend then assumes it can)
    n_queries: Optional[int] = None      # Nq and Nk, for the "auto" rule's measured regimes; None = not known
    n_keys: Optional[int] = None
    # Training-mode BatchNorm statistics all-reduced across processes. Every backend implements it
    # (the fused ones as steps around their statistics and backward-sums sweeps), under the limits
    # it has without it (Triton/CUDA: one mask for all heads), so no backend refuses it as such.
    synced_stats: bool = False
    functorch: bool = False  # called inside a torch.func transform (vmap, grad, jacrev, ...)


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401

        import reattn.kernels.forward  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install triton (it comes with CUDA builds of torch)"
    return None


# Triton supports NVIDIA GPUs of compute capability 8.0 and newer, and the kernels are compiled and
# checked for those (tests/kernels/test_aot.py); on sm_75 the same tiles need twice the shared memory.
TRITON_MIN_CAPABILITY = (8, 0)
NO_GPU = "no CUDA GPU is available here (torch.cuda.is_available() is False)"


def _gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


# Measured on an H200 (triton 3.6): compiled float64 kernels match float64 only to ~1e-8, because the JIT
# passes Python float arguments (the softmax scale, out_scale, eps, dropout_p) as fp32; triton 3.6 also fails
# to compile several of them ("fp64 don't support largeK MMA"). The interpreter keeps them exact, so CPU
# tensors with TRITON_INTERPRET=1 still run float64.
TRITON_FLOAT64_ON_GPU = ("the Triton kernels do not run float64 on a GPU yet: Triton passes their float arguments "
                         "(softmax scale, out_scale, eps) as fp32, which measured ~1e-8 relative errors on an H200; "
                         "backend='cuda' or 'eager' computes float64 exactly")


def _triton_reason(problem: Problem) -> Optional[str]:
    if problem.device.type != "cuda" and not (problem.device.type == "cpu" and interpreting()):
        return "the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, the interpreter)"
    missing = _triton_import_error()
    if missing is not None:
        return missing
    limits = _shared_fused_limits(problem, "Triton kernels")
    if limits is not None or problem.device.type != "cuda":
        return limits
    if not torch.cuda.is_available():
        return NO_GPU
    if torch.cuda.get_device_capability(problem.device) < TRITON_MIN_CAPABILITY:
        return (f"the Triton kernels need a GPU of compute capability "
                f"{'.'.join(map(str, TRITON_MIN_CAPABILITY))} or newer, this is {_gpu_name(problem.device)}")
    if problem.dtype == torch.float64:
        return TRITON_FLOAT64_ON_GPU
    from reattn.kernels.launch import backward_config, device_shared_limit, forward_config

    shared_limit = device_shared_limit(problem.device)
    size = problem.dtype.itemsize if problem.dtype is not None else 2
    try:  # every kernel the call may launch fits the GPU's shared memory
        forward_config(1, 1, problem.head_dim, problem.heads, interpret=False, shared_limit=shared_limit,
                       element_size=size)
        if problem.needs_grad:
            for kernel in ("dq", "dkdv"):
                backward_config(1, 1, problem.head_dim, problem.heads, interpret=False, shared_limit=shared_limit,
                                element_size=size, kernel=kernel)
    except ValueError as error:
        return f"{error} ({_gpu_name(problem.device)})"
    return None


def cuda_arch_runs(archs: "list[int]", capability: "tuple[int, int]") -> bool:
    """Whether code built for ``archs`` (SASS for each, PTX for the newest) runs on ``capability``.

    SASS for sm_XY runs on X.Z for Z >= Y (same major); the PTX of the newest arch is compiled by
    the driver for any GPU at least that new.
    """
    major, minor = capability
    if any(a // 10 == major and a % 10 <= minor for a in archs):
        return True
    return bool(archs) and (major, minor) >= divmod(max(archs), 10)


def _shared_fused_limits(problem: Problem, kernels: str) -> Optional[str]:
    """Limits the Triton and CUDA kernels share (one statistics sweep, heads and head dims they tile)."""
    if problem.mask_requires_grad and problem.needs_grad:
        return f"the {kernels} do not compute gradients with respect to attn_mask (it requires grad)"
    if problem.batchnorm_training and problem.mask_per_head:
        return (f"training-mode BatchNorm with an attn_mask that differs per head is not supported by the {kernels} "
                "(their statistics sweep shares one mask across heads): give the mask a head dim of 1")
    if problem.heads > MAX_HEADS:
        return f"the {kernels} support at most {MAX_HEADS} heads, got {problem.heads}"
    if problem.head_dim > MAX_HEAD_DIM:
        return f"the {kernels} support head dims up to {MAX_HEAD_DIM}, got {problem.head_dim}"
    return None


def _cuda_reason(problem: Problem) -> Optional[str]:
    if problem.device.type != "cuda" and not (problem.device.type == "cpu" and emulating()):
        return ("the CUDA C++ kernels need CUDA tensors (or CPU tensors with REATTN_CUDA_EMULATE=1, the host "
                "emulator used for testing)")
    missing = extension_error_message()
    if missing is not None:
        return missing
    from reattn._extension import BUILD_INFO, _C

    if not hasattr(_C, "cuda_forward"):
        return "the compiled extension reattn._C predates the CUDA kernels; rebuild it (pip install --no-build-isolation -e .)"
    limits = _shared_fused_limits(problem, "CUDA C++ kernels")
    if limits is not None:
        return limits
    if problem.device.type == "cuda":
        if not torch.cuda.is_available():
            return NO_GPU
        info = BUILD_INFO
        if not info["cuda"]:
            return ("reattn._C was built without CUDA (the torch at build time had none, or REATTN_NO_CUDA=1); "
                    "rebuild it with a CUDA torch and toolkit")
        archs = [int(a) for a in info["cuda_archs"].split(",") if a.strip()]
        capability = torch.cuda.get_device_capability(problem.device)
        if not cuda_arch_runs(archs, capability):
            built = ", ".join(f"sm_{a}" for a in archs)
            return (f"reattn._C's CUDA kernels were built for {built} (+PTX for sm_{max(archs)}), which cannot run on "
                    f"{_gpu_name(problem.device)}; rebuild with REATTN_CUDA_ARCHS={capability[0]}{capability[1]} "
                    "(pip install --no-build-isolation -e .)")
    return None


def _cpu_reason(problem: Problem) -> Optional[str]:
    if problem.device.type != "cpu":
        return "the fused C++ CPU kernel needs CPU tensors"
    missing = extension_error_message()
    if missing is not None:
        return missing
    from reattn._extension import _C

    if not hasattr(_C, "re_attention_cpu_forward"):
        return "the compiled extension reattn._C predates the fused CPU kernel; rebuild it (pip install --no-build-isolation -e .)"
    if not hasattr(_C, "re_attention_cpu_gram_sums"):  # reattn.backends.cpu calls the kernel's current interface
        return ("the compiled extension reattn._C predates the fused CPU kernel's current interface (gram_sums, "
                "bn_grad_sums in the backward's convention); rebuild it (pip install --no-build-isolation -e .)")
    if problem.dtype is not None and problem.dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                           torch.float16):
        return f"the fused CPU kernel supports float32, float64, bfloat16 and float16, got {problem.dtype}"
    if getattr(problem, "mask_requires_grad", False) and problem.needs_grad:
        return "the fused CPU kernel does not compute gradients with respect to attn_mask (it requires grad)"
    return None


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a torch.func transform (vmap, grad, jacrev, jvp, ...)."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)  # traced by torch.compile as None
    return level is not None and level() is not None


FUNCTORCH_REFUSAL = ("torch.func transforms (vmap, grad, jacrev, jvp, ...) cannot run through the fused kernels' "
                     "custom ops, which have no functorch rules; backend='eager' supports them (backend='auto' "
                     "picks it inside a transform)")


def unavailable_reason(backend: str, problem: Problem) -> Optional[str]:
    """None if ``backend`` can run ``problem``; otherwise a sentence saying why not."""
    if backend == "eager":
        return None
    if problem.return_attention:
        return "return_attention=True materializes the [B, H, Nq, Nk] map, which only backend='eager' does"
    if problem.functorch:
        return FUNCTORCH_REFUSAL
    if backend == "triton":
        return _triton_reason(problem)
    if backend == "cpu":
        return _cpu_reason(problem)
    return _cuda_reason(problem)


def available_backends(device: "torch.device | str" = "cpu") -> list:
    """Names of the backends that can run on ``device`` (always includes "eager").

    A backend listed here may still refuse some modes (masks, dropout, ...): it says why.
    """
    problem = Problem(torch.device(device))
    return [name for name in BACKENDS if unavailable_reason(name, problem) is None]


def _norm_mode(problem: Problem) -> str:
    if problem.norm == "batch":
        return "batch-train" if problem.batchnorm_training else "batch-eval"
    return problem.norm


def measured_speedup(problem: Problem, backend: str, device_name: str, measurements=None):
    """(speed-up over eager, the measurement) of ``backend`` for ``problem``'s regime on the GPU named
    ``device_name``, or (None, None) when no recorded measurement covers it (``reattn.backends.measured``).

    A measurement covers a call on the same GPU model, dtype, heads, head dim, norm mode and mode
    (forward, or forward+backward when gradients are needed) whose sequence length is within a factor
    of 2 of the measured one; the closest in length decides.
    """
    from reattn.backends.measured import GPU_MEASUREMENTS

    rows = GPU_MEASUREMENTS if measurements is None else measurements
    dtype = str(problem.dtype).replace("torch.", "") if problem.dtype is not None else None
    mode = "fwd+bwd" if problem.needs_grad else "fwd"
    n = problem.n_keys or problem.n_queries
    best = None
    for m in rows:
        if (m.backend != backend or m.device != device_name or m.dtype != dtype or m.heads != problem.heads
                or m.head_dim != problem.head_dim or m.norm != _norm_mode(problem) or m.mode != mode or n is None
                or not (m.tokens / 2 <= n <= m.tokens * 2)):
            continue
        if best is None or abs(m.tokens - n) < abs(best.tokens - n):
            best = m
    return (best.speedup, best) if best is not None else (None, None)


@dataclass(frozen=True)
class BackendChoice:
    """What ``backend="auto"`` (or an explicit backend) resolves to for a call, and why (``reasons``:
    one sentence per backend considered)."""

    backend: str
    reasons: "dict"

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        lines += [f"  {name}: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - no driver: no measurement can match
        return "?"


def choose_backend(backend: str, problem: Problem, measurements=None) -> BackendChoice:
    """Resolve ``backend`` (a name or "auto") for ``problem`` and say why each candidate was or was not chosen.

    auto, CUDA tensors: a fused backend (Triton, then CUDA C++) runs only where a recorded GPU
    measurement (``reattn.backends.measured``, generated from benchmarks/results/) shows it faster
    than eager in this regime; elsewhere eager. CPU tensors: see the [cpu-auto] note in resolve_backend.
    An explicit backend that cannot run raises ValueError (it never falls back).
    """
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"re_attention: backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    reasons = {}
    if backend != "auto":
        reason = unavailable_reason(backend, problem)
        if reason is not None:
            raise ValueError(f"re_attention: backend={backend!r} cannot run on {problem.device}: {reason}")
        reasons[backend] = "asked for explicitly, and it can run this call"
        return BackendChoice(backend, reasons)
    if problem.device.type == "cuda":
        name = _device_name(problem.device)
        for candidate in ("triton", "cuda"):
            reason = unavailable_reason(candidate, problem)
            if reason is not None:
                reasons[candidate] = f"cannot run: {reason}"
                continue
            speedup, m = measured_speedup(problem, candidate, name, measurements)
            if speedup is None:
                reasons[candidate] = (f"can run, but no GPU measurement in reattn.backends.measured shows it faster "
                                      f"than eager on {name} for {_regime(problem)}; the static model predicts the "
                                      "kernels but is not a measurement (backend='{0}' runs it anyway)".format(candidate))
            elif speedup <= 1.0:
                reasons[candidate] = (f"measured {speedup:.2f}x eager's speed on {m.device} ({m.dtype}, H={m.heads}, "
                                      f"N={m.tokens}, D={m.head_dim}, {m.mode}, {m.norm}; {m.date[:10]}, commit "
                                      f"{m.commit}): not faster")
            else:
                reasons[candidate] = (f"chosen: measured {speedup:.2f}x faster than eager on {m.device} ({m.dtype}, "
                                      f"H={m.heads}, N={m.tokens}, D={m.head_dim}, {m.mode}, {m.norm}; "
                                      f"{m.date[:10]}, commit {m.commit})")
                reasons["eager"] = "not chosen: a fused backend was measured faster here"
                return BackendChoice(candidate, reasons)
        reasons["eager"] = "chosen: no fused backend is measured faster than eager for this call on this GPU"
        return BackendChoice("eager", reasons)
    chosen = resolve_backend("auto", problem)
    for name in BACKENDS:
        if name == chosen:
            reasons[name] = "chosen"
        elif name == "eager":
            reasons[name] = "not chosen: a fused backend can run this call"
        else:
            reason = unavailable_reason(name, problem)
            reasons[name] = (f"cannot run: {reason}" if reason is not None else
                             "can run, but 'auto' does not pick it for this device or mode (see the [cpu-auto] note)")
    return BackendChoice(chosen, reasons)


def _regime(problem: Problem) -> str:
    dtype = str(problem.dtype).replace("torch.", "") if problem.dtype is not None else "?"
    n = problem.n_keys or problem.n_queries
    return (f"{dtype}, H={problem.heads}, N={n if n is not None else '?'}, D={problem.head_dim}, "
            f"{'fwd+bwd' if problem.needs_grad else 'fwd'}, norm {_norm_mode(problem)}")


def resolve_backend(backend: str, problem: Problem) -> str:
    """Map ``backend`` (a name or "auto") to the backend that will run, or raise ValueError."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"re_attention: backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        if problem.device.type == "cuda":
            # CUDA tensors: a fused backend only where a recorded GPU measurement shows it faster than
            # eager (choose_backend); none has run on a GPU yet, so eager.
            return choose_backend("auto", problem).backend
        # [cpu-auto] Fused backends in order of preference per device (the Triton interpreter is for
        # testing, never "auto"). CPU tensors: the fused C++ kernel whenever it can run, because the
        # CPU rows of benchmarks/results/microbench.csv (python -m benchmarks.bench_reattn) show it
        # faster than eager in every norm mode and both directions at the model shapes, and using
        # several times less memory; the few short-sequence fp32 shapes where eager's batched GEMMs
        # win are close enough that no size threshold is kept.
        # Not with dropout: its counter-based RNG draws other keep-masks than F.dropout under the same
        # torch seed, and "auto" keeps the official module's dropout pattern (backend="cpu" opts in).
        preference = {"cpu": () if problem.dropout else ("cpu",)}.get(problem.device.type, ())
        for name in preference:
            if unavailable_reason(name, problem) is None:
                return name
        return "eager"
    reason = unavailable_reason(backend, problem)
    if reason is not None:
        raise ValueError(f"re_attention: backend={backend!r} cannot run on {problem.device}: {reason}")
    return backend
