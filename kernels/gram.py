"""Training-mode BatchNorm statistics of the mixed map M without the map: the Gram-sum sweep.

BatchNorm2d(H) on M [B, H, Nq, Nk] needs, per head g, the mean and variance of M_g over its n
unmasked entries. With M_g = sum_h W[g, h] P~_h + c_g they follow from H + H * H sums over the
probabilities (docs/math.md, "BatchNorm statistics through the Gram matrix"; computed from the
sums by ``reattn.distributed.gram_batch_statistics``):

    s1[h]     = sum X_h           G[h, h'] = sum X_h X_h'        with X = P~ - shift
    mean_g    = c_g + shift * sum_h W[g, h] + (W s1)_g / n
    var_g     = (W G W^T)_gg / n - ((W s1)_g / n)^2

over the unmasked entries only. The shift (1/Nk) centres X: without dropout or masks every row of
P sums to 1, so s1 = 0 and the variance is a sum of squares, not a difference of two nearly equal
numbers. These sums add up over processes, which is what BatchNorm synchronized across processes
all-reduces (H^2 + H + 1 numbers). Training BatchNorm on one process runs in one sweep instead
(the forward's moments, ``reattn.backends._fused.one_sweep_batchnorm``).

The sweep needs the softmax statistics first, so it runs the forward's first sweep too and
writes them; the forward then reads them (``stats_given``). Each program reduces its slots'
Gram block [HP, HP] on the tensor cores (X [HP, E] @ X^T) and its s1 in fp32 (fp64 for fp64
inputs) and stores them; the caller adds the programs up in float64. Nothing here imports
``reattn``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (MASK_ADDITIVE, _load_rows, _mm, _probs, _row_stats, _scores, _scores_product, _slot_rows,
                     _store_row_stats)
from .forward import (accumulator_dtype, aligned_operands, dropout_arguments, launch_options, mask_arguments,
                      slot_sums_to_heads, softmax_stats_shape)
from .launch import TileConfig, device_shared_limit, forward_config, interpreting, run_on_device, variant_of


@triton.jit
def _gram_block(gram, s1, q, Qb, Kb, b, H, head, rows, rows_ok, start_n, N_K, D, m2, l2, seed, scale2, dropout_p,
                shift, MASK, stride_mb, stride_mh, stride_mm, stride_mn, stride_qh, stride_qm, stride_qd, stride_kh,
                stride_kn, stride_kd, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_PADDED: tl.constexpr,
                EVEN_D: tl.constexpr, HAS_DROPOUT: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
                LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr):
    """One key block: the sums of X = P~ - shift and of X X^T over the kept entries of real rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    qk = _scores_product(q, Qb, Kb, head, rows, rows_ok, offs_n, N_K, D, stride_qh, stride_qm, stride_qd, stride_kh,
                         stride_kn, stride_kd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP, LOWP_DTYPE,
                         DOT_PRECISION, KEYS_PADDED, EVEN_D)
    head3 = head[:, None, None]
    rows3 = rows[:, :, None]
    keys3 = offs_n[None, None, :]
    t2, kept = _scores(qk, m2[:, :, None], b, head3, rows3, rows_ok[:, :, None], keys3, N_K, scale2, MASK, stride_mb,
                       stride_mh, stride_mm, stride_mn, CDT, MASK_KIND, KEYS_PADDED)
    _, p_tilde, _ = _probs(t2, l2[:, :, None], b, H, head3, rows3, start_n, seed, dropout_p, CDT, HAS_DROPOUT, False)
    # All heads of an entry are kept or masked alike (one mask for all heads): the caller checks it.
    x = tl.where(kept & rows_ok[:, :, None], p_tilde - shift, 0.0)
    s1 += tl.sum(x, axis=2)
    flat = tl.reshape(x, (HP, BLOCK_M * BLOCK_N))
    return _mm(flat, tl.trans(flat), gram, False, CDT, NORM_PRECISION), s1


