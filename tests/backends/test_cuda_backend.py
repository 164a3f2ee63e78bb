"""What is specific to backend="cuda", the CUDA C++ programs of csrc/cuda (the correctness suite every
fused backend shares is tests/backends/test_conformance.py, what the Triton and CUDA backends share
beyond it test_fused_backends.py; the device-code harness itself is tested in test_cuda_harness.py).

Without a GPU, the kernels run in the host emulator of csrc/cuda/sim.h: the same source, every
thread a fiber. Checked here: the tensor-core forward (fp16/bf16) against float64 in every mode
within twice eager's error, its row statistics, and that its warps do not race (reversed and
shuffled warp orders give bitwise the same result, poisoned outputs and shared memory never leak);
the CUDA-core programs (fp32/fp64, and the program kinds not yet on tensor cores) likewise, and
that their plans that stage fewer heads or split the head dim agree; the tile shapes and plans of
the issue's shapes fit sm_80 and sm_90 shared memory; the compiled kernels (cuobjdump) spill
nothing; bad input raises ValueError/TypeError with a readable message. On a GPU: CUDA and Triton
agree.
"""
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

# The Triton kernels (and the dropout pattern the CUDA programs share with them) need triton, which
# torch's CPU-only wheels do not bring (make install TORCH=cpu): then this module skips, saying so.
pytest.importorskip("triton", reason="triton is not installed (a CPU-only torch)")

import reattn
from reattn._extension import _C
from reattn.backends.cuda import launch_plan
from reattn.kernels.dropout import dropout_keep_mask
from tests._build import expected_cuda_archs
from tests._running_stats import (MOMENTUM, assert_torch_update_agrees, expected_running_stats,
                                  running_stats_problem)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Dynamic shared memory one block may take: the opt-in maximum (A100 166912 B, H100 232448 B)
# minus the 1 KB the compiler reserves in every sm_90 kernel (test_compiled_kernels_... reads it).
SM80_SHARED = 166912
SM90_SHARED = 232448 - 1024
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def tensors(B, H, Nq, Nk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(dtype).to(DEVICE)

    q, k, v = rnd(B, H, Nq, D), rnd(B, H, Nk, D), rnd(B, H, Nk, D)
    w = rnd(H, H, s=0.4) + torch.eye(H, dtype=dtype, device=DEVICE)
    return q, k, v, w, rnd(H, s=0.1), rnd(H, s=0.2, shift=1.0), rnd(H, s=0.1), rnd(B, H, Nq, D)


def run_programs(B, H, Nq, Nk, D, *, norm, masked, dropout, dtype=torch.float64, programs_only=False, **options):
    """Every program once (forward, statistics, backward incl. its BatchNorm sums) through reattn._C.

    programs_only: the forward and backward on the CUDA-core programs also for fp16/bf16 (not the
    tensor cores).
    """
    q, k, v, w, c, gamma, beta, grad = tensors(B, H, Nq, Nk, D, dtype)
    keep = None
    if masked:
        keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[0, 0, 0] = False  # a fully masked row
        keep = keep.to(DEVICE)
    seed = torch.tensor([1234], device=DEVICE) if dropout else None
    p = 0.2 if dropout else 0.0
    nw, nb = (gamma, beta) if norm != "none" else (None, None)
    lse, s1, gram = _C.cuda_gram_sums(q, k, keep, seed, 0.4, p, 1.0 / Nk, **{
        n: o for n, o in options.items() if n != "poison_outputs"})
    g = torch.Generator().manual_seed(2)
    stats = torch.stack([torch.rand(H, generator=g, dtype=torch.float64) * 0.1,
                         1 + torch.rand(H, generator=g, dtype=torch.float64)]).to(DEVICE)
    forward_options = dict(options, programs_only=programs_only)
    out, lse2 = _C.cuda_forward(q, k, v, w, c, nw, nb, stats if norm == "batch" else None, keep, seed, None, 0.4, 0.8,
                                norm, 1e-5, p, **forward_options)
    rows = torch.cat([stats, torch.rand(2, H, generator=g, dtype=torch.float64).to(DEVICE) * 0.01]) if norm == "batch" \
        else None
    grads = _C.cuda_backward(grad, q, k, v, w, c, nw, nb, rows, keep, seed, lse2, 0.4, 0.8, norm, 1e-5, p, False,
                             **forward_options)
    sums = _C.cuda_backward(grad, q, k, v, w, c, nw, nb, rows, keep, seed, lse2, 0.4, 0.8, norm, 1e-5, p, True,
                            **forward_options)[5:]
    # One-sweep training BatchNorm's forward: norm none, X V in the accumulation dtype, moments of X.
    x_v, _, moments, _ = _C.cuda_forward(q, k, v, w, c, None, None, None, keep, seed, None, 0.4, 1.0, "none", 1e-5,
                                         p, True, True, **forward_options)
    return dict(lse=lse, s1=s1, gram=gram, out=out, lse2=lse2, dq=grads[0], dk=grads[1], dv=grads[2], dW=grads[3],
                dc=grads[4], dgamma=grads[5], dbeta=grads[6], sum_dn_xhat=sums[0], sum_dn=sums[1], x_v=x_v,
                moments=moments.sum(0))


def assert_all_close(a, b, rtol, atol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name, equal_nan=False)


CASES = [("none", False, False), ("layer", True, True), ("batch", True, False), ("batch", False, True)]


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the host emulator, which runs on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm,masked,dropout", CASES)
def test_emulated_phases_do_not_race(norm, masked, dropout, dtype):
    # A phase whose items read what other items of the same phase write gives another answer when
    # its items run in the other order (on the GPU it would be a race).
    shape = (2, 5, 19, 23, 35)
    forward = run_programs(*shape, norm=norm, masked=masked, dropout=dropout, dtype=dtype, poison_outputs=True)
    backward = run_programs(*shape, norm=norm, masked=masked, dropout=dropout, dtype=dtype, reverse_items=True,
                            poison_outputs=True)
    for name, t in forward.items():
        assert not t.isnan().any(), name  # poisoned outputs and NaN-filled shared memory never leak
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_all_close(forward, backward, **tol)


@pytest.mark.skipif(DEVICE == "cuda", reason="forces plans through the emulator's shared-memory limit")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("norm,masked,dropout", CASES[1:3])
def test_plans_that_stage_fewer_heads_or_split_the_head_dim_agree(norm, masked, dropout, dtype):
    B, H, Nq, Nk, D = 2, 6, 21, 18, 40
    name = str(dtype).replace("torch.", "")
    unlimited = 1 << 22  # the emulator is not bound by a GPU's shared memory
    roomy = {kind: _C.cuda_plan(kind, H, D, Nq, name, unlimited) for kind in range(4)}
    assert all(p["head_group"] == H and p["num_chunks"] == 1 for p in roomy.values()), roomy
    # Ever smaller limits: fewer heads staged at a time, the head dim in chunks, and (fp16) CUDA-core
    # products on smaller tiles. One run per distinct backward plan.
    plans = {}
    for percent in range(98, 10, -4):
        limit = roomy[2]["shared_bytes"] * percent // 100
        try:
            plan = _C.cuda_plan(2, H, D, Nq, name, limit)
        except ValueError:
            break
        plans.setdefault(tuple(sorted(plan.items())), limit)
    features = [dict(p) for p in plans]
    assert any(p["head_group"] < H for p in features), features
    assert any(p["num_chunks"] > 1 for p in features), features
    if dtype == torch.float16:
        assert {p["pad"] for p in features} == {1, 16}, features
    reference = run_programs(B, H, Nq, Nk, D, norm=norm, masked=masked, dropout=dropout, dtype=dtype,
                             shared_limit=unlimited, programs_only=True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for limit in plans.values():
        got = run_programs(B, H, Nq, Nk, D, norm=norm, masked=masked, dropout=dropout, dtype=dtype,
                           shared_limit=limit, programs_only=True)
        assert_all_close(got, reference, **tol)


# ---- the tensor-core forward (fp16 / bf16) -----------------------------------------------------------
TC_DTYPES = [torch.bfloat16, torch.float16]


def tc_case(B, H, Nq, Nk, D, *, norm="none", mask=None, dropout=0.0, seed=0, dtype=torch.bfloat16, references=True,
            norm_weight=None, **options):
    """(output, row statistics, float64 reference, eager output in `dtype`) of one tensor-core forward.
    norm_weight: the norm's weight [H] in place of the random one."""
    from reattn.reference import re_attention_ref

    q, k, v, w, c, gamma, beta, _ = tensors(B, H, Nq, Nk, D, seed=seed)
    if norm_weight is not None:
        gamma = norm_weight.to(gamma)
    nw, nb = (gamma, beta) if norm != "none" else (None, None)
    rows = torch.stack([torch.linspace(-0.02, 0.03, H, dtype=torch.float64),
                        torch.linspace(0.8, 1.3, H, dtype=torch.float64)]).to(DEVICE)  # mean, 1/std
    seed_t = torch.tensor([4321], device=DEVICE) if dropout else None
    low = [t.to(dtype) for t in (q, k, v)]
    out, stats = _C.cuda_forward(*low, w, c, nw, nb, rows if norm == "batch" else None, mask, seed_t, None, 0.3,
                                 0.8, norm, 1e-5, dropout, poison_outputs=True, **options)
    if not references:
        return out, stats
    keep = dropout_keep_mask(seed_t, (B, H, Nq, Nk), dropout) if dropout else None
    # Given batch statistics are eval-mode BatchNorm with running_var = 1/std^2 - eps.
    running = dict(running_mean=rows[0], running_var=rows[1] ** -2 - 1e-5) if norm == "batch" else {}

    def eager(x_q, x_k, x_v, cast):
        params = {n: (None if t is None else t.to(cast)) for n, t in dict(w=w, c=c, nw=nw, nb=nb).items()}
        return re_attention_ref(x_q, x_k, x_v, params["w"], params["c"], scale=0.3, norm=norm,
                                norm_weight=params["nw"], norm_bias=params["nb"], out_scale=0.8, attn_mask=mask,
                                dropout_p=dropout, dropout_mask=keep, training=dropout > 0,
                                **{n: r.to(cast) for n, r in running.items()})

    return out, stats, eager(q, k, v, torch.float64), eager(*low, dtype)


def assert_within_twice_eager_error(out, reference, eager):
    kernel_err = (out.double() - reference).abs().max().item()
    eager_err = (eager.double() - reference).abs().max().item()
    assert not out.isnan().any()
    assert kernel_err <= 2 * eager_err + 1e-6, (kernel_err, eager_err)


def bool_mask(B, Nq, Nk, seed=1):
    keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(seed)) > 0.35
    keep[0, 0, min(1, Nq - 1)] = False  # a query row with every key masked
    return keep.to(DEVICE)


def additive_mask(H, Nq, Nk, seed=2):
    g = torch.Generator().manual_seed(seed)
    add = torch.randn(H, Nq, Nk, generator=g, dtype=torch.float64)
    add[torch.rand(H, Nq, Nk, generator=g) > 0.7] = float("-inf")
    return add.to(DEVICE)


# (name, shape (B, H, Nq, Nk, D), norm, mask kind, dropout): one-segment shapes (Nk <= 224) and the
# two-sweep path (Nk > 224), odd sizes, a head count below the tile's and H = 1.
TC_CASES = [
    ("plain", (2, 6, 17, 23, 32), "none", None, 0.0),
    # Every K tile of the one segment holds keys (193..224): the softmax loops without tile tests.
    ("plain full key tiles", (1, 12, 5, 197, 32), "none", None, 0.0),
    ("batch full key tiles", (1, 6, 7, 224, 64), "batch", None, 0.0),
    ("layer bool mask dropout", (2, 6, 9, 11, 64), "layer", "bool", 0.25),
    ("batch per-head float mask", (2, 12, 20, 37, 32), "batch", "float", 0.0),
    ("layer H=5 D=33 Nq=1", (2, 5, 1, 40, 33), "layer", None, 0.0),
    # LayerNorm's tensor-core mixing (shapes of 12 output heads, one segment): 12 heads in every
    # fragment column pair, 7 (an odd count: a thread with one real head of its pair), the whole key row.
    ("layer tensor mixing H=12", (2, 12, 17, 50, 32), "layer", None, 0.0),
    ("layer tensor mixing H=7 D=40", (1, 7, 9, 33, 40), "layer", None, 0.0),
    ("layer tensor mixing full key tiles", (1, 12, 5, 197, 64), "layer", None, 0.0),
    ("H=1 Nk=1", (1, 1, 3, 1, 16), "none", None, 0.0),
    ("two sweeps layer mask dropout", (1, 6, 9, 300, 35), "layer", "bool", 0.25),
    ("two sweeps batch", (1, 12, 33, 257, 48), "batch", None, 0.0),
    # LayerNorm's tensor-core mixing per key segment (D = 35 on padded copies, a last segment of 44 keys).
    ("two sweeps layer tensor mixing", (1, 12, 9, 300, 35), "layer", None, 0.0),
    # D = 35 in 48 columns: K and V copied 5 chunks per row by 5 warps (the others idle), the last K tile
    # of 230 keys (6 real rows of 32) copying its real rows alone.
    ("two sweeps D=35", (1, 12, 20, 230, 35), "none", None, 0.0),
    # D = 41 in 48 columns: the wide program (its 41st column in the last k16 step's second half); D <= 40
    # above runs the narrow tail's (rows.cuh kNarrowTail).
    ("two sweeps D=41", (1, 12, 20, 230, 41), "none", None, 0.0),
    # A last segment of at most 16 keys (n8_end = 2) and a last K tile of at most 8: the programs take their first
    # n8 tiles alone there (rows.cuh finish_round, statistics_sweep). 257 = 4 x 64 + 1 (DeepViT-L-384's 577 is
    # 9 x 64 + 1), 264 = 4 x 64 + 8; and the general variant's tail (masked, dropout: its own softmax).
    ("two sweeps tail of one key", (1, 12, 20, 257, 35), "layer", None, 0.0),
    ("two sweeps tail of 8 keys", (1, 12, 9, 264, 40), "none", None, 0.0),
    ("two sweeps tail mask dropout", (1, 6, 9, 260, 35), "layer", "bool", 0.25),
    # The segmented shape's one segment of at most 16 keys (its exact softmax reads every n8 tile of the K tile).
    ("48 columns one segment Nk=10", (1, 6, 9, 10, 35), "layer", None, 0.0),
    ("48 columns one segment Nk=3", (2, 12, 5, 3, 40), "none", None, 0.0),
]


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's tile choice (an H100's shared memory) is checked here")
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,norm,mask,dropout", TC_CASES, ids=[c[0] for c in TC_CASES])
def test_tensor_core_forward_within_twice_eager_error_in_every_mode(name, shape, norm, mask, dropout, dtype):
    B, H, Nq, Nk, D = shape
    assert _C.cuda_forward_tiles(H, D, Nq, Nk, str(dtype)[6:]) is not None  # the tensor-core forward runs
    attn_mask = {None: None, "bool": bool_mask(B, Nq, Nk), "float": additive_mask(H, Nq, Nk)}[mask]
    out, stats, reference, eager = tc_case(B, H, Nq, Nk, D, norm=norm, mask=attn_mask, dropout=dropout, dtype=dtype)
    assert out.dtype == dtype and stats.shape == (B, H, Nq, 2) and stats.dtype == torch.float32
    assert_within_twice_eager_error(out, reference, eager)


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's tile choice (an H100's shared memory) is checked here")
@pytest.mark.parametrize("H,D", [(12, 32), (6, 64)], ids=["wide", "narrow"])
def test_layer_tensor_mixing_takes_zero_tiny_and_negative_norm_weights(H, D):
    # The plain LayerNorm forward stores A / s = xhat + beta' / s and scales O by s once (rows.cuh
    # layer_scale: s = gamma' raised to at least 2^-24 |beta'|): gamma = 0 or tiny next to beta is
    # A = beta' there, within the 16-bit rounding; a head with gamma = 0 gets no NaN or infinity.
    values = [0.0, 1e-30, -1e-30, -0.7, 1.1, 1e-6, 2.0, 0.0, -3.0, 0.5, 1.0, 1e-3]
    gamma = torch.tensor(values[:H], dtype=torch.float64)
    out, _, reference, eager = tc_case(2, H, 17, 50, D, norm="layer", norm_weight=gamma)
    assert out.isfinite().all()
    assert_within_twice_eager_error(out, reference, eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 17, 23, 32), (1, 12, 9, 257, 48)], ids=["one segment", "two sweeps"])
