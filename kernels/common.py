"""``@triton.jit`` tile helpers shared by the Re-attention kernels (forward, statistics, backward).

Every kernel works on all-head tiles ``[HP, BLOCK_M, BLOCK_N]`` (padded heads x query rows x
keys) and recomputes the same things from q, k and the saved row logsumexp; they live here once
so the forward, the BatchNorm statistics sweep and the backward cannot drift apart:

* ``_row_logsumexp``: the first key sweep (online logsumexp per head and row);
* ``_probs_tile``: exact probabilities P = exp(S - L) with the mask applied, and the dropped-out
  P~ = P * Z / (1 - p);
* ``_mix_norm_tile``: M = W P~ + c and the normalized map (none / LayerNorm across heads /
  BatchNorm with given batch statistics).

Masks: MASK_KIND 0 = none, 1 = bool (stored as uint8, 1 = attend), 2 = additive (in the
computation dtype; -inf masks). Masked entries get P = 0. A row whose keys are all masked gets
L = +inf, so P = exp(S - L) = 0 for it everywhere, never NaN. Rows past Nq and padded heads
also get P = 0.

Dropout: Z[b, h, i, j] = (u >= p) with u uniform from Philox keyed by ``seed`` and the counters
(j, i, b * H + h, 0): a pure function of the position, so the backward replays it exactly
(and ``kernels.dropout.dropout_keep_mask`` materializes it for tests).

Nothing here imports ``reattn``; only triton.
"""
import triton
import triton.language as tl

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADDITIVE = 2

NORM_NONE = 0
NORM_LAYER = 1
NORM_BATCH = 2  # normalized with given per-head batch statistics (training-mode BatchNorm)


