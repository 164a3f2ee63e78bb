"""The last step of one-sweep training BatchNorm, fused: O = alpha_h R + beta_h U, cast to the output dtype.

The forward with moments (``re_attention_forward(..., with_moments=True)``) leaves R' = X V in the
accumulation dtype; once the batch statistics are summed, the norm is a per-head affine map that
commutes with the product by V (docs/math.md, "One-sweep training BatchNorm"):

    O[b, h, i, :] = alpha[h] * R'[b, h, i, :] + beta[h] * U[b, h, i, :]

with U = (unmasked keys) V broadcast by strides ([B or 1, H or 1, Nq or 1, D]). One read of R' and
one write of O, where the same in torch takes four passes over [B, H, Nq, D] (predicted at DeiT-S
on an H100: ~185 us of element-wise work against ~30).

Nothing here imports ``reattn``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting, next_pow2, run_on_device


@triton.jit
def _affine_kernel(R, U, O, ALPHA, BETA, H, N_Q, D, stride_rb, stride_rh, stride_rm, stride_ub, stride_uh, stride_um,
                   stride_ob, stride_oh, stride_om, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)  # b * H + h: scalars per program, no per-row division
    b = (bh // H).to(tl.int64)
    h = bh % H
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    tile = (i < N_Q)[:, None] & (cols < D)[None, :]
    r = tl.load(R + (b * stride_rb + h * stride_rh) + (i * stride_rm)[:, None] + cols[None, :], mask=tile, other=0.0)
    u = tl.load(U + (b * stride_ub + h * stride_uh) + (i * stride_um)[:, None] + cols[None, :], mask=tile, other=0.0)
    out = r * tl.load(ALPHA + h) + u.to(r.dtype) * tl.load(BETA + h)
    tl.store(O + (b * stride_ob + h * stride_oh) + (i * stride_om)[:, None] + cols[None, :],
             out.to(O.dtype.element_ty), mask=tile)


def head_affine(r: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``(alpha[h] * r + beta[h] * u).to(dtype)`` in one pass.

    r: [B, H, Nq, D] in the accumulation dtype, unit last stride; u: broadcastable to it (any
    strides, unit last stride); alpha, beta: [H] in r's dtype. Returns a new contiguous [B, H, Nq, D].
    """
    B, H, Nq, D = r.shape
    if alpha.shape != (H,) or beta.shape != (H,):
        raise ValueError(f"head_affine: alpha and beta must be [{H}], got {tuple(alpha.shape)}, {tuple(beta.shape)}")
    out = torch.empty((B, H, Nq, D), dtype=dtype, device=r.device)
    if out.numel() == 0:
        return out
    u = u.expand(B, H, Nq, D)
    if r.stride(-1) != 1 or u.stride(-1) != 1:
        raise ValueError("head_affine: r and u need a unit stride over the head dim")
    rows = 4 if interpreting() else max(1, min(next_pow2(Nq), 4096 // next_pow2(D)))
    run_on_device(_affine_kernel, (triton.cdiv(Nq, rows), B * H), r.device,
                  r, u, out, alpha.to(r.dtype).contiguous(), beta.to(r.dtype).contiguous(), H, Nq, D,
                  r.stride(0), r.stride(1), r.stride(2), u.stride(0), u.stride(1), u.stride(2),
                  out.stride(0), out.stride(1), out.stride(2), ROWS=rows, BLOCK_D=max(16, next_pow2(D)),
                  num_warps=4)
    return out
