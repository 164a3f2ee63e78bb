"""Argument validation for ``re_attention``: one place, messages that name the argument and shapes.

Everything here looks at shapes, dtypes and devices only (no data-dependent checks, so no host
synchronization on the hot path).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from reattn._batchnorm import COUNT_MESSAGE

NORMS = ("none", "batch", "layer")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"re_attention: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_param_dtype(name: str, t: torch.Tensor, q_dtype: torch.dtype) -> None:
    # Parameters may be kept in float32 beside half-precision activations (mixed-precision
    # training keeps fp32 master weights and BatchNorm running statistics).
    allowed = (q_dtype, torch.float32) if q_dtype in HALF_DTYPES else (q_dtype,)
    if t.dtype not in allowed:
        expected = " or ".join(str(d) for d in allowed)
        raise TypeError(f"re_attention: {name} has dtype {t.dtype}, expected {expected} for q of dtype {q_dtype}")


def _check_vector(name: str, t: Optional[torch.Tensor], H: int, q: torch.Tensor) -> None:
    if t is None:
        return
    _require_tensor(name, t)
    if t.shape != (H,):
        raise ValueError(f"re_attention: {name} must have shape [H] = [{H}], got {_shape(t)}")
    if t.device != q.device:
        raise ValueError(f"re_attention: {name} is on {t.device} but q is on {q.device}")
    _check_param_dtype(name, t, q.dtype)


def _check_mask(attn_mask: torch.Tensor, q: torch.Tensor, Nk: int) -> None:
    _require_tensor("attn_mask", attn_mask)
    B, H, Nq, _ = q.shape
    if attn_mask.device != q.device:
        raise ValueError(f"re_attention: attn_mask is on {attn_mask.device} but q is on {q.device}")
    if attn_mask.dtype == torch.bool:
        target, what = (B, 1, Nq, Nk), "bool attn_mask (True = attend) must broadcast to [B, 1, Nq, Nk]"
    elif attn_mask.dtype in FLOAT_DTYPES:
        target, what = (B, H, Nq, Nk), "float attn_mask (added to the scores) must broadcast to [B, H, Nq, Nk]"
    else:
        raise TypeError(f"re_attention: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    ok = attn_mask.dim() <= 4
    if ok:
        try:
            ok = tuple(torch.broadcast_shapes(attn_mask.shape, target)) == target
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(f"re_attention: {what} = [{', '.join(map(str, target))}], got {_shape(attn_mask)}")


def check_re_attention(
    q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean, running_var,
    training, momentum, eps, out_scale, dropout_p, attn_mask,
) -> "Numbers":
    """Validate every argument of ``re_attention``; return its numbers as floats (the softmax scale resolved)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("mix_weight", mix_weight)):
        _require_tensor(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            layout = "[B, H, Nq, D]" if name == "q" else "[B, H, Nk, D]"
            raise ValueError(f"re_attention: {name} must be 4-D {layout}, got {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"re_attention: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"re_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"re_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"re_attention: k {_shape(k)} must match q {_shape(q)} in B, H and D")
    if v.shape != k.shape:
        raise ValueError(f"re_attention: v {_shape(v)} must have the shape of k {_shape(k)} ([B, H, Nk, D])")
    Nk = k.shape[2]
    if Nk == 0:
        raise ValueError(f"re_attention: k and v need at least one key, got Nk = 0 (k {_shape(k)})")
    if H == 0 or D == 0:
        raise ValueError(f"re_attention: q needs H >= 1 heads and head dim D >= 1, got {_shape(q)}")

    if mix_weight.shape != (H, H):
        raise ValueError(f"re_attention: mix_weight must be [H, H] = [{H}, {H}] ([out, in]), got {_shape(mix_weight)}")
    if mix_weight.device != q.device:
        raise ValueError(f"re_attention: mix_weight is on {mix_weight.device} but q is on {q.device}")
    _check_param_dtype("mix_weight", mix_weight, q.dtype)
    _check_vector("mix_bias", mix_bias, H, q)

    if not isinstance(training, bool):
        raise TypeError(f"re_attention: training must be a bool, got {type(training).__name__}")
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"re_attention: norm must be one of {NORMS}, got {norm!r}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, H, q)
    if norm == "none" and any(t is not None for t in (norm_weight, norm_bias, running_mean, running_var)):
        raise ValueError("re_attention: norm_weight, norm_bias, running_mean and running_var are only used "
                         "with norm='batch' or 'layer'; norm='none' got some of them")
    if norm == "layer" and (running_mean is not None or running_var is not None):
        raise ValueError("re_attention: running_mean/running_var belong to norm='batch', not norm='layer'")
    if norm == "batch":
        if (running_mean is None) != (running_var is None):
            raise ValueError("re_attention: norm='batch' needs both running_mean and running_var, or neither")
        if not training and running_mean is None:
            raise ValueError("re_attention: norm='batch' with training=False normalizes with running statistics: "
                             "pass running_mean and running_var [H]")
        if training and attn_mask is None and B * Nq * Nk <= 1:
            raise ValueError(f"{COUNT_MESSAGE}; got B*Nq*Nk = {B * Nq * Nk}")

    momentum = _real_in("momentum", momentum, 0.0, 1.0, "in [0, 1]")
    eps = _real_in("eps", eps, 0.0, math.inf, "> 0 and finite", low_open=True, high_open=True)
    out_scale = _real_in("out_scale", out_scale, -math.inf, math.inf, "finite", low_open=True, high_open=True)
    dropout_p = _real_in("dropout_p", dropout_p, 0.0, 1.0, "in [0, 1)", high_open=True)

    if attn_mask is not None:
        _check_mask(attn_mask, q, Nk)

    if scale is None:
        scale = D ** -0.5
    else:
        scale = _real_in("scale", scale, -math.inf, math.inf, "finite", low_open=True, high_open=True, optional=True)
    return Numbers(scale, momentum, eps, out_scale, dropout_p)


class Numbers(NamedTuple):
    """re_attention's scalar arguments after validation: Python floats (or symbolic under torch.compile)."""

    scale: float
    momentum: float
    eps: float
    out_scale: float
    dropout_p: float


def _real_in(name: str, value, low: float, high: float, expectation: str, *, low_open: bool = False,
             high_open: bool = False, optional: bool = False):
    """``value`` as a float if it is a real number within [low, high] (open ends as told), else raise.

    Any real number kind is accepted (int, float, numpy scalars, fractions), not bool, complex or a
    tensor. Symbolic numbers (torch.compile with dynamic shapes) are checked at run time with
    torch._check_value, which also raises ValueError, and stay symbolic.
    """
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        # Separate checks: combining symbolic conditions with `and` would specialize the value. A NaN
        # fails every comparison, so the two bounds also refuse it.
        message = lambda: f"re_attention: {name} must be {expectation}, got {value}"  # noqa: E731
        torch._check_value(value > low if low_open else value >= low, message)
        torch._check_value(value < high if high_open else value <= high, message)
        return value
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        kind = "a float or None" if optional else "a real number (int, float or a numpy scalar)"
        hint = " (a 0-dim tensor: pass float(t))" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"re_attention: {name} must be {kind}, got {type(value).__name__}{hint}")
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):  # also NaN
        raise ValueError(f"re_attention: {name} must be {expectation}, got {value}")
    return number
