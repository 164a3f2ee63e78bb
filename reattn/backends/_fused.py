"""The raw layer of the GPU-style fused backends (Triton, CUDA C++): their kernels as one ``RawOps``.

Both backends describe their kernels with a :class:`FusedKernels` (forward, statistics sweep,
backward-sums sweep, backward, and the one-sweep forward's moments); :class:`FusedRawOps` composes
them into the steps every mode needs, below the shared ladder (``reattn.backends._ladder.OpLadder``:
custom ops, fakes, autograd, entry point).

Training-mode BatchNorm on one process runs in one sweep over the keys (the kernels'
``forward_moments``; :func:`one_sweep_batchnorm`: the norm is applied after the product by V).
With given statistics (synchronized across processes), or for kernels without ``forward_moments``,
the statistics sweep returns the per-head sums s1 = sum X and the Gram matrix G = sum X X^T of
X = P~ - shift over the unmasked entries, ``reattn._batchnorm.gram_batch_statistics`` turns them
into the batch mean and variance of M = W P~ + c, and the forward normalizes with them, reading the
softmax statistics the sweep wrote. The backward first sums dN xhat and dN per head (the
backward-sums sweep), then runs the main sweeps with dM = a dN + e xhat + f
(``reattn._batchnorm.bn_backward_coefficients``). docs/math.md derives each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from reattn._batchnorm import (accumulator_dtype, batch_stats, bn_backward_coefficients, check_counts,
                               gram_batch_statistics, gram_shift, kept_entries, moment_statistics, unmasked_count)
from reattn.backends._ladder import RawOps


def one_sweep_batchnorm(forward_moments: Callable, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor,
                        mix_bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                        attn_mask: Optional[Tensor], seed: Optional[Tensor], count: Tensor, *, scale: float,
                        out_scale: float, eps: float, dropout_p: float,
                        head_affine: Optional[Callable] = None, bn_moments: Optional[Callable] = None,
                        centers_in_forward: bool = False,
                        keep_terms: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training BatchNorm's forward with one sweep over the keys: (out, softmax_stats, stats [3, H] float64,
    R', U). With keep_terms (no mask; it needs ``head_affine``), R' = X V [B, H, Nq, D] in q's dtype and
    U = V summed over the keys [B, H, 1, D] in the accumulation dtype, which the backward's BatchNorm sums
    read (``FusedRawOps.bn_grad_sums``: R = xhat V = rstd (R' - mean(X) U) is linear in them); else both are
    empty.

    The norm is a per-head affine map applied once the statistics are known, so it commutes with the
    product by V (docs/math.md, "Training BatchNorm in one sweep"). With X = W P~ - center (center_g =
    sum_h W[g, h] / Nk, the mean of (W P)_g without mask or dropout, so X is centred and its sums
    cancel little), the kernel computes R' = X V (masked entries 0) and the sums of X and X^2; then
    mean(M) = mean(X) + center + c, var(M) = var(X),
    R = Xhat V = rstd (R' - mean(X) U) with U = 1_unmasked V, and O = out_scale (gamma R + beta U) =
    alpha R' + beta' U: element-wise work on [B, H, Nq, D], no second sweep (the cpu kernel does the same).
    Without a mask each row of X sums to zero up to dropout's noise (every row of P sums to one), so
    mean(X) ~ 0 and beta' U adds the norm's shift instead of cancelling most of alpha R': R' rounded to q's
    dtype then costs what rounding O does, and the forward writes it so (half the bytes of the
    accumulation dtype, read back once by head_affine and once by the backward). With a mask, mean(X) need
    not be small against X's spread, so R' stays in the accumulation dtype and nothing is kept.
    count: the entries per head (0-dim float64), as ``unmasked_count``, or that number as a float where
    bn_moments is given (it takes either). head_affine: the backend's
    fused finish (``FusedKernels.head_affine``), else torch's in-place passes; where forward_moments returns U in
    parts, it adds them too. bn_moments: the backend's statistics step (``FusedKernels.bn_moments``: one launch),
    else torch's float64 arithmetic on [H] tensors (~25 launches). centers_in_forward
    (``FusedKernels.centers_in_forward``; needs bn_moments): forward_moments forms the shift itself from mix_weight
    (``center_keys=Nk``, no mix_bias) and bn_moments adds it back from the same (``mix_weight``, ``n_keys``): no step
    of its own; else torch's sum and division form -center, which forward_moments takes as its mix_bias.
    """
    acc = accumulator_dtype(q)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if keep_terms and (attn_mask is not None or head_affine is None):
        raise ValueError("one_sweep_batchnorm: keep_terms needs head_affine and no attn_mask")
    if centers_in_forward and bn_moments is None:
        raise ValueError("one_sweep_batchnorm: centers_in_forward needs bn_moments")
    centering = {}
    if centers_in_forward:
        minus_center = None
        centering = dict(center_keys=Nk)
    else:  # sum / -Nk is -(sum / Nk) bitwise, in one op fewer
        minus_center = mix_weight.detach().to(acc).sum(dim=1) / -Nk
    r, softmax_stats, moments, u = forward_moments(q, k, v, mix_weight, minus_center, attn_mask, seed, scale=scale,
                                                   dropout_p=dropout_p, dtype=q.dtype if keep_terms else acc,
                                                   **centering)
    if bn_moments is not None:
        if centers_in_forward:
            stats, coefficients = bn_moments(moments, count, None, mix_bias, norm_weight, norm_bias,
                                             out_scale=out_scale, eps=eps, dtype=acc, mix_weight=mix_weight.detach(),
                                             n_keys=Nk)
        else:
            stats, coefficients = bn_moments(moments, count, -minus_center, mix_bias, norm_weight, norm_bias,
                                             out_scale=out_scale, eps=eps, dtype=acc)
        alpha, beta = coefficients[0], coefficients[1]
    else:
        sums = moments.sum(dim=0, dtype=torch.float64)  # [2, H]
        mean_x, var = moment_statistics(sums[0], sums[1], count)
        mean = mean_x - minus_center.to(torch.float64)
        if mix_bias is not None:
            mean = mean + mix_bias.detach().to(torch.float64)
        stats = torch.stack([mean, var, count.expand_as(mean).to(torch.float64)])
        rstd = torch.rsqrt(var + eps).to(acc)
        a = torch.full_like(rstd, out_scale) if norm_weight is None else out_scale * norm_weight.detach().to(acc)
        # O = alpha R' + beta U with alpha = rstd tau gamma, beta = tau beta_norm - mean(X) alpha (per head)
        alpha = rstd * a
        beta = -mean_x.to(acc) * alpha
        if norm_bias is not None:
            beta = beta + out_scale * norm_bias.detach().to(acc)
    no_terms = empty_bn_terms(q)
    if u is not None and u.shape[2] > 1 and head_affine is not None:
        # U in parts (the forward's programs' shares): head_affine adds them, applies U and writes it for the
        # backward, in its one pass.
        u_sum = u.new_empty((B, H, 1, D))
        out = head_affine(r, u, alpha, beta, q.dtype, u_sum=u_sum)
        return (out, softmax_stats, stats, r, u_sum) if keep_terms else (out, softmax_stats, stats) + no_terms
    if u is not None:
        if u.shape[2] > 1:
            u = u.sum(dim=2, keepdim=True)  # U's parts, with no head_affine to add them
    elif attn_mask is None:
        u = v.sum(dim=2, keepdim=True, dtype=acc)  # [B, H, 1, D]: every row sees every key
    else:
        keep = kept_entries(attn_mask)
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        # [B or 1, H or 1, Nq or 1, D]: the mask's own size, at most [B, H, Nq, D]
        u = torch.matmul(keep.to(acc), v.to(acc))
    if keep_terms:
        out = head_affine(r, u, alpha, beta, q.dtype)
        return out, softmax_stats, stats, r, u.expand(B, H, 1, D).contiguous()  # the shape the op's fake says
    if head_affine is not None:
        return (head_affine(r, u, alpha, beta, q.dtype), softmax_stats, stats) + no_terms
    # In place on r (this function's own buffer): one [B, H, Nq, D] accumulation-dtype tensor at a time.
    out = r.mul_(alpha[None, :, None, None]).add_(beta[None, :, None, None] * u)
    return (out.to(q.dtype), softmax_stats, stats) + no_terms


