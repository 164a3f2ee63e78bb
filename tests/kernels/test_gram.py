"""Gram-matrix BatchNorm statistics against the materialized map in float64.

The statistics sweeps of both fused backends, Triton's ``reattn.kernels.gram.gram_sums`` and
the CUDA programs' ``reattn._C.cuda_gram_sums`` (host emulator without a GPU), turned into the
mean and variance of M by ``reattn.distributed.gram_batch_statistics``.
"""
import math

import pytest
import torch

from reattn.backends import cuda as cuda_backend
from reattn._batchnorm import gram_shift, unmasked_count
from reattn.distributed import gram_batch_statistics
from reattn.kernels.gram import gram_sums
from reattn.kernels.dropout import dropout_keep_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEPS = {"triton": gram_sums, "cuda": cuda_backend._gram_sums}


def batch_statistics(sweep, q, k, w, c, *, scale, attn_mask=None, dropout_p=0.0, seed=None):
    """(mean, var, n, lse) of M through one backend's statistics sweep; lse in natural-log units.

    The sweeps also write the softmax statistics each backend's forward reads
    (``FusedKernels.softmax_stats_shape``): CUDA the row max and natural log-sum ([B, H, Nq, 2]),
    Triton the row max and log-sum in base 2 ([2, B, H, Nq]).
    """
    B, _, Nq, _ = q.shape
    Nk = k.shape[2]
    shift = gram_shift(Nk)
    stats, s1, gram = SWEEPS[sweep](q, k, attn_mask, seed, scale=scale, dropout_p=dropout_p, shift=shift)
    n = unmasked_count(attn_mask, B, Nq, Nk).to(q.device)
    mean, var, _ = gram_batch_statistics(w, c, s1, gram, n, shift)
    lse = (stats[0] + stats[1]) * math.log(2) if sweep == "triton" else stats[..., 0] + stats[..., 1]
    return mean, var, n, lse


def _inputs(B, H, Nq, Nk, D, dtype, q_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64) * q_scale
    k = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)
    w = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.5 + torch.eye(H, dtype=torch.float64)
    c = torch.randn(H, generator=g, dtype=torch.float64) * 0.1
    return [t.to(DEVICE) for t in (q, k, w, c)], [t.to(dtype).to(DEVICE) for t in (q, k)]


def _truth(q, k, w, c, scale, keep_mask=None, dropout_keep=None, p=0.0):
    """Mean and biased variance per head of M over the unmasked entries, from the full map."""
    s = (q @ k.transpose(-1, -2)) * scale
    B, H, Nq, Nk = s.shape
    masked = torch.zeros(B, 1, Nq, Nk, dtype=torch.bool, device=s.device)
    if keep_mask is not None:
        masked = ~keep_mask.expand(B, 1, Nq, Nk)
        s = s.masked_fill(masked, float("-inf")).masked_fill(masked.all(-1, keepdim=True), 0.0)
    probs = s.softmax(-1).masked_fill(masked, 0.0)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1 - p)
    m = torch.einsum("gh,bhij->bgij", w, probs) + c[None, :, None, None]
    values = m.permute(1, 0, 2, 3)[:, ~masked[:, 0]]
    return values.mean(dim=1), values.var(dim=1, unbiased=False), values.shape[1]


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
@pytest.mark.parametrize("case", ["plain", "bool mask", "mask + dropout"])
def test_statistics_match_the_materialized_map(sweep, case):
    B, H, Nq, Nk, D = 2, 5, 9, 21, 8
    (q, k, w, c), _ = _inputs(B, H, Nq, Nk, D, torch.float64)
    keep = None
    if case != "plain":
        keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[1, 0, 2] = False  # a fully masked row: left out entirely
        keep = keep.to(DEVICE)
    p, seed, drop = (0.2, torch.tensor([99], device=DEVICE), None) if case == "mask + dropout" else (0.0, None, None)
    if seed is not None:
        drop = dropout_keep_mask(seed, (B, H, Nq, Nk), p)
    mean, var, n, lse = batch_statistics(sweep, q, k, w, c, scale=0.3, attn_mask=keep, dropout_p=p, seed=seed)
    ref_mean, ref_var, ref_n = _truth(q, k, w, c, 0.3, keep, drop, p)
    assert int(n) == ref_n
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(var, ref_var, rtol=1e-11, atol=1e-15)
    ref_lse = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.3 if keep is None else
                              ((q @ k.transpose(-1, -2)) * 0.3).masked_fill(~keep, float("-inf")), dim=-1)
    ref_lse = torch.where(ref_lse == float("-inf"), float("inf"), ref_lse)  # fully masked rows: +inf by design
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_float32_keeps_the_variance_of_near_uniform_attention(sweep):
    # Small scores make P close to 1/Nk everywhere: the variance of M is ~1e-8 of its mean squared.
    # Summing P~ - 1/Nk (not P~) keeps it; the naive E[M^2] - mean^2 in fp32 would return noise.
    (q, k, w, c), (q32, k32) = _inputs(4, 6, 16, 197, 32, torch.float32, q_scale=1e-3)
    mean, var, _, _ = batch_statistics(sweep, q32, k32, w.float(), c.float(), scale=32 ** -0.5)
    ref_mean, ref_var, _ = _truth(q32.double(), k32.double(), w, c, 32 ** -0.5)
    assert (ref_var / ref_mean.square()).max() < 1e-6
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=2e-3, atol=0)


def test_count_needs_one_mask_for_all_heads():
    assert int(unmasked_count(None, 2, 3, 4)) == 24
    # Made on the device it is used on (a CPU tensor moved to a GPU is a copy followed by a synchronization).
    on_device = unmasked_count(None, 2, 3, 4, torch.device("meta"))
    assert on_device.device.type == "meta" and on_device.dtype == torch.float64 and on_device.shape == ()
    keep = torch.tensor([[True, False, True]])
    assert int(unmasked_count(keep, 2, 1, 3)) == 4
    additive = torch.zeros(2, 1, 1, 3)
    additive[0, 0, 0, 0] = float("-inf")
    assert int(unmasked_count(additive, 2, 1, 3)) == 5
    with pytest.raises(ValueError, match="same for every head"):
        unmasked_count(torch.zeros(1, 3, 1, 3), 1, 1, 3)


def test_head_dim_chunks_give_the_same_sums():
    """The statistics sweep in head-dim chunks (GPUs with less shared memory) sums the same scores."""
    from reattn.kernels.launch import TileConfig

    (q, k, _, _), _ = _inputs(2, 6, 21, 19, 35, torch.float64)
    mask = torch.rand(2, 1, 21, 19, generator=torch.Generator().manual_seed(1)) > 0.3
    whole = gram_sums(q, k, mask.to(DEVICE), scale=0.3, shift=gram_shift(19))
    chunked = gram_sums(q, k, mask.to(DEVICE), scale=0.3, shift=gram_shift(19),
                        config=TileConfig(HP=8, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4,
                                          num_stages=1))
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
