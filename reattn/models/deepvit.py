"""The official DeepViT models (github.com/zhoudaquan/dvit_repo), on :class:`reattn.ReAttention`.

Written from the official ``models/deep_vision_transformer.py`` and ``models/layers.py``: the same
module tree, attribute names and forward, so ``state_dict`` keys and shapes are identical and
official checkpoints load with ``strict=True`` (:func:`load_official_checkpoint`). What is ours:
the attention runs through :func:`reattn.re_attention` (``backend=``), and ``norm``/``mix_init``
can be changed from the official BatchNorm / ``nn.Conv2d`` init.

Official structure, for reference:

* ``patch_embed``: ``PatchEmbed`` (``proj``: Conv2d, kernel = stride = patch) or, for DeepViT-S/L,
  the T2T-style CNN stem ``PatchEmbed_CNN`` (here :class:`ConvPatchEmbed`): ``conv1`` 7×7 stride 2
  (64 channels, no bias), ``bn1``, ReLU, ``conv2`` 3×3 (64, no bias), ``bn2``, ReLU, ``proj``
  Conv2d with kernel = stride = patch/2.
* ``cls_token`` [1, 1, C], ``pos_embed`` [1, N + 1, C], ``pos_drop``.
* ``blocks.i``: ``norm1``, ``attn`` (every block is the official ``ReAttention``; with
  ``apply_transform=False`` it holds only ``qkv`` and ``proj`` and is plain attention), ``norm2``,
  ``mlp.fc1``/``mlp.fc2`` (GELU), LayerNorm eps 1e-6. The "residual scale adjustment" s
  (``scale_adjustment``, 0.5 for DeepViT-S/L) is the official block forward
  ``x = x + attn(norm1(s·x)) / s``; ``x = x + mlp(norm2(s·x)) / s``.
* ``norm`` (final LayerNorm), ``head`` (Linear), the classifier reads the class token.

Parameter counts (``sum(p.numel() for p in model.parameters())``, 1000 classes, identical to the
official code's, checked against it):

========================  ============  ===================================================
model                     parameters    paper / official README
========================  ============  ===================================================
``deepvit_16b``           24,426,664    24.5M (README), 24.4M
``deepvit_24b``           36,261,448    36.3M
``deepvit_32b``           48,096,232    48.1M
``deepvit_s``             27,312,632    27M (paper, Table 7)
``deepvit_l``             58,883,708    55M in the paper; the official code gives 58.9M
``deepvit_l_384``         59,043,308    (DeepViT-L at 384², larger ``pos_embed``)
========================  ============  ===================================================

Notes where the official code and the paper/issue differ, resolved in favour of the code (that
is what the checkpoints hold): DeepViT-S has ``transform_scale=True`` but DeepViT-L does not;
both use 12 heads (head dims 33 and 35); DeepViT-L's count is 58.9M, not the paper's 55M.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from reattn.module import ReAttention

__all__ = [
    "Block",
    "ConvPatchEmbed",
    "DeepVisionTransformer",
    "DropPath",
    "HybridEmbed",
    "Mlp",
    "OFFICIAL_NAMES",
    "PatchEmbed",
    "create_model",
    "deepvit_16b",
    "deepvit_24b",
    "deepvit_32b",
    "deepvit_l",
    "deepvit_l_384",
    "deepvit_s",
    "load_official_checkpoint",
    "model_names",
]


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``, which the official blocks use)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout (official ``Mlp``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution (official ``PatchEmbed``, as timm's)."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.num_patches = (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"PatchEmbed: input image size {tuple(x.shape[-2:])} does not match the model's "
                             f"{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvPatchEmbed(nn.Module):
    """The CNN patch stem of DeepViT-S/L (official ``PatchEmbed_CNN``, following T2T-ViT).

    conv1 7×7/2 (64 ch, no bias) -> bn1 -> ReLU -> conv2 3×3/1 (64 ch, no bias) -> bn2 -> ReLU ->
    proj Conv2d(64, embed_dim, kernel = stride = patch_size // 2): the same token grid as a
    ``patch_size`` patch embedding. Like the official stem it does not check the image size.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.num_patches = (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])
        half = _pair(patch_size // 2) if isinstance(patch_size, int) else tuple(p // 2 for p in self.patch_size)
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.proj = nn.Conv2d(64, embed_dim, kernel_size=half, stride=half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class HybridEmbed(nn.Module):
    """Tokens from the last feature map of a CNN backbone (official ``HybridEmbed``).

    ``backbone(x)`` must return a sequence of feature maps; the last one [B, F, h, w] is
    flattened and projected by ``proj`` (Linear F -> embed_dim).
    """

    def __init__(self, backbone: nn.Module, img_size=224, feature_size=None, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.backbone = backbone
        if feature_size is None:
            with torch.no_grad():
                training = backbone.training
                backbone.eval()
                out = backbone(torch.zeros(1, in_chans, *self.img_size))[-1]
                backbone.train(training)
            feature_size, feature_dim = tuple(out.shape[-2:]), out.shape[1]
        else:
            feature_size = _pair(feature_size)
            feature_dim = backbone.feature_info.channels()[-1]
        self.num_patches = feature_size[0] * feature_size[1]
        self.proj = nn.Linear(feature_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)[-1].flatten(2).transpose(1, 2))


class Block(nn.Module):
    """The official DeepViT block (pre-norm, residual scale adjustment ``scale_adjustment``).

    With ``re_atten=True`` (every official model) the forward is
    ``x = x + drop_path(attn(norm1(s·x)) / s)``; ``x = x + drop_path(mlp(norm2(s·x))) / s``.
    With ``re_atten=False`` it is the plain pre-norm ViT block (s unused), and ``attn`` is plain
    attention with the same ``qkv``/``proj`` keys as the official ``Attention``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 re_atten: bool = True, apply_transform: bool = False, scale_adjustment: float = 1.0,
                 transform_scale: bool = False, *, norm: str = "batch", mix_init: str = "official",
                 backend: str = "auto") -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.re_atten = re_atten
        self.adjust_ratio = scale_adjustment
        self.dim = dim
        self.attn = ReAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                                proj_drop=drop, apply_transform=re_atten and apply_transform,
                                transform_scale=transform_scale, norm=norm, mix_init=mix_init, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        attn = None
        if self.re_atten:
            s = self.adjust_ratio
            out = self.attn(self.norm1(x * s), return_attention=return_attention)
            if return_attention:
                out, attn = out
            x = x + self.drop_path(out / s)
            x = x + self.drop_path(self.mlp(self.norm2(x * s))) / s
        else:
            out = self.attn(self.norm1(x), return_attention=return_attention)
            if return_attention:
                out, attn = out
            x = x + self.drop_path(out)
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


def _init_weights(module: nn.Module) -> None:
    # Official init: truncated normal (std 0.02, cut at ±2) for every Linear, zero biases; LayerNorm
    # 1/0. Convolutions (patch stem, head mixing) and BatchNorm keep PyTorch's defaults.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)


class DeepVisionTransformer(nn.Module):
    """DeepViT (official ``DeepVisionTransformer``): a ViT whose blocks use Re-attention.

    Args (official names and defaults):
        img_size, patch_size, in_chans, num_classes, embed_dim: as in ViT.
        depth: number of blocks, or (official) a list whose length is the number of blocks.
        num_heads, mlp_ratio, qkv_bias, qk_scale: per block.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout and the maximum of the
            linearly increasing stochastic depth.
        hybrid_backbone: a CNN backbone for :class:`HybridEmbed`.
        norm_layer: LayerNorm constructor (the official models use eps 1e-6).
        re_atten: blocks are DeepViT blocks (True in every official model).
        cos_reg: in training, ``forward`` also returns the list of every block's attention map (the
            official cosine-similarity regularizer hook; materializes the maps, eager backend).
        use_cnn_embed: the CNN patch stem (:class:`ConvPatchEmbed`) of DeepViT-S/L.
        apply_transform: per block, whether it applies re-attention (list of bools) or one bool for
            all; None means every block.
        transform_scale: multiply the re-attention map by the qk scale (DeepViT-S).
        scale_adjustment: the residual scale adjustment s of the blocks (0.5 for DeepViT-S/L).
        group: accepted for signature parity; unused, as in the official code.
        norm, mix_init, backend: of every :class:`reattn.ReAttention` (keyword only; the official
            model is ``norm="batch"``, ``mix_init="official"``).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: Union[int, Sequence] = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, hybrid_backbone: Optional[nn.Module] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, group: bool = False, re_atten: bool = True,
                 cos_reg: bool = False, use_cnn_embed: bool = False,
                 apply_transform: Union[None, bool, Sequence[bool]] = None, transform_scale: bool = False,
                 scale_adjustment: float = 1.0, *, norm: str = "batch", mix_init: str = "official",
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.cos_reg = cos_reg
        num_blocks = depth if isinstance(depth, int) else len(depth)
        if apply_transform is None or isinstance(apply_transform, bool):
            apply_transform = [True if apply_transform is None else apply_transform] * num_blocks
        apply_transform = [bool(a) for a in apply_transform]
        if len(apply_transform) != num_blocks:
            raise ValueError(f"DeepVisionTransformer: apply_transform has {len(apply_transform)} entries for "
                             f"{num_blocks} blocks")
        if hybrid_backbone is not None:
            self.patch_embed = HybridEmbed(hybrid_backbone, img_size=img_size, in_chans=in_chans, embed_dim=embed_dim)
        elif use_cnn_embed:
            self.patch_embed = ConvPatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                              embed_dim=embed_dim)
        else:
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()  # cpu: meta-device builds work
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=norm_layer, re_atten=re_atten,
                  apply_transform=apply_transform[i], transform_scale=transform_scale,
                  scale_adjustment=scale_adjustment, norm=norm, mix_init=mix_init, backend=backend)
            for i in range(num_blocks)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "") -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor):
        """The normalized class token [B, C]; with ``cos_reg`` in training also every block's map."""
        x = self._tokens(x)
        collect = self.cos_reg and self.training
        maps = []
        for block in self.blocks:
            if collect:
                x, attn = block(x, return_attention=True)
                maps.append(attn)
            else:
                x = block(x)
        x = self.norm(x)[:, 0]
        return (x, maps) if collect else x

    def forward(self, x: torch.Tensor):
        if self.cos_reg and self.training:
            x, maps = self.forward_features(x)
            return self.head(x), maps
        return self.head(self.forward_features(x))