def test_eval_batchnorm_folded_from_running_statistics(shape, dtype):
    # Eval-mode BatchNorm for inference: the programs fold out_scale (gamma (M - running_mean) rstd + beta),
    # rstd = 1 / sqrt(running_var + eps), from the running statistics as given (any dtype, strided), in float64
    # (the tensor-core programs; the CUDA-core ones from rows ops.cpp forms), where the ladder's fold is torch ops.
    from reattn.reference import re_attention_ref

    B, H, Nq, Nk, D = shape
    q, k, v, w, c, gamma, beta, _ = tensors(B, H, Nq, Nk, D, seed=5)
    g = torch.Generator().manual_seed(9)
    running_mean = (torch.randn(H, generator=g, dtype=torch.float64) * 0.02).to(DEVICE)
    running_var = (torch.rand(2 * H, generator=g, dtype=torch.float64) * 0.5 + 0.3).float().to(DEVICE)[::2]
    low = [t.to(dtype) for t in (q, k, v)]
    out, _ = _C.cuda_forward(*low, w, c, gamma, beta, None, None, None, None, 0.3, 0.8, "batch", 1e-5, 0.0,
                             poison_outputs=True, running_mean=running_mean.bfloat16(), running_var=running_var)

    def eager(x_q, x_k, x_v, cast):
        return re_attention_ref(x_q, x_k, x_v, w.to(cast), c.to(cast), scale=0.3, norm="batch",
                                norm_weight=gamma.to(cast), norm_bias=beta.to(cast), out_scale=0.8,
                                running_mean=running_mean.bfloat16().to(cast), running_var=running_var.to(cast),
                                training=False)

    reference = eager(q, k, v, torch.float64)
    assert out.dtype == dtype and out.isfinite().all()
    if dtype == torch.bfloat16:
        assert _C.cuda_forward_tiles(H, D, Nq, Nk, "bfloat16") is not None  # the tensor-core fold
        assert_within_twice_eager_error(out, reference, eager(*low, dtype))
    else:  # the CUDA-core programs: the accumulation's rounding bound along the op's reduction chains
        from tests._tolerance import reduction_length, rounding_bound

        bound = rounding_bound(dtype, reduction_length(B, H, Nq, Nk, D), reference.abs().max().item())
        assert (out.double() - reference).abs().max().item() <= bound


def test_eval_batchnorm_forward_checks_its_running_statistics():
    q, k, v, w, c, gamma, beta, _ = tensors(1, 3, 5, 5, 16)
    mean, var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    args = (q, k, v, w, c, gamma, beta, None, None, None, None, 0.3, 1.0)
    with pytest.raises(ValueError, match="running_mean and running_var go together"):
        _C.cuda_forward(*args, "batch", 1e-5, 0.0, running_mean=mean)
    with pytest.raises(ValueError, match="running_mean and running_var are eval-mode BatchNorm's statistics"):
        _C.cuda_forward(*args, "none", 1e-5, 0.0, running_mean=mean, running_var=var)
    with pytest.raises(ValueError, match=r"running_var must have shape \[3\]"):
        _C.cuda_forward(*args, "batch", 1e-5, 0.0, running_mean=mean, running_var=torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 6, 33, 50, 64), (1, 12, 20, 260, 48), (2, 6, 9, 21, 35), (1, 12, 20, 260, 35),
                                   (1, 12, 20, 40, 32)],
                         ids=["one segment", "two sweeps", "D=35", "two sweeps D=35", "one segment 12 heads"])
@pytest.mark.parametrize("mode", ["none", "batch", "layer", "moments"])
def test_tensor_core_plain_variants_agree_with_the_general_one(shape, mode):
    # Without mask or dropout the compiled plain variant of the norm runs (its own loops, the
    # exponent as one FMA; D = 35: on copies whose rows are padded to 16 bytes);
    # general_variant=True forces the variant with every feature. Same
    # problem, same answer up to the rounding of P to bf16 (which the two exponent forms may flip).
    B, H, Nq, Nk, D = shape
    q, k, v, w, c, gamma, beta, _ = tensors(B, H, Nq, Nk, D)
    low = [t.bfloat16() for t in (q, k, v)]
    norm = "none" if mode == "moments" else mode
    nw, nb = (gamma, beta) if norm != "none" else (None, None)
    rows = torch.stack([torch.full((H,), 0.01, dtype=torch.float64), torch.full((H,), 1.2, dtype=torch.float64)])
    args = (*low, w, c, nw, nb, rows.to(DEVICE) if norm == "batch" else None, None, None, None, 0.3, 0.8, norm, 1e-5,
            0.0, mode == "moments")
    plain = _C.cuda_forward(*args, poison_outputs=True)
    general = _C.cuda_forward(*args, poison_outputs=True, general_variant=True)
    for i, (a, b) in enumerate(zip(plain, general)):
        assert not a.isnan().any()
        if i == 3:  # U's shares of the row blocks (rows.cuh kValueSums): the plain moments variant's in every shape,
            # the general one's in one-segment shapes; fp32 sums of Nk bf16 rows (2^-24 relative per add)
            u = low[2].double().sum(dim=2)
            assert a.numel() and (b.numel() or _C.cuda_forward_tiles(H, D, Nq, Nk, "bfloat16")["keys"] <= 64)
            for parts in (a, b)[:2 if b.numel() else 1]:
                bound = Nk * 2 ** -24 * low[2].double().abs().sum(dim=2) + 1e-30
                assert ((parts.double().sum(dim=2) - u).abs() <= bound).all()
            continue
        assert a.shape == b.shape
        # |O| sums ~Nk entries of |A V|: one bf16 flip of P (2^-8 relative) per entry at most
        torch.testing.assert_close(a.double(), b.double(), rtol=2 ** -7, atol=2 ** -7 * (1 + b.double().abs().max()))


@pytest.mark.skipif(DEVICE == "cuda", reason="warp orders are the emulator's")
@pytest.mark.parametrize("shape", [(2, 6, 33, 50, 64), (1, 12, 20, 260, 48), (1, 12, 20, 40, 32),
                                   (1, 12, 20, 260, 35)],
                         ids=["one segment", "two sweeps", "one segment 12 heads", "two sweeps narrow tail"])
@pytest.mark.parametrize("variant", ["general", "plain", "plain layer"])
def test_tensor_core_forward_does_not_race(shape, variant):
    # Between barriers the emulator runs the warps forwards, backwards or shuffled: a warp reading
    # what another writes in the same interval (or a missing cp.async wait) changes the result.
    # plain: the bf16 plain affine variant, whose tensor-core mixing writes M over P~ in place; plain
    # layer: LayerNorm's, which writes A over P~ in place (tensor-core mixing at 12 heads).
    B, H, Nq, Nk, D = shape
    features = {"general": dict(norm="layer", mask=bool_mask(B, Nq, Nk), dropout=0.2),
                "plain": dict(norm="none", mask=None, dropout=0.0, dtype=torch.bfloat16),
                "plain layer": dict(norm="layer", mask=None, dropout=0.0, dtype=torch.bfloat16)}[variant]
    runs = [tc_case(B, H, Nq, Nk, D, **features, references=False, **order)
            for order in (dict(), dict(reverse_items=True), dict(shuffle_seed=7))]
    for out, stats in runs:
        assert not out.isnan().any() and not stats.isnan().any()  # poisoned outputs are all written
        assert torch.equal(out, runs[0][0]) and torch.equal(stats, runs[0][1])


@pytest.mark.skipif(DEVICE == "cuda", reason="warp orders are the emulator's")
def test_segmented_moments_forward_matches_float64_in_any_warp_order():
    # The bf16 moments variant over key segments (one-sweep training BatchNorm at DeepViT-L-384's length): P from
    # the statistics kernel's row statistics by the plain exponent, no mask bits in P~ (its tensor-core mixing counts
    # the entries past Nq and Nk by position), X = W P~ + c mixed on tensor cores. X V and the sums of X^2 against
    # float64, within what rounding P~ and X to bf16 (2^-8 relative each) can move them; bitwise the same in every
    # warp order.
    B, H, Nq, Nk, D = 1, 12, 20, 260, 48
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D, seed=3)
    low = [t.bfloat16() for t in (q, k, v)]
    runs = [_C.cuda_forward(*low, w, c, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5, 0.0, True, True,
                            poison_outputs=True, **order)
            for order in (dict(), dict(reverse_items=True), dict(shuffle_seed=5))]
    x_v, _, moments, value_sums = runs[0]
    for run in runs[1:]:
        assert torch.equal(run[0], x_v) and torch.equal(run[2], moments) and torch.equal(run[3], value_sums)
    # U = sum_j V_j in the row blocks' shares (rows.cuh kValueSums), fp32 sums of Nk bf16 rows
    v64 = low[2].double()
    bound = Nk * 2 ** -24 * v64.abs().sum(dim=2)
    assert value_sums.shape == (B, H, -(-Nq // 32), D)
    assert ((value_sums.double().sum(dim=2) - v64.sum(dim=2)).abs() <= bound).all()
    q64, k64, v64 = (t.double() for t in low)
    P = torch.softmax(0.3 * q64 @ k64.transpose(-1, -2), dim=-1)  # [B, H, Nq, Nk]
    X = torch.einsum("gh,bhij->bgij", w, P) + c[None, :, None, None]
    spread = torch.einsum("gh,bhij->bgij", w.abs(), P) + X.abs()  # what the two roundings scale
    sums = moments.sum(0)  # [2, H]: the sums of X (from the parameters folded to fp32, 2^-24 relative each) and X^2
    folded = (torch.einsum("gh,bhij->bgij", w.abs(), P) + c.abs()[None, :, None, None]).sum(dim=(0, 2, 3))
    assert ((sums[0] - X.sum(dim=(0, 2, 3))).abs() <= 2 * 2 ** -24 * folded).all()
    err = (sums[1] - (X * X).sum(dim=(0, 2, 3))).abs()
    assert (err <= 2 * 2 ** -8 * (2 * X.abs() * spread).sum(dim=(0, 2, 3)) + 1e-6).all(), err
    ref = X @ v64
    bound = 2 * 2 ** -8 * (spread @ v64.abs()) + 1e-6
    assert ((x_v.double() - ref).abs() <= bound).all()


@pytest.mark.skipif(DEVICE == "cuda", reason="warp orders are the emulator's")
@pytest.mark.parametrize("shape,dtype", [((2, 12, 130, 257, 35), torch.bfloat16), ((1, 5, 20, 230, 48), torch.bfloat16),
                                         ((1, 3, 9, 230, 64), torch.bfloat16), ((1, 3, 9, 230, 52), torch.bfloat16),
                                         ((1, 2, 1, 260, 20), torch.bfloat16), ((1, 4, 40, 300, 35), torch.float16),
                                         ((1, 6, 40, 150, 35), torch.bfloat16)],
                         ids=["D=35 two row blocks", "D=48", "D=64 segments of 32", "D=52 idle columns",
                              "N=1 D=20 narrow", "float16 D=35", "150 keys: the programs' own sweep"])
def test_segmented_plain_forward_takes_the_statistics_kernel(shape, dtype):
    # Plain problems over several key segments of more than 224 keys: the statistics kernel (csrc/cuda/statistics.cuh:
    # one head, 128 query rows a program) writes the row statistics first and the forward's programs read them
    # (rows.cuh load_statistics); at 224 keys or fewer the programs sweep them themselves (row_configs.h
    # kStatisticsKernelKeys), the same checks. Against float64: m = max_j scale q.k from fp32 sums of exact bf16
    # products (|error| <= D 2^-24 scale max_j |q| . |k|, as rounded sums go), log l from exp2.approx (2^-22
    # relative) summed in fp32 over Nk keys; bitwise the same in every warp order.
    B, H, Nq, Nk, D = shape
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D, seed=4)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    read_k, read_v = _C.cuda_padded_rows([k, v]) if D % 8 else (k, v)
    plan = _C.cuda_forward_tiles(H, D, Nq, Nk, str(dtype)[6:])
    assert plan["segments"] > 1 and (plan["statistics"] is not None) == (Nk > 224)
    statistics = plan["statistics"]
    if statistics is not None:
        assert statistics["rows"] == 128 and statistics["d"] == plan["d"] and statistics["narrow"] == plan["narrow"]
    scale = D ** -0.5
    runs = [_C.cuda_forward(q, read_k, read_v, w, None, None, None, None, None, None, None, scale, 1.0, "none", 1e-5,
                            0.0, poison_outputs=True, **order)
            for order in (dict(), dict(reverse_items=True), dict(shuffle_seed=9))]
    out, stats = runs[0]
    for run in runs[1:]:
        assert torch.equal(run[0], out) and torch.equal(run[1], stats)
    q64, k64 = q.double(), k.double()
    s = scale * q64 @ k64.transpose(-1, -2)
    s_err = D * 2 ** -24 * scale * (q64.abs() @ k64.abs().transpose(-1, -2)).amax(-1)
    m, log_l = stats[..., 0].double(), stats[..., 1].double()
    assert ((m - s.amax(-1)).abs() <= s_err + 1e-30).all()
    lse_err = 2 * s_err + (Nk + 4) * 2 ** -22
    assert ((m + log_l - torch.logsumexp(s, -1)).abs() <= lse_err).all()
    # The forward reads the statistics it is given: log l raised by log 2 halves P, hence (no mixing bias, norm
    # none) the output, up to the fp32 rounding of the exponent's offset (m + log l) log2 e, which can move an
    # entry's bf16 rounding of P~ or of the mixed map (2^-8 relative each, so within 2 2^-8 |W| P |V|), and the two
    # outputs' own bf16 roundings (2^-8 |out| each).
    shifted = stats.clone()
    shifted[..., 1] += math.log(2.0)
    halved, _ = _C.cuda_forward(q, read_k, read_v, w, None, None, None, None, None, None, shifted, scale, 1.0, "none",
                                1e-5, 0.0, poison_outputs=True)
    spread = torch.einsum("gh,bhij->bgij", w.abs(), torch.softmax(s, -1)) @ v.double().abs()
    bound = 2 * 2 ** -8 * (spread + out.double().abs())
    assert ((2 * halved.double() - out.double()).abs() <= bound).all() and not torch.equal(halved, out)


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's architecture switch")
@pytest.mark.parametrize("shape", [(2, 12, 17, 50, 32), (1, 7, 9, 33, 40), (1, 12, 9, 260, 48)],
                         ids=["H=12", "H=7", "segments"])
def test_layer_tensor_mixing_stores_agree_across_architectures(shape, monkeypatch):
    # LayerNorm's tensor-core mixing writes A back with one stmatrix per row on sm_90 and with 16-bit
    # stores per entry before it (REATTN_SIM_ARCH=80 makes the emulator take that path): the same
    # values to the same places, so the same output bit for bit.
    B, H, Nq, Nk, D = shape
    out90, stats90 = tc_case(B, H, Nq, Nk, D, norm="layer", references=False)
    monkeypatch.setenv("REATTN_SIM_ARCH", "80")
    out80, stats80 = tc_case(B, H, Nq, Nk, D, norm="layer", references=False)
    assert not out90.isnan().any()
    assert torch.equal(out80, out90) and torch.equal(stats80, stats90)


@pytest.mark.parametrize("Nk", [45, 260], ids=["one segment", "two sweeps"])
def test_tensor_core_row_statistics_are_max_and_log_sum(Nk):
    # stats[..., 0] = max_j S, stats[..., 1] = log sum_j exp(S - max) over the attended keys; (+inf, 0)
    # for a row with every key masked. A row whose keys all carry a large finite fill (-1e9, as
    # Hugging Face masks) keeps P uniform over its keys, as eager softmax gives.
    B, H, Nq, D = 2, 3, 7, 32
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D)
    keep = bool_mask(B, Nq, Nk)
    fill = torch.zeros(B, 1, Nq, Nk, dtype=torch.float64, device=DEVICE).masked_fill(~keep, -1e9)
    for mask in (keep, fill):
        low = [t.bfloat16() for t in (q, k, v)]
        out, stats = _C.cuda_forward(*low, w, c, None, None, None, mask, None, None, 0.3, 1.0, "none", 1e-5, 0.0)
        S = 0.3 * low[0].double() @ low[1].double().transpose(-2, -1)
        S = S.masked_fill(~keep, float("-inf")) if mask.dtype == torch.bool else S + fill.float().double()
        m = S.amax(-1)
        empty = torch.isinf(m)
        log_sum = (S - m.masked_fill(empty, 0)[..., None]).exp().sum(-1).log()
        # fp32 products of bf16 inputs over D terms; exp / log at fp32 precision
        tol = 1e-5 * (1 + (0.3 * low[0].double().abs() @ low[1].double().abs().transpose(-2, -1)).amax(-1))
        if mask.dtype == torch.bool:
            assert torch.equal(stats[..., 0][empty], torch.full_like(stats[..., 0][empty], float("inf")))
            assert torch.equal(stats[..., 1][empty], torch.zeros_like(stats[..., 1][empty]))
            assert ((stats[..., 0].double() - m).abs()[~empty] <= tol[~empty]).all()
            assert ((stats[..., 1].double() - log_sum).abs()[~empty] <= 1e-5 * (1 + log_sum.abs()[~empty])).all()
        else:
            # The masked row: every score rounds to the fill in fp32, so P = 1 / Nk and log l = log Nk.
            torch.testing.assert_close(stats[0, :, 1, 1], torch.full((H,), math.log(Nk), device=DEVICE),
                                       rtol=1e-5, atol=1e-5)
            assert torch.isfinite(out).all()


