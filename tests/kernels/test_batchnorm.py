"""kernels/batchnorm.py: training BatchNorm's per-head steps in one launch each, against the torch math of
reattn._batchnorm (on the CPU in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET).

Both compute the same formulas in the same dtypes; they differ in the order of the float64 sums over the
programs' moments (a few float64 ulps of the sum of |terms|), so the float64 statistics agree to that, and the
coefficients, rounded once to the accumulation dtype, to one ulp of it.
"""
import pytest
import torch

from reattn._batchnorm import bn_backward_coefficients, moment_statistics
from reattn.kernels.batchnorm import bn_coefficients, bn_moments
from tests._running_stats import H as H_RUNNING
from tests._running_stats import (MOMENTUM, assert_torch_update_agrees, expected_running_stats,
                                  running_stats_problem)

F64_EPS = torch.finfo(torch.float64).eps


def _ulps(dtype):
    return torch.finfo(dtype).eps


def _moments(P, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    moments = torch.randn(P, 2, H, generator=g, dtype=torch.float64).to(dtype)
    moments[:, 1] = moments[:, 1].abs() * 4 + 3  # sums of squares exceed the squared means
    return moments, g


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("count_kind", ["tensor", "number"])
@pytest.mark.parametrize("H, P, with_params", [(6, 37, True), (12, 5, False), (32, 70, True), (1, 1, True)])
def test_bn_moments_matches_the_torch_steps(acc, count_kind, H, P, with_params):
    moments, g = _moments(P, H, acc)
    center = torch.randn(H, generator=g, dtype=torch.float64).to(acc)
    mix_bias = torch.randn(H, generator=g) if with_params else None
    norm_weight = torch.rand(H, generator=g) + 0.5 if with_params else None
    norm_bias = torch.randn(H, generator=g) if with_params else None
    n = 197 * 197 * 3
    count = torch.tensor(float(n), dtype=torch.float64) if count_kind == "tensor" else n
    out_scale, eps = 0.7, 1e-5
    stats, coefficients = bn_moments(moments, count, center, mix_bias, norm_weight, norm_bias, out_scale=out_scale,
                                     eps=eps, dtype=acc)
    assert stats.dtype == torch.float64 and tuple(stats.shape) == (3, H)
    assert coefficients.dtype == acc and tuple(coefficients.shape) == (4, H)
    # torch's steps (reattn._batchnorm and one_sweep_batchnorm's fallback)
    sums = moments.sum(dim=0, dtype=torch.float64)
    mean_x, var = moment_statistics(sums[0], sums[1], torch.tensor(float(n), dtype=torch.float64))
    mean = mean_x + center.to(torch.float64)
    if mix_bias is not None:
        mean = mean + mix_bias.to(torch.float64)
    rstd = torch.rsqrt(var + eps).to(acc)
    a = torch.full_like(rstd, out_scale) if norm_weight is None else out_scale * norm_weight.to(acc)
    alpha = rstd * a
    beta = -mean_x.to(acc) * alpha
    if norm_bias is not None:
        beta = beta + out_scale * norm_bias.to(acc)
    # float64 sums of P terms in another order: P ulps of the sum of |terms|, over n
    abs_sums = moments.abs().sum(dim=0, dtype=torch.float64)
    sum_tol = 2 * P * F64_EPS * abs_sums / n
    torch.testing.assert_close(stats[0], mean, rtol=0, atol=float((sum_tol[0] + 4 * F64_EPS * mean.abs()).max()))
    torch.testing.assert_close(stats[1], var, rtol=0,
                               atol=float((sum_tol[1] + 2 * mean_x.abs() * sum_tol[0] + 4 * F64_EPS * var).max()))
    assert torch.equal(stats[2], torch.full((H,), float(n), dtype=torch.float64))
    ulp = _ulps(acc)
    torch.testing.assert_close(coefficients[0], alpha, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(coefficients[1], beta, rtol=4 * ulp, atol=float(4 * ulp * alpha.abs().max()))
    torch.testing.assert_close(coefficients[2], rstd, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(coefficients[3], (-mean_x * torch.rsqrt(var + eps)).to(acc), rtol=4 * ulp,
                               atol=float(4 * ulp * rstd.abs().max()))


@pytest.mark.parametrize("H", [1, 6, 12, 32])
def test_bn_moments_forms_the_center_from_the_mixing_weights(H):
    """center None with mix_weight and n_keys (what the forward's ``center_keys`` subtracted): the same
    statistics and coefficients as the center sum_h W[g, h] / n_keys given, formed in float64; a strided
    mix_weight in another dtype reads the same; either form or neither is a ValueError."""
    moments, g = _moments(9, H, torch.float32)
    w = torch.randn(H, H, generator=g, dtype=torch.float64)
    n_keys, count = 197, 2 * 197 * 197
    center = w.sum(dim=1) / n_keys
    given = bn_moments(moments, count, center, None, None, None, out_scale=0.7, eps=1e-5, dtype=torch.float32)
    formed = bn_moments(moments, count, None, None, None, None, out_scale=0.7, eps=1e-5, dtype=torch.float32,
                        mix_weight=w.t().contiguous().t().to(torch.float32), n_keys=n_keys)
    # the center's float32 rounding of W (2^-24 of each |W| over n_keys), summed
    tol = float(w.abs().sum(dim=1).max()) / n_keys * 2.0 ** -23 + 4 * F64_EPS * float(given[0][0].abs().max())
    torch.testing.assert_close(formed[0][0], given[0][0], rtol=0, atol=tol)
    assert torch.equal(formed[0][1:], given[0][1:]) and torch.equal(formed[1], given[1])
    for kw in (dict(), dict(mix_weight=w, n_keys=n_keys, center=center), dict(mix_weight=w, n_keys=0)):
        args = dict(center=None)
        args.update(kw)
        center_arg = args.pop("center")
        with pytest.raises(ValueError, match="either center"):
            bn_moments(moments, count, center_arg, None, None, None, out_scale=1.0, eps=1e-5, dtype=torch.float32,
                       **args)
    with pytest.raises(ValueError, match=r"mix_weight must be"):
        bn_moments(moments, count, None, None, None, None, out_scale=1.0, eps=1e-5, dtype=torch.float32,
                   mix_weight=torch.zeros(H, H + 1), n_keys=n_keys)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", ["both", "weight", "none"])
@pytest.mark.parametrize("own_grads", [True, False])
def test_bn_coefficients_match_the_torch_steps(acc, params, own_grads):
    H = 12
    g = torch.Generator().manual_seed(1)
    stats = torch.stack([torch.randn(H, generator=g, dtype=torch.float64),
                         torch.rand(H, generator=g, dtype=torch.float64) * 1e-3 + 1e-6,
                         torch.full((H,), 1e5, dtype=torch.float64)])
    sums = torch.randn(2, H, generator=g, dtype=torch.float64) * 100
    # (bfloat16 parameters would test the interpreter's conversion, which truncates, where a GPU rounds)
    norm_weight = (torch.rand(H, generator=g) + 0.5).half() if params != "none" else None
    norm_bias = torch.randn(H, generator=g) if params == "both" else None
    coefficients, dnw, dnb = bn_coefficients(stats, sums, norm_weight, norm_bias, eps=1e-5, dtype=acc,
                                             own_grads=own_grads)
    expected = bn_backward_coefficients(stats, 1e-5, norm_weight, sums, acc)
    ulp = _ulps(acc)
    torch.testing.assert_close(coefficients, expected, rtol=2 * ulp, atol=0)
    if own_grads and norm_weight is not None:
        assert dnw.dtype == norm_weight.dtype and torch.equal(dnw, sums[0].to(norm_weight.dtype))
    else:
        assert dnw is None
    if own_grads and norm_bias is not None:
        assert dnb.dtype == norm_bias.dtype and torch.equal(dnb, sums[1].to(norm_bias.dtype))
    else:
        assert dnb is None


def test_bad_arguments_are_refused():
    moments, _ = _moments(4, 6, torch.float32)
    center = torch.zeros(6)
    with pytest.raises(ValueError, match=r"moments must be \[P, 2, H\]"):
        bn_moments(moments[:, :1], 10, center, None, None, None, out_scale=1.0, eps=1e-5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"norm_weight must be \[6\]"):
        bn_moments(moments, 10, center, None, torch.ones(5), None, out_scale=1.0, eps=1e-5, dtype=torch.float32)
    with pytest.raises(ValueError, match="integral number"):
        bn_moments(moments, 10.5, center, None, None, None, out_scale=1.0, eps=1e-5, dtype=torch.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        bn_moments(moments, 10, center, None, None, None, out_scale=1.0, eps=1e-5, dtype=torch.bfloat16)
    stats = torch.ones(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sums must be a float \[2, 6\]"):
        bn_coefficients(stats, torch.ones(2, 5), None, None, eps=1e-5, dtype=torch.float32, own_grads=False)
    with pytest.raises(ValueError, match=r"stats must be \[3, H\] float64"):
        bn_coefficients(stats.float(), torch.ones(2, 6, dtype=torch.float64), None, None, eps=1e-5,
                        dtype=torch.float32, own_grads=False)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bn_coefficients_finish_the_kept_terms_sums(acc, with_bias):
    """From head_dot_sums' parts (one-sweep BatchNorm's backward), the launch forms sum dN xhat and sum dN as
    reattn._batchnorm.kept_term_coefficients and the Triton backend's torch steps do."""
    from reattn._batchnorm import kept_term_coefficients
    from reattn.kernels.affine import head_dot_sums
    from reattn.kernels.batchnorm import KeptTermParts

    B, H, Nq, D, n_keys = 2, 6, 19, 16, 23
    g = torch.Generator().manual_seed(2)
    grad, r = (torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64).to(acc) for _ in range(2))
    u = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64).to(acc)
    w = torch.randn(H, H, generator=g) * 0.3 + torch.eye(H)
    c = torch.randn(H, generator=g) * 0.1 if with_bias else None
    stats = torch.stack([torch.randn(H, generator=g, dtype=torch.float64) * 0.1,
                         torch.rand(H, generator=g, dtype=torch.float64) * 1e-3 + 1e-6,
                         torch.full((H,), float(B * Nq * n_keys), dtype=torch.float64)])
    norm_weight, norm_bias = torch.rand(H, generator=g) + 0.5, torch.randn(H, generator=g)
    parts = head_dot_sums(grad, r, u, summed=False)
    coefficients, dnw, dnb = bn_coefficients(stats, KeptTermParts(parts, w, c, 0.7, n_keys), norm_weight, norm_bias,
                                             eps=1e-5, dtype=acc, own_grads=True)
    raw = head_dot_sums(grad, r, u) * 0.7
    rstd, shift = kept_term_coefficients(stats, w, c, 1e-5, n_keys)
    sums = torch.stack([rstd * raw[0] + shift * raw[1], raw[1]])
    expected = bn_backward_coefficients(stats, 1e-5, norm_weight, sums, acc)
    # the parts' float64 sums in another order, and rstd, mean(X) of other float64 roundings: a few float64 ulps of
    # sum dN xhat's terms, each below the sum of |terms| (rstd |raw0| + |shift raw1|); then one ulp of acc
    terms = (rstd * parts[..., 0].abs().sum(dim=(1, 2), dtype=torch.float64)
             + shift.abs() * parts[..., 1].abs().sum(dim=(1, 2), dtype=torch.float64)) * 0.7
    n = stats[2]
    a = rstd * norm_weight.double()
    atol_e = (a * 64 * F64_EPS * terms / n).max()
    ulp = _ulps(acc)
    torch.testing.assert_close(coefficients[:2], expected[:2], rtol=2 * ulp, atol=0)
    torch.testing.assert_close(coefficients[2], expected[2], rtol=2 * ulp, atol=float(atol_e))
    torch.testing.assert_close(coefficients[3], expected[3], rtol=2 * ulp, atol=float(atol_e))
    torch.testing.assert_close(dnw.double(), sums[0].float().double(), rtol=2 * 2.0 ** -24,
                               atol=float(64 * F64_EPS * terms.max()))
    torch.testing.assert_close(dnb, sums[1].float(), rtol=2 * 2.0 ** -24, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_update_running_stats_is_batchnorms_update_rounded_once(dtype):
    """running += momentum (batch - running), the variance unbiased by n / (n - 1), in float64 and rounded once
    (16-bit buffers through float32, as torch converts float64; bfloat16 would test the interpreter's conversion,
    which truncates), in place at any stride; torch's lerp in the buffer's dtype agrees within a few ulps."""
    from reattn.kernels.batchnorm import update_running_stats

    stats, mean0, var0 = running_stats_problem(dtype)
    expected_mean, expected_var = expected_running_stats(
        stats, mean0, var0, lambda x: x.to(dtype) if dtype == torch.float64 else x.float().to(dtype))
    buffer = torch.zeros(2 * H_RUNNING, dtype=dtype)
    running_mean, running_var = mean0.clone(), buffer[::2]
    running_var.copy_(var0)
    update_running_stats(running_mean, running_var, stats, MOMENTUM)
    assert torch.equal(running_mean, expected_mean) and torch.equal(running_var, expected_var)
    assert not buffer[1::2].any()  # the entries between the strided view's are untouched
    assert_torch_update_agrees(stats, mean0, var0, expected_mean, expected_var)
    with pytest.raises(ValueError, match=r"running_var must be \[7\]"):
        update_running_stats(running_mean, torch.ones(5, dtype=dtype), stats, MOMENTUM)
    with pytest.raises(ValueError, match=r"stats must be \[3, H\] float64"):
        update_running_stats(running_mean, running_var, stats.float(), MOMENTUM)
    with pytest.raises(TypeError, match="running_mean must be a floating tensor"):
        update_running_stats(torch.zeros(H_RUNNING, dtype=torch.int32), running_var, stats, MOMENTUM)
