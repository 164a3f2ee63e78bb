"""Fused Re-attention forward in Triton: never writes a [B, H, Nq, Nk] tensor.

    S_h = scale * Q_h K_h^T (+ mask),   P_h = softmax_j(S_h)
    P~_h = P_h * Z_h / (1 - p)    (dropout, Philox keyed by position: see kernels/common.py)
    M_g = sum_h W[g, h] P~_h + c_g,  A = out_scale * Norm(M) (0 where masked),  O_g = A_g V_g

One program handles one batch element, G groups of BLOCK_M query rows and all heads (the slots
of kernels/common.py), since the head mixing needs every head of an entry. Two sweeps over the
keys in one launch (docs/math.md, "Forward"):

  sweep 1: S = Q K^T as one batched product over the slots, online row max and sum -> the
           softmax statistics (m2, l2) per row, stored for the backward; skipped when they are
           given: the Gram-sum statistics sweep of training BatchNorm (kernels/gram.py) or
           ``_softmax_stats_kernel`` wrote them. That kernel is this sweep on its own, per head
           (2-D products over 256 query rows, each head's keys read once per row block), launched
           first where the launch rule says so (``launch.splits_softmax_stats``: no mask);
  sweep 2: recompute S, P = 2^((S2 - m2) - l2), dropout, mix the heads on the tensor cores
           (W_slots [HP, HP] @ P~ [HP, BLOCK_M * BLOCK_N]), normalize (LayerNorm across heads;
           out_scale and any per-head affine norm are folded into W_slots), zero masked entries
           and accumulate A @ V into an fp32 accumulator (fp64 for fp64 inputs). With MOMENTS
           (training BatchNorm in one sweep, norm "none"): also the per-slot sums of the map and
           of its square over the program's kept entries.

With fp16/bf16 inputs on a GPU (DOT_LOWP) the products run on the tensor cores: Q K^T and A V in
the input dtype, the head mixing in fp16 (probabilities and weights of order 1: fp16 keeps three
more bits than bf16), fp32 accumulation; everything else is fp32 (fp64 for fp64 inputs).

Nothing here imports ``reattn``: torch and triton only.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (K8_DOTS, LOG2E, MASK_ADDITIVE, MASK_BOOL, MASK_NONE, NORM_BATCH, NORM_LAYER, NORM_NONE,
                     _center_across_heads, _group_mean, _layer_norm, _load_keys, _load_row_stats, _load_rows, _mix,
                     _mix_halves, _mm, _probs, _product_result, _row_stats, _scores, _scores_product, _slot_params,
                     _slot_rows, _store_row_stats)
from .launch import (MAX_HEADS, TileConfig, device_shared_limit, forward_config, head_dim_tail, interpreting,
                     run_on_device, softmax_stats_config, splits_softmax_stats, variant_of)

_NORMS = {"none": NORM_NONE, "layer": NORM_LAYER, "batch": NORM_BATCH}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _moment_sums(x, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr):
    """Sums of x [HP, BLOCK_M, BLOCK_N] towards per-slot totals: per row ([HP, BLOCK_M]), or with PAIRS over
    pairs of rows i and i + BLOCK_M / 2 apart ([HP, 2, BLOCK_N]).

    Only the totals are stored (after the sweep), so a key block need not come down to a number per
    row: at 8 slots the mixed map's layout spreads a 32-key block over the lanes and 4 warps, so every
    per-row sum takes shuffles, a barrier and shared memory, while every row but the lowest bit sits
    in a thread's registers there, and the sum over row pairs stays within each thread. At 16 and 32
    slots, at head-dim tiles of 128 and with head-dim chunks (sm_86 at D = 128 with a mask), the
    partials made launches spill that did not (launch scan), so those keep the per-row sums.
    """
    if PAIRS:
        return tl.sum(tl.reshape(x, (HP, BLOCK_M // 2, 2, BLOCK_N)), axis=1)
    else:
        return tl.sum(x, axis=2)


@triton.jit
def _forward_block(acc, s1, s2, q, Qb, Kb, Vb, b, H, head, rows, rows_ok, start_n, N_K, D, offs_d, m2, l2,
                   w_slots, u_on, c, gamma, beta, group_mean, seed, scale2, eps, dropout_p, MASK, stride_mb,
                   stride_mh, stride_mm, stride_mn, stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd,
                   stride_vh, stride_vn, stride_vd, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, NORM: tl.constexpr, MASK_KIND: tl.constexpr,
                   KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_SLOT: tl.constexpr,
                   MOMENTS: tl.constexpr, MOMENT_PAIRS: tl.constexpr, U_ROW: tl.constexpr, CDT: tl.constexpr,
                   DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr):
    """One key block of the second sweep: exact P, dropout, mix, normalize, O += A V (and the moments). With
    U_ROW the rows from BLOCK_M / 2 on are mixed by weights of their own where u_on (``_value_sums_weights``,
    formed here from w_slots and the flag, the last program's)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    qk = _scores_product(q, Qb, Kb, head, rows, rows_ok, offs_n, N_K, D, stride_qh, stride_qm, stride_qd,
                         stride_kh, stride_kn, stride_kd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                         LOWP_DTYPE, DOT_PRECISION, KEYS_PADDED, EVEN_D)
    head3 = head[:, None, None]
    rows3 = rows[:, :, None]
    keys3 = offs_n[None, None, :]
    t2, kept = _scores(qk, m2[:, :, None], b, head3, rows3, rows_ok[:, :, None], keys3, N_K, scale2, MASK, stride_mb,
                       stride_mh, stride_mm, stride_mn, CDT, MASK_KIND, KEYS_PADDED)
    _, p_tilde, _ = _probs(t2, l2[:, :, None], b, H, head3, rows3, start_n, seed, dropout_p, CDT, HAS_DROPOUT, False)
    if U_ROW:
        a = _mix_halves(w_slots, _value_sums_weights(w_slots, u_on, H, HP), p_tilde, HP, BLOCK_M, BLOCK_N, CDT,
                        DOT_LOWP, tl.float16, DOT_PRECISION)
    else:
        a = _mix(w_slots, p_tilde, HP, BLOCK_M, BLOCK_N, CDT, DOT_LOWP, tl.float16, DOT_PRECISION)
    if not BIAS_SLOT:
        a = a + c[:, None, None]
    if NORM == 1:
        xhat, _ = _layer_norm(a, group_mean, eps, HP, BLOCK_M, BLOCK_N, CDT, NORM_PRECISION, True, True)
        a = xhat * gamma[:, None, None] + beta[:, None, None]
    if MASK_KIND != 0 or KEYS_PADDED:  # entries not kept are zeroed after the norm
        a = tl.where(kept, a, 0.0)
    if MOMENTS:  # per-slot sums of the map over the kept entries (of real rows: per-row sums mask them at the end)
        x = a
        if MOMENT_PAIRS:
            x = tl.where(rows_ok[:, :, None], x, 0.0)
        if MASK_KIND != 0 or KEYS_PADDED:
            x = tl.where(kept, x, 0.0)
        s1 += _moment_sums(x, HP, BLOCK_M, BLOCK_N, MOMENT_PAIRS)
        s2 += _moment_sums(x * x, HP, BLOCK_M, BLOCK_N, MOMENT_PAIRS)
    # V loaded as its transpose [HP, BLOCK_D, BLOCK_N] and permuted back: sm_90's SASS then feeds the
    # product's B operand straight from transposed shared-memory reads, where the [HP, BLOCK_N, BLOCK_D]
    # load took two byte permutes (PRMT) per MMA (ViT-B: 3,072 of ~36,000 instructions per program;
    # static model 647.7 -> 639.0 us t_high). Not with LayerNorm (DeiT-S 105.8 -> 113.3 us t_low), the
    # moments at 16 slots (ViT-B spilled 80 B), 32 slots (sm_90, D = 32 and 64: 0 -> 40 B) or the head
    # dim in chunks (16 slots, D = 128: 48 -> 56 B).
    if NORM == 1 or HP > 16 or D_CHUNKS > 1 or (MOMENTS and HP == 16):
        vt = _load_keys(Vb, head, offs_n, N_K, offs_d, D, stride_vh, stride_vn, stride_vd, CDT, DOT_LOWP, False,
                        KEYS_PADDED, EVEN_D)
    else:
        vt = tl.permute(_load_keys(Vb, head, offs_n, N_K, offs_d, D, stride_vh, stride_vn, stride_vd, CDT, DOT_LOWP,
                                   True, KEYS_PADDED, EVEN_D), (0, 2, 1))
    acc = _mm(a, vt, acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return acc, s1, s2


@triton.jit
def _rescale_factor(x, CDT: tl.constexpr):
    """2^x for x <= 0 (the online sum's rescale by the change of the row max), on the FMA pipe in fp32.

    The statistics kernel is bound by its exponentials at small head dims (DeepViT-16b: 23.6 us of
    MUFU, its other units below 21), and the rescale is 7% of them there: each row's factor is formed
    by the 4 threads holding the row, at every key block. Here 2^x = 2^n 2^f with n = round(x) (the
    1.5 * 2^23 shift, whose low mantissa bits then hold n) and f in [-1/2, 1/2], 2^f by a degree-5
    polynomial with constant term 1 fitted to the relative error on Chebyshev nodes (below 1.9e-7 in
    fp32, MUFU's ex2.approx's order), and 2^n made in the exponent bits: ten FMA-pipe and two integer
    instructions for one MUFU.
    x below -126 gives 2^-126, not 0: the factor multiplies a sum of at most N_K terms that the new
    block's maximum adds 1 to, so the difference is below 2^-118 of it. fp64 (fp64 inputs): exp2.
    """
    if CDT == tl.float64:
        return tl.exp2(x)
    x = tl.maximum(x, -126.0)
    shifted = x + 12582912.0  # 1.5 * 2^23: rounds x to an integer n, held in the low mantissa bits
    f = x - (shifted - 12582912.0)
    p = 0.0013260735431686044 * f + 0.00967162661254406
    p = p * f + 0.05550746992230415
    p = p * f + 0.24022239446640015
    p = p * f + 0.6931469440460205
    p = p * f + 1.0  # exactly 1 at x = 0 (the max unchanged), the common case
    n = shifted.to(tl.int32, bitcast=True) - 0x4B400000
    return p * ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _stats_keys(Kh, offs_d, offs_n, N_K, D, stride_kn, stride_kd, KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr):
    """K^T [len(offs_d), len(offs_n)] of the statistics kernel: keys past N_K and columns past D read as 0."""
    ptrs = Kh + (offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn)
    if KEYS_PADDED:
        kt = tl.load(ptrs, mask=(offs_n < N_K)[None, :] & (offs_d < D)[:, None], other=0.0)
    elif EVEN_D:
        kt = tl.load(ptrs)
    else:
        kt = tl.load(ptrs, mask=(offs_d < D)[:, None], other=0.0)
    return kt


@triton.jit
def _softmax_stats_block(m_i, l_i, q, qt, Kh, start_n, N_K, offs_d, offs_t, D, stride_kn, stride_kd, scale2,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_TAIL: tl.constexpr,
                         KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """One key block of the statistics kernel: the online row max of q.k and sum of 2^(scale2 (q.k - max)).

    The max runs on q.k itself (scale > 0) and the scale goes into the exponent's fused multiply-add,
    as the forward's RAW_MAX sweep. Keys past N_K (KEYS_PADDED) score -inf; no block is all padding,
    so the max is finite from the first block on and 2^(-inf) = 0 starts the sum. With D_TAIL the head
    dim's last D_TAIL columns (qt, offs_t) are a product of their own, accumulated onto the first's.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kt = _stats_keys(Kh, offs_d, offs_n, N_K, D, stride_kn, stride_kd, KEYS_PADDED, EVEN_D)
    if DOT_LOWP:
        qk = tl.dot(q, kt)
    else:
        qk = tl.dot(q, kt.to(CDT), tl.zeros([BLOCK_M, BLOCK_N], CDT), input_precision=DOT_PRECISION)
    if D_TAIL > 0:
        ktt = _stats_keys(Kh, offs_t, offs_n, N_K, D, stride_kn, stride_kd, KEYS_PADDED, EVEN_D)
        if DOT_LOWP:
            qk = tl.dot(qt, ktt, qk)
        else:
            qk = tl.dot(qt, ktt.to(CDT), qk, input_precision=DOT_PRECISION)
    if KEYS_PADDED:
        qk = tl.where((offs_n < N_K)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_ref = m_new * scale2
    l_i = l_i * _rescale_factor(m_i * scale2 - m_ref, CDT) + tl.sum(tl.exp2(qk * scale2 - m_ref[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _softmax_stats_kernel(
    Q, K, STATS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sp, stride_sb, stride_sh, stride_sm,
    H, N_Q, N_K, D, D_Q, NUM_PROGRAMS_M, scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_TAIL: tl.constexpr, EVEN_D: tl.constexpr,
    CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The forward's first sweep on its own, per (batch, head, BLOCK_M query rows): (m2, l2) as
    ``common._row_stats`` defines them, for a forward launched with STATS_GIVEN (no mask, scale > 0).
    K's head dim is D (aligned, ``aligned_operands``); q's is D_Q <= D, its columns past D_Q read as 0
    (the split forward reads q unpadded, ``re_attention_forward``).

    Full BLOCK_N-key blocks, then the rest in 16-key blocks (the smallest a product takes), so
    N = 197 computes 11 padded keys, not 59. A head dim that is the sum of two powers of two (D_TAIL,
    ``launch.head_dim_tail``: 48 = 32 + 16) takes two products, not one over the next power of two.
    """
    pid = tl.program_id(0)
    bh = pid // NUM_PROGRAMS_M
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = (pid % NUM_PROGRAMS_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < N_Q
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = BLOCK_D + tl.arange(0, max(D_TAIL, 1))
    Qh = Q + b * stride_qb + h * stride_qh
    q = tl.load(Qh + (rows[:, None] * stride_qm + offs_d[None, :] * stride_qd),
                mask=rows_ok[:, None] & (offs_d < D_Q)[None, :], other=0.0)
    qt = q
    if D_TAIL > 0:
        qt = tl.load(Qh + (rows[:, None] * stride_qm + offs_t[None, :] * stride_qd),
                     mask=rows_ok[:, None] & (offs_t < D_Q)[None, :], other=0.0)
    if not DOT_LOWP:
        q = q.to(CDT)
        qt = qt.to(CDT)
    Kh = K + b * stride_kb + h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), CDT)
    l_i = tl.zeros([BLOCK_M], CDT)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i = _softmax_stats_block(m_i, l_i, q, qt, Kh, start_n, N_K, offs_d, offs_t, D, stride_kn, stride_kd,
                                        scale2, BLOCK_M, BLOCK_N, D_TAIL, False, EVEN_D, CDT, DOT_LOWP, DOT_PRECISION)
    for start_n in range(n_full, N_K, 16):
        m_i, l_i = _softmax_stats_block(m_i, l_i, q, qt, Kh, start_n, N_K, offs_d, offs_t, D, stride_kn, stride_kd,
                                        scale2, BLOCK_M, 16, D_TAIL, True, EVEN_D, CDT, DOT_LOWP, DOT_PRECISION)
    ptrs = STATS + b * stride_sb + h * stride_sh + rows * stride_sm
    tl.store(ptrs, (m_i * scale2).to(STATS.dtype.element_ty), mask=rows_ok)
    tl.store(ptrs + stride_sp, tl.log2(l_i).to(STATS.dtype.element_ty), mask=rows_ok)


@triton.jit
def _eval_batchnorm_fold(w_slots, c, gamma, beta, RM, RV, head, slot_ok, H, stride_rm, stride_rv, out_scale, eps,
                         HP: tl.constexpr, G: tl.constexpr, CDT: tl.constexpr, BIAS_SLOT: tl.constexpr):
    """Eval-mode BatchNorm folded from the running statistics as given (RM, RV: [H], any float dtype and
    stride) into the mixing ``_slot_params`` returned for norm none (w_slots = tau W, c = tau c):

        alpha = gamma / sqrt(running_var + eps),  w_slots <- alpha w_slots,  c <- alpha (c - tau mean) + tau beta,

    the map ``_slot_params`` folds for NORM_BATCH with 1/std = 1/sqrt(running_var + eps), with BIAS_SLOT's
    placement of c after it, where torch's fold took six element-wise launches. In fp32 1/std is the
    hardware's reciprocal square root (relative error below 2^-22, as torch.rsqrt's on a GPU); every program
    forms it, and a correctly rounded square root and division cost DeiT-S's forward 6 us at t_high (static
    model). In fp64 (fp64 inputs) a square root and a division, correctly rounded.
    """
    mean = tl.load(RM + head * stride_rm, mask=slot_ok, other=0.0).to(CDT)
    var = tl.load(RV + head * stride_rv, mask=slot_ok, other=1.0).to(CDT)
    if CDT == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        rstd = tl.math.rsqrt(var + eps)
    alpha = gamma * rstd
    w_slots = w_slots * alpha[:, None]
    c = alpha * (c - out_scale * mean) + out_scale * beta
    if BIAS_SLOT:  # as _slot_params: the bias becomes the padding slot's column, whose P is 1 wherever kept
        w_slots = tl.where(tl.arange(0, HP)[None, :] == G * H, c[:, None], w_slots)
        c = tl.zeros_like(c)
    return w_slots, c


@triton.jit
def _halves(x, R: tl.constexpr, K: tl.constexpr, AXIS: tl.constexpr):
    """x [R, K] cut in two along AXIS (0: rows, 1: columns): (first half, second half)."""
    if AXIS == 0:
        return tl.split(tl.permute(tl.reshape(x, (2, R // 2, K)), (1, 2, 0)))
    else:
        return tl.split(tl.permute(tl.reshape(x, (R, 2, K // 2)), (0, 2, 1)))


@triton.jit
def _block_diag(w, R: tl.constexpr, K: tl.constexpr, Q: tl.constexpr):
    """[R Q, K Q]: w [R, K] (x) I_Q, entry ((r, q), (k, q')) = w[r, k] where q = q', else 0."""
    eye = tl.arange(0, Q)[:, None] == tl.arange(0, Q)[None, :]
    return tl.reshape(tl.where(eye[None, :, None, :], w[:, None, :, None], 0.0), (R * Q, K * Q))


@triton.jit
def _held_weights(x, R: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr):
    """Mixing weights x [R, K] (R = 16 or 32) in DTYPE (16-bit) as a product's left operand held in registers.

    Each 16-row half is the result of I @ half (exact). A product's left operand reaches it in registers where
    every warp holds all of its rows: a [16, K] product result does (its 8 warps repeat the one 16-row tile), a
    [32, K] one does not (two warps split the rows), and that conversion went through shared memory at every key
    block (ViT-B: 365 KB a program). Joined from two such halves, the [32, K] tile is converted once, before the
    loop. The forward's weights in fp16 (``_register_operand``), the backward's in the input dtype.
    """
    eye = (tl.arange(0, 16)[:, None] == tl.arange(0, 16)[None, :]).to(DTYPE)
    if R == 16:
        y = tl.dot(eye, x.to(DTYPE), tl.zeros([16, K], tl.float32)).to(DTYPE)
    else:
        top, bottom = _halves(x, R, K, 0)
        top = tl.dot(eye, top.to(DTYPE), tl.zeros([16, K], tl.float32)).to(DTYPE)
        bottom = tl.dot(eye, bottom.to(DTYPE), tl.zeros([16, K], tl.float32)).to(DTYPE)
        y = tl.reshape(tl.permute(tl.join(top, bottom), (2, 0, 1)), (R, K))
    return y


@triton.jit
def _register_operand(x, R: tl.constexpr, K: tl.constexpr, DOT_LOWP: tl.constexpr, CDT: tl.constexpr):
    """The mixing weights x [R, K] as a product's left operand: with DOT_LOWP in fp16 held in registers
    (``_held_weights``), otherwise x in CDT."""
    if DOT_LOWP:
        y = _held_weights(x, R, K, tl.float16)
    else:
        y = x.to(CDT)
    return y


@triton.jit
def _stack(x, S: tl.constexpr, E: tl.constexpr, Q: tl.constexpr):
    """x [S, E] -> [S Q, E / Q]: row (s, q) holds the q-th of Q runs of E / Q entries of slot s."""
    return tl.reshape(x, (S * Q, E // Q))


@triton.jit
def _unstack(y, S: tl.constexpr, E: tl.constexpr, Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The inverse of ``_stack`` as [S, BLOCK_M, BLOCK_N] (E = BLOCK_M BLOCK_N)."""
    return tl.reshape(y, (S, BLOCK_M, BLOCK_N))


@triton.jit
def _split_weights(w_slots, c, HP: tl.constexpr, Q: tl.constexpr, DOT_LOWP: tl.constexpr, CDT: tl.constexpr,
                   u_rows=False):
    """The mixing of ``_split_sweep``'s products from w_slots [HP, HP] and c [HP] (``_slot_params``).

    With HA = HP / 2 and HB = HP / 4 heads in the two products, row (g, q) of the stacked map mixes
    rows (h, q) of the stacked probabilities: weights W[G1, G2] (x) I_Q for the head groups (G1, G2) in
    (A, A) [HA Q, HA Q], (A, B) [HA Q, HB Q], (B, A) and (B, B), and the biases c, each repeated Q times
    ([HA Q], [HB Q]), that start each product's accumulator.

    u_rows (the forward's value sums, ``_split_sweep``): rows (g, Q - 1) take weights 0 and bias 1, so the stacked
    rows that hold the block's last BLOCK_M / Q query rows mix to A = 1 and their O is U = sum_j V_j
    (``_store_value_sums``). Set on the [R Q, K Q] weights before they are held in registers.
    """
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    top, bottom = _halves(w_slots, HP, HP, 0)
    w_aa, w_ab = _halves(top, HA, HP, 1)
    w_ba, w_bb = _halves(bottom, HA, HP, 1)
    w_ab, _ = _halves(w_ab, HA, HA, 1)
    w_ba, _ = _halves(w_ba, HA, HA, 0)
    w_bb, _ = _halves(w_bb, HA, HA, 0)
    w_bb, _ = _halves(w_bb, HB, HA, 1)
    last_a = ((tl.arange(0, HA * Q) % Q) == Q - 1) & u_rows
    last_b = ((tl.arange(0, HB * Q) % Q) == Q - 1) & u_rows
    w_aa = _register_operand(tl.where(last_a[:, None], 0.0, _block_diag(w_aa, HA, HA, Q)), HA * Q, HA * Q, DOT_LOWP,
                             CDT)
    w_ab = _register_operand(tl.where(last_a[:, None], 0.0, _block_diag(w_ab, HA, HB, Q)), HA * Q, HB * Q, DOT_LOWP,
                             CDT)
    w_ba = _register_operand(tl.where(last_b[:, None], 0.0, _block_diag(w_ba, HB, HA, Q)), HB * Q, HA * Q, DOT_LOWP,
                             CDT)
    w_bb = _register_operand(tl.where(last_b[:, None], 0.0, _block_diag(w_bb, HB, HB, Q)), HB * Q, HB * Q, DOT_LOWP,
                             CDT)
    c_a, c_b = _split_vector(c, HP, Q)
    return w_aa, w_ab, w_ba, w_bb, tl.where(last_a, 1.0, c_a), tl.where(last_b, 1.0, c_b)


@triton.jit
def _split_vector(v, HP: tl.constexpr, Q: tl.constexpr):
    """A per-slot vector v [HP] at the stacked rows (g, q) of both head groups: ([HA Q], [HB Q])."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    v_a, v_b = _halves(tl.reshape(v, (1, HP)), 1, HP, 1)
    v_b, _ = _halves(v_b, 1, HA, 1)
    v_a = tl.reshape(tl.broadcast_to(tl.reshape(v_a, (HA, 1)), (HA, Q)), (HA * Q,))
    v_b = tl.reshape(tl.broadcast_to(tl.reshape(v_b, (HB, 1)), (HB, Q)), (HB * Q,))
    return v_a, v_b


@triton.jit
def _split_layer_norm(ya, yb, gamma_a, gamma_b, beta_a, beta_b, eps, HA: tl.constexpr, HB: tl.constexpr,
                      Q: tl.constexpr, C: tl.constexpr, APPROX_RSQRT: tl.constexpr, CENTERED: tl.constexpr):
    """LayerNorm across the HA + HB heads of every entry of the stacked maps ya [HA Q, C], yb [HB Q, C]
    (rows (g, q)), then gamma' xhat + beta' per head (``_slot_params``: tau folded in).

    With rows ordered (head, q) a thread's accumulator rows share q and differ in the head, two bits of
    which are registers and one a lane bit (the product's fragment layout): each sum over the heads is
    in-register additions and one shuffle, where the (q, head) order took three shuffles. Two passes
    (mean, then the centered squares: the heads of a collapsing map differ little, and E[x^2] - mean^2
    would cancel), exact in the computation dtype; 1/std is ``rsqrt.approx`` (relative error below
    2^-22) next to fp16 products (APPROX_RSQRT), else correctly rounded. CENTERED: the maps are M - mean(M)
    already (``common._center_across_heads``), and only the second pass runs.
    """
    xa = tl.reshape(ya, (HA, Q, C))
    xb = tl.reshape(yb, (HB, Q, C))
    if not CENTERED:
        mean = (tl.sum(xa, axis=0) + tl.sum(xb, axis=0)) * (1.0 / (HA + HB))
        xa = xa - mean[None, :, :]
        xb = xb - mean[None, :, :]
    var = (tl.sum(xa * xa, axis=0) + tl.sum(xb * xb, axis=0)) * (1.0 / (HA + HB))
    if APPROX_RSQRT:
        rstd = tl.math.rsqrt(var + eps)
    else:
        rstd = 1.0 / tl.sqrt(var + eps)
    ya = tl.reshape(xa * rstd[None, :, :], (HA * Q, C)) * gamma_a[:, None] + beta_a[:, None]
    yb = tl.reshape(xb * rstd[None, :, :], (HB * Q, C)) * gamma_b[:, None] + beta_b[:, None]
    return ya, yb


@triton.jit
def _split_probs(qk, b, heads, rows, rows_ok, offs_n, N_K, m2, l2, scale2, CDT: tl.constexpr,
                 KEYS_PADDED: tl.constexpr):
    """P [S, BLOCK_M, BLOCK_N] of the S heads ``heads`` from their q.k and the given statistics (m2, l2
    [S, BLOCK_M]); 0 at keys past N_K."""
    heads3 = heads[:, None, None]
    rows3 = rows[:, :, None]
    t2, _ = _scores(qk, m2[:, :, None], b, heads3, rows3, rows_ok[:, :, None], offs_n[None, None, :], N_K, scale2,
                    qk, 0, 0, 0, 0, CDT, 0, KEYS_PADDED)  # MASK_KIND 0: no mask (the mask pointer is unread)
    p, _, _ = _probs(t2, l2[:, :, None], b, 0, heads3, rows3, 0, 0, 0.0, CDT, False, False)
    return p


@triton.jit
def _split_tiles(X, heads, offs_n, N_K, offs_d, offs_t, D, stride_h, stride_n, stride_d, D_TAIL: tl.constexpr,
                 KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr):
    """Keys or values of S heads, transposed, over the head dim's tile (offs_d: [S, its width, BLOCK_N]) and, with
    D_TAIL, its tail (offs_t: [S, D_TAIL, BLOCK_N]; else a placeholder)."""
    x = _load_keys(X, heads, offs_n, N_K, offs_d, D, stride_h, stride_n, stride_d, CDT, DOT_LOWP, True, KEYS_PADDED,
                   EVEN_D)
    xt = 0.0
    if D_TAIL > 0:
        xt = _load_keys(X, heads, offs_n, N_K, offs_t, D, stride_h, stride_n, stride_d, CDT, DOT_LOWP, True,
                        KEYS_PADDED, True)
    return x, xt


@triton.jit
def _split_scores(q, qt, kt, ktt, S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  D_TAIL: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """q.k [S, BLOCK_M, BLOCK_N] over the head dim's tile (q, kt) and, with D_TAIL, its tail (qt, ktt)."""
    qk = _mm(q, kt, tl.zeros([S, BLOCK_M, BLOCK_N], CDT), DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if D_TAIL > 0:
        qk = _mm(qt, ktt, qk, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return qk


@triton.jit
def _split_values(a, acc, acc_t, vt, vtt, D_TAIL: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """acc += a V over the head dim's tile, acc_t += a V over its tail (D_TAIL), from V transposed (vt, vtt):
    permuted back, the product's operand comes from transposed shared-memory reads (see ``_forward_block``)."""
    acc = _mm(a, tl.permute(vt, (0, 2, 1)), acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if D_TAIL > 0:
        acc_t = _mm(a, tl.permute(vtt, (0, 2, 1)), acc_t, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return acc, acc_t


@triton.jit
def _split_block(acc_a, acc_b, acc_at, acc_bt, s2a, s2b, qa, qb, qat, qbt, Kb, Vb, b, ha, hb, rows_a,
                 rows_b, ok_a, ok_b, start_n, N_K, D, offs_d, offs_t, m2a, l2a, m2b, l2b, w_aa, w_ab, w_ba, w_bb, c_a,
                 c_b, g_a, g_b, e_a, e_b, eps, scale2, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                 LAYER: tl.constexpr, MOMENTS: tl.constexpr, HP: tl.constexpr, Q: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_TAIL: tl.constexpr, KEYS_PADDED: tl.constexpr,
                 EVEN_D: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """One key block of ``_split_sweep``: P of both head groups, the mixing, O += A V per group; with MOMENTS the
    map's squares added entry by entry on the stacked rows (s2a, s2b).

    Without a head-dim tail both groups' tiles are loaded before their products; with one, each group's
    just before its product. The other order spilled 16 B in each case (ViT-B, D = 64; DeepViT-L-384,
    D = 48; sm_90): the compiler's schedule, measured, not derived."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    E: tl.constexpr = BLOCK_M * BLOCK_N
    MIX_DTYPE: tl.constexpr = tl.float16 if DOT_LOWP else CDT
    offs_n = start_n + tl.arange(0, BLOCK_N)
    ka, kat = _split_tiles(Kb, ha, offs_n, N_K, offs_d, offs_t, D, stride_kh, stride_kn, stride_kd, D_TAIL, KEYS_PADDED,
                           EVEN_D, CDT, DOT_LOWP)
    if D_TAIL > 0:
        qk_a = _split_scores(qa, qat, ka, kat, HA, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    kb, kbt = _split_tiles(Kb, hb, offs_n, N_K, offs_d, offs_t, D, stride_kh, stride_kn, stride_kd, D_TAIL, KEYS_PADDED,
                           EVEN_D, CDT, DOT_LOWP)
    if D_TAIL == 0:
        qk_a = _split_scores(qa, qat, ka, kat, HA, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    qk_b = _split_scores(qb, qbt, kb, kbt, HB, BLOCK_M, BLOCK_N, D_TAIL, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    pa = _split_probs(qk_a, b, ha, rows_a, ok_a, offs_n, N_K, m2a, l2a, scale2, CDT, KEYS_PADDED)
    pb = _split_probs(qk_b, b, hb, rows_b, ok_b, offs_n, N_K, m2b, l2b, scale2, CDT, KEYS_PADDED)
    xa = _stack(tl.reshape(pa.to(MIX_DTYPE), (HA, E)), HA, E, Q)
    xb = _stack(tl.reshape(pb.to(MIX_DTYPE), (HB, E)), HB, E, Q)
    ya = tl.broadcast_to(c_a[:, None], (HA * Q, E // Q))
    ya = _mm(w_ab, xb, _mm(w_aa, xa, ya, DOT_LOWP, MIX_DTYPE, DOT_PRECISION), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    yb = tl.broadcast_to(c_b[:, None], (HB * Q, E // Q))
    yb = _mm(w_bb, xb, _mm(w_ba, xa, yb, DOT_LOWP, MIX_DTYPE, DOT_PRECISION), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    if LAYER:
        ya, yb = _split_layer_norm(ya, yb, g_a, g_b, e_a, e_b, eps, HA, HB, Q, E // Q, DOT_LOWP, True)
        if KEYS_PADDED:  # the norm of a constant map (c) may divide 0 by 0 at eps = 0: zero those entries
            key_ok = (start_n + tl.arange(0, E // Q) % BLOCK_N < N_K)[None, :]
            ya = tl.where(key_ok, ya, 0.0)
            yb = tl.where(key_ok, yb, 0.0)
    if MOMENTS:  # over the kept entries: keys past N_K out here, rows past N_Q at the end (_split_moments)
        ma = ya
        mb = yb
        if KEYS_PADDED:
            key_ok = (start_n + tl.arange(0, E // Q) % BLOCK_N < N_K)[None, :]
            ma = tl.where(key_ok, ma, 0.0)
            mb = tl.where(key_ok, mb, 0.0)
        s2a += ma * ma
        s2b += mb * mb
    # Keys past N_K: the map is c there (normalized: 0), and V is 0 (``_load_keys``), so A V gets nothing
    # from them.
    va, vat = _split_tiles(Vb, ha, offs_n, N_K, offs_d, offs_t, D, stride_vh, stride_vn, stride_vd, D_TAIL, KEYS_PADDED,
                           EVEN_D, CDT, DOT_LOWP)
    if D_TAIL > 0:
        acc_a, acc_at = _split_values(_unstack(ya, HA, E, Q, BLOCK_M, BLOCK_N), acc_a, acc_at, va, vat, D_TAIL,
                                      DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    vb, vbt = _split_tiles(Vb, hb, offs_n, N_K, offs_d, offs_t, D, stride_vh, stride_vn, stride_vd, D_TAIL, KEYS_PADDED,
                           EVEN_D, CDT, DOT_LOWP)
    if D_TAIL == 0:
        acc_a, acc_at = _split_values(_unstack(ya, HA, E, Q, BLOCK_M, BLOCK_N), acc_a, acc_at, va, vat, D_TAIL,
                                      DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    acc_b, acc_bt = _split_values(_unstack(yb, HB, E, Q, BLOCK_M, BLOCK_N), acc_b, acc_bt, vb, vbt, D_TAIL, DOT_LOWP,
                                  LOWP_DTYPE, DOT_PRECISION)
    return acc_a, acc_b, acc_at, acc_bt, s2a, s2b


@triton.jit
def _split_moments(MOMp, s2a, s2b, w_slots, c, ha, hb, row0, N_Q, N_K, HP: tl.constexpr, Q: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the program's per-head sums of the map and of its square ([2, HP] at MOMp; the padding slots'
    are not written). The squares from ``_split_block``'s stacked sums, less the rows past N_Q (row (h, q),
    column e of the stacked map holds entry q E / Q + e of the block, E = BLOCK_M BLOCK_N, whose query row
    is that // BLOCK_N). The sums exactly from the parameters: without a mask or dropout each row of P sums
    to 1 over the keys, so a row's map sums to sum_h W[g, h] + N_K c_g (its partials held 12 registers)."""
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    C: tl.constexpr = BLOCK_M * BLOCK_N // Q
    entry = tl.arange(0, Q)[:, None] * C + tl.arange(0, C)[None, :]
    ok = ((row0 + entry // BLOCK_N) < N_Q)[None, :, :]
    offs_s = tl.arange(0, HP)
    rows = tl.minimum(tl.maximum(N_Q - row0, 0), BLOCK_M).to(w_slots.dtype)
    tl.store(MOMp + offs_s, rows * (tl.sum(w_slots, axis=1) + N_K * c), mask=offs_s < HA + HB)
    tl.store(MOMp + HP + ha, tl.sum(tl.sum(tl.where(ok, tl.reshape(s2a, (HA, Q, C)), 0.0), axis=2), axis=1))
    tl.store(MOMp + HP + hb, tl.sum(tl.sum(tl.where(ok, tl.reshape(s2b, (HB, Q, C)), 0.0), axis=2), axis=1))


@triton.jit
def _split_queries(Qb, heads, rows, rows_ok, offs_d, D, stride_qh, stride_qm, stride_qd, S: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IN_REGISTERS: tl.constexpr, CDT: tl.constexpr,
                   DOT_LOWP: tl.constexpr):
    """q [S, BLOCK_M, BLOCK_D] of S heads at the head-dim columns offs_d (held as a product's result with
    IN_REGISTERS)."""
    q = _load_rows(Qb, heads, rows, rows_ok, offs_d, D, stride_qh, stride_qm, stride_qd, CDT, DOT_LOWP)
    if IN_REGISTERS:
        q = _product_result(q, S, BLOCK_M, BLOCK_D)
    return q


@triton.jit
def _split_store(Ob, acc, heads, rows, rows_ok, offs_d, D, stride_oh, stride_om, stride_od):
    ptrs = Ob + (heads[:, None, None] * stride_oh + rows[:, :, None] * stride_om + offs_d[None, None, :] * stride_od)
    tl.store(ptrs, acc.to(Ob.dtype.element_ty), mask=rows_ok[:, :, None] & (offs_d < D)[None, None, :])


@triton.jit
def _value_sums_weights(w_slots, on, H, HP: tl.constexpr):
    """w_slots, or where ``on`` the weights that mix every slot to P~ of slot H, the mixing bias's slot (8 slots,
    one row group, BIAS_SLOT), whose P~ is 1 at every kept key: rows mixed so get A = 1, so O = sum_j V_j = U
    there (``_store_value_sums``). The last program mixes its rows past N_Q so (``_mix_halves``'s second half)."""
    onehot = tl.where(tl.arange(0, HP)[None, :] == H, 1.0, tl.zeros_like(w_slots))
    return tl.where(on, onehot, w_slots)


@triton.jit
def _store_value_sums(Ub, acc, heads, heads_ok, ROW: tl.constexpr, BLOCK_M: tl.constexpr, offs_d, D_Q):
    """U = sum_j V_j of the heads ``heads`` (where heads_ok; None: every slot is a real head, as in the split
    sweep) at Ub, one batch element of a contiguous [B, H, 1, D_Q] tensor in the accumulation dtype: the block's
    row ROW of O's accumulator acc [S, BLOCK_M, width], a row past N_Q whose A was 1 at every key
    (``_value_sums_weights``, ``_split_weights``' u_rows)."""
    u = tl.sum(tl.where((tl.arange(0, BLOCK_M) == ROW)[None, :, None], acc, 0.0), axis=1)
    mask = (offs_d < D_Q)[None, :]
    if heads_ok is not None:
        mask = heads_ok[:, None] & mask
    tl.store(Ub + (heads * D_Q)[:, None] + offs_d[None, :], u, mask=mask)


@triton.jit
def _split_sweep(Qb, Kb, Vb, Ob, STATSb, MOMp, Ub, w_slots, c, gamma, beta, eps, b, row0, N_Q, N_K, D, D_Q, scale2,
                 stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                 stride_oh, stride_om, stride_od, stride_sp, stride_sh, stride_sm,
                 LAYER: tl.constexpr, MOMENTS: tl.constexpr, U_ROW: tl.constexpr, HP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_TAIL: tl.constexpr,
                 EVEN_D: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """The second sweep (statistics given) for H = 3 HP / 4 heads without padding slots.

    At H = 12 (HP = 16) the usual sweep computes four padding slots' q.k, exponentials and A V and stages
    their keys and values: a quarter of its shared-memory traffic. Here heads 0..HA-1 (HA = HP / 2) and
    HA..HA+HB-1 (HB = HP / 4) are two batched products each. The mixing still needs every head of an
    entry in one product's K: each group's P [S, E] (E = BLOCK_M BLOCK_N entries) is stacked to
    [S Q, E / Q] (row (h, q): the q-th run of E / Q entries of head h; Q = 16 / HB, so HB Q = 16 is a
    product's least K; a reshape, no data movement) and mixed by W (x) I_Q weights,
    Y_A = W_AA X_A + W_AB X_B + c_A and Y_B = W_BA X_A + W_BB X_B + c_B ([HA Q] and [HB Q] rows), whose
    rows are the groups' maps; with LAYER, LayerNorm across the heads of each entry on those rows
    (``_split_layer_norm``); with MOMENTS, the map's sums per head (``_split_moments``). No mask or dropout (the
    launch rule, ``launch.splits_heads``).

    The head dim is one tile of BLOCK_D columns or, with D_TAIL > 0, a tile of BLOCK_D / 2 and one of the
    D_TAIL columns after it (``launch.head_dim_tail``: 48 = 32 + 16), so a head dim that is not a power
    of two stages, multiplies and accumulates no padding columns (at 48 in a 64-wide tile: a quarter).
    q and O are read and written at their own head dim D_Q <= D (columns past it masked: q need not be
    padded, nor O written to a padded buffer), K and V at D.
    """
    HA: tl.constexpr = HP // 2
    HB: tl.constexpr = HP // 4
    Q: tl.constexpr = 16 // HB
    D_MAIN: tl.constexpr = BLOCK_D // 2 if D_TAIL > 0 else BLOCK_D
    TAIL_W: tl.constexpr = D_TAIL if D_TAIL > 0 else 16  # offs_t is unused without a tail
    ha = tl.arange(0, HA)
    hb = HA + tl.arange(0, HB)
    offs_d = tl.arange(0, D_MAIN)
    offs_t = D_MAIN + tl.arange(0, TAIL_W)
    rows_a = row0 + tl.zeros([HA, 1], tl.int32) + tl.arange(0, BLOCK_M)[None, :]
    rows_b = row0 + tl.zeros([HB, 1], tl.int32) + tl.arange(0, BLOCK_M)[None, :]
    ok_a = rows_a < N_Q
    ok_b = rows_b < N_Q
    # q of the 8-head group in registers (a head a warp); the 4-head group's products split their keys
    # over warp pairs, so its q is re-read from shared memory at every key block.
    qa = _split_queries(Qb, ha, rows_a, ok_a, offs_d, D_Q, stride_qh, stride_qm, stride_qd, HA, BLOCK_M, D_MAIN,
                        DOT_LOWP, CDT, DOT_LOWP)
    qb = _split_queries(Qb, hb, rows_b, ok_b, offs_d, D_Q, stride_qh, stride_qm, stride_qd, HB, BLOCK_M, D_MAIN, False,
                        CDT, DOT_LOWP)
    if D_TAIL > 0:
        qat = _split_queries(Qb, ha, rows_a, ok_a, offs_t, D_Q, stride_qh, stride_qm, stride_qd, HA, BLOCK_M, D_TAIL,
                             DOT_LOWP, CDT, DOT_LOWP)
        qbt = _split_queries(Qb, hb, rows_b, ok_b, offs_t, D_Q, stride_qh, stride_qm, stride_qd, HB, BLOCK_M, D_TAIL,
                             False, CDT, DOT_LOWP)
        acc_at = tl.zeros([HA, BLOCK_M, D_TAIL], CDT)
        acc_bt = tl.zeros([HB, BLOCK_M, D_TAIL], CDT)
    else:  # no tail: scalars stand for its tiles (a loop-carried tile would hold registers)
        qat = 0.0
        qbt = 0.0
        acc_at = tl.zeros([], CDT)
        acc_bt = tl.zeros([], CDT)
    m2a, l2a = _load_row_stats(STATSb, ha >= 0, rows_a, ok_a, ha, stride_sp, stride_sh, stride_sm, CDT)
    m2b, l2b = _load_row_stats(STATSb, hb >= 0, rows_b, ok_b, hb, stride_sp, stride_sh, stride_sm, CDT)
    if DOT_LOWP:
        # P = 2^(S2 - (m2 + l2)) in one fused multiply-add: (m2 + l2) rounds at |m2| 2^-24, far below P's
        # fp16 rounding for the mixing (2^-11), and a subtraction per entry goes (static model, t_high:
        # ViT-B -3.0 us, DeepViT-L-384 -6.5). fp32 and fp64 keep the two steps' accuracy.
        m2a = m2a + l2a
        m2b = m2b + l2b
        l2a = tl.zeros_like(l2a)
        l2b = tl.zeros_like(l2b)
    # U_ROW: in the last program, whose rows from U_FIRST on are all past N_Q, those rows mix to A = 1
    U_FIRST: tl.constexpr = BLOCK_M - BLOCK_M // Q
    w_aa, w_ab, w_ba, w_bb, c_a, c_b = _split_weights(w_slots, c, HP, Q, DOT_LOWP, CDT,
                                                      U_ROW and row0 + U_FIRST >= N_Q)
    g_a, g_b = _split_vector(gamma, HP, Q)
    e_a, e_b = _split_vector(beta, HP, Q)
    acc_a = tl.zeros([HA, BLOCK_M, D_MAIN], CDT)
    acc_b = tl.zeros([HB, BLOCK_M, D_MAIN], CDT)
    if MOMENTS:
        s2a = tl.zeros([HA * Q, BLOCK_M * BLOCK_N // Q], CDT)
        s2b = tl.zeros([HB * Q, BLOCK_M * BLOCK_N // Q], CDT)
    else:
        s2a, s2b = tl.zeros([], CDT), tl.zeros([], CDT)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_a, acc_b, acc_at, acc_bt, s2a, s2b = _split_block(
            acc_a, acc_b, acc_at, acc_bt, s2a, s2b, qa, qb, qat, qbt, Kb, Vb, b, ha, hb, rows_a, rows_b,
            ok_a, ok_b, start_n, N_K, D, offs_d, offs_t, m2a, l2a, m2b, l2b, w_aa, w_ab, w_ba, w_bb, c_a, c_b, g_a,
            g_b, e_a, e_b, eps, scale2, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, LAYER,
            MOMENTS, HP, Q, BLOCK_M, BLOCK_N, D_TAIL, False, EVEN_D, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if n_full < N_K:
        acc_a, acc_b, acc_at, acc_bt, s2a, s2b = _split_block(
            acc_a, acc_b, acc_at, acc_bt, s2a, s2b, qa, qb, qat, qbt, Kb, Vb, b, ha, hb, rows_a, rows_b,
            ok_a, ok_b, n_full, N_K, D, offs_d, offs_t, m2a, l2a, m2b, l2b, w_aa, w_ab, w_ba, w_bb, c_a, c_b, g_a,
            g_b, e_a, e_b, eps, scale2, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, LAYER,
            MOMENTS, HP, Q, BLOCK_M, BLOCK_N, D_TAIL, True, EVEN_D, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if MOMENTS:
        _split_moments(MOMp, s2a, s2b, w_slots, c, ha, hb, row0, N_Q, N_K, HP, Q, BLOCK_M, BLOCK_N)
    _split_store(Ob, acc_a, ha, rows_a, ok_a, offs_d, D_Q, stride_oh, stride_om, stride_od)
    _split_store(Ob, acc_b, hb, rows_b, ok_b, offs_d, D_Q, stride_oh, stride_om, stride_od)
    if D_TAIL > 0:
        _split_store(Ob, acc_at, ha, rows_a, ok_a, offs_t, D_Q, stride_oh, stride_om, stride_od)
        _split_store(Ob, acc_bt, hb, rows_b, ok_b, offs_t, D_Q, stride_oh, stride_om, stride_od)
    if U_ROW:
        if row0 + U_FIRST >= N_Q:
            _store_value_sums(Ub, acc_a, ha, None, U_FIRST, BLOCK_M, offs_d, D_Q)
            _store_value_sums(Ub, acc_b, hb, None, U_FIRST, BLOCK_M, offs_d, D_Q)
            if D_TAIL > 0:
                _store_value_sums(Ub, acc_at, ha, None, U_FIRST, BLOCK_M, offs_t, D_Q)
                _store_value_sums(Ub, acc_bt, hb, None, U_FIRST, BLOCK_M, offs_t, D_Q)


@triton.jit
def _re_attention_fwd_kernel(
    Q, K, V, W, C, NW, NB, BN, RV, MASK, SEED, O, STATS, MOM, USUM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_sp, stride_sb, stride_sh, stride_sm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_wg, stride_wh, stride_c, stride_nw, stride_nb, stride_bn, stride_rv,
    H, N_Q, N_K, D, D_Q, NUM_PROGRAMS_M,
    scale2, out_scale, eps, dropout_p, center_keys,
    HP: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATS_BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, RAW_MAX: tl.constexpr, BIAS_SLOT: tl.constexpr,
    HAS_MIX_BIAS: tl.constexpr, CENTERS: tl.constexpr, NORM: tl.constexpr, BN_EVAL: tl.constexpr,
    HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STATS_GIVEN: tl.constexpr, MOMENTS: tl.constexpr, EVEN_D: tl.constexpr, CDT: tl.constexpr,
    DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr, SPLIT_HEADS: tl.constexpr,
    D_TAIL: tl.constexpr, U_ROW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_PROGRAMS_M).to(tl.int64)
    head, slot_ok, rows, rows_ok = _slot_rows((pid % NUM_PROGRAMS_M) * (G * BLOCK_M), H, N_Q, HP, G, BLOCK_M)
    # Head-dim chunk of O this program writes (D_CHUNKS > 1 when the launch rule splits the head
    # dim to fit the GPU: every chunk recomputes the scores over the whole head dim).
    pid_d = tl.program_id(1)
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    # q held in registers (``_product_result``) at 8 and 16 slots where the head-dim tile is 32 to 64
    # wide and whole (8 x 32 x 64, 16 x 16 x 64 or 16 x 32 x 32: 32 registers a thread at 8 warps),
    # else re-read from shared memory for every key block: at ViT-B (16 slots, 16 rows) those reads
    # were 448 of 2,718 KB of a program's shared-memory traffic (static model, forward 150.9 ->
    # 129.9 us t_low). A 16-wide head-dim tile saves few reads (sm_86's LayerNorm launch spilled);
    # at 32 slots the launch spilled (sm_90, D = 32: 0 -> 16 B).
    Q_IN_REGISTERS: tl.constexpr = DOT_LOWP and D_CHUNKS == 1 and HP <= 16 and BLOCK_D >= 32 and BLOCK_D <= 64
    # At 8 slots both sweeps take the keys past their last full block in 16-key blocks (the
    # smallest a product takes): only those pay for the key-padding select, and N = 197 computes
    # 11 padded keys, not 27. Unpipelined (a pipelined loop of one or two trips costs more than it
    # hides), except with q in registers, where the unpipelined tails made ptxas spill the LayerNorm
    # launch at DeiT-S. At 16 or 32 slots (TAIL_N 0) one peeled block: the tail loops spilled there.
    TAIL_N: tl.constexpr = 16 * (HP == 8)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    STATSb = STATS + b * stride_sb
    q = _load_rows(Qb, head, rows, rows_ok, offs_d, D, stride_qh, stride_qm, stride_qd, CDT, DOT_LOWP)
    if Q_IN_REGISTERS:
        q = _product_result(q, HP, BLOCK_M, BLOCK_D)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    # ---- sweep 1: the softmax statistics (or the ones the statistics sweep already wrote) ----
    if STATS_GIVEN:
        m2, l2 = _load_row_stats(STATSb, slot_ok, rows, rows_ok, head, stride_sp, stride_sh, stride_sm, CDT)
    else:
        m2, l2 = _row_stats(q, Qb, Kb, b, head, slot_ok, rows, rows_ok, N_K, D, stride_qh, stride_qm, stride_qd,
                            stride_kh, stride_kn, stride_kd, scale2, MASK, stride_mb, stride_mh, stride_mm,
                            stride_mn, HP, BLOCK_M, STATS_BLOCK_N, BLOCK_D, D_CHUNKS, CDT, MASK_KIND, RAW_MAX,
                            EVEN_D, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION, TAIL_N, Q_IN_REGISTERS)
        _store_row_stats(STATSb, m2, l2, rows, rows_ok & ((rows * 0 + pid_d) == 0), head, stride_sp, stride_sh,
                         stride_sm)

    w_slots, c, gamma, beta = _slot_params(W, C, NW, NB, BN, head, slot_ok, H, out_scale, stride_wg, stride_wh,
                                           stride_c, stride_nw, stride_nb, HP, G, CDT, HAS_MIX_BIAS, NORM,
                                           HAS_NORM_WEIGHT, HAS_NORM_BIAS, BIAS_SLOT and not BN_EVAL, True)
    if CENTERS:  # the mixing bias -sum_h W[g, h] / center_keys (no mix bias: BIAS_SLOT's column holds 0)
        shift = -tl.sum(w_slots, axis=1) / center_keys
        if BIAS_SLOT:
            w_slots = tl.where(tl.arange(0, HP)[None, :] == G * H, shift[:, None], w_slots)
        else:
            c = shift
    if BN_EVAL:
        w_slots, c = _eval_batchnorm_fold(w_slots, c, gamma, beta, BN, RV, head, slot_ok, H, stride_bn, stride_rv,
                                          out_scale, eps, HP, G, CDT, BIAS_SLOT)
    if NORM == 1:  # the mixing gives M - mean(M) itself
        w_slots, c = _center_across_heads(w_slots, c, slot_ok, H, HP, G, CDT, HAS_MIX_BIAS, BIAS_SLOT)
    if SPLIT_HEADS:  # 12 heads, statistics given, no mask or dropout (TileConfig.splits_heads)
        _split_sweep(Qb, Kb, Vb, O + b * stride_ob, STATSb, MOM + (pid.to(tl.int64) * 2) * HP, USUM + b * H * D_Q,
                     w_slots, c, gamma, beta, eps, b, (pid % NUM_PROGRAMS_M) * BLOCK_M, N_Q, N_K, D, D_Q, scale2,
                     stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
                     stride_oh, stride_om, stride_od, stride_sp, stride_sh, stride_sm, NORM == 1, MOMENTS, U_ROW, HP,
                     BLOCK_M, BLOCK_N, BLOCK_D, D_TAIL, EVEN_D, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    else:
        group_mean = _group_mean(H, slot_ok, HP, CDT)
        # U_ROW (8 slots, one row group, the mixing bias in slot H): in the last program, whose rows from
        # BLOCK_M / 2 on are all past N_Q, those rows mix to A = 1
        u_on = (pid % NUM_PROGRAMS_M) * BLOCK_M + BLOCK_M // 2 >= N_Q

        # ---- sweep 2: exact P tile by tile, dropout, mix, normalize, multiply by V ----
        acc = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
        MOMENT_PAIRS: tl.constexpr = MOMENTS and HP == 8 and BLOCK_D <= 64 and D_CHUNKS == 1
        if MOMENT_PAIRS:
            s1 = tl.zeros([HP, 2, BLOCK_N], CDT)
            s2 = tl.zeros([HP, 2, BLOCK_N], CDT)
        else:
            s1 = tl.zeros([HP, BLOCK_M], CDT)
            s2 = tl.zeros([HP, BLOCK_M], CDT)
        n_full = (N_K // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, s1, s2 = _forward_block(
                acc, s1, s2, q, Qb, Kb, Vb, b, H, head, rows, rows_ok, start_n, N_K, D, offs_d, m2, l2, w_slots,
                u_on, c, gamma, beta, group_mean, seed, scale2, eps, dropout_p, MASK, stride_mb, stride_mh,
                stride_mm, stride_mn, stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh,
                stride_vn, stride_vd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, NORM, MASK_KIND, False, EVEN_D,
                HAS_DROPOUT, BIAS_SLOT, MOMENTS, MOMENT_PAIRS, U_ROW, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION,
                NORM_PRECISION)
        if TAIL_N == 0:
            if n_full < N_K:
                acc, s1, s2 = _forward_block(
                    acc, s1, s2, q, Qb, Kb, Vb, b, H, head, rows, rows_ok, n_full, N_K, D, offs_d, m2, l2, w_slots,
                    u_on, c, gamma, beta, group_mean, seed, scale2, eps, dropout_p, MASK, stride_mb, stride_mh,
                    stride_mm, stride_mn, stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh,
                    stride_vn, stride_vd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, NORM, MASK_KIND, True, EVEN_D,
                    HAS_DROPOUT, BIAS_SLOT, MOMENTS, MOMENT_PAIRS, U_ROW, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION,
                    NORM_PRECISION)
        else:
            # With MOMENT_PAIRS the 16-key tail blocks sum the moments into partials of their own width.
            if MOMENT_PAIRS:
                t1 = tl.zeros([HP, 2, TAIL_N], CDT)
                t2 = tl.zeros([HP, 2, TAIL_N], CDT)
            else:
                t1 = s1
                t2 = s2
            for start_n in tl.range(n_full, N_K, TAIL_N, num_stages=None if Q_IN_REGISTERS else 1):
                acc, t1, t2 = _forward_block(
                    acc, t1, t2, q, Qb, Kb, Vb, b, H, head, rows, rows_ok, start_n, N_K, D, offs_d, m2, l2, w_slots,
                    u_on, c, gamma, beta, group_mean, seed, scale2, eps, dropout_p, MASK, stride_mb, stride_mh,
                    stride_mm, stride_mn, stride_qh, stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, stride_vh,
                    stride_vn, stride_vd, HP, BLOCK_M, TAIL_N, BLOCK_D, D_CHUNKS, NORM, MASK_KIND, True, EVEN_D,
                    HAS_DROPOUT, BIAS_SLOT, MOMENTS, MOMENT_PAIRS, U_ROW, CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION,
                    NORM_PRECISION)

        o_ptrs = (O + b * stride_ob) + (head[:, None, None] * stride_oh + rows[:, :, None] * stride_om
                                        + offs_d[None, None, :] * stride_od)
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=rows_ok[:, :, None] & (offs_d < D)[None, None, :])
        if U_ROW:
            if (pid % NUM_PROGRAMS_M) * BLOCK_M + BLOCK_M // 2 >= N_Q:
                _store_value_sums(USUM + b * H * D_Q, acc, head, slot_ok, BLOCK_M // 2, BLOCK_M, offs_d, D_Q)
        if MOMENTS:  # every head-dim chunk summed the same map: the first one stores the sums
            if MOMENT_PAIRS:
                mom1 = tl.sum(tl.sum(s1, axis=2), axis=1)
                mom2 = tl.sum(tl.sum(s2, axis=2), axis=1)
                if TAIL_N != 0:
                    mom1 += tl.sum(tl.sum(t1, axis=2), axis=1)
                    mom2 += tl.sum(tl.sum(t2, axis=2), axis=1)
            else:
                if TAIL_N != 0:
                    s1 = t1
                    s2 = t2
                mom1 = tl.sum(tl.where(rows_ok, s1, 0.0), axis=1)
                mom2 = tl.sum(tl.where(rows_ok, s2, 0.0), axis=1)
            mom_ptrs = MOM + (pid.to(tl.int64) * 2) * HP + tl.arange(0, HP)
            store_here = slot_ok & ((head * 0 + pid_d) == 0)
            tl.store(mom_ptrs, mom1.to(MOM.dtype.element_ty), mask=store_here)
            tl.store(mom_ptrs + HP, mom2.to(MOM.dtype.element_ty), mask=store_here)


def _check_vector(name: str, t: Optional[torch.Tensor], h: int, device: torch.device) -> None:
    if t is None:
        return
    if t.shape != (h,):
        raise ValueError(f"re_attention_forward: {name} must have shape ({h},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"re_attention_forward: {name} is on {t.device}, q on {device}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"re_attention_forward: {name} must be floating point, got {t.dtype}")


# The kernels address a tile as one 64-bit pointer per batch element plus 32-bit offsets (64-bit
# offsets per element cost a register pair each: at DeiT-S with a mask, 400 B of spills against
# 96). Every operand's offsets within a batch element must therefore stay below 2^31.
INT32_SPAN = 2 ** 31 - 1


def batch_span(t: torch.Tensor) -> int:
    """The largest element offset within one batch element (dim 0) of ``t``."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def vector_aligned(t: torch.Tensor) -> bool:
    """Whether the kernels can move ``t`` [..., D] in 16-byte vectors.

    Triton vectorizes a load or store only where it can prove alignment, and it learns alignment
    from the launch's arguments alone: an integer (a stride, D) that is a multiple of 16 and an
    address that is a multiple of 16 bytes are specialized as such (``kernels.aot.jit_compile_inputs``).
    Any other stride, a head dim such as 33, or an offset view makes every element its own load:
    measured on sm_90 at D = 33, the forward's registers collapse and kilobytes spill. Offsets within
    a batch element must also fit 32 bits (``INT32_SPAN``).
    """
    if t.shape[-1] % 16 or t.stride(-1) != 1 or t.data_ptr() % 16 or batch_span(t) > INT32_SPAN:
        return False
    return all(s % 16 == 0 for s in t.stride()[:-1])


def aligned_operands(*tensors: torch.Tensor):
    """``tensors`` [..., D] as the kernels want them: each one that is not ``vector_aligned`` is copied
    into a contiguous buffer whose head dim is D rounded up to 16, zero past D (zeros add nothing to
    q.k and give zero output columns). Returns (tensors, padded head dim); all share one head dim,
    so either none is padded or all are. Costs one read and write of the copied inputs, against the
    kernels' re-reading of every key and value Nq / rows-per-program times. Each buffer is one
    concatenation with a broadcast zero element, written once (a zero fill and then a copy would
    write it twice: 21 MB more per tensor at DeepViT-L-384, D = 35 -> 48).
    """
    d = tensors[0].shape[-1]
    dp = -(-d // 16) * 16
    if math.prod(tensors[0].shape[1:-1]) * dp > INT32_SPAN:
        raise ValueError(f"re_attention: {tuple(tensors[0].shape)} has more than {INT32_SPAN} elements per batch "
                         "element, more than the kernels address")
    out = []
    zeros = {}  # one zero element per dtype, broadcast over each tensor's padding columns
    for t in tensors:
        if dp == d and vector_aligned(t):
            out.append(t)
            continue
        padded = t.new_empty((*t.shape[:-1], dp))
        if dp == d:
            padded.copy_(t)
        else:
            if t.dtype not in zeros:
                zeros[t.dtype] = t.new_zeros((1,) * t.dim())
            torch.cat((t, zeros[t.dtype].expand(*t.shape[:-1], dp - d)), dim=-1, out=padded)
        out.append(padded)
    return tuple(out), dp


def accumulator_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of the softmax statistics, the BatchNorm sums and reduced gradients: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def softmax_stats_shape(q: torch.Tensor) -> Tuple[int, int, int, int]:
    """Shape of the softmax statistics of ``q`` [B, H, Nq, D]: [2, B, H, Nq] (row max m2; log-sum l2)."""
    B, H, Nq, _ = q.shape
    return (2, B, H, Nq)


def mask_arguments(attn_mask: Optional[torch.Tensor], q: torch.Tensor, n_k: int):
    """(tensor, MASK_KIND, 4 strides) for the kernels: the mask broadcast to [B, H, Nq, Nk] by strides.

    Bool masks (True = attend) are read as uint8; float masks are added to the scores in q's
    dtype (as the eager reference does) and mask where they are -inf. Without a mask the
    returned tensor is an unread placeholder.
    """
    B, H, Nq, _ = q.shape
    if attn_mask is None:
        return q, MASK_NONE, (0, 0, 0, 0)
    if attn_mask.dim() > 4:
        raise ValueError(f"re_attention_forward: attn_mask must have at most 4 dims, got {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.dtype == torch.bool:
        mask, kind = mask.view(torch.uint8), MASK_BOOL
    else:
        mask, kind = mask.to(q.dtype), MASK_ADDITIVE
    try:
        mask = mask.expand(B, H, Nq, n_k)
    except RuntimeError:
        raise ValueError(f"re_attention_forward: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                         f"[B, H, Nq, Nk] = {[B, H, Nq, n_k]}") from None
    if batch_span(mask) > INT32_SPAN:
        raise ValueError(f"re_attention_forward: attn_mask {tuple(attn_mask.shape)} spans {batch_span(mask)} elements "
                         f"per batch element; the kernels address at most {INT32_SPAN} (give it a head dim of 1 "
                         "or split the batch)")
    return mask, kind, tuple(mask.stride())


def dropout_arguments(dropout_p: float, seed: Optional[torch.Tensor], device: torch.device):
    """(seed tensor or placeholder, HAS_DROPOUT) after checking p and the seed ([1] int64 on the device)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"re_attention_forward: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return None, False
    if seed is None or seed.shape != (1,) or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"re_attention_forward: dropout needs seed, an int64 tensor of shape (1,) on {device}, "
                         f"got {None if seed is None else (tuple(seed.shape), seed.dtype, seed.device)}")
    return seed, True


def launch_options(q: torch.Tensor, lowp_dot: Optional[bool], allow_tf32: bool, interpret: bool) -> dict:
    """Compute dtype and how each product runs for q's dtype (constexprs of every kernel).

    CDT: fp32 (fp64 for fp64 inputs). DOT_LOWP: fp16/bf16 operands on the tensor cores (default for
    fp16/bf16 inputs on a GPU; never in the interpreter, whose bf16 products are wrong; the head
    mixing then runs in fp16 or tf32, ``common._mix``). DOT_PRECISION: "ieee" (exact fp32) unless the caller
    allows TF32. NORM_PRECISION: the LayerNorm means, tf32 next to fp16/bf16 products.
    """
    low = q.dtype in (torch.float16, torch.bfloat16)
    if lowp_dot is None:
        lowp_dot = low and not interpret
    lowp_dot = bool(lowp_dot and low)
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"
    return dict(CDT=tl.float64 if q.dtype == torch.float64 else tl.float32, DOT_LOWP=lowp_dot, DOT_PRECISION=precision,
                NORM_PRECISION="tf32" if lowp_dot else precision)


def re_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mix_weight: torch.Tensor,
    mix_bias: Optional[torch.Tensor] = None,
    *,
    scale: float,
    out_scale: float = 1.0,
    norm: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    batch_stats: Optional[torch.Tensor] = None,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    softmax_stats: Optional[torch.Tensor] = None,
    stats_given: bool = False,
    with_moments: bool = False,
    value_sums: bool = False,
    center_keys: int = 0,
    separate_stats: Optional[bool] = None,
    config: Optional[TileConfig] = None,
    allow_tf32: bool = False,
    lowp_dot: Optional[bool] = None,
):
    """Fused Re-attention forward. Returns ``(out [B, H, Nq, D] in q's dtype, softmax_stats [2, B, H, Nq])``.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides, same dtype: fp16, bf16, fp32 or fp64).
    mix_weight: [H, H] indexed [out, in]; mix_bias, norm_weight, norm_bias: [H] or None.
    norm: "none" (BatchNorm in eval mode is folded into mix_weight/mix_bias by the caller),
    "layer" (LayerNorm across the heads at each (b, i, j)) or "batch": an affine map per head, either
    training-mode BatchNorm with given ``batch_stats`` = [2, H] (mean, 1/sqrt(var + eps)) or eval-mode
    BatchNorm from ``running_mean``, ``running_var`` ([H] each, any float dtype and stride), which the
    programs fold with 1/sqrt(running_var + eps) themselves (inference: no torch op around the launch).
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Nq, Nk].
    dropout_p, seed: dropout on P before mixing, keyed by ``seed`` ([1] int64 on q's device).
    softmax_stats [2, B, H, Nq]: per (b, h, i) the row max m2 of the scores in base-2 units (log2(e)
    times the masked scores) and l2 = log2 sum_j 2^(S2_j - m2); (+inf, 0) for rows with every key
    masked.
    In the accumulation dtype (float32; float64 for float64 inputs). ``out``/``softmax_stats`` may
    be given (any strides); ``stats_given=True`` reads the statistics instead of computing them
    (the statistics sweep wrote them). ``out`` may also be in the accumulation dtype.
    with_moments (norm "none" only): also return ``moments`` [programs, 2, H] in the accumulation
    dtype: per program, the sums over its kept entries of the map X = W P~ + mix_bias and of X^2,
    per head; what training BatchNorm's one-sweep forward needs. Sum them over programs in float64.
    value_sums (with with_moments): also return U = sum_j V_j, [B, H, 1, D] in the accumulation dtype, where
    the launch sums it on the way (no mask, and a padding query row: Nq not a multiple of the rows a program
    owns; the row's A is 1 at every key, so its O is U), else None (the caller sums V): then the return is
    ``(out, softmax_stats, moments, U or None)``.
    center_keys > 0 (norm "none", no mix_bias): the programs form the mixing bias themselves,
    -center_g = -sum_h W[g, h] / center_keys, the shift one-sweep BatchNorm's moments take (where torch's
    sum and division were two launches).
    separate_stats: compute the softmax statistics in a launch of their own, per head, before the
    forward (no mask, scale > 0); default: the launch rule (``launch.splits_softmax_stats``).
    Ignored with ``stats_given``.
    config: override the launch rule of the forward kernel (``launch.forward_config``).
    allow_tf32: fp32 inputs use TF32 tensor cores on a GPU (default: exact fp32 products).
    lowp_dot: fp16/bf16 dot operands (fp32 accumulation); default True for fp16/bf16 inputs on
    a GPU, False in the interpreter (whose bf16 ``tl.dot`` is wrong).
    """
    if norm not in _NORMS:
        raise ValueError(f"re_attention_forward: norm must be one of {sorted(_NORMS)}, got {norm!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"re_attention_forward: {name} must be 4-D [B, H, N, D], got {tuple(t.shape)}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if k.shape != (B, H, Nk, D) or v.shape != k.shape:
        raise ValueError(f"re_attention_forward: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match ([B, H, Nq, D], [B, H, Nk, D], [B, H, Nk, D])")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"re_attention_forward: q, k, v must share one dtype of {_DTYPES}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    if k.device != device or v.device != device or mix_weight.device != device:
        raise ValueError("re_attention_forward: q, k, v and mix_weight must be on one device")
    if H > MAX_HEADS:
        raise ValueError(f"re_attention_forward: at most {MAX_HEADS} heads are supported, got {H}")
    if Nk == 0 and Nq > 0 and B > 0:
        raise ValueError("re_attention_forward: needs at least one key (Nk = 0)")
    if mix_weight.shape != (H, H):
        raise ValueError(f"re_attention_forward: mix_weight must be [{H}, {H}], got {tuple(mix_weight.shape)}")
    _check_vector("mix_bias", mix_bias, H, device)
    _check_vector("norm_weight", norm_weight, H, device)
    _check_vector("norm_bias", norm_bias, H, device)
    acc_dtype = accumulator_dtype(q)
    bn_eval = running_mean is not None or running_var is not None
    if bn_eval:
        if norm != "batch" or batch_stats is not None or running_mean is None or running_var is None:
            raise ValueError("re_attention_forward: running_mean and running_var go together, with norm='batch' and "
                             "without batch_stats (eval-mode BatchNorm)")
        _check_vector("running_mean", running_mean, H, device)
        _check_vector("running_var", running_var, H, device)
    elif norm == "batch" and (batch_stats is None or batch_stats.shape != (2, H) or not batch_stats.is_contiguous()
                              or batch_stats.dtype != acc_dtype):
        raise ValueError(f"re_attention_forward: norm='batch' needs batch_stats, a contiguous [2, {H}] {acc_dtype} "
                         "tensor (mean; 1/sqrt(var + eps)), from the Gram sums (kernels.gram) or the moments; "
                         "or running_mean and running_var (eval mode)")
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, q, Nk)
    seed, has_dropout = dropout_arguments(dropout_p, seed, device)

    if out is None:
        out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=device)
    elif out.shape != q.shape or out.dtype not in (q.dtype, acc_dtype) or out.device != device:
        raise ValueError(f"re_attention_forward: out must be {tuple(q.shape)} {q.dtype} or {acc_dtype} on {device}")
    stats_shape = softmax_stats_shape(q)
    if softmax_stats is None:
        if stats_given:
            raise ValueError("re_attention_forward: stats_given=True needs softmax_stats")
        softmax_stats = torch.empty(stats_shape, dtype=acc_dtype, device=device)
    elif softmax_stats.shape != stats_shape or softmax_stats.dtype != acc_dtype or softmax_stats.device != device:
        raise ValueError(f"re_attention_forward: softmax_stats must be {stats_shape} {acc_dtype} on {device}")
    if with_moments and norm != "none":
        raise ValueError(f"re_attention_forward: with_moments needs norm='none', got {norm!r}")
    if not isinstance(center_keys, int) or center_keys < 0:
        raise ValueError(f"re_attention_forward: center_keys must be an int >= 0, got {center_keys!r}")
    if center_keys and (norm != "none" or mix_bias is not None):
        given = " and a mix_bias" if mix_bias is not None else ""
        raise ValueError("re_attention_forward: center_keys forms the mixing bias itself: it needs norm='none' "
                         f"and no mix_bias, got norm={norm!r}{given}")
    if value_sums and not with_moments:
        raise ValueError("re_attention_forward: value_sums goes with with_moments")
    if B == 0 or Nq == 0 or D == 0:
        if with_moments:
            moments = torch.zeros((0, 2, H), dtype=acc_dtype, device=device)
            return (out, softmax_stats, moments) + ((None,) if value_sums else ())
        return out, softmax_stats

    if separate_stats and not stats_given and (mask_kind != MASK_NONE or not scale > 0):
        raise ValueError(f"re_attention_forward: separate_stats=True needs no attn_mask and scale > 0, got "
                         f"{'a mask' if mask_kind != MASK_NONE else 'no mask'} and scale {scale}")

    (k, v), Dp = aligned_operands(k, v)
    variant = variant_of(norm, mask_kind != MASK_NONE, has_dropout)
    if separate_stats is None:
        separate_stats = splits_softmax_stats(variant, q.element_size(), scale, H, Dp, with_moments)
    separate_stats = separate_stats and not stats_given
    interpret = interpreting()
    if config is None:
        config = forward_config(Nq, Nk, Dp, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                element_size=q.element_size(), variant=variant,
                                stats_given=stats_given or separate_stats, moments=with_moments)
    config.check_heads(H, "re_attention_forward")
    num_m = config.programs_per_batch(Nq)
    d_chunks = triton.cdiv(Dp, config.BLOCK_D)
    split_heads = config.splits_heads(H, Dp, stats_given=stats_given or separate_stats, norm=norm,
                                      masked=mask_kind != MASK_NONE, has_dropout=has_dropout, d_chunks=d_chunks)
    if split_heads and max(batch_span(q), batch_span(out)) <= INT32_SPAN:
        # The split sweep reads q and writes O once per program, at their own head dim (columns past it
        # masked), so a head dim such as 35 copies only the keys and values it reads at every key block.
        result = out
    else:
        (q,), _ = aligned_operands(q)
        result = out if Dp == D and vector_aligned(out) else out.new_empty((B, H, Nq, Dp))
    options = launch_options(q, lowp_dot, allow_tf32, interpret)
    if separate_stats:
        softmax_stats_launch(q, k, softmax_stats, Dp, scale, options, device, interpret)
        stats_given = True
    moments = torch.empty((num_m * B, 2, config.HP), dtype=acc_dtype, device=device) if with_moments else None
    bias_slot = config.bias_slot(H, has_dropout, mix_bias is not None or norm == "batch" or center_keys > 0)
    bias_slot = bias_slot and not split_heads
    u_row = value_sums and sums_values(config, Nq, split_heads=split_heads, bias_slot=bias_slot,
                                       masked=mask_kind != MASK_NONE, halves=options["DOT_LOWP"] or not K8_DOTS.value,
                                       narrow_out=out.element_size() == 2)
    u = torch.empty((B, H, 1, D), dtype=acc_dtype, device=device) if u_row else None

    # the split sweep takes a head dim that is not a power of two as two power-of-two tiles (48 = 32 + 16)
    d_tail = head_dim_tail(Dp) if split_heads else 0
    dummy = mix_weight
    c = mix_bias if mix_bias is not None else dummy
    nw = norm_weight if norm_weight is not None else dummy
    nb = norm_bias if norm_bias is not None else dummy
    affine_norm = norm != "none"
    # the per-head statistics: batch_stats [2, H] (mean; 1/std), or eval mode's running mean and variance
    bn, rv = (running_mean, running_var) if bn_eval else (batch_stats if norm == "batch" else dummy, dummy)
    run_on_device(
        _re_attention_fwd_kernel, (num_m * B, d_chunks), device,
        q, k, v, mix_weight, c, nw, nb, bn, rv, mask,
        seed if has_dropout else dummy, result, softmax_stats, moments if moments is not None else softmax_stats,
        u if u is not None else softmax_stats,
        *q.stride(), *k.stride(), *v.stride(), *result.stride(), *softmax_stats.stride(), *mask_strides,
        mix_weight.stride(0), mix_weight.stride(1), c.stride(0), nw.stride(0), nb.stride(0), bn.stride(0),
        rv.stride(0), H, Nq, Nk, Dp, D, num_m,
        float(scale) * LOG2E, float(out_scale), float(eps), float(dropout_p), float(max(center_keys, 1)),
        HAS_MIX_BIAS=mix_bias is not None, CENTERS=center_keys > 0, NORM=NORM_NONE if bn_eval else _NORMS[norm],
        BN_EVAL=bn_eval,
        HAS_NORM_WEIGHT=affine_norm and norm_weight is not None, HAS_NORM_BIAS=affine_norm and norm_bias is not None,
        MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout, STATS_GIVEN=stats_given, MOMENTS=moments is not None,
        D_CHUNKS=d_chunks, EVEN_D=Dp == d_chunks * config.BLOCK_D or d_tail > 0,
        RAW_MAX=mask_kind != MASK_ADDITIVE and scale > 0,
        BIAS_SLOT=bias_slot,
        SPLIT_HEADS=split_heads, D_TAIL=d_tail, U_ROW=u_row,
        **options, **config.meta(),
    )
    if result is not out:
        out.copy_(result[..., :D])
    if with_moments:
        return (out, softmax_stats, slot_sums_to_heads(moments, H, config)) + ((u,) if value_sums else ())
    return out, softmax_stats


def sums_values(config: TileConfig, n_q: int, *, split_heads: bool, bias_slot: bool, masked: bool,
                halves: bool, narrow_out: bool) -> bool:
    """Whether the forward's last program can sum V over the keys (U, ``value_sums``) in rows past N_Q at no
    cost per entry: no mask (U sums every key), and rows mixed to A = 1 by weights of their own. The split sweep
    (``_split_weights``' u_rows): its stacked sub-row Q - 1, the last BLOCK_M / Q rows of the block, all past
    n_q. 8 slots with one row group and the mixing bias in a slot (``_value_sums_weights``), whose mixing takes
    the entries in two halves (``common._mix_halves``: 16-bit products, or a Triton without K = 8 dots): the
    rows from BLOCK_M / 2 on, all past n_q; there only with O in a 16-bit dtype (narrow_out: R' as the backend
    keeps it without a mask) and head-dim tiles up to 64, as the launch scan measured the rest spill on sm_90
    (fp32 O at D = 64: 24 B; D = 128: 16-24 B). The rows past n_q in the last program are
    BLOCK_M - n_q % BLOCK_M (none where BLOCK_M divides n_q)."""
    if masked:
        return False
    if split_heads:
        first = config.BLOCK_M - config.BLOCK_M // (16 // (config.HP // 4))
    elif config.HP == 8 and config.G == 1 and bias_slot and halves and narrow_out and config.BLOCK_D <= 64:
        first = config.BLOCK_M // 2
    else:
        return False
    return 0 < n_q % config.BLOCK_M <= first


def softmax_stats_launch(q: torch.Tensor, k: torch.Tensor, softmax_stats: torch.Tensor, d: int, scale: float,
                         options: dict, device: torch.device, interpret: bool) -> None:
    """Write the softmax statistics of q [B, H, Nq, D <= d] (any strides), k [B, H, Nk, d] (aligned:
    ``aligned_operands``) into ``softmax_stats`` [2, B, H, Nq] with ``_softmax_stats_kernel`` (no mask,
    scale > 0)."""
    B, H, Nq, _ = q.shape
    config = softmax_stats_config(d, Nq, interpret=interpret)
    num_m = triton.cdiv(Nq, config.BLOCK_M)
    run_on_device(
        _softmax_stats_kernel, (num_m * B * H,), device,
        q, k, softmax_stats, *q.stride(), *k.stride(), *softmax_stats.stride(), H, Nq, k.shape[2], d, q.shape[-1],
        num_m,
        float(scale) * LOG2E, BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_D=config.BLOCK_D,
        D_TAIL=head_dim_tail(d), EVEN_D=d == config.BLOCK_D + head_dim_tail(d), CDT=options["CDT"],
        DOT_LOWP=options["DOT_LOWP"], DOT_PRECISION=options["DOT_PRECISION"], num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def slot_groups(sums: torch.Tensor, heads: int, config: TileConfig) -> torch.Tensor:
    """Per-slot sums [..., HP] as [..., G, H] (a view): slot s is head s % H of row group s // H."""
    return sums[..., :config.G * heads].unflatten(-1, (config.G, heads))


def slot_sums_to_heads(sums: torch.Tensor, heads: int, config: TileConfig) -> torch.Tensor:
    """Per-program per-slot sums [programs, k, HP] -> per-program per-head sums [programs, k, H]:
    the G row groups of a program add up per head (``slot_groups``); at one group, a view of the first H slots
    (a sum over one group was a launch of its own)."""
    if config.G == 1:
        return sums[..., :heads]
    return slot_groups(sums, heads, config).sum(dim=-2)