# ---- the tensor-core backward (fp16 / bf16) ----------------------------------------------------------
def tc_backward_case(B, H, Nq, Nk, D, *, norm="none", mask=None, dropout=0.0, dtype=torch.bfloat16, references=True,
                     **options):
    """(gradients [dq, dk, dv, dW, dc, dgamma, dbeta], float64 ones, eager ones in `dtype`) of one call.

    norm "batch": training BatchNorm's backward with given rows (mean, 1/std, e, f), whose float64
    reference is the affine map A = out_scale (gamma (M - mean) rstd + beta) plus e xhat + f in dM:
    compared through the CUDA-core programs in float64 (the same formula), not eager.
    """
    from reattn.reference import re_attention_ref

    q, k, v, w, c, gamma, beta, grad = tensors(B, H, Nq, Nk, D)
    nw, nb = (gamma, beta) if norm != "none" else (None, None)
    seed = torch.tensor([77], device=DEVICE) if dropout else None
    low = [t.to(dtype) for t in (q, k, v)]
    rows = None
    if norm == "batch":
        g = torch.Generator().manual_seed(5)
        rows = torch.stack([torch.rand(H, generator=g, dtype=torch.float64) * 0.05,
                            1 + torch.rand(H, generator=g, dtype=torch.float64),
                            torch.randn(H, generator=g, dtype=torch.float64) * 0.01,
                            torch.randn(H, generator=g, dtype=torch.float64) * 0.01]).to(DEVICE)
    _, stats = _C.cuda_forward(*low, w, c, nw, nb, None if rows is None else rows[:2], mask, seed, None, 0.3, 0.8, norm,
                               1e-5, dropout)
    grads = _C.cuda_backward(grad.to(dtype), *low, w, c, nw, nb, rows, mask, seed, stats, 0.3, 0.8, norm, 1e-5,
                             dropout, False, poison_outputs=True, **options)
    if not references:
        return grads, None, None

    def programs(dt):  # the float64 formula of every mode, through the CUDA-core programs
        qq, kk, vv = (t.to(dt) for t in (q, k, v))
        _, st = _C.cuda_forward(qq, kk, vv, w, c, nw, nb, None if rows is None else rows[:2], mask, seed, None, 0.3,
                                0.8, norm, 1e-5, dropout, programs_only=True)
        return _C.cuda_backward(grad.to(dt), qq, kk, vv, w, c, nw, nb, rows, mask, seed, st, 0.3, 0.8, norm, 1e-5,
                                dropout, False, programs_only=True)

    if norm == "batch":
        return grads, programs(torch.float64), programs(dtype)
    keep = dropout_keep_mask(seed, (B, H, Nq, Nk), dropout) if dropout else None

    def eager(xq, xk, xv, cast):
        ins = [t.clone().requires_grad_(True) for t in (xq, xk, xv)]
        params = [t.to(cast).clone().requires_grad_(True) for t in (w, c)] + \
                 ([t.to(cast).clone().requires_grad_(True) for t in (nw, nb)] if norm != "none" else [])
        out = re_attention_ref(*ins, params[0], params[1], scale=0.3, norm=norm, out_scale=0.8, attn_mask=mask,
                               norm_weight=params[2] if norm != "none" else None,
                               norm_bias=params[3] if norm != "none" else None, dropout_p=dropout, dropout_mask=keep,
                               training=dropout > 0)
        return list(torch.autograd.grad(out, ins + params, grad.to(cast)))

    return grads, eager(q, k, v, torch.float64), eager(*low, dtype)


TC_BACKWARD_CASES = [
    ("plain", (2, 6, 17, 23, 32), "none", None, 0.0),
    # Every K tile of the one segment holds keys (193..224): the softmax loops without tile tests.
    ("plain full key tiles", (1, 12, 5, 197, 32), "none", None, 0.0),
    ("batch full key tiles", (1, 6, 7, 224, 64), "batch", None, 0.0),
    ("layer", (1, 12, 20, 37, 64), "layer", None, 0.0),
    # bf16 LayerNorm's own row pass (rows.cuh grad_mixed_layer): m16n8k8 products two rows per load up
    # to 8 heads; at 16 heads every input head fills k and the centered bias is only the C operand.
    ("layer narrow", (2, 6, 17, 23, 32), "layer", None, 0.0),
    ("layer H=16", (1, 16, 9, 40, 32), "layer", None, 0.0),
    ("layer full key tiles", (1, 12, 5, 197, 64), "layer", None, 0.0),
    ("batch rows", (2, 6, 17, 23, 32), "batch", None, 0.0),
    ("bool mask dropout", (2, 6, 9, 11, 32), "none", "bool", 0.25),
    ("layer float mask dropout", (2, 6, 9, 11, 64), "layer", "float", 0.25),
    ("batch rows bool mask", (2, 5, 9, 11, 33), "batch", "bool", 0.0),
    ("H=1 Nk=1", (1, 1, 3, 1, 16), "none", None, 0.0),
    # Nk > 224: the row pass over key segments of 64 (the last one partial), D <= 48 and D <= 64.
    ("segments", (1, 12, 20, 230, 35), "none", None, 0.0),
    ("segments layer float mask dropout", (1, 12, 9, 230, 64), "layer", "float", 0.25),
    # LayerNorm's own row pass over segments and key pass (bf16; D = 35 on padded copies).
    ("segments layer", (1, 12, 20, 230, 35), "layer", None, 0.0),
    ("segments batch rows bool mask", (2, 5, 9, 230, 33), "batch", "bool", 0.0),
    # The plain row pass over segments with training BatchNorm: M on tensor cores in its first sweep,
    # the per-thread mixing of diag(ee) W' in its second.
    ("segments batch", (1, 12, 20, 230, 35), "batch", None, 0.0),
]
GRAD_NAMES = ("dq", "dk", "dv", "dW", "dc", "dgamma", "dbeta")


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's shape choice (an H100's shared memory) is checked here")
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,norm,mask,dropout", TC_BACKWARD_CASES, ids=[c[0] for c in TC_BACKWARD_CASES])
def test_tensor_core_backward_within_twice_eager_error_in_every_mode(name, shape, norm, mask, dropout, dtype):
    B, H, Nq, Nk, D = shape
    attn_mask = {None: None, "bool": bool_mask(B, Nq, Nk), "float": additive_mask(H, Nq, Nk)}[mask]
    grads, reference, eager = tc_backward_case(B, H, Nq, Nk, D, norm=norm, mask=attn_mask, dropout=dropout,
                                               dtype=dtype)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[3].dtype == torch.float64
    # The norm's own gradients come from this call for LayerNorm (training BatchNorm's from its sums call).
    count = 7 if norm == "layer" else 5
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for what, got, ref, low in list(zip(GRAD_NAMES, grads, reference, eager))[:count]:
        assert not got.isnan().any(), what
        got_err = (got.double() - ref.double()).abs().max().item()
        eager_err = (low.double() - ref.double()).abs().max().item()
        # Parameter gradients are sums over every entry, accumulated in fp32 here: besides twice
        # eager's error, one rounding unit of the inputs' dtype relative to their size (the
        # rounding of dO, V, ... to 16 bits, which no accumulation removes).
        slack = unit * ref.double().abs().max().item() if what in ("dW", "dc", "dgamma", "dbeta") else 1e-6
        assert got_err <= 2 * eager_err + slack, (what, got_err, eager_err)


@pytest.mark.skipif(DEVICE == "cuda", reason="warp orders are the emulator's")
@pytest.mark.parametrize("norm,shape,general", [("none", (2, 6, 33, 40, 32), True), ("layer", (2, 6, 33, 40, 32), True),
                                                ("layer", (1, 12, 17, 230, 40), True), ("layer", (2, 6, 33, 40, 32), False),
                                                ("none", (1, 12, 17, 230, 48), False), ("batch", (1, 12, 20, 45, 32), False),
                                                ("layer", (1, 12, 20, 45, 32), False), ("layer", (2, 6, 17, 40, 64), True),
                                                ("layer", (2, 6, 17, 40, 64), False), ("batch", (2, 6, 17, 40, 64), False),
                                                ("batch", (1, 12, 17, 230, 48), False), ("layer", (1, 12, 17, 230, 40), False)],
                         ids=["none", "layer", "layer segments", "plain layer", "plain segments", "plain 12 heads",
                              "plain layer 12 heads", "layer two key tiles", "plain layer two key tiles",
                              "plain two key tiles", "plain batch segments", "plain layer segments"])
def test_tensor_core_backward_does_not_race_and_is_deterministic(norm, shape, general):
    # Reversed and shuffled warp orders give bitwise the same gradients (no race between warps, and
    # no order-dependent sums: dK, dV in registers, parameter gradients as per-program partials).
    # Shapes of 230 keys run the row pass over key segments; the general variants with a mask and
    # dropout, the plain ones (row_configs.h) without. The plain bf16 row pass writes dS over P~ in
    # place between two slab barriers, its products m16n8k8 up to 8 heads and m16n8k16 above. At
    # D = 64 and 6 heads the key pass's warps hold two 16-key tiles each (tiles' exchange regions,
    # one slab barrier for both tiles' dS^T).
    B, H, Nq, Nk, D = shape
    mask, dropout = (bool_mask(B, Nq, Nk), 0.2) if general else (None, 0.0)
    runs = [tc_backward_case(B, H, Nq, Nk, D, norm=norm, mask=mask, dropout=dropout, references=False,
                             **order)[0]
            for order in (dict(), dict(reverse_items=True), dict(shuffle_seed=11))]
    for grads in runs:
        for what, got, first in zip(GRAD_NAMES, grads, runs[0]):
            assert not got.isnan().any(), what  # poisoned outputs are all written
            assert torch.equal(got, first), what


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's architecture switch")
@pytest.mark.parametrize("shape", [(1, 12, 20, 45, 32), (2, 7, 9, 33, 40), (1, 12, 9, 230, 40)],
                         ids=["H=12", "H=7", "segments"])
