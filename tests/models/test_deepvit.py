"""reattn.models: the official DeepViT models (keys, shapes, counts, outputs) and the vit-pytorch converter.

The golden key/shape digests and parameter counts below were computed from the official code
(github.com/zhoudaquan/dvit_repo @ 1ccb152, models/deep_vision_transformer.py, run with timm
1.0.31); the development check also loaded each official model's state_dict into ours strictly
and compared logits (float64, train and eval: max abs diff <= 1.3e-13). Here the reference is
``OfficialDeepViT``, a transcription of the official model's structure and forward built on
tests/_official.py's transcription of the official ReAttention.
"""
import copy
import hashlib

import pytest
import torch
from torch import nn

import reattn
from reattn.models import convert_vit_pytorch_deepvit
from tests._official import OfficialReAttention

# name: (number of state_dict entries, sha256[:16] of repr([(key, shape), ...]), parameters)
OFFICIAL = {
    "deepvit_patch16_224_re_attn_16b": (312, "4c8d201d4a129751", 24_426_664),
    "deepvit_patch16_224_re_attn_24b": (464, "63c19a4315c3a96e", 36_261_448),
    "deepvit_patch16_224_re_attn_32b": (616, "bbf944f9da2fecee", 48_096_232),
    "deepvit_S": (247, "02f597e99c711f74", 27_312_632),
    "deepvit_L": (488, "312ca7d21107f7dc", 58_883_708),
    "deepvit_L_384": (488, "07b90ac25156f6ca", 59_043_308),
}


# ---------------------------------------------------------------- transcription of the official model


class OfficialMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2, self.act, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.GELU(), nn.Dropout(0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class OfficialBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, apply_transform, transform_scale, scale_adjustment):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.adjust_ratio = scale_adjustment
        self.attn = OfficialReAttention(dim, heads, qkv_bias=True, apply_transform=apply_transform,
                                        transform_scale=transform_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = OfficialMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, atten=None):
        s = self.adjust_ratio
        x_new, atten = self.attn(self.norm1(x * s), atten)
        x = x + x_new / s
        x = x + self.mlp(self.norm2(x * s)) / s
        return x, atten


