"""Fused Re-attention forward in Triton: never writes a [B, H, Nq, Nk] tensor.

    S_h = scale * Q_h K_h^T (+ mask),  L_h = logsumexp_j S_h,  P_h = exp(S_h - L_h)
    P~_h = P_h * Z_h / (1 - p)    (dropout, Philox keyed by position: see kernels/common.py)
    M_g = sum_h W[g, h] P~_h + c_g,  A = out_scale * Norm(M) (0 where masked),  O_g = A_g V_g

One program handles one batch element, BLOCK_M query rows and ALL heads (padded to HP), since
the head mixing needs every head of a tile. Two sweeps over the keys in one launch
(see shared/design/reattention-math.md):

  pass 1: batched S = Q K^T over [HP, BLOCK_M, BLOCK_N] tiles with an online logsumexp -> L
          (written out as ``lse`` for the backward); skipped when the BatchNorm statistics
          sweep (kernels/bn_stats.py) already wrote L;
  pass 2: recompute S, P = exp(S - L) for all heads, drop out, mix heads with one matrix
          product W [HP, HP] @ P~ [HP, BLOCK_M * BLOCK_N], add c, normalise (nothing, LayerNorm
          across heads, or BatchNorm with the given batch statistics), scale, zero masked
          entries, and accumulate A [HP, BLOCK_M, BLOCK_N] @ V [HP, BLOCK_N, BLOCK_D] into an
          fp32 (fp64 for fp64 inputs) accumulator. With MOMENTS (training BatchNorm in one sweep,
          norm "none"), also the per-head sums of the map and of its square over the program's
          real unmasked entries, stored per program (summed in float64 by the caller).

All arithmetic is done in fp32 (fp64 for fp64 inputs); loads are upcast at once. With
fp16/bf16 inputs on a GPU (LOWP) the dot operands are cast to the input dtype for the tensor
cores, accumulating in fp32.

Nothing here imports ``reattn``: torch and triton only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (MASK_ADDITIVE, MASK_BOOL, MASK_NONE, NORM_BATCH, NORM_LAYER, NORM_NONE, _chunked_product,
                     _load_head_vectors, _mix_norm_tile, _mm, _probs_tile, _query_block, _row_logsumexp)
from .launch import MAX_HEADS, ForwardConfig, device_shared_limit, forward_config, interpreting, run_on_device

_NORMS = {"none": NORM_NONE, "layer": NORM_LAYER, "batch": NORM_BATCH}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _re_attention_fwd_kernel(
    Q, K, V, W, C, NW, NB, BN, MASK, SEED, O, LSE, MOM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_wg, stride_wh, stride_c, stride_nw, stride_nb,
    H, N_Q, N_K, D, NUM_M_BLOCKS,
    scale, out_scale, eps, dropout_p,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    HAS_MIX_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, LSE_IS_INPUT: tl.constexpr,
    MOMENTS: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, offs_h, offs_m, h_ok, m_ok, h3, m3, h_ok3, valid_hm = _query_block(NUM_M_BLOCKS, H, N_Q, HP, BLOCK_M)
    # Head-dim chunk of O this program writes (D_CHUNKS > 1 when the launch rule splits the head
    # dim to fit shared memory: every chunk recomputes the scores over the whole head dim).
    pid_d = tl.program_id(1)
    LOWP_DTYPE: tl.constexpr = Q.dtype.element_ty
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok3 = h_ok3 & m_ok[None, :, None]
    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb

    # Query tile of all heads [HP, BLOCK_M, BLOCK_D]; padded heads/rows/dims read as 0.
    q_mask = row_ok3 & d_ok[None, None, :]
    q = tl.load(Qb + h3 * stride_qh + m3 * stride_qm + offs_d[None, None, :] * stride_qd, mask=q_mask, other=0.0)
    if not DOT_LOWP:
        q = q.to(CDT)
    v_base = V + b * stride_vb + h3 * stride_vh + offs_d[None, None, :] * stride_vd
    vd_mask = h_ok3 & d_ok[None, None, :]
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    # ---- pass 1: row logsumexp (or the one the statistics sweep already wrote) ----
    lse_ptrs = LSE + b * stride_lb + offs_h[:, None] * stride_lh + offs_m[None, :] * stride_lm
    if LSE_IS_INPUT:
        lse = tl.load(lse_ptrs, mask=valid_hm, other=float("inf")).to(CDT)
    else:
        lse = _row_logsumexp(q, Qb, Kb, h3, m3, row_ok3, h_ok3, D, stride_qh, stride_qm, stride_qd, stride_kh,
                             stride_kd, stride_kn, b, valid_hm, N_K, scale, MASK, stride_mb, stride_mh, stride_mm,
                             stride_mn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, MASK_KIND, DOT_LOWP,
                             LOWP_DTYPE, DOT_PRECISION)
        tl.store(lse_ptrs, lse.to(LSE.dtype.element_ty), mask=valid_hm & ((offs_m * 0 + pid_d) == 0)[None, :])

    # ---- mixing / norm parameters (padded heads: zero weights, zero bias) ----
    w = tl.load(W + offs_h[:, None] * stride_wg + offs_h[None, :] * stride_wh,
                mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(CDT)
    c, nw, nb, bn_mean, bn_rstd = _load_head_vectors(C, NW, NB, BN, offs_h, h_ok, H, stride_c, stride_nw, stride_nb,
                                                     HP, CDT, HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS)

    # ---- pass 2: exact P tile by tile, dropout, mix, normalise, multiply by V ----
    acc = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
    s1 = tl.zeros([HP], CDT)
    s2 = tl.zeros([HP], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        n3_ok = n_ok[None, None, :]
        qk = _chunked_product(q, Qb, Kb, h3, m3, row_ok3, h_ok3, offs_n.to(tl.int64), n_ok, D, stride_qh, stride_qm,
                              stride_qd, stride_kh, stride_kd, stride_kn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS,
                              CDT, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        valid = valid_hm[:, :, None] & n3_ok
        p, p_tilde, _, masked = _probs_tile(
            qk, lse, b, H, offs_h, offs_m, offs_n, valid, scale, seed, dropout_p, MASK, stride_mb, stride_mh,
            stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, CDT, MASK_KIND, HAS_DROPOUT)
        normed, _, _ = _mix_norm_tile(p_tilde, w, c, nw, nb, bn_mean, bn_rstd, h_ok3, H, eps, HP, BLOCK_M, BLOCK_N,
                                      CDT, HAS_MIX_BIAS, NORM, HAS_NORM_WEIGHT, HAS_NORM_BIAS, DOT_LOWP, LOWP_DTYPE,
                                      DOT_PRECISION)
        # Masked entries are zeroed after the norm: they contribute nothing to O.
        a = tl.where(h_ok3 & n3_ok & (masked == 0), normed * out_scale, 0.0)
        if MOMENTS:  # per-head sums of the map over this program's real, unmasked entries
            x = tl.where(valid & (masked == 0), normed, 0.0)
            s1 += tl.sum(tl.sum(x, axis=2), axis=1)
            s2 += tl.sum(tl.sum(x * x, axis=2), axis=1)
        vt = tl.load(v_base + offs_n.to(tl.int64)[None, :, None] * stride_vn,
                     mask=vd_mask & n_ok[None, :, None], other=0.0)
        if not DOT_LOWP:
            vt = vt.to(CDT)
        acc = _mm(a, vt, acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)

    o_ptrs = O + b * stride_ob + h3 * stride_oh + m3 * stride_om + offs_d[None, None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=q_mask)
    if MOMENTS:  # every head-dim chunk summed the same map: the first one stores the sums
        mom_ptrs = MOM + tl.program_id(0).to(tl.int64) * 2 * HP + offs_h
        store_here = (offs_h * 0 + pid_d) == 0
        tl.store(mom_ptrs, s1.to(MOM.dtype.element_ty), mask=store_here)
        tl.store(mom_ptrs + HP, s2.to(MOM.dtype.element_ty), mask=store_here)


def _check_vector(name: str, t: Optional[torch.Tensor], h: int, device: torch.device) -> None:
    if t is None:
        return
    if t.shape != (h,):
        raise ValueError(f"re_attention_forward: {name} must have shape ({h},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"re_attention_forward: {name} is on {t.device}, q on {device}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"re_attention_forward: {name} must be floating point, got {t.dtype}")


def accumulator_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of the logsumexp, statistics and atomically reduced gradients: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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


def launch_options(q: torch.Tensor, lowp_dot: Optional[bool], allow_tf32: bool, interpret: bool):
    """(CDT, DOT_LOWP, DOT_PRECISION): compute dtype and how tl.dot runs for q's dtype."""
    low = q.dtype in (torch.float16, torch.bfloat16)
    if lowp_dot is None:
        lowp_dot = low and not interpret
    cdt = tl.float64 if q.dtype == torch.float64 else tl.float32
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"
    return cdt, bool(lowp_dot and low), precision


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
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    lse_is_input: bool = False,
    with_moments: bool = False,
    config: Optional[ForwardConfig] = None,
    allow_tf32: bool = False,
    lowp_dot: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused Re-attention forward. Returns ``(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq])``.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides, same dtype: fp16, bf16, fp32 or fp64).
    mix_weight: [H, H] indexed [out, in]; mix_bias, norm_weight, norm_bias: [H] or None.
    norm: "none" (BatchNorm in eval mode is folded into mix_weight/mix_bias by the caller),
    "layer" (LayerNorm across the heads at each (b, i, j)) or "batch" (training-mode BatchNorm
    with ``batch_stats`` = [2, H] (mean, 1/sqrt(var + eps)) from ``kernels.bn_stats``).
    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Nq, Nk].
    dropout_p, seed: dropout on P before mixing, keyed by ``seed`` ([1] int64 on q's device).
    lse: natural-log logsumexp of the (masked) scores per (b, h, i), +inf for rows with every key
    masked; float32, or float64 for float64 inputs. ``out``/``lse`` may be given (any strides);
    ``lse_is_input=True`` reads ``lse`` instead of computing it (the statistics sweep wrote it).
    ``out`` may also be in the accumulation dtype (float32; float64 for float64 inputs).
    with_moments (norm "none" only): also return ``moments`` [programs, 2, H] in the accumulation
    dtype: per program (B * ceil(Nq / BLOCK_M) of them), the sums over its real unmasked entries of
    the map X = W P~ + mix_bias and of X^2, per head; what training BatchNorm's one-sweep forward
    needs (``reattn.backends._fused``). Sum them over programs in float64.
    config: override the launch heuristic (``launch.forward_config``).
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
    if norm == "batch" and (batch_stats is None or batch_stats.shape != (2, H) or not batch_stats.is_contiguous()
                            or batch_stats.dtype != acc_dtype):
        raise ValueError(f"re_attention_forward: norm='batch' needs batch_stats, a contiguous [2, {H}] {acc_dtype} "
                         "tensor (mean; 1/sqrt(var + eps)) from kernels.bn_stats")
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, q, Nk)
    seed, has_dropout = dropout_arguments(dropout_p, seed, device)

    if out is None:
        out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=device)
    elif out.shape != q.shape or out.dtype not in (q.dtype, acc_dtype) or out.device != device:
        raise ValueError(f"re_attention_forward: out must be {tuple(q.shape)} {q.dtype} or {acc_dtype} on {device}")
    if lse is None:
        if lse_is_input:
            raise ValueError("re_attention_forward: lse_is_input=True needs lse")
        lse = torch.empty((B, H, Nq), dtype=acc_dtype, device=device)
    elif lse.shape != (B, H, Nq) or lse.dtype != acc_dtype or lse.device != device:
        raise ValueError(f"re_attention_forward: lse must be {(B, H, Nq)} {acc_dtype} on {device}")
    if with_moments and norm != "none":
        raise ValueError(f"re_attention_forward: with_moments needs norm='none', got {norm!r}")
    if B == 0 or Nq == 0 or D == 0:
        return (out, lse, torch.zeros((0, 2, H), dtype=acc_dtype, device=device)) if with_moments else (out, lse)

    interpret = interpreting()
    if config is None:
        config = forward_config(Nq, Nk, D, H, interpret=interpret, shared_limit=device_shared_limit(device),
                                element_size=q.element_size())
    if config.HP < H:
        raise ValueError(f"re_attention_forward: config {config} has fewer than H={H} heads")
    cdt, lowp_dot, precision = launch_options(q, lowp_dot, allow_tf32, interpret)
    num_m = triton.cdiv(Nq, config.BLOCK_M)
    d_chunks = triton.cdiv(D, config.BLOCK_D)
    moments = torch.empty((num_m * B, 2, config.HP), dtype=acc_dtype, device=device) if with_moments else None

    dummy = mix_weight
    c = mix_bias if mix_bias is not None else dummy
    nw = norm_weight if norm_weight is not None else dummy
    nb = norm_bias if norm_bias is not None else dummy
    affine_norm = norm != "none"
    run_on_device(
        _re_attention_fwd_kernel, (num_m * B, d_chunks), device,
        q, k, v, mix_weight, c, nw, nb, batch_stats if norm == "batch" else dummy, mask,
        seed if has_dropout else dummy, out, lse, moments if moments is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *mask_strides,
        mix_weight.stride(0), mix_weight.stride(1), c.stride(0), nw.stride(0), nb.stride(0),
        H, Nq, Nk, D, num_m,
        float(scale), float(out_scale), float(eps), float(dropout_p),
        HAS_MIX_BIAS=mix_bias is not None, NORM=_NORMS[norm],
        HAS_NORM_WEIGHT=affine_norm and norm_weight is not None, HAS_NORM_BIAS=affine_norm and norm_bias is not None,
        MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout, LSE_IS_INPUT=lse_is_input, MOMENTS=moments is not None,
        CDT=cdt, DOT_LOWP=lowp_dot, DOT_PRECISION=precision, D_CHUNKS=d_chunks,
        **config.meta(),
    )
    if with_moments:
        return out, lse, moments[:, :, :H]
    return out, lse