def test_layer_backward_stores_agree_across_architectures(shape, monkeypatch):
    # LayerNorm's bf16 row pass writes dM over dN with one stmatrix per row (two rows at <= 8 heads) on
    # sm_90 and with 16-bit stores per entry before it (REATTN_SIM_ARCH=80): the same gradients bit for bit.
    B, H, Nq, Nk, D = shape
    sm90 = tc_backward_case(B, H, Nq, Nk, D, norm="layer", references=False)[0]
    monkeypatch.setenv("REATTN_SIM_ARCH", "80")
    sm80 = tc_backward_case(B, H, Nq, Nk, D, norm="layer", references=False)[0]
    for what, a, b in zip(GRAD_NAMES, sm90, sm80):
        assert not a.isnan().any(), what
        assert torch.equal(a, b), what


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's shape choice (an H100's shared memory) is checked here")
@pytest.mark.parametrize("norm,general", [("none", False), ("batch", False), ("layer", False), ("layer", True),
                                          ("none", True)],
                         ids=["plain", "plain batch", "plain layer", "general layer", "general"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("H,D", [(6, 64), (12, 32)], ids=["6 heads D=64", "12 heads D=32"])
def test_key_pass_of_two_tiles_per_warp_agrees_with_one(H, D, norm, general, dtype):
    # On an H100 the key pass runs warps of two 16-key tiles (one slab of 32 keys, backward_configs.h):
    # up to 8 heads of D <= 64 one head per warp (shape 5, every variant), up to 16 heads of D <= 32
    # two heads per warp (shape 6, bf16's plain variants only: the general and fp16 ones take shape 4,
    # two slabs of one tile). An A100's shared memory gets slabs of one tile (shapes 0 and 2), with the
    # same row pass. Every key's dK and dV come from the same products and sums in the same order
    # either way: bitwise the same, with keys past Nk in a program's last tile (Nk = 40), a mask and
    # dropout in the general variants. One exception: LayerNorm through the per-thread mixer (fp16, and
    # the general variants) sums its statistics across heads over the group's warps (8 warps of one
    # head against 4 of two, ...), an fp32 association that may flip the 16-bit rounding of a few A^T
    # and dS^T entries: dK and dV within one rounding unit of their dtype relative to their largest entry.
    B, Nq, Nk = 2, 21, 40
    name = str(dtype).replace("torch.", "")
    h100 = _C.cuda_backward_tiles(H, D, Nq, Nk, name, 0, not general)
    a100 = _C.cuda_backward_tiles(H, D, Nq, Nk, name, SM80_SHARED, not general)
    two_tiles = D == 64 or (dtype == torch.bfloat16 and not general)
    assert (h100["keys"]["tiles"], h100["keys"]["kslabs"]) == ((2, 1) if two_tiles else (1, 2))
    assert h100["keys"]["keys"] == 32 and a100["keys"]["tiles"] == 1
    assert h100["rows"]["shape"] == a100["rows"]["shape"]
    mask, dropout = (bool_mask(B, Nq, Nk), 0.2) if general else (None, 0.0)
    runs = [tc_backward_case(B, H, Nq, Nk, D, norm=norm, mask=mask, dropout=dropout, dtype=dtype, references=False,
                             **options)[0] for options in (dict(), dict(shared_limit=SM80_SHARED))]
    regrouped = norm == "layer" and (general or dtype == torch.float16)
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for what, tiles, slabs in list(zip(GRAD_NAMES, *runs)):
        assert not tiles.isnan().any(), what
        if regrouped and what in ("dk", "dv"):
            torch.testing.assert_close(tiles.double(), slabs.double(), rtol=0.0,
                                       atol=unit * slabs.double().abs().max().item(), msg=what)
        else:
            assert torch.equal(tiles, slabs), what


@pytest.mark.parametrize("shape", [(2, 6, 33, 50, 64), (1, 12, 20, 260, 48), (2, 6, 64, 120, 35)],
                         ids=["one segment", "segments", "D=35"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_tensor_core_plain_backward_agrees_with_the_general_one(shape, norm):
    # Without mask or dropout the row and key passes run their plain variants (no mask, dropout or
    # element-wise code; the exponent as one FMA), on copies with rows padded to 16 bytes where
    # the inputs' are not (D = 35); general_variant=True forces the general ones. Same problem,
    # same gradients up to the rounding of P to bf16, which the two exponent forms may flip (2^-8
    # relative per entry; at small sizes often nowhere).
    B, H, Nq, Nk, D = shape
    assert _C.cuda_backward_tiles(H, D, Nq, Nk, "bfloat16")["rows"]["has_plain"]
    plain = tc_backward_case(B, H, Nq, Nk, D, norm=norm, references=False)[0]
    general = tc_backward_case(B, H, Nq, Nk, D, norm=norm, references=False, general_variant=True)[0]
    if D == 35:  # the inputs are fixed, and here some P rounds apart: the plain variant ran on the padded copies
        assert not all(torch.equal(a, b) for a, b in zip(plain[:3], general[:3]))
    for what, a, b in zip(GRAD_NAMES, plain, general):
        assert not a.isnan().any(), what
        if norm == "batch" and what in ("dgamma", "dbeta"):  # training BatchNorm's come from its sums call
            assert a.numel() == b.numel() == 0, what
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=2 ** -7, atol=2 ** -7 * (1 + b.double().abs().max()),
                                   msg=what)
    # The one row shape without a plain variant (backward_configs.h): H <= 16 and 48 < D <= 64 over
    # key segments; its problems run the general variants (the "segments layer ..." cases above).
    assert not _C.cuda_backward_tiles(12, 64, 20, 260, "bfloat16")["rows"]["has_plain"]


def test_padded_rows_are_read_as_they_are_and_only_they():
    # reattn._C.cuda_padded_rows: views of copies padded with zeros to 8 columns, which the programs read without a
    # copy of their own (ops.cpp is_padded_view): those views only, not another view of their storage nor a view of
    # the same geometry into someone else's rows (whose columns past D may hold anything).
    B, H, N, D = 2, 3, 11, 35
    q = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(0)).bfloat16().to(DEVICE)
    (view,) = _C.cuda_padded_rows([q])
    assert view.shape == q.shape and view.stride() == (H * N * 40, N * 40, 40, 1) and torch.equal(view, q)
    assert torch.equal(view._base[..., D:], torch.zeros(B, H, N, 40 - D, dtype=torch.bfloat16, device=DEVICE))
    assert _C.cuda_padded_view(view) and _C.cuda_padded_view(view.detach())
    assert not _C.cuda_padded_view(q) and not _C.cuda_padded_view(view[:1]) and not _C.cuda_padded_view(view._base)
    wide = torch.full((B, H, N, 40), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    assert not _C.cuda_padded_view(wide[..., :D])
    with pytest.raises(ValueError, match=r"tensors\[1\] must be \[B, H, N, D\] with D not a multiple of 8"):
        _C.cuda_padded_rows([q, torch.zeros(1, 1, 2, 40, dtype=torch.bfloat16)])


def test_padded_rows_op_passes_opcheck_and_needs_its_name():
    # reattn::cuda_padded_rows: schema, fake (the views' strides), autograd and AOT dispatch (torch.library.opcheck);
    # a ladder whose raw ops pad rows without the op's name is refused, saying which.
    from reattn.backends._fused import FusedRawOps
    from reattn.backends._ladder import OpLadder
    from reattn.backends.cuda import CUDA_KERNELS, CUDA_OPS

    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 5, n, generator=g).bfloat16().to(DEVICE).requires_grad_() for n in (35, 13))
    torch.library.opcheck(CUDA_OPS.padded_rows, ([q, k],))
    # D = 13: the one-segment program of 32 columns reads q in chunks (padded); D = 35: the 48-column one stages q
    assert CUDA_OPS.raw.padded_inputs(k, k, k) == [0, 1, 2] and CUDA_OPS.raw.padded_inputs(q, q, q) == [1, 2]
    assert CUDA_OPS.raw.padded_inputs(*[k.float()] * 3) == []
    aligned = torch.zeros(1, 2, 5, 16, dtype=torch.bfloat16)
    assert CUDA_OPS.raw.padded_inputs(aligned, k, aligned) == [1]
    with pytest.raises(ValueError, match=r"raw ops that pad rows need the op's name \(padded_rows="):
        OpLadder(FusedRawOps(CUDA_KERNELS), forward="reattn::test_pad_forward", backward="reattn::test_pad_backward",
                 gram_sums="reattn::test_pad_gram_sums", bn_grad_sums="reattn::test_pad_bn_grad_sums",
                 running_stats="reattn::test_pad_running_stats", eval_batchnorm="reattn::test_pad_eval",
                 device_types=())


def _copies(fn) -> int:
    """The copies (aten::cat: ops.cpp's padded rows) fn makes, the ops' insides included (the profiler's events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::cat" for e in prof.events())


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_the_backward_reads_the_rows_the_forward_padded(norm, monkeypatch):
    # backend="cuda" pads q, k, v of a head dim that is not a multiple of 8 once, ahead of the forward (the ladder's
    # padded_rows op); the autograd saves the padded views, so the backward copies dO alone where it copied q, k, v
    # and dO (ops.cpp vector_aligned). The programs read the same values either way: bitwise the same results.
    from reattn.backends.cuda import CUDA_OPS

    B, H, N, D = 2, 3, 20, 20  # the one-segment program (32 columns) reads q in chunks too
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(B, H, N, D, generator=g).bfloat16().to(DEVICE) for _ in range(3)]
    weight = (torch.eye(H) + 0.1 * torch.randn(H, H, generator=g)).to(DEVICE)
    grad = torch.randn(B, H, N, D, generator=g).bfloat16().to(DEVICE)
    options = dict(norm=norm)
    if norm != "none":
        options.update(norm_weight=torch.ones(H, device=DEVICE), norm_bias=torch.zeros(H, device=DEVICE))
    if norm == "batch":
        options.update(running_mean=torch.zeros(H, device=DEVICE), running_var=torch.ones(H, device=DEVICE),
                       training=True)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        w = weight.clone().requires_grad_()
        out = reattn.re_attention(q, k, v, w, backend="cuda", **options)
        copies = _copies(lambda: out.backward(grad))
        return [out, q.grad, k.grad, v.grad, w.grad], copies

    padded, copies = run()
    monkeypatch.setattr(CUDA_OPS, "padded_rows", None)
    unpadded, copies_before = run()
    assert (copies, copies_before) == (1, 4)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dW"), padded, unpadded):
        assert torch.equal(a, b), name
    assert all(t.is_contiguous() for t in padded[:4])  # the outputs and gradients are the inputs' shape, dense


@pytest.mark.skipif(DEVICE == "cuda", reason="the emulator's tile choice (an H100's shared memory) is checked here")
def test_the_ladder_leaves_q_unpadded_where_the_forward_stages_it(monkeypatch):
    # The segmented forward (Nk > 224 here) stages q's rows element by element (rows.cuh stage_rows, ReAttnParams
    # q_by_element), so the ladder pads k and v alone (2 copies) and the backward pads q and dO for itself (2), where
    # the one-segment forward reads q padded (the ladder pads all three). The same values either way: bitwise the
    # same results as with no padding by the ladder (each op pads what it reads).
    from reattn.backends.cuda import CUDA_OPS

    assert _C.cuda_forward_stages_queries(12, 35, 260, "bfloat16") and _C.cuda_forward_stages_queries(12, 20, 260, "float16")
    assert not _C.cuda_forward_stages_queries(12, 20, 200, "bfloat16")  # one segment of 224 keys, 32 columns
    assert not _C.cuda_forward_stages_queries(12, 35, 260, "float32")
    B, H, Nq, Nk, D = 1, 12, 20, 260, 35
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, Nq, D, generator=g).bfloat16().to(DEVICE)
    k, v = (torch.randn(B, H, Nk, D, generator=g).bfloat16().to(DEVICE) for _ in range(2))
    assert CUDA_OPS.raw.padded_inputs(q, k, v) == [1, 2]
    narrow = q[..., :20].contiguous()
    assert CUDA_OPS.raw.padded_inputs(narrow, narrow, narrow) == [0, 1, 2]
    weight = (torch.eye(H) + 0.1 * torch.randn(H, H, generator=g)).to(DEVICE)
    grad = torch.randn(B, H, Nq, D, generator=g).bfloat16().to(DEVICE)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, weight)]
        forward_copies = _copies(lambda: leaves.append(reattn.re_attention(*leaves, backend="cuda")))
        out = leaves.pop()
        backward_copies = _copies(lambda: out.backward(grad))
        return [out] + [t.grad for t in leaves], (forward_copies, backward_copies)

    staged, copies = run()
    monkeypatch.setattr(CUDA_OPS, "padded_rows", None)
    unpadded, copies_before = run()
    assert copies == (2, 2) and copies_before == (2, 4)  # the forward pads k, v itself without the ladder's op
    for name, a, b in zip(("out", "dq", "dk", "dv", "dW"), staged, unpadded):
        assert torch.equal(a, b), name


def test_padded_rows_compile_into_the_graph():
    # The padding is an op of its own (reattn::cuda_padded_rows, a fake that gives the views' strides and a
    # gradient that passes through): torch.compile takes it into one graph, forward and backward.
    B, H, N, D = 1, 2, 9, 35
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, N, D, generator=g).bfloat16().to(DEVICE).requires_grad_() for _ in range(3))
    w = (torch.eye(H) + 0.1 * torch.randn(H, H, generator=g)).to(DEVICE).requires_grad_()

    def f(q, k, v, w):
        return reattn.re_attention(q, k, v, w, norm="none", backend="cuda")

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, w)
    out.float().square().sum().backward()
    expected = f(*(t.detach().requires_grad_() for t in (q, k, v, w)))
    assert torch.equal(out, expected)
    assert q.grad is not None and q.grad.shape == q.shape and not q.grad.isnan().any()


@pytest.mark.parametrize("Nk", [50, 260], ids=["one segment", "segments"])
def test_tensor_core_plain_variants_never_read_an_inputs_columns_past_d(Nk):
    # The plain variants copy K and V (and Q, dO in the key pass) in whole 8-element chunks, so the columns
    # from D up to the next multiple of 8 must be zeros: an aligned view whose D is not a multiple of 8
    # (here D = 36 of rows of 64, NaN beyond) runs on a zero-padded copy (ops.cpp vector_aligned), exactly
    # as the same values made contiguous (72-byte rows, copied too) do.
    B, H, Nq, D = 2, 6, 19, 36
    q, k, v, w, c, _, _, grad = tensors(B, H, Nq, Nk, D)
    views = []
    for t, n in ((q, Nq), (k, Nk), (v, Nk), (grad, Nq)):
        wide = torch.full((B, H, n, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        wide[..., :D] = t.bfloat16()
        views.append(wide[..., :D])
    dense = [t.contiguous() for t in views]
    results = []
    for q_, k_, v_, g_ in (views, dense):
        out, stats = _C.cuda_forward(q_, k_, v_, w, c, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5, 0.0)
        grads = _C.cuda_backward(g_, q_, k_, v_, w, c, None, None, None, None, None, stats, 0.3, 1.0, "none", 1e-5,
                                 0.0, False)
        results.append([out, stats, *grads[:3]])
    for name, a, b in zip(("out", "stats", "dq", "dk", "dv"), *results):
        assert not a.isnan().any(), name
        assert torch.equal(a, b), name


def test_tensor_core_bn_grad_sums_allocate_only_what_they_write():
    # Training BatchNorm's backward sums (stats_only): the row pass alone; no dq, dk, dv or dW buffers.
    B, H, Nq, Nk, D = 2, 6, 17, 23, 32
    q, k, v, w, c, gamma, beta, grad = tensors(B, H, Nq, Nk, D)
    low = [t.bfloat16() for t in (q, k, v)]
    rows = torch.stack([torch.zeros(H), torch.ones(H), torch.zeros(H), torch.zeros(H)]).double().to(DEVICE)
    _, stats = _C.cuda_forward(*low, w, c, gamma, beta, rows[:2], None, None, None, 0.3, 0.8, "batch", 1e-5, 0.0)
    sums = _C.cuda_backward(grad.bfloat16(), *low, w, c, gamma, beta, rows, None, None, stats, 0.3, 0.8, "batch", 1e-5,
                            0.0, True)
    assert [t.numel() for t in sums[:5]] == [0] * 5
    assert sums[5].shape == sums[6].shape == (H,)
    # The full backward leaves training BatchNorm's own gradients out (they are these sums).
    full = _C.cuda_backward(grad.bfloat16(), *low, w, c, gamma, beta, rows, None, None, stats, 0.3, 0.8, "batch", 1e-5,
                            0.0, False)
    assert full[5].numel() == 0 and full[6].numel() == 0 and full[3].shape == (H, H)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_tensor_core_parameter_steps_take_any_dtype_and_strides(norm):
    # The fold (each program's prologue) reads the parameters as given: any floating dtype, any strides, each
    # value formed in float64 and rounded once to fp32; the gradients (param_grads_kernel) come back
    # in their parameters' dtypes, each the float64 sum rounded once. Parameter values exact in every
    # dtype (bf16-rounded, within fp16's range) must therefore give bitwise the same outputs and
    # gradients, whatever dtype or layout carries them.
    B, H, Nq, Nk, D = 2, 5, 19, 23, 32
    q, k, v, w, c, gamma, beta, grad = tensors(B, H, Nq, Nk, D)
    low = [t.bfloat16() for t in (q, k, v)]
    params = [t.bfloat16().double() for t in (w, c, gamma, beta)]
    if norm == "none":
        params[2:] = [None, None]
    rows = torch.stack([torch.full((H,), 0.05), torch.full((H,), 1.25), torch.full((H,), 0.01),
                        torch.full((H,), -0.02)]).double().to(DEVICE) if norm == "batch" else None

    def run(dtype, transposed):
        w_, c_, nw, nb = (None if t is None else t.to(dtype) for t in params)
        if transposed:  # W as the transpose of a contiguous [H, H]: strides (1, H); vectors with stride 2
            w_ = w_.t().contiguous().t()
            c_, nw, nb = (None if t is None else torch.stack([t, t], 1)[:, 0] for t in (c_, nw, nb))
        out, stats = _C.cuda_forward(*low, w_, c_, nw, nb, None if rows is None else rows[:2], None, None, None, 0.3,
                                     0.8, norm, 1e-5, 0.0, poison_outputs=True)
        grads = _C.cuda_backward(grad.bfloat16(), *low, w_, c_, nw, nb, rows, None, None, stats, 0.3, 0.8, norm, 1e-5,
                                 0.0, False, poison_outputs=True)
        return out, grads

    reference_out, reference = run(torch.float64, False)
    assert reference[3].dtype == torch.float64 and not reference[3].isnan().any()
    for dtype in DTYPES:
        for transposed in (False, True):
            out, grads = run(dtype, transposed)
            assert torch.equal(out, reference_out), (dtype, transposed)
            for i in range(3):
                assert torch.equal(grads[i], reference[i]), (dtype, transposed, i)
            # dW and dc in the parameter's dtype; dgamma, dbeta too where given (else float64, unread; training
            # BatchNorm's full backward returns them empty, float64: they come from its sums call)
            for i, param in zip(range(3, 7), params):
                none = norm == "batch" and i >= 5
                expected = reference[i] if param is None or none else reference[i].to(dtype)
                assert grads[i].dtype == expected.dtype and torch.equal(grads[i], expected), (dtype, transposed, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [False, True])
def test_bn_moments_match_float64_in_any_warp_order(dtype, affine):
    # One-sweep training BatchNorm's statistics step (parameters.cuh, bn_moments_kernel): from per-program
    # sums of X and X^2 the statistics of M = X + center + c and the coefficients (alpha, beta', rstd,
    # -mean(X) rstd), formed in float64; the coefficients rounded once to dtype.
    H, programs, per = 6, 37, 50
    g = torch.Generator().manual_seed(3)
    X = torch.randn(programs, per, H, generator=g, dtype=torch.float64) * 0.3 + 0.02
    moments = torch.stack([X.sum(1), (X * X).sum(1)], 1).contiguous()  # [programs, 2, H]
    count = torch.tensor(float(programs * per), dtype=torch.float64)
    center = torch.randn(H, generator=g).float()
    c = torch.randn(H, generator=g).bfloat16() if affine else None
    gamma = (torch.rand(H, generator=g, dtype=torch.float64) + 0.5) if affine else None
    beta = (torch.randn(2 * H, generator=g) * 0.1)[::2] if affine else None  # a strided view
    out_scale, eps = 0.8, 1e-5
    args = [t if t is None else t.to(DEVICE) for t in (moments, count, center, c, gamma, beta)]
    stats, coefficients = _C.cuda_bn_moments(*args, out_scale, eps, dtype)
    mean_x, var = X.mean((0, 1)), X.var((0, 1), unbiased=False)
    mean = mean_x + center.double() + (c.double() if affine else 0.0)
    torch.testing.assert_close(stats.cpu(), torch.stack([mean, var, count.expand(H)]), rtol=1e-12, atol=1e-14)
    rstd = (var + eps).rsqrt()
    alpha = out_scale * (gamma if affine else 1.0) * rstd
    expected = torch.stack([alpha, out_scale * (beta.double() if affine else 0.0) - mean_x * alpha, rstd,
                            -mean_x * rstd])
    assert coefficients.dtype == dtype
    # float64 math rounded once: half an ulp of dtype, plus the float64 sums' ~1e-15
    rtol = 2.0 ** -24 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(coefficients.cpu().double(), expected, rtol=rtol, atol=1e-14)
    for options in (dict(reverse_items=True), dict(shuffle_seed=5)):  # the sums' order is fixed: bitwise equal
        again = _C.cuda_bn_moments(*args, out_scale, eps, dtype, **options)
        assert torch.equal(again[0], stats) and torch.equal(again[1], coefficients)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("gamma_dtype", [None, torch.bfloat16, torch.float64], ids=str)
def test_bn_coefficients_equal_the_shared_formula(dtype, gamma_dtype):
    # Training BatchNorm's backward coefficients (parameters.cuh, bn_coefficients_kernel) are
    # reattn._batchnorm.bn_backward_coefficients computed in one launch: the same float64 operations in
    # the same order, so bitwise the same numbers.
    from reattn._batchnorm import bn_backward_coefficients

    H = 7
    g = torch.Generator().manual_seed(4)
    stats = torch.stack([torch.randn(H, generator=g, dtype=torch.float64),
                         torch.rand(H, generator=g, dtype=torch.float64) + 0.1,
                         torch.full((H,), 12345.0, dtype=torch.float64)])
    sums = torch.randn(2, H, generator=g, dtype=torch.float64) * 100
    gamma = None if gamma_dtype is None else (torch.rand(2 * H, generator=g) + 0.5).to(gamma_dtype)[::2]
    expected = bn_backward_coefficients(stats, 1e-5, gamma, sums, dtype)
    got, dgamma, dbeta = _C.cuda_bn_coefficients(stats.to(DEVICE), sums.to(DEVICE),
                                                 None if gamma is None else gamma.to(DEVICE), None, 1e-5, dtype)
    assert got.dtype == dtype and torch.equal(got.cpu(), expected)
    assert dgamma.numel() == 0 and dbeta.numel() == 0  # not asked for
    with pytest.raises(ValueError, match=r"sums must be float64 \[2, 7\] or float32/float64 parts "
                                         r"\[2, parts, 7, groups\]"):
        _C.cuda_bn_coefficients(stats.to(DEVICE), sums.t().to(DEVICE), None, None, 1e-5, dtype)


@pytest.mark.parametrize("parts_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("params", ["bf16 gamma, fp64 beta", "fp32 gamma, no beta", "none"])
def test_bn_coefficients_add_head_dot_sums_parts_and_write_the_norms_gradients(parts_dtype, params):
    """The sums as head_dot_sums' parts [2, parts, H, groups] (here strided: a slice of a larger buffer) are added
    in float64 in the launch; multiples of 2^-8 below 2^10 add exactly in any order, so the coefficients equal the
    shared formula on the summed parts bitwise and are the same in every warp order. With own_grads the summed
    rows are the norm's gradients, each rounded once to its parameter's dtype (empty for an absent parameter)."""
    from reattn._batchnorm import bn_backward_coefficients

    H, parts, groups = 5, 300, 3  # 300 parts of 3 groups: one pass of 8 x 32 parts in flight, then the rest
    g = torch.Generator().manual_seed(9)
    stats = torch.stack([torch.randn(H, generator=g, dtype=torch.float64),
                         torch.rand(H, generator=g, dtype=torch.float64) + 0.1,
                         torch.full((H,), 5000.0, dtype=torch.float64)])
    whole = torch.randint(-2 ** 10, 2 ** 10, (2, parts, H + 2, groups + 1), generator=g).to(parts_dtype) / 256
    sums = whole[:, :, 1:H + 1, :groups]
    gamma = {"bf16 gamma, fp64 beta": torch.rand(H, generator=g).bfloat16(),
             "fp32 gamma, no beta": torch.rand(H, generator=g), "none": None}[params]
    beta = torch.rand(H, generator=g, dtype=torch.float64) if params.endswith("fp64 beta") else None
    summed = sums.double().sum(dim=(1, 3))
    expected = bn_backward_coefficients(stats, 1e-5, gamma, summed, torch.float32)
    to = (lambda t: None if t is None else t.to(DEVICE))
    got, dgamma, dbeta = _C.cuda_bn_coefficients(stats.to(DEVICE), sums.to(DEVICE), to(gamma), to(beta), 1e-5,
                                                 torch.float32, own_grads=True)
    assert torch.equal(got.cpu(), expected)
    for grad, param, row in ((dgamma, gamma, 0), (dbeta, beta, 1)):
        if param is None:
            assert grad.numel() == 0
        else:
            assert grad.dtype == param.dtype and torch.equal(grad.cpu(), summed[row].to(param.dtype))
    for options in (dict(reverse_items=True), dict(shuffle_seed=3)):
        again = _C.cuda_bn_coefficients(stats.to(DEVICE), sums.to(DEVICE), to(gamma), to(beta), 1e-5, torch.float32,
                                        own_grads=True, **options)
        assert all(torch.equal(a, b) for a, b in zip(again, (got, dgamma, dbeta))), options
    for empty in (sums[:, :0], sums[..., :0]):  # no parts, or parts of no groups: the sums are zero
        got, dgamma, _ = _C.cuda_bn_coefficients(stats.to(DEVICE), empty.to(DEVICE), to(gamma), None, 1e-5,
                                                 torch.float32, own_grads=True)
        zeros = torch.zeros(2, H, dtype=torch.float64)
        assert torch.equal(got.cpu(), bn_backward_coefficients(stats, 1e-5, gamma, zeros, torch.float32))
        assert gamma is None or torch.equal(dgamma.cpu(), zeros[0].to(gamma.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weight", ["fp32", "bf16, transposed", "fp64", "32 heads", "1 head"])
def test_moments_center_is_the_float64_row_mean_rounded_once(dtype, weight):
    """The one-sweep forward's shift (parameters.cuh, moments_center_kernel): [2, H] = (center, -center) with
    center_g = sum_h W[g, h] / Nk formed in float64 (weight_row_sum: h in order, the same on every run) and rounded
    once to dtype; the second row is the first negated exactly."""
    H = {"32 heads": 32, "1 head": 1}.get(weight, 6)
    n_keys = 197
    g = torch.Generator().manual_seed(11)
    w = torch.randn(H, H, generator=g, dtype=torch.float64)
    w = {"fp32": w.float(), "bf16, transposed": w.bfloat16().t(), "fp64": w, "32 heads": w.float(), "1 head": w.float()}[weight]
    got = _C.cuda_moments_center(w.to(DEVICE), n_keys, dtype)
    center = w.double().sum(dim=1) / n_keys
    assert got.dtype == dtype and got.shape == (2, H) and got.is_contiguous()
    # float64: the sum of H terms in some order and the product by fl(1 / Nk): a few ulps of the terms' sizes
    bound = 2 * (H + 2) * 2.0 ** -53 * w.double().abs().sum(dim=1) / n_keys
    if dtype == torch.float32:
        bound = bound + center.abs() * 2.0 ** -24
    assert ((got[0].cpu().double() - center).abs() <= bound).all()
    assert torch.equal(got[1], -got[0])
    for options in (dict(reverse_items=True), dict(shuffle_seed=4)):
        assert torch.equal(_C.cuda_moments_center(w.to(DEVICE), n_keys, dtype, **options), got), options


@pytest.mark.parametrize("program", ["tensor cores, plain", "tensor cores, masked", "CUDA cores"])
def test_forward_forms_the_moments_shift_it_is_told_to(program):
    """center_keys: the one-sweep forward takes -center_g = -sum_h W[g, h] / Nk as its mixing bias, formed by the
    tensor-core programs' fold (or, for the CUDA-core programs, by moments_center), and bn_moments given mix_weight
    and n_keys adds back center formed from the same float64 sum: every output is bitwise the one from the shift
    given as a tensor (moments_center's), the statistics and coefficients too."""
    B, H, Nq, Nk, D = 2, 6, 40, 23, 32
    q, k, v, w, c, gamma, beta, _ = tensors(B, H, Nq, Nk, D, dtype=torch.float32)
    inputs = [t.bfloat16() for t in (q, k, v)] if program.startswith("tensor") else [q, k, v]
    mask = bool_mask(B, Nq, Nk) if program == "tensor cores, masked" else None
    options = dict(programs_only=program == "CUDA cores", poison_outputs=True)
    center = _C.cuda_moments_center(w, Nk, torch.float32)
    given = _C.cuda_forward(*inputs, w, center[1], None, None, None, mask, None, None, 0.3, 1.0, "none", 1e-5, 0.0,
                            True, mask is not None, **options)
    formed = _C.cuda_forward(*inputs, w, None, None, None, None, mask, None, None, 0.3, 1.0, "none", 1e-5, 0.0, True,
                             mask is not None, center_keys=Nk, **options)
    for a, b in zip(given, formed):
        assert torch.equal(a, b)
    count = float(B * Nq * Nk)
    stats = _C.cuda_bn_moments(given[2], None, center[0], c, gamma, beta, 0.5, 1e-5, torch.float32, count_value=count)
    again = _C.cuda_bn_moments(formed[2], None, None, c, gamma, beta, 0.5, 1e-5, torch.float32, count_value=count,
                               mix_weight=w, n_keys=Nk)
    for a, b in zip(stats, again):
        assert torch.equal(a, b)


def test_the_moments_shift_goes_with_moments_and_no_bias():
    B, H, Nq, Nk, D = 1, 2, 8, 5, 16
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D, dtype=torch.float32)
    low = [t.bfloat16() for t in (q, k, v)]
    with pytest.raises(ValueError, match="center_keys .the shift's keys, >= 1. goes with with_moments and no mix_bias"):
        _C.cuda_forward(*low, w, c, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5, 0.0, True,
                        center_keys=Nk)
    with pytest.raises(ValueError, match="goes with with_moments"):
        _C.cuda_forward(*low, w, None, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5, 0.0, False,
                        center_keys=Nk)
    moments = torch.zeros(3, 2, H, dtype=torch.float64, device=DEVICE)
    for center, weight, n_keys in ((torch.zeros(H, device=DEVICE), w, Nk), (None, None, 0), (None, w, 0)):
        with pytest.raises(ValueError, match="give either center .* or mix_weight and n_keys >= 1"):
            _C.cuda_bn_moments(moments, None, center, None, None, None, 1.0, 1e-5, torch.float32, count_value=8.0,
                               mix_weight=weight, n_keys=n_keys)


def test_moments_center_checks_its_arguments():
    w = torch.ones(3, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"cuda_moments_center: mix_weight must be \[H, H\] with H in \[1, 32\], "
                                         r"got \[3, 2\]"):
        _C.cuda_moments_center(w[:, :2], 5, torch.float32)
    with pytest.raises(ValueError, match=r"H in \[1, 32\], got \[33, 33\]"):
        _C.cuda_moments_center(torch.ones(33, 33, device=DEVICE), 5, torch.float32)
    with pytest.raises(ValueError, match="n_keys must be at least 1, got 0"):
        _C.cuda_moments_center(w, 0, torch.float32)
    with pytest.raises(TypeError, match="dtype must be float32 or float64 .an accumulation type., got BFloat16"):
        _C.cuda_moments_center(w, 5, torch.bfloat16)
    with pytest.raises(TypeError, match="mix_weight must be floating point"):
        _C.cuda_moments_center(w.int(), 5, torch.float32)


def test_bn_moments_check_their_arguments():
    moments, count, center = torch.zeros(3, 2, 4, dtype=torch.float64), torch.tensor(8.0, dtype=torch.float64), \
        torch.zeros(4)
    args = [t.to(DEVICE) for t in (moments, count, center)]
    with pytest.raises(ValueError, match=r"moments must be a contiguous float64 \[programs, 2, H\]"):
        _C.cuda_bn_moments(args[0].float(), *args[1:], None, None, None, 1.0, 1e-5, torch.float32)
    with pytest.raises(ValueError, match="count must be one float64 value"):
        _C.cuda_bn_moments(args[0], args[1].float(), args[2], None, None, None, 1.0, 1e-5, torch.float32)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[4\]"):
        _C.cuda_bn_moments(*args, None, torch.ones(5, device=DEVICE), None, 1.0, 1e-5, torch.float32)
    with pytest.raises(TypeError, match="coefficients' dtype must be float32 or float64"):
        _C.cuda_bn_moments(*args, None, None, None, 1.0, 1e-5, torch.bfloat16)


def test_bn_moments_take_the_count_as_a_number():
    # Without a mask the entries per head are known on the host (B Nq Nk): the step takes them as an argument
    # (count None, count_value), with the same results bitwise as from a one-value tensor.
    H, programs = 5, 9
    g = torch.Generator().manual_seed(6)
    X = torch.randn(programs, 40, H, generator=g, dtype=torch.float64) * 0.2
    moments = torch.stack([X.sum(1), (X * X).sum(1)], 1).contiguous().to(DEVICE)
    center = torch.randn(H, generator=g).to(DEVICE)
    count = torch.tensor(float(programs * 40), dtype=torch.float64, device=DEVICE)
    given = _C.cuda_bn_moments(moments, count, center, None, None, None, 1.0, 1e-5, torch.float32)
    number = _C.cuda_bn_moments(moments, None, center, None, None, None, 1.0, 1e-5, torch.float32,
                                count_value=float(programs * 40))
    assert torch.equal(given[0], number[0]) and torch.equal(given[1], number[1])
    for bad in (0.0, 1.0):  # absent (the default) or a count whose unbiased variance would divide by 0
        with pytest.raises(ValueError, match="without a count tensor, count_value must be the entries per head"):
            _C.cuda_bn_moments(moments, None, center, None, None, None, 1.0, 1e-5, torch.float32, count_value=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_update_running_stats_is_batchnorms_update_rounded_once(dtype):
    # nn.BatchNorm2d's update (parameters.cuh, running_stats_kernel): running += momentum (batch - running), the
    # variance unbiased by n / (n - 1), formed in float64 and rounded once to the buffer's dtype, in place, any
    # stride; the same numbers in any warp order.
    stats, mean0, var0 = running_stats_problem(dtype)
    expected_mean, expected_var = expected_running_stats(stats, mean0, var0, lambda x: x.to(dtype))
    for options in ({}, dict(reverse_items=True), dict(shuffle_seed=3)):
        buffer = torch.zeros(2 * var0.shape[0], dtype=dtype, device=DEVICE)
        running_mean, running_var = mean0.clone().to(DEVICE), buffer[::2]
        running_var.copy_(var0.to(DEVICE))
        _C.cuda_update_running_stats(running_mean, running_var, stats.to(DEVICE), MOMENTUM, **options)
        assert torch.equal(running_mean.cpu(), expected_mean) and torch.equal(running_var.cpu(), expected_var)
        assert not buffer[1::2].any()  # the entries between the strided view's are untouched
    assert_torch_update_agrees(stats, mean0, var0, expected_mean, expected_var)


def test_update_running_stats_checks_its_arguments():
    stats = torch.ones(3, 4, dtype=torch.float64, device=DEVICE)
    mean, var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match=r"stats must be a contiguous float64 \[3, H\]"):
        _C.cuda_update_running_stats(mean, var, stats.float(), 0.1)
    with pytest.raises(ValueError, match=r"running_var must have shape \[4\]"):
        _C.cuda_update_running_stats(mean, torch.ones(5, device=DEVICE), stats, 0.1)
    with pytest.raises(TypeError, match="running_mean must be float16, bfloat16, float32 or float64, got Int"):
        _C.cuda_update_running_stats(torch.zeros(4, dtype=torch.int32, device=DEVICE), var, stats, 0.1)


def test_cuda_backend_updates_running_stats_with_its_op():
    # Training BatchNorm through backend="cuda": the running statistics' update is the backend's op
    # (reattn::cuda_update_running_stats, one launch; its schema says it writes both buffers), and the
    # buffers end as nn.BatchNorm2d's update leaves them (float64: within float64 rounding).
    from reattn.backends.cuda import CUDA_OPS

    op = CUDA_OPS.update_running_stats
    assert op is torch.ops.reattn.cuda_update_running_stats.default
    assert [a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments] == [
        True, True, False, False]
    stats = torch.stack([torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1,
                         torch.full((3,), 50.0, dtype=torch.float64)]).to(DEVICE)
    args = (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), stats, 0.1)
    torch.library.opcheck(op, args)
    q, k, v, w, c, gamma, beta, _ = tensors(2, 3, 9, 9, 8)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE)
    erm, erv = rm.clone(), rv.clone()
    for backend, mean, var in (("cuda", rm, rv), ("eager", erm, erv)):
        reattn.re_attention(q, k, v, w, c, norm="batch", norm_weight=gamma, norm_bias=beta, running_mean=mean,
                            running_var=var, training=True, backend=backend)
    torch.testing.assert_close(rm, erm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rv, erv, rtol=1e-12, atol=1e-14)


