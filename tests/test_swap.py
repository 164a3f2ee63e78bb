"""reattn.swap_attention on real timm and vit-pytorch models (random init: no weights download here).

Identity swaps reproduce the original logits; the eager and fused (Triton, in the interpreter
without a GPU) backends agree on whole-model forward, backward and a few optimizer steps.
"""
import copy

import pytest
import torch
from torch import nn

import reattn
from reattn.swap import PreNormReAttention

timm = pytest.importorskip("timm")  # test dependencies, installed by `make test`
vit_pytorch = pytest.importorskip("vit_pytorch")
from timm.layers import Attention as TimmAttention  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from vit_pytorch import ViT  # noqa: E402
from vit_pytorch.deepvit import DeepViT  # noqa: E402

DIM, HEADS, CLASSES = 48, 6, 5


def timm_vit(dtype=torch.float64, seed=0, depth=2, img_size=32, **kwargs):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=DIM, depth=depth, num_heads=HEADS,
                              num_classes=CLASSES, **kwargs)
    return model.to(dtype)


def images(B=2, dtype=torch.float64, seed=1, size=32):
    return torch.randn(B, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def vit_pytorch_model(cls, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(image_size=32, patch_size=8, num_classes=CLASSES, dim=DIM, depth=2, heads=HEADS, mlp_dim=96,
                   dim_head=8)
    options.update(kwargs)
    return cls(**options).to(dtype)


# ---------------------------------------------------------------- identity swaps: same logits


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_identity_swap_without_norm_gives_the_same_logits(mode, qk_norm):
    original = timm_vit(qk_norm=qk_norm)
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="none", mix_init="identity")
    assert all(isinstance(block.attn, reattn.ReAttention) for block in swapped.blocks)
    getattr(original, mode)(), getattr(swapped, mode)()
    x = images()
    expected, got = original(x), swapped(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    expected.square().sum().backward()
    got.square().sum().backward()
    swapped_params = dict(swapped.named_parameters())  # the original names, plus reatten_matrix.*
    for name, p_ref in original.named_parameters():
        torch.testing.assert_close(swapped_params[name].grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    mixing = swapped.blocks[0].attn.reatten_matrix.weight.grad
    assert mixing is not None and mixing.abs().sum() > 0  # the new mixing trains


def test_identity_swap_in_float32_agrees_to_round_off():
    original = timm_vit(dtype=torch.float32, depth=4).eval()
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="none")
    x = images(B=4, dtype=torch.float32)
    diff = (swapped(x) - original(x)).abs().max().item()
    print(f"float32 identity swap, 4 blocks: max |logit diff| = {diff:.3g}")
    assert diff < 1e-5


def test_identity_swap_with_batchnorm_is_exact_in_eval_and_documented_in_train():
    original = timm_vit()
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="batch", mix_init="identity")
    bn = swapped.blocks[0].attn.var_norm
    assert isinstance(bn, nn.BatchNorm2d)
    # Fresh statistics folded to the identity: running_var = 1 - eps, so (M - 0) / sqrt(1 - eps + eps) = M.
    torch.testing.assert_close(bn.running_var, torch.full((HEADS,), 1.0 - bn.eps, dtype=torch.float64))
    assert bn.running_mean.abs().max() == 0 and (bn.weight == 1).all() and (bn.bias == 0).all()
    original.eval(), swapped.eval()
    x = images()
    torch.testing.assert_close(swapped(x), original(x), rtol=1e-12, atol=1e-13)
    # Train mode normalizes with batch statistics (the official DeepViT behaviour): not the original.
    original.train(), swapped.train()
    assert not torch.allclose(swapped(x), original(x), atol=1e-3)
    assert int(bn.num_batches_tracked) == 1


def test_official_mix_init_changes_the_function():
    original = timm_vit().eval()
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="none", mix_init="official").eval()
    assert not torch.allclose(swapped(images()), original(images()), atol=1e-4)


