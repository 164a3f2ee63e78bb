"""Training-mode BatchNorm statistics of the mixed map M, without the map: the Gram-matrix sweep.

BatchNorm2d(H) on M [B, H, Nq, Nk] needs, per head g, the mean and variance of M_g over its n
unmasked entries. With M_g = sum_h W[g, h] P~_h + c_g these follow from H + H*H sums over the
probabilities (shared/design/reattention-math.md; computed from the sums in
``reattn.distributed.gram_batch_statistics``):

    s1[h]     = sum X_h           G[h, h'] = sum X_h X_h'        with X = P~ - kappa
    mean_g    = c_g + kappa * sum_h W[g, h] + (W s1)_g / n
    var_g     = (W G W^T)_gg / n - ((W s1)_g / n)^2              (biased, as BatchNorm normalizes)

Sums run over the unmasked entries only (masked entries have P~ = 0 and are left out). The
shift kappa = 1 / Nk centres X: without dropout or masks every row of P sums to 1, so s1 = 0 and
the variance is a sum of squares, not a difference of two nearly equal numbers (which in fp32
would lose the variance of near-uniform attention maps). Each program reduces its
[HP, BLOCK_M, BLOCK_N] tiles in fp32 (fp64 for fp64 inputs) and adds its partial sums into
fp64 buffers atomically.

The sweep needs L first, so it runs the forward's pass 1 too and writes ``lse``; the forward
then reads it (``lse_is_input``) instead of recomputing it. Nothing here imports ``reattn``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import _chunked_product, _mm, _probs_tile, _query_block, _row_logsumexp
from .forward import accumulator_dtype, dropout_arguments, launch_options, mask_arguments, run_on_device
from .launch import ForwardConfig, device_shared_limit, forward_config, interpreting


@triton.jit
def _bn_stats_kernel(
    Q, K, MASK, SEED, LSE, S1, GRAM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N_Q, N_K, D, NUM_M_BLOCKS,
    scale, dropout_p, shift,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, offs_h, offs_m, h_ok, m_ok, h3, m3, h_ok3, valid_hm = _query_block(NUM_M_BLOCKS, H, N_Q, HP, BLOCK_M)
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok3 = h_ok3 & m_ok[None, :, None]
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb

    # The first head-dim chunk of the query tile (the whole rows unless the launch rule split D).
    q = tl.load(Qb + h3 * stride_qh + m3 * stride_qm + offs_d[None, None, :] * stride_qd,
                mask=row_ok3 & d_ok[None, None, :], other=0.0)
    if not DOT_LOWP:
        q = q.to(CDT)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    lse = _row_logsumexp(q, Qb, Kb, h3, m3, row_ok3, h_ok3, D, stride_qh, stride_qm, stride_qd, stride_kh,
                         stride_kd, stride_kn, b, valid_hm, N_K, scale, MASK, stride_mb, stride_mh, stride_mm,
                         stride_mn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, MASK_KIND, DOT_LOWP,
                         LOWP_DTYPE, DOT_PRECISION)
    tl.store(LSE + b * stride_lb + offs_h[:, None] * stride_lh + offs_m[None, :] * stride_lm,
             lse.to(LSE.dtype.element_ty), mask=valid_hm)

    s1 = tl.zeros([HP], CDT)
    gram = tl.zeros([HP, HP], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        qk = _chunked_product(q, Qb, Kb, h3, m3, row_ok3, h_ok3, offs_n.to(tl.int64), n_ok, D, stride_qh, stride_qm,
                              stride_qd, stride_kh, stride_kd, stride_kn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS,
                              CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        valid = valid_hm[:, :, None] & n_ok[None, None, :]
        _, p_tilde, _, masked = _probs_tile(
            qk, lse, b, H, offs_h, offs_m, offs_n, valid, scale, seed, dropout_p, MASK, stride_mb, stride_mh,
            stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT, MASK_KIND, HAS_DROPOUT)
        x = tl.where(valid & (masked == 0), p_tilde - shift, 0.0)
        s1 += tl.sum(tl.sum(x, axis=2), axis=1)
        x2 = tl.reshape(x, (HP, BLOCK_M * BLOCK_N))
        # Exact products for the statistics (no low-precision or TF32 dot here).
        gram = _mm(x2, tl.trans(x2), gram, False, LOWP_DTYPE, "ieee")

    tl.atomic_add(S1 + offs_h, s1.to(tl.float64), mask=h_ok)
    tl.atomic_add(GRAM + offs_h[:, None] * H + offs_h[None, :], gram.to(tl.float64),
                  mask=h_ok[:, None] & h_ok[None, :])


def gram_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    shift: float,
    lowp_dot: Optional[bool] = None,
    config: Optional[ForwardConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums training-mode BatchNorm needs, without materializing the map.

    Returns ``(lse [B, H, Nq], s1 [H], gram [H, H])``: s1 and gram float64 sums of X = P~ - shift
    over the unmasked entries, lse as ``kernels.forward.re_attention_forward`` computes it (pass it
    back with ``lse_is_input=True``). ``shift`` should be 1/Nk rounded to float32. Same argument
    conventions as the forward. (The mean and variance of M follow from these, W and c:
    ``reattn.distributed.gram_batch_statistics``.) config: override the launch rule.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    device = q.device
    lse = torch.empty((B, H, Nq), dtype=accumulator_dtype(q), device=device)
    s1 = torch.zeros((H,), dtype=torch.float64, device=device)
    gram = torch.zeros((H, H), dtype=torch.float64, device=device)
    if B > 0 and Nq > 0:
        mask, mask_kind, mask_strides = mask_arguments(attn_mask, q, Nk)
        seed, has_dropout = dropout_arguments(dropout_p, seed, device)
        interpret = interpreting()
        if config is None:
            config = forward_config(Nq, Nk, D, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                    kernel="bn_stats", element_size=q.element_size())
        cdt, lowp_dot, precision = launch_options(q, lowp_dot, False, interpret)
        num_m = triton.cdiv(Nq, config.BLOCK_M)
        run_on_device(
            _bn_stats_kernel, (num_m * B,), device,
            q, k, mask, seed if has_dropout else q, lse, s1, gram,
            *q.stride(), *k.stride(), *lse.stride(), *mask_strides,
            H, Nq, Nk, D, num_m, float(scale), float(dropout_p), float(shift),
            D_CHUNKS=triton.cdiv(D, config.BLOCK_D), MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout, CDT=cdt,
            DOT_LOWP=lowp_dot, DOT_PRECISION=precision,
            **config.meta(),
        )
    return lse, s1, gram
