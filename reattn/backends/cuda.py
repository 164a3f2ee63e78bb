"""CUDA C++ backend: the fused programs of ``csrc/cuda`` (in ``reattn._C``) on the shared op ladder.

Its ops are ``reattn::cuda_forward``, ``reattn::cuda_backward``, ``reattn::cuda_gram_sums``,
``reattn::cuda_bn_grad_sums`` (``_ladder.OpLadder``: nothing of size B*H*Nq*Nk is saved or
written), ``reattn::cuda_update_running_stats`` (training BatchNorm's running statistics, in place,
one launch) and ``reattn::cuda_forward_eval_batchnorm`` (eval-mode BatchNorm without gradients: the
programs fold the norm from the running statistics, one launch where the ladder's fold took six torch
ops). Local training BatchNorm runs in one sweep over the keys: the forward program with norm none takes the
map's shift -sum_h W[g, h] / Nk as its mixing bias, formed in its own parameter fold (``center_keys``; the
CUDA-core programs take it from ``_C.cuda_moments_center``), also sums the map's moments per head
(``_C.cuda_forward(..., with_moments=True)``) and, without a mask at ViT lengths, V over the keys in shares
per row block (U, which the norm's shift multiplies); ``_fused.one_sweep_batchnorm`` applies the norm to X V
in one element-wise pass that also adds U's shares (``_C.cuda_head_affine``);
without a mask the forward writes X V in q's dtype and keeps it, and the backward's BatchNorm sums are one
pass over dO, X V and U (``_C.cuda_head_dot_sums``, which forms R = xhat V's sums from them) instead of a
sweep over the keys. Dropout uses Triton's Philox stream, so for
one seed the CUDA and Triton backends drop the same entries.

On CPU tensors the same ops run the host emulator of the CUDA programs (``csrc/cuda/emulate.h``),
which is how CI tests this backend without a GPU. ``backend="cuda"`` accepts CPU tensors only with
``REATTN_CUDA_EMULATE=1`` (as ``TRITON_INTERPRET=1`` for Triton); it is slow and never picked by
``backend="auto"``.
"""
from __future__ import annotations

from typing import Optional

import torch

from reattn._extension import _C, emulating
from reattn.backends._fused import FusedKernels, FusedRawOps
from reattn.backends._ladder import OpLadder

__all__ = ["CUDA_OPS", "cuda_backward", "cuda_forward", "emulating", "re_attention_cuda"]

# Program kinds of csrc/cuda/params.h, for reattn._C.cuda_plan.
PROGRAM_KINDS = {"forward": 0, "gram_sums": 1, "backward": 2, "bn_grad_sums": 3}


# The softmax statistics the ops pass from the forward to the backward: [B, H, Nq, 2] (row max,
# log-sum), FusedKernels.softmax_stats_shape.
def _forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed, softmax_stats, *,
             scale, out_scale, norm, eps, dropout_p):
    out, softmax_stats = _C.cuda_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats,
                                         attn_mask, seed, softmax_stats, scale, out_scale, norm, eps, dropout_p)
    return out, softmax_stats


def _forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
                            attn_mask, *, scale, out_scale, eps):
    # Eval-mode BatchNorm for inference: the programs fold the norm from the running statistics as given.
    out, _ = _C.cuda_forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, None, attn_mask, None, None, scale,
                             out_scale, "batch", eps, 0.0, running_mean=running_mean, running_var=running_var)
    return out


def _gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift):
    softmax_stats, s1, gram = _C.cuda_gram_sums(q, k, attn_mask, seed, scale, dropout_p, shift)
    return softmax_stats, s1, gram


def _backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, bn_coefficients, attn_mask, seed,
              softmax_stats, *, scale, out_scale, norm, eps, dropout_p):
    # norm "batch": the [4, H] coefficients (mean, 1/std, e, f) the main program reads.
    dq, dk, dv, dw, dc, dnw, dnb = _C.cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                    bn_coefficients, attn_mask, seed, softmax_stats, scale, out_scale,
                                                    norm, eps, dropout_p, False)
    return dq, dk, dv, dw, dc, dnw if norm == "layer" else None, dnb if norm == "layer" else None