def _cfg(**kwargs) -> Dict[str, Any]:
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9, interpolation="bicubic",
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="patch_embed.proj", classifier="head")
    cfg.update(kwargs)
    return cfg


def _build(cfg: Dict[str, Any], num_blocks: int, last_transform: int, **kwargs) -> DeepVisionTransformer:
    apply_transform = [False] * (num_blocks - last_transform) + [True] * last_transform
    options = dict(patch_size=16, depth=num_blocks, apply_transform=apply_transform, num_heads=12, mlp_ratio=3,
                   qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    options.update(kwargs)
    model = DeepVisionTransformer(**options)
    model.default_cfg = cfg
    return model


def deepvit_16b(**kwargs) -> DeepVisionTransformer:
    """DeepViT-16: 16 blocks, dim 384, 12 heads, mlp ratio 3, qkv bias, re-attention everywhere (24.4M)."""
    return _build(_cfg(), 16, 16, embed_dim=384, **kwargs)


def deepvit_24b(**kwargs) -> DeepVisionTransformer:
    """DeepViT-24: as DeepViT-16 with 24 blocks (36.3M)."""
    return _build(_cfg(), 24, 24, embed_dim=384, **kwargs)


def deepvit_32b(**kwargs) -> DeepVisionTransformer:
    """DeepViT-32: as DeepViT-16 with 32 blocks (48.1M)."""
    return _build(_cfg(), 32, 32, embed_dim=384, **kwargs)


def deepvit_s(**kwargs) -> DeepVisionTransformer:
    """DeepViT-S: dim 396, 16 blocks, re-attention in the last 5 with ``transform_scale``, CNN patch
    stem, residual scale adjustment 0.5 (27.3M; the paper says 27M)."""
    return _build(_cfg(), 16, 5, embed_dim=396, transform_scale=True, use_cnn_embed=True, scale_adjustment=0.5,
                  **kwargs)


def deepvit_l(**kwargs) -> DeepVisionTransformer:
    """DeepViT-L: dim 420, 32 blocks, re-attention in the last 12 (no ``transform_scale``, as the
    official code), CNN patch stem, residual scale adjustment 0.5 (58.9M; the paper says 55M)."""
    return _build(_cfg(), 32, 12, embed_dim=420, use_cnn_embed=True, scale_adjustment=0.5, **kwargs)


def deepvit_l_384(**kwargs) -> DeepVisionTransformer:
    """DeepViT-L at 384×384 input (official ``deepvit_L_384``; 59.0M)."""
    return _build(_cfg(input_size=(3, 384, 384), crop_pct=1.0), 32, 12, img_size=384, embed_dim=420,
                  use_cnn_embed=True, scale_adjustment=0.5, **kwargs)


_MODELS: Dict[str, Callable[..., DeepVisionTransformer]] = {
    "deepvit_16b": deepvit_16b,
    "deepvit_24b": deepvit_24b,
    "deepvit_32b": deepvit_32b,
    "deepvit_s": deepvit_s,
    "deepvit_l": deepvit_l,
    "deepvit_l_384": deepvit_l_384,
}

#: The official repository's registered model names -> ours.
OFFICIAL_NAMES: Dict[str, str] = {
    "deepvit_patch16_224_re_attn_16b": "deepvit_16b",
    "deepvit_patch16_224_re_attn_24b": "deepvit_24b",
    "deepvit_patch16_224_re_attn_32b": "deepvit_32b",
    "deepvit_S": "deepvit_s",
    "deepvit_L": "deepvit_l",
    "deepvit_L_384": "deepvit_l_384",
}


def model_names() -> List[str]:
    return list(_MODELS)


def create_model(name: str, **kwargs) -> DeepVisionTransformer:
    """Build a model by our name (``deepvit_16b``...) or the official one (``deepvit_S``...)."""
    key = OFFICIAL_NAMES.get(name, name)
    if key not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; known: {sorted(_MODELS)} and the official names "
                         f"{sorted(OFFICIAL_NAMES)}")
    return _MODELS[key](**kwargs)


