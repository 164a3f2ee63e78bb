"""kernels.affine.head_affine: the one-sweep BatchNorm's finish, O = alpha_h R + beta_h U, in one pass."""
import pytest
import torch

from reattn.kernels.affine import head_affine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("u_shape", ["full", "per-batch-head", "mask [1, 1, Nq]"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_head_affine_matches_torch(u_shape, dtype):
    B, H, Nq, D = 2, 3, 7, 33
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, H, Nq, D, generator=g, dtype=acc).to(DEVICE)
    u = {"full": torch.randn(B, H, Nq, D, generator=g, dtype=acc),
         "per-batch-head": torch.randn(B, H, 1, D, generator=g, dtype=acc),
         "mask [1, 1, Nq]": torch.randn(1, 1, Nq, D, generator=g, dtype=acc)}[u_shape].to(DEVICE)
    alpha = torch.randn(H, generator=g, dtype=acc).to(DEVICE)
    beta = torch.randn(H, generator=g, dtype=acc).to(DEVICE)
    out = head_affine(r, u, alpha, beta, dtype)
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
