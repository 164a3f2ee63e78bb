"""Fused Re-attention backward in Triton: never writes a [B, H, Nq, Nk] tensor.

Given dO, with P, P~, M, A recomputed tile by tile from the saved logsumexp (and the dropout
pattern regenerated from the seed; math note, Backward):

    dN = out_scale * dO_g V_g^T (0 where masked),   dM = Norm-backward(dN)
    dP~_h = sum_g W[g, h] dM_g,   dP_h = dP~_h * Z_h / (1 - p),   D_h,i = sum_j P_h,ij dP_h,ij
    dS_h = P_h (dP_h - D_h),      dQ_h = scale dS_h K_h,   dK_h = scale dS_h^T Q_h
    dV_g = A_g^T dO_g,   dW[g, h] = sum dM_g P~_h,   dc_g = sum dM_g
    LayerNorm / BatchNorm: dgamma_g = sum dN_g xhat_g, dbeta_g = sum dN_g

Norm-backward: LayerNorm across heads is local to an entry. Training-mode BatchNorm couples all
entries of a head through its batch statistics, dM_g = a_g dN_g + e_g xhat_g + f_g with
a = gamma / std, e = -a mean(dN xhat), f = -a mean(dN) (means over the unmasked entries; dM = 0
at masked ones, which are outside the statistics). Those two means need a sweep of their own
before the others: ``STATS_ONLY`` runs it (:func:`re_attention_backward_bn_sums`) and writes
sum(dN xhat) and sum(dN), which are also dgamma and dbeta. They add up over processes: BatchNorm
synchronized across processes sums them over the group before the main sweeps
(:func:`re_attention_backward` takes e and f, not the sums, so it serves both cases).

One program = one batch element x BLOCK_M query rows x all heads (as the forward). Two sweeps
over the keys: the pre-pass accumulates D (FlashAttention's rowsum(dO * O) shortcut does not
hold once heads mix), the main pass produces every gradient. dQ is owned by the program and
stored once; dK, dV and the H x H / H reductions are summed over query blocks with atomic adds
into float32 (float64 for float64 inputs) buffers. Nothing here imports ``reattn``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import _chunked_product, _load_head_vectors, _mix_norm_tile, _mm, _probs_tile, _query_block
from .forward import (_NORMS, accumulator_dtype, dropout_arguments, launch_options, mask_arguments,
                      run_on_device)
from .launch import ForwardConfig, backward_config, device_shared_limit, interpreting


@triton.jit
def _norm_backward_tile(dn, xhat, rstd, nw, bn_a, bn_e, bn_f, h_ok3, valid, kept, H,
                        NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr):
    """dM from dN (the gradient w.r.t. the normalized map); zero on padded heads, rows and keys."""
    if NORM == 1:
        dxhat = dn
        if HAS_NORM_WEIGHT:
            dxhat = dxhat * nw[:, None, None]
        mean_dx = tl.sum(dxhat, axis=0) / H
        mean_dx_xhat = tl.sum(dxhat * xhat, axis=0) / H
        dm = rstd[None, :, :] * (dxhat - mean_dx[None, :, :] - xhat * mean_dx_xhat[None, :, :])
        # A masked head's M still enters the LayerNorm of the other heads: keep its gradient.
        dm = tl.where(h_ok3 & valid, dm, 0.0)
    elif NORM == 2:
        dm = tl.where(kept, bn_a[:, None, None] * dn + bn_e[:, None, None] * xhat + bn_f[:, None, None], 0.0)
    else:
        dm = dn
    return dm


@triton.jit
def _tile_products(q_own, do_own, Q, K, V, DO, h3, m3, h_ok3, row_ok3, n64, n_ok, D,
                   stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd,
                   stride_vh, stride_vn, stride_vd, stride_doh, stride_dom, stride_dod,
                   HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D_CHUNKS: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """(q k^T, dO v^T), [HP, BLOCK_M, BLOCK_N] each, for one key block, summed over the whole head dim.

    With one head-dim chunk the program's own q and dO tiles are the whole rows; with several,
    every chunk is re-read for every key block (``_chunked_product``). Q, K, V, DO point at batch b.
    """
    qk = _chunked_product(q_own, Q, K, h3, m3, row_ok3, h_ok3, n64, n_ok, D, stride_qh, stride_qm, stride_qd,
                          stride_kh, stride_kd, stride_kn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                          LOWP_DTYPE, DOT_PRECISION)
    dov = _chunked_product(do_own, DO, V, h3, m3, row_ok3, h_ok3, n64, n_ok, D, stride_doh, stride_dom, stride_dod,
                           stride_vh, stride_vd, stride_vn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                           LOWP_DTYPE, DOT_PRECISION)
    return qk, dov


@triton.jit
def _recompute_gradient_tile(qk, dov, lse, w, w_t, c, nw, nb, bn_mean, bn_rstd, bn_a, bn_e, bn_f,
                             b, H, offs_h, offs_m, offs_n, valid, scale, out_scale, eps, seed, dropout_p,
                             MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                             HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                             HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
                             HAS_NORM_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                             DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the backward sweeps: P, P~, N, xhat, dN, dM, dP and the unmasked entries."""
    p, p_tilde, drop_scale, masked = _probs_tile(
        qk, lse, b, H, offs_h, offs_m, offs_n, valid, scale, seed, dropout_p, MASK, stride_mb, stride_mh,
        stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT, MASK_KIND, HAS_DROPOUT)
    h_ok3 = (offs_h < H)[:, None, None]
    normed, xhat, rstd = _mix_norm_tile(p_tilde, w, c, nw, nb, bn_mean, bn_rstd, h_ok3, H, eps, HP, BLOCK_M, BLOCK_N,
                                        CDT, HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS, DOT_LOWP, LOWP_DTYPE,
                                        DOT_PRECISION)
    kept = valid & (masked == 0)
    dn = tl.where(kept, dov * out_scale, 0.0)
    dm = _norm_backward_tile(dn, xhat, rstd, nw, bn_a, bn_e, bn_f, h_ok3, valid, kept, H, NORM, HAS_NORM_WEIGHT)
    dp = tl.reshape(_mm(w_t, tl.reshape(dm, (HP, BLOCK_M * BLOCK_N)), tl.zeros([HP, BLOCK_M * BLOCK_N], CDT),
                        DOT_LOWP, LOWP_DTYPE, DOT_PRECISION), (HP, BLOCK_M, BLOCK_N)) * drop_scale
    return p, p_tilde, normed, xhat, dn, dm, dp, kept


