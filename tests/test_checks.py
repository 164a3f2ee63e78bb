"""Bad input to re_attention and ReAttention raises a clear error naming the argument."""
import fractions

import numpy as np
import pytest
import torch

import reattn

B, H, N, D = 2, 4, 5, 8


def good(**overrides):
    args = dict(q=torch.randn(B, H, N, D), k=torch.randn(B, H, N + 1, D), v=torch.randn(B, H, N + 1, D),
                mix_weight=torch.randn(H, H), mix_bias=torch.randn(H))
    args.update(overrides)
    return args


BN = dict(norm="batch", norm_weight=torch.ones(H), norm_bias=torch.zeros(H), running_mean=torch.zeros(H),
          running_var=torch.ones(H))

CASES = [
    # (overrides, exception, pieces of the message)
    (dict(q=[[1.0]]), TypeError, ["q must be a torch.Tensor", "list"]),
    (dict(q=torch.randn(B, N, D)), ValueError, ["q must be 4-D", "[B, H, Nq, D]", "[2, 5, 8]"]),
    (dict(k=torch.randn(B, H, N, D, 1)), ValueError, ["k must be 4-D", "[2, 4, 5, 8, 1]"]),
    (dict(q=torch.randint(0, 3, (B, H, N, D))), TypeError, ["q must be float16, bfloat16, float32 or float64",
                                                            "torch.int64"]),
    (dict(k=torch.randn(B, H, N, D, dtype=torch.float64)), TypeError, ["share a dtype", "torch.float64"]),
    (dict(k=torch.randn(B + 1, H, N, D), v=torch.randn(B + 1, H, N, D)), ValueError,
     ["k [3, 4, 5, 8] must match q [2, 4, 5, 8] in B, H and D"]),
    (dict(k=torch.randn(B, H, N, D + 1), v=torch.randn(B, H, N, D + 1)), ValueError, ["in B, H and D"]),
    (dict(v=torch.randn(B, H, N + 2, D)), ValueError, ["v [2, 4, 7, 8] must have the shape of k [2, 4, 6, 8]"]),
    (dict(k=torch.randn(B, H, 0, D), v=torch.randn(B, H, 0, D)), ValueError, ["at least one key", "Nk = 0"]),
    (dict(mix_weight=torch.randn(H, H + 1)), ValueError, ["mix_weight must be [H, H] = [4, 4]", "[4, 5]"]),
    (dict(mix_weight=torch.randn(H, H, 1, 1)), ValueError, ["mix_weight must be [H, H]", "[4, 4, 1, 1]"]),
    (dict(mix_weight=torch.randn(H, H, dtype=torch.float64)), TypeError,
     ["mix_weight has dtype torch.float64, expected torch.float32"]),
    (dict(mix_bias=torch.randn(H + 1)), ValueError, ["mix_bias must have shape [H] = [4]", "[5]"]),
    (dict(norm="group"), ValueError, ["norm must be one of", "'group'"]),
    (dict(norm="batch"), ValueError, ["training=False normalizes with running statistics"]),
    (dict(norm="batch", running_mean=torch.zeros(H), training=True), ValueError,
     ["both running_mean and running_var"]),
    (dict(BN, running_var=torch.ones(H - 1)), ValueError, ["running_var must have shape [H] = [4]", "[3]"]),
    (dict(BN, norm_weight=torch.ones(2, H)), ValueError, ["norm_weight must have shape [H] = [4]", "[2, 4]"]),
    (dict(norm_weight=torch.ones(H)), ValueError, ["only used with norm='batch' or 'layer'"]),
    (dict(norm="layer", running_mean=torch.zeros(H), running_var=torch.ones(H)), ValueError,
     ["belong to norm='batch'"]),
    (dict(training=1), TypeError, ["training must be a bool", "int"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p must be in [0, 1)", "1.0"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p must be in [0, 1)"]),
    (dict(dropout_p=torch.tensor(0.1)), TypeError, ["dropout_p must be a real number", "Tensor", "pass float(t)"]),
    (dict(momentum=1.5), ValueError, ["momentum must be in [0, 1]"]),
    (dict(eps=0.0), ValueError, ["eps must be > 0"]),
    (dict(momentum=np.float32(-0.5)), ValueError, ["momentum must be in [0, 1]", "-0.5"]),
    (dict(scale="big"), TypeError, ["scale must be a float or None", "str"]),
    (dict(scale=0.5 + 1j), TypeError, ["scale must be a float or None", "complex"]),
    (dict(scale=True), TypeError, ["scale must be a float or None", "bool"]),
    (dict(scale=np.float32("nan")), ValueError, ["scale must be finite", "nan"]),
    (dict(out_scale=np.float16("inf")), ValueError, ["out_scale must be finite", "inf"]),
    (dict(eps=float("inf")), ValueError, ["eps must be > 0 and finite"]),
    (dict(scale=float("inf")), ValueError, ["scale must be finite"]),
    (dict(out_scale=float("nan")), ValueError, ["out_scale must be finite"]),
    (dict(attn_mask=torch.ones(B, H, N, N + 1, dtype=torch.bool)), ValueError,
     ["bool attn_mask (True = attend) must broadcast to [B, 1, Nq, Nk] = [2, 1, 5, 6]", "[2, 4, 5, 6]"]),
    (dict(attn_mask=torch.zeros(B, H, N, N)), ValueError,
     ["float attn_mask (added to the scores) must broadcast to [B, H, Nq, Nk] = [2, 4, 5, 6]", "[2, 4, 5, 5]"]),
    (dict(attn_mask=torch.zeros(1, B, H, N, N + 1)), ValueError, ["must broadcast", "[1, 2, 4, 5, 6]"]),
    (dict(attn_mask=torch.ones(N, N + 1, dtype=torch.int32)), TypeError, ["attn_mask must be bool or floating"]),
    (dict(backend="fast"), ValueError, ["backend must be one of", "'fast'"]),
    (dict(q=torch.randn(B, H, N, D, device="meta")), ValueError, ["q, k, v must be on one device"]),
    (dict(mix_weight=torch.randn(H, H, device="meta")), ValueError, ["mix_weight is on meta but q is on cpu"]),
]


