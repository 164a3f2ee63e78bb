"""swap_attention checks against whichever timm is importable; run in a subprocess per timm release.

    PYTHONPATH=<dir holding timm X.Y.Z>:<repo> python tests/_timm_swap_check.py X.Y.Z

tests/test_swap_timm_versions.py runs it for older timm releases installed side by side (the
project's own timm is covered by tests/test_swap.py). It builds a tiny random-init
``VisionTransformer`` (32x32 images, 8x8 patches: 16 tokens + class token, depth 2, dim 24,
3 heads) in float64 and checks, for the forward signature this timm release has:

* identity swap, ``norm="none"``: the same logits (round-off) in eval and train, the same
  gradients for every original parameter, a nonzero gradient for the new mixing; again with
  ``qk_norm=True`` where the release has it;
* identity swap, ``norm="batch"``: the same logits in eval;
* ``reattn.diagnostics.cross_layer_similarity`` on the original and the swapped model: the same
  similarity matrix (the maps are read from timm's module, also where it has no ``fused_attn``);
* the original with ``fused_attn`` off (timm >= 0.9 has the switch): the same logits;
* the attention module built with the shape options the release has (``attn_head_dim``,
  ``dim_out``, ``proj_bias=False``): the same output;
* the attention module called with each signature the release's ``Attention.forward`` takes
  (``x``; ``attn_mask=`` bool and float; ``is_causal=``), and the whole model with the mask
  arguments its ``VisionTransformer.forward`` takes;
* refusals: ``scale_norm=True``, ``gated=True`` (where the release has them) and a changed
  ``scale`` under ``fused_attn`` raise ValueError naming the feature and the timm version, and
  leave the model untouched.

It prints one line ``RESULT {json}``: the timm version and file, the features found and the
checks that ran, so the caller can tell a check that ran from one this release does not need.
"""
import copy
import inspect
import json
import sys

import torch
from torch import nn

import reattn
import timm
from reattn.swap import supported_attention_types
from timm.models.vision_transformer import VisionTransformer

RTOL, ATOL = 1e-12, 1e-13  # float64: the same math in another summation order
EMBED, HEADS, TOKENS = 24, 3, 17  # 16 patches + class token


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=EMBED, depth=2, num_heads=HEADS, num_classes=5,
                              qkv_bias=True, **kwargs)
    return model.double()


def images(seed=1) -> torch.Tensor:
    """[2, 3, 32, 32] float64."""
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def set_fused(model: nn.Module, on: bool) -> None:
    # Pinned either way, so the result does not depend on TIMM_FUSED_ATTN in the environment.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = on


def close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def swapped_copy(model, **kwargs):
    new = reattn.swap_attention(copy.deepcopy(model), backend="eager", **kwargs)
    kinds = [type(block.attn) for block in new.blocks]
    assert kinds == [reattn.ReAttention] * len(new.blocks), kinds
    return new


def identity_none(checks, **kwargs):
    """Logits in eval and train, then gradients (train), of an identity swap without norm."""
    original = tiny_vit(**kwargs)
    set_fused(original, True)
    swapped = swapped_copy(original, norm="none", mix_init="identity")
    x = images()
    for mode in ("eval", "train"):
        getattr(original, mode)(), getattr(swapped, mode)()
        expected, got = original(x), swapped(x)
        close(got, expected, f"logits ({mode}, {kwargs})")
    expected.square().sum().backward()
    got.square().sum().backward()
    params = dict(swapped.named_parameters())
    for name, p_ref in original.named_parameters():
        torch.testing.assert_close(params[name].grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)
    mixing = swapped.blocks[0].attn.reatten_matrix.weight.grad
    assert mixing is not None and mixing.abs().sum() > 0, "the new mixing gets no gradient"
    checks.append("identity_none_eval_train_backward" + ("_qk_norm" if kwargs else ""))