@triton.jit
def _re_attention_bwd_kernel(
    Q, K, V, W, C, NW, NB, BN, MASK, SEED, LSE, DO, DQ, DK, DV, DW, DC, DNW, DNB,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_wg, stride_wh, stride_c, stride_nw, stride_nb,
    H, N_Q, N_K, D, NUM_M_BLOCKS,
    scale, out_scale, eps, dropout_p,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, STATS_ONLY: tl.constexpr,
    CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, offs_h, offs_m, h_ok, m_ok, h3, m3, h_ok3, valid_hm = _query_block(NUM_M_BLOCKS, H, N_Q, HP, BLOCK_M)
    # Head-dim chunk whose dQ, dK, dV columns this program owns (D_CHUNKS > 1 for head dims > BLOCK_D).
    pid_d = tl.program_id(1)
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok3 = h_ok3 & m_ok[None, :, None]
    row_mask = row_ok3 & d_ok[None, None, :]
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    DOb = DO + b * stride_dob

    q = tl.load(Qb + h3 * stride_qh + m3 * stride_qm + offs_d[None, None, :] * stride_qd,
                mask=row_mask, other=0.0).to(CDT)
    do = tl.load(DOb + h3 * stride_doh + m3 * stride_dom + offs_d[None, None, :] * stride_dod,
                 mask=row_mask, other=0.0).to(CDT)
    # +inf for padded heads and rows past Nq: their P is exp(S - inf) = 0.
    lse = tl.load(LSE + b * stride_lb + offs_h[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                  mask=valid_hm, other=float("inf")).to(CDT)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    w = tl.load(W + offs_h[:, None] * stride_wg + offs_h[None, :] * stride_wh,
                mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(CDT)
    w_t = tl.load(W + offs_h[:, None] * stride_wh + offs_h[None, :] * stride_wg,
                  mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(CDT)
    c, nw, nb, bn_mean, bn_rstd = _load_head_vectors(C, NW, NB, BN, offs_h, h_ok, H, stride_c, stride_nw, stride_nb,
                                                     HP, CDT, HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS)
    # Training BatchNorm: dM = a dN + e xhat + f with a = gamma / std; BN rows 2, 3 hold e and f.
    bn_a = bn_rstd
    if HAS_NORM_WEIGHT:
        bn_a = bn_a * nw
    bn_e = tl.zeros([HP], CDT)
    bn_f = tl.zeros([HP], CDT)
    if NORM == 2:
        if not STATS_ONLY:
            bn_e = tl.load(BN + 2 * H + offs_h, mask=h_ok, other=0.0).to(CDT)
            bn_f = tl.load(BN + 3 * H + offs_h, mask=h_ok, other=0.0).to(CDT)

    # ---- first sweep: the BatchNorm sums (STATS_ONLY launch) or the pre-pass D_h,i = sum_j P dP ----
    sum_dn_xhat = tl.zeros([HP], CDT)
    sum_dn = tl.zeros([HP], CDT)
    delta = tl.zeros([HP, BLOCK_M], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        qk, dov = _tile_products(q, do, Qb, Kb, Vb, DOb, h3, m3, h_ok3, row_ok3, offs_n.to(tl.int64), n_ok, D,
                                 stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh,
                                 stride_vn, stride_vd, stride_doh, stride_dom, stride_dod, HP, BLOCK_M, BLOCK_N,
                                 BLOCK_D, D_CHUNKS, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        p, p_tilde, normed, xhat, dn, dm, dp, kept = _recompute_gradient_tile(
            qk, dov, lse, w, w_t, c, nw, nb, bn_mean, bn_rstd, bn_a, bn_e, bn_f, b, H, offs_h, offs_m,
            offs_n, valid_hm[:, :, None] & n_ok[None, None, :], scale, out_scale, eps, seed, dropout_p, MASK,
            stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT, HAS_MIX_BIAS, NORM,
            HAS_NORM_WEIGHT, HAS_NORM_BIAS, MASK_KIND, HAS_DROPOUT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        if STATS_ONLY:
            sum_dn_xhat += tl.sum(tl.sum(tl.where(kept, dn * xhat, 0.0), axis=2), axis=1)
            sum_dn += tl.sum(tl.sum(dn, axis=2), axis=1)
        else:
            delta += tl.sum(p * dp, axis=2)

    if STATS_ONLY:
        tl.atomic_add(DNW + offs_h, sum_dn_xhat, mask=h_ok)
        tl.atomic_add(DNB + offs_h, sum_dn, mask=h_ok)
    else:
        # ---- main pass ----
        dq = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
        dw = tl.zeros([HP, HP], CDT)
        dc = tl.zeros([HP], CDT)
        dnw = tl.zeros([HP], CDT)
        dnb = tl.zeros([HP], CDT)
        rows_d_mask = h_ok3 & d_ok[None, None, :]
        for start_n in range(0, N_K, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < N_K
            n64 = offs_n.to(tl.int64)
            qk, dov = _tile_products(q, do, Qb, Kb, Vb, DOb, h3, m3, h_ok3, row_ok3, n64, n_ok, D,
                                     stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh,
                                     stride_vn, stride_vd, stride_doh, stride_dom, stride_dod, HP, BLOCK_M, BLOCK_N,
                                     BLOCK_D, D_CHUNKS, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
            p, p_tilde, normed, xhat, dn, dm, dp, kept = _recompute_gradient_tile(
                qk, dov, lse, w, w_t, c, nw, nb, bn_mean, bn_rstd, bn_a, bn_e, bn_f, b, H, offs_h, offs_m,
                offs_n, valid_hm[:, :, None] & n_ok[None, None, :], scale, out_scale, eps, seed, dropout_p, MASK,
                stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT, HAS_MIX_BIAS, NORM,
                HAS_NORM_WEIGHT, HAS_NORM_BIAS, MASK_KIND, HAS_DROPOUT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
            kv_mask = rows_d_mask & n_ok[None, :, None]
            k_tile = tl.load(Kb + h3 * stride_kh + n64[None, :, None] * stride_kn + offs_d[None, None, :] * stride_kd,
                             mask=kv_mask, other=0.0).to(CDT)
            ds = p * (dp - delta[:, :, None]) * scale
            dq = _mm(ds, k_tile, dq, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
            # dK tile [HP, BLOCK_N, BLOCK_D] = dS^T Q ; dV tile = A^T dO with A = out_scale * N (0 where masked).
            dk_tile = _mm(tl.permute(ds, (0, 2, 1)), q, tl.zeros([HP, BLOCK_N, BLOCK_D], CDT), DOT_LOWP, LOWP_DTYPE,
                          DOT_PRECISION)
            a = tl.where(kept, normed * out_scale, 0.0)
            dv_tile = _mm(tl.permute(a, (0, 2, 1)), do, tl.zeros([HP, BLOCK_N, BLOCK_D], CDT), DOT_LOWP, LOWP_DTYPE,
                          DOT_PRECISION)
            tl.atomic_add(DK + b * stride_dkb + h3 * stride_dkh + n64[None, :, None] * stride_dkn
                          + offs_d[None, None, :] * stride_dkd, dk_tile, mask=kv_mask)
            tl.atomic_add(DV + b * stride_dvb + h3 * stride_dvh + n64[None, :, None] * stride_dvn
                          + offs_d[None, None, :] * stride_dvd, dv_tile, mask=kv_mask)
            dw = _mm(tl.reshape(dm, (HP, BLOCK_M * BLOCK_N)), tl.trans(tl.reshape(p_tilde, (HP, BLOCK_M * BLOCK_N))),
                     dw, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
            dc += tl.sum(tl.sum(dm, axis=2), axis=1)
            if NORM == 1:
                dnw += tl.sum(tl.sum(dn * xhat, axis=2), axis=1)
                dnb += tl.sum(tl.sum(dn, axis=2), axis=1)

        tl.store(DQ + b * stride_dqb + h3 * stride_dqh + m3 * stride_dqm + offs_d[None, None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=row_mask)
        # Every head-dim chunk computed the same parameter gradients: the first one adds them.
        h_first = h_ok & (offs_h * 0 + pid_d == 0)
        tl.atomic_add(DW + offs_h[:, None] * H + offs_h[None, :], dw, mask=h_first[:, None] & h_ok[None, :])
        tl.atomic_add(DC + offs_h, dc, mask=h_first)
        if NORM == 1:
            tl.atomic_add(DNW + offs_h, dnw, mask=h_first)
            tl.atomic_add(DNB + offs_h, dnb, mask=h_first)


def _launch_backward(grad_out, q, k, v, mix_weight, mix_bias, lse, bn, outputs, *, scale, out_scale, norm,
                     norm_weight, norm_bias, eps, attn_mask, dropout_p, seed, config, lowp_dot, stats_only):
    """One launch of ``_re_attention_bwd_kernel`` into ``outputs`` (dq, dk, dv, dw, dc, dnw, dnb).

    stats_only: the BatchNorm sums sweep (atomically added into dnw, dnb), one program per query block.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    device = q.device
    dq, dk, dv, dw, dc, dnw, dnb = outputs
    interpret = interpreting()
    if config is None:
        config = backward_config(Nq, Nk, D, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                 element_size=q.element_size())
    cdt, lowp_dot, precision = launch_options(q, lowp_dot, False, interpret)
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, q, Nk)
    seed, has_dropout = dropout_arguments(dropout_p, seed, device)
    dummy = mix_weight
    c = mix_bias if mix_bias is not None else dummy
    nw = norm_weight if norm_weight is not None else dummy
    nb = norm_bias if norm_bias is not None else dummy
    affine_norm = norm != "none"
    num_m = triton.cdiv(Nq, config.BLOCK_M)
    d_chunks = triton.cdiv(D, config.BLOCK_D)
    args = (
        q, k, v, mix_weight, c, nw, nb, bn, mask, seed if has_dropout else dummy, lse, grad_out,
        dq, dk, dv, dw, dc, dnw, dnb,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        *lse.stride(), *mask_strides,
        mix_weight.stride(0), mix_weight.stride(1), c.stride(0), nw.stride(0), nb.stride(0),
        H, Nq, Nk, D, num_m, float(scale), float(out_scale), float(eps), float(dropout_p),
    )
    meta = dict(HAS_MIX_BIAS=mix_bias is not None, NORM=_NORMS[norm],
                HAS_NORM_WEIGHT=affine_norm and norm_weight is not None,
                HAS_NORM_BIAS=affine_norm and norm_bias is not None, MASK_KIND=mask_kind,
                HAS_DROPOUT=has_dropout, CDT=cdt, DOT_LOWP=lowp_dot, DOT_PRECISION=precision, D_CHUNKS=d_chunks,
                **config.meta())
    # The sums sweep writes no dQ/dK/dV columns: one program per query block is enough.
    grid = (num_m * B, 1 if stats_only else d_chunks)
    run_on_device(_re_attention_bwd_kernel, grid, device, *args, STATS_ONLY=stats_only, **meta)


def _backward_outputs(q, k):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    acc_dtype = accumulator_dtype(q)
    acc = dict(dtype=acc_dtype, device=q.device)
    return (torch.empty_like(q), torch.zeros((B, H, Nk, D), **acc), torch.zeros((B, H, Nk, D), **acc),
            torch.zeros((H, H), **acc), torch.zeros((H,), **acc), torch.zeros((H,), **acc), torch.zeros((H,), **acc))


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
    batch_stats: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    config: Optional[ForwardConfig] = None,
    lowp_dot: Optional[bool] = None,
):
    """Gradients of the fused forward (same arguments, plus ``grad_out`` [B, H, Nq, D] and its ``lse``).

    norm="batch" (training BatchNorm) also needs ``batch_stats`` [4, H]: the forward's mean and
    1/sqrt(var + eps), then e and f of dM = a dN + e xhat + f (a = gamma / std, e = -a mean(dN xhat),
    f = -a mean(dN), means over the entries the statistics ran over). Those two means come from
    :func:`re_attention_backward_bn_sums`, run first, and summed over every process when the batch
    is spread across processes: the caller (``reattn.backends._fused``) divides them by the count.
    The norm's own gradients are those sums, so d_norm_weight, d_norm_bias come back as zeros then.
    Returns ``(dq, dk, dv [like q/k/v], d_mix_weight [H, H], d_mix_bias [H] or None, d_norm_weight [H]
    or None, d_norm_bias [H] or None)``; the parameter gradients are float32 (float64 for float64
    inputs). Arguments are assumed validated by the forward's caller.
    """
    if norm not in _NORMS:
        raise ValueError(f"re_attention_backward: norm must be one of {sorted(_NORMS)}, got {norm!r}")
    B, H, Nq, D = q.shape
    outputs = _backward_outputs(q, k)
    dq, dk, dv, dw, dc, dnw, dnb = outputs
    affine_norm = norm != "none"
    if norm == "batch":
        if batch_stats is None or batch_stats.shape != (4, H):
            raise ValueError("re_attention_backward: norm='batch' needs batch_stats [4, H] (mean, 1/std, e, f), got "
                             f"{None if batch_stats is None else tuple(batch_stats.shape)}")
        bn = batch_stats.to(accumulator_dtype(q)).contiguous()
    else:
        bn = dw  # unread placeholder
    if B == 0 or Nq == 0:
        dq.zero_()
    else:
        _launch_backward(grad_out, q, k, v, mix_weight, mix_bias, lse, bn, outputs, scale=scale, out_scale=out_scale,
                         norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, attn_mask=attn_mask,
                         dropout_p=dropout_p, seed=seed, config=config, lowp_dot=lowp_dot, stats_only=False)
    return (dq, dk.to(k.dtype), dv.to(v.dtype), dw, dc if mix_bias is not None else None,
            dnw if affine_norm and norm_weight is not None else None,
            dnb if affine_norm and norm_bias is not None else None)


def re_attention_backward_bn_sums(
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
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    batch_stats: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    config: Optional[ForwardConfig] = None,
    lowp_dot: Optional[bool] = None,
) -> torch.Tensor:
    """Training BatchNorm's backward sums over this call's entries: [2, H] (sum dN xhat, sum dN).

    dN = out_scale * dO V^T on the unmasked entries, xhat the entries normalized with
    ``batch_stats`` [2, H] (mean, 1/std, the forward's). These are d_norm_weight and d_norm_bias
    of the call, and they add up over processes: summed over every process they give the e, f
    rows of :func:`re_attention_backward`'s batch_stats. float32 (float64 for float64 inputs).
    """
    B, H, Nq, _ = q.shape
    acc_dtype = accumulator_dtype(q)
    if batch_stats.shape != (2, H):
        raise ValueError("re_attention_backward_bn_sums: batch_stats must be [2, H] (mean, 1/std), got "
                         f"{tuple(batch_stats.shape)}")
    outputs = _backward_outputs(q, k)
    if B > 0 and Nq > 0:
        bn = torch.cat([batch_stats.to(acc_dtype), batch_stats.new_zeros((2, H), dtype=acc_dtype)]).contiguous()
        _launch_backward(grad_out, q, k, v, mix_weight, mix_bias, lse, bn, outputs, scale=scale, out_scale=out_scale,
                         norm="batch", norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, attn_mask=attn_mask,
                         dropout_p=dropout_p, seed=seed, config=config, lowp_dot=lowp_dot, stats_only=True)
    return torch.stack([outputs[5], outputs[6]])
