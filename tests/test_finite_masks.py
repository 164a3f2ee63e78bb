"""Finite additive masks on every backend: the Hugging Face / timm padding convention.

A padding mask of shape [B, 1, N, N] adds a large finite negative number (``-1e4``, ``-1e9`` or
``torch.finfo(dtype).min``) where the key or the query is a padded token, so the padded query rows
are fully masked. The eager path is the definition: the softmax of the scores as given, in the input
dtype, where a finite fill is an ordinary (very negative) score: a fully masked row attends to every
key with the softmax of its scores plus the fill, and enters training BatchNorm's statistics as any
other row. Every backend (eager, cpu, triton in Triton's interpreter, cuda in its host emulator) is
checked against an independent float64 computation, forward (and the running statistics) and every
gradient, for each fill in float64, float32, bfloat16 and float16, in every norm mode, with the loss
on every row and (training BatchNorm) on the real rows only.

Tolerances come from the error analysis, never from a run (tests/_tolerance.py):

* The reference rounds the masked scores S + mask to the accumulation dtype (float32 for every input
  but float64), as every implementation does: next to -1e9 float32 keeps multiples of 64, so a padded
  row's scores all become the fill and its softmax is exactly uniform, 1/Nk per key; in float64 the
  same row is the softmax of its scores. That rounding is part of the definition, not an error.
* Where the fill leaves the scores distinguishable (|fill| ulp / 2 below the scores' size: -1e4 in
  float32 keeps multiples of 2^-10), a score computed with a different summation order can round to
  the neighbouring multiple: the reference's inputs are perturbed by one ulp of the fill at the
  masked entries to measure what that does.
* Every other rounding is bounded by perturbing the float64 inputs by the probabilistic bound
  lambda sqrt(n) u of the accumulation (relative, random signs) and measuring the change of each
  result (its sensitivity, which includes BatchNorm's and LayerNorm's amplification), plus the
  rounding bound of the result's own magnitude (d mix_bias, exactly 0 under training BatchNorm:
  the size of its terms, sum |dM|).
* bfloat16 and float16 follow FlashAttention's rule on top: within twice the error of the eager
  path in the same dtype (which rounds every map to the input dtype) plus one rounding of the result.

Every backend keeps a row's softmax statistics as (row max m, log-sum ll) and forms P = exp((S - m) - ll):
one logsumexp L = m + ll rounds to m next to such a fill (log N is below half its ulp), which would
weigh every key of a padded row 1 instead of 1/N (the CUDA backend's fp32/fp64 programs did until
they kept the pair, as its fp16/bf16 programs, the cpu kernel and the Triton kernels do).
"""
from __future__ import annotations

import math

import pytest
import torch

import reattn
from reattn.backends import Problem, unavailable_reason
from tests._naive import naive_re_attention
from tests._tolerance import (LAMBDA, accumulation_dtype, reduction_length, rounding_bound, twice_eager_bound,
                              unit_roundoff)

B, H, N, D = 2, 3, 7, 8
OUT_SCALE = 0.8
REAL_TOKENS = (5, 3)  # batch element b has REAL_TOKENS[b] real tokens, then padding
FILLS = {"-1e4": -1e4, "-1e9": -1e9, "finfo.min": None}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = ("none", "batch-train", "batch-eval", "layer")
GRADS = ("q", "k", "v", "mix_weight", "mix_bias", "norm_weight", "norm_bias")


