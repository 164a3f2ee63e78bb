"""Training BatchNorm's per-head parameter steps, each one small launch (one program over the heads).

Between the big kernels, one-sweep training BatchNorm needs a few numbers per head, which torch forms in
~20 element-wise ops on [H] tensors each way (a launch apiece on a GPU, ~2 us of gap each): the forward's
statistics and the finish's coefficients from the moments (``bn_moments``), the backward's coefficients
from the sums over dN or from ``head_dot_sums``' parts (``bn_coefficients``), and nn.BatchNorm2d's update
of the running statistics (``update_running_stats``). The math is ``reattn._batchnorm``'s, in the same
order and dtypes (float64 statistics, coefficients rounded once to the accumulation dtype):

    mean(X) = s1 / n,  var = max(s2 / n - mean(X)^2, 0),  mean = mean(X) + center (+ c)
    rstd = 1 / sqrt(var + eps),  alpha = rstd * out_scale * gamma,  beta = -mean(X) alpha + out_scale * beta_norm
    backward: a = rstd * gamma,  e = -a sum(dN xhat) / n,  f = -a sum(dN) / n

Float arguments (eps, out_scale, momentum) reach a GPU kernel as fp32, as in the forward kernels; n is an
integer argument or a float64 tensor, exact either way.

Nothing here imports ``reattn``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .launch import next_pow2, run_on_device


@triton.jit
def _count(COUNT, count_value, COUNT_GIVEN: tl.constexpr):
    """n: the 0-dim float64 tensor COUNT, or the integer count_value, as float64."""
    if COUNT_GIVEN:
        return tl.load(COUNT).to(tl.float64)
    else:
        return tl.cast(count_value, tl.float64)


@triton.jit
def _rounded_for(x, PTR):
    """float64 x in PTR's element type, through float32 below float64, as torch's conversion of a float64 tensor
    to float16/bfloat16 rounds (c10's half types are made from a float)."""
    if PTR.dtype.element_ty == tl.float64:
        return x
    else:
        return x.to(tl.float32).to(PTR.dtype.element_ty)


@triton.jit
def _load_stats(STATS, stride_s, offs_h, h_ok):
    """(mean, biased variance, count) [BLOCK_H] float64 from the [3, H] statistics (count 2 on lanes past H)."""
    return (tl.load(STATS + offs_h, mask=h_ok, other=0.0), tl.load(STATS + stride_s + offs_h, mask=h_ok, other=0.0),
            tl.load(STATS + 2 * stride_s + offs_h, mask=h_ok, other=2.0))


@triton.jit
def _sum_pairs(X, P, stride_p, stride_h, stride_k, offs_h, h_ok, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per head, the float64 sums over P parts of the pair X[p, h] and X[p, h] + stride_k ([BLOCK_H] each)."""
    s_a = tl.zeros([BLOCK_P, BLOCK_H], tl.float64)
    s_b = tl.zeros([BLOCK_P, BLOCK_H], tl.float64)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_p < P)[:, None] & h_ok[None, :]
        ptrs = X + offs_p[:, None] * stride_p + offs_h[None, :] * stride_h
        s_a += tl.load(ptrs, mask=ok, other=0.0).to(tl.float64)
        s_b += tl.load(ptrs + stride_k, mask=ok, other=0.0).to(tl.float64)
    return tl.sum(s_a, axis=0), tl.sum(s_b, axis=0)


@triton.jit
def _weights_center(W, stride_wg, stride_wh, n_keys, offs_h, h_ok):
    """The one-sweep map's shift center_g = sum_h W[g, h] / n_keys ([BLOCK_H] float64): what the forward's
    ``center_keys`` subtracted, as ``reattn._batchnorm.kept_term_coefficients`` forms it."""
    w = tl.load(W + offs_h[:, None] * stride_wg + offs_h[None, :] * stride_wh, mask=h_ok[:, None] & h_ok[None, :],
                other=0.0)
    return tl.sum(w.to(tl.float64), axis=1) / n_keys


@triton.jit
def _bn_moments_kernel(MOM, COUNT, CENTER, MIX_BIAS, NW, NB, STATS, COEF, P, H, count_value, out_scale, eps,
                       n_keys, stride_mp, stride_mk, stride_c, stride_wh, stride_b, stride_nw, stride_nb,
                       COUNT_GIVEN: tl.constexpr, CENTER_FROM_WEIGHTS: tl.constexpr, HAS_MIX_BIAS: tl.constexpr,
                       HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    s1, s2 = _sum_pairs(MOM, P, stride_mp, 1, stride_mk, offs_h, h_ok, BLOCK_P, BLOCK_H)
    n = _count(COUNT, count_value, COUNT_GIVEN)
    mean_x = s1 / n
    var = tl.maximum(s2 / n - mean_x * mean_x, 0.0)
    if CENTER_FROM_WEIGHTS:  # CENTER is mix_weight [H, H]
        mean = mean_x + _weights_center(CENTER, stride_c, stride_wh, n_keys, offs_h, h_ok)
    else:
        mean = mean_x + tl.load(CENTER + offs_h * stride_c, mask=h_ok, other=0.0).to(tl.float64)
    if HAS_MIX_BIAS:
        mean += tl.load(MIX_BIAS + offs_h * stride_b, mask=h_ok, other=0.0).to(tl.float64)
    tl.store(STATS + offs_h, mean, mask=h_ok)
    tl.store(STATS + H + offs_h, var, mask=h_ok)
    tl.store(STATS + 2 * H + offs_h, mean * 0.0 + n, mask=h_ok)
    rstd64 = 1.0 / tl.sqrt(var + eps)
    rstd = rstd64.to(ACC)
    a = tl.full([BLOCK_H], 1.0, ACC) * out_scale
    if HAS_NORM_WEIGHT:
        a = tl.load(NW + offs_h * stride_nw, mask=h_ok, other=0.0).to(ACC) * out_scale
    alpha = rstd * a
    beta = -mean_x.to(ACC) * alpha
    if HAS_NORM_BIAS:
        beta = beta + tl.load(NB + offs_h * stride_nb, mask=h_ok, other=0.0).to(ACC) * out_scale
    tl.store(COEF + offs_h, alpha, mask=h_ok)
    tl.store(COEF + H + offs_h, beta, mask=h_ok)
    tl.store(COEF + 2 * H + offs_h, rstd, mask=h_ok)
    tl.store(COEF + 3 * H + offs_h, (-mean_x * rstd64).to(ACC), mask=h_ok)


@triton.jit
def _bn_coefficients_kernel(STATS, SUMS, NW, COEF, DNW, DNB, W, C, H, PARTS, eps, scale, n_keys, stride_s,
                            stride_nw, stride_wg, stride_wh, stride_c, HAS_NORM_WEIGHT: tl.constexpr,
                            OWN_WEIGHT: tl.constexpr, OWN_BIAS: tl.constexpr, KEPT_TERMS: tl.constexpr,
                            HAS_MIX_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                            ACC: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    mean, var, n = _load_stats(STATS, stride_s, offs_h, h_ok)
    rstd64 = 1.0 / tl.sqrt(var + eps)
    if KEPT_TERMS:
        # SUMS: head_dot_sums' parts [H, PARTS, 2] (sum dO . X V, sum dO . U per block); then by linearity
        # sum dN xhat = scale (rstd sum dO . X V - mean(X) rstd sum dO . U), sum dN = scale sum dO . U, with
        # mean(X) = mean - sum_h W[g, h] / n_keys - c (reattn._batchnorm.kept_term_coefficients)
        s_r, s_u = _sum_pairs(SUMS, PARTS, 2, PARTS * 2, 1, offs_h, h_ok, BLOCK_P, BLOCK_H)
        mean_x = mean - _weights_center(W, stride_wg, stride_wh, n_keys, offs_h, h_ok)
        if HAS_MIX_BIAS:
            mean_x -= tl.load(C + offs_h * stride_c, mask=h_ok, other=0.0).to(tl.float64)
        s_r = s_r * scale
        s_u = s_u * scale
        sum_dn_xhat = rstd64 * s_r + (-mean_x * rstd64) * s_u
        sum_dn = s_u
    else:
        sum_dn_xhat = tl.load(SUMS + offs_h, mask=h_ok, other=0.0).to(tl.float64)
        sum_dn = tl.load(SUMS + H + offs_h, mask=h_ok, other=0.0).to(tl.float64)
    # 1/std as the forward read it: rounded to the accumulation dtype, then float64 again
    rstd = rstd64.to(ACC).to(tl.float64)
    a = rstd
    if HAS_NORM_WEIGHT:
        a = rstd * tl.load(NW + offs_h * stride_nw, mask=h_ok, other=0.0).to(tl.float64)
    tl.store(COEF + offs_h, mean.to(ACC), mask=h_ok)
    tl.store(COEF + H + offs_h, rstd.to(ACC), mask=h_ok)
    tl.store(COEF + 2 * H + offs_h, (-a * sum_dn_xhat / n).to(ACC), mask=h_ok)
    tl.store(COEF + 3 * H + offs_h, (-a * sum_dn / n).to(ACC), mask=h_ok)
    if OWN_WEIGHT:
        tl.store(DNW + offs_h, _rounded_for(sum_dn_xhat, DNW), mask=h_ok)
    if OWN_BIAS:
        tl.store(DNB + offs_h, _rounded_for(sum_dn, DNB), mask=h_ok)


_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


class KeptTermParts(NamedTuple):
    """The one-sweep backward's BatchNorm sums before their last steps, for :func:`bn_coefficients` to finish.

    parts: ``kernels.affine.head_dot_sums(grad, r, u, summed=False)``, [H, B, M, 2] (sum dO . X V, sum dO . U per
    block); mix_weight [H, H], mix_bias [H] or None, n_keys: what the forward centred X with (X = W P~ - center,
    center_g = sum_h W[g, h] / n_keys); scale: out_scale (dN = scale dO V^T).
    """
    parts: torch.Tensor
    mix_weight: torch.Tensor
    mix_bias: Optional[torch.Tensor]
    scale: float
    n_keys: int


def _acc(dtype: torch.dtype):
    if dtype not in _ACC:
        raise TypeError(f"batchnorm: the accumulation dtype must be float32 or float64, got {dtype}")
    return _ACC[dtype]


def _head_vector(t: Optional[torch.Tensor], H: int, name: str) -> None:
    if t is not None and tuple(t.shape) != (H,):
        raise ValueError(f"batchnorm: {name} must be [{H}], got {tuple(t.shape)}")


def bn_moments(moments: torch.Tensor, count: Union[torch.Tensor, int, float], center: Optional[torch.Tensor],
               mix_bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
               norm_bias: Optional[torch.Tensor], *, out_scale: float, eps: float, dtype: torch.dtype,
               mix_weight: Optional[torch.Tensor] = None, n_keys: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One-sweep training BatchNorm's statistics and the finish's coefficients, in one launch.

    moments: [P, 2, H] (per program, the sums of X and of X^2 per head, X = M - c - center); count: the
    entries per head, a 0-dim float64 tensor or (without a mask) an integral number; center: [H], the
    shift the forward subtracted, or None with mix_weight [H, H] and n_keys > 0: center_g =
    sum_h W[g, h] / n_keys (in float64), what the forward formed with ``center_keys``; mix_bias, norm_weight,
    norm_bias: [H] or None. Returns stats [3, H] float64 (mean of M, biased variance, count) and
    coefficients [4, H] in ``dtype`` (the accumulation dtype): alpha, beta (O = alpha X V + beta U), rstd and
    -mean(X) rstd.
    """
    P, two, H = moments.shape
    if two != 2:
        raise ValueError(f"bn_moments: moments must be [P, 2, H], got {tuple(moments.shape)}")
    if (center is None) == (mix_weight is None) or (mix_weight is not None and n_keys <= 0):
        raise ValueError("bn_moments: give either center [H], or mix_weight [H, H] with n_keys > 0 (got "
                         f"center {'None' if center is None else 'given'}, mix_weight "
                         f"{'None' if mix_weight is None else 'given'}, n_keys {n_keys})")
    if mix_weight is not None and tuple(mix_weight.shape) != (H, H):
        raise ValueError(f"bn_moments: mix_weight must be [{H}, {H}], got {tuple(mix_weight.shape)}")
    for t, name in ((center, "center"), (mix_bias, "mix_bias"), (norm_weight, "norm_weight"),
                    (norm_bias, "norm_bias")):
        _head_vector(t, H, name)
    acc = _acc(dtype)
    moments = moments if moments.stride(2) == 1 else moments.contiguous()
    device = moments.device
    stats = torch.empty((3, H), dtype=torch.float64, device=device)
    coefficients = torch.empty((4, H), dtype=dtype, device=device)
    given = isinstance(count, torch.Tensor)
    if not given and float(count) != int(count):
        raise ValueError(f"bn_moments: count must be a 0-dim float64 tensor or an integral number, got {count!r}")
    shift = center if center is not None else mix_weight  # the kernel's CENTER
    dummy = shift
    run_on_device(_bn_moments_kernel, (1,), device, moments, count if given else dummy, shift,
                  mix_bias if mix_bias is not None else dummy, norm_weight if norm_weight is not None else dummy,
                  norm_bias if norm_bias is not None else dummy, stats, coefficients, P, H,
                  0 if given else int(count), float(out_scale), float(eps), int(max(n_keys, 1)),
                  moments.stride(0), moments.stride(1), shift.stride(0), shift.stride(-1),
                  mix_bias.stride(0) if mix_bias is not None else 0,
                  norm_weight.stride(0) if norm_weight is not None else 0,
                  norm_bias.stride(0) if norm_bias is not None else 0,
                  COUNT_GIVEN=given, CENTER_FROM_WEIGHTS=center is None, HAS_MIX_BIAS=mix_bias is not None,
                  HAS_NORM_WEIGHT=norm_weight is not None,
                  HAS_NORM_BIAS=norm_bias is not None, BLOCK_P=32, BLOCK_H=max(16, next_pow2(H)), ACC=acc,
                  num_warps=1)
    return stats, coefficients


def bn_coefficients(stats: torch.Tensor, sums: Union[torch.Tensor, KeptTermParts],
                    norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], *, eps: float,
                    dtype: torch.dtype, own_grads: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Training BatchNorm's backward coefficients [4, H] in ``dtype`` (mean, 1/std, e, f), in one launch.

    stats: [3, H] float64 (mean, biased variance, count); sums: [2, H] (sum dN xhat, sum dN; float64, or the
    accumulation dtype of a sweep's sums) over the same entries, or :class:`KeptTermParts`, from which the
    launch forms them (``reattn._batchnorm.kept_term_coefficients``'s math). With own_grads the sums are also
    the norm's own gradients, returned in the parameters' dtypes (None for an absent parameter); else both None.
    ``reattn._batchnorm.bn_backward_coefficients`` is the same math in torch.
    """
    H = stats.shape[1]
    if tuple(stats.shape) != (3, H) or stats.dtype != torch.float64:
        raise ValueError(f"bn_coefficients: stats must be [3, H] float64, got {tuple(stats.shape)} {stats.dtype}")
    kept = isinstance(sums, KeptTermParts)
    if kept:
        Hp, B, M, two = sums.parts.shape
        if Hp != H or two != 2:
            raise ValueError(f"bn_coefficients: parts must be [{H}, B, M, 2], got {tuple(sums.parts.shape)}")
        if tuple(sums.mix_weight.shape) != (H, H):
            raise ValueError(f"bn_coefficients: mix_weight must be [{H}, {H}], got {tuple(sums.mix_weight.shape)}")
        _head_vector(sums.mix_bias, H, "mix_bias")
        parts, w, c, parts_per_head = sums.parts.contiguous(), sums.mix_weight, sums.mix_bias, B * M
    elif tuple(sums.shape) != (2, H) or not sums.dtype.is_floating_point:
        raise ValueError(f"bn_coefficients: sums must be a float [2, {H}], got {tuple(sums.shape)} {sums.dtype}")
    else:
        parts, w, c, parts_per_head = sums.contiguous(), stats, None, 1
    _head_vector(norm_weight, H, "norm_weight")
    _head_vector(norm_bias, H, "norm_bias")
    acc = _acc(dtype)
    stats = stats if stats.stride(1) == 1 else stats.contiguous()
    device = stats.device
    coefficients = torch.empty((4, H), dtype=dtype, device=device)
    own_weight = own_grads and norm_weight is not None
    own_bias = own_grads and norm_bias is not None
    dnw = torch.empty((H,), dtype=norm_weight.dtype, device=device) if own_weight else None
    dnb = torch.empty((H,), dtype=norm_bias.dtype, device=device) if own_bias else None
    run_on_device(_bn_coefficients_kernel, (1,), device, stats, parts,
                  norm_weight if norm_weight is not None else stats, coefficients,
                  dnw if dnw is not None else coefficients, dnb if dnb is not None else coefficients, w,
                  c if c is not None else stats, H, parts_per_head, float(eps), float(sums.scale) if kept else 1.0,
                  int(sums.n_keys) if kept else 1, stats.stride(0),
                  norm_weight.stride(0) if norm_weight is not None else 0, w.stride(0), w.stride(1),
                  c.stride(0) if c is not None else 0,
                  HAS_NORM_WEIGHT=norm_weight is not None, OWN_WEIGHT=own_weight, OWN_BIAS=own_bias,
                  KEPT_TERMS=kept, HAS_MIX_BIAS=c is not None, BLOCK_P=32, BLOCK_H=max(16, next_pow2(H)), ACC=acc,
                  num_warps=1)
    return coefficients, dnw, dnb


@triton.jit
def _running_stats_kernel(RUNNING_MEAN, RUNNING_VAR, STATS, H, momentum, stride_mean, stride_var,
                          BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    mean, var, n = _load_stats(STATS, H, offs_h, h_ok)
    running_mean = tl.load(RUNNING_MEAN + offs_h * stride_mean, mask=h_ok, other=0.0).to(tl.float64)
    running_var = tl.load(RUNNING_VAR + offs_h * stride_var, mask=h_ok, other=0.0).to(tl.float64)
    running_mean = running_mean + momentum * (mean - running_mean)
    running_var = running_var + momentum * (var * n / (n - 1.0) - running_var)
    tl.store(RUNNING_MEAN + offs_h * stride_mean, _rounded_for(running_mean, RUNNING_MEAN), mask=h_ok)
    tl.store(RUNNING_VAR + offs_h * stride_var, _rounded_for(running_var, RUNNING_VAR), mask=h_ok)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, stats: torch.Tensor,
                         momentum: float) -> None:
    """``nn.BatchNorm2d``'s update of the running statistics, in place, in one launch.

    running <- running + momentum (batch - running), with the variance unbiased by n / (n - 1), in float64 and
    rounded once to the buffers' dtype (through float32 for 16-bit buffers, as torch converts). running_mean,
    running_var: [H] floating, any stride; stats: [3, H] float64 (mean, biased variance, count).
    """
    H = stats.shape[-1]
    if tuple(stats.shape) != (3, H) or stats.dtype != torch.float64:
        raise ValueError(f"update_running_stats: stats must be [3, H] float64, got {tuple(stats.shape)} "
                         f"{stats.dtype}")
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if tuple(t.shape) != (H,):
            raise ValueError(f"update_running_stats: {name} must be [{H}], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"update_running_stats: {name} must be a floating tensor, got {t.dtype}")
    run_on_device(_running_stats_kernel, (1,), stats.device, running_mean, running_var, stats.contiguous(), H,
                  float(momentum), running_mean.stride(0), running_var.stride(0), BLOCK_H=max(16, next_pow2(H)),
                  num_warps=1)
