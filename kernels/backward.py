"""Fused Re-attention backward in Triton: never writes a [B, H, Nq, Nk] tensor.

Given dO, with P, P~, M and the normalized map recomputed tile by tile from the saved softmax
statistics (and the dropout pattern regenerated from the seed; docs/math.md, "Backward"):

    dN = out_scale * dO_g V_g^T (0 where masked),   dM = Norm-backward(dN)
    dP~_h = sum_g W[g, h] dM_g,   dP_h = dP~_h * Z_h / (1 - p),   delta_h,i = sum_j P_h,ij dP_h,ij
    dS_h = P_h (dP_h - delta_h),   dQ_h = scale dS_h K_h,   dK_h = scale dS_h^T Q_h
    dV_g = A_g^T dO_g,   dW[g, h] = sum dM_g P~_h,   dc_g = sum dM_g
    LayerNorm / BatchNorm: dgamma_g = sum dN_g xhat_g, dbeta_g = sum dN_g

Two kernels, as FlashAttention-2's backward, and no atomics:

* ``_re_attention_bwd_dq_kernel``: per (batch element, query rows), all heads as the forward's slots, one sweep
  over the keys. delta needs the whole row before dS exists, so dQ accumulates as X = sum_j (P dP)_ij K_j and
  Y = sum_j P_ij K_j, and dQ = scale (X - delta Y) at the end; delta is stored for the second kernel.
* ``_re_attention_bwd_dkdv_kernel``: per (batch element, key block), all heads, one sweep over the queries: dK,
  dV in registers; per program the [HP, HP] sums of dM P~^T (dW, dc) and LayerNorm's dbeta, added up in float64
  (its dgamma too with a mask or dropout; without them the dQ kernel's, per program: ``_sums_dgamma_in_dq``).
At 12 heads, no mask or dropout, D padded to 64 (``launch.splits_backward_heads``): heads 0-7 and 8-11 as two
products, one accumulator a group over the whole head dim, two sweeps each, dM joined (docs/math.md, "12 heads").

Training-mode BatchNorm couples every entry of a head through its batch statistics:
dM_g = a_g dN_g + e_g xhat_g + f_g with a = gamma / std, e = -a mean(dN xhat), f = -a mean(dN)
(means over the unmasked entries; dM = 0 at masked ones, which are outside the statistics). The
two means need every entry first: the dQ kernel with SUMS_ONLY (:func:`re_attention_bn_grad_sums`)
writes per program sum(dN xhat) and sum(dN), also dgamma and dbeta, which add up over processes
(synchronized BatchNorm sums them over the group); the local one-sweep path reads them off the
forward's R = xhat V instead (``kernels.affine.head_dot_sums``). :func:`re_attention_backward` takes e, f.

Nothing here imports ``reattn``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (_center_across_heads, _group_mean, _layer_norm, _live_zero, _load_keys, _load_row_stats,
                     _load_rows, _mix, _mm, _probs, _product_result, _scores, _scores_product, _slot_params,
                     _slot_rows)
from .forward import (_NORMS, _block_diag, _halves, _held_weights, _split_layer_norm, _split_probs, _split_queries,
                      _split_scores, _split_store, _split_tiles, _split_values, _split_vector, _split_weights, _stack,
                      _unstack, accumulator_dtype, aligned_operands, dropout_arguments, launch_options, mask_arguments,
                      slot_groups, slot_sums_to_heads)
from .launch import (TileConfig, backward_config, device_shared_limit, head_dim_tail, interpreting, padded_head_dim,
                     run_on_device, splits_backward_heads, variant_of)


# The backward's LayerNorm takes the centered weights up to 16 slots. At 32 (with a mask and dropout) ptxas
# then gave the dK/dV kernel 32 registers a thread and spilled 7,448 B, against 3,968 at 128 without it.
CENTERED_SLOTS = tl.constexpr(16)


@triton.jit
def _norm_backward(dn, mix, kept, group_mean, gamma, bn_mean, bn_rstd, bn_e, bn_f, eps, HP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr, NORM: tl.constexpr,
                   NORM_PRECISION: tl.constexpr, APPROX_RSQRT: tl.constexpr, DOT_LOWP: tl.constexpr,
                   LOWP_DTYPE: tl.constexpr):
    """(dM, xhat) from dN (gradient w.r.t. the normalized map, out_scale applied) and M (LayerNorm up to
    CENTERED_SLOTS slots: M - mean(M), mixed by the centered weights of ``common._center_across_heads``).

    NORM_NONE: dM = dN. NORM_LAYER: LayerNorm's backward across the heads of a row group (a
    masked head's M still enters the norm of the others: its gradient is kept); up to CENTERED_SLOTS
    slots without its term along the heads' mean (dM + r mean(dxhat): see below). NORM_BATCH:
    dM = a dN + e xhat + f per head, 0 where masked (outside the batch statistics).
    """
    xhat = mix
    if NORM == 1:
        CENTERED: tl.constexpr = HP <= CENTERED_SLOTS
        xhat, rstd = _layer_norm(mix, group_mean, eps, HP, BLOCK_M, BLOCK_N, CDT, NORM_PRECISION, APPROX_RSQRT,
                                 CENTERED)
        if CENTERED and DOT_LOWP:
            # dN laid out as the mixing's result, by an identity mixing (dN rounded to the gradients' operand
            # dtype, as eager's product dO V^T returns it): xhat has that layout, so the norm's steps at each
            # entry stay in it. dN as its own product left it (heads across warps) met xhat through [HP,
            # BLOCK_M, BLOCK_N] fp32 exchanges in shared memory (DeiT-S, predicted: dQ kernel 254.0 -> 189.4
            # us, dK/dV 412.2 -> 307.8).
            eye = (tl.arange(0, HP)[:, None] == tl.arange(0, HP)[None, :]).to(CDT)
            dn = _mix(eye, dn, HP, BLOCK_M, BLOCK_N, CDT, DOT_LOWP, LOWP_DTYPE, NORM_PRECISION)
        dxhat = dn * gamma[:, None, None]
        if CENTERED:
            # dM meets only W_c^T next (dP = W_c^T dM, W_c^T = W^T (I - J)), which maps every term constant over
            # a group's heads to 0: LayerNorm's - r mean(dxhat) is left out (one [HP, HP] product and its layout
            # exchanges at every entry; DeiT-S dQ 301.4 -> 254.1 us, dK/dV 458.9 -> 412.4). The other sums of dM,
            # dW and dc, are centered over the heads instead, once per program (the true dM has mean 0 there).
            mean_dx_xhat = _mix(group_mean, dxhat * xhat, HP, BLOCK_M, BLOCK_N, CDT, False, CDT, NORM_PRECISION)
            dm = rstd * (dxhat - xhat * mean_dx_xhat)
        else:
            mean_dx = _mix(group_mean, dxhat, HP, BLOCK_M, BLOCK_N, CDT, False, CDT, NORM_PRECISION)
            mean_dx_xhat = _mix(group_mean, dxhat * xhat, HP, BLOCK_M, BLOCK_N, CDT, False, CDT, NORM_PRECISION)
            dm = rstd * (dxhat - mean_dx - xhat * mean_dx_xhat)
    elif NORM == 2:
        xhat = (mix - bn_mean[:, None, None]) * bn_rstd[:, None, None]
        a = (gamma * bn_rstd)[:, None, None]
        dm = tl.where(kept, a * dn + bn_e[:, None, None] * xhat + bn_f[:, None, None], 0.0)
    else:
        dm = dn
    return dm, xhat


@triton.jit
def _less_head_means(x, slot_ok, group_mean, H, BY_PRODUCT: tl.constexpr):
    """(I - J) x for x [HP] or [HP, K]: each slot's entry (row) less the mean of its group's heads (padding slots,
    not slot_ok, keep theirs). LayerNorm's dW and dc from the sums of its dM without the mean term
    (``_norm_backward``, ``_split_norm_grad``), as the true dM, whose mean over the heads is 0, gives them.

    BY_PRODUCT: with J = group_mean (``common._group_mean``), as the usual dK/dV kernel must for row groups
    (G > 1) and did at one (the masked sum spilled 8 B there: DeiT-S, sm_90). Otherwise one group, a masked sum
    over the slots: the split sweep's (the product cost it 2.7 us, DeepViT-16b, predicted). A vector is taken as
    it is (as a [HP, 1] column the masked LayerNorm launches spilled 8 B more, 184 B at 16 heads, D = 48, sm_86).
    """
    if BY_PRODUCT:
        if len(x.shape) == 1:
            y = x - tl.sum(group_mean * x[None, :], axis=1)
        else:
            y = x - tl.sum(group_mean[:, :, None] * x[None, :, :], axis=1)
    else:
        if len(x.shape) == 1:
            y = x - tl.where(slot_ok, tl.sum(tl.where(slot_ok, x, 0.0), axis=0) / H, 0.0)
        else:
            real = slot_ok[:, None]
            y = x - tl.where(real, tl.sum(tl.where(real, x, 0.0), axis=0)[None, :] / H, 0.0)
    return y


@triton.jit
def _bn_rows(BN, head, slot_ok, H, CDT: tl.constexpr, NORM: tl.constexpr, SUMS_ONLY: tl.constexpr):
    """(mean, 1/std, e, f) [HP] of training BatchNorm from its [4, H] rows (zeros otherwise / e, f in SUMS_ONLY)."""
    zero = tl.zeros([head.shape[0]], CDT)
    mean, rstd, e, f = zero, zero, zero, zero
    if NORM == 2:
        mean = tl.load(BN + head, mask=slot_ok, other=0.0).to(CDT)
        rstd = tl.load(BN + H + head, mask=slot_ok, other=0.0).to(CDT)
        if not SUMS_ONLY:
            e = tl.load(BN + 2 * H + head, mask=slot_ok, other=0.0).to(CDT)
            f = tl.load(BN + 3 * H + head, mask=slot_ok, other=0.0).to(CDT)
    return mean, rstd, e, f


@triton.jit
def _dq_block(x_acc, y_acc, delta, sum_dn_xhat, sum_dn, q, do, Qb, Kb, Vb, DOb, b, H, head, rows, rows_ok, start_n,
              N_K, D, offs_d, m2, l2, w_slots, c, gamma, group_mean, bn_mean, bn_rstd, bn_e, bn_f, seed, scale2,
              out_scale, eps, dropout_p, MASK, stride_mb, stride_mh, stride_mm, stride_mn, stride_qh, stride_qm,
              stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_doh, stride_dom,
              stride_dod, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              D_CHUNKS: tl.constexpr, NORM: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_PADDED: tl.constexpr,
              EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_SLOT: tl.constexpr, SUMS_ONLY: tl.constexpr,
              CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
              NORM_PRECISION: tl.constexpr, RELOAD_Q: tl.constexpr, TIE_CHUNKS: tl.constexpr, K_PRODUCT: tl.constexpr,
              ROUND_DP: tl.constexpr, DELTA_3D: tl.constexpr, SUMS_DN_XHAT: tl.constexpr):
    """One key block of the query-major sweep: delta, X, Y and, with SUMS_DN_XHAT, the sum of dN xhat (LayerNorm's
    dgamma; with SUMS_ONLY BatchNorm's two sums alone)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if D_CHUNKS == 1 and RELOAD_Q:
        # q and dO re-read (from L1/L2) for every key block, tied to it: held for the whole sweep
        # they take 32 registers (16 slots, D = 32; 8 slots, D = 64) that the mask's and dropout's
        # tiles need (spills at 8 slots, D = 64: 128 -> 56 B). Not for the norms alone: there the
        # re-reads cost more than the spills they save (static model, DeepViT-16b LayerNorm).
        rows_live = rows + _live_zero(offs_n)
        q = _load_rows(Qb, head, rows_live, rows_ok, offs_d, D, stride_qh, stride_qm, stride_qd, CDT, DOT_LOWP)
        do = _load_rows(DOb, head, rows_live, rows_ok, offs_d, D, stride_doh, stride_dom, stride_dod, CDT, DOT_LOWP)
    if K_PRODUCT:
        # One K tile serves both products, staged in shared memory once per key block: q k^T takes
        # its transpose from I @ k in registers (a transposed load of K would be staged again).
        k = _load_keys(Kb, head, offs_n, N_K, offs_d, D, stride_kh, stride_kn, stride_kd, CDT, DOT_LOWP, False,
                       KEYS_PADDED, EVEN_D)
        k_t = _product_result(k, HP, BLOCK_N, BLOCK_D)
        qk = _mm(q, tl.permute(k_t, (0, 2, 1)), tl.zeros([HP, BLOCK_M, BLOCK_N], CDT), DOT_LOWP, LOWP_DTYPE,
                 DOT_PRECISION)
    else:
        qk = _scores_product(q, Qb, Kb, head, rows, rows_ok, offs_n, N_K, D, stride_qh, stride_qm, stride_qd,
                             stride_kh, stride_kn, stride_kd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                             LOWP_DTYPE, DOT_PRECISION, KEYS_PADDED, EVEN_D, TIE_CHUNKS)
    dov = _scores_product(do, DOb, Vb, head, rows, rows_ok, offs_n, N_K, D, stride_doh, stride_dom, stride_dod,
                          stride_vh, stride_vn, stride_vd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                          LOWP_DTYPE, DOT_PRECISION, KEYS_PADDED, EVEN_D, TIE_CHUNKS)
    head3 = head[:, None, None]
    rows3 = rows[:, :, None]
    keys3 = offs_n[None, None, :]
    t2, kept = _scores(qk, m2[:, :, None], b, head3, rows3, rows_ok[:, :, None], keys3, N_K, scale2, MASK, stride_mb,
                       stride_mh, stride_mm, stride_mn, CDT, MASK_KIND, KEYS_PADDED)
    p, p_tilde, drop_scale = _probs(t2, l2[:, :, None], b, H, head3, rows3, start_n, seed, dropout_p, CDT, HAS_DROPOUT,
                                    False)
    dn = dov * out_scale
    if MASK_KIND != 0 or KEYS_PADDED:
        dn = tl.where(kept, dn, 0.0)
    mix = dn  # the map itself is needed only by the norms
    if NORM != 0:
        mix = _mix(w_slots, p_tilde, HP, BLOCK_M, BLOCK_N, CDT, DOT_LOWP, tl.float16, DOT_PRECISION)
        if not BIAS_SLOT:
            mix = mix + c[:, None, None]
    # BatchNorm's dM is not 0 where dN is (e xhat + f): rows past N_Q are outside its entries too.
    dm, xhat = _norm_backward(dn, mix, kept & rows_ok[:, :, None], group_mean, gamma, bn_mean, bn_rstd, bn_e, bn_f,
                              eps, HP, BLOCK_M, BLOCK_N, CDT, NORM, NORM_PRECISION, True, DOT_LOWP, LOWP_DTYPE)
    if SUMS_DN_XHAT:
        # LayerNorm's dbeta is the dK/dV sweep's (a sum there costs no registers; here it made the DeiT-S launch
        # spill 16 B). Kept as [HP, BLOCK_M, 1], in the products' layout: each key block's sum stays within warps (as
        # [HP, BLOCK_M] the sum went through shared memory every block, as delta's did: ``_keeps_delta_3d``).
        kept_dn = dn
        if MASK_KIND != 0 or KEYS_PADDED:
            xhat = tl.where(kept, xhat, 0.0)
        sum_dn_xhat += tl.sum(kept_dn * xhat, axis=2, keep_dims=True)
        if SUMS_ONLY:
            sum_dn += tl.sum(kept_dn, axis=2, keep_dims=True)
    if not SUMS_ONLY:
        # The gradient's operands in the input's own dtype, not _mix's bf16 for unbounded ranges: fp16 inputs
        # have eager's fp16 range, and bf16 here made dQ and dK err ~3x eager's fp16 error (H200).
        dp = _mix(tl.trans(w_slots), dm, HP, BLOCK_M, BLOCK_N, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        if ROUND_DP and DOT_LOWP:
            # Rounded to the input dtype, as eager's dP (a product's output in that dtype) is, before the
            # exchange from the mixing's layout to p's: 2 bytes an entry through shared memory, not 4.
            dp = dp.to(LOWP_DTYPE).to(CDT)
        if HAS_DROPOUT:
            dp = dp * drop_scale
        pdp = p * dp
        if DELTA_3D:
            delta += tl.sum(pdp, axis=2, keep_dims=True)
        else:
            delta += tl.sum(pdp, axis=2)
        if not K_PRODUCT:
            k = _load_keys(Kb, head, offs_n, N_K, offs_d, D, stride_kh, stride_kn, stride_kd, CDT, DOT_LOWP, False,
                           KEYS_PADDED, EVEN_D)
        x_acc = _mm(pdp, k, x_acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        y_acc = _mm(p, k, y_acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return x_acc, y_acc, delta, sum_dn_xhat, sum_dn


@triton.jit
def _split_gradient_weights(w_slots, HP: tl.constexpr, Q: tl.constexpr, DOT_LOWP: tl.constexpr,
                            LOWP_DTYPE: tl.constexpr, CDT: tl.constexpr):
    """W^T (x) I_Q in the four blocks of the two head groups (``forward._split_weights``), for dP = W^T dM on the
    stacked rows: (AA [HA Q, HA Q], AB [HA Q, HB Q], BA, BB), in the input dtype with DOT_LOWP (gradients have
    no bounded range: not fp16 for bf16 inputs), else CDT."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    top, bottom = _halves(tl.trans(w_slots), HP, HP, 0)
    t_aa, t_ab = _halves(top, HA, HP, 1)
    t_ba, t_bb = _halves(bottom, HA, HP, 1)
    t_ab, _ = _halves(t_ab, HA, HA, 1)
    t_ba, _ = _halves(t_ba, HA, HA, 0)
    t_bb, _ = _halves(t_bb, HA, HA, 0)
    t_bb, _ = _halves(t_bb, HB, HA, 1)
    t_aa = _block_diag(t_aa, HA, HA, Q)
    t_ab = _block_diag(t_ab, HA, HB, Q)
    t_ba = _block_diag(t_ba, HB, HA, Q)
    t_bb = _block_diag(t_bb, HB, HB, Q)
    if DOT_LOWP:
        t_aa = _held_weights(t_aa, HA * Q, HA * Q, LOWP_DTYPE)
        t_ab = _held_weights(t_ab, HA * Q, HB * Q, LOWP_DTYPE)
        t_ba = _held_weights(t_ba, HB * Q, HA * Q, LOWP_DTYPE)
        t_bb = _held_weights(t_bb, HB * Q, HB * Q, LOWP_DTYPE)
    return t_aa, t_ab, t_ba, t_bb


@triton.jit
def _split_keys_product(x, kt, ktt, acc, acc_t, D_TAIL: tl.constexpr, DOT_LOWP: tl.constexpr,
                        LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x K over the head dim's tile, acc_t += x K over its tail (D_TAIL), from K transposed (kt, ktt, as
    q.k read them: the one staged tile serves both products)."""
    acc = _mm(x, tl.permute(kt, (0, 2, 1)), acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if D_TAIL > 0:
        acc_t = _mm(x, tl.permute(ktt, (0, 2, 1)), acc_t, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return acc, acc_t


@triton.jit
def _split_layout(row0, N, HP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, D_TAIL: tl.constexpr):
    """What both split sweeps index by: the heads of the two groups (0..HP/2-1, then HP/4 more), the head dim's
    tile and tail columns, and the program's rows (query rows or keys, from row0) per group with their
    bounds ([HP / 2, BLOCK], [HP / 4, BLOCK])."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    D_MAIN: tl.constexpr = BLOCK_D // 2 if D_TAIL > 0 else BLOCK_D
    TAIL_W: tl.constexpr = D_TAIL if D_TAIL > 0 else 16  # offs_t is unused without a tail
    rows_a = row0 + tl.zeros([HA, 1], tl.int32) + tl.arange(0, BLOCK)[None, :]
    rows_b = row0 + tl.zeros([HB, 1], tl.int32) + tl.arange(0, BLOCK)[None, :]
    return (tl.arange(0, HA), HA + tl.arange(0, HB), tl.arange(0, D_MAIN), D_MAIN + tl.arange(0, TAIL_W), rows_a,
            rows_b, rows_a < N, rows_b < N)


@triton.jit
def _split_group_rows(X, ha, hb, rows_a, rows_b, ok_a, ok_b, offs_d, offs_t, D, stride_h, stride_r, stride_d,
                      HP: tl.constexpr, BLOCK: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                      CDT: tl.constexpr, DOT_LOWP: tl.constexpr):
    """The program's rows of X (q or dO by query rows, K or V by keys) for both head groups ([S, BLOCK, D_MAIN],
    and the tail's, or placeholders): the 8-head group's in registers (a head a warp), the 4-head group's
    re-read from shared memory at every block (its products split their blocks over warp pairs; see
    forward._split_sweep)."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    xa = _split_queries(X, ha, rows_a, ok_a, offs_d, D, stride_h, stride_r, stride_d, HA, BLOCK, D_MAIN, DOT_LOWP,
                        CDT, DOT_LOWP)
    xb = _split_queries(X, hb, rows_b, ok_b, offs_d, D, stride_h, stride_r, stride_d, HB, BLOCK, D_MAIN, False, CDT,
                        DOT_LOWP)
    xat = 0.0
    xbt = 0.0
    if D_TAIL > 0:
        xat = _split_queries(X, ha, rows_a, ok_a, offs_t, D, stride_h, stride_r, stride_d, HA, BLOCK, D_TAIL,
                             DOT_LOWP, CDT, DOT_LOWP)
        xbt = _split_queries(X, hb, rows_b, ok_b, offs_t, D, stride_h, stride_r, stride_d, HB, BLOCK, D_TAIL, False,
                             CDT, DOT_LOWP)
    return xa, xb, xat, xbt


@triton.jit
def _split_row_stats(STATSb, ha, hb, rows_a, rows_b, ok_a, ok_b, stride_sp, stride_sh, stride_sm,
                     MERGED: tl.constexpr, CDT: tl.constexpr):
    """(m2, l2) of both head groups' query rows; MERGED (tensor-core operands): m2 + l2 and 0, so that
    P = 2^(S2 - (m2 + l2)) is one fused multiply-add, as in ``forward._split_sweep``."""
    m2a, l2a = _load_row_stats(STATSb, ha >= 0, rows_a, ok_a, ha, stride_sp, stride_sh, stride_sm, CDT)
    m2b, l2b = _load_row_stats(STATSb, hb >= 0, rows_b, ok_b, hb, stride_sp, stride_sh, stride_sm, CDT)
    if MERGED:
        m2a = m2a + l2a
        m2b = m2b + l2b
        l2a = tl.zeros_like(l2a)
        l2b = tl.zeros_like(l2b)
    return m2a, l2a, m2b, l2b


@triton.jit
def _split_group_accumulators(HP: tl.constexpr, BLOCK: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                              CDT: tl.constexpr):
    """Zero accumulators of both head groups over the head dim's tile and its tail (scalars without one: a
    loop-carried placeholder tile would hold registers)."""
    if D_TAIL > 0:
        at = tl.zeros([HP // 2, BLOCK, D_TAIL], CDT)
        bt = tl.zeros([HP // 4, BLOCK, D_TAIL], CDT)
    else:
        at = tl.zeros([], CDT)
        bt = tl.zeros([], CDT)
    return tl.zeros([HP // 2, BLOCK, D_MAIN], CDT), tl.zeros([HP // 4, BLOCK, D_MAIN], CDT), at, bt


@triton.jit
def _split_store_groups(Y, acc_a, acc_b, acc_at, acc_bt, scale, ha, hb, rows_a, rows_b, ok_a, ok_b, offs_d, offs_t,
                        D, stride_h, stride_r, stride_d, D_TAIL: tl.constexpr):
    """scale times both groups' accumulators (and the tail's) into Y at the program's rows."""
    _split_store(Y, acc_a * scale, ha, rows_a, ok_a, offs_d, D, stride_h, stride_r, stride_d)
    _split_store(Y, acc_b * scale, hb, rows_b, ok_b, offs_d, D, stride_h, stride_r, stride_d)
    if D_TAIL > 0:
        _split_store(Y, acc_at * scale, ha, rows_a, ok_a, offs_t, D, stride_h, stride_r, stride_d)
        _split_store(Y, acc_bt * scale, hb, rows_b, ok_b, offs_t, D, stride_h, stride_r, stride_d)


@triton.jit
def _split_batch_norm_terms(c, tau_gamma, BN, heads, real, H, CDT: tl.constexpr):
    """Training BatchNorm's dM as a per-head affine map of dO V^T and of the map's mixing W P, for the split sweeps:
    dM = a dN + e xhat + f with dN = tau dO V^T, xhat = (M - mean) / std and M = W P + c is
    dM = (tau a) (dO V^T) + (e / std) (W P) + (e / std) (c - mean) + f. Returns those three per-slot factors
    [HP] (0 at slots past the H heads: their 1/std loads as 0) from tau gamma and the [4, H] rows BN (mean,
    1/std, e, f)."""
    mean, rstd, e, f = _bn_rows(BN, heads, real, H, CDT, 2, False)
    e_rstd = e * rstd
    return tau_gamma * rstd, e_rstd, e_rstd * (c - mean) + f


@triton.jit
def _split_norm_params(W, C, NW, NB, BN, H, out_scale, stride_wg, stride_wh, stride_c, stride_nw, stride_nb,
                       HP: tl.constexpr, G: tl.constexpr, CDT: tl.constexpr, HAS_MIX_BIAS: tl.constexpr,
                       NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """The parameters both split sweeps take (12 heads in slots 0..11, as given: no fold): w_slots, c, gamma, beta
    (``_slot_params``), the map's mixing w_map, c_map that ``_split_norm_grad`` recomputes (LayerNorm: centered,
    ``common._center_across_heads``; else W, c) and its factors n_dn, n_map, n_const (training BatchNorm:
    ``_split_batch_norm_terms``; LayerNorm: n_dn = tau gamma; else 0)."""
    offs_s = tl.arange(0, HP)
    w_slots, c, gamma, beta = _slot_params(W, C, NW, NB, BN, offs_s % H, offs_s < H, H, out_scale, stride_wg,
                                           stride_wh, stride_c, stride_nw, stride_nb, HP, G, CDT, HAS_MIX_BIAS, NORM,
                                           HAS_NORM_WEIGHT, HAS_NORM_BIAS, False, False)
    w_map, c_map = w_slots, c
    n_dn, n_map, n_const = 0.0, 0.0, 0.0
    if NORM == 2:
        n_dn, n_map, n_const = _split_batch_norm_terms(c, gamma * out_scale, BN, offs_s % H, offs_s < H, H, CDT)
    elif NORM == 1:
        w_map, c_map = _center_across_heads(w_slots, c, offs_s < H, H, HP, G, CDT, HAS_MIX_BIAS, False)
        n_dn = gamma * out_scale
    return w_slots, c, gamma, beta, w_map, c_map, n_dn, n_map, n_const


@triton.jit
def _split_norm_grad(dn_a, dn_b, pa, pb, w_mix, c_mix, n_dn, n_map, n_const, kept, H, eps, HP: tl.constexpr,
                     E: tl.constexpr, NORM: tl.constexpr, MASKED: tl.constexpr, CDT: tl.constexpr,
                     DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     DN_PRODUCT: tl.constexpr):
    """The norm's dM [HP, E] on both head groups' rows joined (``_head_rows``: heads 0..11, then 4 zero rows) from
    their dO V^T (dn_a, dn_b: dN / tau) and P (pa, pb), E entries each, with the map recomputed from P by one
    [HP, HP] product with fp16 operands, as the forward mixes (P in [0, 1]); dO V^T enters rounded to the input
    dtype, as eager's product returns it. MASKED: dM is 0 at the entries not ``kept`` [E]. Returns (dM, P joined
    (fp16), dN / tau joined, and LayerNorm's centered map X and 1/std [E] (0 where not kept)).

    NORM 2, training BatchNorm: dM = n_dn (dO V^T) + n_map (W P) + n_const (``_split_batch_norm_terms``;
    w_mix = W). NORM 1, LayerNorm across the heads: the map centered over them, X = w_mix P + c_mix
    (``common._center_across_heads``), r = 1/std, xhat = r X, and with dxhat = n_dn (dO V^T) (n_dn = tau gamma)
    dM = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) = r dxhat - r mean(dxhat) - r^3 mean(dxhat X) X, means
    over the H heads of an entry (the zero rows add nothing), without its term - r mean(dxhat), constant over the
    heads: dP takes W_c^T = (w_mix)^T, which maps it to 0, and the dK/dV sweep centers dW and dc over the heads
    (as ``_norm_backward``). r dxhat - r^3 mean(dxhat X) X is two fused multiply-adds an element and no xhat
    tile, the rest per entry; r^3 mean(dxhat X) as (r r)(r mean(dxhat X)), whose second factor is of dxhat's
    size. 1/std is ``rsqrt.approx`` next to fp16 products, as in the forward. DN_PRODUCT (LayerNorm,
    tensor-core operands): dO V^T joined reaches X's layout [E, HP] through an identity product (exact: one
    nonzero term per sum), not by a transpose; the dN returned is then not formed (the dQ sweep does not read
    it)."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    MIX_P: tl.constexpr = tl.float16 if DOT_LOWP else CDT
    MIX_G: tl.constexpr = LOWP_DTYPE if DOT_LOWP else CDT
    p = _head_rows(tl.reshape(pa.to(MIX_P), (HA, E)), tl.reshape(pb.to(MIX_P), (HB, E)), HA, E)
    dn_g = _head_rows(tl.reshape(dn_a.to(MIX_G), (HA, E)), tl.reshape(dn_b.to(MIX_G), (HB, E)), HA, E)
    dn = dn_g.to(CDT)
    if NORM == 2:
        wp = _mm(w_mix, p, tl.zeros([HP, E], CDT), DOT_LOWP, MIX_P, DOT_PRECISION)
        dm = n_dn[:, None] * dn + n_map[:, None] * wp + n_const[:, None]
        if MASKED:
            dm = tl.where(kept[None, :], dm, 0.0)
        x, rstd = 0.0, 0.0
    else:
        # Entries by heads, [E, HP]: the heads are the product's columns, 4 of a thread's registers and 2 lane
        # bits, so each sum over them is 3 additions and 2 shuffles a row; as rows ([HP, E]) they took 3 shuffles
        # for every 2 columns a thread holds.
        x = _mm(tl.trans(p), tl.trans(w_mix), tl.broadcast_to(c_mix[None, :], (E, HP)), DOT_LOWP, MIX_P,
                DOT_PRECISION)
        var = tl.sum(x * x, axis=1) / H  # (a reciprocal of H would be an fp32 constant in the interpreter)
        if DOT_LOWP:
            rstd = tl.math.rsqrt(var + eps)
        else:
            rstd = 1.0 / tl.sqrt(var + eps)
        if MASKED:  # (a constant map's 1/std may be 1/0 at eps = 0 there)
            rstd = tl.where(kept, rstd, 0.0)
        if DN_PRODUCT and DOT_LOWP:
            # The [HP, E] tile's transpose took an exchange through shared memory of its own (DeepViT-16b dQ
            # kernel, predicted: 223.1 -> 212.8 us); as a product's operand it is staged there anyway. Not in the
            # dK/dV sweep, which reads dN joined as well (there 254.4 -> 269.0 us, 48 B spilled).
            eye = (tl.arange(0, HP)[:, None] == tl.arange(0, HP)[None, :]).to(MIX_G)
            dn_t = _mm(tl.trans(dn_g), eye, tl.zeros([E, HP], CDT), DOT_LOWP, MIX_G, DOT_PRECISION)
        else:
            dn_t = tl.trans(dn)
        dxhat = dn_t * n_dn[None, :]
        r3_mean = (rstd * rstd) * (rstd * (tl.sum(dxhat * x, axis=1) / H))
        dm = tl.trans(rstd[:, None] * dxhat - r3_mean[:, None] * x)
        x = tl.trans(x)
    return dm, p, dn, x, rstd


@triton.jit
def _split_dq_block(xa, xb, xat, xbt, delta_a, delta_b, qa, qb, qat, qbt, doa, dob, doat, dobt, Kb, Vb, b, ha, hb,
                    rows_a, rows_b, ok_a, ok_b, start_n, N_K, D, offs_d, offs_t, m2a, l2a, m2b, l2b, t_aa, t_ab, t_ba,
                    t_bb, w_mix, w_t, c_mix, n_dn, n_map, n_const, H, eps, scale2, stride_kh, stride_kn, stride_kd,
                    stride_vh, stride_vn, stride_vd, HP: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, D_TAIL: tl.constexpr, KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr,
                    NORM: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, CORRECTION: tl.constexpr):
    """One key block of ``_split_dq_sweep``. First sweep: P, dP = (tau W)^T (dO V^T) on the stacked rows (the
    weights t_* carry out_scale), X += (P dP) K and delta += rowsum(P dP) per head group; with a norm (NORM 1
    LayerNorm, 2 training BatchNorm) dP = W^T dM on the joined rows instead (``_split_norm_grad``; w_mix, c_mix:
    the map's mixing in fp16, w_t: W^T in the input dtype). Second sweep (CORRECTION, delta complete):
    X -= (delta P) K."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    E: tl.constexpr = BLOCK_M * BLOCK_N
    MIX_DTYPE: tl.constexpr = LOWP_DTYPE if DOT_LOWP else CDT
    offs_n = start_n + tl.arange(0, BLOCK_N)
    ka, kat = _split_tiles(Kb, ha, offs_n, N_K, offs_d, offs_t, D, stride_kh, stride_kn, stride_kd, D_TAIL, KEYS_PADDED,
                           EVEN_D, CDT, DOT_LOWP)
    kb, kbt = _split_tiles(Kb, hb, offs_n, N_K, offs_d, offs_t, D, stride_kh, stride_kn, stride_kd, D_TAIL, KEYS_PADDED,
                           EVEN_D, CDT, DOT_LOWP)
    qk_a = _split_scores(qa, qat, ka, kat, HA, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    qk_b = _split_scores(qb, qbt, kb, kbt, HB, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    pa = _split_probs(qk_a, b, ha, rows_a, ok_a, offs_n, N_K, m2a, l2a, scale2, CDT, KEYS_PADDED)
    pb = _split_probs(qk_b, b, hb, rows_b, ok_b, offs_n, N_K, m2b, l2b, scale2, CDT, KEYS_PADDED)
    if CORRECTION:
        ga = -(pa * delta_a[:, :, None])
        gb = -(pb * delta_b[:, :, None])
    else:
        # Keys past N_K: V loads as 0 there, so dN is 0, and P is 0.
        va, vat = _split_tiles(Vb, ha, offs_n, N_K, offs_d, offs_t, D, stride_vh, stride_vn, stride_vd, D_TAIL,
                               KEYS_PADDED, EVEN_D, CDT, DOT_LOWP)
        vb, vbt = _split_tiles(Vb, hb, offs_n, N_K, offs_d, offs_t, D, stride_vh, stride_vn, stride_vd, D_TAIL,
                               KEYS_PADDED, EVEN_D, CDT, DOT_LOWP)
        dn_a = _split_scores(doa, doat, va, vat, HA, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE,
                             DOT_PRECISION)
        dn_b = _split_scores(dob, dobt, vb, vbt, HB, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE,
                             DOT_PRECISION)
        if NORM != 0:
            # P is 0 at keys past N_K and rows past N_Q, so P dP is too, whatever finite dM is there; LayerNorm's
            # dM of a constant map (c) there may be 0 / 0 at eps = 0: zeroed at keys past N_K.
            keys_ok = (start_n + tl.arange(0, E) % BLOCK_N) < N_K
            dm, _, _, _, _ = _split_norm_grad(dn_a, dn_b, pa, pb, w_mix, c_mix, n_dn, n_map, n_const, keys_ok, H, eps,
                                              HP, E, NORM, NORM == 1 and KEYS_PADDED, CDT, DOT_LOWP, LOWP_DTYPE,
                                              DOT_PRECISION, True)
            dp16 = _mm(w_t, dm.to(MIX_DTYPE), tl.zeros([HP, E], CDT), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
            dp_a, dp_b = _halves(dp16, HP, E, 0)
            dp_b, _ = _halves(dp_b, HA, E, 0)
            ga = pa * tl.reshape(dp_a, (HA, BLOCK_M, BLOCK_N))
            gb = pb * tl.reshape(dp_b, (HB, BLOCK_M, BLOCK_N))
        else:
            xs_a = _stack(tl.reshape(dn_a.to(MIX_DTYPE), (HA, E)), HA, E, Q)
            xs_b = _stack(tl.reshape(dn_b.to(MIX_DTYPE), (HB, E)), HB, E, Q)
            dp_a = _mm(t_ab, xs_b, _mm(t_aa, xs_a, tl.zeros([HA * Q, E // Q], CDT), DOT_LOWP, MIX_DTYPE,
                                       DOT_PRECISION), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
            dp_b = _mm(t_bb, xs_b, _mm(t_ba, xs_a, tl.zeros([HB * Q, E // Q], CDT), DOT_LOWP, MIX_DTYPE,
                                       DOT_PRECISION), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
            ga = pa * _unstack(dp_a, HA, E, Q, BLOCK_M, BLOCK_N)
            gb = pb * _unstack(dp_b, HB, E, Q, BLOCK_M, BLOCK_N)
        delta_a += tl.sum(ga, axis=2)
        delta_b += tl.sum(gb, axis=2)
    xa, xat = _split_keys_product(ga, ka, kat, xa, xat, D_TAIL, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    xb, xbt = _split_keys_product(gb, kb, kbt, xb, xbt, D_TAIL, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return xa, xb, xat, xbt, delta_a, delta_b


@triton.jit
def _split_dq_sweep(Qb, Kb, Vb, DOb, DQb, DELTAb, STATSb, w_slots, out_scale, w_map, c_map, n_dn, n_map, n_const,
                    eps, b, row0, H, N_Q, N_K, D, scale2, dq_scale, stride_qh, stride_qm, stride_qd, stride_kh,
                    stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_doh, stride_dom, stride_dod,
                    stride_dqh, stride_dqm, stride_dqd, stride_sp, stride_sh, stride_sm, HP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_TAIL: tl.constexpr,
                    EVEN_D: tl.constexpr, NORM: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                    LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ and delta for H = 3 HP / 4 heads without padding slots (the forward's ``_split_sweep`` layout: heads
    0..HA-1 and HA..HA+HB-1 as two batched products, their maps stacked for the mixing; docs/math.md).

    Two accumulators of 16 slots at D = 64 (X and Y of the usual sweep) do not fit a program's registers,
    which split the head dim over programs that each recomputed the whole map. Here one accumulator per group
    holds dQ / scale over the whole head dim, in two sweeps over the keys: the first adds (P dP) K and sums
    delta = rowsum(P dP); the second, with delta complete, subtracts (delta P) K. That is X - delta Y with
    the second sweep's q.k and exponentials in place of a second accumulator and the first's Y product.
    No norm (eval BatchNorm arrives folded), LayerNorm (NORM 1: w_map, c_map the centered mixing, n_dn = tau gamma)
    or training BatchNorm (NORM 2: w_map = W, n_* the factors of ``_split_batch_norm_terms``), no mask or dropout
    (``launch.splits_backward_heads``); w_slots: W as given.
    """
    HB: tl.constexpr = HP // 4
    Q: tl.constexpr = 16 // HB
    D_MAIN: tl.constexpr = BLOCK_D // 2 if D_TAIL > 0 else BLOCK_D
    ha, hb, offs_d, offs_t, rows_a, rows_b, ok_a, ok_b = _split_layout(row0, N_Q, HP, BLOCK_M, BLOCK_D, D_TAIL)
    qa, qb, qat, qbt = _split_group_rows(Qb, ha, hb, rows_a, rows_b, ok_a, ok_b, offs_d, offs_t, D, stride_qh,
                                         stride_qm, stride_qd, HP, BLOCK_M, D_MAIN, D_TAIL, CDT, DOT_LOWP)
    doa, dob, doat, dobt = _split_group_rows(DOb, ha, hb, rows_a, rows_b, ok_a, ok_b, offs_d, offs_t, D, stride_doh,
                                             stride_dom, stride_dod, HP, BLOCK_M, D_MAIN, D_TAIL, CDT, DOT_LOWP)
    xa, xb, xat, xbt = _split_group_accumulators(HP, BLOCK_M, D_MAIN, D_TAIL, CDT)
    m2a, l2a, m2b, l2b = _split_row_stats(STATSb, ha, hb, rows_a, rows_b, ok_a, ok_b, stride_sp, stride_sh, stride_sm,
                                          DOT_LOWP, CDT)
    if NORM != 0:
        # One [HP, HP] weight tile each way (a few registers), where the stacked rows' W^T (x) I_Q blocks hold 36.
        t_aa, t_ab, t_ba, t_bb = 0.0, 0.0, 0.0, 0.0
        w_mix = _held_weights(w_map, HP, HP, tl.float16) if DOT_LOWP else w_map
        # dP = W^T dM; LayerNorm's dM comes without its mean over the heads, which W_c^T maps to 0 (_split_norm_grad)
        w_t = tl.trans(w_map) if NORM == 1 else tl.trans(w_slots)
        if DOT_LOWP:
            w_t = _held_weights(w_t, HP, HP, LOWP_DTYPE)
    else:
        t_aa, t_ab, t_ba, t_bb = _split_gradient_weights(w_slots * out_scale, HP, Q, DOT_LOWP, LOWP_DTYPE, CDT)
        w_mix, w_t = 0.0, 0.0
    delta_a = tl.zeros([HP // 2, BLOCK_M], CDT)
    delta_b = tl.zeros([HB, BLOCK_M], CDT)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for sweep in tl.static_range(2):  # X and delta; then, delta complete, X -= (delta P) K
        for start_n in range(0, n_full, BLOCK_N):
            xa, xb, xat, xbt, delta_a, delta_b = _split_dq_block(
                xa, xb, xat, xbt, delta_a, delta_b, qa, qb, qat, qbt, doa, dob, doat, dobt, Kb, Vb, b, ha, hb, rows_a,
                rows_b, ok_a, ok_b, start_n, N_K, D, offs_d, offs_t, m2a, l2a, m2b, l2b, t_aa, t_ab, t_ba, t_bb, w_mix,
                w_t, c_map, n_dn, n_map, n_const, H, eps, scale2, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn,
                stride_vd, HP, Q, BLOCK_M, BLOCK_N, D_TAIL, False, EVEN_D, NORM, CDT, DOT_LOWP, LOWP_DTYPE,
                DOT_PRECISION, sweep == 1)
        if n_full < N_K:
            xa, xb, xat, xbt, delta_a, delta_b = _split_dq_block(
                xa, xb, xat, xbt, delta_a, delta_b, qa, qb, qat, qbt, doa, dob, doat, dobt, Kb, Vb, b, ha, hb, rows_a,
                rows_b, ok_a, ok_b, n_full, N_K, D, offs_d, offs_t, m2a, l2a, m2b, l2b, t_aa, t_ab, t_ba, t_bb, w_mix,
                w_t, c_map, n_dn, n_map, n_const, H, eps, scale2, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn,
                stride_vd, HP, Q, BLOCK_M, BLOCK_N, D_TAIL, True, EVEN_D, NORM, CDT, DOT_LOWP, LOWP_DTYPE,
                DOT_PRECISION, sweep == 1)
    _split_store_groups(DQb, xa, xb, xat, xbt, dq_scale, ha, hb, rows_a, rows_b, ok_a, ok_b, offs_d, offs_t, D,
                        stride_dqh, stride_dqm, stride_dqd, D_TAIL)
    tl.store(DELTAb + (ha[:, None] * N_Q + rows_a), delta_a, mask=ok_a)
    tl.store(DELTAb + (hb[:, None] * N_Q + rows_b), delta_b, mask=ok_b)


@triton.jit
def _re_attention_bwd_dq_kernel(
    Q, K, V, W, C, NW, NB, BN, MASK, SEED, STATS, DO, DQ, DELTA, SUMS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sp, stride_sb, stride_sh, stride_sm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_wg, stride_wh, stride_c, stride_nw, stride_nb,
    H, N_Q, N_K, D, NUM_PROGRAMS_M,
    scale2, out_scale, eps, dropout_p,
    HP: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, EVEN_D: tl.constexpr, BIAS_SLOT: tl.constexpr,
    HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, SUMS_ONLY: tl.constexpr,
    CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr,
    RELOAD_Q: tl.constexpr, TIE_CHUNKS: tl.constexpr, ROUND_DP: tl.constexpr, DELTA_3D: tl.constexpr,
    DQ_DGAMMA: tl.constexpr,
    SPLIT_HEADS: tl.constexpr, D_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_PROGRAMS_M).to(tl.int64)
    if SPLIT_HEADS:  # dQ needs no norm bias, nor a mixing bias without a norm
        w_slots, _, _, _, w_map, c_map, n_dn, n_map, n_const = _split_norm_params(
            W, C, NW, NB, BN, H, out_scale, stride_wg, stride_wh, stride_c, stride_nw, stride_nb, HP, G, CDT,
            HAS_MIX_BIAS and NORM != 0, NORM, HAS_NORM_WEIGHT, False)
        # dQ = scale X with scale = scale2 / log2(e), taken here: a float passed to a called function is fp32 in
        # the interpreter (fp64 inputs' dQ then erred 2e-8).
        _split_dq_sweep(Q + b * stride_qb, K + b * stride_kb, V + b * stride_vb, DO + b * stride_dob,
                        DQ + b * stride_dqb, DELTA + b * H * N_Q, STATS + b * stride_sb, w_slots, out_scale, w_map,
                        c_map, n_dn, n_map, n_const, eps, b, (pid % NUM_PROGRAMS_M) * BLOCK_M, H, N_Q, N_K, D, scale2,
                        scale2 * 0.6931471805599453, stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd,
                        stride_vh, stride_vn, stride_vd, stride_doh, stride_dom, stride_dod, stride_dqh, stride_dqm,
                        stride_dqd, stride_sp, stride_sh, stride_sm, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_TAIL, EVEN_D,
                        NORM, CDT, DOT_LOWP, Q.dtype.element_ty, DOT_PRECISION)
        return
    head, slot_ok, rows, rows_ok = _slot_rows((pid % NUM_PROGRAMS_M) * (G * BLOCK_M), H, N_Q, HP, G, BLOCK_M)
    pid_d = tl.program_id(1)  # head-dim chunk of dQ this program writes
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    DOb = DO + b * stride_dob
    # Tensor-core operands routed through a product (``_product_result``), at 8 slots (at 16 the
    # registers they take made the compiler spill):
    # Q_HELD: q and dO held in registers for the whole sweep, not re-read from shared memory on
    # every key block. K_PRODUCT: each K block staged once, its transpose for q k^T taken from
    # I @ k in registers (loading K twice, for both products, staged it twice); not with a mask or
    # dropout (sm_86 at D = 64 spilled 16 -> 48 B). Training BatchNorm takes both although its
    # launch at D = 64 then spills 24 B per thread (none without them): the static model predicts
    # its DeiT-S dQ kernel at 239 us against 331 (shared-memory traffic 2.98 -> 2.15 MB a program).
    OPERANDS: tl.constexpr = DOT_LOWP and D_CHUNKS == 1 and not SUMS_ONLY and HP == 8
    Q_HELD: tl.constexpr = OPERANDS and not RELOAD_Q
    K_PRODUCT: tl.constexpr = OPERANDS and not RELOAD_Q
    # The sums of dN xhat per slot: BatchNorm's SUMS_ONLY sweep's (with those of dN), or LayerNorm's dgamma where this
    # sweep takes it (DQ_DGAMMA, ``_sums_dgamma_in_dq``).
    SUMS_DN_XHAT: tl.constexpr = SUMS_ONLY or (NORM == 1 and DQ_DGAMMA)
    q = _load_rows(Qb, head, rows, rows_ok, offs_d, D, stride_qh, stride_qm, stride_qd, CDT, DOT_LOWP)
    do = _load_rows(DOb, head, rows, rows_ok, offs_d, D, stride_doh, stride_dom, stride_dod, CDT, DOT_LOWP)
    if Q_HELD:
        q = _product_result(q, HP, BLOCK_M, BLOCK_D)
        do = _product_result(do, HP, BLOCK_M, BLOCK_D)
    m2, l2 = _load_row_stats(STATS + b * stride_sb, slot_ok, rows, rows_ok, head, stride_sp, stride_sh, stride_sm,
                             CDT)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    # The backward mixes with W itself (nothing folded) and applies out_scale to dN.
    w_slots, c, gamma, _ = _slot_params(W, C, NW, NB, BN, head, slot_ok, H, out_scale, stride_wg, stride_wh,
                                        stride_c, stride_nw, stride_nb, HP, G, CDT, HAS_MIX_BIAS, NORM,
                                        HAS_NORM_WEIGHT, HAS_NORM_BIAS, BIAS_SLOT, False)
    # LayerNorm: the map recomputed centered, in one product (``common._center_across_heads``); dP mixes by the
    # centered weights too: dM sums to 0 over each group's heads, so (W - 1 mean(W))^T dM = W^T dM, less the
    # part of dM along the heads' mean, which only the norm's tf32 mean of dxhat puts there.
    if NORM == 1 and HP <= CENTERED_SLOTS:
        w_slots, c = _center_across_heads(w_slots, c, slot_ok, H, HP, G, CDT, HAS_MIX_BIAS, BIAS_SLOT)
    group_mean = _group_mean(H, slot_ok, HP, CDT)
    bn_mean, bn_rstd, bn_e, bn_f = _bn_rows(BN, head, slot_ok, H, CDT, NORM, SUMS_ONLY)

    x_acc = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
    y_acc = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
    if DELTA_3D:  # see _keeps_delta_3d
        delta = tl.zeros([HP, BLOCK_M, 1], CDT)
    else:
        delta = tl.zeros([HP, BLOCK_M], CDT)
    sum_dn_xhat = tl.zeros([HP, BLOCK_M, 1], CDT)
    sum_dn = tl.zeros([HP, BLOCK_M, 1], CDT)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        x_acc, y_acc, delta, sum_dn_xhat, sum_dn = _dq_block(
            x_acc, y_acc, delta, sum_dn_xhat, sum_dn, q, do, Qb, Kb, Vb, DOb, b, H, head, rows, rows_ok, start_n,
            N_K, D, offs_d, m2, l2, w_slots, c, gamma, group_mean, bn_mean, bn_rstd, bn_e, bn_f, seed, scale2,
            out_scale, eps, dropout_p, MASK, stride_mb, stride_mh, stride_mm, stride_mn, stride_qh, stride_qm,
            stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_doh, stride_dom,
            stride_dod, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, NORM, MASK_KIND, False, EVEN_D, HAS_DROPOUT,
            BIAS_SLOT, SUMS_ONLY, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, NORM_PRECISION, RELOAD_Q, TIE_CHUNKS,
            K_PRODUCT, ROUND_DP, DELTA_3D, SUMS_DN_XHAT)
    if n_full < N_K:
        x_acc, y_acc, delta, sum_dn_xhat, sum_dn = _dq_block(
            x_acc, y_acc, delta, sum_dn_xhat, sum_dn, q, do, Qb, Kb, Vb, DOb, b, H, head, rows, rows_ok, n_full,
            N_K, D, offs_d, m2, l2, w_slots, c, gamma, group_mean, bn_mean, bn_rstd, bn_e, bn_f, seed, scale2,
            out_scale, eps, dropout_p, MASK, stride_mb, stride_mh, stride_mm, stride_mn, stride_qh, stride_qm,
            stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_doh, stride_dom,
            stride_dod, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, NORM, MASK_KIND, True, EVEN_D, HAS_DROPOUT,
            BIAS_SLOT, SUMS_ONLY, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, NORM_PRECISION, RELOAD_Q, TIE_CHUNKS,
            K_PRODUCT, ROUND_DP, DELTA_3D, SUMS_DN_XHAT)

    if SUMS_DN_XHAT:
        # Per program and slot: sum dN xhat, and with SUMS_ONLY sum dN (every head-dim chunk summed the same
        # entries: the first stores).
        if pid_d == 0:
            sums_ptrs = SUMS + (pid.to(tl.int64) * 2) * HP + tl.arange(0, HP)
            tl.store(sums_ptrs, tl.sum(tl.where(rows_ok, tl.reshape(sum_dn_xhat, (HP, BLOCK_M)), 0.0), axis=1),
                     mask=slot_ok)
            if SUMS_ONLY:
                tl.store(sums_ptrs + HP, tl.sum(tl.where(rows_ok, tl.reshape(sum_dn, (HP, BLOCK_M)), 0.0), axis=1),
                         mask=slot_ok)
    if not SUMS_ONLY:
        # scale2 = scale * log2(e): dS is in natural units, so dQ = scale (X - delta Y).
        if DELTA_3D:
            delta_3d = delta
            delta = tl.reshape(delta, (HP, BLOCK_M))
        else:
            delta_3d = delta[:, :, None]
        dq = (x_acc - delta_3d * y_acc) * (scale2 * 0.6931471805599453)
        d_ok = (offs_d < D)[None, None, :]
        tl.store((DQ + b * stride_dqb) + (head[:, None, None] * stride_dqh + rows[:, :, None] * stride_dqm
                                          + offs_d[None, None, :] * stride_dqd),
                 dq.to(DQ.dtype.element_ty), mask=rows_ok[:, :, None] & d_ok)
        delta_ptrs = (DELTA + b * H * N_Q) + (head[:, None] * N_Q + rows)
        tl.store(delta_ptrs, delta, mask=rows_ok & ((rows * 0 + pid_d) == 0))


@triton.jit
def _dkdv_block(dk_acc, dv_acc, dw_acc, dnw_acc, dnb_acc, dc_acc, k, v, Kb, Vb, Qb, DOb, STATSb, DELTA, b, H, head,
                slot_ok,
                keys, keys_ok, start_m, N_Q, N_K, D, offs_d, w_slots, c, gamma, beta, group_mean, bn_mean, bn_rstd,
                bn_e, bn_f, seed, scale2, out_scale, eps, dropout_p, MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm,
                HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNKS: tl.constexpr, NORM: tl.constexpr, MASK_KIND: tl.constexpr, ROWS_PADDED: tl.constexpr,
                EVEN_D: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, BIAS_SLOT: tl.constexpr, HAS_MIX_BIAS: tl.constexpr, CDT: tl.constexpr,
                DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                NORM_PRECISION: tl.constexpr, RELOAD_KV: tl.constexpr, DW_FLAT: tl.constexpr,
                TIE_CHUNKS: tl.constexpr, Q_PRODUCT: tl.constexpr, ROUND_DS: tl.constexpr, DQ_DGAMMA: tl.constexpr):
    """One query block of the key-major sweep: dK, dV and the parameter sums of dW, dc and LayerNorm's dbeta
    and, unless DQ_DGAMMA (the dQ sweep's then: ``_dq_block``), dgamma.

    The tiles are transposed, [HP, BLOCK_N keys, BLOCK_M queries], so that dS^T and A^T are the
    products' left operands as computed (FlashAttention-2's key-major orientation).
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m[None, :] + tl.zeros([HP, 1], tl.int32)
    rows_ok = slot_ok[:, None] & (offs_m < N_Q)[None, :]
    # K Q^T and V dO^T over the whole head dim ([HP, keys, queries]); padding slots' K rows are 0,
    # so their P is 1 (the mixing bias's slot: kernels/common.py).
    # This program's head-dim chunk of the query rows (the same rows for every slot of every key group).
    q = _load_keys(Qb, head, offs_m, N_Q, offs_d, D, stride_qh, stride_qm, stride_qd, CDT, DOT_LOWP, False,
                   ROWS_PADDED, EVEN_D)
    do = _load_keys(DOb, head, offs_m, N_Q, offs_d, D, stride_doh, stride_dom, stride_dod, CDT, DOT_LOWP, False,
                    ROWS_PADDED, EVEN_D)
    # q_t, do_t: the tiles K q^T and V dO^T read transposed (from I @ q, I @ dO in registers with
    # Q_PRODUCT; dK and dV read q, dO as staged).
    q_t = q
    do_t = do
    if Q_PRODUCT:
        q_t = _product_result(q, HP, BLOCK_M, BLOCK_D)
        do_t = _product_result(do, HP, BLOCK_M, BLOCK_D)
    if D_CHUNKS == 1:  # the same tiles serve both products (one load; the transposes are layouts)
        if RELOAD_KV:
            # K and V re-read (from L1/L2) for every query block, tied to it: hoisted out of the loop
            # they hold 32 registers for its whole length, which a mask's or dropout's terms and LayerNorm's
            # from 16 slots need (the re-reads cost 13% without a norm, so only there; LayerNorm at 8 slots
            # with tensor-core operands holds them, its dgamma being the dQ sweep's: the launch rule).
            # From 16 slots the addresses are tied too (_live_zero; DeepViT-16b LayerNorm: 336 -> 296 B
            # spilled); at 8 slots nothing spills and the predicate alone issues fewer instructions.
            if HP >= 16:
                keys_live = keys + _live_zero(offs_m)
                keys_ok_live = keys_ok
            else:
                keys_live = keys
                keys_ok_live = keys_ok & ((keys * 0 + start_m) >= 0)
            k = _load_rows(Kb, head, keys_live, keys_ok_live, offs_d, D, stride_kh, stride_kn, stride_kd, CDT,
                           DOT_LOWP)
            v = _load_rows(Vb, head, keys_live, keys_ok_live, offs_d, D, stride_vh, stride_vn, stride_vd, CDT,
                           DOT_LOWP)
        zero = tl.zeros([HP, BLOCK_N, BLOCK_M], CDT)
        qk = _mm(k, tl.permute(q_t, (0, 2, 1)), zero, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        dov = _mm(v, tl.permute(do_t, (0, 2, 1)), zero, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    else:
        qk = _scores_product(k, Kb, Qb, head, keys, keys_ok, offs_m, N_Q, D, stride_kh, stride_kn, stride_kd,
                             stride_qh, stride_qm, stride_qd, HP, BLOCK_N, BLOCK_M, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                             LOWP_DTYPE, DOT_PRECISION, ROWS_PADDED, EVEN_D, TIE_CHUNKS)
        dov = _scores_product(v, Vb, DOb, head, keys, keys_ok, offs_m, N_Q, D, stride_vh, stride_vn, stride_vd,
                              stride_doh, stride_dom, stride_dod, HP, BLOCK_N, BLOCK_M, BLOCK_D, D_CHUNKS, CDT,
                              DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, ROWS_PADDED, EVEN_D, TIE_CHUNKS)
    m2, l2 = _load_row_stats(STATSb, slot_ok, rows, rows_ok, head, stride_sp, stride_sh, stride_sm, CDT)
    delta = tl.load((DELTA + b * H * N_Q) + (head[:, None] * N_Q + rows), mask=rows_ok, other=0.0)
    head3 = head[:, None, None]
    rows3 = offs_m[None, None, :]
    rows_ok3 = rows_ok[:, None, :]
    keys3 = keys[:, :, None]
    key0 = tl.min(keys, axis=1)[:, None, None]  # each slot's first key (the key groups differ)
    t2, kept = _scores(qk, m2[:, None, :], b, head3, rows3, rows_ok3, keys3, N_K, scale2, MASK, stride_mb, stride_mh,
                       stride_mm, stride_mn, CDT, MASK_KIND, True)
    p, p_tilde, drop_scale = _probs(t2, l2[:, None, :], b, H, head3, offs_m[None, :, None], key0, seed, dropout_p, CDT,
                                    HAS_DROPOUT, True)
    # Rows past N_Q: P = 0 (their m2 is +inf), dO = 0; nothing they hold reaches a gradient.
    mix = _mix(w_slots, p_tilde, HP, BLOCK_N, BLOCK_M, CDT, DOT_LOWP, tl.float16, DOT_PRECISION)
    if not BIAS_SLOT:
        mix = mix + c[:, None, None]
    # Without a mask the only entries not kept are keys past N_K: their V rows load as 0, so dN is
    # 0 there already, and their A reaches only rows of dV that are not stored. The selects stay
    # at 16 or more slots, with head-dim chunks and with LayerNorm, where their removal made the
    # compiler spill (8-24 B more; LayerNorm at 8 slots, D = 64 on sm_86: 0 -> 8 B).
    SELECT_KEPT: tl.constexpr = MASK_KIND != 0 or HP > 8 or D_CHUNKS > 1 or NORM == 1
    dn = dov * out_scale
    if SELECT_KEPT:
        dn = tl.where(kept, dn, 0.0)
    # BatchNorm's dM is not 0 where dN is (e xhat + f): rows past N_Q are outside its entries too.
    dm, xhat = _norm_backward(dn, mix, kept & rows_ok3, group_mean, gamma, bn_mean, bn_rstd, bn_e, bn_f, eps, HP,
                              BLOCK_N, BLOCK_M, CDT, NORM, NORM_PRECISION, False, DOT_LOWP, LOWP_DTYPE)
    if NORM != 0:
        a = xhat * gamma[:, None, None] + beta[:, None, None]
        if NORM == 1:
            if not DQ_DGAMMA:
                dnw_acc += tl.sum(dn * xhat, axis=2)
            dnb_acc += tl.sum(dn, axis=2)
    else:
        a = mix
    a = a * out_scale
    if SELECT_KEPT:
        a = tl.where(kept, a, 0.0)
    if HAS_MIX_BIAS and not BIAS_SLOT:
        dc_acc += tl.sum(dm, axis=2)
    # In the input's own dtype, as in the dQ sweep (fp16 keeps eager's fp16 error).
    dp = _mix(tl.trans(w_slots), dm, HP, BLOCK_N, BLOCK_M, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if HAS_DROPOUT:
        dp = dp * drop_scale
    # ROUND_DS: dP - delta rounded to the input dtype before the exchange to p's layout, as dP in the dQ sweep
    # (here after the cancellation; the kernel's ROUND_DS says where).
    if ROUND_DS and DOT_LOWP:
        ds = p * (dp - delta[:, None, :]).to(LOWP_DTYPE).to(CDT)
    else:
        ds = p.to(CDT) * (dp - delta[:, None, :])
    dk_acc = _mm(ds, q, dk_acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    dv_acc = _mm(a, do, dv_acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    # dW = sum over entries of dM P~^T, as one [HP, HP] product per key (batched over the keys, so
    # the reduction over entries splits across warps; summed over keys at the end, or at 32 slots
    # at once: DW_FLAT).
    if DW_FLAT:
        dw_acc += tl.sum(_mm(tl.permute(dm, (1, 0, 2)), tl.permute(p_tilde, (1, 2, 0)),
                             tl.zeros([BLOCK_N, HP, HP], CDT), DOT_LOWP, LOWP_DTYPE, DOT_PRECISION), axis=0)
    else:
        dw_acc = _mm(tl.permute(dm, (1, 0, 2)), tl.permute(p_tilde, (1, 2, 0)), dw_acc, DOT_LOWP, LOWP_DTYPE,
                     DOT_PRECISION)
    return dk_acc, dv_acc, dw_acc, dnw_acc, dnb_acc, dc_acc


@triton.jit
def _split_probs_keys_first(qk, b, heads, keys, rows, rows_ok, N_K, m2, l2, scale2, CDT: tl.constexpr):
    """P^T [S, BLOCK_N, BLOCK_M] (keys first) of the S heads ``heads`` from their k.q and the query rows' statistics
    (m2, l2 [S, BLOCK_M]); 0 at keys past N_K and at rows past N_Q (their m2 is +inf)."""
    t2, _ = _scores(qk, m2[:, None, :], b, heads[:, None, None], rows[:, None, :], rows_ok[:, None, :],
                    keys[:, :, None], N_K, scale2, qk, 0, 0, 0, 0, CDT, 0, True)  # MASK_KIND 0: no mask
    return tl.exp2(t2 - l2[:, None, :])


@triton.jit
def _split_query_block(Qb, DOb, STATSb, b, ha, hb, ka, kb, kat, kbt, keys_a, keys_b, start_m, N_Q, N_K, D, offs_d,
                       offs_t, scale2, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_sp,
                       stride_sh, stride_sm, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       D_TAIL: tl.constexpr, ROWS_PADDED: tl.constexpr, EVEN_D: tl.constexpr,
                       MERGED_STATS: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                       LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """What both sweeps of ``_split_dkdv_sweep`` read of one query block: q and dO of both head groups transposed
    ([S, width, BLOCK_M] and the tail's: K q^T and V dO^T read them as loaded, dK and dV permuted back, one
    staging for both) and P^T of both groups (MERGED_STATS: m2 + l2 in one fused multiply-add, as
    ``forward._split_sweep``)."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_a = offs_m[None, :] + tl.zeros([HA, 1], tl.int32)
    rows_b = offs_m[None, :] + tl.zeros([HB, 1], tl.int32)
    ok_a = rows_a < N_Q
    ok_b = rows_b < N_Q
    m2a, l2a, m2b, l2b = _split_row_stats(STATSb, ha, hb, rows_a, rows_b, ok_a, ok_b, stride_sp, stride_sh, stride_sm,
                                          MERGED_STATS, CDT)
    qa, qat = _split_tiles(Qb, ha, offs_m, N_Q, offs_d, offs_t, D, stride_qh, stride_qm, stride_qd, D_TAIL,
                           ROWS_PADDED, EVEN_D, CDT, DOT_LOWP)
    qb, qbt = _split_tiles(Qb, hb, offs_m, N_Q, offs_d, offs_t, D, stride_qh, stride_qm, stride_qd, D_TAIL,
                           ROWS_PADDED, EVEN_D, CDT, DOT_LOWP)
    pa = _split_probs_keys_first(_split_scores(ka, kat, qa, qat, HA, BLOCK_N, BLOCK_M, D_TAIL, CDT, DOT_LOWP,
                                               LOWP_DTYPE, DOT_PRECISION), b, ha, keys_a, rows_a, ok_a, N_K, m2a, l2a,
                                 scale2, CDT)
    pb = _split_probs_keys_first(_split_scores(kb, kbt, qb, qbt, HB, BLOCK_N, BLOCK_M, D_TAIL, CDT, DOT_LOWP,
                                               LOWP_DTYPE, DOT_PRECISION), b, hb, keys_b, rows_b, ok_b, N_K, m2b, l2b,
                                 scale2, CDT)
    doa, doat = _split_tiles(DOb, ha, offs_m, N_Q, offs_d, offs_t, D, stride_doh, stride_dom, stride_dod, D_TAIL,
                             ROWS_PADDED, EVEN_D, CDT, DOT_LOWP)
    dob, dobt = _split_tiles(DOb, hb, offs_m, N_Q, offs_d, offs_t, D, stride_doh, stride_dom, stride_dod, D_TAIL,
                             ROWS_PADDED, EVEN_D, CDT, DOT_LOWP)
    return qa, qb, qat, qbt, doa, dob, doat, dobt, pa, pb, rows_a, rows_b, ok_a, ok_b


@triton.jit
def _head_rows(xa, xb, HA: tl.constexpr, E: tl.constexpr):
    """The 2 HA rows xa [HA, E], xb [HA / 2, E], then HA / 2 zero rows: both head groups as one tile of slots."""
    xb2 = tl.reshape(tl.permute(tl.join(xb, tl.zeros_like(xb)), (2, 0, 1)), (HA, E))
    return tl.reshape(tl.permute(tl.join(xa, xb2), (2, 0, 1)), (2 * HA, E))


@triton.jit
def _split_dv_block(dva, dvb, dvat, dvbt, ka, kb, kat, kbt, Qb, DOb, STATSb, b, ha, hb, keys_a, keys_b, start_m, N_Q,
                    N_K, D, offs_d, offs_t, w_aa, w_ab, w_ba, w_bb, c_a, c_b, g_a, g_b, e_a, e_b, eps, scale2,
                    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_sp, stride_sh,
                    stride_sm, HP: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    D_TAIL: tl.constexpr, ROWS_PADDED: tl.constexpr, EVEN_D: tl.constexpr, NORM: tl.constexpr,
                    CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                    LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block of ``_split_dkdv_sweep``'s first sweep: A^T = tau (W P + c)^T on the stacked rows (the
    forward's mixing, keys first) and dV += A^T dO per head group. LayerNorm (NORM 1): the centered mixing
    normalized across the heads as the forward does (``forward._split_layer_norm``; g_*, e_*: tau gamma, tau beta
    at the stacked rows)."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    E: tl.constexpr = BLOCK_M * BLOCK_N
    MIX_DTYPE: tl.constexpr = tl.float16 if DOT_LOWP else CDT
    qa, qb, qat, qbt, doa, dob, doat, dobt, pa, pb, _, _, _, _ = _split_query_block(
        Qb, DOb, STATSb, b, ha, hb, ka, kb, kat, kbt, keys_a, keys_b, start_m, N_Q, N_K, D, offs_d, offs_t, scale2,
        stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP,
        BLOCK_M, BLOCK_N, D_TAIL, ROWS_PADDED, EVEN_D, DOT_LOWP, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    xa = _stack(tl.reshape(pa.to(MIX_DTYPE), (HA, E)), HA, E, Q)
    xb = _stack(tl.reshape(pb.to(MIX_DTYPE), (HB, E)), HB, E, Q)
    ya = tl.broadcast_to(c_a[:, None], (HA * Q, E // Q))
    ya = _mm(w_ab, xb, _mm(w_aa, xa, ya, DOT_LOWP, MIX_DTYPE, DOT_PRECISION), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    yb = tl.broadcast_to(c_b[:, None], (HB * Q, E // Q))
    yb = _mm(w_bb, xb, _mm(w_ba, xa, yb, DOT_LOWP, MIX_DTYPE, DOT_PRECISION), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    if NORM == 1:
        ya, yb = _split_layer_norm(ya, yb, g_a, g_b, e_a, e_b, eps, HA, HB, Q, E // Q, DOT_LOWP, True)
        if ROWS_PADDED:  # the norm of a constant map (c) may divide 0 by 0 at eps = 0, and 0 dO not cancel it
            row_ok = ((start_m + tl.arange(0, E // Q) % BLOCK_M) < N_Q)[None, :]
            ya = tl.where(row_ok, ya, 0.0)
            yb = tl.where(row_ok, yb, 0.0)
    # Rows past N_Q hold A = c, and dO is 0 there; keys past N_K, rows of dV that are not stored.
    dva, dvat = _split_values(_unstack(ya, HA, E, Q, BLOCK_N, BLOCK_M), dva, dvat, doa, doat, D_TAIL, DOT_LOWP,
                              LOWP_DTYPE, DOT_PRECISION)
    dvb, dvbt = _split_values(_unstack(yb, HB, E, Q, BLOCK_N, BLOCK_M), dvb, dvbt, dob, dobt, D_TAIL, DOT_LOWP,
                              LOWP_DTYPE, DOT_PRECISION)
    return dva, dvb, dvat, dvbt


@triton.jit
def _split_dk_block(dka, dkb, dkat, dkbt, dw_acc, dc_a, dc_b, ka, kb, kat, kbt, va, vb, vat, vbt, Qb, DOb, STATSb,
                    DELTAb, b, ha, hb, keys_a, keys_b, key0, start_m, H, N_Q, N_K, D, offs_d, offs_t, w_t, w_mix, c_mix,
                    n_dn, n_map, n_const, eps, dnw, dnb, scale2, stride_qh, stride_qm, stride_qd, stride_doh,
                    stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, D_TAIL: tl.constexpr, ROWS_PADDED: tl.constexpr, EVEN_D: tl.constexpr,
                    HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                    LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block of ``_split_dkdv_sweep``'s second sweep: dS^T = P^T (dP^T - delta) and dK += dS^T q per head
    group; and the parameter sums, dW[g, h] / tau = sum of (V dO^T)_g P_h over the entries and dc / tau = sum of
    (V dO^T)_g.

    Both groups' V dO^T and P^T are joined into one tile of HP slots (``_head_rows``) for dW, a product
    batched over 8 runs of the entries (a run a warp). dP^T = w_t (V dO^T) takes the joined tile too, with the
    one [HP, HP] weight tile w_t = (tau W)^T: the stacked rows' four W^T (x) I_Q blocks hold 36 registers a
    thread, and with them this sweep spilled 264 B (ViT-B, sm_90; 208 B this way, and 307.2 against 332.6 us
    predicted); the first sweep keeps the stacked mixing, faster there (307.2 against 317.7 us).

    With a norm (NORM 1 LayerNorm, 2 training BatchNorm): dM (``_split_norm_grad``, 0 at keys past N_K and rows
    past N_Q) where the sums and dP^T = W^T dM take V dO^T (w_t: W^T, dc_a: dc [HP] of the joined rows, dc_b
    unused); LayerNorm also sums dgamma / tau = sum of (V dO^T) xhat and dbeta / tau = sum of V dO^T per slot
    (dnw, dnb [HP])."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    E: tl.constexpr = BLOCK_M * BLOCK_N
    MIX_DTYPE: tl.constexpr = LOWP_DTYPE if DOT_LOWP else CDT
    qa, qb, qat, qbt, doa, dob, doat, dobt, pa, pb, rows_a, rows_b, ok_a, ok_b = _split_query_block(
        Qb, DOb, STATSb, b, ha, hb, ka, kb, kat, kbt, keys_a, keys_b, start_m, N_Q, N_K, D, offs_d, offs_t, scale2,
        stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP,
        BLOCK_M, BLOCK_N, D_TAIL, ROWS_PADDED, EVEN_D, DOT_LOWP, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    delta_a = tl.load(DELTAb + (ha[:, None] * N_Q + rows_a), mask=ok_a, other=0.0)
    delta_b = tl.load(DELTAb + (hb[:, None] * N_Q + rows_b), mask=ok_b, other=0.0)
    # dN / tau = V dO^T: 0 at keys past N_K (V loads 0) and rows past N_Q (dO loads 0).
    dn_a = _split_scores(va, vat, doa, doat, HA, BLOCK_N, BLOCK_M, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    dn_b = _split_scores(vb, vbt, dob, dobt, HB, BLOCK_N, BLOCK_M, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if NORM != 0:
        offs_e = tl.arange(0, E)  # entry (key, query) of the keys-first tiles
        kept = ((key0 + offs_e // BLOCK_M) < N_K) & ((start_m + offs_e % BLOCK_M) < N_Q)
        dm, p, dn_t, x, rstd = _split_norm_grad(dn_a, dn_b, pa, pb, w_mix, c_mix, n_dn, n_map, n_const, kept, H, eps,
                                                HP, E, NORM, True, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, False)
        if NORM == 1:  # (V dO^T is 0 at the entries not kept: V's and dO's rows load as 0 there, and 1/std is 0)
            dnw += tl.sum(dn_t * x * rstd[None, :], axis=1)
            dnb += tl.sum(dn_t, axis=1)
        if HAS_MIX_BIAS:
            dc_a += tl.sum(dm, axis=1)
        dn = dm.to(MIX_DTYPE)
        p = p.to(MIX_DTYPE)
    else:
        if HAS_MIX_BIAS:
            dc_a += tl.sum(tl.reshape(dn_a, (HA, E)), axis=1)
            dc_b += tl.sum(tl.reshape(dn_b, (HB, E)), axis=1)
        dn = _head_rows(tl.reshape(dn_a.to(MIX_DTYPE), (HA, E)), tl.reshape(dn_b.to(MIX_DTYPE), (HB, E)), HA, E)
        p = _head_rows(tl.reshape(pa.to(MIX_DTYPE), (HA, E)), tl.reshape(pb.to(MIX_DTYPE), (HB, E)), HA, E)
    dw_acc = _mm(tl.permute(tl.reshape(dn, (HP, 8, E // 8)), (1, 0, 2)),
                 tl.permute(tl.reshape(p, (HP, 8, E // 8)), (1, 2, 0)), dw_acc, DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    dp16 = _mm(w_t, dn, tl.zeros([HP, E], CDT), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    dp_a, dp_b = _halves(dp16, HP, E, 0)
    dp_b, _ = _halves(dp_b, HA, E, 0)
    ds_a = pa * (tl.reshape(dp_a, (HA, BLOCK_N, BLOCK_M)) - delta_a[:, None, :])
    ds_b = pb * (tl.reshape(dp_b, (HB, BLOCK_N, BLOCK_M)) - delta_b[:, None, :])
    dka, dkat = _split_keys_product(ds_a, qa, qat, dka, dkat, D_TAIL, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    dkb, dkbt = _split_keys_product(ds_b, qb, qbt, dkb, dkbt, D_TAIL, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return dka, dkb, dkat, dkbt, dw_acc, dc_a, dc_b, dnw, dnb


@triton.jit
def _split_dkdv_sweep(Qb, Kb, Vb, DOb, DKb, DVb, DELTAb, STATSb, PARTSp, w_slots, w_map, c_map, w_values, c_values,
                      a_gamma, a_beta, out_scale, n_dn, n_map, n_const, eps, dk_scale, b, key0, H, N_Q, N_K, D, scale2,
                      stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                      stride_doh, stride_dom, stride_dod, stride_dkh, stride_dkn, stride_dkd, stride_dvh, stride_dvn,
                      stride_dvd, stride_sp, stride_sh, stride_sm, HP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_TAIL: tl.constexpr, EVEN_D: tl.constexpr,
                      HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                      LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV and the parameter sums of one key block for H = 3 HP / 4 heads without padding slots (the layout of
    ``_split_dq_sweep``, keys first: tiles [S, BLOCK_N keys, BLOCK_M queries]).

    dK and dV of 16 slots at D = 64 split the head dim over programs that each recomputed the whole map (the
    two accumulators would take 128 registers). Here each has one accumulator per head group over the whole
    head dim, in a sweep of its own over the queries: first dV += A^T dO, then dK += dS^T q with the sums of
    dW and dc. No norm, LayerNorm (NORM 1) or training BatchNorm (NORM 2), no mask or dropout
    (``launch.splits_backward_heads``); the mixing bias rides in c, not in a padding slot. w_values, c_values: the
    mixing that gives A (tau folded in, and training BatchNorm's per-head affine map, ``common._slot_params``;
    LayerNorm: the centered mixing, then a_gamma = tau gamma, a_beta = tau beta after the norm); w_slots: W as
    given; w_map, c_map, n_*: what ``_split_norm_grad`` takes (``_split_dq_sweep``).
    """
    HB: tl.constexpr = HP // 4
    Q: tl.constexpr = 16 // HB
    D_MAIN: tl.constexpr = BLOCK_D // 2 if D_TAIL > 0 else BLOCK_D
    ha, hb, offs_d, offs_t, keys_a, keys_b, kok_a, kok_b = _split_layout(key0, N_K, HP, BLOCK_N, BLOCK_D, D_TAIL)
    ka, kb, kat, kbt = _split_group_rows(Kb, ha, hb, keys_a, keys_b, kok_a, kok_b, offs_d, offs_t, D, stride_kh,
                                         stride_kn, stride_kd, HP, BLOCK_N, D_MAIN, D_TAIL, CDT, DOT_LOWP)
    w_aa, w_ab, w_ba, w_bb, c_a, c_b = _split_weights(w_values, c_values, HP, Q, DOT_LOWP, CDT)
    if NORM == 1:
        g_a, g_b = _split_vector(a_gamma, HP, Q)
        e_a, e_b = _split_vector(a_beta, HP, Q)
    else:
        g_a, g_b, e_a, e_b = 0.0, 0.0, 0.0, 0.0
    dva, dvb, dvat, dvbt = _split_group_accumulators(HP, BLOCK_N, D_MAIN, D_TAIL, CDT)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dva, dvb, dvat, dvbt = _split_dv_block(
            dva, dvb, dvat, dvbt, ka, kb, kat, kbt, Qb, DOb, STATSb, b, ha, hb, keys_a, keys_b, start_m, N_Q, N_K, D,
            offs_d, offs_t, w_aa, w_ab, w_ba, w_bb, c_a, c_b, g_a, g_b, e_a, e_b, eps, scale2, stride_qh, stride_qm,
            stride_qd, stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP, Q, BLOCK_M, BLOCK_N,
            D_TAIL, False, EVEN_D, NORM, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if m_full < N_Q:
        dva, dvb, dvat, dvbt = _split_dv_block(
            dva, dvb, dvat, dvbt, ka, kb, kat, kbt, Qb, DOb, STATSb, b, ha, hb, keys_a, keys_b, m_full, N_Q, N_K, D,
            offs_d, offs_t, w_aa, w_ab, w_ba, w_bb, c_a, c_b, g_a, g_b, e_a, e_b, eps, scale2, stride_qh, stride_qm,
            stride_qd, stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP, Q, BLOCK_M, BLOCK_N,
            D_TAIL, True, EVEN_D, NORM, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    _split_store_groups(DVb, dva, dvb, dvat, dvbt, 1.0, ha, hb, keys_a, keys_b, kok_a, kok_b, offs_d, offs_t, D,
                        stride_dvh, stride_dvn, stride_dvd, D_TAIL)

    va, vb, vat, vbt = _split_group_rows(Vb, ha, hb, keys_a, keys_b, kok_a, kok_b, offs_d, offs_t, D, stride_vh,
                                         stride_vn, stride_vd, HP, BLOCK_N, D_MAIN, D_TAIL, CDT, DOT_LOWP)
    # dP^T = (tau W)^T (V dO^T) without a norm; W^T dM with one, whose dM carries tau (LayerNorm: W_c^T, the
    # centered weights, for dM without its mean over the heads: ``_split_norm_grad``).
    if NORM != 0:
        w_t = tl.trans(w_map) if NORM == 1 else tl.trans(w_slots)
        w_mix = _held_weights(w_map, HP, HP, tl.float16) if DOT_LOWP else w_map
        dc_a = tl.zeros([HP], CDT)
    else:
        w_t = tl.trans(w_slots * out_scale)
        w_mix = 0.0
        dc_a = tl.zeros([HP // 2], CDT)
    if DOT_LOWP:
        w_t = _held_weights(w_t, HP, HP, LOWP_DTYPE)
    dka, dkb, dkat, dkbt = _split_group_accumulators(HP, BLOCK_N, D_MAIN, D_TAIL, CDT)
    dw_acc = tl.zeros([8, HP, HP], CDT)
    dc_b = tl.zeros([HB], CDT)
    if NORM == 1:
        dnw = tl.zeros([HP], CDT)
        dnb = tl.zeros([HP], CDT)
    else:
        dnw, dnb = 0.0, 0.0
    for start_m in range(0, m_full, BLOCK_M):
        dka, dkb, dkat, dkbt, dw_acc, dc_a, dc_b, dnw, dnb = _split_dk_block(
            dka, dkb, dkat, dkbt, dw_acc, dc_a, dc_b, ka, kb, kat, kbt, va, vb, vat, vbt, Qb, DOb, STATSb, DELTAb, b,
            ha, hb, keys_a, keys_b, key0, start_m, H, N_Q, N_K, D, offs_d, offs_t, w_t, w_mix, c_map, n_dn, n_map,
            n_const, eps, dnw, dnb, scale2, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
            stride_sp, stride_sh, stride_sm, HP, BLOCK_M, BLOCK_N, D_TAIL, False, EVEN_D, HAS_MIX_BIAS, NORM, CDT,
            DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if m_full < N_Q:
        dka, dkb, dkat, dkbt, dw_acc, dc_a, dc_b, dnw, dnb = _split_dk_block(
            dka, dkb, dkat, dkbt, dw_acc, dc_a, dc_b, ka, kb, kat, kbt, va, vb, vat, vbt, Qb, DOb, STATSb, DELTAb, b,
            ha, hb, keys_a, keys_b, key0, m_full, H, N_Q, N_K, D, offs_d, offs_t, w_t, w_mix, c_map, n_dn, n_map,
            n_const, eps, dnw, dnb, scale2, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
            stride_sp, stride_sh, stride_sm, HP, BLOCK_M, BLOCK_N, D_TAIL, True, EVEN_D, HAS_MIX_BIAS, NORM, CDT,
            DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    _split_store_groups(DKb, dka, dkb, dkat, dkbt, dk_scale, ha, hb, keys_a, keys_b, kok_a, kok_b, offs_d, offs_t, D,
                        stride_dkh, stride_dkn, stride_dkd, D_TAIL)
    # The program's parts (``_reduce_parts``): dW_slots [HP, HP] (0 past the 12 heads), per-slot dgamma, dbeta
    # (LayerNorm's; no norm: 0; training BatchNorm's come from its backward sums) and dc; LayerNorm's dW and dc
    # centered over the heads (dM without its mean there: ``_split_norm_grad``).
    offs_s = tl.arange(0, HP)
    if NORM == 1:
        tl.store(PARTSp + HP * HP + offs_s, dnw * out_scale)
        tl.store(PARTSp + HP * HP + HP + offs_s, dnb * out_scale)
    else:
        tl.store(PARTSp + HP * HP + offs_s, tl.zeros([HP], CDT))
        tl.store(PARTSp + HP * HP + HP + offs_s, tl.zeros([HP], CDT))
    if NORM != 0:
        dw = tl.sum(dw_acc, axis=0)
        if NORM == 1:
            dw = _less_head_means(dw, offs_s < H, 0.0, H, False)
            dc_a = _less_head_means(dc_a, offs_s < H, 0.0, H, False)
        tl.store(PARTSp + offs_s[:, None] * HP + offs_s[None, :], dw)
        tl.store(PARTSp + HP * HP + 2 * HP + offs_s, dc_a)
    else:
        tl.store(PARTSp + offs_s[:, None] * HP + offs_s[None, :], tl.sum(dw_acc, axis=0) * out_scale)
        tl.store(PARTSp + HP * HP + 2 * HP + ha, dc_a * out_scale)
        tl.store(PARTSp + HP * HP + 2 * HP + hb, dc_b * out_scale)


@triton.jit
def _re_attention_bwd_dkdv_kernel(
    Q, K, V, W, C, NW, NB, BN, MASK, SEED, STATS, DO, DELTA, DK, DV, PARTS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_sp, stride_sb, stride_sh, stride_sm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_wg, stride_wh, stride_c, stride_nw, stride_nb,
    H, N_Q, N_K, D, NUM_PROGRAMS_N,
    scale2, out_scale, eps, dropout_p,
    HP: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, EVEN_D: tl.constexpr, BIAS_SLOT: tl.constexpr,
    HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr,
    RELOAD_KV: tl.constexpr, TIE_CHUNKS: tl.constexpr, ROUND_DP: tl.constexpr, DQ_DGAMMA: tl.constexpr,
    SPLIT_HEADS: tl.constexpr,
    D_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_PROGRAMS_N).to(tl.int64)
    if SPLIT_HEADS:
        w_slots, c, gamma, beta, w_map, c_map, n_dn, n_map, n_const = _split_norm_params(
            W, C, NW, NB, BN, H, out_scale, stride_wg, stride_wh, stride_c, stride_nw, stride_nb, HP, G, CDT,
            HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS)
        a_gamma, a_beta = 0.0, 0.0
        if NORM == 2:
            # A's mixing: alpha W and alpha (c - mean) + tau beta with alpha = tau gamma / std (n_dn), the forward's
            # fold (``common._slot_params``), from the parameters as loaded.
            offs_s = tl.arange(0, HP)
            bn_mean = tl.load(BN + offs_s % H, mask=offs_s < H, other=0.0).to(CDT)
            w_values = w_slots * n_dn[:, None]
            c_values = n_dn * (c - bn_mean) + out_scale * beta
        elif NORM == 1:  # the centered mixing gives the map the norm takes, both ways
            w_values, c_values = w_map, c_map
            a_gamma, a_beta = n_dn, beta * out_scale
        else:
            w_values, c_values = w_slots * out_scale, c * out_scale
        # dK = scale dS^T Q with scale = scale2 / log2(e), taken here (see the dQ kernel).
        _split_dkdv_sweep(Q + b * stride_qb, K + b * stride_kb, V + b * stride_vb, DO + b * stride_dob,
                          DK + b * stride_dkb, DV + b * stride_dvb, DELTA + b * H * N_Q, STATS + b * stride_sb,
                          PARTS + pid.to(tl.int64) * (HP * HP + 3 * HP), w_slots, w_map, c_map, w_values, c_values,
                          a_gamma, a_beta, out_scale, n_dn, n_map, n_const, eps, scale2 * 0.6931471805599453, b,
                          (pid % NUM_PROGRAMS_N) * BLOCK_N, H, N_Q, N_K, D, scale2, stride_qh, stride_qm, stride_qd,
                          stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_doh, stride_dom,
                          stride_dod, stride_dkh, stride_dkn, stride_dkd, stride_dvh, stride_dvn, stride_dvd, stride_sp,
                          stride_sh, stride_sm, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_TAIL, EVEN_D, HAS_MIX_BIAS, NORM, CDT,
                          DOT_LOWP, Q.dtype.element_ty, DOT_PRECISION)
        return
    # Slots over keys: slot s is head s % H of key group s // H (kernels/common.py).
    head, slot_ok, keys, keys_ok = _slot_rows((pid % NUM_PROGRAMS_N) * (G * BLOCK_N), H, N_K, HP, G, BLOCK_N)
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_d = tl.program_id(1)  # head-dim chunk of dK, dV this program writes
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    # KV_HELD: k and v held in registers for the whole sweep (``_product_result``), not re-read
    # from shared memory on every query block (RELOAD_KV re-reads them from memory instead); not at
    # 32 slots, nor at 16 with training BatchNorm (which spills there already).
    # Q_PRODUCT: the transposes of each query block's q and dO for K q^T and V dO^T taken from
    # I @ q, I @ dO in registers, so q and dO are staged in shared memory once, not twice (at 8
    # slots: at 16 the compiler spilled). With training BatchNorm its launch at D = 64 spills 8 B
    # per thread (none without it) for a DeiT-S dK/dV kernel predicted at 245 us against 339.
    # LayerNorm holds K and V at 8 slots (not RELOAD_KV there; its dgamma is the dQ sweep's, DQ_DGAMMA, which
    # freed the registers) but not the q transposes (with them its launch spilled 24 B: DeiT-S, sm_90).
    KV_HELD: tl.constexpr = DOT_LOWP and D_CHUNKS == 1 and not RELOAD_KV and (HP == 8 or (HP == 16 and NORM != 2))
    # dS's factor dP - delta exchanged in the input dtype where the launch rule rounds dP (``_rounds_dp``): half
    # the bytes through shared memory. Without a norm, and with LayerNorm at 8 slots (DeiT-S: 308.0-1426.3 ->
    # 296.2-1431.9 us predicted); elsewhere its launches spilled more (training BatchNorm, 8 slots, D = 64, sm_90:
    # 8 -> 24 B; LayerNorm at 14 heads, D = 32, sm_86: 16 -> 40 B).
    ROUND_DS: tl.constexpr = ROUND_DP and (NORM == 0 or (NORM == 1 and HP == 8))
    Q_PRODUCT: tl.constexpr = DOT_LOWP and D_CHUNKS == 1 and not RELOAD_KV and HP == 8 and NORM != 1
    k = _load_rows(Kb, head, keys, keys_ok, offs_d, D, stride_kh, stride_kn, stride_kd, CDT, DOT_LOWP)
    v = _load_rows(Vb, head, keys, keys_ok, offs_d, D, stride_vh, stride_vn, stride_vd, CDT, DOT_LOWP)
    if KV_HELD:
        k = _product_result(k, HP, BLOCK_N, BLOCK_D)
        v = _product_result(v, HP, BLOCK_N, BLOCK_D)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    w_slots, c, gamma, beta = _slot_params(W, C, NW, NB, BN, head, slot_ok, H, out_scale, stride_wg, stride_wh,
                                           stride_c, stride_nw, stride_nb, HP, G, CDT, HAS_MIX_BIAS, NORM,
                                           HAS_NORM_WEIGHT, HAS_NORM_BIAS, BIAS_SLOT, False)
    if NORM == 1 and HP <= CENTERED_SLOTS:  # centered weights, as in the dQ kernel
        w_slots, c = _center_across_heads(w_slots, c, slot_ok, H, HP, G, CDT, HAS_MIX_BIAS, BIAS_SLOT)
    group_mean = _group_mean(H, slot_ok, HP, CDT)
    bn_mean, bn_rstd, bn_e, bn_f = _bn_rows(BN, head, slot_ok, H, CDT, NORM, False)
    Qb = Q + b * stride_qb
    DOb = DO + b * stride_dob
    STATSb = STATS + b * stride_sb

    dk_acc = tl.zeros([HP, BLOCK_N, BLOCK_D], CDT)
    dv_acc = tl.zeros([HP, BLOCK_N, BLOCK_D], CDT)
    # At 32 slots the per-key [HP, HP] products of dW would hold 64 registers for the whole sweep:
    # reduced over the key block every query block instead (a cross-warp sum each time).
    DW_FLAT: tl.constexpr = HP >= 32
    if DW_FLAT:
        dw_acc = tl.zeros([HP, HP], CDT)
    else:
        dw_acc = tl.zeros([BLOCK_N, HP, HP], CDT)
    dnw_acc = tl.zeros([HP, BLOCK_N], CDT)
    dnb_acc = tl.zeros([HP, BLOCK_N], CDT)
    dc_acc = tl.zeros([HP, BLOCK_N], CDT)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk_acc, dv_acc, dw_acc, dnw_acc, dnb_acc, dc_acc = _dkdv_block(
            dk_acc, dv_acc, dw_acc, dnw_acc, dnb_acc, dc_acc, k, v, Kb, Vb, Qb, DOb, STATSb, DELTA, b, H, head,
            slot_ok, keys, keys_ok, start_m, N_Q, N_K, D, offs_d, w_slots, c, gamma, beta, group_mean, bn_mean, bn_rstd,
            bn_e, bn_f, seed, scale2, out_scale, eps, dropout_p, MASK, stride_mb, stride_mh, stride_mm, stride_mn,
            stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP, BLOCK_M, BLOCK_N, BLOCK_D,
            D_CHUNKS, NORM, MASK_KIND, False, EVEN_D, HAS_DROPOUT, BIAS_SLOT, HAS_MIX_BIAS, CDT,
            DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, NORM_PRECISION, RELOAD_KV, DW_FLAT, TIE_CHUNKS, Q_PRODUCT, ROUND_DS,
            DQ_DGAMMA)
    if m_full < N_Q:
        dk_acc, dv_acc, dw_acc, dnw_acc, dnb_acc, dc_acc = _dkdv_block(
            dk_acc, dv_acc, dw_acc, dnw_acc, dnb_acc, dc_acc, k, v, Kb, Vb, Qb, DOb, STATSb, DELTA, b, H, head,
            slot_ok, keys, keys_ok, m_full, N_Q, N_K, D, offs_d, w_slots, c, gamma, beta, group_mean, bn_mean, bn_rstd,
            bn_e, bn_f, seed, scale2, out_scale, eps, dropout_p, MASK, stride_mb, stride_mh, stride_mm, stride_mn,
            stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            stride_doh, stride_dom, stride_dod, stride_sp, stride_sh, stride_sm, HP, BLOCK_M, BLOCK_N, BLOCK_D,
            D_CHUNKS, NORM, MASK_KIND, True, EVEN_D, HAS_DROPOUT, BIAS_SLOT, HAS_MIX_BIAS, CDT,
            DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, NORM_PRECISION, RELOAD_KV, DW_FLAT, TIE_CHUNKS, Q_PRODUCT, ROUND_DS,
            DQ_DGAMMA)

    # dS is in natural units: dK = scale dS^T Q, scale = scale2 / log2(e).
    dk_acc = dk_acc * (scale2 * 0.6931471805599453)
    tile_ok = keys_ok[:, :, None] & (offs_d < D)[None, None, :]
    tl.store((DK + b * stride_dkb) + (head[:, None, None] * stride_dkh + keys[:, :, None] * stride_dkn
                                      + offs_d[None, None, :] * stride_dkd),
             dk_acc.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store((DV + b * stride_dvb) + (head[:, None, None] * stride_dvh + keys[:, :, None] * stride_dvn
                                      + offs_d[None, None, :] * stride_dvd),
             dv_acc.to(DV.dtype.element_ty), mask=tile_ok)
    # Per-program partial sums: dW_slots [HP, HP], then per slot dgamma, dbeta (LayerNorm's; dgamma 0 with
    # DQ_DGAMMA) and dc. Every head-dim chunk summed the same entries: the first one stores them. LayerNorm's
    # dM lacks its mean over each group's heads up to CENTERED_SLOTS slots (``_norm_backward``): dW's and dc's
    # rows are centered over them here, (I - J) dW, as the true dM's sums are.
    if pid_d == 0:
        offs_s = tl.arange(0, HP)
        parts = PARTS + pid.to(tl.int64) * (HP * HP + 3 * HP)
        if DW_FLAT:
            dw = dw_acc
        else:
            dw = tl.sum(dw_acc, axis=0)
        if NORM == 1 and HP <= CENTERED_SLOTS:
            dw = _less_head_means(dw, slot_ok, group_mean, H, True)
        tl.store(parts + offs_s[:, None] * HP + offs_s[None, :], dw)
        tl.store(parts + HP * HP + offs_s, tl.sum(tl.where(keys_ok, dnw_acc, 0.0), axis=1))
        tl.store(parts + HP * HP + HP + offs_s, tl.sum(tl.where(keys_ok, dnb_acc, 0.0), axis=1))
        # (dc formed after the stores above: formed before them, ptxas spilled 2x more at 32 slots with a mask,
        # whose code is otherwise unchanged)
        dc = tl.sum(tl.where(keys_ok, dc_acc, 0.0), axis=1)
        if NORM == 1 and HP <= CENTERED_SLOTS:
            dc = _less_head_means(dc, slot_ok, group_mean, H, True)
        tl.store(parts + HP * HP + 2 * HP + offs_s, dc)


def _rounds_dp(config: TileConfig, variant: str, d: int) -> bool:
    """Whether the sweeps round dP to the input dtype before its layout exchange (tensor-core products).

    d: the head dim the kernels see. Where a program's tiles leave the registers for it: at most 16 slots
    with HP * d <= 512 (DeiT-S, DeepViT-16b), without a mask or dropout. Beyond, the launch scan found
    launches spilling more with it (sm_90, 8 slots, D = 128: 64 -> 72 B; 16 slots, D = 128: 168 -> 192 B;
    sm_86 with a mask and dropout, 16 slots, D = 16: 32 -> 40 B).
    """
    return config.HP <= 16 and config.HP * d <= 512 and variant != "heavy"


def _sums_dgamma_in_dq(variant: str) -> bool:
    """Whether LayerNorm's dgamma = sum dN xhat is the usual dQ sweep's (its dK/dV sweep leaving it out): without
    a mask or dropout (variant "layer"; the split sweeps: their dK/dV kernel's either way).

    The dQ sweep keeps the sums in its products' layout (``_keeps_delta_3d``'s reason); in the dK/dV sweep their
    [HP, BLOCK_N] accumulator took a sum across warps every query block, and the registers K and V need to be
    held (DeiT-S: dK/dV 580.9 -> 458.9 us predicted, dQ 300.5 -> 301.4; the two kernels 1140 -> 1094 us for 16
    heads at D = 64, 2324 -> 2289 for 32 heads at D = 32, B = 64). With a mask or dropout K and V are re-read
    anyway, and the launch scan found the dQ sweep spilling more with it where the dK/dV sweep spilled less, or
    both more (sm_90, 32 heads, D = 64: dK/dV 3968 -> 7504 B).
    """
    return variant == "layer"


def _keeps_delta_3d(config: TileConfig, norm: str, d: int) -> bool:
    """Whether the dQ sweep keeps delta's partial sums as [HP, BLOCK_M, 1], in its products' layout.

    Each key block's sum then stays within warps; as [HP, BLOCK_M] the compiler sends p dP to the
    mixing's layout first and sums across warps, both through shared memory (DeiT-S dQ kernel: 184 ->
    148 us predicted). At 8 slots, and not with training BatchNorm at D > 64 (d: the head dim the kernels
    see): the launch scan found spills growing there (8 slots, D = 128: 40 -> 88 B; 16 slots, D = 32:
    0 -> 8 B).
    """
    return config.HP == 8 and not (norm == "batch" and d > 64)


def _launch_args(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, dropout_p, seed, norm):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, q, Nk)
    seed, has_dropout = dropout_arguments(dropout_p, seed, q.device)
    dummy = mix_weight
    c = mix_bias if mix_bias is not None else dummy
    nw = norm_weight if norm_weight is not None else dummy
    nb = norm_bias if norm_bias is not None else dummy
    affine_norm = norm != "none"
    flags = dict(HAS_MIX_BIAS=mix_bias is not None, NORM=_NORMS[norm],
                 HAS_NORM_WEIGHT=affine_norm and norm_weight is not None,
                 HAS_NORM_BIAS=affine_norm and norm_bias is not None, MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout)
    return mask, mask_strides, seed if has_dropout else dummy, c, nw, nb, flags


def _head_dim_meta(config: TileConfig, d: int, split: bool) -> dict:
    """The head-dim constexprs of a backward launch at ``config`` (d: the head dim the kernels see). split: the
    rule's ``splits_backward_heads``; the launch runs the split sweeps where the config's tiles are the
    split's too (one row group of 16 slots over the whole head dim: a given config may not be), and they take
    a head dim of two powers of two as a tile and a tail (``launch.head_dim_tail``)."""
    split = split and config.HP == 16 and config.G == 1 and config.BLOCK_D >= padded_head_dim(d)
    tail = head_dim_tail(d) if split else 0
    return dict(D_CHUNKS=triton.cdiv(d, config.BLOCK_D), EVEN_D=d % config.BLOCK_D == 0 or tail > 0,
                SPLIT_HEADS=split, D_TAIL=tail)


def _launch_dq(grad_out, q, k, v, mix_weight, mix_bias, softmax_stats, bn, dq, delta, *, scale, out_scale, norm,
               norm_weight, norm_bias, eps, attn_mask, dropout_p, seed, config, lowp_dot, sums_only):
    """Launch the dQ kernel; returns (its config, its per-program, per-slot sums [programs, 2, HP] or None).

    The sums: with ``sums_only`` BatchNorm's (sum dN xhat, sum dN); otherwise, with LayerNorm where the dQ sweep
    sums its dgamma (``_sums_dgamma_in_dq``, not split, and the call has a norm weight), the first row alone, sum
    dN xhat."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    device = q.device
    interpret = interpreting()
    split = not sums_only and splits_backward_heads(H, D, norm=norm, masked=attn_mask is not None,
                                                    has_dropout=dropout_p > 0, element_size=q.element_size(),
                                                    kernel="dq", interpret=interpret)
    if config is None:
        config = backward_config(Nq, Nk, D, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                 element_size=q.element_size(), kernel="dq",
                                 variant=variant_of(norm, attn_mask is not None, dropout_p > 0), split_heads=split)
    config.check_heads(H, "re_attention_backward (dQ)")
    head_dim = _head_dim_meta(config, D, split)
    options = launch_options(q, lowp_dot, False, interpret)
    mask, mask_strides, seed_arg, c, nw, nb, flags = _launch_args(q, k, v, mix_weight, mix_bias, norm_weight,
                                                                  norm_bias, attn_mask, dropout_p, seed, norm)
    variant = variant_of(norm, attn_mask is not None, dropout_p > 0)
    num_m = config.programs_per_batch(Nq)
    d_chunks = 1 if sums_only or head_dim["SPLIT_HEADS"] else head_dim["D_CHUNKS"]
    dq_dgamma = _sums_dgamma_in_dq(variant) and not head_dim["SPLIT_HEADS"] and norm_weight is not None
    sums = None
    if sums_only or dq_dgamma:
        sums = torch.empty((num_m * B, 2, config.HP), dtype=accumulator_dtype(q), device=device)
    run_on_device(
        _re_attention_bwd_dq_kernel, (num_m * B, d_chunks), device,
        q, k, v, mix_weight, c, nw, nb, bn, mask, seed_arg, softmax_stats, grad_out, dq, delta,
        delta if sums is None else sums,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *softmax_stats.stride(),
        *mask_strides, mix_weight.stride(0), mix_weight.stride(1), c.stride(0), nw.stride(0), nb.stride(0),
        H, Nq, Nk, D, num_m, float(scale) * 1.4426950408889634, float(out_scale), float(eps), float(dropout_p),
        BIAS_SLOT=config.bias_slot(H, flags["HAS_DROPOUT"], mix_bias is not None), SUMS_ONLY=sums_only,
        RELOAD_Q=variant == "heavy", TIE_CHUNKS=variant == "heavy" or config.HP >= 32,
        ROUND_DP=_rounds_dp(config, variant, D), DELTA_3D=_keeps_delta_3d(config, norm, D), DQ_DGAMMA=dq_dgamma,
        **head_dim, **flags, **options, **config.meta(stats_sweep=False),
    )
    return config, sums


def re_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix_weight: torch.Tensor,
    mix_bias: Optional[torch.Tensor],
    softmax_stats: torch.Tensor,
    *,
    scale: float,
    out_scale: float = 1.0,
    norm: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    bn_coefficients: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    dq_config: Optional[TileConfig] = None,
    dkdv_config: Optional[TileConfig] = None,
    lowp_dot: Optional[bool] = None,
):
    """Gradients of the fused forward (same arguments, plus ``grad_out`` [B, H, Nq, D] and its ``softmax_stats``).

    norm="batch" (training BatchNorm) also needs ``bn_coefficients`` [4, H]: the forward's mean and
    1/sqrt(var + eps), then e and f of dM = a dN + e xhat + f (a = gamma / std, e = -a mean(dN xhat),
    f = -a mean(dN), means over the entries the statistics ran over). Those two means come from
    :func:`re_attention_bn_grad_sums`, run first, and summed over every process when the batch
    is spread across processes: the caller (``reattn._batchnorm.bn_backward_coefficients``) divides
    them by the count.
    The norm's own gradients are those sums, so d_norm_weight, d_norm_bias come back as None then.
    Returns ``(dq, dk, dv [like q/k/v], d_mix_weight [H, H], d_mix_bias [H] or None, d_norm_weight [H]
    or None, d_norm_bias [H] or None)``; the parameter gradients are float32 (float64 for float64
    inputs). Arguments are assumed validated by the forward's caller. dq_config, dkdv_config:
    override the launch rules (``launch.backward_config``).
    """
    if norm not in _NORMS:
        raise ValueError(f"re_attention_backward: norm must be one of {sorted(_NORMS)}, got {norm!r}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    device = q.device
    acc = accumulator_dtype(q)
    if norm == "batch":
        if bn_coefficients is None or bn_coefficients.shape != (4, H):
            raise ValueError("re_attention_backward: norm='batch' needs bn_coefficients [4, H] (mean, 1/std, e, f), "
                             f"got {None if bn_coefficients is None else tuple(bn_coefficients.shape)}")
        bn = bn_coefficients.to(acc).contiguous()
    else:
        bn = mix_weight  # unread placeholder
    if B == 0 or Nq == 0 or Nk == 0 or D == 0:
        zeros_h = torch.zeros((H,), dtype=acc, device=device)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros((H, H), dtype=acc, device=device),
                zeros_h if mix_bias is not None else None,
                zeros_h.clone() if norm == "layer" and norm_weight is not None else None,
                zeros_h.clone() if norm == "layer" and norm_bias is not None else None)
    (grad_out, q, k, v), Dp = aligned_operands(grad_out.contiguous(), q, k, v)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty((B, H, Nq), dtype=acc, device=device)
    dq_cfg, norm_sums = _launch_dq(grad_out, q, k, v, mix_weight, mix_bias, softmax_stats, bn, dq, delta,
                                   scale=scale, out_scale=out_scale, norm=norm, norm_weight=norm_weight,
                                   norm_bias=norm_bias, eps=eps, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                                   config=dq_config, lowp_dot=lowp_dot, sums_only=False)

    interpret = interpreting()
    config = dkdv_config
    split = splits_backward_heads(H, Dp, norm=norm, masked=attn_mask is not None, has_dropout=dropout_p > 0,
                                  element_size=q.element_size(), kernel="dkdv", interpret=interpret)
    if config is None:
        config = backward_config(Nq, Nk, Dp, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                 element_size=q.element_size(), kernel="dkdv",
                                 variant=variant_of(norm, attn_mask is not None, dropout_p > 0), split_heads=split)
    config.check_heads(H, "re_attention_backward (dK/dV)")
    head_dim = _head_dim_meta(config, Dp, split)
    split = head_dim["SPLIT_HEADS"]
    options = launch_options(q, lowp_dot, False, interpret)
    mask, mask_strides, seed_arg, c, nw, nb, flags = _launch_args(q, k, v, mix_weight, mix_bias, norm_weight,
                                                                  norm_bias, attn_mask, dropout_p, seed, norm)
    num_n = config.key_programs_per_batch(Nk)
    hp = config.HP
    variant = variant_of(norm, attn_mask is not None, dropout_p > 0)
    parts = torch.empty((num_n * B, hp * hp + 3 * hp), dtype=acc, device=device)
    run_on_device(
        _re_attention_bwd_dkdv_kernel, (num_n * B, 1 if split else head_dim["D_CHUNKS"]), device,
        q, k, v, mix_weight, c, nw, nb, bn, mask, seed_arg, softmax_stats, grad_out, delta, dk, dv, parts,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *softmax_stats.stride(), *mask_strides, mix_weight.stride(0), mix_weight.stride(1), c.stride(0),
        nw.stride(0), nb.stride(0),
        H, Nq, Nk, Dp, num_n, float(scale) * 1.4426950408889634, float(out_scale), float(eps), float(dropout_p),
        BIAS_SLOT=not split and config.bias_slot(H, flags["HAS_DROPOUT"], mix_bias is not None),
        RELOAD_KV=variant == "heavy" or (variant == "layer" and not (config.HP == 8 and options["DOT_LOWP"])),
        TIE_CHUNKS=variant != "plain" or config.HP >= 32,
        ROUND_DP=_rounds_dp(config, variant, Dp), DQ_DGAMMA=_sums_dgamma_in_dq(variant), **head_dim, **flags,
        **options,
        **config.meta(stats_sweep=False),
    )
    bias_slot = not split and config.bias_slot(H, flags["HAS_DROPOUT"], mix_bias is not None)
    d_gamma = norm == "layer" and norm_weight is not None
    if d_gamma and norm_sums is None and not split and _sums_dgamma_in_dq(variant):
        # Given configs that split the dQ sweep but not the dK/dV one: neither summed LayerNorm's dgamma.
        dq_cfg, norm_sums = _launch_dq(grad_out, q, k, v, mix_weight, mix_bias, softmax_stats, bn, grad_out, grad_out,
                                       scale=scale, out_scale=out_scale, norm=norm, norm_weight=norm_weight,
                                       norm_bias=norm_bias, eps=eps, attn_mask=attn_mask, dropout_p=dropout_p,
                                       seed=seed, config=None, lowp_dot=lowp_dot, sums_only=True)
    # Only the gradients the call returns (each a launch); LayerNorm's dgamma from the dQ sweep where it summed it
    # (otherwise the dK/dV sweep's, in its parts).
    dw, dc, dnw, dnb = _reduce_parts(parts, H, config, bias_slot, dc=mix_bias is not None,
                                     dgamma=d_gamma and norm_sums is None,
                                     dbeta=norm == "layer" and norm_bias is not None)
    if d_gamma and norm_sums is not None:
        dnw = slot_sums_to_heads(norm_sums[:, 0], H, dq_cfg).sum(dim=0, dtype=torch.float64).to(acc)
    if Dp != D:
        dq, dk, dv = dq[..., :D].contiguous(), dk[..., :D].contiguous(), dv[..., :D].contiguous()
    return dq, dk, dv, dw, dc, dnw, dnb


def _reduce_parts(parts: torch.Tensor, heads: int, config: TileConfig, bias_slot: bool, *, dc: bool = True,
                  dgamma: bool = True, dbeta: bool = True):
    """The dK/dV programs' partial sums [programs, HP * HP + 3 HP] -> (dW [H, H], dc, dgamma, dbeta [H]);
    each of the last three None where its flag is False (a gradient the call does not return, or takes from
    elsewhere: no launch for it).

    Added up in float64. dW_slots is block diagonal over the G key groups of a program: each block
    is one group's sum of dM P~^T in head coordinates, and the blocks add up. With the mixing bias
    in a padding slot (whose P~ is 1 wherever kept), that slot's column of each block is dc.
    Each gradient is a strided view of the sum, rounded to the accumulation dtype by one copy (its
    G groups added first where G > 1): with one group, the sum and one conversion per gradient are all
    the launches (each a launch gap on a GPU, at [H, H] and [H] sizes).
    """
    hp, g, h = config.HP, config.G, heads
    total = parts.sum(dim=0, dtype=torch.float64)
    # Group r's block of dW_slots starts at element r * h * (hp + 1), its entry in the bias slot's
    # column at r * h * hp + g * h; after dW_slots, the per-slot sums of dgamma, dbeta and dc.
    sums_dw = total.as_strided((g, h, h), (h * (hp + 1), hp, 1))
    sums_dnw, sums_dnb, sums_dc = slot_groups(total[hp * hp:].view(3, hp), h, config)
    if bias_slot:
        sums_dc = total.as_strided((g, h), (h * hp, hp), g * h)
    acc = parts.dtype
    # copy=True: fresh tensors also in float64 (an op's outputs may not alias one another).
    return tuple((x[0] if g == 1 else x.sum(dim=0)).to(acc, copy=True) if wanted else None
                 for x, wanted in ((sums_dw, True), (sums_dc, dc), (sums_dnw, dgamma), (sums_dnb, dbeta)))


def re_attention_bn_grad_sums(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix_weight: torch.Tensor,
    mix_bias: Optional[torch.Tensor],
    softmax_stats: torch.Tensor,
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
    config: Optional[TileConfig] = None,
    lowp_dot: Optional[bool] = None,
) -> torch.Tensor:
    """Training BatchNorm's backward sums over this call's entries: [2, H] (sum dN xhat, sum dN).

    dN = out_scale * dO V^T on the unmasked entries, xhat the entries normalized with
    ``batch_stats`` [2, H] (mean, 1/std, the forward's). These are d_norm_weight and d_norm_bias
    of the call, and they add up over processes: summed over every process they give the e, f
    rows of :func:`re_attention_backward`'s bn_coefficients. float32 (float64 for float64 inputs).
    """
    B, H, Nq, _ = q.shape
    acc = accumulator_dtype(q)
    if batch_stats.shape != (2, H):
        raise ValueError("re_attention_bn_grad_sums: batch_stats must be [2, H] (mean, 1/std), got "
                         f"{tuple(batch_stats.shape)}")
    if B == 0 or Nq == 0:
        return torch.zeros((2, H), dtype=acc, device=q.device)
    bn = torch.cat([batch_stats.to(acc), batch_stats.new_zeros((2, H), dtype=acc)]).contiguous()
    (grad_out, q, k, v), Dp = aligned_operands(grad_out.contiguous(), q, k, v)
    interpret = interpreting()
    if config is None:
        config = backward_config(Nq, k.shape[2], Dp, H, interpret=interpret,
                                 shared_limit=device_shared_limit(q.device), element_size=q.element_size(),
                                 kernel="dq", variant=variant_of("batch", attn_mask is not None, dropout_p > 0))
    # (dq and delta: unread placeholders with SUMS_ONLY)
    config, sums = _launch_dq(grad_out, q, k, v, mix_weight, mix_bias, softmax_stats, bn, grad_out, grad_out,
                              scale=scale, out_scale=out_scale, norm="batch", norm_weight=norm_weight,
                              norm_bias=norm_bias, eps=eps, attn_mask=attn_mask, dropout_p=dropout_p, seed=seed,
                              config=config, lowp_dot=lowp_dot, sums_only=True)
    return slot_sums_to_heads(sums, H, config).sum(dim=0)