class OfficialCnnStem(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.proj = nn.Conv2d(64, dim, patch // 2, patch // 2)

    def forward(self, x):
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialDeepViT(nn.Module):
    def __init__(self, img, patch, dim, heads, apply_transform, classes=7, mlp_ratio=3, transform_scale=False,
                 cnn=False, scale_adjustment=1.0):
        super().__init__()
        self.patch_embed = OfficialCnnStem(patch, dim) if cnn else OfficialPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(0)
        self.blocks = nn.ModuleList([OfficialBlock(dim, heads, mlp_ratio, t, transform_scale, scale_adjustment)
                                     for t in apply_transform])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        attn = None
        for block in self.blocks:
            x, attn = block(x, attn)
        return self.head(self.norm(x)[:, 0])


TINY = {
    "16b-like": dict(apply_transform=[True] * 3),
    "S-like": dict(apply_transform=[False, False, True], transform_scale=True, cnn=True, scale_adjustment=0.5),
    "L-like": dict(apply_transform=[False, True, True], cnn=True, scale_adjustment=0.5),
}


def tiny_pair(config, seed=0):
    torch.manual_seed(seed)
    options = TINY[config]
    official = OfficialDeepViT(32, 8, 48, 6, **options).double()
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics everywhere
        for module in official.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(0.0, 0.1), module.running_var.uniform_(0.5, 1.5)
    ours = reattn.models.DeepVisionTransformer(
        img_size=32, patch_size=8, num_classes=7, embed_dim=48, depth=3, num_heads=6, mlp_ratio=3, qkv_bias=True,
        norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), apply_transform=options["apply_transform"],
        transform_scale=options.get("transform_scale", False), use_cnn_embed=options.get("cnn", False),
        scale_adjustment=options.get("scale_adjustment", 1.0), backend="eager").double()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def images(B=3, size=32, dtype=torch.float64, seed=1):
    return torch.randn(B, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- keys, shapes, counts


@pytest.mark.parametrize("official_name", list(OFFICIAL))
def test_state_dict_keys_shapes_and_counts_are_the_official_ones(official_name):
    entries, digest, parameters = OFFICIAL[official_name]
    with torch.device("meta"):  # shapes only: no memory, no init
        model = reattn.models.create_model(official_name)
    keys = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    count = sum(p.numel() for p in model.parameters())
    print(f"{official_name} ({reattn.models.OFFICIAL_NAMES[official_name]}): {count:,} parameters "
          f"({count / 1e6:.1f}M), {len(keys)} state_dict entries")
    assert len(keys) == entries
    assert hashlib.sha256(repr(keys).encode()).hexdigest()[:16] == digest
    assert count == parameters


def test_parameter_counts_match_the_paper():
    counts = {}
    for name in ("deepvit_16b", "deepvit_24b", "deepvit_32b", "deepvit_s", "deepvit_l"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in reattn.models.create_model(name).parameters()) / 1e6
    print("parameters (M):", {k: round(v, 2) for k, v in counts.items()})
    assert round(counts["deepvit_16b"], 1) == 24.4  # README: 24.5M
    assert round(counts["deepvit_24b"], 1) == 36.3
    assert round(counts["deepvit_32b"], 1) == 48.1
    assert round(counts["deepvit_s"]) == 27
    assert round(counts["deepvit_l"], 1) == 58.9  # the paper says 55M; the official code builds 58.9M


def test_model_configuration_follows_the_official_factories():
    with torch.device("meta"):
        s, l16 = reattn.models.deepvit_s(), reattn.models.deepvit_l()
        b32 = reattn.models.deepvit_32b()
    assert [b.attn.apply_transform for b in s.blocks] == [False] * 11 + [True] * 5
    assert [b.attn.apply_transform for b in l16.blocks] == [False] * 20 + [True] * 12
    assert all(b.attn.apply_transform for b in b32.blocks) and len(b32.blocks) == 32
    assert s.blocks[-1].attn.reatten_scale == pytest.approx(33 ** -0.5)  # transform_scale, head dim 33
    assert l16.blocks[-1].attn.reatten_scale == 1.0  # no transform_scale in the official deepvit_L
    assert s.blocks[0].adjust_ratio == l16.blocks[0].adjust_ratio == 0.5 and b32.blocks[0].adjust_ratio == 1.0
    assert isinstance(s.patch_embed, reattn.models.ConvPatchEmbed)
    assert isinstance(b32.patch_embed, reattn.models.PatchEmbed)
    assert b32.blocks[0].norm1.eps == 1e-6 and b32.blocks[0].attn.qkv.bias is not None
    with pytest.raises(ValueError, match="unknown model"):
        reattn.models.create_model("deepvit_xl")


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("config", list(TINY))
def test_outputs_gradients_and_statistics_match_the_official_model(config):
    official, ours = tiny_pair(config)
    official.train(), ours.train()
    for step in range(2):
        x = images(seed=step)
        expected, got = official(x), ours(x)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        expected.square().sum().backward()
        got.square().sum().backward()
    for (name, p_ref), p in zip(official.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=name)
    reference, state = official.state_dict(), ours.state_dict()
    for key in reference:  # running statistics and num_batches_tracked after two training steps
        torch.testing.assert_close(state[key], reference[key], rtol=1e-10, atol=1e-12, msg=key)
    official.eval(), ours.eval()
    torch.testing.assert_close(ours(images(seed=5)), official(images(seed=5)), rtol=1e-10, atol=1e-12)


def test_full_size_deepvit_s_matches_the_transcription():
    torch.manual_seed(0)
    official = OfficialDeepViT(224, 16, 396, 12, [False] * 11 + [True] * 5, classes=1000, transform_scale=True,
                               cnn=True, scale_adjustment=0.5).eval()
    ours = reattn.models.deepvit_s().eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = images(B=1, size=224, dtype=torch.float32)
    with torch.no_grad():
        diff = (ours(x) - official(x)).abs().max().item()
    print(f"DeepViT-S at 224, float32: max |logit diff| = {diff:.3g}")
    assert diff < 1e-5


def test_official_checkpoint_files_load_strictly(tmp_path):
    official, _ = tiny_pair("S-like")
    wrapped = {"epoch": 3, "arch": "deepvit_S",
               "state_dict": {"module." + key: value for key, value in official.state_dict().items()}}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(wrapped, path)
    _, ours = tiny_pair("S-like", seed=7)
    result = reattn.models.load_official_checkpoint(ours, str(path))
    assert not result.missing_keys and not result.unexpected_keys
    official.eval(), ours.eval()
    torch.testing.assert_close(ours(images()), official(images()), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="Missing key"):
        reattn.models.load_official_checkpoint(ours, {"state_dict": {"head.weight": official.head.weight}})


def test_training_checkpoints_with_args_load_safely_and_others_say_how(tmp_path):
    """timm-style training checkpoints hold their argparse ``args``: the safe default loads them; a file
    with other Python objects is refused, saying how to load a trusted one (weights_only=False)."""
    import argparse
    import pathlib
    import pickle

    official, _ = tiny_pair("S-like")
    state = {"module." + key: value for key, value in official.state_dict().items()}
    args = argparse.Namespace(model="deepvit_S", lr=5e-4, sched="cosine", betas=(0.9, 0.999), resume=None)
    path = tmp_path / "with_args.pth.tar"
    torch.save({"epoch": 3, "args": args, "state_dict": state}, path)
    _, ours = tiny_pair("S-like", seed=7)
    result = reattn.models.load_official_checkpoint(ours, path)
    assert not result.missing_keys and not result.unexpected_keys
    official.eval(), ours.eval()
    torch.testing.assert_close(ours(images()), official(images()), rtol=1e-10, atol=1e-12)

    other = tmp_path / "with_a_path.pth.tar"
    torch.save({"args": argparse.Namespace(output=pathlib.PurePosixPath("/runs/1")), "state_dict": state}, other)
    _, ours = tiny_pair("S-like", seed=8)
    with pytest.raises(pickle.UnpicklingError, match=r"If you trust the file, load it with "
                                                      r"load_official_checkpoint\(model, path, weights_only=False\)"
                                                      r".*Unsupported global: GLOBAL pathlib.PurePosixPath"):
        reattn.models.load_official_checkpoint(ours, other)
    reattn.models.load_official_checkpoint(ours, other, weights_only=False)
    torch.testing.assert_close(ours.eval()(images()), official(images()), rtol=1e-10, atol=1e-12)


def test_cos_reg_returns_every_block_map_in_training():
    torch.manual_seed(0)
    model = reattn.models.DeepVisionTransformer(img_size=32, patch_size=8, num_classes=7, embed_dim=48, depth=2,
                                                num_heads=6, apply_transform=[False, True], cos_reg=True)
    logits, maps = model.train()(images(dtype=torch.float32))
    assert logits.shape == (3, 7) and [m.shape for m in maps] == [(3, 6, 17, 17)] * 2
    assert model.eval()(images(dtype=torch.float32)).shape == (3, 7)


def test_fused_backend_matches_eager_on_a_deepvit_model():
    if "triton" not in reattn.available_backends("cpu"):
        pytest.skip("the Triton backend is not available here: " + ", ".join(reattn.available_backends()))
    _, eager = tiny_pair("S-like")
    fused = copy.deepcopy(eager)
    for block in fused.blocks:
        block.attn.backend = "triton"
    eager.eval(), fused.eval()  # BatchNorm eval: a mode the fused kernels cover
    x = images()
    expected, got = eager(x), fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    expected.sum().backward()
    got.sum().backward()
    for (name, p_ref), p in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=name)


# ---------------------------------------------------------------- vit-pytorch DeepViT converter


def _vit_pytorch_deepvit(seed):
    from vit_pytorch.deepvit import DeepViT

    torch.manual_seed(seed)
    return DeepViT(image_size=32, patch_size=8, num_classes=7, dim=48, depth=3, heads=6, mlp_dim=96,
                   dim_head=8).double()


@pytest.mark.parametrize("blocks", [None, [-1]], ids=["all", "last"])
def test_vit_pytorch_deepvit_state_dict_converts_to_the_swapped_layout(blocks):
    source = _vit_pytorch_deepvit(seed=0)
    with torch.no_grad():
        for layer in source.transformer.layers:
            layer[0].reattn_norm[1].weight.uniform_(0.5, 1.5)
            layer[0].reattn_norm[1].bias.uniform_(-0.2, 0.2)
    target = reattn.swap_attention(_vit_pytorch_deepvit(seed=1), blocks=blocks)  # other weights
    converted = convert_vit_pytorch_deepvit(source.state_dict(), blocks=blocks)
    target.load_state_dict(converted, strict=True)
    key = "transformer.layers.2.0.attn.reatten_matrix.weight"
    torch.testing.assert_close(converted[key].flatten(1), source.transformer.layers[2][0].reattn_weights.t())
    for mode in ("train", "eval"):
        getattr(source, mode)(), getattr(target, mode)()
        torch.testing.assert_close(target(images()), source(images()), rtol=1e-12, atol=1e-13)


def test_converter_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="reattn_weights"):
        convert_vit_pytorch_deepvit({"head.weight": torch.zeros(2)})
    state = _vit_pytorch_deepvit(seed=0).state_dict()
    state["transformer.layers.0.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_vit_pytorch_deepvit(state)
    with pytest.raises(ValueError, match="bad block index"):
        convert_vit_pytorch_deepvit(_vit_pytorch_deepvit(seed=0).state_dict(), blocks=[3])