def test_tensor_core_forward_moments_are_per_program_sums():
    # Training BatchNorm in one sweep: X V in fp32 and each program's sums of X and X^2 over the
    # attended entries; their total is the float64 sum over every (b, i, j) that is not masked.
    from reattn.reference import re_attention_ref

    B, H, Nq, Nk, D = 2, 6, 40, 23, 32
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D)
    keep = bool_mask(B, Nq, Nk)
    low = [t.bfloat16() for t in (q, k, v)]
    x_v, _, moments, value_sums = _C.cuda_forward(*low, w, c, None, None, None, keep, None, None, 0.3, 1.0, "none",
                                                  1e-5, 0.0, True, True, poison_outputs=True)
    tiles = _C.cuda_forward_tiles(H, D, Nq, Nk, "bfloat16")
    assert moments.shape == (B * tiles["grid"][0], 2, H) and x_v.dtype == torch.float32
    assert value_sums.shape == (0, H, 1, D)  # with a mask U is the caller's (the kept keys' sum)
    _, A = re_attention_ref(*[t.double() for t in low], w, c, scale=0.3, attn_mask=keep, return_attention=True)
    attended = keep.expand(B, H, Nq, Nk)
    X = A.masked_fill(~attended, 0)
    expected = torch.stack([X.sum((0, 2, 3)), (X * X).sum((0, 2, 3))])
    # X from bf16 P~: relative error ~2^-8 per entry, summed over the entries
    scale = torch.stack([X.abs().sum((0, 2, 3)), (X * X).sum((0, 2, 3))])
    assert ((moments.sum(0) - expected).abs() <= 2 ** -7 * scale + 1e-6).all()
    torch.testing.assert_close(x_v.double(), A @ v.bfloat16().double(), rtol=2e-2, atol=2e-2)


