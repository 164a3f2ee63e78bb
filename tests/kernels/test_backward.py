"""Fused Triton backward of Re-attention (reattn.kernels.backward) against float64 autograd of the reference.

The kernels run in Triton's interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET), so
shapes are small. Training BatchNorm (the backward-sums sweep and the e, f rows) and gradcheck run
through the backend in tests/backends/test_conformance.py; here: every gradient of the two
kernels directly, their tiles (head-dim chunks, row groups per program) and the sums sweep.
"""
import pytest
import torch

from reattn.kernels.backward import _reduce_parts, re_attention_backward, re_attention_bn_grad_sums
from reattn.kernels.dropout import dropout_keep_mask
from reattn.kernels.forward import re_attention_forward
from reattn.kernels.launch import TileConfig, backward_config, splits_backward_heads
from reattn.reference import re_attention_ref
from tests._tolerance import reduction_length, rounding_bound, within_twice_eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "mix_weight", "mix_bias", "norm_weight", "norm_bias")


def problem(B, H, Nq, Nk, D, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s + shift).to(DEVICE).requires_grad_(True)

    return dict(q=rnd(B, H, Nq, D), k=rnd(B, H, Nk, D), v=rnd(B, H, Nk, D),
                mix_weight=rnd(H, H, s=H ** -0.5) + torch.eye(H, dtype=torch.float64, device=DEVICE),
                mix_bias=rnd(H, s=0.1), norm_weight=rnd(H, s=0.2, shift=1.0), norm_bias=rnd(H, s=0.2))


def masks(B, H, Nq, Nk, seed=2):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.35
    keep[0, 0, 1] = False  # a query row with every key masked
    additive = torch.randn(B, H, Nq, Nk, generator=g, dtype=torch.float64)
    additive[torch.rand(B, H, Nq, Nk, generator=g) > 0.7] = float("-inf")
    return {"bool": keep.to(DEVICE), "float per head": additive.to(DEVICE)}


def gradients(t, norm, *, out_scale=0.7, attn_mask=None, dropout_p=0.0, seed=None, dq_config=None, dkdv_config=None,
              bias=True, affine=True):
    """(kernel gradients, float64 autograd of the reference) for one random cotangent; the gradients of parameters
    the call does not take (no mix bias, no LayerNorm or one without ``affine`` weights) must come back None."""
    D = t["q"].shape[-1]
    affine = affine and norm == "layer"
    kw = dict(scale=D ** -0.5, out_scale=out_scale, norm=norm, norm_weight=t["norm_weight"] if affine else None,
              norm_bias=t["norm_bias"] if affine else None, attn_mask=attn_mask)
    c = t["mix_bias"] if bias else None
    keep = None
    if dropout_p:
        keep = dropout_keep_mask(seed, (t["q"].shape[0], t["q"].shape[1], t["q"].shape[2], t["k"].shape[2]),
                                 dropout_p)
    ref = re_attention_ref(t["q"], t["k"], t["v"], t["mix_weight"], c, training=bool(dropout_p),
                           dropout_p=dropout_p, dropout_mask=keep, **kw)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    names = [n for n in NAMES if (n != "mix_bias" or bias) and (not n.startswith("norm") or affine)]
    expected = dict(zip(names, torch.autograd.grad(ref, [t[n] for n in names], grad)))
    with torch.no_grad():
        fkw = dict(kw, dropout_p=dropout_p, seed=seed)
        _, stats = re_attention_forward(t["q"], t["k"], t["v"], t["mix_weight"], c, **fkw)
        got = re_attention_backward(grad, t["q"], t["k"], t["v"], t["mix_weight"], c, stats, dq_config=dq_config,
                                    dkdv_config=dkdv_config, **fkw)
    unexpected = [n for n, g in zip(NAMES, got) if n not in names and g is not None]
    assert not unexpected, unexpected
    got = {n: g for n, g in zip(NAMES, got) if n in names}
    assert set(got) == set(expected) and all(g is not None for g in got.values())
    return got, expected


