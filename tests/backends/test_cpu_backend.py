"""What is specific to backend="cpu", the fused C++ CPU kernel (the contract every fused backend keeps,
forward, running statistics and every gradient in every mode, masks, dropout replay, gradcheck, saved
tensors and torch.compile, is tests/backends/test_conformance.py).

Here, float64 against the eager reference: strided inputs, the mask layouts (bool [B, 1, Nq, Nk] and
[Nq, Nk], key padding, additive per head, shared and 2-d), fully masked rows; the 2x rule in float32,
bfloat16 and float16 for every gradient; running statistics in float32; the keep-mask's statistics;
threads, the portable GEMM; its ops (fake implementations, the Gram statistics sweep, the BatchNorm
backward sums, opcheck, given statistics); refusals; NaN propagation.
"""
import os
import subprocess
import sys

import pytest
import torch

import reattn
from reattn._extension import _C
from reattn.backends.cpu import cpu_bn_grad_sums, cpu_forward, cpu_gram_sums, dropout_keep_mask
from tests._tolerance import mix_bias_term_size, reduction_length, rounding_bound, within_twice_eager

pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "re_attention_cpu_forward"),
                                reason="reattn._C without the fused CPU kernel")

MODES = ["none", "batch", "batch-train", "layer"]
GRAD_NAMES = ("q", "k", "v", "mix_weight", "mix_bias", "norm_weight", "norm_bias")


def problem(B, H, Nq, Nk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(dtype)

    tensors = dict(q=rnd(B, H, Nq, D), k=rnd(B, H, Nk, D), v=rnd(B, H, Nk, D),
                   mix_weight=rnd(H, H, s=0.4) + torch.eye(H, dtype=dtype), mix_bias=rnd(H, s=0.1),
                   norm_weight=rnd(H, s=0.2, shift=1.0), norm_bias=rnd(H, s=0.1))
    for t in tensors.values():
        t.requires_grad_(True)
    stats = dict(running_mean=rnd(H, s=0.05).abs(), running_var=rnd(H, s=0.01).abs() + 0.02)
    return tensors, stats


def kwargs_for(mode, tensors, stats):
    norm = "batch" if mode.startswith("batch") else mode
    kw = dict(norm=norm)
    if norm != "none":
        kw.update(norm_weight=tensors["norm_weight"], norm_bias=tensors["norm_bias"])
    if norm == "batch":
        kw.update({n: t.clone() for n, t in stats.items()})
        kw.update(training=mode == "batch-train")
    return kw


def run(backend, mode, tensors, stats, **extra):
    kw = kwargs_for(mode, tensors, stats)
    kw.update(extra)
    out = reattn.re_attention(tensors["q"], tensors["k"], tensors["v"], tensors["mix_weight"], tensors["mix_bias"],
                              backend=backend, **kw)
    return out, kw


def names_for(mode):
    return [n for n in GRAD_NAMES if mode != "none" or not n.startswith("norm")]


def check_against_eager(mode, tensors, stats, rtol=1e-10, atol=1e-11, **extra):
    out, kw_cpu = run("cpu", mode, tensors, stats, **extra)
    ref, kw_ref = run("eager", mode, tensors, stats, **extra)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    if mode == "batch-train":
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(kw_cpu[name], kw_ref[name], rtol=1e-12, atol=1e-13, msg=name)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    names = names_for(mode)
    got = torch.autograd.grad(out, [tensors[n] for n in names], grad)
    expected = torch.autograd.grad(ref, [tensors[n] for n in names], grad)
    for name, a, b in zip(names, got, expected):
        assert torch.isfinite(a).all(), name
        # (training BatchNorm makes d mix_bias exactly 0 in exact arithmetic: both sides are rounding noise)
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=max(atol * 10, 1e-9), msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_strided_inputs_and_default_parameters(mode):
    # q, k, v as views of a [B, N, 3, H, D] projection (the ViT layout): non-contiguous, unit inner stride;
    # plus a transposed (inner stride != 1) k.
    B, N, H, D = 2, 19, 4, 8
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float64).permute(2, 0, 3, 1, 4)
    q, k, v = (t.detach().requires_grad_(True) for t in qkv)
    tensors, stats = problem(B, H, N, N, D)
    tensors.update(q=q, k=k.transpose(-1, -2).contiguous().transpose(-1, -2), v=v)
    check_against_eager(mode, tensors, stats, scale=0.21)


