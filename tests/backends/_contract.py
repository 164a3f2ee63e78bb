"""The problems, masks and comparisons of the backend tests (test_conformance.py, test_fused_backends.py):
random float64 inputs, mask kinds, each norm mode's arguments, a backend call beside the float64 eager
one (dropout replayed from the backend's own keep-mask), and the comparison of outputs, running
statistics and every gradient."""
import pytest
import torch

import reattn
from reattn._extension import _C
from reattn.reference import re_attention_ref
from tests._tolerance import reduction_length, rounding_bound

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # torch's CPU-only wheels bring no triton (make install TORCH=cpu)
    HAS_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORMS = ["none", "batch", "batch-train", "layer"]  # batch = eval mode (folded into the mixing)
GRAD_NAMES = ("q", "k", "v", "mix_weight", "mix_bias", "norm_weight", "norm_bias")
NEEDS = {
    "cpu": pytest.mark.skipif(_C is None or not hasattr(_C, "re_attention_cpu_forward"),
                              reason="reattn._C without the fused CPU kernel"),
    # The Triton kernels (and the dropout pattern the CUDA programs share with them) need triton.
    "triton": pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (a CPU-only torch)"),
    "cuda": pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (a CPU-only torch)"),
}


def device_of(backend):
    """The C++ CPU kernel takes CPU tensors; the Triton and CUDA ones the GPU's (or the CPU's without one)."""
    return "cpu" if backend == "cpu" else DEVICE


def problem(B, H, Nq, Nk, D, dtype=torch.float64, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(dtype).to(device)

    tensors = dict(q=rnd(B, H, Nq, D), k=rnd(B, H, Nk, D), v=rnd(B, H, Nk, D),
                   mix_weight=rnd(H, H, s=0.4) + torch.eye(H, dtype=dtype, device=device), mix_bias=rnd(H, s=0.1),
                   norm_weight=rnd(H, s=0.2, shift=1.0), norm_bias=rnd(H, s=0.1))
    for t in tensors.values():
        t.requires_grad_(True)
    stats = dict(running_mean=rnd(H, s=0.05).abs(), running_var=rnd(H, s=0.01).abs() + 0.02)
    return tensors, stats


def masks(B, H, Nq, Nk, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.35
    keep[0, 0, min(1, Nq - 1)] = False  # a query row with every key masked
    additive = torch.randn(H, Nq, Nk, generator=g, dtype=torch.float64)
    additive[torch.rand(H, Nq, Nk, generator=g) > 0.7] = float("-inf")
    return {"bool": keep.to(device), "float per head": additive.to(device)}


def mode_kwargs(norm, tensors, stats):
    """Arguments of one norm mode: "none", "batch" (eval), "batch-train" (batch statistics), "layer"."""
    kw = dict(norm=norm.split("-")[0], training=norm == "batch-train")
    if norm != "none":
        kw.update(norm_weight=tensors["norm_weight"], norm_bias=tensors["norm_bias"])
    if norm.startswith("batch"):
        kw.update(stats)
    return kw


def run(backend, norm, tensors, stats, **extra):
    kw = mode_kwargs(norm, tensors, stats)
    kw.update(extra)
    return reattn.re_attention(tensors["q"], tensors["k"], tensors["v"], tensors["mix_weight"], tensors["mix_bias"],
                               backend=backend, **kw)


def keep_mask(backend, shape, p):
    """The keep-mask (bool [B, H, Nq, Nk]) the backend's next dropout call draws: the same seed from
    torch's generator, the CPU kernel's own pattern, or Triton's Philox (shared by the CUDA programs)."""
    from reattn.backends._ladder import draw_dropout_seed

    seed = draw_dropout_seed(torch.device(device_of(backend)))
    if backend == "cpu":
        from reattn.backends.cpu import dropout_keep_mask as cpu_keep_mask

        return cpu_keep_mask(seed, shape, p)
    from reattn.kernels.dropout import dropout_keep_mask

    return dropout_keep_mask(seed, shape, p)


def run_both(backend, norm, tensors, stats, *, dropout_p=0.0, seed=0, **extra):
    """(fused out, eager out, fused running stats, eager running stats) for one call.

    With dropout the eager side replays the fused pattern: the same generator state gives the same
    seed, and ``keep_mask`` materializes the pattern for ``re_attention_ref``.
    """
    stats_t = {n: t.clone() for n, t in stats.items()}
    stats_e = {n: t.clone() for n, t in stats.items()}
    training = dict(training=True) if dropout_p > 0 else {}
    torch.manual_seed(seed)
    out = run(backend, norm, tensors, stats_t, dropout_p=dropout_p, **training, **extra)
    if dropout_p == 0:
        ref = run("eager", norm, tensors, stats_e, **extra)
    else:
        torch.manual_seed(seed)
        B, H, Nq, _ = tensors["q"].shape
        keep = keep_mask(backend, (B, H, Nq, tensors["k"].shape[2]), dropout_p)
        kw = mode_kwargs(norm, tensors, stats_e)
        kw.update(extra, **training)
        ref = re_attention_ref(tensors["q"], tensors["k"], tensors["v"], tensors["mix_weight"], tensors["mix_bias"],
                               dropout_p=dropout_p, dropout_mask=keep, **kw)
    return out, ref, stats_t, stats_e


def grad_names(norm):
    return [n for n in GRAD_NAMES if norm != "none" or not n.startswith("norm")]


def assert_same(out, ref, stats_t, stats_e, tensors, norm, rtol=1e-9, atol=1e-10, mix_bias_terms=None):
    """mix_bias_terms: grad_out -> the size of the terms of d mix_bias (sum |dM|), where it is exactly 0."""
    torch.testing.assert_close(out, ref, rtol=rtol / 10, atol=atol / 10)
    for name in stats_t:
        torch.testing.assert_close(stats_t[name], stats_e[name], rtol=1e-12, atol=1e-14, msg=name)
    grad = torch.randn_like(out)
    names = grad_names(norm)
    got = torch.autograd.grad(out, [tensors[n] for n in names], grad, retain_graph=True)
    expected = torch.autograd.grad(ref, [tensors[n] for n in names], grad)
    for name, a, b in zip(names, got, expected):
        assert torch.isfinite(a).all(), name
        tol = dict(rtol=rtol, atol=atol)
        if name == "mix_bias" and mix_bias_terms is not None:
            # Training BatchNorm removes any per-head constant: d mix_bias is exactly 0 and both sides
            # are rounding noise, bounded by the size of the terms it sums.
            B, H, Nq, D = tensors["q"].shape
            n = reduction_length(B, H, Nq, tensors["k"].shape[2], D)
            tol["atol"] = max(atol, rounding_bound(torch.float64, n, mix_bias_terms(grad)))
        torch.testing.assert_close(a, b, msg=name, **tol)