def test_deit_distilled_identity_swap():
    torch.manual_seed(0)
    original = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 depth=2, num_classes=CLASSES).double().eval()
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="none").eval()
    torch.testing.assert_close(swapped(images()), original(images()), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- what carries over


def test_swap_reuses_the_original_modules_and_keeps_mode_device_dtype():
    model = timm_vit(qk_norm=True, attn_drop_rate=0.1, proj_drop_rate=0.2).eval()
    old = model.blocks[1].attn
    qkv, proj, q_norm, k_norm = old.qkv, old.proj, old.q_norm, old.k_norm
    qkv.weight.requires_grad_(False)
    result = reattn.swap_attention(model, norm="layer", backend="eager")
    assert result is model
    new = model.blocks[1].attn
    assert new.qkv is qkv and new.proj is proj and new.q_norm is q_norm and new.k_norm is k_norm
    assert not new.qkv.weight.requires_grad  # the very same Parameter
    assert new.attn_drop.p == 0.1 and new.proj_drop.p == 0.2
    assert not new.training and new.reatten_matrix.weight.dtype == torch.float64
    assert new.scale == old.scale and new.head_dim == DIM // HEADS and new.backend == "eager"
    assert isinstance(new.var_norm, nn.LayerNorm)
    assert {"q_norm.weight", "k_norm.bias", "qkv.bias"} <= set(new.state_dict())


def test_plain_modules_have_no_qk_norm_entries():
    model = reattn.swap_attention(timm_vit())
    assert model.blocks[0].attn.q_norm is None
    assert not any("q_norm" in key for key in model.state_dict())


# ---------------------------------------------------------------- timm's forward signatures


@pytest.mark.parametrize("call", ["x", "bool_mask", "float_mask", "causal"])
def test_swapped_module_accepts_timm_forward_signatures(call):
    torch.manual_seed(0)
    timm_attn = TimmAttention(DIM, HEADS, qkv_bias=True).double().eval()
    ours = reattn.swap_attention(copy.deepcopy(timm_attn), norm="none")
    assert isinstance(ours, reattn.ReAttention)
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    bool_mask = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    bool_mask[..., 0] = True  # no fully masked rows (SDPA would give NaN there)
    kwargs = dict(x={}, bool_mask=dict(attn_mask=bool_mask),
                  float_mask=dict(attn_mask=torch.randn(2, HEADS, 9, 9, dtype=torch.float64)),
                  causal=dict(is_causal=True))[call]
    torch.testing.assert_close(ours(x, **kwargs), timm_attn(x, **kwargs), rtol=1e-12, atol=1e-13)


def test_swapped_timm_model_forwards_attention_masks():
    original = timm_vit().eval()
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="none").eval()
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    torch.testing.assert_close(swapped(images(), attn_mask=mask), original(images(), attn_mask=mask),
                               rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- blocks, errors


def test_blocks_selects_which_blocks_get_re_attention():
    model = reattn.swap_attention(timm_vit(depth=4), blocks=range(-2, 0))
    kinds = [type(block.attn) for block in model.blocks]
    assert kinds == [TimmAttention, TimmAttention, reattn.ReAttention, reattn.ReAttention]
    model = reattn.swap_attention(timm_vit(depth=4), blocks=[0, -1])
    assert [isinstance(b.attn, reattn.ReAttention) for b in model.blocks] == [True, False, False, True]


def test_swapping_twice_says_the_model_is_already_swapped():
    model = reattn.swap_attention(timm_vit(depth=2))
    with pytest.raises(ValueError, match=r"VisionTransformer is already swapped: it holds 2 reattn.ReAttention "
                                         r"module\(s\) and no attention module left to swap"):
        reattn.swap_attention(model)
    with pytest.raises(ValueError, match="ReAttention is already swapped"):
        reattn.swap_attention(model.blocks[0].attn)
    partly = reattn.swap_attention(timm_vit(depth=2), blocks=[0])  # the rest can still be swapped
    assert all(isinstance(b.attn, reattn.ReAttention) for b in reattn.swap_attention(partly).blocks)


def test_bad_arguments_raise_and_leave_the_model_untouched():
    model = timm_vit(depth=2)
    with pytest.raises(ValueError, match="out of range"):
        reattn.swap_attention(model, blocks=[2])
    with pytest.raises(TypeError, match="ints"):
        reattn.swap_attention(model, blocks=["0"])
    with pytest.raises(ValueError, match="norm must be one of"):
        reattn.swap_attention(model, norm="group")
    with pytest.raises(ValueError, match="no supported attention module"):
        reattn.swap_attention(nn.Sequential(nn.Linear(3, 3)))
    assert all(type(block.attn) is TimmAttention for block in model.blocks)
    scaled = timm_vit(scale_attn_norm=True)
    with pytest.raises(ValueError, match=f"timm {timm.__version__} Attention with scale_norm"):
        reattn.swap_attention(scaled)
    assert all(type(block.attn) is TimmAttention for block in scaled.blocks)


def test_timm_features_without_a_counterpart_are_refused_with_the_timm_version(monkeypatch):
    version = timm.__version__
    gated = TimmAttention(DIM, HEADS, gated=True)
    with pytest.raises(ValueError, match=f"timm {version} Attention with gated=True"):
        reattn.swap_attention(gated)
    # Something a later timm might add: refused rather than silently left out of the function.
    extra = TimmAttention(DIM, HEADS)
    extra.rope = nn.Identity()
    with pytest.raises(ValueError, match=r"submodules \['rope'\] that swap_attention does not know"):
        reattn.swap_attention(extra)
    timm_forward = TimmAttention.forward

    def forward_with_rope(self, x, attn_mask=None, is_causal=False, rope=None):
        return timm_forward(self, x, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(TimmAttention, "forward", forward_with_rope)
    with pytest.raises(ValueError, match=rf"timm {version} Attention.forward takes \['rope'\]"):
        reattn.swap_attention(TimmAttention(DIM, HEADS))


def test_a_changed_scale_is_refused_when_timm_would_ignore_it():
    model = timm_vit(depth=2)
    # timm's fused path calls SDPA with its default scale: the changed attribute is not used there.
    model.blocks[1].attn.fused_attn, model.blocks[1].attn.scale = True, 0.5
    with pytest.raises(ValueError, match=r"scale = 0.5 differs from head_dim \*\* -0.5"):
        reattn.swap_attention(model)
    assert all(type(block.attn) is TimmAttention for block in model.blocks)
    # Without the fused path timm multiplies by self.scale, and so does the swapped module.
    model.blocks[1].attn.fused_attn = False
    model.eval()
    swapped = reattn.swap_attention(copy.deepcopy(model), norm="none").eval()
    assert swapped.blocks[1].attn.scale == 0.5
    torch.testing.assert_close(swapped(images()), model(images()), rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- vit-pytorch


def test_vit_pytorch_vit_identity_swap_gives_the_same_logits():
    original = vit_pytorch_model(ViT, dim_head=16).eval()  # inner dim 96 != dim 48: head_dim carried over
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="none")
    attn = swapped.transformer.layers[0][0]
    assert isinstance(attn, PreNormReAttention) and attn.attn.head_dim == 16
    torch.testing.assert_close(swapped(images()), original(images()), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vit_pytorch_deepvit_swap_keeps_its_re_attention(mode):
    original = vit_pytorch_model(DeepViT, dropout=0.0)
    swapped = reattn.swap_attention(copy.deepcopy(original), norm="batch", mix_init="official")
    module = swapped.transformer.layers[1][0].attn
    assert module.norm == "layer" and module.reatten_matrix.bias is None
    torch.testing.assert_close(module.reatten_matrix.weight.flatten(1),
                               original.transformer.layers[1][0].reattn_weights.t())
    getattr(original, mode)(), getattr(swapped, mode)()
    x = images()
    expected, got = original(x), swapped(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(module.reatten_matrix.weight.grad.flatten(1),
                               original.transformer.layers[1][0].reattn_weights.grad.t(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- eager vs fused backends
# 24x24 images (9 patches + class token): the interpreter runs one query block per program.
FUSED_SIZE = 24

FUSED_CASES = [("none", "train"), ("layer", "train"), ("batch", "eval"), ("batch", "train")]


def _fused_pair(norm, mode, model_kind):
    if "triton" not in reattn.available_backends("cpu" if not torch.cuda.is_available() else "cuda"):
        pytest.skip("the Triton backend is not available here: " + ", ".join(reattn.available_backends()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_kind == "timm":
        base = timm_vit(depth=2, img_size=FUSED_SIZE)
        kwargs = dict(norm=norm, mix_init="official")
    else:
        base = vit_pytorch_model(DeepViT, dropout=0.0, image_size=FUSED_SIZE)
        kwargs = {}
    base = base.to(device)
    torch.manual_seed(123)  # the same random mixing init in both
    eager = reattn.swap_attention(copy.deepcopy(base), backend="eager", **kwargs)
    torch.manual_seed(123)
    fused = reattn.swap_attention(copy.deepcopy(base), backend="triton", **kwargs)
    assert all(m.backend == "triton" for m in fused.modules() if isinstance(m, reattn.ReAttention))
    for model in (eager, fused):
        getattr(model, mode)()
    return eager, fused, device


def _run_or_skip(model, x):
    try:
        return model(x)
    except ValueError as error:  # only the backend's own refusal may skip, and it says why
        if "backend='triton' cannot run" in str(error):
            pytest.skip(str(error))
        raise


@pytest.mark.parametrize("norm,mode", FUSED_CASES, ids=[f"{n}-{m}" for n, m in FUSED_CASES])
def test_eager_and_fused_backends_agree_on_the_whole_model(norm, mode):
    eager, fused, device = _fused_pair(norm, mode, "timm")
    x = images(size=FUSED_SIZE).to(device)
    out_fused = _run_or_skip(fused, x)
    out_eager = eager(x)
    torch.testing.assert_close(out_fused, out_eager, rtol=1e-9, atol=1e-10)
    out_eager.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, p_ref), p in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=name)
    for (name, b_ref), b in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-12, msg=name)  # BatchNorm statistics


@pytest.mark.parametrize("model_kind,norm,mode", [("timm", "layer", "train"), ("timm", "batch", "train"),
                                                  ("vit_pytorch_deepvit", "layer", "train")])
def test_a_few_optimizer_steps_match_between_backends(model_kind, norm, mode):
    eager, fused, device = _fused_pair(norm, mode, model_kind)
    # SGD with momentum: the trajectories stay as close as the gradients (Adam would amplify
    # round-off in near-zero gradients into O(lr) steps).
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, fused)]
    labels = torch.tensor([1, 3], device=device)
    for step in range(2):
        x = images(seed=10 + step, size=FUSED_SIZE).to(device)
        losses = []
        for model, optimizer in zip((eager, fused), optimizers):
            optimizer.zero_grad()
            logits = _run_or_skip(model, x) if model is fused else model(x)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=1e-10)
    for (name, p_ref), p in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-9, atol=1e-11, msg=name)
    for (name, b_ref), b in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-12, msg=name)