def empty_bn_terms(q: Tensor) -> Tuple[Tensor, Tensor]:
    """R and U where the forward keeps none: two empty [0, H, Nq, D] tensors (outputs of an op may not alias)."""
    acc = accumulator_dtype(q)
    return q.new_empty((0, *q.shape[1:]), dtype=acc), q.new_empty((0, *q.shape[1:]), dtype=acc)


@dataclass(frozen=True)
class FusedKernels:
    """The raw (autograd-free) kernels of one fused backend.

    forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, softmax_stats, *,
            scale, out_scale, norm, eps, dropout_p) -> (out [B, H, Nq, D], softmax_stats)
        norm: "none" | "layer" | "batch" (normalize with batch_stats [2, H]: mean, 1/std); softmax_stats
        given = read instead of computed.
    gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift) -> (softmax_stats, s1 [H], gram [H, H] float64)
    bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed,
                 softmax_stats, *, scale, out_scale, eps, dropout_p) -> [2, H] (sum dN xhat, sum dN)
        training BatchNorm's backward sums over this call's entries (batch_stats [2, H] as the
        forward's); they are also d_norm_weight and d_norm_bias, and add up over processes.
    backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, bn_coefficients, attn_mask, seed,
             softmax_stats, *, scale, out_scale, norm, eps, dropout_p)
        -> (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias); norm "batch":
        bn_coefficients [4, H] from ``reattn._batchnorm.bn_backward_coefficients`` (the norm's own
        gradients are the sums, so the backward's d_norm_weight, d_norm_bias are not read then).
    forward_moments(q, k, v, mix_weight, mix_bias, attn_mask, seed, *, scale, dropout_p, dtype[, center_keys])
        -> (r [B, H, Nq, D] in dtype (q's or its accumulation dtype), softmax_stats, moments [programs, 2, H], u):
        optional, the
        norm-less forward O = X V of X = W P~ + mix_bias (masked entries 0) with per-program sums
        of X and X^2 over the unmasked entries, and u = U = sum_j V_j in parts, [B, H, parts, D] in the accumulation
        dtype whose sum over dim 2 is U, where the kernel summed V on the way (no mask; its head_affine then takes
        u_sum and adds them where there are several), else None (the caller sums V); with it, local training
        BatchNorm runs in one sweep over the keys (:func:`one_sweep_batchnorm`) instead of the statistics
        sweep + forward.
    softmax_stats_shape(q) -> shape: what the forward saves per score row for the backward: the
        row max and log-sum, [2, B, H, Nq] (Triton) or [B, H, Nq, 2] (CUDA); each backend reads only
        its own.
    head_affine(r, u, alpha [H], beta [H], dtype) -> (alpha_h r + beta_h u).to(dtype): optional, the one-sweep
        BatchNorm's finish in one pass (else torch's passes over [B, H, Nq, D]); r in dtype or its accumulation
        dtype. A backend whose forward_moments returns U in parts also takes u_sum= ([B, H, 1, D]): then u is
        those parts, added in the same pass, and U is written to u_sum.
    centers_in_forward: forward_moments takes center_keys=Nk with mix_bias None and subtracts the shift -center it
        forms from mix_weight itself, and bn_moments takes center None with mix_weight= and n_keys= (it forms the
        same center); else the shift is torch's (center_g = sum_h W[g, h] / Nk, given as forward_moments' mix_bias).
    head_dot_sums(grad, r, u, stats, mix_weight, mix_bias, *, scale, eps, n_keys) -> [2, H] float64 = scale
        (sum grad . R, sum grad . u) per head, R = xhat V = rstd (r - mean(X) u) formed from the kept r = X V
        (``reattn._batchnorm.kept_term_coefficients``: rstd and mean(X) from stats [3, H] and the mixing
        parameters): optional, the one-sweep BatchNorm's backward sums in one pass; with it and head_affine the
        one-sweep forward keeps X V and U where it has no mask (else the backward's sums come from
        ``bn_grad_sums``, a sweep over the keys). A backend with ``bn_coefficients`` also takes summed=False:
        the sums in parts, [2, parts, H, groups] (what bn_coefficients adds up in its own launch).
    bn_moments(moments, count, center, mix_bias, norm_weight, norm_bias, *, out_scale, eps, dtype)
        -> (stats [3, H] float64, coefficients [4, H] in dtype = (alpha, beta, rstd, -mean(X) rstd)): optional,
        the one-sweep BatchNorm's statistics from forward_moments' moments in one step (else torch's
        arithmetic in :func:`one_sweep_batchnorm`); center [H] is the shift forward_moments subtracted (None, with
        mix_weight= and n_keys=, where centers_in_forward); count the entries per head, a 0-dim float64 tensor or
        (without a mask) a float.
    bn_coefficients(stats, sums, norm_weight, norm_bias, *, eps, dtype, own_grads)
        -> (coefficients [4, H] in dtype, d_norm_weight, d_norm_bias): optional, training BatchNorm's backward
        coefficients in one step (else ``reattn._batchnorm.bn_backward_coefficients``); sums [2, H] float64 or
        head_dot_sums' parts; with own_grads the summed sums are also the norm's own gradients, returned in the
        parameters' dtypes (None for an absent parameter), else both None.
    update_running_stats(running_mean, running_var, stats [3, H], momentum) -> None: optional, nn.BatchNorm2d's
        update of the running statistics in place in one step (else torch's ops, ``RawOps.update_running_stats``).
    forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
        attn_mask, *, scale, out_scale, eps) -> out [B, H, Nq, D]: optional, eval-mode BatchNorm's forward with the
        norm folded by the kernels from the running statistics as given (inference; else the ladder folds it with
        torch ops and runs the norm-none forward).
    padded_rows(tensors) -> views: optional, for kernels that read rows in 16-byte chunks: each [B, H, N, D]
        float16/bfloat16 tensor whose D is not a multiple of 8 as a view of its first D columns in a copy whose
        rows are padded with zeros to a multiple of 8, which the kernels read without a copy of their own. The
        ladder pads q, k and v so once per call (q not where forward_stages_queries says so) and saves the views
        for the backward (else each of the forward and the backward copies them).
    forward_stages_queries(q, k) -> bool: optional, with padded_rows: whether the forward's program for these
        shapes reads q's rows unpadded (it stages them element by element); the ladder then pads k and v alone,
        and the backward pads q for itself (the padded q lives during the backward only).
    """

    forward: Callable
    gram_sums: Callable
    backward: Callable
    bn_grad_sums: Callable
    forward_moments: Optional[Callable] = None
    softmax_stats_shape: Callable = lambda q: (q.shape[0], q.shape[1], q.shape[2])
    head_affine: Optional[Callable] = None
    centers_in_forward: bool = False
    head_dot_sums: Optional[Callable] = None
    bn_moments: Optional[Callable] = None
    bn_coefficients: Optional[Callable] = None
    update_running_stats: Optional[Callable] = None
    forward_eval_batchnorm: Optional[Callable] = None
    padded_rows: Optional[Callable] = None
    forward_stages_queries: Optional[Callable] = None