def _bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, batch_stats, attn_mask, seed,
                  softmax_stats, *, scale, out_scale, eps, dropout_p):
    # The "bn_grad_sums" program (kBnGradSums): only dgamma = sum(dN xhat) and dbeta = sum(dN) are written.
    *_, sum_dn_xhat, sum_dn = _C.cuda_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                               batch_stats, attn_mask, seed, softmax_stats, scale, out_scale, "batch",
                                               eps, dropout_p, True)
    return torch.stack([sum_dn_xhat, sum_dn])


def value_parts(value_sums: torch.Tensor) -> Optional[torch.Tensor]:
    """U = sum_j V_j in parts: the forward's per-row-block shares [B, H, row blocks, D] (head_affine adds them), or
    None where the programs summed none (a mask, key segments, or the CUDA-core programs: the caller sums V)."""
    return value_sums if value_sums.shape[0] > 0 else None


def _forward_moments(q, k, v, mix_weight, mix_bias, attn_mask, seed, *, scale, dropout_p, dtype, center_keys=0):
    # R' = X V in `dtype` (q's, or the accumulation dtype), the float64 sums of X, X^2 per program: [programs, 2, H]
    # (the CUDA-core programs add theirs into one: [1, 2, H]), and U in parts where the tensor-core programs summed V
    # on the way. center_keys: X = W P~ - center, the programs forming center = sum_h W[g, h] / center_keys.
    x_v, softmax_stats, moments, value_sums = _C.cuda_forward(q, k, v, mix_weight, mix_bias, None, None, None,
                                                              attn_mask, seed, None, scale, 1.0, "none", 1e-5,
                                                              dropout_p, True, dtype != q.dtype,
                                                              center_keys=center_keys)
    return x_v, softmax_stats, moments, value_parts(value_sums)


def coefficient_rows(rows, dtype: torch.dtype) -> torch.Tensor:
    """The [2, H] coefficients head_affine reads: the leading rows of the buffer ``rows`` are rows of, where they are
    (``bn_moments``' output, unbound), else their stack (one launch)."""
    base = rows[0]._base
    if (base is not None and base.dim() == 2 and base.shape[0] >= len(rows) and base.is_contiguous()
            and base.dtype == dtype and all(t._base is base and t.dim() == 1 for t in rows)
            and [t.data_ptr() for t in rows] == [base[i].data_ptr() for i in range(len(rows))]):
        return base[:len(rows)]
    return torch.stack(rows).to(dtype).contiguous()


def _head_affine(r, u, alpha, beta, dtype, u_sum=None):
    # One-sweep training BatchNorm's finish (csrc/cuda/head_affine.cuh): (alpha r + beta u).to(dtype), r in dtype or
    # its accumulation dtype; with u_sum, u is U in parts (the forward's shares), added and written to u_sum.
    return _C.cuda_head_affine(r, u, coefficient_rows((alpha, beta), u.dtype), dtype, u_sum=u_sum)


def _bn_moments(moments, count, center, mix_bias, norm_weight, norm_bias, *, out_scale, eps, dtype, mix_weight=None,
                n_keys=0):
    # One-sweep training BatchNorm's statistics and coefficients (csrc/cuda/parameters.cuh): one launch.
    # count: a 0-dim float64 tensor, or (without a mask) the number itself, which the kernel takes as an argument.
    # center None: formed from mix_weight and n_keys as the forward formed it (center_keys).
    given = isinstance(count, torch.Tensor)
    return _C.cuda_bn_moments(moments, count if given else None, center, mix_bias, norm_weight, norm_bias, out_scale,
                              eps, dtype, count_value=0.0 if given else float(count), mix_weight=mix_weight,
                              n_keys=n_keys)


def _bn_coefficients(stats, sums, norm_weight, norm_bias, *, eps, dtype, own_grads):
    # Training BatchNorm's backward coefficients [4, H] (csrc/cuda/parameters.cuh) from sums [2, H] or head_dot_sums'
    # parts, and with own_grads the norm's gradients in the parameters' dtypes: one launch.
    coefficients, dnw, dnb = _C.cuda_bn_coefficients(stats.contiguous(), sums, norm_weight, norm_bias, eps, dtype,
                                                     own_grads=own_grads)
    return (coefficients, dnw if own_grads and norm_weight is not None else None,
            dnb if own_grads and norm_bias is not None else None)


