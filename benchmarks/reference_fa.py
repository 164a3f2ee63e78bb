"""A reference FlashAttention-2 in Triton: the floor the static model compares Re-attention with.

Standard softmax attention (no head mixing, no mask), O = softmax(scale Q K^T) V, written the way
a good Triton FlashAttention is (the Triton tutorial's fused attention, FlashAttention-2's
algorithm): one program per (query block, batch x head), keys streamed in tiles with an online
softmax in base 2 (log2(e) folded into the scale, ``exp2``), the row logsumexp saved for the
backward; the backward as FlashAttention-2 splits it: a pre-pass Delta = rowsum(O * dO), one kernel
per key block accumulating dK and dV in registers over the query blocks (no atomics), one kernel
per query block accumulating dQ over the key blocks. Per-head 2-D tiles of 64 or 128 rows, so
sm_90 runs the products on wgmma. Head dims that are not a power of two are padded and masked.

It is the stand-in for SDPA in the static model (``benchmarks.static_model``): compiled and
counted the same way as reattn's kernels. ``attention(q, k, v)`` is differentiable and checked
against ``torch.nn.functional.scaled_dot_product_attention`` (tests/benchmarks/test_reference_fa.py,
in Triton's interpreter). Every launch goes through ``kernels.launch.run_on_device``.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import triton
import triton.language as tl

from reattn.kernels.launch import interpreting, run_on_device

LOG2E = 1.4426950408889634


@triton.jit
def _rows(X, z, h, stride_z, stride_h, stride_row, offs_rows, rows_ok, offs_d, d_ok):
    """The [rows, BLOCK_D] tile of (batch z, head h) of a [B, H, N, D] tensor with unit stride on D; 0 outside."""
    return tl.load(X + z * stride_z + h * stride_h + offs_rows[:, None] * stride_row + offs_d[None, :],
                   mask=rows_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _fa_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                   stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                   stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om,
                   H, N_Q, N_K, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """O[z, h, m-block] and LSE (base 2) for one query block of one (batch, head); unit stride on D."""
    start_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < D
    q = _rows(Q, z, h, stride_qz, stride_qh, stride_qm, offs_m, m_ok, offs_d, d_ok)
    k_base = K + z * stride_kz + h * stride_kh
    v_base = V + z * stride_vz + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N_K, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < N_K
        k = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(LSE + zh * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    tl.store(O + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _fa_bwd_preprocess(O, DO, DELTA, stride_oz, stride_oh, stride_om, stride_dz, stride_dh, stride_dm,
                       H, N_Q, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Delta = rowsum(O * dO) per query row (FlashAttention-2's shortcut for rowsum(P * dP))."""
    start_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask,
                other=0.0).to(ACC)
    do = tl.load(DO + z * stride_dz + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=mask,
                 other=0.0).to(ACC)
    tl.store(DELTA + zh * N_Q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N_Q)