def diagnostics(checks):
    """cross_layer_similarity reads timm's softmax maps (timm < 0.9 has no fused_attn switch): the plain
    model and its identity swap give the same similarity matrix, and the maps are softmax rows."""
    from reattn.diagnostics import cross_layer_similarity

    original = tiny_vit()
    swapped = swapped_copy(original, norm="none", mix_init="identity")
    plain = cross_layer_similarity(original, images(), batch_size=2)
    after = cross_layer_similarity(swapped, images(), batch_size=2)
    assert plain.similarity.shape == (2, 2), plain.similarity.shape
    # (the similarity is reduced in float32 whatever the model's dtype: float32 tolerances)
    torch.testing.assert_close(after.similarity, plain.similarity, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.diagonal(plain.similarity), torch.ones(2, dtype=plain.similarity.dtype),
                               rtol=1e-6, atol=1e-6)
    checks.append("diagnostics_cross_layer_similarity")


def identity_batch_eval(checks):
    original = tiny_vit().eval()
    swapped = swapped_copy(original, norm="batch", mix_init="identity").eval()
    close(swapped(images()), original(images()), "logits (norm=batch, eval)")
    checks.append("identity_batch_eval")


def unfused_original(checks, forward_arguments):
    """timm's manual path (fused_attn=False) scales by self.scale: the same as the fused one here."""
    original = tiny_vit().eval()
    swapped = swapped_copy(original, norm="none")
    set_fused(original, False)
    close(swapped(images()), original(images()), "logits against fused_attn=False")
    # timm 1.0.16 - 1.0.25 adds a bool mask to the scores on this path (True = +1, not "attend"),
    # unlike SDPA and its own fused path; only the float mask means the same on both paths there.
    attn, ours = original.blocks[0].attn, swapped.blocks[0].attn
    tokens = torch.randn(2, TOKENS, EMBED, dtype=torch.float64)
    if "attn_mask" in forward_arguments:
        mask = torch.randn(2, HEADS, TOKENS, TOKENS, dtype=torch.float64)
        close(ours(tokens, attn_mask=mask), attn(tokens, attn_mask=mask), "float attn_mask, fused_attn=False")
    if "is_causal" in forward_arguments:
        close(ours(tokens, is_causal=True), attn(tokens, is_causal=True), "is_causal, fused_attn=False")
    checks.append("unfused_original")


def module_signatures(checks, forward_arguments):
    """The attention module alone, called with every signature this timm's Attention.forward takes."""
    original = tiny_vit().eval()
    set_fused(original, True)
    attn = original.blocks[0].attn
    ours = reattn.swap_attention(copy.deepcopy(attn), norm="none", backend="eager")
    assert isinstance(ours, reattn.ReAttention), type(ours)
    tokens = torch.randn(2, TOKENS, EMBED, dtype=torch.float64)
    close(ours(tokens), attn(tokens), "module forward(x)")
    checks.append("module_x")
    if "attn_mask" in forward_arguments:
        bool_mask = torch.rand(2, 1, TOKENS, TOKENS, generator=torch.Generator().manual_seed(3)) > 0.3
        bool_mask[..., 0] = True  # no fully masked rows (SDPA gives NaN there)
        float_mask = torch.randn(2, HEADS, TOKENS, TOKENS, dtype=torch.float64)
        close(ours(tokens, attn_mask=bool_mask), attn(tokens, attn_mask=bool_mask), "module bool attn_mask")
        close(ours(tokens, attn_mask=float_mask), attn(tokens, attn_mask=float_mask), "module float attn_mask")
        checks.append("module_attn_mask")
    if "is_causal" in forward_arguments:
        close(ours(tokens, is_causal=True), attn(tokens, is_causal=True), "module is_causal")
        checks.append("module_is_causal")


# Constructor options that change the module's shapes or parameters, where the release has them:
# head_dim 4 instead of 8 (qkv 24 -> 36), an output width other than the input's, no proj bias.
MODULE_OPTIONS = dict(attn_head_dim=4, dim_out=16, proj_bias=False)


