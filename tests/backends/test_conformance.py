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
from tests._tolerance import mix_bias_term_size
from tests.backends._contract import (GRAD_NAMES, NEEDS, NORMS, assert_same, device_of, grad_names, masks, problem,
                                      run, run_both)

BACKENDS = [pytest.param(name, marks=mark) for name, mark in NEEDS.items()]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


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
    # coupled mode, training BatchNorm, at the smallest shape (one batch row: the statistics' coupling
    # across rows is in every fast-mode case, at B = 2; head dim 1, which the Triton wrappers pad to 16,
    # so 30 input elements: each costs two interpreted forwards).
    full = norm == "batch-train" and variant == "plain"
    B, H, Nq, Nk, D = (1, 2, 2, 3, 1) if full else (2, 2, 3, 4, 3)
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

    inputs = tuple(tensors[n] for n in names)
    if full:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
        return
    assert packed_fast_gradcheck(fn, inputs)


def packed_fast_gradcheck(fn, inputs) -> bool:
    """torch.autograd.gradcheck in fast mode of ``fn(*inputs)``, with the inputs packed into one flat vector.

    Fast mode compares v^T J u (random unit u, v) numerically and analytically, at two evaluations per input
    tensor; packed, the numerical side costs two evaluations in all. Each input's part of the vector is scaled
    by sqrt(total size / its size), which gives it the weight in u it has as an input of its own. One
    comparison of the sum replaces one per input, so it takes rtol=0 (an input whose gradient is ~0, as
    mix_bias's under training BatchNorm, must not hide behind the others) and atol=1e-7: the central
    differences' own error, ~eps^2 |f'''| + 1e-16 |f| / eps summed over a few dozen O(1) output elements, is
    ~1e-9. test_packed_fast_gradcheck_finds_an_error_in_one_gradient injects errors that the per-input check
    (atol=1e-6, rtol=1e-3) misses.
    """
    sizes = [t.numel() for t in inputs]
    weights = [(sum(sizes) / n) ** 0.5 for n in sizes]
    base = torch.cat([t.detach().reshape(-1) for t in inputs])

    def packed(flat):
        steps = (flat - base).split(sizes)
        return fn(*(t.detach() + w * step.view_as(t) for t, w, step in zip(inputs, weights, steps)))

    return torch.autograd.gradcheck(packed, (base.clone().requires_grad_(),), eps=1e-6, atol=1e-7, rtol=0.0,
                                    fast_mode=True)


class _OutputGradSum(torch.autograd.Function):
    """Identity that keeps the sum of the gradient reaching it (its backward runs before the inputs')."""
    held = {}

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _OutputGradSum.held["sum"] = grad.sum()
        return grad


class _WrongGradient(torch.autograd.Function):
    """Identity whose backward is off by a relative 1e-4 plus 1e-6 times the output gradient's sum."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 1e-4) + 1e-6 * _OutputGradSum.held["sum"]


@NEEDS["cpu"]
@pytest.mark.parametrize("wrong", ["k", "norm_weight", "mix_bias"])
def test_packed_fast_gradcheck_finds_an_error_in_one_gradient(wrong):
    # The C++ CPU kernel (milliseconds a call) in training BatchNorm at test_gradcheck_float64's fast-mode
    # shape, one input's gradient made wrong: the per-input fast check (atol=1e-6, rtol=1e-3) passes k's and
    # norm_weight's.
    tensors, stats = problem(2, 2, 3, 4, 3, device="cpu")
    names = grad_names("batch-train")

    def fn(*args):
        t = dict(tensors, **dict(zip(names, args)))
        t[wrong] = _WrongGradient.apply(t[wrong])
        out = run("cpu", "batch-train", t, {n: s.clone() for n, s in stats.items()}, out_scale=0.5, scale=0.3)
        return _OutputGradSum.apply(out)

    inputs = tuple(tensors[n] for n in names)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        packed_fast_gradcheck(fn, inputs)


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


@pytest.mark.parametrize("norm", NORMS)
def test_backward_fills_no_zero_gradients_for_the_auxiliary_outputs(backend, norm):
    """The fused op's outputs besides O (softmax statistics, batch statistics, training BatchNorm's R and U) get no
    gradient; autograd must not materialize zeros for them (a [B, H, Nq, D] zero fill per call for R)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, H, Nq, Nk, D = 2, 3, 5, 6, 8
    tensors, stats = problem(B, H, Nq, Nk, D, device=device_of(backend))
    out = run(backend, norm, tensors, stats)
    fills = []

    class Fills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("zeros", "zeros_like", "new_zeros", "fill_", "zero_"):
                fills.append((func.overloadpacket.__name__, tuple(result.shape)))
            return result

    with Fills():
        out.sum().backward()
    assert tensors["q"].grad is not None
    big = [f for f in fills if len(f[1]) >= 3]
    assert not big, big


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