def _update_running_stats(running_mean, running_var, stats, momentum):
    # nn.BatchNorm2d's update of the running statistics, in place (csrc/cuda/parameters.cuh): one launch.
    _C.cuda_update_running_stats(running_mean, running_var, stats, momentum)


def _head_dot_sums(grad, r, u, stats, mix_weight, mix_bias, *, scale, eps, n_keys, summed=True):
    # [2, H] float64: per head, scale (sum grad . R, sum grad . u) (the training BatchNorm backward's sums), R = xhat V
    # formed in the kernel from the kept r = X V; summed=False: the blocks' parts [2, B, H, row blocks] instead.
    return _C.cuda_head_dot_sums(grad, r, u, stats, mix_weight, mix_bias, eps, n_keys, scale, summed=summed)


def _padded_rows(tensors):
    # [B, H, N, D] 16-bit tensors (D not a multiple of 8) as views of copies padded with zeros to 8 columns, which
    # cuda_forward and cuda_backward recognize (ops.cpp is_padded_view) and read without copying them again.
    return _C.cuda_padded_rows(tensors)


@torch.compiler.assume_constant_result
def _stages_queries(H: int, D: int, Nk: int, dtype: str, device: int) -> bool:
    return _C.cuda_forward_stages_queries(H, D, Nk, dtype, device)


def _forward_stages_queries(q, k):
    # Whether cuda_forward's program reads q's rows unpadded (ops.cpp forward_stages_queries): the ladder then pads
    # k and v alone. A constant to torch.compile (plain numbers in, a bool out); symbolic sizes (dynamic shapes)
    # answer False, so the ladder pads q as well (the forward reads either).
    dims = (q.shape[1], q.shape[3], k.shape[2])
    if not all(isinstance(n, int) for n in dims):
        return False
    return _stages_queries(*dims, str(q.dtype)[6:], q.device.index if q.is_cuda else -1)


CUDA_KERNELS = FusedKernels(forward=_forward, gram_sums=_gram_sums, bn_grad_sums=_bn_grad_sums, backward=_backward,
                            forward_moments=_forward_moments, head_affine=_head_affine,
                            centers_in_forward=True, head_dot_sums=_head_dot_sums, bn_moments=_bn_moments, bn_coefficients=_bn_coefficients,
                            update_running_stats=_update_running_stats,
                            forward_eval_batchnorm=_forward_eval_batchnorm, padded_rows=_padded_rows,
                            forward_stages_queries=_forward_stages_queries,
                            softmax_stats_shape=lambda q: (*q.shape[:3], 2))
CUDA_OPS = OpLadder(FusedRawOps(CUDA_KERNELS), forward="reattn::cuda_forward", backward="reattn::cuda_backward",
                    gram_sums="reattn::cuda_gram_sums", bn_grad_sums="reattn::cuda_bn_grad_sums",
                    running_stats="reattn::cuda_update_running_stats",
                    eval_batchnorm="reattn::cuda_forward_eval_batchnorm", padded_rows="reattn::cuda_padded_rows",
                    device_types=("cuda", "cpu"))
cuda_forward, cuda_backward = CUDA_OPS.forward, CUDA_OPS.backward
re_attention_cuda = CUDA_OPS.run  # reattn.re_attention with backend="cuda" (validated arguments)


def launch_plan(kind: str, heads: int, head_dim: int, n_queries: int, dtype: torch.dtype,
                shared_limit: int = 0) -> dict:
    """How a fused CUDA program is laid out and launched for a problem (no GPU needed).

    kind: "forward", "gram_sums", "backward" or "bn_grad_sums". shared_limit: bytes of shared
    memory per block the plan must fit (0 = sm_80's 163 KB; the GPU's own limit when launching).
    Returns block_m, block_n, pad, head_dim_p, heads_p, head_group, chunk_d, num_chunks, num_m,
    shared_bytes, threads.
    """
    if kind not in PROGRAM_KINDS:
        raise ValueError(f"launch_plan: kind must be one of {sorted(PROGRAM_KINDS)}, got {kind!r}")
    name = str(dtype).replace("torch.", "")
    return dict(_C.cuda_plan(PROGRAM_KINDS[kind], heads, head_dim, n_queries, name, shared_limit))