@pytest.mark.parametrize("overrides,error,pieces", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_message(overrides, error, pieces):
    with pytest.raises(error) as info:
        reattn.re_attention(**good(**overrides))
    for piece in pieces:
        assert piece in str(info.value), f"{piece!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("number", [np.float32(0.5), np.float64(0.5), np.float16(0.5), fractions.Fraction(1, 2),
                                    np.int64(1), 1], ids=lambda n: type(n).__name__)
def test_real_numbers_of_any_kind_are_accepted(number):
    args = good()
    kw = dict(norm="batch", norm_weight=torch.ones(H), norm_bias=torch.zeros(H), running_mean=torch.zeros(H),
              running_var=torch.ones(H), training=True)
    expected = reattn.re_attention(**args, scale=float(number), out_scale=float(number), **kw,
                                   momentum=float(number) / 2, eps=float(number) * 1e-5)
    for backend in ("eager", "auto"):
        got = reattn.re_attention(**args, scale=number, out_scale=number, **kw, momentum=number / 2,
                                  eps=number * 1e-5, backend=backend)
        torch.testing.assert_close(got, expected, msg=backend)


def test_batchnorm_training_needs_more_than_one_value_per_head():
    with pytest.raises(ValueError, match="more than one unmasked value per head"):
        reattn.re_attention(**good(q=torch.randn(1, H, 1, D), k=torch.randn(1, H, 1, D), v=torch.randn(1, H, 1, D)),
                            norm="batch", training=True)
    mask = torch.zeros(B, 1, N, N + 1, dtype=torch.bool)
    mask[0, 0, 0, 0] = True  # one unmasked entry per head
    with pytest.raises(ValueError, match="more than one unmasked value per head"):
        reattn.re_attention(**good(), norm="batch", training=True, attn_mask=mask)


def test_explicit_backend_that_cannot_run_says_why_and_never_falls_back():
    for backend in ("triton", "cuda", "cpu"):
        if backend in reattn.available_backends("cpu"):
            continue
        with pytest.raises(ValueError, match=f"backend='{backend}' cannot run on cpu: .+"):
            reattn.re_attention(**good(), backend=backend)


def test_return_attention_needs_the_eager_backend():
    with pytest.raises(ValueError, match="only backend='eager'"):
        reattn.re_attention(**good(), backend="triton", return_attention=True)


def test_auto_picks_eager_when_no_fused_backend_runs():
    assert "eager" in reattn.available_backends("cpu")
    args = good()
    torch.testing.assert_close(reattn.re_attention(**args, backend="auto"), reattn.re_attention(**args, backend="eager"))


@pytest.mark.parametrize("kwargs,pieces", [
    (dict(dim=10, num_heads=4), ["dim=10 must be divisible by num_heads=4"]),
    (dict(dim=8, num_heads=0), ["positive ints"]),
    (dict(dim=8, num_heads=2, expansion_ratio=4), ["expansion_ratio must be 3"]),
    (dict(dim=8, num_heads=2, norm="instance"), ["norm must be one of"]),
    (dict(dim=8, num_heads=2, mix_init="zeros"), ["mix_init must be one of"]),
    (dict(dim=8, num_heads=2, backend="tpu"), ["backend must be one of"]),
    (dict(dim=8, num_heads=2, attn_drop=1.0), ["attn_drop and proj_drop must be in [0, 1)"]),
])
def test_module_constructor_errors(kwargs, pieces):
    with pytest.raises(ValueError) as info:
        reattn.ReAttention(**kwargs)
    for piece in pieces:
        assert piece in str(info.value)


def test_module_forward_input_shape_error():
    module = reattn.ReAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\] with C = dim = 8, got \[2, 3, 9\]"):
        module(torch.randn(2, 3, 9))