@triton.jit
def _fa_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
                        stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                        stride_vz, stride_vh, stride_vn, stride_dz, stride_dh, stride_dm,
                        H, N_Q, N_K, D,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dK, dV of one key block of one (batch, head), summed over every query block in registers."""
    start_n = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _rows(K, z, h, stride_kz, stride_kh, stride_kn, offs_n, n_ok, offs_d, d_ok)
    v = _rows(V, z, h, stride_vz, stride_vh, stride_vn, offs_n, n_ok, offs_d, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    q_base = Q + z * stride_qz + h * stride_qh
    do_base = DO + z * stride_dz + h * stride_dh
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < N_Q
        qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None],
                     other=0.0)
        lse = tl.load(LSE + zh * N_Q + offs_m, mask=m_ok, other=float("inf"))
        qkT = tl.dot(k, qT) * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        pT = tl.where(n_ok[:, None], pT, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                     other=0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        delta = tl.load(DELTA + zh * N_Q + offs_m, mask=m_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do)).to(ACC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    tl.store(DK + z * stride_kz + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + z * stride_vz + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _fa_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                      stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                      stride_vz, stride_vh, stride_vn, stride_dz, stride_dh, stride_dm,
                      H, N_Q, N_K, D,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """dQ of one query block of one (batch, head), summed over every key block in registers."""
    start_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = _rows(Q, z, h, stride_qz, stride_qh, stride_qm, offs_m, m_ok, offs_d, d_ok)
    do = _rows(DO, z, h, stride_dz, stride_dh, stride_dm, offs_m, m_ok, offs_d, d_ok)
    lse = tl.load(LSE + zh * N_Q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + zh * N_Q + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    k_base = K + z * stride_kz + h * stride_kh
    v_base = V + z * stride_vz + h * stride_vh
    for start_n in range(0, N_K, BLOCK_N):
        n = start_n + offs_n0
        n_ok = n < N_K
        kT = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vT = tl.load(v_base + n[None, :] * stride_vn + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, vT).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    tl.store(DQ + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---- launch configurations -------------------------------------------------------------------------------------
def forward_config(d: int, interpret: bool) -> Dict[str, int]:
    """Tiles of the forward: 128 x 64 with 8 warps (the Triton tutorial's Hopper/Ampere choice for D <= 64), 3
    pipeline stages (2 above D = 64: shared memory); the interpreter takes small tiles."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=8, num_stages=3 if block_d <= 64 else 2)


def backward_config(d: int, interpret: bool) -> Dict[str, Dict[str, int]]:
    """FlashAttention-2's backward tiles (the Triton tutorial's): dK/dV over 128 keys x 32 queries, dQ over 128
    queries x 32 keys. dK/dV with 8 warps: with 4 its two [128, D] fp32 accumulators and the K, V tiles need
    255 registers and spill at D = 64 (compiled for sm_90 by the static model: 104 B of spills, 8 warps: 172
    registers, none); dQ with 4 warps (178 registers, no spill)."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpret:
        small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
        return dict(dkdv=small, dq=small, pre=dict(BLOCK_M=16, BLOCK_D=block_d))
    stages = 3 if block_d <= 64 else 2
    return dict(dkdv=dict(BLOCK_M=32, BLOCK_N=128, BLOCK_D=block_d, num_warps=8, num_stages=stages),
                dq=dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=stages),
                pre=dict(BLOCK_M=128, BLOCK_D=block_d))


def _acc(q: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _acc_tl(q: torch.Tensor):
    return tl.float64 if q.dtype == torch.float64 else tl.float32


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(f"reference_fa: {name} must be [B, H, N, D] with unit stride on D, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"reference_fa: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(O [B, H, Nq, D], lse [B, H, Nq] in base 2, in the accumulation dtype: float32, float64 for float64)."""
    _check(q, k, v)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    cfg = forward_config(D, interpreting())
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=_acc(q))
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)
    run_on_device(_fa_fwd_kernel, grid, q.device, q, k, v, o, lse, scale * LOG2E,
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                  H, Nq, Nk, D, ACC=_acc_tl(q), **cfg)
    return o, lse


def backward(do: torch.Tensor, q, k, v, o, lse, scale: float):
    """(dq, dk, dv) of :func:`forward`."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    do = do.contiguous()
    cfg = backward_config(D, interpreting())
    delta = torch.empty_like(lse)
    pre = cfg["pre"]
    run_on_device(_fa_bwd_preprocess, (triton.cdiv(Nq, pre["BLOCK_M"]), B * H), q.device, o, do, delta,
                  o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, Nq, D,
                  ACC=_acc_tl(q), **pre)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    c = cfg["dkdv"]
    run_on_device(_fa_bwd_dkdv_kernel, (triton.cdiv(Nk, c["BLOCK_N"]), B * H), q.device, q, k, v, do, lse, delta,
                  dk, dv, scale * LOG2E, scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                  k.stride(2), v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                  H, Nq, Nk, D, ACC=_acc_tl(q), **c)
    c = cfg["dq"]
    run_on_device(_fa_bwd_dq_kernel, (triton.cdiv(Nq, c["BLOCK_M"]), B * H), q.device, q, k, v, do, lse, delta, dq,
                  scale * LOG2E, scale, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), H, Nq, Nk, D,
                  ACC=_acc_tl(q), **c)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = None) -> torch.Tensor:
    """softmax(scale q k^T) v (scale default D ** -0.5), differentiable; [B, H, N, D] with unit stride on D."""
    return _Attention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))


def call(B: int, H: int, N: int, D: int, cap: int, dtype=torch.bfloat16) -> Dict[str, List]:
    """{"fwd": launches, "bwd": launches} of one forward and backward at [B, H, N, D] for sm_<cap>, recorded
    on meta tensors (``kernels.capture``), with the torch operations between them (``eager_model.OpCounter``)."""
    from benchmarks.eager_model import OpCounter
    from benchmarks.triton_side import meta_inputs, _interleave
    from reattn.kernels.capture import capture_launches

    q, k, v = meta_inputs(B, H, N, D, dtype)
    scale = D ** -0.5
    steps = {}
    with capture_launches(cap) as launches, OpCounter() as counter:
        o, lse = forward(q, k, v, scale)
        steps["fwd"] = _interleave(launches, counter)
        backward(torch.empty_like(o), q, k, v, o, lse, scale)
        steps["bwd"] = _interleave(launches, counter)
    return steps
