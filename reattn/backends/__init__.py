"""Backend registry: which implementations of ``re_attention`` exist and which can run a problem.

``backend="auto"`` is the only place that chooses; an explicit backend that cannot run raises a
ValueError saying why and never falls back to another one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from reattn._extension import extension_error_message
# The kernels' limits live with their launch rules (a stdlib-only module: importable without triton).
from reattn.kernels.launch import BACKWARD_MAX_HEAD_DIM, MAX_HEAD_DIM, MAX_HEADS, interpreting

BACKENDS = ("eager", "triton", "cuda", "cpu")
BACKEND_CHOICES = ("auto",) + BACKENDS

# Fused backends land one issue at a time; until a backend's kernels are in this build it is
# named here so the error says so instead of pretending to run.
_NOT_YET_BUILT = {
    "cuda": "the fused CUDA C++ kernels are not part of this version of reattn yet",
    "cpu": "the fused C++ CPU kernel is not part of this version of reattn yet",
}



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
    return_attention: bool = False
    needs_grad: bool = False
    synced_stats: bool = False  # training-mode BatchNorm statistics all-reduced across processes


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401

        import reattn.kernels.forward  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install triton (it comes with CUDA builds of torch)"
    return None


def _triton_reason(problem: Problem) -> Optional[str]:
    if problem.device.type != "cuda" and not (problem.device.type == "cpu" and interpreting()):
        return "the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, the interpreter)"
    missing = _triton_import_error()
    if missing is not None:
        return missing
    if problem.masked:
        return "attn_mask is not supported by the Triton kernels yet"
    if problem.dropout:
        return "attention dropout is not supported by the Triton kernels yet"
    if problem.batchnorm_training:
        return "training-mode BatchNorm statistics are not supported by the Triton kernels yet"
    if problem.heads > MAX_HEADS:
        return f"the Triton kernels support at most {MAX_HEADS} heads, got {problem.heads}"
    if problem.head_dim > MAX_HEAD_DIM:
        return f"the Triton kernels support head dims up to {MAX_HEAD_DIM}, got {problem.head_dim}"
    if problem.needs_grad and problem.head_dim > BACKWARD_MAX_HEAD_DIM:
        return (f"the Triton backward supports head dims up to {BACKWARD_MAX_HEAD_DIM} (larger ones do not "
                f"fit shared memory yet), got {problem.head_dim} with gradients required")
    return None


def unavailable_reason(backend: str, problem: Problem) -> Optional[str]:
    """None if ``backend`` can run ``problem``; otherwise a sentence saying why not."""
    if backend == "eager":
        return None
    if problem.return_attention:
        return "return_attention=True materializes the [B, H, Nq, Nk] map, which only backend='eager' does"
    if problem.synced_stats:
        return ("BatchNorm statistics synchronized across processes (sync_group / sync_stats) are only "
                "implemented by backend='eager' so far")
    if backend == "triton":
        return _triton_reason(problem)
    missing = extension_error_message()
    if missing is not None:
        return missing
    return _NOT_YET_BUILT[backend]


def available_backends(device: "torch.device | str" = "cpu") -> list:
    """Names of the backends that can run on ``device`` (always includes "eager").

    A backend listed here may still refuse some modes (masks, dropout, ...): it says why.
    """
    problem = Problem(torch.device(device))
    return [name for name in BACKENDS if unavailable_reason(name, problem) is None]


def resolve_backend(backend: str, problem: Problem) -> str:
    """Map ``backend`` (a name or "auto") to the backend that will run, or raise ValueError."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"re_attention: backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        # Fused backends in order of preference for CUDA tensors; CPU tensors keep the eager
        # path until the fused CPU kernel lands (the interpreter is for testing, never "auto").
        preference = ("cuda", "triton") if problem.device.type == "cuda" else ()
        for name in preference:
            if unavailable_reason(name, problem) is None:
                return name
        return "eager"
    reason = unavailable_reason(backend, problem)
    if reason is not None:
        raise ValueError(f"re_attention: backend={backend!r} cannot run on {problem.device}: {reason}")
    return backend
