"""Fused Re-attention backward in Triton: never writes a [B, H, Nq, Nk] tensor.

Given dO, with P, M, A recomputed tile by tile from the saved logsumexp (math note, Backward):

    dA_g = dO_g V_g^T,   dN = out_scale * dA,   dM = Norm-backward(dN)
    dP_h = sum_g W[g, h] dM_g,   D_h,i = sum_j P_h,ij dP_h,ij
    dS_h = P_h (dP_h - D_h),     dQ_h = scale dS_h K_h,   dK_h = scale dS_h^T Q_h
    dV_g = A_g^T dO_g,   dW[g, h] = sum dM_g P_h,   dc_g = sum dM_g
    LayerNorm: dgamma_g = sum dN_g xhat_g, dbeta_g = sum dN_g

One program = one batch element x BLOCK_M query rows x all heads (as the forward). Two sweeps
over the keys: the pre-pass accumulates D (FlashAttention's rowsum(dO * O) shortcut does not
hold once heads mix), the main pass produces every gradient. dQ is owned by the program and
stored once; dK, dV and the H x H / H reductions are summed over query blocks with atomic adds
into float32 (float64 for float64 inputs) buffers.

Scope today: norm "none" (and eval BatchNorm, folded by the caller) and "layer"; no mask, no
dropout, no training BatchNorm. Nothing here imports ``reattn``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import _mm
from .forward import NORM_LAYER, NORM_NONE
from .launch import ForwardConfig, backward_config, interpreting

_NORMS = {"none": NORM_NONE, "layer": NORM_LAYER}


@triton.jit
def _mix_norm_tile(q, kt, w, c, nw, nb, lse, n3_ok, h_ok3, H, scale, eps,
                   HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                   HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
                   HAS_NORM_BIAS: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Recompute P, the normalized map N (before out_scale) and LayerNorm's xhat and 1/std."""
    s = _mm(q, kt, tl.zeros([HP, BLOCK_M, BLOCK_N], CDT), DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    p = tl.where(n3_ok & h_ok3, tl.exp(s * scale - lse[:, :, None]), 0.0)
    mix = _mm(w, tl.reshape(p, (HP, BLOCK_M * BLOCK_N)), tl.zeros([HP, BLOCK_M * BLOCK_N], CDT),
              DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    mix = tl.reshape(mix, (HP, BLOCK_M, BLOCK_N))
    if HAS_MIX_BIAS:
        mix = mix + c[:, None, None]
    if NORM == 1:
        mean = tl.sum(mix, axis=0) / H
        xc = tl.where(h_ok3, mix - mean[None, :, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / H + eps)
        xhat = xc * rstd[None, :, :]
        normed = xhat
        if HAS_NORM_WEIGHT:
            normed = normed * nw[:, None, None]
        if HAS_NORM_BIAS:
            normed = normed + nb[:, None, None]
    else:
        xhat = mix
        rstd = tl.zeros([BLOCK_M, BLOCK_N], CDT)
        normed = mix
    return p, normed, xhat, rstd


@triton.jit
def _norm_backward_tile(dn, xhat, rstd, nw, h_ok3, n3_ok, H,
                        NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr):
    """dM from dN (gradient w.r.t. the normalized map); zero on padded heads and keys."""
    if NORM == 1:
        dxhat = dn
        if HAS_NORM_WEIGHT:
            dxhat = dxhat * nw[:, None, None]
        mean_dx = tl.sum(dxhat, axis=0) / H
        mean_dx_xhat = tl.sum(dxhat * xhat, axis=0) / H
        dm = rstd[None, :, :] * (dxhat - mean_dx[None, :, :] - xhat * mean_dx_xhat[None, :, :])
    else:
        dm = dn
    return tl.where(h_ok3 & n3_ok, dm, 0.0)


@triton.jit
def _recompute_gradient_tile(q, do, w, w_t, c, nw, nb, lse, kt, vt, n3_ok, h_ok3, H, scale, out_scale, eps,
                             HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                             HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
                             HAS_NORM_BIAS: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    """One key block of both backward sweeps: P, N, xhat, dN, dM and dP = W^T dM."""
    p, normed, xhat, rstd = _mix_norm_tile(q, kt, w, c, nw, nb, lse, n3_ok, h_ok3, H, scale, eps, HP, BLOCK_M,
                                           BLOCK_N, CDT, HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS,
                                           DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    dn = _mm(do, vt, tl.zeros([HP, BLOCK_M, BLOCK_N], CDT), DOT_LOWP, LOWP_DTYPE, DOT_PRECISION) * out_scale
    dm = _norm_backward_tile(dn, xhat, rstd, nw, h_ok3, n3_ok, H, NORM, HAS_NORM_WEIGHT)
    dp = tl.reshape(_mm(w_t, tl.reshape(dm, (HP, BLOCK_M * BLOCK_N)), tl.zeros([HP, BLOCK_M * BLOCK_N], CDT),
                        DOT_LOWP, LOWP_DTYPE, DOT_PRECISION), (HP, BLOCK_M, BLOCK_N))
    return p, normed, xhat, dn, dm, dp


@triton.jit
def _re_attention_bwd_kernel(
    Q, K, V, W, C, NW, NB, LSE, DO, DQ, DK, DV, DW, DC, DNW, DNB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    stride_wg, stride_wh, stride_c, stride_nw, stride_nb,
    H, N_Q, N_K, D, NUM_M_BLOCKS,
    scale, out_scale, eps,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_M_BLOCKS).to(tl.int64)
    pid_m = pid % NUM_M_BLOCKS
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty

    offs_h = tl.arange(0, HP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    m_ok = offs_m < N_Q
    d_ok = offs_d < D
    h3 = offs_h.to(tl.int64)[:, None, None]
    h_ok3 = h_ok[:, None, None]
    m3 = offs_m.to(tl.int64)[None, :, None]
    row_mask = h_ok3 & m_ok[None, :, None] & d_ok[None, None, :]

    q = tl.load(Q + b * stride_qb + h3 * stride_qh + m3 * stride_qm + offs_d[None, None, :] * stride_qd,
                mask=row_mask, other=0.0).to(CDT)
    do = tl.load(DO + b * stride_dob + h3 * stride_doh + m3 * stride_dom + offs_d[None, None, :] * stride_dod,
                 mask=row_mask, other=0.0).to(CDT)
    lse = tl.load(LSE + b * stride_lb + offs_h[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                  mask=h_ok[:, None] & m_ok[None, :], other=0.0).to(CDT)
    # Rows past Nq must not produce probabilities (their q reads as 0, so exp(0 - 0) = 1).
    lse = tl.where(m_ok[None, :], lse, float("inf"))

    w = tl.load(W + offs_h[:, None] * stride_wg + offs_h[None, :] * stride_wh,
                mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(CDT)
    w_t = tl.load(W + offs_h[:, None] * stride_wh + offs_h[None, :] * stride_wg,
                  mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(CDT)
    c = tl.zeros([HP], CDT)
    nw = tl.zeros([HP], CDT)
    nb = tl.zeros([HP], CDT)
    if HAS_MIX_BIAS:
        c = tl.load(C + offs_h * stride_c, mask=h_ok, other=0.0).to(CDT)
    if HAS_NORM_WEIGHT:
        nw = tl.load(NW + offs_h * stride_nw, mask=h_ok, other=0.0).to(CDT)
    if HAS_NORM_BIAS:
        nb = tl.load(NB + offs_h * stride_nb, mask=h_ok, other=0.0).to(CDT)

    k_base = K + b * stride_kb + h3 * stride_kh + offs_d[None, :, None] * stride_kd        # K^T tiles
    k_rows = K + b * stride_kb + h3 * stride_kh + offs_d[None, None, :] * stride_kd        # K tiles
    vt_base = V + b * stride_vb + h3 * stride_vh + offs_d[None, :, None] * stride_vd       # V^T tiles
    kd_mask = h_ok3 & d_ok[None, :, None]
    rows_d_mask = h_ok3 & d_ok[None, None, :]

    # ---- pre-pass: D_h,i = sum_j P_h,ij dP_h,ij ----
    delta = tl.zeros([HP, BLOCK_M], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        n3_ok = n_ok[None, None, :]
        kt = tl.load(k_base + offs_n.to(tl.int64)[None, None, :] * stride_kn, mask=kd_mask & n3_ok,
                     other=0.0).to(CDT)
        vt = tl.load(vt_base + offs_n.to(tl.int64)[None, None, :] * stride_vn, mask=kd_mask & n3_ok,
                     other=0.0).to(CDT)
        p, normed, xhat, dn, dm, dp = _recompute_gradient_tile(
            q, do, w, w_t, c, nw, nb, lse, kt, vt, n3_ok, h_ok3, H, scale, out_scale, eps, HP, BLOCK_M, BLOCK_N, CDT,
            HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        delta += tl.sum(p * dp, axis=2)

    # ---- main pass ----
    dq = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
    dw = tl.zeros([HP, HP], CDT)
    dc = tl.zeros([HP], CDT)
    dnw = tl.zeros([HP], CDT)
    dnb = tl.zeros([HP], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        n3_ok = n_ok[None, None, :]
        n64 = offs_n.to(tl.int64)
        kt = tl.load(k_base + n64[None, None, :] * stride_kn, mask=kd_mask & n3_ok, other=0.0).to(CDT)
        vt = tl.load(vt_base + n64[None, None, :] * stride_vn, mask=kd_mask & n3_ok, other=0.0).to(CDT)
        k_tile = tl.load(k_rows + n64[None, :, None] * stride_kn, mask=rows_d_mask & n_ok[None, :, None],
                         other=0.0).to(CDT)
        p, normed, xhat, dn, dm, dp = _recompute_gradient_tile(
            q, do, w, w_t, c, nw, nb, lse, kt, vt, n3_ok, h_ok3, H, scale, out_scale, eps, HP, BLOCK_M, BLOCK_N, CDT,
            HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        dm2 = tl.reshape(dm, (HP, BLOCK_M * BLOCK_N))
        ds = p * (dp - delta[:, :, None]) * scale
        dq = _mm(ds, k_tile, dq, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        # dK tile [HP, BLOCK_N, BLOCK_D] = dS^T Q ; dV tile = A^T dO with A = out_scale * N.
        dk_tile = _mm(tl.permute(ds, (0, 2, 1)), q, tl.zeros([HP, BLOCK_N, BLOCK_D], CDT), DOT_LOWP, LOWP_DTYPE,
                      DOT_PRECISION)
        a = tl.where(h_ok3 & n3_ok & m_ok[None, :, None], normed * out_scale, 0.0)
        dv_tile = _mm(tl.permute(a, (0, 2, 1)), do, tl.zeros([HP, BLOCK_N, BLOCK_D], CDT), DOT_LOWP, LOWP_DTYPE,
                      DOT_PRECISION)
        kv_mask = rows_d_mask & n_ok[None, :, None]
        tl.atomic_add(DK + b * stride_dkb + h3 * stride_dkh + n64[None, :, None] * stride_dkn
                      + offs_d[None, None, :] * stride_dkd, dk_tile, mask=kv_mask)
        tl.atomic_add(DV + b * stride_dvb + h3 * stride_dvh + n64[None, :, None] * stride_dvn
                      + offs_d[None, None, :] * stride_dvd, dv_tile, mask=kv_mask)
        dw = _mm(dm2, tl.trans(tl.reshape(p, (HP, BLOCK_M * BLOCK_N))), dw, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        dc += tl.sum(tl.sum(dm, axis=2), axis=1)
        if NORM == 1:
            dn_valid = tl.where(h_ok3 & n3_ok, dn, 0.0)
            dnw += tl.sum(tl.sum(dn_valid * xhat, axis=2), axis=1)
            dnb += tl.sum(tl.sum(dn_valid, axis=2), axis=1)

    tl.store(DQ + b * stride_dqb + h3 * stride_dqh + m3 * stride_dqm + offs_d[None, None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_mask)
    hh_mask = h_ok[:, None] & h_ok[None, :]
    tl.atomic_add(DW + offs_h[:, None] * H + offs_h[None, :], dw, mask=hh_mask)
    tl.atomic_add(DC + offs_h, dc, mask=h_ok)
    if NORM == 1:
        tl.atomic_add(DNW + offs_h, dnw, mask=h_ok)
        tl.atomic_add(DNB + offs_h, dnb, mask=h_ok)


def re_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix_weight: torch.Tensor,
    mix_bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    *,
    scale: float,
    out_scale: float = 1.0,
    norm: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    config: Optional[ForwardConfig] = None,
    lowp_dot: Optional[bool] = None,
):
    """Gradients of the fused forward (same arguments, plus ``grad_out`` [B, H, Nq, D] and its ``lse``).

    Returns ``(dq, dk, dv [like q/k/v], d_mix_weight [H, H], d_mix_bias [H], d_norm_weight [H] or None,
    d_norm_bias [H] or None)``; the parameter gradients are float32 (float64 for float64 inputs).
    Arguments are assumed validated by the forward's caller.
    """
    if norm not in _NORMS:
        raise ValueError(f"re_attention_backward: norm must be one of {sorted(_NORMS)}, got {norm!r}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    device = q.device
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty_like(q)
    dk = torch.zeros((B, H, Nk, D), dtype=acc_dtype, device=device)
    dv = torch.zeros((B, H, Nk, D), dtype=acc_dtype, device=device)
    dw = torch.zeros((H, H), dtype=acc_dtype, device=device)
    dc = torch.zeros((H,), dtype=acc_dtype, device=device)
    dnw = torch.zeros((H,), dtype=acc_dtype, device=device)
    dnb = torch.zeros((H,), dtype=acc_dtype, device=device)
    use_layer = norm == "layer"
    if B == 0 or Nq == 0:
        dq.zero_()
    else:
        interpret = interpreting()
        if config is None:
            config = backward_config(Nq, Nk, D, H, interpret=interpret)
        low = q.dtype in (torch.float16, torch.bfloat16)
        if lowp_dot is None:
            lowp_dot = low and not interpret
        lowp_dot = bool(lowp_dot and low)
        cdt = tl.float64 if q.dtype == torch.float64 else tl.float32
        dummy = mix_weight
        c = mix_bias if mix_bias is not None else dummy
        nw = norm_weight if norm_weight is not None else dummy
        nb = norm_bias if norm_bias is not None else dummy
        num_m = triton.cdiv(Nq, config.BLOCK_M)
        launch = _re_attention_bwd_kernel[(num_m * B,)]
        args = (
            q, k, v, mix_weight, c, nw, nb, lse, grad_out, dq, dk, dv, dw, dc, dnw, dnb,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            *lse.stride(), mix_weight.stride(0), mix_weight.stride(1), c.stride(0), nw.stride(0), nb.stride(0),
            H, Nq, Nk, D, num_m, float(scale), float(out_scale), float(eps),
        )
        kwargs = dict(HAS_MIX_BIAS=mix_bias is not None, NORM=_NORMS[norm],
                      HAS_NORM_WEIGHT=use_layer and norm_weight is not None,
                      HAS_NORM_BIAS=use_layer and norm_bias is not None,
                      CDT=cdt, DOT_LOWP=lowp_dot, DOT_PRECISION="ieee", **config.meta())
        if device.type == "cuda":
            with torch.cuda.device(device):
                launch(*args, **kwargs)
        else:
            launch(*args, **kwargs)
    return (dq, dk.to(k.dtype), dv.to(v.dtype), dw, dc if mix_bias is not None else None,
            dnw if use_layer and norm_weight is not None else None,
            dnb if use_layer and norm_bias is not None else None)