def test_plain_bf16_forward_moments_sum_x_exactly():
    # Without a mask or dropout every row of P sums to one, so the bf16 tensor-core forward writes each program's
    # sum of X = W P~ + c as R (sum_h W[g, h] + Nk c_g) over its R real rows, in float64 from the fp32 parameters
    # (exact but for their one rounding: 2^-24 relative), and sums X^2 from its fp32 products of the bf16 P~; X V
    # comes out in bf16.
    from reattn.reference import re_attention_ref

    B, H, Nq, Nk, D = 2, 6, 70, 23, 32
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D)
    low = [t.bfloat16() for t in (q, k, v)]
    x_v, _, moments, _ = _C.cuda_forward(*low, w, c, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5,
                                         0.0, True, poison_outputs=True)
    tiles = _C.cuda_forward_tiles(H, D, Nq, Nk, "bfloat16")
    assert moments.shape == (B * tiles["grid"][0], 2, H)
    _, X = re_attention_ref(*[t.double() for t in low], w, c, scale=0.3, return_attention=True)
    # X V as the forward's output (out_is_acc False): in bf16, as one-sweep training BatchNorm keeps it
    assert x_v.dtype == torch.bfloat16
    torch.testing.assert_close(x_v.double(), X @ low[2].double(), rtol=2e-2, atol=2e-2)
    sums = moments.sum(0)
    size = X.abs().sum((0, 2, 3))
    assert ((sums[0] - X.sum((0, 2, 3))).abs() <= 2 ** -22 * (size + Nq * Nk * c.abs())).all()
    squares = (X * X).sum((0, 2, 3))
    assert ((sums[1] - squares).abs() <= 2 ** -7 * squares).all()  # X from bf16 P~: ~2^-8 relative per entry


@pytest.mark.parametrize("H,D,Nq,Nk,options,summed", [
    (6, 64, 150, 197, {}, True),                              # DeiT-S's tiles: 3 row blocks of 64 rows, 13 chunks
    (12, 32, 40, 70, dict(general_variant=True), True),       # the general variant, 2 row blocks
    (5, 35, 33, 33, {}, True),                                # unaligned rows: a segmented shape (plain: summed)
    (5, 35, 33, 33, dict(general_variant=True), False),       # its general variant: not summed
    (12, 40, 70, 300, dict(shared_limit=SM80_SHARED), True),   # key segments, the statistics kernel's rows
    (5, 24, 33, 33, {}, True),                                # 2 row blocks of 32 rows, 3 chunks
    (1, 32, 1, 1, {}, True),                                  # one head, one query, one key: one row block
])
def test_tensor_core_forward_sums_values_for_training_batchnorm(H, D, Nq, Nk, options, summed):
    """Without a mask the one-segment forward also sums V over the keys (U = sum_j V_j, which the norm's shift
    multiplies): row block r of a batch element sums the value chunks c with c % row blocks == r, so the blocks'
    rows [B, H, row blocks, D] add up to U. fp32 sums of the bf16 values: at most Nk 2^-24 sum |V| off (each sum
    has at most Nk terms), every element written (the outputs are poisoned). Shapes with key segments sum them in
    their plain moments variant only; their general variant leaves U to the caller (an empty [0, H, 1, D])."""
    B = 2
    q, k, v, w, c, _, _, _ = tensors(B, H, Nq, Nk, D)
    low = [t.bfloat16() for t in (q, k, v)]
    seed = torch.tensor([99], device=DEVICE) if options.get("general_variant") else None
    tiles = _C.cuda_forward_tiles(H, D, Nq, Nk, "bfloat16", options.get("shared_limit", 0))
    assert tiles is not None
    _, _, _, value_sums = _C.cuda_forward(*low, w, c, None, None, None, None, seed, None, 0.3, 1.0, "none", 1e-5,
                                          0.1 if seed is not None else 0.0, True, poison_outputs=True, **options)
    # one-segment shapes sum (rows.cuh, kValueSums), however many keys; segmented ones in the plain variant
    assert (tiles["keys"] > 64 or not options.get("general_variant")) == summed
    if not summed:
        assert value_sums.shape == (0, H, 1, D)
        return
    assert value_sums.shape == (B, H, tiles["grid"][0], D) and value_sums.dtype == torch.float32
    v64 = low[2].double()
    want = v64.sum(2, keepdim=True)
    bound = Nk * 2.0 ** -24 * v64.abs().sum(2, keepdim=True)
    assert ((value_sums.double().sum(2, keepdim=True) - want).abs() <= bound).all()


def test_tensor_core_tiles_of_the_issue_shapes():
    # On an H100 every ViT length runs in one sweep over the keys (the row in registers), DeepViT-L
    # (577 tokens) in two; fp32/fp64, more than 12 heads or head dims over 64 run the CUDA-core programs.
    tiles = {name: _C.cuda_forward_tiles(H, D, N, N, "bfloat16", SM90_SHARED) for name, (H, D, N) in ISSUE_SHAPES.items()}
    assert tiles["DeiT-S"]["rows"] == 64 and tiles["DeiT-S"]["segments"] == 1
    assert tiles["DeepViT-16b"]["d"] == 32 and tiles["DeepViT-16b"]["segments"] == 1
    assert tiles["DeepViT-L"]["d"] == 48 and tiles["DeepViT-L"]["segments"] == 10
    assert tiles["H16-D128-N4096"] is None
    assert _C.cuda_forward_tiles(12, 64, 197, 197, "bfloat16", SM90_SHARED)["segments"] == 1  # ViT-B
    for found in [t for t in tiles.values() if t is not None]:
        assert found["shared_bytes"] <= SM90_SHARED and found["threads"] == 256
    # On an A100 (less shared memory) the ViT shapes take shorter key segments.
    a100 = _C.cuda_forward_tiles(12, 64, 197, 197, "bfloat16", SM80_SHARED)
    assert a100["shared_bytes"] <= SM80_SHARED and a100["segments"] > 1
    assert _C.cuda_forward_tiles(6, 64, 197, 197, "float32") is None


def test_tensor_core_forward_takes_the_narrow_tail_where_the_last_8_columns_are_empty():
    # The 48-column shape serves D = 33..48; at D <= 40 its program skips the last k16 step's second half
    # (tiles.h narrow_tail, rows.cuh kNarrowTail): DeepViT-L-384's D = 35 does. No other shape has one.
    for D in range(33, 49):
        tiles = _C.cuda_forward_tiles(12, D, 577, 577, "bfloat16", SM90_SHARED)
        assert tiles["d"] == 48 and tiles["narrow"] == (D <= 40), D
    for H, D, N in [(12, 32, 197), (6, 64, 197), (12, 64, 577), (12, 24, 50)]:
        assert not _C.cuda_forward_tiles(H, D, N, N, "bfloat16", SM90_SHARED)["narrow"]


