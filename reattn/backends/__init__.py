"""Backend registry: which implementations of ``re_attention`` exist and which can run here.

``backend="auto"`` is the only place that chooses; an explicit backend that cannot run raises a
ValueError saying why and never falls back to another one.
"""
from __future__ import annotations

from typing import Optional

import torch

from reattn._extension import extension_error_message

BACKENDS = ("eager", "triton", "cuda", "cpu")
BACKEND_CHOICES = ("auto",) + BACKENDS

# Fused backends land one issue at a time; until a backend's kernels are in this build it is
# named here so the error says so instead of pretending to run.
_NOT_YET_BUILT = {
    "triton": "the fused Triton kernels are not part of this version of reattn yet",
    "cuda": "the fused CUDA C++ kernels are not part of this version of reattn yet",
    "cpu": "the fused C++ CPU kernel is not part of this version of reattn yet",
}


def unavailable_reason(backend: str, device: torch.device, *, return_attention: bool = False) -> Optional[str]:
    """None if ``backend`` can run on ``device``; otherwise a sentence saying why not."""
    if backend == "eager":
        return None
    if return_attention:
        return "return_attention=True materializes the [B, H, Nq, Nk] map, which only backend='eager' does"
    if backend in ("cuda", "cpu"):
        missing = extension_error_message()
        if missing is not None:
            return missing
    if backend in _NOT_YET_BUILT:
        return _NOT_YET_BUILT[backend]
    raise AssertionError(f"unhandled backend {backend!r}")  # pragma: no cover


def available_backends(device: "torch.device | str" = "cpu") -> list:
    """Names of the backends that can run on ``device`` (always includes "eager")."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def resolve_backend(backend: str, device: torch.device, *, return_attention: bool = False) -> str:
    """Map ``backend`` (a name or "auto") to the backend that will run, or raise ValueError."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"re_attention: backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        # Preference per device, fastest first; eager is always last and always runs.
        preference = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
        for name in preference:
            if unavailable_reason(name, device, return_attention=return_attention) is None:
                return name
        return "eager"
    reason = unavailable_reason(backend, device, return_attention=return_attention)
    if reason is not None:
        raise ValueError(f"re_attention: backend={backend!r} cannot run on {device}: {reason}")
    return backend
