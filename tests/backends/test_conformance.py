"""The contract every fused backend keeps, one suite parametrized over backend="cpu", "triton" and "cuda".

Each against the float64 eager path, forward + backward through autograd and torch.library: the
output, the running statistics and every gradient in every norm mode (none / BatchNorm eval, folded
into the mixing / BatchNorm train / LayerNorm), masks (bool and additive, fully masked rows), dropout
(the eager side replays the backend's own keep-mask from the same seed), Nq != Nk, odd sizes;
gradcheck in float64; no quadratic tensor saved for the backward; torch.compile(fullgraph=True).

Without a GPU the Triton kernels run in Triton's interpreter and the CUDA programs in their host
emulator (tests/conftest.py), so their shapes are small; the C++ CPU kernel also takes the extra
shapes of CPU_SHAPES, which cost milliseconds there and minutes interpreted. What is specific to one
backend stays in its own file: test_cpu_backend.py (strides, mask layouts, threads, the portable GEMM,
its ops), test_fused_backends.py (the Triton and CUDA ops, the synchronized steps, low precision),
test_cuda_backend.py (the CUDA programs).
"""
import pytest
import torch

import reattn
from reattn._extension import _C
from reattn.reference import re_attention_ref
from tests._tolerance import mix_bias_term_size, reduction_length, rounding_bound

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
BACKENDS = [pytest.param(name, marks=mark) for name, mark in NEEDS.items()]


def device_of(backend):
    """The C++ CPU kernel takes CPU tensors; the Triton and CUDA ones the GPU's (or the CPU's without one)."""
    return "cpu" if backend == "cpu" else DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


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
    from reattn.backends._fused import draw_dropout_seed

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


# (B, H, Nq, Nk, D): odd head dims, N = 1, one head, Nq != Nk both ways, 12 heads, D = 64.
SHAPES = [(2, 6, 5, 7, 33), (1, 12, 20, 37, 32), (2, 1, 1, 1, 35), (1, 3, 33, 9, 64)]
# The CPU kernel's vector lanes and row blocks besides: tiny D, Nk = 2, long rows of 37 keys, 70 queries.
CPU_SHAPES = [(2, 3, 5, 5, 4), (2, 3, 33, 17, 35), (1, 6, 40, 37, 16), (3, 1, 1, 2, 3), (2, 12, 70, 9, 8)]
SHAPE_CASES = [pytest.param(name, shape, marks=NEEDS[name], id=f"{name}-{'x'.join(map(str, shape))}")
               for name in NEEDS for shape in SHAPES + (CPU_SHAPES if name == "cpu" else [])]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend, shape", SHAPE_CASES)
def test_forward_running_stats_and_every_gradient_match_float64(backend, norm, shape):
    tensors, stats = problem(*shape, device=device_of(backend))
    out, ref, stats_t, stats_e = run_both(backend, norm, tensors, stats, out_scale=0.7)
    terms = None
    if norm == "batch-train":
        def terms(grad):
            return mix_bias_term_size(*(tensors[n] for n in ("q", "k", "v", "mix_weight", "mix_bias")), grad,
                                      norm="batch", training=True, gamma=tensors["norm_weight"].detach(),
                                      beta=tensors["norm_bias"].detach(), out_scale=0.7)
    assert_same(out, ref, stats_t, stats_e, tensors, norm, mix_bias_terms=terms)


# training=True turns on dropout and batch statistics together, so eval BatchNorm has no dropout
# case here (the module folds frozen statistics into the mixing: the "none" cases cover it). The
# Triton and CUDA kernels refuse per-head masks with batch statistics (test_fused_backends.py's
# test_refusals_say_why); the CPU kernel takes them (each head's statistics over its own entries).
MASK_DROPOUT_CASES = [pytest.param(name, norm, variant, marks=NEEDS[name], id=f"{name}-{norm}-{variant}")
                      for name in NEEDS for norm in NORMS
                      for variant in ("bool mask", "float mask per head", "dropout", "bool mask + dropout")
                      if not (norm == "batch" and "dropout" in variant)
                      and not (norm == "batch-train" and "per head" in variant and name != "cpu")]


