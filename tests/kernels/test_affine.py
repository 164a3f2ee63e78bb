"""kernels.affine: the one-sweep BatchNorm's finish, O = alpha_h R' + beta_h U in one pass, and its backward sums,
sum dO . R and sum dO . U per head."""
import pytest
import torch

from reattn.kernels.affine import head_affine, head_dot_sums

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("u_shape", ["full", "per-batch-head", "mask [1, 1, Nq]"])
@pytest.mark.parametrize("r_in", ["accumulation dtype", "dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_head_affine_matches_torch(u_shape, r_in, dtype):
    """R' in the accumulation dtype or in dtype (the kept X V, upcast once loaded: exact)."""
    B, H, Nq, D = 2, 3, 7, 33
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, H, Nq, D, generator=g, dtype=acc).to(dtype if r_in == "dtype" else acc).to(acc).to(DEVICE)
    u = {"full": torch.randn(B, H, Nq, D, generator=g, dtype=acc),
         "per-batch-head": torch.randn(B, H, 1, D, generator=g, dtype=acc),
         "mask [1, 1, Nq]": torch.randn(1, 1, Nq, D, generator=g, dtype=acc)}[u_shape].to(DEVICE)
    alpha = torch.randn(H, generator=g, dtype=acc).to(DEVICE)
    beta = torch.randn(H, generator=g, dtype=acc).to(DEVICE)
    out = head_affine(r.to(dtype) if r_in == "dtype" else r, u, alpha, beta, dtype)
    want = (r * alpha[None, :, None, None] + u * beta[None, :, None, None])
    assert out.dtype == dtype and out.shape == (B, H, Nq, D) and out.is_contiguous()
    # one fused multiply-add per element in the accumulation dtype, then one rounding to dtype
    eps = torch.finfo(acc).eps
    bound = 4 * eps * (r.abs() * alpha.abs()[None, :, None, None] + u.abs() * beta.abs()[None, :, None, None])
    bound = bound + (want.abs() * torch.finfo(dtype).eps if dtype != acc else 0)
    assert ((out.to(acc) - want).abs() <= bound).all()


def test_head_affine_checks_its_arguments():
    r = torch.zeros(1, 2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"alpha and beta must be \[2\]"):
        head_affine(r, r, torch.zeros(3, device=DEVICE), torch.zeros(2, device=DEVICE), torch.float32)
    with pytest.raises(ValueError, match="unit stride"):
        head_affine(r, r.transpose(2, 3).contiguous().transpose(2, 3), torch.zeros(2, device=DEVICE),
                    torch.zeros(2, device=DEVICE), torch.float32)
    assert head_affine(r[:0], r[:0], torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE),
                       torch.bfloat16).shape == (0, 2, 3, 4)
    with pytest.raises(TypeError, match="r must be torch.bfloat16 or torch.float32, got torch.float64"):
        head_affine(r.double(), r, torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE), torch.bfloat16)


@pytest.mark.parametrize("u_rows", [1, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_head_dot_sums_match_float64(u_rows, dtype):
    B, H, Nq, D = 3, 2, 6, 35
    gen = torch.Generator().manual_seed(2)
    grad, r = (torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(2))
    u = torch.randn(B, H, u_rows, D, generator=gen, dtype=torch.float64).to(DEVICE)
    got = head_dot_sums(grad, r, u)
    g64 = grad.double()
    want = torch.stack([(g64 * r.double()).sum(dim=(0, 2, 3)), (g64 * u).sum(dim=(0, 2, 3))])
    assert got.dtype == torch.float64 and got.shape == (2, H)
    # products exact in the accumulation dtype up to one rounding each; the sums' rounding over at most
    # B * Nq * D terms (a tile's fp32 sum, then float64 across tiles): n eps of the sum of |terms|
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    n = B * Nq * D
    size = torch.stack([(g64 * r.double()).abs().sum(dim=(0, 2, 3)), (g64 * u).abs().sum(dim=(0, 2, 3))])
    assert ((got - want).abs() <= 2 * n * eps * size).all(), (got, want)


def test_head_dot_sums_checks_its_arguments():
    g = torch.zeros(1, 2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="r must have grad's shape"):
        head_dot_sums(g, g[:, :1], g)
    with pytest.raises(ValueError, match="unit stride"):
        head_dot_sums(g, g.transpose(2, 3).contiguous().transpose(2, 3), g)
    assert not head_dot_sums(g[:0], g[:0], g[:0]).any()