def fill_value(fill: str, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min if FILLS[fill] is None else FILLS[fill]


def padded() -> torch.Tensor:
    """bool [B, N]: True at padded tokens."""
    pad = torch.zeros(B, N, dtype=torch.bool)
    for b, real in enumerate(REAL_TOKENS):
        pad[b, real:] = True
    return pad


def padding_mask(fill: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, N, N] in ``dtype``: 0 between real tokens, ``fill`` where the key or the query is padding
    (cast as a user's mask would be: -1e9 is -inf in float16, which then masks in the -inf sense)."""
    pad = padded()
    out = pad[:, None, :, None] | pad[:, None, None, :]
    return torch.zeros(B, 1, N, N, dtype=torch.float64).masked_fill(out, fill).to(dtype)


def case(dtype: torch.dtype, seed: int = 0, beyond_range: bool = False):
    """Inputs in ``dtype`` (leaves requiring grad) and their float64 values (exactly the rounded ones).

    beyond_range: the padded queries' scores are about -34, so with a fill of float16's finfo.min they
    sum to below -65504: the eager path saturates them at finfo.min (its row then is uniform); the
    fused kernels add in float32, where they are ordinary scores."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(dtype)

    q, k = rnd(B, H, N, D), rnd(B, H, N, D)
    if beyond_range:
        k = k + 3  # every key shares a component along the all-ones direction ...
        q = q.masked_fill(padded()[:, None, :, None], -4.0)  # ... which the padded queries oppose
    tensors = dict(q=q, k=k, v=rnd(B, H, N, D),
                   mix_weight=rnd(H, H, s=0.4) + torch.eye(H, dtype=dtype), mix_bias=rnd(H, s=0.1),
                   norm_weight=rnd(H, s=0.2, shift=1.0), norm_bias=rnd(H, s=0.1))
    stats = dict(running_mean=rnd(H, s=0.05).abs().float() if dtype != torch.float64 else rnd(H, s=0.05).abs(),
                 running_var=None)
    stats["running_var"] = (torch.rand(H, generator=g, dtype=torch.float64) * 0.5 + 0.5).to(stats["running_mean"].dtype)
    return {n: t.requires_grad_(True) for n, t in tensors.items()}, stats


def cotangents(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    every_row = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    real_rows = every_row.masked_fill(padded()[:, None, :, None], 0.0)
    return {"every row": every_row, "real rows": real_rows}


def mode_kwargs(norm: str, tensors, stats):
    kw = dict(norm=norm.split("-")[0], training=norm == "batch-train", out_scale=OUT_SCALE)
    if norm != "none":
        kw.update(norm_weight=tensors["norm_weight"], norm_bias=tensors["norm_bias"])
    if norm.startswith("batch"):
        kw.update({n: s.clone() for n, s in stats.items()})
    return kw


def grad_names(norm: str):
    return [n for n in GRADS if norm != "none" or not n.startswith("norm")]


def run_backend(backend, norm, tensors, stats, mask, cots):
    """(results: out, running stats and every gradient for each cotangent, all as float64)."""
    kw = mode_kwargs(norm, tensors, stats)
    out = reattn.re_attention(tensors["q"], tensors["k"], tensors["v"], tensors["mix_weight"], tensors["mix_bias"],
                              attn_mask=mask, backend=backend, **kw)
    res = {"out": out.detach().double()}
    if norm == "batch-train":
        res.update(running_mean=kw["running_mean"].double(), running_var=kw["running_var"].double())
    names = grad_names(norm)
    for loss, cot in cots.items():
        grads = torch.autograd.grad(out, [tensors[n] for n in names], cot.to(out.dtype), retain_graph=True)
        res.update({f"{loss}: d{n}": g.double() for n, g in zip(names, grads)})
    return res


def run_reference(norm, tensors, stats, mask, cots, acc, perturb=None):
    """The float64 reference on the rounded inputs; the masked scores rounded to ``acc`` (see above).

    perturb: (relative size, absolute size at the masked entries, seed): random-sign perturbations
    of every input and of the fill, to measure each result's sensitivity.
    """
    t64 = {n: t.detach().double() for n, t in tensors.items()}
    s64 = {n: s.double() for n, s in stats.items()}
    mask64 = mask.double()
    if perturb is not None:
        rel, fill_abs, seed = perturb
        g = torch.Generator().manual_seed(seed)

        def noisy(x):
            return x * (1 + rel * (2 * torch.randint(0, 2, x.shape, generator=g, dtype=torch.float64) - 1))

        t64 = {n: noisy(t) for n, t in t64.items()}
        finite_fill = (mask64 != 0) & mask64.isfinite()
        signs = 2 * torch.randint(0, 2, (B, H, N, N), generator=g, dtype=torch.float64) - 1
        mask64 = torch.where(finite_fill, mask64 + fill_abs * signs, mask64)  # per head: the flips differ
    for t in t64.values():
        t.requires_grad_(True)
    norm_name = norm.split("-")[0]
    record = {}
    kw = dict(norm=norm_name, training=norm == "batch-train", out_scale=OUT_SCALE, attn_mask=mask64, record=record,
              score_dtype=acc)
    if norm != "none":
        kw.update(gamma=t64["norm_weight"], beta=t64["norm_bias"])
    if norm == "batch-eval":
        kw.update(running_mean=s64["running_mean"], running_var=s64["running_var"])
    out, _, batch_stats = naive_re_attention(t64["q"], t64["k"], t64["v"], t64["mix_weight"], t64["mix_bias"], **kw)
    res = {"out": out.detach()}
    if norm == "batch-train":
        mean, var, n = batch_stats
        res["running_mean"] = 0.9 * s64["running_mean"] + 0.1 * mean.detach()
        res["running_var"] = 0.9 * s64["running_var"] + 0.1 * (var * n / (n - 1)).detach()
    names = grad_names(norm)
    terms = {}
    for loss, cot in cots.items():
        grads = torch.autograd.grad(out, [t64[n] for n in names] + [record["M"]], cot, retain_graph=True)
        res.update({f"{loss}: d{n}": g for n, g in zip(names, grads)})
        terms[loss] = grads[-1].abs().sum(dim=(0, 2, 3)).max().item()  # sum |dM|: d mix_bias's terms
    return res, terms


def fill_ulp(fill: float, acc: torch.dtype) -> float:
    """The spacing of ``acc``'s numbers at |fill|."""
    return 2.0 ** (math.frexp(abs(fill))[1] - 1) * 2 * unit_roundoff(acc)


def fill_flips_possible(fill: float, acc: torch.dtype, scores_size: float) -> bool:
    """Whether a masked score may round to a neighbouring multiple of the fill's ulp in ``acc``: not when
    half an ulp of the fill exceeds every score (then every masked score rounds to the fill itself)."""
    return math.isfinite(fill) and fill_ulp(fill, acc) / 2 <= 2 * scores_size


def bounds(norm, tensors, stats, mask, cots, acc, ref, terms):
    """Per result: the error a correct implementation computing in ``acc`` may make (see the docstring)."""
    n = reduction_length(B, H, N, N, D)
    rel = LAMBDA * math.sqrt(n) * unit_roundoff(acc)
    fill = mask[mask != 0].double()
    fill = fill[fill.isfinite()]
    fill = fill[0].item() if fill.numel() else 0.0
    q, k = tensors["q"].detach().double(), tensors["k"].detach().double()
    scores_size = (D ** -0.5 * q @ k.transpose(-1, -2)).abs().max().item()
    fill_abs = fill_ulp(fill, acc) if fill and fill_flips_possible(fill, acc, scores_size) else 0.0
    sens = {}
    for seed in (11, 12):
        perturbed, _ = run_reference(norm, tensors, stats, mask, cots, acc, perturb=(rel, fill_abs, seed))
        for key, value in perturbed.items():
            sens[key] = max(sens.get(key, 0.0), (value - ref[key]).abs().max().item())
    out = {}
    for key, value in ref.items():
        magnitude = value.abs().max().item()
        if key.endswith("dmix_bias") and norm == "batch-train":
            magnitude = terms[key.split(":")[0]]
        out[key] = 2 * sens[key] + rounding_bound(acc, n, magnitude)
    return out


def supported(backend: str, dtype: torch.dtype, norm: str) -> "str | None":
    problem = Problem(torch.device("cpu"), heads=H, head_dim=D, norm=norm.split("-")[0],
                      batchnorm_training=norm == "batch-train", masked=True, dtype=dtype, needs_grad=True)
    return unavailable_reason(backend, problem)


CASES = []
for _backend in ("eager", "cpu", "triton", "cuda"):
    for _dname, _dtype in DTYPES.items():
        for _fill in FILLS:
            for _norm in NORMS:
                CASES.append(pytest.param(_backend, _dtype, _fill, _norm, id=f"{_backend}-{_dname}-{_fill}-{_norm}"))


@pytest.mark.parametrize("backend, dtype, fill, norm", CASES)
def test_finite_mask_fills_match_the_definition(backend, dtype, fill, norm):
    check_case(backend, dtype, fill, norm, beyond_range=False)


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("norm", NORMS)
def test_scores_beyond_the_range_next_to_the_fill_saturate(backend, norm):
    """float16 and finfo.min: scores + fill below -65504 saturate (eager) instead of becoming a row of
    -inf (NaN); the fused kernels, adding in float32, keep them ordinary scores (the 2x rule)."""
    check_case(backend, torch.float16, "finfo.min", norm, beyond_range=True)


def check_case(backend, dtype, fill, norm, beyond_range):
    reason = supported(backend, dtype, norm)
    if reason is not None:
        pytest.skip(f"backend={backend!r} does not take this case: {reason}")
    tensors, stats = case(dtype, beyond_range=beyond_range)
    mask = padding_mask(fill_value(fill, dtype), dtype)
    cots = cotangents(dtype) if norm == "batch-train" else {"every row": cotangents(dtype)["every row"]}
    low = dtype in (torch.bfloat16, torch.float16)
    # eager in bfloat16/float16 computes in that dtype (the yardstick of the 2x rule below); every other
    # case in the accumulation dtype of the fused kernels
    acc = dtype if low and backend == "eager" else accumulation_dtype(dtype)
    ref, terms = run_reference(norm, tensors, stats, mask, cots, acc)
    tol = bounds(norm, tensors, stats, mask, cots, acc, ref, terms)
    got = run_backend(backend, norm, tensors, stats, mask, cots)
    eager = run_backend("eager", norm, tensors, stats, mask, cots) if low and backend != "eager" else None
    failures = []
    for key, value in got.items():
        err = (value - ref[key]).abs().max().item()
        bound = tol[key]
        if eager is not None:  # FlashAttention's rule
            bound += twice_eager_bound((eager[key] - ref[key]).abs().max().item(), dtype, 1, 0.0) + \
                unit_roundoff(dtype) * ref[key].abs().max().item()
        if not err <= bound:  # (a NaN error fails too)
            failures.append(f"{key}: error {err:.3g} > bound {bound:.3g} (|ref| max {ref[key].abs().max().item():.3g})")
    assert not failures, "\n".join(failures)
