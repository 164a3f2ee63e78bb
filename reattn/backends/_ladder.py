"""The one custom-op + autograd ladder of the fused backends (cpu, triton, cuda).

Layering, as flash-attention's: raw ops (a backend's :class:`RawOps`: its kernels behind one
signature) -> ``torch.library`` custom ops, each defined beside its fake implementation
(``torch.compile`` traces through the fakes) -> autograd (the forward's derivative is the backward
op, the backward op's is the eager math) -> :meth:`OpLadder.run`, which ``reattn.re_attention``
calls with validated arguments. Every backend builds one :class:`OpLadder` with its op names written
out (``"reattn::cpu_forward"`` in ``cpu.py``, ...), so ``grep`` finds each op where it is made.

Four ops per backend:

* ``forward``: (out [B, H, Nq, D], softmax_stats, stats [3, H] float64, R, U). softmax_stats is what
  the backend saves per score row (``RawOps.softmax_stats_shape``); stats are training BatchNorm's
  mean, biased variance and count per head (in other modes zeros, or [0, H] where ``RawOps.stats_rows``
  says so: the fused backends, whose zero fill was a launch per call); R and U = keep V are the
  one-sweep BatchNorm's terms for a backend and path that keep them (``RawOps.bn_terms_like`` gives
  their shapes and dtypes; R is xhat V in the cpu kernel, X V in the fused ones, whose backward sums form
  xhat V from it), else empty. Given ``softmax_in`` and ``stats_in`` (training
  BatchNorm, both or neither) it normalizes with those instead of its own batch's statistics.
* ``gram_sums``: the statistics sweep as sums that add up over processes (docs/math.md, "BatchNorm
  statistics through the Gram matrix"): (softmax_stats, s1 [Hm, H], gram [Hm, H, H], count [Hm]).
* ``bn_grad_sums``: training BatchNorm's backward sums over this call's entries, [2, H] float64 =
  (sum dN xhat, sum dN), dN the gradient w.r.t. the norm's output (docs/math.md, "Through V and the
  norm"); they are also d norm_weight and d norm_bias, and add up over processes.
* ``backward``: every gradient (custom ops cannot return None: an empty [0] tensor for an absent
  parameter, zeros for a given one its mode does not read). Given
  ``bn_grad_sums`` (every process's, added up) the norm's own gradients come back zero: the caller
  holds its share.

Training BatchNorm synchronized across processes (``sync_group``, ``nn.SyncBatchNorm``
semantics) runs these ops in steps with all-reduces between them (:class:`SyncedBatchNorm`):
custom ops cannot take a process group. Saved for the backward: the inputs as given, the softmax
statistics, stats, R and U; never a [B, H, Nq, Nk] map.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from reattn._batchnorm import (accumulator_dtype, check_counts, fold_batchnorm_eval, gram_batch_statistics,
                               gram_shift, mask_heads, update_running_stats)
from reattn._collectives import all_reduce_sum
from reattn._ops import define_op, register_autograd, register_fake


def draw_dropout_seed(device: torch.device) -> Tensor:
    """The int64 seed [1] one dropout call uses: drawn from torch's generator for ``device``.

    ``torch.manual_seed`` therefore makes fused dropout reproducible. A tensor, not a Python int:
    drawing it needs no ``.item()``, so torch.compile keeps dropout in its graph. Each backend's
    ``RawOps.dropout_keep_mask`` materializes the pattern its kernels draw from it.
    """
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


class RawOps:
    """A backend's kernels behind the one signature the ladder's ops share (no autograd, no dispatcher).

    forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, *, scale, out_scale,
            norm, eps, dropout_p, softmax_in, stats_in) -> (out, softmax_stats, stats, R, U)
    gram_sums(q, k, attn_mask, seed, *, scale, dropout_p, shift) -> (softmax_stats, s1 [Hm, H],
            gram [Hm, H, H], count [Hm]) of X = P~ - shift over the kept entries
    bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
            softmax_stats, stats, R, U, *, scale, out_scale, eps, dropout_p) -> [2, H] (sum dN xhat, sum dN)
    backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats,
            stats, R, U, *, scale, out_scale, norm, eps, dropout_p, bn_grad_sums)
            -> (dq, dk, dv, d_mix_weight, d_mix_bias, d_norm_weight, d_norm_bias), None allowed
    dropout_keep_mask(seed, (B, H, Nq, Nk), p) -> bool keep-mask the kernels draw for ``seed``
    forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
            attn_mask, *, scale, out_scale, eps) -> out: eval-mode BatchNorm's forward with the running
            statistics as given, no autograd (``folds_eval_batchnorm`` True where the backend has it: its
            programs fold the norm themselves, where the ladder's fold is torch ops on [H]-sized tensors)
    update_running_stats(running_mean, running_var, stats [3, H], momentum) -> None: nn.BatchNorm2d's update
            of the running statistics, in place, from training BatchNorm's stats (default: torch's ops;
            ``updates_running_stats`` True where the backend has a kernel for it)
    padded_rows(tensors) -> views of the tensors' rows padded to a multiple of 8 columns with zeros, which the
            backend's kernels read without copying them (``pads_rows`` True where the backend has it, for the
            tensors ``padded_inputs`` names: an op of its own, which :meth:`OpLadder.run` calls on q, k, v)
    softmax_stats_shape(q): the shape of what the forward saves per score row
    bn_terms_like(q, norm, attn_mask, stats_in) -> ((shape, dtype) of R, (shape, dtype) of U) the forward returns
            (leading dim 0: empty, the backward sums come from a sweep of their own)
    stats_rows(norm) -> rows of the forward's stats [rows, H] (3; 0 where a backend has none outside BatchNorm)

    norm is "none", "layer" or "batch" (training BatchNorm: eval BatchNorm arrives folded into the
    mixing). Shapes as in the module doc.
    """

    keeps_bn_terms = False  # training BatchNorm's forward returns R and U [B, H, Nq, D] (the cpu kernel's)
    updates_running_stats = False  # update_running_stats is a kernel of the backend's (an op of its own)
    folds_eval_batchnorm = False   # forward_eval_batchnorm exists (an op of its own, for calls without gradients)
    pads_rows = False              # padded_rows exists (an op of its own)

    def padded_inputs(self, q: Tensor, k: Tensor, v: Tensor) -> List[int]:
        """Which of q, k, v (0, 1, 2) the ladder pads with :meth:`padded_rows` before the ops read them."""
        return []

    def padded_rows(self, tensors):
        raise NotImplementedError

    def bn_terms_like(self, q: Tensor, norm: str, attn_mask: Optional[Tensor], stats_in: Optional[Tensor]):
        B, H, Nq, D = q.shape
        kept = ((B if norm == "batch" and self.keeps_bn_terms else 0, H, Nq, D), accumulator_dtype(q))
        return kept, kept

    def stats_rows(self, norm: str) -> int:
        """Rows of the forward's stats [rows, H]: 3 (mean, biased variance, count) for training BatchNorm; in
        other modes 3 rows of zeros (the cpu kernel's), or 0 where a backend returns them empty."""
        return 3

    def softmax_stats_shape(self, q: Tensor) -> Tuple[int, ...]:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def gram_sums(self, *args, **kwargs):
        raise NotImplementedError

    def bn_grad_sums(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, *args, **kwargs):
        raise NotImplementedError

    def dropout_keep_mask(self, seed: Tensor, shape: Tuple[int, int, int, int], p: float) -> Tensor:
        raise NotImplementedError

    def update_running_stats(self, running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
        update_running_stats(running_mean, running_var, stats[0], stats[1], stats[2], momentum)

    def forward_eval_batchnorm(self, *args, **kwargs):
        raise NotImplementedError


def eager_double_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor,
                          mix_bias: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                          attn_mask: Optional[Tensor], dropout_mask: Optional[Tensor], grad_grads: Tuple, *,
                          backend: str, scale: float, out_scale: float, norm: str, eps: float, dropout_p: float,
                          synced: bool) -> Tuple[Optional[Tensor], ...]:
    """The derivative of a backward op (double backward: ``create_graph=True``, gradient penalties, MAML).

    The backward kernels are not differentiable as such; their derivative is recomputed through the
    eager math (``reattn.reference``) on the same inputs, with the kernels' dropout pattern replayed
    (``dropout_mask``). Cost: one eager forward and two eager backwards, with the [B, H, Nq, Nk] maps
    materialized, as ``backend="eager"``; only when a graph of the gradients is asked for.
    grad_grads: the cotangents of the backward op's outputs (dq, dk, dv, d mix_weight, d mix_bias,
    d norm_weight, d norm_bias). Returns the gradients w.r.t. (grad_out, q, k, v, mix_weight, mix_bias,
    norm_weight, norm_bias); connected to their graphs when the caller builds one (third order).
    """
    if synced:
        raise RuntimeError(f"re_attention(..., backend={backend!r}, sync_group=...): double backward "
                           "(create_graph=True) through training BatchNorm synchronized across processes is not "
                           "supported; use backend='eager' for higher-order gradients")
    from reattn.reference import re_attention_ref

    inputs = (grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias)
    with torch.enable_grad():
        # Inputs already in a graph stay in it (higher orders reach them); the others become leaves.
        xs = [None if t is None else t if t.requires_grad else t.detach().requires_grad_(True) for t in inputs]
        out = re_attention_ref(*xs[1:6], scale=scale, norm=norm, norm_weight=xs[6], norm_bias=xs[7],
                               training=norm == "batch" or dropout_p > 0, eps=eps, out_scale=out_scale,
                               dropout_p=dropout_p, attn_mask=attn_mask, dropout_mask=dropout_mask)
        wrt = [(x, gg) for x, gg in zip(xs[1:], grad_grads) if x is not None]
        first = torch.autograd.grad(out, [x for x, _ in wrt], xs[0], create_graph=True, allow_unused=True)
        pairs = [(f, gg) for f, (_, gg) in zip(first, wrt) if f is not None and gg is not None]
        present = [x for x in xs if x is not None]
        if not pairs:
            return tuple(None for _ in inputs)
        grads = iter(torch.autograd.grad([f for f, _ in pairs], present, [gg.to(f.dtype) for f, gg in pairs],
                                         allow_unused=True, create_graph=torch.is_grad_enabled()))
    return tuple(None if x is None else next(grads) for x in xs)


def _op_name(qualified: str) -> str:
    namespace, _, name = qualified.partition("::")
    if namespace != "reattn" or not name:
        raise ValueError(f"op names are written 'reattn::<name>', got {qualified!r}")
    return name


class OpLadder:
    """One backend's custom ops, their fakes and autograd over its :class:`RawOps`, and its entry point.

    Built once per backend with the ops' names written out, e.g.
    ``OpLadder(raw, forward="reattn::triton_forward", backward="reattn::triton_backward",
    gram_sums="reattn::triton_gram_sums", bn_grad_sums="reattn::triton_bn_grad_sums",
    device_types=("cuda", "cpu"))``. The ops are the attributes ``forward``, ``backward``,
    ``gram_sums`` and ``bn_grad_sums`` (``torch.ops.reattn.<name>.default``); ``device_types=()``
    registers them without implementations (the static model calls the ``*_impl`` methods directly).
    ``running_stats``: the name of a fifth op, where the raw ops update the running statistics with a
    kernel (``RawOps.updates_running_stats``): ``update_running_stats``, which writes ``running_mean`` and
    ``running_var`` in place (its schema says so, for torch.compile); without it, ``update_running_stats``
    is the raw ops' Python body. ``eval_batchnorm``: the name of a sixth, where the raw ops fold eval-mode
    BatchNorm themselves (``RawOps.folds_eval_batchnorm``): ``forward_eval_batchnorm``, which :meth:`run`
    calls for eval-mode BatchNorm when no gradient is needed (inference); else None. ``padded_rows``: the name of a
    seventh, where the raw ops pad rows for their kernels (``RawOps.pads_rows``): ``padded_rows``, which :meth:`run`
    calls on q, k and v (those ``RawOps.padded_inputs`` names) before the forward, so that the forward reads
    them without copying them and the backward reads the views the autograd saved (the op's gradient is the
    views' gradient as it is); else None.
    """

    def __init__(self, raw: RawOps, *, forward: str, backward: str, gram_sums: str, bn_grad_sums: str,
                 device_types: Tuple[str, ...], running_stats: Optional[str] = None,
                 eval_batchnorm: Optional[str] = None, padded_rows: Optional[str] = None) -> None:
        self.raw = raw
        self.name = _op_name(forward).rsplit("_", 1)[0]  # the backend, for messages: "triton"
        self.forward_name, self.backward_name = forward, backward
        self.forward = define_op(_op_name(forward), self.forward_impl, device_types)
        register_fake(self.forward)(self.forward_fake)
        self.gram_sums = define_op(_op_name(gram_sums), self.gram_sums_impl, device_types)
        register_fake(self.gram_sums)(self.gram_sums_fake)
        self.bn_grad_sums = define_op(_op_name(bn_grad_sums), self.bn_grad_sums_impl, device_types)
        register_fake(self.bn_grad_sums)(self.bn_grad_sums_fake)
        self.backward = define_op(_op_name(backward), self.backward_impl, device_types)
        register_fake(self.backward)(self.backward_fake)
        register_autograd(self.forward, self.forward_derivative, setup_context=self.setup_forward_context)
        register_autograd(self.backward, self.backward_derivative, setup_context=self.setup_backward_context)
        self.update_running_stats = self.running_stats_impl
        if raw.updates_running_stats:
            self.update_running_stats = self._own_op(
                running_stats, "running_stats", "update the running statistics with a kernel", "update_running_stats",
                self.running_stats_impl, self.running_stats_fake, device_types,
                mutates_args=("running_mean", "running_var"))
        self.forward_eval_batchnorm = None
        if raw.folds_eval_batchnorm:
            self.forward_eval_batchnorm = self._own_op(
                eval_batchnorm, "eval_batchnorm", "fold eval-mode BatchNorm", "forward_eval_batchnorm",
                self.eval_batchnorm_impl, self.eval_batchnorm_fake, device_types)
        self.padded_rows = None
        if raw.pads_rows:
            self.padded_rows = self._own_op(padded_rows, "padded_rows", "pad rows", "padded_rows",
                                            self.padded_rows_impl, self.padded_rows_fake, device_types)
            register_autograd(self.padded_rows, self.padded_rows_derivative, setup_context=self.padded_rows_context)

    def _own_op(self, name: Optional[str], argument: str, what: str, suffix: str, impl, fake,
                device_types: Tuple[str, ...], mutates_args: Tuple[str, ...] = ()) -> torch._ops.OpOverload:
        """The op of a step the raw ops have a kernel for (``what``), named by the constructor's ``argument``."""
        if name is None:
            raise ValueError(f"{self.name}: raw ops that {what} need the op's name "
                             f"({argument}='reattn::<backend>_{suffix}')")
        op = define_op(_op_name(name), impl, device_types, mutates_args=mutates_args)
        register_fake(op)(fake)
        return op

    # ---- rows padded for the kernels: op, fake, autograd ----------------------------------------------------
    def padded_rows_impl(self, tensors: List[Tensor]) -> List[Tensor]:
        """Each [B, H, N, D] tensor as a view [B, H, N, D] of its rows padded with zeros to a multiple of 8
        columns (a copy), which the backend's kernels read as it is."""
        return self.raw.padded_rows(tensors)

    @staticmethod
    def padded_rows_fake(tensors):
        return [t.new_empty((*t.shape[:3], -(-t.shape[3] // 8) * 8)).narrow(3, 0, t.shape[3]) for t in tensors]

    @staticmethod
    def padded_rows_context(ctx, inputs, output):
        pass

    @staticmethod
    def padded_rows_derivative(ctx, grads):
        return list(grads)  # the views hold the inputs' values: their gradient is the inputs'

    # ---- the running statistics' update (training BatchNorm): op, fake ---------------------------------------
    def running_stats_impl(self, running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
        """nn.BatchNorm2d's update of running_mean, running_var [H] in place from stats [3, H] (mean, biased
        variance, count): running += momentum (batch - running), the variance unbiased by n / (n - 1)."""
        self.raw.update_running_stats(running_mean, running_var, stats, momentum)

    @staticmethod
    def running_stats_fake(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
        return None

    # ---- eval-mode BatchNorm without gradients (inference): op, fake -----------------------------------------
    def eval_batchnorm_impl(
        self, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
        attn_mask: Optional[Tensor], scale: float, out_scale: float, eps: float,
    ) -> Tensor:
        """O [B, H, Nq, D] with A = out_scale (gamma (M - running_mean) / sqrt(running_var + eps) + beta); the
        backend's programs fold the norm into the mixing. No autograd: :meth:`run` calls it only when no
        gradient is needed."""
        return self.raw.forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                               running_var, attn_mask, scale=scale, out_scale=out_scale, eps=eps)

    @staticmethod
    def eval_batchnorm_fake(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean, running_var,
                            attn_mask, scale, out_scale, eps):
        return q.new_empty(q.shape)

    # ---- forward: op, fake ---------------------------------------------------------------------------------
    def forward_impl(
        self, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], scale: float, out_scale: float, norm: str, eps: float, dropout_p: float,
        softmax_in: Optional[Tensor] = None, stats_in: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(out, softmax_stats, stats [3, H], R, U); softmax_in and stats_in as the module doc says
        (they come back as copies: a custom op may not return its inputs)."""
        if (softmax_in is None) != (stats_in is None) or (stats_in is not None and norm != "batch"):
            raise ValueError(f"{self.forward_name}: softmax_in and stats_in go together, with norm='batch' only")
        return self.raw.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale=scale,
                                out_scale=out_scale, norm=norm, eps=eps, dropout_p=dropout_p, softmax_in=softmax_in,
                                stats_in=stats_in)

    def forward_fake(self, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale,
                     norm, eps, dropout_p, softmax_in=None, stats_in=None):
        B, H, Nq, D = q.shape
        acc = accumulator_dtype(q)
        (r_shape, r_dtype), (u_shape, u_dtype) = self.raw.bn_terms_like(q, norm, attn_mask, stats_in)
        return (q.new_empty((B, H, Nq, D)), q.new_empty(self.raw.softmax_stats_shape(q), dtype=acc),
                q.new_empty((self.raw.stats_rows(norm), H), dtype=torch.float64), q.new_empty(r_shape, dtype=r_dtype),
                q.new_empty(u_shape, dtype=u_dtype))

    # ---- gram_sums: op, fake ------------------------------------------------------------------------------
    def gram_sums_impl(self, q: Tensor, k: Tensor, attn_mask: Optional[Tensor], seed: Optional[Tensor], scale: float,
                       dropout_p: float, shift: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(softmax_stats, s1 [Hm, H], gram [Hm, H, H], count [Hm] float64) of X = P~ - shift over the kept
        entries; Hm = the mask's head count (1 without a mask or with one shared by the heads)."""
        return self.raw.gram_sums(q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p, shift=shift)

    def gram_sums_fake(self, q, k, attn_mask, seed, scale, dropout_p, shift):
        H = q.shape[1]
        Hm = mask_heads(attn_mask, H)
        f64 = dict(dtype=torch.float64)
        return (q.new_empty(self.raw.softmax_stats_shape(q), dtype=accumulator_dtype(q)), q.new_empty((Hm, H), **f64),
                q.new_empty((Hm, H, H), **f64), q.new_empty((Hm,), **f64))

    # ---- bn_grad_sums: op, fake ---------------------------------------------------------------------------
    def bn_grad_sums_impl(
        self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], softmax_stats: Tensor, stats: Tensor, R: Tensor, U: Tensor, scale: float,
        out_scale: float, eps: float, dropout_p: float,
    ) -> Tensor:
        """[2, H] float64: (sum dN xhat, sum dN) per head over this call's entries (training BatchNorm)."""
        sums = self.raw.bn_grad_sums(grad_out.contiguous(), q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                     attn_mask, seed, softmax_stats, stats, R, U, scale=scale, out_scale=out_scale,
                                     eps=eps, dropout_p=dropout_p)
        return sums.to(torch.float64)

    def bn_grad_sums_fake(self, grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                          softmax_stats, stats, R, U, scale, out_scale, eps, dropout_p):
        return q.new_empty((2, q.shape[1]), dtype=torch.float64)

    # ---- backward: op, fake -------------------------------------------------------------------------------
    def backward_impl(
        self, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Tensor, mix_bias: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], attn_mask: Optional[Tensor],
        seed: Optional[Tensor], softmax_stats: Tensor, stats: Tensor, R: Tensor, U: Tensor, scale: float,
        out_scale: float, norm: str, eps: float, dropout_p: float, bn_grad_sums: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Every gradient in its parameter's dtype, an empty [0] tensor for an absent parameter. bn_grad_sums
        (norm "batch"): the bn_grad_sums op's sums of every process, added up, with stats the statistics of every
        process's entries; the norm's gradients then come back zero. Without them this call's entries
        are the whole batch."""
        if bn_grad_sums is not None and norm != "batch":
            raise ValueError(f"{self.backward_name}: bn_grad_sums belong to norm='batch', got norm={norm!r}")
        dq, dk, dv, dw, dc, dnw, dnb = self.raw.backward(
            grad_out.contiguous(), q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
            softmax_stats, stats, R, U, scale=scale, out_scale=out_scale, norm=norm, eps=eps, dropout_p=dropout_p,
            bn_grad_sums=bn_grad_sums)
        H = q.shape[1]

        def like(grad, param):
            if param is None:  # autograd drops it: an empty tensor, no fill (a launch on a GPU)
                return q.new_empty((0,), dtype=mix_weight.dtype)
            if grad is None:
                return q.new_zeros((H,), dtype=param.dtype)
            return grad.to(param.dtype)

        return dq, dk, dv, dw.to(mix_weight.dtype), like(dc, mix_bias), like(dnw, norm_weight), like(dnb, norm_bias)

    def backward_fake(self, grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                      softmax_stats, stats, R, U, scale, out_scale, norm, eps, dropout_p, bn_grad_sums=None):
        H = q.shape[1]

        def vec(param):
            return q.new_empty((H,) if param is not None else (0,), dtype=(param if param is not None else
                                                                          mix_weight).dtype)

        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
                torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(mix_weight),
                vec(mix_bias), vec(norm_weight), vec(norm_bias))

    # ---- autograd ---------------------------------------------------------------------------------------
    def setup_forward_context(self, ctx, inputs, output):
        (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, scale, out_scale, norm, eps,
         dropout_p, softmax_in, stats_in) = inputs
        _, softmax_stats, stats, R, U = output
        ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats,
                              stats, R, U)
        ctx.options = (scale, out_scale, norm, eps, dropout_p)
        ctx.given_stats = stats_in is not None
        # The derivative reads only the output's gradient: autograd need not fill zero gradients for the
        # softmax statistics, the batch statistics and training BatchNorm's R [B, H, Nq, D] and U (which
        # nothing differentiates), a zero-filled tensor of the output's size and a memset per call.
        ctx.set_materialize_grads(False)

    def forward_derivative(self, ctx, grad_out, grad_softmax_stats, grad_stats, grad_R, grad_U):
        if ctx.given_stats:
            # Given statistics stand for a batch spread over processes: their gradient terms need the
            # backward sums of every process, which only SyncedBatchNorm (holding the group) gathers.
            raise RuntimeError(f"{self.forward_name} with softmax_in/stats_in is differentiated through "
                               f"re_attention(..., backend={self.name!r}, sync_group=...), not on its own")
        q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, stats, R, U = \
            ctx.saved_tensors
        if grad_out is None:  # only the auxiliary outputs were used: nothing flows back
            return (None,) * 16
        dq, dk, dv, dw, dc, dnw, dnb = self.backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                     attn_mask, seed, softmax_stats, stats, R, U, *ctx.options)
        return (dq, dk, dv, dw, dc if mix_bias is not None else None, dnw if norm_weight is not None else None,
                dnb if norm_bias is not None else None, None, None, None, None, None, None, None, None, None)

    def setup_backward_context(self, ctx, inputs, output):
        (grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, stats, R, U,
         scale, out_scale, norm, eps, dropout_p, bn_grad_sums) = inputs
        ctx.save_for_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed)
        ctx.options = dict(scale=scale, out_scale=out_scale, norm=norm, eps=eps, dropout_p=dropout_p)
        ctx.synced = bn_grad_sums is not None

    def backward_derivative(self, ctx, *grad_grads):
        grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed = ctx.saved_tensors
        keep = None if seed is None else self.raw.dropout_keep_mask(
            seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), ctx.options["dropout_p"])
        grads = eager_double_backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, keep,
                                      grad_grads, backend=self.name, synced=ctx.synced, **ctx.options)
        return grads + (None,) * 12

    # ---- the entry point --------------------------------------------------------------------------------
    def run(self, q, k, v, mix_weight, mix_bias, *, scale, norm, norm_weight, norm_bias, running_mean, running_var,
            training, momentum, eps, out_scale, dropout_p, attn_mask, sync_group=None,
            seed: Optional[Tensor] = None) -> Tensor:
        """Validated arguments in, O [B, H, Nq, D] out (``reattn.re_attention`` with this backend).

        Eval-mode BatchNorm is folded into the mixing (its gradients flow through the fold, in
        autograd); training-mode BatchNorm updates ``running_mean``/``running_var`` in place as
        ``nn.BatchNorm2d`` does. sync_group: a process group over which training BatchNorm's
        statistics (and their gradients) are synchronized (:class:`SyncedBatchNorm`); ignored in other
        modes (``reattn.re_attention`` passes it only then). seed: the dropout seed (an int or int64
        tensor) instead of a draw from torch's generator, for tests.
        """
        batch_training = norm == "batch" and training
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, mix_weight, mix_bias, norm_weight, norm_bias))
        if (norm == "batch" and not training and running_mean is not None and not needs_grad
                and self.forward_eval_batchnorm is not None):
            # Inference: the backend's programs fold the norm from the running statistics as given (the fold
            # below is torch ops on [H]-sized tensors, each a launch).
            return self.forward_eval_batchnorm(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                               running_var, attn_mask, scale, out_scale, eps)
        if norm == "batch" and not training:  # eval mode: an affine map per head, folded into the mixing
            mix_weight, mix_bias = fold_batchnorm_eval(mix_weight, mix_bias, norm_weight, norm_bias, running_mean,
                                                       running_var, eps, dtype=accumulator_dtype(q))
            norm, norm_weight, norm_bias = "none", None, None
        if not (training and dropout_p > 0.0):
            dropout_p, seed = 0.0, None
        elif seed is None:
            seed = draw_dropout_seed(q.device)
        else:
            seed = torch.as_tensor(seed, dtype=torch.int64, device=q.device).reshape(1)
        # Rows the kernels read padded: copied once here (the forward reads the views, the autograd saves them for
        # the backward), where the forward and the backward each copied them; not q where the forward reads it
        # unpadded (the backward pads it for itself).
        pad = self.raw.padded_inputs(q, k, v)
        if pad and self.padded_rows is not None:
            rows = [q, k, v]
            for i, view in zip(pad, self.padded_rows([rows[i] for i in pad])):
                rows[i] = view
            q, k, v = rows
        if batch_training and sync_group is not None:
            out, stats = SyncedBatchNorm.apply(self, sync_group, (scale, out_scale, eps, dropout_p), q, k, v,
                                               mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed)
        else:
            out, _, stats, _, _ = self.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                                               scale, out_scale, norm, eps, dropout_p)
        if batch_training and running_mean is not None:  # the forward has refused counts <= 1
            with torch.no_grad():  # no gradient flows into the running statistics
                self.update_running_stats(running_mean, running_var, stats, momentum)
        return out


class SyncedBatchNorm(torch.autograd.Function):
    """Training BatchNorm over a process group (``nn.SyncBatchNorm`` semantics) through one backend's ops.

    Forward: this process's Gram sums (s1, gram, count: H² + H + 1 float64 numbers, Hm times that for
    a per-head mask) -> all-reduce -> global mean and variance (``gram_batch_statistics``) -> the
    forward op with those statistics and the sweep's softmax statistics. Backward: this process's
    (sum dN xhat, sum dN) (2H numbers) -> all-reduce -> the backward op with the global sums, whose
    dM then uses the means over every process's entries. The norm's own gradients are this
    process's sums (its share; DDP adds them up), as ``nn.SyncBatchNorm``'s.
    ``apply(ladder, group, (scale, out_scale, eps, dropout_p), q, k, v, mix_weight, mix_bias,
    norm_weight, norm_bias, attn_mask, seed)`` returns (out [B, H, Nq, D], stats [3, H]: global mean,
    biased variance and count, for the running statistics). Every process of the group must run the
    forward and the backward (collectives on both sides).
    """

    @staticmethod
    def forward(ctx, ladder, group, options, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed):
        scale, out_scale, eps, dropout_p = options
        shift = gram_shift(k.shape[2])
        softmax_stats, s1, gram, count = ladder.gram_sums(q, k, attn_mask, seed, scale, dropout_p, shift)
        s1, gram, count = all_reduce_sum([s1, gram, count], group)
        mean, var, n = gram_batch_statistics(mix_weight, mix_bias, s1, gram, count, shift)
        # After the all-reduce every process sees the same counts (n: per head): all refuse alike, and
        # none is left waiting in a collective the others skipped.
        check_counts(n, " over all processes")
        out, softmax_stats, stats, R, U = ladder.forward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                         attn_mask, seed, scale, out_scale, "batch", eps, dropout_p,
                                                         softmax_stats, torch.stack([mean, var, n]))
        ctx.save_for_backward(q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats,
                              stats, R, U)
        ctx.ladder, ctx.group, ctx.options = ladder, group, options
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed, softmax_stats, stats, R, U = \
            ctx.saved_tensors
        scale, out_scale, eps, dropout_p = ctx.options
        ladder = ctx.ladder
        own = ladder.bn_grad_sums(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias, attn_mask, seed,
                                  softmax_stats, stats, R, U, scale, out_scale, eps, dropout_p)
        (total,) = all_reduce_sum([own], ctx.group)  # every process runs this: a collective
        dq, dk, dv, dw, dc, _, _ = ladder.backward(grad_out, q, k, v, mix_weight, mix_bias, norm_weight, norm_bias,
                                                   attn_mask, seed, softmax_stats, stats, R, U, scale, out_scale,
                                                   "batch", eps, dropout_p, total)
        dnw = None if norm_weight is None else own[0].to(norm_weight.dtype)
        dnb = None if norm_bias is None else own[1].to(norm_bias.dtype)
        return (None, None, None, dq, dk, dv, dw, dc if mix_bias is not None else None, dnw, dnb, None, None)
