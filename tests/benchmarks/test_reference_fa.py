"""The reference FlashAttention-2 (benchmarks/reference_fa.py) against SDPA, forward and backward.

In Triton's interpreter (no GPU here; bf16 products are wrong there, so fp32 and fp64): the kernels
are the ones the static model compiles for sm_90 at the benchmark shapes; the interpreter runs them
at small tiles on odd shapes. Tolerances: fp64 against fp64 SDPA, a few roundings per entry of the
result's magnitude; fp32 by FlashAttention's rule, at most twice eager fp32 SDPA's error against
float64, plus the same few-roundings floor for entries where eager happens to be exact.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.reference_fa import attention

EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("B, H, Nq, Nk, D", [(1, 2, 33, 33, 35), (2, 1, 1, 1, 16), (1, 3, 20, 20, 64),
                                             (1, 1, 17, 40, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_sdpa_forward_and_backward(B, H, Nq, Nk, D, dtype):
    gen = torch.Generator().manual_seed(B * 1000 + Nq * 10 + D)
    q = torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, Nk, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64)
    exact = _grads(F.scaled_dot_product_attention, q, k, v, g)
    low = [t.to(dtype) for t in (q, k, v, g)]
    ours = _grads(attention, *low)
    eager = _grads(F.scaled_dot_product_attention, *low)
    for name, mine, ref, theirs in zip(("out", "dq", "dk", "dv"), ours, exact, eager):
        assert mine.dtype == dtype and mine.shape == ref.shape
        # A few roundings (the online rescaling, the sums over keys and head dim) on the result's scale.
        floor = 64 * EPS[dtype] * (ref.abs().max().item() + 1.0)
        err = (mine.double() - ref).abs().max().item()
        if dtype == torch.float64:
            assert err <= floor, (name, err, floor)
        else:
            eager_err = (theirs.double() - ref).abs().max().item()
            assert err <= 2 * eager_err + floor, (name, err, eager_err, floor)


def test_refuses_non_unit_head_stride():
    q = torch.randn(1, 1, 4, 8).transpose(2, 3)
    with pytest.raises(ValueError, match="unit stride"):
        attention(q, q, q)