class FusedRawOps(RawOps):
    """The ladder's raw ops over one fused backend's :class:`FusedKernels` (see ``_ladder.RawOps``)."""

    def __init__(self, kernels: FusedKernels) -> None:
        self.kernels = kernels
        self.updates_running_stats = kernels.update_running_stats is not None
        self.folds_eval_batchnorm = kernels.forward_eval_batchnorm is not None
        self.pads_rows = kernels.padded_rows is not None

    def padded_inputs(self, q: Tensor, k: Tensor, v: Tensor) -> List[int]:
        pad = [i for i, t in enumerate((q, k, v)) if self.pads_rows and t.dtype in (torch.float16, torch.bfloat16)
               and t.dim() == 4 and t.shape[3] % 8 != 0]
        if pad[:1] == [0] and self.kernels.forward_stages_queries is not None \
                and self.kernels.forward_stages_queries(q, k):
            pad = pad[1:]
        return pad

    def padded_rows(self, tensors):
        return self.kernels.padded_rows(list(tensors))

    def forward_eval_batchnorm(self, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
                               attn_mask, *, scale, out_scale, eps):
        return self.kernels.forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   running_mean, running_var, attn_mask, scale=scale,
                                                   out_scale=out_scale, eps=eps)

    def update_running_stats(self, running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
        if self.kernels.update_running_stats is None:
            return super().update_running_stats(running_mean, running_var, stats, momentum)
        self.kernels.update_running_stats(running_mean, running_var, stats, momentum)

    def _keeps_terms(self, norm: str, attn_mask: Optional[Tensor], stats_in: Optional[Tensor]) -> bool:
        k = self.kernels
        return (norm == "batch" and attn_mask is None and stats_in is None and k.forward_moments is not None
                and k.head_affine is not None and k.head_dot_sums is not None)

    def bn_terms_like(self, q: Tensor, norm: str, attn_mask: Optional[Tensor], stats_in: Optional[Tensor]):
        # Local training BatchNorm in one sweep without a mask keeps X V (the forward program's output, in q's
        # dtype) and U where the backend fuses their passes: the backward's sums are then one pass over dO and
        # X V instead of a sweep over the keys (one_sweep_batchnorm says why a mask keeps nothing); given
        # statistics (synchronized), the backward sums come from a sweep of their own.
        B, H, Nq, D = q.shape
        acc = accumulator_dtype(q)
        if not self._keeps_terms(norm, attn_mask, stats_in):
            return ((0, H, Nq, D), acc), ((0, H, Nq, D), acc)
        return ((B, H, Nq, D), q.dtype), ((B, H, 1, D), acc)

    def softmax_stats_shape(self, q: Tensor) -> Tuple[int, ...]:
        return tuple(self.kernels.softmax_stats_shape(q))

    def stats_rows(self, norm: str) -> int:
        return 3 if norm == "batch" else 0  # no statistics outside training BatchNorm: an empty [0, H]

    def dropout_keep_mask(self, seed: Tensor, shape: Tuple[int, int, int, int], p: float) -> Tensor:
        from reattn.kernels.dropout import dropout_keep_mask  # Triton's Philox stream, which cuda draws too

        return dropout_keep_mask(seed, shape, p)

    def forward(self, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, *, scale, out_scale,
                norm, eps, dropout_p, softmax_in=None, stats_in=None):
        kernels = self.kernels
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        acc = accumulator_dtype(q)
        kw = dict(scale=scale, out_scale=out_scale, eps=eps, dropout_p=dropout_p)
        no_terms = empty_bn_terms(q)
        if stats_in is not None:
            out, _ = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                     batch_stats(stats_in, eps, acc), attn_mask, seed, softmax_in, norm="batch", **kw)
            return (out, softmax_in.clone(), stats_in.clone()) + no_terms
        if norm != "batch":
            out, softmax_stats = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, None,
                                                 attn_mask, seed, None, norm=norm, **kw)
            return (out, softmax_stats, q.new_empty((0, H), dtype=torch.float64)) + no_terms
        if attn_mask is None and kernels.forward_moments is not None and kernels.bn_moments is not None:
            # Known on the host: the statistics step takes it as a number (a tensor made for it was a launch).
            # reattn._checks has ruled out counts <= 1 without a mask.
            count = float(B * Nq * Nk)
        else:
            count = unmasked_count(attn_mask, B, Nq, Nk, q.device)  # a mask is on q.device (reattn._checks)
            if attn_mask is not None:
                check_counts(count.expand(H))  # per head, as every backend words it
        if kernels.forward_moments is not None:
            return one_sweep_batchnorm(kernels.forward_moments, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                       attn_mask, seed, count, head_affine=kernels.head_affine,
                                       bn_moments=kernels.bn_moments, centers_in_forward=kernels.centers_in_forward,
                                       keep_terms=self._keeps_terms(norm, attn_mask, stats_in), **kw)
        shift = gram_shift(Nk)
        softmax_stats, s1, gram = kernels.gram_sums(q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p,
                                                    shift=shift)
        stats = torch.stack(gram_batch_statistics(mix_weight, mix_bias, s1, gram, count, shift))
        out, softmax_stats = kernels.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                             batch_stats(stats, eps, acc), attn_mask, seed, softmax_stats,
                                             norm="batch", **kw)
        return (out, softmax_stats, stats) + no_terms

    def gram_sums(self, q, k, attn_mask, seed, *, scale, dropout_p, shift):
        B, H, Nq, _ = q.shape
        softmax_stats, s1, gram = self.kernels.gram_sums(q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p,
                                                         shift=shift)
        # One set of kept entries for every head (the registry refuses per-head masks here): Hm = 1.
        count = unmasked_count(attn_mask, B, Nq, k.shape[2], q.device).reshape(1)
        return softmax_stats, s1.reshape(1, H), gram.reshape(1, H, H), count

    def bn_grad_sums(self, grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                     softmax_stats, stats, R, U, *, scale, out_scale, eps, dropout_p):
        if R.shape[0] > 0:
            # The one-sweep forward's terms (X V and U, no mask): dN = out_scale dO V^T, so
            # sum dN xhat = out_scale sum_i dO_i . (xhat V)_i and sum dN = out_scale sum_i dO_i . U (docs/math.md,
            # "Through V and the norm"), xhat V formed from X V and U.
            return self.kernels.head_dot_sums(grad_out, R, U, stats, mix_weight, mix_bias, scale=out_scale, eps=eps,
                                              n_keys=k.shape[2])
        return self.kernels.bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                         batch_stats(stats, eps, accumulator_dtype(q)), attn_mask, seed,
                                         softmax_stats, scale=scale, out_scale=out_scale, eps=eps,
                                         dropout_p=dropout_p)

    def backward(self, grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                 softmax_stats, stats, R, U, *, scale, out_scale, norm, eps, dropout_p, bn_grad_sums=None):
        kw = dict(scale=scale, out_scale=out_scale, eps=eps, dropout_p=dropout_p)
        coefficients, own_grads = None, None
        if norm == "batch":
            acc = accumulator_dtype(q)
            fused = self.kernels.bn_coefficients is not None
            own = bn_grad_sums is None  # this call's own sums are also d_norm_weight, d_norm_bias
            if not own:
                sums = bn_grad_sums
            elif fused and R.shape[0] > 0:
                # head_dot_sums' per-block parts, added up by bn_coefficients' launch (which also writes the
                # norm's gradients): no sum, no copies
                sums = self.kernels.head_dot_sums(grad_out, R, U, stats, mix_weight, mix_bias, scale=out_scale,
                                                  eps=eps, n_keys=k.shape[2], summed=False)
            else:
                sums = self.bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask,
                                         seed, softmax_stats, stats, R, U, **kw)
            if fused:
                coefficients, *grads = self.kernels.bn_coefficients(stats, sums, norm_weight, norm_bias, eps=eps,
                                                                    dtype=acc, own_grads=own)
                own_grads = tuple(grads)
            else:
                coefficients = bn_backward_coefficients(stats, eps, norm_weight, sums, acc)
                # Copies, in the parameters' dtypes (rows of one tensor would alias each other, which custom op
                # outputs may not); none for an absent parameter, whose gradient nothing reads.
                own_grads = tuple(None if not own or param is None else sums[row].to(param.dtype, copy=True)
                                  for row, param in enumerate((norm_weight, norm_bias)))
        dq, dk, dv, dw, dc, dnw, dnb = self.kernels.backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight,
                                                             norm_bias, coefficients, attn_mask, seed, softmax_stats,
                                                             norm=norm, **kw)
        if norm == "batch":
            dnw, dnb = own_grads
        return dq, dk, dv, dw, dc, dnw, dnb

