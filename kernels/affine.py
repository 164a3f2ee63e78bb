"""The last steps of one-sweep training BatchNorm, fused: the forward's finish and the backward's sums.

The forward with moments (``re_attention_forward(..., with_moments=True)``) leaves R' = X V (in the
accumulation dtype, or in q's where the caller keeps it); once the batch statistics are summed, the
norm is a per-head affine map that commutes with the product by V (docs/math.md, "Training BatchNorm in
one sweep"):

    O[b, h, i, :] = alpha[h] * R'[b, h, i, :] + beta[h] * U[b, h, i, :]

with U = (unmasked keys) V broadcast by strides ([B or 1, H or 1, Nq or 1, D]). One read of R' and
one write of O, where the same in torch takes four passes over [B, H, Nq, D] (predicted at DeiT-S on
an H100: ~185 us of element-wise work against ~30).

The backward's BatchNorm sums are then sums over [B, Nq, D] per head, as FlashAttention's
delta = rowsum(dO * O) (docs/math.md, "Through V and the norm"):

    sum_entries dN xhat = out_scale sum dO . R,    sum_entries dN = out_scale sum dO . U

with R = xhat V = rstd (R' - mean(X) U) linear in R' and U: one read of dO and R' instead of a sweep
over the keys that recomputes the map (the caller turns the sums over R' into those over R).

Nothing here imports ``reattn``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting, next_pow2, run_on_device


@triton.jit
def _u_tile(U, b, h, i, cols, tile, D, stride_ub, stride_uh, stride_um, U_ROWS: tl.constexpr):
    """U's [ROWS, BLOCK_D] tile at rows i of (b, h) (0 outside ``tile``), or with one row of U for every row (no
    mask; not U_ROWS) that row, loaded once, not once per row, as [1, BLOCK_D]."""
    if U_ROWS:
        u = tl.load(U + (b * stride_ub + h * stride_uh) + (i * stride_um)[:, None] + cols[None, :], mask=tile,
                    other=0.0)
    else:
        u = tl.load(U + (b * stride_ub + h * stride_uh) + cols, mask=cols < D, other=0.0)[None, :]
    return u


@triton.jit
def _affine_kernel(R, U, O, ALPHA, BETA, H, N_Q, D, stride_rb, stride_rh, stride_rm, stride_ub, stride_uh, stride_um,
                   stride_ob, stride_oh, stride_om, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, U_ROWS: tl.constexpr):
    bh = tl.program_id(1)  # b * H + h: scalars per program, no per-row division
    b = (bh // H).to(tl.int64)
    h = bh % H
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    tile = (i < N_Q)[:, None] & (cols < D)[None, :]
    acc_dtype = U.dtype.element_ty  # the coefficients' and U's: R' in q's dtype is upcast once loaded
    r = tl.load(R + (b * stride_rb + h * stride_rh) + (i * stride_rm)[:, None] + cols[None, :], mask=tile, other=0.0)
    u = _u_tile(U, b, h, i, cols, tile, D, stride_ub, stride_uh, stride_um, U_ROWS)
    offsets = (b * stride_ob + h * stride_oh) + (i * stride_om)[:, None] + cols[None, :]
    out = r.to(acc_dtype) * tl.load(ALPHA + h) + u * tl.load(BETA + h)
    tl.store(O + offsets, out.to(O.dtype.element_ty), mask=tile)


@triton.jit
def _dot_sums_kernel(G, R, U, PART, H, N_Q, D, stride_gb, stride_gh, stride_gm, stride_rb, stride_rh, stride_rm,
                     stride_ub, stride_uh, stride_um, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, U_ROWS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    i = pid_m * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    tile = (i < N_Q)[:, None] & (cols < D)[None, :]
    acc_dtype = PART.dtype.element_ty
    g = tl.load(G + (b * stride_gb + h * stride_gh) + (i * stride_gm)[:, None] + cols[None, :], mask=tile, other=0.0)
    r = tl.load(R + (b * stride_rb + h * stride_rh) + (i * stride_rm)[:, None] + cols[None, :], mask=tile, other=0.0)
    u = _u_tile(U, b, h, i, cols, tile, D, stride_ub, stride_uh, stride_um, U_ROWS)
    g = g.to(acc_dtype)
    # PART [H, B, row blocks, 2]: a head's parts contiguous, as kernels.batchnorm reads them
    part = PART + ((h.to(tl.int64) * (tl.num_programs(1) // H) + b) * tl.num_programs(0) + pid_m) * 2
    tl.store(part, tl.sum(tl.sum(g * r.to(acc_dtype), axis=1), axis=0))
    tl.store(part + 1, tl.sum(tl.sum(g * u.to(acc_dtype), axis=1), axis=0))


def _rows(n_q: int, d: int, elements: int) -> int:
    """Rows of a program's [rows, D] tiles: ``elements`` per tile (4 warps: elements / 128 registers per tile)."""
    return 4 if interpreting() else max(1, min(next_pow2(n_q), elements // next_pow2(d)))


def head_affine(r: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``(alpha[h] * r + beta[h] * u).to(dtype)`` in one pass, in the accumulation dtype of ``dtype``.

    r: [B, H, Nq, D] in dtype or its accumulation dtype, unit last stride; u: broadcastable to it (any
    strides, unit last stride); alpha, beta: [H]. Returns a new contiguous [B, H, Nq, D] in dtype.
    """
    B, H, Nq, D = r.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if alpha.shape != (H,) or beta.shape != (H,):
        raise ValueError(f"head_affine: alpha and beta must be [{H}], got {tuple(alpha.shape)}, {tuple(beta.shape)}")
    if r.dtype not in (dtype, acc):
        raise TypeError(f"head_affine: r must be {dtype} or {acc}, got {r.dtype}")
    out = torch.empty((B, H, Nq, D), dtype=dtype, device=r.device)
    if out.numel() == 0:
        return out
    u = u.to(acc).expand(B, H, Nq, D)
    if r.stride(-1) != 1 or u.stride(-1) != 1:
        raise ValueError("head_affine: r and u need a unit stride over the head dim")
    rows = _rows(Nq, D, 4096)
    run_on_device(_affine_kernel, (triton.cdiv(Nq, rows), B * H), r.device,
                  r, u, out, alpha.to(acc).contiguous(), beta.to(acc).contiguous(), H, Nq, D,
                  r.stride(0), r.stride(1), r.stride(2), u.stride(0), u.stride(1), u.stride(2),
                  out.stride(0), out.stride(1), out.stride(2), ROWS=rows, BLOCK_D=max(16, next_pow2(D)),
                  U_ROWS=u.stride(2) != 0, num_warps=4)
    return out


def head_dot_sums(grad: torch.Tensor, r: torch.Tensor, u: torch.Tensor, *, summed: bool = True) -> torch.Tensor:
    """[2, H] float64: per head, sum over (b, i, d) of grad * r and of grad * u.

    summed=False: the programs' partial sums instead, [H, B, row blocks, 2] in the accumulation dtype (what
    ``kernels.batchnorm.bn_coefficients`` adds up in its own launch).

    grad, r: [B, H, Nq, D], unit last stride (any dtypes); u: broadcastable to them (any strides, unit last
    stride). Each program sums a [ROWS, D] tile in the accumulation dtype (fp64 for fp64 grad, else fp32):
    its rounding is of order ROWS * D * eps_fp32 of the tile's sum of |terms|; the programs' partial sums
    add up in float64.
    """
    B, H, Nq, D = grad.shape
    if r.shape != grad.shape:
        raise ValueError(f"head_dot_sums: r must have grad's shape {tuple(grad.shape)}, got {tuple(r.shape)}")
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    if grad.numel() == 0:
        if not summed:
            return torch.zeros((H, B, 1, 2), dtype=acc, device=grad.device)
        return torch.zeros((2, H), dtype=torch.float64, device=grad.device)
    u = u.expand(B, H, Nq, D)
    if grad.stride(-1) != 1 or r.stride(-1) != 1 or u.stride(-1) != 1:
        raise ValueError("head_dot_sums: grad, r and u need a unit stride over the head dim")
    rows = _rows(Nq, D, 2048)  # three tiles (dO, R, U): at 4096 elements the kernel spilled
    num_m = triton.cdiv(Nq, rows)
    part = torch.empty((H, B, num_m, 2), dtype=acc, device=grad.device)
    run_on_device(_dot_sums_kernel, (num_m, B * H), grad.device, grad, r, u, part, H, Nq, D,
                  grad.stride(0), grad.stride(1), grad.stride(2), r.stride(0), r.stride(1), r.stride(2),
                  u.stride(0), u.stride(1), u.stride(2), ROWS=rows, BLOCK_D=max(16, next_pow2(D)),
                  U_ROWS=u.stride(2) != 0, num_warps=4)
    if not summed:
        return part
    return part.sum(dim=(1, 2), dtype=torch.float64).transpose(0, 1).contiguous()
