"""reattn.re_attention (eager backend) against an independent float64 computation, every mode."""
import pytest
import torch
import torch.nn.functional as F

import reattn
from tests._naive import naive_re_attention

# (B, H, Nq, Nk, D): N = 1, odd N, Nq != Nk, a real ViT length, head dims 32/33/35/64, heads 1/6/12.
SHAPES = [(2, 1, 1, 1, 32), (2, 6, 5, 7, 33), (3, 12, 9, 9, 35), (1, 6, 197, 197, 64), (2, 12, 33, 17, 32)]
NORM_MODES = [("none", False), ("batch", False), ("batch", True), ("layer", False), ("layer", True)]


def make_inputs(B, H, Nq, Nk, D, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        return t.requires_grad_(requires_grad)

    return dict(
        q=rand(B, H, Nq, D), k=rand(B, H, Nk, D), v=rand(B, H, Nk, D),
        mix_weight=rand(H, H, scale=0.5), mix_bias=rand(H, scale=0.1),
        norm_weight=rand(H, scale=0.2, shift=1.0), norm_bias=rand(H, scale=0.1),
        running_mean=(torch.rand(H, generator=g, dtype=torch.float64) * 0.1).to(dtype),
        running_var=(torch.rand(H, generator=g, dtype=torch.float64) * 0.02 + 0.01).to(dtype),
    )


def call_args(t, norm, training):
    args = dict(q=t["q"], k=t["k"], v=t["v"], mix_weight=t["mix_weight"], mix_bias=t["mix_bias"], norm=norm,
                training=training)
    if norm != "none":
        args.update(norm_weight=t["norm_weight"], norm_bias=t["norm_bias"])
    if norm == "batch":
        args.update(running_mean=t["running_mean"], running_var=t["running_var"])
    return args


def run_naive(t, norm, training, **extra):
    return naive_re_attention(t["q"], t["k"], t["v"], t["mix_weight"], t["mix_bias"], norm=norm,
                              gamma=t["norm_weight"] if norm != "none" else None,
                              beta=t["norm_bias"] if norm != "none" else None,
                              running_mean=t["running_mean"], running_var=t["running_var"], training=training,
                              **extra)


def assert_running_stats(t_before, t_after, stats, momentum=0.1):
    mean, var, n = stats
    expected_mean = (1 - momentum) * t_before["running_mean"].double() + momentum * mean
    expected_var = (1 - momentum) * t_before["running_var"].double() + momentum * var * n / (n - 1)
    torch.testing.assert_close(t_after["running_mean"].double(), expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_after["running_var"].double(), expected_var, rtol=1e-10, atol=1e-12)


def masks_for(B, H, Nq, Nk):
    g = torch.Generator().manual_seed(7)
    padding = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    padding[0, ..., Nk // 2 + 1:] = False  # batch 0 sees only its first keys
    pattern = torch.rand(Nq, Nk, generator=g) > 0.3
    pattern[:, 0] = True
    additive = torch.randn(B, H, Nq, Nk, generator=g, dtype=torch.float64) * 0.5
    additive[torch.rand(B, H, Nq, Nk, generator=g) < 0.3] = float("-inf")
    additive[..., 0] = 0.0  # every row keeps a key ...
    additive[0, 0, 0, :] = float("-inf")  # ... except one: a fully masked row must give zeros
    return {"bool-padding": padding, "bool-2d": pattern, "float-per-head": additive}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm,training", NORM_MODES, ids=lambda x: str(x))
def test_forward_and_running_stats_match_float64(shape, norm, training):
    t = make_inputs(*shape)
    before = {name: value.clone() for name, value in t.items()}
    out, attn = reattn.re_attention(**call_args(t, norm, training), backend="eager", return_attention=True)
    expected, expected_attn, stats = run_naive(before, norm, training)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, expected_attn, rtol=1e-10, atol=1e-10)
    if norm == "batch" and training:
        assert_running_stats(before, t, stats)
    else:
        assert torch.equal(t["running_mean"], before["running_mean"])
        assert torch.equal(t["running_var"], before["running_var"])


@pytest.mark.parametrize("norm,training", NORM_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("mask_kind", ["bool-padding", "bool-2d", "float-per-head"])
def test_masks_match_float64(norm, training, mask_kind):
    B, H, Nq, Nk, D = 2, 6, 5, 7, 33
    t = make_inputs(B, H, Nq, Nk, D)
    mask = masks_for(B, H, Nq, Nk)[mask_kind]
    before = {name: value.clone() for name, value in t.items()}
    out, attn = reattn.re_attention(**call_args(t, norm, training), attn_mask=mask, return_attention=True)
    expected, expected_attn, stats = run_naive(before, norm, training, attn_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, expected_attn, rtol=1e-10, atol=1e-10)
    if norm == "batch" and training:
        assert_running_stats(before, t, stats)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    t = make_inputs(2, 6, 4, 5, 32, requires_grad=True)
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[1, 0, 2, :] = False
    out = reattn.re_attention(**call_args(t, "batch", True), attn_mask=mask)
    assert torch.all(out[1, :, 2] == 0)
    out.square().sum().backward()
    for name in ("q", "k", "v", "mix_weight", "mix_bias", "norm_weight", "norm_bias"):
        assert torch.isfinite(t[name].grad).all(), name


def test_all_true_mask_equals_no_mask_in_batchnorm_training():
    # The masked BatchNorm path (manual statistics) must agree with F.batch_norm's.
    t1, t2 = make_inputs(2, 6, 9, 9, 32), make_inputs(2, 6, 9, 9, 32)
    out1 = reattn.re_attention(**call_args(t1, "batch", True))
    out2 = reattn.re_attention(**call_args(t2, "batch", True), attn_mask=torch.ones(9, 9, dtype=torch.bool))
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t1["running_var"], t2["running_var"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm,training", NORM_MODES, ids=lambda x: str(x))
def test_dropout_follows_torch_rng_in_official_order(norm, training):
    # Dropout is drawn by F.dropout on the [B, H, Nq, Nk] probabilities, right after softmax: with the
    # same seed, F.dropout on a tensor of ones of that shape reproduces the keep mask.
    B, H, Nq, Nk, D, p = 2, 6, 5, 7, 33, 0.3
    t = make_inputs(B, H, Nq, Nk, D)
    before = {name: value.clone() for name, value in t.items()}
    torch.manual_seed(123)
    out = reattn.re_attention(**call_args(t, norm, True), dropout_p=p)
    torch.manual_seed(123)
    keep = F.dropout(torch.ones(B, H, Nq, Nk, dtype=torch.float64), p, training=True) != 0
    assert 0 < keep.sum() < keep.numel()
    expected, _, _ = run_naive(before, norm, True, keep=keep, dropout_p=p)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # The reference's explicit dropout_mask replays the same pattern.
    replay = reattn.re_attention_ref(**call_args(before, norm, True), dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(replay, expected, rtol=1e-10, atol=1e-10)


def test_no_dropout_when_not_training():
    t = make_inputs(2, 6, 5, 7, 33)
    out = reattn.re_attention(**call_args(t, "layer", False), dropout_p=0.5)
    expected, _, _ = run_naive(t, "layer", False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_scale_out_scale_and_no_bias():
    t = make_inputs(2, 6, 5, 5, 35)
    args = call_args(t, "layer", False)
    args["mix_bias"] = None
    out = reattn.re_attention(**args, scale=0.37, out_scale=0.125, eps=1e-3)
    expected, _, _ = naive_re_attention(t["q"], t["k"], t["v"], t["mix_weight"], None, scale=0.37, norm="layer",
                                        gamma=t["norm_weight"], beta=t["norm_bias"], eps=1e-3, out_scale=0.125)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm,training", NORM_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_float64(norm, training, masked):
    B, H, Nq, Nk, D = 2, 6, 5, 7, 33
    t = make_inputs(B, H, Nq, Nk, D, requires_grad=True)
    r = make_inputs(B, H, Nq, Nk, D, requires_grad=True)
    mask = masks_for(B, H, Nq, Nk)["float-per-head"] if masked else None
    grad_out = torch.randn(B, H, Nq, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = reattn.re_attention(**call_args(t, norm, training), attn_mask=mask)
    expected, _, _ = run_naive(r, norm, training, attn_mask=mask)
    (out * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    names = ["q", "k", "v", "mix_weight", "mix_bias"] + (["norm_weight", "norm_bias"] if norm != "none" else [])
    for name in names:
        torch.testing.assert_close(t[name].grad, r[name].grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("norm,training", NORM_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("extras", ["plain", "mask+dropout"])
def test_gradcheck_float64(norm, training, extras):
    # Fast mode (a random projection u^T J v of the Jacobian, numerical against analytical) in every
    # case; the full Jacobian for the most coupled mode, training BatchNorm, at the smallest shape
    # (every input element costs two forwards, every output element a backward).
    full = (norm, training, extras) == ("batch", True, "plain")
    B, H, Nq, Nk, D = (2, 2, 2, 3, 2) if full else (2, 3, 4, 5, 6)
    t = make_inputs(B, H, Nq, Nk, D, requires_grad=True)
    mask = masks_for(B, H, Nq, Nk)["float-per-head"][:, :H] if extras != "plain" else None
    dropout_p = 0.25 if extras != "plain" else 0.0
    names = ["q", "k", "v", "mix_weight", "mix_bias"] + (["norm_weight", "norm_bias"] if norm != "none" else [])
    fixed = {name: value.detach() for name, value in t.items() if name not in names}

    def fn(*tensors):
        torch.manual_seed(0)  # the same dropout pattern on every evaluation
        args = call_args({**fixed, **dict(zip(names, tensors))}, norm, training)
        if norm == "batch":  # running stats are updated in place: give each call fresh copies
            args.update(running_mean=fixed["running_mean"].clone(), running_var=fixed["running_var"].clone())
        return reattn.re_attention(**args, attn_mask=mask, dropout_p=dropout_p)

    assert torch.autograd.gradcheck(fn, tuple(t[name] for name in names), eps=1e-6, atol=1e-6, fast_mode=not full)


@pytest.mark.parametrize("norm,training", NORM_MODES, ids=lambda x: str(x))
def test_float32_close_to_float64(norm, training):
    shape = (2, 12, 33, 17, 32)
    t64 = make_inputs(*shape)
    t32 = make_inputs(*shape, dtype=torch.float32)
    out32 = reattn.re_attention(**call_args(t32, norm, training))
    out64 = reattn.re_attention(**call_args(t64, norm, training))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_with_float32_parameters():
    # Mixed precision: bf16 q/k/v, fp32 mixing and BatchNorm parameters (as under autocast).
    t64 = make_inputs(2, 6, 9, 9, 32)
    t = {name: (value.bfloat16() if name in ("q", "k", "v") else value.float()) for name, value in t64.items()}
    out = reattn.re_attention(**call_args(t, "batch", True))
    assert out.dtype == torch.bfloat16
    expected, _, _ = run_naive({n: v.double() for n, v in t.items()}, "batch", True)
    assert (out.double() - expected).abs().max() < 0.1
    assert t["running_mean"].dtype == torch.float32


def test_batchnorm_eval_folds_into_mixing():
    t = make_inputs(2, 6, 5, 7, 33)
    mask = masks_for(2, 6, 5, 7)["bool-padding"]
    out = reattn.re_attention(**call_args(t, "batch", False), attn_mask=mask, out_scale=0.5)
    W, c = reattn.fold_batchnorm_eval(t["mix_weight"], t["mix_bias"], t["norm_weight"], t["norm_bias"],
                                      t["running_mean"], t["running_var"], 1e-5)
    folded = reattn.re_attention(t["q"], t["k"], t["v"], W, c, attn_mask=mask, out_scale=0.5)
    torch.testing.assert_close(out, folded, rtol=1e-10, atol=1e-12)


def test_non_finite_inputs_propagate_without_crashing():
    t = make_inputs(1, 6, 4, 4, 32)
    t["q"][0, 2, 1, 0] = float("nan")
    out = reattn.re_attention(**call_args(t, "layer", False))
    expected = reattn.re_attention_ref(**call_args(t, "layer", False))
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert torch.isnan(out).any()


def test_matches_vit_pytorch_deepvit_attention():
    # vit-pytorch's DeepViT: einsum mixing with reattn_weights [in, out], LayerNorm across heads, no bias.
    from vit_pytorch import deepvit  # a test dependency: never skipped
    torch.manual_seed(0)
    attn = deepvit.Attention(dim=48, heads=6, dim_head=8).double()
    with torch.no_grad():
        attn.reattn_norm[1].weight.uniform_(0.5, 1.5)
        attn.reattn_norm[1].bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    expected = attn(x)
    q, k, v = (t.unflatten(-1, (6, 8)).transpose(1, 2) for t in attn.to_qkv(attn.norm(x)).chunk(3, dim=-1))
    ln = attn.reattn_norm[1]
    out = reattn.re_attention(q, k, v, attn.reattn_weights.t(), norm="layer", norm_weight=ln.weight,
                              norm_bias=ln.bias, eps=ln.eps, scale=attn.scale)
    out = attn.to_out(out.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("norm, training", [("none", False), ("batch", False), ("layer", False)])
@pytest.mark.parametrize("empty", ["Nq", "B"])
def test_empty_batch_or_queries_give_the_empty_result(backend, norm, training, empty):
    from reattn.backends import Problem, unavailable_reason

    reason = unavailable_reason(backend, Problem(torch.device("cpu"), heads=3, head_dim=8, dtype=torch.float64))
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot run here: {reason}")
    B, Nq = (2, 0) if empty == "Nq" else (0, 4)
    t = make_inputs(B, 3, Nq, 5, 8, requires_grad=True)
    for mask in (None, torch.ones(B, 1, Nq, 5, dtype=torch.bool)):
        out = reattn.re_attention(**call_args(t, norm, training), attn_mask=mask, backend=backend)
        assert out.shape == (B, 3, Nq, 8) and out.dtype == torch.float64
        out.sum().backward()
        for name in ("k", "v", "mix_weight"):
            assert t[name].grad is not None and not t[name].grad.any(), name
    # training BatchNorm over no entry is refused, as over one entry
    with pytest.raises(ValueError, match="more than one unmasked value per head"):
        reattn.re_attention(**call_args(t, "batch", True), backend=backend)