def masks(B, H, Nq, Nk):
    g = torch.Generator().manual_seed(3)
    bool_full = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
    bool_full[0, 0, 1] = False  # a fully masked query row
    key_padding = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    key_padding[-1, ..., Nk // 2:] = False
    additive = torch.randn(B, H, Nq, Nk, generator=g, dtype=torch.float64)
    additive[torch.rand(B, H, Nq, Nk, generator=g) < 0.25] = float("-inf")
    additive[1, 2, 3] = float("-inf")  # fully masked for one head only
    return {"bool": bool_full, "bool-2d": bool_full[0, 0], "key-padding": key_padding,
            "additive": additive, "additive-shared": additive[:, :1, :, :].clone(), "additive-2d": additive[0, 0]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_name", ["bool", "bool-2d", "key-padding", "additive", "additive-shared", "additive-2d"])
def test_masks_match_float64(mode, mask_name):
    B, H, Nq, Nk, D = 2, 3, 7, 9, 5
    tensors, stats = problem(B, H, Nq, Nk, D)
    check_against_eager(mode, tensors, stats, attn_mask=masks(B, H, Nq, Nk)[mask_name], out_scale=1.3)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    tensors, stats = problem(2, 3, 4, 5, 6)
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[:, :, 2] = False
    out, _ = run("cpu", "layer", tensors, stats, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    for name in GRAD_NAMES:
        assert torch.isfinite(tensors[name].grad).all(), name


def test_batchnorm_training_needs_more_than_one_unmasked_value():
    tensors, stats = problem(1, 2, 3, 4, 5)
    mask = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    rm = stats["running_mean"].clone()
    with pytest.raises(ValueError, match="more than one unmasked value per head; unmasked counts per head: \\[1, 1\\]"):
        run("cpu", "batch-train", tensors, dict(stats, running_mean=rm), attn_mask=mask)


def test_dropout_keep_mask_statistics_and_seeding():
    keep = dropout_keep_mask(7, (4, 6, 50, 60), 0.25)
    assert keep.dtype == torch.bool and keep.shape == (4, 6, 50, 60)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(keep, dropout_keep_mask(7, (4, 6, 50, 60), 0.25))
    assert not torch.equal(keep, dropout_keep_mask(8, (4, 6, 50, 60), 0.25))
    assert dropout_keep_mask(7, (1, 1, 3, 5), 0.0).all()
    tensors, stats = problem(2, 3, 5, 6, 4)
    torch.manual_seed(0)
    a, _ = run("cpu", "none", tensors, stats, training=True, dropout_p=0.5)
    torch.manual_seed(0)
    b, _ = run("cpu", "none", tensors, stats, training=True, dropout_p=0.5)
    c, _ = run("cpu", "none", tensors, stats, training=True, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_within_twice_eager_error(dtype, mode):
    tensors64, stats = problem(2, 6, 37, 29, 32)
    low = {n: t.detach().to(dtype).requires_grad_(True) for n, t in tensors64.items()}
    grad = torch.randn(2, 6, 37, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, _ = run("eager", mode, tensors64, stats)
    names = names_for(mode)
    ref_grads = torch.autograd.grad(ref, [tensors64[n] for n in names], grad)
    low_stats = {n: t.to(dtype) for n, t in stats.items()}
    errors = {}
    for backend in ("cpu", "eager"):
        out, _ = run(backend, mode, low, low_stats)
        assert out.dtype == dtype
        grads = torch.autograd.grad(out, [low[n] for n in names], grad.to(dtype))
        errors[backend] = [(out.double() - ref).abs().max().item()] + [
            (g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    n = reduction_length(2, 6, 37, 29, 32)
    magnitudes = [ref.abs().max().item()] + [r.abs().max().item() for r in ref_grads]
    if mode == "batch-train":  # d mix_bias is 0 in exact arithmetic: scale by the size of its terms
        magnitudes[names.index("mix_bias") + 1] = mix_bias_term_size(
            *(tensors64[n] for n in ("q", "k", "v", "mix_weight", "mix_bias")), grad, norm="batch", training=True,
            gamma=tensors64["norm_weight"].detach(), beta=tensors64["norm_bias"].detach())
    for what, kernel_err, eager_err, mag in zip(["out"] + names, errors["cpu"], errors["eager"], magnitudes):
        assert within_twice_eager(kernel_err, eager_err, dtype, n, mag), (what, kernel_err, eager_err)


def test_cpu_and_eager_agree_on_running_statistics_in_float32():
    tensors, stats = problem(4, 6, 50, 50, 16, dtype=torch.float32)
    stats = {n: t.float() for n, t in stats.items()}
    _, kw_cpu = run("cpu", "batch-train", tensors, stats, momentum=0.3)
    _, kw_ref = run("eager", "batch-train", tensors, stats, momentum=0.3)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(kw_cpu[name], kw_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_uses_more_than_one_thread():
    if torch.get_num_threads() < 2:
        pytest.fail(f"this machine gives torch {torch.get_num_threads()} thread(s); the test needs 2")
    tensors, stats = problem(4, 6, 64, 64, 16, dtype=torch.float32)
    out, _ = run("cpu", "layer", tensors, stats)
    assert _C.cpu_last_parallel_chunks() >= 2
    out.sum().backward()
    assert _C.cpu_last_parallel_chunks() >= 2


def test_portable_gemm_fallback_matches_eager():
    # Without torch's BLAS symbols (other platforms) the kernel uses its own GEMM loops.
    script = (
        "import torch, reattn\n"
        "from reattn._extension import _C\n"
        "assert _C.cpu_gemm_backend() == 'portable fallback', _C.cpu_gemm_backend()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 3, 11, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))\n"
        "w = torch.eye(3, dtype=torch.float64) + 0.3\n"
        "outs = [reattn.re_attention(q, k, v, w, norm='layer', backend=b) for b in ('cpu', 'eager')]\n"
        "torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)\n"
        "ga = torch.autograd.grad(outs[0].sum(), (q, k, v)); gb = torch.autograd.grad(outs[1].sum(), (q, k, v))\n"
        "for a, b in zip(ga, gb): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)\n"
        "print('ok')\n")
    env = dict(os.environ, REATTN_CPU_BLAS="0")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_fake_implementation_gives_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 6, 9, 32, dtype=torch.bfloat16)
        k = torch.empty(2, 6, 11, 32, dtype=torch.bfloat16)
        w = torch.empty(6, 6)
        out, softmax_stats, stats, R, U = cpu_forward(q, k, k, w, None, None, None, None, None, 0.1, 1.0, "batch",
                                                      1e-5, 0.0)
    assert out.shape == (2, 6, 9, 32) and out.dtype == torch.bfloat16
    assert softmax_stats.shape == (2, 2, 6, 9) and softmax_stats.dtype == torch.float32
    assert R.shape == U.shape == (2, 6, 9, 32) and R.dtype == torch.float32
    assert stats.shape == (3, 6) and stats.dtype == torch.float64
    with FakeTensorMode():
        q = torch.empty(2, 6, 9, 32, dtype=torch.bfloat16)
        k = torch.empty(2, 6, 11, 32, dtype=torch.bfloat16)
        softmax_stats, s1, gram, count = cpu_gram_sums(q, k, torch.empty(2, 6, 9, 11), None, 0.1, 0.0, 1 / 11)
        w, stats, R = torch.empty(6, 6), torch.empty(3, 6, dtype=torch.float64), torch.empty(2, 6, 9, 32)
        sums = cpu_bn_grad_sums(q, q, k, k, w, None, None, None, None, None, softmax_stats, stats, R, R, 0.1, 1.0,
                                1e-5, 0.0)
    assert softmax_stats.shape == (2, 2, 6, 9) and softmax_stats.dtype == torch.float32
    assert (s1.shape, gram.shape, count.shape) == ((6, 6), (6, 6, 6), (6,))  # a per-head mask: Hm = H
    assert s1.dtype == gram.dtype == count.dtype == sums.dtype == torch.float64 and sums.shape == (2, 6)


@pytest.mark.parametrize("mask_name", [None, "bool", "additive", "additive-shared"])
@pytest.mark.parametrize("dropout", [False, True])
def test_gram_statistics_sweep_matches_float64(mask_name, dropout):
    """cpu_gram_sums' sums (synchronized statistics) against X = P~ - shift built from eager float64 maps."""
    B, H, Nq, Nk, D, p, seed = 2, 3, 7, 9, 5, 0.3, 99
    tensors, _ = problem(B, H, Nq, Nk, D)
    q, k = tensors["q"].detach(), tensors["k"].detach()
    mask = None if mask_name is None else masks(B, H, Nq, Nk)[mask_name]
    shift = 1.0 / Nk
    softmax_stats, s1, gram, count = cpu_gram_sums(q, k, mask, torch.tensor([seed]), 0.4, p if dropout else 0.0, shift)
    scores = 0.4 * q @ k.transpose(-1, -2)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    masked = torch.zeros_like(scores, dtype=torch.bool) if mask is None else (
        (~mask if mask.dtype == torch.bool else mask == float("-inf")).expand_as(scores))
    scores = scores.masked_fill(masked, float("-inf"))
    # The softmax statistics: the row max and the log of sum exp(s - max); a fully masked row has max -inf.
    row_max = scores.amax(dim=-1)
    expected_log_sum = torch.logsumexp(scores - row_max.unsqueeze(-1), dim=-1).masked_fill(masked.all(-1),
                                                                                             float("-inf"))
    finite = scores[scores.isfinite()]
    torch.testing.assert_close(softmax_stats[0], row_max, rtol=0,
                               atol=rounding_bound(torch.float64, D + 1, finite.abs().max().item()))
    torch.testing.assert_close(softmax_stats[1], expected_log_sum, rtol=1e-12, atol=1e-12)
    probs = torch.softmax(scores.masked_fill(masked.all(-1, keepdim=True), 0.0), dim=-1).masked_fill(masked, 0.0)
    if dropout:
        probs = probs * dropout_keep_mask(seed, (B, H, Nq, Nk), p) / (1 - p)
    Hm = masked.shape[1] if mask is not None and mask.dim() == 4 and mask.shape[1] > 1 else 1
    assert s1.shape == (Hm, H) and gram.shape == (Hm, H, H) and count.shape == (Hm,)
    for m in range(Hm):
        keep = ~masked[:, m]                                     # [B, Nq, Nk]: head m's entries
        x = torch.where(keep.unsqueeze(1), probs - shift, 0.0)   # [B, H, Nq, Nk]
        x = x.transpose(0, 1).reshape(H, -1)
        torch.testing.assert_close(s1[m], x.sum(dim=1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gram[m], x @ x.T, rtol=1e-10, atol=1e-12)
        assert count[m].item() == keep.sum().item()


def test_bn_grad_sums_are_the_batchnorm_backward_sums():
    """out_scale <dO, R> = sum of dN * Xhat and out_scale <dO, U> = sum of dN over unmasked entries, per head,
    dN = out_scale dA (float64 eager maps): the rows and meaning of every backend's bn_grad_sums."""
    B, H, Nq, Nk, D = 2, 3, 6, 7, 4
    tensors, _ = problem(B, H, Nq, Nk, D)
    q, k, v = (tensors[n].detach() for n in "qkv")
    w, c = tensors["mix_weight"].detach(), tensors["mix_bias"].detach()
    mask = masks(B, H, Nq, Nk)["bool"]
    _, softmax_stats, stats, R, U = cpu_forward(q, k, v, w, c, None, None, mask, None, 0.4, 0.7, "batch", 1e-5, 0.0)
    dout = torch.randn(B, H, Nq, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sums = cpu_bn_grad_sums(dout, q, k, v, w, c, None, None, mask, None, softmax_stats, stats, R, U, 0.4, 0.7, 1e-5,
                            0.0)
    scores = (0.4 * q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.masked_fill((~mask).all(-1, keepdim=True), 0.0), -1).masked_fill(~mask, 0.0)
    m = torch.einsum("gh,bhij->bgij", w, probs) + c.view(1, H, 1, 1)
    xhat = (m - stats[0].view(1, H, 1, 1)) * torch.rsqrt(stats[1] + 1e-5).view(1, H, 1, 1)
    dN = 0.7 * (dout @ v.transpose(-1, -2)).masked_fill(~mask, 0.0)
    torch.testing.assert_close(sums[0], (dN * xhat).sum(dim=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums[1], dN.sum(dim=(0, 2, 3)), rtol=1e-10, atol=1e-12)


def test_synchronized_statistics_ops_pass_opcheck():
    """Schema, fake implementations and dispatch of the ops the synchronized path adds (torch.library.opcheck)."""
    tensors, _ = problem(2, 3, 5, 6, 4)
    q, k, v = (tensors[n].detach() for n in "qkv")
    w, c = tensors["mix_weight"].detach(), tensors["mix_bias"].detach()
    mask = masks(2, 3, 5, 6)["additive"]
    torch.library.opcheck(cpu_gram_sums, (q, k, mask, torch.tensor([5]), 0.4, 0.2, 1.0 / 6))
    softmax_stats, s1, gram, count = cpu_gram_sums(q, k, None, None, 0.4, 0.0, 1.0 / 6)
    from reattn.distributed import gram_batch_statistics

    stats = torch.stack(gram_batch_statistics(w, c, s1, gram, count, 1.0 / 6))
    forward_args = (q, k, v, w, c, None, None, None, None, 0.4, 1.0, "batch", 1e-5, 0.0, softmax_stats, stats)
    torch.library.opcheck(cpu_forward, forward_args, test_utils=("test_schema", "test_faketensor"))
    _, softmax_stats, stats, R, U = cpu_forward(*forward_args)
    torch.library.opcheck(cpu_bn_grad_sums, (torch.randn_like(q), q, k, v, w, c, None, None, None, None,
                                             softmax_stats, stats, R, U, 0.4, 1.0, 1e-5, 0.0))


def test_given_statistics_reproduce_the_local_forward():
    """cpu_forward with the statistics (and softmax statistics) from the Gram sweep equals the one-call forward."""
    tensors, _ = problem(2, 4, 9, 8, 6)
    q, k, v = (tensors[n].detach() for n in "qkv")
    w, c = tensors["mix_weight"].detach(), tensors["mix_bias"].detach()
    nw, nb = tensors["norm_weight"].detach(), tensors["norm_bias"].detach()
    mask = masks(2, 4, 9, 8)["additive"]
    from reattn.distributed import gram_batch_statistics

    softmax_stats, s1, gram, count = cpu_gram_sums(q, k, mask, None, 0.3, 0.0, 1.0 / 8)
    stats = torch.stack(gram_batch_statistics(w, c, s1, gram, count, 1.0 / 8))
    ref = cpu_forward(q, k, v, w, c, nw, nb, mask, None, 0.3, 0.8, "batch", 1e-5, 0.0)
    got = cpu_forward(q, k, v, w, c, nw, nb, mask, None, 0.3, 0.8, "batch", 1e-5, 0.0, softmax_stats, stats)
    for name, a, b in zip(("out", "softmax_stats", "stats", "R", "U"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="softmax_in and stats_in go together"):
        cpu_forward(q, k, v, w, c, nw, nb, mask, None, 0.3, 0.8, "batch", 1e-5, 0.0, softmax_stats, None)
    with pytest.raises(ValueError, match="with norm='batch' only"):
        cpu_forward(q, k, v, w, c, nw, nb, mask, None, 0.3, 0.8, "layer", 1e-5, 0.0, softmax_stats, stats)


def test_refuses_what_it_cannot_run():
    from reattn.backends import Problem, unavailable_reason

    reason = unavailable_reason("cpu", Problem(torch.device("cpu"), dtype=torch.int32))
    assert reason == "the fused CPU kernel supports float32, float64, bfloat16 and float16, got torch.int32"
    tensors, stats = problem(1, 2, 3, 4, 5)
    mask = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="gradients with respect to attn_mask"):
        run("cpu", "none", tensors, stats, attn_mask=mask)
    with pytest.raises(ValueError, match="only backend='eager'"):
        run("cpu", "none", tensors, stats, return_attention=True)


def test_an_extension_built_before_the_current_interface_is_refused(monkeypatch):
    """reattn.backends.cpu calls an interface an older reattn._C lacks: say "rebuild", never call it."""
    import types

    import reattn._extension
    from reattn.backends import Problem, resolve_backend, unavailable_reason

    stale = types.SimpleNamespace(re_attention_cpu_forward=_C.re_attention_cpu_forward)
    monkeypatch.setattr(reattn._extension, "_C", stale)
    reason = unavailable_reason("cpu", Problem(torch.device("cpu")))
    assert reason is not None and "predates the fused CPU kernel's current interface" in reason and "rebuild it" in reason
    assert resolve_backend("auto", Problem(torch.device("cpu"))) == "eager"


def test_non_finite_inputs_propagate_like_eager():
    tensors, stats = problem(1, 6, 4, 4, 32)
    with torch.no_grad():
        tensors["q"][0, 2, 1, 0] = float("nan")
    for mode in MODES:
        out, _ = run("cpu", mode, tensors, stats)
        ref, _ = run("eager", mode, tensors, stats)
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), mode
        assert torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_nan_score_in_a_long_row_propagates_like_eager(dtype):
    # The row max runs in vector lanes that skip NaN (37 keys: full lanes and a tail); a NaN score
    # must still make its row NaN, including a row whose other keys are all masked (max -inf).
    tensors, stats = problem(1, 3, 5, 37, 8, dtype=dtype)
    with torch.no_grad():
        tensors["k"][0, 1, 20, 3] = float("nan")  # head 1, key 20: NaN in every row of head 1
    mask = torch.ones(1, 1, 5, 37, dtype=torch.bool)
    mask[0, 0, 2] = False
    mask[0, 0, 2, 20] = True  # row 2 sees only the NaN key
    for mode in MODES:
        for attn_mask in (None, mask):
            out, _ = run("cpu", mode, tensors, stats, attn_mask=attn_mask)
            ref, _ = run("eager", mode, tensors, stats, attn_mask=attn_mask)
            assert torch.isnan(out).any(), mode
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), (mode, attn_mask is not None)


def test_the_first_fused_call_does_not_import_torch_dynamo():
    # torch.library.custom_op would wrap each kernel in torch._dynamo.disable, importing torch._dynamo on the
    # first call (1-3 s, ~150 MB); reattn._ops defines the ops without it (the numbers: README, Tests).
    script = (
        "import sys, torch, reattn\n"
        "m = reattn.ReAttention(32, 4, backend='cpu')\n"
        "m(torch.randn(2, 9, 32)).sum().backward()\n"
        "m.eval()(torch.randn(2, 9, 32))\n"
        "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
