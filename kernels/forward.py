"""Fused Re-attention forward in Triton: never writes a [B, H, Nq, Nk] tensor.

    S_h = scale * Q_h K_h^T,  L_h = logsumexp_j S_h,  P_h = exp(S_h - L_h)
    M_g = sum_h W[g, h] P_h + c_g,  A = out_scale * Norm(M),  O_g = A_g V_g

One program handles one batch element, BLOCK_M query rows and ALL heads (padded to HP), since
the head mixing needs every head of a tile. Two sweeps over the keys in one launch
(see shared/design/reattention-math.md):

  pass 1: batched S = Q K^T over [HP, BLOCK_M, BLOCK_N] tiles with an online logsumexp -> L
          (written out as ``lse`` for the backward);
  pass 2: recompute S, P = exp(S - L) for all heads, mix heads with one matrix product
          W [HP, HP] @ P [HP, BLOCK_M * BLOCK_N], add c, normalise across heads (LayerNorm or
          nothing), scale, and accumulate the batched product A [HP, BLOCK_M, BLOCK_N] @
          V [HP, BLOCK_N, BLOCK_D] into an fp32 (fp64 for fp64 inputs) accumulator.

All arithmetic is done in fp32 (fp64 for fp64 inputs); loads are upcast at once. With
fp16/bf16 inputs on a GPU (LOWP) the dot operands are cast to the input dtype for the tensor
cores, accumulating in fp32. Extension points (not implemented yet), each to become a
constexpr flag: additive/bool masks (masked S -> -inf before both sweeps, fully masked rows,
A zeroed at masked entries after the norm), dropout on P (counter-based RNG keyed by
(seed, b, h, i, j) applied between exp and the mixing), training BatchNorm (a statistics sweep
of p-bar and the Gram matrix between the two passes; then the norm becomes affine in-tile).

Nothing here imports ``reattn``: torch and triton only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import _mm
from .launch import MAX_HEADS, ForwardConfig, forward_config, interpreting

NORM_NONE = 0
NORM_LAYER = 1
_NORMS = {"none": NORM_NONE, "layer": NORM_LAYER}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _re_attention_fwd_kernel(
    Q, K, V, W, C, NW, NB, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
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

    # Query tile of all heads [HP, BLOCK_M, BLOCK_D]; padded heads/rows/dims read as 0.
    q_ptrs = (Q + b * stride_qb + h3 * stride_qh + offs_m.to(tl.int64)[None, :, None] * stride_qm
              + offs_d[None, None, :] * stride_qd)
    q_mask = h_ok3 & m_ok[None, :, None] & d_ok[None, None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if not DOT_LOWP:
        q = q.to(CDT)
    k_base = K + b * stride_kb + h3 * stride_kh + offs_d[None, :, None] * stride_kd
    v_base = V + b * stride_vb + h3 * stride_vh + offs_d[None, None, :] * stride_vd
    kd_mask = h_ok3 & d_ok[None, :, None]
    vd_mask = h_ok3 & d_ok[None, None, :]

    # ---- pass 1: online logsumexp per (head, row) ----
    m_i = tl.full([HP, BLOCK_M], float("-inf"), CDT)
    l_i = tl.zeros([HP, BLOCK_M], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        # K^T tile [HP, BLOCK_D, BLOCK_N]
        kt = tl.load(k_base + offs_n.to(tl.int64)[None, None, :] * stride_kn,
                     mask=kd_mask & n_ok[None, None, :], other=0.0)
        if not DOT_LOWP:
            kt = kt.to(CDT)
        s = _mm(q, kt, tl.zeros([HP, BLOCK_M, BLOCK_N], CDT), DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        s = tl.where(n_ok[None, None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=2))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, :, None]), axis=2)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    lse_ptrs = LSE + b * stride_lb + offs_h[:, None] * stride_lh + offs_m[None, :] * stride_lm
    tl.store(lse_ptrs, lse.to(LSE.dtype.element_ty), mask=h_ok[:, None] & m_ok[None, :])

    # ---- mixing / norm parameters (padded heads: zero weights, zero bias) ----
    w = tl.load(W + offs_h[:, None] * stride_wg + offs_h[None, :] * stride_wh,
                mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(CDT)
    if HAS_MIX_BIAS:
        c = tl.load(C + offs_h * stride_c, mask=h_ok, other=0.0).to(CDT)
    if HAS_NORM_WEIGHT:
        nw = tl.load(NW + offs_h * stride_nw, mask=h_ok, other=0.0).to(CDT)
    if HAS_NORM_BIAS:
        nb = tl.load(NB + offs_h * stride_nb, mask=h_ok, other=0.0).to(CDT)

    # ---- pass 2: exact P tile by tile, mix, normalise, multiply by V ----
    acc = tl.zeros([HP, BLOCK_M, BLOCK_D], CDT)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        n3_ok = n_ok[None, None, :]
        kt = tl.load(k_base + offs_n.to(tl.int64)[None, None, :] * stride_kn,
                     mask=kd_mask & n3_ok, other=0.0)
        if not DOT_LOWP:
            kt = kt.to(CDT)
        s = _mm(q, kt, tl.zeros([HP, BLOCK_M, BLOCK_N], CDT), DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        p = tl.where(n3_ok, tl.exp(s * scale - lse[:, :, None]), 0.0)
        # M = W @ P over the head axis: [HP, HP] @ [HP, BLOCK_M * BLOCK_N]
        mix = _mm(w, tl.reshape(p, (HP, BLOCK_M * BLOCK_N)), tl.zeros([HP, BLOCK_M * BLOCK_N], CDT),
                  DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
        mix = tl.reshape(mix, (HP, BLOCK_M, BLOCK_N))
        if HAS_MIX_BIAS:
            mix = mix + c[:, None, None]
        if NORM == 1:
            # LayerNorm across the H real heads at every (i, j); padded heads hold exact zeros.
            mean = tl.sum(mix, axis=0) / H
            xc = tl.where(h_ok3, mix - mean[None, :, :], 0.0)
            var = tl.sum(xc * xc, axis=0) / H
            a = xc * (1.0 / tl.sqrt(var + eps))[None, :, :]
            if HAS_NORM_WEIGHT:
                a = a * nw[:, None, None]
            if HAS_NORM_BIAS:
                a = a + nb[:, None, None]
        else:
            a = mix
        a = tl.where(h_ok3 & n3_ok, a * out_scale, 0.0)
        vt = tl.load(v_base + offs_n.to(tl.int64)[None, :, None] * stride_vn,
                     mask=vd_mask & n_ok[None, :, None], other=0.0)
        if not DOT_LOWP:
            vt = vt.to(CDT)
        acc = _mm(a, vt, acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)

    o_ptrs = (O + b * stride_ob + h3 * stride_oh + offs_m.to(tl.int64)[None, :, None] * stride_om
              + offs_d[None, None, :] * stride_od)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=q_mask)


def _check_vector(name: str, t: Optional[torch.Tensor], h: int, device: torch.device) -> None:
    if t is None:
        return
    if t.shape != (h,):
        raise ValueError(f"re_attention_forward: {name} must have shape ({h},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"re_attention_forward: {name} is on {t.device}, q on {device}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"re_attention_forward: {name} must be floating point, got {t.dtype}")


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
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    config: Optional[ForwardConfig] = None,
    allow_tf32: bool = False,
    lowp_dot: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused Re-attention forward. Returns ``(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq])``.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D] (any strides, same dtype: fp16, bf16, fp32 or fp64).
    mix_weight: [H, H] indexed [out, in]; mix_bias, norm_weight, norm_bias: [H] or None.
    norm: "none" (BatchNorm in eval mode is folded into mix_weight/mix_bias by the caller) or
    "layer" (LayerNorm across the heads at each (b, i, j)).
    lse: natural-log logsumexp of ``scale * q k^T`` per (b, h, i); float32, or float64 for
    float64 inputs. ``out``/``lse`` may be given (any strides) and are fully overwritten.
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

    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != device:
        raise ValueError(f"re_attention_forward: out must be {tuple(q.shape)} {q.dtype} on {device}")
    if lse is None:
        lse = torch.empty((B, H, Nq), dtype=lse_dtype, device=device)
    elif lse.shape != (B, H, Nq) or lse.dtype != lse_dtype or lse.device != device:
        raise ValueError(f"re_attention_forward: lse must be {(B, H, Nq)} {lse_dtype} on {device}")
    if B == 0 or Nq == 0 or D == 0:
        return out, lse

    interpret = interpreting()
    if config is None:
        config = forward_config(Nq, Nk, D, H, interpret=interpret)
    if config.HP < H or config.BLOCK_D < D:
        raise ValueError(f"re_attention_forward: config {config} too small for H={H}, D={D}")
    low = q.dtype in (torch.float16, torch.bfloat16)
    if lowp_dot is None:
        lowp_dot = low and not interpret
    lowp_dot = bool(lowp_dot and low)
    cdt = tl.float64 if q.dtype == torch.float64 else tl.float32
    precision = "tf32" if (allow_tf32 and q.dtype == torch.float32) else "ieee"

    dummy = mix_weight
    c = mix_bias if mix_bias is not None else dummy
    nw = norm_weight if norm_weight is not None else dummy
    nb = norm_bias if norm_bias is not None else dummy
    use_norm = norm == "layer"
    num_m = triton.cdiv(Nq, config.BLOCK_M)
    grid = (num_m * B,)
    launch = _re_attention_fwd_kernel[grid]
    args = (
        q, k, v, mix_weight, c, nw, nb, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        mix_weight.stride(0), mix_weight.stride(1), c.stride(0), nw.stride(0), nb.stride(0),
        H, Nq, Nk, D, num_m,
        float(scale), float(out_scale), float(eps),
    )
    kwargs = dict(
        HAS_MIX_BIAS=mix_bias is not None, NORM=_NORMS[norm],
        HAS_NORM_WEIGHT=use_norm and norm_weight is not None, HAS_NORM_BIAS=use_norm and norm_bias is not None,
        CDT=cdt, DOT_LOWP=lowp_dot, DOT_PRECISION=precision,
        **config.meta(),
    )
    if device.type == "cuda":
        with torch.cuda.device(device):
            launch(*args, **kwargs)
    else:
        launch(*args, **kwargs)
    return out, lse