def assert_close(got, expected, rtol=1e-11, amplification=1.0):
    """Each gradient within rtol of its own size, or of the largest gradient where it is a sum that
    cancels: a LayerNorm over one head has xhat = 0 exactly, reached by the reference up to its
    round-off times 1/std, at most 1/sqrt(eps) (``amplification``), so its parameter gradients
    are 0 within that much of the largest one."""
    largest = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        scale = expected[name].abs().max().item()
        err = (got[name].double() - expected[name]).abs().max().item()
        assert err <= rtol * scale + 1e-14 * amplification * largest, (name, err, scale)


@pytest.mark.parametrize("B,H,Nq,Nk,D,norm,bias", [
    (2, 6, 33, 33, 33, "none", True),
    (2, 6, 33, 20, 16, "layer", True),
    (2, 12, 17, 21, 32, "none", False),
    (2, 12, 17, 21, 32, "layer", True),
    (1, 3, 9, 40, 16, "none", True),    # G = 2 row groups per program (HP = 8)
    (2, 17, 9, 13, 16, "layer", True),  # HP = 32
    (2, 1, 1, 1, 35, "layer", True),    # N = 1, one head
    (1, 16, 5, 7, 64, "none", True),    # no padding slot: the bias's gradient by its own sum
    # LayerNorm's dM without its mean over the heads (``_norm_backward``), dW and dc centered at the end: over
    # each of G = 2 row groups, in the bias slot's column, by the bias's own sum, and with no bias
    (1, 3, 9, 40, 16, "layer", True),
    (1, 16, 5, 7, 64, "layer", True),
    (2, 8, 9, 13, 32, "layer", False),
])
def test_every_gradient_matches_float64(B, H, Nq, Nk, D, norm, bias):
    got, expected = gradients(problem(B, H, Nq, Nk, D), norm, bias=bias)
    assert_close(got, expected, amplification=1e-5 ** -0.5 if (H, norm) == (1, "layer") else 1.0)