@triton.jit
def _mm(a, b, acc, LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` for 2-D or batched 3-D tiles.

    LOWP: cast both operands to LOWP_DTYPE (fp16/bf16) so the product runs on tensor cores
    with an fp32 accumulator (GPU only: bf16 ``tl.dot`` is wrong in Triton's interpreter).
    Otherwise the operands are used as given (fp32 or fp64) with ``input_precision=PRECISION``
    ("ieee" for exact fp32, "tf32" when the caller allows it).
    """
    if LOWP:
        return tl.dot(a.to(LOWP_DTYPE), b.to(LOWP_DTYPE), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _query_block(NUM_M_BLOCKS, H, N_Q, HP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Which rows a program owns: batch element b (int64), BLOCK_M query rows, all HP (padded) heads.

    Returns (b, offs_h, offs_m, h_ok, m_ok, h3, m3, h_ok3, valid_hm): the index vectors, their
    validity, the int64 head/row offsets shaped for [HP, BLOCK_M, *] tiles, and the [HP, BLOCK_M]
    mask of real (head, row) pairs.
    """
    pid = tl.program_id(0)
    b = (pid // NUM_M_BLOCKS).to(tl.int64)
    offs_h = tl.arange(0, HP)
    offs_m = (pid % NUM_M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    h_ok = offs_h < H
    m_ok = offs_m < N_Q
    h3 = offs_h.to(tl.int64)[:, None, None]
    m3 = offs_m.to(tl.int64)[None, :, None]
    return b, offs_h, offs_m, h_ok, m_ok, h3, m3, h_ok[:, None, None], h_ok[:, None] & m_ok[None, :]


@triton.jit
def _dropout_keep(seed, b, H, offs_h, offs_m, offs_n, dropout_p,
                  HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bool keep-mask [HP, BLOCK_M, BLOCK_N] of dropout for batch ``b``, heads/rows/keys given."""
    zero = tl.zeros([HP, BLOCK_M, BLOCK_N], tl.int32)
    c0 = zero + offs_n[None, None, :]
    c1 = zero + offs_m[None, :, None]
    c2 = zero + (b * H + offs_h[:, None, None]).to(tl.int32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    return tl.random.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _mask_tile(MASK, b, h3, m3, n3, valid, stride_mb, stride_mh, stride_mm, stride_mn,
               MASK_KIND: tl.constexpr, CDT: tl.constexpr):
    """(additive scores, masked) of the [HP, BLOCK_M, BLOCK_N] tile; MASK is expanded by strides."""
    ptrs = MASK + b * stride_mb + h3 * stride_mh + m3 * stride_mm + n3 * stride_mn
    if MASK_KIND == 1:
        masked = tl.load(ptrs, mask=valid, other=1) == 0
        add = tl.zeros(masked.shape, CDT)
    else:
        add = tl.load(ptrs, mask=valid, other=0.0).to(CDT)
        masked = add == float("-inf")
        add = tl.where(masked, 0.0, add)
    return add, masked


@triton.jit
def _scores_tile(qk, b, h3, m3, offs_n, valid, scale,
                 MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                 HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                 MASK_KIND: tl.constexpr):
    """S = scale * qk (+ additive mask) with -inf where masked or invalid; and the mask tile.

    ``qk`` is the [HP, BLOCK_M, BLOCK_N] product q k^T (over the whole head dim).
    """
    s = qk * scale
    if MASK_KIND != 0:
        add, masked = _mask_tile(MASK, b, h3, m3, offs_n.to(tl.int64)[None, None, :], valid, stride_mb, stride_mh,
                                 stride_mm, stride_mn, MASK_KIND, CDT)
        s = tl.where(masked, float("-inf"), s + add)
    else:
        masked = tl.zeros([HP, BLOCK_M, BLOCK_N], tl.int1)
    s = tl.where(valid, s, float("-inf"))
    return s, masked


@triton.jit
def _chunked_product(a_own, A, B, h3, m3, row_ok3, h_ok3, n64, n_ok, D, stride_ah, stride_am, stride_ad,
                     stride_bh, stride_bd, stride_bn,
                     HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     D_CHUNKS: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """[HP, BLOCK_M, BLOCK_N] = sum over the whole head dim of A rows (h, m) times B rows (h, n).

    A, B point at one batch element (q and k for the scores, dO and v in the backward). With one
    head-dim chunk ``a_own`` is the program's [HP, BLOCK_M, BLOCK_D] A tile, loaded once; with
    several, each chunk of A is re-read here (from cache) for every key block, so a program
    stages only BLOCK_D columns of A and B at a time: shared memory scales with BLOCK_D, not D.
    """
    acc = tl.zeros([HP, BLOCK_M, BLOCK_N], CDT)
    for chunk in tl.static_range(D_CHUNKS):
        offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if D_CHUNKS == 1:
            a_c = a_own
        else:
            # The n_ok term ties this load to the key block: loop-invariant, the compiler hoists
            # every chunk's A tile out of the key loop and holds them all (measured at D = 128 on
            # sm_80: 263168 B of shared memory in chunks of 64, 99328 B with this term in chunks of 32).
            live = (tl.zeros([1, 1, BLOCK_D], tl.int32) + tl.sum(n_ok.to(tl.int32), axis=0)) > 0
            a_c = tl.load(A + h3 * stride_ah + m3 * stride_am + offs_d[None, None, :] * stride_ad,
                          mask=row_ok3 & d_ok[None, None, :] & live, other=0.0)
            if not DOT_LOWP:
                a_c = a_c.to(CDT)
        b_c = tl.load(B + h3 * stride_bh + offs_d[None, :, None] * stride_bd + n64[None, None, :] * stride_bn,
                      mask=h_ok3 & d_ok[None, :, None] & n_ok[None, None, :], other=0.0)
        if not DOT_LOWP:
            b_c = b_c.to(CDT)
        acc = _mm(a_c, b_c, acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return acc


@triton.jit
def _row_logsumexp(q, Qb, Kb, h3, m3, row_ok3, h_ok3, D, stride_qh, stride_qm, stride_qd,
                   stride_kh, stride_kd, stride_kn, b, valid_hm, N_K, scale,
                   MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                   HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D_CHUNKS: tl.constexpr, CDT: tl.constexpr,
                   MASK_KIND: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """L [HP, BLOCK_M] = logsumexp_j S over all keys; +inf for rows with no key (masked or padded).

    q is the program's query tile (used as is with one head-dim chunk); Qb, Kb point at batch b.
    """
    m_i = tl.full([HP, BLOCK_M], float("-inf"), CDT)
    l_i = tl.zeros([HP, BLOCK_M], CDT)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        qk = _chunked_product(q, Qb, Kb, h3, m3, row_ok3, h_ok3, offs_n.to(tl.int64), n_ok, D, stride_qh, stride_qm,
                              stride_qd, stride_kh, stride_kd, stride_kn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS,
                              CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        s, _ = _scores_tile(qk, b, h3, m3, offs_n, valid_hm[:, :, None] & n_ok[None, None, :], scale, MASK,
                            stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, axis=2))
        # A row with nothing seen yet has m_new = -inf: use 0 as the reference so exp() stays 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, :, None]), axis=2)
        m_i = m_new
    return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))


@triton.jit
def _probs_tile(qk, lse, b, H, offs_h, offs_m, offs_n, valid, scale, seed, dropout_p,
                MASK, stride_mb, stride_mh, stride_mm, stride_mn,
                HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(P, P~ = dropout(P), drop_scale = Z / (1 - p), masked) for one [HP, BLOCK_M, BLOCK_N] tile.

    ``qk`` is the product q k^T of the tile; ``lse`` [HP, BLOCK_M] is +inf for rows that must
    produce nothing; P is 0 wherever ``valid`` is False or the entry is masked.
    """
    s, masked = _scores_tile(qk, b, offs_h.to(tl.int64)[:, None, None], offs_m.to(tl.int64)[None, :, None], offs_n,
                             valid, scale, MASK, stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT,
                             MASK_KIND)
    p = tl.exp(s - lse[:, :, None])
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, b, H, offs_h, offs_m, offs_n, dropout_p, HP, BLOCK_M, BLOCK_N)
        # 1 / (1 - p) in the computation dtype (fp64 for fp64 inputs), not in fp32.
        drop_scale = tl.where(keep, 1.0 / (tl.full([], 1.0, CDT) - dropout_p), 0.0)
        p_tilde = p * drop_scale
    else:
        drop_scale = tl.full([HP, BLOCK_M, BLOCK_N], 1.0, CDT)
        p_tilde = p
    return p, p_tilde, drop_scale, masked


@triton.jit
def _mix_norm_tile(p_tilde, w, c, nw, nb, bn_mean, bn_rstd, h_ok3, H, eps,
                   HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
                   HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
                   HAS_NORM_BIAS: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """(normalized map before out_scale, xhat, LayerNorm 1/std) from P~ [HP, BLOCK_M, BLOCK_N].

    M = W [HP, HP] @ P~ [HP, BLOCK_M * BLOCK_N] + c. NORM_NONE: xhat = M. NORM_LAYER: xhat = M
    normalized across the H real heads at each (i, j) (padded heads hold exact zeros).
    NORM_BATCH: xhat = (M - bn_mean) * bn_rstd per head. The result is xhat * nw + nb.
    """
    mix = _mm(w, tl.reshape(p_tilde, (HP, BLOCK_M * BLOCK_N)), tl.zeros([HP, BLOCK_M * BLOCK_N], CDT),
              DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    mix = tl.reshape(mix, (HP, BLOCK_M, BLOCK_N))
    if HAS_MIX_BIAS:
        mix = mix + c[:, None, None]
    rstd = tl.zeros([BLOCK_M, BLOCK_N], CDT)
    if NORM == 1:
        mean = tl.sum(mix, axis=0) / H
        xc = tl.where(h_ok3, mix - mean[None, :, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / H + eps)
        xhat = xc * rstd[None, :, :]
    elif NORM == 2:
        xhat = (mix - bn_mean[:, None, None]) * bn_rstd[:, None, None]
    else:
        xhat = mix
    normed = xhat
    if HAS_NORM_WEIGHT:
        normed = normed * nw[:, None, None]
    if HAS_NORM_BIAS:
        normed = normed + nb[:, None, None]
    return normed, xhat, rstd


@triton.jit
def _load_head_vectors(C, NW, NB, BN, offs_h, h_ok, H, stride_c, stride_nw, stride_nb,
                       HP: tl.constexpr, CDT: tl.constexpr, HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr,
                       HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """(mix bias c, norm weight, norm bias, batch mean, batch 1/std) as [HP] vectors, 0 where absent.

    BN is a contiguous [2, H] tensor (mean; 1/sqrt(var + eps)), read only for NORM_BATCH.
    """
    c = tl.zeros([HP], CDT)
    nw = tl.zeros([HP], CDT)
    nb = tl.zeros([HP], CDT)
    bn_mean = tl.zeros([HP], CDT)
    bn_rstd = tl.zeros([HP], CDT)
    if HAS_MIX_BIAS:
        c = tl.load(C + offs_h * stride_c, mask=h_ok, other=0.0).to(CDT)
    if HAS_NORM_WEIGHT:
        nw = tl.load(NW + offs_h * stride_nw, mask=h_ok, other=0.0).to(CDT)
    if HAS_NORM_BIAS:
        nb = tl.load(NB + offs_h * stride_nb, mask=h_ok, other=0.0).to(CDT)
    if NORM == 2:
        bn_mean = tl.load(BN + offs_h, mask=h_ok, other=0.0).to(CDT)
        bn_rstd = tl.load(BN + H + offs_h, mask=h_ok, other=0.0).to(CDT)
    return c, nw, nb, bn_mean, bn_rstd