def test_tensor_core_backward_tiles_of_the_issue_shapes():
    # On an H100 every issue shape's backward runs on tensor cores: one key segment up to 224 keys
    # (DeiT-S, ViT-B, DeepViT-16b), segments of 64 beyond (DeepViT-L-384, ViT-B at 384 px).
    def tiles(H, D, N, limit=SM90_SHARED):
        return _C.cuda_backward_tiles(H, D, N, N, "bfloat16", limit)

    vit_b = tiles(12, 64, 197)
    assert vit_b["rows"]["segments"] == 1 and vit_b["rows"]["rows"] == 16 and vit_b["rows"]["d"] == 64
    deepvit_l = tiles(12, 35, 577)
    assert deepvit_l["rows"]["segments"] == 10 and deepvit_l["rows"]["d"] == 48 and deepvit_l["keys"]["d"] == 48
    assert tiles(12, 64, 577)["rows"]["segments"] == 10
    for H, D, N in [(6, 64, 197), (12, 32, 197), (12, 64, 197), (12, 35, 577), (12, 64, 577)]:
        found = tiles(H, D, N)
        assert found is not None, (H, D, N)
        for kind in ("rows", "keys"):
            assert found[kind]["shared_bytes"] <= SM90_SHARED and found[kind]["threads"] == 256
    # The row pass's chunk tiles take one ring slot each (V, then K): ViT-B's one-segment layout is
    # H x 16 rows x 216 (P~ of 197 keys) + 2 slots of max(8 x 32 x 72 K-tile rows, 12 x 16 x 72 chunk
    # rows) 16-bit elements and the fp32 buffers: below an H100's 227 KB, above an A100's 163 KB.
    assert 190_000 < vit_b["rows"]["shared_bytes"] < 205_000
    # On an A100 the key pass of 12 heads at D = 64 does not fit (the CUDA-core programs run it).
    assert tiles(12, 64, 197, SM80_SHARED) is None
    assert tiles(6, 64, 197, SM80_SHARED) is not None
    assert tiles(17, 64, 197) is None and tiles(12, 65, 197) is None
    assert _C.cuda_backward_tiles(12, 64, 197, 197, "float32") is None


ISSUE_SHAPES = {"DeiT-S": (6, 64, 197), "DeepViT-16b": (12, 32, 197), "DeepViT-L": (12, 35, 577),
                "H16-D128-N4096": (16, 128, 4096)}


@pytest.mark.parametrize("shape", ISSUE_SHAPES.values(), ids=ISSUE_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["forward", "gram_sums", "backward", "bn_grad_sums"])
def test_plans_of_the_issue_shapes_fit_sm80_and_sm90(shape, dtype, kind):
    H, D, N = shape
    for limit in (SM80_SHARED, SM90_SHARED):
        plan = launch_plan(kind, H, D, N, dtype, limit)
        assert plan["shared_bytes"] <= limit
        assert plan["threads"] == 128
        if dtype in (torch.float16, torch.bfloat16):
            assert plan["pad"] == 16, plan  # the products stay on tensor cores
        if D <= 64 and dtype != torch.float64:
            assert plan["num_chunks"] == 1, plan  # the ViT shapes never repeat the score work


def test_every_head_count_and_head_dim_has_a_plan_on_sm80():
    # 1..32 heads, head dims up to 128: the plan falls back to smaller CUDA-core tiles rather than refuse.
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        for kind in range(4):
            for H in (1, 2, 6, 12, 16, 17, 24, 32):
                for D in (1, 16, 33, 35, 64, 96, 128):
                    assert _C.cuda_plan(kind, H, D, 197, dtype, SM80_SHARED)["shared_bytes"] <= SM80_SHARED