@pytest.mark.parametrize("mask_name", ["bool", "float per head"])
@pytest.mark.parametrize("norm", ["none", "layer"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_masks_and_dropout(mask_name, norm, dropout_p):
    B, H, Nq, Nk, D = 2, 6, 21, 19, 16
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE) if dropout_p else None
    got, expected = gradients(problem(B, H, Nq, Nk, D, seed=1), norm, attn_mask=masks(B, H, Nq, Nk)[mask_name],
                              dropout_p=dropout_p, seed=seed)
    assert_close(got, expected)


@pytest.mark.parametrize("dq,dkdv", [
    (TileConfig(HP=8, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1),
     TileConfig(HP=8, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1)),
    (TileConfig(HP=16, G=2, BLOCK_M=16, BLOCK_N=32, BLOCK_D=64, STATS_BLOCK_N=16, num_warps=4, num_stages=1),
     TileConfig(HP=16, G=2, BLOCK_M=32, BLOCK_N=16, BLOCK_D=32, STATS_BLOCK_N=16, num_warps=4, num_stages=1)),
], ids=["head-dim-chunks", "two-row-groups"])
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_tiles_do_not_change_the_gradients(dq, dkdv, norm):
    """Head-dim chunks (each program writes its columns of dQ / dK, dV and recomputes the scores over
    every chunk; the parameter sums come from the first chunk) and several row groups per program
    give the same gradients, with a mask."""
    B, H, Nq, Nk, D = 2, 6, 21, 19, 35
    got, expected = gradients(problem(B, H, Nq, Nk, D, seed=3), norm, attn_mask=masks(B, H, Nq, Nk)["bool"],
                              dq_config=dq, dkdv_config=dkdv)
    assert_close(got, expected)


@pytest.mark.parametrize("given", ["dq_config", "dkdv_config"])
def test_layer_norm_gradients_when_one_sweep_alone_splits(monkeypatch, given):
    """LayerNorm's dgamma (without a mask or dropout) is summed by the usual dQ sweep or by the split dK/dV sweep
    (dbeta by the dK/dV sweep either way); the launch rule splits both sweeps or neither. Given usual tiles to one
    of them at 12 heads: with the usual dQ sweep both sum dgamma (the dQ sweep's is taken); with the usual dK/dV
    sweep neither does, and a sums-only dQ sweep runs for it. Every gradient still matches float64."""
    from reattn.kernels import backward as bwd_module
    B, H, N, D = 2, 12, 17, 32
    assert splits_backward_heads(H, D, norm="layer", masked=False, has_dropout=False, element_size=8, kernel="dq",
                                 interpret=True)
    usual = TileConfig(HP=16, G=1, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1)
    seen = _split_spy(monkeypatch)
    sums_only = []
    real = bwd_module._launch_dq

    def launch_dq(*args, **kwargs):
        sums_only.append(kwargs["sums_only"])
        return real(*args, **kwargs)

    monkeypatch.setattr(bwd_module, "_launch_dq", launch_dq)
    got, expected = gradients(problem(B, H, N, N, D, seed=4), "layer", **{given: usual})
    assert_close(got, expected)
    if given == "dq_config":
        assert [(k, s) for k, s, _, _ in seen] == [("dq", False), ("dkdv", True)] and sums_only == [False]
    else:
        assert [(k, s) for k, s, _, _ in seen] == [("dq", True), ("dkdv", False), ("dq", False)]
        assert sums_only == [False, True]


def test_layer_norm_without_weights_sums_no_dgamma(monkeypatch):
    """LayerNorm without its affine weights (``elementwise_affine=False``): no dgamma is returned, so the dQ sweep
    sums none (DQ_DGAMMA off, no sums tensor; with a weight it does: ``_sums_dgamma_in_dq``) and the dK/dV sweep
    none either; every gradient still matches float64, the norm's come back as None."""
    from reattn.kernels import backward as bwd_module
    flags = []
    real = bwd_module.run_on_device

    def spy(kernel, grid, device, *args, **kwargs):
        if "DQ_DGAMMA" in kwargs:
            flags.append((getattr(kernel, "fn", kernel).__name__, kwargs["DQ_DGAMMA"]))
        return real(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(bwd_module, "run_on_device", spy)
    got, expected = gradients(problem(2, 6, 13, 11, 16, seed=6), "layer", affine=False)
    assert_close(got, expected)
    assert flags == [("_re_attention_bwd_dq_kernel", False), ("_re_attention_bwd_dkdv_kernel", True)]


def test_dkdv_key_blocks_differ_from_query_blocks():
    """The dK/dV kernel's programs cover G * BLOCK_N keys each (its query blocks are BLOCK_M rows): a launch whose
    key block is smaller than its query block must still cover every key (45 keys: three programs of 16)."""
    dkdv = TileConfig(HP=8, G=1, BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1)
    got, expected = gradients(problem(1, 6, 9, 45, 16, seed=3), "none", dkdv_config=dkdv)
    assert_close(got, expected)


@pytest.mark.parametrize("which", ["dq_config", "dkdv_config"])
def test_a_config_with_too_few_slots_is_refused(which):
    small = TileConfig(HP=8, G=2, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="cannot hold 6 heads"):
        gradients(problem(1, 6, 9, 9, 16, seed=3), "none", **{which: small})


def test_batchnorm_sums_sweep_matches_float64():
    """sum dN xhat and sum dN per head (dN = out_scale dO V^T on unmasked entries, xhat normalized
    with the given statistics), what training BatchNorm's backward needs first."""
    B, H, Nq, Nk, D = 2, 6, 13, 17, 16
    t = problem(B, H, Nq, Nk, D, seed=4)
    mask = masks(B, H, Nq, Nk)["bool"]
    q, k, v, w, c = (t[n].detach() for n in ("q", "k", "v", "mix_weight", "mix_bias"))
    grad = torch.randn(B, H, Nq, D, dtype=torch.float64, device=DEVICE)
    scale, tau = D ** -0.5, 0.7
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    m = torch.einsum("gh,bhij->bgij", w, p) + c[None, :, None, None]
    mean = torch.randn(H, dtype=torch.float64, device=DEVICE) * 0.01
    rstd = torch.rand(H, dtype=torch.float64, device=DEVICE) + 1.0
    xhat = ((m - mean[None, :, None, None]) * rstd[None, :, None, None]).masked_fill(~mask, 0.0)
    dn = (tau * grad @ v.transpose(-1, -2)).masked_fill(~mask, 0.0)
    truth = torch.stack([(dn * xhat).sum((0, 2, 3)), dn.sum((0, 2, 3))])
    _, stats = re_attention_forward(q, k, v, w, c, scale=scale, attn_mask=mask)
    sums = re_attention_bn_grad_sums(grad, q, k, v, w, c, stats, scale=scale, out_scale=tau,
                                         batch_stats=torch.stack([mean, rstd]), attn_mask=mask)
    torch.testing.assert_close(sums, truth, rtol=1e-11, atol=1e-11 * truth.abs().max().item())


def test_launch_rule_keeps_the_accumulators_in_registers():
    """dQ needs two accumulators (X and Y), dK/dV two over the key block: the rule keeps each
    kernel's accumulators at 64 registers per thread with 8 warps, splitting the head dim if needed."""
    for h in (1, 6, 12, 16, 32):
        for d in (1, 16, 33, 64, 128):
            dq = backward_config(197, 197, d, h, interpret=False, kernel="dq")
            dkdv = backward_config(197, 197, d, h, interpret=False, kernel="dkdv")
            assert 2 * dq.HP * dq.BLOCK_M * dq.BLOCK_D <= 64 * 32 * dq.num_warps
            assert 2 * dkdv.HP * dkdv.BLOCK_N * dkdv.BLOCK_D <= 64 * 32 * dkdv.num_warps


@pytest.mark.parametrize("hp,g,h,bias_slot", [(8, 1, 6, True), (8, 1, 8, False), (8, 2, 3, True), (8, 2, 4, False),
                                              (8, 8, 1, False), (8, 4, 1, True), (16, 1, 12, True), (32, 1, 17, False)])
def test_parameter_gradients_from_the_programs_parts(hp, g, h, bias_slot):
    """_reduce_parts against slicing the float64 sum block by block: dW sums the G diagonal blocks of
    dW_slots, dc is the bias slot's column (or its own per-slot sums), dgamma and dbeta the per-slot
    sums, each added over the G row groups; four separate tensors in the parts' dtype."""
    parts = torch.randn(5, hp * hp + 3 * hp, dtype=torch.float32, generator=torch.Generator().manual_seed(hp + g + h))
    cfg = TileConfig(HP=hp, G=g, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, STATS_BLOCK_N=16, num_warps=4, num_stages=1)
    got = _reduce_parts(parts, h, cfg, bias_slot)
    total = parts.double().sum(dim=0)
    slots = total[:hp * hp].reshape(hp, hp)
    blocks = range(g)
    dw = sum(slots[r * h:(r + 1) * h, r * h:(r + 1) * h] for r in blocks)
    if bias_slot:
        dc = sum(slots[r * h:(r + 1) * h, g * h] for r in blocks)
    else:
        dc = sum(total[hp * hp + 2 * hp + r * h:hp * hp + 2 * hp + (r + 1) * h] for r in blocks)
    dnw = sum(total[hp * hp + r * h:hp * hp + (r + 1) * h] for r in blocks)
    dnb = sum(total[hp * hp + hp + r * h:hp * hp + hp + (r + 1) * h] for r in blocks)
    for x, ref in zip(got, (dw, dc, dnw, dnb)):
        assert x.dtype == torch.float32 and x.shape == ref.shape
        # float64 sums of 5 fp32 values in another order, then one rounding to fp32: within one fp32 ulp
        torch.testing.assert_close(x, ref.float(), rtol=2 ** -23, atol=1e-12)
    assert len({x.data_ptr() for x in got}) == 4
    # A gradient the call does not return is not formed (no launch for it); dW always is.
    only_dw = _reduce_parts(parts, h, cfg, bias_slot, dc=False, dgamma=False, dbeta=False)
    assert only_dw[1:] == (None, None, None)
    torch.testing.assert_close(only_dw[0], got[0], rtol=0, atol=0)


# ---- 12 heads without padding slots (backward._split_dq_sweep, backward._split_dkdv_sweep) ----

def _split_spy(monkeypatch):
    """Record (kernel, SPLIT_HEADS, D_TAIL, head-dim programs) of every backward launch (the launches still run)."""
    from reattn.kernels import backward as bwd_module
    seen = []
    real = bwd_module.run_on_device

    def spy(kernel, grid, device, *args, **kwargs):
        if "SPLIT_HEADS" in kwargs:
            name = getattr(kernel, "fn", kernel).__name__.replace("_re_attention_bwd_", "").replace("_kernel", "")
            seen.append((name, kwargs["SPLIT_HEADS"], kwargs["D_TAIL"], grid[1]))
        return real(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(bwd_module, "run_on_device", spy)
    return seen


@pytest.mark.parametrize("B,H,Nq,Nk,D,bias", [
    (2, 12, 33, 40, 35, True),   # rows and keys past a block; D padded to 48 = 32 + 16 (two head-dim tiles)
    (1, 12, 17, 16, 64, False),  # whole key blocks, no mixing bias
    (1, 12, 20, 33, 48, True),   # 48 columns as they are
    (2, 12, 1, 1, 64, True),     # N = 1 (dK = 0: one key takes the whole softmax)
])
def test_split_heads_gradients_match_float64(monkeypatch, B, H, Nq, Nk, D, bias):
    """12 heads, no norm, mask or dropout: both kernels run heads 0-7 and 8-11 as two products, one
    program over the whole head dim (the dQ kernel's two sweeps X += (P dP) K, then X -= (delta P) K; the
    dK/dV kernel's dV sweep and dK sweep with the sums of dW and dc). Every gradient against float64
    autograd of the reference, with a head-dim tail where the padded head dim is 48."""
    seen = _split_spy(monkeypatch)
    got, expected = gradients(problem(B, H, Nq, Nk, D, seed=6), "none", bias=bias)
    assert_close(got, expected)
    tail = 16 if D in (35, 48) else 0
    assert seen == [("dq", True, tail, 1), ("dkdv", True, tail, 1)]


@pytest.mark.parametrize("B,Nq,Nk,D", [
    (2, 33, 40, 35),  # rows and keys past a block (outside the batch statistics); D padded to 48 = 32 + 16
    (1, 16, 17, 64),  # whole query blocks, a key past a block
    (2, 17, 20, 32),  # D = 32: the split dQ sweep, the usual dK/dV one (launch.splits_backward_heads)
    (2, 1, 1, 64),    # N = 1: every entry of a head is one map value per batch element
])
def test_split_heads_with_training_batchnorm_match_float64(monkeypatch, B, Nq, Nk, D):
    """12 heads with training BatchNorm: the split kernels take dM = a dN + e xhat + f as a per-head affine map of
    dO V^T and of the recomputed W P (``backward._split_batch_norm_grad``) and A's mixing folded as the forward's;
    the output, running statistics and every gradient against the float64 eager path, d mix_bias (exactly 0: the
    batch statistics remove a per-head constant) within the rounding of the terms it sums."""
    from tests._tolerance import mix_bias_term_size
    from tests.backends._contract import assert_same, problem as contract_problem, run_both

    seen = _split_spy(monkeypatch)
    tensors, stats = contract_problem(B, 12, Nq, Nk, D, seed=4)
    out, ref, stats_t, stats_e = run_both("triton", "batch-train", tensors, stats, out_scale=0.7)

    def terms(grad):
        return mix_bias_term_size(*(tensors[n] for n in ("q", "k", "v", "mix_weight", "mix_bias")), grad,
                                  norm="batch", training=True, gamma=tensors["norm_weight"].detach(),
                                  beta=tensors["norm_bias"].detach(), out_scale=0.7)

    assert_same(out, ref, stats_t, stats_e, tensors, "batch-train", mix_bias_terms=terms)
    tail = 16 if D == 35 else 0
    assert ("dq", True, tail, 1) in seen and ("dkdv", D != 32, tail, 1) in seen, seen


@pytest.mark.parametrize("B,Nq,Nk,D,bias", [
    (2, 33, 40, 35, True),   # rows and keys past a block; D padded to 48 = 32 + 16
    (1, 16, 17, 64, False),  # whole query blocks, a key past a block, no mixing bias
    (1, 20, 17, 32, True),   # D = 32 (launch.splits_backward_heads)
    (3, 7, 1, 48, True),     # one key: P = 1, the map constant over the keys
])
def test_split_heads_with_layer_norm_match_float64(monkeypatch, B, Nq, Nk, D, bias):
    """12 heads with LayerNorm across them: the split kernels recompute the centered map on both head groups'
    rows joined, normalize it and take LayerNorm's backward there (``backward._split_norm_grad``), the dV sweep
    normalizing the stacked map as the forward does; every gradient, the norm's weight and bias among them,
    against float64 autograd of the reference."""
    seen = _split_spy(monkeypatch)
    got, expected = gradients(problem(B, 12, Nq, Nk, D, seed=3), "layer", bias=bias)
    assert_close(got, expected, rtol=1e-10)
    tail = 16 if D in (35, 48) else 0
    assert seen == [("dq", True, tail, 1), ("dkdv", True, tail, 1)]


def test_split_heads_gradients_in_float32(monkeypatch):
    """The split kernels in float32 (CUDA-core products in the interpreter) within float32's rounding bound
    of the float64 truth, each gradient scaled by its own magnitude."""
    seen = _split_spy(monkeypatch)
    B, H, Nq, Nk, D = 2, 12, 21, 19, 40
    t = problem(B, H, Nq, Nk, D, seed=8)
    _, expected = gradients(t, "none")
    grad = torch.randn(B, H, Nq, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    t32 = {n: x.detach().float() for n, x in t.items()}
    seen.clear()  # (the float64 launches of ``gradients``)
    kw = dict(scale=D ** -0.5, out_scale=0.7)
    with torch.no_grad():
        _, stats = re_attention_forward(t32["q"], t32["k"], t32["v"], t32["mix_weight"], t32["mix_bias"], **kw)
        got = re_attention_backward(grad.float(), t32["q"], t32["k"], t32["v"], t32["mix_weight"], t32["mix_bias"],
                                    stats, **kw)
    n = reduction_length(B, H, Nq, Nk, D)
    for name, g in zip(NAMES, got):
        if name in expected:
            magnitude = expected[name].abs().max().item()
            assert (g.double() - expected[name]).abs().max().item() <= rounding_bound(torch.float32, n, magnitude), name
    assert seen == [("dq", True, 16, 1), ("dkdv", True, 16, 1)]


@pytest.mark.parametrize("norm", ["none", "layer", "batch-train"])
def test_split_heads_with_fp16_products_within_twice_eager_error(monkeypatch, norm):
    """fp16 tensor-core operands (the GPU path, which the interpreter runs faithfully for fp16): k, v, q and dO of
    the larger group held as product results, W^T in the input dtype and W in fp16 for the mixings, the
    statistics merged into one offset (with a norm: the joined rows' [16, 16] weight tiles, LayerNorm's
    approximate 1/std); dQ, dK, dV within twice eager fp16's error of the float64 truth."""
    import reattn
    from reattn.kernels import backward as bwd_module
    from reattn.kernels import forward as fwd_module

    original = fwd_module.launch_options

    def tensor_core_operands(q, lowp_dot, allow_tf32, interpret):
        return original(q, True if lowp_dot is None else lowp_dot, allow_tf32, interpret)

    for module in (fwd_module, bwd_module):
        monkeypatch.setattr(module, "launch_options", tensor_core_operands)
    seen = _split_spy(monkeypatch)
    B, H, N, D = 2, 12, 17, 35
    t = {n: x.detach() for n, x in problem(B, H, N, N, D, seed=9).items()}
    grad = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)

    def grads(backend, dtype):
        x = {n: v.to(dtype).requires_grad_(True) for n, v in t.items()}
        kw = {}
        if norm != "none":
            kw = dict(norm=norm.split("-")[0], norm_weight=x["norm_weight"], norm_bias=x["norm_bias"])
        if norm == "batch-train":
            kw.update(training=True, running_mean=torch.zeros(H, dtype=dtype, device=DEVICE),
                      running_var=torch.ones(H, dtype=dtype, device=DEVICE))
        out = reattn.re_attention(x["q"], x["k"], x["v"], x["mix_weight"], x["mix_bias"], backend=backend,
                                  out_scale=0.7, **kw)
        return torch.autograd.grad(out, [x["q"], x["k"], x["v"]], grad.to(dtype))

    truth = grads("eager", torch.float64)
    kernel, eager = grads("triton", torch.float16), grads("eager", torch.float16)
    n = reduction_length(B, H, N, N, D)
    for what, g, e, r in zip(("dq", "dk", "dv"), kernel, eager, truth):
        err, eager_err = (g.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert within_twice_eager(err, eager_err, torch.float16, n, r.abs().max().item()), (what, err, eager_err)
    assert seen == [("dq", True, 16, 1), ("dkdv", True, 16, 1)]


def test_the_launch_rule_splits_the_backward_at_12_heads():
    """``launch.splits_backward_heads``: 12 heads, every norm (eval BatchNorm arrives folded as none), no mask or
    dropout, 16-bit inputs on a GPU, a padded head dim of 64 (at 128 the groups' accumulators alone would take
    96 registers); at 32, where the usual sweeps fit whole, LayerNorm's two kernels and training BatchNorm's dQ
    kernel. Its tiles cover the whole head dim with one accumulator per group, within the 64 registers a thread
    the usual rule allows two."""
    def split(h=12, d=64, kernel="dq", **kw):
        args = dict(norm="none", masked=False, has_dropout=False, element_size=2, interpret=False)
        args.update(kw)
        return splits_backward_heads(h, d, kernel=kernel, **args)

    for kernel in ("dq", "dkdv"):
        assert [split(h, kernel=kernel) for h in (3, 6, 11, 12, 13, 16, 24, 32)] == [
            False, False, False, True, False, False, False, False]
        assert [split(d=d, kernel=kernel) for d in (16, 32, 48, 64, 80, 128)] == [
            False, False, True, True, False, False]
        assert [split(d=d, kernel=kernel, norm="layer") for d in (16, 32, 48, 64, 80, 128)] == [
            False, True, True, True, False, False]
        assert [split(d=d, kernel=kernel, norm="batch") for d in (16, 32, 48, 64, 80, 128)] == [
            False, kernel == "dq", True, True, False, False]
        for kw in (dict(masked=True), dict(has_dropout=True), dict(element_size=4), dict(norm="batch", masked=True),
                   dict(norm="layer", has_dropout=True)):
            assert not split(kernel=kernel, **kw), kw
        assert split(kernel=kernel, element_size=8, interpret=True)
    with pytest.raises(ValueError, match="kernel must be 'dq' or 'dkdv'"):
        split(kernel="forward")
    with pytest.raises(ValueError, match="norm must be 'none', 'batch' or 'layer'"):
        split(kernel="dq", norm="batch-eval")
    for kernel in ("dq", "dkdv"):
        cfg = backward_config(197, 197, 48, 12, interpret=False, kernel=kernel, variant="plain", split_heads=True)
        assert (cfg.HP, cfg.G, cfg.BLOCK_D) == (16, 1, 64)
        assert 12 * 16 * cfg.BLOCK_D <= 64 * 32 * cfg.num_warps  # (8 + 4) heads x 16 rows x the head dim