@pytest.mark.parametrize("backend, norm, variant", MASK_DROPOUT_CASES)
def test_masks_and_dropout_in_every_norm_mode(backend, norm, variant):
    B, H, Nq, Nk, D = 2, 3, 6, 11, 8
    device = device_of(backend)
    tensors, stats = problem(B, H, Nq, Nk, D, seed=4, device=device)
    extra = dict(out_scale=1.3)
    if "mask" in variant:
        extra["attn_mask"] = masks(B, H, Nq, Nk, device=device)["bool" if "bool" in variant else "float per head"]
    out, ref, stats_t, stats_e = run_both(backend, norm, tensors, stats, dropout_p=0.25 if "dropout" in variant else 0.0,
                                          **extra)
    assert_same(out, ref, stats_t, stats_e, tensors, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("variant", ["plain", "mask + dropout"])
def test_gradcheck_float64(backend, norm, variant):
    # Small: interpreted, every input element costs two forwards, every output element a backward.
    # Fast mode (random projections of the Jacobian) in every case; the full Jacobian for the most
    # coupled mode, training BatchNorm, at the smallest shape.
    full = norm == "batch-train" and variant == "plain"
    B, H, Nq, Nk, D = (2, 2, 2, 3, 2) if full else (2, 2, 3, 4, 3)
    tensors, stats = problem(B, H, Nq, Nk, D, device=device_of(backend))
    names = grad_names(norm)
    extra = dict(out_scale=0.5, scale=0.3)
    if variant != "plain":
        extra.update(attn_mask=masks(B, H, Nq, Nk, device=device_of(backend))["bool"])
        if norm != "batch":  # training=True would turn eval BatchNorm into batch statistics
            extra.update(dropout_p=0.25, training=True)

    def fn(*args):
        torch.manual_seed(0)  # the same dropout seed for every evaluation
        t = dict(tensors, **dict(zip(names, args)))
        return run(backend, norm, t, {n: s.clone() for n, s in stats.items()}, **extra)

    assert torch.autograd.gradcheck(fn, tuple(tensors[n] for n in names), eps=1e-6, atol=1e-6, fast_mode=not full)


@pytest.mark.parametrize("norm", NORMS)
def test_autograd_saves_no_quadratic_tensor(backend, norm):
    # min(Nq, Nk) > D: a saved [B, H, Nq, Nk] map (or one of its transposes) exceeds every linear size.
    B, H, Nq, Nk, D = 2, 6, 12, 14, 8
    device = device_of(backend)
    tensors, stats = problem(B, H, Nq, Nk, D, device=device)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    # training turns eval BatchNorm into batch statistics: eval BatchNorm runs without mask and dropout
    extra = dict(attn_mask=masks(B, H, Nq, Nk, device=device)["bool"], dropout_p=0.1, training=True) \
        if norm != "batch" else {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(backend, norm, tensors, stats, **extra)
    out.sum().backward()
    assert saved, "nothing was saved: the hook did not see the graph"
    mask_elements = B * Nq * Nk if extra else 0  # the user's own mask, saved as given (not expanded)
    assert all(n < B * H * Nq * Nk and (n <= B * H * max(Nq, Nk) * D or n == mask_elements) for n in saved), saved


@pytest.mark.parametrize("layer_dropout, batch_masked", [(0.0, True), (0.2, False)],
                         ids=["layer, batch-train with mask + dropout", "layer with dropout, batch-train plain"])
def test_traces_under_torch_compile_without_graph_breaks(backend, layer_dropout, batch_masked):
    # fullgraph: the dropout seed is drawn as a tensor (no .item()) and training BatchNorm's count
    # check happens inside the op, so neither leaves the graph.
    B, H, N, D = 2, 6, 9, 32
    device = device_of(backend)
    tensors, stats = problem(B, H, N, N, D, device=device)
    batch_extra = dict(attn_mask=masks(B, H, N, N, device=device)["bool"], dropout_p=0.2) if batch_masked else {}

    def f(q, k, v, w, c, nw, nb, rm, rv):
        a = reattn.re_attention(q, k, v, w, c, norm="layer", norm_weight=nw, norm_bias=nb, training=True,
                                dropout_p=layer_dropout, backend=backend)
        b = reattn.re_attention(q, k, v, w, c, norm="batch", norm_weight=nw, norm_bias=nb, running_mean=rm,
                                running_var=rv, training=True, backend=backend, **batch_extra)
        return a * 2 + b

    args = [tensors[n] for n in GRAD_NAMES]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    stats_c = {n: s.clone() for n, s in stats.items()}
    torch.manual_seed(3)
    out = compiled(*args, stats_c["running_mean"], stats_c["running_var"])
    torch.manual_seed(3)
    expected = f(*args, stats["running_mean"], stats["running_var"])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name in stats:
        torch.testing.assert_close(stats_c[name], stats[name], rtol=1e-12, atol=1e-14, msg=name)
    out.sum().backward()
    assert tensors["mix_weight"].grad is not None