def load_official_checkpoint(model: nn.Module, checkpoint, strict: bool = True, map_location="cpu",
                             weights_only: bool = True):
    """Load an official DeepViT checkpoint (a path, or what ``torch.load`` returned) into ``model``.

    Unwraps the training script's dictionaries (``state_dict``, ``state_dict_ema``, ``model``; the
    first present, in that order) and a ``module.`` prefix from DataParallel, then calls
    ``model.load_state_dict(..., strict=strict)`` and returns its result.

    weights_only: load a path with ``torch.load(..., weights_only=True)`` (the default: no code in
    the file runs), also allowing ``argparse.Namespace``, which timm-style training checkpoints hold
    as their ``args``. A file holding other Python objects is refused with an error saying so; only
    for a file you trust, ``weights_only=False`` loads anything (pickle can run arbitrary code).
    """
    if not isinstance(checkpoint, dict):
        checkpoint = _load_checkpoint_file(checkpoint, map_location, weights_only)
    for key in ("state_dict", "state_dict_ema", "model"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}
    return model.load_state_dict(state, strict=strict)


def _load_checkpoint_file(path, map_location, weights_only: bool) -> dict:
    if not weights_only:
        return torch.load(path, map_location=map_location, weights_only=False)
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"load_official_checkpoint: {path} holds Python objects other than tensors, containers and "
            "argparse.Namespace, so the safe loader (torch.load(weights_only=True)) refuses it. If you trust the "
            "file, load it with load_official_checkpoint(model, path, weights_only=False) (unpickling can run "
            f"arbitrary code).{_unpickler_reason(error)}") from error


def _unpickler_reason(error: Exception) -> str:
    """The line of torch.load's message that names what it refused (e.g. 'Unsupported global: ...')."""
    lines = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler error:" in line]
    return f" torch.load: {lines[0].split('WeightsUnpickler error:', 1)[1].strip()}" if lines else ""