def module_options(checks, init_arguments):
    options = {name: value for name, value in MODULE_OPTIONS.items() if name in init_arguments}
    if not options:
        return
    torch.manual_seed(0)
    attn = type(tiny_vit().blocks[0].attn)(EMBED, HEADS, qkv_bias=True, **options).double().eval()
    set_fused(attn, True)
    ours = reattn.swap_attention(copy.deepcopy(attn), norm="none", backend="eager")
    tokens = torch.randn(2, TOKENS, EMBED, dtype=torch.float64)
    expected = attn(tokens)
    assert expected.shape == (2, TOKENS, options.get("dim_out", EMBED)), expected.shape
    close(ours(tokens), expected, f"module with {options}")
    assert ours.head_dim == options.get("attn_head_dim", EMBED // HEADS)
    checks.append("module_options_" + "_".join(sorted(options)))


def model_masks(checks, model_arguments):
    """The whole model with the mask arguments its VisionTransformer.forward passes to the blocks."""
    original = tiny_vit().eval()
    set_fused(original, True)
    swapped = swapped_copy(original, norm="none")
    if "attn_mask" in model_arguments:
        mask = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
        close(swapped(images(), attn_mask=mask), original(images(), attn_mask=mask), "model attn_mask")
        checks.append("model_attn_mask")
    if "is_causal" in model_arguments:
        close(swapped(images(), is_causal=True), original(images(), is_causal=True), "model is_causal")
        checks.append("model_is_causal")


def expect_refusal(model, feature):
    before = [type(block.attn) for block in model.blocks]
    try:
        reattn.swap_attention(model, backend="eager")
    except ValueError as error:
        message = str(error)
        assert feature in message and f"timm {timm.__version__}" in message, message
    else:
        raise AssertionError(f"swap_attention accepted {feature}")
    assert [type(block.attn) for block in model.blocks] == before, "a refused swap changed the model"


def refusals(checks, init_arguments, fused):
    if "scale_norm" in init_arguments:
        # VisionTransformer's flag for it is scale_attn_norm; build the modules directly so the
        # check does not depend on that name.
        model = tiny_vit()
        for block in model.blocks:
            block.attn = type(block.attn)(EMBED, HEADS, scale_norm=True, norm_layer=nn.LayerNorm).double()
        expect_refusal(model, "scale_norm")
        checks.append("refuses_scale_norm")
    if "gated" in init_arguments:
        model = tiny_vit()
        for block in model.blocks:
            block.attn = type(block.attn)(EMBED, HEADS, gated=True).double()
        expect_refusal(model, "gated")
        checks.append("refuses_gated")
    if fused:
        model = tiny_vit()
        model.blocks[1].attn.fused_attn = True
        model.blocks[1].attn.scale = 0.5
        expect_refusal(model, "scale")
        checks.append("refuses_changed_scale_when_fused")


def main(expected_version: str) -> None:
    if timm.__version__ != expected_version:
        raise SystemExit(f"expected timm {expected_version}, imported {timm.__version__} from {timm.__file__}")
    torch.set_num_threads(1)
    attn_type = type(tiny_vit().blocks[0].attn)
    if attn_type not in supported_attention_types():
        raise SystemExit(f"{attn_type.__module__}.{attn_type.__qualname__} is not in supported_attention_types()")
    init_arguments = set(inspect.signature(attn_type.__init__).parameters)
    forward_arguments = [n for n in inspect.signature(attn_type.forward).parameters if n != "self"]
    model_arguments = [n for n in inspect.signature(VisionTransformer.forward).parameters if n != "self"]
    fused = hasattr(attn_type(EMBED, HEADS), "fused_attn")
    checks = []
    identity_none(checks)
    if "qk_norm" in init_arguments:
        identity_none(checks, qk_norm=True)
    identity_batch_eval(checks)
    diagnostics(checks)
    if fused:
        unfused_original(checks, forward_arguments)
    module_signatures(checks, forward_arguments)
    module_options(checks, init_arguments)
    model_masks(checks, model_arguments)
    refusals(checks, init_arguments, fused)
    features = dict(attention=f"{attn_type.__module__}.{attn_type.__qualname__}", forward=forward_arguments,
                    model_forward=[n for n in model_arguments if n in ("attn_mask", "is_causal")],
                    qk_norm="qk_norm" in init_arguments, scale_norm="scale_norm" in init_arguments,
                    gated="gated" in init_arguments, fused_attn=fused,
                    **{name: name in init_arguments for name in MODULE_OPTIONS})
    print("RESULT " + json.dumps(dict(version=timm.__version__, file=timm.__file__, features=features,
                                      checks=checks)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/_timm_swap_check.py EXPECTED_TIMM_VERSION")
    main(sys.argv[1])
