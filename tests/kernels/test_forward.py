"""Fused Triton forward of Re-attention (reattn.kernels.forward) against float64 truths.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes are small. Outputs are pre-filled with NaN so every element must be written.
Ahead-of-time compiles for sm_80 / sm_90 are in tests/kernels/test_aot.py.
"""
import math
import types

import pytest
import torch

import triton
import triton.language as tl

from benchmarks.eager_model import OpCounter
from reattn.kernels.forward import (_rescale_factor, accumulator_dtype, aligned_operands, mask_arguments,
                                   re_attention_forward, sums_values, vector_aligned)
from reattn.kernels.launch import (VARIANTS, TileConfig, backward_config, forward_config, head_dim_tail, interpreting,
                                  shared_bytes, variant_of)
from reattn.reference import re_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, H, Nq, Nk, D, dtype, *, mix_bias=True, norm_weight=True, norm_bias=True, seed=0):
    """Inputs in `dtype`; parameters already rounded to `dtype` (the eager path casts them too)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    return dict(
        q=rnd(B, H, Nq, D), k=rnd(B, H, Nk, D), v=rnd(B, H, Nk, D),
        mix_weight=rnd(H, H, s=H ** -0.5) + torch.eye(H, dtype=dtype, device=DEVICE),
        mix_bias=rnd(H, s=0.1) if mix_bias else None,
        norm_weight=(1.0 + rnd(H, s=0.2)) if norm_weight else None,
        norm_bias=rnd(H, s=0.2) if norm_bias else None,
    )


def run_kernel(inp, *, norm, out_scale=1.0, scale=None, eps=1e-5, **extra):
    q = inp["q"]
    B, H, Nq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full_like(q, float("nan"))
    stats = torch.full((2, B, H, Nq), float("nan"), dtype=stats_dtype, device=q.device)
    o, st = re_attention_forward(
        q, inp["k"], inp["v"], inp["mix_weight"], inp["mix_bias"], scale=scale, out_scale=out_scale,
        norm=norm, norm_weight=inp["norm_weight"], norm_bias=inp["norm_bias"], eps=eps, out=out,
        softmax_stats=stats, **extra)
    assert o is out and st is stats
    assert not torch.isnan(o).any(), "output elements left unwritten (NaN)"
    assert not torch.isnan(st).any(), "softmax statistics left unwritten (NaN)"
    return o, st


def run_ref(inp, *, norm, out_scale=1.0, scale=None, eps=1e-5, dtype=torch.float64, **extra):
    """The eager reference in ``dtype``; extra: re_attention_ref's other arguments (eval BatchNorm's running
    statistics, as given)."""
    D = inp["q"].shape[-1]
    scale = D ** -0.5 if scale is None else scale
    cast = {k: (None if t is None else t.to(dtype)) for k, t in inp.items()}
    return re_attention_ref(cast["q"], cast["k"], cast["v"], cast["mix_weight"], cast["mix_bias"], scale=scale,
                            norm=norm, norm_weight=cast["norm_weight"], norm_bias=cast["norm_bias"], eps=eps,
                            out_scale=out_scale, **extra)


def lse_truth(inp, scale=None):
    """log2 sum_j exp(S_j) per row in float64: what m2 + l2 of the softmax statistics add up to."""
    q, k = inp["q"].double(), inp["k"].double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.logsumexp(scale * (q @ k.transpose(-2, -1)), dim=-1) / math.log(2)


def stats_lse(stats):
    return stats[0].double() + stats[1].double()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# (B, H, Nq, Nk, D, norm, out_scale, mix_bias, norm_weight, norm_bias)
FP64_CASES = [
    (2, 1, 5, 5, 32, "none", 1.0, False, False, False),
    (2, 1, 5, 5, 32, "layer", 1.0, True, True, True),  # one head: LayerNorm gives bias only
    (2, 6, 33, 33, 33, "layer", 0.7, True, True, True),
    (2, 6, 33, 33, 33, "none", 0.7, True, False, False),
    (2, 12, 1, 1, 35, "none", 1.0, True, False, False),  # N = 1
    (2, 12, 1, 1, 35, "layer", 2.0, False, True, False),
    (2, 6, 5, 33, 35, "layer", 1.0, False, False, False),  # Nq != Nk
    (2, 12, 33, 20, 32, "layer", 0.5, True, True, False),
    (2, 12, 33, 5, 32, "none", 1.3, False, False, False),
    (1, 32, 17, 17, 16, "layer", 1.0, True, True, True),  # H = 32: HP = 32
    (1, 6, 197, 197, 32, "none", 1.0, True, False, False),  # ViT length
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,norm,out_scale,mb,nw,nb", FP64_CASES)
def test_fp64_matches_reference(B, H, Nq, Nk, D, norm, out_scale, mb, nw, nb):
    inp = make_inputs(B, H, Nq, Nk, D, torch.float64, mix_bias=mb, norm_weight=nw, norm_bias=nb)
    out, stats = run_kernel(inp, norm=norm, out_scale=out_scale)
    ref = run_ref(inp, norm=norm, out_scale=out_scale)
    assert out.dtype == torch.float64 and out.shape == (B, H, Nq, D)
    assert stats.dtype == torch.float64 and stats.shape == (2, B, H, Nq)
    # The interpreter computes in float64 throughout; a GPU passes the scalars as fp32.
    tol = 1e-11 if interpreting() else 1e-6
    scale_ref = max(1.0, ref.abs().max().item())
    assert max_err(out, ref) <= tol * scale_ref
    lse = stats_lse(stats)
    assert max_err(lse, lse_truth(inp)) <= tol * max(1.0, lse.abs().max().item())


@pytest.mark.parametrize("B,H,Nq,Nk,D,norm,out_scale", [
    (2, 6, 33, 33, 33, "layer", 0.7),
    (2, 12, 5, 33, 35, "none", 1.0),
    (2, 1, 1, 1, 32, "layer", 1.0),
])
def test_fp32_matches_fp64_reference(B, H, Nq, Nk, D, norm, out_scale):
    inp = make_inputs(B, H, Nq, Nk, D, torch.float32)
    out, stats = run_kernel(inp, norm=norm, out_scale=out_scale)
    ref = run_ref(inp, norm=norm, out_scale=out_scale)
    assert out.dtype == torch.float32 and stats.dtype == torch.float32
    assert max_err(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    lse = stats_lse(stats)
    assert max_err(lse, lse_truth(inp)) <= 1e-5 * max(1.0, lse.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Nq,Nk,D,norm,out_scale", [
    (2, 6, 33, 20, 35, "layer", 0.7),
    (2, 12, 33, 33, 32, "none", 1.0),
    (2, 6, 5, 33, 33, "none", 1.5),
])
def test_low_precision_within_twice_eager_error(dtype, B, H, Nq, Nk, D, norm, out_scale):
    inp = make_inputs(B, H, Nq, Nk, D, dtype)
    out, stats = run_kernel(inp, norm=norm, out_scale=out_scale)
    truth = run_ref(inp, norm=norm, out_scale=out_scale)
    eager = run_ref(inp, norm=norm, out_scale=out_scale, dtype=dtype)
    assert out.dtype == dtype and stats.dtype == torch.float32
    assert max_err(out, truth) <= 2 * max_err(eager, truth) + 1e-6
    lse = stats_lse(stats)
    assert max_err(lse, lse_truth(inp)) <= 1e-5 * max(1.0, lse.abs().max().item())


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_fp16_tensor_core_operands(norm):
    """lowp_dot=True: dot operands in fp16 with fp32 accumulation (the GPU path for fp16/bf16).

    It runs in the interpreter for fp16 (not for bf16, whose interpreted tl.dot is wrong)."""
    inp = make_inputs(2, 6, 33, 20, 35, torch.float16)
    out, _ = run_kernel(inp, norm=norm, out_scale=0.7, lowp_dot=True)
    truth = run_ref(inp, norm=norm, out_scale=0.7)
    eager = run_ref(inp, norm=norm, out_scale=0.7, dtype=torch.float16)
    assert max_err(out, truth) <= 2 * max_err(eager, truth) + 1e-6


def test_bias_slot_needs_a_padding_slot_a_bias_and_no_dropout():
    """The one rule the forward and the backward share for carrying a per-slot bias in a padding slot."""
    cfg = TileConfig(HP=8, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1)
    assert cfg.bias_slot(6, False, True)
    assert not cfg.bias_slot(8, False, True)       # every slot holds a head
    assert not cfg.bias_slot(6, True, True)        # dropout: the slot's P is not 1 where kept
    assert not cfg.bias_slot(6, False, False)      # nothing to carry
    two_groups = TileConfig(HP=8, G=2, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4,
                            num_stages=1)
    assert two_groups.bias_slot(3, False, True) and not two_groups.bias_slot(4, False, True)


@pytest.mark.parametrize("cfg", [
    TileConfig(HP=16, G=1, BLOCK_M=32, BLOCK_N=16, BLOCK_D=64, STATS_BLOCK_N=32, num_warps=8, num_stages=2),
    TileConfig(HP=32, G=2, BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, STATS_BLOCK_N=16, num_warps=4, num_stages=1),
], ids=["gpu-like", "two-groups"])
def test_block_sizes_do_not_change_the_result(cfg):
    """Tiles, rows per program and row groups per program (G) change nothing but the schedule."""
    inp = make_inputs(2, 12, 33, 20, 35, torch.float64)
    out, stats = run_kernel(inp, norm="layer", out_scale=0.7, config=cfg)
    tol = 1e-11 if interpreting() else 1e-6
    assert max_err(out, run_ref(inp, norm="layer", out_scale=0.7)) <= tol * 10
    assert max_err(stats_lse(stats), lse_truth(inp)) <= tol * 10


@pytest.mark.parametrize("D,block_d", [(35, 16), (64, 32)])
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_head_dim_chunks_match_the_whole_head_dim(D, block_d, norm):
    """The launch rule splits the head dim where a program's tiles would not fit: chunk programs
    write their own columns of O and recompute the scores over every chunk; the statistics and the
    moments are stored once. Same result as one program over the whole head dim, with masks and dropout."""
    inp = make_inputs(2, 6, 21, 19, D, torch.float64)
    mask = _masks(2, 6, 21, 19)["bool [B,1,Nq,Nk]"]
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    chunked = TileConfig(HP=8, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, STATS_BLOCK_N=16, num_warps=4,
                         num_stages=1)
    extra = dict(attn_mask=mask, dropout_p=0.25, seed=seed)
    whole, whole_stats = run_kernel(inp, norm=norm, **extra)
    out, stats = run_kernel(inp, norm=norm, config=chunked, **extra)
    tol = 1e-12 if interpreting() else 1e-6
    assert max_err(out, whole) <= tol
    assert torch.allclose(stats, whole_stats, rtol=0, atol=tol)  # +inf for the fully masked row, in both
    if norm == "none":  # one-sweep BatchNorm's per-program moments, from the first chunk only
        args = (inp["q"], inp["k"], inp["v"], inp["mix_weight"], inp["mix_bias"])
        _, _, moments = re_attention_forward(*args, scale=D ** -0.5, with_moments=True, **extra)
        _, _, moments_chunked = re_attention_forward(*args, scale=D ** -0.5, with_moments=True, config=chunked, **extra)
        assert max_err(moments_chunked.sum(0), moments.sum(0)) <= tol * 100


def test_strided_inputs_and_outputs_and_no_stray_writes():
    """q, k, v as views of one [B, N, 3, H, D] projection; out and lse as views inside larger
    sentinel-filled buffers: results match and nothing outside the views is touched."""
    B, H, N, D = 2, 6, 20, 33
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, N, D], non-contiguous
    inp = make_inputs(B, H, N, N, D, torch.float64)
    inp.update(q=q, k=k, v=v)
    big_out = torch.full((B, N + 3, H, D + 2), 123.0, dtype=torch.float64, device=DEVICE)
    out = big_out[:, :N, :, :D].transpose(1, 2)
    big_stats = torch.full((B, H, N + 5, 3), 321.0, dtype=torch.float64, device=DEVICE)
    stats = big_stats[:, :, 2:N + 2, :2].permute(3, 0, 1, 2)  # [2, B, H, N], no unit stride anywhere
    out.fill_(float("nan"))
    stats.fill_(float("nan"))
    o, st = re_attention_forward(q, k, v, inp["mix_weight"], inp["mix_bias"], scale=D ** -0.5, out_scale=0.7,
                                 norm="layer", norm_weight=inp["norm_weight"], norm_bias=inp["norm_bias"],
                                 eps=1e-5, out=out, softmax_stats=stats)
    tol = 1e-11 if interpreting() else 1e-6
    assert max_err(o, run_ref(inp, norm="layer", out_scale=0.7)) <= tol * 10
    assert max_err(stats_lse(st), lse_truth(inp)) <= tol * 10
    outside = torch.ones_like(big_out, dtype=torch.bool)
    outside[:, :N, :, :D] = False
    assert (big_out[outside] == 123.0).all()
    kept = torch.ones_like(big_stats, dtype=torch.bool)
    kept[:, :, 2:N + 2, :2] = False
    assert (big_stats[kept] == 321.0).all()


def test_operands_that_would_not_vectorize_are_padded_copies():
    """Triton vectorizes only what the launch's arguments prove aligned (strides and D multiples of
    16, addresses of 16 bytes): anything else is copied to a contiguous buffer with D rounded up to
    16 and zeros past D; aligned operands are passed through untouched (no copy)."""
    base = torch.randn(2, 3, 5, 80, dtype=torch.float16, device=DEVICE)
    sliced = base[..., :64]                      # row stride 80: aligned
    assert vector_aligned(sliced)
    (same,), dp = aligned_operands(sliced)
    assert same is sliced and dp == 64
    shifted = base.flatten()[8:8 + 2 * 3 * 5 * 64].view(2, 3, 5, 64)   # address 16 bytes past an aligned one
    assert vector_aligned(shifted) is (shifted.data_ptr() % 16 == 0)
    odd = base.flatten()[1:1 + 2 * 3 * 5 * 64].view(2, 3, 5, 64)     # 2 bytes off
    assert not vector_aligned(odd)
    (copy, kept), dp = aligned_operands(odd, sliced)
    assert dp == 64 and copy.is_contiguous() and torch.equal(copy, odd) and kept is sliced
    narrow = base[..., :33]
    with OpCounter() as counted:
        (a, b), dp = aligned_operands(narrow, sliced[..., :33])
    assert dp == 48 and a.shape == (2, 3, 5, 48) and torch.equal(a[..., :33], narrow)
    assert (a[..., 33:] == 0).all() and (b[..., 33:] == 0).all() and vector_aligned(a)
    # Each padded buffer is written once (a concatenation with one broadcast zero element), not
    # zero-filled and then copied into.
    assert [op.name for op in counted.ops] == ["new_zeros", "cat", "cat"]
    assert counted.ops[0].bytes_written == base.element_size()


def test_operands_beyond_32_bit_offsets_are_copied_or_refused():
    """Offsets within a batch element are 32-bit in the kernels: a view spanning more is copied
    compact; a mask or a compact operand that still spans more is a ValueError (sizes on meta)."""
    q = torch.empty(2, 6, 197, 64, device="meta", dtype=torch.bfloat16)
    wide = torch.empty(1, device="meta", dtype=torch.bfloat16).as_strided((2, 6, 197, 64), (2 ** 32, 2 ** 29, 64, 1))
    assert not vector_aligned(wide)
    (copy,), dp = aligned_operands(wide)
    assert dp == 64 and copy.is_contiguous()
    mask = torch.empty(1, device="meta", dtype=torch.bool).as_strided((2, 6, 197, 197), (2 ** 32, 2 ** 29, 197, 1))
    with pytest.raises(ValueError, match="attn_mask .* spans .* per batch element"):
        mask_arguments(mask, q, 197)
    huge = torch.empty(1, 32, 2 ** 20, 128, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="more than 2147483647 elements per batch element"):
        aligned_operands(huge)


def test_batchnorm_eval_folded_into_mixing_is_norm_none():
    """The caller's contract: eval BatchNorm2d folds into W' = diag(alpha) W, c' = alpha c + delta."""
    B, H, Nq, Nk, D = 2, 6, 17, 20, 32
    inp = make_inputs(B, H, Nq, Nk, D, torch.float64)
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(H, generator=g, dtype=torch.float64).to(DEVICE) * 0.1
    var = torch.rand(H, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    gamma, beta, tau, eps = inp["norm_weight"], inp["norm_bias"], 0.8, 1e-5
    cast = {k: t.double() for k, t in inp.items() if t is not None}
    ref = re_attention_ref(cast["q"], cast["k"], cast["v"], cast["mix_weight"], cast["mix_bias"], scale=D ** -0.5,
                           norm="batch", norm_weight=gamma, norm_bias=beta, running_mean=mean, running_var=var,
                           training=False, eps=eps, out_scale=tau)
    inv = gamma / torch.sqrt(var + eps)
    folded = dict(inp, mix_weight=inv[:, None] * inp["mix_weight"],
                  mix_bias=inv * inp["mix_bias"] + beta - inv * mean, norm_weight=None, norm_bias=None)
    out, _ = run_kernel(folded, norm="none", out_scale=tau)
    tol = 1e-11 if interpreting() else 1e-6
    assert max_err(out, ref) <= tol * 10


@pytest.mark.parametrize("H,mix_bias,affine", [(6, True, True), (3, False, True), (12, True, False), (1, True, True)],
                         ids=["6 heads", "3 heads: the bias in a padding slot", "12 heads, no affine", "1 head"])
def test_eval_batchnorm_folded_by_the_kernel_from_the_running_statistics(H, mix_bias, affine):
    """running_mean, running_var (any float dtype and stride): the programs form 1/sqrt(var + eps) and fold
    the norm themselves (the inference op, no torch op around the launch). Against float64 eval BatchNorm."""
    B, Nq, Nk, D = 2, 17, 20, 35
    inp = make_inputs(B, H, Nq, Nk, D, torch.float64, mix_bias=mix_bias, norm_weight=affine, norm_bias=affine)
    g = torch.Generator().manual_seed(4)
    mean = (torch.randn(H, generator=g, dtype=torch.float64) * 0.1).to(DEVICE)
    var = (torch.rand(2 * H, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)[::2]  # strided
    tau, eps = 0.8, 1e-3
    bn = dict(norm="batch", out_scale=tau, eps=eps, training=False)
    ref = run_ref(inp, running_mean=mean.float().double(), running_var=var, **bn)
    out, stats = run_kernel(inp, norm="batch", out_scale=tau, eps=eps, running_mean=mean.float(), running_var=var)
    # float64 throughout in the interpreter; a GPU passes the scalars (eps, tau, the scale) as fp32
    tol = 1e-11 if interpreting() else 1e-6
    assert max_err(out, ref) <= tol * max(1.0, ref.abs().max().item())
    assert max_err(stats_lse(stats), lse_truth(inp)) <= tol * 10
    # bf16 inputs (the GPU path: the statistics' own launch first): within twice eager bf16's error
    low = {n: (None if t is None else t.to(torch.bfloat16)) for n, t in inp.items()}
    out16, _ = run_kernel(low, norm="batch", out_scale=tau, eps=eps, running_mean=mean.bfloat16(), running_var=var)
    eager = run_ref(low, running_mean=mean.bfloat16(), running_var=var.bfloat16(), dtype=torch.bfloat16, **bn)
    truth = run_ref(low, running_mean=mean.bfloat16().double(), running_var=var, **bn)
    assert max_err(out16, truth) <= 2 * max_err(eager, truth) + 1e-6


def test_eval_batchnorm_statistics_are_checked():
    inp = make_inputs(1, 6, 5, 5, 32, torch.float32)
    args = (inp["q"], inp["k"], inp["v"], inp["mix_weight"])
    mean, var = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="running_mean and running_var go together"):
        re_attention_forward(*args, scale=0.2, norm="batch", running_mean=mean)
    with pytest.raises(ValueError, match="running_mean and running_var go together, with norm='batch'"):
        re_attention_forward(*args, scale=0.2, norm="none", running_mean=mean, running_var=var)
    with pytest.raises(ValueError, match="without batch_stats"):
        re_attention_forward(*args, scale=0.2, norm="batch", running_mean=mean, running_var=var,
                             batch_stats=torch.zeros(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match=r"running_var must have shape \(6,\), got \(4,\)"):
        re_attention_forward(*args, scale=0.2, norm="batch", running_mean=mean, running_var=var[:4])
    with pytest.raises(ValueError, match="running_mean must be floating point"):
        re_attention_forward(*args, scale=0.2, norm="batch", running_mean=mean.long(), running_var=var)


def test_empty_batch_or_queries_launch_nothing():
    for B, Nq in ((0, 5), (2, 0)):
        inp = make_inputs(B, 6, Nq, 5, 32, torch.float32)
        o, st = re_attention_forward(inp["q"], inp["k"], inp["v"], inp["mix_weight"], None, scale=0.2)
        assert o.shape == (B, 6, Nq, 32) and st.shape == (2, B, 6, Nq)


def test_launcher_rejects_bad_arguments():
    inp = make_inputs(1, 6, 5, 5, 32, torch.float32)
    q, k, v, w = inp["q"], inp["k"], inp["v"], inp["mix_weight"]
    with pytest.raises(ValueError, match="norm"):
        re_attention_forward(q, k, v, w, scale=0.2, norm="batch")
    with pytest.raises(ValueError, match="shapes"):
        re_attention_forward(q, k[:, :, :, :16], v, w, scale=0.2)
    with pytest.raises(ValueError, match="dtype"):
        re_attention_forward(q, k.double(), v, w, scale=0.2)
    with pytest.raises(ValueError, match="mix_weight"):
        re_attention_forward(q, k, v, w[:5, :5], scale=0.2)
    with pytest.raises(ValueError, match="norm_bias"):
        re_attention_forward(q, k, v, w, scale=0.2, norm="layer", norm_bias=torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        re_attention_forward(q, k, v, w, scale=0.2, out=torch.empty(1, 6, 5, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="key"):
        re_attention_forward(q, k[:, :, :0], v[:, :, :0], w, scale=0.2)
    big = torch.zeros(1, 33, 5, 32, device=DEVICE)
    with pytest.raises(ValueError, match="heads"):
        re_attention_forward(big, big, big, torch.zeros(33, 33, device=DEVICE), scale=0.2)


def test_launch_rule():
    # Interpreter: the smallest tiles; HP, G and BLOCK_D follow the shape.
    cfg = forward_config(33, 33, 33, 6, interpret=True)
    assert (cfg.HP, cfg.G, cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_D, cfg.num_warps) == (8, 1, 16, 16, 64, 4)
    # Slots: HP = max(8, next_pow2(H)), G = HP // H row groups per program.
    assert [(forward_config(64, 64, 32, h, interpret=False).HP, forward_config(64, 64, 32, h, interpret=False).G)
            for h in (1, 3, 6, 8, 12, 16, 17, 32)] == [(8, 8), (8, 2), (8, 1), (8, 1), (16, 1), (16, 1), (32, 1),
                                                       (32, 1)]
    # The variants at DeiT-S: 32 x 32 tiles without a norm, mask or dropout; 16 x 16 with a mask or dropout.
    plain = forward_config(197, 197, 64, 6, interpret=False, variant="plain")
    heavy = forward_config(197, 197, 64, 6, interpret=False, variant="heavy")
    assert (plain.BLOCK_M, plain.BLOCK_N, plain.BLOCK_D) == (32, 32, 64)
    assert (heavy.BLOCK_M, heavy.BLOCK_N, heavy.BLOCK_D) == (16, 16, 64)
    assert forward_config(197, 197, 64, 6, interpret=False) == heavy  # the default is safe for every call
    assert variant_of("none", False, False) == variant_of("batch", False, False) == "plain"
    assert variant_of("layer", False, False) == "layer" and variant_of("none", True, False) == "heavy"
    for h in (1, 6, 12, 16, 32):
        for d in (16, 48, 64, 128):
            for variant in VARIANTS:
                for limit in (None, 101376, 166912, 232448):  # sm_86, sm_80, sm_90
                    rules = dict(interpret=False, variant=variant, shared_limit=limit)
                    fwd = forward_config(197, 197, d, h, **rules)
                    dq = backward_config(197, 197, d, h, kernel="dq", **rules)
                    dkdv = backward_config(197, 197, d, h, kernel="dkdv", **rules)
                    for kernel, cfg, accumulators, rows in (("forward", fwd, 1, fwd.BLOCK_M), ("dq", dq, 2, dq.BLOCK_M),
                                                            ("dkdv", dkdv, 2, dkdv.BLOCK_N)):
                        cfg.check_heads(h, "test")
                        # the accumulators' registers (module doc), the GPU's shared memory
                        assert accumulators * cfg.HP * rows * cfg.BLOCK_D <= 64 * 32 * cfg.num_warps
                        assert limit is None or shared_bytes(kernel, cfg, 2, variant == "heavy") <= limit
    with pytest.raises(ValueError):
        forward_config(8, 8, 32, 33, interpret=False)
    with pytest.raises(ValueError):
        forward_config(8, 8, 129, 4, interpret=False)
    with pytest.raises(ValueError, match="forward kernel needs .* B of shared memory at its smallest tiles .* "
                                         "this GPU allows 16384"):
        forward_config(197, 197, 64, 32, interpret=False, shared_limit=16384)
    with pytest.raises(ValueError, match="variant"):
        forward_config(197, 197, 64, 6, interpret=False, variant="fast")


# ---- masks and dropout ----

def _masks(B, H, Nq, Nk, seed=3):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.4
    keep[0, 0, 1] = False  # a query row with every key masked
    additive = torch.randn(B, H, Nq, Nk, generator=g, dtype=torch.float64)
    additive[torch.rand(B, H, Nq, Nk, generator=g) > 0.6] = float("-inf")
    additive[-1, 0, 0] = float("-inf")
    return {"bool [B,1,Nq,Nk]": keep.to(DEVICE), "bool [Nq,Nk]": keep[0, 0].to(DEVICE),
            "float [B,H,Nq,Nk]": additive.to(DEVICE), "float [H,1,Nk]": additive[0, :, :1].to(DEVICE)}


@pytest.mark.parametrize("mask_name", list(_masks(2, 3, 5, 7)))
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_masks_match_reference_and_fully_masked_rows_give_zeros(mask_name, norm):
    B, H, Nq, Nk, D = 2, 3, 5, 7, 6
    inp = make_inputs(B, H, Nq, Nk, D, torch.float64)
    mask = _masks(B, H, Nq, Nk)[mask_name]
    o, stats = run_kernel(inp, norm=norm, out_scale=0.7, attn_mask=mask)
    ref = re_attention_ref(inp["q"], inp["k"], inp["v"], inp["mix_weight"], inp["mix_bias"], scale=D ** -0.5,
                           norm=norm, norm_weight=inp["norm_weight"], norm_bias=inp["norm_bias"], out_scale=0.7,
                           attn_mask=mask)
    torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-13)
    if mask_name == "bool [B,1,Nq,Nk]":
        assert torch.isinf(stats[0, 0, :, 1]).all() and (stats[0, 0, :, 1] > 0).all()  # m2 = +inf, P = 0
        assert (stats[1, 0, :, 1] == 0).all()
        assert (o[0, :, 1] == 0).all()


def test_dropout_pattern_is_replayable_and_matches_the_reference():
    from reattn.kernels.dropout import dropout_keep_mask

    B, H, Nq, Nk, D = 2, 3, 17, 19, 8
    inp = make_inputs(B, H, Nq, Nk, D, torch.float64)
    seed = torch.tensor([123456789], dtype=torch.int64, device=DEVICE)
    o1, _ = run_kernel(inp, norm="layer", dropout_p=0.25, seed=seed)
    o2, _ = run_kernel(inp, norm="layer", dropout_p=0.25, seed=seed)
    assert torch.equal(o1, o2)
    keep = dropout_keep_mask(seed, (B, H, Nq, Nk), 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.05
    assert not torch.equal(keep, dropout_keep_mask(seed + 1, (B, H, Nq, Nk), 0.25))
    assert not torch.equal(keep[:, 0], keep[:, 1]), "heads must get independent patterns"
    ref = re_attention_ref(inp["q"], inp["k"], inp["v"], inp["mix_weight"], inp["mix_bias"], scale=D ** -0.5,
                           norm="layer", norm_weight=inp["norm_weight"], norm_bias=inp["norm_bias"], training=True,
                           dropout_p=0.25, dropout_mask=keep)
    torch.testing.assert_close(o1, ref, rtol=1e-12, atol=1e-13)


def test_dropout_needs_a_seed_and_a_valid_probability():
    inp = make_inputs(1, 2, 3, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="dropout needs seed"):
        run_kernel(inp, norm="none", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        run_kernel(inp, norm="none", dropout_p=1.0, seed=torch.zeros(1, dtype=torch.int64, device=DEVICE))


def test_a_kernel_over_the_gpus_shared_memory_is_a_value_error_naming_it():
    """Triton refuses a compiled kernel over the GPU's shared memory before launching it; should the
    launch rule's table fall short of a Triton version's needs, the error names kernel and tiles."""
    from triton.runtime.errors import OutOfResources

    from reattn.kernels.launch import run_on_device

    class TooBig:
        fn = types.SimpleNamespace(__name__="_re_attention_fwd_kernel")

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(280576, 232448, "shared memory")
            return launch

    with pytest.raises(ValueError, match=r"_re_attention_fwd_kernel at \{'HP': 32, 'BLOCK_D': 128\} does not fit "
                                         r"cpu: out of resource: shared memory, Required: 280576"):
        run_on_device(TooBig(), (1,), torch.device("cpu"), HP=32, BLOCK_D=128)


# ---- the softmax statistics in a launch of their own ----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,Nq,Nk,D,norm", [
    (2, 6, 33, 33, 35, "none"),
    (2, 1, 1, 1, 16, "layer"),    # N = 1, one head
    (1, 12, 5, 40, 64, "layer"),  # Nq != Nk, keys past a multiple of 16
    (1, 32, 17, 17, 128, "none"),
    (1, 6, 197, 197, 32, "none"),  # ViT length
])
def test_separate_statistics_match_the_fused_sweep(dtype, B, H, Nq, Nk, D, norm):
    """``separate_stats=True``: ``_softmax_stats_kernel`` writes (m2, l2) per head and the forward reads them.

    Statistics and output agree with the one-launch forward and with float64 truths; the tolerances are
    the dtype's unit roundoff times the sums' lengths (D products, Nk exponentials) and magnitudes."""
    inp = make_inputs(B, H, Nq, Nk, D, dtype)
    out, stats = run_kernel(inp, norm=norm, out_scale=0.7, separate_stats=True)  # NaN-poisoned: all written
    fused, fused_stats = run_kernel(inp, norm=norm, out_scale=0.7, separate_stats=False)
    # unit roundoff of the arithmetic: the dtype's (a GPU passes the scalar arguments as fp32)
    eps = torch.finfo(dtype if interpreting() else torch.float32).eps
    lse = stats_lse(stats)
    truth = lse_truth(inp)
    assert max_err(lse, truth) <= 4 * eps * (D + Nk) * max(1.0, truth.abs().max().item())
    assert max_err(lse, stats_lse(fused_stats)) <= 4 * eps * (D + Nk) * max(1.0, truth.abs().max().item())
    ref = run_ref(inp, norm=norm, out_scale=0.7)
    bound = 4 * eps * (D + Nk + H) * max(1.0, ref.abs().max().item())
    assert max_err(out, ref) <= bound
    assert max_err(out, fused) <= bound


def test_separate_statistics_with_dropout_strided_statistics_and_fp16_products():
    """Dropout needs no change to the statistics (they are P's, before dropout); the statistics kernel
    writes any strides of ``softmax_stats``; with fp16 tensor-core operands (``lowp_dot``, which the
    interpreter runs for fp16) the output stays within twice eager fp16's error."""
    inp = make_inputs(2, 6, 21, 19, 35, torch.float64)
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    extra = dict(dropout_p=0.25, seed=seed)
    out, stats = run_kernel(inp, norm="layer", separate_stats=True, **extra)
    fused, fused_stats = run_kernel(inp, norm="layer", separate_stats=False, **extra)
    tol = 1e-12 if interpreting() else 1e-6
    assert max_err(out, fused) <= tol and max_err(stats_lse(stats), stats_lse(fused_stats)) <= tol
    big = torch.full((2, 2, 3, 6, 25), float("nan"), dtype=torch.float64, device=DEVICE)
    strided = big[:, :, 1, :, 2:23].permute(1, 0, 2, 3)  # [2, B, H, Nq], no stride of 1 contiguous run
    _, st = re_attention_forward(inp["q"], inp["k"], inp["v"], inp["mix_weight"], inp["mix_bias"],
                                 scale=35 ** -0.5, norm="layer", norm_weight=inp["norm_weight"],
                                 norm_bias=inp["norm_bias"], softmax_stats=strided, separate_stats=True, **extra)
    assert st is strided and torch.equal(strided, stats)
    assert torch.isnan(big[:, :, 0]).all() and torch.isnan(big[:, :, 2]).all() and torch.isnan(big[..., :2]).all()
    low = make_inputs(2, 6, 33, 20, 35, torch.float16)
    out16, _ = run_kernel(low, norm="none", out_scale=0.7, separate_stats=True, lowp_dot=True)
    truth = run_ref(low, norm="none", out_scale=0.7)
    eager = run_ref(low, norm="none", out_scale=0.7, dtype=torch.float16)
    assert max_err(out16, truth) <= 2 * max_err(eager, truth) + 1e-6


def test_separate_statistics_refuse_a_mask_or_a_scale_that_is_not_positive():
    inp = make_inputs(1, 6, 5, 5, 32, torch.float32)
    args = (inp["q"], inp["k"], inp["v"], inp["mix_weight"])
    mask = torch.ones(5, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="separate_stats=True needs no attn_mask and scale > 0, got a mask"):
        re_attention_forward(*args, scale=0.2, attn_mask=mask, separate_stats=True)
    with pytest.raises(ValueError, match="separate_stats=True needs no attn_mask and scale > 0, got no mask and "
                                         "scale -0.2"):
        re_attention_forward(*args, scale=-0.2, separate_stats=True)
    # with the statistics given, there is nothing to compute: the flag is ignored
    _, stats = re_attention_forward(*args, scale=0.2)
    out, _ = re_attention_forward(*args, scale=0.2, attn_mask=mask, softmax_stats=stats.clone(), stats_given=True,
                                  separate_stats=True)
    assert not torch.isnan(out).any()


def test_the_launch_rule_separates_the_statistics_of_unmasked_16_bit_calls():
    """What ``re_attention_forward`` launches (captured for sm_90, not run): the statistics kernel, then the
    forward reading them, for 16-bit calls without a mask or dropout (norm none, BatchNorm, LayerNorm) and
    scale > 0; one launch otherwise. The forward's tiles are the rule's for given statistics."""
    from reattn.kernels.capture import capture_launches
    from reattn.kernels.launch import softmax_stats_config, splits_softmax_stats

    def launched(dtype=torch.bfloat16, h=12, d=64, scale=0.125, **kw):
        meta = dict(device="meta")
        q = torch.empty(2, h, 197, d, dtype=dtype, **meta)
        with capture_launches(90) as launches:
            re_attention_forward(q, q, q, torch.empty(h, h, **meta), scale=scale, **kw)
        return launches

    for norm, extra in (("none", {}), ("layer", {}), ("batch", dict(batch_stats=torch.empty(2, 12, device="meta")))):
        stats_launch, fwd = launched(norm=norm, **extra)
        assert (stats_launch.name, fwd.name) == ("_softmax_stats_kernel", "_re_attention_fwd_kernel")
        assert fwd.constexprs()["STATS_GIVEN"] and stats_launch.bound()["STATS"] is fwd.bound()["STATS"]
        rule = forward_config(197, 197, 64, 12, interpret=False, shared_limit=232448,
                              variant=variant_of(norm, False, False), stats_given=True)
        assert fwd.options()["num_stages"] == rule.num_stages
        cfg = softmax_stats_config(64, interpret=False)
        assert {k: stats_launch.constexprs()[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")} == dict(
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D)
        assert stats_launch.programs == 2 * 12 * -(-197 // cfg.BLOCK_M)
    mask = torch.empty(197, 197, dtype=torch.bool, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta")
    for kw in (dict(attn_mask=mask), dict(dropout_p=0.1, seed=seed), dict(dtype=torch.float32), dict(scale=-0.125),
               dict(norm="layer", d=32, h=16)):
        (only,) = launched(**kw)
        assert only.name == "_re_attention_fwd_kernel" and not only.constexprs()["STATS_GIVEN"]
    assert splits_softmax_stats("plain", 2, 0.1, 6, 64) and splits_softmax_stats("layer", 2, 0.1, 6, 64)
    assert not splits_softmax_stats("heavy", 2, 0.1, 6, 64) and not splits_softmax_stats("plain", 4, 0.1, 6, 64)
    assert not splits_softmax_stats("plain", 2, 0.0, 6, 64)
    # where the forward reading the statistics spilled more (the launch scan): LayerNorm at 16 or 32 slots with
    # 32-wide head-dim tiles (but 12 heads, whose forward reading them is the split sweep), the moments at 32
    # slots with 16-wide ones
    assert [splits_softmax_stats("layer", 2, 0.1, h, 32) for h in (6, 12, 16, 32)] == [True, True, False, False]
    assert splits_softmax_stats("layer", 2, 0.1, 32, 64)  # 32-wide head-dim chunks of D = 64 do split
    assert splits_softmax_stats("layer", 2, 0.1, 12, 64) and splits_softmax_stats("plain", 2, 0.1, 12, 32)
    assert not splits_softmax_stats("plain", 2, 0.1, 32, 16, moments=True)
    assert splits_softmax_stats("plain", 2, 0.1, 32, 16) and splits_softmax_stats("plain", 2, 0.1, 12, 16, True)
    # The statistics kernel's tiles: 256 rows up to D = 64, 128 above or where they pad fewer query rows
    # (N = 577: 640 rows, not 768); the head dim in one tile, or two where it is the sum of two powers of two.
    assert [(softmax_stats_config(d, interpret=False).BLOCK_M, softmax_stats_config(d, interpret=False).BLOCK_D)
            for d in (16, 48, 64, 128)] == [(256, 16), (256, 32), (256, 64), (128, 128)]
    assert [softmax_stats_config(64, n, interpret=False).BLOCK_M for n in (1, 128, 197, 256, 257, 577)] == [
        128, 128, 256, 256, 128, 128]
    for limit in (101376, 166912, 232448):
        for d in (16, 32, 48, 64, 128):
            assert shared_bytes("softmax_stats", softmax_stats_config(d, interpret=False),
                                d_tail=head_dim_tail(d)) <= limit
    # Given statistics, the plain forward takes one stage at 16 slots and at 32 with 16-wide head-dim tiles,
    # and so does the split forward (12 heads) with LayerNorm or the moments; the LayerNorm forward of other
    # head counts and their moments keep the one-launch forward's stages.
    one = dict(interpret=False, stats_given=True)
    assert [forward_config(197, 197, d, 12, variant="plain", **one).num_stages for d in (16, 32, 64)] == [1, 1, 1]
    assert [forward_config(197, 197, d, 32, variant="plain", **one).num_stages for d in (16, 32)] == [1, 2]
    assert [forward_config(197, 197, d, 12, variant="layer", **one).num_stages for d in (32, 64)] == [1, 1]
    for kw, shapes in ((dict(variant="layer"), ((16, 32), (32, 32))),
                       (dict(variant="plain", moments=True), ((16, 32), (16, 64), (32, 32)))):
        for h, d in shapes:
            assert forward_config(197, 197, d, h, **one, **kw).num_stages == forward_config(
                197, 197, d, h, interpret=False, variant=kw["variant"]).num_stages == 2
    assert forward_config(197, 197, 32, 12, variant="plain", interpret=False).num_stages == 2


@triton.jit
def _factor_kernel(X, Y, N: tl.constexpr, CDT: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _rescale_factor(tl.load(X + offs), CDT))


def test_the_statistics_rescale_factor_on_the_fma_pipe():
    """``_rescale_factor``: 2^x for x <= 0 from a degree-5 polynomial and the exponent bits (fp32), within
    the fit's 1.83e-7 relative error plus the final product's rounding (2^-24); exactly 1 at x = 0 (the row
    max unchanged); 2^-126 below -126 (-inf included: the first block's factor, multiplying a zero sum).
    In fp64 the library's exp2."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.5, 0.5 - 1.0, -1e-8, -1.0, -2.0, -125.9, -126.0, -126.5, -1000.0, float("-inf")])
    x = torch.cat([-torch.rand(4096 - special.numel(), generator=g) * 126, special]).float().to(DEVICE)
    y = torch.empty_like(x)
    _factor_kernel[(1,)](x, y, N=4096, CDT=tl.float32)
    truth = torch.exp2(x.double())
    normal = x >= -126
    rel = (y.double()[normal] - truth[normal]).abs() / truth[normal]
    assert rel.max().item() <= 1.83e-7 + 2.0 ** -24
    assert y[x == 0].item() == 1.0
    assert (y[~normal] == 2.0 ** -126).all()
    y64 = torch.empty_like(x, dtype=torch.float64)
    _factor_kernel[(1,)](x.double(), y64, N=4096, CDT=tl.float64)
    # fp64 (fp64 inputs): the library's exp2, within 2 ulp
    assert ((y64 - truth).abs() / truth.clamp_min(2.0 ** -1022)).max().item() <= 2 * 2.0 ** -52


# ---- 12 heads without padding slots (forward._split_sweep) ----

def _split_spy(monkeypatch):
    """Record (SPLIT_HEADS, D_TAIL) of every forward launch (the launches still run)."""
    from reattn.kernels import forward as fwd_module
    seen = []
    real = fwd_module.run_on_device

    def spy(kernel, grid, device, *args, **kwargs):
        if "SPLIT_HEADS" in kwargs:
            seen.append((kwargs["SPLIT_HEADS"], kwargs["D_TAIL"]))
        return real(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(fwd_module, "run_on_device", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,Nq,Nk,D,mix_bias", [
    (2, 12, 33, 40, 35, True),   # keys past a multiple of 16; D padded to 48 = 32 + 16 (two head-dim tiles)
    (1, 12, 17, 16, 64, False),  # whole key blocks, no bias
    (2, 12, 1, 1, 16, True),     # N = 1
    (1, 12, 197, 197, 32, True),  # ViT length
])
def test_split_heads_match_the_reference(monkeypatch, dtype, B, H, Nq, Nk, D, mix_bias):
    """12 heads with given statistics: heads 0-7 and 8-11 in two products, the stacked maps mixed by W (x) I
    weights (``_split_sweep``), for norm none, LayerNorm, training BatchNorm (given batch statistics) and
    eval BatchNorm (running statistics). Against float64 truths, with the tolerance of
    ``test_separate_statistics_match_the_fused_sweep``; every launch took the split sweep (LayerNorm too,
    its centering folded into the weights), with a head-dim tail where the padded head dim is 48."""
    seen = _split_spy(monkeypatch)
    inp = make_inputs(B, H, Nq, Nk, D, dtype, mix_bias=mix_bias)
    g = torch.Generator().manual_seed(7)
    mean = (torch.randn(H, generator=g, dtype=torch.float64) * 0.1).to(DEVICE)
    var = (torch.rand(H, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    batch_stats = torch.stack((mean, 1.0 / torch.sqrt(var + 1e-5))).to(acc)
    eps = torch.finfo(dtype if interpreting() else torch.float32).eps
    cases = (
        (dict(norm="none"), dict(norm="none")),
        (dict(norm="layer"), dict(norm="layer")),
        (dict(norm="batch", batch_stats=batch_stats),
         dict(norm="batch", running_mean=mean, running_var=var, training=False)),  # the same affine map
        (dict(norm="batch", running_mean=mean, running_var=var),
         dict(norm="batch", running_mean=mean, running_var=var, training=False)),
    )
    for kernel_args, ref_args in cases:
        out, stats = run_kernel(inp, out_scale=0.7, separate_stats=True, **kernel_args)
        ref = run_ref(inp, out_scale=0.7, **ref_args)
        assert max_err(out, ref) <= 4 * eps * (D + Nk + H) * max(1.0, ref.abs().max().item())
    assert seen == [(True, 16 if D == 35 else 0)] * 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,Nq,Nk,D", [(2, 33, 40, 35), (1, 17, 16, 64), (2, 1, 1, 16)])
def test_split_heads_take_the_moments(monkeypatch, dtype, B, Nq, Nk, D):
    """One-sweep training BatchNorm's forward at 12 heads runs the split sweep too: O = X V of the map
    X = W P + c, and the per-program sums of X (exact from the parameters: each row of P sums to 1) and of X^2
    over the kept entries (rows past N_Q and keys past N_K left out), against float64 sums of the map."""
    seen = _split_spy(monkeypatch)
    H = 12
    inp = make_inputs(B, H, Nq, Nk, D, dtype, mix_bias=True)
    q, k, v, w, c = (inp[n] for n in ("q", "k", "v", "mix_weight", "mix_bias"))
    out = torch.full_like(q, float("nan"))
    o, _, moments = re_attention_forward(q, k, v, w, c, scale=D ** -0.5, separate_stats=True, with_moments=True,
                                         out=out)
    assert o is out and seen == [(True, 16 if D == 35 else 0)]
    q64, k64, v64, w64, c64 = (t.double() for t in (q, k, v, w, c))
    p = torch.softmax(q64 @ k64.transpose(-1, -2) * D ** -0.5, dim=-1)
    x = torch.einsum("gh,bhij->bgij", w64, p) + c64[None, :, None, None]
    eps = torch.finfo(dtype).eps
    entry_tol = 4 * eps * (D + Nk + H) * max(1.0, x.abs().max().item())
    assert max_err(o, x @ v64) <= entry_tol * max(1.0, v64.abs().max().item()) * Nk
    sums = moments.sum(0)[:, :H]  # [2, slots]: slot s is head s
    count = B * Nq * Nk
    assert max_err(sums[0], x.sum((0, 2, 3))) <= count * entry_tol
    assert max_err(sums[1], (x * x).sum((0, 2, 3))) <= count * entry_tol * 2 * x.abs().max().item()


@pytest.mark.parametrize("H, Nq, Nk, D, separate", [(12, 33, 40, 35, True), (6, 20, 17, 32, False),
                                                   (3, 9, 9, 16, False), (12, 1, 1, 16, False)])
def test_center_keys_form_the_mixing_bias_in_the_programs(H, Nq, Nk, D, separate):
    """center_keys=Nk: the programs form the mixing bias -sum_h W[g, h] / Nk themselves (one-sweep BatchNorm's
    shift), as given by torch: the same output and moments, with BIAS_SLOT (3 and 6 heads, padding slots),
    the split sweep (12 heads, statistics given) and the one-launch forward; a mix bias or a norm with it is
    a ValueError, as a negative or non-int center_keys."""
    inp = make_inputs(2, H, Nq, Nk, D, torch.float64)
    q, k, v, w = (inp[n] for n in ("q", "k", "v", "mix_weight"))
    kw = dict(scale=D ** -0.5, with_moments=True, separate_stats=separate)
    out, _, moments = re_attention_forward(q, k, v, w, w.sum(dim=1) / -Nk, **kw)
    out_c, _, moments_c = re_attention_forward(q, k, v, w, None, center_keys=Nk, **kw)
    tol = 64 * torch.finfo(torch.float64).eps * (D + Nk + H)  # one division's rounding apart, through the sweep
    assert max_err(out_c, out) <= tol * max(1.0, out.abs().max().item())
    assert max_err(moments_c.sum(0), moments.sum(0)) <= tol * Nq * Nk * max(1.0, moments.abs().max().item())
    for bad in (dict(center_keys=Nk, mix_bias=w[0]), dict(center_keys=-1), dict(center_keys=2.0)):
        bias = bad.pop("mix_bias", None)
        with pytest.raises(ValueError, match="center_keys"):
            re_attention_forward(q, k, v, w, bias, scale=D ** -0.5, **bad)
    with pytest.raises(ValueError, match="center_keys"):
        re_attention_forward(q, k, v, w, None, scale=D ** -0.5, norm="layer", center_keys=Nk)


def test_split_heads_with_fp16_products_within_twice_eager_error(monkeypatch):
    """fp16 tensor-core operands (the GPU path, which the interpreter runs for fp16): the mixing weights
    held as product results, q of the larger group in registers, P and the weights in fp16 for the
    mixing; within twice eager fp16's error of the float64 truth, with and without LayerNorm."""
    seen = _split_spy(monkeypatch)
    low = make_inputs(2, 12, 33, 40, 48, torch.float16)
    for norm in ("none", "layer"):
        out16, _ = run_kernel(low, norm=norm, out_scale=0.7, separate_stats=True, lowp_dot=True)
        truth = run_ref(low, norm=norm, out_scale=0.7)
        eager = run_ref(low, norm=norm, out_scale=0.7, dtype=torch.float16)
        assert max_err(out16, truth) <= 2 * max_err(eager, truth) + 1e-6, norm
    assert seen == [(True, 16), (True, 16)]


def test_the_launch_rule_splits_12_heads_reading_statistics():
    """``TileConfig.splits_heads``: 12 heads in 16 slots, statistics given, no mask or dropout, the head dim
    in one tile; LayerNorm up to a head dim of 64; one stage with LayerNorm and with the moments."""
    def split(h, d=64, **kw):
        args = dict(stats_given=True, norm="none", masked=False, has_dropout=False, d_chunks=1)
        args.update(kw)
        return forward_config(197, 197, d, h, interpret=False, variant="plain").splits_heads(h, d, **args)

    assert [split(h) for h in (3, 6, 9, 12, 16, 24, 32)] == [False, False, False, True, False, False, False]
    assert split(12, norm="batch") and split(12, d=32)
    assert [split(12, d, norm="layer") for d in (16, 32, 48, 64, 128)] == [True, True, True, True, False]
    one = dict(interpret=False, variant="layer", stats_given=True)
    assert [forward_config(197, 197, d, 12, **one).num_stages for d in (32, 48, 64)] == [1, 1, 1]
    assert [forward_config(197, 197, d, 12, **dict(one, variant="plain"), moments=True).num_stages
            for d in (32, 48, 64)] == [1, 1, 1]
    for kw in (dict(stats_given=False), dict(masked=True), dict(has_dropout=True), dict(d_chunks=2)):
        assert not split(12, **kw), kw
    # a head dim that is two powers of two: the tile of half the padded width, then the rest
    assert [head_dim_tail(d) for d in (16, 32, 48, 64, 80, 96, 112, 128)] == [0, 0, 16, 0, 16, 32, 0, 0]


def test_split_heads_read_q_and_write_the_output_at_their_own_head_dim():
    """At a head dim such as 35 the split forward copies only k and v (to 48 columns, read at every key block)
    and reads q and writes O unpadded, once per program (captured for sm_90: q and out are the launch's own
    tensors, no copy of O); elsewhere q is padded with them and O goes through a padded buffer."""
    from reattn.kernels.capture import capture_launches

    def launched(h):
        meta = dict(device="meta", dtype=torch.bfloat16)
        q, k, v = (torch.empty(2, h, 197, 35, **meta) for _ in range(3))
        out = torch.empty(2, h, 197, 35, **meta)
        with capture_launches(90) as launches, OpCounter() as counted:
            re_attention_forward(q, k, v, torch.empty(h, h, **meta), scale=0.125, out=out)
        return q, out, launches, [op.name for op in counted.ops]

    q, out, (stats_launch, fwd), ops = launched(12)
    assert fwd.constexprs()["SPLIT_HEADS"] and fwd.constexprs()["D_TAIL"] == 16
    assert fwd.bound()["Q"] is q and fwd.bound()["O"] is out and stats_launch.bound()["Q"] is q
    assert fwd.bound()["D"] == 48 and fwd.bound()["D_Q"] == 35
    assert ops.count("cat") == 2 and "copy_" not in ops  # k and v padded; O written in place
    q, out, (stats_launch, fwd), ops = launched(6)
    assert not fwd.constexprs()["SPLIT_HEADS"] and fwd.bound()["Q"] is not q and fwd.bound()["O"] is not out
    assert ops.count("cat") == 3 and "copy_" in ops



@pytest.mark.parametrize("H, Nq, Nk, D, dtype", [
    (12, 33, 40, 35, torch.float64),  # the split sweep, a head-dim tail (48 = 32 + 16), 15 rows past Nq
    (12, 28, 16, 64, torch.float32),  # the split sweep, 4 rows past Nq: exactly its last stacked sub-row
    (6, 20, 17, 32, torch.float16),   # 6 heads in 8 slots, the shift in slot 6, fp16 products (mixing in halves)
    (6, 40, 33, 16, torch.float16),   # 8 rows past Nq: exactly the second half
])  # (16 rows a program in the interpreter)
def test_value_sums_ride_in_rows_past_nq(monkeypatch, H, Nq, Nk, D, dtype):
    """value_sums: where the last program's rows past Nq can be mixed to A = 1 by weights of their own
    (``sums_values``), their O is U = sum_j V_j, which the launch writes [B, H, 1, D] in the accumulation dtype:
    U within the rounding of its sum (float64 truth), and the output and moments bitwise those of the launch
    without it (poisoned output buffer)."""
    seen = _split_spy(monkeypatch)
    B = 2
    inp = make_inputs(B, H, Nq, Nk, D, dtype)
    q, k, v, w = (inp[n] for n in ("q", "k", "v", "mix_weight"))
    kw = dict(scale=D ** -0.5, with_moments=True, separate_stats=H == 12, center_keys=Nk,
              lowp_dot=dtype == torch.float16)
    out, _, moments = re_attention_forward(q, k, v, w, **kw)
    poisoned = torch.full_like(q, float("nan"))
    out_u, _, moments_u, u = re_attention_forward(q, k, v, w, out=poisoned, value_sums=True, **kw)
    assert seen[0] == seen[1] and seen[0][0] == (H == 12)
    assert torch.equal(out_u, out) and torch.equal(moments_u, moments)
    acc = accumulator_dtype(q)
    assert u.shape == (B, H, 1, D) and u.dtype == acc and u.is_contiguous()
    ref = v.double().sum(dim=2, keepdim=True)
    assert max_err(u, ref) <= 4 * torch.finfo(acc).eps * Nk * v.abs().max().item()


def test_value_sums_are_left_to_the_caller_where_no_rows_can_carry_them():
    """U is None (the caller sums V) with a mask, without rows past Nq, with fewer of them than the mixing's
    own rows need, with dropout or at 4 heads in 8 slots (no mixing bias in a slot of one row group), and at 8
    slots for a 32-bit O; value_sums needs with_moments."""
    def u_of(H, Nq, dtype=torch.float64, **extra):
        inp = make_inputs(1, H, Nq, 9, 16, dtype)
        q, k, v, w = (inp[n] for n in ("q", "k", "v", "mix_weight"))
        kw = dict(scale=0.25, with_moments=True, value_sums=True, center_keys=9)
        if H == 12 and "attn_mask" not in extra:
            kw["separate_stats"] = True
        if dtype == torch.float16:
            kw["lowp_dot"] = True
        kw.update(extra)
        return re_attention_forward(q, k, v, w, **kw)[3]

    assert u_of(12, 17) is not None and u_of(6, 17, torch.float16) is not None
    assert u_of(12, 17, attn_mask=torch.ones(17, 9, dtype=torch.bool)) is None
    assert u_of(12, 32) is None and u_of(12, 30) is None          # 0 and 2 rows past Nq (4 needed)
    assert u_of(6, 32, torch.float16) is None and u_of(6, 25, torch.float16) is None  # 0 and 7 (8 needed)
    assert u_of(6, 17, torch.float16, dropout_p=0.2, seed=torch.tensor([3])) is None
    assert u_of(4, 17, torch.float16) is None
    assert u_of(6, 17) is None  # float64 O (and K = 8 dots where Triton takes them)
    inp = make_inputs(1, 12, 17, 9, 16, torch.float64)
    with pytest.raises(ValueError, match="value_sums goes with with_moments"):
        re_attention_forward(inp["q"], inp["k"], inp["v"], inp["mix_weight"], scale=0.25, value_sums=True)


def test_the_value_sums_rule():
    """``sums_values``: the split sweep's last BLOCK_M / Q rows, or at 8 slots with one row group and the mixing bias
    in a slot the second half of the rows (mixed in halves; O in a 16-bit dtype, head-dim tiles up to 64), all past
    Nq in the last program; never with a mask."""
    split = forward_config(197, 197, 64, 12, interpret=False, variant="plain", stats_given=True, moments=True)
    eight = forward_config(197, 197, 64, 6, interpret=False, variant="plain", stats_given=True, moments=True)
    assert (split.BLOCK_M, eight.BLOCK_M, eight.G) == (16, 32, 1)
    rule = dict(bias_slot=True, masked=False, halves=True, narrow_out=True)
    assert [sums_values(split, n, split_heads=True, **rule) for n in (197, 196, 192, 204, 205, 577)] == \
        [True, True, False, True, False, True]
    assert [sums_values(eight, n, split_heads=False, **rule) for n in (197, 208, 209, 224, 196)] == \
        [True, True, False, False, True]
    assert not sums_values(split, 197, split_heads=True, **dict(rule, masked=True))
    assert not sums_values(eight, 197, split_heads=False, **dict(rule, bias_slot=False))
    assert not sums_values(eight, 197, split_heads=False, **dict(rule, halves=False))
    assert not sums_values(eight, 197, split_heads=False, **dict(rule, narrow_out=False))
    assert sums_values(split, 197, split_heads=True, **dict(rule, narrow_out=False))
    wide = forward_config(197, 197, 128, 6, interpret=False, variant="plain", stats_given=True, moments=True)
    assert wide.BLOCK_D == 128 and not sums_values(wide, 197, split_heads=False, **rule)