@triton.jit
def _gram_kernel(
    Q, K, MASK, SEED, STATS, PARTS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sp, stride_sb, stride_sh, stride_sm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N_Q, N_K, D, NUM_PROGRAMS_M,
    scale2, dropout_p, shift,
    HP: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATS_BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, EVEN_D: tl.constexpr, RAW_MAX: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // NUM_PROGRAMS_M).to(tl.int64)
    head, slot_ok, rows, rows_ok = _slot_rows((pid % NUM_PROGRAMS_M) * (G * BLOCK_M), H, N_Q, HP, G, BLOCK_M)
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    q = _load_rows(Qb, head, rows, rows_ok, tl.arange(0, BLOCK_D), D, stride_qh, stride_qm, stride_qd, CDT, DOT_LOWP)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    m2, l2 = _row_stats(q, Qb, Kb, b, head, slot_ok, rows, rows_ok, N_K, D, stride_qh, stride_qm, stride_qd, stride_kh,
                        stride_kn, stride_kd, scale2, MASK, stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M,
                        STATS_BLOCK_N, BLOCK_D, D_CHUNKS, CDT, MASK_KIND, RAW_MAX, EVEN_D, DOT_LOWP, LOWP_DTYPE,
                        DOT_PRECISION)
    _store_row_stats(STATS + b * stride_sb, m2, l2, rows, rows_ok, head, stride_sp, stride_sh, stride_sm)

    gram = tl.zeros([HP, HP], CDT)
    s1 = tl.zeros([HP, BLOCK_M], CDT)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        gram, s1 = _gram_block(gram, s1, q, Qb, Kb, b, H, head, rows, rows_ok, start_n, N_K, D, m2, l2, seed, scale2,
                               dropout_p, shift, MASK, stride_mb, stride_mh, stride_mm, stride_mn, stride_qh,
                               stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, HP, BLOCK_M, BLOCK_N, BLOCK_D,
                               D_CHUNKS, MASK_KIND, False, EVEN_D, HAS_DROPOUT, CDT, DOT_LOWP, LOWP_DTYPE,
                               DOT_PRECISION, NORM_PRECISION)
    if n_full < N_K:
        gram, s1 = _gram_block(gram, s1, q, Qb, Kb, b, H, head, rows, rows_ok, n_full, N_K, D, m2, l2, seed, scale2,
                               dropout_p, shift, MASK, stride_mb, stride_mh, stride_mm, stride_mn, stride_qh,
                               stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, HP, BLOCK_M, BLOCK_N, BLOCK_D,
                               D_CHUNKS, MASK_KIND, True, EVEN_D, HAS_DROPOUT, CDT, DOT_LOWP, LOWP_DTYPE,
                               DOT_PRECISION, NORM_PRECISION)
    offs_s = tl.arange(0, HP)
    parts = PARTS + pid.to(tl.int64) * (HP * HP + HP)
    tl.store(parts + offs_s[:, None] * HP + offs_s[None, :], gram)
    tl.store(parts + HP * HP + offs_s, tl.sum(s1, axis=1))


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
    config: Optional[TileConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sums training-mode BatchNorm needs, without materializing the map.

    Returns ``(softmax_stats [2, B, H, Nq], s1 [H], gram [H, H])``: s1 and gram float64 sums of
    X = P~ - shift over the unmasked entries, the statistics as ``kernels.forward.re_attention_forward``
    computes them (pass them back with ``stats_given=True``). ``shift`` should be 1/Nk rounded to
    float32. The mask, if any, must be the same for every head. Same argument conventions as the
    forward. (The mean and variance of M follow from these, W and c:
    ``reattn.distributed.gram_batch_statistics``.) config: override the launch rule.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    device = q.device
    stats = torch.empty(softmax_stats_shape(q), dtype=accumulator_dtype(q), device=device)
    s1 = torch.zeros((H,), dtype=torch.float64, device=device)
    gram = torch.zeros((H, H), dtype=torch.float64, device=device)
    if B == 0 or Nq == 0:
        return stats, s1, gram
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, q, Nk)
    seed, has_dropout = dropout_arguments(dropout_p, seed, device)
    (q, k), D = aligned_operands(q, k)
    interpret = interpreting()
    if config is None:
        config = forward_config(Nq, Nk, D, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                element_size=q.element_size(), variant=variant_of("none", mask_kind != 0, has_dropout))
    options = launch_options(q, lowp_dot, False, interpret)
    num_m = config.programs_per_batch(Nq)
    d_chunks = triton.cdiv(D, config.BLOCK_D)
    hp = config.HP
    parts = torch.empty((num_m * B, hp * hp + hp), dtype=accumulator_dtype(q), device=device)
    run_on_device(
        _gram_kernel, (num_m * B,), device,
        q, k, mask, seed if has_dropout else q, stats, parts,
        *q.stride(), *k.stride(), *stats.stride(), *mask_strides,
        H, Nq, Nk, D, num_m, float(scale) * 1.4426950408889634, float(dropout_p), float(shift),
        D_CHUNKS=d_chunks, EVEN_D=D == d_chunks * config.BLOCK_D,
        RAW_MAX=mask_kind != MASK_ADDITIVE and scale > 0, MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout,
        **options, **config.meta(),
    )
    total = parts.sum(dim=0, dtype=torch.float64)
    g_slots = total[:hp * hp].reshape(hp, hp)
    gram = sum(g_slots[r * H:(r + 1) * H, r * H:(r + 1) * H] for r in range(config.G))
    s1 = slot_sums_to_heads(total[None, None, hp * hp:], H, config)[0, 0]
    return stats, s1, gram
