"""reattn.ReAttention against the official DeepViT module: names, outputs, gradients, statistics."""
import pytest
import torch
from torch import nn

import reattn
from tests._official import OfficialReAttention

DIM, HEADS = 48, 6


def pair(dtype=torch.float64, seed=0, **kwargs):
    """An official module and ours holding identical weights (loaded strictly through state_dict)."""
    torch.manual_seed(seed)
    official = OfficialReAttention(DIM, HEADS, **kwargs).to(dtype)
    ours = reattn.ReAttention(DIM, HEADS, **kwargs, backend="eager").to(dtype)
    if hasattr(official, "var_norm"):
        with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
            official.var_norm.weight.uniform_(0.5, 1.5)
            official.var_norm.bias.uniform_(-0.2, 0.2)
            official.var_norm.running_mean.uniform_(0.0, 0.1)
            official.var_norm.running_var.uniform_(0.01, 0.03)
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def tokens(B=3, N=17, dtype=torch.float64, seed=1):
    return torch.randn(B, N, DIM, dtype=dtype, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def assert_same_state(official, ours):
    ref, got = official.state_dict(), ours.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-12, atol=1e-14, msg=key)


def test_state_dict_uses_the_official_names_and_shapes():
    official, ours = pair(qkv_bias=True)
    expected = {key: tuple(v.shape) for key, v in official.state_dict().items()}
    assert {key: tuple(v.shape) for key, v in ours.state_dict().items()} == expected
    assert expected["reatten_matrix.weight"] == (HEADS, HEADS, 1, 1)
    assert "var_norm.num_batches_tracked" in expected
    official.load_state_dict(ours.state_dict(), strict=True)
    plain_official, plain_ours = pair(apply_transform=False)
    assert set(plain_ours.state_dict()) == set(plain_official.state_dict()) == {
        "qkv.weight", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("kwargs", [dict(), dict(qkv_bias=True, transform_scale=True), dict(qk_scale=0.2)],
                         ids=["default", "bias+transform_scale", "qk_scale"])
def test_train_then_eval_matches_official(kwargs):
    official, ours = pair(**kwargs)
    official.train(), ours.train()
    for step in range(3):
        x_ref, x = tokens(seed=step), tokens(seed=step)
        out_ref, _ = official(x_ref)
        out = ours(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        grad = torch.randn_like(out)
        out_ref.backward(grad)
        out.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-11)
    for (name, p_ref), p in zip(official.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-11, msg=name)
    assert_same_state(official, ours)
    assert int(ours.var_norm.num_batches_tracked) == 3
    official.eval(), ours.eval()
    x = tokens(seed=9)
    torch.testing.assert_close(ours(x), official(x)[0], rtol=1e-10, atol=1e-12)


def test_dropout_matches_official_with_the_same_seed():
    official, ours = pair(attn_drop=0.3, proj_drop=0.1)
    official.train(), ours.train()
    x = tokens()
    torch.manual_seed(5)
    out_ref, _ = official(x)
    torch.manual_seed(5)
    out = ours(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    assert_same_state(official, ours)


def test_frozen_batchnorm_with_dropout_matches_official():
    # Module training (dropout on) with BatchNorm in eval: statistics frozen, folded into the mixing.
    official, ours = pair(attn_drop=0.3)
    official.train(), ours.train()
    official.var_norm.eval(), ours.var_norm.eval()
    x_ref, x = tokens(), tokens()
    torch.manual_seed(11)
    out_ref, _ = official(x_ref)
    torch.manual_seed(11)
    out = ours(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    out_ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(ours.var_norm.weight.grad, official.var_norm.weight.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours.reatten_matrix.weight.grad, official.reatten_matrix.weight.grad, rtol=1e-9,
                               atol=1e-11)
    assert_same_state(official, ours)  # running statistics untouched


def test_cumulative_momentum_and_untracked_statistics_follow_batchnorm():
    official, ours = pair()
    official.var_norm.momentum = ours.var_norm.momentum = None
    official.train(), ours.train()
    for step in range(3):
        torch.testing.assert_close(ours(tokens(seed=step)), official(tokens(seed=step))[0], rtol=1e-10, atol=1e-12)
    assert_same_state(official, ours)
    for module in (official, ours):
        module.var_norm = nn.BatchNorm2d(HEADS, track_running_stats=False).double()
    official.eval(), ours.eval()  # no running statistics: batch statistics even in eval
    torch.testing.assert_close(ours(tokens()), official(tokens())[0], rtol=1e-10, atol=1e-12)


def test_plain_attention_without_transform_matches_official():
    official, ours = pair(apply_transform=False, qkv_bias=True)
    x = tokens()
    torch.testing.assert_close(ours(x), official(x)[0], rtol=1e-10, atol=1e-12)
    out, attn = ours(x, return_attention=True)
    torch.testing.assert_close(attn, official(x)[1], rtol=1e-10, atol=1e-12)


def test_return_attention_gives_the_official_post_norm_map():
    official, ours = pair(transform_scale=True)
    official.eval(), ours.eval()
    x = tokens()
    out_ref, attn_ref = official(x)
    out, attn = ours(x, return_attention=True)
    assert attn.shape == (3, HEADS, 17, 17)
    torch.testing.assert_close(attn, attn_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)


def test_identity_init_without_norm_is_plain_attention():
    torch.manual_seed(0)
    ours = reattn.ReAttention(DIM, HEADS, qkv_bias=True, norm="none", mix_init="identity").double()
    plain = reattn.ReAttention(DIM, HEADS, qkv_bias=True, apply_transform=False).double()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("reatten")})
    torch.testing.assert_close(ours.reatten_matrix.weight.flatten(1), torch.eye(HEADS, dtype=torch.float64))
    x = tokens()
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-10, atol=1e-12)


def test_official_init_differs_from_identity():
    torch.manual_seed(0)
    weight = reattn.ReAttention(DIM, HEADS).reatten_matrix.weight.flatten(1)
    assert not torch.allclose(weight, torch.eye(HEADS))
    assert reattn.ReAttention(DIM, HEADS).reatten_matrix.bias.abs().sum() > 0


def test_layer_norm_variant_holds_a_layernorm_over_heads():
    module = reattn.ReAttention(DIM, HEADS, norm="layer")
    assert isinstance(module.var_norm, nn.LayerNorm)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith("var_norm")} == {
        "var_norm.weight": (HEADS,), "var_norm.bias": (HEADS,)}
    assert module(torch.randn(2, 5, DIM)).shape == (2, 5, DIM)


def test_causal_mask_only_looks_back():
    _, ours = pair()
    ours.eval()  # eval BatchNorm: tokens do not interact through batch statistics
    x = tokens().detach()
    out = ours(x, is_causal=True)
    torch.testing.assert_close(out, ours(x, attn_mask=torch.ones(17, 17, dtype=torch.bool).tril()))
    changed = x.clone()
    changed[:, 10] += 1.0
    out2 = ours(changed, is_causal=True)
    torch.testing.assert_close(out2[:, :10], out[:, :10], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out2[:, 10:], out[:, 10:])


def test_drops_into_a_timm_vision_transformer_block():
    from timm.models.vision_transformer import VisionTransformer  # a test dependency: never skipped

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=5)
    for block in model.blocks:
        block.attn = reattn.ReAttention(DIM, HEADS, qkv_bias=True)
    images = torch.randn(2, 3, 32, 32)
    model.train()
    logits = model(images)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(block.attn.reatten_matrix.weight.grad is not None for block in model.blocks)
    assert int(model.blocks[0].attn.var_norm.num_batches_tracked) == 1
    model.eval()
    assert torch.isfinite(model(images)).all()