def _cuobjdump():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for candidate in (bundled, shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def compiled_kernels():
    """{(arch, function): resource usage} of every kernel in reattn._C (cuobjdump --dump-resource-usage)."""
    tool = _cuobjdump()
    assert tool is not None, "no cuobjdump: it ships in the triton wheel (triton/backends/nvidia/bin)"
    dump = subprocess.run([tool, "--dump-resource-usage", _C.__file__], check=True, capture_output=True,
                          text=True).stdout
    kernels = {}
    arch = function = None
    for line in dump.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            function = match.group(1)
        elif "REG:" in line and function is not None:
            kernels[(arch, function)] = {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return kernels


@pytest.mark.skipif(not _C.build_info()["cuda"], reason="reattn._C was built without CUDA (CPU-only torch)")
def test_compiled_kernels_spill_nothing_and_reserve_at_most_1kb_of_shared_memory():
    kernels = compiled_kernels()
    archs = sorted({a for a, _ in kernels})
    assert {f"sm_{a}" for a in expected_cuda_archs()} <= set(archs), archs  # REATTN_CUDA_ARCHS, default 80;90
    for arch in archs:
        names = [name for a, name in kernels if a == arch]
        # 4 storage types x 4 CUDA-core programs; 2 types x (5 tile shapes x 4 variants of the tensor-core
        # forward + 5 shapes of the backward's row pass in its general variant and 4 in its plain one)
        # (row_configs.h, backward_configs.h) + LayerNorm's own row pass (bf16, the 4 shapes with a plain one)
        # + the 48-column forward's narrow-tail program (2 types x 4 variants, rows.cuh NarrowTail);
        # 2 types x 6 shapes x 2 variants of the backward's key pass + LayerNorm's own (bf16, 6 shapes) +
        # shape 6 in bf16's two plain variants (backward_configs.h key_shape_compiled)
        assert sum("re_attention_kernel" in n for n in names) == 16, names
        assert sum("forward_kernel" in n for n in names) == 70, names
        assert sum("NarrowTail" in n for n in names) == 8, names
        assert sum("key_kernel" in n for n in names) == 32, names
    for (arch, name), usage in kernels.items():
        if not any(k in name for k in ("re_attention_kernel", "forward_kernel", "key_kernel")):
            continue
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (arch, name, usage)  # no spills, no local arrays
        assert usage["REG"] <= 255, (arch, name, usage)
        # The tiles are dynamic shared memory sized by the plan (test_plans_of_the_issue_shapes_fit_sm80_and_sm90,
        # test_tensor_core_tiles_of_the_issue_shapes); static: nothing on sm_80, the compiler's 1 KB reservation
        # on sm_90 (the plans leave room for it).
        assert usage["SHARED"] <= (1024 if arch == "sm_90" else 0), (arch, name, usage)


def test_bad_input_raises_value_and_type_errors_naming_the_argument():
    q, k, v, w, c, _, _, _ = tensors(2, 3, 5, 7, 8)

    def forward(**override):
        args = dict(q=q, k=k, v=v, mix_weight=w, mix_bias=c, norm_weight=None, norm_bias=None, batch_stats=None,
                    attn_mask=None, seed=None, stats=None, scale=0.3, out_scale=1.0, norm="none", eps=1e-5,
                    dropout_p=0.0)
        args.update(override)
        return _C.cuda_forward(**args)

    with pytest.raises(ValueError, match=r"q must be \[B, H, Nq, D\]"):
        forward(q=q[0])
    with pytest.raises(ValueError, match="must agree on B, H and D"):
        forward(k=k[:, :2])
    with pytest.raises(ValueError, match="v .* must have the shape of k"):
        forward(v=v[:, :, :3])
    with pytest.raises(TypeError, match="k is Float but q is Double"):
        forward(k=k.float())
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        forward(q=q.int(), k=k.int(), v=v.int())
    with pytest.raises(ValueError, match=r"mix_weight must have shape \[3, 3\]"):
        forward(mix_weight=w[:2])
    with pytest.raises(ValueError, match="supports 1 to 32 heads"):
        many = torch.zeros(1, 33, 2, 4, dtype=torch.float64, device=DEVICE)
        forward(q=many, k=many, v=many, mix_weight=torch.eye(33, dtype=torch.float64, device=DEVICE), mix_bias=None)
    with pytest.raises(ValueError, match="head dims 1 to 128"):
        wide = torch.zeros(1, 3, 2, 129, dtype=torch.float64, device=DEVICE)
        forward(q=wide, k=wide, v=wide)
    with pytest.raises(ValueError, match="at least one key"):
        forward(k=k[:, :, :0], v=v[:, :, :0])
    with pytest.raises(ValueError, match="does not broadcast"):
        forward(attn_mask=torch.ones(5, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dropout needs seed"):
        forward(dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        forward(dropout_p=1.0, seed=torch.tensor([1], device=DEVICE))
    with pytest.raises(ValueError, match="norm must be 'none', 'layer' or 'batch'"):
        forward(norm="group")
    with pytest.raises(ValueError, match="norm='batch' needs batch_stats"):
        forward(norm="batch")
    with pytest.raises(ValueError, match=r"stats must be contiguous \[B, H, Nq, 2\]"):
        forward(stats=torch.zeros(2, 3, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="kind must be one of"):
        launch_plan("sideways", 6, 64, 197, torch.float32)


def test_backend_refuses_cpu_tensors_without_the_emulator(monkeypatch):
    from reattn.backends import Problem, unavailable_reason

    monkeypatch.setenv("REATTN_CUDA_EMULATE", "0")
    reason = unavailable_reason("cuda", Problem(torch.device("cpu")))
    assert reason is not None and "REATTN_CUDA_EMULATE=1" in reason
    q, k, v, w, c, _, _, _ = tensors(1, 2, 3, 3, 4)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
            reattn.re_attention(q, k, v, w, c, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_and_triton_agree_on_a_gpu(dtype):
    B, H, N, D = 4, 12, 197, 32
    q, k, v, w, c, gamma, beta, grad = tensors(B, H, N, N, D, dtype)
    results = {}
    for backend in ("cuda", "triton"):
        args = [t.detach().clone().requires_grad_(True) for t in (q, k, v, w, c, gamma, beta)]
        torch.manual_seed(7)  # the same dropout seed, and Philox stream, for both
        out = reattn.re_attention(*args[:5], norm="layer", norm_weight=args[5], norm_bias=args[6], dropout_p=0.1,
                                  training=True, backend=backend)
        out.backward(grad)
        results[backend] = [out.detach()] + [a.grad for a in args]
    for got, expected in zip(results["cuda"], results["triton"]):
        # bf16: each backend rounds every output once (half a unit, 2^-9 relative) after products whose bf16
        # operands err by as much again: a few units of the tensor's largest entry apart (a fixed 0.02 failed
        # on an H200 at outputs of order 10, 0.7% of the entries one or two units apart). fp32: the order
        # of the sums only.
        scale = expected.float().abs().max().item()
        tol = dict(rtol=0.0, atol=8 * 2.0 ** -8 * scale) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.float(), expected.float(), **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
def test_deterministic_algorithms_get_the_tensor_core_backward_or_an_alert():
    # bf16: the tensor-core backward, bitwise reproducible (no atomics); fp32 runs the CUDA-core
    # programs, whose atomics torch's determinism check reports (an error unless warn_only).
    B, H, N, D = 2, 6, 33, 32
    q, k, v, w, c, _, _, grad = tensors(B, H, N, N, D, torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, stats = _C.cuda_forward(q, k, v, w, c, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5, 0.0)
        runs = [_C.cuda_backward(grad, q, k, v, w, c, None, None, None, None, None, stats, 0.3, 1.0, "none", 1e-5, 0.0,
                                 False) for _ in range(2)]
        for a, b_ in zip(*runs):
            assert torch.equal(a, b_)
        q32, k32, v32, g32 = (t.float() for t in (q, k, v, grad))
        _, stats32 = _C.cuda_forward(q32, k32, v32, w, c, None, None, None, None, None, None, 0.3, 1.0, "none", 1e-5, 0.0)
        with pytest.raises(RuntimeError, match="deterministic"):
            _C.cuda_backward(g32, q32, k32, v32, w, c, None, None, None, None, None, stats32, 0.3, 1.0, "none", 1e-5,
                             0.0, False)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (not counted as coverage on CPU CI)")
def test_forward_and_backward_capture_in_a_cuda_graph():
    # No host synchronization or host allocation inside the ops: a CUDA graph replays them.
    q, k, v, w, c, gamma, beta, grad = tensors(2, 6, 33, 33, 64, torch.bfloat16)
    seed = torch.tensor([5], device=DEVICE)

    def step():
        out, lse = _C.cuda_forward(q, k, v, w, c, gamma, beta, None, None, seed, None, 0.125, 1.0, "layer", 1e-5,
                                   0.1)
        return [out] + _C.cuda_backward(grad, q, k, v, w, c, gamma, beta, None, None, seed, lse, 0.125, 1.0,
                                        "layer", 1e-5, 0.1, False)[:5]

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (kernel attributes, allocator pools)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    # bf16 runs the tensor-core forward and backward: no atomics, bitwise equal.
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_pattern_is_tritons_philox():
    # Zero queries give uniform P; with V = I (head dim = Nk) the output is A itself, zero where dropped.
    B, H, Nq, Nk = 2, 3, 5, 16
    q = torch.zeros(B, H, Nq, Nk, dtype=torch.float64, device=DEVICE)
    eye = torch.eye(Nk, dtype=torch.float64, device=DEVICE).expand(B, H, Nk, Nk).contiguous()
    w = torch.eye(H, dtype=torch.float64, device=DEVICE)
    seed = torch.tensor([987654321012], device=DEVICE)
    out, _ = _C.cuda_forward(q, eye, eye, w, None, None, None, None, None, seed, None, 1.0, 1.0, "none", 1e-5, 0.3)
    kept = out != 0
    assert 0.5 < kept.double().mean() < 0.9
    torch.testing.assert_close(kept, dropout_keep_mask(seed, (B, H, Nq, Nk), 0.3))


# ---- one-sweep training BatchNorm's element-wise steps (csrc/cuda/head_affine.cuh) ----------------------------
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_of(B, H, N, D, dtype, layout, g):
    """[B, H, N, D] with unit stride along D, rows as `layout` says. HeadAffineParams::vector takes items of one
    16-byte access (8 columns of a 16-bit dtype, 4 of fp32) where D is a multiple of the item and every row starts
    16-byte aligned, else one column; a block's threads keep their columns where a pass covers whole rows (at most
    128 items per row, or 256 a multiple of them), else each item finds its row by a division. "D = 35": one
    column, 7 rows a pass on 245 threads; "D = 36": fp32 items (16-bit: one column); "D = 40": items for every
    dtype but fp64, 5 or 10 per row; "D = 64": items, every thread; "D = 64, rows one element off" (a view one
    element into wider rows: the host must pick one column per item, or the emulator's alignment check refuses the
    16-byte loads): one column, every thread; "D = 130": one column, division. "rows D apart" (contiguous): where
    U is one staged row, a 16-bit dtype's flat walk at D = 35 (groups of 8 elements across rows, lead and tail
    elements at each block's ends), the items at D = 64; "heads 3 elements apart": rows D apart but the heads' spans
    misaligned against the output's, so the blocks of head 0 walk flat and the others take the items."""
    if "rows D apart" in layout:
        return torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    if "heads 3" in layout:
        spans = torch.randn(B, H, N * D + 3, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
        return spans[..., :N * D].unflatten(2, (N, D))
    if "off" not in layout:
        return torch.randn(B, N, H, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE).transpose(1, 2)
    wide = torch.randn(B, H, N, D + 8, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return wide[..., 1:D + 1]


HEAD_LAYOUTS = {"D = 35": 35, "D = 36": 36, "D = 40": 40, "D = 64": 64, "D = 64, rows one element off": 64,
                "D = 130": 130, "D = 35, rows D apart": 35, "D = 64, rows D apart": 64,
                "D = 35, heads 3 elements apart": 35}


def _two_blocks(D: int) -> int:
    """A length Nq that head_affine and head_dot_sums split into two blocks along Nq at head dim D."""
    Nq = 16384 // D + 40
    assert -(-Nq // _C.cuda_head_rows(Nq, D)) == 2
    return Nq


def test_head_rows_split_the_queries_evenly():
    """About 16384 elements a block (the prologue of each warp amortized over 8 vector items a thread), the rows
    split evenly (blocks differ by at most one row), at most 65535 blocks along Nq (grid.y)."""
    for nq, d in ((197, 64), (197, 32), (577, 35), (1, 64), (4096, 128), (300, 64), (100000, 1), (10 ** 7, 128)):
        rows = _C.cuda_head_rows(nq, d)
        blocks = -(-nq // rows)
        assert 1 <= rows <= nq and blocks <= 65535, (nq, d, rows)
        assert blocks * rows - nq < blocks, (nq, d, rows)  # the last block is at most one row short per block
        if nq * d <= 65535 * 16384:
            assert rows * d <= 16384 or rows == 1, (nq, d, rows)
            assert blocks == -(-nq // max(1, 16384 // d)), (nq, d, rows)
    assert _C.cuda_head_rows(197, 64) == 197 and _C.cuda_head_rows(577, 35) == 289


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("u_shape", ["per-batch-head", "per-row", "mask [1, 1, Nq]"])
@pytest.mark.parametrize("r_in", ["accumulation dtype", "dtype"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_affine_matches_float64(layout, u_shape, r_in, dtype):
    """out = alpha_h R' + beta_h U, one fused multiply-add per element in the accumulation dtype and one rounding to
    dtype, R' given in the accumulation dtype or in dtype (the kept X V: upcast once loaded); one column or one
    16-byte access per thread item (see _rows_of), more rows than one block holds (two blocks along Nq: see
    _two_blocks), r not contiguous, poisoned outputs; bitwise the same with the items in reverse order. U one row
    per (batch element, head) is loaded once per thread, the others with every item."""
    D = HEAD_LAYOUTS[layout]
    B, H, Nq = 2, 3, _two_blocks(D)
    acc = _acc(dtype)
    g = torch.Generator().manual_seed(0)
    r = _rows_of(B, H, Nq, D, acc if r_in == "accumulation dtype" else dtype, layout, g)
    u = {"per-batch-head": torch.randn(B, H, 1, D, generator=g, dtype=acc),
         "per-row": torch.randn(B, H, Nq, D, generator=g, dtype=acc),
         "mask [1, 1, Nq]": torch.randn(1, 1, Nq, D, generator=g, dtype=acc)}[u_shape].to(DEVICE)
    coefficients = torch.randn(2, H, generator=g, dtype=acc).to(DEVICE)
    out = _C.cuda_head_affine(r, u, coefficients, dtype, poison_outputs=True)
    eps = torch.finfo(acc).eps
    a, b = coefficients[0][None, :, None, None].double(), coefficients[1][None, :, None, None].double()
    want = r.double() * a + u.double() * b
    assert out.dtype == dtype and out.shape == (B, H, Nq, D) and out.is_contiguous()
    # the FMA's and the product's roundings (2 eps of the terms; r in dtype converts exactly), then one rounding
    # to dtype: half an ulp, relative in dtype's normal range, absolute (half the subnormal spacing) below it
    bound = 2 * eps * (r.double().abs() * a.abs() + u.double().abs() * b.abs())
    if dtype != acc:
        info = torch.finfo(dtype)
        bound = bound + (want.abs() + info.smallest_normal) * info.eps / 2
    assert ((out.double() - want).abs() <= bound).all(), u_shape
    assert torch.equal(_C.cuda_head_affine(r, u, coefficients, dtype, reverse_items=True, poison_outputs=True), out)


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("r_in", ["accumulation dtype", "dtype"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_affine_adds_the_parts_of_u_and_keeps_their_sum(layout, r_in, dtype):
    """With u_sum, u is U in parts [B, H, parts, D] (the forward programs' shares over their row blocks; here a
    strided slice of a larger buffer): the launch adds them in order, applies U to every row (two blocks along Nq)
    and writes U to u_sum once (the blocks of row 0). Multiples of 2^-8 below 2^4 add exactly in any order, so
    u_sum equals the float64 sum and out equals the launch given that sum, bitwise, in any warp order."""
    D = HEAD_LAYOUTS[layout]
    B, H, Nq, parts = 2, 3, _two_blocks(D), 7
    acc = _acc(dtype)
    g = torch.Generator().manual_seed(12)
    r = _rows_of(B, H, Nq, D, acc if r_in == "accumulation dtype" else dtype, layout, g)
    whole = torch.randint(-2 ** 12, 2 ** 12, (B, H, 2 * parts, D + 8), generator=g).to(acc) / 256
    u = whole[:, :, ::2, 4:D + 4].to(DEVICE)
    coefficients = torch.randn(2, H, generator=g, dtype=acc).to(DEVICE)
    u_sum = torch.full((B, H, 1, D), float("nan"), dtype=acc, device=DEVICE)
    out = _C.cuda_head_affine(r, u, coefficients, dtype, u_sum=u_sum, poison_outputs=True)
    summed = u.double().sum(dim=2, keepdim=True)
    assert torch.equal(u_sum.double(), summed)
    assert torch.equal(out, _C.cuda_head_affine(r, summed.to(acc), coefficients, dtype))
    for options in (dict(reverse_items=True), dict(shuffle_seed=6)):
        again = torch.full_like(u_sum, float("nan"))
        assert torch.equal(_C.cuda_head_affine(r, u, coefficients, dtype, u_sum=again, poison_outputs=True, **options),
                           out), options
        assert torch.equal(again, u_sum), options


def test_head_affine_checks_the_parts_of_u():
    r = torch.zeros(1, 2, 3, 4, device=DEVICE)
    c = torch.zeros(2, 2, device=DEVICE)
    parts = torch.zeros(1, 2, 5, 4, device=DEVICE)
    u_sum = torch.zeros(1, 2, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"with u_sum, u must be U in parts \[B, H, parts, D\] = \[1, 2, parts, 4\], "
                                         r"got \[1, 1, 5, 4\]"):
        _C.cuda_head_affine(r, parts[:, :1], c, torch.float32, u_sum=u_sum)
    with pytest.raises(ValueError, match=r"u_sum must be a contiguous \[B, H, 1, D\] = \[1, 2, 1, 4\] Float tensor"):
        _C.cuda_head_affine(r, parts, c, torch.float32, u_sum=u_sum[:, :, :, :2])
    with pytest.raises(ValueError, match="u_sum must be a contiguous"):
        _C.cuda_head_affine(r, parts, c, torch.float32, u_sum=u_sum.double())
    with pytest.raises(TypeError, match="u must be Float, got Double"):
        _C.cuda_head_affine(r, parts.double(), c, torch.float32, u_sum=u_sum)
    with pytest.raises(ValueError, match="u needs a unit stride over the head dim"):
        _C.cuda_head_affine(r, parts.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :4], c, torch.float32,
                            u_sum=u_sum)


def _bn_statistics(H, gen, mix_weight, mix_bias, n_keys):
    """[3, H] float64 statistics (mean of M, biased variance, count) whose mean(X) = mean - center - c is in
    [0.2, 0.5] (not 0: the kept terms' second coefficient is exercised) and variance in [0.5, 1.5]. On the device of
    mix_weight; gen is a CPU generator (its draws are moved there)."""
    device = mix_weight.device
    center = mix_weight.double().sum(dim=1) / n_keys
    mean_x = (0.2 + 0.3 * torch.rand(H, generator=gen, dtype=torch.float64)).to(device)
    mean = center + (0 if mix_bias is None else mix_bias.double()) + mean_x
    var = (torch.rand(H, generator=gen, dtype=torch.float64) + 0.5).to(device)
    return torch.stack([mean, var, torch.full((H,), 1000.0, dtype=torch.float64, device=device)])


@pytest.mark.parametrize("layout", list(HEAD_LAYOUTS))
@pytest.mark.parametrize("u_rows", ["one", "every row"])
@pytest.mark.parametrize("params", ["fp32 W and c", "bf16 W, transposed, no c"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dot_sums_match_float64_in_any_warp_order(layout, u_rows, params, dtype):
    """[2, H] = per head scale (sum dO . R, sum dO . U), R = xhat V = rstd X V + (-mean(X) rstd) U formed from the
    kept X V and U (rstd and mean(X) from the statistics and the mixing parameters in any dtype and strides,
    reattn._batchnorm.kept_term_coefficients). The rounding: each thread's sum of about rows * D / 256 products
    (fixed columns: ceil(rows / step) items of kVec columns) in the accumulation dtype, 5 shuffle levels, the
    block's 8 warps, the float64 combination rounded once to the accumulation dtype, then float64 over blocks: at
    most (rows * D / 32 + 15) eps of the combination of the sums of |terms| (a loose bound: 8 times a thread's
    terms). The block's sum is bitwise the same in any warp order."""
    from reattn._batchnorm import kept_term_coefficients

    D = HEAD_LAYOUTS[layout]
    B, H, Nq = 2, 3, _two_blocks(D) + 10
    n_keys, eps_norm = 97, 1e-5
    gen = torch.Generator().manual_seed(2)
    grad = _rows_of(B, H, Nq, D, dtype, layout, gen)
    r = torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    u = torch.randn(B, H, 1 if u_rows == "one" else Nq, D, generator=gen, dtype=torch.float64)
    u = u.to(_acc(dtype)).to(DEVICE)
    if params == "fp32 W and c":
        w, c = torch.randn(H, H, generator=gen).to(DEVICE), torch.randn(H, generator=gen).to(DEVICE)
    else:
        w, c = torch.randn(H, H, generator=gen).bfloat16().t().to(DEVICE), None
    stats = _bn_statistics(H, gen, w, c, n_keys).to(DEVICE)
    scale = -0.7
    got = _C.cuda_head_dot_sums(grad, r, u, stats, w, c, eps_norm, n_keys, scale, poison_outputs=True)
    rstd, shift = (t[None, :, None, None] for t in kept_term_coefficients(stats, w, c, eps_norm, n_keys))
    assert shift.abs().min() > 0.05  # the second term counts
    g64 = grad.double() * scale
    terms = (g64 * (rstd * r.double() + shift * u.double()), g64 * u.double())
    want = torch.stack([t.sum(dim=(0, 2, 3)) for t in terms])
    size = torch.stack([(g64 * (rstd * r.double()).abs()).abs().sum(dim=(0, 2, 3)) +
                        (g64 * (shift * u.double()).abs()).abs().sum(dim=(0, 2, 3)),
                        (g64 * u.double()).abs().sum(dim=(0, 2, 3))])
    assert got.dtype == torch.float64 and got.shape == (2, H)
    rows = _C.cuda_head_rows(Nq, D)
    assert rows < Nq
    eps = torch.finfo(_acc(dtype)).eps
    assert ((got - want).abs() <= (rows * D / 32 + 15) * eps * size).all(), (got, want)
    for options in (dict(reverse_items=True), dict(shuffle_seed=7)):
        again = _C.cuda_head_dot_sums(grad, r, u, stats, w, c, eps_norm, n_keys, scale, poison_outputs=True, **options)
        assert torch.equal(again, got), options


def test_head_affine_and_dot_sums_check_their_arguments():
    r = torch.zeros(1, 2, 3, 4, device=DEVICE)
    c = torch.zeros(2, 2, device=DEVICE)
    stats, w = torch.ones(3, 2, dtype=torch.float64, device=DEVICE), torch.ones(2, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"coefficients must be a contiguous \[2, H\] = \[2, 2\]"):
        _C.cuda_head_affine(r, r, c[:1], torch.bfloat16)
    with pytest.raises(TypeError, match="r must be BFloat16 or Float .its accumulation type., got Double"):
        _C.cuda_head_affine(r.double(), r, c, torch.bfloat16)
    with pytest.raises(ValueError, match=r"u \[1, 2, 2, 4\] does not broadcast to \[1, 2, 3, 4\]"):
        _C.cuda_head_affine(r, r[:, :, :2], c, torch.float32)
    with pytest.raises(ValueError, match=r"u \[1, 2, 3, 1\] does not broadcast to \[1, 2, 3, 4\] \(over B, H"):
        _C.cuda_head_affine(r, r[..., :1], c, torch.float32)
    with pytest.raises(ValueError, match="r needs a unit stride over the head dim"):
        _C.cuda_head_affine(r.transpose(2, 3).contiguous().transpose(2, 3), r, c, torch.float32)
    with pytest.raises(ValueError, match="grad needs a unit stride over the head dim"):
        _C.cuda_head_dot_sums(r.transpose(2, 3).contiguous().transpose(2, 3), r, r, stats, w, None, 1e-5, 3)
    with pytest.raises(TypeError, match="u must be Float"):
        _C.cuda_head_affine(r, r.double(), c, torch.float32)
    with pytest.raises(TypeError, match="cuda_head_affine: dtype must be float16, bfloat16, float32 or float64"):
        _C.cuda_head_affine(r, r, c, torch.int32)
    with pytest.raises(TypeError, match="cuda_head_dot_sums: grad must be float16, bfloat16, float32 or float64"):
        _C.cuda_head_dot_sums(r.int(), r.int(), r, stats, w, None, 1e-5, 3)
    with pytest.raises(ValueError, match="r must be .B, H, Nq, D."):
        _C.cuda_head_affine(r[0], r, c, torch.float32)
    with pytest.raises(ValueError, match="r must have grad's shape"):
        _C.cuda_head_dot_sums(r, r[:, :1], r, stats, w, None, 1e-5, 3)
    with pytest.raises(TypeError, match="r is BFloat16 but grad is Float"):
        _C.cuda_head_dot_sums(r, r.bfloat16(), r, stats, w, None, 1e-5, 3)
    with pytest.raises(ValueError, match=r"stats must be a contiguous float64 \[3, H\] = \[3, 2\]"):
        _C.cuda_head_dot_sums(r, r, r, stats.float(), w, None, 1e-5, 3)
    with pytest.raises(ValueError, match=r"mix_weight must have shape \[2, 2\]"):
        _C.cuda_head_dot_sums(r, r, r, stats, w[:1], None, 1e-5, 3)
    with pytest.raises(ValueError, match="n_keys must be a positive int32, got 0"):
        _C.cuda_head_dot_sums(r, r, r, stats, w, None, 1e-5, 0)
    wide = torch.zeros(1, 33, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"H must be at most 32 \(a lane per head\), got 33"):
        _C.cuda_head_dot_sums(wide, wide, wide, torch.ones(3, 33, dtype=torch.float64, device=DEVICE),
                              torch.ones(33, 33, device=DEVICE), None, 1e-5, 3)
    assert _C.cuda_head_affine(r[:0], r[:0], c, torch.bfloat16).shape == (0, 2, 3, 4)
    assert not _C.cuda_head_dot_sums(r[:0], r[:0], r[:0], stats, w, None, 1e-5, 3).any()
